"""Instructions that cause VM exits unconditionally or by a control (SDM Vol. 3C, 26.1.2-26.1.3).

Each guest executes the instruction and then VMCALL; the exit loop records each exit and skips
the instruction where the test says so.  Instruction lengths are those of the encodings GNU as
emits for the guest code shown.
"""

from harness.testing import Action, Exit, Proc, Proc2, StopWhy, vmx_test


def _skip_then_vmcall(v, reason):
    v.on(reason, Action.skip())
    v.enter_guest()


@vmx_test()
def test_cpuid_exits_unconditionally(v):
    v.guest("""
        xor eax, eax
        cpuid
        vmcall
    """)
    _skip_then_vmcall(v, Exit.CPUID)
    r = yield
    assert r.reasons() == [Exit.CPUID, Exit.VMCALL]
    assert r.exit.length == 2                       # 0F A2
    assert r.exit.qualification == 0
    assert r.exits[1].rip == r.exit.rip + 2         # skipped by exactly the reported length


@vmx_test()
def test_resume_without_skip_reexecutes_the_instruction(v):
    """Action.resume(): VMRESUME with guest RIP unchanged, so the CPUID exits again at the same
    RIP until the exit bound stops the loop."""
    v.guest("""
        xor eax, eax
        cpuid
        vmcall
    """)
    v.on(Exit.CPUID, Action.resume())
    v.max_exits = 3
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.CPUID] * 3
    assert {e.rip for e in r.exits} == {r.exit.rip}
    assert r.stop_why == StopWhy.EXIT_LIMIT


@vmx_test()
def test_second_entry_with_vmresume_continues_the_guest(v):
    """After the exit loop stopped at a VMCALL (RIP not advanced), entering again with VMRESUME
    runs the same guest from that RIP with the registers it had: it exits on the same VMCALL with
    the same rax, and neither entry failed."""
    v.guest("""
        mov eax, 0x1234
        vmcall
        vmcall
    """)
    v.enter_again(resume=True, max_exits=1)
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.VMCALL, Exit.VMCALL]
    assert r.exits[1].rip == r.exits[0].rip and r.exits[1].regs["rax"] == 0x1234
    assert r.entry_error is None                    # neither entry failed as an instruction
    assert r.stop == (1, StopWhy.ACTION, Exit.VMCALL)  # the second loop's stop record


@vmx_test()
def test_cpuid_emulated_values_reach_the_guest(v):
    v.guest("""
        mov eax, 1
        cpuid
        vmcall
    """)
    v.on(Exit.CPUID, Action.emulate_cpuid(0x11, 0x22, 0x33, 0x44))
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.CPUID, Exit.VMCALL]
    assert r.exit.regs["rax"] == 1                   # the leaf the guest asked for
    regs = r.exits[1].regs
    assert (regs["rax"], regs["rbx"], regs["rcx"], regs["rdx"]) == (0x11, 0x22, 0x33, 0x44)


@vmx_test()
def test_invd_exits_unconditionally(v):
    v.guest("""
        invd
        vmcall
    """)
    _skip_then_vmcall(v, Exit.INVD)
    r = yield
    assert r.reasons() == [Exit.INVD, Exit.VMCALL]
    assert r.exit.length == 2                       # 0F 08


@vmx_test("xsave")
def test_xsetbv_exits_unconditionally(v):
    v.guest("""
        mov rax, cr4
        bts rax, 18                 # CR4.OSXSAVE, else XSETBV raises #UD first
        mov cr4, rax
        xor ecx, ecx
        mov eax, 3
        xor edx, edx
        xsetbv
        vmcall
    """)
    _skip_then_vmcall(v, Exit.XSETBV)
    r = yield
    assert r.reasons() == [Exit.XSETBV, Exit.VMCALL]
    assert r.exit.length == 3                       # 0F 01 D1
    assert r.exit.regs["rcx"] == 0 and r.exit.regs["rax"] == 3


@vmx_test("smx")
def test_getsec_exits_unconditionally(v):
    v.guest("""
        mov rax, cr4
        bts rax, 14                 # CR4.SMXE, else GETSEC raises #UD
        mov cr4, rax
        xor eax, eax
        getsec
        vmcall
    """)
    _skip_then_vmcall(v, Exit.GETSEC)
    r = yield
    assert r.exit.reason == Exit.GETSEC and r.exit.length == 2


@vmx_test("hlt_exiting")
def test_hlt_exiting(v):
    v.proc |= Proc.HLT
    v.guest("""
        hlt
        vmcall
    """)
    _skip_then_vmcall(v, Exit.HLT)
    r = yield
    assert r.reasons() == [Exit.HLT, Exit.VMCALL]
    assert r.exit.length == 1


@vmx_test("rdtsc_exiting")
def test_rdtsc_exiting(v):
    v.proc |= Proc.RDTSC
    v.guest("""
        rdtsc
        vmcall
    """)
    _skip_then_vmcall(v, Exit.RDTSC)
    r = yield
    assert r.reasons() == [Exit.RDTSC, Exit.VMCALL]
    assert r.exit.length == 2


@vmx_test()
def test_rdtsc_does_not_exit_without_the_control(v):
    v.guest("""
        rdtsc
        vmcall
    """)
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.VMCALL]
    assert r.exit.regs["rax"] | r.exit.regs["rdx"] != 0      # the guest read a real TSC


@vmx_test("rdtscp", "rdtsc_exiting")
def test_rdtscp_exiting(v):
    v.proc |= Proc.RDTSC
    v.proc2 |= Proc2.RDTSCP
    v.guest("""
        rdtscp
        vmcall
    """)
    _skip_then_vmcall(v, Exit.RDTSCP)
    r = yield
    assert r.reasons() == [Exit.RDTSCP, Exit.VMCALL]
    assert r.exit.length == 3                       # 0F 01 F9


@vmx_test("rdpmc_exiting")
def test_rdpmc_exiting(v):
    v.proc |= Proc.RDPMC
    v.guest("""
        xor ecx, ecx
        rdpmc
        vmcall
    """)
    _skip_then_vmcall(v, Exit.RDPMC)
    r = yield
    assert r.reasons() == [Exit.RDPMC, Exit.VMCALL]
    assert r.exit.length == 2


@vmx_test("invlpg_exiting")
def test_invlpg_exiting_reports_the_linear_address(v):
    v.proc |= Proc.INVLPG
    v.guest("""
        mov rax, 0x2345678
        invlpg [rax]
        vmcall
    """)
    _skip_then_vmcall(v, Exit.INVLPG)
    r = yield
    assert r.reasons() == [Exit.INVLPG, Exit.VMCALL]
    assert r.exit.qualification == 0x2345678        # the linear-address operand (28.2.1)
    assert r.exit.length == 3                       # 0F 01 38


@vmx_test("mwait_exiting", "monitor_mwait")
def test_mwait_exiting(v):
    v.proc |= Proc.MWAIT
    v.guest("""
        xor eax, eax
        xor ecx, ecx
        mwait
        vmcall
    """)
    _skip_then_vmcall(v, Exit.MWAIT)
    r = yield
    assert r.reasons() == [Exit.MWAIT, Exit.VMCALL]
    assert r.exit.length == 3                       # 0F 01 C9


@vmx_test("monitor_exiting", "monitor_mwait")
def test_monitor_exiting(v):
    v.proc |= Proc.MONITOR
    v.guest("""
        lea rax, [rip]
        xor ecx, ecx
        xor edx, edx
        monitor
        vmcall
    """)
    _skip_then_vmcall(v, Exit.MONITOR)
    r = yield
    assert r.reasons() == [Exit.MONITOR, Exit.VMCALL]
    assert r.exit.length == 3                       # 0F 01 C8


@vmx_test("pause_exiting")
def test_pause_exiting(v):
    v.proc |= Proc.PAUSE
    v.guest("""
        pause
        vmcall
    """)
    _skip_then_vmcall(v, Exit.PAUSE)
    r = yield
    assert r.reasons() == [Exit.PAUSE, Exit.VMCALL]
    assert r.exit.length == 2                       # F3 90


@vmx_test("wbinvd_exiting")
def test_wbinvd_exiting(v):
    v.proc2 |= Proc2.WBINVD
    v.guest("""
        wbinvd
        vmcall
    """)
    _skip_then_vmcall(v, Exit.WBINVD)
    r = yield
    assert r.reasons() == [Exit.WBINVD, Exit.VMCALL]
    assert r.exit.length == 2                       # 0F 09


@vmx_test("rdrand_exiting", "rdrand")
def test_rdrand_exiting(v):
    v.proc2 |= Proc2.RDRAND
    v.guest("""
        rdrand eax
        vmcall
    """)
    _skip_then_vmcall(v, Exit.RDRAND)
    r = yield
    assert r.reasons() == [Exit.RDRAND, Exit.VMCALL]
    assert r.exit.length == 3                       # 0F C7 F0


@vmx_test()
def test_vmcall_exits_with_its_length(v):
    v.guest("""
        nop
        vmcall
        vmcall
    """)
    _skip_then_vmcall(v, Exit.VMCALL)
    v.max_exits = 2
    r = yield
    assert r.reasons() == [Exit.VMCALL, Exit.VMCALL]
    assert r.exit.length == 3                       # 0F 01 C1
    assert r.exits[1].rip == r.exit.rip + 3


@vmx_test()
def test_vmread_in_the_guest_exits(v):
    v.guest("""
        mov ebx, 0x4402
        vmread rax, rbx
        vmcall
    """)
    _skip_then_vmcall(v, Exit.VMREAD)
    r = yield
    assert r.reasons() == [Exit.VMREAD, Exit.VMCALL]
    assert r.exit.length == 3                       # 0F 78 D8


@vmx_test("invept")
def test_invept_in_the_guest_exits(v):
    v.guest("""
        mov eax, 2
        lea rbx, [rip + @desc]
        invept rax, [rbx]
        vmcall
    @desc: .quad 0, 0
    """)
    _skip_then_vmcall(v, Exit.INVEPT)
    r = yield
    assert r.reasons() == [Exit.INVEPT, Exit.VMCALL]
    assert r.exit.length == 5                       # 66 0F 38 80 03


@vmx_test("invvpid")
def test_invvpid_in_the_guest_exits(v):
    v.guest("""
        mov eax, 2
        lea rbx, [rip + @desc]
        invvpid rax, [rbx]
        vmcall
    @desc: .quad 0, 0
    """)
    _skip_then_vmcall(v, Exit.INVVPID)
    r = yield
    assert r.reasons() == [Exit.INVVPID, Exit.VMCALL]
    assert r.exit.length == 5                       # 66 0F 38 81 03
