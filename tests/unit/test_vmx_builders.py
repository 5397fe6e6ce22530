"""VMX table builders against the SDM's layouts, without booting anything."""

import struct

import pytest

from harness.observe.vmx import split
from harness.payload import layout
from harness.payload.arena import Arena
from harness.payload.records import Kind as BaseKind, Record
from harness.payload.vmx.builder import MARK_BEGIN, MARK_END, VmxTest, msr_bitmap
from harness.payload.vmx.controls import Allowed, Proc, Proc2, VmxCaps
from harness.payload.vmx.ept import ACCESSED, Ept, R, RWX
from harness.payload.vmx.fields import F, is_read_only, width
from harness.payload.vmx.vmm import Kind


def test_field_encodings_carry_width_and_type():
    assert width(F.VPID) == 16 and width(F.EPTP) == 64
    assert width(F.PIN_CONTROLS) == 32 and width(F.GUEST_RIP) == 64
    assert is_read_only(F.EXIT_REASON) and is_read_only(F.EXIT_QUALIFICATION)
    assert not is_read_only(F.GUEST_CR0)


def test_reconcile_forces_must_be_one_and_drops_disallowed():
    a = Allowed.from_msr(0x0000_00FF_0000_0016)     # must1 = 0x16, may1 = 0xFF
    assert a.reconcile(0x101) == 0x17
    assert a.allows(0x16) and not a.allows(0x06) and not a.allows(0x116)


def test_true_controls_are_used_when_basic_bit_55_is_set():
    caps = VmxCaps({0x480: 1 << 55, 0x482: 0xFFFF_FFFF_0401_E172, 0x48E: 0xFFFF_FFFF_0400_6172})
    assert caps.proc.must1 == 0x0400_6172            # CR3 load/store exiting may be 0
    assert VmxCaps({0x480: 0, 0x482: 0xFFFF_FFFF_0401_E172}).proc.must1 == 0x0401_E172


def test_secondary_controls_need_primary_bit_31():
    caps = VmxCaps({0x482: 0x7FFF_FFFF_0000_0000, 0x48B: 0xFFFF_FFFF_0000_0000})
    t = VmxTest(caps)
    t.proc2 |= Proc2.EPT
    assert caps.proc2.may1 == 0
    assert F.PROC_CONTROLS2 not in t.controls()
    assert not t.controls()[F.PROC_CONTROLS] & Proc.SECONDARY


def test_msr_bitmap_quarters():
    a = Arena(layout.ARENA_BASE, layout.ARENA_LIMIT)
    addr = msr_bitmap(a, reads={0x174, 0xC000_0080}, writes={0x1FFF, 0xC000_0102})
    bm = a.read(addr, 4096)
    assert bm[0x174 // 8] == 1 << (0x174 % 8)                       # read-low
    assert bm[1024 + 0x80 // 8] == 1 << 0                           # read-high
    assert bm[2048 + 0x1FFF // 8] == 1 << 7                         # write-low
    assert bm[3072 + 0x102 // 8] == 1 << 2                          # write-high
    with pytest.raises(ValueError):
        msr_bitmap(a, reads={0x4000_0000}, writes=set())


def test_ept_identity_map_and_4k_split():
    a = Arena(layout.ARENA_BASE, layout.ARENA_LIMIT)
    e = Ept(a, ad=True)
    assert e.eptp == e.pml4 | 6 | 3 << 3 | 1 << 6
    pde = e.entry(e.pde_addr(0x0220_0000))
    assert pde == 0x0220_0000 | RWX | 6 << 3 | 1 << 7               # 2 MiB WB leaf
    addr = e.map_4k(0x0200_3000, perms=R)
    assert e.entry(addr) == 0x0200_3000 | R | 6 << 3
    assert e.entry(e.pde_addr(0x0200_0000)) & ~0xFFF == e.pts[0x0200_0000 >> 21]
    assert not e.entry(addr) & ACCESSED


def test_ept_1g_leaves_and_device_space_uncached():
    e = Ept(Arena(layout.ARENA_BASE, layout.ARENA_LIMIT), page_1g=True)
    assert e.entry(e.pdpte_addr(0x4000_0000)) == 0x4000_0000 | RWX | 6 << 3 | 1 << 7
    assert e.entry(e.pdpte_addr(0xC000_0000)) == 0xC000_0000 | RWX | 0 << 3 | 1 << 7


def test_split_cuts_records_at_marks_and_flags_incomplete_tests():
    recs = [Record(0, BaseKind.HELLO, (1,)),
            Record(1, BaseKind.MARK, (0, MARK_BEGIN | 0)),
            Record(2, Kind.VMX_EXIT, (0, 10, 0, 0x1000, 2, 0, 0, 0, 0, 0, 0, 5)),
            Record(3, Kind.VMX_REGS, (0, 1, 2, 3, 4, 5, 6)),
            Record(4, BaseKind.MARK, (9, MARK_END | 0)),
            Record(5, BaseKind.MARK, (10, MARK_BEGIN | 1)),
            Record(6, Kind.VMX_INSN, (10, 0, 2, 4, 0))]
    out = split(recs)
    assert out[0].complete and out[0].exit.reason == 10 and out[0].exit.regs["rdx"] == 4
    assert not out[1].complete and out[1].entry_error.error == 4


def test_guest_state_field_table_is_emitted_as_data():
    from harness.payload.image import Scenario

    caps = VmxCaps({0x480: 0, 0x481: 0xFF_0000_0016, 0x482: 0xFFFF_FFFF_0401_E172,
                    0x483: 0xFFFF_FFFF_0003_6DFF, 0x484: 0xFFFF_FFFF_0000_11FF})
    sc = Scenario(probe=False)
    VmxTest(caps).build(sc, 3)
    text = sc.asm[-1]
    assert "vt3_vmcs_table:" in text and f"{int(F.GUEST_RIP):#x}, vt3_guest" in text
    assert f"{int(F.PIN_CONTROLS):#x}, 0x16, 0" in text


def test_resume_action_and_a_second_entry():
    """Action.resume() sets no flag (RIP unchanged); enter_again() calls vmx_run once more after the
    first loop with VMRESUME (bit 0) and the guest registers kept (bit 1) as asked."""
    from harness.payload.image import Scenario
    from harness.payload.vmx.builder import Action, VmxTest
    from harness.payload.vmx.controls import VmxCaps
    from harness.payload.vmx.vmm import Act

    assert Action.resume().words()[0] == 0 and Action.skip().words()[0] == Act.SKIP
    v = VmxTest(VmxCaps({0x480: 0, 0x481: 0xFF_0000_0016, 0x482: 0xFFFF_FFFF_0401_E172,
                         0x483: 0xFFFF_FFFF_0003_6DFF, 0x484: 0xFFFF_FFFF_0000_11FF}))
    v.enter_again(resume=True, max_exits=2)
    v.enter_again(keep_registers=False)
    v.enter_guest()
    sc = Scenario(name="again", probe=False)
    v.build(sc, 0)
    runs = [s.args for s in sc.steps.steps if s.args and s.args[0] == "vmx_run"]
    assert runs == [("vmx_run", "vt0_actions", 16, 0), ("vmx_run", "vt0_actions", 2, 3),
                    ("vmx_run", "vt0_actions", 4, 0)]
