"""Platform checks: the firmware's ACPI DMAR (VT-d 4.1, chapter 8) and the CPU's VMX set-up
(Intel SDM Vol. 3D, appendix A), each a function that returns its findings.

One boot gives every check its input (``take_snapshot``): the boot probe's MSRs and PCI functions
and the ACPI tables ``acpi_dump`` reported, with what each DRHD's register base answered.  A
finding names the field at fault (``DMAR@0x7ffe2259.DRHD@0x30.register_base``) and what was
expected; a check that has nothing to look at on a platform raises ``NotApplicable`` with the
reason (no RMRR, interrupt remapping not supported, no VMX), which a test turns into a skip.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from ..payload.acpi import Source, dump_scenario
from ..payload.vmx.controls import (
    IA32_FEATURE_CONTROL, IA32_VMX_BASIC, IA32_VMX_CR0_FIXED0, IA32_VMX_CR0_FIXED1, IA32_VMX_CR4_FIXED0,
    IA32_VMX_CR4_FIXED1, IA32_VMX_ENTRY_CTLS, IA32_VMX_EPT_VPID_CAP, IA32_VMX_EXIT_CTLS, IA32_VMX_MISC,
    IA32_VMX_PINBASED_CTLS, IA32_VMX_PROCBASED_CTLS, IA32_VMX_PROCBASED_CTLS2, IA32_VMX_TRUE_ENTRY_CTLS,
    IA32_VMX_TRUE_EXIT_CTLS, IA32_VMX_TRUE_PINBASED_CTLS, IA32_VMX_TRUE_PROCBASED_CTLS, IA32_VMX_VMCS_ENUM,
)
from .dmar import (LAYOUTS, AcpiDump, AcpiTable, DeviceScope, Dmar, Hpet, Madt, RegisterRead, Rsdp, Structure,
                   table_checksum_ok)
from .probe import PciFunction, Probe

PAGE = 0x1000


@dataclass(frozen=True)
class Finding:
    """One thing a check found wrong: the field (a dotted path) and what is wrong with it."""

    check: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class NotApplicable(Exception):
    """The check has nothing to examine on this platform; the message says why."""


# ---------------------------------------------------------------------------------------------
# Input

@dataclass
class DmarContext:
    """One DMAR table with what the checks compare it against: the register reads at its DRHD
    bases (by structure offset), the PCI functions the probe found, the MADT and HPET tables."""

    table: AcpiTable
    dmar: Dmar
    reads: dict[int, RegisterRead] = field(default_factory=dict)
    pci: list[PciFunction] = field(default_factory=list)
    madt: Madt | None = None
    hpets: list[Hpet] = field(default_factory=list)
    origin: str = ""             # which target and evidence the table came from (for messages)

    @classmethod
    def from_bytes(cls, data: bytes, address: int = 0x7FFE_0000, **kw: Any) -> "DmarContext":
        """A context for a table given as bytes (unit tests, tools)."""
        table = AcpiTable(0, address, "DMAR", int.from_bytes(data[4:8], "little") if len(data) >= 8 else len(data),
                          Source.ENTRY, True, data)
        return cls(table, Dmar.parse(data), **kw)

    def where(self, rest: str = "") -> str:
        return f"{self.table.name}.{rest}" if rest else self.table.name

    @property
    def drhds(self) -> list[Structure]:
        return self.dmar.of("DRHD")

    def read(self, drhd: Structure) -> RegisterRead | None:
        return self.reads.get(drhd.offset)

    @property
    def ir_supported(self) -> bool:
        """Whether interrupt remapping is on offer: the DMAR says so or a unit reports ECAP.IR."""
        return self.dmar.intr_remap or any(r.read and r.ir for r in self.reads.values())

    def scopes(self, *types: int) -> list[tuple[Structure, DeviceScope]]:
        return [(s, sc) for s in self.dmar.structures for sc in s.scopes if not types or sc.type in types]


@dataclass
class PlatformSnapshot:
    """One boot's worth of platform facts: the probe and the ACPI tables."""

    target: str
    probe: Probe
    acpi: AcpiDump
    evidence: Path | None = None

    @classmethod
    def from_run(cls, target: str, run: Any) -> "PlatformSnapshot":
        return cls(target, run.probe, AcpiDump.from_records(run.records), Path(run.evidence))

    def _parsed(self, signature: str, parse: Callable[[bytes], Any]) -> list[Any]:
        return [parse(t.data) for t in self.acpi.of(signature) if t.data]

    @property
    def madt(self) -> Madt | None:
        found = self._parsed("APIC", Madt.parse)
        return found[0] if found else None

    @property
    def hpets(self) -> list[Hpet]:
        found = [Hpet.parse(t.data, self.acpi.hpet_reads.get(t.number)) for t in self.acpi.of("HPET") if t.data]
        return [h for h in found if h is not None]

    def dmar_contexts(self) -> list[DmarContext]:
        """Every DMAR table the root table lists, in its order (an OS uses the first)."""
        madt, hpets = self.madt, self.hpets
        out = []
        for t in self.acpi.of("DMAR"):
            reads = {off: r for (num, off), r in self.acpi.drhd_reads.items() if num == t.number}
            out.append(DmarContext(t, Dmar.parse(t.data), reads, list(self.probe.pci), madt, hpets, self.describe()))
        return out

    def firmware_dmar(self) -> DmarContext:
        """The DMAR an OS would use (the first listed); NotApplicable when there is none."""
        found = self.dmar_contexts()
        if not found:
            raise NotApplicable(f"target {self.target}: the ACPI tables hold no DMAR (no VT-d reported)")
        return found[0]

    def describe(self) -> str:
        return f"target {self.target} (evidence: {self.evidence})"


def take_snapshot(target: Any, rsdp: int = 0, evidence: Path | None = None) -> PlatformSnapshot:
    """Boot ``target`` (the ``vtx_target`` fixture or a variant of it; or, with ``evidence``, a
    plain harness Target) once with the probe and ``acpi_dump``; the run must end cleanly and
    report its tables."""
    if evidence is None:
        run = target.run(dump_scenario(rsdp)).expect_ok()
    else:
        from .runner import run_scenario
        run = run_scenario(target, dump_scenario(rsdp), evidence).expect_ok()
    snap = PlatformSnapshot.from_run(target.name, run)
    if not snap.acpi.done:
        raise AssertionError(f"target {target.name}: acpi_dump did not finish (evidence: {run.evidence})")
    return snap


# ---------------------------------------------------------------------------------------------
# DMAR checks (VT-d 4.1, chapter 8).  Each takes a DmarContext and returns its findings.

DmarCheck = Callable[[DmarContext], list[Finding]]
DMAR_CHECKS: dict[str, DmarCheck] = {}


def dmar_check(fn: DmarCheck) -> DmarCheck:
    DMAR_CHECKS[fn.__name__] = fn
    return fn


def _f(ctx: DmarContext, check: Callable, rest: str, message: str) -> Finding:
    return Finding(check.__name__, ctx.where(rest), message)


@dmar_check
def checksum(ctx: DmarContext) -> list[Finding]:
    """The whole table, as long as its header says, sums to 0 (ACPI 6.5, 5.2.6)."""
    t = ctx.table
    if not t.complete:
        return [_f(ctx, checksum, "length", f"only {len(t.data)} of {t.length} bytes could be read: no checksum")]
    if not table_checksum_ok(t.data):
        return [_f(ctx, checksum, "checksum", f"{t.data[9]:#04x} leaves the table summing to "
                                              f"{sum(t.data) & 0xFF:#04x}, not 0")]
    return []


@dmar_check
def length(ctx: DmarContext) -> list[Finding]:
    """The header's length covers the fixed 48 bytes (VT-d 8.1) and every remapping structure's
    length (8.2) ends inside the table, so the structures tile it exactly."""
    out = []
    if ctx.table.length < 48:
        out.append(_f(ctx, length, "length", f"{ctx.table.length}, below the 48 bytes of the DMAR's fixed fields"))
    out += [_f(ctx, length, p.field, p.message) for p in ctx.dmar.problems if ".scope@" not in p.field]
    return out


@dmar_check
def header_reserved(ctx: DmarContext) -> list[Finding]:
    """The DMAR's reserved bytes 38-47 and flags bits 7:3 are 0 (VT-d 8.1, table 8-1)."""
    out = []
    if any(ctx.dmar.reserved):
        out.append(_f(ctx, header_reserved, "reserved", f"bytes 38-47 are {ctx.dmar.reserved.hex()}, expected 0"))
    if ctx.dmar.flags & 0xF8:
        out.append(_f(ctx, header_reserved, "flags", f"{ctx.dmar.flags:#04x} sets reserved bits 7:3"))
    return out


@dmar_check
def host_address_width(ctx: DmarContext) -> list[Finding]:
    """Host address width (the field + 1) is a physical address width: 32..52 bits (VT-d 8.1;
    52 is the architectural MAXPHYADDR limit, SDM Vol. 3A, 4.1.4)."""
    haw = ctx.dmar.host_address_width
    if haw is None or not 32 <= haw <= 52:
        return [_f(ctx, host_address_width, "host_address_width", f"{haw} bits, expected 32..52")]
    return []


@dmar_check
def structure_types(ctx: DmarContext) -> list[Finding]:
    """Every remapping structure has a defined type, 0-6 (VT-d 8.2, table 8-2: others reserved)."""
    return [_f(ctx, structure_types, f"{s.label}.type", f"{s.type} is reserved (defined: 0-6)")
            for s in ctx.dmar.structures if s.type > 6]


@dmar_check
def structure_reserved(ctx: DmarContext) -> list[Finding]:
    """Reserved fields and flag bits of every remapping structure are 0 (VT-d 8.3-8.9), and so is
    byte 3 of every device scope (8.3.1, table 8-3)."""
    out = []
    for s in ctx.dmar.structures:
        layout = LAYOUTS.get(s.type)
        for name, mask in (layout.reserved_bits if layout else ()):
            if s[name] & mask:
                out.append(_f(ctx, structure_reserved, f"{s.label}.{name}",
                              f"{s[name]:#x} sets reserved bits {s[name] & mask:#x}"))
        for sc in s.scopes:
            if sc.reserved:
                out.append(_f(ctx, structure_reserved, f"{s.label}.scope@{sc.offset:#x}.reserved",
                              f"{sc.reserved:#04x}, expected 0"))
    return out


@dmar_check
def drhd_present(ctx: DmarContext) -> list[Finding]:
    """At least one DRHD: a DMAR without a remapping unit describes nothing (VT-d 8.3)."""
    return [] if ctx.drhds else [_f(ctx, drhd_present, "DRHD", "no DRHD structure in the table")]


@dmar_check
def drhd_base_aligned(ctx: DmarContext) -> list[Finding]:
    """Each DRHD's register base is 4 KiB aligned, and aligned to its register set's size
    (2^Size pages, Size bits 3:0) (VT-d 8.3, table 8-5)."""
    out = []
    for d in ctx.drhds:
        align = PAGE << (d["size"] & 0xF)
        if d["register_base"] % align:
            out.append(_f(ctx, drhd_base_aligned, f"{d.label}.register_base",
                          f"{d['register_base']:#x} is not {align:#x}-aligned"))
    return out


@dmar_check
def drhd_answers_ver(ctx: DmarContext) -> list[Finding]:
    """A remapping unit answers at each DRHD's register base: VER_REG reads a version of at least
    1.0 with its reserved bits 31:8 clear (VT-d 11.4.1), not all ones (nothing there).  A base the
    payload did not read (at or above 4 GiB, beyond its identity map: legal, VT-d 8.3 gives the base
    64 bits) is no finding against the firmware; when no base could be read, NotApplicable names them."""
    out = []
    unread = []
    for d in ctx.drhds:
        r = ctx.read(d)
        where = f"{d.label}.register_base"
        if r is None or not r.read:
            unread.append(f"{ctx.where(where)} {d['register_base']:#x}")
        elif r.ver == 0xFFFF_FFFF or r.ver >> 8 or (r.ver >> 4 & 0xF) == 0:
            out.append(_f(ctx, drhd_answers_ver, where, f"VER_REG at {d['register_base']:#x} reads {r.ver:#x}: "
                                                        "no remapping unit answers there"))
    if ctx.drhds and len(unread) == len(ctx.drhds):
        raise NotApplicable(f"no DRHD register base could be read (beyond the payload's 4 GiB identity map): "
                            f"{', '.join(unread)}")
    return out


@dmar_check
def drhd_bases_unique(ctx: DmarContext) -> list[Finding]:
    """No two DRHDs describe the same register set (VT-d 8.3: one structure per unit)."""
    seen: dict[int, Structure] = {}
    out = []
    for d in ctx.drhds:
        base = d["register_base"]
        if base in seen:
            out.append(_f(ctx, drhd_bases_unique, f"{d.label}.register_base",
                          f"{base:#x} is also the base of {seen[base].label}"))
        seen.setdefault(base, d)
    return out


@dmar_check
def include_pci_all_once(ctx: DmarContext) -> list[Finding]:
    """At most one DRHD per PCI segment sets INCLUDE_PCI_ALL (VT-d 8.3)."""
    counts = Counter(d["segment"] for d in ctx.drhds if d["flags"] & 1)
    out = []
    for d in ctx.drhds:
        if d["flags"] & 1 and counts[d["segment"]] > 1:
            out.append(_f(ctx, include_pci_all_once, f"{d.label}.flags",
                          f"INCLUDE_PCI_ALL is one of {counts[d['segment']]} in segment {d['segment']}"))
    return out


@dmar_check
def include_pci_all_last(ctx: DmarContext) -> list[Finding]:
    """The DRHD with INCLUDE_PCI_ALL comes after every other DRHD of its segment (VT-d 8.3: it
    takes the devices no earlier DRHD claims)."""
    out = []
    drhds = ctx.drhds
    for i, d in enumerate(drhds):
        later = [e for e in drhds[i + 1:] if e["segment"] == d["segment"]]
        if d["flags"] & 1 and later:
            out.append(_f(ctx, include_pci_all_last, f"{d.label}.flags",
                          f"INCLUDE_PCI_ALL precedes {later[0].label} of segment {d['segment']}"))
    return out


# Which scope types each structure may hold (VT-d 8.3-8.9).
_PCI_SCOPES = {1, 2}
_ALLOWED_SCOPES = {"DRHD": {1, 2, 3, 4, 5}, "RMRR": _PCI_SCOPES, "ATSR": {2}, "SATC": {1}, "SIDP": _PCI_SCOPES}


@dmar_check
def scopes_well_formed(ctx: DmarContext) -> list[Finding]:
    """Every device scope has a whole (device, function) path inside its structure, a defined
    type that its structure may hold (RMRR, SATC: endpoints; ATSR: root ports as sub-hierarchies;
    IOAPIC, HPET and ACPI devices only under a DRHD), and path entries that are a device 0-31 and
    a function 0-7 (VT-d 8.3.1)."""
    out = [_f(ctx, scopes_well_formed, p.field, p.message) for p in ctx.dmar.problems if ".scope@" in p.field]
    for s, sc in ctx.scopes():
        where = f"{s.label}.scope@{sc.offset:#x}"
        allowed = _ALLOWED_SCOPES.get(s.kind, set())
        if sc.type not in allowed:
            out.append(_f(ctx, scopes_well_formed, f"{where}.type",
                          f"{sc.type} ({sc.type_name}) is not allowed in a {s.kind} (allowed: {sorted(allowed)})"))
        for dev, fn in sc.path:
            if dev > 31 or fn > 7:
                out.append(_f(ctx, scopes_well_formed, f"{where}.path",
                              f"entry ({dev:#x}, {fn:#x}): device must be 0-31, function 0-7"))
    return out


def resolve_path(pci: list[PciFunction], start_bus: int, path: tuple[tuple[int, int], ...]) -> tuple[PciFunction | None, str]:
    """Walk a scope's path through PCI configuration space (VT-d 8.3.1.3): each hop but the
    last must be a bridge whose secondary bus the next hop is on.  Returns the function reached
    (None when absent) and, if absent, why."""
    by_bdf = {f.bdf: f for f in pci}
    bus = start_bus
    fn: PciFunction | None = None
    for i, (dev, func) in enumerate(path):
        fn = by_bdf.get(bus << 8 | (dev & 0x1F) << 3 | (func & 7))
        if fn is None:
            return None, f"no function at {bus:02x}:{dev:02x}.{func} (hop {i + 1} of {len(path)})"
        if i < len(path) - 1:
            if not fn.is_bridge or fn.secondary_bus is None:
                return None, f"{fn} (hop {i + 1}) is not a bridge, yet the path goes on"
            bus = fn.secondary_bus
    return fn, ""


@dmar_check
def scopes_in_pci(ctx: DmarContext) -> list[Finding]:
    """Every PCI endpoint and sub-hierarchy scope names a function present in configuration space:
    an endpoint a type-0 header, a sub-hierarchy a bridge (VT-d 8.3.1).  Segment 0 only: the
    probe enumerates it through 0xCF8/0xCFC."""
    out = []
    for s, sc in ctx.scopes(1, 2):
        if s.values.get("segment", 0) != 0:
            continue
        where = f"{s.label}.scope@{sc.offset:#x}.path"
        fn, why = resolve_path(ctx.pci, sc.start_bus, sc.path)
        if fn is None:
            out.append(_f(ctx, scopes_in_pci, where, f"{sc}: {why}"))
        elif (sc.type == 2) != fn.is_bridge:
            out.append(_f(ctx, scopes_in_pci, where, f"{sc} reaches {fn}, which is "
                                                     f"{'a bridge' if fn.is_bridge else 'not a bridge'}"))
    return out


def _require_ir(ctx: DmarContext) -> None:
    if not ctx.ir_supported:
        raise NotApplicable(f"{ctx.where()}: interrupt remapping is not supported (DMAR INTR_REMAP clear, "
                            "no unit reports ECAP.IR)")


def _requester_id_findings(ctx: DmarContext, check: Callable, s: Structure, sc: DeviceScope) -> list[Finding]:
    where = f"{s.label}.scope@{sc.offset:#x}.path"
    if len(sc.path) != 1:
        return [_f(ctx, check, where, f"{sc}: an {sc.type_name} scope needs exactly one path entry, "
                                      f"the requester ID (VT-d 8.3.1.1), has {len(sc.path)}")]
    dev, fn = sc.path[0]
    if dev > 31 or fn > 7:
        return [_f(ctx, check, where, f"{sc}: ({dev:#x}, {fn:#x}) is no requester ID")]
    return []


def _duplicate_rids(ctx: DmarContext, check: Callable, types: tuple[int, ...]) -> list[Finding]:
    """IOAPIC and HPET scopes give distinct requester IDs (interrupt remapping checks them)."""
    seen: dict[int, DeviceScope] = {}
    out = []
    for s, sc in ctx.scopes(3, 4):
        rid = sc.requester_id
        if rid is None:
            continue
        if rid in seen and sc.type in types:
            out.append(_f(ctx, check, f"{s.label}.scope@{sc.offset:#x}.path",
                          f"requester ID {rid:#06x} is also that of {seen[rid]}"))
        seen.setdefault(rid, sc)
    return out


@dmar_check
def ioapic_scopes(ctx: DmarContext) -> list[Finding]:
    """With interrupt remapping, every IOAPIC scope gives one requester ID (start bus, device,
    function; VT-d 8.3.1.1), distinct from the other IOAPIC and HPET scopes, and an enumeration ID
    that is the ID of an I/O APIC in the MADT (ACPI 6.5, 5.2.12.3)."""
    _require_ir(ctx)
    ids = {io.ioapic_id for io in ctx.madt.ioapics} if ctx.madt else set()
    out = []
    for s, sc in ctx.scopes(3):
        out += _requester_id_findings(ctx, ioapic_scopes, s, sc)
        if ctx.madt is not None and sc.enumeration_id not in ids:
            out.append(_f(ctx, ioapic_scopes, f"{s.label}.scope@{sc.offset:#x}.enumeration_id",
                          f"{sc.enumeration_id}: the MADT has no I/O APIC with this ID (it has {sorted(ids)})"))
    return out + _duplicate_rids(ctx, ioapic_scopes, (3,))


@dmar_check
def hpet_scopes(ctx: DmarContext) -> list[Finding]:
    """With interrupt remapping, every MSI-capable HPET scope gives one requester ID, distinct from
    the other scopes', and an enumeration ID that is an HPET table's HPET number (IA-PC HPET 1.0a,
    3.2.4)."""
    _require_ir(ctx)
    found = ctx.scopes(4)
    if not found:
        raise NotApplicable(f"{ctx.where()}: no MSI-capable HPET scope")
    numbers = {h.number for h in ctx.hpets}
    out = []
    for s, sc in found:
        out += _requester_id_findings(ctx, hpet_scopes, s, sc)
        if sc.enumeration_id not in numbers:
            out.append(_f(ctx, hpet_scopes, f"{s.label}.scope@{sc.offset:#x}.enumeration_id",
                          f"{sc.enumeration_id}: no HPET table has this HPET number (have {sorted(numbers)})"))
    return out + _duplicate_rids(ctx, hpet_scopes, (4,))


@dmar_check
def hpet_msi_scoped(ctx: DmarContext) -> list[Finding]:
    """With interrupt remapping, every HPET whose timers can deliver by FSB (MSI) has an HPET
    scope with its HPET number under some DRHD (VT-d 8.3.1: "MSI-capable HPET"; its interrupts
    are remapped by source-id)."""
    _require_ir(ctx)
    if not ctx.hpets:
        raise NotApplicable(f"{ctx.where()}: the ACPI tables hold no HPET table")
    read = [h for h in ctx.hpets if h.msi_capable is not None]
    if not read:
        raise NotApplicable(f"{ctx.where()}: the HPET registers could not be read")
    msi = [h for h in read if h.msi_capable]
    if not msi:
        raise NotApplicable(f"{ctx.where()}: no HPET timer offers FSB (MSI) delivery (Tn_FSB_INT_DEL_CAP clear), "
                            "so no HPET scope is required")
    scoped = {sc.enumeration_id for s, sc in ctx.scopes(4) if s.kind == "DRHD"}
    return [Finding("hpet_msi_scoped", ctx.where(f"DRHD.scope[HPET {h.number}]"),
                    f"no MSI-capable HPET scope for HPET {h.number} at {h.base:#x}, whose timers "
                    f"{h.registers.fsb_timers:#x} (bit n: timer n) offer FSB delivery")
            for h in msi if h.number not in scoped]


@dmar_check
def madt_ioapics_covered(ctx: DmarContext) -> list[Finding]:
    """With interrupt remapping, every I/O APIC of the MADT is under a remapping unit: some DRHD
    has an IOAPIC scope with its ID (VT-d 8.3.1.1, 5.1.1: interrupts from an I/O APIC without a
    scope cannot be remapped)."""
    _require_ir(ctx)
    if ctx.madt is None:
        raise NotApplicable(f"{ctx.where()}: the ACPI tables hold no MADT")
    covered = {sc.enumeration_id for s, sc in ctx.scopes(3) if s.kind == "DRHD"}
    return [Finding("madt_ioapics_covered", ctx.where(f"DRHD.scope[IOAPIC {io.ioapic_id}]"),
                    f"no IOAPIC scope for the MADT's I/O APIC {io.ioapic_id} at {io.address:#x}")
            for io in ctx.madt.ioapics if io.ioapic_id not in covered]


@dmar_check
def ir_flag_matches_ecap(ctx: DmarContext) -> list[Finding]:
    """The DMAR's INTR_REMAP flag agrees with every unit's ECAP.IR (VT-d 8.1, 11.4.3): set only
    when all units remap interrupts, clear only when none does; X2APIC_OPT_OUT only with it."""
    reads = [(d, ctx.read(d)) for d in ctx.drhds]
    reads = [(d, r) for d, r in reads if r is not None and r.read]
    if not reads:
        raise NotApplicable(f"{ctx.where()}: no DRHD register set could be read")
    out = []
    with_ir = [d for d, r in reads if r.ir]
    without = [d for d, r in reads if not r.ir]
    if ctx.dmar.intr_remap and without:
        out.append(_f(ctx, ir_flag_matches_ecap, "flags",
                      f"INTR_REMAP is set, yet {', '.join(d.label for d in without)} report ECAP.IR 0"))
    if not ctx.dmar.intr_remap and with_ir and not without:
        out.append(_f(ctx, ir_flag_matches_ecap, "flags",
                      "INTR_REMAP is clear, yet every unit reports ECAP.IR 1"))
    if with_ir and without:
        out.append(_f(ctx, ir_flag_matches_ecap, f"{without[0].label}.ECAP.IR",
                      f"0, while {with_ir[0].label} reports 1: units disagree on interrupt remapping"))
    if ctx.dmar.x2apic_opt_out and not ctx.dmar.intr_remap:
        out.append(_f(ctx, ir_flag_matches_ecap, "flags", "X2APIC_OPT_OUT is set without INTR_REMAP"))
    return out


def _require(ctx: DmarContext, kind: str) -> list[Structure]:
    found = ctx.dmar.of(kind)
    if not found:
        raise NotApplicable(f"{ctx.where()}: no {kind} structure")
    return found


@dmar_check
def rmrr_aligned(ctx: DmarContext) -> list[Finding]:
    """Each RMRR's base is 4 KiB aligned, its limit + 1 is, and the limit lies above the base
    (VT-d 8.4, table 8-6)."""
    out = []
    for r in _require(ctx, "RMRR"):
        if r["base"] % PAGE:
            out.append(_f(ctx, rmrr_aligned, f"{r.label}.base", f"{r['base']:#x} is not 4 KiB aligned"))
        if (r["limit"] + 1) % PAGE:
            out.append(_f(ctx, rmrr_aligned, f"{r.label}.limit", f"{r['limit']:#x} + 1 is not 4 KiB aligned"))
        if r["limit"] <= r["base"]:
            out.append(_f(ctx, rmrr_aligned, f"{r.label}.limit",
                          f"{r['limit']:#x} is not above the base {r['base']:#x}"))
    return out


@dmar_check
def rmrr_scoped(ctx: DmarContext) -> list[Finding]:
    """Each RMRR names at least one device that uses the region (VT-d 8.4)."""
    return [_f(ctx, rmrr_scoped, f"{r.label}.scopes", "no device scope")
            for r in _require(ctx, "RMRR") if not r.scopes]


def _segment_has_drhd(ctx: DmarContext, check: Callable, s: Structure) -> list[Finding]:
    if any(d["segment"] == s["segment"] for d in ctx.drhds):
        return []
    return [_f(ctx, check, f"{s.label}.segment", f"{s['segment']}: no DRHD covers this segment")]


@dmar_check
def atsr_parsed(ctx: DmarContext) -> list[Finding]:
    """Each ATSR is for a segment some DRHD covers and, unless ALL_PORTS is set, lists the root
    ports that support ATS (VT-d 8.5)."""
    out = []
    for a in _require(ctx, "ATSR"):
        out += _segment_has_drhd(ctx, atsr_parsed, a)
        if not a["flags"] & 1 and not a.scopes:
            out.append(_f(ctx, atsr_parsed, f"{a.label}.scopes", "ALL_PORTS is clear and no root port is listed"))
    return out


@dmar_check
def rhsa_parsed(ctx: DmarContext) -> list[Finding]:
    """Each RHSA gives the proximity domain of a unit that a DRHD defines (VT-d 8.6)."""
    bases = {d["register_base"] for d in ctx.drhds}
    return [_f(ctx, rhsa_parsed, f"{r.label}.register_base", f"{r['register_base']:#x} is no DRHD's register base")
            for r in _require(ctx, "RHSA") if r["register_base"] not in bases]


@dmar_check
def andd_parsed(ctx: DmarContext) -> list[Finding]:
    """Each ANDD has a NUL-terminated ACPI object name and its device number is unique; every
    ACPI-namespace scope names a declared device number (VT-d 8.7, 8.3.1)."""
    found = _require(ctx, "ANDD")
    out = []
    numbers = Counter(a["device_number"] for a in found)
    for a in found:
        if b"\0" not in a.raw[8:] or not a.name_string:
            out.append(_f(ctx, andd_parsed, f"{a.label}.name", "no NUL-terminated object name"))
        if numbers[a["device_number"]] > 1:
            out.append(_f(ctx, andd_parsed, f"{a.label}.device_number", f"{a['device_number']} is declared twice"))
    for s, sc in ctx.scopes(5):
        if sc.enumeration_id not in numbers:
            out.append(_f(ctx, andd_parsed, f"{s.label}.scope@{sc.offset:#x}.enumeration_id",
                          f"{sc.enumeration_id}: no ANDD declares this device number"))
    return out


@dmar_check
def satc_parsed(ctx: DmarContext) -> list[Finding]:
    """Each SATC is for a segment some DRHD covers and lists at least one SoC device (VT-d 8.8)."""
    out = []
    for s in _require(ctx, "SATC"):
        out += _segment_has_drhd(ctx, satc_parsed, s)
        if not s.scopes:
            out.append(_f(ctx, satc_parsed, f"{s.label}.scopes", "no device scope"))
    return out


def run_dmar_check(name: str, ctx: DmarContext) -> list[Finding]:
    """One DMAR check by name (NotApplicable passes through)."""
    return DMAR_CHECKS[name](ctx)


# ---------------------------------------------------------------------------------------------
# ACPI checks that do not need a DMAR (the RSDP, the root table, the MADT).

def rsdp_findings(snap: PlatformSnapshot) -> list[Finding]:
    """The RSDP was found and its checksums hold: the first 20 bytes, and for revision 2 and
    later all ``Length`` bytes (ACPI 6.5, 5.2.5.3)."""
    t = snap.acpi.rsdp
    if t is None:
        return [Finding("rsdp", "RSDP", "not found: no acpi_rsdp=<hex> on the payload's command line (how a boot "
                                        "method passes a UEFI host's RSDP) and none in the EBDA or "
                                        "0xE0000-0xFFFFF (ACPI 6.5, 5.2.5.1)")]
    r = Rsdp.parse(t.data)
    out = []
    if r is None or not table_checksum_ok(t.data[:20]):
        out.append(Finding("rsdp", f"{t.name}.checksum", "the first 20 bytes do not sum to 0"))
    if r is not None and r.revision >= 2 and not table_checksum_ok(t.data[:36]):
        out.append(Finding("rsdp", f"{t.name}.extended_checksum", "the 36 bytes do not sum to 0"))
    return out


def table_findings(t: AcpiTable) -> list[Finding]:
    """A system description table: reachable, read whole, its signature and length as listed,
    its checksum 0 (ACPI 6.5, 5.2.6)."""
    if not t.reachable:
        return [Finding("table", f"{t.name}.address", "beyond the payload's 4 GiB identity map")]
    if not t.complete:
        return [Finding("table", f"{t.name}.length", f"{t.length} bytes declared, {len(t.data)} read")]
    if t.length < 36:
        return [Finding("table", f"{t.name}.length", f"{t.length}, below the 36-byte header")]
    if not table_checksum_ok(t.data):
        return [Finding("table", f"{t.name}.checksum", f"the table sums to {sum(t.data) & 0xFF:#04x}, not 0")]
    return []


def single_dmar_findings(snap: PlatformSnapshot) -> list[Finding]:
    """At most one DMAR table: an OS uses the first and ignores the rest (VT-d 8.1 describes one)."""
    found = snap.acpi.of("DMAR")
    if len(found) > 1:
        return [Finding("single_dmar", "DMAR", f"{len(found)} DMAR tables: {', '.join(t.name for t in found)}")]
    return []


# ---------------------------------------------------------------------------------------------
# VMX set-up (Intel SDM Vol. 3D, appendix A), from the probe's MSRs.

# Controls of the default1 class: reported as allowed-0 = 1 by the legacy capability MSRs, and
# possibly 0 by the TRUE ones (SDM Vol. 3D, A.2; A.3.1, A.3.2, A.4, A.5).
DEFAULT1 = {
    IA32_VMX_PINBASED_CTLS: (1 << 1) | (1 << 2) | (1 << 4),
    IA32_VMX_PROCBASED_CTLS: sum(1 << b for b in (1, 4, 5, 6, 8, 13, 14, 15, 16, 26)),
    IA32_VMX_EXIT_CTLS: sum(1 << b for b in (*range(9), 10, 11, 13, 14, 16, 17)),
    IA32_VMX_ENTRY_CTLS: sum(1 << b for b in (*range(9), 12)),
}
TRUE_OF = {IA32_VMX_PINBASED_CTLS: IA32_VMX_TRUE_PINBASED_CTLS, IA32_VMX_PROCBASED_CTLS: IA32_VMX_TRUE_PROCBASED_CTLS,
           IA32_VMX_EXIT_CTLS: IA32_VMX_TRUE_EXIT_CTLS, IA32_VMX_ENTRY_CTLS: IA32_VMX_TRUE_ENTRY_CTLS}
CONTROL_MSRS = {IA32_VMX_PINBASED_CTLS: "IA32_VMX_PINBASED_CTLS", IA32_VMX_PROCBASED_CTLS: "IA32_VMX_PROCBASED_CTLS",
                IA32_VMX_EXIT_CTLS: "IA32_VMX_EXIT_CTLS", IA32_VMX_ENTRY_CTLS: "IA32_VMX_ENTRY_CTLS",
                IA32_VMX_PROCBASED_CTLS2: "IA32_VMX_PROCBASED_CTLS2",
                IA32_VMX_TRUE_PINBASED_CTLS: "IA32_VMX_TRUE_PINBASED_CTLS",
                IA32_VMX_TRUE_PROCBASED_CTLS: "IA32_VMX_TRUE_PROCBASED_CTLS",
                IA32_VMX_TRUE_EXIT_CTLS: "IA32_VMX_TRUE_EXIT_CTLS", IA32_VMX_TRUE_ENTRY_CTLS: "IA32_VMX_TRUE_ENTRY_CTLS"}


def require_vmx(probe: Probe, target: str) -> int:
    """IA32_VMX_BASIC, or NotApplicable when the CPU offers no VMX."""
    if not probe.cpuid_vmx:
        raise NotApplicable(f"target {target}: CPUID.1:ECX.VMX[bit 5] is 0 (no VMX)")
    basic = probe.msr(IA32_VMX_BASIC)
    if basic is None:
        raise NotApplicable(f"target {target}: IA32_VMX_BASIC could not be read "
                            f"(fault {probe.msr_faults.get(IA32_VMX_BASIC, 0):#x})")
    return basic


def _msr(probe: Probe, index: int, name: str) -> int:
    value = probe.msr(index)
    if value is None:
        raise AssertionError(f"{name} ({index:#x}) could not be read (fault {probe.msr_faults.get(index, 0):#x})")
    return value


def feature_control_findings(probe: Probe) -> list[Finding]:
    """IA32_FEATURE_CONTROL is locked (bit 0) with VMXON outside SMX enabled (bit 2) (SDM Vol. 3C,
    24.7; Vol. 4, table 2-2): firmware must leave VMX usable and the setting fixed."""
    fc = _msr(probe, IA32_FEATURE_CONTROL, "IA32_FEATURE_CONTROL")
    out = []
    if not fc & 1:
        out.append(Finding("feature_control", "IA32_FEATURE_CONTROL.lock", f"{fc:#x}: bit 0 (lock) is clear"))
    if not fc >> 2 & 1:
        out.append(Finding("feature_control", "IA32_FEATURE_CONTROL.vmx_outside_smx",
                           f"{fc:#x}: bit 2 (enable VMXON outside SMX) is clear"))
    return out


def basic_findings(probe: Probe) -> list[Finding]:
    """IA32_VMX_BASIC (SDM Vol. 3D, A.1): VMCS revision identifier bits 30:0 non-zero with bit 31
    clear; VMCS region size bits 44:32 in 1..4096; bit 48 clear (Intel 64 processors); memory
    type bits 53:50 write-back (6); reserved bits 47:45 clear."""
    b = _msr(probe, IA32_VMX_BASIC, "IA32_VMX_BASIC")
    out = []
    rev = b & 0xFFFF_FFFF
    if rev >> 31 or rev == 0:
        out.append(Finding("basic", "IA32_VMX_BASIC.revision", f"{rev:#x}: bits 30:0 must be a non-zero revision, bit 31 clear"))
    size = b >> 32 & 0x1FFF
    if not 1 <= size <= 4096:
        out.append(Finding("basic", "IA32_VMX_BASIC.region_size", f"{size}, expected 1..4096"))
    if b >> 48 & 1:
        out.append(Finding("basic", "IA32_VMX_BASIC.physical_width", "bit 48 (32-bit VMCS addresses) is set"))
    if (b >> 50 & 0xF) != 6:
        out.append(Finding("basic", "IA32_VMX_BASIC.memory_type", f"{b >> 50 & 0xF}, expected 6 (write-back)"))
    if b >> 45 & 7:
        out.append(Finding("basic", "IA32_VMX_BASIC.reserved", f"bits 47:45 are {b >> 45 & 7:#x}"))
    return out


def controls_findings(probe: Probe, index: int) -> list[Finding]:
    """A control capability MSR: every bit whose allowed-0 setting is 1 (must be 1, bits 31:0) is
    also allowed to be 1 (bits 63:32) (SDM Vol. 3D, A.3-A.5: otherwise no setting is valid)."""
    name = CONTROL_MSRS[index]
    v = _msr(probe, index, name)
    low, high = v & 0xFFFF_FFFF, v >> 32
    if low & ~high:
        return [Finding("controls", f"{name}.allowed0", f"bits {low & ~high:#x} must be 1 but are not allowed to be 1 "
                                                        f"({v:#018x})")]
    return []


def true_controls_findings(probe: Probe, legacy: int) -> list[Finding]:
    """A TRUE capability MSR against its legacy one (SDM Vol. 3D, A.2): the legacy MSR reports
    every default1 control as must-be-1; the TRUE MSR may relax only those (its allowed-0 bits are
    the legacy ones, less some default1 bits) and allows the same 1-settings."""
    name, true_name = CONTROL_MSRS[legacy], CONTROL_MSRS[TRUE_OF[legacy]]
    lv = _msr(probe, legacy, name)
    tv = _msr(probe, TRUE_OF[legacy], true_name)
    d1 = DEFAULT1[legacy]
    out = []
    if lv & d1 != d1:
        out.append(Finding("true_controls", f"{name}.allowed0", f"default1 bits {d1 & ~lv:#x} are not reported as 1"))
    if tv & 0xFFFF_FFFF & ~(lv & 0xFFFF_FFFF):
        out.append(Finding("true_controls", f"{true_name}.allowed0",
                           f"bits {tv & ~lv & 0xFFFF_FFFF:#x} must be 1 here but not in {name}"))
    relaxed = (lv & ~tv) & 0xFFFF_FFFF
    if relaxed & ~d1:
        out.append(Finding("true_controls", f"{true_name}.allowed0",
                           f"relaxes bits {relaxed & ~d1:#x}, which are not of the default1 class"))
    if tv >> 32 != lv >> 32:
        out.append(Finding("true_controls", f"{true_name}.allowed1",
                           f"{tv >> 32:#x}, while {name} allows {lv >> 32:#x}"))
    return out


def fixed_findings(probe: Probe, register: str) -> list[Finding]:
    """IA32_VMX_CRn_FIXED0/1 (SDM Vol. 3D, A.7, A.8): every bit fixed to 1 (FIXED0) is allowed to
    be 1 (FIXED1); CR0.PE, CR0.NE and CR0.PG, and CR4.VMXE, are fixed to 1."""
    f0i, f1i, must = ((IA32_VMX_CR0_FIXED0, IA32_VMX_CR0_FIXED1, {0: "PE", 5: "NE", 31: "PG"}) if register == "CR0"
                      else (IA32_VMX_CR4_FIXED0, IA32_VMX_CR4_FIXED1, {13: "VMXE"}))
    f0 = _msr(probe, f0i, f"IA32_VMX_{register}_FIXED0")
    f1 = _msr(probe, f1i, f"IA32_VMX_{register}_FIXED1")
    out = []
    if f0 & ~f1:
        out.append(Finding("fixed", f"IA32_VMX_{register}_FIXED1", f"bits {f0 & ~f1:#x} are fixed to 1 by FIXED0 "
                                                                  "but not allowed to be 1"))
    for bit, name in must.items():
        if not f0 >> bit & 1:
            out.append(Finding("fixed", f"IA32_VMX_{register}_FIXED0.{name}", f"{f0:#x}: bit {bit} is not fixed to 1"))
    return out


def misc_findings(probe: Probe) -> list[Finding]:
    """IA32_VMX_MISC (SDM Vol. 3D, A.6): reserved bits 13:9 and 31 clear; at most 256 CR3-target
    values (bits 24:16); bit 5 (LMA stored into the IA-32e mode guest control) set when
    unrestricted guest is supported; an activity state reported only if it exists (bits 8:6)."""
    m = _msr(probe, IA32_VMX_MISC, "IA32_VMX_MISC")
    out = []
    if m >> 9 & 0x1F or m >> 31 & 1:
        out.append(Finding("misc", "IA32_VMX_MISC.reserved", f"{m:#x}: reserved bits 13:9 or 31 are set"))
    if (m >> 16 & 0x1FF) > 256:
        out.append(Finding("misc", "IA32_VMX_MISC.cr3_targets", f"{m >> 16 & 0x1FF}, at most 256"))
    proc = probe.msr(IA32_VMX_PROCBASED_CTLS) or 0
    proc2 = (probe.msr(IA32_VMX_PROCBASED_CTLS2) or 0) if proc >> 63 & 1 else 0
    if proc2 >> 39 & 1 and not m >> 5 & 1:      # allowed-1 of unrestricted guest (bit 7 of the high half)
        out.append(Finding("misc", "IA32_VMX_MISC.lma_store", "bit 5 is clear although unrestricted guest is supported"))
    return out


def vmcs_enum_findings(probe: Probe) -> list[Finding]:
    """IA32_VMX_VMCS_ENUM (SDM Vol. 3D, A.9): bits 9:1 give the highest VMCS field index (at
    least the index of the fields every processor has); bit 0 and bits 63:10 are reserved."""
    e = _msr(probe, IA32_VMX_VMCS_ENUM, "IA32_VMX_VMCS_ENUM")
    out = []
    if e & 1 or e >> 10:
        out.append(Finding("vmcs_enum", "IA32_VMX_VMCS_ENUM.reserved", f"{e:#x}: bit 0 or bits 63:10 set"))
    if (e >> 1 & 0x1FF) == 0:
        out.append(Finding("vmcs_enum", "IA32_VMX_VMCS_ENUM.highest_index", "0: no VMCS field index beyond 0"))
    return out


def ept_vpid_findings(probe: Probe) -> list[Finding]:
    """IA32_VMX_EPT_VPID_CAP (SDM Vol. 3D, A.10), when EPT is allowed: a 4-level page walk (bit 6)
    and at least one paging-structure memory type, UC (bit 8) or WB (bit 14); INVEPT (bit 20)
    offering a type (bits 25, 26); with VPID, INVVPID (bit 32) offering a type (bits 40-43)."""
    proc = probe.msr(IA32_VMX_PROCBASED_CTLS) or 0
    proc2 = (probe.msr(IA32_VMX_PROCBASED_CTLS2) or 0) if proc >> 63 & 1 else 0
    ept, vpid = bool(proc2 >> 33 & 1), bool(proc2 >> 37 & 1)
    if not (ept or vpid):
        raise NotApplicable("neither EPT nor VPID is allowed (IA32_VMX_PROCBASED_CTLS2 bits 33, 37)")
    c = _msr(probe, IA32_VMX_EPT_VPID_CAP, "IA32_VMX_EPT_VPID_CAP")
    out = []
    if ept and not c >> 6 & 1:
        out.append(Finding("ept_vpid", "IA32_VMX_EPT_VPID_CAP.walk4", f"{c:#x}: no 4-level page walk"))
    if ept and not (c >> 8 & 1 or c >> 14 & 1):
        out.append(Finding("ept_vpid", "IA32_VMX_EPT_VPID_CAP.memory_type", f"{c:#x}: neither UC nor WB"))
    if c >> 20 & 1 and not (c >> 25 & 3):
        out.append(Finding("ept_vpid", "IA32_VMX_EPT_VPID_CAP.invept_types", f"{c:#x}: INVEPT without a type"))
    if vpid and c >> 32 & 1 and not (c >> 40 & 0xF):
        out.append(Finding("ept_vpid", "IA32_VMX_EPT_VPID_CAP.invvpid_types", f"{c:#x}: INVVPID without a type"))
    return out


def explain(findings: Iterable[Finding], origin: str = "") -> str:
    """A message listing findings, one per line, then where they come from (target, evidence)."""
    lines = [str(f) for f in findings]
    return "\n  ".join([f"{len(lines)} finding(s):", *lines, *([origin] if origin else [])])
