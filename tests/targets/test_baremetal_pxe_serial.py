"""End to end: the bare-metal target's PXE boot method and local serial console on a QEMU TCG VM
standing in for a lab host.  The VM starts paused with an e1000 whose option ROM is Debian's iPXE
(ipxe-qemu) and slirp's TFTP serving the boot directory; PxeBoot writes the ELF and the iPXE script
there and "power-cycles" through QMP (guest-images/labhost/qmp_power.py); iPXE loads the multiboot
ELF32; records arrive on COM1, a QEMU ``-serial pty`` read as a local serial device.  SeaBIOS'
debug port (0x402) is logged so that each test can say what the firmware did."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from harness.errors import InfraError
from harness.observe.runner import run_scenario
from harness.payload.image import Scenario, build
from harness.targets import open_target, proc
from harness.targets.base import remove_runtime_dir, runtime_dir
from harness.targets.config import from_dict

REPO = Path(__file__).resolve().parents[2]
QMP_POWER = REPO / "guest-images" / "labhost" / "qmp_power.py"
# Debian installs the QEMU NIC ROMs here (QEMU's -L search path includes it), not /usr/share/qemu.
PXE_ROM = Path("/usr/lib/ipxe/qemu/pxe-e1000.rom")
DMAR_BASE = 0xFED90000
CAP_39 = 0x00D2008C22260206          # QEMU 7.2 intel-iommu, aw-bits=39
ECAP = 0xF42                         # ... with intremap=off
HOST = "pxe-vm"
ROM_BOOT = "Booting from ROM..."     # SeaBIOS hands control to the NIC's option ROM (iPXE)
ROM_RETURNED = "enter handle_18:"    # ... and iPXE gave up: INT 18h back to the BIOS


@dataclass
class PxeVm:
    process: subprocess.Popen
    rt: Path            # private 0700 runtime dir: QMP socket
    tftp: Path          # slirp's TFTP root = PxeBoot's directory
    work: Path
    pty: str            # /dev/pts/N of COM1

    @property
    def firmware_log(self) -> str:
        return (self.work / "seabios.log").read_text(errors="replace")

    def config(self, *, boot: dict | None = None, boot_timeout_s: float = 60.0, restore: str = "cycle") -> dict:
        power = [sys.executable, str(QMP_POWER), str(self.rt / "qmp.sock")]
        return {
            "name": HOST, "kind": "baremetal", "timeout_s": 60,
            "baremetal": {
                "host": HOST,
                "power": {"driver": "command", "on": power + ["on"], "off": power + ["off"],
                          "cycle": power + ["cycle"], "status": power + ["status"], "timeout_s": 20},
                "console": {"driver": "serial", "device": self.pty},
                "boot": {"method": "pxe", "directory": str(self.tftp), **(boot or {})},
                "lease": {"backend": "file", "directory": str(self.work / "locks"), "timeout_s": 5},
                "boot_timeout_s": boot_timeout_s,
                # No SSH: this stand-in has no OS of its own; the cycle goes to "the next device".
                "restore": {"action": restore},
            },
        }

    def stop(self) -> None:
        proc.end(self.process)


def _serial_pty(sock: Path) -> str:
    """COM1's pty from QMP query-chardev (``pty:/dev/pts/N``), every step bounded."""
    async def query() -> list[dict]:
        qmp = QMPClient("vtx-pxe-test")
        await asyncio.wait_for(qmp.connect(str(sock)), 10)
        try:
            return await asyncio.wait_for(qmp.execute("query-chardev"), 10)
        finally:
            await asyncio.wait_for(qmp.disconnect(), 10)
    chardevs = asyncio.run(query())
    ptys = [c["filename"].removeprefix("pty:") for c in chardevs
            if c["label"] == "serial0" and c["filename"].startswith("pty:")]
    assert len(ptys) == 1 and ptys[0].startswith("/dev/pts/"), chardevs
    return ptys[0]


@pytest.fixture
def pxe_vm(tmp_path):
    if not PXE_ROM.exists():
        pytest.fail(f"{PXE_ROM} is missing (apt-get install ipxe-qemu)")
    rt = runtime_dir("vtx-pxe-")
    work, tftp = tmp_path / "vm", tmp_path / "tftp"
    work.mkdir()
    tftp.mkdir()
    qmp = rt / "qmp.sock"
    argv = ["qemu-system-x86_64", "-machine", "q35,accel=tcg", "-cpu", "max", "-m", "256",
            "-nodefaults", "-no-user-config", "-display", "none", "-S",
            "-device", "intel-iommu,aw-bits=39,intremap=off",
            "-netdev", f"user,id=n0,restrict=on,tftp={tftp},bootfile=boot.ipxe",
            "-device", f"e1000,netdev=n0,romfile={PXE_ROM}",
            "-boot", "n",
            "-chardev", f"socket,id=qmp,path={qmp},server=on,wait=off", "-mon", "chardev=qmp,mode=control",
            "-serial", "pty",
            "-chardev", f"file,id=fw,path={work / 'seabios.log'}",
            "-device", "isa-debugcon,iobase=0x402,chardev=fw"]
    log = open(work / "qemu.stderr", "wb")
    vm = proc.spawn(argv, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 10
        while not qmp.exists():
            assert vm.poll() is None, f"QEMU exited {vm.returncode}: {(work / 'qemu.stderr').read_text()}"
            assert time.monotonic() < deadline, "no QMP socket within 10 s"
            time.sleep(0.05)
        pty = _serial_pty(qmp)
    except BaseException:
        proc.end(vm)
        log.close()
        remove_runtime_dir(rt)
        raise
    yield PxeVm(process=vm, rt=rt, tftp=tftp, work=work, pty=pty)
    proc.end(vm)
    log.close()
    remove_runtime_dir(rt)


def test_pxe_boot_probe_over_local_serial(pxe_vm, tmp_path):
    t0 = time.monotonic()
    target = open_target(from_dict(pxe_vm.config(), "test:pxe"))
    ev = tmp_path / "ev"
    scenario = Scenario(name="pxe-probe")
    run = run_scenario(target, scenario, ev).expect_ok()
    print(f"\npxe probe: {run.raw.duration_s:.1f} s from power cycle to the terminal record; "
          f"{time.monotonic() - t0:.1f} s in all")
    assert run.raw.exit_status is None                       # no exit device on a "real" host
    assert [(u.base, u.cap, u.ecap) for u in run.probe.dmar_units] == [(DMAR_BASE, CAP_39, ECAP)]
    assert run.probe.vendor == "AuthenticAMD"                # TCG -cpu max
    image = pxe_vm.tftp / "vtx-payload.elf"
    assert run.raw.notes[0] == f"pxe: wrote {image} and boot.ipxe; power cycled"
    # The records came through the NIC ROM, which did not hand back to the BIOS.
    fw_run = pxe_vm.firmware_log
    assert ROM_BOOT in fw_run and ROM_RETURNED not in fw_run, fw_run[-400:]
    # The local serial device carried the record stream the parser accepted.
    assert (ev / "serial.log").read_bytes().startswith(b"@0 ")
    # Restore: the script was disarmed before the power cycle, so the host's next boot is its
    # own (here: iPXE exits to the BIOS) and not the payload again.
    restore = json.loads((ev / "restore.json").read_text())
    assert set(restore) == {"host", "action", "boot", "ok", "seconds"}    # no ssh section
    assert (restore["host"], restore["action"], restore["ok"]) == (HOST, "cycle", True)
    assert restore["boot"] == "pxe: boot.ipxe now exits to the next boot device; image removed"
    assert sorted(p.name for p in pxe_vm.tftp.iterdir()) == ["boot.ipxe"]
    assert (pxe_vm.tftp / "boot.ipxe").read_text().splitlines()[::2] == ["#!ipxe", "exit"]
    assert run.raw.notes[-1] == "restore: cycle ok"
    deadline = time.monotonic() + 30
    while ROM_RETURNED not in pxe_vm.firmware_log and time.monotonic() < deadline:
        time.sleep(0.2)
    after_cycle = pxe_vm.firmware_log[len(fw_run):]
    assert ROM_BOOT in after_cycle and ROM_RETURNED in after_cycle.split(ROM_BOOT, 1)[1], after_cycle[-400:]


def test_pxe_script_naming_a_missing_image_is_a_boot_error(pxe_vm, tmp_path, qemu_procs):
    baseline = set(proc.live_pids())                         # the VM itself
    # The script is written as configured, but the ELF is not under missing/ on the TFTP server.
    cfg = pxe_vm.config(boot={"url_prefix": "missing/"}, boot_timeout_s=8.0, restore="none")
    target = open_target(from_dict(cfg, "test:pxe"))
    ev = tmp_path / "ev"
    t0 = time.monotonic()
    with pytest.raises(InfraError) as e:
        run_scenario(target, Scenario(name="pxe-missing"), ev)
    print(f"\nboot error after {time.monotonic() - t0:.1f} s")
    assert e.value.stage == "boot"
    assert re.fullmatch(
        rf"target {HOST} \(host {HOST}\): boot: no record within 8\.0 s of booting \(pxe: wrote "
        rf"{re.escape(str(pxe_vm.tftp / 'vtx-payload.elf'))} and boot\.ipxe; power cycled\); console: "
        rf"serial device {re.escape(pxe_vm.pty)}; last console text: \(nothing\); evidence: {re.escape(str(ev))}",
        str(e.value)), str(e.value)
    assert json.loads((ev / "restore.json").read_text())["action"] == "none"
    # Not merely a short bound: iPXE ran the script and returned to the BIOS (bounded wait).
    deadline = time.monotonic() + 30
    while ROM_RETURNED not in pxe_vm.firmware_log and time.monotonic() < deadline:
        time.sleep(0.2)
    fw = pxe_vm.firmware_log
    assert ROM_BOOT in fw and ROM_RETURNED in fw.split(ROM_BOOT, 1)[1], fw[-400:]
    # Nothing the run started is left (power commands reaped); ending the VM leaves no QEMU.
    assert set(proc.live_pids()) - baseline == set()
    assert qemu_procs(str(pxe_vm.rt)) != []
    pxe_vm.stop()
    assert qemu_procs(str(pxe_vm.rt)) == []


def test_serial_console_on_a_non_tty_is_a_console_error(tmp_path):
    """A device path that is no tty (here /dev/null) fails at stage console, before any boot."""
    noop = [sys.executable, "-c", "pass"]
    cfg = {"name": HOST, "kind": "baremetal", "timeout_s": 5,
           "baremetal": {"host": HOST, "power": {"driver": "command", "on": noop, "off": noop},
                         "console": {"driver": "serial", "device": "/dev/null"},
                         "boot": {"method": "pxe", "directory": str(tmp_path / "tftp")},
                         "lease": {"backend": "file", "directory": str(tmp_path / "locks"), "timeout_s": 1},
                         "restore": {"action": "none"}}}
    target = open_target(from_dict(cfg, "test:pxe"))
    fds = set(os.listdir("/proc/self/fd"))
    with pytest.raises(InfraError) as e:
        run_scenario(target, Scenario(name="pxe-no-tty"), tmp_path / "ev")
    assert e.value.stage == "console"
    assert str(e.value) == (f"target {HOST} (host {HOST}): console: /dev/null is not a serial line: "
                            "Inappropriate ioctl for device")
    assert not (tmp_path / "tftp").exists()                  # nothing booted
    assert set(os.listdir("/proc/self/fd")) == fds           # the device was closed again


def test_sync_point_is_released_over_the_serial_console(pxe_vm, tmp_path):
    """Issue 14 on bare metal: the payload stops at a sync point, the host's action runs, and the
    release token travels back over the same local serial device; the step after it runs."""
    target = open_target(from_dict(pxe_vm.config(), "test:pxe"))
    s = Scenario(name="pxe-sync")
    point = s.steps.sync("on-the-host")
    mark = s.steps.mark(0x5C)
    seen: list[tuple[str, int]] = []
    with target.at("on-the-host", lambda host: seen.append((host.point, host.records[-1].kind))):
        run = run_scenario(target, s, tmp_path / "ev").expect_ok()
    assert seen == [("on-the-host", 0x1A)]                                  # at the SYNC record
    assert [r.fields[2] for r in run.step(point) if r.kind == 0x1B] == [1]  # SYNC_DONE: released
    assert run.step_record(mark, 0x18).fields[1] == 0x5C                    # the step after it ran
