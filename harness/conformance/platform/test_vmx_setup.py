"""The CPU's VMX set-up as firmware left it (Intel SDM Vol. 3D, appendix A), from the boot
probe's MSRs, on every target; targets without VMX skip, saying so."""

from __future__ import annotations

import pytest

from harness.observe import platform as P

from ._support import assert_no_findings


@pytest.fixture
def vmx_probe(vtx_target):
    """The boot probe of a target whose CPU offers VMX (CPUID.1:ECX.VMX)."""
    try:
        P.require_vmx(vtx_target.probe, vtx_target.name)
    except P.NotApplicable as e:
        pytest.skip(str(e))
    return vtx_target.probe


def _origin(vtx_target) -> str:
    return f"target {vtx_target.name} (probe evidence: {vtx_target.session.probe_evidence})"


def test_feature_control_locked_with_vmx_enabled(vtx_target, vmx_probe):
    """IA32_FEATURE_CONTROL: lock and VMXON outside SMX set (SDM Vol. 3C, 24.7)."""
    assert_no_findings(P.feature_control_findings, vmx_probe, origin=_origin(vtx_target))


def test_vmcs_revision_and_basic_fields(vtx_target, vmx_probe):
    """IA32_VMX_BASIC: revision, region size, memory type, reserved bits (A.1)."""
    assert_no_findings(P.basic_findings, vmx_probe, origin=_origin(vtx_target))


@pytest.mark.parametrize("msr", sorted(P.CONTROL_MSRS), ids=lambda m: P.CONTROL_MSRS[m])
def test_allowed0_subset_of_allowed1(vtx_target, vmx_probe, msr):
    """Every must-be-1 control is allowed to be 1 (A.3-A.5)."""
    if msr in P.TRUE_OF.values() and not vmx_probe.msr(0x480) >> 55 & 1:
        pytest.skip("IA32_VMX_BASIC bit 55 is 0: no TRUE capability MSRs (A.1)")
    if msr == 0x48B and not (vmx_probe.msr(0x482) or 0) >> 63 & 1:
        pytest.skip("no secondary processor-based controls (IA32_VMX_PROCBASED_CTLS bit 63)")
    assert_no_findings(P.controls_findings, vmx_probe, msr, origin=_origin(vtx_target))


@pytest.mark.parametrize("msr", sorted(P.TRUE_OF), ids=lambda m: P.CONTROL_MSRS[m])
def test_true_msrs_consistent_with_legacy(vtx_target, vmx_probe, msr):
    """The TRUE MSR relaxes only default1 controls and allows the same 1-settings (A.2)."""
    if not vmx_probe.msr(0x480) >> 55 & 1:
        pytest.skip("IA32_VMX_BASIC bit 55 is 0: no TRUE capability MSRs (A.1)")
    assert_no_findings(P.true_controls_findings, vmx_probe, msr, origin=_origin(vtx_target))


@pytest.mark.parametrize("register", ["CR0", "CR4"])
def test_cr_fixed_bits(vtx_target, vmx_probe, register):
    """FIXED0 is a subset of FIXED1; PE, NE, PG and VMXE are fixed to 1 (A.7, A.8)."""
    assert_no_findings(P.fixed_findings, vmx_probe, register, origin=_origin(vtx_target))


def test_vmx_misc_fields_sane(vtx_target, vmx_probe):
    """IA32_VMX_MISC: reserved bits, CR3-target count, LMA store with unrestricted guest (A.6)."""
    assert_no_findings(P.misc_findings, vmx_probe, origin=_origin(vtx_target))


def test_vmcs_enum_sane(vtx_target, vmx_probe):
    """IA32_VMX_VMCS_ENUM: a highest index and no reserved bits (A.9)."""
    assert_no_findings(P.vmcs_enum_findings, vmx_probe, origin=_origin(vtx_target))


def test_ept_vpid_capabilities_sane(vtx_target, vmx_probe):
    """IA32_VMX_EPT_VPID_CAP: 4-level walk, a memory type, INVEPT/INVVPID types (A.10)."""
    assert_no_findings(P.ept_vpid_findings, vmx_probe, origin=_origin(vtx_target))
