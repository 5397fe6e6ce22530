"""The engine copes with the local APIC as earlier software left it.

Firmware leaves the APIC in xAPIC mode.  A kexec'ing Linux may leave it in x2APIC mode and
software-disabled (SVR bit 8 clear, which masks every LVT entry).  Either way the payload must
take interrupts, bound its waits with the LAPIC timer and EOI them (SDM Vol. 3A, 11.4.3, 11.5.4,
11.8.5, 11.12).
"""

import pytest

from harness.payload.engine import WATCHDOG_VECTOR
from harness.payload.image import Scenario
from harness.payload.records import Kind

pytestmark = pytest.mark.emulated

IA32_APIC_BASE_EN, IA32_APIC_BASE_EXTD, IA32_APIC_BASE_BSP = 1 << 11, 1 << 10, 1 << 8
X2APIC_SVR = 0x80F                   # MSR 0x800 + 0xF0 / 16 (SDM Vol. 3A, table 11-6)
SVR_ENABLED_SPURIOUS_FF = 0x1FF      # what the engine programs: software-enabled, vector 0xFF
TIMER_TICKS = 20_000                 # one-shot LAPIC-timer count: far below any run's bound

# What Linux's kexec path can leave: x2APIC on (xAPIC -> x2APIC is a legal transition,
# SDM Vol. 3A, 11.12.5) and the APIC software-disabled.
X2APIC_ON_SOFTWARE_DISABLED = [
    "mov ecx, 0x1B",
    "rdmsr",
    f"or eax, {IA32_APIC_BASE_EN | IA32_APIC_BASE_EXTD:#x}",
    "wrmsr",
    f"mov ecx, {X2APIC_SVR:#x}",
    "rdmsr",
    "and eax, ~0x100",
    "xor edx, edx",
    "wrmsr",
]


def two_timer_waits(scenario: Scenario) -> tuple[int, int]:
    """Two bounded waits for the LAPIC timer's own vector.  The second sees its interrupt only if
    the first was EOI'd: an un-EOI'd vector keeps PPR at its class and blocks it (11.8.3.1)."""
    first = scenario.steps.wait_irq_halted(WATCHDOG_VECTOR, 1, TIMER_TICKS)
    second = scenario.steps.wait_irq_halted(WATCHDOG_VECTOR, 1, TIMER_TICKS)
    return first, second


def halted_waits(run) -> list[tuple[int, int, int]]:
    """(vector, interrupts consumed, halts used) of every irq_wait_halted."""
    return [tuple(r.fields) for r in run.of(Kind.IRQ_HALTED)]


def test_engine_reports_and_enables_the_xapic_firmware_left(vtx_target):
    s = Scenario(name="apic-xapic")
    svr = s.steps.mmio_read(0xFEE0_00F0, size=4)
    first, second = two_timer_waits(s)
    run = vtx_target.run(s).expect_ok()
    p = run.probe
    assert p.apic_base & ~0xFFF == 0xFEE0_0000
    assert p.apic_base & (IA32_APIC_BASE_EN | IA32_APIC_BASE_EXTD | IA32_APIC_BASE_BSP) == \
        IA32_APIC_BASE_EN | IA32_APIC_BASE_BSP
    assert not p.x2apic_found and p.apic_id == 0
    assert run.value(svr) & 0xFFF == SVR_ENABLED_SPURIOUS_FF
    assert [run.value(first), run.value(second)] == [1, 1]
    assert halted_waits(run) == [(WATCHDOG_VECTOR, 1, 1)] * 2


@pytest.mark.requires("x2apic")
def test_engine_copes_with_x2apic_left_on_and_the_apic_software_disabled(vtx_target):
    s = Scenario(name="apic-x2apic-left-on", prior_state=X2APIC_ON_SOFTWARE_DISABLED)
    s.steps.rdmsr(X2APIC_SVR)
    first, second = two_timer_waits(s)
    run = vtx_target.run(s).expect_ok()
    p = run.probe
    assert p.x2apic_found
    assert p.apic_base & (IA32_APIC_BASE_EN | IA32_APIC_BASE_EXTD) == IA32_APIC_BASE_EN | IA32_APIC_BASE_EXTD
    assert p.apic_svr & 0x100 == 0, "the prior state did not software-disable the APIC"
    assert p.apic_id == 0                                     # x2APIC ID of the only CPU
    assert [r.fields[1] & 0xFFF for r in run.of(Kind.MSR) if r.fields[0] == X2APIC_SVR] == [SVR_ENABLED_SPURIOUS_FF]
    assert [run.value(first), run.value(second)] == [1, 1]
    assert halted_waits(run) == [(WATCHDOG_VECTOR, 1, 1)] * 2


@pytest.mark.requires("x2apic")
def test_in_x2apic_mode_the_xapic_mmio_page_does_not_reach_the_apic(vtx_target):
    """Why the engine must switch to MSRs: the timer armed through the xAPIC page never fires
    (SDM Vol. 3A, 11.12.1.2), the same timer armed by the engine through MSRs does."""
    s = Scenario(name="apic-x2apic-mmio", prior_state=X2APIC_ON_SOFTWARE_DISABLED)
    for reg, value in ((0x3E0, 0xB), (0x320, WATCHDOG_VECTOR), (0x380, TIMER_TICKS)):
        s.steps.mmio_write(0xFEE0_0000 + reg, value, size=4, guard=True)
    spin = s.steps.wait_irq(WATCHDOG_VECTOR, 2_000_000)
    halted = s.steps.wait_irq_halted(WATCHDOG_VECTOR, 1, TIMER_TICKS)
    run = vtx_target.run(s).expect_ok()
    vector, count, iterations, ok = run.step_record(spin, Kind.IRQ).fields[1:5]
    assert (vector, count, ok) == (WATCHDOG_VECTOR, 0, 0)
    assert run.value(halted) == 1
