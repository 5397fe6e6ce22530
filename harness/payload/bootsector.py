"""A BIOS boot sector (16-bit) that loads the payload's segments above 1 MiB and enters it.

Used for Bochs (no direct kernel loading) and USB sticks.  It reads each segment in chunks with
INT 13h AH=42h (EDD extended read) into a low bounce buffer, copies each chunk above 1 MiB with
INT 15h AH=87h, switches to flat 32-bit protected mode and jumps to the payload's 32-bit entry with
EAX = DISK_BOOT_MAGIC.
"""

from __future__ import annotations

from . import layout

SECTOR = 512
MAX_SEGMENTS = 8

BOOT_ASM = r"""
.intel_syntax noprefix
.code16
.section .text
.globl _start
_start:
    cli
    xor ax, ax
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov sp, 0x7C00
    sti
    mov [drive], dl
    in al, 0x92                         # fast A20 gate (port 92h, bit 1)
    or al, 2
    and al, 0xFE
    out 0x92, al
    mov si, offset segtab
next_seg:
    mov eax, [si]                       # first LBA; 0 ends the table
    test eax, eax
    jz loaded
    mov [dap_lba], eax
    mov cx, [si + 4]                    # sectors
    mov edx, [si + 6]                   # destination
    mov [cur_dest], edx
chunk:
    test cx, cx
    jz seg_done
    mov bx, cx
    cmp bx, CHUNK
    jbe 1f
    mov bx, CHUNK
1:  mov [dap_count], bx
    push cx
    push si
    push bx
    mov si, offset dap
    mov ah, 0x42
    mov dl, [drive]
    int 0x13
    jc fail
    mov eax, [cur_dest]                 # patch the destination descriptor's base
    mov [gdt_dst + 2], ax
    shr eax, 16
    mov [gdt_dst + 4], al
    mov [gdt_dst + 7], ah
    pop bx
    push bx
    mov cx, bx
    shl cx, 8                           # words to move
    push es
    push ds
    pop es
    mov si, offset move_gdt
    mov ah, 0x87
    int 0x15
    pop es
    jc fail
    pop bx
    pop si
    pop cx
    sub cx, bx
    movzx ebx, bx
    add [dap_lba], ebx
    shl ebx, 9
    add [cur_dest], ebx
    jmp chunk
seg_done:
    add si, 10
    jmp next_seg
fail:
    mov si, offset failmsg
    mov dx, 0x3F8
2:  lodsb
    test al, al
    jz 3f
    out dx, al
    jmp 2b
3:  cli
    hlt
    jmp 3b
loaded:
    cli
    lgdt [pm_gdt_ptr]
    mov eax, cr0
    or eax, 1
    mov cr0, eax
    push 0x08
    push offset pm32
    retf
.code32
pm32:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov fs, ax
    mov gs, ax
    mov esp, 0x7C00
    mov eax, DISK_BOOT_MAGIC
    xor ebx, ebx
    mov ecx, ENTRY
    jmp ecx

.balign 8
pm_gdt:
    .quad 0
    .quad 0x00CF9A000000FFFF            # 0x08: flat 32-bit code
    .quad 0x00CF92000000FFFF            # 0x10: flat data
pm_gdt_ptr:
    .word 23
    .long pm_gdt
move_gdt:                               # INT 15h AH=87h descriptor table
    .quad 0, 0
    .word 0xFFFF, BOUNCE & 0xFFFF
    .byte (BOUNCE >> 16) & 0xFF, 0x93, 0, 0
gdt_dst:
    .word 0xFFFF, 0
    .byte 0, 0x93, 0, 0
    .quad 0, 0
dap:                                    # EDD disk address packet
    .byte 16, 0
dap_count:
    .word 0
    .word 0, BOUNCE >> 4
dap_lba:
    .long 0, 0
cur_dest:
    .long 0
drive:
    .byte 0
failmsg:
    .asciz "vtx-boot: disk read or copy failed\r\n"
segtab:
"""


def boot_asm(entry: int, segments: list[tuple[int, int, int]]) -> str:
    """Boot sector source; ``segments`` are (first LBA, sectors, destination address)."""
    if len(segments) > MAX_SEGMENTS:
        raise ValueError(f"{len(segments)} segments; the boot sector holds {MAX_SEGMENTS}")
    head = (f".set ENTRY, {entry:#x}\n.set DISK_BOOT_MAGIC, {layout.DISK_BOOT_MAGIC:#x}\n"
            f".set BOUNCE, {layout.BOUNCE_BUFFER:#x}\n.set CHUNK, {layout.DISK_CHUNK_SECTORS}\n")
    table = "".join(f"    .long {lba:#x}\n    .word {n:#x}\n    .long {dest:#x}\n"
                    for lba, n, dest in segments)
    return head + BOOT_ASM + table + "    .long 0\n.org 510\n    .word 0xAA55\n"
