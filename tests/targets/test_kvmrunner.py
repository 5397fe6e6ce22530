"""End to end: the KVM-runner stand-in (guest-images/kvmrunner) — Linux with kvm_intel nested=1
inside Bochs ``corei7_skylake_x`` — runs the payload under QEMU/KVM with the ``qemu-kvm-nested``
target's arguments, reached by the existing ``remote-qemu`` target over SSH (slirp's loopback
forward, host key pinned) and through the console (nested serial -> Bochs' COM1).

Slow (one Linux boot in Bochs: minutes), so marked ``slow``.  The process-hygiene tests of the boot
come first in the file: each starts (and must end) its own short Bochs before the module's stand-in
boots, so never two Bochs of this module run at once.  The last tests drive timeouts and crashes of
QEMU's start and of a run into the shared stand-in (no boot of their own); the phases that need a
stand-in of their own (Ctrl-C in modprobe, a failing modprobe, signals during a run) are in
test_kvmrunner_signals.py, which runs on the other xdist worker.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from harness.errors import InfraError, RunTimeout
from harness.observe.runner import run_scenario
from harness.payload.image import Scenario, build
from harness.payload.records import FrameParser, Kind
from harness.targets import open_target
from harness.targets.base import RUNTIME_PREFIX, runtime_base
from harness.targets.config import from_dict
from harness.targets.kvmrunner import DROPPED_LINE, StandIn, StandInError, console_qemu_argv
from harness.targets.qemu import qemu_exit_status
from harness.targets.ssh import SshConnection, settings_or_error

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("kvmrunner")]

REPO = Path(__file__).resolve().parents[2]
IA32_VMX_BASIC = 0x480       # SDM Vol. 3D, A.1: bits 30:0 are the VMCS revision identifier
TRUE_CTLS = (0x48D, 0x48E, 0x48F, 0x490)
DMAR_BASE = 0xFED90000       # QEMU's intel-iommu register base
# VT-d spec 11.4.2/11.4.3: CAP.SAGAW bit 2 is 4-level tables (aw-bits=48); ECAP.IR is bit 3.
SAGAW_4_LEVEL = 1 << 10
ECAP_IR = 1 << 3


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return not Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].startswith("Z")
    except OSError:
        return False


@pytest.fixture(scope="module")
def image():
    img = open_target("kvmrunner-standin").build_image()
    print(f"\nkvmrunner image: {img.directory} ({'built' if img.built_now else 'cached'} in {img.seconds:.1f} s)")
    return img


# -- no Bochs outlives a boot that is cut short -----------------------------------------------------

def test_boot_timeout_ends_bochs_and_removes_runtime_dir(image, tmp_path):
    """A boot wait that expires raises a StandInError naming what it waited for; Bochs and the
    runtime directory are gone when the block is left."""
    s = StandIn(image.disk, tmp_path / "ev")
    with pytest.raises(StandInError, match=r"no 'kvmrunner: init' line \(kernel boot; boot bound 3 s\) "
                       r"within 3 s") as e:
        with s:
            pid, rt = s.pid, s.runtime
            assert pid is not None and _alive(pid)
            s.boot(timeout=3)
    assert e.value.stage == "standin-boot"
    assert not _alive(pid)
    assert not rt.exists()


CTRL_C_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {repo!r})
    from harness.targets.kvmrunner import StandIn
    with StandIn({disk!r}, __import__("pathlib").Path({ev!r})) as s:
        print("pid", s.pid, s.runtime, flush=True)
        s.boot(timeout=600)
""")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_signal_during_boot_leaves_no_bochs(image, tmp_path, sig):
    """Ctrl-C (SIGINT), SIGTERM or SIGKILL of the harness while the stand-in boots: Bochs dies
    with it (the with-block unwinds for the first two; PR_SET_PDEATHSIG for SIGKILL)."""
    script = CTRL_C_SCRIPT.format(repo=str(REPO), disk=str(image.disk), ev=str(tmp_path / "ev"))
    stderr = open(tmp_path / "child.stderr", "wb")     # the child's KeyboardInterrupt traceback
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=stderr,
                         text=True, start_new_session=True)
    try:
        line = p.stdout.readline().split()
        assert line[:1] == ["pid"], f"the child printed {line!r}; stderr in {tmp_path / 'child.stderr'}"
        pid, rt = int(line[1]), Path(line[2])
        time.sleep(3)                               # Bochs is in the BIOS or GRUB by now
        assert _alive(pid) and rt.exists()
        p.send_signal(sig)
        p.wait(timeout=30)
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(pid), f"bochs-bin {pid} survived {sig.name} of the harness"
        if sig != signal.SIGKILL:
            # Ctrl-C and SIGTERM (proc raises Terminated) unwind the with-block; after SIGKILL the
            # directory is left to the next run's sweep of dead owners (harness.targets.base).
            assert not rt.exists()
    finally:
        stderr.close()
        if p.poll() is None:
            p.kill()
            p.wait()
        if "pid" in locals() and _alive(pid):
            os.kill(pid, signal.SIGKILL)
        if "rt" in locals() and rt.exists():
            shutil.rmtree(rt, ignore_errors=True)


# -- the stand-in: one boot for the rest of the module ------------------------------------------------

@pytest.fixture(scope="module")
def bochs_probe(tmp_path_factory):
    """The probe on Bochs itself, before the stand-in boots (one Bochs at a time)."""
    return run_scenario(open_target("bochs-skylake"), Scenario(name="probe"),
                        tmp_path_factory.mktemp("bochs-probe")).expect_ok().probe


@pytest.fixture(scope="module")
def runner(bochs_probe, image, tmp_path_factory):
    """The process' stand-in of the target kvmrunner-standin (harness.targets.kvmrunner keeps one
    per process): tools/test runs this module and the conformance suites on that target in one
    pytest process, so one boot serves both; it ends with the process (or a test that stops it)."""
    ev = tmp_path_factory.mktemp("kvmrunner")
    session = open_target("kvmrunner-standin").standin(ev / "standin")
    assert session.standin is not None and session.known_hosts is not None
    print(f"stand-in ready after {session.ready_s:.0f} s (evidence {session.standin.evidence})")
    yield session.standin, session.known_hosts, ev


def test_kvm_intel_is_loaded_with_nested_ept_vpid(runner):
    s, _, _ = runner
    status, out = s.shell("cat /sys/module/kvm_intel/parameters/nested /sys/module/kvm_intel/parameters/ept "
                          "/sys/module/kvm_intel/parameters/vpid; test -c /dev/kvm && echo dev-kvm")
    assert status == 0
    assert out.split() == ["Y", "Y", "Y", "dev-kvm"]


def test_a_console_line_the_shell_drops_is_sent_again(runner):
    """A NUL just before a console command (Bochs' COM1 delivered one once, in CI) makes busybox ash
    drop the whole line unrun and print "^C"; shell() sees that and sends the line again."""
    s, _, _ = runner
    dropped = s.console.count(DROPPED_LINE)
    s.write(b"\0")
    status, out = s.shell("echo again-$((6 * 7))", timeout=60)
    assert (status, out.split()) == (0, ["again-42"])
    assert s.console.count(DROPPED_LINE) == dropped + 1, "the NUL did not make the shell drop the line"


def test_probe_under_nested_kvm_over_ssh_shows_kvm_vmx_and_a_dmar_unit(runner, image, bochs_probe, tmp_path):
    """The remote-qemu target reaches QEMU/KVM in the stand-in (QMP and serial over SSH): the probe
    sees KVM's VMX capability MSRs, not Bochs', and intel-iommu's DMAR unit with 4-level tables
    and interrupt remapping (aw-bits=48, intremap=on)."""
    s, known, _ = runner
    run = run_scenario(s.remote_target(image.client_key, known), Scenario(name="probe"), tmp_path / "ev").expect_ok()
    p, b = run.probe, bochs_probe
    assert p.cpuid_vmx and b.cpuid_vmx
    kvm_rev, bochs_rev = p.msr(IA32_VMX_BASIC) & 0x7FFF_FFFF, b.msr(IA32_VMX_BASIC) & 0x7FFF_FFFF
    assert kvm_rev != bochs_rev, f"VMCS revision {kvm_rev:#x} is Bochs' own: this is not nested KVM"
    assert [p.msr(m) for m in TRUE_CTLS] != [b.msr(m) for m in TRUE_CTLS]
    assert all(p.msr(m) is not None for m in TRUE_CTLS)
    assert b.dmar_units == []                           # Bochs has no IOMMU
    assert [u.base for u in p.dmar_units] == [DMAR_BASE]
    unit = p.dmar_units[0]
    assert unit.cap & SAGAW_4_LEVEL and unit.ecap & ECAP_IR
    # QMP reached QEMU inside the stand-in: the harness resumed the paused CPU through it.
    assert any(e.get("execute") == "cont" for e in run.raw.host_events)


def test_probe_records_through_nested_serial_and_bochs_com1(runner, image):
    """The same QEMU command line typed in the stand-in's console with -serial stdio: the framed
    records cross the nested serial port and Bochs' COM1 intact, and QEMU exits with the
    isa-debug-exit status of a clean END."""
    s, known, _ = runner
    image_built = build(Scenario(name="probe"))
    elf = image_built.elf
    settings = settings_or_error(s.remote_target(image.client_key, known).q["ssh"], "test:kvmrunner")
    with SshConnection(settings, "kvmrunner stand-in").connect() as c:
        c.put(elf, "/tmp/probe-console.elf", stage="upload")
    status, out = s.shell(shlex.join(console_qemu_argv("/tmp/probe-console.elf")), timeout=600)
    parser = FrameParser()
    parser.feed(out.encode())
    parser.check_complete()
    assert status == qemu_exit_status(0)
    hello = parser.records[0].fields
    assert hello[1] == 0x2BADB002                   # multiboot magic: QEMU -kernel booted it
    assert hello[-1] == image_built.image_id        # and it was the image we uploaded


# -- timeouts and crashes inside the booted stand-in: nothing survives, the next run works ---------
#
# Each test drives one failure through the remote-qemu path (the code every kvmrunner run takes)
# into the module's stand-in, then checks what is left: no QEMU process and no launcher (the
# remote-qemu shell script that starts and ends QEMU) and no run directory inside the stand-in, no
# runtime directory of a run on the host, and a probe that passes on the same stand-in.  (Busybox'
# `timeout` wrapping QEMU leaves a watcher process that notices QEMU's end within one guest second
# and exits: it is no QEMU.)  Time inside the stand-in is Bochs' emulated time (about 5 times slower
# than the wall clock while busy, faster while idle), so the stand-in gets a minute to settle.

QEMU_START_TIMEOUT_S = 3     # shorter than SSH, upload and QEMU/KVM's start inside Bochs (8-9 s to QMP's greeting)
HALT_TIMEOUT_S = 60          # longer than the whole start (SSH + upload + QEMU start: 8-9 s, more under load)
SETTLE_S = 60
KILLED_TIMEOUT_S = 240      # twice what QEMU start + kill may take under load: waiting for it shows
# The stand-in's busybox has no pgrep; "[r]" keeps grep from matching its own command line.
LEFTOVERS = "pidof qemu-system-x86_64; ps -o pid,args | grep '[r]ead -r word'; ls -d /tmp/vtx-run-* 2>/dev/null; true"


def _never_ending() -> Scenario:
    """A payload that never ends: a MARK, then HLT with interrupts off, forever.  Not a jump to
    itself: an L2 guest spinning without VM exits froze the whole stand-in (seen twice: the records
    stopped at the MARK, then neither the console nor sshd answered for 10 minutes; L1 Linux never
    got the CPU back from Bochs), while HLT exits to KVM, which parks the vCPU and leaves L1 idle."""
    s = Scenario(name="halt")
    s.asm.append("park_forever:\n    cli\n1:  hlt\n    jmp 1b\n")
    s.steps.mark(0xAB)
    s.steps.call("park_forever")
    return s


def _host_run_dirs() -> list[Path]:
    """Runtime directories of remote runs that this process has left (there must be none)."""
    return sorted(runtime_base().glob(f"{RUNTIME_PREFIX}{os.getpid()}-*-remote-*"))


def _assert_clean_and_usable(runner, image, tmp_path: Path) -> None:
    """No QEMU, launcher or run directory inside the stand-in; no run's runtime directory here; and
    the stand-in runs the next scenario (a probe that passes)."""
    s, known, _ = runner
    deadline = time.monotonic() + SETTLE_S
    while True:
        status, out = s.shell(LEFTOVERS, timeout=60)
        if not out.split() or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert out.split() == [], f"left inside the stand-in {SETTLE_S} s after the run: {out!r}"
    assert _host_run_dirs() == []
    run = run_scenario(s.remote_target(image.client_key, known), Scenario(name="probe"),
                       tmp_path / "next").expect_ok()
    assert run.probe.cpuid_vmx and [u.base for u in run.probe.dmar_units] == [DMAR_BASE]


def test_run_timeout_during_qemu_start_ends_qemu_in_the_standin(runner, image, tmp_path):
    """A run whose timeout expires while QEMU/KVM is still starting inside the stand-in: the error
    says the payload never produced its first record (no HELLO) — either as the run's timeout with
    the pending phase 'boot' and a register dump (QMP answered within the 1 s left, the vCPU was
    still in the firmware), or as a start error naming the QMP handshake it waited for."""
    s, known, _ = runner
    t0 = time.monotonic()
    with pytest.raises(InfraError) as e:
        run_scenario(s.remote_target(image.client_key, known), _never_ending(), tmp_path / "ev",
                     timeout=QEMU_START_TIMEOUT_S)
    took = time.monotonic() - t0
    msg = str(e.value)
    print(f"start timeout: error after {took:.1f} s: {msg[:300]}")
    if isinstance(e.value, RunTimeout):
        assert f"no terminal record within {QEMU_START_TIMEOUT_S:.1f} s" in msg
        assert "(no records)" in msg and "pending: boot (no HELLO record" in msg
    else:
        assert e.value.stage == "start" and "QEMU did not start" in msg and "QMP handshake" in msg, msg
    assert not (tmp_path / "ev" / "records.txt").read_text()      # not one record: the payload never ran
    _assert_clean_and_usable(runner, image, tmp_path)


def test_run_timeout_while_the_payload_halts_ends_qemu_in_the_standin(runner, image, tmp_path):
    """A payload that never ends: the run's timeout names the last record and the pending step, and
    the register dump over QMP (from inside the stand-in) shows the vCPU halted."""
    s, known, _ = runner
    with pytest.raises(RunTimeout) as e:
        run_scenario(s.remote_target(image.client_key, known), _never_ending(), tmp_path / "ev", timeout=HALT_TIMEOUT_S)
    msg = str(e.value)
    assert f"no terminal record within {HALT_TIMEOUT_S:.1f} s" in msg
    assert "MARK 0x0 0xab" in msg
    assert "pending: step 1 CALL routine=park_forever" in msg
    assert "registers:" in msg and "HLT=1" in msg
    _assert_clean_and_usable(runner, image, tmp_path)


def _kill_qemu_when_running(s: StandIn, evidence: Path, done: list[str]) -> None:
    """Once the run's MARK has arrived, SIGKILL its QEMU from the stand-in's console shell."""
    deadline = time.monotonic() + HALT_TIMEOUT_S
    while time.monotonic() < deadline:
        serial, rdir = evidence / "serial.log", evidence / "remote-dir.txt"
        if serial.exists() and rdir.exists():
            parser = FrameParser()
            parser.feed(serial.read_bytes())
            if any(r.kind == Kind.MARK for r in parser.records):
                remote = rdir.read_text().strip().rsplit(":", 1)[1]
                status, out = s.shell(f"kill -KILL $(cat {shlex.quote(remote)}/qemu.pid) && echo killed", timeout=60)
                done.append(out.strip())
                return
        time.sleep(0.2)
    done.append(f"no MARK record within {HALT_TIMEOUT_S} s")


def test_qemu_killed_inside_the_standin_mid_run_ends_the_run_at_once(runner, image, tmp_path):
    """QEMU dies inside the stand-in while the payload runs (SIGKILL from the stand-in's shell): the
    run ends when QEMU does, not at its timeout, with a record-stream error after the last record;
    QEMU's status (137: killed) is in the evidence, and the next run works."""
    s, known, _ = runner
    done: list[str] = []
    killer = threading.Thread(target=_kill_qemu_when_running, args=(s, tmp_path / "ev", done), daemon=True)
    killer.start()
    t0 = time.monotonic()
    with pytest.raises(InfraError) as e:
        run_scenario(s.remote_target(image.client_key, known), _never_ending(), tmp_path / "ev", timeout=KILLED_TIMEOUT_S)
    took = time.monotonic() - t0
    killer.join(70)
    print(f"killed QEMU: error after {took:.1f} s: {str(e.value)[:400]}")
    assert done == ["killed"], done
    assert took < KILLED_TIMEOUT_S / 2, f"the run took {took:.0f} s: it waited for its timeout, not for QEMU's end"
    assert "no terminal record" in str(e.value) and "MARK 0x0 0xab" in str(e.value)
    assert (tmp_path / "ev" / "qemu.status").read_text().strip() == "137"     # 128 + SIGKILL
    _assert_clean_and_usable(runner, image, tmp_path)


def test_qemu_that_fails_at_start_is_a_start_error_with_its_stderr(runner, image, tmp_path):
    """A kvmrunner target whose QEMU settings name a device QEMU does not know: QEMU exits at
    start inside the stand-in; the error is at stage 'start' and quotes QEMU's stderr."""
    s, known, _ = runner
    config = from_dict({"name": "kvmrunner-bad-device", "kind": "kvmrunner", "timeout_s": 120,
                        "kvmrunner": {"devices": [{"driver": "vtx-no-such-device"}]}}, "test:bad-device")
    with pytest.raises(InfraError) as e:
        run_scenario(s.remote_target(image.client_key, known, config), Scenario(name="probe"), tmp_path / "ev")
    print(f"bad device: {str(e.value)[:400]}")
    assert e.value.stage == "start", str(e.value)
    assert "QEMU did not start" in str(e.value) and "exit status 1" in str(e.value)
    assert "'vtx-no-such-device' is not a valid device model name" in str(e.value)
    _assert_clean_and_usable(runner, image, tmp_path)
