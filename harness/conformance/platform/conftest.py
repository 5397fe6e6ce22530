"""Fixtures of the platform checks: one boot per target configuration gives every check its input.

``platform`` is the target's snapshot (probe + ACPI tables, ``take_snapshot``), made by the first
test that asks and shared by the rest of this process (its evidence stays in that test's
directory; every failure message names it).  ``ir_dmar`` is the DMAR of a configuration that
offers interrupt remapping: the target's own, or on a QEMU target without it, the target with
intel-iommu's ``intremap`` on.
"""

from __future__ import annotations

import pytest

from harness.observe.platform import DmarContext, NotApplicable, PlatformSnapshot
from harness.testing import INTREMAP

from ._support import snapshot_of


@pytest.fixture
def platform(vtx_target) -> PlatformSnapshot:
    """The platform snapshot of this test's target."""
    return snapshot_of(vtx_target)


@pytest.fixture
def firmware_dmar(platform: PlatformSnapshot) -> DmarContext:
    """The DMAR an OS would use on this target (skips, with the reason, where there is none)."""
    try:
        return platform.firmware_dmar()
    except NotApplicable as e:
        pytest.skip(str(e))


@pytest.fixture
def ir_dmar(vtx_target, firmware_dmar: DmarContext) -> DmarContext:
    """A DMAR of this target that offers interrupt remapping: its own, or that of the target with
    ``intremap`` on when its kind lets intel-iommu's options vary (QEMU); else a skip."""
    if firmware_dmar.ir_supported:
        return firmware_dmar
    from harness.targets import kinds
    if "iommu" not in kinds()[vtx_target.kind].SCHEMA:
        pytest.skip(f"target {vtx_target.name}: interrupt remapping is not supported (DMAR INTR_REMAP clear, "
                    "no unit reports ECAP.IR)")
    try:
        return snapshot_of(vtx_target.variant(**INTREMAP)).firmware_dmar()
    except NotApplicable as e:
        pytest.skip(str(e))
