"""Identity page tables against the IA-32e layout (SDM Vol. 3A, 4.5, tables 4-15 to 4-18)."""

import struct

import pytest

from harness.payload import layout, paging
from harness.payload.arena import Arena


def qword(arena: Arena, addr: int) -> int:
    return struct.unpack("<Q", arena.read(addr, 8))[0]


@pytest.fixture
def mapped():
    arena = Arena(layout.ARENA_BASE, layout.ARENA_LIMIT)
    return arena, paging.build_identity_map(arena, gib=4)


def test_pml4_points_at_pdpt_present_writable(mapped):
    arena, pml4 = mapped
    assert pml4 == layout.ARENA_BASE and pml4 % 4096 == 0
    e = qword(arena, pml4)
    assert e & 0xFFF == paging.P | paging.RW
    assert e & paging.ADDR_MASK == arena.symbols["pdpt"]
    assert qword(arena, pml4 + 8) == 0          # nothing above 512 GiB


def test_every_2m_page_maps_its_own_address(mapped):
    arena, pml4 = mapped
    pdpt = qword(arena, pml4) & paging.ADDR_MASK
    for gib in range(4):
        pd = qword(arena, pdpt + 8 * gib) & paging.ADDR_MASK
        for i in (0, 1, 255, 511):
            e = qword(arena, pd + 8 * i)
            assert e & paging.ADDR_MASK == (gib << 30) | (i << 21)
            assert e & (paging.P | paging.RW | paging.PS) == paging.P | paging.RW | paging.PS
            assert not e & paging.US
    assert qword(arena, pdpt + 8 * 4) == 0      # nothing mapped at 4 GiB and above


def test_device_space_is_uncached_and_ram_is_not(mapped):
    arena, pml4 = mapped
    pdpt = qword(arena, pml4) & paging.ADDR_MASK
    low = qword(arena, qword(arena, pdpt) & paging.ADDR_MASK)
    lapic_pd = qword(arena, pdpt + 8 * 3) & paging.ADDR_MASK
    lapic = qword(arena, lapic_pd + 8 * ((layout.LAPIC_BASE >> 21) & 511))
    assert lapic & paging.ADDR_MASK == layout.LAPIC_BASE & ~((1 << 21) - 1)
    assert lapic & (paging.PCD | paging.PWT) == paging.PCD | paging.PWT
    assert low & (paging.PCD | paging.PWT) == 0


def test_misaligned_2m_page_is_refused():
    with pytest.raises(ValueError, match="2 MiB aligned"):
        paging.pde_2m(0x1000)


def test_arena_refuses_overflow_and_duplicate_names():
    arena = Arena(0x1000, 0x3000)
    arena.alloc(0x1000, name="a")
    with pytest.raises(ValueError, match="defined twice"):
        arena.alloc(8, name="a")
    with pytest.raises(ValueError, match="arena overflow"):
        arena.alloc(0x2000)
