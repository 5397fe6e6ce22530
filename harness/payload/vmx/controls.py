"""VMX controls and their reconciliation with the capability MSRs (SDM Vol. 3D, Appendix A).

Each control capability MSR reports allowed-0 settings in bits 31:0 (a 1 there means the control
must be 1) and allowed-1 settings in bits 63:32 (a 0 there means the control must be 0).  When
IA32_VMX_BASIC bit 55 is set, the TRUE_* MSRs (0x48D-0x490) report the same for the default1
controls that may be cleared (A.2).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

# Capability MSRs (SDM Vol. 3D, A.1-A.11) and feature control (SDM Vol. 3C, 24.7).
IA32_FEATURE_CONTROL = 0x3A
IA32_VMX_BASIC = 0x480
IA32_VMX_PINBASED_CTLS = 0x481
IA32_VMX_PROCBASED_CTLS = 0x482
IA32_VMX_EXIT_CTLS = 0x483
IA32_VMX_ENTRY_CTLS = 0x484
IA32_VMX_MISC = 0x485
IA32_VMX_CR0_FIXED0 = 0x486
IA32_VMX_CR0_FIXED1 = 0x487
IA32_VMX_CR4_FIXED0 = 0x488
IA32_VMX_CR4_FIXED1 = 0x489
IA32_VMX_VMCS_ENUM = 0x48A
IA32_VMX_PROCBASED_CTLS2 = 0x48B
IA32_VMX_EPT_VPID_CAP = 0x48C
IA32_VMX_TRUE_PINBASED_CTLS = 0x48D
IA32_VMX_TRUE_PROCBASED_CTLS = 0x48E
IA32_VMX_TRUE_EXIT_CTLS = 0x48F
IA32_VMX_TRUE_ENTRY_CTLS = 0x490
IA32_VMX_VMFUNC = 0x491


class Pin(enum.IntFlag):
    """Pin-based VM-execution controls (SDM Vol. 3C, 25.6.1, table 25-5)."""

    EXTERNAL_INTERRUPT = 1 << 0
    NMI_EXITING = 1 << 3
    VIRTUAL_NMIS = 1 << 5
    PREEMPTION_TIMER = 1 << 6
    POSTED_INTERRUPTS = 1 << 7


class Proc(enum.IntFlag):
    """Primary processor-based VM-execution controls (25.6.2, table 25-6)."""

    INTERRUPT_WINDOW = 1 << 2
    TSC_OFFSETTING = 1 << 3
    HLT = 1 << 7
    INVLPG = 1 << 9
    MWAIT = 1 << 10
    RDPMC = 1 << 11
    RDTSC = 1 << 12
    CR3_LOAD = 1 << 15
    CR3_STORE = 1 << 16
    CR8_LOAD = 1 << 19
    CR8_STORE = 1 << 20
    TPR_SHADOW = 1 << 21
    NMI_WINDOW = 1 << 22
    MOV_DR = 1 << 23
    UNCONDITIONAL_IO = 1 << 24
    IO_BITMAPS = 1 << 25
    MONITOR_TRAP_FLAG = 1 << 27
    MSR_BITMAPS = 1 << 28
    MONITOR = 1 << 29
    PAUSE = 1 << 30
    SECONDARY = 1 << 31


class Proc2(enum.IntFlag):
    """Secondary processor-based VM-execution controls (25.6.2, table 25-7)."""

    VIRTUALIZE_APIC = 1 << 0
    EPT = 1 << 1
    DESCRIPTOR_TABLE = 1 << 2
    RDTSCP = 1 << 3
    VIRTUALIZE_X2APIC = 1 << 4
    VPID = 1 << 5
    WBINVD = 1 << 6
    UNRESTRICTED_GUEST = 1 << 7
    APIC_REGISTER_VIRT = 1 << 8
    VIRTUAL_INTR_DELIVERY = 1 << 9
    RDRAND = 1 << 11
    INVPCID = 1 << 12
    VMFUNC = 1 << 13
    VMCS_SHADOWING = 1 << 14
    RDSEED = 1 << 16
    PML = 1 << 17


class ExitCtl(enum.IntFlag):
    """VM-exit controls (25.7.1, table 25-13)."""

    SAVE_DEBUG = 1 << 2
    HOST_64BIT = 1 << 9
    LOAD_PERF_GLOBAL_CTRL = 1 << 12
    ACK_INTERRUPT = 1 << 15
    SAVE_PAT = 1 << 18
    LOAD_PAT = 1 << 19
    SAVE_EFER = 1 << 20
    LOAD_EFER = 1 << 21
    SAVE_PREEMPTION_TIMER = 1 << 22


class EntryCtl(enum.IntFlag):
    """VM-entry controls (25.8.1, table 25-15)."""

    LOAD_DEBUG = 1 << 2
    IA32E_GUEST = 1 << 9
    LOAD_PERF_GLOBAL_CTRL = 1 << 13
    LOAD_PAT = 1 << 14
    LOAD_EFER = 1 << 15


@dataclass(frozen=True)
class Allowed:
    """One control field's allowed settings: ``must1`` (allowed-0 = 1) and ``may1`` (allowed-1)."""

    must1: int
    may1: int

    @classmethod
    def from_msr(cls, value: int) -> "Allowed":
        return cls(must1=value & 0xFFFF_FFFF, may1=value >> 32 & 0xFFFF_FFFF)

    def reconcile(self, wanted: int) -> int:
        """The setting closest to ``wanted`` that the CPU allows (A.3-A.5)."""
        return (wanted | self.must1) & self.may1

    def allows(self, value: int) -> bool:
        return value & self.must1 == self.must1 and value & ~self.may1 == 0


@dataclass(frozen=True)
class VmxCaps:
    """The capability MSRs a scenario needs, from the boot probe (a dict of MSR -> value)."""

    msrs: dict[int, int]
    cpuid1_ecx: int = 0     # CPUID.1:ECX, for instructions whose presence a test checks

    def msr(self, index: int) -> int:
        return self.msrs.get(index, 0)

    @property
    def true_controls(self) -> bool:
        return bool(self.msr(IA32_VMX_BASIC) >> 55 & 1)

    def _ctl(self, plain: int, true: int) -> Allowed:
        return Allowed.from_msr(self.msr(true if self.true_controls and true in self.msrs else plain))

    @property
    def pin(self) -> Allowed:
        return self._ctl(IA32_VMX_PINBASED_CTLS, IA32_VMX_TRUE_PINBASED_CTLS)

    @property
    def proc(self) -> Allowed:
        return self._ctl(IA32_VMX_PROCBASED_CTLS, IA32_VMX_TRUE_PROCBASED_CTLS)

    @property
    def proc2(self) -> Allowed:
        """Secondary controls exist only when primary bit 31 may be 1 (A.3.3)."""
        if not self.proc.may1 >> 31 & 1:
            return Allowed(0, 0)
        return Allowed.from_msr(self.msr(IA32_VMX_PROCBASED_CTLS2))

    @property
    def exit(self) -> Allowed:
        return self._ctl(IA32_VMX_EXIT_CTLS, IA32_VMX_TRUE_EXIT_CTLS)

    @property
    def entry(self) -> Allowed:
        return self._ctl(IA32_VMX_ENTRY_CTLS, IA32_VMX_TRUE_ENTRY_CTLS)

    @property
    def preemption_timer_rate(self) -> int:
        """The timer counts down once per 2^rate TSC ticks: IA32_VMX_MISC bits 4:0 (A.6)."""
        return self.msr(IA32_VMX_MISC) & 0x1F

    @property
    def cr3_targets(self) -> int:
        """Number of CR3-target values supported: IA32_VMX_MISC bits 24:16 (A.6)."""
        return self.msr(IA32_VMX_MISC) >> 16 & 0x1FF

    def fixed_cr0(self, value: int, unrestricted: bool = False) -> int:
        """``value`` with CR0 bits forced to their fixed settings (A.7); PE/PG are free with
        unrestricted guest (25.6.2)."""
        fixed0, fixed1 = self.msr(IA32_VMX_CR0_FIXED0), self.msr(IA32_VMX_CR0_FIXED1)
        if unrestricted:
            fixed0 &= ~0x8000_0001
        return (value | fixed0) & fixed1

    def fixed_cr4(self, value: int) -> int:
        """``value`` with CR4 bits forced to their fixed settings (A.8)."""
        return (value | self.msr(IA32_VMX_CR4_FIXED0)) & self.msr(IA32_VMX_CR4_FIXED1)

    @property
    def vmcs_enum_max_index(self) -> int:
        """Highest index of any VMCS field encoding: IA32_VMX_VMCS_ENUM bits 9:1 (A.9)."""
        return self.msr(IA32_VMX_VMCS_ENUM) >> 1 & 0x1FF

    @property
    def revision(self) -> int:
        """VMCS revision identifier, IA32_VMX_BASIC bits 30:0 (A.1)."""
        return self.msr(IA32_VMX_BASIC) & 0x7FFF_FFFF

    @property
    def ept_execute_only(self) -> bool:
        """IA32_VMX_EPT_VPID_CAP bit 0 (A.10)."""
        return bool(self.msr(IA32_VMX_EPT_VPID_CAP) & 1)

    @property
    def injection_length_zero(self) -> bool:
        """IA32_VMX_MISC bit 30: software interrupts/exceptions may be injected with length 0 (A.6)."""
        return bool(self.msr(IA32_VMX_MISC) >> 30 & 1)
