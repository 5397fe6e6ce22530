"""A run, observed: validated records, the probe, the end status and per-step results."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import InfraError, RecordStreamError
from ..payload.records import FAULT_FLAG, EndStatus, Kind, Record
from ..payload.steps import SyncKind
from ..targets.base import RawRun
from .probe import Probe

# Record kinds whose first field is the index of the step that produced them.
STEP_KINDS = {Kind.READ, Kind.POLL, Kind.CPUID, Kind.MEM, Kind.MEMCMP, Kind.CALL, Kind.IRQ,
              Kind.STEP_FAULT, Kind.MARK, SyncKind.SYNC, SyncKind.SYNC_DONE}

EXCEPTION_NAMES = {0: "#DE", 1: "#DB", 2: "NMI", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM",
                   8: "#DF", 10: "#TS", 11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF",
                   17: "#AC", 18: "#MC", 19: "#XM", 20: "#VE", 21: "#CP"}


@dataclass(frozen=True)
class ExceptionInfo:
    """An exception the payload did not expect: ``vector``, ``error_code``, ``rip`` and ``cr2``."""

    vector: int
    error_code: int
    rip: int
    cr2: int

    @property
    def name(self) -> str:
        return EXCEPTION_NAMES.get(self.vector, f"vector {self.vector}")

    def __str__(self) -> str:
        return f"{self.name} error={self.error_code:#x} rip={self.rip:#x} cr2={self.cr2:#x}"


class Run:
    """Typed view of a complete, validated run."""

    def __init__(self, raw: RawRun):
        self.raw = raw
        self.records = raw.records
        self.evidence = raw.evidence
        end = self.records[-1]
        self.end_status = EndStatus(end.fields[0]) if end.fields[0] in EndStatus._value2member_map_ else end.fields[0]
        self.probe = Probe.from_records(self.records)
        exc = self.first(Kind.EXCEPTION)
        self.exception = ExceptionInfo(*exc.fields[:4]) if exc else None

    def of(self, kind: int) -> list[Record]:
        return [r for r in self.records if r.kind == kind]

    def first(self, kind: int) -> Record | None:
        return next((r for r in self.records if r.kind == kind), None)

    def step(self, index: int) -> list[Record]:
        """Records produced by step ``index``."""
        return [r for r in self.records if r.kind in STEP_KINDS and r.fields and r.fields[0] == index]

    def step_record(self, index: int, kind: int) -> Record:
        recs = [r for r in self.step(index) if r.kind == kind]
        if len(recs) != 1:
            raise AssertionError(f"step {index}: expected one {Kind(kind).name} record, got "
                                 f"{[str(r) for r in self.step(index)] or 'none'} (evidence: {self.evidence})")
        return recs[0]

    def value(self, index: int) -> int:
        """The value a reading step reported: MMIO/port read, routine call, poll (last value read),
        interrupt wait (count), CPUID (eax), mem_read (first qword) or RDMSR."""
        for r in self.step(index):
            if r.kind in (Kind.READ, Kind.CALL, Kind.POLL):
                return r.fields[1]
            if r.kind == Kind.IRQ:                  # step, vector, count, iterations, ok
                return r.fields[2]
            if r.kind == Kind.CPUID:
                return r.fields[3]
            if r.kind == Kind.MEM:
                return r.fields[2]
        for r in self.records:
            if r.kind == Kind.MSR and len(r.fields) == 4 and r.fields[3] == index:
                return r.fields[1]
        raise AssertionError(f"step {index} reported no value: {[str(r) for r in self.step(index)] or 'no record'} "
                             f"(evidence: {self.evidence})")

    def step_fault(self, index: int) -> int | None:
        """The vector of a fault taken inside a guarded step (None when the step did not fault)."""
        for r in self.step(index):
            if r.kind == Kind.STEP_FAULT:
                return r.fields[1] & ~FAULT_FLAG
        return None

    def expect_ok(self) -> "Run":
        """Assert that the payload walked every step and ended normally."""
        if self.end_status != EndStatus.OK:
            detail = f": {self.exception}" if self.exception else ""
            raise AssertionError(f"payload ended with {self.end_status!r}{detail} (evidence: {self.evidence})")
        return self

    def __repr__(self) -> str:
        return f"<Run {self.raw.target} {len(self.records)} records end={self.end_status!r}>"


def observe(raw: RawRun, steps: int | None = None) -> Run:
    """Check the run's independent signals against each other and type it.

    ``steps`` is the scenario's step count: END reports how many steps the payload walked, and a
    run that ended OK must have walked all of them (a premature END, from a stray routine or a
    cut-short stream, is an infrastructure error, never a pass).  The exit status, where the target
    has one, must be the one the END status implies."""
    end = raw.records[-1]
    if steps is not None:
        walked = end.fields[2]
        if (end.fields[0] == EndStatus.OK and walked != steps) or walked > steps:
            raise RecordStreamError(
                f"target {raw.target}: terminal record says status {end.fields[0]} after {walked} "
                f"steps, the scenario has {steps}; evidence: {raw.evidence}", evidence=str(raw.evidence))
    expected: Callable[[int], int | None] | None = raw.exit_expected
    if expected is not None:
        want = expected(end.fields[0])
        if raw.exit_status != want:
            raise InfraError(
                f"target {raw.target}: exit status {raw.exit_status} disagrees with the terminal record "
                f"(status {end.fields[0]} implies {want}); evidence: {raw.evidence}",
                stage="exit", evidence=str(raw.evidence))
    return Run(raw)
