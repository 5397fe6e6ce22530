"""Exceptions, interrupts, event injection, preemption timer and MTF (SDM Vol. 3C, 25.2, 26.2,
26.5, 26.7.4-26.7.5, 27.5), and EPT (29.3): violation qualifications (28.2.1, table 28-7),
misconfigurations, large pages and accessed/dirty flags."""

from harness.testing import (
    Action, Exit, ExitCtl, F, Pin, Proc, RFLAGS_FIXED, RFLAGS_IF, deviation, ept, vmx_test,
)

from ._support import (
    GUEST_HANDLED, HW_EXCEPTION, KVM_EPT_MISCONFIG, KVM_EPT_MISCONFIG_LAYER, PRIV_SW_EXCEPTION, SW_EXCEPTION,
    SW_INTERRUPT, TEST_PAGE, intr,
)

R, W, X, RWX, ACCESSED, DIRTY = ept.R, ept.W, ept.X, ept.RWX, ept.ACCESSED, ept.DIRTY

UNMAPPED = 0x1_0000_0000             # beyond the 4 GiB the guest page tables map


@vmx_test()
def test_ud2_exits_through_the_exception_bitmap(v):
    v.fields[F.EXCEPTION_BITMAP] = 1 << 6
    v.guest("ud2")
    v.enter_guest()
    r = yield
    assert r.exit.reason == Exit.EXCEPTION_NMI
    assert r.exit.intr_info == intr(HW_EXCEPTION, 6)


@vmx_test()
def test_int3_exits_as_software_exception_with_length(v):
    v.fields[F.EXCEPTION_BITMAP] = 1 << 3
    v.guest("int3")
    v.enter_guest()
    r = yield
    assert r.exit.reason == Exit.EXCEPTION_NMI
    assert r.exit.intr_info == intr(SW_EXCEPTION, 3)
    assert r.exit.length == 1


@vmx_test()
def test_icebp_exits_as_privileged_software_exception(v):
    v.fields[F.EXCEPTION_BITMAP] = 1 << 1
    v.guest(".byte 0xF1")                           # INT1 / ICEBP
    v.enter_guest()
    r = yield
    assert r.exit.reason == Exit.EXCEPTION_NMI
    assert r.exit.intr_info == intr(PRIV_SW_EXCEPTION, 1)
    assert r.exit.length == 1


@vmx_test()
def test_exception_outside_the_bitmap_reaches_the_guest(v):
    v.guest("ud2")
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.VMCALL]
    assert r.exit.regs["rax"] == GUEST_HANDLED | 6


@vmx_test()
def test_page_fault_exit_reports_address_and_error_code(v):
    v.fields[F.EXCEPTION_BITMAP] = 1 << 14
    v.guest(f"""
        mov rax, {UNMAPPED:#x}
        mov rbx, [rax]
    """)
    v.enter_guest()
    r = yield
    assert r.exit.reason == Exit.EXCEPTION_NMI
    assert r.exit.intr_info == intr(HW_EXCEPTION, 14, error=True)
    assert r.exit.intr_error == 0                    # not present, read, supervisor
    assert r.exit.qualification == UNMAPPED          # the faulting linear address (28.2.1)


@vmx_test()
def test_page_fault_error_code_match_selects_writes(v):
    v.fields.update({F.EXCEPTION_BITMAP: 1 << 14, F.PF_ERROR_MASK: 2, F.PF_ERROR_MATCH: 2})
    v.guest(f"""
        mov rax, {UNMAPPED:#x}
        mov [rax], rbx
    """)
    v.enter_guest()
    r = yield
    assert r.exit.reason == Exit.EXCEPTION_NMI
    assert r.exit.intr_error == 2                    # write


@vmx_test()
def test_page_fault_error_code_mismatch_goes_to_the_guest(v):
    v.fields.update({F.EXCEPTION_BITMAP: 1 << 14, F.PF_ERROR_MASK: 2, F.PF_ERROR_MATCH: 2})
    v.guest(f"""
        mov rax, {UNMAPPED:#x}
        mov rcx, [rax]
    """)
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.VMCALL]
    assert r.exit.regs["rax"] == GUEST_HANDLED | 14 and r.exit.regs["rbx"] == 0


@vmx_test()
def test_page_fault_bitmap_clear_inverts_the_match(v):
    v.fields.update({F.EXCEPTION_BITMAP: 0, F.PF_ERROR_MASK: 2, F.PF_ERROR_MATCH: 2})
    v.guest(f"""
        mov rax, {UNMAPPED:#x}
        mov rcx, [rax]
    """)
    v.enter_guest()
    r = yield
    assert r.exit.reason == Exit.EXCEPTION_NMI       # mismatch + bit 14 clear: exits (25.6.3)
    assert r.exit.intr_info & 0xFF == 14


@vmx_test("interrupt_window")
def test_interrupt_window_opens_after_sti_shadow(v):
    v.proc |= Proc.INTERRUPT_WINDOW
    v.guest("""
        lea rsi, [rip + @after]
        sti
        nop
    @after:
        nop
        vmcall
    """)
    v.enter_guest()
    r = yield
    assert r.exit.reason == Exit.INTERRUPT_WINDOW
    assert r.exit.rip == r.exit.regs["rsi"]          # STI blocks for one instruction (26.3.1.5)


@vmx_test("interrupt_window")
def test_interrupt_window_exits_at_entry_when_if_is_set(v):
    v.proc |= Proc.INTERRUPT_WINDOW
    v.rflags = RFLAGS_FIXED | RFLAGS_IF
    v.regs["rax"] = 0x55
    v.guest("""
        mov eax, 1
        vmcall
    """)
    v.enter_guest()
    r = yield
    assert r.exit.reason == Exit.INTERRUPT_WINDOW
    assert r.exit.regs["rax"] == 0x55


@vmx_test("nmi_window", "virtual_nmis", "nmi_exiting")
def test_nmi_window_exits_at_entry_without_blocking(v):
    v.pin |= Pin.NMI_EXITING | Pin.VIRTUAL_NMIS
    v.proc |= Proc.NMI_WINDOW
    v.regs["rax"] = 0x66
    v.guest("""
        mov eax, 1
        vmcall
    """)
    v.enter_guest()
    r = yield
    assert r.exit.reason == Exit.NMI_WINDOW
    assert r.exit.regs["rax"] == 0x66


@vmx_test()
def test_injected_software_interrupt_reaches_the_guest_handler(v):
    v.fields.update({F.ENTRY_INTR_INFO: intr(SW_INTERRUPT, 0x80), F.ENTRY_INSTR_LEN: 2})
    v.guest("vmcall")
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.VMCALL]
    assert r.exit.regs["rax"] == GUEST_HANDLED | 0x80


@vmx_test()
def test_injected_exception_delivers_its_error_code(v):
    v.fields.update({F.ENTRY_INTR_INFO: intr(HW_EXCEPTION, 13, error=True), F.ENTRY_EXCEPTION_ERROR: 0x1234})
    v.guest("vmcall")
    v.enter_guest()
    r = yield
    assert r.exit.regs["rax"] == GUEST_HANDLED | 13
    assert r.exit.regs["rbx"] == 0x1234


@vmx_test()
def test_injected_exception_ignores_the_exception_bitmap(v):
    v.fields.update({F.EXCEPTION_BITMAP: 1 << 6, F.ENTRY_INTR_INFO: intr(HW_EXCEPTION, 6)})
    v.guest("vmcall")
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.VMCALL]              # delivered, not intercepted (27.5.1)
    assert r.exit.regs["rax"] == GUEST_HANDLED | 6


@vmx_test()
def test_exit_handler_injects_an_exception_on_resume(v):
    v.guest("""
        cpuid
        vmcall
    """)
    v.on(Exit.CPUID, Action.inject_event(intr(HW_EXCEPTION, 6)))
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.CPUID, Exit.VMCALL]
    assert r.last.regs["rax"] == GUEST_HANDLED | 6


@deviation("kvmrunner", "SDM Vol. 3C 26.5.1 (the timer counts down in VMX non-root operation)",
           "the exit came before the guest's first instruction (rcx 0, rip the guest's entry point, "
           "82841 TSC ticks for a 2000 << 5 budget)",
           "KVM, not Bochs: nested.c emulates L1's timer with a host hrtimer armed during its software "
           "VM entry, so KVM's own time counts; Bochs' TSC advances once per instruction, and KVM's "
           "entry path alone takes more than 64000 instructions")
@vmx_test("preemption_timer")
def test_preemption_timer_expires(v):
    v.pin |= Pin.PREEMPTION_TIMER
    v.fields[F.PREEMPTION_TIMER] = 2000
    v.guest("""
        mov ecx, 100000000
    1:  dec ecx
        jnz 1b
        vmcall
    """)
    v.enter_guest()
    r = yield
    assert r.exit.reason == Exit.PREEMPTION_TIMER
    assert 0 < r.exit.regs["rcx"] < 100_000_000      # the guest ran, and was stopped early
    rate = v.caps.preemption_timer_rate
    assert r.exit.tsc >= 2000 << rate                # counts down once per 2^rate TSC ticks (25.5.1)


@vmx_test("preemption_timer")
def test_preemption_timer_zero_exits_before_any_instruction(v):
    v.pin |= Pin.PREEMPTION_TIMER
    v.fields[F.PREEMPTION_TIMER] = 0
    v.regs["rax"] = 0x77
    v.guest("""
        mov eax, 1
        vmcall
    """)
    v.enter_guest()
    r = yield
    assert r.exit.reason == Exit.PREEMPTION_TIMER
    assert r.exit.regs["rax"] == 0x77


@vmx_test("preemption_timer", "save_preemption_timer")
def test_preemption_timer_value_saved_on_exit(v):
    v.pin |= Pin.PREEMPTION_TIMER
    v.exit_ctls |= ExitCtl.SAVE_PREEMPTION_TIMER
    v.fields[F.PREEMPTION_TIMER] = 0x7FFF_FFFF
    v.guest("vmcall")
    v.vmread_after(F.PREEMPTION_TIMER)
    v.enter_guest()
    r = yield
    assert r.exit.reason == Exit.VMCALL
    assert 0 < r.reads[F.PREEMPTION_TIMER] < 0x7FFF_FFFF


@vmx_test("monitor_trap_flag")
def test_monitor_trap_flag_exits_after_one_instruction(v):
    v.proc |= Proc.MONITOR_TRAP_FLAG
    v.guest("""
        lea rsi, [rip + @next]
    @next:
        nop
        vmcall
    """)
    v.enter_guest()
    r = yield
    assert r.exit.reason == Exit.MONITOR_TRAP_FLAG
    assert r.exit.rip == r.exit.regs["rsi"]


EPT_READ, EPT_WRITE, EPT_FETCH = 1 << 0, 1 << 1, 1 << 2
EPT_R, EPT_W, EPT_X = 1 << 3, 1 << 4, 1 << 5      # permissions of the translation
LINEAR_VALID, LINEAR_TRANSLATION = 1 << 7, 1 << 8


def ept_qual(access: int, perms: int) -> int:
    return access | perms << 3 | LINEAR_VALID | LINEAR_TRANSLATION


@vmx_test("ept")
def test_ept_violation_on_read_of_a_non_present_page(v):
    v.use_ept()
    v.ept_map(TEST_PAGE, 0)
    v.guest(f"""
        mov rax, {TEST_PAGE + 0x18:#x}
        mov rbx, [rax]
    """)
    v.enter_guest()
    r = yield
    e = r.exit
    assert e.reason == Exit.EPT_VIOLATION
    assert e.qualification & 0x1FF == ept_qual(EPT_READ, 0)
    assert e.physical_address == TEST_PAGE + 0x18
    assert e.linear_address == TEST_PAGE + 0x18


@vmx_test("ept")
def test_ept_violation_on_write_to_a_read_only_page(v):
    v.use_ept()
    v.ept_map(TEST_PAGE, R)
    v.guest(f"""
        mov rax, {TEST_PAGE + 0x100:#x}
        mov [rax], rbx
    """)
    v.enter_guest()
    r = yield
    assert r.exit.reason == Exit.EPT_VIOLATION
    assert r.exit.qualification & 0x1FF == ept_qual(EPT_WRITE, R)
    assert r.exit.physical_address == TEST_PAGE + 0x100


@vmx_test("ept")
def test_ept_violation_on_fetch_from_a_non_executable_page(v):
    v.use_ept()
    v.ept_map(TEST_PAGE, R | W)
    v.guest(f"""
        mov rax, {TEST_PAGE:#x}
        jmp rax
    """)
    v.enter_guest()
    r = yield
    assert r.exit.reason == Exit.EPT_VIOLATION
    assert r.exit.qualification & 0x1FF == ept_qual(EPT_FETCH, R | W)
    assert r.exit.rip == TEST_PAGE


@vmx_test("ept")
def test_ept_violation_fixed_up_and_resumed(v):
    v.use_ept()
    pte = v.ept_map(TEST_PAGE, 0)
    v.poke(TEST_PAGE, 0x1122_3344_5566_7788)
    v.guest(f"""
        mov rax, {TEST_PAGE:#x}
        mov rbx, [rax]
        vmcall
    """)
    v.on(Exit.EPT_VIOLATION, Action.grant(pte, RWX))
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.EPT_VIOLATION, Exit.VMCALL]
    assert r.last.regs["rbx"] == 0x1122_3344_5566_7788
    assert r.exits[1].rip > r.exit.rip               # the faulting load was re-executed, then on


@deviation(*KVM_EPT_MISCONFIG, "qualification 0x181 (read access, linear-address valid, translation)",
           KVM_EPT_MISCONFIG_LAYER)
@vmx_test("ept")
def test_ept_misconfiguration_write_without_read(v):
    v.use_ept()
    v.ept_map(TEST_PAGE, W)
    v.guest(f"""
        mov rax, {TEST_PAGE + 0x40:#x}
        mov rbx, [rax]
    """)
    v.enter_guest()
    r = yield
    assert r.exit.reason == Exit.EPT_MISCONFIG
    assert r.exit.physical_address == TEST_PAGE + 0x40
    assert r.exit.qualification == 0


@vmx_test("ept")
def test_ept_misconfiguration_reserved_memory_type(v):
    v.use_ept()
    v.ept_map(TEST_PAGE, 0, raw=TEST_PAGE | RWX | 2 << 3)   # memory type 2 is reserved (29.3.7)
    v.guest(f"""
        mov rax, {TEST_PAGE:#x}
        mov rbx, [rax]
    """)
    v.enter_guest()
    r = yield
    assert r.exit.reason == Exit.EPT_MISCONFIG
    assert r.exit.physical_address == TEST_PAGE


@vmx_test("ept", "ept_2m")
def test_ept_2m_page_permissions(v):
    v.use_ept()
    v.ept_map(TEST_PAGE, R, level=2)
    v.guest(f"""
        mov rax, {TEST_PAGE + 0x1F_F000:#x}
        mov rbx, [rax]
        mov [rax], rbx
    """)
    v.enter_guest()
    r = yield
    assert r.exit.reason == Exit.EPT_VIOLATION
    assert r.exit.qualification & 0x1FF == ept_qual(EPT_WRITE, R)
    assert r.exit.physical_address == TEST_PAGE + 0x1F_F000


@vmx_test("ept", "ept_1g")
def test_ept_1g_pages_map_the_guest(v):
    v.use_ept(page_1g=True)
    v.guest("""
        xor eax, eax
        cpuid
        vmcall
    """)
    v.on(Exit.CPUID, Action.skip())
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.CPUID, Exit.VMCALL]


@vmx_test("ept", "ept_1g")
def test_ept_1g_page_permissions(v):
    v.use_ept(page_1g=True)
    v.ept_map(0x4000_0000, R, level=3)
    v.guest("""
        mov rax, 0x7ffff000
        mov [rax], rbx
    """)
    v.enter_guest()
    r = yield
    assert r.exit.reason == Exit.EPT_VIOLATION
    assert r.exit.qualification & 0x1FF == ept_qual(EPT_WRITE, R)
    assert r.exit.physical_address == 0x7FFF_F000


@vmx_test("ept", "ept_ad")
def test_ept_accessed_and_dirty_flags(v):
    v.use_ept(ad=True)
    written = v.ept_map(TEST_PAGE, RWX)
    read = v.ept_map(TEST_PAGE + 0x1000, RWX)
    v.guest(f"""
        mov rax, {TEST_PAGE:#x}
        mov [rax], rbx
        mov rcx, [rax + 0x1000]
        vmcall
    """)
    v.mem_read_after(written)
    v.mem_read_after(read)
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.VMCALL]
    w, rd = (list(r.memory.values())[i][0] for i in (0, 1))
    assert w & (ACCESSED | DIRTY) == ACCESSED | DIRTY
    assert rd & (ACCESSED | DIRTY) == ACCESSED
