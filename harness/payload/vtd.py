"""VT-d structures built in Python, and the engine steps that program a DMAR unit.

Bit layouts follow the Intel VT-d specification (rev. 4.x): root and context entries (9.1, 9.3),
second-level paging entries (9.8), interrupt-remapping table entries (9.10), invalidation
descriptors (6.5.2), and the remapping registers (11.4).  Builders return plain integers/bytes so
they are unit-testable without booting anything; ``SecondLevel`` and ``DmarTables`` place their
tables in a scenario's arena at fixed physical addresses.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from .arena import Arena
from .pci import bdf  # noqa: F401  (source-ids are PCI routing ids, VT-d 3.4.1)
from .records import Kind
from .steps import VAR_DMAR0, StepList

# ---------------------------------------------------------------------------------------------
# Remapping registers (VT-d 11.4, table 11-1).  IOTLB and fault-recording registers sit at
# offsets the unit reports (ECAP.IRO, CAP.FRO); the routines below read them at run time.
REG_VER = 0x00
REG_CAP = 0x08
REG_ECAP = 0x10
REG_GCMD = 0x18
REG_GSTS = 0x1C
REG_RTADDR = 0x20
REG_CCMD = 0x28
REG_FSTS = 0x34
REG_FECTL = 0x38
REG_FEDATA = 0x3C
REG_FEADDR = 0x40
REG_FEUADDR = 0x44
REG_IQH = 0x80
REG_IQT = 0x88
REG_IQA = 0x90
REG_ICS = 0x9C
REG_IRTA = 0xB8


class Gcmd(enum.IntFlag):
    """GCMD_REG / GSTS_REG bits (11.4.4, 11.4.5); GSTS reports each at the same position."""

    CFI = 1 << 23     # compatibility format interrupts allowed (GSTS.CFIS)
    SIRTP = 1 << 24   # set interrupt remap table pointer (GSTS.IRTPS)
    IRE = 1 << 25     # interrupt remapping enable (GSTS.IRES)
    QIE = 1 << 26     # queued invalidation enable (GSTS.QIES)
    WBF = 1 << 27
    EAFL = 1 << 28
    SFL = 1 << 29
    SRTP = 1 << 30    # set root table pointer (GSTS.RTPS)
    TE = 1 << 31      # translation enable (GSTS.TES)


GCMD_PERSISTENT = Gcmd.TE | Gcmd.QIE | Gcmd.IRE | Gcmd.CFI   # the rest are one-shot commands

# FSTS_REG (11.4.6.1)
FSTS_PFO = 1 << 0     # primary fault overflow (RW1C)
FSTS_PPF = 1 << 1     # primary pending fault (RO: some FRCD.F is set)
FSTS_IQE = 1 << 4     # invalidation queue error (RW1C)
FSTS_FRI_SHIFT = 8    # fault record index, bits 15:8
# FECTL_REG (11.4.6.2)
FECTL_IM = 1 << 31
FECTL_IP = 1 << 30
# ICS_REG (11.4.9.4)
ICS_IWC = 1 << 0

# Fault reasons (VT-d appendix A, table A-1 for DMA remapping; 0x20.. interrupt remapping).
class FaultReason(enum.IntEnum):
    ROOT_NOT_PRESENT = 0x1
    CONTEXT_NOT_PRESENT = 0x2
    CONTEXT_INVALID = 0x3
    ADDR_BEYOND_AW = 0x4
    WRITE = 0x5
    READ = 0x6
    PTE_INVALID = 0x7
    ROOT_TABLE_INVALID = 0x8
    CONTEXT_TABLE_INVALID = 0x9
    ROOT_RESERVED = 0xA
    CONTEXT_RESERVED = 0xB
    PTE_RESERVED = 0xC
    IR_RESERVED_REQ = 0x20
    IR_INDEX_OVER = 0x21
    IR_NOT_PRESENT = 0x22
    IR_TABLE_INVALID = 0x23
    IR_RESERVED = 0x24
    IR_COMPAT_BLOCKED = 0x25
    IR_SID_MISMATCH = 0x26


# ---------------------------------------------------------------------------------------------
# Root and context entries (legacy mode, 9.1 and 9.3).

class TT(enum.IntEnum):
    """Context-entry translation type, bits 3:2 of the low qword (9.3)."""

    SECOND_LEVEL = 0b00      # untranslated requests through second-level tables
    DEVICE_TLB = 0b01        # as 00, and translated requests / ATS
    PASS_THROUGH = 0b10      # untranslated requests pass through (needs ECAP.PT)
    RESERVED = 0b11


# Address width field (AW, high qword bits 2:0): 1 = 39-bit / 3-level, 2 = 48-bit / 4-level.
AW_FOR_LEVELS = {3: 1, 4: 2, 5: 3}
ADDR_BITS_FOR_LEVELS = {3: 39, 4: 48, 5: 57}
ENTRY_ADDR_MASK = 0x000F_FFFF_FFFF_F000   # bits 51:12 of pointers and page frames


def root_entry(context_table: int, present: bool = True) -> tuple[int, int]:
    """(lo, hi) of a root entry: bit 0 P, bits 63:12 context-table pointer (9.1)."""
    _aligned(context_table, 4096, "context table")
    return (context_table | int(present), 0)


def context_entry(slptptr: int, domain_id: int, levels: int = 3, tt: TT = TT.SECOND_LEVEL,
                  present: bool = True, fpd: bool = False, aw: int | None = None) -> tuple[int, int]:
    """(lo, hi) of a context entry (9.3).

    lo: bit 0 P, bit 1 FPD, bits 3:2 TT, bits 63:12 second-level page-table pointer.
    hi: bits 2:0 AW, bits 23:8 domain identifier.  ``aw`` overrides the width derived from
    ``levels`` (to program an unsupported one on purpose).
    """
    _aligned(slptptr, 4096, "second-level table")
    if not 0 <= domain_id < 1 << 16:
        raise ValueError(f"domain id {domain_id} does not fit 16 bits")
    aw_field = AW_FOR_LEVELS[levels] if aw is None else aw
    lo = slptptr | int(present) | (int(fpd) << 1) | (int(tt) << 2)
    hi = (aw_field & 7) | (domain_id << 8)
    return lo, hi


# ---------------------------------------------------------------------------------------------
# Second-level paging entries (9.8): bit 0 R, bit 1 W, bit 7 PS (in PDPE/PDE: maps a page),
# bits 51:12 address.  Table entries in QEMU and on hardware use R/W to gate the walk too.
SL_R = 1 << 0
SL_W = 1 << 1
SL_X = 1 << 2
SL_PS = 1 << 7
SL_SNP = 1 << 11

PAGE_4K = 1 << 12
PAGE_2M = 1 << 21
PAGE_1G = 1 << 30
_LEVEL_OF_SIZE = {PAGE_4K: 1, PAGE_2M: 2, PAGE_1G: 3}


def sl_entry(addr: int, read: bool = True, write: bool = True, large: bool = False) -> int:
    """A second-level entry pointing at ``addr`` (a table, or a page when ``large``/leaf)."""
    _aligned(addr, 4096, "second-level target")
    return addr | (SL_R if read else 0) | (SL_W if write else 0) | (SL_PS if large else 0)


@dataclass
class SecondLevel:
    """A domain's second-level page tables (3 or 4 levels), built in Python, placed in the arena.

    Table entries get R+W so that leaf permissions alone decide access.  ``entry_address`` gives
    the physical address of any entry so that steps can rewrite it at run time.
    """

    arena: Arena
    levels: int = 3
    tables: dict[int, list[int]] = field(default_factory=dict)   # table address -> 512 entries

    def __post_init__(self) -> None:
        if self.levels not in (3, 4):
            raise ValueError(f"{self.levels}-level second-level tables are not supported here")
        self.root = self._new_table()

    @property
    def address_width(self) -> int:
        return ADDR_BITS_FOR_LEVELS[self.levels]

    def _new_table(self) -> int:
        addr = self.arena.alloc(4096, 4096)
        self.tables[addr] = [0] * 512
        self._flush(addr)
        return addr

    def _flush(self, table: int) -> None:
        self.arena.write(table, struct.pack("<512Q", *self.tables[table]))

    @staticmethod
    def index(iova: int, level: int) -> int:
        """The table index ``iova`` selects at ``level`` (1 = PTE, 2 = PDE, 3 = PDPE, 4 = PML4E)."""
        return (iova >> (12 + 9 * (level - 1))) & 0x1FF

    def _walk_to(self, iova: int, level: int, create: bool) -> int:
        """The table at ``level`` that holds the entry for ``iova`` (created on the way)."""
        if iova >> self.address_width:
            raise ValueError(f"IOVA {iova:#x} is beyond the {self.address_width}-bit domain")
        table = self.root
        for lv in range(self.levels, level, -1):
            i = self.index(iova, lv)
            e = self.tables[table][i]
            if e & SL_PS:
                raise ValueError(f"IOVA {iova:#x} is already mapped by a large page at level {lv}")
            if not e & (SL_R | SL_W):
                if not create:
                    raise KeyError(f"no level-{lv - 1} table for IOVA {iova:#x}")
                nxt = self._new_table()
                self.tables[table][i] = sl_entry(nxt)
                self._flush(table)
                e = self.tables[table][i]
            table = e & ENTRY_ADDR_MASK
        return table

    def map(self, iova: int, phys: int, size: int = PAGE_4K, read: bool = True, write: bool = True) -> int:
        """Map one page of ``size`` (4 KiB, 2 MiB or 1 GiB); return the leaf entry's address."""
        if size not in _LEVEL_OF_SIZE:
            raise ValueError(f"page size {size:#x} is not 4 KiB, 2 MiB or 1 GiB")
        _aligned(iova, size, "IOVA")
        _aligned(phys, size, "physical page")
        level = _LEVEL_OF_SIZE[size]
        table = self._walk_to(iova, level, create=True)
        i = self.index(iova, level)
        self.tables[table][i] = sl_entry(phys, read, write, large=level > 1)
        self._flush(table)
        return table + 8 * i

    def map_range(self, iova: int, phys: int, length: int, size: int = PAGE_4K, **perm) -> None:
        for off in range(0, length, size):
            self.map(iova + off, phys + off, size, **perm)

    def set_raw(self, iova: int, level: int, value: int) -> int:
        """Store ``value`` verbatim in the level-``level`` entry for ``iova``; return its address."""
        table = self._walk_to(iova, level, create=True)
        i = self.index(iova, level)
        self.tables[table][i] = value
        self._flush(table)
        return table + 8 * i

    def entry_address(self, iova: int, level: int = 1) -> int:
        table = self._walk_to(iova, level, create=False)
        return table + 8 * self.index(iova, level)

    def translate(self, iova: int, write: bool = False) -> int | None:
        """Walk the tables as the hardware would (9.8); None where access is not permitted."""
        table = self.root
        for lv in range(self.levels, 0, -1):
            e = self.tables.get(table, [0] * 512)[self.index(iova, lv)]
            if not e & (SL_W if write else SL_R):
                return None
            if lv == 1 or e & SL_PS:
                size = 1 << (12 + 9 * (lv - 1))
                return (e & ENTRY_ADDR_MASK & ~(size - 1)) | (iova & (size - 1))
            table = e & ENTRY_ADDR_MASK
        return None


class DmarTables:
    """One root table with per-bus context tables, placed in the arena (9.1, 9.3)."""

    def __init__(self, arena: Arena):
        self.arena = arena
        self.root = arena.alloc(4096, 4096)
        self.context_tables: dict[int, int] = {}

    def context_table(self, bus: int, present: bool = True) -> int:
        if bus not in self.context_tables:
            ct = self.arena.alloc(4096, 4096)
            self.context_tables[bus] = ct
            self.set_root(bus, root_entry(ct, present))
        return self.context_tables[bus]

    def set_root(self, bus: int, entry: tuple[int, int]) -> int:
        addr = self.root + 16 * bus
        self.arena.write(addr, struct.pack("<QQ", *entry))
        return addr

    def set_context(self, bus: int, devfn: int, entry: tuple[int, int]) -> int:
        """Store a context entry; return its physical address."""
        addr = self.context_table(bus) + 16 * devfn
        self.arena.write(addr, struct.pack("<QQ", *entry))
        return addr

    def attach(self, bdf: int, domain: SecondLevel, domain_id: int, **kw) -> int:
        """Point ``bdf`` at ``domain`` (second-level translation); return the entry's address."""
        return self.set_context(bdf >> 8, bdf & 0xFF, context_entry(domain.root, domain_id, domain.levels, **kw))

    def pass_through(self, bdf: int, domain_id: int, levels: int = 3) -> int:
        """A pass-through context entry: the SLPTPTR is ignored (9.3), point it at a zero page."""
        zero = self.arena.alloc(4096, 4096)
        return self.set_context(bdf >> 8, bdf & 0xFF, context_entry(zero, domain_id, levels, tt=TT.PASS_THROUGH))


# ---------------------------------------------------------------------------------------------
# Interrupt remapping (9.10, 5.1.2.2).

def irte(vector: int, dest: int, present: bool = True, fpd: bool = False, dest_logical: bool = False,
         redir_hint: bool = False, level: bool = False, delivery_mode: int = 0,
         sid: int = 0, sq: int = 0, svt: int = 0, x2apic: bool = False, reserved: int = 0) -> tuple[int, int]:
    """(lo, hi) of a remapped-format IRTE (9.10).

    lo: bit 0 P, 1 FPD, 2 DM, 3 RH, 4 TM, 7:5 DLM, 15 IM (0: remapped), 23:16 vector,
    63:32 destination (xAPIC: APIC ID in bits 47:40).  hi: 79:64 SID, 81:80 SQ, 83:82 SVT.
    ``reserved`` is OR-ed into lo as is (to program reserved bits on purpose).
    """
    dest_field = dest if x2apic else (dest & 0xFF) << 8
    lo = (int(present) | int(fpd) << 1 | int(dest_logical) << 2 | int(redir_hint) << 3
          | int(level) << 4 | (delivery_mode & 7) << 5 | (vector & 0xFF) << 16 | dest_field << 32 | reserved)
    hi = (sid & 0xFFFF) | (sq & 3) << 16 | (svt & 3) << 18
    return lo, hi


def irta(table: int, entries: int, eime: bool = False) -> int:
    """IRTA_REG (11.4.8.1): base 63:12, EIME bit 11, S bits 3:0 (2^(S+1) entries)."""
    _aligned(table, 4096, "interrupt remapping table")
    s = entries.bit_length() - 2
    if entries < 2 or 1 << (s + 1) != entries or s > 15:
        raise ValueError(f"{entries} entries is not a power of two in 2..65536")
    return table | int(eime) << 11 | s


def remappable_msi(handle: int, subhandle: int | None = None) -> tuple[int, int]:
    """(address, data) of a remappable-format MSI (5.1.5.2): address bit 4 = 1 (interrupt
    format), bits 19:5 handle[14:0], bit 2 handle[15], bit 3 SHV; data = subhandle."""
    addr = 0xFEE0_0000 | (handle & 0x7FFF) << 5 | (handle >> 15 & 1) << 2 | 1 << 4
    if subhandle is not None:
        addr |= 1 << 3
    return addr, (subhandle or 0)


def compat_msi(vector: int, dest: int = 0) -> tuple[int, int]:
    """(address, data) of a compatibility-format MSI to APIC ``dest``, fixed, edge (SDM 11.11)."""
    return 0xFEE0_0000 | (dest & 0xFF) << 12, vector & 0xFF


# ---------------------------------------------------------------------------------------------
# Invalidation descriptors (6.5.2; 128-bit legacy format), as (lo, hi).

def cc_inv_desc(granularity: int = 1, domain_id: int = 0, sid: int = 0, fm: int = 0) -> tuple[int, int]:
    """Context-cache invalidate (6.5.2.1): type 1, G 5:4 (1 global, 2 domain, 3 device), DID 31:16,
    SID 47:32, FM 49:48."""
    return 0x1 | (granularity & 3) << 4 | domain_id << 16 | sid << 32 | (fm & 3) << 48, 0


def iotlb_inv_desc(granularity: int = 1, domain_id: int = 0, addr: int = 0, am: int = 0,
                   ih: bool = False, dr: bool = True, dw: bool = True) -> tuple[int, int]:
    """IOTLB invalidate (6.5.2.2): type 2, G 5:4 (1 global, 2 domain, 3 page), DW 6, DR 7,
    DID 31:16; hi: AM 5:0, IH 6, ADDR 63:12."""
    lo = 0x2 | (granularity & 3) << 4 | int(dw) << 6 | int(dr) << 7 | domain_id << 16
    return lo, (addr & ~0xFFF) | int(ih) << 6 | (am & 0x3F)


def iec_inv_desc(index: int | None = None, im: int = 0) -> tuple[int, int]:
    """Interrupt-entry-cache invalidate (6.5.2.7): type 4, G bit 4 (0 global, 1 index-selective),
    IM 31:27, IIDX 47:32."""
    if index is None:
        return 0x4, 0
    return 0x4 | 1 << 4 | (im & 0x1F) << 27 | index << 32, 0


def wait_desc(status_addr: int, status_data: int, interrupt: bool = False, fence: bool = True) -> tuple[int, int]:
    """Invalidation wait (6.5.2.8): type 5, IF 4, SW 5, FN 6, status data 63:32; hi: status
    address 63:2 (dword aligned)."""
    _aligned(status_addr, 4, "wait status address")
    return 0x5 | int(interrupt) << 4 | 1 << 5 | int(fence) << 6 | (status_data & 0xFFFF_FFFF) << 32, status_addr


def desc_bytes(*descs: tuple[int, int]) -> bytes:
    return b"".join(struct.pack("<QQ", lo, hi) for lo, hi in descs)


# Register-based invalidation commands (11.4.4.2 CCMD, 11.4.8.1 IOTLB_REG).

def ccmd(granularity: int = 1, domain_id: int = 0, sid: int = 0, fm: int = 0) -> int:
    """CCMD_REG: ICC 63, CIRG 62:61 (1 global, 2 domain, 3 device), FM 33:32, SID 31:16, DID 15:0."""
    return 1 << 63 | (granularity & 3) << 61 | (fm & 3) << 32 | sid << 16 | domain_id


def iotlb_cmd(granularity: int = 1, domain_id: int = 0, dr: bool = True, dw: bool = True) -> int:
    """IOTLB_REG: IVT 63, IIRG 61:60 (1 global, 2 domain, 3 page), DR 49, DW 48, DID 47:32."""
    return 1 << 63 | (granularity & 3) << 60 | int(dr) << 49 | int(dw) << 48 | domain_id << 32


def iva(addr: int, am: int = 0, ih: bool = False) -> int:
    """IVA_REG: ADDR 63:12, IH 6, AM 5:0."""
    return (addr & ~0xFFF) | int(ih) << 6 | (am & 0x3F)


def _aligned(v: int, align: int, what: str) -> None:
    if v % align:
        raise ValueError(f"{what} {v:#x} is not {align:#x}-aligned")


# ---------------------------------------------------------------------------------------------
# Records this module adds to the protocol (kinds 0x40..0x4f are reserved for VT-d work).

class VtdKind(enum.IntEnum):
    FRCD = 0x40        # unit base, index, lo, hi
    FSTS = 0x41        # unit base, FSTS, FECTL
    TIMEOUT = 0x42     # what (see WaitWhat), last value read
    QI_WAIT = 0x44     # status address, value seen, iterations


class WaitWhat(enum.IntEnum):
    GSTS = 1
    CCMD = 2
    IOTLB = 3
    QI = 4
    IRQ = 5


assert all(Kind.USER <= k <= Kind.USER + 0xF for k in VtdKind)

POLL_LIMIT = 1_000_000

# Scenario routines (System V ABI: rdi, rsi, rdx; rax returned).  Each takes the engine variable
# that holds the unit's register base first.  A wait that does not complete (POLL_LIMIT reads or
# the engine's POLL_TSC_BOUND ticks) emits TIMEOUT and ends the run with status POLL_TIMEOUT: an
# unbounded wait is never possible.
VTD_ASM = rf"""
.set VTD_POLL_LIMIT, {POLL_LIMIT}
.set K_VTD_FRCD, {int(VtdKind.FRCD)}
.set K_VTD_FSTS, {int(VtdKind.FSTS)}
.set K_VTD_TIMEOUT, {int(VtdKind.TIMEOUT)}
.set K_VTD_QI_WAIT, {int(VtdKind.QI_WAIT)}

# vtd_timeout(edi = what, rsi = last value): TIMEOUT record, then end the run.
vtd_timeout:
    lea rax, [rip + vtd_rec]
    mov [rax], rdi
    mov [rax + 8], rsi
    mov edi, K_VTD_TIMEOUT
    call rec_begin
    mov rdi, [rip + vtd_rec]
    call rec_u64
    mov rdi, [rip + vtd_rec + 8]
    call rec_u64
    call rec_end
    mov edi, 3                          # EndStatus.POLL_TIMEOUT
    jmp finish

# vtd_base(edi = variable) -> r8 = unit register base
vtd_base:
    lea rax, [rip + vars]
    mov r8, [rax + rdi*8]
    ret

# vtd_gcmd(rdi = var, esi = bits to set, edx = bits to clear) -> rax = GSTS (VT-d 11.4.4):
# keep the persistent bits GSTS reports, apply the change, wait until GSTS shows it.
.globl vtd_gcmd
vtd_gcmd:
    call vtd_base
    mov eax, [r8 + 0x1C]
    and eax, {int(GCMD_PERSISTENT):#x}
    or eax, esi
    not edx
    and eax, edx
    mov [r8 + 0x18], eax
    mov r9d, eax
    and r9d, {int(GCMD_PERSISTENT):#x}   # expected persistent status
    mov r10d, {int(GCMD_PERSISTENT):#x}  # mask
    test esi, {int(Gcmd.SRTP):#x}
    jz 1f
    or r9d, {int(Gcmd.SRTP):#x}
    or r10d, {int(Gcmd.SRTP):#x}
1:  test esi, {int(Gcmd.SIRTP):#x}
    jz 2f
    or r9d, {int(Gcmd.SIRTP):#x}
    or r10d, {int(Gcmd.SIRTP):#x}
2:  mov ecx, VTD_POLL_LIMIT
    call poll_begin
3:  mov eax, [r8 + 0x1C]
    mov r11d, eax
    and r11d, r10d
    cmp r11d, r9d
    je 4f
    call poll_expired
    jae 5f
    pause
    dec ecx
    jnz 3b
5:
    mov edi, {int(WaitWhat.GSTS)}
    mov esi, eax
    jmp vtd_timeout
4:  ret

# vtd_ccmd(rdi = var, rsi = CCMD value) -> rax = CCMD when ICC cleared (11.4.4.2)
.globl vtd_ccmd
vtd_ccmd:
    call vtd_base
    mov [r8 + 0x28], rsi
    mov ecx, VTD_POLL_LIMIT
    call poll_begin
1:  mov rax, [r8 + 0x28]
    bt rax, 63
    jnc 2f
    call poll_expired
    jae 3f
    pause
    dec ecx
    jnz 1b
3:
    mov edi, {int(WaitWhat.CCMD)}
    mov rsi, rax
    jmp vtd_timeout
2:  ret

# vtd_iotlb(rdi = var, rsi = IOTLB_REG value, rdx = IVA_REG value) -> rax = IOTLB_REG when IVT
# cleared (11.4.8); the registers sit at ECAP.IRO * 16.
.globl vtd_iotlb
vtd_iotlb:
    call vtd_base
    mov rax, [r8 + 0x10]
    shr rax, 8
    and eax, 0x3FF
    shl eax, 4
    add r8, rax
    mov [r8], rdx
    mov [r8 + 8], rsi
    mov ecx, VTD_POLL_LIMIT
    call poll_begin
1:  mov rax, [r8 + 8]
    bt rax, 63
    jnc 2f
    call poll_expired
    jae 3f
    pause
    dec ecx
    jnz 1b
3:
    mov edi, {int(WaitWhat.IOTLB)}
    mov rsi, rax
    jmp vtd_timeout
2:  ret

# vtd_faults(rdi = var) -> rax = FSTS.  Emits FSTS (with FECTL), then one FRCD record per fault
# recording register (CAP.FRO * 16, CAP.NFR + 1 of them; 11.4.14).
.globl vtd_faults
vtd_faults:
    push rbx
    push r12
    push r13
    call vtd_base
    mov r12, r8
    mov edi, K_VTD_FSTS
    call rec_begin
    mov rdi, r12
    call rec_u64
    mov edi, [r12 + 0x34]
    call rec_u64
    mov edi, [r12 + 0x38]
    call rec_u64
    call rec_end
    mov rax, [r12 + 0x08]
    mov r13, rax
    shr r13, 40
    and r13d, 0xFF
    inc r13d                            # number of fault recording registers
    shr rax, 24
    and eax, 0x3FF
    shl eax, 4
    lea rbx, [r12 + rax]                # first FRCD
    xor ecx, ecx
1:  cmp ecx, r13d
    jae 2f
    mov edi, K_VTD_FRCD
    call rec_begin
    mov rdi, r12
    call rec_u64
    mov edi, ecx
    call rec_u64
    mov rdi, [rbx]
    call rec_u64
    mov rdi, [rbx + 8]
    call rec_u64
    call rec_end
    add rbx, 16
    inc ecx
    jmp 1b
2:  mov eax, [r12 + 0x34]
    pop r13
    pop r12
    pop rbx
    ret

# vtd_clear_faults(rdi = var): write 1 to every set FRCD.F (bit 127, RW1C), then clear the RW1C
# bits of FSTS (11.4.6.1, 11.4.14) -> rax = FSTS afterwards.
.globl vtd_clear_faults
vtd_clear_faults:
    call vtd_base
    mov rax, [r8 + 0x08]
    mov r9, rax
    shr r9, 40
    and r9d, 0xFF
    inc r9d
    shr rax, 24
    and eax, 0x3FF
    shl eax, 4
    lea r10, [r8 + rax]
    xor ecx, ecx
1:  cmp ecx, r9d
    jae 2f
    mov eax, [r10 + 12]
    bt eax, 31
    jnc 3f
    mov dword ptr [r10 + 12], 0x80000000
3:  add r10, 16
    inc ecx
    jmp 1b
2:  mov eax, [r8 + 0x34]
    and eax, 0x7D                       # PFO, AFO, APF, IQE, ICE, ITE
    mov [r8 + 0x34], eax
    mov eax, [r8 + 0x34]
    ret

# vtd_qi_submit(rdi = var, rsi = new tail index (descriptors), rdx = status address to await,
# 0 for none) -> rax = value found there.  Clears the status dword (so a value left by an earlier
# wait cannot satisfy this one), writes IQT, then waits until the invalidation-wait status at rdx
# becomes non-zero or the queue reports an error (FSTS.IQE); 6.5.2.8, 11.4.9.
.globl vtd_qi_submit
vtd_qi_submit:
    push rbx
    call vtd_base
    test rdx, rdx
    jz 0f
    mov dword ptr [rdx], 0
    mfence
0:  shl rsi, 4
    mov [r8 + 0x88], rsi
    xor eax, eax
    test rdx, rdx
    jz 3f
    xor ebx, ebx
    call poll_begin
1:  mov eax, [rdx]
    test eax, eax
    jnz 2f
    mov ecx, [r8 + 0x34]
    test ecx, {FSTS_IQE}
    jnz 2f
    inc ebx
    cmp ebx, VTD_POLL_LIMIT
    jae 4f
    call poll_expired
    jae 4f
    pause
    jmp 1b
2:  push rax
    mov [rip + vtd_rec], rdx
    mov edi, K_VTD_QI_WAIT
    call rec_begin
    mov rdi, [rip + vtd_rec]
    call rec_u64
    mov edi, eax
    call rec_u64
    mov edi, ebx
    call rec_u64
    call rec_end
    pop rax
3:  pop rbx
    ret
4:  mov edi, {int(WaitWhat.QI)}
    mov esi, eax
    jmp vtd_timeout

.section .bss
.balign 8
vtd_rec: .skip 32
.section .text
"""


# ---------------------------------------------------------------------------------------------
# Steps that program a unit.  Every helper appends to ``steps`` and returns the index of the step
# whose record tells the outcome.

@dataclass
class Unit:
    """Step builders for one DMAR unit whose register base is in engine variable ``var``."""

    steps: StepList
    var: int = VAR_DMAR0

    def write32(self, reg: int, value: int, **kw) -> int:
        return self.steps.mmio_write(reg, value, size=4, base=self.var, **kw)

    def write64(self, reg: int, value: int, **kw) -> int:
        return self.steps.mmio_write(reg, value, size=8, base=self.var, **kw)

    def read32(self, reg: int, **kw) -> int:
        return self.steps.mmio_read(reg, size=4, base=self.var, **kw)

    def read64(self, reg: int, **kw) -> int:
        return self.steps.mmio_read(reg, size=8, base=self.var, **kw)

    def gcmd(self, set_bits: int = 0, clear_bits: int = 0) -> int:
        return self.steps.call("vtd_gcmd", self.var, int(set_bits), int(clear_bits))

    def set_root_table(self, root: int) -> int:
        """RTADDR (legacy mode, TTM 00), then GCMD.SRTP and wait for GSTS.RTPS (10.4.6)."""
        self.write64(REG_RTADDR, root)
        return self.gcmd(Gcmd.SRTP)

    def enable_translation(self) -> int:
        return self.gcmd(Gcmd.TE)

    def disable_translation(self) -> int:
        return self.gcmd(0, Gcmd.TE)

    def invalidate_context(self, granularity: int = 1, domain_id: int = 0, sid: int = 0) -> int:
        return self.steps.call("vtd_ccmd", self.var, ccmd(granularity, domain_id, sid))

    def invalidate_iotlb(self, granularity: int = 1, domain_id: int = 0, addr: int = 0, am: int = 0) -> int:
        return self.steps.call("vtd_iotlb", self.var, iotlb_cmd(granularity, domain_id), iva(addr, am))

    def invalidate_all(self) -> None:
        self.invalidate_context(1)
        self.invalidate_iotlb(1)

    def setup_translation(self, root: int) -> None:
        """Root table pointer, global invalidations, translation enable."""
        self.set_root_table(root)
        self.invalidate_all()
        self.enable_translation()

    def faults(self) -> int:
        """Emit FSTS and every FRCD (read them with observe.vtd.faults)."""
        return self.steps.call("vtd_faults", self.var)

    def clear_faults(self) -> int:
        return self.steps.call("vtd_clear_faults", self.var)

    def fault_event(self, vector: int, dest: int = 0, masked: bool = False) -> None:
        """FEDATA/FEADDR/FEUADDR, then FECTL.IM (11.4.6.2-11.4.6.5)."""
        addr, data = compat_msi(vector, dest)
        self.write32(REG_FEDATA, data)
        self.write32(REG_FEADDR, addr)
        self.write32(REG_FEUADDR, 0)
        self.write32(REG_FECTL, FECTL_IM if masked else 0)

    def setup_qi(self, queue: int, pages_log2: int = 0) -> int:
        """IQA (base, QS), IQT = 0, then GCMD.QIE (6.5.2, 11.4.9)."""
        _aligned(queue, 4096, "invalidation queue")
        self.write64(REG_IQT, 0)
        self.write64(REG_IQA, queue | pages_log2)
        return self.gcmd(Gcmd.QIE)

    def setup_intremap(self, table: int, entries: int, cfi: bool = False) -> None:
        """IRTA, GCMD.SIRTP, then IRE (and CFI) (5.1, 11.4.8.1)."""
        self.write64(REG_IRTA, irta(table, entries))
        self.gcmd(Gcmd.SIRTP)
        self.gcmd(Gcmd.IRE | (Gcmd.CFI if cfi else 0))


# Status data of successive invalidation waits: distinct per submit, so a test can tell which wait
# wrote (a tag in the high half, the submit's number in the low half; never 0, which means "not yet").
WAIT_DATA_BASE = 0x5157_0000


class InvQueue:
    """An invalidation queue in the arena; descriptors are placed at build time, and ``submit``
    advances the tail at run time (so steps decide when each batch is processed)."""

    def __init__(self, arena: Arena, unit: Unit, entries: int = 256):
        self.arena = arena
        self.unit = unit
        self.base = arena.alloc(4096, 4096)
        self.tail = 0
        self.capacity = entries
        self.status_data: dict[int, int] = {}     # submit step -> the status data its wait writes

    def setup(self) -> int:
        return self.unit.setup_qi(self.base)

    def submit(self, *descs: tuple[int, int], wait_status: int | None = None,
               status_data: int | None = None) -> int:
        """Queue ``descs`` (plus an invalidation wait when ``wait_status``, the status address, is
        given) and move the tail; returns the step, whose value is what the wait wrote.  The wait
        writes ``status_data`` (default: distinct per submit, see ``status_data[step]``)."""
        batch = list(descs)
        data = status_data if status_data is not None else WAIT_DATA_BASE + len(self.status_data) + 1
        if wait_status is not None:
            if not 0 < data < 1 << 32:
                raise ValueError(f"wait status data {data:#x} must be a non-zero dword")
            batch.append(wait_desc(wait_status, data))
        if self.tail + len(batch) > self.capacity:
            raise ValueError("invalidation queue full (no wrap-around in one scenario)")
        self.arena.write(self.base + 16 * self.tail, desc_bytes(*batch))
        self.tail += len(batch)
        step = self.unit.steps.call("vtd_qi_submit", self.unit.var, self.tail, wait_status or 0)
        self.status_data[step] = data if wait_status is not None else 0
        return step
