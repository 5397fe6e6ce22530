"""The lab-host VM shared by the bare-metal end-to-end tests (kexec and GRUB variants).

QEMU q35 TCG with intel-iommu and the edu device, e1000 on user networking with SSH forwarded to
a loopback port, a TCP serial console on another, and QMP on a private socket; plus the
bare-metal target mapping that drives it (command power driver over QMP, tcp console, SSH with
the image's host key pinned in known_hosts).
"""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Sequence

from harness.targets import open_target, proc
from harness.targets.base import remove_runtime_dir, runtime_dir
from harness.targets.config import from_dict

REPO = Path(__file__).resolve().parents[2]
LABHOST = REPO / "guest-images" / "labhost"
DMAR_BASE = 0xFED90000
CAP_39 = 0x00D2008C22260206          # QEMU 7.2 intel-iommu, aw-bits=39
ECAP = 0xF42                         # ... with intremap=off
ECAP_IR = 0xF00F4A                   # ... with intremap=on (IR, EIM off, ...): Linux then uses it
BOOT_BOUND_S = 240
LINUX_CMDLINE = "console=ttyS0,115200 intel_iommu=on quiet panic=-1"   # the lab host's own Linux


def load_recipe(name: str, filename: str):
    """A guest-images/labhost recipe as a module (that directory is not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, LABHOST / filename)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod                     # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


def load_builder():
    return load_recipe("labhost_build", "build.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LabHostVM:
    process: Any
    cfg: dict                        # the bare-metal target mapping (from_dict input)
    up: str                          # wait_for_ssh's answer: "up after N s: <uname -r>"
    seconds: float                   # from QEMU's start to SSH answering
    runtime: Path
    log: BinaryIO

    def stop(self) -> None:
        proc.end(self.process)
        self.log.close()
        remove_runtime_dir(self.runtime)


def start_labhost(boot_args: list[str], host_key_pub: str, client_key: Path, work: Path, *,
                  name: str, boot: dict, source: str, intremap: bool = False,
                  agent_args: Sequence[str] = ("-device", "edu,addr=0x4.0")) -> LabHostVM:
    """Start the VM with ``boot_args`` (-kernel/-initrd or a disk) and wait (bounded) for SSH.
    ``intremap``: the IOMMU offers interrupt remapping, which Linux then enables.  ``agent_args``:
    the DMA agent the host has (QEMU's edu by default; a real host has e.g. NVMe instead)."""
    t0 = time.monotonic()
    rt = runtime_dir("vtx-labhost-")
    ssh_port, con_port = free_port(), free_port()
    qmp = rt / "qmp.sock"
    argv = ["qemu-system-x86_64", "-machine", "q35,accel=tcg", "-cpu", "max", "-m", "512",
            "-nodefaults", "-no-user-config", "-display", "none",
            "-device", f"intel-iommu,aw-bits=39,intremap={'on' if intremap else 'off'}",
            *agent_args,
            "-netdev", f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{ssh_port}-:22",
            "-device", "e1000,netdev=n0,addr=0x3.0",
            "-chardev", f"socket,id=qmp,path={qmp},server=on,wait=off", "-mon", "chardev=qmp,mode=control",
            "-serial", f"tcp:127.0.0.1:{con_port},server=on,wait=off", *boot_args]
    log = open(work / "qemu.stderr", "wb")
    vm = proc.spawn(argv, stdout=log, stderr=log)
    known = work / "known_hosts"
    known.write_text(f"[127.0.0.1]:{ssh_port} {' '.join(host_key_pub.split()[:2])}\n")
    power = [sys.executable, str(LABHOST / "qmp_power.py"), str(qmp)]
    cfg = {
        "name": name, "kind": "baremetal", "timeout_s": 120,
        "baremetal": {
            "host": name,
            "power": {"driver": "command", "on": power + ["on"], "off": power + ["off"],
                      "cycle": power + ["cycle"], "status": power + ["status"], "timeout_s": 20},
            "console": {"driver": "tcp", "host": "127.0.0.1", "port": con_port},
            "boot": boot,
            "ssh": {"host": "127.0.0.1", "port": ssh_port, "user": "root", "key_file": str(client_key),
                    "use_agent": False, "known_hosts": str(known)},
            "lease": {"backend": "file", "directory": str(work / "locks"), "timeout_s": 5},
            "boot_timeout_s": 60,
            "restore": {"action": "cycle", "ssh_wait_s": BOOT_BOUND_S},
        },
    }
    try:
        up = open_target(from_dict(cfg, source)).wait_for_ssh(BOOT_BOUND_S)
    except BaseException:
        proc.end(vm)
        log.close()
        remove_runtime_dir(rt)
        raise
    return LabHostVM(vm, cfg, up, time.monotonic() - t0, rt, log)


# -- a labgrid lab on loopback: coordinator, exporters, places -----------------------------------

LABGRID_BOUND_S = 60          # start-up bounds under load (8 agents share 2 cores)


class LabgridLab:
    """A real labgrid coordinator on 127.0.0.1 (state files in a private runtime directory) and
    the exporters and places a test adds; ``stop`` ends every process it started."""

    def __init__(self, work: Path):
        self.work = work
        self.runtime = runtime_dir("vtx-labgrid-")
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.processes: list[Any] = []
        self.logs: list[BinaryIO] = []
        self.coordinator = self._spawn("coordinator", ["labgrid.remote.coordinator", "-l", self.address],
                                       f"listening on 127.0.0.1:{self.port}")

    def _spawn(self, name: str, module_argv: list[str], ready: str) -> Any:
        """Start ``python -m <module_argv>`` in the runtime dir; wait (bounded) for ``ready`` in its log."""
        log_path = self.work / f"{name}.log"
        log = open(log_path, "wb")
        self.logs.append(log)
        p = proc.spawn([sys.executable, "-u", "-m", *module_argv], cwd=self.runtime, stdout=log, stderr=log,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.processes.append(p)
        deadline = time.monotonic() + LABGRID_BOUND_S
        while ready not in log_path.read_text(errors="replace"):
            if p.poll() is not None or time.monotonic() > deadline:
                text = log_path.read_text(errors="replace")[-600:]
                self.stop()
                raise RuntimeError(f"labgrid {name} not ready ({ready!r}) within {LABGRID_BOUND_S} s; "
                                   f"status {p.poll()}; log: {text}")
            time.sleep(0.1)
        return p

    def exporter(self, name: str, groups: dict[str, dict]) -> Any:
        """Start an exporter named ``name`` publishing ``groups`` ({group: {resource: params}})."""
        import yaml
        config = self.work / f"exporter-{name}.yaml"
        config.write_text(yaml.safe_dump(groups))
        return self._spawn(f"exporter-{name}", ["labgrid.remote.exporter", "-c", self.address, "-n", name,
                                                "--hostname", "127.0.0.1", str(config)],
                           "connected to coordinator")

    def client(self, *args: str, check: bool = True) -> str:
        """Run ``labgrid-client -x <coordinator> <args>`` (bounded); its output."""
        import subprocess
        r = subprocess.run([sys.executable, "-m", "labgrid.remote.client", "-x", self.address, *args],
                           capture_output=True, text=True, timeout=LABGRID_BOUND_S, cwd=self.work,
                           env={k: v for k, v in os.environ.items() if not k.startswith("LG_")})
        if check and r.returncode != 0:
            raise RuntimeError(f"labgrid-client {' '.join(args)}: status {r.returncode}: {r.stderr[-600:]}")
        return r.stdout + r.stderr

    def add_place(self, name: str, match: str, tags: dict[str, str]) -> None:
        self.client("-p", name, "create")
        self.client("-p", name, "add-match", match)
        self.client("-p", name, "set-tags", *[f"{k}={v}" for k, v in tags.items()])

    def wait_resources(self, count: int) -> None:
        """Wait (bounded) until the coordinator lists ``count`` resources."""
        deadline = time.monotonic() + LABGRID_BOUND_S
        while True:
            lines = [ln for ln in self.client("resources").splitlines() if ln.strip()]
            if len(lines) >= count or time.monotonic() > deadline:
                assert len(lines) >= count, f"coordinator lists {lines}, expected {count} resources"
                return
            time.sleep(0.2)

    def state(self) -> tuple[dict[str, str | None], list[str]]:
        """({place: acquired-by or None}, [reservation tokens]) as the coordinator reports them."""
        places: dict[str, str | None] = {}
        current = None
        for line in self.client("-v", "places").splitlines():
            if line.startswith("Place '"):
                current = line.split("'")[1]
                places[current] = None
            elif current and line.strip().startswith("acquired:"):
                who = line.split(":", 1)[1].strip()
                places[current] = None if who == "None" else who
        tokens = [ln.split("'")[1] for ln in self.client("reservations").splitlines() if ln.startswith("Reservation '")]
        return places, tokens

    def stop(self) -> None:
        for p in reversed(self.processes):
            proc.end(p, grace=5.0)           # the coordinator shuts down gracefully on SIGTERM
        self.processes.clear()
        for log in self.logs:
            log.close()
        self.logs.clear()
        remove_runtime_dir(self.runtime)


def start_power_rest(qmp: Path, work: Path) -> tuple[Any, int]:
    """The lab-host VM's labgrid ``rest`` power switch on 127.0.0.1; (process, port)."""
    port_file = work / "power_rest.port"
    log = open(work / "power_rest.log", "wb")
    p = proc.spawn([sys.executable, str(LABHOST / "power_rest.py"), str(qmp), str(port_file)], stdout=log, stderr=log)
    log.close()
    deadline = time.monotonic() + LABGRID_BOUND_S
    while not port_file.exists():
        if p.poll() is not None or time.monotonic() > deadline:
            proc.end(p)
            raise RuntimeError(f"power_rest.py did not start (status {p.poll()}): "
                               f"{(work / 'power_rest.log').read_text(errors='replace')[-400:]}")
        time.sleep(0.05)
    return p, int(port_file.read_text())
