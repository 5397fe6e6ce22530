"""The platform checks on bytes: every DMAR check passes a good table and fails its broken one,
naming the field; the parsers read the layouts of VT-d 8 and ACPI 5.2; the VMX set-up checks
pass a real CPU's MSRs (Bochs' Skylake model) and fail each broken value."""

from __future__ import annotations

import struct

import pytest

from harness.conformance.platform.broken import (
    BREAKAGES, UNIT_BASE, broken_table, expected_field, good_table, unit_context, unit_template,
)
from harness.observe import platform as P
from harness.observe.dmar import AcpiDump, Dmar, Madt, table_checksum_ok
from harness.observe.probe import Probe
from harness.payload import acpi
from harness.payload.acpi import AcpiKind, RsdpFrom, Source
from harness.payload.records import Record

TEMPLATE = unit_template()


def findings(check: str, data: bytes, **kw) -> list[P.Finding]:
    return P.DMAR_CHECKS[check](unit_context(data, **kw))


@pytest.mark.parametrize("check", sorted(P.DMAR_CHECKS))
def test_good_table_passes(check):
    """The good table (every structure type) raises nothing in any check."""
    assert findings(check, good_table(TEMPLATE)) == []


@pytest.mark.parametrize("breakage", BREAKAGES, ids=lambda b: f"{b.check}-{b.code}")
def test_broken_table_fails_naming_the_field(breakage):
    """Each broken table makes its check report the field it broke, and only that check's
    finding is required: the same check passes the good table (test_good_table_passes)."""
    data = broken_table(TEMPLATE, breakage)
    ctx = unit_context(data)
    found = P.DMAR_CHECKS[breakage.check](ctx)
    want = ctx.where(expected_field(TEMPLATE, breakage))
    assert want in [f.field for f in found], f"{breakage.code}: expected a finding on {want}, got {found}"
    assert all(f.check == breakage.check for f in found)


def test_every_dmar_check_has_a_broken_table():
    assert {b.check for b in BREAKAGES} == set(P.DMAR_CHECKS)


def test_checks_without_input_are_not_applicable():
    """RMRR, ATSR, RHSA, ANDD, SATC and the IR checks skip (with the reason) where there is
    nothing to check, rather than pass vacuously."""
    plain = acpi.dmar([TEMPLATE.drhd()], flags=0)
    ctx = unit_context(plain, ecap=0)
    for check in ("rmrr_aligned", "rmrr_scoped", "atsr_parsed", "rhsa_parsed", "andd_parsed", "satc_parsed",
                  "ioapic_scopes", "hpet_scopes", "hpet_msi_scoped", "madt_ioapics_covered"):
        with pytest.raises(P.NotApplicable) as e:
            P.DMAR_CHECKS[check](ctx)
        assert "no " in str(e.value) or "not supported" in str(e.value)
    assert P.DMAR_CHECKS["ir_flag_matches_ecap"](ctx) == []


def test_hpet_without_msi_needs_no_scope():
    """An HPET none of whose timers offers FSB delivery needs no scope: not applicable, said why."""
    with pytest.raises(P.NotApplicable, match="Tn_FSB_INT_DEL_CAP"):
        P.hpet_msi_scoped(unit_context(acpi.dmar([TEMPLATE.drhd()], flags=acpi.DMAR_INTR_REMAP), hpet_fsb=0))


def test_ir_flag_set_while_a_unit_lacks_ir():
    ctx = unit_context(acpi.dmar([TEMPLATE.drhd()], flags=acpi.DMAR_INTR_REMAP), ecap=0)
    assert [f.field for f in P.ir_flag_matches_ecap(ctx)] == [ctx.where("flags")]


def test_x2apic_opt_out_without_intr_remap():
    ctx = unit_context(acpi.dmar([TEMPLATE.drhd()], flags=acpi.DMAR_X2APIC_OPT_OUT), ecap=0)
    assert [f.message for f in P.ir_flag_matches_ecap(ctx)] == ["X2APIC_OPT_OUT is set without INTR_REMAP"]


def test_scope_path_through_a_bridge():
    """A two-hop endpoint path resolves through the root port's secondary bus (VT-d 8.3.1.3);
    a hop through a non-bridge, or a sub-hierarchy scope naming an endpoint, is reported."""
    through = acpi.device_scope(acpi.SCOPE_ENDPOINT, 0, [(6, 0), (0, 0)])
    assert findings("scopes_in_pci", acpi.dmar([TEMPLATE.drhd(through)])) == []
    via_endpoint = acpi.device_scope(acpi.SCOPE_ENDPOINT, 0, [(4, 0), (0, 0)])
    [f] = findings("scopes_in_pci", acpi.dmar([TEMPLATE.drhd(via_endpoint)]))
    assert "is not a bridge, yet the path goes on" in f.message
    bridge_at_endpoint = acpi.device_scope(acpi.SCOPE_BRIDGE, 0, [(4, 0)])
    [f] = findings("scopes_in_pci", acpi.dmar([TEMPLATE.drhd(bridge_at_endpoint)]))
    assert "not a bridge" in f.message and f.field.endswith(".path")


def test_scope_running_past_its_structure():
    scope = bytearray(acpi.device_scope(acpi.SCOPE_ENDPOINT, 0, [(4, 0)]))
    scope[1] = 12                                       # claims 12 bytes, 8 are there
    drhd = acpi.drhd(UNIT_BASE, [bytes(scope)])
    [f] = findings("scopes_well_formed", acpi.dmar([drhd]))
    assert f.field.endswith("DRHD@0x30.scope@0x40.length") and "end inside its structure" in f.message
    assert findings("length", acpi.dmar([drhd])) == []  # a scope problem is not a table-length one


def test_duplicate_ioapic_requester_ids():
    second = acpi.device_scope(acpi.SCOPE_HPET, 0xFF, [(0, 0)])   # the IOAPIC's requester ID again
    ctx = unit_context(acpi.dmar([TEMPLATE.drhd(TEMPLATE.drhd_scopes + second)]))
    [f] = P.hpet_scopes(ctx)
    assert "requester ID 0xff00 is also that of IOAPIC scope" in f.message


# --- parsing -----------------------------------------------------------------------------------

def test_dmar_parse_reads_every_structure_and_scope():
    d = Dmar.parse(good_table(TEMPLATE))
    assert d.header is not None and d.header.signature == "DMAR" and d.header.table_id == "VTX-GOOD"
    assert (d.host_address_width, d.flags, d.problems) == (39, acpi.DMAR_INTR_REMAP, [])
    assert [s.kind for s in d.structures] == ["DRHD", "RMRR", "ATSR", "RHSA", "ANDD", "SATC"]
    drhd = d.structures[0]
    assert (drhd.offset, drhd["register_base"], drhd["flags"]) == (48, UNIT_BASE, 0)
    types = [(sc.type, sc.start_bus, sc.path, sc.enumeration_id) for sc in drhd.scopes]
    assert types[0] == (3, 0xFF, ((0, 0),), 0) and types[-1] == (4, 0, ((0x1F, 6),), 0)
    assert drhd.scopes[0].requester_id == 0xFF00
    rmrr = d.of("RMRR")[0]
    assert (rmrr["base"], rmrr["limit"], rmrr.scopes[0].path) == (0xE0000, 0xE0FFF, ((4, 0),))
    assert d.of("ANDD")[0].name_string == r"\_SB.PCI0.SBRG" and d.of("ANDD")[0]["device_number"] == 1
    assert table_checksum_ok(d.data)


def test_dmar_parse_never_raises_on_short_or_garbage_bytes():
    for data in (b"", b"DMAR", acpi.sdt("DMAR", b"\x26"), acpi.dmar([b"\x00\x00\x02\x00"])):
        d = Dmar.parse(data)
        assert d.problems, data
    d = Dmar.parse(acpi.dmar([b"\x00\x00\x02\x00"]))
    assert d.problems[0].field == "DRHD@0x30.length" and "below the minimum 16" in d.problems[0].message


def test_madt_parse_finds_ioapics_and_overrides():
    m = Madt.parse(acpi.madt([acpi.madt_local_apic(0, 0), acpi.madt_ioapic(2, 0xFEC0_0000, 24),
                              acpi.madt_override(0, 2, flags=0), acpi.madt_override(9, 9, flags=0xD)]))
    assert [(io.ioapic_id, io.address, io.gsi_base) for io in m.ioapics] == [(2, 0xFEC0_0000, 24)]
    assert m.lapic_address == 0xFEE0_0000 and m.problems == []
    assert [(o.source, o.gsi, o.flags) for o in m.overrides] == [(0, 2, 0), (9, 9, 0xD)]
    assert (m.isa_gsi(0), m.isa_gsi(4)) == (2, 4)
    assert m.ioapic_for_gsi(30) is m.ioapics[0] and m.ioapic_for_gsi(2) is None


def _records(tables: list[tuple[int, str, bytes, Source]]) -> list[Record]:
    out, seq = [], 0
    for number, (address, sig, data, source) in enumerate(tables):
        out.append(Record(seq, AcpiKind.TABLE, (number, address, int.from_bytes(sig.encode(), "little"), len(data),
                                                len(data), int(source), 1)))
        seq += 1
        padded = data + bytes(-len(data) % 8)
        for off in range(0, len(padded), 80):
            chunk = padded[off:off + 80]
            out.append(Record(seq, AcpiKind.BYTES, (number, off, *struct.unpack(f"<{len(chunk) // 8}Q", chunk))))
            seq += 1
    out.append(Record(seq, AcpiKind.DONE, (len(tables), 0xF59E0, 0x1000, 4, 4)))
    return out


def test_acpi_dump_reassembles_tables_from_records():
    dmar = good_table(TEMPLATE)
    madt = acpi.madt([acpi.madt_ioapic(0, 0xFEC0_0000)])
    dump = AcpiDump.from_records(_records([(0x1000, "RSDT", acpi.sdt("RSDT", b""), Source.ROOT),
                                           (0x2000, "DMAR", dmar, Source.ENTRY), (0x3000, "APIC", madt, Source.ENTRY)]))
    assert dump.done and dump.rsdp_address == 0xF59E0 and dump.rsdp_from == RsdpFrom.BIOS
    assert [t.name for t in dump.tables] == ["RSDT@0x1000", "DMAR@0x2000", "APIC@0x3000"]
    assert dump.of("DMAR")[0].data == dmar and dump.of("APIC")[0].data == madt
    assert dump.of("DMAR")[0].complete and dump.root is not None and dump.rsdp is None


def _snapshot(tables) -> P.PlatformSnapshot:
    return P.PlatformSnapshot("unit", Probe(), AcpiDump.from_records(_records(tables)))


def test_rsdp_and_table_checksums():
    rsdp = b"RSD PTR " + bytes([0]) + b"VTXHRN" + bytes([0]) + struct.pack("<I", 0x1000)
    rsdp = rsdp[:8] + bytes([-sum(rsdp) & 0xFF]) + rsdp[9:]
    good = _snapshot([(0xF59E0, "RSD ", rsdp, Source.RSDP), (0x1000, "RSDT", acpi.sdt("RSDT", b""), Source.ROOT)])
    assert P.rsdp_findings(good) == [] and P.table_findings(good.acpi.root) == []
    broken_rsdp = rsdp[:8] + bytes([(rsdp[8] + 1) & 0xFF]) + rsdp[9:]
    bad_root = bytearray(acpi.sdt("RSDT", b""))
    bad_root[9] ^= 1
    bad = _snapshot([(0xF59E0, "RSD ", broken_rsdp, Source.RSDP), (0x1000, "RSDT", bytes(bad_root), Source.ROOT)])
    assert [f.field for f in P.rsdp_findings(bad)] == ["RSD@0xf59e0.checksum"]
    assert [f.field for f in P.table_findings(bad.acpi.root)] == ["RSDT@0x1000.checksum"]
    assert [f.field for f in P.rsdp_findings(_snapshot([]))] == ["RSDP"]


def test_second_dmar_is_reported():
    dmar = good_table(TEMPLATE)
    snap = _snapshot([(0x2000, "DMAR", dmar, Source.ENTRY), (0x3000, "DMAR", dmar, Source.ENTRY)])
    assert [f.field for f in P.single_dmar_findings(snap)] == ["DMAR"]
    assert P.single_dmar_findings(_snapshot([(0x2000, "DMAR", dmar, Source.ENTRY)])) == []


# --- VMX set-up (SDM Vol. 3D, appendix A) --------------------------------------------------------

# Bochs 2.7 corei7_skylake_x, as its boot probe reported them.
SKYLAKE = {0x3A: 0x5, 0x480: 0xD810000000002B, 0x481: 0x7F00000016, 0x482: 0xF7F9FFFE0401E172,
           0x483: 0x7FFFFF00036DFF, 0x484: 0xFFFF000011FF, 0x485: 0x600401E0, 0x486: 0x80000021,
           0x487: 0xFFFFFFFF, 0x488: 0x2000, 0x489: 0x3727FF, 0x48A: 0x34, 0x48B: 0x2177FFF00000000,
           0x48C: 0xF0106334141, 0x48D: 0x7F00000016, 0x48E: 0xF7F9FFFE04006172, 0x48F: 0x7FFFFF00036DFB,
           0x490: 0xFFFF000011FB, 0x491: 0x1}


def probe(**changes: int) -> Probe:
    msrs = dict(SKYLAKE)
    msrs.update({int(k[1:], 16): v for k, v in changes.items()})
    return Probe(features_ecx=1 << 5, msrs=msrs)


def all_vmx_findings(p: Probe) -> list[P.Finding]:
    out = P.feature_control_findings(p) + P.basic_findings(p) + P.misc_findings(p) + P.vmcs_enum_findings(p)
    out += P.ept_vpid_findings(p) + P.fixed_findings(p, "CR0") + P.fixed_findings(p, "CR4")
    for msr in P.CONTROL_MSRS:
        out += P.controls_findings(p, msr)
    for msr in P.TRUE_OF:
        out += P.true_controls_findings(p, msr)
    return out


def test_skylake_passes_every_vmx_check():
    assert all_vmx_findings(probe()) == []


@pytest.mark.parametrize("msr, value, field", [
    ("x3a", 0x4, "IA32_FEATURE_CONTROL.lock"),
    ("x3a", 0x1, "IA32_FEATURE_CONTROL.vmx_outside_smx"),
    ("x480", 0xD810008000002B, "IA32_VMX_BASIC.revision"),
    ("x480", 0xD810000000000000, "IA32_VMX_BASIC.revision"),
    ("x480", 0xD812000000002B, "IA32_VMX_BASIC.region_size"),
    ("x480", 0xC810000000002B, "IA32_VMX_BASIC.memory_type"),
    ("x480", 0xD910000000002B, "IA32_VMX_BASIC.physical_width"),
    ("x481", 0x7E00000016 | 1, "IA32_VMX_PINBASED_CTLS.allowed0"),
    ("x48b", 0x2177FFF80000000, "IA32_VMX_PROCBASED_CTLS2.allowed0"),
    ("x48d", 0x7F00000017, "IA32_VMX_TRUE_PINBASED_CTLS.allowed0"),
    ("x48e", 0xF7F9FFFE04006176, "IA32_VMX_TRUE_PROCBASED_CTLS.allowed0"),
    ("x490", 0xFFFE000011FB, "IA32_VMX_TRUE_ENTRY_CTLS.allowed1"),
    ("x483", 0x7FFFFF00036DFE, "IA32_VMX_EXIT_CTLS.allowed0"),
    ("x486", 0x80000020, "IA32_VMX_CR0_FIXED0.PE"),
    ("x487", 0x7FFFFFFF, "IA32_VMX_CR0_FIXED1"),
    ("x488", 0x0, "IA32_VMX_CR4_FIXED0.VMXE"),
    ("x485", 0x600403E0, "IA32_VMX_MISC.reserved"),
    ("x485", 0x600401C0, "IA32_VMX_MISC.lma_store"),
    ("x48a", 0x35, "IA32_VMX_VMCS_ENUM.reserved"),
    ("x48c", 0xF0106334101, "IA32_VMX_EPT_VPID_CAP.walk4"),
])
def test_broken_vmx_value_fails_naming_the_field(msr, value, field):
    found = all_vmx_findings(probe(**{msr: value}))
    assert field in [f.field for f in found], found


def test_vmx_checks_need_vmx():
    with pytest.raises(P.NotApplicable, match="CPUID.1:ECX.VMX"):
        P.require_vmx(Probe(), "qemu-tcg")
    with pytest.raises(AssertionError, match="IA32_VMX_MISC"):
        P.misc_findings(Probe(features_ecx=1 << 5))


def test_drhd_base_beyond_the_identity_map_is_skipped_with_its_reason():
    """A DRHD at or above 4 GiB (legal: VT-d 8.3 gives the base 64 bits) whose registers the
    payload did not read is no finding; a unit that was read still has to answer VER; when no
    base was read the check is not applicable and names the bases."""
    from harness.observe.dmar import RegisterRead
    high = 0x10_FED9_0000
    data = acpi.dmar([TEMPLATE.drhd(), acpi.drhd(high, [TEMPLATE.endpoint_scope()])], flags=0)
    ctx = unit_context(data)
    second = ctx.drhds[1]
    ctx.reads[second.offset] = RegisterRead(high, False)
    assert P.drhd_answers_ver(ctx) == []
    ctx.reads[ctx.drhds[0].offset] = RegisterRead(TEMPLATE.register_base, True, 0xFFFF_FFFF)
    assert [f.field for f in P.drhd_answers_ver(ctx)] == [ctx.where(f"{ctx.drhds[0].label}.register_base")]
    ctx.reads[ctx.drhds[0].offset] = RegisterRead(TEMPLATE.register_base, False)
    with pytest.raises(P.NotApplicable) as e:
        P.drhd_answers_ver(ctx)
    assert f"{second.label}.register_base {high:#x}" in str(e.value) and "4 GiB" in str(e.value)
