"""A host-side memory witness for the payload's memory compares (issue 14).

The payload's MEMCMP record (records.py: step, mismatching qwords, first mismatching offset, value
found there) is its own claim about guest memory.  On a target whose host can read guest memory
(QEMU: ``QmpControl.read_memory``), the witness reads every compared region itself at a sync point
placed after the compares, while the VM is still alive, recomputes the three values and requires
them to equal the payload's.  A disagreement fails the test, as the trace witness does for faults.

    witness = MemoryWitness.attach(scen.steps)        # a sync point after the compares
    with target.at(witness.point, witness.read):
        run = run_scenario(...)
    witness.check(run)                                # WitnessDisagreement on any difference
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from ..payload.records import Kind
from ..payload.steps import Op, StepList
from ..targets.base import HostControl, Target
from .run import Run

POINT = "vtx-witness"
NO_MISMATCH = (1 << 64) - 1          # MEMCMP's "first mismatching offset" when every qword matched


class WitnessDisagreement(AssertionError):
    """The host read different memory than the payload's compare record reports."""


@dataclass(frozen=True)
class Region:
    """One compare: ``nbytes`` at ``address`` should hold the qword ``pattern``; ``step`` is the
    step whose MEMCMP record reports it."""

    step: int
    address: int
    nbytes: int
    pattern: int
    label: str = ""

    def judge(self, memory: bytes) -> tuple[int, int, int]:
        """(mismatching qwords, first mismatching offset, value there) as MEM_COMPARE computes them."""
        words = [int.from_bytes(memory[i:i + 8], "little") for i in range(0, self.nbytes, 8)]
        bad = [(i * 8, w) for i, w in enumerate(words) if w != self.pattern]
        return (len(bad), bad[0][0], bad[0][1]) if bad else (0, NO_MISMATCH, 0)


@dataclass
class MemoryWitness:
    """The regions of one scenario's compares and what the host read there."""

    point: str = POINT
    regions: list[Region] = field(default_factory=list)
    memory: dict[int, bytes] = field(default_factory=dict)     # step -> bytes the host read

    @staticmethod
    def available(target: Target) -> bool:
        """Whether ``target``'s host can read guest memory at a sync point (QMP)."""
        return "qmp" in target.HOST_ACTIONS

    @classmethod
    def attach(cls, steps: StepList, point: str = POINT, first: int = 0) -> "MemoryWitness":
        """Add the sync point ``point`` after the last step (once: a second call finds it) and
        witness every MEM_COMPARE step from ``first`` up to it whose address is a constant."""
        at = steps.sync_points().get(point)
        if at is None:
            at = steps.sync(point)
        w = cls(point)
        for i, s in enumerate(steps.steps[first:at], start=first):
            if s.op == Op.MEM_COMPARE and s.base is None and all(isinstance(a, int) for a in s.args[:3]):
                w.regions.append(Region(i, *s.args[:3]))        # type: ignore[arg-type]
        return w

    def expect(self, step: int, address: int, nbytes: int, pattern: int, label: str = "") -> None:
        """Witness a compare the step list does not show as MEM_COMPARE (a routine's own MEMCMP)."""
        self.regions.append(Region(step, address, nbytes, pattern, label))

    def read(self, host: HostControl) -> None:
        """The sync action: read every region from the host."""
        for r in self.regions:
            self.memory[r.step] = host.read_memory(r.address, r.nbytes)

    def check(self, run: Run, labels: Mapping[str, int] | None = None) -> list[dict[str, Any]]:
        """Compare each region's host reading with the payload's MEMCMP record; record both in the
        run's witness.jsonl; raise WitnessDisagreement on the first difference.  ``labels`` (label ->
        step, e.g. VtdScenario.checks) names the compares in messages."""
        names = {step: label for label, step in (labels or {}).items()}
        results, bad = [], []
        for r in self.regions:
            label = r.label or names.get(r.step, f"step {r.step}")
            if r.step not in self.memory:
                raise WitnessDisagreement(f"witness: compare {label!r} at {r.address:#x} was never read by "
                                          f"the host (sync point {self.point!r}); evidence: {run.evidence}")
            host = r.judge(self.memory[r.step])
            claim = tuple(run.step_record(r.step, Kind.MEMCMP).fields[1:4])
            entry = {"label": label, "step": r.step, "address": r.address, "bytes": r.nbytes,
                     "pattern": r.pattern, "payload": list(claim), "host": list(host), "agree": claim == host}
            results.append(entry)
            if claim != host:
                bad.append(entry)
        with open(Path(run.evidence) / "witness.jsonl", "a") as f:
            for entry in results:
                f.write(json.dumps(entry) + "\n")
        if bad:
            e = bad[0]
            raise WitnessDisagreement(
                f"witness: compare {e['label']!r} of {e['bytes']} bytes at {e['address']:#x} against "
                f"{e['pattern']:#x}: the payload reports {_text(e['payload'])}, the host read "
                f"{_text(e['host'])}" + (f" (+{len(bad) - 1} more disagreements)" if len(bad) > 1 else "")
                + f"; evidence: {run.evidence}/witness.jsonl")
        return results


def run_witnessed(target: Target, steps: StepList, run: Callable[[], Run],
                  labels: Mapping[str, int] | None = None, point: str = POINT) -> Run:
    """``run()`` with every MEM_COMPARE of ``steps`` witnessed from the host when ``target`` can
    read guest memory (else, or without compares, just ``run()``).  The one call a scenario runner
    needs: VtdRunner.run wraps its target run in it."""
    if not MemoryWitness.available(target) or not any(s.op == Op.MEM_COMPARE for s in steps.steps):
        return run()
    w = MemoryWitness.attach(steps, point)
    with target.at(w.point, w.read):
        result = run()
    w.check(result, labels)
    return result


def _text(v: list[int]) -> str:
    return "a match" if v[0] == 0 else f"{v[0]} mismatching qwords, first at +{v[1]:#x} holding {v[2]:#x}"
