"""The boot probe on QEMU TCG reports the DMAR unit and CAP/ECAP values that QEMU's options imply.

CAP/ECAP fields: VT-d specification 11.4.2 and 11.4.3.  QEMU 7.2 facts: the unit is at
0xfed90000; SAGAW is 0x2 (3-level) by default and 0x6 with aw-bits=48; caching-mode sets CAP.CM.
"""

import pytest

from harness.observe.runner import run_scenario
from harness.payload.image import Scenario
from harness.targets import open_target
from harness.targets.config import from_dict

pytestmark = pytest.mark.emulated


def qemu(name: str, iommu: dict | None, **extra) -> object:
    section = {"accel": "tcg", "machine": "q35", "cpu": "max", "memory_mb": 128, "iommu": iommu, **extra}
    return open_target(from_dict({"name": name, "kind": "qemu", "timeout_s": 30, "qemu": section}, name))


def probe(target, evidence_dir):
    return run_scenario(target, Scenario(name="probe"), evidence_dir / target.name).expect_ok().probe


def test_without_iommu_no_dmar_unit_is_reported(evidence_dir):
    p = probe(qemu("plain", None), evidence_dir)
    assert p.dmar_units == []
    assert p.dmar_table is None
    assert p.max_leaf >= 1 and p.vendor in ("GenuineIntel", "AuthenticAMD")


def test_default_intel_iommu_is_one_unit_at_fed90000_with_3_level_tables(evidence_dir):
    p = probe(qemu("vtd39", {"aw_bits": 39}), evidence_dir)
    assert len(p.dmar_units) == 1
    u = p.dmar_units[0]
    assert u.base == 0xFED9_0000
    assert u.segment == 0
    assert u.ver == 0x10                      # VER_REG: major 1, minor 0
    assert u.sagaw == 0x2 and u.levels == (3,)
    assert u.mgaw == 39
    assert not u.caching_mode
    assert u.qi and not u.intremap
    assert p.dmar_haw == 39                   # DMAR "host address width" field is HAW - 1


def test_aw_bits_48_adds_4_level_tables(evidence_dir):
    u = probe(qemu("vtd48", {"aw_bits": 48}), evidence_dir).dmar_units[0]
    assert u.sagaw == 0x6 and u.levels == (3, 4)
    assert u.mgaw == 48


def test_caching_mode_on_sets_cap_cm(evidence_dir):
    u = probe(qemu("vtdcm", {"aw_bits": 39, "caching_mode": True}), evidence_dir).dmar_units[0]
    assert u.caching_mode
    assert u.cap & (1 << 7)


def test_intremap_on_sets_ecap_ir_and_dmar_intr_remap_flag(evidence_dir):
    p = probe(qemu("vtdir", {"aw_bits": 39, "intremap": True}), evidence_dir)
    assert p.dmar_units[0].intremap
    assert p.dmar_units[0].ecap & (1 << 3)
    assert p.dmar_flags & 1                   # INTR_REMAP flag of the DMAR table


def test_probe_stores_the_unit_base_for_steps(evidence_dir):
    """vars[1] holds the first unit's base: a step relative to it reads VER_REG."""
    from harness.payload.steps import VAR_DMAR0

    s = Scenario(name="ver-via-var")
    i = s.steps.mmio_read(0x0, size=4, base=VAR_DMAR0)
    run = run_scenario(qemu("vtd-var", {"aw_bits": 39}), s, evidence_dir / "var").expect_ok()
    assert run.value(i) == 0x10
