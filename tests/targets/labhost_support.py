"""The lab-host VM shared by the bare-metal end-to-end tests (kexec and GRUB variants).

QEMU q35 TCG with intel-iommu and the edu device, e1000 on user networking with SSH forwarded to
a loopback port, a TCP serial console on another, and QMP on a private socket; plus the
bare-metal target mapping that drives it (command power driver over QMP, tcp console, SSH with
the image's host key pinned in known_hosts).
"""

from __future__ import annotations

import importlib.util
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

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
                  name: str, boot: dict, source: str, intremap: bool = False) -> LabHostVM:
    """Start the VM with ``boot_args`` (-kernel/-initrd or a disk) and wait (bounded) for SSH.
    ``intremap``: the IOMMU offers interrupt remapping, which Linux then enables."""
    t0 = time.monotonic()
    rt = runtime_dir("vtx-labhost-")
    ssh_port, con_port = free_port(), free_port()
    qmp = rt / "qmp.sock"
    argv = ["qemu-system-x86_64", "-machine", "q35,accel=tcg", "-cpu", "max", "-m", "512",
            "-nodefaults", "-no-user-config", "-display", "none",
            "-device", f"intel-iommu,aw-bits=39,intremap={'on' if intremap else 'off'}",
            "-device", "edu,addr=0x4.0",
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
