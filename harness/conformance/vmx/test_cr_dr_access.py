"""Control- and debug-register accesses: exit qualifications (SDM Vol. 3C, 28.2.1, table 28-3 for
CR accesses, table 28-4 for MOV DR), guest/host masks and read shadows (25.6.6)."""

from harness.testing import Action, Exit, F, Proc, vmx_test

CR0_TS, CR0_MP, CR0_CD = 1 << 3, 1 << 1, 1 << 30
CR4_VMXE = 1 << 13
MOV_TO, MOV_FROM, CLTS, LMSW = 0, 1, 2, 3       # access type, qualification bits 5:4
RAX, RCX, RDX, RBX, RSI = 0, 1, 2, 3, 6         # GPR numbers, qualification bits 11:8


def cr_qual(cr: int, access: int, gpr: int = 0) -> int:
    return cr | access << 4 | gpr << 8


@vmx_test("cr3_exiting")
def test_mov_to_cr3_exits_with_cr_and_register(v):
    v.proc |= Proc.CR3_LOAD
    v.guest("""
        mov rbx, cr3
        mov cr3, rbx
        vmcall
    """)
    v.on(Exit.CR_ACCESS, Action.skip())
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.CR_ACCESS, Exit.VMCALL]
    assert r.exit.qualification == cr_qual(3, MOV_TO, RBX)
    assert r.exit.length == 3


@vmx_test("cr3_exiting")
def test_mov_from_cr3_exits_when_store_exiting(v):
    v.proc |= Proc.CR3_STORE
    v.guest("""
        mov rcx, cr3
        vmcall
    """)
    v.on(Exit.CR_ACCESS, Action.skip())
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.CR_ACCESS, Exit.VMCALL]
    assert r.exit.qualification == cr_qual(3, MOV_FROM, RCX)


@vmx_test("cr3_exiting", "cr3_targets")       # IA32_VMX_MISC[24:16] > 0 (A.6); nested KVM has none
def test_mov_to_cr3_of_a_target_value_does_not_exit(v):
    v.proc |= Proc.CR3_LOAD
    v.fields[F.CR3_TARGET_COUNT] = 1
    v.fields[F.CR3_TARGET0] = "PML4"                 # the value the guest writes back
    v.guest("""
        mov rbx, cr3
        mov cr3, rbx
        vmcall
    """)
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.VMCALL]


@vmx_test("cr8_exiting")
def test_mov_to_cr8_exits(v):
    v.proc |= Proc.CR8_LOAD
    v.guest("""
        xor edx, edx
        mov cr8, rdx
        vmcall
    """)
    v.on(Exit.CR_ACCESS, Action.skip())
    v.enter_guest()
    r = yield
    assert r.exit.reason == Exit.CR_ACCESS
    assert r.exit.qualification == cr_qual(8, MOV_TO, RDX)
    assert r.exit.length == 4                       # 44 0F 22 C2


@vmx_test("cr8_exiting")
def test_mov_from_cr8_exits(v):
    v.proc |= Proc.CR8_STORE
    v.guest("""
        mov rsi, cr8
        vmcall
    """)
    v.on(Exit.CR_ACCESS, Action.skip())
    v.enter_guest()
    r = yield
    assert r.exit.reason == Exit.CR_ACCESS
    assert r.exit.qualification == cr_qual(8, MOV_FROM, RSI)
    assert r.exit.length == 4                       # 44 0F 20 C6


@vmx_test()
def test_clts_exits_when_ts_is_owned_and_shadowed_set(v):
    v.fields.update({F.CR0_MASK: CR0_TS, F.CR0_SHADOW: CR0_TS})
    v.guest("""
        clts
        vmcall
    """)
    v.on(Exit.CR_ACCESS, Action.skip())
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.CR_ACCESS, Exit.VMCALL]
    assert r.exit.qualification == cr_qual(0, CLTS)
    assert r.exit.length == 2


@vmx_test()
def test_clts_does_not_exit_when_ts_is_not_owned(v):
    v.guest("""
        clts
        vmcall
    """)
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.VMCALL]


@vmx_test()
def test_cr0_read_returns_the_shadow_for_owned_bits(v):
    v.fields.update({F.CR0_MASK: CR0_TS, F.CR0_SHADOW: CR0_TS})
    v.guest("""
        clts
        mov rax, cr0
        vmcall
    """)
    v.on(Exit.CR_ACCESS, Action.skip())
    v.enter_guest()
    r = yield
    cr0 = r.last.regs["rax"]
    assert r.last.reason == Exit.VMCALL
    assert cr0 & CR0_TS                              # shadow, though the real TS is clear
    assert cr0 & 0x8000_0001 == 0x8000_0001          # unowned bits read as they are (PG, PE)


@vmx_test()
def test_mov_to_cr0_changing_an_owned_bit_exits(v):
    v.fields.update({F.CR0_MASK: CR0_CD, F.CR0_SHADOW: 0})
    v.guest("""
        mov rbx, cr0
        bts rbx, 30
        mov cr0, rbx
        vmcall
    """)
    v.on(Exit.CR_ACCESS, Action.skip())
    v.enter_guest()
    r = yield
    assert r.exit.reason == Exit.CR_ACCESS
    assert r.exit.qualification == cr_qual(0, MOV_TO, RBX)
    assert r.exit.regs["rbx"] & CR0_CD


@vmx_test()
def test_mov_to_cr0_matching_the_shadow_does_not_exit(v):
    v.fields.update({F.CR0_MASK: CR0_CD, F.CR0_SHADOW: 0})
    v.guest("""
        mov rbx, cr0
        mov cr0, rbx
        vmcall
    """)
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.VMCALL]


@vmx_test()
def test_lmsw_register_exit_reports_source_data(v):
    v.fields.update({F.CR0_MASK: CR0_MP, F.CR0_SHADOW: 0})
    v.guest("""
        mov eax, 3
        lmsw ax
        vmcall
    """)
    v.on(Exit.CR_ACCESS, Action.skip())
    v.enter_guest()
    r = yield
    assert r.exit.reason == Exit.CR_ACCESS
    assert r.exit.qualification == cr_qual(0, LMSW) | 3 << 16       # operand type 0: register
    assert r.exit.length == 3


@vmx_test()
def test_lmsw_memory_exit_reports_operand_type_and_address(v):
    v.fields.update({F.CR0_MASK: CR0_MP, F.CR0_SHADOW: 0})
    v.guest("""
        lea rdi, [rip + @word]
        lmsw [rdi]
        vmcall
    @word: .word 3
    """)
    v.on(Exit.CR_ACCESS, Action.skip())
    v.enter_guest()
    r = yield
    assert r.exit.reason == Exit.CR_ACCESS
    assert r.exit.qualification == cr_qual(0, LMSW) | 1 << 6 | 3 << 16
    assert r.exit.raw_linear == r.exit.regs["rdi"]   # guest-linear address of the operand (28.2.1)


@vmx_test()
def test_cr4_read_shadow_hides_vmxe(v):
    v.fields.update({F.CR4_MASK: CR4_VMXE, F.CR4_SHADOW: 0})
    v.guest("""
        mov rax, cr4
        vmcall
    """)
    v.vmread_after(F.GUEST_CR4)
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.VMCALL]
    assert r.exit.regs["rax"] & CR4_VMXE == 0
    assert r.reads[F.GUEST_CR4] & CR4_VMXE           # while the real CR4.VMXE is set


@vmx_test()
def test_mov_to_cr4_changing_an_owned_bit_exits(v):
    v.fields.update({F.CR4_MASK: CR4_VMXE, F.CR4_SHADOW: 0})
    v.guest("""
        mov rcx, cr4
        bts rcx, 13
        mov cr4, rcx
        vmcall
    """)
    v.on(Exit.CR_ACCESS, Action.skip())
    v.enter_guest()
    r = yield
    assert r.exit.reason == Exit.CR_ACCESS
    assert r.exit.qualification == cr_qual(4, MOV_TO, RCX)


@vmx_test("mov_dr_exiting")
def test_mov_from_dr7_exits(v):
    v.proc |= Proc.MOV_DR
    v.guest("""
        mov rax, dr7
        vmcall
    """)
    v.on(Exit.DR_ACCESS, Action.skip())
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.DR_ACCESS, Exit.VMCALL]
    assert r.exit.qualification == 7 | 1 << 4 | RAX << 8    # DR7, MOV from DR, RAX (table 28-4)
    assert r.exit.length == 3


@vmx_test("mov_dr_exiting")
def test_mov_to_dr0_exits(v):
    v.proc |= Proc.MOV_DR
    v.guest("""
        xor ecx, ecx
        mov dr0, rcx
        vmcall
    """)
    v.on(Exit.DR_ACCESS, Action.skip())
    v.enter_guest()
    r = yield
    assert r.exit.reason == Exit.DR_ACCESS
    assert r.exit.qualification == 0 | 0 << 4 | RCX << 8
