"""A test of the test suite: a deliberately wrong builder must make a conformance check fail."""

from __future__ import annotations

import pytest

from harness.testing import XFER, FaultReason as FR, VtdScenario, assert_single_fault, dmar, page
from harness.testing.vtd import per_agent

from .test_faults import IOVA, check, faulting

pytestmark = pytest.mark.requires("vtd")


class FlippedWriteBit(dmar.SecondLevel):
    """A broken builder: leaf entries get W where the caller asked for none (bit 1 flipped)."""

    def map(self, iova, phys, size=dmar.PAGE_4K, read=True, write=True):
        return super().map(iova, phys, size, read=read, write=not write)


def test_flipped_permission_bit_is_caught(vtd):
    """The read-only-page check run against the broken builder fails: the write lands and no
    reason-5 fault is recorded."""
    def build(s: VtdScenario) -> None:
        dom = FlippedWriteBit(s.arena, 3)
        dom.map(IOVA, page(1), write=False)
        s.attach(s.agent, dom, 1)
    out = vtd.run(faulting(vtd, "broken-builder", build))
    with pytest.raises(AssertionError):
        check(out, FR.WRITE, "write")
    assert out.faults(out.scen.checks["faults"]).pending == []   # the broken table let the write through
    assert out.mismatches("untouched") != 0


def test_a_fault_with_another_address_is_caught(vtd):
    """The exact checks see a fault recorded for another page, another requester or the other
    access type: each variation of the expected values fails.  Another byte in the same page is
    caught where QEMU's trace witnesses the full address (FRCD holds the page only)."""
    out = vtd.run(faulting(vtd, "exact-values", lambda s: s.attach(s.agent, s.domain(), 1)))
    sid = out.scen.agent.source_id
    check(out, FR.WRITE, "write")                                # the real values pass
    step = out.scen.checks["faults"]
    variations = [(FR.READ, sid, IOVA, "write"), (FR.WRITE, sid + 1, IOVA, "write"),
                  (FR.WRITE, sid, IOVA + 0x1000, "write"), (FR.WRITE, sid, IOVA, "read")]
    if out.trace is not None:
        variations.append((FR.WRITE, sid, IOVA + 8, "write"))
    for reason, source, address, access in variations:
        with pytest.raises(AssertionError):
            assert_single_fault(out, reason, source, address, access, step=step)


@per_agent
def test_compare_written_sees_missing_and_moved_data(vtd, agent):
    """``compare_written`` against the agent's own data: where the write landed it matches; the
    next page and the bytes right after the write (both still FILL) mismatch in every qword."""
    runner = vtd.with_agent(agent)
    scen = runner.scenario("compare-written-sensitivity")
    scen.prepare()
    dom = scen.domain()
    dom.map(IOVA, page(1))
    scen.attach(scen.agent, dom, 1)
    scen.unit.setup_translation(scen.tables.root)
    scen.agent.dma_write(IOVA, XFER)
    scen.compare_written("landed", scen.agent, page(1), XFER)
    scen.compare_written("next-page", scen.agent, page(2), XFER)
    scen.compare_written("after", scen.agent, page(1) + XFER, XFER)
    out = runner.run(scen)
    assert out.mismatches("landed") == 0
    assert (out.mismatches("next-page"), out.mismatches("after")) == (XFER // 8, XFER // 8)
