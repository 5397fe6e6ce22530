"""MSR load/save controls (SDM Vol. 3C, 25.7.1, 25.8.1, 26.3.2.1, 27.3.3, 27.5.1) with their
reserved-bit checks (26.2.2, 26.3.1.1), the preemption-timer save control (27.3.4) and the MSR
areas with IA32_TSC and the TSC offset (26.4, 27.4, 25.6.5).

Guests read and write the MSRs themselves through an empty MSR bitmap (no exits)."""

from harness.testing import ENTRY_FAILURE, EntryCtl, Exit, ExitCtl, F, Pin, Proc, VmError, deviation, vmx_test

BOCHS = "bochs"                     # every Bochs target (Bochs 2.7's VMX model)

IA32_TSC, IA32_PAT, IA32_DEBUGCTL, IA32_PERF_GLOBAL_CTRL, IA32_EFER = 0x10, 0x277, 0x1D9, 0x38F, 0xC000_0080
PAT_DEFAULT = 0x0007_0406_0007_0406        # power-up value (SDM Vol. 3A, 11.12.4)


def with_pat_entry(pat: int, n: int, memory_type: int) -> int:
    """``pat`` with entry PAn (byte n, SDM Vol. 3A 11.12.2) replaced by ``memory_type``: OR-ing a
    type into a byte that already holds one would make a different, possibly valid, type."""
    return pat & ~(0xFF << 8 * n) | memory_type << 8 * n
PAT_GUEST = 0x0001_0406_0507_0406          # every entry a valid type (0, 1, 4, 5, 6, 7)
PAT_HOST = 0x0107_0406_0007_0406           # PA7 (unused by the engine's tables) := WC
EFER_SCE, EFER_LME, EFER_LMA, EFER_NXE = 1 << 0, 1 << 8, 1 << 10, 1 << 11
MSR_AREA = 0x0190_0000                     # 25 MiB: MSR-store / MSR-load areas (16-byte entries)


def _rdmsr_guest(v, msr: int) -> None:
    v.msr_bitmap = True
    v.guest(f"""
        mov ecx, {msr:#x}
        rdmsr
        shl rdx, 32
        or rax, rdx
        mov rbx, rax
        vmcall
    """)


@vmx_test("entry_load_pat")
def test_load_pat_on_entry_gives_the_guest_its_pat(v):
    v.entry_ctls |= EntryCtl.LOAD_PAT
    v.fields[F.GUEST_PAT] = PAT_GUEST
    _rdmsr_guest(v, IA32_PAT)
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.VMCALL]
    assert r.exit.regs["rbx"] == PAT_GUEST


@vmx_test("save_pat", "entry_load_pat")
def test_save_pat_on_exit_stores_the_guest_pat(v):
    v.entry_ctls |= EntryCtl.LOAD_PAT
    v.exit_ctls |= ExitCtl.SAVE_PAT
    v.fields[F.GUEST_PAT] = PAT_DEFAULT
    v.msr_bitmap = True
    v.guest(f"""
        mov ecx, {IA32_PAT:#x}
        mov eax, {PAT_GUEST & 0xFFFF_FFFF:#x}
        mov edx, {PAT_GUEST >> 32:#x}
        wrmsr
        vmcall
    """)
    v.vmread_after(F.GUEST_PAT)
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.VMCALL]
    assert r.reads[F.GUEST_PAT] == PAT_GUEST


@vmx_test("exit_load_pat")
def test_load_pat_on_exit_gives_the_host_its_pat(v):
    v.exit_ctls |= ExitCtl.LOAD_PAT
    v.fields[F.HOST_PAT] = PAT_HOST
    v.guest("vmcall")
    v.rdmsr_after(IA32_PAT)
    v.wrmsr_after(IA32_PAT, PAT_DEFAULT)
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.VMCALL]
    assert r.msrs[IA32_PAT] == PAT_HOST


@vmx_test("entry_load_pat")
def test_guest_pat_with_a_reserved_memory_type_fails_entry(v):
    v.entry_ctls |= EntryCtl.LOAD_PAT
    v.fields[F.GUEST_PAT] = with_pat_entry(PAT_DEFAULT, 1, 2)   # PA1 := 2, reserved (26.3.1.1)
    v.guest("vmcall")
    v.enter_guest()
    r = yield
    assert r.exit.full_reason == ENTRY_FAILURE | Exit.ENTRY_FAIL_GUEST_STATE
    assert r.exit.qualification == 0


@vmx_test("exit_load_pat")
def test_host_pat_with_a_reserved_memory_type_fails_with_error_8(v):
    v.exit_ctls |= ExitCtl.LOAD_PAT
    v.fields[F.HOST_PAT] = with_pat_entry(PAT_DEFAULT, 2, 3)    # PA2 := 3, reserved (26.2.2)
    v.guest("vmcall")
    v.enter_guest()
    r = yield
    assert r.exits == [] and r.entry_error is not None
    assert r.entry_error.error == VmError.ENTRY_INVALID_HOST_STATE


@vmx_test("entry_load_efer")   # else the field is not loaded at all
def test_load_efer_on_entry_gives_the_guest_its_efer(v):
    v.fields[F.GUEST_EFER] = EFER_LME | EFER_LMA | EFER_NXE | EFER_SCE
    _rdmsr_guest(v, IA32_EFER)
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.VMCALL]
    assert r.exit.regs["rbx"] == EFER_LME | EFER_LMA | EFER_NXE | EFER_SCE


@vmx_test("save_efer")
def test_save_efer_on_exit_stores_the_guest_efer(v):
    v.exit_ctls |= ExitCtl.SAVE_EFER
    v.fields[F.GUEST_EFER] = EFER_LME | EFER_LMA
    v.msr_bitmap = True
    v.guest(f"""
        mov ecx, {IA32_EFER:#x}
        rdmsr
        or eax, {EFER_SCE}
        wrmsr
        vmcall
    """)
    v.vmread_after(F.GUEST_EFER)
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.VMCALL]
    assert r.reads[F.GUEST_EFER] == EFER_LME | EFER_LMA | EFER_SCE


@vmx_test("entry_load_efer")   # else the field is not loaded at all
def test_guest_efer_lma_must_match_ia32e_mode_guest(v):
    v.fields[F.GUEST_EFER] = EFER_LME                # LMA clear, IA-32e mode guest 1 (26.3.1.1)
    v.guest("vmcall")
    v.enter_guest()
    r = yield
    assert r.exit.full_reason == ENTRY_FAILURE | Exit.ENTRY_FAIL_GUEST_STATE


@vmx_test("entry_load_efer")   # else the field is not loaded at all
def test_guest_efer_reserved_bit_fails_entry(v):
    v.fields[F.GUEST_EFER] = EFER_LME | EFER_LMA | 1 << 2
    v.guest("vmcall")
    v.enter_guest()
    r = yield
    assert r.exit.full_reason == ENTRY_FAILURE | Exit.ENTRY_FAIL_GUEST_STATE


@vmx_test("exit_load_efer")
def test_host_efer_lma_must_match_the_host_address_space_size(v):
    v.exit_ctls |= ExitCtl.LOAD_EFER
    v.fields[F.HOST_EFER] = EFER_LME                 # LMA clear with a 64-bit host (26.2.2)
    v.guest("vmcall")
    v.enter_guest()
    r = yield
    assert r.exits == [] and r.entry_error is not None
    assert r.entry_error.error == VmError.ENTRY_INVALID_HOST_STATE


@vmx_test("load_debug_controls")
def test_load_debug_controls_gives_the_guest_dr7(v):
    v.entry_ctls |= EntryCtl.LOAD_DEBUG
    v.fields[F.GUEST_DR7] = 0x401                    # L0, no address set: harmless
    v.guest("""
        mov rbx, dr7
        vmcall
    """)
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.VMCALL]
    assert r.exit.regs["rbx"] == 0x401


@vmx_test("save_debug_controls", "load_debug_controls")
def test_save_debug_controls_stores_the_guest_dr7(v):
    v.entry_ctls |= EntryCtl.LOAD_DEBUG
    v.exit_ctls |= ExitCtl.SAVE_DEBUG
    v.guest("""
        mov eax, 0x404
        mov dr7, rax
        vmcall
    """)
    v.vmread_after(F.GUEST_DR7)
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.VMCALL]
    assert r.reads[F.GUEST_DR7] == 0x404


@vmx_test("load_debug_controls")
def test_guest_dr7_high_bits_fail_entry(v):
    v.entry_ctls |= EntryCtl.LOAD_DEBUG
    v.fields[F.GUEST_DR7] = 1 << 32 | 0x400          # bits 63:32 must be 0 (26.3.1.1)
    v.guest("vmcall")
    v.enter_guest()
    r = yield
    assert r.exit.full_reason == ENTRY_FAILURE | Exit.ENTRY_FAIL_GUEST_STATE


@deviation(BOCHS, "SDM Vol. 3C 26.3.1.1 (reserved IA32_DEBUGCTL bits must be 0)",
           "bit 2 is accepted: the guest runs to VMCALL (reason 18)")
@vmx_test("load_debug_controls")
def test_guest_debugctl_reserved_bit_fails_entry(v):
    v.entry_ctls |= EntryCtl.LOAD_DEBUG
    v.fields[F.GUEST_DEBUGCTL] = 1 << 2              # bits 5:2 are reserved (26.3.1.1)
    v.guest("vmcall")
    v.enter_guest()
    r = yield
    assert r.exit.full_reason == ENTRY_FAILURE | Exit.ENTRY_FAIL_GUEST_STATE


@deviation(BOCHS, "SDM Vol. 3C 26.3.2.1 (load IA32_PERF_GLOBAL_CTRL on entry)",
           "the control is offered but the guest reads 0, not the loaded 0x1 (CPUID.0AH reports 4 counters)")
@vmx_test("entry_load_perf_global_ctrl", "perfmon_counters")   # bit 0 enables GP counter 0
def test_load_perf_global_ctrl_on_entry(v):
    v.entry_ctls |= EntryCtl.LOAD_PERF_GLOBAL_CTRL
    v.fields[F.GUEST_PERF_GLOBAL_CTRL] = 0x1
    _rdmsr_guest(v, IA32_PERF_GLOBAL_CTRL)
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.VMCALL]
    assert r.exit.regs["rbx"] == 0x1


@deviation(BOCHS, "SDM Vol. 3C 26.3.1.1 (reserved IA32_PERF_GLOBAL_CTRL bits must be 0)",
           "bit 63 is accepted: the guest runs to VMCALL (reason 18)")
@vmx_test("entry_load_perf_global_ctrl")
def test_guest_perf_global_ctrl_reserved_bit_fails_entry(v):
    v.entry_ctls |= EntryCtl.LOAD_PERF_GLOBAL_CTRL
    v.fields[F.GUEST_PERF_GLOBAL_CTRL] = 1 << 63     # reserved in IA32_PERF_GLOBAL_CTRL (26.3.1.1)
    v.guest("vmcall")
    v.enter_guest()
    r = yield
    assert r.exit.full_reason == ENTRY_FAILURE | Exit.ENTRY_FAIL_GUEST_STATE


@vmx_test("preemption_timer")
def test_preemption_timer_value_is_kept_without_the_save_control(v):
    v.pin |= Pin.PREEMPTION_TIMER
    v.fields[F.PREEMPTION_TIMER] = 0x7FFF_FFFF
    v.guest("""
        mov ecx, 1000
    1:  dec ecx
        jnz 1b
        vmcall
    """)
    v.vmread_after(F.PREEMPTION_TIMER)
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.VMCALL]
    assert r.reads[F.PREEMPTION_TIMER] == 0x7FFF_FFFF   # not saved (27.3.4)


TSC_OFFSET = 1 << 50


@deviation("kvmrunner", "SDM Vol. 3C 27.4 (the MSR-store area holds IA32_TSC as RDMSR reads it after the exit: "
           "without the TSC offset of 25.6.5)", "the stored value includes the TSC offset",
           "Bochs, through KVM: KVM takes L2's IA32_TSC from vmcs02's own MSR-store area, which Bochs fills with "
           "the offset applied (Bochs' deviation on bochs-skylake) and converts that to L1's view")
@deviation(BOCHS, "SDM Vol. 3C 27.4 (the store area holds IA32_TSC as RDMSR reads it after the exit; the offset of 25.6.5 applies only in VMX non-root operation)",
           "the stored value includes the TSC offset (2^50 + TSC, above the host's later IA32_TSC)")
@vmx_test("tsc_offsetting")
def test_msr_store_area_saves_ia32_tsc_without_the_offset(v):
    """RDTSC in the guest adds the TSC offset (25.6.5); the MSR-store area holds IA32_TSC itself
    (27.4), so it lies between the guest's reading less the offset and the host's later one."""
    v.proc |= Proc.TSC_OFFSETTING
    v.fields.update({F.TSC_OFFSET: TSC_OFFSET, F.EXIT_MSR_STORE_ADDR: MSR_AREA, F.EXIT_MSR_STORE_COUNT: 1})
    v.poke(MSR_AREA, IA32_TSC)
    v.poke(MSR_AREA + 8, 0)
    v.guest("""
        rdtsc
        shl rdx, 32
        or rax, rdx
        mov rbx, rax
        vmcall
    """)
    v.mem_read_after(MSR_AREA, 2)
    v.rdmsr_after(IA32_TSC)
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.VMCALL]
    guest_tsc = r.exit.regs["rbx"]
    index, stored = r.memory[MSR_AREA]
    assert index == IA32_TSC
    assert guest_tsc - TSC_OFFSET <= stored <= r.msrs[IA32_TSC]


@deviation("kvmrunner", "SDM Vol. 3C 27.4 (the MSR-store area holds IA32_TSC as RDMSR reads it after the exit: "
           "without the TSC offset of 25.6.5)", "the stored value includes the TSC offset",
           "Bochs, through KVM: KVM takes L2's IA32_TSC from vmcs02's own MSR-store area, which Bochs fills with "
           "the offset applied (Bochs' deviation on bochs-skylake) and converts that to L1's view")
@deviation(BOCHS, "SDM Vol. 3C 27.4 (the store area holds IA32_TSC without the TSC offset of 25.6.5)",
           "the guest reads loaded value + offset as required, but the stored value includes the offset again")
@vmx_test("tsc_offsetting")
def test_msr_load_area_writes_ia32_tsc_and_the_guest_sees_it_offset(v):
    """The VM-entry MSR-load area writes IA32_TSC as WRMSR would (26.4); the guest's RDTSC then
    reads it plus the offset, and the store area on exit reads it without."""
    base = 1 << 44
    v.proc |= Proc.TSC_OFFSETTING
    v.fields.update({F.TSC_OFFSET: TSC_OFFSET, F.ENTRY_MSR_LOAD_ADDR: MSR_AREA + 0x100, F.ENTRY_MSR_LOAD_COUNT: 1,
                     F.EXIT_MSR_STORE_ADDR: MSR_AREA + 0x200, F.EXIT_MSR_STORE_COUNT: 1})
    v.poke(MSR_AREA + 0x100, IA32_TSC)
    v.poke(MSR_AREA + 0x108, base)
    v.poke(MSR_AREA + 0x200, IA32_TSC)
    v.poke(MSR_AREA + 0x208, 0)
    v.guest("""
        rdtsc
        shl rdx, 32
        or rax, rdx
        mov rbx, rax
        vmcall
    """)
    v.mem_read_after(MSR_AREA + 0x200, 2)
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.VMCALL]
    assert base + TSC_OFFSET <= r.exit.regs["rbx"] < base + TSC_OFFSET + (1 << 32)
    stored = r.memory[MSR_AREA + 0x200][1]
    assert base <= stored < base + (1 << 32)
