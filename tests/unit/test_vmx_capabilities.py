"""VMX capability names from the boot probe (SDM Vol. 3D, A.3-A.11; CPUID.1:ECX, Vol. 2A)."""

from __future__ import annotations

import pytest

from harness.observe.probe import (
    CPUID1_ECX_CAPS, ENTRY_CAPS, EXIT_CAPS, MISC_CAPS, PIN_CAPS, PROC2_CAPS, PROC_CAPS, Probe, vmx_capabilities,
)
from harness.payload.vmx.controls import (
    IA32_FEATURE_CONTROL, IA32_VMX_BASIC, IA32_VMX_ENTRY_CTLS, IA32_VMX_EPT_VPID_CAP, IA32_VMX_EXIT_CTLS,
    IA32_VMX_MISC, IA32_VMX_PINBASED_CTLS, IA32_VMX_PROCBASED_CTLS, IA32_VMX_PROCBASED_CTLS2, IA32_VMX_VMFUNC,
    EntryCtl, ExitCtl, Pin, Proc, Proc2,
)
from harness.testing import requires, vmx_test

# The same controls as the payload layer's flags: two transcriptions of the SDM's tables must agree.
SAME_BIT = [
    (PIN_CAPS, "preemption_timer", Pin.PREEMPTION_TIMER), (PROC_CAPS, "monitor_trap_flag", Proc.MONITOR_TRAP_FLAG),
    (PROC2_CAPS, "apic_register_virtualization", Proc2.APIC_REGISTER_VIRT),
    (PROC2_CAPS, "virtual_interrupt_delivery", Proc2.VIRTUAL_INTR_DELIVERY), (PROC2_CAPS, "pml", Proc2.PML),
    (PROC2_CAPS, "vmfunc", Proc2.VMFUNC),
    (EXIT_CAPS, "save_debug_controls", ExitCtl.SAVE_DEBUG),
    (EXIT_CAPS, "exit_load_perf_global_ctrl", ExitCtl.LOAD_PERF_GLOBAL_CTRL),
    (EXIT_CAPS, "ack_interrupt_on_exit", ExitCtl.ACK_INTERRUPT), (EXIT_CAPS, "save_pat", ExitCtl.SAVE_PAT),
    (EXIT_CAPS, "exit_load_pat", ExitCtl.LOAD_PAT), (EXIT_CAPS, "save_efer", ExitCtl.SAVE_EFER),
    (EXIT_CAPS, "exit_load_efer", ExitCtl.LOAD_EFER),
    (EXIT_CAPS, "save_preemption_timer", ExitCtl.SAVE_PREEMPTION_TIMER),
    (ENTRY_CAPS, "load_debug_controls", EntryCtl.LOAD_DEBUG),
    (ENTRY_CAPS, "entry_load_perf_global_ctrl", EntryCtl.LOAD_PERF_GLOBAL_CTRL),
    (ENTRY_CAPS, "entry_load_pat", EntryCtl.LOAD_PAT), (ENTRY_CAPS, "entry_load_efer", EntryCtl.LOAD_EFER),
]


@pytest.mark.parametrize("table, name, flag", SAME_BIT, ids=[n for _, n, _ in SAME_BIT])
def test_a_capability_name_is_the_bit_of_its_control(table: dict, name: str, flag: int) -> None:
    assert 1 << table[name] == flag


def _probe(exit_may1: int = 0, entry_may1: int = 0, proc2_may1: int = 0, misc: int = 0, vmfunc: int = 0,
           ecx: int = 1 << 5) -> Probe:
    """A probe whose control MSRs allow exactly these bits to be 1 (high halves, A.3-A.5)."""
    return Probe(vendor="GenuineIntel", features_ecx=ecx, msrs={
        IA32_FEATURE_CONTROL: 0b101, IA32_VMX_BASIC: 1 << 55, IA32_VMX_PINBASED_CTLS: 0,
        IA32_VMX_PROCBASED_CTLS: (1 << 31) << 32, IA32_VMX_PROCBASED_CTLS2: proc2_may1 << 32,
        IA32_VMX_EXIT_CTLS: exit_may1 << 32, IA32_VMX_ENTRY_CTLS: entry_may1 << 32, IA32_VMX_MISC: misc,
        IA32_VMX_EPT_VPID_CAP: 0, IA32_VMX_VMFUNC: vmfunc})


def test_probed_controls_activity_states_vm_functions_and_cpu_features_are_named() -> None:
    caps = vmx_capabilities(_probe(exit_may1=ExitCtl.ACK_INTERRUPT | ExitCtl.SAVE_PAT, entry_may1=EntryCtl.LOAD_PAT,
                                   proc2_may1=Proc2.VMFUNC | Proc2.PML, misc=1 << 6 | 1 << 8, vmfunc=1,
                                   ecx=1 << 5 | 1 << 26 | 1 << 30))
    assert {"ack_interrupt_on_exit", "save_pat", "entry_load_pat", "pml", "vmfunc", "eptp_switching",
            "activity_hlt", "activity_wait_sipi", "xsave", "rdrand"} <= caps
    assert not {"exit_load_pat", "save_efer", "activity_shutdown", "smx", "monitor_mwait",
                "load_debug_controls"} & caps
    assert CPUID1_ECX_CAPS["smx"] == 6 and MISC_CAPS["activity_shutdown"] == 7


def test_eptp_switching_needs_vm_functions_enabled() -> None:
    """IA32_VMX_VMFUNC is read only when the 'enable VM functions' control may be 1 (A.11)."""
    assert "eptp_switching" not in vmx_capabilities(_probe(vmfunc=1))


def test_a_parameter_requirement_is_checked_at_import() -> None:
    assert requires("ept_1g").args == ("ept_1g",)
    with pytest.raises(TypeError, match="unknown capability name"):
        requires("ept_1gb")
    with pytest.raises(TypeError, match="unknown capability name"):
        @vmx_test("ack_interrupt_on_exitt")
        def test_misspelt(v):
            yield


@pytest.mark.parametrize("leaf_0ah_eax, named", [(0x07300404, True), (0x0730_0004, False), (0x0730_0400, False), (0, False)],
                         ids=["v4-4-counters", "v4-no-counters", "no-version", "no-leaf"])
def test_perfmon_counters_needs_a_pmu_version_and_general_purpose_counters(leaf_0ah_eax: int, named: bool) -> None:
    """CPUID.0AH:EAX bits 7:0 version, 15:8 GP counters (SDM Vol. 3B 20.2.1): without a counter
    every bit of IA32_PERF_GLOBAL_CTRL is reserved."""
    p = _probe()
    p.perfmon = leaf_0ah_eax
    assert ("perfmon_counters" in vmx_capabilities(p)) is named
