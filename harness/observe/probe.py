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
    IA32_FEATURE_CONTROL, IA32_VMX_BASIC, IA32_VMX_EPT_VPID_CAP, IA32_VMX_PINBASED_CTLS,
    IA32_VMX_PROCBASED_CTLS, IA32_VMX_PROCBASED_CTLS2,
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
            elif r.kind == Kind.MSR:
                if f[2]:
                    p.msr_faults[f[0]] = f[2]
                else:
                    p.msrs[f[0]] = f[1]
            elif r.kind == Kind.APIC:
                p.apic_base, p.apic_svr, p.apic_id = f[:3]
            elif r.kind == Kind.DMAR_UNIT:
                p.dmar_units.append(DmarUnit(*f[:7]))
            elif r.kind == PCI_RECORD:
                p.pci.append(PciFunction(f[0], f[1] & 0xFFFF, f[1] >> 16, f[2] >> 8, f[2] & 0xFF, f[3], f[4]))
            elif r.kind == Kind.DMAR:
                p.dmar_table, p.dmar_haw, p.dmar_flags = f[0], f[1] + 1, f[2]
            elif r.kind == Kind.PROBE_DONE:
                break
        return p


def vmx_capabilities(p: Probe) -> set[str]:
    """VMX features the CPU reports (SDM Vol. 3D, A.1-A.10)."""
    caps: set[str] = set()
    basic = p.msrs.get(IA32_VMX_BASIC)
    if not p.cpuid_vmx or basic is None:
        return caps
    fc = p.msrs.get(IA32_FEATURE_CONTROL, 0)
    # Usable only if the lock bit is clear (we may set it) or VMXON outside SMX is enabled.
    if not (fc & 1) or (fc >> 2 & 1):
        caps.add("vmx")
    else:
        caps.add("vmx.disabled_by_firmware")
    true_ctls = bool(basic >> 55 & 1)
    if true_ctls:
        caps.add("true_controls")
    pin = p.vmx_allowed1(IA32_VMX_PINBASED_CTLS)
    proc = p.vmx_allowed1(IA32_VMX_PROCBASED_CTLS)
    proc2 = p.vmx_allowed1(IA32_VMX_PROCBASED_CTLS2) if proc >> 31 & 1 else 0
    named = {
        "nmi_exiting": pin >> 3 & 1, "virtual_nmis": pin >> 5 & 1, "preemption_timer": pin >> 6 & 1,
        "posted_interrupts": pin >> 7 & 1,
        "interrupt_window": proc >> 2 & 1, "tsc_offsetting": proc >> 3 & 1, "hlt_exiting": proc >> 7 & 1,
        "invlpg_exiting": proc >> 9 & 1, "mwait_exiting": proc >> 10 & 1, "rdpmc_exiting": proc >> 11 & 1,
        "rdtsc_exiting": proc >> 12 & 1, "cr3_exiting": proc >> 15 & 1, "cr8_exiting": proc >> 19 & 1,
        "tpr_shadow": proc >> 21 & 1, "nmi_window": proc >> 22 & 1, "mov_dr_exiting": proc >> 23 & 1,
        "io_exiting": proc >> 24 & 1, "io_bitmaps": proc >> 25 & 1, "monitor_trap_flag": proc >> 27 & 1,
        "msr_bitmaps": proc >> 28 & 1, "monitor_exiting": proc >> 29 & 1, "pause_exiting": proc >> 30 & 1,
        "secondary_controls": proc >> 31 & 1,
        "virtualize_apic_accesses": proc2 >> 0 & 1, "ept": proc2 >> 1 & 1, "descriptor_table_exiting": proc2 >> 2 & 1,
        "rdtscp": proc2 >> 3 & 1, "x2apic_virtualization": proc2 >> 4 & 1, "vpid": proc2 >> 5 & 1,
        "wbinvd_exiting": proc2 >> 6 & 1, "unrestricted_guest": proc2 >> 7 & 1,
        "pause_loop_exiting": proc2 >> 10 & 1, "rdrand_exiting": proc2 >> 11 & 1, "invpcid": proc2 >> 12 & 1,
        "vmfunc": proc2 >> 13 & 1, "vmcs_shadowing": proc2 >> 14 & 1, "rdseed_exiting": proc2 >> 16 & 1,
        "ept_violation_ve": proc2 >> 18 & 1, "xsaves": proc2 >> 20 & 1,
    }
    caps |= {k for k, v in named.items() if v}
    ept = p.msrs.get(IA32_VMX_EPT_VPID_CAP, 0) if ("ept" in caps or "vpid" in caps) else 0
    ept_named = {
        "ept_execute_only": ept >> 0 & 1, "ept_4level": ept >> 6 & 1, "ept_uc": ept >> 8 & 1,
        "ept_wb": ept >> 14 & 1, "ept_2m": ept >> 16 & 1, "ept_1g": ept >> 17 & 1, "invept": ept >> 20 & 1,
        "ept_ad": ept >> 21 & 1, "invept_single": ept >> 25 & 1, "invept_all": ept >> 26 & 1,
        "invvpid": ept >> 32 & 1, "invvpid_address": ept >> 40 & 1, "invvpid_single": ept >> 41 & 1,
        "invvpid_all": ept >> 42 & 1, "invvpid_single_nonglobal": ept >> 43 & 1,
    }
    caps |= {k for k, v in ept_named.items() if v}
    return caps


def vtd_capabilities(p: Probe) -> set[str]:
    caps: set[str] = set()
    if not p.dmar_units:
        return caps
    caps.add("vtd")
    u = p.dmar_units[0]
    if len(p.dmar_units) > 1:
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
