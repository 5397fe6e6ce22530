"""The KVM-runner stand-in ends with the harness in the phases that need a stand-in of their own:
Ctrl-C while kvm_intel is being loaded, a modprobe that fails, and Ctrl-C or SIGKILL while a
scenario runs under QEMU/KVM inside it.  Each case boots its own Bochs (minutes), so this module
has its own xdist group: under ``-n 2 --dist loadgroup`` it runs on the other worker, beside
test_kvmrunner.py's shared stand-in.  Slow, so marked ``slow``.

Which cases need a boot, and which share a mechanism with a cheaper test (one boot each here):
  * SIGINT in the modprobe phase: the harness waits in StandIn.boot() for the ``kvm loaded`` line;
    KeyboardInterrupt unwinds the kvmrunner target's boot (``except BaseException: stop()``).
    SIGTERM shares that path (harness.targets.proc raises Terminated, a KeyboardInterrupt), shown
    3 s into the boot by test_kvmrunner.py, so it is not repeated here.
  * a failing modprobe (a Bochs CPU model without VMX: kvm_intel refuses to load, as on a runner
    whose firmware turned VT-x off): StandInError at stage standin-modprobe, raised in-process.
  * SIGINT during a run: the remote-qemu run's ``finally`` ends QEMU inside the stand-in over SSH
    (its status is fetched), then the process' atexit ends Bochs and removes its runtime directory.
  * SIGKILL during a run: nothing of the harness runs; Bochs dies of PR_SET_PDEATHSIG and, on its
    own, of the SIGHUP its pty sends when the harness' master end closes (Bochs quits on SIGHUP);
    QEMU, inside it, dies with it.  Both work in every phase; test_kvmrunner.py shows them 3 s into
    the boot, this shows them with a run's SSH connection and threads going (it fails only with
    both taken away).  The runtime directories a SIGKILL leaves are swept by the next harness
    process (as any dead owner's).
The timeouts and crashes of a run or of QEMU's start need no boot of their own: test_kvmrunner.py
drives them into its shared stand-in.  Measured on the 2-core machine beside 2-3 other Bochs:
156-220 s per case, 13 minutes for the module.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from harness.observe.runner import run_scenario
from harness.payload.image import Scenario
from harness.payload.records import FrameParser, Kind
from harness.targets import open_target
from harness.targets.base import INCOMPLETE, RUNTIME_PREFIX, runtime_base, sweep_runtime_dirs
from harness.targets.config import from_dict
from harness.targets.kvmrunner import INIT_LINE, StandInError

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("kvmrunner-signals")]

REPO = Path(__file__).resolve().parents[2]
BOOT_BOUND_S = 1200           # Bochs to the ready line; measured 150-400 s on a busy 2-core machine
RUN_BOUND_S = 300             # ready line to the run's first MARK (QEMU start inside Bochs: 11-40 s)
NO_VMX_CPU = "p4_prescott_celeron_336"   # a Bochs x86-64 model without VMX: kvm_intel cannot load

# The harness in a child process: the kvmrunner target boots its stand-in and runs a payload that
# never ends (a MARK, then HLT with interrupts off, forever: see test_kvmrunner._never_ending for
# why not a jump to itself); the test signals it at the phase under test.
CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, {repo!r})
    from harness.observe.runner import run_scenario
    from harness.payload.image import Scenario
    from harness.targets import open_target
    s = Scenario(name="halt")
    s.asm.append("park_forever:\\n    cli\\n1:  hlt\\n    jmp 1b\\n")
    s.steps.mark(0xAB)
    s.steps.call("park_forever")
    run_scenario(open_target("kvmrunner-standin"), s, Path(sys.argv[1]), timeout=600)
""")


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return not Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].startswith("Z")
    except OSError:
        return False


def _wait_gone(pid: int, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid), f"{what} (pid {pid}) still runs {within:.0f} s later"


def _runtime_dirs(pid: int) -> list[Path]:
    """The runtime directories that process ``pid`` made (its stand-in's and its runs')."""
    return sorted(runtime_base().glob(f"{RUNTIME_PREFIX}{pid}-*"))


def _standin_evidence(run_evidence: Path) -> Path | None:
    """The stand-in's own evidence directory, beside the run's (kvmrunner._standin_evidence)."""
    found = sorted(run_evidence.parent.glob("_standin-*"))
    return found[0] if found else None


def _has_mark(serial: Path) -> bool:
    if not serial.exists():
        return False
    parser = FrameParser()
    parser.feed(serial.read_bytes())
    return any(r.kind == Kind.MARK for r in parser.records)


class Child:
    """The harness in a child process (its own session: the signal reaches only it)."""

    def __init__(self, tmp_path: Path):
        self.evidence = tmp_path / "run"
        self.log = open(tmp_path / "child.log", "wb")
        self.p = subprocess.Popen([sys.executable, "-c", CHILD.format(repo=str(REPO)), str(self.evidence)],
                                  cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.log_path = tmp_path / "child.log"

    def wait_for(self, ready, bound: float, what: str) -> None:
        """Poll (bounded) until ``ready()``; fail naming ``what`` and the child's output tail."""
        deadline = time.monotonic() + bound
        while not ready():
            if self.p.poll() is not None or time.monotonic() > deadline:
                why = f"exited with {self.p.returncode}" if self.p.poll() is not None else f"not within {bound:.0f} s"
                raise AssertionError(f"the child harness never reached {what} ({why}); its output ends: "
                                     f"{self.log_path.read_bytes()[-1500:].decode(errors='replace')}")
            time.sleep(0.2)

    def bochs_pid(self) -> int:
        standin = _standin_evidence(self.evidence)
        assert standin is not None and (standin / "bochs.pid").exists()
        return int((standin / "bochs.pid").read_text())

    def close(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(30)
        self.log.close()
        standin = _standin_evidence(self.evidence)
        if standin is not None and (standin / "bochs.pid").exists():
            pid = int((standin / "bochs.pid").read_text())
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def child(tmp_path):
    c = Child(tmp_path)
    yield c
    c.close()


def test_ctrl_c_while_kvm_intel_loads_ends_bochs_and_its_runtime_dir(child):
    """SIGINT when the console shows /init's modprobe step (``kvmrunner: init``, then the insmods
    of irqbypass, kvm and kvm-intel nested=1, 8-16 s in Bochs): Bochs and its runtime directory are
    gone, and the ``kvm loaded`` line never came (the signal did land in that phase)."""
    def in_modprobe() -> bool:
        standin = _standin_evidence(child.evidence)
        serial = standin / "serial.log" if standin else None
        return serial is not None and serial.exists() and INIT_LINE in serial.read_bytes()
    child.wait_for(in_modprobe, BOOT_BOUND_S, "the modprobe step on the stand-in's console")
    bochs = child.bochs_pid()
    assert _alive(bochs) and _runtime_dirs(child.p.pid)
    child.p.send_signal(signal.SIGINT)
    rc = child.p.wait(60)
    _wait_gone(bochs, 10, "bochs-bin after Ctrl-C of the harness in the modprobe phase")
    console = (_standin_evidence(child.evidence) / "serial.log").read_bytes()
    assert b"kvmrunner: kvm loaded" not in console, "the signal came after the modprobe step"
    assert rc != 0 and b"KeyboardInterrupt" in child.log_path.read_bytes()
    assert _runtime_dirs(child.p.pid) == []


def test_modprobe_failure_ends_the_boot_with_a_standin_error(tmp_path):
    """kvm_intel cannot load (the stand-in's Bochs CPU has no VMX): the boot ends at the ``kvm
    loaded`` line with a StandInError at stage standin-modprobe that quotes the console, not at the
    boot's bound; Bochs and its runtime directory are gone; a second run does not boot again."""
    config = from_dict({"name": "kvmrunner-no-vmx", "kind": "kvmrunner", "timeout_s": 120,
                        "kvmrunner": {"standin": {"cpu_model": NO_VMX_CPU, "memory_mb": 512,
                                                  "boot_timeout_s": BOOT_BOUND_S}}}, "test:no-vmx")
    target = open_target(config)
    t0 = time.monotonic()
    with pytest.raises(StandInError) as e:
        run_scenario(target, Scenario(name="probe"), tmp_path / "run")
    took = time.monotonic() - t0
    print(f"modprobe failure after {took:.0f} s: {e.value}")
    assert e.value.stage == "standin-modprobe"
    assert "modprobe: kvm_intel did not load with nested VMX (nested=(absent), dev_kvm=no)" in str(e.value)
    assert "insmod kvm-intel.ko failed" in str(e.value)
    standin = _standin_evidence(tmp_path / "run")
    bochs = int((standin / "bochs.pid").read_text())
    _wait_gone(bochs, 5, "bochs-bin after the modprobe failure")
    assert not [d for d in _runtime_dirs(os.getpid()) if "-kvmrunner-" in d.name]
    t1 = time.monotonic()
    with pytest.raises(StandInError, match=r"not retried: it would fail again\); last: kvmrunner: modprobe"):
        run_scenario(target, Scenario(name="probe"), tmp_path / "run2")
    assert time.monotonic() - t1 < 30          # no second boot
    assert not (tmp_path / "_standin-kvmrunner-no-vmx-{}-2".format(os.getpid())).exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill"])
def test_harness_signalled_during_a_run_leaves_no_bochs(child, sig):
    """The harness is signalled while its payload halts forever under QEMU/KVM inside its stand-in (the
    run's MARK has arrived).  Ctrl-C: QEMU is ended inside first (its exit status was fetched),
    then Bochs, and no runtime directory or INCOMPLETE evidence is left.  SIGKILL: Bochs (and QEMU
    in it) dies with the harness; what the harness left is a dead owner's, which the sweep takes."""
    child.wait_for(lambda: _has_mark(child.evidence / "serial.log"), BOOT_BOUND_S + RUN_BOUND_S,
                   "the never-ending payload's MARK record")
    bochs = child.bochs_pid()
    assert _alive(bochs) and (child.evidence / INCOMPLETE).exists()
    child.p.send_signal(sig)
    rc = child.p.wait(120)
    _wait_gone(bochs, 10, f"bochs-bin after {sig.name} of the harness during a run")
    assert rc != 0
    left = _runtime_dirs(child.p.pid)
    if sig == signal.SIGINT:
        assert b"KeyboardInterrupt" in child.log_path.read_bytes()
        assert (child.evidence / "qemu.status").exists(), "QEMU's status was not fetched from the stand-in"
        assert left == []
        assert not (child.evidence / INCOMPLETE).exists()
    else:
        assert left, "SIGKILL: the harness cannot have removed its runtime directories"
        sweep_runtime_dirs()
        assert _runtime_dirs(child.p.pid) == []
