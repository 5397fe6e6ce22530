"""records.txt: every record kind by name, fields decoded (VT-d fault status, FRCD, QI wait, VMX exits)."""

from harness.payload.describe import describe, kind_name
from harness.payload.pci import PCI_RECORD
from harness.payload.records import Kind, Record
from harness.payload.vmx.vmm import Kind as VmxKind
from harness.payload.vtd import VtdKind


def test_every_kind_has_a_name():
    kinds = [*Kind, *VtdKind, *VmxKind, PCI_RECORD]
    unnamed = [k for k in kinds if kind_name(k).startswith("kind ") and k != Kind.USER]
    assert unnamed == []
    assert kind_name(0x6F) == "kind 0x6f"


def test_vtd_records_are_decoded():
    frcd = Record(7, VtdKind.FRCD, (0xFED9_0000, 0, 0x50_0000, 1 << 63 | 5 << 32 | 0x20))
    assert describe(frcd) == ("#7 VTD_FRCD unit 0xfed90000 FRCD0: reason 0x5 WRITE sid 00:04.0 write "
                              "fi 0x500000  [0xfed90000 0x0 0x500000 0x8000000500000020]")
    read = Record(8, VtdKind.FRCD, (0xFED9_0000, 1, 0x7000, 1 << 63 | 1 << 62 | 6 << 32 | 0x28))
    assert "reason 0x6 READ sid 00:05.0 read fi 0x7000" in describe(read)
    ir = Record(9, VtdKind.FRCD, (0xFED9_0000, 0, 6 << 48, 1 << 63 | 0x22 << 32 | 0x20))
    assert "IR_NOT_PRESENT" in describe(ir) and "(interrupt index 6)" in describe(ir)
    assert "FRCD1: empty" in describe(Record(3, VtdKind.FRCD, (0xFED9_0000, 1, 0, 0)))
    fsts = describe(Record(4, VtdKind.FSTS, (0xFED9_0000, 0x3 | 2 << 8, 1 << 31 | 1 << 30)))
    assert "FSTS 0x203 [PFO|PPF FRI 2] FECTL 0xc0000000 [IM|IP]" in fsts
    assert "status at 0x1000 = 0x51570002 after 3 polls" in describe(Record(5, VtdKind.QI_WAIT, (0x1000, 0x5157_0002, 3)))
    assert "waiting for GSTS" in describe(Record(6, VtdKind.TIMEOUT, (1, 0x8000_0000)))


def test_vmx_records_are_decoded():
    exit_ = describe(Record(2, VmxKind.VMX_EXIT, (0, 10, 0, 0x1234, 2, 0, 0, 0, 0, 0, 0, 99)))
    assert exit_.startswith("#2 VMX_EXIT exit #0 CPUID qualification 0x0 rip 0x1234 length 2")
    assert "(VM-entry failure)" in describe(Record(2, VmxKind.VMX_EXIT, (0, 1 << 31 | 33, *[0] * 10)))
    insn = describe(Record(3, VmxKind.VMX_INSN, (10, 0, 2, 4, 0)))
    assert "VMLAUNCH(0x0) VMfailValid error 4 VMLAUNCH_NONCLEAR" in insn
    assert "after 1 exits: ACTION, last reason VMCALL" in describe(Record(4, VmxKind.VMX_STOP, (1, 0, 18)))


def test_base_records_and_damage():
    assert describe(Record(0, PCI_RECORD, (0x20, 0x11E8_1234, 0xFF_0010, 0, 0))).startswith(
        "#0 PCI 00:04.0 1234:11e8 class 00ff00")
    assert "fault #GP" in describe(Record(1, Kind.READ, (1, 0, 0x10D)))
    assert describe(Record(2, Kind.END, (0, 2, 5))).startswith("#2 END OK after 2 records, 5 steps")
    assert describe(Record(3, Kind.MEM, (3,))) == "#3 MEM (fields do not match the kind's layout)  [0x3]"
    assert describe(Record(4, 0x6F, (1, 2))) == "#4 kind 0x6f 0x1 0x2"
