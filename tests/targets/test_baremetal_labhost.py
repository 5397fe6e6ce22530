"""End to end: the bare-metal target drives a "lab host" (Debian kernel + sshd + kexec, booted in
QEMU TCG with intel-iommu and intel_iommu=on) over loopback: SSH in with a verified host key,
kexec the payload, read records from a TCP serial console, then power-cycle it back to Linux
through a command driver that speaks QMP."""

from __future__ import annotations

import importlib.util
import json
import socket
import sys
import time
from pathlib import Path

import pytest

from harness.observe import observe
from harness.observe.runner import run_scenario
from harness.payload import edu as pedu
from harness.payload import layout, vtd
from harness.payload.image import Scenario
from harness.payload.records import Kind
from harness.payload.vtd_reset import VTD_RESET_ASM, reset_unit
from harness.targets import open_target, proc
from harness.targets.base import runtime_dir, remove_runtime_dir
from harness.targets.config import from_dict

REPO = Path(__file__).resolve().parents[2]
LABHOST = REPO / "guest-images" / "labhost"
DMAR_BASE = 0xFED90000
CAP_39 = 0x00D2008C22260206          # QEMU 7.2 intel-iommu, aw-bits=39
ECAP = 0xF42                         # ... with intremap=off
BOOT_BOUND_S = 240

pytestmark = pytest.mark.xdist_group("labhost")


def _load_builder():
    spec = importlib.util.spec_from_file_location("labhost_build", LABHOST / "build.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["labhost_build"] = mod          # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def labhost(tmp_path_factory):
    """The lab-host VM, booted to sshd; yields the target YAML mapping that drives it."""
    t0 = time.monotonic()
    img = _load_builder().build(log=lambda m: None)
    print(f"\nlab-host image: {img.directory} ({'built' if img.built_now else 'cached'} in {img.seconds:.1f} s)")
    rt = runtime_dir("vtx-labhost-")
    work = tmp_path_factory.mktemp("labhost")
    ssh_port, con_port = _port(), _port()
    qmp = rt / "qmp.sock"
    argv = ["qemu-system-x86_64", "-machine", "q35,accel=tcg", "-cpu", "max", "-m", "512",
            "-nodefaults", "-no-user-config", "-display", "none",
            "-device", "intel-iommu,aw-bits=39,intremap=off",
            "-device", "edu,addr=0x4.0",
            "-netdev", f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{ssh_port}-:22",
            "-device", "e1000,netdev=n0,addr=0x3.0",
            "-chardev", f"socket,id=qmp,path={qmp},server=on,wait=off", "-mon", "chardev=qmp,mode=control",
            "-serial", f"tcp:127.0.0.1:{con_port},server=on,wait=off",
            "-kernel", str(img.kernel), "-initrd", str(img.initrd),
            "-append", "console=ttyS0,115200 intel_iommu=on quiet panic=-1"]
    log = open(work / "qemu.stderr", "wb")
    vm = proc.spawn(argv, stdout=log, stderr=log)
    known = work / "known_hosts"
    known.write_text(f"[127.0.0.1]:{ssh_port} {' '.join(img.host_key_pub.split()[:2])}\n")
    power = [sys.executable, str(LABHOST / "qmp_power.py"), str(qmp)]
    cfg = {
        "name": "labhost-vm", "kind": "baremetal", "timeout_s": 120,
        "baremetal": {
            "host": "labhost-vm",
            "power": {"driver": "command", "on": power + ["on"], "off": power + ["off"],
                      "cycle": power + ["cycle"], "status": power + ["status"], "timeout_s": 20},
            "console": {"driver": "tcp", "host": "127.0.0.1", "port": con_port},
            "boot": {"method": "kexec"},
            "ssh": {"host": "127.0.0.1", "port": ssh_port, "user": "root", "key_file": str(img.client_key),
                    "use_agent": False, "known_hosts": str(known)},
            "lease": {"backend": "file", "directory": str(work / "locks"), "timeout_s": 5},
            "boot_timeout_s": 60,
            "restore": {"action": "cycle", "ssh_wait_s": BOOT_BOUND_S},
        },
    }
    target = open_target(from_dict(cfg, "test:labhost"))
    try:
        up = target.wait_for_ssh(BOOT_BOUND_S)
    except Exception:
        proc.end(vm)
        raise
    print(f"lab host {up}; total fixture time {time.monotonic() - t0:.1f} s")
    yield cfg
    proc.end(vm)
    log.close()
    remove_runtime_dir(rt)


def test_kexec_probe_on_lab_host(labhost, tmp_path):
    target = open_target(from_dict(labhost, "test:labhost"))
    ev = tmp_path / "ev"
    run = run_scenario(target, Scenario(name="labhost-probe"), ev).expect_ok()
    assert run.raw.exit_status is None                       # no exit device on a "real" host
    assert [(u.base, u.cap, u.ecap) for u in run.probe.dmar_units] == [(DMAR_BASE, CAP_39, ECAP)]
    assert run.probe.vendor in ("GenuineIntel", "AuthenticAMD")
    restore = json.loads((ev / "restore.json").read_text())
    assert restore["ok"] is True and restore["ssh"].startswith("up after ") and "6.1.0" in restore["ssh"]
    assert any(n.startswith("kexec: loaded /tmp/vtx-kexec-") for n in run.raw.notes)


def test_kexec_vtd_dma_on_lab_host(labhost, tmp_path):
    """Linux (kexec'ing) leaves queued invalidation on; the payload resets the unit, then a
    translated edu DMA write lands at the mapped page."""
    s = Scenario(name="labhost-dma")
    s.asm += [vtd.VTD_ASM, VTD_RESET_ASM, pedu.PCI_ASM]
    unit = vtd.Unit(s.steps)
    found = reset_unit(s.steps)
    after = unit.read32(vtd.REG_GSTS)
    staging, pages = layout.SCRATCH_BASE, layout.SCRATCH_BASE + 0x10_0000
    pattern, fill = 0x5A5A_1234_C3C3_8765, 0x0F0F_0F0F_0F0F_0F0F
    s.steps.mem_fill(staging, 4096, pattern)
    s.steps.mem_fill(pages, 0x3000, fill)
    edu = pedu.Edu(s.steps, vtd.bdf(0, 4), bar_var=5, vector=0x50)
    edu.setup()
    edu.dma_read(staging, 4088)
    tables = vtd.DmarTables(s.arena)
    dom = vtd.SecondLevel(s.arena, 3)
    iova = 0x0234_5000                       # below edu's default 28-bit DMA mask
    dom.map(iova, pages + 0x1000)
    tables.attach(vtd.bdf(0, 4), dom, domain_id=1)
    unit.setup_translation(tables.root)
    edu.dma_write(iova, 256)
    data = s.steps.mem_compare(pages + 0x1000, 256, pattern)
    tail = s.steps.mem_compare(pages + 0x1100, 0x1000 - 256, fill)
    before = s.steps.mem_compare(pages, 0x1000, fill)
    target = open_target(from_dict(labhost, "test:labhost"))
    run = run_scenario(target, s, tmp_path / "ev").expect_ok()
    gsts_found = run.value(found)
    assert gsts_found & int(vtd.Gcmd.QIE), f"Linux left GSTS {gsts_found:#x}"
    assert run.value(after) & int(vtd.Gcmd.TE | vtd.Gcmd.QIE | vtd.Gcmd.IRE) == 0
    assert [run.step_record(i, Kind.MEMCMP).fields[1] for i in (data, tail, before)] == [0, 0, 0]
