"""Writing VT-d tests: a scenario builder, the ``vtd`` runner fixture's class, outcomes, fault checks.

    def test_write_lands_at_translated_address(vtd):
        s = vtd.scenario("write-4k")           # resets the unit first; finds a DMA agent
        s.prepare()                             # agent buffer := PATTERN, target pages := FILL
        dom = s.domain()
        dom.map(0x40_0000, page(1))
        s.attach(s.agent, dom, domain_id=1)
        s.unit.setup_translation(s.tables.root)
        s.agent.dma_write(0x40_0000, XFER)
        snap = s.unit.faults()
        s.compare("data", page(1), XFER, PATTERN)
        out = vtd.run(s)
        assert out.mismatches("data") == 0 and out.faults(snap).pending == []

A scenario is built for the target it will run on: its DMA agents are the PCI functions that
target's boot probe found (edu first; see ``harness.payload.dma``), so source-ids come from the
probe, never from constants.  ``vtd.variant(...)`` gives a runner for the target with QEMU's
devices or intel-iommu options changed.  Every run must end cleanly, and on a QEMU target that
traces ``vtd_dmar_fault``/``vtd_frr_new`` the payload's fault records are cross-checked with QEMU's.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pytest

from ..observe import Run
from ..observe import vtd as ovtd
from ..observe.probe import PciFunction, Probe
from ..observe.witness import MemoryWitness
from ..payload import layout, vtd
from ..payload.describe import describe
from ..payload.dma import DmaAgent
from ..payload.edu import Edu
from ..payload.image import Scenario
from ..payload.records import Kind
from ..payload.steps import FIRST_FREE_VAR
from ..payload.vtd_reset import reset_unit
from .vtd_batch import WITNESS_STEP, Slice, VtdBatches, traced, variant_key, witness_of, witnessing

STAGING = layout.SCRATCH_BASE             # untranslated pattern source for loading agents' buffers
PAGES = layout.SCRATCH_BASE + 0x10_0000   # 4 KiB target pages for DMA: page(n) = PAGES + n * 0x1000
PATTERN = 0x5A5A_1234_C3C3_8765           # what prepare() loads into every agent's buffer
FILL = 0x0F0F_0F0F_0F0F_0F0F              # what the target pages hold before a DMA
XFER = 256                                # a convenient DMA size (bytes)
AGENT_VECTOR = 0x50                       # completion vectors: AGENT_VECTOR + agent number

# Agent types a scenario looks for, in order of preference (NVMe and AHCI join here, issue 12).
AGENT_TYPES: tuple[type[DmaAgent], ...] = (Edu,)

# Target variants the suite uses (QEMU: ``devices`` replaced, ``iommu`` keys merged).
TWO_EDU = {"devices": [{"driver": "edu", "addr": "0x4.0", "options": {"dma_mask": "0xffffffffffffffff"}},
                       {"driver": "edu", "addr": "0x5.0", "options": {"dma_mask": "0xffffffffffffffff"}}]}
BEHIND_ROOT_PORT = {"devices": [{"driver": "pcie-root-port", "addr": "0x6.0", "id": "rp0", "options": {"chassis": "1"}},
                                {"driver": "edu", "bus": "rp0", "addr": "0x0.0",
                                 "options": {"dma_mask": "0xffffffffffffffff"}}]}
AW48 = {"iommu": {"aw_bits": 48}}
CACHING_MODE = {"iommu": {"caching_mode": True}}
INTREMAP = {"iommu": {"intremap": True}}


def page(n: int) -> int:
    """The n-th 4 KiB target page (physical address)."""
    return PAGES + n * 0x1000


def find_agents(probe: Probe, types: Sequence[type[DmaAgent]] = AGENT_TYPES) -> list[tuple[type[DmaAgent], PciFunction]]:
    """The PCI functions of the probe that some agent type drives, in enumeration order."""
    out = []
    for fn in probe.pci:
        kind = next((t for t in types if t.matches(fn.vendor, fn.device, fn.class_code)), None)
        if kind is not None:
            out.append((kind, fn))
    return out


class VtdScenario:
    """A scenario for one DMAR unit (the first the probe found) and ``agents`` DMA agents.

    Its first step resets the unit (``found_gsts``: GSTS as found), because on a real host firmware
    or a kexec'ing OS may have left translation, interrupt remapping or queued invalidation on.
    ``steps``, ``arena``, ``unit`` (``vtd.Unit``) and ``tables`` (``vtd.DmarTables``) are the
    payload layer's builders; ``agents`` drive DMA; ``checks`` names the steps whose results the
    test reads (``compare``)."""

    def __init__(self, name: str, probe: Probe, target_name: str, levels: int = 3, agents: int = 1,
                 agent_types: Sequence[type[DmaAgent]] = AGENT_TYPES, witnessed: bool = False):
        self.name = name
        self.witnessed = witnessed            # the host reads each compared region (QMP targets)
        self.levels = levels
        self.target_name = target_name
        found = find_agents(probe, agent_types)
        if len(found) < agents:
            have = ", ".join(f"{k.NAME} at {f}" for k, f in found) or "none"
            pytest.skip(f"requires {agents} DMA agent(s) ({'/'.join(t.NAME for t in agent_types)}); "
                        f"target {target_name} has {have} (probed)")
        self.scenario = Scenario(name=name)
        self.steps = self.scenario.steps
        self.arena = self.scenario.arena
        self.unit = vtd.Unit(self.steps)
        self.found_gsts = reset_unit(self.steps)
        self.tables = vtd.DmarTables(self.arena)
        self.agents: list[DmaAgent] = [kind(self.steps, fn.bdf, bar_var=FIRST_FREE_VAR + i,  # type: ignore[call-arg]
                                            vector=AGENT_VECTOR + i)
                                       for i, (kind, fn) in enumerate(found[:agents])]
        self.functions = [fn for _, fn in found[:agents]]
        self.checks: dict[str, int] = {}
        self.identity_checks: list[tuple[int, int, PciFunction]] = []   # (step, ID dword, function)

    @property
    def agent(self) -> DmaAgent:
        """The first DMA agent."""
        return self.agents[0]

    def domain(self, levels: int | None = None) -> vtd.SecondLevel:
        """A new second-level domain (3 or 4 levels; default: the scenario's)."""
        return vtd.SecondLevel(self.arena, levels or self.levels)

    def attach(self, agent: DmaAgent, domain: vtd.SecondLevel, domain_id: int, **kw: Any) -> int:
        """Point ``agent``'s context entry at ``domain``; returns the entry's physical address."""
        return self.tables.attach(agent.source_id, domain, domain_id, **kw)

    def set_context(self, agent: DmaAgent, entry: tuple[int, int]) -> int:
        """Store a context entry (lo, hi) verbatim for ``agent``; returns its physical address."""
        sid = agent.source_id
        return self.tables.set_context(sid >> 8, sid & 0xFF, entry)

    def prepare(self, fill_pages: int = 8, pattern: int = PATTERN) -> None:
        """Before translation is on: set up each agent, load its buffer with ``pattern`` through an
        untranslated DMA, and fill ``fill_pages`` target pages with FILL."""
        self.steps.mem_fill(STAGING, 4096, pattern)
        self.steps.mem_fill(PAGES, fill_pages * 0x1000, FILL)
        for a, fn in zip(self.agents, self.functions):
            self.identity_checks.append((a.setup(), fn.vendor | fn.device << 16, fn))
            a.dma_read(STAGING, min(4096 - 8, a.max_transfer) & ~7)

    def compare(self, label: str, addr: int, nbytes: int, pattern: int) -> int:
        """Compare ``nbytes`` at ``addr`` with the qword ``pattern``; read it as ``mismatches(label)``.
        Where the host can read guest memory, it reads the region right then too (a sync point
        after the compare) and the run fails if it disagrees with the payload's record."""
        self.checks[label] = self.steps.mem_compare(addr, nbytes, pattern)
        if self.witnessed:
            self.steps.add(WITNESS_STEP)
        return self.checks[label]

    def check(self, label: str, step: int) -> int:
        """Name a step whose result the test reads (``outcome.value(scen.checks[label])``)."""
        self.checks[label] = step
        return step


@dataclass
class VtdOutcome:
    """What a VT-d scenario did: the run, and QEMU's trace when the target writes one."""

    run: Run
    scen: VtdScenario
    trace: ovtd.Trace | None        # None: the target has no host-side witness

    def mismatches(self, label: str) -> int:
        """Mismatching qwords of a ``compare`` step (0: memory holds the pattern)."""
        return self.run.step_record(self.scen.checks[label], Kind.MEMCMP).fields[1]

    def faults(self, step: int | None = None) -> ovtd.FaultStatus:
        """The fault snapshot of the ``unit.faults()`` step ``step``; without a step the run must
        hold exactly one snapshot."""
        if step is not None:
            return ovtd.fault_snapshot(self.run, step)
        snaps = ovtd.fault_snapshots(self.run)
        if len(snaps) != 1:
            raise AssertionError(f"the run holds {len(snaps)} fault snapshots: name the faults() step "
                                 f"(evidence: {self.run.evidence})")
        return snaps[0]

    def value(self, step: int) -> int:
        """The value a reading step reported (MMIO/port read, routine call)."""
        return self.run.value(step)

    def memory(self, step: int) -> list[int]:
        """The qwords a ``steps.mem_read`` step reported."""
        return list(self.run.step_record(step, Kind.MEM).fields[2:])

    def qi_wait(self, step: int) -> ovtd.QiWait:
        """The invalidation wait of the ``InvQueue.submit`` step ``step``."""
        return ovtd.qi_wait(self.run, step)

    def witnessed(self, reason: int, source_id: int, address: int, access: str) -> bool | None:
        """Whether QEMU recorded a fault it detected with exactly these values, the full address
        included (None: no witness on this target)."""
        if self.trace is None:
            return None
        want = (source_id, reason, address, access == "write")
        return any(r.cause is not None and (r.cause.sid, r.cause.reason, r.cause.address, r.cause.is_write) == want
                   for r in self.trace.records)

    def note(self, **observation: Any) -> None:
        """Record an implementation-defined observation in the evidence (observations.jsonl)."""
        with open(Path(self.run.evidence) / "observations.jsonl", "a") as f:
            f.write(json.dumps(observation) + "\n")


class VtdRunner:
    """The ``vtd`` fixture: makes scenarios for this test's target and runs them.

    With ``batches`` (the fixture passes them unless batching is off), the test's first run takes
    its outcome from a batch of scenarios booted together when its scenario is the one planned
    (see harness.testing.vtd_batch); every other run, and any scenario the batch did not
    complete, boots alone."""

    def __init__(self, target: Any, evidence_dir: Path, batches: VtdBatches | None = None,
                 nodeid: str = "", key: str = "", runs: list[int] | None = None):
        self.target = target                  # the plugin's TestTarget (``vtx_target``)
        self.evidence_dir = evidence_dir
        self._batches, self._nodeid, self._key = batches, nodeid, key
        self._runs = runs if runs is not None else [0]   # runs made by this test (all its runners)

    @property
    def name(self) -> str:
        return self.target.name

    @property
    def probe(self) -> Probe:
        return self.target.probe

    @property
    def apic_id(self) -> int:
        """The probed APIC ID of the CPU the payload runs on: where its interrupts must go (on a
        real host the bootstrap processor's ID need not be 0)."""
        apic = self.probe.apic_id
        assert apic is not None, f"target {self.name}: the probe reported no APIC ID"
        return apic

    def scenario(self, name: str, levels: int = 3, agents: int = 1,
                 agent_types: Sequence[type[DmaAgent]] = AGENT_TYPES) -> VtdScenario:
        """A scenario for this runner's target (skips when it has fewer than ``agents`` agents)."""
        return VtdScenario(name, self.probe, self.name, levels, agents, agent_types,
                           witnessed=MemoryWitness.available(self.target.target))

    def variant(self, **changes: Any) -> "VtdRunner":
        """A runner for this target with its configuration changed (``vtx_target.variant``)."""
        return VtdRunner(self.target.variant(**changes), self.evidence_dir, self._batches, self._nodeid,
                         variant_key(changes), self._runs)

    def run(self, scen: VtdScenario) -> VtdOutcome:
        """Run ``scen`` (made by this runner), require a clean end, cross-check the witness."""
        if scen.target_name != self.name:
            raise ValueError(f"scenario {scen.name!r} was made for target {scen.target_name}, "
                             f"not {self.name}: make it with this runner's scenario()")
        first = self._runs[0] == 0
        self._runs[0] += 1
        sl = self._batches.outcome(self._nodeid, self._key, scen) if first and self._batches else None
        if sl is not None:
            run, trace = self._from_batch(sl), sl.trace
            if sl.witness is not None:
                sl.witness.check(run, scen.checks)
        else:
            witness = witness_of(scen.steps.steps)
            with witnessing(self.target.target, [witness]):
                run = self.target.run(scen.scenario).expect_ok()
            witness.check(run, scen.checks)
            trace = None
        for step, ident, fn in scen.identity_checks:      # the agent answered where the probe found it
            if run.value(step) != ident:
                raise AssertionError(f"the agent at {fn} read ID {run.value(step):#x} at set-up, expected "
                                     f"{ident:#x} (evidence: {run.evidence})")
        witness, _ = traced(self.target.config)
        return VtdOutcome(run, scen, ovtd.cross_check(run, trace) if witness else None)

    def _from_batch(self, sl: Slice) -> Run:
        """The slice's own run, with its evidence in this test's run directory: the slice's
        records (renumbered to its steps) and where the batch's whole evidence is."""
        evidence = self.target.evidence_dir / f"run-{len(self.target.runs) + 1}"
        evidence.mkdir(parents=True, exist_ok=True)
        run = Run(dataclasses.replace(sl.view.raw, evidence=evidence))      # type: ignore[union-attr]
        (evidence / "records.txt").write_text("".join(f"{describe(r)}\n" for r in run.records))
        (evidence / "batch.txt").write_text(
            f"this scenario ran as slice {sl.number} of a batch; steps {sl.offset}.."
            f"{sl.offset + len(sl.steps) - 1} of the batch image are its steps 0..{len(sl.steps) - 1}\n"
            f"batch evidence (serial.log, QEMU trace, image, replay.sh): {sl.evidence}\n")
        self.target.runs.append(run)
        return run


def assert_fault(rec: ovtd.FaultRecord, reason: int, source_id: int, address: int, access: str) -> None:
    """One fault recording register, field by field, exactly (VT-d 11.4.14): reason, source-id,
    access type, untranslated request (AT 0), no PASID, and bits 63:0 equal to the page address of
    ``address`` (FI; the reserved bits 11:0 read 0)."""
    assert rec.fault, f"no fault recorded: {rec}"
    got = (rec.reason, rec.source_id, rec.access, rec.address_type, rec.pasid, rec.fault_info)
    want = (reason, source_id, access, 0, None, address & ~0xFFF)
    assert got == want, f"{rec}: (reason, sid, access, AT, PASID, FI) = {got}, expected {want}"


def assert_single_fault(out: VtdOutcome, reason: int, source_id: int, address: int, access: str,
                        step: int | None = None) -> ovtd.FaultRecord:
    """The snapshot (of ``step``) holds exactly this one fault: FSTS.PPF set, PFO clear, FRI
    naming its register (11.4.6.1); and QEMU, where it witnesses, detected it at exactly
    ``address``.  Returns the record."""
    fs = out.faults(step)
    assert len(fs.pending) == 1, f"expected one recorded fault, got {[str(r) for r in fs.records]}"
    rec = fs.pending[0]
    assert_fault(rec, reason, source_id, address, access)
    assert (fs.ppf, fs.pfo, fs.fri) == (True, False, rec.index), \
        f"FSTS {fs.fsts:#x}: expected PPF=1, PFO=0, FRI={rec.index}"
    seen = out.witnessed(reason, source_id, address, access)
    assert seen in (True, None), f"QEMU traced no such fault: {out.trace.faults if out.trace else None}"
    return rec
