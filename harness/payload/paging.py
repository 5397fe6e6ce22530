"""IA-32e 4-level paging structures (Intel SDM Vol. 3A, section 4.5, tables 4-14 to 4-19).

The payload runs on identity-mapped 2 MiB pages built here; the 32-bit stub only loads CR3.
"""

from __future__ import annotations

import struct

from .arena import Arena

# Bits common to PML4E/PDPTE/PDE (SDM Vol. 3A, tables 4-15, 4-17, 4-18).
P = 1 << 0
RW = 1 << 1
US = 1 << 2
PWT = 1 << 3
PCD = 1 << 4
PS = 1 << 7          # in a PDE: maps a 2 MiB page; in a PDPTE: a 1 GiB page
ADDR_MASK = 0x000F_FFFF_FFFF_F000

# Addresses at or above this are device space on PCs (PCI holes, IOAPIC, LAPIC, DMAR units):
# map them uncached so reads and writes reach the device even on real hardware.
UNCACHED_FROM = 0xC000_0000


def pde_2m(phys: int, *, uncached: bool = False) -> int:
    """A PDE that maps the 2 MiB page at ``phys`` read/write, supervisor (table 4-17)."""
    if phys & ((1 << 21) - 1):
        raise ValueError(f"{phys:#x} is not 2 MiB aligned")
    return phys | P | RW | PS | ((PCD | PWT) if uncached else 0)


def table_entry(next_table: int) -> int:
    """A PML4E or PDPTE referencing a next-level table (tables 4-15, 4-16)."""
    if next_table & 0xFFF:
        raise ValueError(f"{next_table:#x} is not 4 KiB aligned")
    return next_table | P | RW


def build_identity_map(arena: Arena, gib: int = 4) -> int:
    """Identity-map [0, gib GiB) with 2 MiB pages; return the PML4 physical address (for CR3)."""
    if not 1 <= gib <= 512:
        raise ValueError("identity map size must be 1..512 GiB")
    pml4 = arena.alloc(4096, 4096, name="pml4")
    pdpt = arena.alloc(4096, 4096, name="pdpt")
    pds = [arena.alloc(4096, 4096) for _ in range(gib)]
    arena.write(pml4, struct.pack("<Q", table_entry(pdpt)))
    arena.write(pdpt, struct.pack(f"<{gib}Q", *(table_entry(pd) for pd in pds)))
    for g, pd in enumerate(pds):
        entries = []
        for i in range(512):
            phys = (g << 30) | (i << 21)
            entries.append(pde_2m(phys, uncached=phys >= UNCACHED_FROM))
        arena.write(pd, struct.pack("<512Q", *entries))
    return pml4
