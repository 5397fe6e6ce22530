"""MSI-X through interrupt remapping (VT-d 5.1) with an NVMe controller: its MSI-X table lives in
its BAR (PCI Local Bus 3.0, 6.8.2), entry 0 carries a remappable-format message (5.1.5.2), and the
IRTE decides vector, destination and which requester may use it (source-id from the probe)."""

from __future__ import annotations

import pytest

from harness.payload.nvme import Nvme, status_of
from harness.payload.steps import FIRST_FREE_VAR
from harness.testing import QEMU_IOMMU, FaultReason as FR, VtdRunner, VtdScenario, deviation, dmar, page

from .agents import NVME_INTREMAP, agent_scenario

pytestmark = pytest.mark.requires("vtd")

ENTRIES = 16
HANDLE = 3
VECTOR = 0x74
ENTRY_VAR = FIRST_FREE_VAR + 1        # the MSI-X table entry's address (the agent's BAR is FIRST_FREE_VAR)
QUIET_HALTS = 2                       # a wait that must see nothing: bounded, short
WATCHDOG = 50_000_000


def msix_scenario(runner: VtdRunner, name: str, irte: tuple[int, int], masked: bool = False) -> VtdScenario:
    """Interrupt remapping on first (IRTE ``irte`` at HANDLE, QI for the IEC invalidation), DMA
    untranslated; then the NVMe agent set up with its MSI-X entry 0 pointed at HANDLE (its set-up
    commands' interrupts are drained); entry 0 masked if asked; one admin command (Get Log Page)
    completes; the test then waits for the interrupt."""
    scen = agent_scenario(runner, name, [Nvme])
    table = scen.arena.alloc(16 * ENTRIES, 4096)
    scen.arena.write(table + 16 * HANDLE, dmar.desc_bytes(irte))
    q = dmar.InvQueue(scen.arena, scen.unit)
    q.setup()
    scen.unit.setup_intremap(table, ENTRIES)
    q.submit(dmar.iec_inv_desc(), wait_status=scen.arena.alloc(8, 8))
    nvme = scen.agent
    assert isinstance(nvme, Nvme)
    nvme.msix_var = ENTRY_VAR
    fn = scen.functions[0]
    scen.identity_checks.append((nvme.setup(msi=dmar.remappable_msi(HANDLE)), fn.vendor | fn.device << 16, fn))
    scen.check("entry", nvme.msix_step)
    scen.check("setup-irqs", scen.steps.wait_irq_halted(irte_vector(irte), QUIET_HALTS, WATCHDOG))
    if masked:
        nvme.msix_mask(True)
    nvme.start_write(page(1), 256)
    scen.check("done", nvme.wait())
    return scen


def irte_vector(irte: tuple[int, int]) -> int:
    return irte[0] >> 16 & 0xFF


def test_msix_remapped_to_irte_vector(vtd):
    """The completion's MSI-X message (handle 3) arrives as the IRTE's vector 0x74 at this CPU; the
    table entry is in the BAR (above the doorbells); no interrupt-remapping fault."""
    ir = vtd.variant(**NVME_INTREMAP)
    scen = msix_scenario(ir, "msix-ir", dmar.irte(VECTOR, ir.apic_id))
    scen.check("irq", scen.steps.wait_irq_halted(VECTOR, 4, WATCHDOG))
    scen.check("faults", scen.unit.faults())
    out = ir.run(scen)
    assert status_of(out.value(scen.checks["done"])) == 0
    assert out.value(scen.checks["entry"]) != 0
    assert out.value(scen.checks["irq"]) >= 1
    assert out.faults(scen.checks["faults"]).pending == []


def test_msix_per_vector_mask_holds_then_delivers(vtd):
    """Entry 0 masked: the completion is posted but no interrupt arrives; clearing the mask
    delivers the pending message (PCI Local Bus 3.0, 6.8.2.9), remapped to 0x74."""
    ir = vtd.variant(**NVME_INTREMAP)
    scen = msix_scenario(ir, "msix-mask", dmar.irte(VECTOR, ir.apic_id), masked=True)
    scen.check("while-masked", scen.steps.wait_irq_halted(VECTOR, QUIET_HALTS, WATCHDOG))
    scen.agent.msix_mask(False)                              # type: ignore[attr-defined]
    scen.check("after-unmask", scen.steps.wait_irq_halted(VECTOR, 4, WATCHDOG))
    out = ir.run(scen)
    assert status_of(out.value(scen.checks["done"])) == 0
    assert out.value(scen.checks["while-masked"]) == 0
    assert out.value(scen.checks["after-unmask"]) >= 1


def sid_scenario(vtd: VtdRunner, right_sid: bool) -> tuple[VtdRunner, VtdScenario, int]:
    """IRTE with SVT=1, SQ=0 (5.1.4, 9.10) naming the NVMe function's probed source-id, or the
    next device number's; the wait after the completion is short when nothing should arrive."""
    ir = vtd.variant(**NVME_INTREMAP)
    probe_sid = next(fn.bdf for fn in ir.probe.pci if Nvme.matches(fn.vendor, fn.device, fn.class_code))
    sid = probe_sid if right_sid else probe_sid ^ 0x8
    scen = msix_scenario(ir, f"msix-sid-{right_sid}", dmar.irte(VECTOR, ir.apic_id, sid=sid, svt=1))
    scen.check("irq", scen.steps.wait_irq_halted(VECTOR, 4 if right_sid else QUIET_HALTS, WATCHDOG))
    scen.check("faults", scen.unit.faults())
    assert scen.agent.source_id == probe_sid
    return ir, scen, probe_sid


def test_msix_source_id_verified(vtd):
    """The IRTE names the NVMe function's probed source-id: the message is delivered, no fault."""
    ir, scen, _ = sid_scenario(vtd, right_sid=True)
    out = ir.run(scen)
    assert out.value(scen.checks["irq"]) >= 1
    assert out.faults(scen.checks["faults"]).pending == []


def test_msix_other_source_id_blocked(vtd):
    """The IRTE names another requester: the NVMe function's message is not delivered (5.1.4.1)."""
    ir, scen, _ = sid_scenario(vtd, right_sid=False)
    out = ir.run(scen)
    assert status_of(out.value(scen.checks["done"])) == 0        # the command did complete
    assert out.value(scen.checks["irq"]) == 0


@deviation(QEMU_IOMMU, "VT-d 5.1.4.1 (a requester failing the IRTE's source-id check records fault reason 26h, appendix A)",
           "the interrupt is dropped, FSTS 0 and FRCD0 empty (intel_iommu.c vtd_mem_ir_write: 'TODO: report error')",
           layer="QEMU 7.2 intel-iommu")
def test_msix_other_source_id_records_fault(vtd):
    """The blocked message records reason 26h naming the NVMe function's probed source-id."""
    ir, scen, probe_sid = sid_scenario(vtd, right_sid=False)
    out = ir.run(scen)
    fs = out.faults(scen.checks["faults"])
    assert [(r.reason, r.source_id) for r in fs.pending][:1] == [(FR.IR_SID_MISMATCH, probe_sid)]
