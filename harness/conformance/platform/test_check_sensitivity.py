"""A test of the platform checks: broken DMAR tables loaded into QEMU make them fail, naming the field.

One boot of the target with interrupt remapping on, an MSI-capable HPET and, besides QEMU's own DMAR, one table per
breakage of ``broken.py`` loaded with ``-acpitable`` (each a copy of the target's own DMAR with one
field broken, told apart by its OEM table ID), plus one good table holding every structure type.
The payload reads them from guest memory and reads each DRHD's register base, as on any target;
the checks then run on each table.  The table files are written into this test's evidence
directory (they are evidence) and QEMU only reads them.  QEMU recomputes a loaded table's length
and checksum, so those two breakages are checked at unit level only (tests/unit/test_dmar_checks.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.observe import platform as P
from harness.targets.quoting import qemu_value

from ._support import snapshot_of
from .broken import BREAKAGES, GOOD_ID, Breakage, Template, broken_table, expected_field, good_table

LOADED = [b for b in BREAKAGES if b.acpitable]
_LOADS: dict[str, "Loaded"] = {}


class Loaded:
    """The injected boot: the snapshot and each loaded table's context by OEM table ID."""

    def __init__(self, template: Template, snap: P.PlatformSnapshot):
        self.template = template
        self.snap = snap
        self.by_id = {c.dmar.header.oem_table_id: c for c in snap.dmar_contexts() if c.dmar.header is not None}

    def context(self, table_id: bytes) -> P.DmarContext:
        ctx = self.by_id.get(table_id)
        assert ctx is not None, (f"table {table_id!r} was not among the DMARs the payload found: "
                                 f"{sorted(self.by_id)}; {self.snap.describe()}")
        return ctx


def write_tables(template: Template, where: Path) -> list[Path]:
    """The good table and every loadable broken one, as files QEMU reads with -acpitable."""
    where.mkdir(parents=True, exist_ok=True)
    files = []
    for name, data in [("GOOD", good_table(template))] + [(b.code, broken_table(template, b)) for b in LOADED]:
        path = where / f"dmar-{name}.dat"
        path.write_bytes(data)
        files.append(path)
    return files


@pytest.fixture
def loaded(vtx_target, evidence_dir, request) -> Loaded:
    """The injected boot of this target (once per process), or a skip naming why it cannot be."""
    if vtx_target.kind != "qemu":
        pytest.skip(f"target {vtx_target.name} is kind {vtx_target.kind}: loading tables with -acpitable needs "
                    "a local QEMU")
    key = vtx_target.name
    if key not in _LOADS:
        platform = request.getfixturevalue("platform")
        try:
            template = Template.from_platform(platform.firmware_dmar())
        except P.NotApplicable as e:
            pytest.skip(str(e))
        # HPET timers that offer FSB (MSI) delivery, so that the HPET-scope check applies.
        extra = [*vtx_target.config.section["extra_args"], "-global", "hpet.msi=on"]
        for path in write_tables(template, evidence_dir / "acpi-tables"):
            extra += ["-acpitable", "file=" + qemu_value(str(path.resolve()))]
        variant = vtx_target.variant(iommu={"intremap": True}, extra_args=extra, allow_host_files=True)
        _LOADS[key] = Loaded(template, snapshot_of(variant))
    return _LOADS[key]


def test_loaded_tables_follow_the_firmware_dmar(loaded):
    """QEMU lists its own DMAR first (the one the probe and an OS use) and every loaded table
    after it, each once; the single-DMAR check reports them all."""
    contexts = loaded.snap.dmar_contexts()
    assert not contexts[0].dmar.header.oem_table_id.startswith(b"VTX-"), "a loaded table came first"
    assert loaded.snap.probe.dmar_table == contexts[0].table.address
    ids = [c.dmar.header.oem_table_id for c in contexts[1:]]
    assert ids == [GOOD_ID] + [b.table_id for b in LOADED]
    [finding] = P.single_dmar_findings(loaded.snap)
    assert finding.field == "DMAR" and f"{len(LOADED) + 2} DMAR tables" in finding.message


@pytest.mark.parametrize("check", sorted(P.DMAR_CHECKS))
def test_good_table_passes(loaded, check):
    """The loaded good table (every structure type, read back from guest memory) passes."""
    ctx = loaded.context(GOOD_ID)
    assert P.DMAR_CHECKS[check](ctx) == [], loaded.snap.describe()


@pytest.mark.parametrize("breakage", LOADED, ids=lambda b: f"{b.check}-{b.code}")
def test_broken_table_fails_naming_the_field(loaded, breakage: Breakage):
    """The check fails on the loaded broken table and names the field that was broken."""
    ctx = loaded.context(breakage.table_id)
    found = P.DMAR_CHECKS[breakage.check](ctx)
    want = ctx.where(expected_field(loaded.template, breakage))
    assert want in [f.field for f in found], f"expected a finding on {want}, got {found}; {loaded.snap.describe()}"
