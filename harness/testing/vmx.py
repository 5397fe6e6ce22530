"""Writing VMX tests: describe a guest, yield, then assert on what the guest did.

    @vmx_test("ept")
    def test_something(v):
        v.guest("...")               # build phase: a VmxTest, as in kvm-unit-tests
        v.on(Exit.CPUID, Action.skip())
        v.enter_guest()
        r = yield                    # the VmxResult of this guest
        assert r.exit.reason == ...

Requirements are capability names from the boot probe (harness.observe.probe: one per VMX control,
EPT/VPID feature, IA32_VMX_MISC feature and VM function, plus ``cr3_targets`` and CPU features such
as ``xsave``): a test whose target lacks one skips, naming it, and is left out of batches.  A name
nobody defines is an error at import, not a silent skip.  One parameter of a test may need more:
``pytest.param(..., marks=requires("ept_1g"))``.  Known SDM deviations of a target are declared
with ``@deviation`` (harness.testing.deviations).

A Bochs boot costs far more than a guest, so the first VMX test that needs a result on a target
builds every selected, runnable VMX test for that target and runs them in batches (one boot per
batch; each guest bracketed by MARK records).  A test whose slice of a batch is incomplete is
re-run alone, and the tests after it (which never ran) form a new batch: one broken scenario can
neither take others down nor cost a boot per test after it.
"""

from __future__ import annotations

import functools
import inspect
import logging
from pathlib import Path
from typing import Callable, Generator

import pytest

from ..observe.probe import VMX_CAPABILITY_NAMES
from ..errors import InfraError
from ..observe.runner import run_scenario
from ..observe.vmx import VmxResult, split
from ..payload.vmx.builder import VmxTest, batch
from ..payload.vmx.controls import VmxCaps
from ..targets.base import parse_serial_log

BATCH_SIZE = 48          # guests per payload: a boot (QEMU start under nested KVM: ~12 s) costs more than a guest
log = logging.getLogger("vtx.vmx")
Builder = Callable[[VmxTest], Generator[None, VmxResult, None]]


# Capability names a VMX test may require besides the VMX ones (CPU-wide; VT-d ones start "vtd").
NEUTRAL_REQUIREMENTS = frozenset({"intel", "x2apic", "vtd"})


def check_requirements(where: str, requires: tuple[str, ...]) -> None:
    """Every name in ``requires`` is one the probe can report (a typo would skip silently)."""
    unknown = [r for r in requires if r not in VMX_CAPABILITY_NAMES and r not in NEUTRAL_REQUIREMENTS
               and not r.startswith("vtd.")]
    if unknown:
        raise TypeError(f"{where}: unknown capability name(s) {', '.join(map(repr, unknown))}; known VMX "
                        f"names: {', '.join(sorted(VMX_CAPABILITY_NAMES))}")


def requires(*names: str) -> pytest.MarkDecorator:
    """``pytest.mark.requires`` with probed capability names checked at import (for one
    ``pytest.param`` of a VMX test that needs more than the others)."""
    check_requirements("requires()", names)
    return pytest.mark.requires(*names)


def vmx_test(*requires: str) -> Callable[[Builder], Callable]:
    """Mark a generator function as a VMX test needing ``vmx`` plus ``requires`` (probed capability
    names, checked here).  Parameters after the builder's first (``v``) come from
    ``pytest.mark.parametrize``."""

    def deco(fn: Builder) -> Callable:
        if not inspect.isgeneratorfunction(fn):
            raise TypeError(f"{fn.__name__}: a VMX test yields once to receive its result")
        check_requirements(fn.__name__, requires)

        @pytest.mark.requires("vmx", *requires)
        @functools.wraps(fn)
        def test(vmx: "VmxSession", request: pytest.FixtureRequest, evidence_dir: Path, **params) -> None:
            vmx.check(request.node, evidence_dir)

        test._vmx_builder = fn          # type: ignore[attr-defined]
        test.__signature__ = inspect.Signature([inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                                                for n in ("vmx", "request", "evidence_dir", *_params_of(fn))])
        return test

    return deco


def vmx_caps(probe) -> VmxCaps:
    """The VMX capabilities of a probed target, for building guests (controls are reconciled
    against its capability MSRs, SDM Vol. 3D, A.3-A.5)."""
    return VmxCaps(dict(probe.msrs), probe.features_ecx)


def new_guest(vtx_target, name: str = "vmx") -> VmxTest:
    """A guest description for ``vtx_target`` outside ``@vmx_test`` (run it with ``run_guest``)."""
    return VmxTest(vmx_caps(vtx_target.probe), name=name)


def run_guest(vtx_target, v: VmxTest, name: str = "vmx-guest") -> VmxResult:
    """Run one guest in a boot of its own (no batching) and return its result; the run must end
    cleanly with the guest complete."""
    run = vtx_target.run(batch([v], name=name)).expect_ok()
    result = split(run.records).get(0)
    if result is None or not result.complete:
        raise AssertionError(f"the guest's run did not complete (evidence: {run.evidence})")
    return result


def _params_of(fn: Builder) -> list[str]:
    return list(inspect.signature(fn).parameters)[1:]


def _start(fn: Builder, caps: VmxCaps, item: pytest.Item) -> tuple[VmxTest, Generator]:
    """Build the test's guest: run its builder up to the ``yield``."""
    v = VmxTest(caps, name=item.nodeid)
    gen = fn(v, **{k: item.callspec.params[k] for k in _params_of(fn)})
    next(gen)
    return v, gen


class VmxSession:
    """Per-target batch planner and result cache."""

    def __init__(self, target, evidence_root: Path):
        self.target = target                       # the plugin's TestTarget (of the first test)
        self.evidence_root = evidence_root
        self.caps = vmx_caps(target.probe)
        self.pending: dict[str, tuple[VmxTest, Generator, int]] = {}
        self.results: dict[str, tuple[VmxResult, Path]] = {}
        self.batches: list[list[str]] = []
        self.planned = False

    def plan(self, items: list[pytest.Item]) -> None:
        have = self.target.caps
        order: list[str] = []
        for item in items:
            fn = getattr(getattr(item, "function", None), "_vmx_builder", None)
            spec = getattr(item, "callspec", None)
            if (fn is None or spec is None or spec.params.get("vtx_target") != self.target.name
                    or item.get_closest_marker("solo")):
                continue                            # solo (or a not-run deviation): never in a batch
            needs = [c for m in item.iter_markers("requires") for c in m.args]
            if any(c not in have for c in needs):
                continue
            try:
                v, gen = _start(fn, self.caps, item)
            except (Exception, pytest.skip.Exception):
                continue                            # the test itself will report it
            self.pending[item.nodeid] = (v, gen, 0)
            order.append(item.nodeid)
        self.batches = [order[i:i + BATCH_SIZE] for i in range(0, len(order), BATCH_SIZE)]
        self.planned = True

    def _run_batch(self, ids: list[str], tag: str) -> None:
        tests = [self.pending[i][0] for i in ids]
        log.info("VMX %s on %s: %d test(s) (%d batch(es) planned)", tag, self.target.name, len(ids),
                 len(self.batches))
        evidence = self.evidence_root / "_vmx" / self.target.name / tag
        try:
            records = run_scenario(self.target.target, batch(tests, name=tag), evidence, self.target.timeout).records
        except InfraError as e:
            if len(ids) == 1:
                raise
            # A guest that never returns (or kills the emulator) ends the batch's run: the guests
            # before it have their verdicts in what arrived; it and the rest are handled below.
            log.warning("VMX %s on %s ended early (%s): keeping the guests that completed",
                        tag, self.target.name, str(e).splitlines()[0])
            records = parse_serial_log(evidence).records
        sliced = split(records)
        for n, nodeid in enumerate(ids):
            res = sliced.get(n)
            if res is not None and res.complete:
                self.results[nodeid] = (res, evidence)
        unfinished = [i for i in ids if i not in self.results]
        if len(unfinished) > 1:
            # The first unfinished guest stopped the payload (it re-runs alone when its test
            # checks); the guests after it never ran, so they share a batch again, not a boot each.
            self.batches.append(unfinished[1:])

    def check(self, item: pytest.Item, evidence_dir: Path) -> None:
        fn = item.function._vmx_builder
        nodeid = item.nodeid
        if nodeid not in self.results:
            for k, ids in enumerate(self.batches):
                if nodeid in ids:
                    self.batches[k] = []
                    self._run_batch(ids, f"batch-{k}")
                    break
        if nodeid in self.results:
            gen = self.pending[nodeid][1]
            res, where = self.results[nodeid]
        else:                                      # not batched, or its batch did not finish it
            v, gen = _start(fn, self.caps, item)
            self.pending[nodeid] = (v, gen, 0)
            self._run_batch([nodeid], "solo-" + evidence_dir.name[-60:])
            if nodeid not in self.results:
                raise AssertionError(f"the guest's run did not complete (evidence: {self.evidence_root / '_vmx'})")
            res, where = self.results[nodeid]
        (evidence_dir / "vmx.txt").write_text(f"batch evidence: {where}\ntest index: {res.index}\n"
                                              + res.describe().replace("; ", "\n") + "\n")
        try:
            gen.send(res)
        except StopIteration:
            return
        raise AssertionError("a VMX test yields exactly once")


_SESSIONS: dict[str, VmxSession] = {}


def session_for(vtx_target, items: list[pytest.Item]) -> VmxSession:
    """The VMX batch session of ``vtx_target``'s target, planned over ``items`` on first use."""
    s = _SESSIONS.get(vtx_target.name)
    if s is None:
        s = _SESSIONS[vtx_target.name] = VmxSession(vtx_target, vtx_target.evidence_dir.parent)
        s.plan(items)
    return s


def is_vmx_test(item: pytest.Item) -> bool:
    return getattr(getattr(item, "function", None), "_vmx_builder", None) is not None
