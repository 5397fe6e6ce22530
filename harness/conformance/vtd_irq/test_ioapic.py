"""A remapped IOAPIC interrupt (VT-d 5.1.5.1): the IOAPIC's redirection entry in remappable format
points at an IRTE whose source-id check names the IOAPIC's own requester-id, taken from the DMAR
table's IOAPIC device scope (VT-d 8.3.1.1), never from a constant.  The interrupt is the 8254
PIT's channel 0 (ISA IRQ 0), on the GSI the MADT's interrupt source override gives (ACPI 6.5,
5.2.12.5).

QEMU 7.2 does not check an IOAPIC's source-id against the IRTE (its IOAPIC's messages carry no
requester-id the check uses): the wrong-source-id case is recorded as an observation and, on QEMU,
is a strict xfail; on other targets it must block."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import pytest

from harness.observe.dmar import AcpiDump, Dmar, Madt
from harness.payload.acpi import dump_scenario
from harness.testing import INTREMAP, QEMU_IOMMU, VtdRunner, VtdScenario, deviation, dmar

# Never batched: each test starts from the IOAPIC and PIT as the firmware left them.  A batch resets
# the remapping unit between slices, not the IOAPIC's RTEs and pending edges or the PIT; on the
# KVM-runner stand-in (KVM's split irqchip) a slice once received the previous slice's IRTE vector
# 0x76 before its own interrupt, without a halt.
pytestmark = [pytest.mark.requires("vtd"), pytest.mark.solo]

ENTRIES = 16
HANDLE = 9
VECTOR = 0x76
WATCHDOG = 50_000_000
IOREGSEL, IOWIN = 0x00, 0x10                  # IOAPIC indirect access (82093AA datasheet, 3.1)
PIT_CONTROL, PIT_CHANNEL0 = 0x43, 0x40        # 8254: control word, channel 0 count
PIT_MODE0_LOHI = 0x30                         # channel 0, lobyte/hibyte, mode 0 (interrupt on terminal count)
PIT_COUNT = 2000                              # ~1.7 ms at 1.193182 MHz


@dataclass(frozen=True)
class IoApic:
    address: int
    gsi_base: int
    source_id: int          # from the DMAR IOAPIC scope
    pit_gsi: int            # ISA IRQ 0's GSI


def platform_ioapic(runner: VtdRunner) -> IoApic:
    """Boot the ACPI dump once: the IOAPIC that serves ISA IRQ 0 (MADT), and its requester-id from
    the DMAR scope whose enumeration id is that IOAPIC's ID."""
    run = runner.target.run(dump_scenario(name="ioapic-scope")).expect_ok()
    dump = AcpiDump.from_records(run.records)
    dmars, madts = dump.of("DMAR"), dump.of("APIC")
    assert dmars and madts, f"the firmware's tables lack a DMAR or MADT: {[t.signature for t in dump.tables]}"
    madt_bytes = madts[0].data
    gsi = 0
    off = 44
    while off + 2 <= len(madt_bytes) and madt_bytes[off + 1] >= 2:
        etype, elen = madt_bytes[off], madt_bytes[off + 1]
        if etype == 2 and elen >= 10 and madt_bytes[off + 2] == 0 and madt_bytes[off + 3] == 0:
            gsi = struct.unpack_from("<I", madt_bytes, off + 4)[0]       # bus ISA, source IRQ 0
        off += elen
    ioapic = next(a for a in Madt.parse(madt_bytes).ioapics if a.gsi_base <= gsi < a.gsi_base + 24)
    scopes = [s for st in Dmar.parse(dmars[0].data).of("DRHD") for s in st.scopes
              if s.type == 3 and s.enumeration_id == ioapic.ioapic_id]
    assert len(scopes) == 1 and scopes[0].requester_id is not None, \
        f"IOAPIC {ioapic.ioapic_id}: DMAR IOAPIC scopes {[str(s) for s in scopes]}"
    return IoApic(ioapic.address, ioapic.gsi_base, scopes[0].requester_id, gsi)


def remappable_rte(handle: int, vector: int) -> int:
    """An IOAPIC redirection entry in remappable format (5.1.5.1): 63:49 handle[14:0], 48 format 1,
    11 handle[15], 7:0 the IRTE's vector; edge, active high, unmasked."""
    return (handle & 0x7FFF) << 49 | 1 << 48 | (handle >> 15 & 1) << 11 | vector


def ioapic_scenario(ir: VtdRunner, io: IoApic, sid: int, name: str, irte_vector: int = VECTOR) -> VtdScenario:
    """IR on with an IRTE (``irte_vector``, this CPU, SVT=1 SQ=0 naming ``sid``) at HANDLE; the
    PIT's GSI routed through a remappable RTE (vector field 0x76); the PIT fires once; then the
    IRTE's vector is awaited ("irq") and, when it differs, the RTE's ("rte-vector", briefly)."""
    scen = ir.scenario(name, agents=0)
    table = scen.arena.alloc(16 * ENTRIES, 4096)
    scen.arena.write(table + 16 * HANDLE, dmar.desc_bytes(dmar.irte(irte_vector, ir.apic_id, sid=sid, svt=1)))
    q = dmar.InvQueue(scen.arena, scen.unit)
    q.setup()
    scen.unit.setup_intremap(table, ENTRIES)
    q.submit(dmar.iec_inv_desc(), wait_status=scen.arena.alloc(8, 8))
    s, pin = scen.steps, io.pit_gsi - io.gsi_base
    rte = remappable_rte(HANDLE, VECTOR)
    for index, value in ((0x11 + 2 * pin, rte >> 32), (0x10 + 2 * pin, rte & 0xFFFF_FFFF)):
        s.mmio_write(io.address + IOREGSEL, index, size=4, quiet=True)
        s.mmio_write(io.address + IOWIN, value, size=4, quiet=True)
    s.mmio_write(io.address + IOREGSEL, 0x10 + 2 * pin, size=4, quiet=True)
    scen.check("rte", s.mmio_read(io.address + IOWIN, size=4))
    s.io_write(PIT_CONTROL, PIT_MODE0_LOHI)
    s.io_write(PIT_CHANNEL0, PIT_COUNT & 0xFF)
    s.io_write(PIT_CHANNEL0, PIT_COUNT >> 8)
    scen.check("irq", s.wait_irq_halted(irte_vector, 8, WATCHDOG))
    if irte_vector != VECTOR:
        scen.check("rte-vector", s.wait_irq_halted(VECTOR, 1, WATCHDOG))
    s.mmio_write(io.address + IOREGSEL, 0x10 + 2 * pin, size=4, quiet=True)
    s.mmio_write(io.address + IOWIN, 1 << 16, size=4, quiet=True)      # masked again
    scen.check("faults", scen.unit.faults())
    return scen


def test_ioapic_interrupt_remapped_with_dmar_source_id(vtd):
    """The PIT's interrupt through the IOAPIC arrives as the IRTE's vector 0x76, with the IRTE's
    source-id check naming the IOAPIC's requester-id from the DMAR scope; no fault."""
    ir = vtd.variant(**INTREMAP)
    io = platform_ioapic(ir)
    scen = ioapic_scenario(ir, io, io.source_id, "ioapic-ir")
    out = ir.run(scen)
    out.note(ioapic_address=io.address, ioapic_source_id=io.source_id, pit_gsi=io.pit_gsi)
    assert out.value(scen.checks["rte"]) == remappable_rte(HANDLE, VECTOR) & 0xFFFF_FFFF
    assert out.value(scen.checks["irq"]) >= 1
    assert out.faults(scen.checks["faults"]).pending == []


def test_ioapic_vector_comes_from_the_irte(vtd):
    """RTE vector field 0x76, IRTE vector 0x77 (edge, so the fields may differ): the interrupt
    arrives as 0x77 and never as 0x76: the IOAPIC's message was remapped through the IRTE."""
    ir = vtd.variant(**INTREMAP)
    io = platform_ioapic(ir)
    scen = ioapic_scenario(ir, io, io.source_id, "ioapic-ir-vector", irte_vector=VECTOR + 1)
    out = ir.run(scen)
    assert (out.value(scen.checks["irq"]) >= 1, out.value(scen.checks["rte-vector"])) == (True, 0)


@deviation(QEMU_IOMMU, "VT-d 5.1.4.1 (an IRTE's source-id check applies to IOAPIC interrupts too: blocked, reason 26h)",
           "the interrupt arrives (QEMU's IOAPIC messages bypass the SVT check)", layer="QEMU 7.2 intel-iommu")
def test_ioapic_interrupt_from_other_source_id_blocked(vtd):
    """The IRTE names a requester other than the IOAPIC: its interrupt must not arrive (5.1.4.1)."""
    ir = vtd.variant(**INTREMAP)
    io = platform_ioapic(ir)
    scen = ioapic_scenario(ir, io, io.source_id ^ 0x8, "ioapic-ir-other-sid")
    out = ir.run(scen)
    delivered = out.value(scen.checks["irq"])
    out.note(observation="IOAPIC interrupt with an IRTE naming another source-id",
             irte_sid=io.source_id ^ 0x8, ioapic_source_id=io.source_id, delivered=delivered)
    assert delivered == 0
