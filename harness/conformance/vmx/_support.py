"""Shared pieces of the VMX conformance tests: event encodings (SDM Vol. 3C, 25.8.3, 25.9.2),
activity states and the probed capability that offers each one."""

from __future__ import annotations

# Interruption-information types (table 25-17) and bits.
EXTERNAL, NMI, HW_EXCEPTION, SW_INTERRUPT, PRIV_SW_EXCEPTION, SW_EXCEPTION, OTHER = 0, 2, 3, 4, 5, 6, 7
VALID, ERROR_VALID = 1 << 31, 1 << 11
GUEST_HANDLED = 0x1000              # the guest IDT handler of vector v reports 0x1000 | v in rax
TEST_PAGE = 0x0200_0000             # 32 MiB: scratch RAM below Bochs' 64 MiB
ACTIVE, HLT, SHUTDOWN, WAIT_FOR_SIPI = 0, 1, 2, 3   # guest activity states (25.4.2)
# The capability name of each state a guest may be entered in (IA32_VMX_MISC bits 8:6, Vol. 3D A.6).
ACTIVITY = {HLT: "activity_hlt", SHUTDOWN: "activity_shutdown", WAIT_FOR_SIPI: "activity_wait_sipi"}
BLOCK_STI, BLOCK_MOV_SS, BLOCK_NMI = 1 << 0, 1 << 1, 1 << 3   # interruptibility state (table 25-3)
LAPIC = 0xFEE0_0000

# Nested KVM reports an EPT misconfiguration with the qualification its EPT walker computed (as
# for a violation) instead of clearing it: one declaration for every test that meets it.
KVM_EPT_MISCONFIG = ("kvmrunner", "SDM Vol. 3C 28.2.1 (an EPT misconfiguration saves no exit qualification: "
                     "the field is cleared)")
KVM_EPT_MISCONFIG_LAYER = ("KVM, not Bochs: nested.c nested_ept_inject_page_fault() stores the qualification its "
                           "EPT walker computed, as for an EPT violation, for EPT_MISCONFIG as well")


def intr(kind: int, vector: int, error: bool = False) -> int:
    """An interruption-information value: valid, type, vector, deliver-error-code."""
    return VALID | kind << 8 | vector | (ERROR_VALID if error else 0)

