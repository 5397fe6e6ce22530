"""ACPI tables as the firmware left them: the DMAR (VT-d 8), the MADT and the HPET table, parsed.

Parsing never raises on bad bytes: a table is what it is, and what cannot be read the way the
specification lays it out is kept in ``problems`` (offset and field named) for the checks in
``platform.py`` to report.  Sections: ACPI 6.5 5.2.5.3 (RSDP), 5.2.6 (header), 5.2.7/5.2.8
(RSDT/XSDT), 5.2.12 (MADT); IA-PC HPET 1.0a 3.2.4; VT-d 4.1 chapter 8 (DMAR).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ..payload.acpi import AcpiKind, RsdpFrom, Source
from ..payload.records import Record

HEADER_SIZE = 36          # system description table header (ACPI 5.2.6, table 5.4)
DMAR_FIXED = 48           # DMAR header + host address width, flags, 10 reserved bytes (VT-d 8.1)
SCOPE_FIXED = 6           # device scope without its path (VT-d 8.3.1, table 8-3)

SCOPE_TYPES = {1: "PCI endpoint", 2: "PCI sub-hierarchy", 3: "IOAPIC", 4: "MSI-capable HPET",
               5: "ACPI namespace device"}


@dataclass(frozen=True)
class Layout:
    """One remapping-structure type (VT-d 8.2, table 8-2): its fields (name, offset, size), the
    smallest valid length, where device scopes start (None: it has none) and each field's
    reserved bits (the mask of bits that must read 0)."""

    name: str
    fields: tuple[tuple[str, int, int], ...]
    min_length: int
    scopes_at: int | None
    reserved_bits: tuple[tuple[str, int], ...] = ()


LAYOUTS: dict[int, Layout] = {
    # 8.3, table 8-5.  Flags bit 0 INCLUDE_PCI_ALL; Size bits 3:0 (2^N register pages).
    0: Layout("DRHD", (("flags", 4, 1), ("size", 5, 1), ("segment", 6, 2), ("register_base", 8, 8)), 16, 16,
              (("flags", 0xFE), ("size", 0xF0))),
    # 8.4, table 8-6.
    1: Layout("RMRR", (("reserved", 4, 2), ("segment", 6, 2), ("base", 8, 8), ("limit", 16, 8)), 24, 24,
              (("reserved", 0xFFFF),)),
    # 8.5, table 8-7.  Flags bit 0 ALL_PORTS.
    2: Layout("ATSR", (("flags", 4, 1), ("reserved", 5, 1), ("segment", 6, 2)), 8, 8,
              (("flags", 0xFE), ("reserved", 0xFF))),
    # 8.6, table 8-8.
    3: Layout("RHSA", (("reserved", 4, 4), ("register_base", 8, 8), ("proximity_domain", 16, 4)), 20, None,
              (("reserved", 0xFFFF_FFFF),)),
    # 8.7, table 8-9.  The ACPI object name follows at offset 8, NUL-terminated.
    4: Layout("ANDD", (("reserved", 4, 3), ("device_number", 7, 1)), 9, None, (("reserved", 0xFF_FFFF),)),
    # 8.8, table 8-10.  Flags bit 0 ATC_REQUIRED.
    5: Layout("SATC", (("flags", 4, 1), ("reserved", 5, 1), ("segment", 6, 2)), 8, 8,
              (("flags", 0xFE), ("reserved", 0xFF))),
    # 8.9 (VT-d 4.1), SoC integrated device property.
    6: Layout("SIDP", (("reserved", 4, 2), ("segment", 6, 2)), 8, 8, (("reserved", 0xFFFF),)),
}


def _le(data: bytes, offset: int, size: int) -> int:
    return int.from_bytes(data[offset:offset + size], "little")


@dataclass(frozen=True)
class Header:
    """A system description table header (ACPI 6.5, 5.2.6, table 5.4)."""

    signature: str
    length: int
    revision: int
    checksum: int
    oem_id: bytes
    oem_table_id: bytes
    oem_revision: int
    creator_id: bytes
    creator_revision: int

    @classmethod
    def parse(cls, data: bytes) -> "Header | None":
        if len(data) < HEADER_SIZE:
            return None
        sig, length, rev, csum, oem, oem_table, oem_rev, creator, creator_rev = struct.unpack_from(
            "<4sIBB6s8sI4sI", data)
        return cls(sig.decode("ascii", "replace"), length, rev, csum, oem, oem_table, oem_rev, creator, creator_rev)

    @property
    def table_id(self) -> str:
        return self.oem_table_id.rstrip(b" \0").decode("ascii", "replace")


@dataclass(frozen=True)
class AcpiTable:
    """One table as the payload reported it: where, what it declares, and the bytes it sent
    (``data``; empty when only listed, shorter than ``length`` when cut at the payload's bound)."""

    number: int
    address: int
    signature: str
    length: int              # declared (the header's length field; 20 or 36 for the RSDP)
    source: Source
    reachable: bool
    data: bytes

    @property
    def complete(self) -> bool:
        return len(self.data) == self.length

    @property
    def header(self) -> Header | None:
        return Header.parse(self.data)

    @property
    def name(self) -> str:
        """``DMAR@0x7ffe2259`` (with the OEM table ID when the table carries one)."""
        return f"{self.signature.strip() or '?'}@{self.address:#x}"

    def __str__(self) -> str:
        return f"{self.name} ({self.length} bytes declared, {len(self.data)} read)"


@dataclass(frozen=True)
class RegisterRead:
    """What a DRHD's register base answered (VT-d 11.4.1-11.4.3); ``read`` False: beyond reach."""

    base: int
    read: bool
    ver: int = 0
    cap: int = 0
    ecap: int = 0

    @property
    def ir(self) -> bool:
        """ECAP.IR, bit 3: interrupt remapping supported (VT-d 11.4.3)."""
        return bool(self.ecap >> 3 & 1)


@dataclass
class AcpiDump:
    """Everything ``acpi_dump`` reported: the tables in order, DRHD register reads keyed by
    (table number, structure offset), and where the RSDP and root table were."""

    tables: list[AcpiTable] = field(default_factory=list)
    drhd_reads: dict[tuple[int, int], RegisterRead] = field(default_factory=dict)
    hpet_reads: dict[int, "HpetRead"] = field(default_factory=dict)
    rsdp_address: int = 0
    root_address: int = 0
    root_entry_size: int = 0
    rsdp_from: RsdpFrom = RsdpFrom.NOT_FOUND
    done: bool = False

    @classmethod
    def from_records(cls, records: list[Record]) -> "AcpiDump":
        dump = cls()
        parts: dict[int, bytearray] = {}
        heads: dict[int, tuple] = {}
        for r in records:
            f = r.fields
            if r.kind == AcpiKind.TABLE and len(f) >= 7:
                heads[f[0]] = f
                parts[f[0]] = bytearray(f[4])
            elif r.kind == AcpiKind.BYTES and len(f) >= 2 and f[0] in parts:
                buf, off = parts[f[0]], f[1]
                raw = b"".join(q.to_bytes(8, "little") for q in f[2:])
                end = min(len(buf), off + len(raw))
                buf[off:end] = raw[:end - off]
            elif r.kind == AcpiKind.DRHD and len(f) >= 7:
                dump.drhd_reads[(f[0], f[1])] = RegisterRead(f[2], bool(f[6]), f[3], f[4], f[5])
            elif r.kind == AcpiKind.HPET and len(f) >= 5:
                dump.hpet_reads[f[0]] = HpetRead(f[1], bool(f[4]), f[2], f[3])
            elif r.kind == AcpiKind.DONE and len(f) >= 5:
                dump.done = True
                dump.rsdp_address, dump.root_address, dump.root_entry_size = f[1], f[2], f[3]
                dump.rsdp_from = RsdpFrom(f[4]) if f[4] in RsdpFrom._value2member_map_ else RsdpFrom.NOT_FOUND
        for number in sorted(heads):
            h = heads[number]
            sig = (h[2] & 0xFFFF_FFFF).to_bytes(4, "little").decode("ascii", "replace")
            dump.tables.append(AcpiTable(number, h[1], sig, h[3], Source(h[5]), bool(h[6]), bytes(parts[number])))
        return dump

    def of(self, signature: str) -> list[AcpiTable]:
        """The tables the root table lists with this signature, in its order."""
        return [t for t in self.tables if t.source == Source.ENTRY and t.signature == signature]

    @property
    def rsdp(self) -> AcpiTable | None:
        return next((t for t in self.tables if t.source == Source.RSDP), None)

    @property
    def root(self) -> AcpiTable | None:
        return next((t for t in self.tables if t.source == Source.ROOT), None)


# ---------------------------------------------------------------------------------------------
# DMAR (VT-d 4.1, chapter 8)

@dataclass(frozen=True)
class DeviceScope:
    """A device scope entry (VT-d 8.3.1, table 8-3); ``offset`` is from the table's start."""

    offset: int
    type: int
    length: int
    flags: int               # byte 2: flags since VT-d 4.0 (reserved before)
    reserved: int            # byte 3
    enumeration_id: int
    start_bus: int
    path: tuple[tuple[int, int], ...]

    @property
    def type_name(self) -> str:
        return SCOPE_TYPES.get(self.type, f"reserved type {self.type}")

    @property
    def requester_id(self) -> int | None:
        """The source-id an IOAPIC or HPET uses (VT-d 8.3.1.1): start bus with the single hop's
        device and function; None unless the path is exactly one hop."""
        if len(self.path) != 1:
            return None
        dev, fn = self.path[0]
        return self.start_bus << 8 | (dev & 0x1F) << 3 | (fn & 7)

    def __str__(self) -> str:
        hops = "/".join(f"{d:02x}.{f:x}" for d, f in self.path)
        return f"{self.type_name} scope @{self.offset:#x} (enum id {self.enumeration_id}, bus {self.start_bus:#04x}, path {hops or '-'})"


@dataclass(frozen=True)
class Structure:
    """A remapping structure (VT-d 8.2): its type, where it is, its fields by name and scopes."""

    index: int               # position among the table's structures
    offset: int
    type: int
    length: int
    values: dict[str, int]
    scopes: tuple[DeviceScope, ...]
    raw: bytes

    @property
    def kind(self) -> str:
        layout = LAYOUTS.get(self.type)
        return layout.name if layout else f"type{self.type}"

    @property
    def label(self) -> str:
        return f"{self.kind}@{self.offset:#x}"

    def __getitem__(self, name: str) -> int:
        return self.values[name]

    @property
    def name_string(self) -> str:
        """ANDD: the ACPI object name (bytes from offset 8 up to the NUL)."""
        return self.raw[8:].split(b"\0", 1)[0].decode("ascii", "replace")


@dataclass(frozen=True)
class Problem:
    """A place where the bytes do not follow the layout: offset, field, what was found."""

    offset: int
    field: str
    message: str


@dataclass
class Dmar:
    """A parsed DMAR table (VT-d 8.1)."""

    data: bytes
    header: Header | None
    host_address_width: int | None       # the field + 1 (bits)
    flags: int
    reserved: bytes
    structures: list[Structure]
    problems: list[Problem]

    @classmethod
    def parse(cls, data: bytes) -> "Dmar":
        header = Header.parse(data)
        problems: list[Problem] = []
        if header is None or len(data) < DMAR_FIXED:
            problems.append(Problem(0, "length", f"{len(data)} bytes, a DMAR needs at least {DMAR_FIXED}"))
            return cls(data, header, None, 0, b"", [], problems)
        end = min(header.length, len(data))
        structures: list[Structure] = []
        off = DMAR_FIXED
        while off < end:
            if end - off < 4:
                problems.append(Problem(off, "length", f"{end - off} trailing bytes at {off:#x}, too few for a "
                                                       "remapping structure header (4)"))
                break
            stype, slen = struct.unpack_from("<HH", data, off)
            layout = LAYOUTS.get(stype)
            label = f"{layout.name if layout else f'type{stype}'}@{off:#x}"
            minimum = layout.min_length if layout else 4
            if slen < minimum:
                problems.append(Problem(off, f"{label}.length", f"{slen}, below the minimum {minimum}"))
                break
            if off + slen > end:
                problems.append(Problem(off, f"{label}.length", f"{slen} runs past the table's end "
                                                                f"({off:#x} + {slen} > {end:#x})"))
                break
            raw = data[off:off + slen]
            values = {name: _le(raw, at, size) for name, at, size in (layout.fields if layout else ())}
            scopes: tuple[DeviceScope, ...] = ()
            if layout and layout.scopes_at is not None:
                scopes = tuple(_scopes(raw, off, layout.scopes_at, label, problems))
            structures.append(Structure(len(structures), off, stype, slen, values, scopes, raw))
            off += slen
        return cls(data, header, data[36] + 1, data[37], data[38:48], structures, problems)

    def of(self, kind: str) -> list[Structure]:
        """The structures of one kind ("DRHD", "RMRR", ...) in table order."""
        return [s for s in self.structures if s.kind == kind]

    @property
    def intr_remap(self) -> bool:
        """Flags bit 0, INTR_REMAP (VT-d 8.1)."""
        return bool(self.flags & 1)

    @property
    def x2apic_opt_out(self) -> bool:
        return bool(self.flags >> 1 & 1)


def _scopes(raw: bytes, base: int, at: int, label: str, problems: list[Problem]) -> list[DeviceScope]:
    """The device scopes of a structure, from ``at`` to its end (VT-d 8.3.1)."""
    out: list[DeviceScope] = []
    off = at
    while off < len(raw):
        where = base + off
        if len(raw) - off < 2:
            problems.append(Problem(where, f"{label}.scope@{where:#x}.length", "one trailing byte, no scope fits"))
            break
        stype, slen = raw[off], raw[off + 1]
        if slen < SCOPE_FIXED + 2 or slen > len(raw) - off:
            problems.append(Problem(where, f"{label}.scope@{where:#x}.length",
                                    f"{slen}: a scope is 6 bytes plus at least one 2-byte path entry and must "
                                    f"end inside its structure ({len(raw) - off} bytes left)"))
            break
        if (slen - SCOPE_FIXED) % 2:
            problems.append(Problem(where, f"{label}.scope@{where:#x}.length",
                                    f"{slen}: the path after the 6 fixed bytes is not whole (device, function) pairs"))
        path = tuple((raw[p], raw[p + 1]) for p in range(off + SCOPE_FIXED, off + slen - 1, 2))
        out.append(DeviceScope(where, stype, slen, raw[off + 2], raw[off + 3], raw[off + 4], raw[off + 5], path))
        off += slen
    return out


# ---------------------------------------------------------------------------------------------
# MADT (ACPI 6.5, 5.2.12) and HPET (IA-PC HPET 1.0a, 3.2.4)

@dataclass(frozen=True)
class MadtIoApic:
    """An I/O APIC structure (ACPI 6.5, 5.2.12.3, table 5.46)."""

    offset: int
    ioapic_id: int
    address: int
    gsi_base: int


@dataclass(frozen=True)
class MadtOverride:
    """An interrupt source override (ACPI 6.5, 5.2.12.5, table 5.49): bus 0 is ISA."""

    offset: int
    bus: int
    source: int
    gsi: int
    flags: int


@dataclass
class Madt:
    """The MADT (ACPI 6.5, 5.2.12): local APIC address, flags, I/O APICs, source overrides."""

    header: Header | None
    lapic_address: int
    flags: int
    ioapics: list[MadtIoApic]
    problems: list[Problem]
    overrides: list[MadtOverride] = field(default_factory=list)

    def isa_gsi(self, irq: int) -> int:
        """The global system interrupt of ISA IRQ ``irq``: its override's, else the IRQ itself
        (ACPI 6.5, 5.2.12.5: ISA IRQs are identity-mapped unless overridden)."""
        return next((o.gsi for o in self.overrides if o.bus == 0 and o.source == irq), irq)

    def ioapic_for_gsi(self, gsi: int, inputs: int = 24) -> MadtIoApic | None:
        """The I/O APIC whose inputs (``inputs`` of them from its GSI base) include ``gsi``."""
        return next((io for io in self.ioapics if io.gsi_base <= gsi < io.gsi_base + inputs), None)

    @classmethod
    def parse(cls, data: bytes) -> "Madt":
        header = Header.parse(data)
        problems: list[Problem] = []
        if header is None or len(data) < 44:
            return cls(header, 0, 0, [], [Problem(0, "length", f"{len(data)} bytes, a MADT needs at least 44")])
        lapic, flags = struct.unpack_from("<II", data, 36)
        end = min(header.length, len(data))
        ioapics: list[MadtIoApic] = []
        overrides: list[MadtOverride] = []
        off = 44
        while off + 2 <= end:
            etype, elen = data[off], data[off + 1]
            if elen < 2 or off + elen > end:
                problems.append(Problem(off, f"entry@{off:#x}.length", f"{elen} (type {etype}) does not fit the table"))
                break
            if etype == 1 and elen >= 12:
                ioapics.append(MadtIoApic(off, data[off + 2], _le(data, off + 4, 4), _le(data, off + 8, 4)))
            elif etype == 2 and elen >= 10:
                overrides.append(MadtOverride(off, data[off + 2], data[off + 3], _le(data, off + 4, 4),
                                              _le(data, off + 8, 2)))
            off += elen
        return cls(header, lapic, flags, ioapics, problems, overrides)


@dataclass(frozen=True)
class HpetRead:
    """What an HPET's event timer block answered (IA-PC HPET 1.0a, 2.3.4, 2.3.8)."""

    base: int
    read: bool
    capabilities: int = 0    # GCAP_ID
    fsb_timers: int = 0      # bit n: timer n can deliver by FSB (MSI)


@dataclass(frozen=True)
class Hpet:
    """The HPET description table (IA-PC HPET 1.0a, 3.2.4) and, when read, its registers."""

    header: Header | None
    block_id: int
    base: int
    number: int
    registers: HpetRead | None = None

    @classmethod
    def parse(cls, data: bytes, registers: HpetRead | None = None) -> "Hpet | None":
        if len(data) < 56:
            return None
        return cls(Header.parse(data), _le(data, 36, 4), _le(data, 44, 8), data[52], registers)

    @property
    def msi_capable(self) -> bool | None:
        """Whether a timer offers FSB (MSI) delivery; None when the registers were not read."""
        return None if self.registers is None or not self.registers.read else bool(self.registers.fsb_timers)


@dataclass(frozen=True)
class Rsdp:
    """The root system description pointer (ACPI 6.5, 5.2.5.3, table 5.3)."""

    data: bytes
    revision: int
    rsdt_address: int
    length: int
    xsdt_address: int

    @classmethod
    def parse(cls, data: bytes) -> "Rsdp | None":
        if len(data) < 20:
            return None
        rev = data[15]
        if rev >= 2 and len(data) >= 36:
            return cls(data, rev, _le(data, 16, 4), _le(data, 20, 4), _le(data, 24, 8))
        return cls(data, rev, _le(data, 16, 4), 20, 0)


def table_checksum_ok(data: bytes) -> bool:
    """Whether the bytes sum to 0 modulo 256 (ACPI 6.5, 5.2.6: the checksum field)."""
    return sum(data) & 0xFF == 0
