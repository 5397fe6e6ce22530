"""VMCS component encodings (Intel SDM Vol. 3D, Appendix B) and VM-exit reasons (Appendix C).

An encoding's bits say its width (14:13: 0 = 16-bit, 1 = 64-bit, 2 = 32-bit, 3 = natural width),
its type (11:10: 0 control, 1 read-only data, 2 guest state, 3 host state) and, for 64-bit fields,
whether the high half is addressed (bit 0).
"""

from __future__ import annotations

import enum


class F(enum.IntEnum):
    # 16-bit control fields (B.1.1)
    VPID = 0x0000
    PI_NOTIFY_VECTOR = 0x0002
    EPTP_INDEX = 0x0004
    # 16-bit guest-state fields (B.1.2)
    GUEST_ES_SEL = 0x0800
    GUEST_CS_SEL = 0x0802
    GUEST_SS_SEL = 0x0804
    GUEST_DS_SEL = 0x0806
    GUEST_FS_SEL = 0x0808
    GUEST_GS_SEL = 0x080A
    GUEST_LDTR_SEL = 0x080C
    GUEST_TR_SEL = 0x080E
    GUEST_INTR_STATUS = 0x0810      # RVI (bits 7:0), SVI (bits 15:8), 29.1.1
    PML_INDEX = 0x0812
    # 16-bit host-state fields (B.1.3)
    HOST_ES_SEL = 0x0C00
    HOST_CS_SEL = 0x0C02
    HOST_SS_SEL = 0x0C04
    HOST_DS_SEL = 0x0C06
    HOST_FS_SEL = 0x0C08
    HOST_GS_SEL = 0x0C0A
    HOST_TR_SEL = 0x0C0C
    # 64-bit control fields (B.2.1)
    IO_BITMAP_A = 0x2000
    IO_BITMAP_B = 0x2002
    MSR_BITMAP = 0x2004
    EXIT_MSR_STORE_ADDR = 0x2006
    EXIT_MSR_LOAD_ADDR = 0x2008
    ENTRY_MSR_LOAD_ADDR = 0x200A
    PML_ADDR = 0x200E
    TSC_OFFSET = 0x2010
    VIRTUAL_APIC_ADDR = 0x2012
    APIC_ACCESS_ADDR = 0x2014
    PI_DESC_ADDR = 0x2016
    VMFUNC_CONTROLS = 0x2018
    EPTP = 0x201A
    EOI_EXIT0 = 0x201C
    EOI_EXIT1 = 0x201E
    EOI_EXIT2 = 0x2020
    EOI_EXIT3 = 0x2022
    EPTP_LIST = 0x2024
    VMREAD_BITMAP = 0x2026
    VMWRITE_BITMAP = 0x2028
    # 64-bit read-only data (B.2.2)
    GUEST_PHYSICAL_ADDR = 0x2400
    # 64-bit guest-state fields (B.2.3)
    VMCS_LINK_POINTER = 0x2800
    GUEST_DEBUGCTL = 0x2802
    GUEST_PAT = 0x2804
    GUEST_EFER = 0x2806
    GUEST_PERF_GLOBAL_CTRL = 0x2808
    GUEST_PDPTE0 = 0x280A
    # 64-bit host-state fields (B.2.4)
    HOST_PAT = 0x2C00
    HOST_EFER = 0x2C02
    HOST_PERF_GLOBAL_CTRL = 0x2C04
    # 32-bit control fields (B.3.1)
    PIN_CONTROLS = 0x4000
    PROC_CONTROLS = 0x4002
    EXCEPTION_BITMAP = 0x4004
    PF_ERROR_MASK = 0x4006
    PF_ERROR_MATCH = 0x4008
    CR3_TARGET_COUNT = 0x400A
    EXIT_CONTROLS = 0x400C
    EXIT_MSR_STORE_COUNT = 0x400E
    EXIT_MSR_LOAD_COUNT = 0x4010
    ENTRY_CONTROLS = 0x4012
    ENTRY_MSR_LOAD_COUNT = 0x4014
    ENTRY_INTR_INFO = 0x4016
    ENTRY_EXCEPTION_ERROR = 0x4018
    ENTRY_INSTR_LEN = 0x401A
    TPR_THRESHOLD = 0x401C
    PROC_CONTROLS2 = 0x401E
    # 32-bit read-only data (B.3.2)
    VM_INSTRUCTION_ERROR = 0x4400
    EXIT_REASON = 0x4402
    EXIT_INTR_INFO = 0x4404
    EXIT_INTR_ERROR = 0x4406
    IDT_VECTORING_INFO = 0x4408
    IDT_VECTORING_ERROR = 0x440A
    EXIT_INSTR_LEN = 0x440C
    EXIT_INSTR_INFO = 0x440E
    # 32-bit guest-state fields (B.3.3)
    GUEST_ES_LIMIT = 0x4800
    GUEST_CS_LIMIT = 0x4802
    GUEST_SS_LIMIT = 0x4804
    GUEST_DS_LIMIT = 0x4806
    GUEST_FS_LIMIT = 0x4808
    GUEST_GS_LIMIT = 0x480A
    GUEST_LDTR_LIMIT = 0x480C
    GUEST_TR_LIMIT = 0x480E
    GUEST_GDTR_LIMIT = 0x4810
    GUEST_IDTR_LIMIT = 0x4812
    GUEST_ES_AR = 0x4814
    GUEST_CS_AR = 0x4816
    GUEST_SS_AR = 0x4818
    GUEST_DS_AR = 0x481A
    GUEST_FS_AR = 0x481C
    GUEST_GS_AR = 0x481E
    GUEST_LDTR_AR = 0x4820
    GUEST_TR_AR = 0x4822
    GUEST_INTERRUPTIBILITY = 0x4824
    GUEST_ACTIVITY = 0x4826
    GUEST_SYSENTER_CS = 0x482A
    PREEMPTION_TIMER = 0x482E
    # 32-bit host-state field (B.3.4)
    HOST_SYSENTER_CS = 0x4C00
    # natural-width control fields (B.4.1)
    CR0_MASK = 0x6000
    CR4_MASK = 0x6002
    CR0_SHADOW = 0x6004
    CR4_SHADOW = 0x6006
    CR3_TARGET0 = 0x6008
    CR3_TARGET1 = 0x600A
    # natural-width read-only data (B.4.2)
    EXIT_QUALIFICATION = 0x6400
    GUEST_LINEAR_ADDR = 0x640A
    # natural-width guest-state fields (B.4.3)
    GUEST_CR0 = 0x6800
    GUEST_CR3 = 0x6802
    GUEST_CR4 = 0x6804
    GUEST_ES_BASE = 0x6806
    GUEST_CS_BASE = 0x6808
    GUEST_SS_BASE = 0x680A
    GUEST_DS_BASE = 0x680C
    GUEST_FS_BASE = 0x680E
    GUEST_GS_BASE = 0x6810
    GUEST_LDTR_BASE = 0x6812
    GUEST_TR_BASE = 0x6814
    GUEST_GDTR_BASE = 0x6816
    GUEST_IDTR_BASE = 0x6818
    GUEST_DR7 = 0x681A
    GUEST_RSP = 0x681C
    GUEST_RIP = 0x681E
    GUEST_RFLAGS = 0x6820
    GUEST_PENDING_DBG = 0x6822
    GUEST_SYSENTER_ESP = 0x6824
    GUEST_SYSENTER_EIP = 0x6826
    # natural-width host-state fields (B.4.4)
    HOST_CR0 = 0x6C00
    HOST_CR3 = 0x6C02
    HOST_CR4 = 0x6C04
    HOST_FS_BASE = 0x6C06
    HOST_GS_BASE = 0x6C08
    HOST_TR_BASE = 0x6C0A
    HOST_GDTR_BASE = 0x6C0C
    HOST_IDTR_BASE = 0x6C0E
    HOST_SYSENTER_ESP = 0x6C10
    HOST_SYSENTER_EIP = 0x6C12
    HOST_RSP = 0x6C14
    HOST_RIP = 0x6C16


def width(encoding: int) -> int:
    """Field width in bits from encoding bits 14:13 (B.1-B.4); natural width is 64 in IA-32e mode."""
    return {0: 16, 1: 64, 2: 32, 3: 64}[(encoding >> 13) & 3]


def is_read_only(encoding: int) -> bool:
    """Bits 11:10 = 1: VM-exit information (read-only data) fields."""
    return (encoding >> 10) & 3 == 1


class Exit(enum.IntEnum):
    """Basic VM-exit reasons (SDM Vol. 3D, Appendix C)."""

    EXCEPTION_NMI = 0
    EXTERNAL_INTERRUPT = 1
    TRIPLE_FAULT = 2
    INIT = 3
    SIPI = 4
    INTERRUPT_WINDOW = 7
    NMI_WINDOW = 8
    TASK_SWITCH = 9
    CPUID = 10
    GETSEC = 11
    HLT = 12
    INVD = 13
    INVLPG = 14
    RDPMC = 15
    RDTSC = 16
    RSM = 17
    VMCALL = 18
    VMCLEAR = 19
    VMLAUNCH = 20
    VMPTRLD = 21
    VMPTRST = 22
    VMREAD = 23
    VMRESUME = 24
    VMWRITE = 25
    VMXOFF = 26
    VMXON = 27
    CR_ACCESS = 28
    DR_ACCESS = 29
    IO = 30
    RDMSR = 31
    WRMSR = 32
    ENTRY_FAIL_GUEST_STATE = 33
    ENTRY_FAIL_MSR_LOAD = 34
    MWAIT = 36
    MONITOR_TRAP_FLAG = 37
    MONITOR = 39
    PAUSE = 40
    ENTRY_FAIL_MACHINE_CHECK = 41
    TPR_BELOW_THRESHOLD = 43
    APIC_ACCESS = 44
    GDTR_IDTR = 46
    LDTR_TR = 47
    EPT_VIOLATION = 48
    EPT_MISCONFIG = 49
    INVEPT = 50
    RDTSCP = 51
    PREEMPTION_TIMER = 52
    INVVPID = 53
    WBINVD = 54
    XSETBV = 55
    APIC_WRITE = 56
    RDRAND = 57
    INVPCID = 58
    VMFUNC = 59
    RDSEED = 61
    PML_FULL = 62
    XSAVES = 63
    XRSTORS = 64


MAX_EXIT_REASON = 80          # action table size (reasons 0..79)
ENTRY_FAILURE = 1 << 31       # exit reason bit 31: VM-entry failure (SDM 26.8)


class VmError(enum.IntEnum):
    """VM-instruction error numbers (SDM Vol. 3C, 31.4, table 31-1)."""

    VMCALL_IN_ROOT = 1
    VMCLEAR_INVALID_ADDR = 2
    VMCLEAR_VMXON_PTR = 3
    VMLAUNCH_NONCLEAR = 4
    VMRESUME_NONLAUNCHED = 5
    VMRESUME_AFTER_VMXOFF = 6
    ENTRY_INVALID_CONTROLS = 7
    ENTRY_INVALID_HOST_STATE = 8
    VMPTRLD_INVALID_ADDR = 9
    VMPTRLD_VMXON_PTR = 10
    VMPTRLD_BAD_REVISION = 11
    UNSUPPORTED_COMPONENT = 12
    VMWRITE_READ_ONLY = 13
    VMXON_IN_ROOT = 15
    ENTRY_MOV_SS_BLOCKING = 26
    INVALID_INVEPT_INVVPID_OPERAND = 28
