"""The VMM routines, as GNU as text appended to the engine (Intel syntax, 64-bit).

Routines are called through the engine's ``call`` step (rdi, rsi, rdx in; rax out) and keep the
SysV callee-saved registers.  They emit records of their own kinds (``Kind`` below, 0x50..0x5f).

* ``vmx_on(region)``: IA32_FEATURE_CONTROL (SDM Vol. 3C, 24.7), CR0/CR4 fixed bits (24.8, A.7/A.8),
  the revision identifier (A.1) and VMXON.
* ``vmx_insn(op, a, b)``: one VMX instruction (VMXON, VMXOFF, VMCLEAR, VMPTRLD, VMPTRST, VMREAD,
  VMWRITE, INVEPT, INVVPID) with its outcome (VMsucceed, VMfailInvalid, VMfailValid + error,
  30.2) recorded.
* ``vmcs_load(table)``: VMWRITE every (encoding, value, mode) triple of a Python-built table.
* ``vmx_run(actions, max_exits, flags)``: VMLAUNCH, then the exit loop: record the exit, apply the
  scenario's action for its reason, VMRESUME, until an action stops it or the bound is reached.
"""

from __future__ import annotations

import enum

from .fields import F, MAX_EXIT_REASON


class Kind(enum.IntEnum):
    """Record kinds of the VMX extension (the range 0x50..0x5f)."""

    VMX_EXIT = 0x50     # n, reason, qualification, guest RIP, instruction length, instruction info,
                        # guest linear address, guest physical address, interruption info,
                        # interruption error code, IDT-vectoring info, TSC ticks entry -> exit
    VMX_REGS = 0x51     # n, guest rax, rbx, rcx, rdx, rsi, rdi (at that exit)
    VMX_INSN = 0x52     # op, operand, status (0 ok, 1 VMfailInvalid, 2 VMfailValid), error, value
    VMX_STOP = 0x53     # exits, why (StopWhy), last exit reason


class Op(enum.IntEnum):
    """Operations of ``vmx_insn`` (and, for failures reported by ``vmx_run``, LAUNCH/RESUME)."""

    VMXON = 1
    VMXOFF = 2
    VMCLEAR = 3
    VMPTRLD = 4
    VMPTRST = 5
    VMREAD = 6
    VMWRITE = 7
    INVEPT = 8
    INVVPID = 9
    VMLAUNCH = 10
    VMRESUME = 11
    SET_REVISION = 12   # not an instruction: write a revision identifier into a region
    VMX_ON = 13         # vmx_on's preparatory checks failed (value: 0x10 no VMX, 0x11 locked off)


class StopWhy(enum.IntEnum):
    ACTION = 0          # the scenario's action for the exit said stop
    EXIT_LIMIT = 1      # max_exits reached
    ENTRY_VMFAIL = 2    # VMLAUNCH / VMRESUME failed as an instruction (VMfailInvalid / VMfailValid)
    ENTRY_FAILURE = 3   # VM-entry failure: an exit with reason bit 31 (26.8)


class Act(enum.IntFlag):
    """What ``vmx_run`` does after an exit (flags of an action entry, applied in this order)."""

    STOP = 1 << 0
    SKIP = 1 << 1       # guest RIP += VM-exit instruction length
    CPUID = 1 << 2      # guest rax/rbx/rcx/rdx := the action's values
    VMWRITE = 1 << 3    # VMWRITE field := value
    MEM_OR = 1 << 4     # qword at address |= bits (e.g. grant an EPT permission)
    INVEPT = 1 << 5     # INVEPT all-context after MEM_AND / MEM_OR
    INJECT = 1 << 6     # VM-entry interruption info (and error code, instruction length)
    KEEP_LENGTH = 1 << 7  # with INJECT: keep the VM-entry instruction length a VMWRITE gave
    MEM_AND = 1 << 8    # qword at address &= ~bits (revoke an EPT permission), before MEM_OR
    INVEPT_SINGLE = 1 << 9  # after MEM_AND / MEM_OR: INVEPT single-context of the current EPTP


ACTION_WORDS = 8            # flags, field, value, address, bits, cpuid a|b, cpuid c|d, inject
REGS_WORDS = 16             # initial guest rax..r15 before the action entries
# Modes of a vmcs_load table entry: how the value is formed at run time.
MODE_IMM, MODE_CR0_OR, MODE_CR4_OR = 0, 1, 2
TABLE_END = 0xFFFF_FFFF_FFFF_FFFF

EXIT_FIELDS = (F.EXIT_REASON, F.EXIT_QUALIFICATION, F.GUEST_RIP, F.EXIT_INSTR_LEN, F.EXIT_INSTR_INFO,
               F.GUEST_LINEAR_ADDR, F.GUEST_PHYSICAL_ADDR, F.EXIT_INTR_INFO, F.EXIT_INTR_ERROR,
               F.IDT_VECTORING_INFO)


def _read_exit_fields() -> str:
    out = []
    for i, enc in enumerate(EXIT_FIELDS, start=1):
        out += [f"    mov ecx, {int(enc):#x}", "    xor eax, eax", "    vmread rax, rcx",
                f"    mov [rip + rec_buf + {8 * i}], rax"]
    return "\n".join(out)


def _guest_handlers() -> str:
    """Guest IDT handlers: vector v reports itself with ``mov eax, 0x1000 | v; vmcall``: the error
    code, if the CPU pushed one, in rbx, and the return RIP of the frame in rcx (an injected
    software interrupt or exception returns past its VM-entry instruction length, 27.6.1.1)."""
    from ..engine import ERROR_CODE_VECTORS

    out = [".section .text", ".balign 16"]
    for v in range(256):
        out.append(f"vmx_gh_{v}:")
        out.append(f"    mov eax, {0x1000 | v:#x}")
        if v in ERROR_CODE_VECTORS:
            out += ["    mov rbx, [rsp]", "    mov rcx, [rsp + 8]"]
        else:
            out.append("    mov rcx, [rsp]")
        out += ["    vmcall", "    hlt"]
    out += [".section .data", ".balign 8", "vmx_gh_table:"]
    out += [f"    .quad vmx_gh_{v}" for v in range(256)]
    return "\n".join(out) + "\n"


VMM_ASM = rf"""
.set K_VMX_EXIT, {int(Kind.VMX_EXIT):#x}
.set K_VMX_REGS, {int(Kind.VMX_REGS):#x}
.set K_VMX_INSN, {int(Kind.VMX_INSN):#x}
.set K_VMX_STOP, {int(Kind.VMX_STOP):#x}
.set VMX_MAX_REASON, {MAX_EXIT_REASON}
.set VMX_ACT_BASE, {REGS_WORDS * 8}
.set VMX_ACT_SHIFT, 6

.section .text
.code64

# vmx_report(edi = op, rsi = operand, r11 = RFLAGS after the instruction, edx = verbose,
#            r8 = value) -> rax = status.  VMfailInvalid: CF=1; VMfailValid: ZF=1 and the
# VM-instruction error field says why (SDM Vol. 3C, 30.2, 31.4).
vmx_report:
    push rbx
    xor ebx, ebx                        # error number
    xor eax, eax
    test r11, 1
    jz 1f
    mov eax, 1
    jmp 2f
1:  test r11, 0x40
    jz 2f
    push rcx
    push rax
    mov ecx, {int(F.VM_INSTRUCTION_ERROR):#x}
    vmread rbx, rcx
    pop rax
    pop rcx
    mov eax, 2
2:  test eax, eax
    jnz 3f
    test edx, edx
    jz 4f
3:  mov [rip + rec_buf], rdi
    mov [rip + rec_buf + 8], rsi
    mov [rip + rec_buf + 16], rax
    mov [rip + rec_buf + 24], rbx
    mov [rip + rec_buf + 32], r8
    push rax
    mov edi, K_VMX_INSN
    mov esi, 5
    call emit_buf
    pop rax
4:  pop rbx
    ret

# vmx_on(rdi = VMXON region) -> rax = 0 or VMX status / 0x10 (no VMX) / 0x11 (disabled, locked)
.globl vmx_on
vmx_on:
    push rbx
    push r12
    mov r12, rdi
    mov eax, 1
    xor ecx, ecx
    cpuid
    test ecx, 0x20                      # CPUID.1:ECX.VMX
    mov eax, 0x10
    jz .Lvmx_on_refused
    mov ecx, 0x3A                       # IA32_FEATURE_CONTROL (24.7)
    rdmsr
    test eax, 1                         # locked?
    jnz 1f
    or eax, 5                           # lock, VMXON outside SMX
    wrmsr
    jmp 2f
1:  test eax, 4
    mov eax, 0x11
    jz .Lvmx_on_refused
2:  mov ecx, 0x486                      # CR0 fixed bits (A.7)
    rdmsr
    shl rdx, 32
    or rax, rdx
    mov r8, rax
    mov ecx, 0x487
    rdmsr
    shl rdx, 32
    or rax, rdx
    mov rcx, cr0
    or rcx, r8
    and rcx, rax
    mov cr0, rcx
    mov ecx, 0x488                      # CR4 fixed bits (A.8), including CR4.VMXE
    rdmsr
    shl rdx, 32
    or rax, rdx
    mov r8, rax
    mov ecx, 0x489
    rdmsr
    shl rdx, 32
    or rax, rdx
    mov rcx, cr4
    or rcx, r8
    and rcx, rax
    mov cr4, rcx
    mov ecx, 0x480                      # revision identifier, IA32_VMX_BASIC[30:0] (A.1)
    rdmsr
    and eax, 0x7FFFFFFF
    mov [r12], eax
    mov [rip + vmx_operand], r12
    vmxon [rip + vmx_operand]
    pushfq
    pop r11
    mov edi, {int(Op.VMXON)}
    mov rsi, r12
    mov edx, 1
    xor r8d, r8d
    call vmx_report
    pop r12
    pop rbx
    ret
.Lvmx_on_refused:
    mov [rip + rec_buf], rax
    mov qword ptr [rip + rec_buf + 8], {int(Op.VMX_ON)}
    push rax
    mov edi, K_VMX_INSN
    mov esi, 2
    call emit_buf
    pop rax
    pop r12
    pop rbx
    ret

# vmx_insn(rdi = op, rsi = a, rdx = b) -> rax = status; always recorded (VMX_INSN).
.globl vmx_insn
vmx_insn:
    push rbx
    push r12
    push r13
    mov r12, rdi
    mov r13, rsi
    mov rbx, rdx
    mov [rip + vmx_operand], rsi
    xor r8d, r8d
    xor r11d, r11d
    cmp edi, {int(Op.VMXON)}
    je .Li_vmxon
    cmp edi, {int(Op.VMXOFF)}
    je .Li_vmxoff
    cmp edi, {int(Op.VMCLEAR)}
    je .Li_vmclear
    cmp edi, {int(Op.VMPTRLD)}
    je .Li_vmptrld
    cmp edi, {int(Op.VMPTRST)}
    je .Li_vmptrst
    cmp edi, {int(Op.VMREAD)}
    je .Li_vmread
    cmp edi, {int(Op.VMWRITE)}
    je .Li_vmwrite
    cmp edi, {int(Op.INVEPT)}
    je .Li_invept
    cmp edi, {int(Op.INVVPID)}
    je .Li_invvpid
    cmp edi, {int(Op.SET_REVISION)}
    je .Li_revision
    mov r11, 0x41                       # unknown op: report as failed
    jmp .Li_done
.Li_vmxon:
    vmxon [rip + vmx_operand]
    jmp .Li_flags
.Li_vmxoff:
    vmxoff
    jmp .Li_flags
.Li_vmclear:
    vmclear [rip + vmx_operand]
    jmp .Li_flags
.Li_vmptrld:
    vmptrld [rip + vmx_operand]
    jmp .Li_flags
.Li_vmptrst:
    mov qword ptr [rip + vmx_operand], 0
    vmptrst [rip + vmx_operand]
    pushfq
    pop r11
    mov r8, [rip + vmx_operand]
    jmp .Li_done
.Li_vmread:
    xor eax, eax
    vmread rax, r13
    pushfq
    pop r11
    mov r8, rax
    jmp .Li_done
.Li_vmwrite:
    vmwrite r13, rbx
    jmp .Li_flags
.Li_invept:
    invept r13, [rbx]
    jmp .Li_flags
.Li_invvpid:
    invvpid r13, [rbx]
    jmp .Li_flags
.Li_revision:
    mov r8, rbx
    test rbx, rbx
    jnz 1f
    mov ecx, 0x480
    rdmsr
    and eax, 0x7FFFFFFF
    mov r8, rax
1:  mov [r13], r8d
    jmp .Li_done
.Li_flags:
    pushfq
    pop r11
.Li_done:
    mov rdi, r12
    mov rsi, r13
    mov edx, 1
    call vmx_report
    pop r13
    pop r12
    pop rbx
    ret

# vmcs_load(rdi = table of (encoding, value, mode)) -> rax = number of failed VMWRITEs (each one
# recorded).  Modes: 0 immediate, 1 current CR0 | value, 2 current CR4 | value.
.globl vmcs_load
vmcs_load:
    push rbx
    push r12
    push r13
    mov rbx, rdi
    xor r12d, r12d
1:  mov r13, [rbx]
    cmp r13, -1
    je 9f
    mov rax, [rbx + 8]
    mov rcx, [rbx + 16]
    cmp ecx, 1
    jne 2f
    mov rdx, cr0
    or rax, rdx
2:  cmp ecx, 2
    jne 3f
    mov rdx, cr4
    or rax, rdx
3:  vmwrite r13, rax
    pushfq
    pop r11
    mov r8, rax
    mov edi, {int(Op.VMWRITE)}
    mov rsi, r13
    xor edx, edx
    call vmx_report
    test eax, eax
    jz 4f
    inc r12
4:  add rbx, 24
    jmp 1b
9:  mov rax, r12
    pop r13
    pop r12
    pop rbx
    ret


# vmx_self_ipi(edi = vector): software-enable the local APIC and send a fixed, edge-triggered
# self-IPI (SDM Vol. 3A, 11.6.1); it stays pending while the host runs with IF = 0.
.globl vmx_self_ipi
vmx_self_ipi:
    push rdx
    cmp dword ptr [rip + x2apic_mode], 0
    jne 1f
    mov rax, LAPIC_BASE
    mov dword ptr [rax + 0xF0], 0x1FF   # SVR: APIC enabled, spurious vector 0xFF
    mov ecx, edi
    or ecx, 0x40000                     # destination shorthand: self
    mov [rax + 0x300], ecx              # ICR low
    jmp 2f
1:  mov ecx, 0x80F                      # x2APIC SVR
    mov eax, 0x1FF
    xor edx, edx
    wrmsr
    mov ecx, 0x83F                      # x2APIC SELF IPI
    mov eax, edi
    wrmsr
2:  pop rdx
    xor eax, eax
    ret

# vmx_run(rdi = action block, rsi = max exits, rdx = flags; bit 0: enter with VMRESUME, bit 1:
#   keep the guest registers as the previous run left them instead of the block's initial ones)
#   -> rax = number of exits.  Ends with a VMX_STOP record.
.globl vmx_run
vmx_run:
    push rbx
    push rbp
    push r12
    push r13
    push r14
    push r15
    mov [rip + vmx_actions], rdi
    mov [rip + vmx_max_exits], rsi
    mov r8, rdx
    and edx, 1
    mov [rip + vmx_use_resume], rdx
    mov qword ptr [rip + vmx_exits], 0
    test r8d, 2
    jnz 2f
    lea rax, [rip + vmx_gregs]
    xor ecx, ecx
1:  mov rdx, [rdi + rcx*8]
    mov [rax + rcx*8], rdx
    inc ecx
    cmp ecx, 16
    jb 1b
2:  mov ecx, {int(F.HOST_RIP):#x}
    lea rax, [rip + vmx_exit_entry]
    vmwrite rcx, rax
.Lvmx_enter:
    mov ecx, {int(F.HOST_RSP):#x}
    vmwrite rcx, rsp
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov [rip + vmx_tsc0], rax
    mov rbx, [rip + vmx_gregs + 8]
    mov rcx, [rip + vmx_gregs + 16]
    mov rdx, [rip + vmx_gregs + 24]
    mov rsi, [rip + vmx_gregs + 32]
    mov rdi, [rip + vmx_gregs + 40]
    mov rbp, [rip + vmx_gregs + 48]
    mov r8, [rip + vmx_gregs + 64]
    mov r9, [rip + vmx_gregs + 72]
    mov r10, [rip + vmx_gregs + 80]
    mov r11, [rip + vmx_gregs + 88]
    mov r12, [rip + vmx_gregs + 96]
    mov r13, [rip + vmx_gregs + 104]
    mov r14, [rip + vmx_gregs + 112]
    mov r15, [rip + vmx_gregs + 120]
    cmp qword ptr [rip + vmx_use_resume], 0
    mov rax, [rip + vmx_gregs]
    jne .Lvmx_do_resume
    vmlaunch
    pushfq
    pop r11
    mov edi, {int(Op.VMLAUNCH)}
    jmp .Lvmx_entry_failed
.Lvmx_do_resume:
    vmresume
    pushfq
    pop r11
    mov edi, {int(Op.VMRESUME)}
.Lvmx_entry_failed:
    xor esi, esi
    mov edx, 1
    xor r8d, r8d
    call vmx_report
    mov esi, {int(StopWhy.ENTRY_VMFAIL)}
    xor edx, edx
    jmp .Lvmx_stop

.balign 16
vmx_exit_entry:
    mov [rip + vmx_gregs], rax
    mov [rip + vmx_gregs + 8], rbx
    mov [rip + vmx_gregs + 16], rcx
    mov [rip + vmx_gregs + 24], rdx
    mov [rip + vmx_gregs + 32], rsi
    mov [rip + vmx_gregs + 40], rdi
    mov [rip + vmx_gregs + 48], rbp
    mov [rip + vmx_gregs + 64], r8
    mov [rip + vmx_gregs + 72], r9
    mov [rip + vmx_gregs + 80], r10
    mov [rip + vmx_gregs + 88], r11
    mov [rip + vmx_gregs + 96], r12
    mov [rip + vmx_gregs + 104], r13
    mov [rip + vmx_gregs + 112], r14
    mov [rip + vmx_gregs + 120], r15
    rdtsc
    shl rdx, 32
    or rax, rdx
    sub rax, [rip + vmx_tsc0]
    mov [rip + rec_buf + 88], rax
    mov rax, [rip + vmx_exits]
    mov [rip + rec_buf], rax
{_read_exit_fields()}
    mov rax, [rip + rec_buf + 8]
    mov [rip + vmx_reason], rax
    mov rax, [rip + rec_buf + 32]
    mov [rip + vmx_exit_len], rax
    mov edi, K_VMX_EXIT
    mov esi, 12
    call emit_buf
    mov rax, [rip + vmx_exits]
    mov [rip + rec_buf], rax
    lea rsi, [rip + vmx_gregs]
    mov rax, [rsi]
    mov [rip + rec_buf + 8], rax
    mov rax, [rsi + 8]
    mov [rip + rec_buf + 16], rax
    mov rax, [rsi + 16]
    mov [rip + rec_buf + 24], rax
    mov rax, [rsi + 24]
    mov [rip + rec_buf + 32], rax
    mov rax, [rsi + 32]
    mov [rip + rec_buf + 40], rax
    mov rax, [rsi + 40]
    mov [rip + rec_buf + 48], rax
    mov edi, K_VMX_REGS
    mov esi, 7
    call emit_buf
    inc qword ptr [rip + vmx_exits]
    mov qword ptr [rip + vmx_use_resume], 1
    mov rdx, [rip + vmx_reason]
    mov esi, {int(StopWhy.ENTRY_FAILURE)}
    bt edx, 31
    jc .Lvmx_stop
    movzx eax, dx
    mov esi, {int(StopWhy.ACTION)}
    cmp eax, VMX_MAX_REASON
    jae .Lvmx_stop
    shl rax, VMX_ACT_SHIFT
    add rax, VMX_ACT_BASE
    add rax, [rip + vmx_actions]
    mov rbx, rax                        # rbx = action entry
    mov r12, [rbx]                      # r12 = flags
    test r12, {int(Act.CPUID)}
    jz 1f
    mov rax, [rbx + 40]
    mov ecx, eax
    mov [rip + vmx_gregs], rcx
    shr rax, 32
    mov [rip + vmx_gregs + 8], rax
    mov rax, [rbx + 48]
    mov ecx, eax
    mov [rip + vmx_gregs + 16], rcx
    shr rax, 32
    mov [rip + vmx_gregs + 24], rax
1:  test r12, {int(Act.SKIP)}
    jz 2f
    mov ecx, {int(F.GUEST_RIP):#x}
    vmread rax, rcx
    add rax, [rip + vmx_exit_len]
    vmwrite rcx, rax
2:  test r12, {int(Act.VMWRITE)}
    jz 3f
    mov rcx, [rbx + 8]
    mov rax, [rbx + 16]
    vmwrite rcx, rax
3:  test r12, {int(Act.MEM_AND)}
    jz 6f
    mov rcx, [rbx + 24]
    mov rax, [rbx + 32]
    not rax
    and [rcx], rax
6:  test r12, {int(Act.MEM_OR)}
    jz 7f
    mov rcx, [rbx + 24]
    mov rax, [rbx + 32]
    or [rcx], rax
7:  test r12, {int(Act.INVEPT)}
    jz 8f
    mov ecx, 2                          # all-context invalidation (30.3, INVEPT)
    lea rax, [rip + vmx_zero_desc]
    invept rcx, [rax]
8:  test r12, {int(Act.INVEPT_SINGLE)}
    jz 4f
    mov ecx, {int(F.EPTP):#x}           # single-context: the descriptor names the EPTP (30.3)
    vmread rax, rcx
    mov [rip + vmx_eptp_desc], rax
    mov ecx, 1
    lea rax, [rip + vmx_eptp_desc]
    invept rcx, [rax]
4:  test r12, {int(Act.INJECT)}
    jz 5f
    mov rax, [rbx + 56]
    mov ecx, {int(F.ENTRY_INTR_INFO):#x}
    mov edx, eax
    vmwrite rcx, rdx
    shr rax, 32
    mov ecx, {int(F.ENTRY_EXCEPTION_ERROR):#x}
    vmwrite rcx, rax
    test r12, {int(Act.KEEP_LENGTH)}
    jnz 5f
    mov ecx, {int(F.ENTRY_INSTR_LEN):#x}
    mov rax, [rip + vmx_exit_len]
    vmwrite rcx, rax
5:  mov rdx, [rip + vmx_reason]
    mov esi, {int(StopWhy.ACTION)}
    test r12, {int(Act.STOP)}
    jnz .Lvmx_stop
    mov esi, {int(StopWhy.EXIT_LIMIT)}
    mov rax, [rip + vmx_exits]
    cmp rax, [rip + vmx_max_exits]
    jae .Lvmx_stop
    jmp .Lvmx_enter

# esi = why, rdx = last exit reason
.Lvmx_stop:
    mov rax, [rip + vmx_exits]
    mov [rip + rec_buf], rax
    mov [rip + rec_buf + 8], rsi
    mov [rip + rec_buf + 16], rdx
    mov edi, K_VMX_STOP
    mov esi, 3
    call emit_buf
    mov rax, [rip + vmx_exits]
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbp
    pop rbx
    ret

.section .data
.balign 16
vmx_zero_desc: .quad 0, 0
vmx_eptp_desc: .quad 0, 0

.section .bss
.balign 8
vmx_operand:    .skip 8
vmx_actions:    .skip 8
vmx_max_exits:  .skip 8
vmx_exits:      .skip 8
vmx_use_resume: .skip 8
vmx_tsc0:       .skip 8
vmx_reason:     .skip 8
vmx_exit_len:   .skip 8
.globl vmx_gregs
vmx_gregs:      .skip 16 * 8
.balign 4096
.globl vmx_guest_idt
vmx_guest_idt:  .skip 4096
.section .text
""" + _guest_handlers()
