"""Driving QEMU's ``edu`` PCI device (1234:11e8) as engine steps: PCI set-up, DMA, MSI, completion.

edu (QEMU hw/misc/edu.c): BAR0 is a 1 MiB MMIO window; 0x80 DMA source, 0x88 destination,
0x90 count, 0x98 command (bit 0 start, bit 1 direction: 0 = RAM -> device buffer, 1 = device
buffer -> RAM, bit 2 raise an interrupt on completion), 0x24 interrupt status, 0x64 interrupt
acknowledge.  The device buffer is 4 KiB at device address 0x40000.  A DMA completes on a 100 ms
virtual-clock timer, then raises interrupt status 0x100 (MSI when enabled).  DMA addresses are
masked with the device's ``dma_mask`` property (28 bits by default; the VT-d targets widen it).

PCI configuration space is reached through the legacy 0xCF8/0xCFC mechanism (PCI Local Bus 3.0,
3.2.2.3.2); the MSI capability layout is PCI Local Bus 3.0, 6.8.1.
"""

from __future__ import annotations

from dataclasses import dataclass

from .steps import FIRST_FREE_VAR, StepList

EDU_VENDOR_DEVICE = 0x11E8_1234
REG_ID = 0x00
REG_IRQ_STATUS = 0x24
REG_IRQ_RAISE = 0x60
REG_IRQ_ACK = 0x64
REG_DMA_SRC = 0x80
REG_DMA_DST = 0x88
REG_DMA_COUNT = 0x90
REG_DMA_CMD = 0x98
DMA_START = 1 << 0
DMA_TO_RAM = 1 << 1          # direction: device buffer -> RAM (a DMA write)
DMA_IRQ = 1 << 2
DMA_IRQ_STATUS = 0x100
BUFFER = 0x40000             # device address of the 4 KiB buffer
BUFFER_SIZE = 0x1000
# QEMU 7.2's range check treats the buffer's end as exclusive twice: a transfer that ends exactly
# at the buffer's end aborts QEMU ("hardware error: EDU: DMA range ... out of bounds").  Stay below.
MAX_TRANSFER_END = BUFFER_SIZE - 1

# HLT-bounded waits: up to MAX_HALTS wake-ups, each at most WATCHDOG_NS of virtual time.
WATCHDOG_NS = 200_000_000
MAX_HALTS = 8

# Bit 63 of pci_msi_setup's address (above any MSI address): put this CPU's APIC ID into the
# compatibility-format destination field, bits 19:12 (SDM Vol. 3A, 11.11.1).  On a real host
# the bootstrap processor's APIC ID need not be 0.
MSI_DEST_SELF = 1 << 63
COMPAT_MSI_BASE = 0xFEE0_0000

PCI_ASM = r"""
# pci_cfg_addr(edi = bdf << 8 | offset): select the dword (0xCF8); clobbers eax, edx.
pci_cfg_addr:
    mov eax, edi
    and eax, 0xFFFFFC
    or eax, 0x80000000
    mov dx, 0xCF8
    out dx, eax
    ret

# pci_cfg_read32(rdi = bdf << 8 | offset) -> rax
.globl pci_cfg_read32
pci_cfg_read32:
    call pci_cfg_addr
    mov dx, 0xCFC
    in eax, dx
    ret

# pci_cfg_write32(rdi = bdf << 8 | offset, esi = value)
.globl pci_cfg_write32
pci_cfg_write32:
    call pci_cfg_addr
    mov eax, esi
    mov dx, 0xCFC
    out dx, eax
    xor eax, eax
    ret

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


def cfg_addr(bdf: int, offset: int) -> int:
    return bdf << 8 | offset


@dataclass
class Edu:
    """Step builders for one edu function at ``bdf``; its BAR0 lives in engine variable ``bar_var``."""

    steps: StepList
    bdf: int
    bar_var: int = FIRST_FREE_VAR
    vector: int = 0x50

    def setup(self, msi: tuple[int, int] | None = None) -> int:
        """Check the ID, fetch BAR0, enable memory + bus master (+ INTx disable), set up MSI
        (``msi`` = (address, data), MSI_DEST_SELF allowed in the address; default: compatibility
        format to this CPU with ``vector``).
        Returns the index of the ID-check step (READ record: 0x11e81234)."""
        s = self.steps
        ident = s.call("pci_cfg_read32", cfg_addr(self.bdf, 0x00))
        s.call("pci_cfg_read32", cfg_addr(self.bdf, 0x10), store=self.bar_var, quiet=True)
        s.call("pci_cfg_write32", cfg_addr(self.bdf, 0x04), 0x0406, quiet=True)
        address, data = msi if msi is not None else (MSI_DEST_SELF | COMPAT_MSI_BASE, self.vector)
        self.msi_step = s.call("pci_msi_setup", self.bdf, address, data)
        return ident

    def reg_write(self, reg: int, value: int, size: int = 8, **kw) -> int:
        return self.steps.mmio_write(reg, value, size=size, base=self.bar_var, **kw)

    def reg_read(self, reg: int, size: int = 4, **kw) -> int:
        return self.steps.mmio_read(reg, size=size, base=self.bar_var, **kw)

    def start_dma(self, src: int, dst: int, count: int, to_ram: bool) -> int:
        end = (src if to_ram else dst) - BUFFER + count
        if count <= 0 or end > MAX_TRANSFER_END:
            raise ValueError(f"edu DMA of {count} bytes ends at buffer offset {end:#x} "
                             f"(QEMU 7.2 accepts at most {MAX_TRANSFER_END:#x})")
        self.reg_write(REG_DMA_SRC, src, quiet=True)
        self.reg_write(REG_DMA_DST, dst, quiet=True)
        self.reg_write(REG_DMA_COUNT, count, quiet=True)
        return self.reg_write(REG_DMA_CMD, DMA_START | DMA_IRQ | (DMA_TO_RAM if to_ram else 0), quiet=True)

    def wait(self) -> int:
        """Wait (HLT, bounded) for the completion interrupt, then acknowledge it at the device.
        Returns the index of the wait step (its CALL value: interrupts seen, 0 on timeout)."""
        i = self.steps.wait_irq_halted(self.vector, MAX_HALTS, WATCHDOG_NS)
        self.reg_write(REG_IRQ_ACK, DMA_IRQ_STATUS, size=4, quiet=True)
        return i

    def dma_write(self, iova: int, count: int, buffer_offset: int = 0) -> int:
        """Device buffer -> memory at ``iova`` (the device writes); returns the wait step."""
        self.start_dma(BUFFER + buffer_offset, iova, count, to_ram=True)
        return self.wait()

    def dma_read(self, iova: int, count: int, buffer_offset: int = 0) -> int:
        """Memory at ``iova`` -> device buffer (the device reads); returns the wait step."""
        self.start_dma(iova, BUFFER + buffer_offset, count, to_ram=False)
        return self.wait()
