"""The boot probe, decoded: CPU identity, VMX capability MSRs, DMAR units with CAP/ECAP, PCI functions.

Bit positions: Intel SDM Vol. 3D, Appendix A (VMX capability reporting), the VT-d specification
(rev. 4.x), sections 11.4.2 (CAP_REG) and 11.4.3 (ECAP_REG), and PCI Local Bus 3.0, 6.1
(configuration header: IDs at 0x00, class code and revision at 0x08, header type at 0x0E).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ..payload.pci import PCI_RECORD
from ..payload.records import Kind, Record

# VMX capability MSR numbers (SDM Vol. 3D, Appendix A) are the payload layer's.
from ..payload.vmx.controls import (  # noqa: E402
    IA32_FEATURE_CONTROL, IA32_VMX_BASIC, IA32_VMX_ENTRY_CTLS, IA32_VMX_EPT_VPID_CAP, IA32_VMX_EXIT_CTLS,
    IA32_VMX_MISC, IA32_VMX_PINBASED_CTLS, IA32_VMX_PROCBASED_CTLS, IA32_VMX_PROCBASED_CTLS2, IA32_VMX_VMFUNC,
)


def bits(value: int, hi: int, lo: int) -> int:
    return (value >> lo) & ((1 << (hi - lo + 1)) - 1)


@dataclass(frozen=True)
class DmarUnit:
    """One DRHD unit (VT-d 8.3) and its capability registers."""

    index: int
    base: int
    flags: int
    segment: int
    ver: int
    cap: int
    ecap: int
    registers_read: bool = True     # False: the base is beyond the payload's 4 GiB identity map

    # CAP_REG (VT-d 11.4.2)
    @property
    def sagaw(self) -> int:
        """Supported adjusted guest address widths, bits 12:8 (bit 1: 39-bit/3-level, 2: 48/4)."""
        return bits(self.cap, 12, 8)

    @property
    def levels(self) -> tuple[int, ...]:
        """Second-level page-table depths the unit supports (3, 4, 5)."""
        return tuple(lv for bit, lv in ((1, 3), (2, 4), (3, 5)) if self.sagaw >> bit & 1)

    @property
    def mgaw(self) -> int:
        return bits(self.cap, 21, 16) + 1

    @property
    def caching_mode(self) -> bool:
        return bool(self.cap >> 7 & 1)

    @property
    def rwbf(self) -> bool:
        return bool(self.cap >> 4 & 1)

    @property
    def num_domains(self) -> int:
        return 1 << (4 + 2 * bits(self.cap, 2, 0))

    @property
    def fault_recording_offset(self) -> int:
        """Byte offset of the first fault recording register (FRO, bits 33:24, in 16-byte units)."""
        return bits(self.cap, 33, 24) * 16

    @property
    def num_fault_records(self) -> int:
        return bits(self.cap, 47, 40) + 1

    @property
    def sllps(self) -> int:
        """Second-level large page support, bits 37:34 (bit 0: 2 MiB, bit 1: 1 GiB)."""
        return bits(self.cap, 37, 34)

    @property
    def psi(self) -> bool:
        return bool(self.cap >> 39 & 1)

    @property
    def mamv(self) -> int:
        return bits(self.cap, 53, 48)

    # ECAP_REG (VT-d 11.4.3)
    @property
    def qi(self) -> bool:
        return bool(self.ecap >> 1 & 1)

    @property
    def device_tlb(self) -> bool:
        return bool(self.ecap >> 2 & 1)

    @property
    def intremap(self) -> bool:
        return bool(self.ecap >> 3 & 1)

    @property
    def eim(self) -> bool:
        return bool(self.ecap >> 4 & 1)

    @property
    def pass_through(self) -> bool:
        return bool(self.ecap >> 6 & 1)

    @property
    def iotlb_offset(self) -> int:
        """Byte offset of the IOTLB registers (IRO, bits 17:8, in 16-byte units)."""
        return bits(self.ecap, 17, 8) * 16

    @property
    def scalable_mode(self) -> bool:
        return bool(self.ecap >> 43 & 1)


@dataclass(frozen=True)
class PciFunction:
    """One PCI function the probe found (bus 0 and behind bridges)."""

    bdf: int                  # bus 15:8, device 7:3, function 2:0: the VT-d source-id (3.4.1)
    vendor: int
    device: int
    class_code: int           # base class 23:16, subclass 15:8, programming interface 7:0
    revision: int
    header_type: int          # bits 6:0 layout (0 device, 1 PCI-to-PCI bridge), bit 7 multi-function
    bridge_buses: int = 0     # a bridge's dword 0x18: primary 7:0, secondary 15:8, subordinate 23:16

    @property
    def bus(self) -> int:
        return self.bdf >> 8

    @property
    def dev(self) -> int:
        return self.bdf >> 3 & 0x1F

    @property
    def fn(self) -> int:
        return self.bdf & 7

    @property
    def is_bridge(self) -> bool:
        return self.header_type & 0x7F == 1

    @property
    def secondary_bus(self) -> int | None:
        return self.bridge_buses >> 8 & 0xFF if self.is_bridge else None

    def __str__(self) -> str:
        return (f"{self.bus:02x}:{self.dev:02x}.{self.fn} {self.vendor:04x}:{self.device:04x} "
                f"class {self.class_code:06x}")


@dataclass
class Probe:
    """What the payload found at boot."""

    max_leaf: int = 0
    perfmon: int = 0            # CPUID.0AH:EAX (SDM Vol. 3B 20.2): version 7:0, GP counters 15:8
    vendor: str = ""
    signature: int = 0              # CPUID.1:EAX
    features_ecx: int = 0
    features_edx: int = 0
    msrs: dict[int, int] = field(default_factory=dict)        # readable MSRs
    msr_faults: dict[int, int] = field(default_factory=dict)  # MSR -> fault (0x100 | vector)
    dmar_table: int | None = None
    dmar_haw: int | None = None     # host address width (DMAR field + 1)
    dmar_flags: int = 0
    dmar_units: list[DmarUnit] = field(default_factory=list)
    apic_base: int | None = None    # IA32_APIC_BASE as found at boot
    apic_svr: int | None = None     # spurious-interrupt vector register as found
    apic_id: int | None = None
    pci: list[PciFunction] = field(default_factory=list)

    def pci_functions(self, vendor: int | None = None, device: int | None = None,
                      class_code: int | None = None) -> list[PciFunction]:
        """The functions matching every criterion given, in bus order (as enumerated)."""
        return [f for f in self.pci if (vendor is None or f.vendor == vendor)
                and (device is None or f.device == device)
                and (class_code is None or f.class_code == class_code)]

    @property
    def x2apic_found(self) -> bool:
        """Whether earlier software left the local APIC in x2APIC mode (EXTD, SDM Vol. 3A, 11.12.1)."""
        return bool(self.apic_base is not None and self.apic_base >> 10 & 1)

    @property
    def family(self) -> int:
        fam = bits(self.signature, 11, 8)
        return fam + bits(self.signature, 27, 20) if fam == 0xF else fam

    @property
    def model(self) -> int:
        model = bits(self.signature, 7, 4)
        if bits(self.signature, 11, 8) in (6, 0xF):
            model |= bits(self.signature, 19, 16) << 4
        return model

    @property
    def cpuid_vmx(self) -> bool:
        return bool(self.features_ecx >> 5 & 1)

    def msr(self, index: int) -> int | None:
        return self.msrs.get(index)

    def vmx_allowed1(self, index: int) -> int:
        """The allowed-1 settings (high half) of a VMX control capability MSR (0 if absent)."""
        return (self.msrs.get(index, 0) >> 32) & 0xFFFF_FFFF

    @classmethod
    def from_records(cls, records: list[Record]) -> "Probe":
        p = cls()
        for r in records:
            f = r.fields
            if r.kind == Kind.CPU:
                p.max_leaf = f[0]
                p.vendor = struct.pack("<III", f[1] & 0xFFFFFFFF, f[2] & 0xFFFFFFFF, f[3] & 0xFFFFFFFF).decode("ascii", "replace")
                p.signature, p.features_ecx, p.features_edx = f[4], f[6], f[7]
                p.perfmon = f[8] if len(f) > 8 else 0
            elif r.kind == Kind.MSR:
                if f[2]:
                    p.msr_faults[f[0]] = f[2]
                else:
                    p.msrs[f[0]] = f[1]
            elif r.kind == Kind.APIC:
                p.apic_base, p.apic_svr, p.apic_id = f[:3]
            elif r.kind == Kind.DMAR_UNIT:
                p.dmar_units.append(DmarUnit(*f[:7], registers_read=bool(f[7]) if len(f) > 7 else True))
            elif r.kind == PCI_RECORD:
                p.pci.append(PciFunction(f[0], f[1] & 0xFFFF, f[1] >> 16, f[2] >> 8, f[2] & 0xFF, f[3], f[4]))
            elif r.kind == Kind.DMAR:
                p.dmar_table, p.dmar_haw, p.dmar_flags = f[0], f[1] + 1, f[2]
            elif r.kind == Kind.PROBE_DONE:
                break
        return p


# Capability names of VMX features, each one bit of a capability MSR (SDM Vol. 3D, Appendix A).
# A control is offered when its allowed-1 setting (high half of the control MSR) is 1; the bit
# positions are those of the controls (SDM Vol. 3C, tables 25-5, 25-6, 25-7, 25-13 and 25-15).
PIN_CAPS = {"nmi_exiting": 3, "virtual_nmis": 5, "preemption_timer": 6, "posted_interrupts": 7}   # A.3.1
PROC_CAPS = {                                                                                         # A.3.2
    "interrupt_window": 2, "tsc_offsetting": 3, "hlt_exiting": 7, "invlpg_exiting": 9,
    "mwait_exiting": 10, "rdpmc_exiting": 11, "rdtsc_exiting": 12, "cr3_exiting": 15,
    "cr8_exiting": 19, "tpr_shadow": 21, "nmi_window": 22, "mov_dr_exiting": 23, "io_exiting": 24,
    "io_bitmaps": 25, "monitor_trap_flag": 27, "msr_bitmaps": 28, "monitor_exiting": 29,
    "pause_exiting": 30, "secondary_controls": 31,
}
PROC2_CAPS = {                                                                                        # A.3.3
    "virtualize_apic_accesses": 0, "ept": 1, "descriptor_table_exiting": 2, "rdtscp": 3,
    "x2apic_virtualization": 4, "vpid": 5, "wbinvd_exiting": 6, "unrestricted_guest": 7,
    "apic_register_virtualization": 8, "virtual_interrupt_delivery": 9, "pause_loop_exiting": 10,
    "rdrand_exiting": 11, "invpcid": 12, "vmfunc": 13, "vmcs_shadowing": 14, "rdseed_exiting": 16,
    "pml": 17, "ept_violation_ve": 18, "xsaves": 20,
}
# VM-exit controls (A.4): "save_*" store a guest MSR or value on exit, "exit_load_*" load the host's.
EXIT_CAPS = {
    "save_debug_controls": 2, "exit_load_perf_global_ctrl": 12, "ack_interrupt_on_exit": 15, "save_pat": 18,
    "exit_load_pat": 19, "save_efer": 20, "exit_load_efer": 21, "save_preemption_timer": 22,
}
# VM-entry controls (A.5): "load_debug_controls" loads DR7 and IA32_DEBUGCTL, "entry_load_*" the guest's MSR.
ENTRY_CAPS = {"load_debug_controls": 2, "entry_load_perf_global_ctrl": 13, "entry_load_pat": 14, "entry_load_efer": 15}
# IA32_VMX_MISC (A.6): activity states the guest may be entered in (bits 8:6: HLT, shutdown,
# wait-for-SIPI), VMWRITE to read-only (exit information) fields, event injection with
# instruction length 0.
MISC_CAPS = {"activity_hlt": 6, "activity_shutdown": 7, "activity_wait_sipi": 8, "vmwrite_any_field": 29,
             "inject_zero_length": 30}
EPT_CAPS = {                                                                                          # A.10
    "ept_execute_only": 0, "ept_4level": 6, "ept_uc": 8, "ept_wb": 14, "ept_2m": 16, "ept_1g": 17,
    "invept": 20, "ept_ad": 21, "invept_single": 25, "invept_all": 26, "invvpid": 32,
    "invvpid_address": 40, "invvpid_single": 41, "invvpid_all": 42, "invvpid_single_nonglobal": 43,
}
VMFUNC_CAPS = {"eptp_switching": 0}        # A.11: IA32_VMX_VMFUNC, VM function 0 (with "vmfunc" only)
# CPU features a guest instruction needs (CPUID.1:ECX, SDM Vol. 2A, CPUID, table 3-10): MONITOR/
# MWAIT, GETSEC (SMX), XSETBV (XSAVE; Linux may turn it off: then no guest has it), RDRAND.
CPUID1_ECX_CAPS = {"monitor_mwait": 3, "smx": 6, "xsave": 26, "rdrand": 30}
# Names that are not one bit: VMX usable, TRUE control MSRs (A.1, BASIC bit 55), and at least one
# CR3-target value (A.6: IA32_VMX_MISC bits 24:16, the number of CR3-target values; nested KVM
# reports 0), and an architectural PMU with general-purpose counters (CPUID.0AH:EAX bits 7:0 the
# version, 15:8 the counters, SDM Vol. 3B 20.2.1): without counters, IA32_PERF_GLOBAL_CTRL has no
# enable bit that is not reserved (neither Bochs nor nested KVM on Bochs has one).
OTHER_VMX_CAPS = ("vmx", "vmx.disabled_by_firmware", "true_controls", "cr3_targets", "perfmon_counters")
VMX_CAPABILITY_NAMES = frozenset([*OTHER_VMX_CAPS, *PIN_CAPS, *PROC_CAPS, *PROC2_CAPS, *EXIT_CAPS,
                                  *ENTRY_CAPS, *MISC_CAPS, *EPT_CAPS, *VMFUNC_CAPS, *CPUID1_ECX_CAPS])


def _bits_set(value: int, table: dict[str, int]) -> set[str]:
    return {name for name, bit in table.items() if value >> bit & 1}


def vmx_capabilities(p: Probe) -> set[str]:
    """VMX features the CPU reports (SDM Vol. 3D, A.1-A.10), by the names in the tables above."""
    caps: set[str] = set()
    basic = p.msrs.get(IA32_VMX_BASIC)
    if not p.cpuid_vmx or basic is None:
        return caps
    caps |= _bits_set(p.features_ecx, CPUID1_ECX_CAPS)
    if p.perfmon & 0xFF and bits(p.perfmon, 15, 8):
        caps.add("perfmon_counters")
    fc = p.msrs.get(IA32_FEATURE_CONTROL, 0)
    # Usable only if the lock bit is clear (we may set it) or VMXON outside SMX is enabled.
    if not (fc & 1) or (fc >> 2 & 1):
        caps.add("vmx")
    else:
        caps.add("vmx.disabled_by_firmware")
    true_ctls = bool(basic >> 55 & 1)
    if true_ctls:
        caps.add("true_controls")
    proc = p.vmx_allowed1(IA32_VMX_PROCBASED_CTLS)
    caps |= _bits_set(p.vmx_allowed1(IA32_VMX_PINBASED_CTLS), PIN_CAPS)
    caps |= _bits_set(proc, PROC_CAPS)
    if proc >> 31 & 1:                  # secondary controls exist only when they may be activated
        caps |= _bits_set(p.vmx_allowed1(IA32_VMX_PROCBASED_CTLS2), PROC2_CAPS)
    caps |= _bits_set(p.vmx_allowed1(IA32_VMX_EXIT_CTLS), EXIT_CAPS)
    caps |= _bits_set(p.vmx_allowed1(IA32_VMX_ENTRY_CTLS), ENTRY_CAPS)
    misc = p.msrs.get(IA32_VMX_MISC, 0)
    caps |= _bits_set(misc, MISC_CAPS)
    if bits(misc, 24, 16):
        caps.add("cr3_targets")
    if "vmfunc" in caps:                # IA32_VMX_VMFUNC exists only if VM functions may be enabled
        caps |= _bits_set(p.msrs.get(IA32_VMX_VMFUNC, 0), VMFUNC_CAPS)
    if "ept" in caps or "vpid" in caps:
        caps |= _bits_set(p.msrs.get(IA32_VMX_EPT_VPID_CAP, 0), EPT_CAPS)
    return caps


def vtd_capabilities(p: Probe) -> set[str]:
    caps: set[str] = set()
    units = [u for u in p.dmar_units if u.registers_read]   # a unit beyond 4 GiB cannot be driven
    if not units:
        return caps
    caps.add("vtd")
    u = units[0]
    if len(units) > 1:
        caps.add("vtd.multiple_units")
    flag_caps = {"vtd.qi": u.qi, "vtd.intremap": u.intremap, "vtd.eim": u.eim,
                 "vtd.pass_through": u.pass_through, "vtd.caching_mode": u.caching_mode,
                 "vtd.psi": u.psi, "vtd.device_tlb": u.device_tlb, "vtd.rwbf": u.rwbf,
                 "vtd.sl_2m": bool(u.sllps & 1), "vtd.sl_1g": bool(u.sllps & 2),
                 "vtd.scalable_mode": u.scalable_mode}
    caps |= {k for k, v in flag_caps.items() if v}
    caps |= {f"vtd.sagaw{lv}" for lv in u.levels}
    if p.dmar_flags & 1:
        caps.add("vtd.dmar_intr_remap")
    return caps


def capabilities(p: Probe, deny: tuple[str, ...] = ()) -> set[str]:
    """Every capability name the probe supports, less those the target's YAML withholds."""
    caps = vmx_capabilities(p) | vtd_capabilities(p)
    if p.vendor == "GenuineIntel":
        caps.add("intel")
    if p.features_ecx >> 21 & 1:        # CPUID.1:ECX.x2APIC (SDM Vol. 3A, 11.12.1)
        caps.add("x2apic")
    return {c for c in caps if c not in deny}
