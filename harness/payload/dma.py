"""DMA agents: PCI functions that perform DMA on command, driven by engine steps.

A VT-d scenario needs a device that reads and writes memory at an address it is given, and says
when it is done; which device does not matter to the test.  ``DmaAgent`` is that interface.  QEMU's
``edu`` is the first agent (edu.py); NVMe (a write command reads memory, a read command writes it,
the completion queue says when) and AHCI fit the same five operations.  An agent type says which
PCI functions it drives (``matches``), so scenarios find agents in the boot probe's PCI list and
take their source-ids from it rather than from constants.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from .steps import StepList


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

    def dma_read(self, iova: int, nbytes: int, buffer_offset: int = 0) -> int:
        """Memory at ``iova`` -> the agent (the device reads); returns the completion-wait step."""
        self.start_read(iova, nbytes, buffer_offset)
        return self.wait()

    def dma_write(self, iova: int, nbytes: int, buffer_offset: int = 0) -> int:
        """The agent -> memory at ``iova`` (the device writes); returns the completion-wait step."""
        self.start_write(iova, nbytes, buffer_offset)
        return self.wait()
