"""ACPI tables for the platform checks: a payload routine that reports them, and table builders.

The routine ``acpi_dump`` finds the RSDP with ``acpi_find_rsdp`` (``RsdpFrom``): where the caller
names it, else where the boot command line says (``acpi_rsdp=<hex>``, Linux's own parameter, in
the multiboot command line: on UEFI firmware there is no RSDP in the BIOS areas, and a kexec or
GRUB boot method passes the address Linux found in /sys/firmware/efi/systab), else by the search
of ACPI 6.5, 5.2.5.1 (the first KiB of the EBDA, then 0xE0000-0xFFFFF, on 16-byte boundaries).
A named address is used only if an RSDP is there (signature and checksum; not necessarily
16-byte aligned: that rule is the BIOS-area search's).  The engine's boot probe finds the RSDP
with the same routine (``RSDP_FIND_ASM`` is part of the engine).  ``acpi_dump`` then walks the
XSDT (5.2.8; 64-bit entries) or, before ACPI 2.0 / without an XSDT, the RSDT (5.2.7), and reports:

* ACPI_TABLE for the RSDP, the root table and every table the root lists: its address, signature,
  declared length and how many bytes follow as ACPI_BYTES.  The bytes of the RSDP, the root table
  and the tables named in ``DUMPED`` are sent; other tables are only listed.  A table beyond the
  payload's identity map (4 GiB) is listed as unreachable.
* ACPI_DRHD for every DMA-remapping hardware unit definition of a dumped DMAR (VT-d 8.3): its
  register base and, when the base is reachable, VER_REG, CAP_REG and ECAP_REG read there
  (VT-d 11.4.1-11.4.3), so a check can see whether a unit answers at that address.
* ACPI_HPET for every dumped HPET table: its event timer block's capabilities and which timers
  can deliver through the FSB, i.e. by MSI (IA-PC HPET 1.0a, 2.3.4, 2.3.8), since an
  MSI-capable HPET needs a DMAR device scope under interrupt remapping (VT-d 8.3.1).
* ACPI_DONE with the number of tables reported, where the RSDP and root table were and how the
  RSDP was found.

The builders (``sdt``, ``dmar``, ``drhd``, ``device_scope``, ``madt``, ...) make tables byte for byte
as the ACPI and VT-d specifications lay them out: the unit tests and the deliberately broken tables
QEMU loads with ``-acpitable`` are made with them.
"""

from __future__ import annotations

import enum
import struct
from typing import TYPE_CHECKING, Iterable, Sequence

from .records import Kind

if TYPE_CHECKING:
    from .image import Scenario


class AcpiKind(enum.IntEnum):
    """Records of ``acpi_dump``.  Kinds 0x60..0x67 are reserved for ACPI (0x40..0x4f are VT-d's,
    vtd.VtdKind; 0x50..0x5f VMX's, vmx.vmm.Kind)."""

    TABLE = 0x60   # table number, address, signature (u32 LE), declared length, bytes sent, source, reachable
    BYTES = 0x61   # table number, offset, up to 10 qwords of the table (little-endian)
    DRHD = 0x62    # table number, structure offset, register base, VER, CAP, ECAP, registers read (1/0)
    DONE = 0x63    # tables reported, RSDP address (0: not found), root address, root entry size, RsdpFrom
    HPET = 0x64    # table number, event timer block base, GCAP_ID, FSB-capable timers (bit n), registers read


assert all(Kind.USER <= k < Kind.EXCEPTION for k in AcpiKind)


class Source(enum.IntEnum):
    """Where an ACPI_TABLE record's table was found (its ``source`` field)."""

    RSDP = 0
    ROOT = 1        # the RSDT or XSDT the RSDP points to
    ENTRY = 2       # an entry of the root table


class RsdpFrom(enum.IntEnum):
    """How ``acpi_find_rsdp`` found the RSDP (ACPI_DONE's last field)."""

    NOT_FOUND = 0
    CALLER = 1       # the address the caller passed
    CMDLINE = 2      # acpi_rsdp=<hex> on the multiboot command line (Multiboot 0.6.96, 3.3: flags bit 2)
    EBDA = 3         # the first KiB of the extended BIOS data area
    BIOS = 4         # 0xE0000-0xFFFFF


CMDLINE_KEY = "acpi_rsdp="
CMDLINE_LIMIT = 4096           # command line bytes searched (a bound, not a limit of any boot loader)
BYTES_PER_RECORD = 80          # ten qwords
MAX_TABLE = 0x1_0000           # at most this many bytes of a table are sent (a DMAR is a few KiB)
REACHABLE_BELOW = (4 << 30) - 0x1000   # the identity map ends at 4 GiB; keep reads clear of it
DUMPED = ("DMAR", "APIC", "HPET")      # tables whose bytes are sent (APIC is the MADT)


def signature_value(sig: str) -> int:
    """The dword a 4-character signature reads as (ACPI 5.2.6: ASCII, first character lowest)."""
    raw = sig.encode("ascii")
    if len(raw) != 4:
        raise ValueError(f"ACPI signature {sig!r}: expected 4 ASCII characters")
    return int.from_bytes(raw, "little")


def _dumped_checks() -> str:
    lines = []
    for sig in DUMPED:
        lines += [f"    cmp eax, {signature_value(sig):#x}        # {sig!r}", "    je 5f"]
    return "\n".join(lines)


ACPI_ASM = rf"""
.set K_ACPI_TABLE, {int(AcpiKind.TABLE):#x}
.set K_ACPI_BYTES, {int(AcpiKind.BYTES):#x}
.set K_ACPI_DRHD, {int(AcpiKind.DRHD):#x}
.set K_ACPI_DONE, {int(AcpiKind.DONE):#x}
.set K_ACPI_HPET, {int(AcpiKind.HPET):#x}
.set ACPI_HPET_SIG, {signature_value("HPET"):#x}
.set ACPI_MAX_TABLE, {MAX_TABLE:#x}
.set ACPI_DMAR, {signature_value("DMAR"):#x}

# acpi_dump(rdi = RSDP address, 0: find it (acpi_find_rsdp)) -> rax = tables reported.
# r12 = RSDP, r13 = root table, r14 = root entry size (4 RSDT, 8 XSDT), r15 = entry, rbx = end.
.globl acpi_dump
acpi_dump:
    push rbx
    push rbp
    push r12
    push r13
    push r14
    push r15
    mov qword ptr [rip + acpi_count], 0
    xor r12d, r12d
    xor r13d, r13d
    xor r14d, r14d
    call acpi_find_rsdp
    mov [rip + acpi_rsdp_from], rdx
    test rax, rax
    jz .Lacpi_dump_end
    mov r12, rax
    mov esi, 20                         # ACPI 1.0 RSDP: 20 bytes; revision 2 and later: 36
    cmp byte ptr [r12 + 15], 2
    jb 3f
    mov esi, 36
3:  mov rdi, r12
    mov edx, {int(Source.RSDP)}
    mov ecx, 1
    call acpi_table
    mov r14d, 4
    mov r13d, [r12 + 16]                # RsdtAddress (5.2.5.3)
    cmp byte ptr [r12 + 15], 2
    jb 4f
    mov rax, [r12 + 24]                 # XsdtAddress: preferred when present (5.2.5.3)
    test rax, rax
    jz 4f
    mov r13, rax
    mov r14d, 8
4:  mov rdi, r13
    mov edx, {int(Source.ROOT)}
    call acpi_report
    lea rbx, [r13 + rax]                # end of the entries that were sent (0 bytes: none)
    lea r15, [r13 + 36]                 # entries follow the 36-byte header (5.2.7, 5.2.8)
5:  lea rax, [r15 + r14]
    cmp rax, rbx
    ja .Lacpi_dump_end
    mov edi, [r15]
    cmp r14d, 8
    jne 6f
    mov rdi, [r15]
6:  mov rbp, rdi
    mov edx, {int(Source.ENTRY)}
    call acpi_report
    test rax, rax
    jz 7f
    mov rdx, [rip + acpi_count]
    dec rdx                             # the number of the table just reported
    mov rdi, rbp
    cmp dword ptr [rbp], ACPI_DMAR
    jne 8f
    mov rsi, rax
    call acpi_drhds
    jmp 7f
8:  cmp dword ptr [rbp], ACPI_HPET_SIG
    jne 7f
    cmp rax, 56                         # the whole HPET table (IA-PC HPET 1.0a, 3.2.4)
    jb 7f
    call acpi_hpet
7:  add r15, r14
    jmp 5b
.Lacpi_dump_end:
    mov rax, [rip + acpi_count]
    mov [rip + rec_buf], rax
    mov [rip + rec_buf + 8], r12
    mov [rip + rec_buf + 16], r13
    mov [rip + rec_buf + 24], r14
    mov rax, [rip + acpi_rsdp_from]
    mov [rip + rec_buf + 32], rax
    mov edi, K_ACPI_DONE
    mov esi, 5
    call emit_buf
    mov rax, [rip + acpi_count]
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbp
    pop rbx
    ret

# acpi_report(rdi = table address, edx = source) -> rax = bytes sent.  The root table's bytes are
# always sent, an entry's when its signature is one of DUMPED; a table beyond the identity map is
# listed as unreachable.
acpi_report:
    mov rax, ACPI_REACHABLE - 36
    cmp rdi, rax
    jbe 1f
    call acpi_unreachable
    xor eax, eax
    ret
1:  mov esi, [rdi + 4]                  # declared length (5.2.6)
    mov ecx, 1
    cmp edx, {int(Source.ENTRY)}
    jne acpi_table
    mov eax, [rdi]
{_dumped_checks()}
    xor ecx, ecx
5:  jmp acpi_table

# acpi_unreachable(rdi = address, edx = source): ACPI_TABLE with nothing read.
acpi_unreachable:
    mov rax, [rip + acpi_count]
    mov [rip + rec_buf], rax
    mov [rip + rec_buf + 8], rdi
    xor eax, eax
    mov [rip + rec_buf + 16], rax
    mov [rip + rec_buf + 24], rax
    mov [rip + rec_buf + 32], rax
    mov [rip + rec_buf + 40], rdx
    mov [rip + rec_buf + 48], rax
    mov edi, K_ACPI_TABLE
    mov esi, 7
    call emit_buf
    inc qword ptr [rip + acpi_count]
    ret

# acpi_table(rdi = address, esi = declared length, edx = source, ecx = send the bytes?) -> rax =
# bytes sent: at most ACPI_MAX_TABLE, never past ACPI_REACHABLE.
acpi_table:
    push rbx
    push r12
    push r13
    mov r12, rdi
    mov r13d, esi
    mov rax, [rip + acpi_count]
    mov [rip + rec_buf], rax
    mov [rip + rec_buf + 8], r12
    mov eax, [r12]
    mov [rip + rec_buf + 16], rax
    mov [rip + rec_buf + 24], r13
    mov [rip + rec_buf + 40], rdx
    mov qword ptr [rip + rec_buf + 48], 1
    xor eax, eax
    test ecx, ecx
    jz 2f
    mov rax, r13
    cmp rax, ACPI_MAX_TABLE
    jbe 1f
    mov eax, ACPI_MAX_TABLE
1:  mov rcx, ACPI_REACHABLE
    sub rcx, r12
    cmp rax, rcx
    jbe 2f
    mov rax, rcx
2:  mov [rip + rec_buf + 32], rax
    mov r13, rax
    mov edi, K_ACPI_TABLE
    mov esi, 7
    call emit_buf
    xor ebx, ebx                        # offset of the next ACPI_BYTES record
3:  cmp rbx, r13
    jae 6f
    mov rax, [rip + acpi_count]
    mov [rip + rec_buf], rax
    mov [rip + rec_buf + 8], rbx
    xor ecx, ecx
4:  cmp ecx, {BYTES_PER_RECORD // 8}
    jae 5f
    lea rax, [rbx + rcx*8]
    cmp rax, r13
    jae 5f
    mov rax, [r12 + rax]
    lea rdx, [rip + rec_buf + 16]
    mov [rdx + rcx*8], rax
    inc ecx
    jmp 4b
5:  lea esi, [ecx + 2]
    mov edi, K_ACPI_BYTES
    call emit_buf
    lea rbx, [rbx + rcx*8]
    jmp 3b
6:  inc qword ptr [rip + acpi_count]
    mov rax, r13
    pop r13
    pop r12
    pop rbx
    ret

# acpi_drhds(rdi = DMAR, rsi = bytes sent, rdx = its table number): one ACPI_DRHD per DRHD
# (type 0, VT-d 8.3) among the remapping structures from offset 48 (8.1), as far as each
# structure's length field carries the walk inside the bytes sent.
acpi_drhds:
    push rbx
    push r12
    push r13
    push r14
    mov r12, rdi
    lea r13, [rdi + rsi]
    mov r14, rdx
    lea rbx, [r12 + 48]
1:  lea rax, [rbx + 4]
    cmp rax, r13
    ja 9f
    movzx ecx, word ptr [rbx + 2]       # structure length
    cmp ecx, 4
    jb 9f
    lea rax, [rbx + rcx]
    cmp rax, r13
    ja 9f
    cmp word ptr [rbx], 0
    jne 8f
    cmp ecx, 16
    jb 8f
    mov [rip + rec_buf], r14
    mov rax, rbx
    sub rax, r12
    mov [rip + rec_buf + 8], rax
    mov rax, [rbx + 8]                  # register base address
    mov [rip + rec_buf + 16], rax
    xor edx, edx
    mov [rip + rec_buf + 24], rdx
    mov [rip + rec_buf + 32], rdx
    mov [rip + rec_buf + 40], rdx
    mov [rip + rec_buf + 48], rdx
    mov rdx, ACPI_REACHABLE - 0x20
    cmp rax, rdx
    ja 7f
    mov edx, [rax]                      # VER_REG (VT-d 11.4.1)
    mov [rip + rec_buf + 24], rdx
    mov rdx, [rax + 8]                  # CAP_REG (11.4.2)
    mov [rip + rec_buf + 32], rdx
    mov rdx, [rax + 0x10]               # ECAP_REG (11.4.3)
    mov [rip + rec_buf + 40], rdx
    mov qword ptr [rip + rec_buf + 48], 1
7:  mov edi, K_ACPI_DRHD
    mov esi, 7
    call emit_buf
8:  add rbx, rcx
    jmp 1b
9:  pop r14
    pop r13
    pop r12
    pop rbx
    ret

# acpi_hpet(rdi = HPET table, rdx = its table number): ACPI_HPET.  The base address is the
# generic address structure at offset 40 (ACPI 6.5, 5.2.3.2: space 0 = memory, address at +4);
# GCAP_ID at 0 gives the number of timers less one in bits 12:8 (IA-PC HPET 1.0a, 2.3.4), each
# timer's Tn_CONF_CAP at 0x100 + 0x20 n has Tn_FSB_INT_DEL_CAP in bit 15 (2.3.8).
acpi_hpet:
    mov [rip + rec_buf], rdx
    mov rax, [rdi + 44]
    mov [rip + rec_buf + 8], rax
    xor ecx, ecx
    mov [rip + rec_buf + 16], rcx
    mov [rip + rec_buf + 24], rcx
    mov [rip + rec_buf + 32], rcx
    cmp byte ptr [rdi + 40], 0
    jne 3f
    mov rdx, ACPI_REACHABLE - 0x1000
    cmp rax, rdx
    ja 3f
    mov rdx, [rax]                      # GCAP_ID
    mov [rip + rec_buf + 16], rdx
    shr edx, 8
    and edx, 0x1F
    xor r8d, r8d
1:  mov r9, rcx
    shl r9, 5
    mov r9, [rax + r9 + 0x100]          # Tn_CONF_CAP
    bt r9, 15                           # Tn_FSB_INT_DEL_CAP
    jnc 2f
    bts r8, rcx
2:  inc ecx
    cmp ecx, edx
    jbe 1b
    mov [rip + rec_buf + 24], r8
    mov qword ptr [rip + rec_buf + 32], 1
3:  mov edi, K_ACPI_HPET
    mov esi, 5
    jmp emit_buf

.section .bss
.balign 8
acpi_count: .skip 8
acpi_rsdp_from: .skip 8
.section .text
"""

# The RSDP finder: part of the engine (engine_asm), so that the boot probe and acpi_dump find the
# RSDP the same way.  ACPI_REACHABLE is the engine's constant (REACHABLE_BELOW).
RSDP_FIND_ASM = rf"""
.set ACPI_RSDP_LIMIT, {REACHABLE_BELOW - 36:#x}

# rsdp_scan(rdi = start, esi = length) -> rax = the first RSDP there, or 0.  An RSDP starts with
# "RSD PTR " on a 16-byte boundary and its first 20 bytes sum to 0 (ACPI 6.5, 5.2.5.1, 5.2.5.3).
rsdp_scan:
    lea rcx, [rdi + rsi]
    mov rdx, 0x2052545020445352         # "RSD PTR "
1:  cmp rdi, rcx
    jae 3f
    cmp [rdi], rdx
    jne 2f
    push rcx
    xor eax, eax
    xor ecx, ecx
4:  add al, [rdi + rcx]
    inc ecx
    cmp ecx, 20
    jb 4b
    pop rcx
    test al, al
    jnz 2f
    mov rax, rdi
    ret
2:  add rdi, 16
    jmp 1b
3:  xor eax, eax
    ret

# acpi_find_rsdp(rdi = address the caller names, or 0) -> rax = RSDP (0: none), rdx = RsdpFrom.
# A named address (caller, command line) counts only if rsdp_scan finds an RSDP exactly there.
.globl acpi_find_rsdp
acpi_find_rsdp:
    push rbx
    push r12
    mov r12d, {int(RsdpFrom.CALLER)}
    call acpi_rsdp_at
    test rax, rax
    jnz 9f
    mov r12d, {int(RsdpFrom.CMDLINE)}
    call acpi_cmdline_rsdp
    mov rdi, rax
    call acpi_rsdp_at
    test rax, rax
    jnz 9f
    mov r12d, {int(RsdpFrom.EBDA)}
    movzx edi, word ptr [0x40E]         # EBDA segment (BIOS data area)
    shl edi, 4
    test edi, edi
    jz 1f
    mov esi, 1024
    call rsdp_scan
    test rax, rax
    jnz 9f
1:  mov r12d, {int(RsdpFrom.BIOS)}
    mov edi, 0xE0000
    mov esi, 0x20000
    call rsdp_scan
    test rax, rax
    jnz 9f
    xor r12d, r12d
9:  mov edx, r12d
    pop r12
    pop rbx
    ret

# acpi_rsdp_at(rdi = address or 0) -> rax = rdi if an RSDP is there (reachable), else 0.  A named
# address need not be 16-byte aligned: that rule is the BIOS-area search's (5.2.5.1); a UEFI
# system's RSDP is where its EFI configuration table says (UEFI 2.10, 4.6.1.1, ACPI 2.0 table
# GUID 8868e871-e4f1-11d3-bc22-0080c73c8881), e.g. 0x1f77d014 under OVMF 2022.11.
acpi_rsdp_at:
    xor eax, eax
    test rdi, rdi
    jz 1f
    mov rax, ACPI_RSDP_LIMIT
    cmp rdi, rax
    mov eax, 0
    ja 1f
    mov esi, 16
    call rsdp_scan
1:  ret

# acpi_cmdline_rsdp() -> rax = the hex value of 'acpi_rsdp=' on the multiboot command line, or 0.
# The key counts at the line's start or after a space; '0x' is optional (Linux reads it base 16).
acpi_cmdline_rsdp:
    xor eax, eax
    cmp dword ptr [rip + boot_magic], MULTIBOOT_MAGIC
    jne 9f
    mov ecx, [rip + boot_info]
    test ecx, ecx
    jz 9f
    test dword ptr [rcx], 4             # flags bit 2: cmdline valid (Multiboot 0.6.96, 3.3)
    jz 9f
    mov ecx, [rcx + 16]                 # cmdline: physical address of a NUL-terminated string
    xor edx, edx
1:  cmp edx, {CMDLINE_LIMIT}
    jae 8f
    cmp byte ptr [rcx + rdx], 0
    je 8f
    test edx, edx
    jz 2f
    cmp byte ptr [rcx + rdx - 1], ' '
    jne 3f
2:  mov rax, {int.from_bytes(CMDLINE_KEY[:8].encode(), "little"):#x}   # "{CMDLINE_KEY[:8]}"
    cmp [rcx + rdx], rax
    jne 3f
    cmp word ptr [rcx + rdx + 8], {int.from_bytes(CMDLINE_KEY[8:].encode(), "little"):#x}   # "{CMDLINE_KEY[8:]}"
    je 4f
3:  inc edx
    jmp 1b
4:  lea rcx, [rcx + rdx + {len(CMDLINE_KEY)}]
    xor eax, eax
    cmp word ptr [rcx], 0x7830          # "0x"
    je 5f
    cmp word ptr [rcx], 0x5830          # "0X"
    jne 6f
5:  add rcx, 2
6:  mov r8d, 16                         # at most 16 digits
7:  movzx edx, byte ptr [rcx]
    sub edx, '0'
    cmp edx, 9
    jbe 10f
    movzx edx, byte ptr [rcx]
    or edx, 0x20                        # lower case
    sub edx, 'a'
    cmp edx, 5
    ja 9f
    add edx, 10
10: shl rax, 4
    or rax, rdx
    inc rcx
    dec r8d
    jnz 7b
    jmp 9f
8:  xor eax, eax
9:  ret
"""


def dump_scenario(rsdp: int = 0, name: str = "acpi-dump") -> "Scenario":
    """A scenario that runs the boot probe and then ``acpi_dump`` (``rsdp``: its address when the
    boot method knows it; 0 searches the BIOS areas).  One boot gives every platform check its
    input: the probe's MSRs and PCI functions and the ACPI tables."""
    from .image import Scenario          # here: the engine imports this module's RSDP finder

    scen = Scenario(name=name)
    scen.asm.append(ACPI_ASM)             # acpi_find_rsdp is the engine's (RSDP_FIND_ASM)
    scen.steps.call("acpi_dump", rsdp, comment="report the ACPI tables (ACPI_TABLE, ACPI_BYTES, ACPI_DRHD)")
    return scen


# ---------------------------------------------------------------------------------------------
# Table builders.  Every multi-byte field is little-endian (ACPI 6.5, 5.2.6; VT-d 8.1).

def checksum_byte(data: bytes) -> int:
    """The byte that makes ``data`` (with 0 in its checksum field) sum to 0 modulo 256."""
    return -sum(data) & 0xFF


def with_checksum(table: bytes, at: int = 9) -> bytes:
    """``table`` with its checksum field (offset 9 in a system description table) recomputed."""
    raw = bytearray(table)
    raw[at] = 0
    raw[at] = checksum_byte(raw)
    return bytes(raw)


def sdt(signature: str, body: bytes, revision: int = 1, oem_id: bytes = b"VTXHRN",
        oem_table_id: bytes = b"VTXTABLE", oem_revision: int = 1, creator_id: bytes = b"VTX ",
        creator_revision: int = 1) -> bytes:
    """A system description table (ACPI 6.5, 5.2.6, table 5.4): the 36-byte header, then
    ``body``; length and checksum computed."""
    header = struct.pack("<4sIBB6s8sI4sI", signature.encode("ascii"), 36 + len(body), revision, 0,
                         oem_id.ljust(6)[:6], oem_table_id.ljust(8)[:8], oem_revision,
                         creator_id.ljust(4)[:4], creator_revision)
    return with_checksum(header + body)


# VT-d 8.3.1, table 8-4: device scope types.
SCOPE_ENDPOINT = 1
SCOPE_BRIDGE = 2          # PCI sub-hierarchy
SCOPE_IOAPIC = 3
SCOPE_HPET = 4            # MSI-capable HPET
SCOPE_ACPI = 5            # ACPI namespace device


def device_scope(scope_type: int, start_bus: int, path: Sequence[tuple[int, int]], enumeration_id: int = 0,
                 flags: int = 0, reserved: int = 0) -> bytes:
    """A device scope entry (VT-d 8.3.1, table 8-3): type, length, flags (reserved before VT-d
    4.0), reserved, enumeration ID, start bus, then (device, function) per hop."""
    hops = b"".join(struct.pack("<BB", dev, fn) for dev, fn in path)
    return struct.pack("<BBBBBB", scope_type, 6 + len(hops), flags, reserved, enumeration_id, start_bus) + hops


def _structure(stype: int, fixed: bytes, tail: bytes = b"") -> bytes:
    """A remapping structure (VT-d 8.2): type (2 bytes), length (2 bytes), then its fields."""
    return struct.pack("<HH", stype, 4 + len(fixed) + len(tail)) + fixed + tail


def drhd(register_base: int, scopes: Iterable[bytes] = (), include_pci_all: bool = False, segment: int = 0,
         flags: int | None = None, size: int = 0) -> bytes:
    """DMA-remapping hardware unit definition (VT-d 8.3, type 0): flags (bit 0 INCLUDE_PCI_ALL),
    size (bits 3:0: 2^N 4 KiB pages of registers), segment, register base, device scopes."""
    f = int(include_pci_all) if flags is None else flags
    return _structure(0, struct.pack("<BBHQ", f, size, segment, register_base), b"".join(scopes))


def rmrr(base: int, limit: int, scopes: Iterable[bytes] = (), segment: int = 0, reserved: int = 0) -> bytes:
    """Reserved memory region reporting (VT-d 8.4, type 1): base and inclusive limit address."""
    return _structure(1, struct.pack("<HHQQ", reserved, segment, base, limit), b"".join(scopes))


def atsr(scopes: Iterable[bytes] = (), all_ports: bool = False, segment: int = 0, flags: int | None = None) -> bytes:
    """Root port ATS capability reporting (VT-d 8.5, type 2): flags (bit 0 ALL_PORTS), segment."""
    f = int(all_ports) if flags is None else flags
    return _structure(2, struct.pack("<BBH", f, 0, segment), b"".join(scopes))


def rhsa(register_base: int, proximity_domain: int, reserved: int = 0) -> bytes:
    """Remapping hardware static affinity (VT-d 8.6, type 3)."""
    return _structure(3, struct.pack("<IQI", reserved, register_base, proximity_domain))


def andd(device_number: int, name: str) -> bytes:
    """ACPI name-space device declaration (VT-d 8.7, type 4): device number, NUL-terminated path."""
    return _structure(4, struct.pack("<3xB", device_number), name.encode("ascii") + b"\0")


def satc(scopes: Iterable[bytes] = (), atc_required: bool = False, segment: int = 0, flags: int | None = None) -> bytes:
    """SoC integrated address translation cache (VT-d 8.8, type 5): flags (bit 0 ATC_REQUIRED)."""
    f = int(atc_required) if flags is None else flags
    return _structure(5, struct.pack("<BBH", f, 0, segment), b"".join(scopes))


DMAR_INTR_REMAP = 1 << 0
DMAR_X2APIC_OPT_OUT = 1 << 1
DMAR_DMA_CTRL_PLATFORM_OPT_IN = 1 << 2


def dmar(structures: Iterable[bytes], host_address_width: int = 39, flags: int = 0, reserved: bytes = bytes(10),
         oem_table_id: bytes = b"VTXDMAR", revision: int = 1) -> bytes:
    """The DMAR table (VT-d 8.1, table 8-1): header, host address width minus one, flags,
    10 reserved bytes, remapping structures."""
    body = struct.pack("<BB", host_address_width - 1, flags) + reserved + b"".join(structures)
    return sdt("DMAR", body, revision=revision, oem_table_id=oem_table_id)


def madt_ioapic(ioapic_id: int, address: int, gsi_base: int = 0) -> bytes:
    """An I/O APIC structure of the MADT (ACPI 6.5, 5.2.12.3, type 1, 12 bytes)."""
    return struct.pack("<BBBBII", 1, 12, ioapic_id, 0, address, gsi_base)


def madt_local_apic(processor_uid: int, apic_id: int, flags: int = 1) -> bytes:
    """A processor local APIC structure (ACPI 6.5, 5.2.12.2, type 0, 8 bytes)."""
    return struct.pack("<BBBBI", 0, 8, processor_uid, apic_id, flags)


def madt_override(source: int, gsi: int, flags: int = 0, bus: int = 0) -> bytes:
    """An interrupt source override (ACPI 6.5, 5.2.12.5, type 2, 10 bytes); bus 0 is ISA."""
    return struct.pack("<BBBBIH", 2, 10, bus, source, gsi, flags)


def madt(entries: Iterable[bytes], lapic_address: int = 0xFEE0_0000, flags: int = 1) -> bytes:
    """The MADT, signature "APIC" (ACPI 6.5, 5.2.12, table 5.43)."""
    return sdt("APIC", struct.pack("<II", lapic_address, flags) + b"".join(entries))


def hpet_table(hpet_number: int, base: int = 0xFED0_0000, block_id: int = 0x8086A201) -> bytes:
    """The HPET description table (IA-PC HPET 1.0a, 3.2.4, table 3): event timer block ID, base
    address as a generic address structure (ACPI 6.5, 5.2.3.2), HPET number, minimum tick,
    page protection."""
    gas = struct.pack("<BBBBQ", 0, 64, 0, 0, base)
    return sdt("HPET", struct.pack("<I", block_id) + gas + struct.pack("<BHB", hpet_number, 0x80, 0))
