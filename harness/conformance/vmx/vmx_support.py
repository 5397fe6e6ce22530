"""VMX suite plumbing: tests describe a guest, yield, then assert on what the guest did.

    @vmx_test("ept")
    def test_something(v):
        v.guest("...")               # build phase: a VmxTest, as in kvm-unit-tests
        v.enter_guest()
        r = yield                    # the VmxResult of this guest
        assert r.exit.reason == ...

A Bochs boot costs far more than a guest, so the first VMX test that needs a result on a target
builds every selected, runnable VMX test for that target and runs them in batches (one boot per
batch; each guest bracketed by MARK records).  A test whose slice of a batch is incomplete (the
payload died in an earlier guest) is re-run alone, so one broken scenario cannot take others down.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Callable, Generator

import pytest

from harness.observe.runner import run_scenario
from harness.observe.vmx import VmxResult, split
from harness.payload.vmx.builder import VmxTest, batch
from harness.payload.vmx.controls import VmxCaps

BATCH_SIZE = 16
Builder = Callable[[VmxTest], Generator[None, VmxResult, None]]


def vmx_test(*requires: str) -> Callable[[Builder], Callable]:
    """Mark a generator function as a VMX test needing ``vmx`` plus ``requires``.  Parameters
    after the builder's first (``v``) come from ``pytest.mark.parametrize``."""

    def deco(fn: Builder) -> Callable:
        if not inspect.isgeneratorfunction(fn):
            raise TypeError(f"{fn.__name__}: a VMX test yields once to receive its result")

        @pytest.mark.requires("vmx", *requires)
        @functools.wraps(fn)
        def test(vmx: "VmxSession", request: pytest.FixtureRequest, evidence_dir: Path, **params) -> None:
            vmx.check(request.node, evidence_dir)

        test._vmx_builder = fn          # type: ignore[attr-defined]
        test.__signature__ = inspect.Signature([inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                                                for n in ("vmx", "request", "evidence_dir", *_params_of(fn))])
        return test

    return deco


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
        self.caps = VmxCaps(dict(target.probe.msrs), target.probe.features_ecx)
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
            if fn is None or spec is None or spec.params.get("vtx_target") != self.target.name:
                continue
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
        evidence = self.evidence_root / "_vmx" / self.target.name / tag
        run = run_scenario(self.target.target, batch(tests, name=tag), evidence, self.target.timeout)
        sliced = split(run.records)
        for n, nodeid in enumerate(ids):
            res = sliced.get(n)
            if res is not None and res.complete:
                self.results[nodeid] = (res, evidence)

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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Keep a target's VMX tests on one xdist worker (with --dist loadgroup) so its batches boot once."""
    for item in items:
        spec = getattr(item, "callspec", None)
        if getattr(getattr(item, "function", None), "_vmx_builder", None) and spec and "vtx_target" in spec.params:
            item.add_marker(pytest.mark.xdist_group(name=f"vmx-{spec.params['vtx_target']}"))


@pytest.fixture
def vmx(vtx_target, request: pytest.FixtureRequest) -> VmxSession:
    """The VMX batch session of this test's target (capability skips already applied)."""
    s = _SESSIONS.get(vtx_target.name)
    if s is None:
        root = vtx_target.evidence_dir.parent
        s = _SESSIONS[vtx_target.name] = VmxSession(vtx_target, root)
        s.plan(request.session.items)
    return s
