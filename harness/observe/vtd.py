"""VT-d observations: fault records and status from the payload, and QEMU's trace as a witness.

FRCD layout: VT-d spec 11.4.14 (fault recording registers, 128 bits): bits 11:0 reserved, FI 63:12
(the page address of a DMA-remapping fault; for an interrupt-remapping fault the interrupt index in
63:48 with 47:12 clear), SID 79:64, T2 92, PRIV 93, EXE 94, PP 95, FR 103:96, PV 123:104,
AT 125:124, T1 126 (0 = write, 1 = read), F 127.  The register never holds an address's bits 11:0:
the exact faulting address is the host witness's (``TraceFault.address``).  FSTS: 11.4.6.1.  The
witness is QEMU's ``vtd_dmar_fault`` / ``vtd_frr_new`` trace events (hw/i386/trace-events),
written by ``-D <evidence>/qemu-trace.log``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..payload.records import Kind, Record
from ..payload.vtd import FSTS_IQE, FSTS_PFO, FSTS_PPF, VtdKind
from .run import STEP_KINDS, Run


@dataclass(frozen=True)
class FaultRecord:
    """One fault recording register as the payload read it (``lo``: bits 63:0, ``hi``: 127:64)."""

    index: int
    lo: int
    hi: int

    @property
    def fault(self) -> bool:
        """F (bit 127): the register holds a fault."""
        return bool(self.hi >> 63 & 1)

    @property
    def fault_info(self) -> int:
        """Bits 63:0 exactly as read: FI (63:12) with the reserved bits 11:0, which read 0."""
        return self.lo

    @property
    def address(self) -> int:
        """FI (bits 63:12): the page address of the faulting DMA request (11.4.14 records no
        more: bits 11:0 of the register are reserved)."""
        return self.lo & ~0xFFF

    @property
    def source_id(self) -> int:
        """SID (bits 79:64): bus 15:8, device 7:3, function 2:0."""
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
    def address_type(self) -> int:
        """AT (bits 125:124): 0 untranslated, 1 translation request, 2 translated (PCIe ATS)."""
        return self.hi >> 60 & 3

    @property
    def pasid(self) -> int | None:
        """PV (bits 123:104) when PP (bit 95) says the request carried a PASID."""
        return self.hi >> 40 & 0xFFFFF if self.hi >> 31 & 1 else None

    @property
    def exe(self) -> bool:
        """EXE (bit 94): execute permission was requested (with a PASID)."""
        return bool(self.hi >> 30 & 1)

    @property
    def priv(self) -> bool:
        """PRIV (bit 93): supervisor privilege was requested (with a PASID)."""
        return bool(self.hi >> 29 & 1)

    @property
    def ir_index(self) -> int:
        """For interrupt-remapping faults FI holds the interrupt index in bits 63:48 (11.4.14)."""
        return self.lo >> 48

    def __str__(self) -> str:
        if not self.fault:
            return f"FRCD{self.index}: empty"
        extra = f" at={self.address_type}" if self.address_type else ""
        extra += f" pasid={self.pasid:#x}" if self.pasid is not None else ""
        return (f"FRCD{self.index}: reason {self.reason:#x} sid {self.bus:02x}:{self.dev:02x}.{self.fn} "
                f"{self.access} fi {self.lo:#x}{extra}")


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
    return [snap for _, snap in _snapshots(run.records)]


def _snapshots(records: list[Record]) -> list[tuple[int, FaultStatus]]:
    """(position of its FSTS record, snapshot) of every FSTS + FRCD group."""
    out: list[tuple[int, FaultStatus]] = []
    cur: tuple[int, int, int] | None = None
    recs: list[FaultRecord] = []
    for pos, r in enumerate(records):
        if r.kind == VtdKind.FSTS:
            if cur is not None:
                out.append((cur[0], FaultStatus(cur[1], cur[2], tuple(recs))))
            cur, recs = (pos, r.fields[1], r.fields[2]), []
        elif r.kind == VtdKind.FRCD and cur is not None:
            recs.append(FaultRecord(r.fields[1], r.fields[2], r.fields[3]))
    if cur is not None:
        out.append((cur[0], FaultStatus(cur[1], cur[2], tuple(recs))))
    return out


def routine_records(run: Run, step: int) -> list[Record]:
    """The records a CALL step's routine emitted: those after the previous step's records and
    before the step's own CALL record (the engine emits CALL when the routine returns)."""
    at = next((i for i, r in enumerate(run.records)
               if r.kind == Kind.CALL and r.fields and r.fields[0] == step), None)
    if at is None:
        raise AssertionError(f"step {step} emitted no CALL record (is it a routine call, and not "
                             f"quiet?); evidence: {run.evidence}")
    start = at
    while start > 0 and run.records[start - 1].kind not in STEP_KINDS and run.records[start - 1].kind != Kind.PROBE_DONE:
        start -= 1
    return list(run.records[start:at])


def fault_snapshot(run: Run, step: int) -> FaultStatus:
    """The snapshot taken by the ``Unit.faults()`` step ``step``."""
    recs = routine_records(run, step)
    snaps = _snapshots(recs)
    if len(snaps) != 1:
        raise AssertionError(f"step {step} is not a faults() step: its records are "
                             f"{[str(r) for r in recs] or 'none'}; evidence: {run.evidence}")
    return snaps[0][1]


@dataclass(frozen=True)
class QiWait:
    """One queued-invalidation wait of ``vtd_qi_submit``: where it polled, what it found, how often."""

    status_address: int
    value: int
    polls: int


def qi_waits(run: Run) -> list[QiWait]:
    """Every queued-invalidation wait of the run, in order."""
    return [QiWait(*r.fields[:3]) for r in run.records if r.kind == VtdKind.QI_WAIT]


def qi_wait(run: Run, step: int) -> QiWait:
    """The wait of the ``InvQueue.submit`` step ``step``."""
    found = [QiWait(*r.fields[:3]) for r in routine_records(run, step) if r.kind == VtdKind.QI_WAIT]
    if len(found) != 1:
        raise AssertionError(f"step {step} recorded {len(found)} queued-invalidation waits; "
                             f"evidence: {run.evidence}")
    return found[0]


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
    """``vtd_frr_new``: a fault QEMU wrote into fault recording register ``index``; ``cause`` is the
    ``vtd_dmar_fault`` event just before it, the detection that was recorded (with the exact
    address, which the register itself keeps only to the page)."""

    index: int
    hi: int
    lo: int
    cause: TraceFault | None = None


_FAULT = re.compile(r"vtd_dmar_fault sid 0x([0-9a-f]+) fault (\d+) addr 0x([0-9a-f]+) write (\d)")
_FRR = re.compile(r"vtd_frr_new index (\d+) high 0x([0-9a-f]+) low 0x([0-9a-f]+)")
# A batch of scenarios writes SLICE_MARKER | n to the read-only VER register (offset 0; VT-d 11.4.1:
# writes are ignored) before slice n, so that ``vtd_reg_write`` cuts the trace into slices.
SLICE_MARKER = 0x5C1E_0000
_REG_WRITE = re.compile(r"vtd_reg_write addr 0x0 size 0x4 value 0x([0-9a-f]+)")


@dataclass
class Trace:
    faults: list[TraceFault]
    records: list[TraceRecord]
    slices: dict[int, "Trace"] | None = None    # slice number -> its events (batches only)


def read_trace(path: Path) -> Trace:
    """Parse QEMU's trace log (missing file: nothing was traced).  Events after a slice marker
    (see SLICE_MARKER) also go to that slice's own Trace."""
    whole = Trace([], [], {})
    cur: Trace | None = None
    text = path.read_text(errors="replace") if path.exists() else ""
    for line in text.splitlines():
        if m := _FAULT.search(line):
            fault = TraceFault(int(m[1], 16), int(m[2]), int(m[3], 16), m[4] == "1")
            for t in (whole, cur):
                if t is not None:
                    t.faults.append(fault)
        elif m := _FRR.search(line):
            for t in (whole, cur):
                if t is not None:
                    t.records.append(TraceRecord(int(m[1]), int(m[2], 16), int(m[3], 16),
                                                 t.faults[-1] if t.faults else None))
        elif (m := _REG_WRITE.search(line)) and int(m[1], 16) & 0xFFFF_0000 == SLICE_MARKER:
            cur = whole.slices.setdefault(int(m[1], 16) & 0xFFFF, Trace([], []))  # type: ignore[union-attr]
    if not whole.slices:
        whole.slices = None
    return whole


class WitnessMismatch(AssertionError):
    """The payload's fault records and QEMU's trace disagree."""


def cross_check(run: Run, trace: Trace | None = None) -> Trace:
    """Every fault the payload saw recorded must be one QEMU traced as newly recorded (same
    FRCD bits), and every recorded fault QEMU traced must appear in some payload snapshot taken
    after it.  ``trace``: the events of this run (a batch slice's); default: the run's whole
    trace log.  Raises WitnessMismatch on disagreement; returns the trace for further asserts."""
    if trace is None:
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
