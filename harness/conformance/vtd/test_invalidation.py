"""Invalidation (VT-d 6.5): after a PTE or context-entry change, the new translation is in force
once the right invalidation has completed.  Use of a stale translation before that is
implementation-defined: it is recorded as an observation, and only "exactly one of old/new" is
asserted.  Every test that moves data runs per DMA agent (edu, NVMe, AHCI)."""

from __future__ import annotations

import pytest

from harness.testing import (
    CACHING_MODE, FILL, XFER, FaultReason as FR, VtdRunner, VtdScenario, assert_fault,
    assert_single_fault, dmar, page,
)
from harness.testing.vtd import per_agent

pytestmark = pytest.mark.requires("vtd")

IOVA = 0x70_0000
DID = 7


def remap_scenario(vtd: VtdRunner, name: str) -> tuple[VtdScenario, int]:
    """IOVA -> page(1), one DMA (the translation is now cacheable), page(1) reset to FILL, then the
    leaf PTE rewritten to point at page(2).  Returns the scenario and the PTE's address."""
    scen = vtd.scenario(name)
    scen.prepare()
    dom = scen.domain()
    pte = dom.map(IOVA, page(1))
    scen.attach(scen.agent, dom, DID)
    scen.unit.setup_translation(scen.tables.root)
    scen.agent.dma_write(IOVA, XFER)
    scen.compare_written("first", scen.agent, page(1), XFER)
    scen.steps.mem_fill(page(1), 0x1000, FILL)
    scen.steps.mmio_write(pte, dmar.sl_entry(page(2)), size=8)
    return scen, pte


def finish(scen: VtdScenario) -> None:
    scen.agent.dma_write(IOVA, XFER)
    scen.check("faults", scen.unit.faults())
    scen.compare("old", page(1), 0x1000, FILL)
    scen.compare_written("new", scen.agent, page(2), XFER)


@pytest.mark.parametrize("granularity", [1, 2, 3], ids=["global", "domain", "page"])
@per_agent
def test_register_iotlb_invalidation_applies_new_pte(vtd, agent, granularity):
    """IOTLB_REG invalidation (11.4.8.1; IIRG 1 global, 2 domain DID, 3 page IVA) makes the
    rewritten PTE take effect: the second DMA lands in the new page only."""
    vtd = vtd.with_agent(agent)
    scen, _ = remap_scenario(vtd, f"reg-iotlb-{granularity}")
    inv = scen.unit.invalidate_iotlb(granularity, DID, IOVA if granularity == 3 else 0)
    finish(scen)
    out = vtd.run(scen)
    assert out.value(inv) >> 63 == 0                # IVT cleared: the invalidation completed
    assert out.value(inv) >> 57 & 3 in (1, 2, 3)    # IAIG reports a performed granularity
    assert [out.mismatches(k) for k in ("first", "old", "new")] == [0, 0, 0]
    assert out.faults(scen.checks["faults"]).pending == []


@per_agent
def test_stale_translation_before_invalidation_is_observed(vtd, agent):
    """Without an invalidation the DMA may use the cached or the new translation (6.5: either is
    allowed); it must land in exactly one of the two pages."""
    vtd = vtd.with_agent(agent)
    scen, _ = remap_scenario(vtd, "stale")
    finish(scen)
    out = vtd.run(scen)
    old_written, new_written = out.mismatches("old") != 0, out.mismatches("new") == 0
    out.note(stale_translation_used=old_written, new_translation_used=new_written)
    assert old_written != new_written, "the write reached both pages or neither"


@per_agent
def test_context_entry_change_after_context_cache_invalidation(vtd, agent):
    """Re-pointing the context entry at another domain (new DID, new tables) takes effect after
    a context-cache invalidation and an IOTLB invalidation (6.5.3.3)."""
    vtd = vtd.with_agent(agent)
    scen = vtd.scenario("ctx-change")
    scen.prepare()
    d1, d2 = scen.domain(), scen.domain()
    d1.map(IOVA, page(1))
    d2.map(IOVA, page(2))
    ce = scen.attach(scen.agent, d1, 1)
    scen.unit.setup_translation(scen.tables.root)
    scen.agent.dma_write(IOVA, XFER)
    scen.compare_written("first", scen.agent, page(1), XFER)
    scen.steps.mem_fill(page(1), 0x1000, FILL)
    scen.map_private(scen.agent, d2)
    lo, hi = dmar.context_entry(d2.root, 2, 3)
    scen.steps.mmio_write(ce + 8, hi, size=8)
    scen.steps.mmio_write(ce, lo, size=8)
    cc = scen.unit.invalidate_context(3, 1, scen.agent.source_id)   # device-selective (CIRG 3)
    scen.unit.invalidate_iotlb(2, 1)                                # the old domain's translations
    finish(scen)
    out = vtd.run(scen)
    assert out.value(cc) >> 63 == 0
    assert [out.mismatches(k) for k in ("first", "old", "new")] == [0, 0, 0]
    assert out.faults(scen.checks["faults"]).pending == []


@per_agent
def test_context_entry_cleared_blocks_after_invalidation(vtd, agent):
    """Clearing the context entry's P bit, then a global context-cache + IOTLB invalidation: the
    next DMA faults with reason 2 (context entry not present)."""
    vtd = vtd.with_agent(agent)
    scen = vtd.scenario("ctx-clear")
    scen.require_self_contained()
    scen.prepare()
    d1 = scen.domain()
    d1.map(IOVA, page(1))
    ce = scen.attach(scen.agent, d1, 1)
    scen.unit.setup_translation(scen.tables.root)
    scen.agent.dma_write(IOVA, XFER)
    scen.steps.mem_fill(page(1), 0x1000, FILL)
    scen.steps.mmio_write(ce, 0, size=8)
    scen.unit.invalidate_all()
    scen.agent.dma_write(IOVA, XFER)
    snap = scen.unit.faults()
    scen.compare("old", page(1), 0x1000, FILL)
    out = vtd.run(scen)
    assert_single_fault(out, FR.CONTEXT_NOT_PRESENT, scen.agent.source_id, IOVA, "write", step=snap)
    assert out.mismatches("old") == 0


# ---------------------------------------------------------------------------------------------
# Queued invalidation (6.5.2).

def qi_scenario(vtd: VtdRunner, name: str) -> tuple[VtdScenario, dmar.InvQueue, int]:
    scen, _ = remap_scenario(vtd, name)
    q = dmar.InvQueue(scen.arena, scen.unit)
    q.setup()
    status = scen.arena.alloc(8, 8)
    return scen, q, status


@pytest.mark.requires("vtd.qi")
@pytest.mark.parametrize("granularity", [1, 2, 3], ids=["global", "domain", "page"])
@per_agent
def test_queued_iotlb_invalidation_with_wait(vtd, agent, granularity):
    """IOTLB invalidate descriptor + invalidation wait (SW=1): the wait's own status data is
    observed at the status address, and the new PTE is then in force."""
    vtd = vtd.with_agent(agent)
    scen, q, status = qi_scenario(vtd, f"qi-iotlb-{granularity}")
    sub = q.submit(dmar.iotlb_inv_desc(granularity, DID, IOVA if granularity == 3 else 0), wait_status=status)
    iqh = scen.unit.read64(dmar.REG_IQH)
    fsts = scen.unit.read32(dmar.REG_FSTS)
    finish(scen)
    out = vtd.run(scen)
    assert out.value(sub) == q.status_data[sub] != 0
    wait = out.qi_wait(sub)
    assert (wait.status_address, wait.value) == (status, q.status_data[sub])
    assert out.value(iqh) == q.tail << 4            # the head caught up with the tail
    assert out.value(fsts) & dmar.FSTS_IQE == 0
    assert [out.mismatches(k) for k in ("first", "old", "new")] == [0, 0, 0]


@pytest.mark.requires("vtd.qi")
@per_agent
def test_successive_waits_write_their_own_status_data(vtd, agent):
    """Two batches, each with an invalidation wait on the same status dword: each wait writes its
    own status data (6.5.2.8), so the second submit sees the second value, not the first's."""
    vtd = vtd.with_agent(agent)
    scen, q, status = qi_scenario(vtd, "qi-two-waits")
    first = q.submit(dmar.iotlb_inv_desc(1), wait_status=status)
    second = q.submit(dmar.iotlb_inv_desc(2, DID), wait_status=status)
    after = scen.steps.mem_read(status)
    out = vtd.run(scen)
    assert q.status_data[first] != q.status_data[second]
    assert (out.value(first), out.value(second)) == (q.status_data[first], q.status_data[second])
    assert out.memory(after)[0] & 0xFFFF_FFFF == q.status_data[second]


@pytest.mark.requires("vtd.qi")
@per_agent
def test_queued_context_and_iotlb_invalidation(vtd, agent):
    """Context-cache (global) + IOTLB (global) + wait descriptors in one batch after a
    context-entry change: the new domain is used."""
    vtd = vtd.with_agent(agent)
    scen = vtd.scenario("qi-ctx")
    scen.prepare()
    d1, d2 = scen.domain(), scen.domain()
    d1.map(IOVA, page(1))
    d2.map(IOVA, page(2))
    ce = scen.attach(scen.agent, d1, 1)
    scen.unit.setup_translation(scen.tables.root)
    q = dmar.InvQueue(scen.arena, scen.unit)
    q.setup()
    scen.agent.dma_write(IOVA, XFER)
    scen.steps.mem_fill(page(1), 0x1000, FILL)
    scen.map_private(scen.agent, d2)
    lo, hi = dmar.context_entry(d2.root, 2, 3)
    scen.steps.mmio_write(ce + 8, hi, size=8)
    scen.steps.mmio_write(ce, lo, size=8)
    status = scen.arena.alloc(8, 8)
    sub = q.submit(dmar.cc_inv_desc(1), dmar.iotlb_inv_desc(1), wait_status=status)
    finish(scen)
    out = vtd.run(scen)
    assert out.value(sub) == q.status_data[sub]
    assert (out.mismatches("old"), out.mismatches("new")) == (0, 0)


@pytest.mark.requires("vtd.qi")
@per_agent
def test_queued_invalid_descriptor_sets_iqe(vtd, agent):
    """A descriptor of reserved type 0 stops the queue with FSTS.IQE (6.5.2.10); the wait after
    it never writes its status."""
    vtd = vtd.with_agent(agent)
    scen = vtd.scenario("qi-iqe")
    scen.prepare()
    scen.attach(scen.agent, scen.domain(), 1)
    scen.unit.setup_translation(scen.tables.root)
    q = dmar.InvQueue(scen.arena, scen.unit)
    q.setup()
    status = scen.arena.alloc(8, 8)
    sub = q.submit((0x0, 0x0), wait_status=status)
    mem = scen.steps.mem_read(status)
    fsts = scen.unit.read32(dmar.REG_FSTS)
    out = vtd.run(scen)
    assert out.value(sub) == 0
    assert out.memory(mem) == [0]
    assert out.value(fsts) & dmar.FSTS_IQE


# ---------------------------------------------------------------------------------------------
# Caching mode (6.1: CM=1 lets the unit cache not-present entries).

def test_caching_mode_reported(vtd):
    """caching-mode=on sets CAP.CM (bit 7, 11.4.2)."""
    cm = vtd.variant(**CACHING_MODE)
    scen = cm.scenario("cm-cap")
    cap = scen.unit.read64(dmar.REG_CAP)
    out = cm.run(scen)
    assert out.value(cap) >> 7 & 1 == 1


@per_agent
def test_caching_mode_new_mapping_after_invalidation(vtd, agent):
    """CM=1: a fault on a not-present page, then the PTE is written and a page-selective IOTLB
    invalidation completes; the next DMA lands in the new page (6.1)."""
    vtd = vtd.with_agent(agent)
    cm = vtd.variant(**CACHING_MODE)
    scen = cm.scenario("cm-map")
    scen.prepare()
    dom = scen.domain()
    dom.map(IOVA + 0x1000, page(3))                       # builds the tables down to the PTE page
    pte = dom.entry_address(IOVA)
    scen.attach(scen.agent, dom, DID)
    scen.unit.setup_translation(scen.tables.root)
    scen.agent.dma_write(IOVA, XFER)
    first = scen.unit.faults()
    scen.unit.clear_faults()
    scen.steps.mmio_write(pte, dmar.sl_entry(page(2)), size=8)
    scen.unit.invalidate_iotlb(3, DID, IOVA)
    scen.agent.dma_write(IOVA, XFER)
    second = scen.unit.faults()
    scen.compare_written("new", scen.agent, page(2), XFER)
    scen.compare("rest", page(3), 0x1000, FILL)
    out = cm.run(scen)
    assert_single_fault(out, FR.WRITE, scen.agent.source_id, IOVA, "write", step=first)
    assert out.faults(second).pending == []
    assert (out.mismatches("new"), out.mismatches("rest")) == (0, 0)


@per_agent
def test_caching_mode_new_mapping_without_invalidation_observed(vtd, agent):
    """CM=1 and no invalidation after mapping a previously not-present page: the unit may still
    use the cached not-present entry.  Observed and recorded; asserted: either the DMA landed
    and no new fault, or it faulted (reason 5) and did not land."""
    vtd = vtd.with_agent(agent)
    cm = vtd.variant(**CACHING_MODE)
    scen = cm.scenario("cm-stale")
    scen.prepare()
    dom = scen.domain()
    dom.map(IOVA + 0x1000, page(3))
    pte = dom.entry_address(IOVA)
    scen.attach(scen.agent, dom, DID)
    scen.unit.setup_translation(scen.tables.root)
    scen.agent.dma_write(IOVA, XFER)
    first = scen.unit.faults()
    scen.unit.clear_faults()
    scen.steps.mmio_write(pte, dmar.sl_entry(page(2)), size=8)
    scen.agent.dma_write(IOVA, XFER)
    second = scen.unit.faults()
    scen.compare_written("new", scen.agent, page(2), XFER)
    out = cm.run(scen)
    assert_single_fault(out, FR.WRITE, scen.agent.source_id, IOVA, "write", step=first)
    landed = out.mismatches("new") == 0
    pending = out.faults(second).pending
    out.note(cm_stale_not_present_used=not landed)
    if landed:
        assert pending == []
    else:
        assert_fault(pending[0], FR.WRITE, scen.agent.source_id, IOVA, "write")
