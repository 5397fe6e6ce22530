"""Signals to a pytest run and to one xdist worker leave nothing behind (issue 10 #1, #2).

SIGINT and SIGTERM unwind the harness (every ``finally`` runs: emulator ended, runtime directory
removed, evidence complete).  SIGKILL leaves a runtime directory whose owner is dead; the next run's
sweep removes it and completes the evidence (records.txt from serial.log, KILLED.txt).  A killed
xdist worker's test is an infrastructure error (an ERROR with ``infra_stage`` in JUnit), never FAILED.

Each case is a real pytest process on a real emulator, with its own TMPDIR so that runtime
directories are counted exactly.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from harness.targets import base
from harness.targets.base import INCOMPLETE, process_start_time, sweep_runtime_dirs

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.emulated

SPIN_TEST = '''
from harness.payload.image import Scenario


def test_spin(vtx_target):
    s = Scenario(name="spin")
    s.asm.append("spin:\\n1: jmp 1b\\n")
    s.steps.mark(0x77)
    s.steps.call("spin")
    vtx_target.run(s, timeout=300)
'''


def _emulators_named_in(evidence: Path) -> list[int]:
    return [int(p.read_text()) for p in evidence.rglob("*.pid")]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(x) for x in out.stdout.split()]


@pytest.fixture
def short_tmp():
    """The child's TMPDIR: private and short (sockets live below it), removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="vtxsig-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _default_signals() -> None:
    """The child starts as from a terminal: SIGINT, SIGTERM and SIGHUP at their defaults.  The
    harness leaves an ignored signal ignored (it respects nohup), so a test run under nohup or as a
    background job would otherwise hand its child an ignored SIGHUP or SIGINT."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


class PytestRun:
    """A pytest process running SPIN_TEST on ``target`` with private evidence and TMPDIR."""

    def __init__(self, tmp: Path, rt: Path, target: str, workers: int | None):
        self.tmp, self.evidence, self.rt = tmp, tmp / "evidence", rt
        (tmp / "test_spin.py").write_text(SPIN_TEST)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VTX_", "PYTEST_", "XDG_RUNTIME"))}
        env.update(TMPDIR=str(self.rt), VTX_TARGETS=target, VTX_EVIDENCE_DIR=str(self.evidence),
                   VTX_EVIDENCE=str(self.evidence))
        self.env = env
        argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rA", "-s",
                f"--junitxml={tmp / 'junit.xml'}", str(tmp / "test_spin.py")]
        if workers is not None:
            argv[5:5] = ["-n", str(workers)]
        self.out = open(tmp / "pytest.out", "wb")
        self.process = subprocess.Popen(argv, cwd=tmp, env=env, stdout=self.out, stderr=subprocess.STDOUT,
                                        start_new_session=True, preexec_fn=_default_signals)

    def wait_running(self) -> int:
        """Wait until the test's own run (not the probe) has its first step record; its emulator PID."""
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            for serial in self.evidence.glob("*/run-1/serial.log"):
                pid_files = list(serial.parent.glob("*.pid"))
                if pid_files and re.search(rb" 18 0 77\*[0-9a-f]{8}\n", serial.read_bytes()):   # whole MARK line
                    return int(pid_files[0].read_text())
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        self.process.kill()
        raise AssertionError(f"the run never got going: {self.output()[-1500:]}")

    def finish(self, timeout: float = 60) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            self.out.close()

    def output(self) -> str:
        return (self.tmp / "pytest.out").read_text(errors="replace")

    def runtime_dirs(self) -> list[str]:
        return [n for n in os.listdir(self.rt) if n.startswith("vtx-")]

    def run_dir(self) -> Path:
        (run,) = self.evidence.glob("*/run-1")
        return run

    def next_run_sweeps(self) -> None:
        """What the next run does first: when it loads its targets, it sweeps dead owners' directories."""
        r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--collect-only",
                            str(self.tmp / "test_spin.py")], cwd=self.tmp, env=self.env, capture_output=True,
                           timeout=120)
        assert r.returncode == 0, r.stdout[-1000:]


def _assert_nothing_left(run: PytestRun, emulator: int) -> None:
    deadline = time.monotonic() + 10
    while _alive(emulator) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(emulator), f"emulator {emulator} outlived the run"
    assert run.runtime_dirs() == []
    ev = run.run_dir()
    assert not (ev / INCOMPLETE).exists()
    records = (ev / "records.txt").read_text()
    assert "HELLO" in records and re.search(r"MARK .*0x77", records), records[-300:]


@pytest.mark.parametrize("target", ["qemu-tcg", "bochs-generic"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["int", "term", "hup"])
def test_signal_to_pytest_unwinds_and_leaves_nothing(tmp_path, short_tmp, target, sig):
    run = PytestRun(tmp_path, short_tmp, target, workers=None)
    emulator = run.wait_running()
    os.kill(run.process.pid, sig)
    status = run.finish()
    assert status != 0, run.output()[-1500:]
    _assert_nothing_left(run, emulator)          # at once: the finally blocks ran, no sweep needed


@pytest.mark.parametrize("target", ["qemu-tcg", "bochs-generic"])
def test_sigkill_to_pytest_is_cleaned_up_by_the_next_runs_sweep(tmp_path, short_tmp, target):
    run = PytestRun(tmp_path, short_tmp, target, workers=None)
    emulator = run.wait_running()
    os.kill(run.process.pid, signal.SIGKILL)
    assert run.finish() == -signal.SIGKILL
    assert len(run.runtime_dirs()) == 1              # what a SIGKILL leaves ...
    assert (run.run_dir() / INCOMPLETE).exists()
    run.next_run_sweeps()                            # ... until the next run starts
    _assert_nothing_left(run, emulator)
    assert "was killed" in (run.run_dir() / "KILLED.txt").read_text()


@pytest.mark.parametrize("target", ["qemu-tcg", "bochs-generic"])
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill", "term"])
def test_killed_xdist_worker_test_is_an_infrastructure_error(tmp_path, short_tmp, target, sig):
    run = PytestRun(tmp_path, short_tmp, target, workers=1)
    emulator = run.wait_running()
    (worker,) = [c for c in _children(run.process.pid) if b"python" in Path(f"/proc/{c}/cmdline").read_bytes()]
    os.kill(worker, sig)
    status = run.finish(120)
    out = run.output()
    assert status != 0, out[-1500:]
    assert "ERROR test_spin.py::test_spin" in out and "FAILED test_spin.py::test_spin" not in out, out[-2000:]
    (case,) = [c for c in ET.parse(tmp_path / "junit.xml").iter("testcase") if c.get("name").startswith("test_spin")]
    assert case.find("failure") is None and case.find("error") is not None, ET.tostring(case)[:1500]
    props = {p.get("name"): p.get("value") for p in case.iter("property")}
    assert props.get("infra_stage") == "worker-crash", props
    run.next_run_sweeps()
    _assert_nothing_left(run, emulator)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["term", "int"])
def test_signal_to_an_xdist_controller_leaves_nothing_once_swept(tmp_path, short_tmp, sig):
    """The controller unwinds and shuts its workers down; whatever a worker could not finish is
    removed (and its evidence completed) by the next run's sweep; no emulator survives."""
    run = PytestRun(tmp_path, short_tmp, "qemu-tcg", workers=1)
    emulator = run.wait_running()
    os.kill(run.process.pid, sig)
    assert run.finish(120) != 0, run.output()[-1500:]
    run.next_run_sweeps()
    _assert_nothing_left(run, emulator)


# --- the sweep itself, without emulators ---------------------------------------------------------

def _dead_pid() -> tuple[int, int]:
    p = subprocess.Popen(["sleep", "0"])
    started = process_start_time(p.pid)
    p.wait()
    return p.pid, started or 1


def _fake_run(base_dir: Path, evidence: Path, pid: int, started: int) -> Path:
    d = base_dir / f"vtx-{pid}-{started}-qemu-abcdefgh"
    d.mkdir()
    (d / "owner").write_text(f"{evidence}\n")
    evidence.mkdir()
    (evidence / INCOMPLETE).write_text("run in progress\n")
    from harness.payload.records import PROTOCOL_VERSION, Kind, frame
    (evidence / "serial.log").write_bytes(b"SeaBIOS\n" + frame(0, Kind.HELLO, PROTOCOL_VERSION, 1, 2, 3)
                                          + frame(1, Kind.MARK, 0, 0x77) + b"@2 18 1")
    return d


def test_sweep_completes_the_evidence_of_a_dead_owner(tmp_path):
    pid, started = _dead_pid()
    d = _fake_run(tmp_path, tmp_path / "ev", pid, started)
    assert sweep_runtime_dirs(tmp_path) == [d]
    assert not d.exists() and not list(tmp_path.glob(".swept-*"))
    assert not (tmp_path / "ev" / INCOMPLETE).exists()
    pid2, started2 = _dead_pid()
    half = tmp_path / f".swept-vtx-{pid2}-{started2}-sweep-x+vtx-1-2-qemu-abcdefgh"   # a killed sweeper's claim
    half.mkdir()
    sweep_runtime_dirs(tmp_path)
    assert not half.exists()
    assert re.match(r"#1 MARK .*0x77", (tmp_path / "ev" / "records.txt").read_text().splitlines()[1])
    assert f"harness pid {pid}" in (tmp_path / "ev" / "KILLED.txt").read_text()


def test_sweep_keeps_live_owners_and_foreign_names_but_not_a_reused_pid(tmp_path):
    me = os.getpid()
    live = _fake_run(tmp_path, tmp_path / "ev1", me, process_start_time(me))
    reused = _fake_run(tmp_path, tmp_path / "ev2", me, process_start_time(me) - 1)   # same PID, older owner
    foreign = tmp_path / "vtx-oldstyle-abc"
    foreign.mkdir()
    assert sweep_runtime_dirs(tmp_path) == [reused]
    assert live.exists() and foreign.exists()
    assert (tmp_path / "ev1" / INCOMPLETE).exists() and not (tmp_path / "ev2" / INCOMPLETE).exists()


def test_runtime_dir_is_private_and_names_its_owner(tmp_path, short_tmp, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(short_tmp))
    evidence = tmp_path / "ev"
    evidence.mkdir()
    old_style = base.runtime_dir("vtx-labhost-")                # a tag in the old prefix style
    assert re.fullmatch(r"vtx-\d+-\d+-labhost-\w+", old_style.name) and base.owner_alive(old_style.name)
    base.remove_runtime_dir(old_style)
    d = base.runtime_dir("qemu", evidence)
    try:
        assert d.parent == short_tmp and (d.stat().st_mode & 0o777) == 0o700
        assert base.owner_alive(d.name) is True
        assert (evidence / INCOMPLETE).exists()
    finally:
        base.remove_runtime_dir(d)
    assert not d.exists() and not (evidence / INCOMPLETE).exists()


def test_timeout_inside_a_test_is_an_error_at_call_with_infra_stage_in_junit(tmp_path, short_tmp):
    """Issue 9 #4: an infrastructure error is reported in the phase where it happened (not "error
    at setup"), counted as an error, and JUnit has an <error> with an infra_stage property."""
    (tmp_path / "test_hang.py").write_text(SPIN_TEST.replace("test_spin", "test_hang")
                                           .replace("timeout=300", "timeout=2"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VTX_", "PYTEST_", "XDG_RUNTIME"))}
    env.update(TMPDIR=str(short_tmp), VTX_TARGETS="qemu-tcg", VTX_EVIDENCE_DIR=str(tmp_path / "ev"))
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rA",
                        f"--junitxml={tmp_path / 'junit.xml'}", "test_hang.py"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    out = r.stdout
    assert r.returncode == 1, out[-2000:]
    assert "ERROR at call of test_hang[qemu-tcg]" in out and "1 error" in out.splitlines()[-1], out[-2000:]
    assert "stage: timeout, during call" in out and "failed" not in out.splitlines()[-1]
    (case,) = ET.parse(tmp_path / "junit.xml").iter("testcase")
    error = case.find("error")
    assert case.find("failure") is None and error is not None
    assert error.get("message").startswith("infrastructure error at timeout (during call)")
    assert {p.get("name"): p.get("value") for p in case.iter("property")}["infra_stage"] == "timeout"
    suite = next(ET.parse(tmp_path / "junit.xml").iter("testsuite"))
    assert (suite.get("errors"), suite.get("failures")) == ("1", "0")
