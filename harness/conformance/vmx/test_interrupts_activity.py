"""External interrupts, NMIs, interrupt/NMI windows, activity states and pending events at entry
(SDM Vol. 3C, 25.4.2, 25.6.1, 26.7.4-26.7.6, 27.2.2, 27.3.4, 28.2).

The interrupt source is a fixed self-IPI sent by the host with RFLAGS.IF = 0: it stays pending
in the local APIC's IRR until the guest is entered.  A vector that reaches the host afterwards is
counted by ``wait_irq_after``; every test uses its own vector (the host's counters persist for
the whole batch)."""

import pytest

from harness.testing import (
    ENTRY_FAILURE, Exit, ExitCtl, F, Pin, Proc, RFLAGS_FIXED, RFLAGS_IF, deviation, requires, vmx_test,
)

from ._support import (
    ACTIVE, ACTIVITY, BLOCK_NMI, EXTERNAL, HLT, HW_EXCEPTION, LAPIC, NMI, SHUTDOWN, SW_INTERRUPT, WAIT_FOR_SIPI,
    GUEST_HANDLED, intr,
)

BOCHS = "bochs"                     # every Bochs target (Bochs 2.7's VMX model)
RFLAGS_TF = 1 << 8
PENDING_BS = 1 << 14                 # pending debug exceptions: single step (25.4.2, table 25-4)


def _bounded(v) -> None:
    """A preemption timer as a bound on a guest that may otherwise sleep forever: a CPU that
    misses the exit under test shows a preemption-timer exit instead of hanging the batch (its
    test requires "preemption_timer")."""
    v.pin |= Pin.PREEMPTION_TIMER
    v.fields[F.PREEMPTION_TIMER] = 50_000


def _pending_interrupt(v, vector: int, if_set: bool) -> None:
    v.self_ipi(vector)
    v.rflags = RFLAGS_FIXED | (RFLAGS_IF if if_set else 0)
    v.regs["rax"] = 0x55
    v.guest("""
        mov eax, 1
        vmcall
    """)


@deviation(BOCHS, "SDM Vol. 3C 25.6.1 (table 25-5: with external-interrupt exiting, RFLAGS.IF does not "
           "affect interrupt blocking)", "with guest RFLAGS.IF = 0 the pending interrupt stays blocked: "
           "the guest runs to VMCALL (exit reasons [18])")
@vmx_test()
def test_external_interrupt_exits_before_the_first_instruction_with_if_clear(v):
    v.pin |= Pin.EXTERNAL_INTERRUPT
    _pending_interrupt(v, 0x61, if_set=False)
    v.wait_irq_after(0x61)
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.EXTERNAL_INTERRUPT]  # RFLAGS.IF does not block it (25.2)
    assert r.exit.regs["rax"] == 0x55                # no guest instruction ran
    assert r.exit.intr_info == 0                     # not acknowledged: information invalid (27.2.2)
    assert r.irqs[0x61] == 1                         # still pending: the host takes it later


@vmx_test()
def test_external_interrupt_exits_with_if_set(v):
    v.pin |= Pin.EXTERNAL_INTERRUPT
    _pending_interrupt(v, 0x62, if_set=True)
    v.wait_irq_after(0x62)
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.EXTERNAL_INTERRUPT]
    assert r.exit.regs["rax"] == 0x55
    assert r.exit.intr_info == 0
    assert r.irqs[0x62] == 1


@vmx_test("ack_interrupt_on_exit")
def test_acknowledge_interrupt_on_exit_reports_the_vector(v):
    v.pin |= Pin.EXTERNAL_INTERRUPT
    v.exit_ctls |= ExitCtl.ACK_INTERRUPT
    _pending_interrupt(v, 0x63, if_set=True)
    v.call_after("apic_eoi")                         # acknowledged: in service until an EOI
    v.wait_irq_after(0x63, 200)
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.EXTERNAL_INTERRUPT]
    assert r.exit.intr_info == intr(EXTERNAL, 0x63)  # valid, type 0, the vector (27.2.2)
    assert r.irqs[0x63] == 0                         # acknowledged: not delivered to the host again


@vmx_test()
def test_pending_interrupt_without_exiting_goes_through_the_guest_idt(v):
    _pending_interrupt(v, 0x64, if_set=True)
    v.call_after("apic_eoi")                         # the guest's handler does not EOI
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.VMCALL]
    assert r.exit.regs["rax"] == GUEST_HANDLED | 0x64


@vmx_test()
def test_pending_interrupt_without_exiting_waits_while_if_is_clear(v):
    _pending_interrupt(v, 0x65, if_set=False)
    v.wait_irq_after(0x65)
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.VMCALL]
    assert r.exit.regs["rax"] == 1                   # the guest ran, undisturbed
    assert r.irqs[0x65] == 1


@deviation(BOCHS, "SDM Vol. 3C 26.7.5 (interrupt-window exiting applies in the HLT activity state)",
           "no interrupt-window exit while in HLT: the bounding preemption timer exits (reasons [52])")
@vmx_test("interrupt_window", "activity_hlt", "preemption_timer")
def test_interrupt_window_exits_at_entry_into_hlt(v):
    _bounded(v)
    v.proc |= Proc.INTERRUPT_WINDOW
    v.rflags = RFLAGS_FIXED | RFLAGS_IF
    v.fields[F.GUEST_ACTIVITY] = HLT
    v.regs["rax"] = 0x56
    v.guest("""
        mov eax, 1
        vmcall
    """)
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.INTERRUPT_WINDOW]    # the window is open in HLT too (26.7.5)
    assert r.exit.regs["rax"] == 0x56


@vmx_test("nmi_window", "virtual_nmis", "nmi_exiting", "activity_hlt", "preemption_timer")
def test_nmi_window_exits_at_entry_into_hlt(v):
    v.pin |= Pin.NMI_EXITING | Pin.VIRTUAL_NMIS
    _bounded(v)
    v.proc |= Proc.NMI_WINDOW
    v.fields[F.GUEST_ACTIVITY] = HLT
    v.regs["rax"] = 0x57
    v.guest("""
        mov eax, 1
        vmcall
    """)
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.NMI_WINDOW]          # 26.7.6
    assert r.exit.regs["rax"] == 0x57


@vmx_test("nmi_window", "virtual_nmis", "nmi_exiting")
def test_virtual_nmi_blocking_holds_the_nmi_window_until_iret(v):
    v.pin |= Pin.NMI_EXITING | Pin.VIRTUAL_NMIS
    v.proc |= Proc.NMI_WINDOW
    v.fields[F.GUEST_INTERRUPTIBILITY] = BLOCK_NMI   # virtual-NMI blocking at entry (26.3.1.5)
    v.guest("""
        lea rsi, [rip + @after]
        mov rax, rsp
        push 0x10
        push rax
        pushfq
        push 0x08
        push rsi
        iretq                                # IRET removes virtual-NMI blocking (25.3)
    @after:
        nop
        vmcall
    """)
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.NMI_WINDOW]
    assert r.exit.rip == r.exit.regs["rsi"]          # right after the IRET, not before it


@vmx_test("nmi_exiting")
def test_nmi_exits_with_nmi_interruption_info(v):
    v.pin |= Pin.NMI_EXITING
    v.guest(f"""
        mov rdi, {LAPIC:#x}
        mov eax, [rdi + 0x20]                # own APIC ID, bits 31:24 (SDM Vol. 3A, 11.4.6)
        and eax, 0xFF000000
        mov [rdi + 0x310], eax               # ICR high: destination
        lea rsi, [rip + @after]
        mov dword ptr [rdi + 0x300], 0x4400  # ICR low: NMI, assert, physical, no shorthand
    @after:
        nop
        vmcall
    """)
    v.enter_guest()
    r = yield
    assert r.exit.reason == Exit.EXCEPTION_NMI
    assert r.exit.intr_info == intr(NMI, 2)          # type 2, vector 2 (27.2.2)
    assert r.exit.rip == r.exit.regs["rsi"]


@vmx_test("nmi_exiting", "virtual_nmis")
def test_injected_virtual_nmi_sets_virtual_nmi_blocking(v):
    v.pin |= Pin.NMI_EXITING | Pin.VIRTUAL_NMIS
    v.fields[F.ENTRY_INTR_INFO] = intr(NMI, 2)
    v.guest("vmcall")
    v.vmread_after(F.GUEST_INTERRUPTIBILITY)
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.VMCALL]
    assert r.exit.regs["rax"] == GUEST_HANDLED | 2   # delivered through the guest IDT
    assert r.reads[F.GUEST_INTERRUPTIBILITY] & BLOCK_NMI  # blocked until IRET (26.6.1.2)


def _asleep(v, state: int) -> None:
    """Enter in ``state`` with the preemption timer as the only way out (25.5.1: it counts in
    HLT, shutdown and wait-for-SIPI too); the test requires the state's capability (ACTIVITY)."""
    v.pin |= Pin.PREEMPTION_TIMER
    v.fields.update({F.GUEST_ACTIVITY: state, F.PREEMPTION_TIMER: 200})
    v.regs["rax"] = 0x77
    v.guest("""
        mov eax, 1
        vmcall
    """)
    v.vmread_after(F.GUEST_ACTIVITY)
    v.enter_guest()


@vmx_test("preemption_timer", "activity_hlt")
def test_hlt_activity_state_at_entry_runs_no_instruction(v):
    _asleep(v, HLT)
    r = yield
    assert r.reasons() == [Exit.PREEMPTION_TIMER]
    assert r.exit.regs["rax"] == 0x77
    assert r.reads[F.GUEST_ACTIVITY] == HLT          # saved as it was (27.3.4)


@vmx_test("preemption_timer", "activity_shutdown")
def test_shutdown_activity_state_at_entry(v):
    _asleep(v, SHUTDOWN)
    r = yield
    assert r.reasons() == [Exit.PREEMPTION_TIMER]
    assert r.exit.regs["rax"] == 0x77
    assert r.reads[F.GUEST_ACTIVITY] == SHUTDOWN


@deviation(BOCHS, "SDM Vol. 3C 25.5.1 (the VMX-preemption timer counts down in the wait-for-SIPI state)",
           "no preemption-timer exit from wait-for-SIPI: no record within the 20 s run timeout", not_run=True)
@vmx_test("preemption_timer", "activity_wait_sipi")
def test_wait_for_sipi_activity_state_at_entry(v):
    _asleep(v, WAIT_FOR_SIPI)
    r = yield
    assert r.reasons() == [Exit.PREEMPTION_TIMER]
    assert r.exit.regs["rax"] == 0x77
    assert r.reads[F.GUEST_ACTIVITY] == WAIT_FOR_SIPI


@vmx_test("activity_hlt", "preemption_timer")
def test_event_injected_into_hlt_wakes_the_guest(v):
    _bounded(v)
    v.rflags = RFLAGS_FIXED | RFLAGS_IF              # injecting an external interrupt needs IF (26.3.1.5)
    v.fields.update({F.GUEST_ACTIVITY: HLT, F.ENTRY_INTR_INFO: intr(EXTERNAL, 0x70)})
    v.guest("vmcall")
    v.vmread_after(F.GUEST_ACTIVITY)
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.VMCALL]
    assert r.exit.regs["rax"] == GUEST_HANDLED | 0x70
    assert r.reads[F.GUEST_ACTIVITY] == ACTIVE       # delivery left HLT (26.6.2)


@vmx_test()
def test_pending_single_step_debug_exception_is_delivered_at_entry(v):
    v.fields.update({F.GUEST_PENDING_DBG: PENDING_BS, F.EXCEPTION_BITMAP: 1 << 1})
    v.rflags = RFLAGS_FIXED | RFLAGS_TF
    v.regs["rax"] = 0x33
    v.guest("""
        mov eax, 1
        vmcall
    """)
    v.enter_guest()
    r = yield
    assert r.exit.reason == Exit.EXCEPTION_NMI
    assert r.exit.intr_info == intr(HW_EXCEPTION, 1)  # #DB before any instruction (26.7.3)
    assert r.exit.regs["rax"] == 0x33
    assert r.exit.qualification & PENDING_BS         # the exit qualification names BS (28.2.1)


# (activity state, injected event): an injection the state would block fails the entry as
# guest state (26.3.1.5: HLT takes external interrupts, NMIs, #DB, #MC and pending MTF only;
# shutdown NMIs and #MC only; wait-for-SIPI nothing).
HLT_INJECTION = deviation(BOCHS, "SDM Vol. 3C 26.3.1.5 (in HLT only external interrupts, NMIs, #DB, #MC "
                          "and pending MTF may be injected)", "the entry succeeds and delivers the event: "
                          "the guest handler reaches VMCALL (reason 18)")
# Nested KVM does not check 26.3.1.5 either: its guest-state checks (nested.c) leave the injected
# event's type against the activity state to the CPU, and it emulates L2's HLT and wait-for-SIPI
# itself, so Bochs' entry checks never see those states.
KVM_INJECTION = ("kvmrunner", "SDM Vol. 3C 26.3.1.5 (an injection the activity state blocks fails the entry as "
                 "guest state, exit 33)")
KVM_LAYER = "KVM: nested.c does not check an injected event against L2's activity state"
BLOCKED_INJECTIONS = [
    pytest.param(HLT, intr(SW_INTERRUPT, 0x80), id="hlt-software-interrupt",
                 marks=[HLT_INJECTION, requires(ACTIVITY[HLT]), deviation(
                     *KVM_INJECTION, "the entry succeeds and the guest reaches VMCALL (reason 18)", KVM_LAYER)]),
    pytest.param(HLT, intr(HW_EXCEPTION, 6), id="hlt-ud", marks=[HLT_INJECTION, requires(ACTIVITY[HLT]), deviation(
        *KVM_INJECTION, "the entry succeeds and the guest reaches VMCALL (reason 18)", KVM_LAYER)]),
    pytest.param(SHUTDOWN, intr(EXTERNAL, 0x71), id="shutdown-external-interrupt", marks=requires(ACTIVITY[SHUTDOWN])),
    pytest.param(WAIT_FOR_SIPI, intr(NMI, 2), id="wait-for-sipi-nmi", marks=[requires(ACTIVITY[WAIT_FOR_SIPI]), deviation(
        *KVM_INJECTION, "the entry succeeds and L2 waits for a SIPI that never comes: no record within the 300 s "
                        "run bound", KVM_LAYER, not_run=True)]),
]


@pytest.mark.parametrize("state,info", BLOCKED_INJECTIONS)
@vmx_test()
def test_injection_the_activity_state_blocks_fails_entry(v, state, info):
    v.rflags = RFLAGS_FIXED | RFLAGS_IF
    v.fields.update({F.GUEST_ACTIVITY: state, F.ENTRY_INTR_INFO: info, F.ENTRY_INSTR_LEN: 2})
    v.guest("vmcall")
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.ENTRY_FAIL_GUEST_STATE]
    assert r.exit.full_reason == ENTRY_FAILURE | Exit.ENTRY_FAIL_GUEST_STATE
    assert r.exit.qualification == 0
