"""VT-d observations: fault records and status from the payload, and QEMU's trace as a witness.

FRCD layout: VT-d spec 11.4.14 (fault recording registers, 128 bits): FI 63:12, SID 79:64,
FR 103:96, AT 125:124, T 126 (0 = write, 1 = read), F 127.  FSTS: 11.4.6.1.  The host-side witness
is QEMU's ``vtd_dmar_fault`` / ``vtd_frr_new`` trace events (hw/i386/trace-events), written by
``-D <evidence>/qemu-trace.log``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..payload.vtd import FSTS_IQE, FSTS_PFO, FSTS_PPF, VtdKind
from .run import Run


@dataclass(frozen=True)
class FaultRecord:
    """One fault recording register as the payload read it."""

    index: int
    lo: int
    hi: int

    @property
    def fault(self) -> bool:
        """F (bit 127): the register holds a fault."""
        return bool(self.hi >> 63 & 1)

    @property
    def address(self) -> int:
        """FI (bits 63:12): the page address of the faulting request."""
        return self.lo & ~0xFFF

    @property
    def source_id(self) -> int:
        return self.hi & 0xFFFF

    @property
    def bus(self) -> int:
        return self.source_id >> 8

    @property
    def dev(self) -> int:
        return self.source_id >> 3 & 0x1F

    @property
    def fn(self) -> int:
        return self.source_id & 7

    @property
    def reason(self) -> int:
        """FR (bits 103:96)."""
        return self.hi >> 32 & 0xFF

    @property
    def is_read(self) -> bool:
        """T (bit 126): 1 for a read request, 0 for a write."""
        return bool(self.hi >> 62 & 1)

    @property
    def access(self) -> str:
        return "read" if self.is_read else "write"

    @property
    def ir_index(self) -> int:
        """For interrupt-remapping faults FI holds the interrupt index in bits 63:48 (7.1.x)."""
        return self.lo >> 48

    def __str__(self) -> str:
        if not self.fault:
            return f"FRCD{self.index}: empty"
        return (f"FRCD{self.index}: reason {self.reason:#x} sid {self.bus:02x}:{self.dev:02x}.{self.fn} "
                f"{self.access} addr {self.address:#x}")


@dataclass(frozen=True)
class FaultStatus:
    """FSTS and FECTL at the time of a ``faults`` step, and every FRCD then."""

    fsts: int
    fectl: int
    records: tuple[FaultRecord, ...]

    @property
    def pfo(self) -> bool:
        return bool(self.fsts & FSTS_PFO)

    @property
    def ppf(self) -> bool:
        return bool(self.fsts & FSTS_PPF)

    @property
    def iqe(self) -> bool:
        return bool(self.fsts & FSTS_IQE)

    @property
    def fri(self) -> int:
        return self.fsts >> 8 & 0xFF

    @property
    def pending(self) -> list[FaultRecord]:
        return [r for r in self.records if r.fault]


def fault_snapshots(run: Run) -> list[FaultStatus]:
    """Every ``Unit.faults()`` snapshot of the run, in order."""
    out: list[FaultStatus] = []
    cur: tuple[int, int] | None = None
    recs: list[FaultRecord] = []
    for r in run.records:
        if r.kind == VtdKind.FSTS:
            if cur is not None:
                out.append(FaultStatus(cur[0], cur[1], tuple(recs)))
            cur, recs = (r.fields[1], r.fields[2]), []
        elif r.kind == VtdKind.FRCD and cur is not None:
            recs.append(FaultRecord(r.fields[1], r.fields[2], r.fields[3]))
    if cur is not None:
        out.append(FaultStatus(cur[0], cur[1], tuple(recs)))
    return out


def qi_waits(run: Run) -> list[tuple[int, int, int]]:
    """(status address, value seen, polls) of every queued-invalidation wait."""
    return [tuple(r.fields[:3]) for r in run.records if r.kind == VtdKind.QI_WAIT]  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# The host-side witness: QEMU trace events.

@dataclass(frozen=True)
class TraceFault:
    """``vtd_dmar_fault``: every fault QEMU's IOMMU detected (recorded or not)."""

    sid: int
    reason: int
    address: int
    is_write: bool


@dataclass(frozen=True)
class TraceRecord:
    """``vtd_frr_new``: a fault QEMU wrote into fault recording register ``index``."""

    index: int
    hi: int
    lo: int


_FAULT = re.compile(r"vtd_dmar_fault sid 0x([0-9a-f]+) fault (\d+) addr 0x([0-9a-f]+) write (\d)")
_FRR = re.compile(r"vtd_frr_new index (\d+) high 0x([0-9a-f]+) low 0x([0-9a-f]+)")


@dataclass
class Trace:
    faults: list[TraceFault]
    records: list[TraceRecord]


def read_trace(path: Path) -> Trace:
    """Parse QEMU's trace log (missing file: nothing was traced)."""
    faults, records = [], []
    text = path.read_text(errors="replace") if path.exists() else ""
    for line in text.splitlines():
        if m := _FAULT.search(line):
            faults.append(TraceFault(int(m[1], 16), int(m[2]), int(m[3], 16), m[4] == "1"))
        elif m := _FRR.search(line):
            records.append(TraceRecord(int(m[1]), int(m[2], 16), int(m[3], 16)))
    return Trace(faults, records)


class WitnessMismatch(AssertionError):
    """The payload's fault records and QEMU's trace disagree."""


def cross_check(run: Run) -> Trace:
    """Every fault the payload saw recorded must be one QEMU traced as newly recorded (same
    FRCD bits), and every recorded fault QEMU traced must appear in some payload snapshot taken
    after it.  Raises WitnessMismatch on disagreement; returns the trace for further asserts."""
    path = Path(run.evidence) / "qemu-trace.log"
    if not path.exists():
        raise WitnessMismatch(f"no QEMU trace at {path}: the witness is missing")
    trace = read_trace(path)
    traced = {(t.index, t.hi & ~(1 << 63), t.lo) for t in trace.records}
    seen = {(r.index, r.hi & ~(1 << 63), r.lo) for s in fault_snapshots(run) for r in s.pending}
    missing_in_trace = seen - traced
    if missing_in_trace:
        raise WitnessMismatch(f"payload read fault records QEMU never traced as recorded: "
                              f"{sorted(missing_in_trace)}; trace: {trace.records} ({run.evidence})")
    if fault_snapshots(run):
        unseen = traced - seen
        if unseen:
            raise WitnessMismatch(f"QEMU recorded faults the payload never read: {sorted(unseen)} "
                                  f"({run.evidence})")
    for t in trace.records:
        match = [f for f in trace.faults if f.sid == (t.hi & 0xFFFF) and f.reason == (t.hi >> 32 & 0xFF)]
        if not match:
            raise WitnessMismatch(f"recorded fault {t} has no vtd_dmar_fault event ({run.evidence})")
    return trace
