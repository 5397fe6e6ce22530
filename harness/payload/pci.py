"""PCI configuration space for the payload: access routines, the boot probe's enumeration, MSI.

Configuration space is reached through the legacy 0xCF8/0xCFC mechanism (PCI Local Bus 3.0,
3.2.2.3.2), which every x86 chipset and emulator offers for the first 256 bytes of each function.
The probe walks bus 0 and, breadth first, the secondary bus of every PCI-to-PCI bridge it finds
(header type 1; PCI-to-PCI Bridge Architecture 1.2, 3.2.5.3), and reports one PCI record per
function: tests find DMA agents by vendor/device ID or class code and take source-ids from it.
The MSI capability layout is PCI Local Bus 3.0, 6.8.1.
"""

from __future__ import annotations

from .records import Kind

# Record kind of the probe's PCI enumeration (the base protocol's range, below Kind.USER).
# Fields: bdf (bus 15:8, device 7:3, function 2:0), dword 0x00 (vendor 15:0, device 31:16),
# dword 0x08 (revision 7:0, class code 31:8), header type (byte 0x0E), dword 0x18 of a bridge
# (primary 7:0, secondary 15:8, subordinate bus 23:16; 0 for other functions).
PCI_RECORD = int(Kind.PCI)
MAX_BUSES = 32            # the breadth-first queue of buses to scan (a loop-free bound)

# Bit 63 of pci_msi_setup's address (above any MSI address): put this CPU's APIC ID into the
# compatibility-format destination field, bits 19:12 (SDM Vol. 3A, 11.11.1).  On a real host
# the bootstrap processor's APIC ID need not be 0.
MSI_DEST_SELF = 1 << 63
COMPAT_MSI_BASE = 0xFEE0_0000


def bdf(bus: int, dev: int, fn: int = 0) -> int:
    """Source-id / routing id of a PCI function: bus 15:8, device 7:3, function 2:0 (VT-d 3.4.1)."""
    return (bus << 8) | (dev << 3) | fn


def cfg_addr(function: int, offset: int) -> int:
    """The argument of pci_cfg_read32 / pci_cfg_write32: bdf << 8 | register offset."""
    return function << 8 | offset


# Part of the engine: the probe needs it, and so does every scenario that touches a device.
PCI_ENGINE_ASM = rf"""
# pci_cfg_addr(edi = bdf << 8 | offset): select the dword (0xCF8); clobbers eax, edx.
pci_cfg_addr:
    mov eax, edi
    and eax, 0xFFFFFC
    or eax, 0x80000000
    mov dx, 0xCF8
    out dx, eax
    ret

# pci_cfg_read32(rdi = bdf << 8 | offset) -> rax; clobbers rdx only.
.globl pci_cfg_read32
pci_cfg_read32:
    call pci_cfg_addr
    mov dx, 0xCFC
    in eax, dx
    ret

# pci_cfg_write32(rdi = bdf << 8 | offset, esi = value); clobbers rdx only.
.globl pci_cfg_write32
pci_cfg_write32:
    call pci_cfg_addr
    mov eax, esi
    mov dx, 0xCFC
    out dx, eax
    xor eax, eax
    ret

# probe_pci: one PCI record per function present.  r12 = bus, r13 = devfn, r14/r15 = queue
# index/length, ebp = fn 0 is multi-function (header type bit 7).
probe_pci:
    push rbx
    push rbp
    push r12
    push r13
    push r14
    push r15
    mov dword ptr [rip + pci_buses], 0
    xor r14d, r14d
    mov r15d, 1
.Lpci_bus:
    cmp r14d, r15d
    jae .Lpci_done
    lea rax, [rip + pci_buses]
    mov r12d, [rax + r14*4]
    inc r14d
    xor r13d, r13d
    xor ebp, ebp
.Lpci_fn:
    cmp r13d, 256
    jae .Lpci_bus
    mov ebx, r12d
    shl ebx, 16
    mov eax, r13d
    shl eax, 8
    or ebx, eax                         # ebx = bdf << 8
    mov edi, ebx
    call pci_cfg_read32
    cmp ax, 0xFFFF                      # no function here
    je .Lpci_next
    mov [rip + rec_buf + 8], rax
    mov eax, ebx
    shr eax, 8
    mov [rip + rec_buf], rax
    lea edi, [ebx + 0x08]
    call pci_cfg_read32
    mov [rip + rec_buf + 16], rax
    lea edi, [ebx + 0x0C]
    call pci_cfg_read32
    shr eax, 16
    and eax, 0xFF
    mov [rip + rec_buf + 24], rax
    test r13d, 7
    jnz 1f
    mov ebp, eax
    and ebp, 0x80
1:  mov qword ptr [rip + rec_buf + 32], 0
    and eax, 0x7F
    cmp eax, 1                          # a PCI-to-PCI bridge: queue its secondary bus
    jne 3f
    lea edi, [ebx + 0x18]
    call pci_cfg_read32
    mov [rip + rec_buf + 32], rax
    movzx eax, ah
    test eax, eax
    jz 3f
    cmp r15d, {MAX_BUSES}
    jae 3f
    lea rdx, [rip + pci_buses]
    xor ecx, ecx
2:  cmp [rdx + rcx*4], eax              # already queued (a misconfigured loop)?
    je 3f
    inc ecx
    cmp ecx, r15d
    jb 2b
    mov [rdx + r15*4], eax
    inc r15d
3:  mov edi, {PCI_RECORD}
    mov esi, 5
    call emit_buf
    test r13d, 7                        # functions 1-7 only when function 0 is multi-function
    jnz 4f
    test ebp, ebp
    jnz 4f
    add r13d, 8
    jmp .Lpci_fn
4:  inc r13d
    jmp .Lpci_fn
.Lpci_next:
    test r13d, 7                        # no function 0: no device
    jnz 4b
    add r13d, 8
    jmp .Lpci_fn
.Lpci_done:
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbp
    pop rbx
    ret

.section .bss
.balign 4
pci_buses: .skip {4 * MAX_BUSES}
.section .text
"""

# A library: scenarios that call its routines get it without naming it (see image.LIBRARIES).  It
# holds what DMA agents call beyond the engine: MSI set-up, BAR addresses, the NVMe doorbell and a
# buffer compare (an agent that writes data it chooses is checked against a reference copy).
PCI_MSI_ASM = r"""
# pci_bar_address(rdi = bdf << 8 | BAR offset) -> rax: the memory address a BAR decodes, flag
# bits 3:0 cleared, the upper dword of a 64-bit BAR (type 10b, bits 2:1) included
# (PCI Local Bus 3.0, 6.2.5.1).
.globl pci_bar_address
pci_bar_address:
    push rbx
    mov ebx, edi
    call pci_cfg_read32
    mov r8d, eax
    and r8d, 0xFFFFFFF0
    and eax, 0x7
    cmp eax, 0x4                        # memory BAR, 64-bit
    jne 1f
    lea edi, [ebx + 4]
    call pci_cfg_read32
    shl rax, 32
    or r8, rax
1:  mov rax, r8
    pop rbx
    ret

# pci_msix_setup(rdi = bdf, rsi = message address (bit 63: MSI_DEST_SELF), edx = message data)
# -> rax = address of MSI-X table entry 0 (0: no MSI-X capability).  Finds the MSI-X capability
# (ID 11h), its table through the Table Offset/BIR register (PCI Local Bus 3.0, 6.8.2.4), writes
# entry 0's message address, upper address and data, clears its per-vector mask (Vector Control
# bit 0, 6.8.2.9), then sets MSI-X Enable (Message Control bit 15) with Function Mask (bit 14) clear.
.globl pci_msix_setup
pci_msix_setup:
    push rbx
    push r12
    push r13
    push r14
    push r15
    mov r12d, edi
    shl r12d, 8                         # bdf << 8
    mov r13, rsi
    btr r13, 63                         # MSI_DEST_SELF
    jnc 0f
    mov eax, [rip + apic_id]
    and eax, 0xFF
    shl eax, 12
    or r13d, eax
0:
    mov r14d, edx
    lea edi, [r12d + 0x34]
    call pci_cfg_read32
    movzx ebx, al
    mov ecx, 48                         # at most 48 capabilities
1:  and ebx, 0xFC
    jz 3f
    lea edi, [r12d + ebx]
    call pci_cfg_read32
    cmp al, 0x11                        # MSI-X
    je 2f
    movzx ebx, ah
    dec ecx
    jnz 1b
    jmp 3f
2:  mov r15d, eax                       # dword 0: id, next, message control 31:16
    lea edi, [r12d + ebx + 4]
    call pci_cfg_read32                 # table offset 31:3, BIR 2:0
    push rax
    and eax, 7
    lea edi, [r12d + eax*4 + 0x10]
    call pci_bar_address
    pop rcx
    and ecx, 0xFFFFFFF8
    add rax, rcx                        # table entry 0
    mov [rax], r13d
    mov rcx, r13
    shr rcx, 32
    mov [rax + 4], ecx
    mov [rax + 8], r14d
    and dword ptr [rax + 12], 0xFFFFFFFE
    mov r13, rax
    mov eax, r15d
    and eax, 0xBFFFFFFF                 # function mask off
    or eax, 0x80000000                  # MSI-X enable
    mov esi, eax
    lea edi, [r12d + ebx]
    call pci_cfg_write32
    mov rax, r13
    jmp 4f
3:  xor eax, eax
4:  pop r15
    pop r14
    pop r13
    pop r12
    pop rbx
    ret

# pci_msi_off(rdi = bdf) -> rax = capabilities cleared.  Clears MSI Enable (MSI message control
# bit 0, 6.8.1.3) and MSI-X Enable (MSI-X message control bit 15, 6.8.2.3): an OS that kexec'd
# the payload may have left them on, aimed at its own (possibly remappable-format) addresses.
.globl pci_msi_off
pci_msi_off:
    push rbx
    push r12
    push r13
    mov r12d, edi
    shl r12d, 8
    xor r13d, r13d
    lea edi, [r12d + 0x34]
    call pci_cfg_read32
    movzx ebx, al
    mov ecx, 48
1:  and ebx, 0xFC
    jz 3f
    lea edi, [r12d + ebx]
    call pci_cfg_read32
    mov esi, eax
    cmp al, 0x05
    jne 2f
    and esi, 0xFFFEFFFF                 # MSI enable off
    jmp 4f
2:  cmp al, 0x11
    jne 5f
    and esi, 0x7FFFFFFF                 # MSI-X enable off
4:  push rax
    push rcx
    lea edi, [r12d + ebx]
    call pci_cfg_write32
    pop rcx
    pop rax
    inc r13d
5:  movzx ebx, ah
    dec ecx
    jnz 1b
3:  mov eax, r13d
    pop r13
    pop r12
    pop rbx
    ret

# nvme_doorbell(rdi = engine variable holding BAR0, rsi = doorbell number: 2y the tail of
# submission queue y, 2y+1 the head of completion queue y, edx = value).  Doorbells start at 0x1000,
# (4 << CAP.DSTRD) bytes apart; DSTRD is CAP bits 35:32 (NVMe 1.4, 3.1.1 and 3.1.24).
.globl nvme_doorbell
nvme_doorbell:
    lea rax, [rip + vars]
    mov rax, [rax + rdi*8]
    mov rcx, [rax]
    shr rcx, 32
    and ecx, 0xF
    add ecx, 2
    shl rsi, cl
    mov [rax + rsi + 0x1000], edx
    xor eax, eax
    ret

# mem_compare_qwords(rdi = address, rsi = reference address, rdx = bytes, a multiple of 8)
# -> rax: the number of qwords that differ.
.globl mem_compare_qwords
mem_compare_qwords:
    xor eax, eax
    shr rdx, 3
    jz 2f
1:  mov rcx, [rdi]
    cmp rcx, [rsi]
    je 3f
    inc rax
3:  add rdi, 8
    add rsi, 8
    dec rdx
    jnz 1b
2:  ret

# pci_msi_setup(rdi = bdf, rsi = message address (bit 63: MSI_DEST_SELF), edx = message data)
# -> rax = MSI capability offset (0: none).  Walks the capability list (status bit 4, pointer at 0x34), programs address
# and data (64-bit layout when control bit 7 says so), then sets MSI enable (control bit 0).
.globl pci_msi_setup
pci_msi_setup:
    push rbx
    push r12
    push r13
    push r14
    mov r12d, edi
    shl r12d, 8                         # bdf << 8
    mov r13, rsi
    btr r13, 63                         # MSI_DEST_SELF
    jnc 0f
    mov eax, [rip + apic_id]
    and eax, 0xFF
    shl eax, 12
    or r13d, eax
0:
    mov r14d, edx
    lea edi, [r12d + 0x34]
    call pci_cfg_read32
    movzx ebx, al
    mov ecx, 48                         # at most 48 capabilities
1:  and ebx, 0xFC
    jz 3f
    lea edi, [r12d + ebx]
    call pci_cfg_read32
    cmp al, 0x05                        # MSI
    je 2f
    movzx ebx, ah
    dec ecx
    jnz 1b
    xor ebx, ebx
    jmp 3f
2:  mov r8d, eax                        # dword 0: id, next, control
    lea edi, [r12d + ebx + 4]
    mov esi, r13d
    call pci_cfg_write32
    mov r9d, 8                          # data offset (32-bit layout)
    bt r8d, 23                          # control bit 7: 64-bit address capable
    jnc 4f
    lea edi, [r12d + ebx + 8]
    mov rsi, r13
    shr rsi, 32
    call pci_cfg_write32
    mov r9d, 12
4:  lea edi, [r12d + ebx]
    add edi, r9d
    mov esi, r14d
    call pci_cfg_write32
    lea edi, [r12d + ebx]
    call pci_cfg_read32
    and eax, 0xFF8FFFFF                 # multiple message enable = 1 message
    or eax, 0x00010000                  # MSI enable
    mov esi, eax
    lea edi, [r12d + ebx]
    call pci_cfg_write32
3:  mov eax, ebx
    pop r14
    pop r13
    pop r12
    pop rbx
    ret
"""
