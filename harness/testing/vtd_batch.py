"""Batching VT-d scenarios: many tests' scenarios in one boot, each test still reading its own.

When the first VT-d test of a target runs, the other VT-d tests of the session for that target are
planned: each test body runs with a planning ``vtd`` runner up to its first ``vtd.run(...)``, which
keeps the scenario and stops the body.  Scenarios of one target configuration (a ``variant`` is a
configuration of its own) are packed into batches; a batch runs when the first of its tests does.

Slices are position-independent, so a test needs no change to be batched:
  * each scenario is built exactly as it would be alone: the same step numbers, the same arena
    addresses.  The batch image carries every slice's arena (past the identity map that all share)
    in a stash and copies it into place when the slice starts; the host renumbers the slice's
    records back to the slice's own steps, and gives the test a run of its own: the boot records,
    the slice's records, and an END for exactly its steps;
  * when the test runs, it builds its scenario again and ``vtd.run`` takes the batched outcome only
    if the scenario is identical to the one planned (steps, arena bytes, assembly); otherwise, or
    when its slice did not complete (the batch failed to start, ended early or timed out), the
    scenario runs alone, as it always did;
  * between slices the unit is reset (``vtd_reset``: translation, interrupt remapping and queued
    invalidation off, faults cleared), its context cache and IOTLB are invalidated globally through
    the registers (VT-d 6.5.1, 11.4.7/11.4.8), and the DMA scratch memory is zeroed, as after a boot;
  * where the host can read guest memory (QMP), every compare of a scenario is followed by the
    memory witness's sync point (``VtdScenario.compare``, ``compare_written``), where the host
    reads the compared region at that moment (for ``compare_written`` also the agent's reference
    copy, and counts the differing qwords itself); alone or batched, the n-th arrival is the n-th
    compare, and each test checks its own readings against its compare records
    (harness.observe.witness);
  * a ``variant`` is a configuration of its own, and so is a variant of a variant (NVMe, then
    aw-bits=48): the batch key is the chain of changes, in order;
  * on QEMU targets that witness faults, the batch writes a slice marker to the read-only VER
    register (11.4.1: the write is ignored) before each slice, and tracing ``vtd_reg_write`` cuts
    QEMU's trace into slices, so each test's faults are cross-checked against its own slice only.
    A target that witnesses faults but does not trace register writes is not batched.

Tests marked ``solo`` are never batched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from ..errors import BuildError, InfraError
from ..observe import Run
from ..observe import vtd as ovtd
from ..observe.run import STEP_KINDS
from ..payload import layout
from ..payload.image import Scenario
from ..payload.records import EndStatus, Kind, Record
from ..observe.witness import POINT as WITNESS_POINT, MemoryWitness, Region, WitnessDisagreement
from ..payload.steps import VAR_DMAR0, Op, Step, StepList
from ..payload.vtd import REG_VER, ccmd, iotlb_cmd, iva

if TYPE_CHECKING:
    from .vtd import VtdRunner, VtdScenario

log = logging.getLogger("vtx.batch")

MAX_SLICES = 16                 # scenarios per boot
MAX_STEPS = 5000                # steps per image (64 bytes each; the engine's window is 512 KiB)
MAX_STASH = 3 << 20             # bytes of slice arenas per image (the arena window is 6.5 MiB)
MAX_REBOOTS = 3                 # boots of a batch's remaining slices after one did not complete
SCRATCH_ZEROED = 2 << 20        # scratch bytes zeroed between slices (STAGING and page(0..255))
START, END = 0x5EC0_0000, 0x5EC1_0000   # MARK tags around slice n (| n)
TRACE_EVENTS = {"vtd_dmar_fault", "vtd_frr_new"}
MARKER_EVENT = "vtd_reg_write"


class _Planned(Exception):
    """Raised by the planning runner's run(): the test's first scenario, as built."""

    def __init__(self, key: str, scen: "VtdScenario"):
        super().__init__(key)
        self.key, self.scen = key, scen


@dataclass
class Slice:
    """One test's first scenario, as planned, and what became of it in its batch."""

    nodeid: str
    key: str                               # the target configuration (variant) it runs on
    steps: list[Step]
    arena: bytes
    asm: list[str]
    number: int = -1                       # its place in its batch
    offset: int = -1                       # index of its first step in the batch image
    view: Run | None = None                # its own run, cut from the batch's
    trace: ovtd.Trace | None = None
    witness: VtdWitness | None = None      # the host's reading of its compares (None: no QMP)
    evidence: Path | None = None
    why_solo: str = ""                     # why it must run alone after all

    def same(self, scen: "VtdScenario") -> bool:
        sc = scen.scenario
        return (sc.steps.steps == self.steps and sc.arena.bytes() == self.arena and sc.asm == self.asm
                and sc.probe and sc.identity_gib == 4 and not sc.prior_state)


@dataclass
class Batch:
    key: str
    number: int
    slices: list[Slice] = field(default_factory=list)
    ran: bool = False

    def steps(self) -> int:
        return sum(len(s.steps) + 8 for s in self.slices)

    def stash(self) -> int:
        return sum(len(s.arena) for s in self.slices)


def traced(cfg: Any) -> tuple[bool, bool]:
    """(faults witnessed by QEMU's trace, register writes traced too) for a target config."""
    events = set(cfg.section.get("trace", ())) if cfg.kind == "qemu" else set()
    return TRACE_EVENTS <= events, MARKER_EVENT in events


class VtdBatches:
    """Per-target planner, batch runner and cache of slices (one per pytest process and target)."""

    def __init__(self, runner: "VtdRunner", evidence_root: Path):
        self.base = runner.target                 # the plugin's TestTarget of the first test
        self.root = evidence_root / "_vtd" / self.base.name
        self.targets: dict[str, Any] = {"": self.base}   # key -> TestTarget
        self.slices: dict[tuple[str, str], Slice] = {}  # (nodeid, key) -> slice
        self.batches: list[Batch] = []

    # -- planning -----------------------------------------------------------------------------
    def target_for(self, key: str, chain: tuple[dict[str, Any], ...]) -> Any:
        """The planning target of a variant (``chain``: the changes applied, in order)."""
        if key not in self.targets:
            plan_dir = self.root / "_plan"
            plan_dir.mkdir(parents=True, exist_ok=True)
            target = dataclasses.replace(self.base, evidence_dir=plan_dir, runs=[], variants=len(self.targets))
            for changes in chain:
                target = target.variant(**changes)
            self.targets[key] = target
        return self.targets[key]

    def plan(self, items: list[pytest.Item]) -> None:
        from .vtd import VtdRunner

        t0 = time.monotonic()
        have = self.base.caps
        planned: list[Slice] = []
        for item in items:
            spec = getattr(item, "callspec", None)
            fn = getattr(item, "obj", None)
            if (spec is None or fn is None or spec.params.get("vtx_target") != self.base.name
                    or "vtd" not in getattr(item, "fixturenames", ()) or item.get_closest_marker("solo")):
                continue
            args = [a for a in getattr(item, "_fixtureinfo").argnames if a != "vtd"]
            if any(a not in spec.params for a in args):
                continue                           # needs other fixtures: it runs alone
            needs = [c for m in item.iter_markers("requires") for c in m.args]
            if any(c not in have for c in needs):
                continue
            runner = VtdRunner(self.base, self.root / "_plan", planning=self)
            try:
                fn(vtd=runner, **{a: spec.params[a] for a in args})
            except _Planned as p:
                sc = p.scen.scenario
                planned.append(Slice(item.nodeid, p.key, list(sc.steps.steps), sc.arena.bytes(), list(sc.asm)))
            except (Exception, pytest.skip.Exception, pytest.xfail.Exception):
                continue                           # the test itself will say what it is
        for sl in planned:
            self.slices[(sl.nodeid, sl.key)] = sl
            open_ = [b for b in self.batches if b.key == sl.key and not b.ran]
            b = open_[-1] if open_ else None
            if (b is None or len(b.slices) >= MAX_SLICES or b.steps() + len(sl.steps) > MAX_STEPS
                    or b.stash() + len(sl.arena) > MAX_STASH):
                b = Batch(sl.key, len(self.batches))
                self.batches.append(b)
            b.slices.append(sl)
        log.info("VT-d batches on %s: %d scenario(s) in %d batch(es), planned in %.2f s", self.base.name,
                 len(planned), len(self.batches), time.monotonic() - t0)

    # -- running ------------------------------------------------------------------------------
    def outcome(self, nodeid: str, key: str, scen: "VtdScenario") -> Slice | None:
        """The slice of ``nodeid``'s first scenario on ``key`` if it ran complete in a batch and
        ``scen`` is what was planned; None: run it alone."""
        sl = self.slices.get((nodeid, key))
        if sl is None:
            return None
        if not sl.same(scen):
            log.info("VT-d %s: its scenario differs from the one planned: it runs alone", nodeid)
            return None
        batch = next(b for b in self.batches if sl in b.slices)
        if not batch.ran:
            self._run(batch)
        if sl.view is None:
            log.info("VT-d %s: its slice did not complete (%s): it runs alone", nodeid, sl.why_solo)
            return None
        return sl

    def _run(self, batch: Batch) -> None:
        """Boot the batch; when a slice does not complete, it runs alone later and the slices
        after it boot again as a batch of their own (at most MAX_REBOOTS times)."""
        batch.ran = True
        target = self.targets[batch.key]
        witness, markers = traced(target.config)
        if witness and not markers:
            for sl in batch.slices:
                sl.why_solo = f"the target traces faults but not {MARKER_EVENT}, so a batch's trace cannot be cut"
            return
        todo, attempt = list(batch.slices), 0
        while todo:
            name = f"vtd-batch-{batch.number}" + (f".{attempt}" if attempt else "")
            done = self._boot(target, todo, name, witness, markers)
            attempt += 1
            todo = todo[done + 1:]
            if attempt > MAX_REBOOTS:
                for sl in todo:
                    sl.why_solo = f"batch {batch.number} was cut short {attempt} times"
                return

    def _boot(self, target: Any, slices: list[Slice], name: str, witness: bool, markers: bool) -> int:
        """One boot of ``slices``; returns how many completed in a row before the first that did
        not (len(slices) when all did)."""
        evidence = self.root / (name + (f"-{target.name.split('+', 1)[1]}" if "+" in target.name else ""))
        witnesses = [witness_of(sl.steps) for sl in slices] if MemoryWitness.available(target.target) else []
        try:
            image = self._image(slices, name, markers)
        except (BuildError, ValueError) as e:
            for sl in slices:
                sl.why_solo = f"the batch image could not be built: {e}"
            return len(slices)
        bound = (target.timeout or target.config.timeout_s) * (1 + len(slices) / 4)
        log.info("VT-d %s on %s: %d scenario(s)", name, target.name, len(slices))
        from ..observe.runner import run_scenario
        try:
            with witnessing(target.target, witnesses):
                run = run_scenario(target.target, image, evidence, bound)
        except InfraError as e:
            first = str(e).splitlines()[0]
            for sl in slices:
                sl.why_solo = f"the batch run failed: {first}"
            return len(slices)
        trace = ovtd.read_trace(Path(run.evidence) / "qemu-trace.log") if witness else None
        for n, sl in enumerate(slices):
            if not self._cut(run, n, sl, trace):
                return n
            sl.witness = witnesses[n] if witnesses else None
        return len(slices)

    def _image(self, slices: list[Slice], name: str, markers: bool) -> Scenario:
        sc = Scenario(name=name)
        common = len(sc.arena.bytes())            # the identity map every scenario starts with
        prefix = sc.arena.bytes()
        longest = max(len(sl.arena) for sl in slices)
        live = sc.arena.alloc(longest - common, 4096) if longest > common else layout.ARENA_BASE + common
        if live != layout.ARENA_BASE + common:
            raise ValueError(f"slice arenas would start at {live:#x}, not {layout.ARENA_BASE + common:#x}")
        stash = []
        for sl in slices:
            if sl.arena[:common] != prefix:
                raise ValueError(f"{sl.nodeid}: its arena does not start with the common identity map")
            tail = sl.arena[common:]
            stash.append((sc.arena.place(tail, 4096) if tail else 0, len(tail)))
        s = sc.steps
        for n, sl in enumerate(slices):
            if markers:
                s.mmio_write(REG_VER, ovtd.SLICE_MARKER | n, size=4, base=VAR_DMAR0, comment=f"slice {n} marker")
            s.call("vtd_reset", VAR_DMAR0, quiet=True)
            s.call("vtd_ccmd", VAR_DMAR0, ccmd(1), quiet=True)
            s.call("vtd_iotlb", VAR_DMAR0, iotlb_cmd(1), iva(0), quiet=True)
            s.mem_fill(layout.SCRATCH_BASE, SCRATCH_ZEROED, 0, quiet=True)
            if stash[n][1]:
                s.mem_copy(live, stash[n][0], stash[n][1] + (-stash[n][1] % 8), quiet=True)
            s.mark(START | n)
            sl.number, sl.offset = n, len(s.steps)
            s.steps.extend(sl.steps)
            s.mark(END | n)
            for a in sl.asm:
                if a not in sc.asm:
                    sc.asm.append(a)
        return sc

    def _cut(self, run: Run, n: int, sl: Slice, trace: ovtd.Trace | None) -> bool:
        """Slice ``n`` of ``run`` as a run of its own, renumbered to the slice's steps (False:
        it did not complete)."""
        recs = run.records
        marks = {r.fields[1]: i for i, r in enumerate(recs) if r.kind == Kind.MARK and len(r.fields) > 1}
        start, end = marks.get(START | n), marks.get(END | n)
        if start is None or end is None or end < start:
            sl.why_solo = f"the batch ({run.evidence}) ended with {run.end_status!r} before slice {n} completed"
            return False
        first = min(marks.get(START, start), start)        # the boot records end where slice 0 starts
        boot = [r for r in recs[:first] if r.kind != Kind.MARK]
        own = [_renumber(r, sl.offset) for r in recs[start + 1:end]]
        body = boot + own
        end_rec = Record(body[-1].seq + 1 if body else 0, Kind.END, (int(EndStatus.OK), len(body), len(sl.steps)))
        view = dataclasses.replace(run.raw, records=[*body, end_rec])
        sl.view = Run(view)
        sl.evidence = Path(run.evidence)
        if trace is not None:
            slices = trace.slices or {}
            if n not in slices:
                sl.view, sl.why_solo = None, f"the trace of batch {run.evidence} has no marker for slice {n}"
                return False
            sl.trace = slices[n]
        return True


def _shared_sync(point: str) -> Step:
    """The step of sync point ``point``, placed after every compare: one point reached once per
    compare (served with ``repeat``), so that the n-th arrival is the n-th compare."""
    one = StepList()
    one.sync(point)
    return one.steps[0]


WITNESS_STEP = _shared_sync(WITNESS_POINT)


@dataclass(frozen=True)
class Written:
    """A ``compare_written``: ``nbytes`` at ``address`` against the agent's reference copy at
    ``reference``; the step (a ``mem_compare_qwords`` call) reports the mismatching qwords."""

    step: int
    address: int
    reference: int
    nbytes: int


@dataclass
class VtdWitness(MemoryWitness):
    """The memory witness of a VT-d scenario: its pattern compares (``regions``) and its
    compares with an agent's own data (``written``: the host reads the region and the reference
    and counts the differing qwords itself).  ``order``: both, in step order, as the payload
    reaches the witness point after each."""

    written: list[Written] = field(default_factory=list)
    order: list[Region | Written] = field(default_factory=list)
    copies: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)   # step -> (region, reference)

    def read_next(self, host: Any, found: Region | Written) -> None:
        if isinstance(found, Written):
            self.copies[found.step] = (host.read_memory(found.address, found.nbytes),
                                       host.read_memory(found.reference, found.nbytes))
        else:
            self.memory[found.step] = host.read_memory(found.address, found.nbytes)

    def check(self, run: Run, labels: Any = None) -> list[dict[str, Any]]:
        results = super().check(run, labels)
        names = {step: label for label, step in (labels or {}).items()}
        bad = []
        for w in self.written:
            label = names.get(w.step, f"step {w.step}")
            if w.step not in self.copies:
                raise WitnessDisagreement(f"witness: compare {label!r} at {w.address:#x} was never read by "
                                          f"the host (sync point {self.point!r}); evidence: {run.evidence}")
            region, reference = self.copies[w.step]
            host = sum(region[i:i + 8] != reference[i:i + 8] for i in range(0, w.nbytes, 8))
            claim = run.value(w.step)
            entry = {"label": label, "step": w.step, "address": w.address, "bytes": w.nbytes,
                     "reference": w.reference, "payload": claim, "host": host, "agree": claim == host}
            results.append(entry)
            if claim != host:
                bad.append(entry)
        if self.written:
            with open(Path(run.evidence) / "witness.jsonl", "a") as f:
                for entry in results[-len(self.written):]:
                    f.write(json.dumps(entry) + "\n")
        if bad:
            e = bad[0]
            raise WitnessDisagreement(
                f"witness: compare {e['label']!r} of {e['bytes']} bytes at {e['address']:#x} with the agent's "
                f"data at {e['reference']:#x}: the payload reports {e['payload']} mismatching qwords, the host "
                f"counted {e['host']}; evidence: {run.evidence}/witness.jsonl")
        return results


def witness_of(steps: list[Step]) -> VtdWitness:
    """The witness of a scenario's compares: each MEM_COMPARE of a constant region, and each
    ``mem_compare_qwords`` call (``compare_written``), that is followed by WITNESS_STEP (step
    numbers as in ``steps``)."""
    w = VtdWitness(WITNESS_POINT)
    for i, st in enumerate(steps[:-1]):
        if steps[i + 1] != WITNESS_STEP or st.base is not None:
            continue
        if st.op == Op.MEM_COMPARE and all(isinstance(a, int) for a in st.args[:3]):
            w.regions.append(Region(i, *st.args[:3]))        # type: ignore[arg-type]
            w.order.append(w.regions[-1])
        elif (st.op == Op.CALL and st.args[:1] == ("mem_compare_qwords",)
              and all(isinstance(a, int) for a in st.args[1:4])):
            w.written.append(Written(i, *st.args[1:4]))      # type: ignore[arg-type]
            w.order.append(w.written[-1])
    return w


@contextlib.contextmanager
def witnessing(target: Any, witnesses: list[VtdWitness]) -> Any:
    """For the runs inside: at each arrival at the witness point, the host reads the next compare
    of ``witnesses`` (in order: the image's compares in step order)."""
    todo = iter([(w, r) for w in witnesses for r in w.order])

    def read(host: Any) -> None:
        found = next(todo, None)
        if found is None:
            raise InfraError(f"target {target.name}: the payload reached the memory witness's point "
                             f"more often than it has compares", stage="sync")
        found[0].read_next(host, found[1])
    if not any(w.order for w in witnesses):
        yield
        return
    with target.at(WITNESS_POINT, read, repeat=True):
        yield


def _renumber(r: Record, offset: int) -> Record:
    if r.kind in STEP_KINDS and r.fields:
        return Record(r.seq, r.kind, (r.fields[0] - offset, *r.fields[1:]))
    if r.kind == Kind.MSR and len(r.fields) == 4:
        return Record(r.seq, r.kind, (*r.fields[:3], r.fields[3] - offset))
    return r


def variant_key(chain: tuple[dict[str, Any], ...]) -> str:
    """The batch key of a variant: its changes in the order applied, canonically."""
    return json.dumps(list(chain), sort_keys=True, default=str)


_SESSIONS: dict[str, VtdBatches] = {}


def batches_for(runner: "VtdRunner", items: list[pytest.Item]) -> VtdBatches:
    """The batch planner of ``runner``'s target, planned over ``items`` on first use."""
    b = _SESSIONS.get(runner.target.name)
    if b is None:
        b = _SESSIONS[runner.target.name] = VtdBatches(runner, runner.target.evidence_dir.parent)
        b.plan(items)
    return b
