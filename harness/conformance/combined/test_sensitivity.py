"""A test of the combined tests: each check of test_direct_assignment.py, run against a deliberately
broken scenario (a wrong EPT, a wrong domain, a missing control), must fail — and fail for the
reason the broken half gives, which the test shows with the same run's other observations."""

from __future__ import annotations

import pytest

from harness.testing import FILL, TWO_EDU, ept
from harness.testing.combined import (GUEST_DONE, GUEST_PAGES, INFO_PAGE, GUEST_RAM_HPA, GUEST_RAM_STRIDE, VMM_PAGES, DirectRunner,
                                      DirectScenario, L2Guest, vmm_page)

from .test_direct_assignment import (
    MSI_VECTOR, SECRET, STORED, build_cpu_outside, build_gpa_read, build_gpa_write, build_msi_exit,
    build_read_outside, build_two_attack, build_two_same_gpa, build_write_outside, check_cpu_outside,
    check_gpa_read, check_gpa_write, check_msi_exit, check_read_outside, check_two_attack, check_two_same_gpa,
    check_write_outside,
)

pytestmark = pytest.mark.combined("ept")


class EptOffByOnePage(DirectScenario):
    """Broken: the guest's EPT maps its data pages one host page too high (the information page
    stays right, so the guest still finds its device)."""

    def map_ept(self, g: L2Guest) -> None:
        super().map_ept(g)
        for page in range(INFO_PAGE - 1):
            g.vmx.ept_map(g.gpa(page), ept.RWX, raw=ept.leaf(g.hpa(page + 1), ept.RWX))


class DomainOffByOnePage(DirectScenario):
    """Broken: the agent's domain maps the window one host page too high."""

    def map_domain(self, g: L2Guest) -> None:
        for page in range(GUEST_PAGES - 1):
            g.domain.map(g.gpa(page), g.hpa(page + 1))


class DomainAlsoMapsVmmPages(DirectScenario):
    """Broken: the domain also identity-maps the VMM's pages."""

    def map_domain(self, g: L2Guest) -> None:
        super().map_domain(g)
        for n in range(VMM_PAGES):
            g.domain.map(vmm_page(n), vmm_page(n))


class EptKeepsVmmPages(DirectScenario):
    """Broken: the EPT withholds nothing (identity outside the window)."""

    def map_ept(self, g: L2Guest) -> None:
        g.vmx.use_ept()
        for page in range(GUEST_PAGES):
            g.vmx.ept_map(g.gpa(page), ept.RWX, raw=ept.leaf(g.hpa(page), ept.RWX))


class SharedGuestRam(DirectScenario):
    """Broken: every guest's domain maps the window to guest 0's RAM."""

    def map_domain(self, g: L2Guest) -> None:
        for page in range(GUEST_PAGES):
            g.domain.map(g.gpa(page), GUEST_RAM_HPA + page * 0x1000)


class DomainMapsEveryGuestsRam(DirectScenario):
    """Broken: a domain also identity-maps the host pages of every guest's RAM."""

    def map_domain(self, g: L2Guest) -> None:
        super().map_domain(g)
        for other in range(len(self.vtd.agents)):
            for page in range(GUEST_PAGES):
                hpa = GUEST_RAM_HPA + other * GUEST_RAM_STRIDE + page * 0x1000
                g.domain.map(hpa, hpa)


def test_wrong_ept_window_is_caught(direct: DirectRunner) -> None:
    """EPT one page off: the DMA still lands where the domain says, but the guest reads another
    page at the same GPA — the check fails on what the guest read."""
    s = direct.scenario("broken-ept", kind=EptOffByOnePage)
    g = build_gpa_write(s)
    out = direct.run(s)
    with pytest.raises(AssertionError, match="did not read"):
        check_gpa_write(out, g)
    assert out.mismatches("landed") == 0 and out.finished(g)["rsi"] != g.pattern


def test_wrong_domain_window_is_caught(direct: DirectRunner) -> None:
    """Domain one page off: the device reads and writes other pages than the guest's CPU sees."""
    s = direct.scenario("broken-domain", kind=DomainOffByOnePage)
    g = build_gpa_read(s)
    out = direct.run(s)
    with pytest.raises(AssertionError):
        check_gpa_read(out, g)
    assert out.mismatches("stored") == 0 and out.mismatches("copied") != 0
    assert out.finished(g)["rsi"] != STORED


def test_domain_leaking_vmm_pages_is_caught(direct: DirectRunner) -> None:
    """A domain that maps a VMM page: the write lands there and nothing faults — the outside-write
    check fails; so does the outside-read check on a second guest run (the secret leaks)."""
    s = direct.scenario("broken-vmm-write", kind=DomainAlsoMapsVmmPages)
    g, target = build_write_outside(s)
    out = direct.run(s)
    with pytest.raises(AssertionError):
        check_write_outside(out, g, target)
    assert out.faults(s.vtd.checks["faults"]).pending == [] and out.mismatches("vmm-page") != 0

    s = direct.scenario("broken-vmm-read", kind=DomainAlsoMapsVmmPages)
    g, source = build_read_outside(s)
    out = direct.run(s)
    with pytest.raises(AssertionError):
        check_read_outside(out, g, source)
    assert out.mismatches("leaked") == 0 and out.finished(g)["rsi"] == SECRET


def test_ept_exposing_vmm_pages_is_caught(direct: DirectRunner) -> None:
    """An EPT that withholds nothing: the guest's load of a VMM page succeeds (it reads FILL and
    VMCALLs) — the EPT-violation check fails."""
    s = direct.scenario("broken-ept-vmm", kind=EptKeepsVmmPages)
    g, target = build_cpu_outside(s)
    out = direct.run(s)
    with pytest.raises(AssertionError, match="expected an EPT violation"):
        check_cpu_outside(out, g, target)
    assert out.finished(g) is not None and out.guest(g).exit.regs["rsi"] == FILL


def test_shared_guest_memory_is_caught(direct: DirectRunner) -> None:
    """Two guests whose domains share guest 0's RAM: guest 1's DMA lands in guest 0's page."""
    two = direct.variant(**TWO_EDU)
    s = two.scenario("broken-shared", guests=2, kind=SharedGuestRam)
    a, b = build_two_same_gpa(s)
    out = two.run(s)
    with pytest.raises(AssertionError):
        check_two_same_gpa(out, a, b)
    assert out.mismatches("a-has-a") != 0          # b's pattern overwrote a's page


def test_missing_external_interrupt_exiting_is_caught(direct: DirectRunner) -> None:
    """Without pin-based external-interrupt exiting the MSI does not exit (the guest, IF=0, waits
    it out and VMCALLs); a wrong expected vector fails on a good run too."""
    s = direct.scenario("broken-msi", kind=DirectScenario)
    g = build_msi_exit(s, direct.apic_id, exiting=False)
    out = direct.run(s)
    with pytest.raises(AssertionError, match="external-interrupt exit"):
        check_msi_exit(out, g)
    assert out.finished(g)["rax"] & 0xFFFF_FFFF == GUEST_DONE

    s = direct.scenario("msi-other-vector")
    g = build_msi_exit(s, direct.apic_id)
    out = direct.run(s)
    check_msi_exit(out, g)                                    # the good run passes ...
    with pytest.raises(AssertionError, match="interruption information"):
        check_msi_exit(out, g, vector=MSI_VECTOR + 1)         # ... another vector does not


def test_two_guest_attack_check_sees_a_domain_that_maps_other_guests(direct: DirectRunner) -> None:
    """A domain that also maps other guests' host pages: guest a overwrites b's data, no fault."""
    two = direct.variant(**TWO_EDU)
    s = two.scenario("broken-attack", guests=2, kind=DomainMapsEveryGuestsRam)
    a, b = build_two_attack(s)
    out = two.run(s)
    with pytest.raises(AssertionError):
        check_two_attack(out, a, b)
    assert out.mismatches("b-intact") != 0 and out.faults(s.vtd.checks["faults"]).pending == []
