"""VT-d builders against the specification's bit layouts (no boot)."""

from __future__ import annotations

import struct

import pytest

from harness.payload import layout, vtd
from harness.payload.arena import Arena


def arena() -> Arena:
    return Arena(layout.ARENA_BASE, layout.ARENA_LIMIT)


def test_root_entry_layout():
    """9.1: bit 0 present, bits 63:12 context-table pointer, high qword reserved."""
    assert vtd.root_entry(0x123000) == (0x123001, 0)
    assert vtd.root_entry(0x123000, present=False) == (0x123000, 0)
    with pytest.raises(ValueError):
        vtd.root_entry(0x123800)


def test_context_entry_layout():
    """9.3: lo P(0) FPD(1) TT(3:2) SLPTPTR(63:12); hi AW(2:0) DID(23:8)."""
    lo, hi = vtd.context_entry(0x456000, domain_id=0xABC, levels=4, fpd=True)
    assert lo == 0x456000 | 0b0011
    assert hi == (0xABC << 8) | 2
    lo, hi = vtd.context_entry(0x456000, 1, levels=3, tt=vtd.TT.PASS_THROUGH)
    assert (lo & 0xF, hi) == (0b1001, (1 << 8) | 1)


def test_second_level_entry_bits():
    """9.8: R bit 0, W bit 1, PS bit 7, address 51:12."""
    assert vtd.sl_entry(0x200000, read=True, write=False, large=True) == 0x200000 | 0x81
    assert vtd.sl_entry(0x5000, read=False, write=True) == 0x5002


@pytest.mark.parametrize("levels", [3, 4])
def test_second_level_walk_4k(levels):
    """Each level indexes 9 IOVA bits above bit 12; the leaf holds the frame and permissions."""
    a = arena()
    dom = vtd.SecondLevel(a, levels)
    iova = 0x7F_ABCD_E000 if levels == 3 else 0xFFFF_ABCD_E000
    pte = dom.map(iova, 0x1234_5000, write=False)
    table = dom.root
    for lv in range(levels, 1, -1):
        e = struct.unpack_from("<Q", a.read(table + 8 * vtd.SecondLevel.index(iova, lv), 8))[0]
        assert e & 0x83 == 0x03          # table entries: R+W, not PS
        table = e & vtd.ENTRY_ADDR_MASK
    assert pte == table + 8 * ((iova >> 12) & 0x1FF)
    assert struct.unpack("<Q", a.read(pte, 8))[0] == 0x1234_5000 | vtd.SL_R
    assert dom.translate(iova + 0x123) == 0x1234_5123
    assert dom.translate(iova, write=True) is None


def test_large_pages_stop_the_walk():
    a = arena()
    dom = vtd.SecondLevel(a, 3)
    dom.map(0x4000_0000, 0x0, vtd.PAGE_1G)
    dom.map(0x20_0000, 0x60_0000, vtd.PAGE_2M, read=True, write=False)
    assert dom.translate(0x4123_4567) == 0x0123_4567
    assert dom.translate(0x2F_0000) == 0x6F_0000
    assert dom.translate(0x2F_0000, write=True) is None
    pdpe = struct.unpack("<Q", a.read(dom.root + 8, 8))[0]
    assert pdpe == vtd.SL_PS | vtd.SL_R | vtd.SL_W
    with pytest.raises(ValueError):
        dom.map(0x4000_1000, 0x1000)     # already covered by the 1 GiB page
    with pytest.raises(ValueError):
        dom.map(1 << 39, 0x1000)         # beyond a 3-level domain


def test_irte_layout():
    """9.10: P 0, FPD 1, DM 2, RH 3, TM 4, DLM 7:5, vector 23:16, xAPIC dest 47:40; SID 79:64,
    SQ 81:80, SVT 83:82."""
    lo, hi = vtd.irte(0x72, 3, level=True, sid=0x20, svt=1)
    assert lo == 1 | 1 << 4 | 0x72 << 16 | 3 << 40
    assert hi == 0x20 | 1 << 18
    assert vtd.irte(0x30, 0, present=False)[0] & 1 == 0


def test_irta_and_remappable_msi():
    assert vtd.irta(0x300000, 16) == 0x300000 | 3
    assert vtd.irta(0x300000, 65536, eime=True) == 0x300000 | 1 << 11 | 15
    with pytest.raises(ValueError):
        vtd.irta(0x300000, 12)
    assert vtd.remappable_msi(5) == (0xFEE0_0000 | 5 << 5 | 1 << 4, 0)
    assert vtd.remappable_msi(0x8001, 2) == (0xFEE0_0000 | 1 << 5 | 1 << 2 | 1 << 3 | 1 << 4, 2)


def test_invalidation_descriptors():
    """6.5.2: type in bits 3:0, granularity 5:4 (IEC: bit 4), DID 31:16, SID 47:32; wait: IF 4,
    SW 5, FN 6, status data 63:32, status address in the high qword."""
    assert vtd.cc_inv_desc(3, 7, 0x20) == (0x1 | 3 << 4 | 7 << 16 | 0x20 << 32, 0)
    assert vtd.iotlb_inv_desc(3, 7, 0x70_0000, am=1) == (0x2 | 3 << 4 | 1 << 6 | 1 << 7 | 7 << 16,
                                                         0x70_0000 | 1)
    assert vtd.iec_inv_desc() == (0x4, 0)
    assert vtd.iec_inv_desc(9) == (0x4 | 1 << 4 | 9 << 32, 0)
    assert vtd.wait_desc(0x1000, 1) == (0x5 | 1 << 5 | 1 << 6 | 1 << 32, 0x1000)


def test_register_commands():
    """11.4.4.2 CCMD and 11.4.8.1 IOTLB_REG / IVA_REG."""
    assert vtd.ccmd(3, 1, 0x20) == 1 << 63 | 3 << 61 | 0x20 << 16 | 1
    assert vtd.iotlb_cmd(2, 7) == 1 << 63 | 2 << 60 | 1 << 49 | 1 << 48 | 7 << 32
    assert vtd.iva(0x70_0123, am=2, ih=True) == 0x70_0000 | 1 << 6 | 2


def test_fault_record_decoding():
    """11.4.14: FI 63:12, SID 79:64, FR 103:96, T 126, F 127."""
    from harness.observe.vtd import FaultRecord
    r = FaultRecord(0, 0x30_0abc, 1 << 63 | 1 << 62 | 6 << 32 | 0x28)
    assert (r.fault, r.address, r.source_id, r.dev, r.fn, r.reason, r.access) == \
        (True, 0x30_0000, 0x28, 5, 0, 6, "read")
