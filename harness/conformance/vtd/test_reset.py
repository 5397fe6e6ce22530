"""Bringing a unit to a known state before programming it (real hosts, kexec).  A unit left with
translation, interrupt remapping and queued invalidation on and a fault recorded ends with all
three off (GSTS.TES/IRES/QIES clear, VT-d 11.4.5), no fault pending (FSTS.PPF clear, 11.4.6.1)
and DMA untranslated again."""

from __future__ import annotations

import pytest

from harness.payload.vtd_reset import reset_unit
from harness.testing import INTREMAP, XFER, FaultReason as FR, assert_single_fault, dmar, page

from harness.testing.vtd import per_agent

pytestmark = pytest.mark.requires("vtd")

LEFT_ON = dmar.Gcmd.TE | dmar.Gcmd.QIE | dmar.Gcmd.IRE
UNMAPPED_IOVA = 0x20_0000


@per_agent
def test_reset_turns_off_a_unit_left_on_with_a_fault_recorded(vtd, agent):
    ir = vtd.with_agent(agent).variant(**INTREMAP)
    scen = ir.scenario("reset-left-on")
    scen.prepare()
    dom = scen.domain()
    dom.map(0x10_0000, page(1))
    scen.attach(scen.agent, dom, domain_id=1)
    scen.unit.setup_translation(scen.tables.root)
    dmar.InvQueue(scen.arena, scen.unit).setup()
    scen.unit.setup_intremap(scen.arena.alloc(16 * 256, 4096), 256)
    scen.agent.dma_write(UNMAPPED_IOVA, XFER)               # a write with no PTE: reason 5 (7.1.3)
    left = scen.unit.read32(dmar.REG_GSTS)
    before = scen.unit.faults()
    found = reset_unit(scen.steps)
    after = scen.unit.read32(dmar.REG_GSTS)
    fsts = scen.unit.read32(dmar.REG_FSTS)
    scen.agent.dma_write(page(2), XFER)                     # translation off: physical address
    scen.compare_written("untranslated", scen.agent, page(2), XFER)
    last = scen.unit.faults()
    out = ir.run(scen)
    assert out.value(scen.found_gsts) & LEFT_ON == 0        # a freshly booted QEMU unit is off
    assert out.value(found) == out.value(left)
    assert out.value(found) & LEFT_ON == LEFT_ON
    assert_single_fault(out, FR.WRITE, scen.agent.source_id, UNMAPPED_IOVA, "write", step=before)
    assert out.value(after) & (LEFT_ON | dmar.Gcmd.CFI) == 0
    assert out.value(fsts) == 0
    assert out.faults(last).pending == []
    assert out.mismatches("untranslated") == 0


def test_reset_turns_off_a_queue_stopped_by_an_invalid_descriptor(vtd):
    """A queue stopped with FSTS.IQE (6.5.2.10: IQH stays at the invalid descriptor) cannot drain;
    the reset abandons it there, clears IQE and turns queued invalidation off (GSTS.QIES clear,
    11.4.5); a new queue then completes its wait."""
    scen = vtd.scenario("reset-iqe")
    first = dmar.InvQueue(scen.arena, scen.unit)
    first.setup()
    stopped = first.submit((0x0, 0x0), wait_status=scen.arena.alloc(8, 8))   # reserved type 0
    iqe = scen.unit.read32(dmar.REG_FSTS)
    found = reset_unit(scen.steps)
    after = scen.unit.read32(dmar.REG_GSTS)
    fsts = scen.unit.read32(dmar.REG_FSTS)
    again = dmar.InvQueue(scen.arena, scen.unit)
    again.setup()
    done = again.submit(dmar.iotlb_inv_desc(1), wait_status=scen.arena.alloc(8, 8))
    out = vtd.run(scen)
    assert out.value(stopped) == 0 and out.value(iqe) & dmar.FSTS_IQE
    assert out.value(found) & dmar.Gcmd.QIE
    assert out.value(after) & dmar.Gcmd.QIE == 0
    assert out.value(fsts) & dmar.FSTS_IQE == 0
    assert out.value(done) != 0
