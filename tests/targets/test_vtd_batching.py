"""Batching of VT-d scenarios (harness.testing.vtd_batch), end to end on qemu-tcg-vtd: a batched
test reads exactly its own outcome (data, fault record, QEMU's witness of its own slice only), a
wrong expectation still fails, a slice that does not complete runs alone while the slices after it
boot again together, a scenario that differs from the one planned runs alone, and ``solo`` /
``--vtx-solo`` turn batching off."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

pytestmark = pytest.mark.xdist_group("vtd-batching")

HEADER = """
import itertools
import pytest
from harness.testing import FaultReason as FR, PATTERN, XFER, assert_single_fault, page

pytestmark = pytest.mark.requires("vtd")
IOVA = 0x40_0000


def _translated(vtd, name, mapped=True):
    s = vtd.scenario(name)
    s.prepare()
    dom = s.domain()
    if mapped:
        dom.map(IOVA, page(1))
    s.attach(s.agent, dom, domain_id=1)
    s.unit.setup_translation(s.tables.root)
    s.agent.dma_write(IOVA, XFER)
    snap = s.unit.faults()
    s.compare("data", page(1), XFER, PATTERN)
    return s, snap
"""

TESTS = HEADER + """

def test_a_write_lands(vtd):
    s, snap = _translated(vtd, "lands")
    out = vtd.run(s)
    assert out.mismatches("data") == 0 and out.faults(snap).pending == []
    assert out.trace is not None and out.trace.records == []          # its slice traced no fault


def test_b_unmapped_write_faults(vtd):
    s, snap = _translated(vtd, "faults", mapped=False)
    out = vtd.run(s)
    assert_single_fault(out, FR.WRITE, s.agent.source_id, IOVA, "write", step=snap)
    assert out.mismatches("data") == XFER // 8
    assert len(out.trace.records) == 1                                  # only its own fault


def test_c_wrong_expectation_fails(vtd):
    s, snap = _translated(vtd, "wrong")
    out = vtd.run(s)
    assert out.mismatches("data") == 1, "deliberately wrong"
"""

CUT_SHORT = HEADER + """

def test_a_first(vtd):
    s, snap = _translated(vtd, "first")
    assert vtd.run(s).mismatches("data") == 0


def test_b_poll_that_never_matches(vtd):
    s = vtd.scenario("never")
    s.steps.poll(0xFED9_0000, 0xFFFF_FFFF, 0x1234_5678, 1000, abort=True)   # VER never reads this
    vtd.run(s)


def test_c_after(vtd):
    s, snap = _translated(vtd, "after")
    assert vtd.run(s).mismatches("data") == 0


def test_d_last(vtd):
    s, snap = _translated(vtd, "last", mapped=False)
    assert vtd.run(s).faults(snap).pending[0].reason == FR.WRITE
"""

CHANGES = HEADER + """
counter = itertools.count()


def test_scenario_differs_from_plan(vtd):
    s, snap = _translated(vtd, f"call-{next(counter)}")      # planning saw call-0, the test call-1
    s.steps.delay(next(counter))
    assert vtd.run(s).mismatches("data") == 0


def test_plain(vtd):
    s, snap = _translated(vtd, "plain")
    assert vtd.run(s).mismatches("data") == 0


@pytest.mark.solo
def test_marked_solo(vtd):
    s, snap = _translated(vtd, "solo")
    assert vtd.run(s).mismatches("data") == 0
"""


def _run(pytester, source: str, *extra: str):
    pytester.makepyfile(test_inner=source)
    ev = pytester.path / "ev"
    r = pytester.runpytest_subprocess("--vtx-target", "qemu-tcg-vtd", "-p", "no:cacheprovider",
                                      f"--vtx-evidence-dir={ev}", "-rA", *extra)
    return r, ev


def _batched(ev: Path, test: str) -> str | None:
    """The batch.txt of ``test``'s run-1 (None: it ran alone)."""
    found = [p for p in ev.glob(f"*{test}*/run-1/batch.txt")]
    return found[0].read_text() if found else None


def _batches(ev: Path) -> list[str]:
    return sorted(p.name for p in (ev / "_vtd" / "qemu-tcg-vtd").glob("vtd-batch-*"))


def test_batched_tests_read_their_own_outcome_and_a_wrong_expectation_fails(pytester):
    r, ev = _run(pytester, TESTS)
    r.assert_outcomes(passed=2, failed=1)
    assert "deliberately wrong" in r.stdout.str()
    assert _batches(ev) == ["vtd-batch-0"]
    for test, n in (("test_a_write_lands", 0), ("test_b_unmapped_write_faults", 1), ("test_c_wrong", 2)):
        text = _batched(ev, test)
        assert text is not None and f"slice {n} of a batch" in text, (test, text)
    # The test's own records.txt holds its slice only, renumbered, ending with its own END.
    recs = next(ev.glob("*test_b_unmapped*/run-1/records.txt")).read_text()
    assert "VTD_FRCD" in recs and re.search(r"END OK after \d+ records, (\d+) steps", recs)
    assert recs.count("MARK") == 0


def test_a_slice_cut_short_runs_alone_and_the_rest_boot_again_together(pytester):
    r, ev = _run(pytester, CUT_SHORT)
    r.assert_outcomes(passed=3, failed=1)
    assert "POLL_TIMEOUT" in r.stdout.str()
    assert _batches(ev) == ["vtd-batch-0", "vtd-batch-0.1"]
    assert "slice 0 of" in (_batched(ev, "test_a_first") or "")
    assert _batched(ev, "test_b_poll") is None                     # re-run alone: its own boot
    assert "slice 0 of" in (_batched(ev, "test_c_after") or "")     # first slice of the reboot
    assert "slice 1 of" in (_batched(ev, "test_d_last") or "")


def test_changed_scenarios_and_solo_tests_run_alone(pytester):
    r, ev = _run(pytester, CHANGES)
    r.assert_outcomes(passed=3)
    assert _batched(ev, "test_scenario_differs") is None
    assert _batched(ev, "test_plain") is not None
    assert _batched(ev, "test_marked_solo") is None


def test_vtx_solo_turns_batching_off(pytester):
    r, ev = _run(pytester, TESTS, "--vtx-solo")
    r.assert_outcomes(passed=2, failed=1)
    assert _batches(ev) == []
    assert _batched(ev, "test_a_write_lands") is None
