"""Driving QEMU's ``edu`` PCI device (1234:11e8) as engine steps: PCI set-up, DMA, MSI, completion.

edu (QEMU hw/misc/edu.c): BAR0 is a 1 MiB MMIO window; 0x80 DMA source, 0x88 destination,
0x90 count, 0x98 command (bit 0 start, bit 1 direction: 0 = RAM -> device buffer, 1 = device
buffer -> RAM, bit 2 raise an interrupt on completion), 0x24 interrupt status, 0x64 interrupt
acknowledge.  The device buffer is 4 KiB at device address 0x40000.  A DMA completes on a 100 ms
virtual-clock timer, then raises interrupt status 0x100 (MSI when enabled).  DMA addresses are
masked with the device's ``dma_mask`` property (28 bits by default; the VT-d targets widen it).

Configuration space and MSI set-up are pci.py's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .dma import DmaAgent
from .pci import COMPAT_MSI_BASE, MSI_DEST_SELF, PCI_MSI_ASM, cfg_addr
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

# The routines Edu's steps call beyond the engine's (kept under this name for scenarios that add
# it by hand; a CALL step pulls it in by itself, see image.LIBRARIES).
PCI_ASM = PCI_MSI_ASM


@dataclass
class Edu(DmaAgent):
    """QEMU's edu as a DMA agent: step builders for the function at ``bdf``, whose BAR0 lives in
    engine variable ``bar_var`` and whose completion MSI uses ``vector``."""

    steps: StepList
    bdf: int
    bar_var: int = FIRST_FREE_VAR
    vector: int = 0x50
    _reference: int | None = field(default=None, init=False, repr=False)

    NAME = "edu"

    @classmethod
    def matches(cls, vendor: int, device: int, class_code: int) -> bool:
        return vendor | device << 16 == EDU_VENDOR_DEVICE

    @property
    def max_transfer(self) -> int:
        return MAX_TRANSFER_END

    def setup(self, msi: tuple[int, int] | None = None) -> int:
        """Check the ID, fetch BAR0, enable memory + bus master (+ INTx disable), set up MSI
        (``msi`` = (address, data), MSI_DEST_SELF allowed in the address; default: compatibility
        format to this CPU with ``vector``).
        Returns the index of the ID-check step (value 0x11e81234)."""
        s = self.steps
        ident = s.call("pci_cfg_read32", cfg_addr(self.bdf, 0x00))
        s.call("pci_cfg_read32", cfg_addr(self.bdf, 0x10), store=self.bar_var, quiet=True)
        s.call("pci_cfg_write32", cfg_addr(self.bdf, 0x04), 0x0406, quiet=True)
        address, data = msi if msi is not None else (MSI_DEST_SELF | COMPAT_MSI_BASE, self.vector)
        self.msi_step = s.call("pci_msi_setup", self.bdf, address, data)
        return ident

    @property
    def reference(self) -> int:
        if self._reference is None:
            raise ValueError("edu: its buffer holds no known data yet (call load() first)")
        return self._reference

    def load(self, staging: int) -> int:
        """Read the buffer's data from ``staging`` (untranslated, before translation is on); that
        memory is the reference ``check_written`` compares with."""
        self._reference = staging
        return self.dma_read(staging, min(BUFFER_SIZE - 8, self.max_transfer) & ~7)

    def reg_write(self, reg: int, value: int, size: int = 8, **kw) -> int:
        return self.steps.mmio_write(reg, value, size=size, base=self.bar_var, **kw)

    def reg_read(self, reg: int, size: int = 4, **kw) -> int:
        return self.steps.mmio_read(reg, size=size, base=self.bar_var, **kw)

    def raise_interrupt(self, status: int = 0x1) -> int:
        """Set interrupt-status bits (0x60): edu signals its interrupt (MSI when enabled)."""
        return self.reg_write(REG_IRQ_RAISE, status, size=4, quiet=True)

    def ack_interrupt(self, status: int = 0x1) -> int:
        """Clear interrupt-status bits (0x64)."""
        return self.reg_write(REG_IRQ_ACK, status, size=4, quiet=True)

    def start_dma(self, src: int, dst: int, count: int, to_ram: bool) -> int:
        end = (src if to_ram else dst) - BUFFER + count
        if count <= 0 or end > MAX_TRANSFER_END:
            raise ValueError(f"edu DMA of {count} bytes ends at buffer offset {end:#x} "
                             f"(QEMU 7.2 accepts at most {MAX_TRANSFER_END:#x})")
        self.reg_write(REG_DMA_SRC, src, quiet=True)
        self.reg_write(REG_DMA_DST, dst, quiet=True)
        self.reg_write(REG_DMA_COUNT, count, quiet=True)
        return self.reg_write(REG_DMA_CMD, DMA_START | DMA_IRQ | (DMA_TO_RAM if to_ram else 0), quiet=True)

    def start_read(self, iova: int, nbytes: int, buffer_offset: int = 0) -> int:
        return self.start_dma(iova, BUFFER + buffer_offset, nbytes, to_ram=False)

    def start_write(self, iova: int, nbytes: int, buffer_offset: int = 0) -> int:
        return self.start_dma(BUFFER + buffer_offset, iova, nbytes, to_ram=True)

    def wait(self) -> int:
        """Wait (HLT, bounded) for the completion interrupt, then acknowledge it at the device.
        Returns the index of the wait step (its CALL value: interrupts seen, 0 on timeout)."""
        i = self.steps.wait_irq_halted(self.vector, MAX_HALTS, WATCHDOG_NS)
        self.ack_interrupt(DMA_IRQ_STATUS)
        return i
