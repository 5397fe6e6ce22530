"""Interrupt remapping (VT-d 5.1): the agent's MSI through the interrupt-remapping table."""

from __future__ import annotations

import pytest

from harness.testing import INTREMAP, QEMU_IOMMU, FaultReason as FR, VtdRunner, VtdScenario, deviation, dmar

pytestmark = pytest.mark.requires("vtd")

ENTRIES = 16


def ir_scenario(vtd: VtdRunner, name: str, entries: dict[int, tuple[int, int]], msi: tuple[int, int],
                vector: int, cfi: bool = False) -> VtdScenario:
    """IR table with ``entries``, QI (for the interrupt-entry-cache invalidation), IRE (+CFI);
    the agent's MSI programmed with ``msi``; it raises its interrupt once; wait on ``vector``."""
    scen = vtd.scenario(name)
    table = scen.arena.alloc(16 * ENTRIES, 4096)
    for i, e in entries.items():
        scen.arena.write(table + 16 * i, dmar.desc_bytes(e))
    q = dmar.InvQueue(scen.arena, scen.unit)
    q.setup()
    scen.unit.setup_intremap(table, ENTRIES, cfi=cfi)
    status = scen.arena.alloc(8, 8)
    scen.check("iec", q.submit(dmar.iec_inv_desc(), wait_status=status))
    scen.checks["iec-data"] = q.status_data[scen.checks["iec"]]
    scen.check("gsts", scen.unit.read32(dmar.REG_GSTS))
    scen.agent.setup(msi=msi)
    scen.agent.raise_interrupt(0x1)
    scen.check("irq", scen.steps.wait_irq_halted(vector, 2, 50_000_000))
    scen.agent.ack_interrupt(0x1)
    scen.check("faults", scen.unit.faults())
    return scen


def test_capability_reported(vtd):
    """intremap=on: ECAP.IR (bit 3) is set (11.4.3)."""
    ir = vtd.variant(**INTREMAP)
    scen = ir.scenario("ir-cap")
    ecap = scen.unit.read64(dmar.REG_ECAP)
    out = ir.run(scen)
    assert out.value(ecap) >> 3 & 1 == 1


def test_remapped_msi_arrives_with_irte_vector(vtd):
    """Remappable MSI (handle 5) through a present IRTE: the CPU sees the IRTE's vector 0x72,
    not the MSI data; GSTS shows IRES and IRTPS; the IEC invalidation's wait wrote its data."""
    ir = vtd.variant(**INTREMAP)
    scen = ir_scenario(ir, "ir-ok", {5: dmar.irte(0x72, ir.apic_id)}, dmar.remappable_msi(5), 0x72)
    out = ir.run(scen)
    gsts = out.value(scen.checks["gsts"])
    assert gsts & (dmar.Gcmd.IRE | dmar.Gcmd.SIRTP) == dmar.Gcmd.IRE | dmar.Gcmd.SIRTP
    assert out.value(scen.checks["iec"]) == scen.checks["iec-data"]
    assert out.value(scen.checks["irq"]) == 1
    assert out.faults(scen.checks["faults"]).pending == []


def test_subhandle_selects_entry(vtd):
    """SHV=1: the entry is handle + subhandle (MSI data) (5.1.5.2): handle 4 + 3 -> entry 7."""
    ir = vtd.variant(**INTREMAP)
    scen = ir_scenario(ir, "ir-shv", {4: dmar.irte(0x74, ir.apic_id), 7: dmar.irte(0x77, ir.apic_id)},
                       dmar.remappable_msi(4, 3), 0x77)
    out = ir.run(scen)
    assert out.value(scen.checks["irq"]) == 1


def test_not_present_irte_blocks_interrupt(vtd):
    """An MSI whose IRTE is not present is not delivered."""
    ir = vtd.variant(**INTREMAP)
    out = ir.run(ir_scenario(ir, "ir-np", {}, dmar.remappable_msi(6), 0x76))
    assert out.value(out.scen.checks["irq"]) == 0


@deviation(QEMU_IOMMU, "VT-d 5.1.4.1 (an interrupt through a not-present IRTE records fault reason 22h, appendix A)",
           "the interrupt is dropped and no fault is recorded (intel_iommu.c: 'TODO: report error')",
           layer="QEMU 7.2 intel-iommu")
def test_not_present_irte_records_fault(vtd):
    """Reason 0x22 with the requester's source-id and the interrupt index in FI[63:48], FI[47:12]
    clear (11.4.14)."""
    ir = vtd.variant(**INTREMAP)
    out = ir.run(ir_scenario(ir, "ir-np-fault", {}, dmar.remappable_msi(6), 0x76))
    fs = out.faults(out.scen.checks["faults"])
    assert fs.pending, "no interrupt-remapping fault recorded"
    rec = fs.pending[0]
    assert (rec.reason, rec.source_id, rec.fault_info) == (FR.IR_NOT_PRESENT, out.scen.agent.source_id, 6 << 48)


def test_index_beyond_table_blocks_interrupt(vtd):
    """Handle 40 with a 16-entry table: not delivered (reason 21h territory, 5.1.4.1)."""
    ir = vtd.variant(**INTREMAP)
    out = ir.run(ir_scenario(ir, "ir-over", {}, dmar.remappable_msi(40), 0x70))
    assert out.value(out.scen.checks["irq"]) == 0


@deviation(QEMU_IOMMU, "VT-d 11.4.5 (GCMD.CFI=1 sets GSTS.CFIS)",
           "GSTS.CFIS never reads 1: the bounded wait for the status times out", layer="QEMU 7.2 intel-iommu")
def test_compat_msi_passes_with_cfi(vtd):
    """GCMD.CFI=1: a compatibility-format MSI bypasses remapping with its own vector (5.1.4)."""
    ir = vtd.variant(**INTREMAP)
    scen = ir_scenario(ir, "ir-cfi", {}, dmar.compat_msi(0x65, ir.apic_id), 0x65, cfi=True)
    out = ir.run(scen)
    assert out.value(scen.checks["gsts"]) & dmar.Gcmd.CFI
    assert out.value(scen.checks["irq"]) == 1


@deviation(QEMU_IOMMU, "VT-d 5.1.4 (with GSTS.CFIS clear a compatibility-format interrupt is blocked, fault reason 25h)",
           "the interrupt passes through with its own vector, whatever GCMD.CFI says", layer="QEMU 7.2 intel-iommu")
def test_compat_msi_blocked_without_cfi(vtd):
    """GCMD.CFI=0: a compatibility-format MSI is blocked and records reason 0x25."""
    ir = vtd.variant(**INTREMAP)
    out = ir.run(ir_scenario(ir, "ir-nocfi", {}, dmar.compat_msi(0x66, ir.apic_id), 0x66, cfi=False))
    assert out.value(out.scen.checks["irq"]) == 0
    rec = out.faults(out.scen.checks["faults"]).pending[0]
    assert (rec.reason, rec.source_id) == (FR.IR_COMPAT_BLOCKED, out.scen.agent.source_id)
