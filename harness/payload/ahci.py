"""An AHCI SATA controller (class code 01:06:01) as a DMA agent, driven by engine steps.

Layouts are AHCI 1.3.1: generic host control 3.1 (GHC.AE bit 31), port registers 3.3 at
0x100 + 0x80 * port (PxCLB 0x00, PxFB 0x08, PxIS 0x10, PxCMD 0x18, PxTFD 0x20, PxSSTS 0x28,
PxSCTL 0x2C, PxSERR 0x30, PxCI 0x38), the received FIS area 4.2.1 (256 bytes: DMA setup 0x00,
PIO setup 0x20, D2H register 0x40, set device bits 0x58), the command list 4.2.2 (32-byte headers:
DW0 CFL 4:0, W 6, PRDTL 31:16; DW2/3 CTBA, 128-byte aligned), the command table 4.2.3 (CFIS at
0x00, PRDT at 0x80; entries 4.2.3.3: DBA word-aligned, DW3 DBC 21:0 = bytes - 1, odd), port
initialisation 10.1.2 and port reset (COMRESET through PxSCTL.DET) 10.4.2.  The command FIS is a
SATA Register Host-to-Device FIS (SATA 3.2, 10.5.5: type 27h, C bit 7 of byte 1, command byte 2).

What the device does:

* **device writes**: IDENTIFY DEVICE (ACS-3 7.12) returns 512 bytes the device chooses.  Its PRDT
  splits them: ``buffer_offset`` bytes to the agent's private sink, ``nbytes`` to ``iova``, the rest
  to the sink, so exactly ``nbytes`` land at ``iova``.  The agent's reference (``load``) is the
  whole 512 bytes, written untranslated before translation is on.
* **device reads**: every command is a fetch of its command header (from the private command
  list) and of its command table (CFIS + PRDT).  ``start_read`` points the header's CTBA at
  ``iova``: the HBA reads 128 bytes there and interprets them as a command table, so ``iova`` must
  fault or map to ``table_page`` (the agent's own IDENTIFY table, prepared in ``setup``); a page
  holding anything else would be read as a command.
* completion: PxCI bit 0 clears (polled, bounded); the wait's value is PxIS, non-zero once the
  device posted a FIS.

Non-destructive by construction: ``h2d_fis`` builds only the ATA commands in ATA_ALLOWED (IDENTIFY
DEVICE and IDENTIFY PACKET DEVICE, which transfer data to the host and change nothing); WRITE,
DATA SET MANAGEMENT (TRIM), SECURITY ERASE, DOWNLOAD MICROCODE, SANITIZE, SET FEATURES and
vendor-specific commands raise DestructiveCommand.

The port used is ``port`` (default 0: QEMU's ``ide.0`` on q35's built-in ICH9 AHCI).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from .dma import DestructiveCommand, DmaAgent, agent_area
from .pci import cfg_addr
from .steps import FIRST_FREE_VAR, StepList

AHCI_CLASS = 0x01_06_01          # mass storage, SATA, AHCI 1.0 (PCI Code and ID 1.11)
ABAR = 0x24                      # BAR5 (AHCI 1.3.1, 2.1.11)

REG_GHC = 0x04
GHC_AE = 1 << 31
PORT_BASE, PORT_STRIDE = 0x100, 0x80
PX_CLB, PX_CLBU, PX_FB, PX_FBU = 0x00, 0x04, 0x08, 0x0C
PX_IS, PX_IE, PX_CMD, PX_TFD = 0x10, 0x14, 0x18, 0x20
PX_SSTS, PX_SCTL, PX_SERR, PX_CI = 0x28, 0x2C, 0x30, 0x38
CMD_ST, CMD_SUD, CMD_POD, CMD_FRE = 1 << 0, 1 << 1, 1 << 2, 1 << 4
CMD_FR, CMD_CR = 1 << 14, 1 << 15
TFD_BSY_DRQ = 0x88
SSTS_DET_PRESENT = 0x3           # device present, PHY communication established
SCTL_IPM_NONE = 0x300            # no transitions to partial/slumber
SCTL_DET_COMRESET = 0x1

FIS_H2D = 0x27
FIS_C = 0x80
# ATA commands (ACS-3, Table 206) that move data to the host and change nothing on the device.
ATA_ALLOWED = {0xEC: "IDENTIFY DEVICE", 0xA1: "IDENTIFY PACKET DEVICE"}
ATA_IDENTIFY = 0xEC
IDENTIFY_BYTES = 512

# The agent's private slice: command list, received FIS, two command tables, sink; then reference.
CL_OFF, RFIS_OFF, TABLE_OFF, READ_TABLE_OFF, SINK_OFF = 0x0000, 0x0400, 0x0800, 0x1000, 0x1800
PRIVATE_BYTES = 0x2000
REFERENCE_OFF = 0x4000

RESET_POLLS = 20_000_000
COMMAND_POLLS = 5_000_000
COMRESET_DELAY = 300_000         # PAUSEs between DET=1 and DET=0 (at least 1 ms, 10.4.2)


def h2d_fis(command: int, features: int = 0, lba: int = 0, count: int = 0, device: int = 0) -> bytes:
    """A 20-byte Register Host-to-Device FIS (SATA 3.2, 10.5.5) with the C bit set; only
    ATA_ALLOWED commands can be built."""
    if command not in ATA_ALLOWED:
        raise DestructiveCommand(f"ATA command {command:#04x} is not on the AHCI agent's allow-list "
                                 f"({', '.join(ATA_ALLOWED.values())})")
    return struct.pack("<BBBBBBBBBBBBHBBI", FIS_H2D, FIS_C, command, features & 0xFF,
                       lba & 0xFF, lba >> 8 & 0xFF, lba >> 16 & 0xFF, device,
                       lba >> 24 & 0xFF, lba >> 32 & 0xFF, lba >> 40 & 0xFF, features >> 8 & 0xFF,
                       count, 0, 0, 0)


def prd(address: int, nbytes: int) -> bytes:
    """A physical region descriptor (4.2.3.3): word-aligned address, even byte count, no interrupt."""
    if address & 1 or nbytes <= 0 or nbytes & 1 or nbytes > 1 << 22:
        raise ValueError(f"AHCI PRD: {nbytes} bytes at {address:#x} (needs a word-aligned address "
                         f"and an even count up to 4 MiB)")
    return struct.pack("<IIII", address & 0xFFFF_FFFF, address >> 32, 0, nbytes - 1)


def command_header(table: int, prdtl: int, write: bool = False) -> bytes:
    """A command header (4.2.2): a 5-dword CFIS, ``prdtl`` PRD entries, table at ``table``."""
    if table & 0x7F:
        raise ValueError(f"AHCI command table at {table:#x} is not 128-byte aligned")
    return struct.pack("<IIII16x", 5 | (1 << 6 if write else 0) | prdtl << 16, 0,
                       table & 0xFFFF_FFFF, table >> 32)


@dataclass
class Ahci(DmaAgent):
    """An AHCI HBA's port as a DMA agent: step builders for the function at ``bdf``, whose ABAR
    lives in engine variable ``bar_var``.  ``vector`` is unused (completions are polled)."""

    steps: StepList
    bdf: int
    bar_var: int = FIRST_FREE_VAR
    vector: int = 0x50
    port: int = 0
    area: int = -1
    fises: list[bytes] = field(default_factory=list, init=False, repr=False)   # every CFIS built

    NAME = "ahci"
    self_contained = False

    def __post_init__(self) -> None:
        if self.area < 0:
            self.area = agent_area(self.bar_var)

    @classmethod
    def matches(cls, vendor: int, device: int, class_code: int) -> bool:
        return class_code == AHCI_CLASS

    @property
    def max_transfer(self) -> int:
        return IDENTIFY_BYTES

    @property
    def reference(self) -> int:
        return self.area + REFERENCE_OFF

    @property
    def table_page(self) -> int:
        """A page holding only the agent's own IDENTIFY command table (data to the sink): the
        physical page a test maps an IOVA to for a translated device read."""
        return self.area + READ_TABLE_OFF

    def read_source(self, page: int) -> int:
        return self.table_page

    def private_ranges(self) -> list[tuple[int, int]]:
        return [(self.area, PRIVATE_BYTES)]

    def _port(self, reg: int) -> int:
        return PORT_BASE + PORT_STRIDE * self.port + reg

    def reg_write(self, reg: int, value: int, size: int = 4) -> int:
        return self.steps.mmio_write(reg, value, size=size, base=self.bar_var, quiet=True)

    def reg_read(self, reg: int, **kw) -> int:
        return self.steps.mmio_read(reg, size=4, base=self.bar_var, **kw)

    def _poll(self, reg: int, mask: int, expected: int, polls: int, what: str) -> int:
        return self.steps.poll(reg, mask, expected, polls, base=self.bar_var, comment=f"AHCI {what}")

    def _write_blob(self, address: int, blob: bytes) -> None:
        blob = blob + b"\0" * (-len(blob) % 8)
        for i in range(0, len(blob), 8):
            self.steps.mmio_write(address + i, int.from_bytes(blob[i:i + 8], "little"), size=8, quiet=True)

    def _table(self, address: int, fis: bytes, regions: list[tuple[int, int]]) -> None:
        self.fises.append(fis)
        self._write_blob(address, fis)
        self._write_blob(address + 0x80, b"".join(prd(a, n) for a, n in regions))

    def setup(self, msi: tuple[int, int] | None = None) -> int:
        """Find ABAR, enable memory and bus mastering, AHCI mode; stop the port, give it the command
        list and received-FIS area, reset it (COMRESET), start it (10.1.2, 10.4.2).  Prepares the
        read table (``table_page``).  Returns the index of the ID-read step."""
        s = self.steps
        ident = s.call("pci_cfg_read32", cfg_addr(self.bdf, 0x00))
        s.call("pci_bar_address", cfg_addr(self.bdf, ABAR), store=self.bar_var, quiet=True)
        s.call("pci_cfg_write32", cfg_addr(self.bdf, 0x04), 0x0406, quiet=True)
        s.call("pci_msi_off", self.bdf, quiet=True)                 # what a kexec'ing OS left on
        self.reg_write(REG_GHC, GHC_AE)
        self.reg_write(self._port(PX_CMD), 0)
        self._poll(self._port(PX_CMD), CMD_CR | CMD_FR, 0, RESET_POLLS, "PxCMD.CR/FR = 0 (port stopped)")
        s.mem_fill(self.area, PRIVATE_BYTES, 0)
        self.reg_write(self._port(PX_CLB), self.area + CL_OFF)
        self.reg_write(self._port(PX_CLBU), 0)
        self.reg_write(self._port(PX_FB), self.area + RFIS_OFF)
        self.reg_write(self._port(PX_FBU), 0)
        self.reg_write(self._port(PX_SCTL), SCTL_IPM_NONE | SCTL_DET_COMRESET)
        s.delay(COMRESET_DELAY)
        self.reg_write(self._port(PX_SCTL), SCTL_IPM_NONE)
        self.present_step = self._poll(self._port(PX_SSTS), 0xF, SSTS_DET_PRESENT, RESET_POLLS,
                                       "PxSSTS.DET = 3 (device present)")
        self.reg_write(self._port(PX_SERR), 0xFFFF_FFFF)
        self.reg_write(self._port(PX_IS), 0xFFFF_FFFF)
        self.reg_write(self._port(PX_CMD), CMD_FRE | CMD_POD | CMD_SUD)
        self.ready_step = self._poll(self._port(PX_TFD), TFD_BSY_DRQ, 0, RESET_POLLS, "PxTFD BSY/DRQ clear")
        self.reg_write(self._port(PX_CMD), CMD_FRE | CMD_POD | CMD_SUD | CMD_ST)
        self._table(self.table_page, h2d_fis(ATA_IDENTIFY), [(self.area + SINK_OFF, IDENTIFY_BYTES)])
        return ident

    def _issue(self, table: int, prdtl: int) -> int:
        self._write_blob(self.area + CL_OFF, command_header(table, prdtl))
        self.reg_write(self._port(PX_IS), 0xFFFF_FFFF)
        return self.reg_write(self._port(PX_CI), 1)

    def identify(self, regions: list[tuple[int, int]]) -> int:
        """IDENTIFY DEVICE: its 512 bytes scattered over ``regions`` (address, bytes) in order."""
        if sum(n for _, n in regions) != IDENTIFY_BYTES:
            raise ValueError(f"AHCI IDENTIFY moves {IDENTIFY_BYTES} bytes; regions cover {sum(n for _, n in regions)}")
        table = self.area + TABLE_OFF
        self._table(table, h2d_fis(ATA_IDENTIFY), regions)
        return self._issue(table, len(regions))

    def start_write(self, iova: int, nbytes: int, buffer_offset: int = 0) -> int:
        """IDENTIFY DEVICE with bytes ``buffer_offset .. + nbytes`` of its data at ``iova``."""
        if buffer_offset < 0 or buffer_offset + nbytes > IDENTIFY_BYTES or buffer_offset & 1:
            raise ValueError(f"AHCI agent writes at most {IDENTIFY_BYTES} bytes of IDENTIFY data: offset "
                             f"{buffer_offset:#x} + {nbytes:#x}")
        sink = self.area + SINK_OFF
        rest = IDENTIFY_BYTES - buffer_offset - nbytes
        regions = [(sink, buffer_offset)] if buffer_offset else []
        regions.append((iova, nbytes))
        if rest:
            regions.append((sink + buffer_offset + nbytes, rest))
        return self.identify(regions)

    def start_read(self, iova: int, nbytes: int, buffer_offset: int = 0) -> int:
        """The HBA fetches the command table at ``iova`` (128 bytes and its PRDT): ``iova`` must fault
        or map to ``table_page``.  ``nbytes`` and ``buffer_offset`` have no meaning here."""
        return self._issue(iova, 1)

    def wait(self) -> int:
        """Poll (bounded) PxCI bit 0 clear, then read PxIS: the returned step's value is non-zero
        when the device posted a FIS (the command ran, with or without error)."""
        self.done_step = self._poll(self._port(PX_CI), 1, 0, COMMAND_POLLS, "PxCI bit 0 clear (command done)")
        self.tfd_step = self.reg_read(self._port(PX_TFD))
        return self.reg_read(self._port(PX_IS))

    def load(self, staging: int) -> int:
        """Before translation: the device writes its 512 IDENTIFY bytes untranslated to the reference."""
        return self.dma_write(self.reference, IDENTIFY_BYTES)
