"""Shared pieces of the VT-d conformance suite: scenario assembly, variant targets, checks.

Every scenario runs the payload's own fault reads and is cross-checked against QEMU's trace
(``vtd_dmar_fault`` / ``vtd_frr_new``) when the target writes one: a disagreement fails the test.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from harness.observe import Run
from harness.observe import vtd as ovtd
from harness.observe.runner import run_scenario
from harness.payload import edu as pedu
from harness.payload import layout, vtd
from harness.payload.image import Scenario
from harness.payload.records import Kind
from harness.payload.vtd_reset import VTD_RESET_ASM, reset_unit
from harness.targets import open_target
from harness.targets.config import from_dict

EDU0 = vtd.bdf(0, 4)          # configs/targets/qemu-tcg-vtd*.yaml: edu at 00:04.0
EDU1 = vtd.bdf(0, 5)          # the second edu of the two-device variant
STAGING = layout.SCRATCH_BASE             # untranslated pattern source for filling edu's buffer
PAGES = layout.SCRATCH_BASE + 0x10_0000   # 4 KiB target pages for DMA, PAGES + n * 0x1000
PATTERN = 0x5A5A_1234_C3C3_8765
FILL = 0x0F0F_0F0F_0F0F_0F0F              # what target memory holds before a DMA
XFER = 256                                # default DMA size (bytes)


def page(n: int) -> int:
    return PAGES + n * 0x1000


@dataclass
class VtdScenario:
    """A scenario with the VT-d and edu routines, one DMAR table set, and edu at 00:04.0.

    Its first step resets the unit (``found_gsts``: GSTS as found), because on a real host
    firmware or a kexec'ing OS may have left translation, interrupt remapping or queued
    invalidation on."""

    name: str
    levels: int = 3
    devices: tuple[int, ...] = (EDU0,)
    scenario: Scenario = field(init=False)

    def __post_init__(self) -> None:
        self.scenario = Scenario(name=self.name)
        self.scenario.asm += [vtd.VTD_ASM, VTD_RESET_ASM, pedu.PCI_ASM]
        self.steps = self.scenario.steps
        self.arena = self.scenario.arena
        self.unit = vtd.Unit(self.steps)
        self.found_gsts = reset_unit(self.steps)
        self.tables = vtd.DmarTables(self.arena)
        self.edus = [pedu.Edu(self.steps, d, bar_var=5 + i, vector=0x50 + i) for i, d in enumerate(self.devices)]
        self.edu = self.edus[0]
        self.checks: dict[str, int] = {}

    def domain(self, levels: int | None = None) -> vtd.SecondLevel:
        return vtd.SecondLevel(self.arena, levels or self.levels)

    def prepare(self, fill_pages: int = 8, pattern: int = PATTERN) -> None:
        """Before translation is on: set up each edu, load its buffer with ``pattern`` through an
        untranslated DMA, and fill the target pages with FILL."""
        self.steps.mem_fill(STAGING, 4096, pattern)
        self.steps.mem_fill(PAGES, fill_pages * 0x1000, FILL)
        for e in self.edus:
            e.setup()
            e.dma_read(STAGING, 4088)

    def compare(self, label: str, addr: int, nbytes: int, pattern: int) -> int:
        self.checks[label] = self.steps.mem_compare(addr, nbytes, pattern)
        return self.checks[label]


class Runner:
    """Runs VtdScenarios on the ``target`` fixture or on a variant of it."""

    def __init__(self, target, evidence_dir: Path):
        self.target = target
        self.evidence_dir = evidence_dir
        self.count = 0

    @property
    def apic_id(self) -> int:
        """The probed APIC ID of the CPU the payload runs on: where its interrupts must go (on
        a real host the bootstrap processor's ID need not be 0)."""
        return self.target.probe.apic_id

    def run(self, scen: VtdScenario, variant: dict | None = None) -> "Outcome":
        """Run, require a clean end, cross-check the fault records with QEMU's trace."""
        if variant is None:
            cfg = self.target.target.config
            run = self.target.run(scen.scenario)
        else:
            self.count += 1
            t = variant_target(self.target, variant)
            cfg = t.config
            run = run_scenario(t, scen.scenario, self.evidence_dir / f"variant-{self.count}")
        run.expect_ok()
        witnessed = cfg.kind == "qemu" and {"vtd_dmar_fault", "vtd_frr_new"} <= set(cfg.section["trace"])
        trace = ovtd.cross_check(run) if witnessed else ovtd.Trace([], [])
        return Outcome(run, scen, trace)


@dataclass
class Outcome:
    run: Run
    scen: VtdScenario
    trace: ovtd.Trace

    def mismatches(self, label: str) -> int:
        """Mismatching qwords of a ``compare`` step (0: memory holds the pattern)."""
        return self.run.step_record(self.scen.checks[label], Kind.MEMCMP).fields[1]

    def faults(self, n: int = -1) -> ovtd.FaultStatus:
        snaps = ovtd.fault_snapshots(self.run)
        assert snaps, f"no fault snapshot in the run ({self.run.evidence})"
        return snaps[n]

    def value(self, step: int) -> int:
        return self.run.value(step)

    def note(self, **observation) -> None:
        """Record an implementation-defined observation in the evidence directory."""
        with open(Path(self.run.evidence) / "observations.jsonl", "a") as f:
            f.write(json.dumps(observation) + "\n")


def variant_target(target, changes: dict):
    """A copy of a QEMU ``target`` with its ``qemu:`` section changed (iommu keys merge)."""
    cfg = target.target.config
    if cfg.kind != "qemu":
        pytest.skip(f"this scenario varies QEMU's intel-iommu/edu options; target {cfg.name} is {cfg.kind}")
    raw = copy.deepcopy(cfg.raw)
    q = raw["qemu"]
    for k, v in changes.items():
        if k == "iommu":
            q.setdefault("iommu", {}).update(v)
        else:
            q[k] = v
    raw["name"] = cfg.name + "+" + "-".join(sorted(changes))
    return open_target(from_dict(raw, f"{cfg.source} (variant {changes})"))


TWO_EDU = {"devices": [{"driver": "edu", "addr": "0x4.0", "options": {"dma_mask": "0xffffffffffffffff"}},
                       {"driver": "edu", "addr": "0x5.0", "options": {"dma_mask": "0xffffffffffffffff"}}]}
AW48 = {"iommu": {"aw_bits": 48}}
CACHING_MODE = {"iommu": {"caching_mode": True}}
INTREMAP = {"iommu": {"intremap": True}}


@pytest.fixture
def vtd_run(vtx_target, evidence_dir) -> Runner:
    return Runner(vtx_target, evidence_dir)


def assert_fault(rec: ovtd.FaultRecord, reason: int, sid: int, addr: int, access: str) -> None:
    """One recorded fault, field by field (VT-d 11.4.14)."""
    assert rec.fault, f"no fault recorded: {rec}"
    assert (rec.reason, rec.source_id, rec.address, rec.access) == (reason, sid, addr & ~0xFFF, access), str(rec)
