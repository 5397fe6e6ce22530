"""VM-entry checks (SDM Vol. 3C, 26.2-26.4: VMfailValid errors 7/8, exit reasons 33/34 with their
qualifications), VMX instruction errors (31.4), VPID with INVVPID/INVEPT (30.3), MSR load/store
areas (25.7.2, 25.8.2) and guest modes (32-bit protected, real mode with unrestricted guest)."""

import pytest

from harness.testing import (
    Action, ENTRY_FAILURE, Exit, F, Mode, Op, Proc2, StopWhy, VmError, vmx_test,
)

SCRATCH = 0x0180_0000           # 24 MiB: descriptors and MSR areas
KERNEL_GS_BASE = 0xC000_0102


@vmx_test()
def test_entry_with_a_must_be_one_pin_control_clear_fails_with_error_7(v):
    must1 = v.caps.pin.must1
    if not must1:
        pytest.skip("every pin-based control may be 0 on this CPU")
    v.force[F.PIN_CONTROLS] = v.caps.pin.reconcile(0) & ~must1
    v.enter_guest()
    r = yield
    e = r.entry_error
    assert e is not None and e.op == Op.VMLAUNCH and e.fail_valid
    assert e.error == VmError.ENTRY_INVALID_CONTROLS
    assert r.exits == [] and r.stop_why == StopWhy.ENTRY_VMFAIL


@vmx_test("vpid")
def test_entry_with_vpid_zero_fails_with_error_7(v):
    v.proc2 |= Proc2.VPID
    v.vpid = 0
    v.enter_guest()
    r = yield
    assert r.entry_error.error == VmError.ENTRY_INVALID_CONTROLS


@vmx_test()
def test_entry_with_null_host_tr_fails_with_error_8(v):
    v.force[F.HOST_TR_SEL] = 0
    v.enter_guest()
    r = yield
    assert r.entry_error.fail_valid and r.entry_error.error == VmError.ENTRY_INVALID_HOST_STATE


@vmx_test()
def test_entry_with_host_cr4_lacking_vmxe_fails_with_error_8(v):
    v.force[F.HOST_CR4] = 0x20                       # PAE only: CR4 fixed-0 bits violated
    v.enter_guest()
    r = yield
    assert r.entry_error.error == VmError.ENTRY_INVALID_HOST_STATE


@vmx_test()
def test_entry_with_rflags_bit1_clear_fails_with_reason_33(v):
    v.force[F.GUEST_RFLAGS] = 0
    v.enter_guest()
    r = yield
    assert r.exit.full_reason == ENTRY_FAILURE | Exit.ENTRY_FAIL_GUEST_STATE
    assert r.exit.qualification == 0
    assert r.stop_why == StopWhy.ENTRY_FAILURE


@vmx_test()
def test_entry_with_a_bad_vmcs_link_pointer_fails_with_qualification_4(v):
    v.force[F.VMCS_LINK_POINTER] = 0x0123_4000
    v.enter_guest()
    r = yield
    assert r.exit.full_reason == ENTRY_FAILURE | Exit.ENTRY_FAIL_GUEST_STATE
    assert r.exit.qualification == 4                 # 26.3.1.5: VMCS link pointer


@vmx_test()
def test_entry_msr_load_failure_reports_the_entry_number(v):
    v.poke(SCRATCH, KERNEL_GS_BASE)                  # entry 1: valid
    v.poke(SCRATCH + 8, 0)
    v.poke(SCRATCH + 16, 1 << 32 | KERNEL_GS_BASE)   # entry 2: reserved bits 63:32 set (26.4)
    v.poke(SCRATCH + 24, 0)
    v.fields.update({F.ENTRY_MSR_LOAD_ADDR: SCRATCH, F.ENTRY_MSR_LOAD_COUNT: 2})
    v.enter_guest()
    r = yield
    assert r.exit.full_reason == ENTRY_FAILURE | Exit.ENTRY_FAIL_MSR_LOAD
    assert r.exit.qualification == 2


@vmx_test("msr_bitmaps")
def test_entry_msr_load_area_sets_the_guest_msr(v):
    v.poke(SCRATCH, KERNEL_GS_BASE)
    v.poke(SCRATCH + 8, 0x3344_5566_7788)          # canonical, or the load itself fails
    v.fields.update({F.ENTRY_MSR_LOAD_ADDR: SCRATCH, F.ENTRY_MSR_LOAD_COUNT: 1})
    v.msr_writes = {0x174}                           # bitmaps on; KERNEL_GS_BASE reads pass through
    v.guest(f"""
        mov ecx, {KERNEL_GS_BASE:#x}
        rdmsr
        vmcall
    """)
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.VMCALL]
    assert (r.exit.regs["rax"], r.exit.regs["rdx"]) == (0x5566_7788, 0x3344)


@vmx_test("msr_bitmaps")
def test_exit_msr_store_area_captures_the_guest_msr(v):
    v.poke(SCRATCH + 0x100, KERNEL_GS_BASE)
    v.poke(SCRATCH + 0x108, 0)
    v.fields.update({F.EXIT_MSR_STORE_ADDR: SCRATCH + 0x100, F.EXIT_MSR_STORE_COUNT: 1})
    v.msr_reads = {0x174}
    v.guest(f"""
        mov ecx, {KERNEL_GS_BASE:#x}
        mov eax, 0xabcdef
        xor edx, edx
        wrmsr
        vmcall
    """)
    v.mem_read_after(SCRATCH + 0x100, 2)
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.VMCALL]
    assert r.memory[SCRATCH + 0x100] == [KERNEL_GS_BASE, 0xABCDEF]


@vmx_test()
def test_exit_msr_load_area_restores_the_host_msr(v):
    v.poke(SCRATCH + 0x200, KERNEL_GS_BASE)
    v.poke(SCRATCH + 0x208, 0x5A5A_0000)
    v.fields.update({F.EXIT_MSR_LOAD_ADDR: SCRATCH + 0x200, F.EXIT_MSR_LOAD_COUNT: 1})
    v.guest("vmcall")
    v.rdmsr_after(KERNEL_GS_BASE)
    v.enter_guest()
    r = yield
    assert r.msrs[KERNEL_GS_BASE] == 0x5A5A_0000


@vmx_test()
def test_vmlaunch_of_a_launched_vmcs_fails_with_error_4(v):
    v.guest("vmcall")
    v.enter_again(max_exits=4)
    v.enter_guest()
    r = yield
    launches = [i for i in r.insns if i.op == Op.VMLAUNCH]
    assert len(launches) == 1 and launches[0].error == VmError.VMLAUNCH_NONCLEAR


@vmx_test()
def test_vmresume_of_a_clear_vmcs_fails_with_error_5(v):
    v.enter_with_resume = True
    v.enter_guest()
    r = yield
    assert r.entry_error.op == Op.VMRESUME
    assert r.entry_error.error == VmError.VMRESUME_NONLAUNCHED


@vmx_test()
def test_vmxon_in_vmx_root_fails_with_error_15(v):
    v.insn_after(Op.VMXON, "VMXON")
    r = yield
    assert r.insns[-3].op == Op.VMXON and r.insns[-3].error == VmError.VMXON_IN_ROOT


@vmx_test()
def test_vmptrld_of_the_vmxon_region_fails_with_error_10(v):
    v.insn_after(Op.VMPTRLD, "VMXON")
    r = yield
    ins = [i for i in r.insns if i.op == Op.VMPTRLD][-1]
    assert ins.fail_valid and ins.error == VmError.VMPTRLD_VMXON_PTR


@vmx_test()
def test_vmclear_of_the_vmxon_region_fails_with_error_3(v):
    v.insn_after(Op.VMCLEAR, "VMXON")
    r = yield
    ins = [i for i in r.insns if i.op == Op.VMCLEAR and i.operand != 0][1]
    assert ins.fail_valid and ins.error == VmError.VMCLEAR_VMXON_PTR


@vmx_test()
def test_vmptrld_with_a_wrong_revision_fails_with_error_11(v):
    v.insn_after(Op.SET_REVISION, SCRATCH + 0x1000, 0x7FFF_0000)
    v.insn_after(Op.VMPTRLD, SCRATCH + 0x1000)
    r = yield
    ins = [i for i in r.insns if i.op == Op.VMPTRLD][-1]
    assert ins.fail_valid and ins.error == VmError.VMPTRLD_BAD_REVISION


@vmx_test()
def test_vmread_of_an_unsupported_field_fails_with_error_12(v):
    v.insn_after(Op.VMREAD, 0x7FFE)
    r = yield
    ins = r.insn(Op.VMREAD)
    assert ins.fail_valid and ins.error == VmError.UNSUPPORTED_COMPONENT


@vmx_test()
def test_vmwrite_to_a_read_only_field(v):
    v.insn_after(Op.VMWRITE, F.EXIT_REASON, 1)
    r = yield
    ins = r.insn(Op.VMWRITE)
    if v.caps.msr(0x485) >> 29 & 1:                  # IA32_VMX_MISC[29]: VMWRITE to any field
        assert ins.ok
    else:
        assert ins.fail_valid and ins.error == VmError.VMWRITE_READ_ONLY


@vmx_test()
def test_vmread_without_a_current_vmcs_fails_invalid(v):
    v.insn_after(Op.VMCLEAR, "VMCS")
    v.insn_after(Op.VMREAD, F.GUEST_RIP)
    r = yield
    assert r.insn(Op.VMREAD).fail_invalid


@vmx_test()
def test_vmptrst_returns_the_current_vmcs(v):
    v.insn_after(Op.VMPTRST)
    r = yield
    clear = [i for i in r.insns if i.op == Op.VMCLEAR][0]
    assert r.insn(Op.VMPTRST).value == clear.operand


@vmx_test("vpid")
def test_guest_runs_with_a_vpid(v):
    v.proc2 |= Proc2.VPID
    v.vpid = 1
    v.guest("vmcall")
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.VMCALL]


def _invvpid(v, kind: int, vpid: int, address: int = 0):
    v.poke(SCRATCH + 0x2000, vpid)
    v.poke(SCRATCH + 0x2008, address)
    v.insn_after(Op.INVVPID, kind, SCRATCH + 0x2000)


@vmx_test("invvpid_single")
def test_invvpid_single_context(v):
    _invvpid(v, 1, 1)
    r = yield
    assert r.insn(Op.INVVPID).ok


@vmx_test("invvpid_single")
def test_invvpid_single_context_of_vpid_0_fails_with_error_28(v):
    _invvpid(v, 1, 0)
    r = yield
    assert r.insn(Op.INVVPID).error == VmError.INVALID_INVEPT_INVVPID_OPERAND


@vmx_test("invvpid_all")
def test_invvpid_all_context(v):
    _invvpid(v, 2, 0)
    r = yield
    assert r.insn(Op.INVVPID).ok


@vmx_test("invvpid_address")
def test_invvpid_individual_address_non_canonical_fails_with_error_28(v):
    _invvpid(v, 0, 1, 0x8000_0000_0000)
    r = yield
    assert r.insn(Op.INVVPID).error == VmError.INVALID_INVEPT_INVVPID_OPERAND


@vmx_test("invvpid")
def test_invvpid_unsupported_type_fails_with_error_28(v):
    _invvpid(v, 4, 1)
    r = yield
    assert r.insn(Op.INVVPID).error == VmError.INVALID_INVEPT_INVVPID_OPERAND


@vmx_test("invept_single")
def test_invept_single_context(v):
    v.poke(SCRATCH + 0x3000, 0x0200_0000 | 0x1E)    # a valid EPTP: WB, 4-level walk
    v.poke(SCRATCH + 0x3008, 0)
    v.insn_after(Op.INVEPT, 1, SCRATCH + 0x3000)
    r = yield
    assert r.insn(Op.INVEPT).ok


@vmx_test("invept_all")
def test_invept_all_context(v):
    v.insn_after(Op.INVEPT, 2, SCRATCH + 0x3000)
    r = yield
    assert r.insn(Op.INVEPT).ok


@vmx_test("invept")
def test_invept_invalid_type_fails_with_error_28(v):
    v.insn_after(Op.INVEPT, 0, SCRATCH + 0x3000)
    r = yield
    assert r.insn(Op.INVEPT).error == VmError.INVALID_INVEPT_INVVPID_OPERAND


@vmx_test()
def test_64bit_guest_decodes_0x48_as_rex(v):
    v.guest("""
        mov eax, 5
        .byte 0x48, 0x90            # REX.W NOP in 64-bit mode
        vmcall
    """)
    v.enter_guest()
    r = yield
    assert r.exit.regs["rax"] == 5


@vmx_test()
def test_32bit_protected_mode_guest(v):
    v.mode = Mode.PROTECTED
    v.guest("""
        mov eax, 5
        .byte 0x48                  # DEC EAX in 32-bit mode
        nop
        vmcall
    """)
    v.vmread_after(F.GUEST_CR0)
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.VMCALL]
    assert r.exit.regs["rax"] == 4
    assert r.reads[F.GUEST_CR0] & 0x8000_0001 == 0x8000_0001


@vmx_test("unrestricted_guest", "ept")
def test_real_mode_guest_with_unrestricted_guest(v):
    v.mode = Mode.REAL
    v.use_ept()
    v.proc2 |= Proc2.UNRESTRICTED_GUEST
    v.guest("""
        mov eax, 0
        cpuid
        vmcall
    """)
    v.on(Exit.CPUID, Action.skip())
    v.vmread_after(F.GUEST_CR0)
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.CPUID, Exit.VMCALL]
    assert r.exit.rip == 6                           # 66 B8 imm32: offset from CS base
    assert r.exits[1].rip == 8
    assert r.reads[F.GUEST_CR0] & 1 == 0             # CR0.PE clear: real mode
