"""The Bochs target: a timed-out run raises RunTimeout and leaves no bochs-bin behind."""

import os
import time

import pytest

from harness.errors import InfraError, RunTimeout
from harness.observe.runner import run_scenario
from harness.payload.image import Scenario
from harness.targets import open_target
from harness.targets import proc


def _bochs_pids() -> set[int]:
    out = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/comm") as f:
                    if f.read().strip() == "bochs-bin":
                        out.add(int(d))
            except OSError:
                pass
    return out


def test_timed_out_bochs_run_leaves_no_process(tmp_path):
    t = open_target("bochs-generic")
    if t.unavailable():
        pytest.skip(t.unavailable())
    sc = Scenario(name="hang", probe=False)
    sc.asm.append("hang_forever:\n    cli\n1:  hlt\n    jmp 1b\n")
    sc.steps.call("hang_forever")
    with pytest.raises(RunTimeout) as e:
        run_scenario(t, sc, tmp_path / "ev", timeout=3.0)
    assert "no terminal record" in str(e.value)
    pid = int((tmp_path / "ev" / "bochs.pid").read_text())
    time.sleep(0.2)
    # Other tests (xdist workers) may run Bochs meanwhile: check this run's own process.
    assert pid not in _bochs_pids()
    assert pid not in proc.live_pids()


def test_bochs_run_ends_the_process_and_says_how(tmp_path):
    t = open_target("bochs-generic")
    if t.unavailable():
        pytest.skip(t.unavailable())
    sc = Scenario(name="mark", probe=False)
    sc.steps.mark(0x55)
    run = run_scenario(t, sc, tmp_path / "ev")
    assert run.raw.exit_expected is None             # Bochs has no exit port
    assert run.raw.exit_status == -9                 # ended by the harness, not by itself
    assert "terminal record received" in run.raw.notes[0]
    assert run.step(0)[0].fields[1] == 0x55


def test_bochs_start_error_carries_the_reason_bochs_gave(tmp_path):
    """Issue 10 #15: the error named only the exit; Bochs' own words are on its display."""
    t = open_target("bochs-generic")
    if t.unavailable():
        pytest.skip(t.unavailable())
    t.b["cpu_options"] = {"no_such_option": 1}       # past the schema: what a bad Bochs build would reject
    sc = Scenario(name="mark", probe=False)
    sc.steps.mark(1)
    t0 = time.monotonic()
    with pytest.raises(InfraError) as e:
        run_scenario(t, sc, tmp_path / "ev", timeout=60)
    assert e.value.stage == "start"
    assert "Bochs said:" in str(e.value) and "cpu directive malformed" in str(e.value)
    assert time.monotonic() - t0 < 20
    assert not (tmp_path / "ev" / "INCOMPLETE").exists()
