"""Event injection of every type (SDM Vol. 3C, 25.8.3, 26.6 and 27.6.1.1 on delivery) and the
injection fields an entry must refuse (26.2.1.3: VMfailValid, error 7).

Each valid case is injected when the guest's CPUID exits, on the VMRESUME that follows: the guest
IDT handler reports the vector (rax), the error code it found (rbx) and the return RIP of its
frame (rcx).  Faults and interrupts return to the CPUID itself; software interrupts and
exceptions return past it by the VM-entry instruction length."""

import pytest

from harness.testing import Action, Exit, F, Op, Proc, RFLAGS_FIXED, RFLAGS_IF, VmError, deviation, vmx_test

from ._support import (
    ERROR_VALID, EXTERNAL, GUEST_HANDLED, HW_EXCEPTION, NMI, OTHER, PRIV_SW_EXCEPTION, SW_EXCEPTION,
    SW_INTERRUPT, VALID, intr,
)

CPUID_LENGTH = 2

# (id, interruption info, error code, explicit length or None, return RIP past the CPUID by)
VALID_CASES = [
    ("external-interrupt", intr(EXTERNAL, 0x40), 0, None, 0),
    ("nmi", intr(NMI, 2), 0, None, 0),
    ("hw-exception-ud", intr(HW_EXCEPTION, 6), 0, None, 0),
    ("hw-exception-gp-error-code", intr(HW_EXCEPTION, 13, error=True), 0x18, None, 0),
    ("hw-exception-df-error-code", intr(HW_EXCEPTION, 8, error=True), 0, None, 0),
    ("sw-interrupt", intr(SW_INTERRUPT, 0x80), 0, None, CPUID_LENGTH),
    ("sw-interrupt-length-7", intr(SW_INTERRUPT, 0x81), 0, 7, 7),
    pytest.param(intr(PRIV_SW_EXCEPTION, 1), 0, 1, 1, id="privileged-sw-exception", marks=deviation(
        "kvmrunner", "SDM Vol. 3C 26.6.1.1 (a privileged software exception is delivered with the given instruction "
        "length: the return RIP is the CPUID's plus 1)", "exit reasons [10, 10, 18]: the guest executed its CPUID "
        "a second time, so the event was not delivered as injected",
        "KVM on Bochs (bochs-skylake, without KVM in between, passes this case): nested KVM's handling of an "
        "injected type-5 event (INT1/ICEBP) for L2")),
    ("sw-exception-bp", intr(SW_EXCEPTION, 3), 0, 1, 1),
    ("sw-exception-of", intr(SW_EXCEPTION, 4), 0, 3, 3),
]


@pytest.mark.parametrize("info,error_code,length,advance",
                         [c if hasattr(c, "marks") else pytest.param(*c[1:], id=c[0]) for c in VALID_CASES])
@vmx_test()
def test_injected_event_is_delivered_with_its_error_code_and_length(v, info, error_code, length, advance):
    v.guest("""
        cpuid
        vmcall
    """)
    v.regs["rbx"] = 0x5A5A
    v.rflags = RFLAGS_FIXED | RFLAGS_IF              # an injected external interrupt needs IF (26.3.1.5)
    v.on(Exit.CPUID, Action.inject_event(info, error_code, length=length))
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.CPUID, Exit.VMCALL]
    handler = r.last.regs
    assert handler["rax"] == GUEST_HANDLED | info & 0xFF
    assert handler["rbx"] == (error_code if info & ERROR_VALID else 0x5A5A)
    assert handler["rcx"] == r.exit.rip + advance    # the frame's return RIP (27.6.1.1)


# (id, interruption info, error code, instruction length): each breaks one rule of 26.2.1.3.
INVALID_CASES = [
    ("reserved-type-1", VALID | 1 << 8 | 0x20, 0, 0),
    ("nmi-vector-not-2", intr(NMI, 3), 0, 0),
    ("hw-exception-vector-32", intr(HW_EXCEPTION, 32), 0, 0),
    ("sw-interrupt-with-error-code", intr(SW_INTERRUPT, 0x80, error=True), 0, 2),
    ("gp-without-error-code", intr(HW_EXCEPTION, 13), 0, 0),
    ("ud-with-error-code", intr(HW_EXCEPTION, 6, error=True), 0, 0),
    ("reserved-bit-12", intr(HW_EXCEPTION, 6) | 1 << 12, 0, 0),
    ("error-code-bits-31-16", intr(HW_EXCEPTION, 13, error=True), 0x1_0000, 0),
    ("sw-interrupt-length-16", intr(SW_INTERRUPT, 0x80), 0, 16),
    ("sw-exception-length-16", intr(SW_EXCEPTION, 3), 0, 16),
]


@pytest.mark.parametrize("info,error_code,length", [c[1:] for c in INVALID_CASES],
                         ids=[c[0] for c in INVALID_CASES])
@vmx_test()
def test_invalid_injection_fails_entry_with_error_7(v, info, error_code, length):
    v.fields.update({F.ENTRY_INTR_INFO: info, F.ENTRY_EXCEPTION_ERROR: error_code, F.ENTRY_INSTR_LEN: length})
    v.guest("vmcall")
    v.enter_guest()
    r = yield
    assert r.exits == []
    e = r.entry_error
    assert e is not None and e.op == Op.VMLAUNCH and e.fail_valid, r.describe()
    assert e.error == VmError.ENTRY_INVALID_CONTROLS


@vmx_test()
def test_software_interrupt_with_length_0_follows_the_misc_capability(v):
    v.fields.update({F.ENTRY_INTR_INFO: intr(SW_INTERRUPT, 0x82), F.ENTRY_INSTR_LEN: 0})
    v.guest("vmcall")
    v.enter_guest()
    r = yield
    if v.caps.injection_length_zero:                 # IA32_VMX_MISC bit 30 (A.6)
        assert r.reasons() == [Exit.VMCALL] and r.exit.regs["rax"] == GUEST_HANDLED | 0x82
    else:
        assert r.entry_error is not None and r.entry_error.error == VmError.ENTRY_INVALID_CONTROLS


@deviation("bochs", "SDM Vol. 3C 26.2.1.3 (type 7 is reserved without the "
           "monitor-trap-flag control: VMfailValid, error 7)", "Bochs panics ('VMENTER: unsupported "
           "event injection type 7') and exits with status 1", not_run=True)
@vmx_test()
def test_pending_mtf_injection_follows_the_mtf_capability(v):
    """Type 7 (other event), vector 0: a pending MTF exit, valid only where the monitor-trap-flag
    control may be 1 (26.2.1.3, 26.5.2)."""
    v.fields[F.ENTRY_INTR_INFO] = intr(OTHER, 0)
    v.guest("""
        nop
        vmcall
    """)
    v.enter_guest()
    r = yield
    if v.caps.proc.may1 & Proc.MONITOR_TRAP_FLAG:
        assert r.exit.reason == Exit.MONITOR_TRAP_FLAG
    else:
        assert r.exits == [] and r.entry_error is not None
        assert r.entry_error.error == VmError.ENTRY_INVALID_CONTROLS
