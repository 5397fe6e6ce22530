"""EPT paging structures (Intel SDM Vol. 3C, 29.3.2, tables 29-1 to 29-6) and the EPTP (25.6.11).

The builder identity-maps guest-physical memory (2 MiB or 1 GiB leaves) and lets a scenario carve
out single 4 KiB pages with chosen permissions, memory types or deliberately bad bits.  Every table
lives in the arena, so a scenario also knows the address of each entry (to fix it up on an exit or
to read its accessed/dirty flags afterwards).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ..arena import Arena

R, W, X = 1 << 0, 1 << 1, 1 << 2
RWX = R | W | X
LARGE = 1 << 7            # in a PDPTE: 1 GiB page; in a PDE: 2 MiB page
ACCESSED = 1 << 8         # with EPTP bit 6 (A/D enabled), 29.3.5
DIRTY = 1 << 9
MT_UC, MT_WB = 0, 6       # memory types, bits 5:3 of a leaf (29.3.7)
MT_SHIFT = 3
ADDR_MASK = 0x000F_FFFF_FFFF_F000

EPTP_WB = 6               # EPTP bits 2:0: memory type of the paging structures
EPTP_WALK_4 = 3 << 3      # EPTP bits 5:3: page-walk length minus 1
EPTP_AD = 1 << 6          # EPTP bit 6: accessed and dirty flags

RAM_LIMIT = 0xC000_0000   # below: write-back; above: uncached device space


def leaf(hpa: int, perms: int = RWX, mtype: int | None = None, large: bool = False, flags: int = 0) -> int:
    """A leaf entry (tables 29-4 to 29-6): permissions, memory type, page frame (and ``flags``,
    e.g. ACCESSED | DIRTY)."""
    if mtype is None:
        mtype = MT_WB if hpa < RAM_LIMIT else MT_UC
    return (hpa & ADDR_MASK) | perms | (mtype << MT_SHIFT) | (LARGE if large else 0) | flags


def table(next_table: int, perms: int = RWX) -> int:
    """A non-leaf entry referencing the next table (tables 29-1 to 29-3)."""
    if next_table & 0xFFF:
        raise ValueError(f"{next_table:#x} is not 4 KiB aligned")
    return next_table | perms


@dataclass
class Ept:
    """An identity-mapped EPT hierarchy in the arena, 4 levels."""

    arena: Arena
    gib: int = 4
    page_1g: bool = False
    ad: bool = False
    dirty: bool = False       # identity leaves start accessed and dirty (only new pages log to PML)
    pml4: int = 0
    pdpt: int = 0
    pds: dict[int, int] = field(default_factory=dict)      # GiB index -> PD address
    pts: dict[int, int] = field(default_factory=dict)      # 2 MiB index -> PT address

    def __post_init__(self) -> None:
        a = self.arena
        self.pml4 = a.alloc(4096, 4096)
        self.pdpt = a.alloc(4096, 4096)
        a.write(self.pml4, struct.pack("<Q", table(self.pdpt)))
        ad = ACCESSED | DIRTY if self.dirty else 0
        for g in range(self.gib):
            if self.page_1g:
                self._put(self.pdpt, g, leaf(g << 30, large=True, flags=ad))
            else:
                pd = a.alloc(4096, 4096)
                self.pds[g] = pd
                self._put(self.pdpt, g, table(pd))
                a.write(pd, struct.pack("<512Q", *(leaf((g << 30) | (i << 21), large=True, flags=ad)
                                                   for i in range(512))))

    @property
    def eptp(self) -> int:
        return self.pml4 | EPTP_WB | EPTP_WALK_4 | (EPTP_AD if self.ad else 0)

    def _put(self, tbl: int, index: int, value: int) -> None:
        self.arena.write(tbl + 8 * index, struct.pack("<Q", value))

    def _get(self, tbl: int, index: int) -> int:
        return struct.unpack("<Q", self.arena.read(tbl + 8 * index, 8))[0]

    def pdpte_addr(self, gpa: int) -> int:
        return self.pdpt + 8 * (gpa >> 30 & 511)

    def pde_addr(self, gpa: int) -> int:
        if self.page_1g:
            raise ValueError("1 GiB pages: there is no PDE")
        return self.pds[gpa >> 30] + 8 * (gpa >> 21 & 511)

    def split(self, gpa: int) -> int:
        """Map the 2 MiB region holding ``gpa`` with 4 KiB pages (same permissions); return the PT."""
        index = gpa >> 21
        if index not in self.pts:
            if self.page_1g:
                raise ValueError("split() needs a 2 MiB-page hierarchy")
            pt = self.arena.alloc(4096, 4096)
            base = index << 21
            ad = ACCESSED | DIRTY if self.dirty else 0
            self.arena.write(pt, struct.pack("<512Q", *(leaf(base | (i << 12), flags=ad) for i in range(512))))
            self._put(self.pds[gpa >> 30], index & 511, table(pt))
            self.pts[index] = pt
        return self.pts[index]

    def pte_addr(self, gpa: int) -> int:
        """Address of the 4 KiB leaf mapping ``gpa`` (splitting its 2 MiB region first)."""
        return self.split(gpa) + 8 * (gpa >> 12 & 511)

    def map_4k(self, gpa: int, hpa: int | None = None, perms: int = RWX, mtype: int | None = None,
               raw: int | None = None) -> int:
        """Map one 4 KiB page; ``raw`` writes an exact entry (e.g. a misconfiguration).  Returns
        the entry's address."""
        addr = self.pte_addr(gpa)
        value = raw if raw is not None else leaf(hpa if hpa is not None else gpa & ~0xFFF, perms, mtype)
        self.arena.write(addr, struct.pack("<Q", value))
        return addr

    def entry_addr(self, gpa: int, level: int) -> int:
        """Address of the entry at ``level`` (4: PML4E, 3: PDPTE, 2: PDE, 1: PTE) on the walk of
        ``gpa`` (29.3.2); level 1 splits the 2 MiB page first."""
        if level == 4:
            return self.pml4 + 8 * (gpa >> 39 & 511)
        if level == 3:
            return self.pdpte_addr(gpa)
        if level == 2:
            return self.pde_addr(gpa)
        if level == 1:
            return self.pte_addr(gpa)
        raise ValueError(f"EPT level {level}: expected 1..4")

    def entry(self, addr: int) -> int:
        return struct.unpack("<Q", self.arena.read(addr, 8))[0]
