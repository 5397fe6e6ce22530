"""An NVMe controller (class code 01:08:02) as a DMA agent, driven by engine steps.

Layouts are NVMe Base Specification 1.4: controller registers 3.1 (CAP 0x00, CC 0x14, CSTS 0x1C,
AQA 0x24, ASQ 0x28, ACQ 0x30, doorbells from 0x1000, 3.1.24), the submission queue entry 4.2
(64 bytes: CDW0 opcode 7:0 and command id 31:16, NSID, PRP1 at byte 24, PRP2 at 32, CDW10-15 from
40), the completion queue entry 4.6 (16 bytes; DW3: command id 15:0, phase tag 16, status 31:17),
PRP entries 4.3, controller initialisation 7.6.1.

What the device does:

* **device writes**: Get Log Page (5.14) of the Commands Supported and Effects log (LID 05h,
  4 KiB, 5.14.1.5) writes exactly the bytes asked for, from any dword offset (LPO), so a write of
  ``nbytes`` from ``buffer_offset`` lands at ``iova`` and nowhere else; Identify Controller (5.15,
  CNS 01h) writes 4 KiB.  The data is the controller's, so the agent keeps a reference copy made
  untranslated before translation is on (``load``).
* **device reads**: every command is a 64-byte fetch from the submission queue; the NVM command
  Compare (6.6) reads (NLB+1) logical blocks of host memory and compares them with the media,
  changing nothing (its status says equal, 0, or Compare Failure, SCT 2h SC 85h).  A read of
  ``nbytes`` is rounded up to whole 512-byte blocks (LBA format 0 of QEMU's and most drives'
  namespaces) and must stay within two pages.
* completions are polled (the phase tag of the expected CQ entry), bounded; MSI-X is set up only
  where a test asks (``setup(msi=...)``, ``msix_mask``).

Non-destructive by construction: ``admin_command`` / ``nvm_command`` build only the opcodes in
ADMIN_ALLOWED / NVM_ALLOWED (and Get Log Page only for LOG_PAGES_ALLOWED); anything else, Write,
Write Zeroes, Dataset Management (trim), Format NVM, Sanitize, firmware download/commit, Set
Features, Security Send and every vendor-specific opcode included, raises DestructiveCommand.

The controller's own structures (admin and I/O queues) live in the agent's private slice
(``dma.AGENT_AREA``), which every domain the agent is attached to maps 1:1.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from .dma import DestructiveCommand, DmaAgent, agent_area
from .pci import cfg_addr
from .steps import FIRST_FREE_VAR, StepList

NVME_CLASS = 0x01_08_02          # mass storage, non-volatile memory, NVM Express (PCI Code and ID 1.11)

# Controller registers (NVMe 1.4, 3.1)
REG_CAP = 0x00
REG_CC = 0x14
REG_CSTS = 0x1C
REG_AQA = 0x24
REG_ASQ = 0x28
REG_ACQ = 0x30
CC_EN = 1 << 0
CC_IOSQES = 6 << 16              # I/O submission queue entry: 2^6 = 64 bytes
CC_IOCQES = 4 << 20              # I/O completion queue entry: 2^4 = 16 bytes
CSTS_RDY = 1 << 0
CQE_PHASE = 1 << 16              # DW3 bit 16 (4.6.3)

# Admin command set (NVMe 1.4, Figure 139): only commands that never touch media or its format.
ADMIN_ALLOWED = {0x00: "Delete I/O Submission Queue", 0x01: "Create I/O Submission Queue",
                 0x02: "Get Log Page", 0x04: "Delete I/O Completion Queue",
                 0x05: "Create I/O Completion Queue", 0x06: "Identify"}
# NVM command set (NVMe 1.4, Figure 346): Compare reads host memory and the media, writes neither.
NVM_ALLOWED = {0x05: "Compare"}
# Log pages (5.14.1): error information, SMART / health, firmware slot, commands supported and effects.
LOG_PAGES_ALLOWED = {0x01, 0x02, 0x03, 0x05}
OP_GET_LOG_PAGE = 0x02
OP_IDENTIFY = 0x06
OP_CREATE_IO_SQ = 0x01
OP_CREATE_IO_CQ = 0x05
OP_COMPARE = 0x05
LOG_COMMAND_EFFECTS = 0x05       # 4096 bytes, fixed for a controller
CNS_CONTROLLER = 0x01

# Status (4.6.1.2): SCT 0 SC 04h data transfer error; SCT 2h SC 85h compare failure.
STATUS_DATA_TRANSFER_ERROR = 0x004
STATUS_COMPARE_FAILURE = 0x285

LBA_BYTES = 512
PAGE = 0x1000
ADMIN_ENTRIES = 64               # ASQ: one page of 64-byte entries (AQA.ASQS is 0-based)
CQ_ENTRIES = 256                 # a CQ page of 16-byte entries: never full within 63 commands
IO_QID = 1

# The agent's private slice: queues first (mapped in every domain), then the reference page.
ASQ_OFF, ACQ_OFF, IOSQ_OFF, IOCQ_OFF = 0x0000, 0x1000, 0x2000, 0x3000
PRIVATE_BYTES = 0x4000
REFERENCE_OFF = 0x4000

# Bounded waits (POLL iterations, each a read and a PAUSE): enable/disable may take CAP.TO * 500 ms
# on a real controller; a command completes in microseconds there and in ~1 us of virtual time in QEMU.
RESET_POLLS = 50_000_000
COMMAND_POLLS = 5_000_000


def _sqe(opcode: int, cid: int, nsid: int, prp1: int, prp2: int, cdw: tuple[int, ...]) -> bytes:
    """A 64-byte submission queue entry (4.2, Figure 105): PRPs for data (PSDT 00b), no fusing."""
    cdw10_15 = tuple(cdw) + (0,) * (6 - len(cdw))
    return struct.pack("<IIQQQQ6I", opcode | cid << 16, nsid, 0, 0, prp1, prp2, *cdw10_15)


def admin_command(opcode: int, cid: int, *, nsid: int = 0, prp1: int = 0, prp2: int = 0,
                  cdw: tuple[int, ...] = ()) -> bytes:
    """An admin submission queue entry; only ADMIN_ALLOWED opcodes (Get Log Page: only
    LOG_PAGES_ALLOWED) can be built."""
    if opcode not in ADMIN_ALLOWED:
        raise DestructiveCommand(f"NVMe admin opcode {opcode:#04x} is not on the agent's allow-list "
                                 f"({', '.join(ADMIN_ALLOWED.values())})")
    if opcode == OP_GET_LOG_PAGE and (cdw[0] if cdw else 0) & 0xFF not in LOG_PAGES_ALLOWED:
        raise DestructiveCommand(f"NVMe log page {(cdw[0] if cdw else 0) & 0xFF:#04x} is not on the agent's "
                                 f"allow-list {sorted(LOG_PAGES_ALLOWED)}")
    return _sqe(opcode, cid, nsid, prp1, prp2, cdw)


def nvm_command(opcode: int, cid: int, *, nsid: int, prp1: int = 0, prp2: int = 0,
                cdw: tuple[int, ...] = ()) -> bytes:
    """An NVM command set submission queue entry; only NVM_ALLOWED opcodes can be built."""
    if opcode not in NVM_ALLOWED:
        raise DestructiveCommand(f"NVM opcode {opcode:#04x} is not on the agent's allow-list "
                                 f"({', '.join(NVM_ALLOWED.values())})")
    return _sqe(opcode, cid, nsid, prp1, prp2, cdw)


def prps(address: int, nbytes: int) -> tuple[int, int]:
    """PRP1/PRP2 for a transfer within two pages (4.3): PRP1 may carry a dword-aligned offset,
    PRP2 is the next page when the transfer crosses into it."""
    if address & 3:
        raise ValueError(f"NVMe data address {address:#x} is not dword-aligned (PRP offset bits 1:0 must be 0)")
    if nbytes <= 0 or (address & (PAGE - 1)) + nbytes > 2 * PAGE:
        raise ValueError(f"NVMe transfer of {nbytes} bytes at {address:#x} needs more than two PRP entries")
    crosses = (address & (PAGE - 1)) + nbytes > PAGE
    return address, ((address & ~(PAGE - 1)) + PAGE) if crosses else 0


@dataclass
class Nvme(DmaAgent):
    """An NVMe controller as a DMA agent: step builders for the function at ``bdf``, whose BAR0
    lives in engine variable ``bar_var``.  ``vector`` is unused (MSI-X is the caller's: ``setup(msi=...)``); ``namespace``
    is the one Compare reads against."""

    steps: StepList
    bdf: int
    bar_var: int = FIRST_FREE_VAR
    vector: int = 0x50
    namespace: int = 1
    msix_var: int | None = None         # receives MSI-X entry 0's address (setup with msi)
    area: int = -1                      # private slice (default: by bar_var, dma.agent_area)
    commands: list[bytes] = field(default_factory=list, init=False, repr=False)   # every SQE built
    _admin_tail: int = field(default=0, init=False, repr=False)
    _io_tail: int = field(default=0, init=False, repr=False)
    _pending: int | None = field(default=None, init=False, repr=False)

    NAME = "nvme"
    self_contained = False

    def __post_init__(self) -> None:
        if self.area < 0:
            self.area = agent_area(self.bar_var)

    @classmethod
    def matches(cls, vendor: int, device: int, class_code: int) -> bool:
        return class_code == NVME_CLASS

    @property
    def max_transfer(self) -> int:
        return PAGE

    @property
    def reference(self) -> int:
        return self.area + REFERENCE_OFF

    def private_ranges(self) -> list[tuple[int, int]]:
        return [(self.area, PRIVATE_BYTES)]

    # -- set-up ------------------------------------------------------------------------------------
    def reg_write(self, reg: int, value: int, size: int = 4) -> int:
        return self.steps.mmio_write(reg, value, size=size, base=self.bar_var, quiet=True)

    def reg_read(self, reg: int, size: int = 4, **kw) -> int:
        return self.steps.mmio_read(reg, size=size, base=self.bar_var, **kw)

    def setup(self, msi: tuple[int, int] | None = None) -> int:
        """Find BAR0, enable memory and bus mastering (INTx off), reset the controller, give it the
        admin queues, enable it and create one I/O queue pair (7.6.1).  Completions are polled;
        with ``msi`` = (address, data; MSI_DEST_SELF allowed) MSI-X table entry 0, the admin
        completion queue's vector (3.1.9), is programmed, unmasked and MSI-X enabled before the
        controller is (QEMU binds the admin queue's vector when CC.EN is set); its address goes
        to ``msix_var`` (``msix_step``'s value; 0: no MSI-X).  Returns the index of the ID-read step."""
        s = self.steps
        ident = s.call("pci_cfg_read32", cfg_addr(self.bdf, 0x00))
        s.call("pci_bar_address", cfg_addr(self.bdf, 0x10), store=self.bar_var, quiet=True)
        s.call("pci_cfg_write32", cfg_addr(self.bdf, 0x04), 0x0406, quiet=True)
        if msi is not None:
            self.msix_step = s.call("pci_msix_setup", self.bdf, msi[0], msi[1], store=self.msix_var)
        else:
            s.call("pci_msi_off", self.bdf, quiet=True)             # what a kexec'ing OS left on
        self.reg_write(REG_CC, 0)                                    # CC.EN 1 -> 0 resets (3.1.5)
        self.ready_step = s.poll(REG_CSTS, CSTS_RDY, 0, RESET_POLLS, base=self.bar_var,
                                 comment="NVMe CSTS.RDY = 0 after CC.EN = 0")
        s.mem_fill(self.area, PRIVATE_BYTES, 0)                      # phase tags start at 0
        self.reg_write(REG_AQA, (CQ_ENTRIES - 1) << 16 | (ADMIN_ENTRIES - 1))
        self.reg_write(REG_ASQ, self.area + ASQ_OFF, size=8)
        self.reg_write(REG_ACQ, self.area + ACQ_OFF, size=8)
        self.reg_write(REG_CC, CC_IOCQES | CC_IOSQES | CC_EN)       # NVM command set, 4 KiB pages
        self.enabled_step = s.poll(REG_CSTS, CSTS_RDY, CSTS_RDY, RESET_POLLS, base=self.bar_var,
                                   comment="NVMe CSTS.RDY = 1 after CC.EN = 1")
        # Create I/O CQ (5.3): QSIZE 31:16 | QID; PC, interrupts off.  Create I/O SQ (5.4): CQID 31:16, PC.
        self.submit_admin(OP_CREATE_IO_CQ, prp1=self.area + IOCQ_OFF,
                          cdw=((CQ_ENTRIES - 1) << 16 | IO_QID, 1))
        self.create_cq_step = self.wait()
        self.submit_admin(OP_CREATE_IO_SQ, prp1=self.area + IOSQ_OFF,
                          cdw=((ADMIN_ENTRIES - 1) << 16 | IO_QID, IO_QID << 16 | 1))
        self.create_sq_step = self.wait()
        return ident

    def msix_mask(self, masked: bool) -> int:
        """Set or clear MSI-X entry 0's per-vector mask (Vector Control bit 0, PCI Local Bus 3.0,
        6.8.2.9); needs ``msix_var`` and ``setup(msi=...)``."""
        if self.msix_var is None:
            raise ValueError("NVMe agent: msix_mask needs msix_var (the variable for the table entry's address)")
        return self.steps.mmio_write(12, int(masked), size=4, base=self.msix_var, quiet=True)

    # -- commands ----------------------------------------------------------------------------------
    def _write_entry(self, address: int, entry: bytes) -> None:
        for i in range(0, len(entry), 8):
            self.steps.mmio_write(address + i, int.from_bytes(entry[i:i + 8], "little"), size=8, quiet=True)

    def _submit(self, queue: int, entry: bytes) -> int:
        tail = self._io_tail if queue else self._admin_tail
        if tail >= ADMIN_ENTRIES - 1:
            raise ValueError(f"NVMe agent at {self.bdf:#06x}: more than {ADMIN_ENTRIES - 1} commands on "
                             f"queue {queue} in one scenario")
        sq = self.area + (IOSQ_OFF if queue else ASQ_OFF)
        cq = self.area + (IOCQ_OFF if queue else ACQ_OFF)
        self.commands.append(entry)
        self._write_entry(sq + 64 * tail, entry)
        self._pending = cq + 16 * tail
        if queue:
            self._io_tail += 1
        else:
            self._admin_tail += 1
        return self.steps.call("nvme_doorbell", self.bar_var, 2 * queue, tail + 1, quiet=True)

    def submit_admin(self, opcode: int, *, nsid: int = 0, prp1: int = 0, prp2: int = 0,
                     cdw: tuple[int, ...] = ()) -> int:
        """Put an (allow-listed) admin command on the admin queue and ring its doorbell."""
        return self._submit(0, admin_command(opcode, self._admin_tail, nsid=nsid, prp1=prp1, prp2=prp2, cdw=cdw))

    def submit_io(self, opcode: int, *, prp1: int = 0, prp2: int = 0, cdw: tuple[int, ...] = ()) -> int:
        """Put an (allow-listed) NVM command for ``namespace`` on the I/O queue and ring its doorbell."""
        return self._submit(IO_QID, nvm_command(opcode, self._io_tail, nsid=self.namespace,
                                                prp1=prp1, prp2=prp2, cdw=cdw))

    def get_log_page(self, iova: int, nbytes: int, lid: int = LOG_COMMAND_EFFECTS, offset: int = 0) -> int:
        """Get Log Page (5.14): the device writes ``nbytes`` of log ``lid`` from byte ``offset``."""
        if nbytes % 4 or offset % 4:
            raise ValueError(f"NVMe Get Log Page moves whole dwords: {nbytes} bytes at offset {offset}")
        prp1, prp2 = prps(iova, nbytes)
        numd = nbytes // 4 - 1
        return self.submit_admin(OP_GET_LOG_PAGE, prp1=prp1, prp2=prp2,
                                 cdw=((numd & 0xFFFF) << 16 | lid, numd >> 16, offset, 0))

    def identify(self, iova: int) -> int:
        """Identify Controller (5.15, CNS 01h): the device writes 4 KiB at ``iova``."""
        prp1, prp2 = prps(iova, PAGE)
        return self.submit_admin(OP_IDENTIFY, prp1=prp1, prp2=prp2, cdw=(CNS_CONTROLLER,))

    def compare(self, iova: int, nbytes: int) -> int:
        """Compare (6.6) against LBA 0: the device reads ``nbytes`` rounded up to whole blocks."""
        blocks = -(-nbytes // LBA_BYTES)
        prp1, prp2 = prps(iova, blocks * LBA_BYTES)
        return self.submit_io(OP_COMPARE, prp1=prp1, prp2=prp2, cdw=(0, 0, blocks - 1))

    # -- the DmaAgent operations -------------------------------------------------------------------
    def start_read(self, iova: int, nbytes: int, buffer_offset: int = 0) -> int:
        """The device reads memory at ``iova`` (Compare); ``buffer_offset`` has no meaning here."""
        return self.compare(iova, nbytes)

    def start_write(self, iova: int, nbytes: int, buffer_offset: int = 0) -> int:
        if buffer_offset + nbytes > PAGE:
            raise ValueError(f"NVMe agent writes at most {PAGE} bytes of its log page: offset "
                             f"{buffer_offset:#x} + {nbytes:#x}")
        return self.get_log_page(iova, nbytes, offset=buffer_offset)

    def wait(self) -> int:
        """Poll (bounded) the phase tag of the started command's completion entry.  The step's value
        is that entry's DW3 (non-zero once posted: status 31:17, phase 16, command id 15:0)."""
        if self._pending is None:
            raise ValueError("NVMe agent: wait() without a command started")
        entry, self._pending = self._pending, None
        return self.steps.poll(entry + 12, CQE_PHASE, CQE_PHASE, COMMAND_POLLS,
                               comment="NVMe completion queue entry: phase tag 1")

    def load(self, staging: int) -> int:
        """Before translation: the device writes its whole log page untranslated to the reference."""
        return self.dma_write(self.reference, PAGE)


def status_of(dw3: int) -> int:
    """The status field of a completion's DW3 (SCT 10:8, SC 7:0 as one number; 4.6.1)."""
    return dw3 >> 17 & 0x7FF
