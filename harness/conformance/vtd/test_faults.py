"""DMA-remapping faults (VT-d 7.1, 7.2; reasons: appendix A): each records reason, source-id,
faulting page and access type in a fault recording register, and target memory stays untouched."""

from __future__ import annotations

from typing import Callable

import pytest

from harness.testing import (
    QEMU_IOMMU, deviation,
    FILL, XFER, FaultReason as FR, VtdOutcome, VtdRunner, VtdScenario, assert_fault,
    assert_single_fault, dmar, page,
)
from harness.testing.vtd import per_agent

pytestmark = pytest.mark.requires("vtd")

IOVA = 0x50_0000


def faulting(vtd: VtdRunner, name: str, build: Callable[[VtdScenario], object], write: bool = True,
             iova: int = IOVA, whole_device: bool = False) -> VtdScenario:
    """Tables from ``build(scen)``, then one DMA to ``iova``; page(1) is the would-be target.
    ``scen.checks["faults"]`` is the snapshot after the DMA.  ``whole_device``: the tables block
    every request of the device, so the test is for self-contained agents only."""
    scen = vtd.scenario(name)
    if whole_device:
        scen.require_self_contained()
    scen.prepare()
    build(scen)
    scen.unit.setup_translation(scen.tables.root)
    if write:
        scen.agent.dma_write(iova, XFER)
    else:
        scen.agent.dma_read(iova, XFER, buffer_offset=0x800)
    scen.check("faults", scen.unit.faults())
    scen.compare("untouched", page(0), 0x8000, FILL)
    return scen


def mapped_domain(scen: VtdScenario, **perm) -> dmar.SecondLevel:
    dom = scen.domain()
    dom.map(IOVA, page(1), **perm)
    return dom


def check(out: VtdOutcome, reason: int, access: str, iova: int = IOVA) -> None:
    """Exactly this fault recorded, from the agent, with FSTS consistent and memory untouched; where
    QEMU witnesses, it detected the fault at exactly ``iova``."""
    scen = out.scen
    assert_single_fault(out, reason, scen.agent.source_id, iova, access, step=scen.checks["faults"])
    assert out.mismatches("untouched") == 0


@per_agent
def test_root_entry_not_present(vtd, agent):
    """No root entry for the agent's bus: reason 1 (appendix A)."""
    vtd = vtd.with_agent(agent)
    check(vtd.run(faulting(vtd, "root-np", lambda s: None, whole_device=True)), FR.ROOT_NOT_PRESENT, "write")


@per_agent
def test_context_entry_not_present(vtd, agent):
    """Root entry present, context entry for the agent absent: reason 2."""
    vtd = vtd.with_agent(agent)
    scen = faulting(vtd, "ctx-np", lambda s: s.tables.context_table(s.agent.source_id >> 8), whole_device=True)
    check(vtd.run(scen), FR.CONTEXT_NOT_PRESENT, "write")


@per_agent
def test_pte_not_present_on_write(vtd, agent):
    """Leaf PTE with R=W=0 on a write: reason 5 (write permission), T = write."""
    vtd = vtd.with_agent(agent)
    scen = faulting(vtd, "pte-np-w", lambda s: s.attach(s.agent, mapped_domain(s, read=False, write=False), 1))
    check(vtd.run(scen), FR.WRITE, "write")


@per_agent
def test_pte_not_present_on_read(vtd, agent):
    """Leaf PTE with R=W=0 on a read: reason 6 (read permission), T = read."""
    vtd = vtd.with_agent(agent)
    scen = faulting(vtd, "pte-np-r", lambda s: s.attach(s.agent, mapped_domain(s, read=False, write=False), 1),
                    write=False)
    check(vtd.run(scen), FR.READ, "read")


@per_agent
def test_unmapped_iova_on_read(vtd, agent):
    """No table below the PML4E/PDPE at all (an empty domain): reason 6 on a read."""
    vtd = vtd.with_agent(agent)
    scen = faulting(vtd, "unmapped-r", lambda s: s.attach(s.agent, s.domain(), 1), write=False)
    check(vtd.run(scen), FR.READ, "read")


@per_agent
def test_write_to_read_only_page(vtd, agent):
    """R=1 W=0, first access a write: reason 5 and the page keeps its contents."""
    vtd = vtd.with_agent(agent)
    scen = faulting(vtd, "ro-write", lambda s: s.attach(s.agent, mapped_domain(s, write=False), 1))
    check(vtd.run(scen), FR.WRITE, "write")


@per_agent
def test_write_only_page_refuses_read(vtd, agent):
    """R=0 W=1: a read faults with reason 6."""
    vtd = vtd.with_agent(agent)
    scen = faulting(vtd, "wo-read", lambda s: s.attach(s.agent, mapped_domain(s, read=False), 1), write=False)
    check(vtd.run(scen), FR.READ, "read")


@per_agent
def test_address_beyond_domain_width(vtd, agent):
    """IOVA 2^39 with a 3-level (39-bit) context: reason 4 (address beyond AGAW)."""
    vtd = vtd.with_agent(agent)
    scen = faulting(vtd, "beyond-aw", lambda s: s.attach(s.agent, mapped_domain(s), 1), iova=1 << 39)
    check(vtd.run(scen), FR.ADDR_BEYOND_AW, "write", iova=1 << 39)


@per_agent
def test_context_reserved_translation_type(vtd, agent):
    """Context entry TT = 11b (reserved): reason 3 (invalid context entry)."""
    vtd = vtd.with_agent(agent)
    def build(s: VtdScenario) -> None:
        s.set_context(s.agent, dmar.context_entry(mapped_domain(s).root, 1, 3, tt=dmar.TT.RESERVED))
    check(vtd.run(faulting(vtd, "ctx-tt3", build, whole_device=True)), FR.CONTEXT_INVALID, "write")


@per_agent
def test_context_unsupported_address_width(vtd, agent):
    """Context AW = 3 (5-level), which SAGAW does not offer: reason 3."""
    vtd = vtd.with_agent(agent)
    def build(s: VtdScenario) -> None:
        s.set_context(s.agent, dmar.context_entry(mapped_domain(s).root, 1, 3, aw=3))
    check(vtd.run(faulting(vtd, "ctx-aw", build, whole_device=True)), FR.CONTEXT_INVALID, "write")


@per_agent
def test_context_reserved_bit(vtd, agent):
    """Context entry with reserved bit 71 (high qword bit 7) set: reason 0xB."""
    vtd = vtd.with_agent(agent)
    def build(s: VtdScenario) -> None:
        lo, hi = dmar.context_entry(mapped_domain(s).root, 1, 3)
        s.set_context(s.agent, (lo, hi | 1 << 7))
    check(vtd.run(faulting(vtd, "ctx-rsvd", build, whole_device=True)), FR.CONTEXT_RESERVED, "write")


@per_agent
def test_root_reserved_bit(vtd, agent):
    """Root entry with reserved bit 1 set: reason 0xA."""
    vtd = vtd.with_agent(agent)
    def build(s: VtdScenario) -> None:
        s.attach(s.agent, mapped_domain(s), 1)
        bus = s.agent.source_id >> 8
        lo, hi = dmar.root_entry(s.tables.context_tables[bus])
        s.tables.set_root(bus, (lo | 1 << 1, hi))
    check(vtd.run(faulting(vtd, "root-rsvd", build, whole_device=True)), FR.ROOT_RESERVED, "write")


@per_agent
def test_pte_address_beyond_host_width(vtd, agent):
    """Leaf PTE whose frame has bit HAW set (the DMAR table's host address width, probed: 39 on
    QEMU's default, 48 with aw-bits=48): reserved, reason 0xC (9.8: bits 51:HAW are reserved)."""
    vtd = vtd.with_agent(agent)
    haw = vtd.probe.dmar_haw
    if haw is None or haw >= 52:
        pytest.skip(f"no reserved PTE address bits: host address width {haw} (probed)")
    def build(s: VtdScenario) -> None:
        dom = s.domain()
        dom.set_raw(IOVA, 1, page(1) | 1 << haw | dmar.SL_R | dmar.SL_W)
        s.attach(s.agent, dom, 1)
    check(vtd.run(faulting(vtd, "pte-rsvd", build)), FR.PTE_RESERVED, "write")


@per_agent
def test_large_pde_reserved_low_bits(vtd, agent):
    """A 2 MiB leaf with bits 20:12 non-zero (reserved in a large-page PDE): reason 0xC."""
    vtd = vtd.with_agent(agent)
    def build(s: VtdScenario) -> None:
        dom = s.domain()
        dom.set_raw(IOVA & ~0x1F_FFFF, 2, 0x20_0000 | 0x1000 | dmar.SL_PS | dmar.SL_R | dmar.SL_W)
        s.attach(s.agent, dom, 1)
    check(vtd.run(faulting(vtd, "pde-rsvd", build)), FR.PTE_RESERVED, "write")


@per_agent
def test_fault_processing_disabled_suppresses_recording(vtd, agent):
    """FPD=1 in the context entry: a qualified fault (reason 5) is not recorded (7.1.2), and the
    DMA still does not reach memory."""
    vtd = vtd.with_agent(agent)
    out = vtd.run(faulting(vtd, "fpd", lambda s: s.attach(s.agent, mapped_domain(s, write=False), 1, fpd=True)))
    fs = out.faults(out.scen.checks["faults"])
    assert (fs.pending, fs.ppf, fs.pfo) == ([], False, False)
    assert out.mismatches("untouched") == 0
    if out.trace is not None:
        assert out.trace.records == []


# ---------------------------------------------------------------------------------------------
# Fault recording registers (11.4.6.1, 11.4.14) and the fault event (7.3).

@per_agent
def test_fault_record_w1c_clears_and_rearms(vtd, agent):
    """Writing 1 to FRCD.F clears it and PPF; the next fault is recorded afresh."""
    vtd = vtd.with_agent(agent)
    scen = vtd.scenario("w1c")
    scen.prepare()
    scen.attach(scen.agent, scen.domain(), 1)
    scen.unit.setup_translation(scen.tables.root)
    scen.agent.dma_write(0x11_0000, XFER)
    first = scen.unit.faults()
    scen.unit.clear_faults()
    cleared = scen.unit.faults()
    scen.agent.dma_read(0x22_0000, XFER)
    second = scen.unit.faults()
    out = vtd.run(scen)
    sid = scen.agent.source_id
    assert_single_fault(out, FR.WRITE, sid, 0x11_0000, "write", step=first)
    assert (out.faults(cleared).pending, out.faults(cleared).ppf) == ([], False)
    assert_single_fault(out, FR.READ, sid, 0x22_0000, "read", step=second)


@per_agent
def test_same_source_faults_keep_first_record(vtd, agent):
    """A second fault from the same requester while FRCD is still set does not overwrite it
    (the record stays the first fault's; QEMU compresses the second, 7.2.1)."""
    vtd = vtd.with_agent(agent)
    scen = vtd.scenario("compress")
    scen.prepare()
    scen.attach(scen.agent, scen.domain(), 1)
    scen.unit.setup_translation(scen.tables.root)
    scen.agent.dma_write(0x11_0000, XFER)
    scen.agent.dma_write(0x33_0000, XFER)
    snap = scen.unit.faults()
    out = vtd.run(scen)
    fs = out.faults(snap)
    assert len(fs.pending) == 1
    assert_fault(fs.pending[0], FR.WRITE, scen.agent.source_id, 0x11_0000, "write")
    out.note(second_fault_pfo=fs.pfo, nfr=len(fs.records))


@per_agent
def test_primary_fault_overflow(vtd, agent):
    """With every FRCD full, a fault from another requester sets FSTS.PFO and is not recorded;
    PFO is RW1C (11.4.6.1).  Two agents, no context entries."""
    vtd = vtd.with_agent(agent, 2)
    two = vtd
    scen = two.scenario("pfo", agents=2)
    scen.require_self_contained()
    scen.prepare()
    scen.tables.context_table(scen.agent.source_id >> 8)
    scen.unit.setup_translation(scen.tables.root)
    scen.agents[0].dma_write(0x11_0000, XFER)
    scen.agents[1].dma_write(0x22_0000, XFER)
    full_step = scen.unit.faults()
    scen.unit.clear_faults()
    cleared_step = scen.unit.faults()
    out = two.run(scen)
    full, cleared = out.faults(full_step), out.faults(cleared_step)
    nfr = len(full.records)
    if nfr != 1:
        pytest.fail(f"scenario assumes one fault recording register, the unit has {nfr}")
    assert full.pfo and full.ppf
    assert_fault(full.pending[0], FR.CONTEXT_NOT_PRESENT, scen.agents[0].source_id, 0x11_0000, "write")
    assert (cleared.pfo, cleared.ppf, cleared.pending) == (False, False, [])


def fault_event_scenario(vtd: VtdRunner, masked: bool, unmask_later: bool = False) -> VtdScenario:
    scen = vtd.scenario("fault-event")
    scen.prepare()
    scen.attach(scen.agent, scen.domain(), 1)
    scen.unit.fault_event(0x61, vtd.apic_id, masked=masked)
    scen.unit.setup_translation(scen.tables.root)
    scen.agent.dma_write(0x11_0000, XFER)
    scen.check("event", scen.steps.wait_irq_halted(0x61, 2, 50_000_000))
    scen.check("fectl", scen.unit.read32(dmar.REG_FECTL))
    if unmask_later:
        scen.unit.write32(dmar.REG_FECTL, 0)
        scen.check("late", scen.steps.wait_irq_halted(0x61, 2, 50_000_000))
        scen.check("fectl2", scen.unit.read32(dmar.REG_FECTL))
    scen.check("faults", scen.unit.faults())
    return scen


@per_agent
def test_fault_event_interrupt_delivered(vtd, agent):
    """FECTL.IM=0: a recorded fault sends the FEDATA vector to FEADDR (7.3); IP reads 0."""
    vtd = vtd.with_agent(agent)
    out = vtd.run(fault_event_scenario(vtd, masked=False))
    checks = out.scen.checks
    assert out.value(checks["event"]) == 1
    assert out.value(checks["fectl"]) & (dmar.FECTL_IM | dmar.FECTL_IP) == 0
    assert_single_fault(out, FR.WRITE, out.scen.agent.source_id, 0x11_0000, "write", step=checks["faults"])


@per_agent
def test_fault_event_masked_sets_ip(vtd, agent):
    """FECTL.IM=1: no interrupt, FECTL.IP=1 (7.3.1)."""
    vtd = vtd.with_agent(agent)
    out = vtd.run(fault_event_scenario(vtd, masked=True))
    assert out.value(out.scen.checks["event"]) == 0
    assert out.value(out.scen.checks["fectl"]) & (dmar.FECTL_IM | dmar.FECTL_IP) == dmar.FECTL_IM | dmar.FECTL_IP


@per_agent
def test_fault_event_delivered_on_unmask(vtd, agent):
    """Clearing IM while IP is set delivers the held interrupt and clears IP (11.4.6.2)."""
    vtd = vtd.with_agent(agent)
    out = vtd.run(fault_event_scenario(vtd, masked=True, unmask_later=True))
    assert out.value(out.scen.checks["event"]) == 0
    assert out.value(out.scen.checks["late"]) == 1
    assert out.value(out.scen.checks["fectl2"]) & dmar.FECTL_IP == 0


def cached_ro_scenario(vtd: VtdRunner) -> VtdScenario:
    """IOVA read-only to the page the agent reads (page(1), or AHCI's own command table); a read
    caches the translation, then a write to IOVA.  ``source``/``source-after``: that page's first
    qwords before and after."""
    scen = vtd.scenario("ro-cached")
    scen.prepare()
    source = scen.agent.read_source(page(1))
    dom = scen.domain()
    dom.map(IOVA, source, write=False)
    scen.attach(scen.agent, dom, 1)
    scen.unit.setup_translation(scen.tables.root)
    scen.check("source", scen.steps.mem_read(source, 8))
    scen.agent.dma_read(IOVA, XFER, buffer_offset=0x800)     # caches the read-only translation
    scen.check("after-read", scen.unit.faults())
    scen.agent.dma_write(IOVA, XFER)
    scen.check("after-write", scen.unit.faults())
    scen.check("source-after", scen.steps.mem_read(source, 8))
    scen.compare("untouched", page(0), 0x8000, FILL)
    return scen


@per_agent
def test_write_to_cached_read_only_page_is_blocked(vtd, agent):
    """After a read cached the R-only translation, a write still does not reach memory."""
    vtd = vtd.with_agent(agent)
    out = vtd.run(cached_ro_scenario(vtd))
    checks = out.scen.checks
    assert out.faults(checks["after-read"]).pending == []
    assert out.memory(checks["source-after"]) == out.memory(checks["source"])
    assert out.mismatches("untouched") == 0


@deviation(QEMU_IOMMU, "VT-d 7.1.2 (a write to a read-only page records fault reason 5, appendix A)",
           "the write is blocked without a fault record when the translation is already in the IOTLB "
           "(the cached entry's permissions are checked by QEMU's memory core)", layer="QEMU 7.2 intel-iommu")
@per_agent
def test_write_to_cached_read_only_page_records_fault(vtd, agent):
    """The blocked write records reason 5, the agent's source-id, the page, access = write."""
    vtd = vtd.with_agent(agent)
    out = vtd.run(cached_ro_scenario(vtd))
    pending = out.faults(out.scen.checks["after-write"]).pending
    assert pending, "no fault recorded for the blocked write"
    assert_fault(pending[0], FR.WRITE, out.scen.agent.source_id, IOVA, "write")
