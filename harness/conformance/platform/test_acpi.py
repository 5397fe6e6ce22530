"""The ACPI tables the DMAR checks rely on (ACPI 6.5, 5.2), on every target."""

from __future__ import annotations

import pytest

from harness.observe import platform as P
from harness.observe.dmar import Madt

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
