"""I/O instructions (SDM Vol. 3C, 26.1.3, 25.6.4; qualification: 28.2.1, table 28-5) and MSR
accesses (25.6.9 MSR bitmaps; without bitmaps every RDMSR/WRMSR exits)."""

import pytest

from harness.testing import Action, Exit, Proc, vmx_test

IN, STRING, REP, IMMEDIATE = 1 << 3, 1 << 4, 1 << 5, 1 << 6
SYSENTER_CS, KERNEL_GS_BASE = 0x174, 0xC000_0102


def io_qual(port: int, size: int, flags: int = 0) -> int:
    return port << 16 | (size - 1) | flags


@vmx_test("io_exiting")
def test_in_immediate_exits_unconditionally(v):
    v.proc |= Proc.UNCONDITIONAL_IO
    v.guest("""
        in al, 0x80
        vmcall
    """)
    v.on(Exit.IO, Action.skip())
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.IO, Exit.VMCALL]
    assert r.exit.qualification == io_qual(0x80, 1, IN | IMMEDIATE)
    assert r.exit.length == 2


@vmx_test("io_exiting")
def test_out_dx_word_exits(v):
    v.proc |= Proc.UNCONDITIONAL_IO
    v.guest("""
        mov edx, 0x1234
        out dx, ax
        vmcall
    """)
    v.on(Exit.IO, Action.skip())
    v.enter_guest()
    r = yield
    assert r.exit.qualification == io_qual(0x1234, 2)
    assert r.exit.length == 2                       # 66 EF


@vmx_test("io_exiting")
def test_in_dx_dword_exits(v):
    v.proc |= Proc.UNCONDITIONAL_IO
    v.guest("""
        mov edx, 0x80
        in eax, dx
        vmcall
    """)
    v.on(Exit.IO, Action.skip())
    v.enter_guest()
    r = yield
    assert r.exit.qualification == io_qual(0x80, 4, IN)
    assert r.exit.length == 1                       # ED


@vmx_test("io_exiting")
def test_rep_outsb_reports_string_rep_and_linear_address(v):
    v.proc |= Proc.UNCONDITIONAL_IO
    v.guest("""
        mov edx, 0x1234
        lea rsi, [rip + @buf]
        mov ecx, 4
        rep outsb
        vmcall
    @buf: .byte 1, 2, 3, 4
    """)
    v.on(Exit.IO, Action.stop())
    v.enter_guest()
    r = yield
    e = r.exit
    assert e.reason == Exit.IO
    assert e.qualification == io_qual(0x1234, 1, STRING | REP)
    assert e.length == 2                            # F3 6E
    assert e.linear_address == e.regs["rsi"]
    assert e.regs["rcx"] == 4


@vmx_test("io_bitmaps")
def test_io_bitmap_a_selects_the_port(v):
    v.io_ports = {0x1234}
    v.guest("""
        mov edx, 0x1235
        in al, dx
        mov edx, 0x1234
        in al, dx
        vmcall
    """)
    v.on(Exit.IO, Action.skip())
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.IO, Exit.VMCALL]
    assert r.exit.qualification == io_qual(0x1234, 1, IN)


@vmx_test("io_bitmaps")
def test_io_bitmap_b_covers_high_ports(v):
    v.io_ports = {0x9000}
    v.guest("""
        mov edx, 0x9001
        out dx, al
        mov edx, 0x9000
        out dx, al
        vmcall
    """)
    v.on(Exit.IO, Action.skip())
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.IO, Exit.VMCALL]
    assert r.exit.qualification == io_qual(0x9000, 1)


@vmx_test("io_bitmaps")
def test_io_bitmap_multibyte_access_exits_if_any_port_is_set(v):
    v.io_ports = {0x1234}
    v.guest("""
        mov edx, 0x1233
        in ax, dx
        vmcall
    """)
    v.on(Exit.IO, Action.skip())
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.IO, Exit.VMCALL]
    assert r.exit.qualification == io_qual(0x1233, 2, IN)


@vmx_test("io_bitmaps", "io_exiting")
def test_io_bitmaps_override_unconditional_io_exiting(v):
    v.proc |= Proc.UNCONDITIONAL_IO
    v.io_ports = {0x1234}
    v.guest("""
        in al, 0x80
        vmcall
    """)
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.VMCALL]              # 25.6.4: the bitmaps decide, port 0x80 clear


@vmx_test()
def test_rdmsr_exits_without_msr_bitmaps(v):
    v.guest(f"""
        mov ecx, {SYSENTER_CS:#x}
        rdmsr
        vmcall
    """)
    v.on(Exit.RDMSR, Action.skip())
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.RDMSR, Exit.VMCALL]
    assert r.exit.regs["rcx"] == SYSENTER_CS and r.exit.length == 2


@vmx_test()
def test_wrmsr_exits_without_msr_bitmaps(v):
    v.guest(f"""
        mov ecx, {SYSENTER_CS:#x}
        xor eax, eax
        xor edx, edx
        wrmsr
        vmcall
    """)
    v.on(Exit.WRMSR, Action.skip())
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.WRMSR, Exit.VMCALL]
    assert r.exit.regs["rcx"] == SYSENTER_CS


# One MSR of each bitmap range (SDM Vol. 3C, 25.6.9): low 0..1FFFh, high C0000000h..C0001FFFh.
MSR_RANGES = pytest.mark.parametrize("msr, neighbour", [(SYSENTER_CS, SYSENTER_CS + 1),
                                                        (KERNEL_GS_BASE, KERNEL_GS_BASE - 1)],
                                     ids=["low", "high"])


@MSR_RANGES
@vmx_test("msr_bitmaps")
def test_msr_bitmap_read_exits_for_its_msr_only(v, msr, neighbour):
    v.msr_reads = {msr}
    v.guest(f"""
        mov ecx, {neighbour:#x}
        rdmsr
        mov ecx, {msr:#x}
        rdmsr
        vmcall
    """)
    v.on(Exit.RDMSR, Action.skip())
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.RDMSR, Exit.VMCALL]
    assert r.exit.regs["rcx"] == msr


@MSR_RANGES
@vmx_test("msr_bitmaps")
def test_msr_bitmap_write_bit_leaves_reads_alone(v, msr, neighbour):
    v.msr_writes = {msr}
    v.guest(f"""
        mov ecx, {msr:#x}
        rdmsr
        wrmsr
        vmcall
    """)
    v.on(Exit.WRMSR, Action.skip())
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.WRMSR, Exit.VMCALL]
    assert r.exit.regs["rcx"] == msr


@vmx_test("msr_bitmaps")
def test_msr_outside_bitmap_ranges_always_exits(v):
    v.msr_reads = {SYSENTER_CS}
    v.guest("""
        mov ecx, 0x40000000
        rdmsr
        vmcall
    """)
    v.on(Exit.RDMSR, Action.skip())
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.RDMSR, Exit.VMCALL]
    assert r.exit.regs["rcx"] == 0x4000_0000
