"""A test of the test suite: a deliberately wrong builder must make a conformance check fail."""

from __future__ import annotations

import pytest

from harness.payload import vtd
from harness.payload.vtd import FaultReason as FR

from .vtd_support import EDU0, VtdScenario, page
from test_faults import IOVA, check, faulting

pytestmark = pytest.mark.requires("vtd")


class FlippedWriteBit(vtd.SecondLevel):
    """A broken builder: leaf entries get W where the caller asked for none (bit 1 flipped)."""

    def map(self, iova, phys, size=vtd.PAGE_4K, read=True, write=True):
        return super().map(iova, phys, size, read=read, write=not write)


def test_flipped_permission_bit_is_caught(vtx_target, vtd_run):
    """The read-only-page check run against the broken builder fails: the write lands and no
    reason-5 fault is recorded."""
    def build(s: VtdScenario) -> None:
        dom = FlippedWriteBit(s.arena, 3)
        dom.map(IOVA, page(1), write=False)
        s.tables.attach(EDU0, dom, 1)
    out = vtd_run.run(faulting("broken-builder", build))
    with pytest.raises(AssertionError):
        check(out, FR.WRITE, "write")
    assert out.faults().pending == []          # the broken table let the write through
    assert out.mismatches("untouched") != 0
