"""Writing VT-d tests: a scenario builder, the ``vtd`` runner fixture's class, outcomes, fault checks.

    @per_agent                                  # once each for edu, nvme, ahci
    def test_write_lands_at_translated_address(vtd, agent):
        run = vtd.with_agent(agent)             # QEMU: the variant that adds that device
        s = run.scenario("write-4k")            # resets the unit first; finds the DMA agent
        s.prepare()                             # agent's data := its reference, pages := FILL
        dom = s.domain()
        dom.map(0x40_0000, page(1))
        s.attach(s.agent, dom, domain_id=1)     # maps the agent's own queues 1:1 too
        s.unit.setup_translation(s.tables.root)
        s.agent.dma_write(0x40_0000, XFER)
        snap = s.unit.faults()
        s.compare_written("data", s.agent, page(1), XFER)
        out = run.run(s)
        assert out.mismatches("data") == 0 and out.faults(snap).pending == []

A scenario is built for the target it will run on: its DMA agents are the PCI functions that
target's boot probe found (edu unless the runner asks for another kind; see
``harness.payload.dma``), so source-ids come from the probe, never from constants.
``vtd.variant(...)`` gives a runner for the target with QEMU's devices or intel-iommu options
changed.  An agent that is not self-contained (NVMe, AHCI: they fetch their own commands first)
skips tests that block the whole device (``require_self_contained``).  Every run must end cleanly, and on a QEMU target that
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
from ..payload.ahci import Ahci
from ..payload.dma import DmaAgent
from ..payload.edu import Edu
from ..payload.nvme import Nvme
from ..payload.image import Scenario
from ..payload.records import Kind
from ..payload.steps import FIRST_FREE_VAR
from ..payload.vtd_reset import reset_unit
from ..targets import kinds
from .vtd_batch import (
    WITNESS_STEP, Slice, VtdBatches, _Planned, traced, variant_key, witness_of, witnessing,
)

STAGING = layout.SCRATCH_BASE             # untranslated pattern source for loading agents' buffers
PAGES = layout.SCRATCH_BASE + 0x10_0000   # 4 KiB target pages for DMA: page(n) = PAGES + n * 0x1000
PATTERN = 0x5A5A_1234_C3C3_8765           # what prepare() loads into every agent's buffer
FILL = 0x0F0F_0F0F_0F0F_0F0F              # what the target pages hold before a DMA
XFER = 256                                # a convenient DMA size (bytes)
AGENT_VECTOR = 0x50                       # completion vectors: AGENT_VECTOR + agent number

# Agent types a scenario looks for by default, in order of preference.  NVMe and AHCI are chosen
# per test (``VtdRunner.with_agent``): every q35 has an ICH9 AHCI at 00:1f.2 with no disk, which
# must not stand in for an edu.
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

# Target kinds whose IOMMU is QEMU's intel-iommu model (hw/i386/intel_iommu.c): its deviations from
# the VT-d specification are declared on these, so a real IOMMU on a lab host must pass the test.
QEMU_IOMMU = ("qemu", "remote-qemu", "kvmrunner")

# NVMe and AHCI on QEMU (issue 12).  The drives are ``null-co`` block nodes with read-zeroes=on: no
# host file exists at all (reads return zeros, nothing is stored), so there is nothing to create or
# remove (a null-co drive needs no allow_host_files), and the agents never issue a media-writing
# command anyway.  NVMe's drive is read-only (``ide-hd`` refuses a read-only node, so AHCI's is
# not).  AHCI is q35's built-in ICH9 HBA at 00:1f.2: its port 0 is bus ``ide.0``.
def _nvme(addr: str, n: int, bus: str | None = None) -> tuple[dict[str, Any], list[str]]:
    dev: dict[str, Any] = {"driver": "nvme", "addr": addr,
                           "options": {"drive": f"vtxnvm{n}", "serial": f"vtx-nvme{n}"}}
    if bus:
        dev["bus"] = bus
    return dev, ["-drive", f"if=none,id=vtxnvm{n},driver=null-co,read-zeroes=on,readonly=on"]


def _sata(n: int, bus: str) -> tuple[dict[str, Any], list[str]]:
    return ({"driver": "ide-hd", "bus": bus, "options": {"drive": f"vtxsata{n}"}},
            ["-drive", f"if=none,id=vtxsata{n},driver=null-co,read-zeroes=on"])


def _devices(*parts: tuple[dict[str, Any], list[str]]) -> dict[str, Any]:
    return {"devices": [d for d, _ in parts], "extra_args": [a for _, args in parts for a in args]}


_ROOT_PORT = ({"driver": "pcie-root-port", "addr": "0x6.0", "id": "rp0", "options": {"chassis": "1"}}, [])
NVME = _devices(_nvme("0x6.0", 0))
AHCI = _devices(_sata(0, "ide.0"))
NVME_AHCI = _devices(_nvme("0x6.0", 0), _sata(0, "ide.0"))
NVME_INTREMAP: dict[str, Any] = {**NVME, "iommu": {"intremap": True}}
# Two agents of one kind (isolation between two domains): a second NVMe controller with its own
# drive; a second AHCI HBA (ich9-ahci) at 00:07.0 whose port 0 has a disk.
TWO_NVME = _devices(_nvme("0x6.0", 0), _nvme("0x7.0", 1))
TWO_AHCI = _devices(({"driver": "ich9-ahci", "addr": "0x7.0", "id": "vtxahci"}, []), _sata(1, "vtxahci.0"),
                    _sata(0, "ide.0"))
NVME_BEHIND_ROOT_PORT = _devices(_ROOT_PORT, _nvme("0x0.0", 0, bus="rp0"))


@dataclass(frozen=True)
class AgentKind:
    """A kind of DMA agent the VT-d suite runs with: the types that drive it and, on targets whose
    devices can be varied (QEMU), the changes that give the target one, two, or one behind a PCIe
    root port (``{}``: the target as configured has it)."""

    name: str
    types: tuple[type[DmaAgent], ...]
    one: dict[str, Any]
    two: dict[str, Any]
    behind_root_port: dict[str, Any] | None       # None: no such variant (see AGENT_KINDS)
    #: a device read loads the data the agent's next write carries (edu); NVMe Compare and AHCI's
    #: command-table fetch read memory without keeping it
    reads_into_buffer: bool = False


AGENT_KINDS: dict[str, AgentKind] = {
    "edu": AgentKind("edu", (Edu,), {}, TWO_EDU, BEHIND_ROOT_PORT, reads_into_buffer=True),
    "nvme": AgentKind("nvme", (Nvme,), NVME, TWO_NVME, NVME_BEHIND_ROOT_PORT),
    # No AHCI behind a root port: q35's built-in AHCI at 00:1f.2 (bus 0) is always found first.
    "ahci": AgentKind("ahci", (Ahci,), AHCI, TWO_AHCI, None),
}

# Runs a test once per agent kind; the test takes ``agent`` (its name) and gets its runner from
# ``vtd.with_agent(agent)``.  Test ids end in the agent's name.
per_agent = pytest.mark.parametrize("agent", list(AGENT_KINDS))


def page(n: int) -> int:
    """The n-th 4 KiB target page (physical address)."""
    return PAGES + n * 0x1000


def find_agents(probe: Probe, types: Sequence[type[DmaAgent]] = AGENT_TYPES) -> list[tuple[type[DmaAgent], PciFunction]]:
    """The PCI functions of the probe that some agent type drives: by the order of ``types`` first
    (the preferred kind wins wherever it sits), then in enumeration order."""
    out = []
    for kind in types:
        out += [(kind, fn) for fn in probe.pci if kind.matches(fn.vendor, fn.device, fn.class_code)]
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

    def attach(self, agent: DmaAgent, domain: vtd.SecondLevel, domain_id: int, private: bool = True,
               **kw: Any) -> int:
        """Point ``agent``'s context entry at ``domain``; returns the entry's physical address.
        First the memory the device itself reads and writes (a controller's queues, command list)
        is mapped 1:1 in ``domain`` unless ``private`` is False (see ``DmaAgent.private_ranges``)."""
        if private:
            self.map_private(agent, domain)
        return self.tables.attach(agent.source_id, domain, domain_id, **kw)

    def map_private(self, agent: DmaAgent, domain: vtd.SecondLevel) -> None:
        """Map the memory ``agent``'s device reads and writes by itself 1:1 in ``domain`` (for a
        domain a test points a context entry at by hand; ``attach`` does it already)."""
        for addr, size in agent.private_ranges():
            domain.map_range(addr, addr, size)

    def set_context(self, agent: DmaAgent, entry: tuple[int, int]) -> int:
        """Store a context entry (lo, hi) verbatim for ``agent``; returns its physical address."""
        sid = agent.source_id
        return self.tables.set_context(sid >> 8, sid & 0xFF, entry)

    def prepare(self, fill_pages: int = 8, pattern: int = PATTERN) -> None:
        """Before translation is on: set up each agent, give it the data its writes carry (edu:
        ``pattern``, read untranslated from STAGING; a controller: its own data, written untranslated
        to its reference, see ``DmaAgent.load``), and fill ``fill_pages`` target pages with FILL."""
        self.steps.mem_fill(STAGING, 4096, pattern)
        self.steps.mem_fill(PAGES, fill_pages * 0x1000, FILL)
        for a, fn in zip(self.agents, self.functions):
            self.identity_checks.append((a.setup(), fn.vendor | fn.device << 16, fn))
            a.load(STAGING)

    def require_self_contained(self) -> None:
        """Skip unless every agent's first DMA on a command is the data access itself: a
        controller fetches its own queue or command list first, so where its whole device is
        blocked (root/context entry absent or invalid) that fetch faults, not the data IOVA."""
        for a in self.agents:
            if not a.self_contained:
                pytest.skip(f"{a.NAME} is not self-contained: its own command fetch faults before any "
                            f"data access when the whole device is blocked")

    def require_transfer(self, nbytes: int) -> None:
        """Skip when a transfer of ``nbytes`` is more than an agent can move in one DMA."""
        for a in self.agents:
            if nbytes > a.max_transfer:
                pytest.skip(f"{a.NAME} moves at most {a.max_transfer} bytes in one DMA, not {nbytes}")

    def compare(self, label: str, addr: int, nbytes: int, pattern: int) -> int:
        """Compare ``nbytes`` at ``addr`` with the qword ``pattern``; read it as ``mismatches(label)``.
        Where the host can read guest memory, it reads the region right then too (a sync point
        after the compare) and the run fails if it disagrees with the payload's record."""
        self.checks[label] = self.steps.mem_compare(addr, nbytes, pattern)
        if self.witnessed:
            self.steps.add(WITNESS_STEP)
        return self.checks[label]

    def compare_written(self, label: str, agent: DmaAgent, addr: int, nbytes: int, buffer_offset: int = 0) -> int:
        """Compare ``nbytes`` at ``addr`` with what ``agent``'s write from ``buffer_offset`` carries
        (its reference); read it as ``mismatches(label)``.  Witnessed like ``compare``: the host
        reads both the region and the reference right then and counts the differences itself."""
        self.checks[label] = agent.check_written(addr, nbytes, buffer_offset)
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
        """Mismatching qwords of a ``compare`` or ``compare_written`` step (0: memory holds the
        pattern, or the agent's data)."""
        step = self.scen.checks[label]
        if any(r.kind == Kind.CALL for r in self.run.step(step)):
            return self.run.value(step)
        return self.run.step_record(step, Kind.MEMCMP).fields[1]

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
                 nodeid: str = "", key: str = "", runs: list[int] | None = None,
                 agent_types: Sequence[type[DmaAgent]] = AGENT_TYPES,
                 changes: tuple[dict[str, Any], ...] = (), planning: VtdBatches | None = None):
        self.target = target                  # the plugin's TestTarget (``vtx_target``)
        self.evidence_dir = evidence_dir
        self._batches, self._nodeid, self._key = batches, nodeid, key
        self._runs = runs if runs is not None else [0]   # runs made by this test (all its runners)
        self.agent_types = tuple(agent_types)            # what scenario() looks for by default
        self._changes = changes                          # the variants applied, in order
        self._planning = planning                        # planning a batch: run() stops the test

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
                 agent_types: Sequence[type[DmaAgent]] | None = None) -> VtdScenario:
        """A scenario for this runner's target (skips when it has fewer than ``agents`` agents);
        its agents are of ``agent_types`` (default: the runner's, see ``with_agent``)."""
        return VtdScenario(name, self.probe, self.name, levels, agents, agent_types or self.agent_types,
                           witnessed=MemoryWitness.available(self.target.target))

    def variant(self, **changes: Any) -> "VtdRunner":
        """A runner for this target with its configuration changed (``vtx_target.variant``); a
        variant of a variant applies both, in order.  Its scenarios look for the same agents."""
        chain = (*self._changes, changes)
        key = variant_key(chain)
        target = self._planning.target_for(key, chain) if self._planning else self.target.variant(**changes)
        return VtdRunner(target, self.evidence_dir, self._batches, self._nodeid, key, self._runs,
                         self.agent_types, chain, self._planning)

    def with_agent(self, kind: str, count: int = 1, behind_root_port: bool = False) -> "VtdRunner":
        """A runner whose scenarios use ``count`` agents of ``kind`` (a name in AGENT_KINDS).  On
        a target whose devices can be varied (QEMU) the variant that adds them (one behind a PCIe
        root port with ``behind_root_port``); elsewhere the target as it is, whose probe must
        then show them (scenario() skips otherwise)."""
        k = AGENT_KINDS[kind]
        if behind_root_port and k.behind_root_port is None:
            pytest.skip(f"no target variant puts a {kind} agent behind a PCIe root port")
        changes = (k.behind_root_port or {}) if behind_root_port else k.two if count > 1 else k.one
        varies = "devices" in kinds()[self.target.config.kind].SCHEMA
        runner = self.variant(**changes) if changes and varies else self
        return VtdRunner(runner.target, runner.evidence_dir, runner._batches, runner._nodeid, runner._key,
                         runner._runs, k.types, runner._changes, runner._planning)

    def run(self, scen: VtdScenario) -> VtdOutcome:
        """Run ``scen`` (made by this runner), require a clean end, cross-check the witness."""
        if scen.target_name != self.name:
            raise ValueError(f"scenario {scen.name!r} was made for target {scen.target_name}, "
                             f"not {self.name}: make it with this runner's scenario()")
        if self._planning is not None:
            raise _Planned(self._key, scen)
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
