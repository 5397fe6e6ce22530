"""Deliberately broken DMAR tables: one per DMAR check, each breaking exactly what that check
looks at, plus one good table that holds every structure type (VT-d 8.3-8.8).

Every table is a copy of a template taken from a real platform (its DRHD register base, device
scopes, I/O APIC and a PCI endpoint), so what a broken table changes is the only thing wrong with
it.  The unit tests feed the bytes to the checks directly; the end-to-end test loads them into
QEMU with ``-acpitable`` and checks what the payload read back.  QEMU recomputes the header's
length and checksum of a loaded table (hw/acpi/core.c), so the two breakages of those fields
are unit-level only (``acpitable=False``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable

from harness.observe.dmar import Dmar
from harness.observe.platform import DmarContext
from harness.observe.probe import PciFunction
from harness.payload import acpi

PAGE = 0x1000
ABSENT_DEVICE = (0x0B, 0)          # a device number the templates' platforms leave empty


@dataclass(frozen=True)
class Template:
    """What a copied DMAR keeps from the platform it was taken from."""

    register_base: int
    haw: int
    drhd_flags: int
    drhd_scopes: bytes                 # the first DRHD's scope bytes, verbatim
    ioapic_id: int                     # an I/O APIC of the MADT, covered by an IOAPIC scope
    ioapic_scope: bytes
    endpoint: tuple[int, int, int]     # bus, device, function of a present type-0 PCI function
    hpet_number: int = 0

    @classmethod
    def from_platform(cls, ctx: DmarContext) -> "Template":
        """The template of a real DMAR (its first DRHD and IOAPIC scope) and PCI space."""
        d = ctx.drhds[0]
        ioapics = [sc for sc in d.scopes if sc.type == acpi.SCOPE_IOAPIC]
        if not ioapics:
            raise ValueError(f"{ctx.where()}: the first DRHD has no IOAPIC scope to copy")
        io = ioapics[0]
        ioapic_scope = d.raw[io.offset - d.offset:io.offset - d.offset + io.length]
        endpoint = next(f for f in ctx.pci if not f.is_bridge and f.bus == 0 and f.bdf != 0)
        hpets = [h.number for h in ctx.hpets]
        return cls(d["register_base"], ctx.dmar.host_address_width or 39, d["flags"], d.raw[16:],
                   io.enumeration_id, bytes(ioapic_scope), (endpoint.bus, endpoint.dev, endpoint.fn),
                   hpets[0] if hpets else 0)

    def endpoint_scope(self) -> bytes:
        bus, dev, fn = self.endpoint
        return acpi.device_scope(acpi.SCOPE_ENDPOINT, bus, [(dev, fn)])

    def drhd(self, scopes: bytes | None = None, **kw) -> bytes:
        kw.setdefault("flags", self.drhd_flags)
        return acpi.drhd(self.register_base, [self.drhd_scopes if scopes is None else scopes], **kw)

    def scopes_without_ioapic(self) -> bytes:
        return self.drhd_scopes.replace(self.ioapic_scope, b"", 1)


@dataclass(frozen=True)
class Built:
    """A table's structures and header values (the OEM table ID is added per load)."""

    structures: list[bytes]
    field: str = ""                    # what the failing check must name (after "DMAR@addr.")
    flags: int = acpi.DMAR_INTR_REMAP
    haw: int | None = None
    reserved: bytes = bytes(10)
    patch: Callable[[bytes], bytes] | None = None   # a change after the checksum (unit level only)

    def table(self, t: Template, table_id: bytes) -> bytes:
        raw = acpi.dmar(self.structures, host_address_width=self.haw or t.haw, flags=self.flags,
                        reserved=self.reserved, oem_table_id=table_id)
        return self.patch(raw) if self.patch else raw


DRHD_AT = 48                       # the first structure's offset (VT-d 8.1)


def _after(structures: list[bytes]) -> int:
    return DRHD_AT + sum(len(s) for s in structures)


@dataclass(frozen=True)
class Breakage:
    """A broken table: the check it must fail and how to build it from a template."""

    code: str                          # 4 characters: the OEM table ID is b"VTX-" + code
    check: str
    build: Callable[[Template], Built]
    acpitable: bool = True             # can QEMU load it as is (-acpitable keeps the field)?

    @property
    def table_id(self) -> bytes:
        return b"VTX-" + self.code.encode()


def good(t: Template) -> Built:
    """Every structure type, each as the specification wants it: RMRR (4 KiB aligned, one
    endpoint), ATSR (ALL_PORTS), RHSA (the DRHD's base), ANDD (named; referenced by an ACPI scope
    of the DRHD), SATC (one endpoint); the DRHD also gains an HPET scope for the HPET table."""
    acpi_scope = acpi.device_scope(acpi.SCOPE_ACPI, 0, [(0x1F, 7)], enumeration_id=1)
    hpet_scope = acpi.device_scope(acpi.SCOPE_HPET, 0, [(0x1F, 6)], enumeration_id=t.hpet_number)
    return Built([t.drhd(t.drhd_scopes + acpi_scope + hpet_scope), acpi.rmrr(0xE0000, 0xE0FFF, [t.endpoint_scope()]),
                  acpi.atsr(all_ports=True), acpi.rhsa(t.register_base, 0), acpi.andd(1, r"\_SB.PCI0.SBRG"),
                  acpi.satc([t.endpoint_scope()])])


def _extra_scope(t: Template, scope: bytes, field_name: str) -> Built:
    """The template's DRHD with one more scope at its end; ``field_name`` of that scope."""
    drhd = t.drhd(t.drhd_scopes + scope)
    return Built([drhd], f"DRHD@{DRHD_AT:#x}.scope@{DRHD_AT + len(drhd) - len(scope):#x}.{field_name}")


def _overrun(t: Template) -> Built:
    drhd = bytearray(t.drhd())
    struct.pack_into("<H", drhd, 2, len(drhd) + 8)
    return Built([bytes(drhd)], f"DRHD@{DRHD_AT:#x}.length")


def _checksum(t: Template) -> Built:
    def bump(raw: bytes) -> bytes:
        return raw[:9] + bytes([(raw[9] + 1) & 0xFF]) + raw[10:]
    return Built([t.drhd()], "checksum", patch=bump)


def _short_header(t: Template) -> Built:
    def shorten(raw: bytes) -> bytes:
        return acpi.with_checksum(raw[:4] + struct.pack("<I", 40) + raw[8:])
    return Built([t.drhd()], "length", patch=shorten)


def _duplicate_base(t: Template) -> Built:
    first = t.drhd(t.endpoint_scope(), flags=0)
    return Built([first, t.drhd()], f"DRHD@{_after([first]):#x}.register_base")


def _pci_all_twice(t: Template) -> Built:
    first = acpi.drhd(t.register_base + PAGE, [t.endpoint_scope()], include_pci_all=True)
    return Built([first, t.drhd(flags=1)], f"DRHD@{_after([first]):#x}.flags")


def _pci_all_first(t: Template) -> Built:
    return Built([t.drhd(flags=1), acpi.drhd(t.register_base + PAGE, [t.endpoint_scope()])],
                 f"DRHD@{DRHD_AT:#x}.flags")


def _ioapic_id(t: Template) -> Built:
    scopes = t.drhd_scopes.replace(t.ioapic_scope, b"", 1)
    bad = bytearray(t.ioapic_scope)
    bad[4] = (t.ioapic_id + 5) & 0xFF
    drhd = t.drhd(bytes(bad) + scopes)
    return Built([drhd], f"DRHD@{DRHD_AT:#x}.scope@{DRHD_AT + 16:#x}.enumeration_id")


def _rmrr(t: Template, **kw) -> tuple[list[bytes], int]:
    drhd = t.drhd()
    return [drhd, acpi.rmrr(**kw)], _after([drhd])


def _rmrr_unaligned(t: Template) -> Built:
    structures, at = _rmrr(t, base=0xE0800, limit=0xE0FFF, scopes=[t.endpoint_scope()])
    return Built(structures, f"RMRR@{at:#x}.base")


def _rmrr_unscoped(t: Template) -> Built:
    structures, at = _rmrr(t, base=0xE0000, limit=0xE0FFF, scopes=[])
    return Built(structures, f"RMRR@{at:#x}.scopes")


def _second(t: Template, structure: bytes, field_name: str, kind: str) -> Built:
    drhd = t.drhd()
    return Built([drhd, structure], f"{kind}@{_after([drhd]):#x}.{field_name}")


def _andd_unterminated(t: Template) -> Built:
    raw = struct.pack("<HH3xB", 4, 8 + 6, 1) + rb"\_SB.X"
    return _second(t, raw, "name", "ANDD")


BREAKAGES: tuple[Breakage, ...] = (
    Breakage("CSUM", "checksum", _checksum, acpitable=False),
    Breakage("HLEN", "length", _short_header, acpitable=False),
    Breakage("SLEN", "length", _overrun),
    Breakage("HRSV", "header_reserved", lambda t: Built([t.drhd()], "reserved", reserved=b"\x01" + bytes(9))),
    Breakage("HFLG", "header_reserved", lambda t: Built([t.drhd()], "flags", flags=acpi.DMAR_INTR_REMAP | 0x08)),
    Breakage("HAW_", "host_address_width", lambda t: Built([t.drhd()], "host_address_width", haw=20)),
    Breakage("TYPE", "structure_types",
             lambda t: _second(t, struct.pack("<HH4x", 9, 8), "type", "type9")),
    Breakage("SRSV", "structure_reserved",
             lambda t: Built([t.drhd(size=0x10)], f"DRHD@{DRHD_AT:#x}.size")),
    Breakage("NODR", "drhd_present", lambda t: Built([], "DRHD")),
    Breakage("ALGN", "drhd_base_aligned",
             lambda t: Built([acpi.drhd(t.register_base + 0x800, [t.drhd_scopes], flags=t.drhd_flags)],
                             f"DRHD@{DRHD_AT:#x}.register_base")),
    Breakage("NVER", "drhd_answers_ver",
             lambda t: Built([acpi.drhd(t.register_base + PAGE, [t.drhd_scopes], flags=t.drhd_flags)],
                             f"DRHD@{DRHD_AT:#x}.register_base")),
    Breakage("DUPB", "drhd_bases_unique", _duplicate_base),
    Breakage("ALL2", "include_pci_all_once", _pci_all_twice),
    Breakage("ALL1", "include_pci_all_last", _pci_all_first),
    Breakage("STYP", "scopes_well_formed",
             lambda t: _extra_scope(t, acpi.device_scope(6, 0, [t.endpoint[1:]]), "type")),
    Breakage("SDEV", "scopes_well_formed",
             lambda t: _extra_scope(t, acpi.device_scope(acpi.SCOPE_ENDPOINT, 0, [(0x20, 0)]), "path")),
    Breakage("SPCI", "scopes_in_pci",
             lambda t: _extra_scope(t, acpi.device_scope(acpi.SCOPE_ENDPOINT, 0, [ABSENT_DEVICE]), "path")),
    Breakage("IOID", "ioapic_scopes", _ioapic_id),
    Breakage("HPTH", "hpet_scopes",
             lambda t: _extra_scope(t, acpi.device_scope(acpi.SCOPE_HPET, 0, [(0x1F, 0), (0, 0)],
                                                         enumeration_id=t.hpet_number), "path")),
    Breakage("NOHP", "hpet_msi_scoped", lambda t: Built([t.drhd()], f"DRHD.scope[HPET {t.hpet_number}]")),
    Breakage("NOIO", "madt_ioapics_covered",
             lambda t: Built([t.drhd(t.scopes_without_ioapic())], f"DRHD.scope[IOAPIC {t.ioapic_id}]")),
    Breakage("IRFL", "ir_flag_matches_ecap", lambda t: Built([t.drhd()], "flags", flags=0)),
    Breakage("RMAL", "rmrr_aligned", _rmrr_unaligned),
    Breakage("RMSC", "rmrr_scoped", _rmrr_unscoped),
    Breakage("ATSR", "atsr_parsed", lambda t: _second(t, acpi.atsr([], all_ports=False), "scopes", "ATSR")),
    Breakage("RHSA", "rhsa_parsed",
             lambda t: _second(t, acpi.rhsa(t.register_base + 2 * PAGE, 0), "register_base", "RHSA")),
    Breakage("ANDD", "andd_parsed", _andd_unterminated),
    Breakage("SATC", "satc_parsed", lambda t: _second(t, acpi.satc([t.endpoint_scope()], segment=1), "segment", "SATC")),
)

GOOD_ID = b"VTX-GOOD"


def good_table(t: Template) -> bytes:
    return good(t).table(t, GOOD_ID)


def broken_table(t: Template, b: Breakage) -> bytes:
    return b.build(t).table(t, b.table_id)


def expected_field(t: Template, b: Breakage) -> str:
    return b.build(t).field


# ---------------------------------------------------------------------------------------------
# A synthetic platform for unit tests: what QEMU q35 with intel-iommu (intremap on) and edu shows.

UNIT_BASE = 0xFED9_0000
UNIT_ECAP_IR = 0xF4A            # QEMU's ECAP with IR (bit 3) and QI, EIM
UNIT_PCI = [PciFunction(0x0000, 0x8086, 0x29C0, 0x060000, 0, 0),           # 00:00.0 host bridge
            PciFunction(0x0020, 0x1234, 0x11E8, 0x00FF00, 0x10, 0),        # 00:04.0 edu
            PciFunction(0x0030, 0x1B36, 0x000C, 0x060400, 0, 1, 0x010100),  # 00:06.0 root port -> bus 1
            PciFunction(0x0100, 0x1234, 0x11E8, 0x00FF00, 0x10, 0),        # 01:00.0 edu behind it
            PciFunction(0x00F8, 0x8086, 0x2918, 0x060100, 2, 0x80)]        # 00:1f.0 LPC


def unit_template() -> Template:
    ioapic = acpi.device_scope(acpi.SCOPE_IOAPIC, 0xFF, [(0, 0)], enumeration_id=0)
    endpoints = b"".join(acpi.device_scope(acpi.SCOPE_ENDPOINT, 0, [p]) for p in ((0, 0), (4, 0)))
    bridge = acpi.device_scope(acpi.SCOPE_BRIDGE, 0, [(6, 0)])
    return Template(UNIT_BASE, 39, 0, ioapic + endpoints + bridge, 0, ioapic, (0, 4, 0), 0)


def unit_context(data: bytes, ecap: int = UNIT_ECAP_IR, hpet_fsb: int = 0b1) -> DmarContext:
    """The checks' view of ``data`` on the synthetic platform: a unit answers VER 1.0 at
    UNIT_BASE only (elsewhere reads give 0, as unassigned addresses on QEMU do); HPET 0's
    timers ``hpet_fsb`` (bit n: timer n) offer FSB delivery."""
    from harness.observe.dmar import Hpet, HpetRead, Madt, RegisterRead
    dmar = Dmar.parse(data)
    reads = {d.offset: (RegisterRead(d["register_base"], True, 0x10, 0x00D2008C22260206, ecap)
                        if d["register_base"] == UNIT_BASE else RegisterRead(d["register_base"], True))
             for d in dmar.of("DRHD")}
    madt = Madt.parse(acpi.madt([acpi.madt_local_apic(0, 0), acpi.madt_ioapic(0, 0xFEC0_0000)]))
    hpet = Hpet.parse(acpi.hpet_table(0), HpetRead(0xFED0_0000, True, 0x8086_A201_0000_0200, hpet_fsb))
    return DmarContext.from_bytes(data, reads=reads, pci=list(UNIT_PCI), madt=madt, hpets=[hpet] if hpet else [])
