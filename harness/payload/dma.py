"""DMA agents: PCI functions that perform DMA on command, driven by engine steps.

A VT-d scenario needs a device that reads and writes memory at an address it is given, and says
when it is done; which device does not matter to the test.  ``DmaAgent`` is that interface.  QEMU's
``edu`` is the first agent (edu.py); NVMe (nvme.py) and AHCI (ahci.py) are the agents real hosts
have.  An agent type says which PCI functions it drives (``matches``), so scenarios find agents in
the boot probe's PCI list and take their source-ids from it rather than from constants.

Two things differ between edu and a real controller, and the interface says both:

* **Whose data a device write carries.**  edu writes back what it was given (``load``).  NVMe
  (Get Log Page) and AHCI (IDENTIFY DEVICE) write data the device chooses, and are never given data
  to store, because the only commands that would take it write media.  So every agent keeps a
  *reference*: a host copy of what its writes carry, made untranslated before translation is on
  (``load``), and ``check_written`` compares memory with it (an edu reference is the pattern it
  was loaded from).
* **The device's own DMA.**  A controller also reads its command queues and writes completions
  through the IOMMU.  ``private_ranges`` names that memory; every domain the agent is attached to
  maps it 1:1 (read/write), at IOVAs no test uses (``AGENT_AREA``).  A context or root entry that
  blocks the device therefore faults on the controller's own fetch first, at its own address:
  ``self_contained`` is False for such agents, and tests that expect the first fault at the data
  address are for self-contained agents only.

Agents are non-destructive by construction: their command builders take an allow-list of commands
that never write media and raise ``DestructiveCommand`` for anything else.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from . import layout
from .steps import FIRST_FREE_VAR, StepList

# Memory for controllers' own structures (queues, command lists, received FIS, references): one
# 64 KiB slice per agent, far from the scratch pages tests use as IOVAs and targets.
AGENT_AREA = layout.SCRATCH_BASE + 0xE0_0000
AGENT_AREA_SIZE = 0x1_0000
MAX_AGENTS = 2


def agent_area(bar_var: int) -> int:
    """The private memory slice of the agent whose BAR lives in engine variable ``bar_var``
    (agent n of a scenario uses FIRST_FREE_VAR + n)."""
    index = bar_var - FIRST_FREE_VAR
    if not 0 <= index < MAX_AGENTS:
        raise ValueError(f"agent variable {bar_var}: at most {MAX_AGENTS} controller agents per scenario "
                         f"(variables {FIRST_FREE_VAR}..{FIRST_FREE_VAR + MAX_AGENTS - 1})")
    return AGENT_AREA + index * AGENT_AREA_SIZE


class DestructiveCommand(ValueError):
    """A command outside an agent's allow-list: it could write media, or is not known not to."""


class DmaAgent(ABC):
    """One PCI function as a DMA agent.  Every method appends steps and returns a step index."""

    #: a short name for messages and evidence ("edu", "nvme", ...)
    NAME = "agent"

    steps: StepList
    bdf: int

    @classmethod
    @abstractmethod
    def matches(cls, vendor: int, device: int, class_code: int) -> bool:
        """Whether this agent type drives a function with these IDs (PCI Local Bus 3.0, 6.2.1)."""

    @property
    def source_id(self) -> int:
        """The requester id the function's DMA carries: bus 15:8, device 7:3, function 2:0
        (VT-d 3.4.1); context entries and fault records use it."""
        return self.bdf

    #: False when the device does DMA of its own (command fetches, completions) before the data
    self_contained: bool = True

    @property
    @abstractmethod
    def max_transfer(self) -> int:
        """The largest transfer (bytes) one DMA may move."""

    @abstractmethod
    def setup(self, msi: tuple[int, int] | None = None) -> int:
        """Make the function ready for DMA (BARs, bus master, completion interrupt); the returned
        step's value identifies the function (e.g. its ID dword)."""

    @abstractmethod
    def start_read(self, iova: int, nbytes: int, buffer_offset: int = 0) -> int:
        """Start a DMA that reads ``nbytes`` of memory at ``iova`` into the agent's buffer."""

    @abstractmethod
    def start_write(self, iova: int, nbytes: int, buffer_offset: int = 0) -> int:
        """Start a DMA that writes ``nbytes`` of the agent's buffer to memory at ``iova``."""

    @abstractmethod
    def wait(self) -> int:
        """Wait (bounded) for the started DMA to complete; the step's value is non-zero when it did."""

    @property
    @abstractmethod
    def reference(self) -> int:
        """Physical address of the host copy of the data this agent's writes carry (buffer offset
        0 onward); valid after ``load``."""

    @abstractmethod
    def load(self, staging: int) -> int:
        """Before translation is on: give the agent the data its writes carry and make the host
        reference copy.  edu reads its buffer from ``staging`` (which then is the reference);
        a controller writes its own data untranslated to its reference page.  Returns the wait."""

    def private_ranges(self) -> list[tuple[int, int]]:
        """(physical address, bytes) of memory the device itself reads or writes while it works:
        every domain the agent is attached to must map it 1:1."""
        return []

    def read_source(self, page: int) -> int:
        """The physical page a test maps an IOVA to for a translated device read that should
        succeed: ``page`` itself for agents that read plain data (edu, NVMe Compare); an agent
        whose reads are fetches of its own command structures names the page holding one."""
        return page

    def check_written(self, addr: int, nbytes: int, buffer_offset: int = 0) -> int:
        """A step whose value is the number of qwords of ``nbytes`` at ``addr`` that differ from
        what a write from ``buffer_offset`` carries (0: the agent's data landed there)."""
        return self.steps.call("mem_compare_qwords", addr, self.reference + buffer_offset, nbytes)

    def dma_read(self, iova: int, nbytes: int, buffer_offset: int = 0) -> int:
        """Memory at ``iova`` -> the agent (the device reads); returns the completion-wait step."""
        self.start_read(iova, nbytes, buffer_offset)
        return self.wait()

    def dma_write(self, iova: int, nbytes: int, buffer_offset: int = 0) -> int:
        """The agent -> memory at ``iova`` (the device writes); returns the completion-wait step."""
        self.start_write(iova, nbytes, buffer_offset)
        return self.wait()
