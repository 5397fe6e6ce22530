"""The ACPI tables the DMAR checks rely on (ACPI 6.5, 5.2), on every target."""

from __future__ import annotations

import pytest

from harness.observe import platform as P
from harness.observe.dmar import Madt
from harness.observe.platform import take_snapshot
from harness.payload.acpi import RsdpFrom

from ._support import assert_no_findings


def test_rsdp_found_with_valid_checksums(platform):
    """The RSDP is where ACPI 6.5, 5.2.5.1 says and its checksums hold (5.2.5.3)."""
    assert_no_findings(P.rsdp_findings, platform, origin=platform.describe())


def test_root_table_whole_with_valid_checksum(platform):
    """The RSDT or XSDT is reachable, read whole and sums to 0 (5.2.7, 5.2.8)."""
    root = platform.acpi.root
    assert root is not None, f"no root table reported; {platform.describe()}"
    assert_no_findings(P.table_findings, root, origin=platform.describe())


@pytest.mark.parametrize("signature", ["APIC", "HPET", "DMAR"])
def test_table_whole_with_valid_checksum(platform, signature):
    """The MADT ("APIC"), HPET and DMAR tables, where present, are read whole and sum to 0."""
    found = platform.acpi.of(signature)
    if not found:
        pytest.skip(f"target {platform.target}: no {signature} table")
    for table in found:
        assert_no_findings(P.table_findings, table, origin=platform.describe())


def test_madt_lists_ioapics(platform):
    """The MADT's entries fit it and it lists at least one I/O APIC (5.2.12, 5.2.12.3): the
    IOAPIC-scope checks compare against this list."""
    found = platform.acpi.of("APIC")
    if not found:
        pytest.skip(f"target {platform.target}: no MADT")
    madt = Madt.parse(found[0].data)
    assert madt.problems == [] and madt.ioapics, f"{madt.problems or 'no I/O APIC'}; {platform.describe()}"


def test_single_dmar_table(platform):
    """At most one DMAR table (an OS uses only the first)."""
    assert_no_findings(P.single_dmar_findings, platform, origin=platform.describe())


@pytest.mark.parametrize("named, found_by", [("{rsdp:#x}", RsdpFrom.CMDLINE), ("{rsdp:X}", RsdpFrom.CMDLINE),
                                             ("0x1000", RsdpFrom.BIOS)])
def test_rsdp_named_on_the_boot_command_line(vtx_target, platform, named, found_by):
    """``acpi_rsdp=<hex>`` on the multiboot command line (how a kexec or GRUB boot of a UEFI host
    passes the RSDP) is used when an RSDP is there; an address without one is ignored and the
    BIOS areas are searched (ACPI 6.5, 5.2.5.1)."""
    if vtx_target.kind != "qemu":
        pytest.skip(f"target {vtx_target.name} is kind {vtx_target.kind}: the command line is set with QEMU's -append")
    rsdp = platform.acpi.rsdp_address
    assert platform.acpi.rsdp_from in (RsdpFrom.EBDA, RsdpFrom.BIOS) and rsdp, platform.describe()
    cmdline = f"console=ttyS0 acpi_rsdp={named.format(rsdp=rsdp)} quiet"
    variant = vtx_target.variant(extra_args=[*vtx_target.config.section["extra_args"], "-append", cmdline])
    snap = take_snapshot(variant)
    assert (snap.acpi.rsdp_from, snap.acpi.rsdp_address) == (found_by, rsdp), snap.describe()
    assert [t.signature for t in snap.acpi.tables] == [t.signature for t in platform.acpi.tables]


def test_rsdp_named_by_the_caller(vtx_target, platform):
    """An RSDP address the caller passes to acpi_dump is used as such."""
    rsdp = platform.acpi.rsdp_address
    if not rsdp:
        pytest.skip(f"target {platform.target}: no RSDP")
    snap = take_snapshot(vtx_target, rsdp=rsdp)
    assert (snap.acpi.rsdp_from, snap.acpi.rsdp_address) == (RsdpFrom.CALLER, rsdp), snap.describe()


HIGH_DRHD_BASE = 0x10_FED9_0000        # above 4 GiB: beyond the payload's identity map


def test_drhd_beyond_the_identity_map_is_listed_not_read(vtx_target, evidence_dir):
    """A DRHD whose register base lies at or above 4 GiB is reported by the boot probe and by
    acpi_dump with its base and "registers read" 0, and the payload goes on: it maps only
    [0, 4 GiB) (paging.build_identity_map), and reading there would page-fault.  QEMU without
    intel-iommu, whose only DMAR is one loaded with -acpitable (VT-d 8.3: register base at 8)."""
    if vtx_target.kind != "qemu":
        pytest.skip(f"target {vtx_target.name} is kind {vtx_target.kind}: loading tables with -acpitable needs "
                    "a local QEMU")
    from harness.payload import acpi
    from harness.payload.acpi import AcpiKind, dump_scenario
    from harness.payload.records import Kind
    from harness.targets.quoting import qemu_value

    table = evidence_dir / "dmar-high-drhd.dat"
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_bytes(acpi.dmar([acpi.drhd(HIGH_DRHD_BASE, include_pci_all=True)], oem_table_id=b"VTX-HIGH"))
    extra = [*vtx_target.config.section["extra_args"], "-acpitable", "file=" + qemu_value(str(table.resolve()))]
    variant = vtx_target.variant(iommu=None, extra_args=extra, allow_host_files=True)
    run = variant.run(dump_scenario()).expect_ok()
    units = [r.fields for r in run.records if r.kind == Kind.DMAR_UNIT]
    # index, register base, flags, segment, VER, CAP, ECAP, registers read
    assert units == [(0, HIGH_DRHD_BASE, 1, 0, 0, 0, 0, 0)], [str(r) for r in run.records if r.kind == Kind.DMAR_UNIT]
    drhds = [r.fields for r in run.records if r.kind == AcpiKind.DRHD]
    assert [(f[2], f[6]) for f in drhds] == [(HIGH_DRHD_BASE, 0)], drhds
