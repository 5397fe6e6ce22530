"""Bring a DMAR unit to a known state before programming it (real hosts, kexec).

Firmware or a kexec'ing OS (Linux with intel_iommu=on) may leave translation, interrupt
remapping and queued invalidation enabled and faults recorded.  ``vtd_reset`` turns them off in
the order the VT-d specification implies (translation, then interrupt remapping, both of which
may still use the queue; then, once the queue is drained (IQH == IQT), queued invalidation; a
queue stopped by an invalid descriptor (FSTS.IQE) is abandoned at that descriptor first) and
clears every fault record and FSTS.  Its CALL record reports GSTS as it was found.

Use: ``reset_unit(steps)`` before any other step that touches the unit (the call brings
VTD_RESET_ASM and the VTD_ASM it needs into the image, see image.LIBRARIES);
``harness.testing.VtdScenario`` does this first.
"""

from __future__ import annotations

from .steps import VAR_DMAR0, StepList
from .vtd import FSTS_IQE, Gcmd, REG_FSTS, REG_GSTS, REG_IQA, REG_IQH, REG_IQT

# Invalidation wait descriptor (6.5.2.8): type 5, SW (status write), FN (fence), status data 1.
WAIT_LO = 0x5 | 1 << 5 | 1 << 6 | 1 << 32

VTD_RESET_ASM = rf"""
# vtd_reset(rdi = var) -> rax = GSTS as found.  Needs VTD_ASM (vtd_base, vtd_gcmd, vtd_clear_faults).
.globl vtd_reset
vtd_reset:
    push rbx
    push r12
    mov r12, rdi
    call vtd_base
    mov ebx, [r8 + {REG_GSTS:#x}]
    test ebx, {int(Gcmd.TE):#x}                       # 1. translation off
    jz 1f
    mov rdi, r12
    xor esi, esi
    mov edx, {int(Gcmd.TE):#x}
    call vtd_gcmd
1:  test ebx, {int(Gcmd.IRE | Gcmd.CFI):#x}            # 2. interrupt remapping (and CFI) off
    jz 2f
    mov rdi, r12
    xor esi, esi
    mov edx, {int(Gcmd.IRE | Gcmd.CFI):#x}
    call vtd_gcmd
2:  test ebx, {int(Gcmd.QIE):#x}                      # 3. drain the queue, wrap it, then QI off
    jz 4f
    mov rdi, r12
    call vtd_base
    test dword ptr [r8 + {REG_FSTS:#x}], {FSTS_IQE:#x}
    jz 5f
    mov rax, [r8 + {REG_IQH:#x}]                    # a queue stopped by an invalid descriptor
    mov [r8 + {REG_IQT:#x}], rax                    # (IQE, 6.5.2.10): abandon it and what follows
    mov dword ptr [r8 + {REG_FSTS:#x}], {FSTS_IQE:#x}  # then clear IQE (RW1C), so it runs again
5:  call vtd_reset_drain
    mov rax, [r8 + {REG_IQA:#x}]
    mov r9, rax
    shr r9, 12
    shl r9, 12                                      # queue base
    mov ecx, eax
    and ecx, 7
    mov r10d, 256
    shl r10d, cl                                    # entries (128-bit descriptors)
    mov r11, [r8 + {REG_IQT:#x}]
    shr r11, 4                                      # tail index
    test r11, r11
    jnz 6f
    mov r11d, r10d                                  # tail at 0: first submit half a queue
    shr r11d, 1
    xor edx, edx
    call vtd_reset_fill
    mov rax, r11
    shl rax, 4
    mov [r8 + {REG_IQT:#x}], rax
    call vtd_reset_drain
6:  mov rdx, r11                                    # then wait descriptors up to the end, so
    mov r11d, r10d                                  # the tail wraps to 0 and the last one
    call vtd_reset_fill                             # processed is a wait (QEMU checks both)
    mov qword ptr [r8 + {REG_IQT:#x}], 0
    call vtd_reset_drain
    mov rdi, r12
    xor esi, esi
    mov edx, {int(Gcmd.QIE):#x}
    call vtd_gcmd
4:  mov rdi, r12                                    # 4. fault records and FSTS cleared
    call vtd_clear_faults
    mov eax, ebx
    pop r12
    pop rbx
    ret

# r8 = unit: wait (bounded) until IQH == IQT.
vtd_reset_drain:
    mov ecx, VTD_POLL_LIMIT
    call poll_begin
1:  mov rax, [r8 + {REG_IQH:#x}]
    cmp rax, [r8 + {REG_IQT:#x}]
    je 2f
    call poll_expired
    jae 2f
    pause
    dec ecx
    jnz 1b
2:  ret

# r9 = queue base, rdx..r11 = descriptor indexes to fill with status-writing wait descriptors.
vtd_reset_fill:
    lea rsi, [rip + vtd_reset_status]
    movabs rcx, {WAIT_LO:#x}
1:  cmp rdx, r11
    jae 2f
    mov rax, rdx
    shl rax, 4
    add rax, r9
    mov [rax], rcx
    mov [rax + 8], rsi
    inc rdx
    jmp 1b
2:  mfence
    ret

.section .bss
.balign 8
vtd_reset_status: .skip 8
.section .text
"""


def reset_unit(steps: StepList, var: int = VAR_DMAR0) -> int:
    """A step that resets the unit whose base is in ``var``; its value is GSTS as found."""
    return steps.call("vtd_reset", var)
