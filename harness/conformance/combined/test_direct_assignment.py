"""Direct assignment (issue 11, item 6): the payload VMM gives edu to an L2 guest.

EPT maps the guest's RAM window to host-physical pages, and edu's VT-d domain maps the same
guest-physical addresses to the same pages (harness.testing.combined).  Each test builds its
scenario with a ``build_*`` function and checks it with a ``check_*`` function, so that
test_sensitivity.py can run the same checks against deliberately broken scenarios.
"""

from __future__ import annotations

import pytest

from harness.testing import FILL, TWO_EDU, XFER, Exit, ExitCtl, FaultReason as FR, Pin, assert_single_fault, dmar
from harness.testing.combined import (GUEST_FILL, DirectOutcome, DirectRunner, DirectScenario, L2Guest, dma_asm,
                                      done_asm, raise_irq_asm, store_asm, vmm_page, wait_asm)

pytestmark = pytest.mark.combined("ept")

STORED = 0x0123_4567_89AB_CDEF      # what a guest stores with the CPU before a DMA reads it
SECRET = 0x5EC2_E75E_C2E7_5EC2      # what a VMM page holds that no guest may read
MSI_HANDLE = 5                      # interrupt-remapping table entry edu's MSI names
MSI_VECTOR = 0x6A                   # the IRTE's vector (the MSI's own data is 0: VT-d 5.1.5.2)
EXT_INTR_INFO_VALID = 1 << 31       # VM-exit interruption information (SDM Vol. 3C, 24.9.2)


# -- 1. the guest's DMA with guest-physical addresses lands in its own memory -----------------------

def build_gpa_write(s: DirectScenario, gpa_page: int = 1) -> L2Guest:
    """The guest DMA-writes its agent's buffer to guest-physical page ``gpa_page`` of its RAM and
    reads the first qword back through its own mapping."""
    g = s.guests[0]
    g.vmx.guest(dma_asm(g, True, g.gpa(gpa_page), XFER) + done_asm(read=g.gpa(gpa_page)))
    s.enter(g)
    s.vtd.compare("landed", g.hpa(1), XFER, g.pattern)
    s.vtd.compare("rest-of-page", g.hpa(1, XFER), 0x1000 - XFER, GUEST_FILL)
    s.vtd.compare("page-0", g.hpa(0), 0x1000, GUEST_FILL)
    s.vtd.check("faults", s.unit.faults())
    return g


def check_gpa_write(out: DirectOutcome, g: L2Guest) -> None:
    assert out.finished(g)["rsi"] == g.pattern, "the guest did not read its DMA's data at the GPA it gave"
    assert out.mismatches("landed") == 0, "the DMA's data is not in the host page behind the GPA"
    assert (out.mismatches("rest-of-page"), out.mismatches("page-0")) == (0, 0)
    assert out.faults(out.vtd.scen.checks["faults"]).pending == []


def test_guest_dma_write_lands_in_its_own_memory(direct: DirectRunner) -> None:
    """The guest programs edu with guest-physical page 1 of its RAM window: XFER bytes of the
    buffer arrive in the host-physical page behind it (through the domain), the guest reads them
    at that GPA (through its EPT), nothing else of its RAM changes and no fault is recorded."""
    s = direct.scenario("da-gpa-write")
    g = build_gpa_write(s)
    check_gpa_write(direct.run(s), g)


# -- 2. the device reads what the guest stored at a guest-physical address -------------------------

def build_gpa_read(s: DirectScenario, stored: int = STORED) -> L2Guest:
    """The guest stores ``stored`` in page 2 (CPU), DMA-reads page 2 into the buffer's second half,
    DMA-writes that half to page 3, and reads page 3 back."""
    g = s.guests[0]
    g.vmx.guest(store_asm(g.gpa(2), XFER, stored)
                + dma_asm(g, False, g.gpa(2), XFER, buffer_offset=0x800)
                + dma_asm(g, True, g.gpa(3), XFER, buffer_offset=0x800)
                + done_asm(read=g.gpa(3)))
    s.enter(g)
    s.vtd.compare("stored", g.hpa(2), XFER, STORED)
    s.vtd.compare("copied", g.hpa(3), XFER, STORED)
    s.vtd.check("faults", s.unit.faults())
    return g


def check_gpa_read(out: DirectOutcome, g: L2Guest) -> None:
    assert out.finished(g)["rsi"] == STORED
    assert out.mismatches("stored") == 0, "the guest's CPU stores did not reach the host page behind its GPA"
    assert out.mismatches("copied") == 0, "the device did not read the guest's data at its GPA"
    assert out.faults(out.vtd.scen.checks["faults"]).pending == []


def test_guest_dma_read_fetches_what_it_stored(direct: DirectRunner) -> None:
    """What the guest's CPU stored at a guest-physical address is what its device reads there:
    EPT and the domain agree on the host page (a round trip store -> DMA read -> DMA write)."""
    s = direct.scenario("da-gpa-read")
    g = build_gpa_read(s)
    check_gpa_read(direct.run(s), g)


# -- 3. a DMA outside the guest's domain faults and leaves the VMM's memory alone --------------------

def build_write_outside(s: DirectScenario) -> tuple[L2Guest, int]:
    """The guest DMA-writes to a VMM page's host-physical address (not in its domain)."""
    g = s.guests[0]
    target = vmm_page(2)
    g.vmx.guest(dma_asm(g, True, target, XFER) + done_asm())
    s.enter(g)
    s.vtd.compare("vmm-page", target, 0x1000, FILL)
    s.vtd.compare("guest-page-0", g.hpa(0), 0x1000, GUEST_FILL)
    s.vtd.check("faults", s.unit.faults())
    return g, target


def check_write_outside(out: DirectOutcome, g: L2Guest, target: int) -> None:
    out.finished(g)
    assert_single_fault(out.vtd, FR.WRITE, g.function.bdf, target, "write", step=out.vtd.scen.checks["faults"])
    assert out.mismatches("vmm-page") == 0, "the guest's DMA changed the VMM's page"
    assert out.mismatches("guest-page-0") == 0


def test_dma_write_outside_its_domain_faults_and_spares_the_vmm(direct: DirectRunner) -> None:
    """The guest aims its device at a host-physical address it should not know (a VMM page): the
    DMA write faults with reason 5 (VT-d 3.6 / appendix A), the source-id of the edu function the
    probe found, and that address; the VMM's page keeps its contents."""
    s = direct.scenario("da-write-outside")
    g, target = build_write_outside(s)
    check_write_outside(direct.run(s), g, target)


def build_read_outside(s: DirectScenario) -> tuple[L2Guest, int]:
    """The guest DMA-reads a VMM page holding SECRET, then DMA-writes what its buffer got to its
    own page 4."""
    g = s.guests[0]
    source = vmm_page(3)
    s.steps.mem_fill(source, 0x1000, SECRET)
    g.vmx.guest(dma_asm(g, False, source, XFER, buffer_offset=0x800)
                + dma_asm(g, True, g.gpa(4), XFER, buffer_offset=0x800) + done_asm(read=g.gpa(4)))
    s.enter(g)
    s.vtd.compare("leaked", g.hpa(4), XFER, SECRET)
    s.vtd.check("faults", s.unit.faults())
    return g, source


def check_read_outside(out: DirectOutcome, g: L2Guest, source: int) -> None:
    regs = out.finished(g)
    assert_single_fault(out.vtd, FR.READ, g.function.bdf, source, "read", step=out.vtd.scen.checks["faults"])
    assert out.mismatches("leaked") == XFER // 8, "a qword of the VMM's secret reached the guest's memory"
    assert regs["rsi"] != SECRET


def test_dma_read_outside_its_domain_faults_and_leaks_nothing(direct: DirectRunner) -> None:
    """The guest's device reads a VMM page: reason 6 with edu's source-id and the page's address,
    and not one qword of the page's contents reaches the guest."""
    s = direct.scenario("da-read-outside")
    g, source = build_read_outside(s)
    check_read_outside(direct.run(s), g, source)


# -- 4. EPT: the guest's CPU cannot reach host-physical guest RAM or the VMM's pages ----------------

def build_cpu_outside(s: DirectScenario) -> tuple[L2Guest, int]:
    g = s.guests[0]
    target = vmm_page(0)
    g.vmx.guest(f"    mov rax, {target:#x}\n    mov rsi, [rax]\n" + done_asm())
    s.enter(g)
    return g, target


def check_cpu_outside(out: DirectOutcome, g: L2Guest, target: int) -> None:
    res = out.guest(g)
    e = res.exit
    assert e.reason == Exit.EPT_VIOLATION, f"expected an EPT violation, got {e}"
    # Qualification (SDM Vol. 3C, 28.2.1, table 28-7): bit 0 data read, bits 5:3 the entry's
    # permissions (none: not present), bit 7 the linear address is valid.
    assert (e.qualification & 0x3F, e.qualification >> 7 & 1) == (0b000001, 1), f"qualification {e.qualification:#x}"
    assert e.physical_address == target
    assert len(res.exits) == 1


def test_guest_cpu_cannot_reach_vmm_memory(direct: DirectRunner) -> None:
    """The guest's EPT withholds the VMM's pages: a load from one is an EPT violation (data read,
    not present) reporting exactly that guest-physical address."""
    s = direct.scenario("da-cpu-outside")
    g, target = build_cpu_outside(s)
    check_cpu_outside(direct.run(s), g, target)


# -- 5. two guests, each with its own edu ------------------------------------------------------------

def build_two_same_gpa(s: DirectScenario) -> tuple[L2Guest, L2Guest]:
    """Both guests DMA their own buffer to the same guest-physical page 1."""
    a, b = s.guests
    for g in (a, b):
        g.vmx.guest(dma_asm(g, True, g.gpa(1), XFER) + done_asm(read=g.gpa(1)))
        s.enter(g)
    s.vtd.compare("a-has-a", a.hpa(1), XFER, a.pattern)
    s.vtd.compare("b-has-b", b.hpa(1), XFER, b.pattern)
    s.vtd.check("faults", s.unit.faults())
    return a, b


def check_two_same_gpa(out: DirectOutcome, a: L2Guest, b: L2Guest) -> None:
    assert a.source_id != b.source_id and a.pattern != b.pattern
    assert (out.finished(a)["rsi"], out.finished(b)["rsi"]) == (a.pattern, b.pattern)
    assert (out.mismatches("a-has-a"), out.mismatches("b-has-b")) == (0, 0)
    assert out.faults(out.vtd.scen.checks["faults"]).pending == []


def test_two_guests_same_gpa_land_in_their_own_memory(direct: DirectRunner) -> None:
    """Two guests, two edus, one guest-physical address: each DMA lands in its own guest's host
    pages (each domain maps the window to its guest's RAM) and each guest reads its own data."""
    two = direct.variant(**TWO_EDU)
    s = two.scenario("da-two-same-gpa", guests=2)
    a, b = build_two_same_gpa(s)
    check_two_same_gpa(two.run(s), a, b)


def build_two_attack(s: DirectScenario) -> tuple[L2Guest, L2Guest]:
    """Guest b fills its page 1 by DMA; then guest a aims its own edu at that page's
    host-physical address."""
    a, b = s.guests
    b.vmx.guest(dma_asm(b, True, b.gpa(1), XFER) + done_asm())
    s.enter(b)
    a.vmx.guest(dma_asm(a, True, b.hpa(1), XFER) + done_asm())
    s.enter(a)
    s.vtd.compare("b-intact", b.hpa(1), XFER, b.pattern)
    s.vtd.check("faults", s.unit.faults())
    return a, b


def check_two_attack(out: DirectOutcome, a: L2Guest, b: L2Guest) -> None:
    out.finished(a)
    out.finished(b)
    assert_single_fault(out.vtd, FR.WRITE, a.function.bdf, b.hpa(1), "write", step=out.vtd.scen.checks["faults"])
    assert out.mismatches("b-intact") == 0, "guest a's device overwrote guest b's memory"


def test_guest_cannot_dma_into_the_other_guests_memory(direct: DirectRunner) -> None:
    """Guest a's edu writing to guest b's host-physical page faults (reason 5) with a's source-id
    and that address; b's data stays."""
    two = direct.variant(**TWO_EDU)
    s = two.scenario("da-two-attack", guests=2)
    a, b = build_two_attack(s)
    check_two_attack(two.run(s), a, b)


# -- 6. edu's MSI, remapped, exits to the VMM with the IRTE's vector --------------------------------

def build_msi_exit(s: DirectScenario, apic_id: int, exiting: bool = True) -> L2Guest:
    """IRTE MSI_HANDLE -> MSI_VECTOR at this CPU; edu's MSI in remappable format naming it;
    the guest has edu raise its interrupt, then waits; pin-based external-interrupt exiting and
    acknowledge-interrupt-on-exit (SDM Vol. 3C, 24.6.1, 24.7.1).  Afterwards the VMM clears edu's
    status and EOIs the vector it acknowledged."""
    g = s.guests[0]
    s.remap_interrupts({MSI_HANDLE: dmar.irte(MSI_VECTOR, apic_id)})
    g.agent.setup(msi=dmar.remappable_msi(MSI_HANDLE))
    if exiting:
        g.vmx.pin |= Pin.EXTERNAL_INTERRUPT
        g.vmx.exit_ctls |= ExitCtl.ACK_INTERRUPT
    g.vmx.guest(raise_irq_asm(g) + wait_asm() + done_asm())
    s.enter(g)
    g.agent.ack_interrupt(0x1)
    s.steps.call("apic_eoi", quiet=True)
    s.vtd.check("faults", s.unit.faults())
    return g


def check_msi_exit(out: DirectOutcome, g: L2Guest, vector: int = MSI_VECTOR) -> None:
    res = out.guest(g)
    e = res.exit
    assert e.reason == Exit.EXTERNAL_INTERRUPT, f"expected an external-interrupt exit, got {e}"
    # SDM 27.2.2: acknowledged on exit -> valid, type 0 (external interrupt), the vector.
    assert e.intr_info == EXT_INTR_INFO_VALID | vector, f"interruption information {e.intr_info:#x}"
    assert e.interruption == (0, vector, -1)
    assert len(res.exits) == 1
    scen = out.vtd.scen
    assert out.value(scen.checks["iec"]) == scen.checks["iec-data"]
    assert out.faults(scen.checks["faults"]).pending == []


@pytest.mark.combined("ept", "vtd.intremap", "vtd.qi")
def test_remapped_msi_exits_to_the_vmm_with_the_irte_vector(direct: DirectRunner) -> None:
    """The guest makes its edu signal: the remappable MSI (handle 5, data 0) is translated by the
    IRTE into vector 0x6a, which reaches the CPU in VMX non-root operation as an external-interrupt
    exit whose interruption information holds 0x6a (valid, type 0) — with RFLAGS.IF=0 in the
    guest, which does not block it (SDM Vol. 3C, 25.4.1: external-interrupt exiting)."""
    s = direct.scenario("da-msi-exit")
    g = build_msi_exit(s, direct.apic_id)
    check_msi_exit(direct.run(s), g)
