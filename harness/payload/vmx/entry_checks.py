"""VM-entry checks as data (Intel SDM Vol. 3C, 26.2.1-26.2.4, 26.3.1, 26.2.1.3 event injection).

Each generated ``Case`` perturbs one field or bit (sometimes a few fields that a rule relates)
of a valid baseline VMCS and says what VM entry must do:

* VMfailValid with error 7 (invalid control fields, 26.2.1) or 8 (invalid host state, 26.2.2-26.2.4);
* a VM-entry failure: exit reason 33 (invalid guest state, 26.3.1) with its qualification
  (0, or 4 for the VMCS link pointer; SDM 26.8 and table 28-?);
* entry, where the perturbed value is a legal boundary (any VM exit that is not an entry failure).

The expectations are computed from the probed capabilities (``VmxCaps``: allowed-0 / allowed-1
bits of the TRUE control MSRs, CR0/CR4 fixed bits, IA32_VMX_MISC, IA32_VMX_EPT_VPID_CAP) and the
processor's physical-address width, so the same generator serves any target.

The payload side is ``EC_ASM``: ``ec_run(baseline, cases, vmcs)`` runs a table of cases in one
call.  For each case it makes the VMCS clear and current (VMCLEAR, VMPTRLD), loads the whole
baseline (so every case starts from the same state whatever the previous case left), applies the
case's writes (``new = (VMREAD(field) & and_mask) ^ xor``), executes VMLAUNCH and emits one
ENTRY_CHECK record (case index, status, error or exit reason, qualification).  The baseline guest
runs with the VMX-preemption timer at 0, so an entry that succeeds exits before the guest's first
instruction (SDM 26.7.4 / 27.5.1); a host state that was legal but differs from the engine's is
put back (CRs, descriptor tables, selectors, PAT, EFER, FS/GS bases) right after the exit.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Iterable, Iterator

from ..image import Scenario
from ..layout import SCRATCH_BASE
from ..records import Kind as RecordKind, Record
from .builder import AR_CODE64, AR_DATA, AR_TSS64, AR_UNUSABLE, CS64, DS, TR, VmxTest
from .controls import (
    IA32_VMX_CR0_FIXED0, IA32_VMX_CR0_FIXED1, IA32_VMX_CR4_FIXED0, IA32_VMX_CR4_FIXED1,
    IA32_VMX_EPT_VPID_CAP, IA32_VMX_MISC, EntryCtl, ExitCtl, Pin, Proc, Proc2, VmxCaps,
)
from .fields import ENTRY_FAILURE as ENTRY_FAILURE_BIT, F, Exit, VmError
from .vmm import VMM_ASM

CPUID_KIND = RecordKind.CPUID
K_ENTRY_CHECK = 0x5F          # record kind: case index, status, error / exit reason, qualification
CASE_WORDS = 16               # one case in the payload's table: count, then up to 5 writes of 3
MAX_WRITES = 5
TABLE_END = (1 << 64) - 1
ALL = (1 << 64) - 1

# Encodings generated cases need that fields.py does not name (SDM Vol. 3D, Appendix B).
APIC_ACCESS_ADDR = 0x2014     # B.2.1
VMFUNC_CONTROLS = 0x2018      # B.2.1
VE_INFO_ADDR = 0x202A         # B.2.1 virtualization-exception information address
VMREAD_BITMAP = 0x2026        # B.2.1
VMWRITE_BITMAP = 0x2028       # B.2.1
PML_ADDRESS = 0x200E          # B.2.1

# Scratch pages the cases point at (zero at boot): an EPT PML4 and a virtual-APIC page.
EPT_PML4 = SCRATCH_BASE + 0x40_0000
VIRTUAL_APIC = SCRATCH_BASE + 0x40_1000

IA32_EFER_SCE, IA32_EFER_LME, IA32_EFER_LMA, IA32_EFER_NXE = 1 << 0, 1 << 8, 1 << 10, 1 << 11


class Status(enum.IntEnum):
    """Field 1 of an ENTRY_CHECK record."""

    ENTERED = 0         # VM entry succeeded; code = the exit reason of the exit that followed
    FAIL_INVALID = 1    # VMLAUNCH: VMfailInvalid
    FAIL_VALID = 2      # VMLAUNCH: VMfailValid; code = VM-instruction error
    ENTRY_FAILURE = 3   # exit with reason bit 31 set; code = full exit reason, with qualification
    WRITE_FAILED = 4    # a case's own VMWRITE failed; code = the field's encoding


@dataclass(frozen=True)
class Outcome:
    """What VM entry did (or must do)."""

    status: Status
    code: int = 0
    qualification: int = 0

    def matches(self, seen: "Outcome") -> bool:
        if self.status is Status.ENTERED:
            return seen.status is Status.ENTERED
        if self.status is Status.ENTRY_FAILURE:
            return (seen.status is Status.ENTRY_FAILURE and seen.code & 0xFFFF == self.code
                    and seen.qualification == self.qualification)
        return seen.status is self.status and seen.code == self.code

    def __str__(self) -> str:
        if self.status is Status.ENTERED:
            return "VM entry" + (f" (then exit {_exit_name(self.code)})" if self.code else "")
        if self.status is Status.FAIL_VALID:
            try:
                return f"VMfailValid error {self.code} ({VmError(self.code).name})"
            except ValueError:
                return f"VMfailValid error {self.code}"
        if self.status is Status.ENTRY_FAILURE:
            return f"entry failure, exit {_exit_name(self.code & 0xFFFF)} qualification {self.qualification}"
        if self.status is Status.WRITE_FAILED:
            return f"the case's VMWRITE of field {self.code:#x} failed"
        return "VMfailInvalid"


def _exit_name(reason: int) -> str:
    try:
        return f"{reason} ({Exit(reason).name})"
    except ValueError:
        return str(reason)


ENTERS = Outcome(Status.ENTERED)
ERROR_7 = Outcome(Status.FAIL_VALID, VmError.ENTRY_INVALID_CONTROLS)
ERROR_8 = Outcome(Status.FAIL_VALID, VmError.ENTRY_INVALID_HOST_STATE)
GUEST_STATE = Outcome(Status.ENTRY_FAILURE, Exit.ENTRY_FAIL_GUEST_STATE, 0)
LINK_POINTER = Outcome(Status.ENTRY_FAILURE, Exit.ENTRY_FAIL_GUEST_STATE, 4)   # 26.8, qualification 4


@dataclass(frozen=True)
class Write:
    """One VMWRITE of a case: ``field := (VMREAD(field) & and_mask) ^ xor``."""

    field: int
    and_mask: int
    xor: int

    @classmethod
    def set(cls, field: int, value: int) -> "Write":
        return cls(field, 0, value & ALL)

    @classmethod
    def flip(cls, field: int, bit: int) -> "Write":
        return cls(field, ALL, 1 << bit)

    @classmethod
    def bits(cls, field: int, mask: int, value: int) -> "Write":
        """Bits ``mask`` of the field := ``value`` (the rest kept)."""
        return cls(field, ~mask & ALL, value & mask)

    def apply(self, old: int) -> int:
        return (old & self.and_mask) ^ self.xor


@dataclass(frozen=True)
class Case:
    family: str              # rule family (one pytest verdict each)
    section: str             # SDM section of the rule
    name: str                # unique, says what was perturbed
    writes: tuple[Write, ...]
    expect: Outcome

    def words(self) -> list[int]:
        if len(self.writes) > MAX_WRITES:
            raise ValueError(f"case {self.name}: {len(self.writes)} writes, at most {MAX_WRITES}")
        out = [len(self.writes)]
        for w in self.writes:
            out += [int(w.field), w.and_mask & ALL, w.xor & ALL]
        return out + [0] * (CASE_WORDS - len(out))


def field_name(enc: int) -> str:
    try:
        return F(enc).name
    except ValueError:
        return {APIC_ACCESS_ADDR: "APIC_ACCESS_ADDR", VMFUNC_CONTROLS: "VMFUNC_CONTROLS",
                VE_INFO_ADDR: "VE_INFO_ADDR", VMREAD_BITMAP: "VMREAD_BITMAP",
                VMWRITE_BITMAP: "VMWRITE_BITMAP", PML_ADDRESS: "PML_ADDRESS"}.get(enc, f"{enc:#x}")


def canonical(value: int, width: int = 48) -> bool:
    """Bits 63:width-1 all equal (SDM Vol. 1, 3.3.7.1)."""
    top = value >> (width - 1)
    return top in (0, (1 << (65 - width)) - 1)


# ---------------------------------------------------------------------------------------------
# The baseline: what every case starts from.


@dataclass(frozen=True)
class Baseline:
    """The valid starting state, as far as the rules need to know it."""

    caps: VmxCaps
    phys_bits: int
    pin: int
    proc: int
    exit: int
    entry: int
    cr0: int          # guest and host CR0 (the engine's, read at run time; the rules' bits are fixed)
    cr4: int


def baseline_test(caps: VmxCaps) -> VmxTest:
    """The baseline guest: 64-bit, the preemption timer at 0 (an entry exits at once), every
    exception exiting, PAT and EFER loaded on entry and exit, and every field a case touches
    written explicitly (VMCLEAR does not reset field contents)."""
    v = VmxTest(caps, name="entry-checks")
    v.guest("vmcall\n")
    v.pin |= Pin.PREEMPTION_TIMER
    v.entry_ctls |= EntryCtl.LOAD_PAT & caps.entry.may1
    v.exit_ctls |= (ExitCtl.LOAD_PAT | ExitCtl.LOAD_EFER) & caps.exit.may1
    v.fields.update({
        F.PREEMPTION_TIMER: 0, F.PROC_CONTROLS2: 0, F.EPTP: EPT_PML4 | 6 | 3 << 3, F.VPID: 0,
        F.TSC_OFFSET: 0, F.IO_BITMAP_A: 0, F.IO_BITMAP_B: 0, F.MSR_BITMAP: 0,
        F.VIRTUAL_APIC_ADDR: VIRTUAL_APIC, F.TPR_THRESHOLD: 0, APIC_ACCESS_ADDR: 0,
        F.EXIT_MSR_STORE_ADDR: 0, F.EXIT_MSR_LOAD_ADDR: 0, F.ENTRY_MSR_LOAD_ADDR: 0,
        F.ENTRY_EXCEPTION_ERROR: 0, F.ENTRY_INSTR_LEN: 0, F.GUEST_PAT: 0, F.HOST_PAT: 0,
        F.HOST_EFER: 0,
    })
    # Only the CR3-target values the CPU has (IA32_VMX_MISC[24:16], SDM Vol. 3D A.6): nested KVM
    # offers none, and a VMWRITE to CR3_TARGET0 there fails with error 12 (unsupported component).
    v.fields.update({f: 0 for f in (F.CR3_TARGET0, F.CR3_TARGET1)[:caps.cr3_targets]})
    v.force[F.EXCEPTION_BITMAP] = 0xFFFF_FFFF
    return v


def _baseline(caps: VmxCaps, phys_bits: int) -> Baseline:
    ctl = baseline_test(caps).controls()
    fixed0 = caps.msr(IA32_VMX_CR0_FIXED0)
    # The engine's CR0/CR4 (vmx_on forces the fixed bits; 64-bit paging needs PAE).
    cr0 = fixed0 | 0x8000_0031
    cr4 = caps.msr(IA32_VMX_CR4_FIXED0) | 0x20
    return Baseline(caps, phys_bits, ctl[F.PIN_CONTROLS], ctl[F.PROC_CONTROLS], ctl[F.EXIT_CONTROLS],
                    ctl[F.ENTRY_CONTROLS], cr0, cr4)


# ---------------------------------------------------------------------------------------------
# Rule families.  Each function yields cases; ``generate`` concatenates them.


def _control_bit_outcome(b: Baseline, fld: int, bit: int) -> tuple[Outcome, str] | None:
    """Flipping one flexible control bit from the baseline: legal, or the dependent rule it
    breaks (26.2.1.1-26.2.1.3).  None: no case (the outcome depends on more than the SDM says)."""
    c = b.caps
    if fld == F.PIN_CONTROLS:
        return {0: (ENTERS, "external-interrupt exiting"), 3: (ENTERS, "NMI exiting"),
                5: (ERROR_7, "virtual NMIs needs NMI exiting (26.2.1.1)"),
                6: (ENTERS, "preemption timer off: the guest runs to its VMCALL"),
                7: (ERROR_7, "posted interrupts need virtual-interrupt delivery (26.2.1.1)")}.get(bit)
    if fld == F.PROC_CONTROLS:
        if bit == 22:
            return ERROR_7, "NMI-window exiting needs virtual NMIs (26.2.1.1)"
        if bit == 31:
            return ENTERS, "secondary controls with all secondary controls 0"
        if bit == 27:
            return ENTERS, "monitor trap flag (the guest exits before its first instruction)"
        if bit in (2, 3, 7, 9, 10, 11, 12, 15, 16, 19, 20, 23, 24, 29, 30):
            return ENTERS, "no dependent check"
        if bit in (25, 28):
            return ENTERS, "bitmap address 0 is 4-KByte aligned and inside the physical-address width"
        if bit == 21:
            return ENTERS, "TPR shadow: virtual-APIC page valid, TPR threshold 0 <= VTPR"
        return None
    if fld == F.PROC_CONTROLS2:
        return {0: (ENTERS, "APIC-access address 0 is valid"),
                1: (ENTERS, "EPT with a valid EPTP (WB, 4-level)"),
                2: (ENTERS, "no dependent check"), 3: (ENTERS, "no dependent check"),
                4: (ERROR_7, "virtualize x2APIC mode needs use TPR shadow (26.2.1.1)"),
                5: (ERROR_7, "enable VPID with VPID 0 (26.2.1.1)"),
                6: (ENTERS, "no dependent check"),
                7: (ERROR_7, "unrestricted guest needs enable EPT (26.2.1.1)"),
                8: (ERROR_7, "APIC-register virtualization needs use TPR shadow (26.2.1.1)"),
                9: (ERROR_7, "virtual-interrupt delivery needs external-interrupt exiting (26.2.1.1)"),
                10: (ENTERS, "no dependent check"), 11: (ENTERS, "no dependent check"),
                12: (ENTERS, "no dependent check"),
                13: (ENTERS, "VM-function controls 0"),
                14: (ENTERS, "VMREAD/VMWRITE bitmap addresses 0 are valid"),
                16: (ENTERS, "no dependent check"),
                17: (ERROR_7, "enable PML needs enable EPT (26.2.1.1)"),
                18: (ENTERS, "#VE information address 0 is valid"),
                20: (ENTERS, "no dependent check")}.get(bit)   # 25 (TSC scaling): see the note above
    if fld == F.EXIT_CONTROLS:
        if bit == ExitCtl.HOST_64BIT.bit_length() - 1:
            return ERROR_8, "host address-space size 0 on an IA-32e host (26.2.4)"
        return {2: (ENTERS, "save debug controls"), 12: (ENTERS, "load PERF_GLOBAL_CTRL 0"),
                15: (ENTERS, "acknowledge interrupt on exit"), 18: (ENTERS, "save PAT"),
                19: (ENTERS, "load PAT off"), 20: (ENTERS, "save EFER"), 21: (ENTERS, "load EFER off"),
                22: (ENTERS, "save preemption timer (timer active)")}.get(bit)
    if fld == F.ENTRY_CONTROLS:
        return {9: (GUEST_STATE, "IA-32e mode guest 0 with CS.L=1 and EFER.LMA=1 (26.3.1.1, 26.3.1.2)"),
                10: (ERROR_7, "entry to SMM outside SMM (26.2.1.3)"),
                11: (ERROR_7, "deactivate dual-monitor treatment outside SMM (26.2.1.3)"),
                13: (ENTERS, "load PERF_GLOBAL_CTRL 0"), 14: (ENTERS, "load PAT off"),
                15: (ENTERS, "load EFER off")}.get(bit)
    return None


def control_cases(b: Baseline) -> Iterator[Case]:
    """26.2.1.1-26.2.1.3: every bit of the five control fields against the TRUE capability MSRs:
    a must-be-1 bit cleared or a must-be-0 bit set is error 7; a flexible bit flipped alone is
    legal unless a dependent rule (named per bit) says otherwise."""
    c = b.caps
    fields = ((F.PIN_CONTROLS, c.pin, b.pin, "26.2.1.1"), (F.PROC_CONTROLS, c.proc, b.proc, "26.2.1.1"),
              (F.PROC_CONTROLS2, c.proc2, 0, "26.2.1.1"), (F.EXIT_CONTROLS, c.exit, b.exit, "26.2.1.2"),
              (F.ENTRY_CONTROLS, c.entry, b.entry, "26.2.1.3"))
    for fld, allowed, base, sec in fields:
        secondary = fld == F.PROC_CONTROLS2
        if secondary and not allowed.may1:
            continue
        for bit in range(32):
            m = 1 << bit
            extra = (Write.bits(F.PROC_CONTROLS, Proc.SECONDARY, Proc.SECONDARY),) if secondary else ()
            if allowed.must1 & m:
                yield Case("controls vs TRUE capability MSRs", sec, f"{field_name(fld)} bit {bit} cleared (allowed-0 says 1)",
                           extra + (Write.bits(fld, m, 0),), ERROR_7)
            elif not allowed.may1 & m:
                yield Case("controls vs TRUE capability MSRs", sec, f"{field_name(fld)} bit {bit} set (allowed-1 says 0)",
                           extra + (Write.bits(fld, m, m),), ERROR_7)
            else:
                got = _control_bit_outcome(b, fld, bit)
                if got is None:
                    continue
                outcome, why = got
                state = "cleared" if base & m else "set"
                yield Case("controls: flexible bits and their dependencies", sec,
                           f"{field_name(fld)} bit {bit} {state} alone: {why}", extra + (Write.flip(fld, bit),), outcome)


def _address_field_cases(b: Baseline, family: str, sec: str, fld: int, enable: tuple[Write, ...],
                         align_bits: int, legal_high: bool = True) -> Iterator[Case]:
    """An address control field with its enabling control set: bits below ``align_bits`` must be
    0, bits at or above the physical-address width must be 0; other bits are legal."""
    for bit in range(64):
        if bit < align_bits:
            exp, why = ERROR_7, "not aligned"
        elif bit >= b.phys_bits:
            exp, why = ERROR_7, f"beyond the {b.phys_bits}-bit physical-address width"
        elif legal_high:
            exp, why = ENTERS, "aligned, inside the physical-address width"
        else:
            continue
        yield Case(family, sec, f"{field_name(fld)} bit {bit} flipped: {why}", enable + (Write.flip(fld, bit),), exp)


def control_field_cases(b: Baseline) -> Iterator[Case]:
    """26.2.1.1-26.2.1.3: control fields that the controls make meaningful."""
    c = b.caps
    sec2 = Write.bits(F.PROC_CONTROLS, Proc.SECONDARY, Proc.SECONDARY)
    fam = "control fields: addresses"
    if c.proc.may1 & Proc.IO_BITMAPS:
        on = (Write.bits(F.PROC_CONTROLS, Proc.IO_BITMAPS, Proc.IO_BITMAPS),)
        yield from _address_field_cases(b, fam, "26.2.1.1", F.IO_BITMAP_A, on, 12)
        yield from _address_field_cases(b, fam, "26.2.1.1", F.IO_BITMAP_B, on, 12)
    if c.proc.may1 & Proc.MSR_BITMAPS:
        on = (Write.bits(F.PROC_CONTROLS, Proc.MSR_BITMAPS, Proc.MSR_BITMAPS),)
        yield from _address_field_cases(b, fam, "26.2.1.1", F.MSR_BITMAP, on, 12)
    if c.proc.may1 & Proc.TPR_SHADOW:
        on = (Write.bits(F.PROC_CONTROLS, Proc.TPR_SHADOW, Proc.TPR_SHADOW),)
        # Legal moves of the virtual-APIC page would read VTPR from elsewhere: only the failures.
        yield from _address_field_cases(b, fam, "26.2.1.1", F.VIRTUAL_APIC_ADDR, on, 12, legal_high=False)
        for bit in range(32):
            # TPR threshold bits 31:4 must be 0; bits 3:0 must not exceed VTPR[7:4] (= 0 here).
            why = "bits 31:4 must be 0" if bit >= 4 else "exceeds VTPR[7:4] = 0"
            yield Case("control fields: TPR threshold", "26.2.1.1", f"TPR_THRESHOLD bit {bit} set: {why}",
                       on + (Write.flip(F.TPR_THRESHOLD, bit),), ERROR_7)
    if c.proc2.may1 & Proc2.VIRTUALIZE_APIC:
        on = (sec2, Write.bits(F.PROC_CONTROLS2, Proc2.VIRTUALIZE_APIC, Proc2.VIRTUALIZE_APIC))
        yield from _address_field_cases(b, fam, "26.2.1.1", APIC_ACCESS_ADDR, on, 12)
    for fld, count in ((F.EXIT_MSR_STORE_ADDR, F.EXIT_MSR_STORE_COUNT), (F.EXIT_MSR_LOAD_ADDR, F.EXIT_MSR_LOAD_COUNT)):
        # 26.2.1.2: with a non-zero count the address is 16-byte aligned and inside the width.
        on = (Write.set(count, 1),)
        yield from _address_field_cases(b, "control fields: MSR-area addresses", "26.2.1.2", fld, on, 4,
                                        legal_high=False)
    yield from _address_field_cases(b, "control fields: MSR-area addresses", "26.2.1.3", F.ENTRY_MSR_LOAD_ADDR,
                                    (Write.set(F.ENTRY_MSR_LOAD_COUNT, 1),), 4, legal_high=False)
    # CR3-target count: at most IA32_VMX_MISC[24:16] (26.2.1.1).
    limit = c.cr3_targets
    for n in sorted({0, 1, limit - 1, limit, limit + 1, limit + 2, 8, 16, 255, 256, 511, 1 << 16, 1 << 31}):
        if n < 0:
            continue
        yield Case("control fields: CR3-target count", "26.2.1.1", f"CR3_TARGET_COUNT {n} (supported {limit})",
                   (Write.set(F.CR3_TARGET_COUNT, n),), ENTERS if n <= limit else ERROR_7)
    if c.proc2.may1 & Proc2.VPID:
        on = (sec2, Write.bits(F.PROC_CONTROLS2, Proc2.VPID, Proc2.VPID), Write.set(F.VPID, 1))
        for bit in range(16):
            yield Case("control fields: VPID", "26.2.1.1", f"VPID 1 with bit {bit} flipped",
                       on + (Write.flip(F.VPID, bit),), ERROR_7 if bit == 0 else ENTERS)
    if c.proc2.may1 & Proc2.EPT:
        yield from _eptp_cases(b, sec2)


def _eptp_cases(b: Baseline, sec2: Write) -> Iterator[Case]:
    """26.2.1.1: the EPT pointer (25.6.11): memory type UC (0) or WB (6) if IA32_VMX_EPT_VPID_CAP
    bits 8 / 14 say so; page-walk length 3 (4 levels; 4 for 5 levels if bit 7); bit 6 (A/D) only
    if bit 21; bits 11:7 reserved; no bits beyond the physical-address width."""
    cap = b.caps.msr(IA32_VMX_EPT_VPID_CAP)
    on = (sec2, Write.bits(F.PROC_CONTROLS2, Proc2.EPT, Proc2.EPT))
    fam, sec = "control fields: EPT pointer", "26.2.1.1"
    for mt in range(8):
        ok = (mt == 0 and cap >> 8 & 1) or (mt == 6 and cap >> 14 & 1)
        yield Case(fam, sec, f"EPTP memory type {mt}", on + (Write.bits(F.EPTP, 7, mt),), ENTERS if ok else ERROR_7)
    for walk in range(8):
        ok = walk == 3 and cap >> 6 & 1 or walk == 4 and cap >> 7 & 1
        yield Case(fam, sec, f"EPTP page-walk length {walk + 1}", on + (Write.bits(F.EPTP, 0x38, walk << 3),),
                   ENTERS if ok else ERROR_7)
    yield Case(fam, sec, "EPTP accessed/dirty enable", on + (Write.flip(F.EPTP, 6),),
               ENTERS if cap >> 21 & 1 else ERROR_7)
    for bit in range(7, 64):
        if bit < 12:
            exp = ERROR_7
        elif bit >= b.phys_bits:
            exp = ERROR_7
        else:
            exp = ENTERS
        yield Case(fam, sec, f"EPTP bit {bit} flipped", on + (Write.flip(F.EPTP, bit),), exp)


def _injection_outcome(b: Baseline, info: int, length: int = 0) -> Outcome:
    """26.2.1.3, VM-entry interruption-information field (25.8.3)."""
    if not info >> 31 & 1:
        return ENTERS
    vector, kind, has_error = info & 0xFF, info >> 8 & 7, info >> 11 & 1
    if kind == 1:
        return ERROR_7
    if kind == 7 and not (b.caps.proc.may1 & Proc.MONITOR_TRAP_FLAG):
        return ERROR_7
    if kind == 2 and vector != 2 or kind == 3 and vector > 31 or kind == 7 and vector != 0:
        return ERROR_7
    # Deliver-error-code: 1 exactly for hardware exceptions 8, 10-14, 17 when CR0.PE = 1.
    wants_error = kind == 3 and vector in (8, 10, 11, 12, 13, 14, 17)
    if has_error != wants_error:
        return ERROR_7
    if info & 0x7FFF_F000:
        return ERROR_7
    if kind in (4, 5, 6):
        zero_ok = b.caps.msr(IA32_VMX_MISC) >> 30 & 1
        if not (1 <= length <= 15 or length == 0 and zero_ok):
            return ERROR_7
    if kind == 0:                                   # 26.3.1.4: RFLAGS.IF must be 1 (baseline: 0)
        return GUEST_STATE
    return ENTERS


def injection_cases(b: Baseline) -> Iterator[Case]:
    """26.2.1.3: event injection: type, vector, deliver-error-code, reserved bits, instruction
    length; 26.3.1.4/26.3.1.5: the guest-state rules it brings (IF, interruptibility)."""
    fam, sec = "event injection", "26.2.1.3"
    valid = 1 << 31
    for vector in range(256):
        kind = 3
        wants = vector in (8, 10, 11, 12, 13, 14, 17)
        if vector == 21:
            continue                                   # #CP: error code only with CET (not probed)
        info = valid | kind << 8 | vector | (wants << 11)
        yield Case(fam, sec, f"hardware exception vector {vector}", (Write.set(F.ENTRY_INTR_INFO, info),),
                   _injection_outcome(b, info))
        if vector < 32:
            info ^= 1 << 11
            yield Case(fam, sec, f"hardware exception vector {vector}, deliver-error-code {int(not wants)}",
                       (Write.set(F.ENTRY_INTR_INFO, info),), _injection_outcome(b, info))
    for vector in range(256):
        info = valid | 2 << 8 | vector
        yield Case(fam, sec, f"NMI with vector {vector}", (Write.set(F.ENTRY_INTR_INFO, info),),
                   _injection_outcome(b, info))
    for kind in (1, 7):
        for vector in (0, 1, 2, 3, 31, 32, 255):
            info = valid | kind << 8 | vector
            yield Case(fam, sec, f"type {kind} vector {vector}", (Write.set(F.ENTRY_INTR_INFO, info),),
                       _injection_outcome(b, info))
    for kind, vector in ((4, 0x80), (5, 1), (6, 3)):
        for length in range(0, 17):
            info = valid | kind << 8 | vector
            yield Case(fam, sec, f"type {kind} vector {vector} instruction length {length}",
                       (Write.set(F.ENTRY_INTR_INFO, info), Write.set(F.ENTRY_INSTR_LEN, length)),
                       _injection_outcome(b, info, length))
    for bit in range(12, 31):
        info = valid | 3 << 8 | 6 | 1 << bit
        yield Case(fam, sec, f"#UD with reserved bit {bit} set", (Write.set(F.ENTRY_INTR_INFO, info),), ERROR_7)
    invalid_but_off = 1 << 8 | 0xFF                     # type 1, vector 255, valid bit clear
    yield Case(fam, sec, "reserved type with the valid bit clear is not checked",
               (Write.set(F.ENTRY_INTR_INFO, invalid_but_off),), ENTERS)
    # External interrupts: RFLAGS.IF must be 1; no blocking by STI or MOV SS (26.3.1.4, 26.3.1.5).
    fam2, sec2 = "event injection: guest-state rules", "26.3.1.5"
    if_on = Write.bits(F.GUEST_RFLAGS, 1 << 9, 1 << 9)
    for vector in (0, 1, 31, 32, 0x80, 255):
        info = valid | vector
        yield Case(fam2, "26.3.1.4", f"external interrupt {vector} with RFLAGS.IF=0",
                   (Write.set(F.ENTRY_INTR_INFO, info),), GUEST_STATE)
        yield Case(fam2, "26.3.1.4", f"external interrupt {vector} with RFLAGS.IF=1",
                   (Write.set(F.ENTRY_INTR_INFO, info), if_on), ENTERS)
        yield Case(fam2, sec2, f"external interrupt {vector} with blocking by STI",
                   (Write.set(F.ENTRY_INTR_INFO, info), if_on, Write.set(F.GUEST_INTERRUPTIBILITY, 1)), GUEST_STATE)
        yield Case(fam2, sec2, f"external interrupt {vector} with blocking by MOV SS",
                   (Write.set(F.ENTRY_INTR_INFO, info), if_on, Write.set(F.GUEST_INTERRUPTIBILITY, 2)), GUEST_STATE)
    nmi = valid | 2 << 8 | 2
    yield Case(fam2, sec2, "NMI with blocking by MOV SS",
               (Write.set(F.ENTRY_INTR_INFO, nmi), Write.set(F.GUEST_INTERRUPTIBILITY, 2)), GUEST_STATE)


def _fixed_bit_cases(b: Baseline, family: str, sec: str, fld: int, current: int, fixed0: int, fixed1: int,
                     fail: Outcome, extra_rules: dict[int, tuple[Outcome, str]],
                     skip: Iterable[int] = ()) -> Iterator[Case]:
    """Every bit of a CR field: a fixed-0 MSR bit that is 1 must stay 1, a fixed-1 MSR bit that
    is 0 must stay 0 (A.7, A.8); ``extra_rules`` name bits another rule constrains."""
    for bit in range(64):
        if bit in skip:
            continue
        m = 1 << bit
        state = ("cleared" if current & m else "set") if (fixed0 | ~fixed1) & m else "flipped"
        if bit in extra_rules:
            exp, why = extra_rules[bit]
        elif fixed0 & m and current & m:
            exp, why = fail, "fixed to 1 in VMX operation"
        elif not fixed1 & m and not current & m:
            exp, why = fail, "fixed to 0 in VMX operation"
        else:
            exp, why = ENTERS, "not fixed"
        yield Case(family, sec, f"{field_name(fld)} bit {bit} {state}: {why}", (Write.flip(fld, bit),), exp)


def cr_cases(b: Baseline) -> Iterator[Case]:
    """26.2.2 (host) and 26.3.1.1 (guest): CR0, CR4 against the fixed-bit MSRs, CR3 against the
    physical-address width, and the IA-32e rules (PAE, PG)."""
    c = b.caps
    f0, f1 = c.msr(IA32_VMX_CR0_FIXED0), c.msr(IA32_VMX_CR0_FIXED1)
    g0, g1 = c.msr(IA32_VMX_CR4_FIXED0), c.msr(IA32_VMX_CR4_FIXED1)
    pae = {5: (GUEST_STATE, "IA-32e mode guest needs CR4.PAE")}
    yield from _fixed_bit_cases(b, "guest CR0/CR3/CR4", "26.3.1.1", F.GUEST_CR0, b.cr0, f0, f1, GUEST_STATE, {})
    yield from _fixed_bit_cases(b, "guest CR0/CR3/CR4", "26.3.1.1", F.GUEST_CR4, b.cr4, g0, g1, GUEST_STATE, pae)
    # Host: legal changes are put back after the exit, but a host CR4 with SMEP/SMAP/PKE/PCIDE or
    # a CR0 with PG/WP... changed under the engine's own code is no test of VM entry: skip those.
    host_unsafe_cr4 = (7, 17, 20, 21, 22, 23)
    yield from _fixed_bit_cases(b, "host CR0/CR3/CR4", "26.2.2", F.HOST_CR0, b.cr0, f0, f1, ERROR_8, {}, skip=(16, 29, 30))
    yield from _fixed_bit_cases(b, "host CR0/CR3/CR4", "26.2.2", F.HOST_CR4, b.cr4, g0, g1, ERROR_8,
                                {5: (ERROR_8, "host address-space size 1 needs CR4.PAE (26.2.4)")}, skip=host_unsafe_cr4)
    for bit in range(64):
        beyond = bit >= b.phys_bits
        why = f"beyond the {b.phys_bits}-bit physical-address width" if beyond else "inside the width"
        yield Case("guest CR0/CR3/CR4", "26.3.1.1", f"GUEST_CR3 bit {bit} flipped: {why}",
                   (Write.flip(F.GUEST_CR3, bit),), GUEST_STATE if beyond else ENTERS)
        if beyond or bit in (3, 4):                   # PWT/PCD keep the host's mapping
            yield Case("host CR0/CR3/CR4", "26.2.2", f"HOST_CR3 bit {bit} flipped: {why}",
                       (Write.flip(F.HOST_CR3, bit),), ERROR_8 if beyond else ENTERS)


def _canonical_cases(family: str, sec: str, fld: int, fail: Outcome, legal_low: bool = True,
                     enable: tuple[Write, ...] = ()) -> Iterator[Case]:
    """A field that must be canonical, from a low canonical value: bits 47..63 flipped alone are
    non-canonical; bits 0..46 keep it canonical."""
    for bit in range(64):
        if bit >= 47:
            yield Case(family, sec, f"{field_name(fld)} bit {bit} flipped: non-canonical",
                       enable + (Write.flip(fld, bit),), fail)
        elif legal_low:
            yield Case(family, sec, f"{field_name(fld)} bit {bit} flipped: canonical",
                       enable + (Write.flip(fld, bit),), ENTERS)


def msr_field_cases(b: Baseline) -> Iterator[Case]:
    """26.2.2 / 26.3.1.1: SYSENTER ESP/EIP canonical, DR7 and IA32_DEBUGCTL reserved bits, PAT
    entries, EFER reserved bits and its LMA/LME consistency."""
    for fld in (F.GUEST_SYSENTER_ESP, F.GUEST_SYSENTER_EIP):
        yield from _canonical_cases("guest MSR fields", "26.3.1.1", fld, GUEST_STATE)
    for fld in (F.HOST_SYSENTER_ESP, F.HOST_SYSENTER_EIP):
        yield from _canonical_cases("host MSR fields", "26.2.2", fld, ERROR_8)
    for bit in range(64):
        yield Case("guest DR7 and IA32_DEBUGCTL", "26.3.1.1", f"GUEST_DR7 bit {bit} set",
                   (Write.flip(F.GUEST_DR7, bit),), GUEST_STATE if bit >= 32 else ENTERS)
    for bit in list(range(0, 2)) + list(range(2, 6)) + list(range(16, 64)):
        # Bits 2-5 and 16-63 are reserved in IA32_DEBUGCTL on every Intel 64 model (SDM Vol. 3B,
        # 17.4.1 and table 2-?); bits 6-15 are model-specific and left out.
        yield Case("guest DR7 and IA32_DEBUGCTL", "26.3.1.1", f"GUEST_DEBUGCTL bit {bit} set",
                   (Write.flip(F.GUEST_DEBUGCTL, bit),), GUEST_STATE if bit >= 2 else ENTERS)
    # PAT: each of the 8 entries must be 0, 1, 4, 5, 6 or 7 (SDM Vol. 3A, 11.12.2).
    for guest in (True, False):
        fld = F.GUEST_PAT if guest else F.HOST_PAT
        fail = GUEST_STATE if guest else ERROR_8
        fam = "guest PAT and EFER" if guest else "host PAT and EFER"
        for entry in range(8):
            for value in (0, 1, 2, 3, 4, 5, 6, 7, 8, 0x10, 0x40, 0x80):
                exp = ENTERS if value in (0, 1, 4, 5, 6, 7) else fail
                yield Case(fam, "26.3.1.1" if guest else "26.2.2", f"{field_name(fld)} entry {entry} = {value:#x}",
                           (Write.bits(fld, 0xFF << 8 * entry, value << 8 * entry),), exp)
    # EFER: reserved bits 0; LMA = IA-32e mode guest (host: = host address-space size); with
    # CR0.PG = 1, LME = LMA.  Intel defines SCE (0), LME (8), LMA (10), NXE (11).
    for guest in (True, False):
        fld = F.GUEST_EFER if guest else F.HOST_EFER
        fail = GUEST_STATE if guest else ERROR_8
        fam = "guest PAT and EFER" if guest else "host PAT and EFER"
        for bit in range(64):
            m = 1 << bit
            if m in (IA32_EFER_SCE, IA32_EFER_NXE):
                exp, why = ENTERS, "defined bit"
            elif m in (IA32_EFER_LME, IA32_EFER_LMA):
                exp, why = fail, "LMA/LME must match the (guest or host) address-space size"
            else:
                exp, why = fail, "reserved"
            yield Case(fam, "26.3.1.1" if guest else "26.2.2", f"{field_name(fld)} bit {bit} flipped: {why}",
                       (Write.flip(fld, bit),), exp)


def host_segment_cases(b: Baseline) -> Iterator[Case]:
    """26.2.3: host selectors (RPL and TI 0; CS and TR non-null; SS may be null for a 64-bit
    host), bases of FS, GS, TR, GDTR, IDTR canonical; 26.2.4: host RIP canonical."""
    fam, sec = "host selectors and bases", "26.2.3"
    # The builder's host selectors (GDT of engine.py): CS 0x08, SS/DS/ES 0x10, FS/GS 0, TR 0x28.
    sels = {F.HOST_ES_SEL: DS, F.HOST_CS_SEL: CS64, F.HOST_SS_SEL: DS, F.HOST_DS_SEL: DS,
            F.HOST_FS_SEL: 0, F.HOST_GS_SEL: 0, F.HOST_TR_SEL: TR}
    for fld, base in sels.items():
        for bit in range(16):
            if bit < 3:
                yield Case(fam, sec, f"{field_name(fld)} bit {bit} set: RPL/TI must be 0",
                           (Write.bits(fld, 1 << bit, 1 << bit),), ERROR_8)
            elif fld == F.HOST_TR_SEL:
                continue                       # a legal TR would leave a foreign TSS loaded
            elif fld == F.HOST_CS_SEL and base ^ 1 << bit == 0:
                yield Case(fam, sec, f"{field_name(fld)} bit {bit} flipped: null CS",
                           (Write.flip(fld, bit),), ERROR_8)
            else:
                yield Case(fam, sec, f"{field_name(fld)} bit {bit} flipped: selector {base ^ 1 << bit:#x} is legal",
                           (Write.flip(fld, bit),), ENTERS)
    yield Case(fam, sec, "HOST_CS_SEL null", (Write.set(F.HOST_CS_SEL, 0),), ERROR_8)
    yield Case(fam, sec, "HOST_TR_SEL null", (Write.set(F.HOST_TR_SEL, 0),), ERROR_8)
    yield Case(fam, sec, "HOST_SS_SEL null with a 64-bit host is legal", (Write.set(F.HOST_SS_SEL, 0),), ENTERS)
    for fld in (F.HOST_FS_BASE, F.HOST_GS_BASE, F.HOST_GDTR_BASE, F.HOST_IDTR_BASE):
        yield from _canonical_cases(fam, sec, fld, ERROR_8)
    yield from _canonical_cases(fam, sec, F.HOST_TR_BASE, ERROR_8, legal_low=False)
    yield from _canonical_cases("host RIP", "26.2.4", F.HOST_RIP, ERROR_8, legal_low=False)


# Guest segments (26.3.1.2) for a 64-bit guest without unrestricted guest and RFLAGS.VM = 0.


@dataclass(frozen=True)
class Seg:
    sel: int
    base: int
    limit: int
    ar: int

    @property
    def unusable(self) -> bool:
        return bool(self.ar >> 16 & 1)


SEG_FIELDS = {  # name: (selector, base, limit, access rights)
    "CS": (F.GUEST_CS_SEL, F.GUEST_CS_BASE, F.GUEST_CS_LIMIT, F.GUEST_CS_AR),
    "SS": (F.GUEST_SS_SEL, F.GUEST_SS_BASE, F.GUEST_SS_LIMIT, F.GUEST_SS_AR),
    "DS": (F.GUEST_DS_SEL, F.GUEST_DS_BASE, F.GUEST_DS_LIMIT, F.GUEST_DS_AR),
    "ES": (F.GUEST_ES_SEL, F.GUEST_ES_BASE, F.GUEST_ES_LIMIT, F.GUEST_ES_AR),
    "FS": (F.GUEST_FS_SEL, F.GUEST_FS_BASE, F.GUEST_FS_LIMIT, F.GUEST_FS_AR),
    "GS": (F.GUEST_GS_SEL, F.GUEST_GS_BASE, F.GUEST_GS_LIMIT, F.GUEST_GS_AR),
    "TR": (F.GUEST_TR_SEL, F.GUEST_TR_BASE, F.GUEST_TR_LIMIT, F.GUEST_TR_AR),
    "LDTR": (F.GUEST_LDTR_SEL, F.GUEST_LDTR_BASE, F.GUEST_LDTR_LIMIT, F.GUEST_LDTR_AR),
}
TSS_BASE_STANDIN = 0x0010_0000       # the real TSS is somewhere low; only canonical-ness matters
BASE_SEGS = {
    "CS": Seg(0x08, 0, 0xFFFF_FFFF, AR_CODE64), "SS": Seg(0x10, 0, 0xFFFF_FFFF, AR_DATA),
    "DS": Seg(0x10, 0, 0xFFFF_FFFF, AR_DATA), "ES": Seg(0x10, 0, 0xFFFF_FFFF, AR_DATA),
    "FS": Seg(0x10, 0, 0xFFFF_FFFF, AR_DATA), "GS": Seg(0x10, 0, 0xFFFF_FFFF, AR_DATA),
    "TR": Seg(0x28, TSS_BASE_STANDIN, 0x67, AR_TSS64), "LDTR": Seg(0, 0, 0, AR_UNUSABLE),
}


def _limit_granularity_ok(s: Seg) -> bool:
    """26.3.1.2: a 0 in limit bits 11:0 needs G = 0; a 1 in limit bits 31:20 needs G = 1."""
    g = s.ar >> 15 & 1
    if s.limit & 0xFFF != 0xFFF and g:
        return False
    if s.limit >> 20 & 0xFFF and not g:
        return False
    return True


def segment_violations(segs: dict[str, Seg]) -> list[str]:
    """The 26.3.1.2 rules a 64-bit (IA-32e mode) guest's segment state breaks, without
    unrestricted guest and with RFLAGS.VM = 0."""
    out = []
    cs, ss = segs["CS"], segs["SS"]
    # Selectors.
    if segs["TR"].sel & 4:
        out.append("TR.TI must be 0")
    if not segs["LDTR"].unusable and segs["LDTR"].sel & 4:
        out.append("LDTR.TI must be 0")
    if ss.sel & 3 != cs.sel & 3:
        out.append("SS.RPL must equal CS.RPL")
    # Bases (IA-32e processors).
    for n in ("TR", "FS", "GS"):
        if not canonical(segs[n].base):
            out.append(f"{n} base must be canonical")
    if not segs["LDTR"].unusable and not canonical(segs["LDTR"].base):
        out.append("LDTR base must be canonical")
    if cs.base >> 32:
        out.append("CS base bits 63:32 must be 0")
    for n in ("SS", "DS", "ES"):
        if not segs[n].unusable and segs[n].base >> 32:
            out.append(f"{n} base bits 63:32 must be 0")
    # CS access rights.
    t, dpl = cs.ar & 0xF, cs.ar >> 5 & 3
    if t not in (9, 11, 13, 15):
        out.append("CS type must be 9, 11, 13 or 15")
    if not cs.ar >> 4 & 1:
        out.append("CS.S must be 1")
    if t in (9, 11) and dpl != ss.ar >> 5 & 3:
        out.append("non-conforming CS: DPL must equal SS.DPL")
    if t in (13, 15) and dpl > ss.ar >> 5 & 3:
        out.append("conforming CS: DPL must not exceed SS.DPL")
    if not cs.ar >> 7 & 1:
        out.append("CS.P must be 1")
    if cs.ar >> 8 & 0xF or cs.ar >> 17:
        out.append("CS reserved access-rights bits must be 0")
    if not _limit_granularity_ok(cs):
        out.append("CS limit/granularity")
    if cs.ar >> 13 & 1 and cs.ar >> 14 & 1:
        out.append("IA-32e mode guest with CS.L = 1 needs CS.D = 0")
    # SS.
    if not ss.unusable:
        if ss.ar & 0xF not in (3, 7):
            out.append("SS type must be 3 or 7")
        if ss.ar >> 5 & 3 != ss.sel & 3:
            out.append("SS.DPL must equal SS.RPL")
    # DS, ES, FS, GS, SS (when usable).
    for n in ("SS", "DS", "ES", "FS", "GS"):
        s = segs[n]
        if s.unusable:
            continue
        t = s.ar & 0xF
        if not t & 1:
            out.append(f"{n} type must have the accessed bit")
        if t & 8 and not t & 2:
            out.append(f"{n}: a code segment must be readable")
        if not s.ar >> 4 & 1:
            out.append(f"{n}.S must be 1")
        if n != "SS" and t <= 11 and s.ar >> 5 & 3 < s.sel & 3:
            out.append(f"{n}.DPL must not be below its RPL")
        if not s.ar >> 7 & 1:
            out.append(f"{n}.P must be 1")
        if s.ar >> 8 & 0xF or s.ar >> 17:
            out.append(f"{n} reserved access-rights bits must be 0")
        if not _limit_granularity_ok(s):
            out.append(f"{n} limit/granularity")
    # TR: 64-bit busy TSS, never unusable.
    tr = segs["TR"]
    if tr.ar & 0xF != 11:
        out.append("TR type must be 11 in IA-32e mode")
    if tr.ar >> 4 & 1:
        out.append("TR.S must be 0")
    if not tr.ar >> 7 & 1:
        out.append("TR.P must be 1")
    if tr.ar >> 8 & 0xF or tr.ar >> 17:
        out.append("TR reserved access-rights bits must be 0")
    if tr.unusable:
        out.append("TR must be usable")
    if not _limit_granularity_ok(tr):
        out.append("TR limit/granularity")
    ldtr = segs["LDTR"]
    if not ldtr.unusable:
        if ldtr.ar & 0xF != 2:
            out.append("LDTR type must be 2")
        if ldtr.ar >> 4 & 1:
            out.append("LDTR.S must be 0")
        if not ldtr.ar >> 7 & 1:
            out.append("LDTR.P must be 1")
        if ldtr.ar >> 8 & 0xF or ldtr.ar >> 17:
            out.append("LDTR reserved access-rights bits must be 0")
        if not _limit_granularity_ok(ldtr):
            out.append("LDTR limit/granularity")
    return out


def _seg_case(name: str, part: str, bit: int, width: int) -> Case | None:
    segs = dict(BASE_SEGS)
    s = segs[name]
    m = 1 << bit
    changed = {"sel": Seg(s.sel ^ m, s.base, s.limit, s.ar), "base": Seg(s.sel, s.base ^ m, s.limit, s.ar),
               "limit": Seg(s.sel, s.base, s.limit ^ m, s.ar), "ar": Seg(s.sel, s.base, s.limit, s.ar ^ m)}[part]
    segs[name] = changed
    if name == "CS" and part == "ar" and bit == 16:
        return None            # the SDM gives no rule for an unusable CS
    if name == "TR" and part == "base" and bit < 47:
        return None            # a moved TSS: legal, but nothing the check is about
    broken = segment_violations(segs)
    sel, base, limit, ar = SEG_FIELDS[name]
    fld = {"sel": sel, "base": base, "limit": limit, "ar": ar}[part]
    why = "; ".join(broken) if broken else "legal"
    return Case(f"guest segment {part}", "26.3.1.2", f"{name} {part} bit {bit} flipped: {why}",
                (Write.flip(fld, bit),), GUEST_STATE if broken else ENTERS)


def guest_segment_cases(b: Baseline) -> Iterator[Case]:
    """26.3.1.2: every bit of every guest segment's selector, base, limit and access rights,
    judged by ``segment_violations``; plus the descriptor-table registers (26.3.1.3)."""
    for name in SEG_FIELDS:
        for part, width in (("sel", 16), ("base", 64), ("limit", 32), ("ar", 32)):
            for bit in range(width):
                c = _seg_case(name, part, bit, width)
                if c is not None:
                    yield c
    # A few multi-field rules: DPL 3 code with DPL 3 stack is legal; mismatched is not.
    cs_sel, _, _, cs_ar = SEG_FIELDS["CS"]
    ss_sel, _, _, ss_ar = SEG_FIELDS["SS"]
    ring3 = (Write.bits(cs_sel, 3, 3), Write.bits(ss_sel, 3, 3), Write.bits(cs_ar, 0x60, 0x60), Write.bits(ss_ar, 0x60, 0x60))
    yield Case("guest segment combinations", "26.3.1.2", "CS and SS at ring 3 (RPL = DPL = 3)", ring3, ENTERS)
    yield Case("guest segment combinations", "26.3.1.2", "ring-3 CS with a ring-0 stack",
               ring3[:1] + ring3[2:3] + (Write.bits(ss_sel, 3, 3),), GUEST_STATE)
    for sel_rpl in range(4):
        yield Case("guest segment combinations", "26.3.1.2", f"DS with RPL {sel_rpl} and DPL 3",
                   (Write.bits(SEG_FIELDS["DS"][0], 3, sel_rpl), Write.bits(SEG_FIELDS["DS"][3], 0x60, 0x60)), ENTERS)
    for t in range(16):
        for n in ("CS", "DS", "SS", "TR"):
            segs = dict(BASE_SEGS)
            s = segs[n]
            segs[n] = Seg(s.sel, s.base, s.limit, s.ar & ~0xF | t)
            yield Case("guest segment combinations", "26.3.1.2", f"{n} type {t}",
                       (Write.bits(SEG_FIELDS[n][3], 0xF, t),), GUEST_STATE if segment_violations(segs) else ENTERS)
    fam, sec = "guest GDTR/IDTR", "26.3.1.3"
    for fld in (F.GUEST_GDTR_BASE, F.GUEST_IDTR_BASE):
        yield from _canonical_cases(fam, sec, fld, GUEST_STATE)
    for fld in (F.GUEST_GDTR_LIMIT, F.GUEST_IDTR_LIMIT):
        for bit in range(32):
            yield Case(fam, sec, f"{field_name(fld)} bit {bit} flipped", (Write.flip(fld, bit),),
                       GUEST_STATE if bit >= 16 else ENTERS)


def guest_register_cases(b: Baseline) -> Iterator[Case]:
    """26.3.1.4: RIP (canonical in 64-bit mode) and RFLAGS (reserved bits, bit 1, VM)."""
    yield from _canonical_cases("guest RIP and RFLAGS", "26.3.1.4", F.GUEST_RIP, GUEST_STATE)
    for bit in range(64):
        if bit == 1:
            exp, why = GUEST_STATE, "bit 1 must be 1"
        elif bit in (3, 5, 15) or bit >= 22:
            exp, why = GUEST_STATE, "reserved"
        elif bit == 17:
            exp, why = GUEST_STATE, "VM must be 0 in IA-32e mode"
        else:
            exp, why = ENTERS, "legal"
        yield Case("guest RIP and RFLAGS", "26.3.1.4", f"GUEST_RFLAGS bit {bit} flipped: {why}",
                   (Write.flip(F.GUEST_RFLAGS, bit),), exp)


def guest_nonregister_cases(b: Baseline) -> Iterator[Case]:
    """26.3.1.5: activity state, interruptibility state, pending debug exceptions, VMCS link
    pointer."""
    fam, sec = "guest activity and interruptibility", "26.3.1.5"
    supported = b.caps.msr(IA32_VMX_MISC) >> 6 & 7      # A.6: bit 6 HLT, 7 shutdown, 8 wait-for-SIPI
    for bit in range(32):
        value = 1 << bit
        if value == 1:
            exp = ENTERS if supported & 1 else GUEST_STATE
        elif value in (2,):
            continue                    # shutdown: legal, but what the timer then does is unspecified
        else:
            exp = GUEST_STATE
        yield Case(fam, sec, f"GUEST_ACTIVITY = {value:#x}", (Write.set(F.GUEST_ACTIVITY, value),), exp)
    if supported & 1:
        cs_sel, _, _, cs_ar = SEG_FIELDS["CS"]
        ss_sel, _, _, ss_ar = SEG_FIELDS["SS"]
        ring3 = (Write.bits(cs_sel, 3, 3), Write.bits(ss_sel, 3, 3), Write.bits(cs_ar, 0x60, 0x60),
                 Write.bits(ss_ar, 0x60, 0x60))
        yield Case(fam, sec, "HLT with SS.DPL = 3", ring3 + (Write.set(F.GUEST_ACTIVITY, 1),), GUEST_STATE)
        yield Case(fam, sec, "active with SS.DPL = 3", ring3, ENTERS)
    if_on = Write.bits(F.GUEST_RFLAGS, 1 << 9, 1 << 9)
    intr = F.GUEST_INTERRUPTIBILITY
    for bit in range(32):
        if bit == 0:
            exp, why = GUEST_STATE, "blocking by STI with RFLAGS.IF = 0"
        elif bit == 1:
            exp, why = ENTERS, "blocking by MOV SS"
        elif bit == 2:
            exp, why = GUEST_STATE, "blocking by SMI outside SMM"
        elif bit == 3:
            exp, why = ENTERS, "blocking by NMI"
        elif bit == 4:
            continue                    # enclave interruption: depends on SGX
        else:
            exp, why = GUEST_STATE, "reserved"
        yield Case(fam, sec, f"GUEST_INTERRUPTIBILITY bit {bit} set: {why}", (Write.set(intr, 1 << bit),), exp)
    yield Case(fam, sec, "blocking by STI with RFLAGS.IF = 1", (if_on, Write.set(intr, 1)), ENTERS)
    yield Case(fam, sec, "blocking by STI and by MOV SS", (if_on, Write.set(intr, 3)), GUEST_STATE)
    if supported & 1:
        yield Case(fam, sec, "HLT with blocking by STI", (if_on, Write.set(intr, 1), Write.set(F.GUEST_ACTIVITY, 1)),
                   GUEST_STATE)
        yield Case(fam, sec, "HLT with blocking by MOV SS", (Write.set(intr, 2), Write.set(F.GUEST_ACTIVITY, 1)),
                   GUEST_STATE)
        yield Case(fam, sec, "HLT with blocking by NMI", (Write.set(intr, 8), Write.set(F.GUEST_ACTIVITY, 1)), ENTERS)
    # Pending debug exceptions: bits 11:4, 13, 15, 63:17 reserved (bit 16, RTM, left out).
    pend = F.GUEST_PENDING_DBG
    fam2 = "guest pending debug exceptions"
    for bit in range(64):
        if bit == 16:
            continue
        reserved = 4 <= bit <= 11 or bit in (13, 15) or bit >= 17
        yield Case(fam2, sec, f"GUEST_PENDING_DBG bit {bit} set" + (": reserved" if reserved else ""),
                   (Write.set(pend, 1 << bit),), GUEST_STATE if reserved else ENTERS)
    # With blocking by MOV SS (or HLT), BS (bit 14) must be 1 iff RFLAGS.TF = 1 and DEBUGCTL.BTF = 0.
    tf = 1 << 8
    for tf_on in (0, 1):
        for btf in (0, 1):
            for bs in (0, 1):
                want = tf_on and not btf
                writes = (Write.set(intr, 2), Write.bits(F.GUEST_RFLAGS, tf, tf if tf_on else 0),
                          Write.set(F.GUEST_DEBUGCTL, 2 if btf else 0), Write.set(pend, bs << 14))
                yield Case(fam2, sec, f"blocking by MOV SS, TF={tf_on} BTF={btf} BS={bs}", writes,
                           ENTERS if bool(bs) == bool(want) else GUEST_STATE)
    # VMCS link pointer: not all ones means a shadow VMCS that must exist (qualification 4).
    fam3 = "guest VMCS link pointer"
    for bit in range(64):
        yield Case(fam3, sec, f"VMCS_LINK_POINTER bit {bit} cleared", (Write.flip(F.VMCS_LINK_POINTER, bit),),
                   LINK_POINTER)


FAMILIES = (control_cases, control_field_cases, injection_cases, cr_cases, msr_field_cases,
            host_segment_cases, guest_segment_cases, guest_register_cases, guest_nonregister_cases)


def generate_grouped(caps: VmxCaps, phys_bits: int) -> dict[str, list[Case]]:
    """The cases of each rule group (keyed by the generating function's name)."""
    b = _baseline(caps, phys_bits)
    return {fam.__name__: list(fam(b)) for fam in FAMILIES}


def generate(caps: VmxCaps, phys_bits: int) -> list[Case]:
    """Every entry-check case for a target with these capabilities and physical-address width."""
    cases = [c for group in generate_grouped(caps, phys_bits).values() for c in group]
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})[:3]
        raise ValueError(f"entry-check case names are not unique: {dup}")
    return cases


# ---------------------------------------------------------------------------------------------
# Building and decoding.


def scenario(caps: VmxCaps, cases: list[Case], name: str = "vmx-entry-checks") -> Scenario:
    """One image that runs ``cases`` with ``ec_run`` (one ENTRY_CHECK record each)."""
    sc = Scenario(name=name, probe=False)
    sc.asm.append(VMM_ASM)
    sc.asm.append(EC_ASM)
    words: list[int] = []
    for c in cases:
        words += c.words()
    words += [TABLE_END] + [0] * (CASE_WORDS - 1)
    table = sc.arena.place(struct.pack(f"<{len(words)}Q", *words), align=64)
    v = baseline_test(caps)
    v.call_after("ec_run", "vt0_vmcs_table", table, "VMCS")
    v.build(sc, 0)
    return sc


def phys_bits_scenario() -> Scenario:
    """A boot that reports CPUID.80000008H:EAX[7:0], the physical-address width the address
    rules depend on (SDM Vol. 3A, 4.1.4)."""
    sc = Scenario(name="vmx-phys-bits", probe=False)
    sc.steps.cpuid(0x8000_0008, 0)
    return sc


def phys_bits_from(records: list[Record]) -> int:
    for r in records:
        if r.kind == CPUID_KIND and len(r.fields) >= 4 and r.fields[1] == 0x8000_0008:
            return r.fields[3] & 0xFF
    raise ValueError("no CPUID 0x80000008 record in the run")


def decode(records: list[Record]) -> dict[int, Outcome]:
    """Case index -> what the payload saw, from the ENTRY_CHECK records of a run."""
    out: dict[int, Outcome] = {}
    for r in records:
        if r.kind == K_ENTRY_CHECK and len(r.fields) >= 4:
            index, status, code, qual = r.fields[:4]
            try:
                st = Status(status)
            except ValueError:
                continue
            if st is Status.ENTERED:
                out[index] = Outcome(st, code & 0xFFFF)
            elif st is Status.ENTRY_FAILURE:
                out[index] = Outcome(st, code, qual)
            else:
                out[index] = Outcome(st, code)
    return out


def _w(enc: int) -> str:
    return f"{int(enc):#x}"


EC_ASM = rf"""
.set K_ENTRY_CHECK, {K_ENTRY_CHECK:#x}
.section .text
.code64

# ec_run(rdi = baseline VMCS table (vmcs_load format), rsi = case table, rdx = VMCS region)
#   -> rax = cases run.  One ENTRY_CHECK record per case: index, status, code, qualification.
# Loop state lives in memory: a guest that ran may have changed any general register.
.globl ec_run
ec_run:
    push rbx
    push rbp
    push r12
    push r13
    push r14
    push r15
    mov [rip + ec_base], rdi
    mov [rip + ec_case], rsi
    mov [rip + ec_vmcs], rdx
    mov qword ptr [rip + ec_index], 0
    mov rax, cr0
    mov [rip + ec_cr0], rax
    mov rax, cr3
    mov [rip + ec_cr3], rax
    mov rax, cr4
    mov [rip + ec_cr4], rax
    sgdt [rip + ec_gdtr]
    sidt [rip + ec_idtr]
    mov ax, cs
    mov [rip + ec_sel], ax
    mov ax, ds
    mov [rip + ec_sel + 2], ax
    mov ax, es
    mov [rip + ec_sel + 4], ax
    mov ax, ss
    mov [rip + ec_sel + 6], ax
    mov ax, fs
    mov [rip + ec_sel + 8], ax
    mov ax, gs
    mov [rip + ec_sel + 10], ax
    lea rbx, [rip + ec_msrs]
    lea r14, [rip + ec_msr_list]
    xor ebp, ebp
1:  mov ecx, [r14 + rbp*4]
    rdmsr
    mov [rbx + rbp*8], eax
    mov [rbx + rbp*8 + 4], edx
    inc ebp
    cmp ebp, 4
    jb 1b

.Lec_next:
    mov rbx, [rip + ec_case]
    mov rax, [rbx]
    cmp rax, -1
    je .Lec_done
    vmclear [rip + ec_vmcs]
    vmptrld [rip + ec_vmcs]
    mov rdi, [rip + ec_base]
    call vmcs_load
    # Values only known at run time: the engine's PAT and EFER, the exit's landing point.
    mov ecx, {_w(F.HOST_PAT)}
    mov rax, [rip + ec_msrs]
    vmwrite rcx, rax
    mov ecx, {_w(F.GUEST_PAT)}
    vmwrite rcx, rax
    mov ecx, {_w(F.HOST_EFER)}
    mov rax, [rip + ec_msrs + 8]
    vmwrite rcx, rax
    mov ecx, {_w(F.HOST_RIP)}
    lea rax, [rip + ec_exit]
    vmwrite rcx, rax
    mov ecx, {_w(F.HOST_RSP)}
    vmwrite rcx, rsp
    # The case's writes: field := (VMREAD(field) & and) ^ xor.
    mov rbx, [rip + ec_case]
    mov r12, [rbx]
    lea r13, [rbx + 8]
2:  test r12, r12
    jz 4f
    mov rdx, [r13]
    xor eax, eax
    vmread rax, rdx
    and rax, [r13 + 8]
    xor rax, [r13 + 16]
    vmwrite rdx, rax
    jbe 3f                              # CF or ZF: VMfailInvalid / VMfailValid (30.2)
    add r13, 24
    dec r12
    jmp 2b
3:  mov qword ptr [rip + rec_buf + 8], {int(Status.WRITE_FAILED)}
    mov [rip + rec_buf + 16], rdx
    mov qword ptr [rip + rec_buf + 24], 0
    jmp .Lec_record
4:  vmlaunch
    pushfq
    pop r11
    mov qword ptr [rip + rec_buf + 16], 0
    mov qword ptr [rip + rec_buf + 24], 0
    mov eax, {int(Status.FAIL_INVALID)}
    test r11, 1
    jnz 5f
    mov ecx, {_w(F.VM_INSTRUCTION_ERROR)}
    vmread rdx, rcx
    mov [rip + rec_buf + 16], rdx
    mov eax, {int(Status.FAIL_VALID)}
5:  mov [rip + rec_buf + 8], rax
    jmp .Lec_record

.balign 16
ec_exit:
    # Put the engine's own host state back: the case may have loaded a legal but different one
    # (27.5.1-27.5.3 load CRs, selectors, bases, PAT, EFER; GDTR/IDTR limits become 0xFFFF).
    mov rax, [rip + ec_cr4]
    mov cr4, rax
    mov rax, [rip + ec_cr0]
    mov cr0, rax
    mov rax, [rip + ec_cr3]
    mov cr3, rax
    lgdt [rip + ec_gdtr]
    lidt [rip + ec_idtr]
    mov ax, [rip + ec_sel + 2]
    mov ds, ax
    mov ax, [rip + ec_sel + 4]
    mov es, ax
    mov ax, [rip + ec_sel + 6]
    mov ss, ax
    mov ax, [rip + ec_sel + 8]
    mov fs, ax
    mov ax, [rip + ec_sel + 10]
    mov gs, ax
    movzx eax, word ptr [rip + ec_sel]
    push rax
    lea rax, [rip + 6f]
    push rax
    retfq                               # reload CS from the engine's GDT
6:  lea rbx, [rip + ec_msrs]
    lea r14, [rip + ec_msr_list]
    xor ebp, ebp
7:  mov ecx, [r14 + rbp*4]
    mov eax, [rbx + rbp*8]
    mov edx, [rbx + rbp*8 + 4]
    wrmsr
    inc ebp
    cmp ebp, 4
    jb 7b
    mov ecx, {_w(F.EXIT_REASON)}
    vmread rax, rcx
    mov [rip + rec_buf + 16], rax
    mov ecx, {_w(F.EXIT_QUALIFICATION)}
    vmread rdx, rcx
    mov [rip + rec_buf + 24], rdx
    mov ecx, {int(Status.ENTERED)}
    mov edx, {int(Status.ENTRY_FAILURE)}
    bt eax, 31
    cmovc ecx, edx
    mov [rip + rec_buf + 8], rcx

.Lec_record:
    mov rax, [rip + ec_index]
    mov [rip + rec_buf], rax
    mov edi, K_ENTRY_CHECK
    mov esi, 4
    call emit_buf
    inc qword ptr [rip + ec_index]
    add qword ptr [rip + ec_case], {CASE_WORDS * 8}
    jmp .Lec_next

.Lec_done:
    vmclear [rip + ec_vmcs]
    vmptrld [rip + ec_vmcs]
    mov rax, [rip + ec_index]
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbp
    pop rbx
    ret

.section .data
.balign 4
ec_msr_list: .long 0x277, 0xC0000080, 0xC0000100, 0xC0000101   # PAT, EFER, FS base, GS base

.section .bss
.balign 16
ec_base:  .skip 8
ec_case:  .skip 8
ec_vmcs:  .skip 8
ec_index: .skip 8
ec_cr0:   .skip 8
ec_cr3:   .skip 8
ec_cr4:   .skip 8
ec_msrs:  .skip 32
ec_sel:   .skip 16
.balign 16
ec_gdtr:  .skip 16
ec_idtr:  .skip 16
.section .text
"""
