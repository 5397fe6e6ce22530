"""The payload engine: a small, generic x86-64 program emitted as GNU assembler text.

It boots (multiboot v1 or our disk loader), enters long mode on Python-built page tables, reports a
boot probe, walks the step table and ends with a terminal record and an exit-port write.  Scenario
code extends it through extra assembly and the ``call`` step; the records it emits are defined in
``records.py``.  Nothing here encodes instructions by hand: GNU as does.
"""

from __future__ import annotations

from typing import Sequence

from . import layout
from .acpi import REACHABLE_BELOW, RSDP_FIND_ASM
from .pci import PCI_ENGINE_ASM
from .records import FAULT_FLAG, PROTOCOL_VERSION, EndStatus, Kind
from .steps import Flag, Op, SIZE_SHIFT, STORE_SHIFT, SyncKind

# Vectors for which the CPU pushes an error code (SDM Vol. 3A, table 6-1).
ERROR_CODE_VECTORS = {8, 10, 11, 12, 13, 14, 17, 21, 29, 30}
SERIAL_SPIN = 1_000_000   # LSR polls per string before the string is dropped (and noticed)
TX_FIFO = 16              # the 16550A's transmit FIFO: characters per LSR.THRE poll
WATCHDOG_VECTOR = 0xEE    # the LAPIC timer that bounds each HLT of irq_wait_halted
# Every register poll (POLL steps, the VT-d routines' waits) also ends after this many TSC ticks:
# about 1.2 s at 3.5 GHz, the order of what the iteration bounds allow on real hardware, where a
# register read costs about a microsecond.  The iteration bounds alone are an hour when each read
# is a nested-KVM exit (0.75 ms on the KVM-runner stand-in).  Bochs' TSC advances one tick per
# instruction, so there this is minutes and the iteration bound ends a poll first.
POLL_TSC_BOUND = 1 << 32


def constants(pml4: int, image_id: int, probe: bool) -> str:
    sets = {
        "COM1": layout.COM1,
        "LAPIC_BASE": layout.LAPIC_BASE,
        "DEBUG_EXIT_PORT": layout.DEBUG_EXIT_PORT,
        "EXIT_BASE": layout.EXIT_BASE,
        "MULTIBOOT_MAGIC": layout.MULTIBOOT_MAGIC,
        "PML4": pml4,
        "IMAGE_ID": image_id,
        "DO_PROBE": int(probe),
        "PROTOCOL_VERSION": PROTOCOL_VERSION,
        "FAULT_FLAG": FAULT_FLAG,
        "SERIAL_SPIN": SERIAL_SPIN,
        "TX_FIFO": TX_FIFO,
        "WATCHDOG_VECTOR": WATCHDOG_VECTOR,
        "POLL_TSC_BOUND": POLL_TSC_BOUND,
        "SIZE_SHIFT": SIZE_SHIFT,
        "STORE_SHIFT": STORE_SHIFT,
        "OP_COUNT": max(Op) + 1,
        "ACPI_REACHABLE": REACHABLE_BELOW,      # ACPI tables and DRHD registers are read below this
    }
    sets.update({f"K_{k.name}": int(k) for k in Kind})
    sets.update({f"K_{k.name}": int(k) for k in SyncKind})
    sets.update({f"ST_{s.name}": int(s) for s in EndStatus})
    sets.update({f"F_{f.name}": int(f) for f in Flag if f.name and f is not Flag.NONE})
    return "\n".join(f".set {name}, {value:#x}" for name, value in sets.items()) + "\n"


def isr_stubs() -> str:
    out = [".section .text", ".balign 16"]
    for v in range(256):
        out.append(f"isr_{v}:")
        if v not in ERROR_CODE_VECTORS:
            out.append("    push 0")
        out.append(f"    push {v}")
        out.append("    jmp isr_common")
    out += [".section .data", ".balign 8", "isr_table:"]
    out += [f"    .quad isr_{v}" for v in range(256)]
    return "\n".join(out) + "\n"


def op_table() -> str:
    handlers = {op: f"op_{op.name.lower()}" for op in Op}
    lines = [".section .data", ".balign 8", "op_table:"]
    lines += [f"    .quad {handlers[Op(i)]}" for i in range(max(Op) + 1)]
    return "\n".join(lines) + "\n"


ENGINE = r"""
# ---------------------------------------------------------------------------------------------
# Multiboot v1 header (Multiboot Specification 0.6.96, section 3.1): magic, flags, checksum.
# Flags bit 1 asks for the memory map; an ELF image needs no address fields (bit 16 clear).
.section .multiboot, "a"
.balign 4
    .long 0x1BADB002
    .long 0x00000002
    .long -(0x1BADB002 + 0x00000002)

# ---------------------------------------------------------------------------------------------
# 32-bit entry.  EAX holds the boot magic (multiboot or disk loader), EBX the multiboot info.
.section .text32, "ax"
.code32
.globl entry32
entry32:
    cli
    cld
    mov esi, eax
    mov edi, offset __bss_start         # the disk loader does not zero .bss: do it here
    mov ecx, offset __bss_end
    sub ecx, edi
    xor eax, eax
    rep stosb
    mov [boot_magic], esi
    mov [boot_info], ebx
    mov esp, offset stack_top
    lgdt [gdt_ptr]
    mov eax, cr4
    or eax, 0x20                        # CR4.PAE (SDM Vol. 3A, 4.1.1)
    mov cr4, eax
    mov eax, PML4
    mov cr3, eax
    mov ecx, 0xC0000080                 # IA32_EFER.LME (SDM Vol. 3A, 9.8.5)
    rdmsr
    or eax, 0x100
    wrmsr
    mov eax, cr0
    or eax, 0x80000001                  # CR0.PG | CR0.PE
    mov cr0, eax
    push 0x08
    push offset entry64
    retf

# ---------------------------------------------------------------------------------------------
.section .text
.code64
entry64:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    xor eax, eax
    mov fs, ax
    mov gs, ax
    lea rsp, [rip + stack_top]
    call prior_state
    call tss_init
    call idt_init
    call apic_init
    call serial_init
    call emit_hello
.if DO_PROBE
    call probe_cpu
    call probe_apic
    call probe_acpi
    call probe_pci
    mov edi, K_PROBE_DONE
    xor esi, esi
    call emit_buf
.endif
    call run_steps
    mov edi, ST_OK
    jmp finish

# finish(edi = status): terminal record END(status, records before it, steps walked), then the
# exit port.  Never returns.
.globl finish
finish:
    cli
    mov r12d, edi
    mov edi, K_END
    call rec_begin
    mov edi, r12d
    call rec_u64
    mov rdi, [rip + rec_seq]
    call rec_u64
    mov rdi, [rip + steps_done]         # lets the host tell a whole walk from a cut-short one
    call rec_u64
    call rec_end
    mov ecx, SERIAL_SPIN                # let the UART send the last byte (LSR.TEMT) before exiting
    mov dx, COM1 + 5
1:  in al, dx
    test al, 0x40
    jnz 2f
    pause
    dec ecx
    jnz 1b
2:  mov eax, r12d
    or eax, EXIT_BASE
    out DEBUG_EXIT_PORT, eax
halt_forever:
    cli
    hlt
    jmp halt_forever

# A fault while already handling one: no record can be trusted, leave with a distinct status.
hard_stop:
    mov eax, EXIT_BASE | 0xF
    out DEBUG_EXIT_PORT, eax
    jmp halt_forever

# ---------------------------------------------------------------------------------------------
# TSS (64-bit descriptor, SDM Vol. 3A, 7.2.3): VM entry needs a non-null TR, #DF runs on IST1.
tss_init:
    lea rax, [rip + ist1_top]
    mov [rip + tss + 36], rax           # IST1
    lea rax, [rip + stack_top]
    mov [rip + tss + 4], rax            # RSP0
    mov word ptr [rip + tss + 102], 104 # I/O map base beyond the limit: no I/O bitmap
    mov eax, offset tss
    mov rdx, rax
    and edx, 0xFFFFFF
    shl rdx, 16
    or rdx, 103                         # limit
    mov rcx, 0x89                       # present, type 9 (available 64-bit TSS)
    shl rcx, 40
    or rdx, rcx
    mov rcx, rax
    shr rcx, 24
    and ecx, 0xFF
    shl rcx, 56
    or rdx, rcx
    mov [rip + gdt_tss], rdx
    mov qword ptr [rip + gdt_tss + 8], 0
    mov ax, 0x28
    ltr ax
    ret

# idt_fill(rdi = IDT, rsi = 256 handler addresses, edx = code selector): 64-bit interrupt gates
# (SDM Vol. 3A, 6.14.1), present, DPL 0, no IST.  Also used for VMX guests' IDTs.
.globl idt_fill
idt_fill:
    xor ecx, ecx
1:  mov rax, [rsi + rcx*8]
    mov [rdi], ax
    mov [rdi + 2], dx
    mov word ptr [rdi + 4], 0x8E00
    shr rax, 16
    mov [rdi + 6], ax
    shr rax, 16
    mov [rdi + 8], eax
    mov dword ptr [rdi + 12], 0
    add rdi, 16
    inc ecx
    cmp ecx, 256
    jb 1b
    xor eax, eax
    ret

# The engine's own IDT, filled at run time from isr_table.
idt_init:
    lea rdi, [rip + idt]
    lea rsi, [rip + isr_table]
    mov edx, 0x08
    call idt_fill
    lea rdi, [rip + idt]
    mov byte ptr [rdi + 8*16 + 4], 1    # #DF on IST1
    mov byte ptr [rdi + 2*16 + 4], 1    # NMI on IST1
    lidt [rip + idt_ptr]
    ret

# The local APIC as firmware or a kexec'ing OS left it (SDM Vol. 3A, 11.4.3, 11.4.4, 11.12).
# Globally disabled: enable it in xAPIC mode.  x2APIC mode is kept (leaving it needs a full
# disable, 11.12.5) and registers are then reached through MSRs.  Linux's shutdown path may leave
# it software-disabled, which masks every LVT: software-enable it (SVR bit 8, spurious vector 0xFF,
# no EOI-broadcast suppression) and accept every priority (TPR 0).  The 8259s are masked first:
# once the APIC is enabled, their interrupts arrive through LINT0 (ExtINT) on vectors 8..15,
# which alias exceptions.  What was found is reported in the APIC record.
apic_init:
    mov al, 0xFF
    out 0x21, al
    out 0xA1, al
    mov ecx, 0x1B                       # IA32_APIC_BASE
    rdmsr
    mov [rip + apic_base_found], eax
    mov [rip + apic_base_found + 4], edx
    bt eax, 11                          # EN
    jc 1f
    or eax, 0x800
    wrmsr
1:  shr eax, 10
    and eax, 1                          # EXTD
    mov [rip + x2apic_mode], eax
    mov edi, 0xF0                       # spurious-interrupt vector register
    call apic_read
    mov [rip + apic_svr_found], eax
    mov esi, 0x1FF
    call apic_write
    mov edi, 0x80                       # TPR
    xor esi, esi
    call apic_write
    mov edi, 0x20                       # APIC ID: bits 31:24 in xAPIC mode, all 32 in x2APIC mode
    call apic_read
    cmp dword ptr [rip + x2apic_mode], 0
    jne 2f
    shr eax, 24
2:  mov [rip + apic_id], eax
    ret

# apic_read(edi = xAPIC register offset) -> eax.  In x2APIC mode the register is MSR
# 0x800 + offset / 16 (SDM Vol. 3A, 11.12.1.2).  Clobbers nothing else.
.globl apic_read
apic_read:
    push rdx
    cmp dword ptr [rip + x2apic_mode], 0
    je 1f
    push rcx
    mov ecx, edi
    shr ecx, 4
    add ecx, 0x800
    rdmsr
    pop rcx
    pop rdx
    ret
1:  mov edx, edi
    mov rax, LAPIC_BASE
    mov eax, [rax + rdx]
    pop rdx
    ret

# apic_write(edi = xAPIC register offset, esi = value): MMIO or MSR as apic_read.  The x2APIC
# ICR (MSR 0x830) takes the destination in its high half, which this writes as 0.  Clobbers nothing.
.globl apic_write
apic_write:
    push rax
    push rcx
    push rdx
    cmp dword ptr [rip + x2apic_mode], 0
    je 1f
    mov ecx, edi
    shr ecx, 4
    add ecx, 0x800
    mov eax, esi
    xor edx, edx
    wrmsr
    jmp 2f
1:  mov edx, edi
    mov rax, LAPIC_BASE
    mov [rax + rdx], esi
2:  pop rdx
    pop rcx
    pop rax
    ret

.globl apic_eoi
apic_eoi:
    push rdi
    push rsi
    mov edi, 0xB0                       # EOI (x2APIC: a non-zero write would #GP)
    xor esi, esi
    call apic_write
    pop rsi
    pop rdi
    ret

# irq_wait_halted(rdi = vector, rsi = max halts, rdx = LAPIC-timer count per halt) -> rax =
# interrupts seen on the vector (consumed: its counter is reset).  Each HLT is bounded by a
# one-shot LAPIC timer (divide by 1, SDM Vol. 3A, 11.5.4) on WATCHDOG_VECTOR, so a lost
# interrupt cannot hang the payload; under QEMU's -icount sleep=off an idle HLT costs no wall
# time.  Record IRQ_HALTED: vector, interrupts consumed, halts used.
.globl irq_wait_halted
irq_wait_halted:
    push rbx
    push r12
    push r13
    push r14
    mov r12, rdi
    mov r13, rsi
    mov r14, rdx
    xor ebx, ebx
    mov edi, 0x3E0                      # divide configuration: by 1
    mov esi, 0xB
    call apic_write
    mov edi, 0x320                      # LVT timer: one-shot, unmasked
    mov esi, WATCHDOG_VECTOR
    call apic_write
    lea r9, [rip + irq_counts]
1:  cli
    mov eax, [r9 + r12*4]
    test eax, eax
    jnz 2f
    cmp rbx, r13
    jae 2f
    mov edi, 0x380                      # (re)arm the watchdog: initial count
    mov esi, r14d
    call apic_write
    inc rbx
    mov edi, 0x390                      # a current count of 0 or above the initial count:
    call apic_read                      # the timer is not running (or has already expired),
    test eax, eax                       # and a HLT could be unbounded
    jz 3f
    cmp eax, r14d
    ja 3f
    sti
    hlt
    jmp 1b
3:  sti
    nop                                 # one instruction after STI: a pending interrupt is taken
    jmp 1b
2:  mov edi, 0x380                      # stop the watchdog, then mask its LVT entry
    xor esi, esi
    call apic_write
    mov edi, 0x320
    mov esi, 0x10000 | WATCHDOG_VECTOR
    call apic_write
    mov eax, [r9 + r12*4]
    mov dword ptr [r9 + r12*4], 0
    mov r13, rax
    mov [rip + rec_buf], r12
    mov [rip + rec_buf + 8], r13
    mov [rip + rec_buf + 16], rbx
    mov edi, K_IRQ_HALTED
    mov esi, 3
    call emit_buf
    mov rax, r13
    pop r14
    pop r13
    pop r12
    pop rbx
    ret

isr_common:
    push rax
    push rcx
    push rdx
    push rbx
    push rbp
    push rsi
    push rdi
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15
    mov rdi, rsp
    cld
    call isr_dispatch
    pop r15
    pop r14
    pop r13
    pop r12
    pop r11
    pop r10
    pop r9
    pop r8
    pop rdi
    pop rsi
    pop rbp
    pop rbx
    pop rdx
    pop rcx
    pop rax
    add rsp, 16
    iretq

# Frame: 15 saved registers, vector (+120), error code (+128), RIP (+136), CS (+144),
# RFLAGS (+152), RSP (+160), SS (+168).
isr_dispatch:
    mov rax, [rdi + 120]
    cmp rax, 2                          # NMI: an interrupt, not a fault (SDM Vol. 3A, 6.7): count
    je .Lnmi                            # it like any vector (the host injects them, issue 14)
    cmp rax, 32
    jb .Lexception
    lea rdx, [rip + irq_counts]
    inc dword ptr [rdx + rax*4]
    mov [rip + irq_last], rax
    cmp rax, 0xFF                       # the spurious vector takes no EOI
    je 1f
    call apic_eoi
1:  ret
.Lnmi:                                  # counted; an NMI takes no EOI (SDM Vol. 3A, 11.8.5)
    lea rdx, [rip + irq_counts]
    inc dword ptr [rdx + 2*4]
    mov [rip + irq_last], rax
    ret
.Lexception:
    mov rdx, [rip + fixup_rip]
    test rdx, rdx
    jz .Lunexpected
    or rax, FAULT_FLAG
    mov [rip + fault_code], rax
    mov rax, [rdi + 128]
    mov [rip + fault_error], rax
    mov [rdi + 136], rdx
    mov rax, [rip + fixup_rsp]
    test rax, rax
    jz 2f
    mov [rdi + 160], rax
2:  mov qword ptr [rip + fixup_rip], 0
    mov qword ptr [rip + fixup_rsp], 0
    ret
.Lunexpected:
    cmp byte ptr [rip + in_exception], 0
    jne hard_stop
    mov byte ptr [rip + in_exception], 1
    mov r12, rdi
    mov edi, K_EXCEPTION
    call rec_begin
    mov rdi, [r12 + 120]
    call rec_u64
    mov rdi, [r12 + 128]
    call rec_u64
    mov rdi, [r12 + 136]
    call rec_u64
    mov rdi, cr2
    call rec_u64
    mov rdi, [r12 + 144]
    call rec_u64
    mov rdi, [r12 + 152]
    call rec_u64
    call rec_end
    mov edi, ST_EXCEPTION
    jmp finish

# ---------------------------------------------------------------------------------------------
# COM1: 16550 at 115200 8N1, FIFO on, transmit by polling LSR.THRE (bit 5).
serial_init:
    mov dx, COM1 + 1
    xor al, al
    out dx, al                          # IER: no interrupts
    mov dx, COM1 + 3
    mov al, 0x80
    out dx, al                          # LCR.DLAB
    mov dx, COM1
    mov al, 1
    out dx, al                          # divisor low: 115200 baud
    mov dx, COM1 + 1
    xor al, al
    out dx, al                          # divisor high
    mov dx, COM1 + 3
    mov al, 0x03
    out dx, al                          # 8N1, DLAB off
    mov dx, COM1 + 2
    mov al, 0xC7
    out dx, al                          # FIFO enable and clear
    in al, dx                           # IIR bits 7:6 = 11b: the 16-byte FIFOs are on (16550A)
    mov byte ptr [rip + tx_cap], 1
    and al, 0xC0
    cmp al, 0xC0
    jne 1f
    mov byte ptr [rip + tx_cap], TX_FIFO
1:  mov dx, COM1 + 4
    mov al, 0x03
    out dx, al                          # DTR | RTS
    ret

# putc(dil): preserves every register.  Characters gather in tx_buf and leave together, at the end
# of a line (every record ends with one) or when tx_buf holds what the transmitter takes after one
# poll: with the FIFOs on, LSR.THRE says the whole transmit FIFO is empty (16550A data sheet, LSR
# bit 5), so 16 characters; else 1.  One REP OUTSB sends them: under KVM a string OUT is a single
# exit to QEMU for the whole string, where an OUT per character was an exit per character (on
# the KVM-runner stand-in, inside Bochs, each exit costs milliseconds).  A string that cannot be
# sent is dropped; the checksum then exposes the damage on the host side.
putc:
    push rax
    push rcx
    push rdx
    movzx eax, byte ptr [rip + tx_len]
    lea rdx, [rip + tx_buf]
    mov [rdx + rax], dil
    inc eax
    mov [rip + tx_len], al
    cmp dil, 10
    je 1f
    cmp al, [rip + tx_cap]
    jb 2f
1:  call tx_flush
2:  pop rdx
    pop rcx
    pop rax
    ret

# tx_flush: send tx_buf[0..tx_len) once LSR.THRE is set (bounded: SERIAL_SPIN polls), then empty
# it.  Clobbers rax, rcx, rdx.
tx_flush:
    push rsi
    mov ecx, SERIAL_SPIN
    mov dx, COM1 + 5
1:  in al, dx
    test al, 0x20
    jnz 2f
    pause
    dec ecx
    jnz 1b
    jmp 3f
2:  movzx ecx, byte ptr [rip + tx_len]
    lea rsi, [rip + tx_buf]
    mov dx, COM1
    cld
    rep outsb
3:  mov byte ptr [rip + tx_len], 0
    pop rsi
    ret

# body_putc(dil): send a character that belongs to the checksummed body (CRC-32, reflected
# polynomial 0xEDB88320, as zlib computes it).
body_putc:
    push rax
    push rcx
    mov eax, [rip + rec_crc]
    movzx ecx, dil
    xor eax, ecx
    mov ecx, 8
1:  shr eax, 1
    jnc 2f
    xor eax, 0xEDB88320
2:  dec ecx
    jnz 1b
    mov [rip + rec_crc], eax
    pop rcx
    pop rax
    jmp putc

# put_hex(rdi): lower-case hex without leading zeros, as body characters.  Preserves all.
put_hex:
    push rax
    push rcx
    push rdx
    push rdi
    push rbx
    mov rbx, rdi
    mov ecx, 60
1:  mov rax, rbx
    shr rax, cl
    test al, 0xF
    jnz 2f
    sub ecx, 4
    jnz 1b
2:  mov rax, rbx
    shr rax, cl
    and eax, 0xF
    lea rdx, [rip + hexdigits]
    movzx edi, byte ptr [rdx + rax]
    call body_putc
    sub ecx, 4
    jns 2b
    pop rbx
    pop rdi
    pop rdx
    pop rcx
    pop rax
    ret

# rec_begin(edi = kind), rec_u64(rdi = value), rec_end(): one framed record.  Preserve all.
.globl rec_begin
rec_begin:
    mov dword ptr [rip + rec_crc], 0xFFFFFFFF
    push rdi
    mov edi, '@'
    call putc
    mov rdi, [rip + rec_seq]
    call put_hex
    pop rdi
    jmp rec_u64

.globl rec_u64
rec_u64:
    push rdi
    mov edi, ' '
    call body_putc
    pop rdi
    jmp put_hex

.globl rec_end
rec_end:
    push rax
    push rcx
    push rdx
    push rdi
    mov edi, '*'
    call putc
    mov eax, [rip + rec_crc]
    not eax
    mov ecx, 28
1:  mov edx, eax
    shr edx, cl
    and edx, 0xF
    lea rdi, [rip + hexdigits]
    movzx edi, byte ptr [rdi + rdx]
    call putc
    sub ecx, 4
    jns 1b
    mov edi, 10
    call putc
    inc qword ptr [rip + rec_seq]
    pop rdi
    pop rdx
    pop rcx
    pop rax
    ret

# emit_buf(edi = kind, esi = count): a record whose fields are rec_buf[0..count).  Preserves all.
.globl emit_buf
emit_buf:
    push rbx
    push r12
    push rax
    mov r12d, esi
    call rec_begin
    xor ebx, ebx
1:  cmp ebx, r12d
    jae 2f
    lea rax, [rip + rec_buf]
    mov rdi, [rax + rbx*8]
    call rec_u64
    inc ebx
    jmp 1b
2:  call rec_end
    pop rax
    pop r12
    pop rbx
    ret

emit_hello:
    mov qword ptr [rip + rec_buf], PROTOCOL_VERSION
    mov eax, [rip + boot_magic]
    mov [rip + rec_buf + 8], rax
    mov eax, [rip + boot_info]
    mov [rip + rec_buf + 16], rax
    mov rax, IMAGE_ID
    mov [rip + rec_buf + 24], rax
    mov edi, K_HELLO
    mov esi, 4
    jmp emit_buf

# ---------------------------------------------------------------------------------------------
# Guarded instructions.  fixup_rip (and fixup_rsp, when non-zero) say where an exception resumes;
# fault_code then holds FAULT_FLAG | vector and fault_error the error code.

# safe_rdmsr(ecx = msr) -> rax = value, rdx = fault code (0 when none)
.globl safe_rdmsr
safe_rdmsr:
    mov qword ptr [rip + fault_code], 0
    lea rax, [rip + 1f]
    mov [rip + fixup_rip], rax
    rdmsr
    shl rdx, 32
    or rax, rdx
    jmp 2f
1:  xor eax, eax
2:  mov qword ptr [rip + fixup_rip], 0
    mov rdx, [rip + fault_code]
    ret

# safe_wrmsr(ecx = msr, rsi = value) -> rax = fault code
.globl safe_wrmsr
safe_wrmsr:
    push rdx
    mov qword ptr [rip + fault_code], 0
    lea rax, [rip + 1f]
    mov [rip + fixup_rip], rax
    mov rax, rsi
    mov rdx, rsi
    shr rdx, 32
    wrmsr
1:  mov qword ptr [rip + fixup_rip], 0
    mov rax, [rip + fault_code]
    pop rdx
    ret

# ---------------------------------------------------------------------------------------------
# Boot probe: CPU identity, VMX capability MSRs, ACPI DMAR units, PCI functions (pci.py).
# APIC record: IA32_APIC_BASE and SVR as found, APIC ID (see apic_init).
probe_apic:
    mov rax, [rip + apic_base_found]
    mov [rip + rec_buf], rax
    mov eax, [rip + apic_svr_found]
    mov [rip + rec_buf + 8], rax
    mov eax, [rip + apic_id]
    mov [rip + rec_buf + 16], rax
    mov edi, K_APIC
    mov esi, 3
    jmp emit_buf

probe_cpu:
    push rbx
    xor eax, eax
    xor ecx, ecx
    cpuid
    mov [rip + rec_buf], rax
    mov [rip + rec_buf + 8], rbx
    mov [rip + rec_buf + 16], rdx
    mov [rip + rec_buf + 24], rcx
    mov eax, 1
    xor ecx, ecx
    cpuid
    mov [rip + rec_buf + 32], rax
    mov [rip + rec_buf + 40], rbx
    mov [rip + rec_buf + 48], rcx
    mov [rip + rec_buf + 56], rdx
    xor eax, eax
    cmp dword ptr [rip + rec_buf], 0xA  # leaf 0AH: architectural performance monitoring (SDM Vol. 3B 20.2)
    jb 3f
    mov eax, 0xA
    xor ecx, ecx
    cpuid
3:  mov [rip + rec_buf + 64], rax
    mov ebx, [rip + rec_buf + 48]       # CPUID.1:ECX, for the VMX check below
    mov edi, K_CPU
    mov esi, 9
    call emit_buf
    test ebx, 0x20                      # CPUID.1:ECX.VMX (SDM Vol. 3C, 23.6)
    jz 2f
    mov edi, 0x3A                       # IA32_FEATURE_CONTROL
    call probe_msr
    mov ebx, 0x480                      # IA32_VMX_BASIC .. IA32_VMX_VMFUNC (SDM Vol. 3D, A.1-A.11)
1:  mov edi, ebx
    call probe_msr
    inc ebx
    cmp ebx, 0x492
    jb 1b
2:  pop rbx
    ret

probe_msr:
    mov ecx, edi
    call safe_rdmsr
    mov [rip + rec_buf], rcx
    mov [rip + rec_buf + 8], rax
    mov [rip + rec_buf + 16], rdx
    mov edi, K_MSR
    mov esi, 3
    jmp emit_buf

# probe_acpi: find the RSDP with acpi_find_rsdp (acpi.py: the multiboot command line's
# acpi_rsdp=, which is how a kexec or GRUB boot of a UEFI host passes it, else the BIOS areas),
# walk the XSDT (ACPI 6.5, 5.2.8) or RSDT (5.2.7) and parse the first DMAR.  Tables beyond the
# identity map (ACPI_REACHABLE) are not touched: on a host whose firmware put one there the probe
# reports no DMAR rather than faulting (acpi_dump lists such tables as unreachable).
probe_acpi:
    push rbx
    push r12
    push r13
    push r14
    push r15
    xor edi, edi
    call acpi_find_rsdp
    test rax, rax
    jz .Lacpi_done
    mov r12d, 4                         # entry size: RSDT has 32-bit pointers
    mov r13d, [rax + 16]                # RsdtAddress (5.2.5.3)
    cmp byte ptr [rax + 15], 2          # Revision >= 2: prefer the XSDT
    jb 3f
    mov rcx, [rax + 24]
    test rcx, rcx
    jz 3f
    mov r13, rcx
    mov r12d, 8
3:  mov rax, ACPI_REACHABLE - 36
    cmp r13, rax
    ja .Lacpi_done
    mov r14d, [r13 + 4]                 # SDT length
    add r14, r13                        # end of entries
    mov rax, ACPI_REACHABLE
    cmp r14, rax
    jbe 7f
    mov r14, rax
7:  lea r15, [r13 + 36]                 # first entry
4:  lea rax, [r15 + r12]
    cmp rax, r14
    ja .Lacpi_done
    mov eax, [r15]
    cmp r12d, 8
    jne 5f
    mov rax, [r15]
5:  mov rcx, ACPI_REACHABLE - 48
    cmp rax, rcx
    ja 8f
    cmp dword ptr [rax], 0x52414D44     # "DMAR"
    je 6f
8:  add r15, r12
    jmp 4b
6:  mov rdi, rax
    call parse_dmar
.Lacpi_done:
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbx
    ret

# parse_dmar(rdi = table): one DMAR_UNIT record per DRHD (VT-d spec 8.1, 8.3), then DMAR.  A
# unit's registers are read only when its register base is inside the identity map: the payload
# maps [0, 4 GiB) (paging.build_identity_map), and a base above that would fault.  Such a unit is
# still reported, with VER/CAP/ECAP 0 and "registers read" 0 as the recorded reason.
parse_dmar:
    push rbx
    push r12
    push r13
    push r14
    mov r12, rdi
    mov r13d, [r12 + 4]
    add r13, r12                        # end of table
    mov rax, ACPI_REACHABLE
    cmp r13, rax
    jbe 0f
    mov r13, rax
0:  lea rbx, [r12 + 48]                 # first remapping structure
    xor r14d, r14d                      # DRHD count
1:  lea rax, [rbx + 4]
    cmp rax, r13
    ja 3f
    movzx ecx, word ptr [rbx + 2]       # structure length
    test ecx, ecx
    jz 3f
    cmp word ptr [rbx], 0               # type 0 = DRHD
    jne 2f
    lea rax, [rbx + 16]                 # the fields read below (8.3, table 8-5) lie inside the table
    cmp rax, r13
    ja 3f
    mov [rip + rec_buf], r14
    mov rax, [rbx + 8]                  # register base address
    mov [rip + rec_buf + 8], rax
    movzx edx, byte ptr [rbx + 4]       # flags (bit 0: INCLUDE_PCI_ALL)
    mov [rip + rec_buf + 16], rdx
    movzx edx, word ptr [rbx + 6]       # PCI segment
    mov [rip + rec_buf + 24], rdx
    xor edx, edx
    mov [rip + rec_buf + 32], rdx
    mov [rip + rec_buf + 40], rdx
    mov [rip + rec_buf + 48], rdx
    mov [rip + rec_buf + 56], rdx       # registers read: 0 = base beyond the identity map
    mov rdx, ACPI_REACHABLE - 0x20
    cmp rax, rdx
    ja 5f
    mov edx, [rax]                      # VER_REG (VT-d 11.4.1)
    mov [rip + rec_buf + 32], rdx
    mov rdx, [rax + 8]                  # CAP_REG (11.4.2)
    mov [rip + rec_buf + 40], rdx
    mov rdx, [rax + 0x10]               # ECAP_REG (11.4.3)
    mov [rip + rec_buf + 48], rdx
    mov qword ptr [rip + rec_buf + 56], 1
5:  cmp r14, 4
    jae 4f
    lea rdx, [rip + vars + 8]
    mov [rdx + r14*8], rax              # vars[1 + n] = base of unit n
4:  push rcx
    mov edi, K_DMAR_UNIT
    mov esi, 8
    call emit_buf
    pop rcx
    inc r14
2:  add rbx, rcx
    jmp 1b
3:  mov [rip + rec_buf], r12
    movzx eax, byte ptr [r12 + 36]      # host address width - 1
    mov [rip + rec_buf + 8], rax
    movzx eax, byte ptr [r12 + 37]      # flags (bit 0 INTR_REMAP, bit 1 X2APIC_OPT_OUT)
    mov [rip + rec_buf + 16], rax
    mov [rip + rec_buf + 24], r14
    mov edi, K_DMAR
    mov esi, 4
    call emit_buf
    pop r14
    pop r13
    pop r12
    pop rbx
    ret

# ---------------------------------------------------------------------------------------------
# Sized accesses: rdi = address or port, rsi = value, edx = size (1, 2, 4, 8); reads return rax.
mem_read_sized:
    cmp edx, 1
    je 1f
    cmp edx, 2
    je 2f
    cmp edx, 4
    je 4f
    mov rax, [rdi]
    ret
1:  movzx eax, byte ptr [rdi]
    ret
2:  movzx eax, word ptr [rdi]
    ret
4:  mov eax, [rdi]
    ret

mem_write_sized:
    cmp edx, 1
    je 1f
    cmp edx, 2
    je 2f
    cmp edx, 4
    je 4f
    mov [rdi], rsi
    ret
1:  mov [rdi], sil
    ret
2:  mov [rdi], si
    ret
4:  mov [rdi], esi
    ret

io_read_sized:
    push rdx
    mov ecx, edx
    mov edx, edi
    xor eax, eax
    cmp ecx, 1
    je 1f
    cmp ecx, 2
    je 2f
    in eax, dx
    jmp 3f
1:  in al, dx
    jmp 3f
2:  in ax, dx
3:  pop rdx
    ret

io_write_sized:
    push rdx
    mov ecx, edx
    mov edx, edi
    mov rax, rsi
    cmp ecx, 1
    je 1f
    cmp ecx, 2
    je 2f
    out dx, eax
    jmp 3f
1:  out dx, al
    jmp 3f
2:  out dx, ax
3:  pop rdx
    ret

# ---------------------------------------------------------------------------------------------
# The step interpreter.  rbx = step, r12 = index, r13 = flags, r14 = argument a (plus base var).
# A handler returns its result in rax (stored when the STORE flag is set).  With the GUARD flag an
# exception inside the step is reported as STEP_FAULT and the walk goes on.
run_steps:
    push rbx
    push r12
    push r13
    push r14
    push r15
    lea rbx, [rip + steps]
    xor r12d, r12d
.Lstep:
    mov rax, [rbx]
    test rax, rax
    jz .Lsteps_done
    cmp rax, OP_COUNT
    jae .Lbad_step
    mov r13, [rbx + 8]
    mov r14, [rbx + 16]
    test r13, F_USE_BASE
    jz 1f
    mov ecx, r13d
    and ecx, 0xF
    lea rdx, [rip + vars]
    add r14, [rdx + rcx*8]
1:  test r13, F_GUARD
    jz 2f
    mov qword ptr [rip + fault_code], 0
    lea rcx, [rip + .Lstep_faulted]
    mov [rip + fixup_rip], rcx
    mov [rip + fixup_rsp], rsp          # resume at .Lstep_faulted on this stack
2:  lea rdx, [rip + op_table]
    call qword ptr [rdx + rax*8]
    mov qword ptr [rip + fixup_rip], 0
    mov qword ptr [rip + fixup_rsp], 0
    test r13, F_STORE
    jz .Lstep_next
    mov ecx, r13d
    shr ecx, STORE_SHIFT
    and ecx, 0xF
    lea rdx, [rip + vars]
    mov [rdx + rcx*8], rax
.Lstep_next:
    add rbx, 64
    inc r12
    mov [rip + steps_done], r12         # steps walked so far: END's third field
    jmp .Lstep
.Lstep_faulted:
    mov [rip + rec_buf], r12
    mov rax, [rip + fault_code]
    mov [rip + rec_buf + 8], rax
    mov rax, [rip + fault_error]
    mov [rip + rec_buf + 16], rax
    mov edi, K_STEP_FAULT
    mov esi, 3
    call emit_buf
    jmp .Lstep_next
.Lsteps_done:
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbx
    ret
.Lbad_step:
    mov [rip + rec_buf], r12
    mov [rip + rec_buf + 8], rax
    mov edi, K_STEP_FAULT
    mov esi, 2
    call emit_buf
    mov edi, ST_BAD_STEP
    jmp finish

# Helpers for handlers.
step_size:                              # -> edx = access size from the flags
    mov rdx, r13
    shr rdx, SIZE_SHIFT
    and edx, 0xF
    ret

# emit3(edi = kind, rsi, rdx): a record (step, rsi, rdx)
emit_step2:
    mov [rip + rec_buf], r12
    mov [rip + rec_buf + 8], rsi
    mov [rip + rec_buf + 16], rdx
    mov esi, 3
    jmp emit_buf

op_end:
    ret

op_mmio_write:
    mov rdi, r14
    mov rsi, [rbx + 24]
    call step_size
    call mem_write_sized
    xor eax, eax
    ret

op_mmio_read:
    mov rdi, r14
    call step_size
    call mem_read_sized
    jmp report_read

op_io_write:
    mov rdi, r14
    mov rsi, [rbx + 24]
    call step_size
    call io_write_sized
    xor eax, eax
    ret

op_io_read:
    mov rdi, r14
    call step_size
    call io_read_sized
report_read:
    test r13, F_QUIET
    jnz 1f
    push rax
    mov rsi, rax
    xor edx, edx
    mov edi, K_READ
    call emit_step2
    pop rax
1:  ret

op_poll:
    xor r15d, r15d
    call poll_begin
1:  mov rdi, r14
    call step_size
    test r13, F_IO_SPACE
    jnz 2f
    call mem_read_sized
    jmp 3f
2:  call io_read_sized
3:  mov rcx, rax
    and rcx, [rbx + 24]
    cmp rcx, [rbx + 32]
    je 5f
    inc r15
    cmp r15, [rbx + 40]
    jae 4f
    call poll_expired
    jae 4f
    pause
    jmp 1b
4:  xor ecx, ecx                        # not reached
    jmp 6f
5:  mov ecx, 1
6:  push rax
    push rcx
    mov [rip + rec_buf], r12
    mov [rip + rec_buf + 8], rax
    mov [rip + rec_buf + 16], r15
    mov [rip + rec_buf + 24], rcx
    mov edi, K_POLL
    mov esi, 4
    call emit_buf
    pop rcx
    pop rax
    test ecx, ecx
    jnz 7f
    test r13, F_ABORT_ON_TIMEOUT
    jz 7f
    mov edi, ST_POLL_TIMEOUT
    jmp finish
7:  ret

# poll_begin(): the current poll's clock starts (TSC).  poll_expired(): flags as for an unsigned
# compare of the ticks since poll_begin with POLL_TSC_BOUND ("jae" = expired).  Both keep every
# register; polls do not nest.
.globl poll_begin
poll_begin:
    push rax
    push rdx
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov [rip + poll_t0], rax
    pop rdx
    pop rax
    ret

.globl poll_expired
poll_expired:
    push rax
    push rdx
    rdtsc
    shl rdx, 32
    or rax, rdx
    sub rax, [rip + poll_t0]
    movabs rdx, POLL_TSC_BOUND
    cmp rax, rdx
    pop rdx
    pop rax
    ret

op_rdmsr:
    mov ecx, r14d
    call safe_rdmsr
    push rax
    test r13, F_QUIET
    jnz 1f
    mov [rip + rec_buf], r14
    mov [rip + rec_buf + 8], rax
    mov [rip + rec_buf + 16], rdx
    mov [rip + rec_buf + 24], r12       # the step, so its value can be found by step
    mov edi, K_MSR
    mov esi, 4
    call emit_buf
1:  pop rax
    ret

op_wrmsr:
    mov ecx, r14d
    mov rsi, [rbx + 24]
    call safe_wrmsr
    test rax, rax
    jz 1f
    mov rsi, rax
    mov rdx, [rip + fault_error]
    mov edi, K_STEP_FAULT
    call emit_step2
1:  xor eax, eax
    ret

op_cpuid:
    push rbx
    mov eax, r14d
    mov ecx, [rbx + 24]
    cpuid
    mov [rip + rec_buf + 24], rax
    mov [rip + rec_buf + 32], rbx
    mov [rip + rec_buf + 40], rcx
    mov [rip + rec_buf + 48], rdx
    pop rbx
    mov [rip + rec_buf], r12
    mov [rip + rec_buf + 8], r14
    mov rax, [rbx + 24]
    mov [rip + rec_buf + 16], rax
    mov edi, K_CPUID
    mov esi, 7
    call emit_buf
    mov rax, [rip + rec_buf + 24]
    ret

op_mem_read:
    mov [rip + rec_buf], r12
    mov [rip + rec_buf + 8], r14
    mov rcx, [rbx + 24]
    xor edx, edx
    lea rdi, [rip + rec_buf + 16]
1:  mov rax, [r14 + rdx*8]
    mov [rdi + rdx*8], rax
    inc edx
    cmp rdx, rcx
    jb 1b
    lea esi, [rcx + 2]
    mov edi, K_MEM
    call emit_buf
    mov rax, [r14]
    ret

op_mem_fill:
    mov rdi, r14
    mov rcx, [rbx + 24]
    shr rcx, 3
    mov rax, [rbx + 32]
    rep stosq
    xor eax, eax
    ret

op_mem_compare:
    mov rcx, [rbx + 24]
    shr rcx, 3
    mov r8, [rbx + 32]
    xor r9d, r9d                        # mismatches
    mov r10, -1                         # first mismatching offset
    xor r11d, r11d                      # value found there
    xor edx, edx
1:  cmp rdx, rcx
    jae 3f
    mov rax, [r14 + rdx*8]
    cmp rax, r8
    je 2f
    inc r9
    cmp r10, -1
    jne 2f
    lea r10, [rdx*8]
    mov r11, rax
2:  inc rdx
    jmp 1b
3:  mov [rip + rec_buf], r12
    mov [rip + rec_buf + 8], r9
    mov [rip + rec_buf + 16], r10
    mov [rip + rec_buf + 24], r11
    mov edi, K_MEMCMP
    mov esi, 4
    call emit_buf
    mov rax, r9
    ret

op_mem_copy:
    mov rdi, r14
    mov rsi, [rbx + 24]
    mov rcx, [rbx + 32]
    rep movsb
    xor eax, eax
    ret

op_call:
    mov rdi, [rbx + 24]
    mov rsi, [rbx + 32]
    mov rdx, [rbx + 40]
    call r14
    test r13, F_QUIET
    jnz 1f
    push rax
    mov rsi, rax
    xor edx, edx
    mov edi, K_CALL
    call emit_step2
    pop rax
1:  ret

op_mark:
    mov rsi, r14
    xor edx, edx
    mov edi, K_MARK
    mov [rip + rec_buf], r12
    mov [rip + rec_buf + 8], rsi
    mov esi, 2
    call emit_buf
    xor eax, eax
    ret

# wait_irq: a = vector, b = max iterations; interrupts are open only while waiting.
op_wait_irq:
    xor r15d, r15d
    lea rdx, [rip + irq_counts]
1:  mov eax, [rdx + r14*4]
    test eax, eax
    jnz 3f
    inc r15
    cmp r15, [rbx + 24]
    jae 2f
    sti
    pause
    cli
    jmp 1b
2:  xor ecx, ecx
    jmp 4f
3:  mov ecx, 1
4:  mov [rip + rec_buf], r12
    mov [rip + rec_buf + 8], r14
    mov [rip + rec_buf + 16], rax
    mov [rip + rec_buf + 24], r15
    mov [rip + rec_buf + 32], rcx
    push rcx
    mov edi, K_IRQ
    mov esi, 5
    call emit_buf
    pop rcx
    test ecx, ecx
    jnz 5f
    test r13, F_ABORT_ON_TIMEOUT
    jz 5f
    mov edi, ST_POLL_TIMEOUT
    jmp finish
5:  mov eax, ecx
    ret

op_delay:
    mov rcx, r14
    test rcx, rcx
    jz 2f
1:  pause
    dec rcx
    jnz 1b
2:  xor eax, eax
    ret

op_set_var:
    mov rax, r14
    ret

# sync: a = max receiver polls, b..e = the point's name.  Record SYNC(step, name), then wait for
# the host's release token (steps.release_token: '@', 'G', two hex digits of the SYNC record's
# sequence number) on COM1's receiver: LSR.DR (bit 0) says a byte is in RBR (16550 data sheet,
# line status register).  A byte that breaks the token restarts the match.  Record
# SYNC_DONE(step, polls, ok); when the bound runs out the run ends (END status POLL_TIMEOUT).
op_sync:
    mov rax, [rip + rec_seq]            # the SYNC record's number, before emit_buf counts it
    lea rdx, [rip + hexdigits]
    mov byte ptr [rip + sync_token], '@'
    mov byte ptr [rip + sync_token + 1], 'G'
    mov ecx, eax
    shr ecx, 4
    and ecx, 0xF
    mov cl, [rdx + rcx]
    mov [rip + sync_token + 2], cl
    mov ecx, eax
    and ecx, 0xF
    mov cl, [rdx + rcx]
    mov [rip + sync_token + 3], cl
    mov [rip + rec_buf], r12
    lea rdx, [rip + rec_buf]
    xor ecx, ecx                        # name qwords: up to four, the unused ones are zero
1:  mov rax, [rbx + 24 + rcx*8]
    mov [rdx + 8 + rcx*8], rax
    inc ecx
    cmp ecx, 4
    jb 1b
    mov esi, 5
2:  cmp esi, 2                          # drop trailing zero name qwords (the first always stays)
    jbe 3f
    cmp qword ptr [rdx + rsi*8 - 8], 0
    jne 3f
    dec esi
    jmp 2b
3:  mov edi, K_SYNC
    call emit_buf
    xor r15d, r15d                      # polls without a byte
    xor r8d, r8d                        # token bytes matched
4:  mov dx, COM1 + 5
    in al, dx
    test al, 1
    jnz 5f
    inc r15
    cmp r15, r14
    jae 7f
    pause
    jmp 4b
5:  mov dx, COM1
    in al, dx
    lea rcx, [rip + sync_token]
    cmp al, [rcx + r8]
    je 6f
    xor r8d, r8d
    cmp al, '@'
    jne 4b
    mov r8d, 1
    jmp 4b
6:  inc r8d
    cmp r8d, 4
    jb 4b
    mov ecx, 1
    jmp 8f
7:  xor ecx, ecx
8:  push rcx
    mov [rip + rec_buf], r12
    mov [rip + rec_buf + 8], r15
    mov [rip + rec_buf + 16], rcx
    mov edi, K_SYNC_DONE
    mov esi, 3
    call emit_buf
    pop rcx
    test ecx, ecx
    jnz 9f
    mov edi, ST_POLL_TIMEOUT
    jmp finish
9:  xor eax, eax
    ret

# ---------------------------------------------------------------------------------------------
.section .data
.balign 16
gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF            # 0x08: 64-bit code
    .quad 0x00CF92000000FFFF            # 0x10: data
    .quad 0x00CF9A000000FFFF            # 0x18: 32-bit code
    .quad 0x00CF92000000FFFF            # 0x20: data (spare)
gdt_tss:
    .quad 0, 0                          # 0x28: TSS, filled by tss_init
gdt_end:
.balign 8
    .word 0
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt
.balign 8
    .word 0, 0, 0
idt_ptr:
    .word 4095
    .quad idt
hexdigits:
    .ascii "0123456789abcdef"

.section .bss
.balign 4096
.globl vars
vars:        .skip 16 * 8
rec_buf:     .skip 16 * 8
.globl irq_counts
irq_counts:  .skip 256 * 4
irq_last:    .skip 8
.globl rec_seq, steps_done        # for scenario routines that frame records of their own
rec_seq:     .skip 8
steps_done:  .skip 8
poll_t0:     .skip 8                 # TSC at the start of the current poll (poll_begin)
rec_crc:     .skip 8
.globl fixup_rip, fixup_rsp, fault_code, fault_error
fixup_rip:   .skip 8
fixup_rsp:   .skip 8
fault_code:  .skip 8
fault_error: .skip 8
boot_magic:  .skip 8
boot_info:   .skip 8
x2apic_mode: .skip 8
.globl apic_id
apic_id:     .skip 8
apic_base_found: .skip 8
apic_svr_found: .skip 8
in_exception: .skip 8
sync_token:  .skip 8
tx_cap:      .skip 1                 # characters sent per LSR.THRE poll (16 with the FIFOs, else 1)
tx_len:      .skip 1                 # characters waiting in tx_buf
tx_buf:      .skip TX_FIFO
.balign 16
tss:         .skip 104
.balign 4096
idt:         .skip 4096
ist1_stack:  .skip 8192
ist1_top:
stack:       .skip 65536
.globl stack_top
stack_top:
"""


def engine_asm(pml4: int, image_id: int, probe: bool = True, prior_state: Sequence[str] = ()) -> str:
    """The whole engine as one assembler source (steps and scenario code are appended).

    ``prior_state`` is 64-bit code run before the engine initialises anything: the state firmware
    or a kexec'ing OS leaves behind, for tests of the engine's robustness."""
    prior = "\n".join(["# ---- state left behind by earlier software (Scenario.prior_state)",
                        ".section .text", "prior_state:", *(f"    {line}" for line in prior_state),
                        "    ret"])
    return (".intel_syntax noprefix\n" + constants(pml4, image_id, probe) + ENGINE + prior + "\n"
            + ".section .text\n" + PCI_ENGINE_ASM + "\n" + RSDP_FIND_ASM + "\n" + isr_stubs() + op_table())
