"""Layer 4: selecting.  The pytest plugin: targets, markers, capability skips, per-test evidence.

Registered through the ``pytest11`` entry point.  Options live in the "vtx" group; each has an
environment-variable fallback so CI jobs can select targets without editing command lines.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .errors import ConfigError, InfraError
from .observe import Probe, Run, capabilities
from .observe.runner import run_scenario
from .payload.image import Scenario
from .targets import Target, load, open_target

# The embedded default targets: the conformance suite's home on an ordinary CI machine.
DEFAULT_TARGETS = ("qemu-tcg-vtd", "bochs-skylake")
ENV_TARGETS = "VTX_TARGETS"
ENV_EVIDENCE = "VTX_EVIDENCE"

# Hooks for signals, crashed xdist workers and stale runtime directories live in their own module.
pytest_plugins = ("harness.pytest_infra",)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("vtx", "VT-x / VT-d harness")
    group.addoption("--target", action="append", default=None, metavar="NAME|PATH",
                    help="run each target-using test on this target (repeatable); "
                         f"default: ${ENV_TARGETS} (comma-separated), else {','.join(DEFAULT_TARGETS)}")
    group.addoption("--evidence-dir", default=None, metavar="DIR",
                    help=f"where per-test evidence goes; default: ${ENV_EVIDENCE}, else ./evidence")
    group.addoption("--run-timeout", type=float, default=None, metavar="SECONDS",
                    help="override every target's per-run timeout")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "emulated: the test runs on an emulated target (QEMU, Bochs)")
    config.addinivalue_line("markers", "baremetal: the test runs on a real host (lab machine)")
    config.addinivalue_line("markers", "requires(*capabilities): skip unless the probed target has them")
    config.addinivalue_line("markers", "xdist_group(name): tests that must share one worker")
    names = config.getoption("--target") or _env_list(ENV_TARGETS) or list(DEFAULT_TARGETS)
    configs = []
    for name in names:
        try:
            configs.append(load(name))
        except ConfigError as e:
            raise pytest.UsageError(str(e)) from None
    evidence = config.getoption("--evidence-dir") or os.environ.get(ENV_EVIDENCE) or "evidence"
    config.stash[_STATE] = _State(configs=configs, evidence_root=Path(evidence).resolve(),
                                  timeout=config.getoption("--run-timeout"))


def _env_list(var: str) -> list[str]:
    return [v.strip() for v in os.environ.get(var, "").split(",") if v.strip()]


@dataclass
class TargetSession:
    """One target for the whole pytest session: opened once, probed once (lazily)."""

    target: Target
    deny: tuple[str, ...]
    evidence_root: Path
    _probe: Run | None = None
    _failure: str | None = None

    @property
    def name(self) -> str:
        return self.target.name

    def unavailable(self) -> str | None:
        return self.target.unavailable()

    def probe_run(self) -> Run:
        if self._failure:
            raise InfraError(self._failure, stage="probe")
        if self._probe is None:
            try:
                self._probe = run_scenario(self.target, Scenario(name="probe"),
                                           self.evidence_root / "_probe" / self.name).expect_ok()
            except (InfraError, AssertionError) as e:
                self._failure = f"target {self.name}: boot probe failed: {e}"
                raise InfraError(self._failure, stage="probe") from None
        return self._probe

    @property
    def caps(self) -> set[str]:
        return capabilities(self.probe_run().probe, self.deny)


@dataclass
class TestTarget:
    """The ``vtx_target`` fixture: a target bound to one test's evidence directory."""

    session: TargetSession
    evidence_dir: Path
    timeout: float | None
    runs: list[Run] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.session.name

    @property
    def target(self) -> Target:
        return self.session.target

    @property
    def caps(self) -> set[str]:
        return self.session.caps

    @property
    def probe(self) -> Probe:
        return self.session.probe_run().probe

    def run(self, scenario: Scenario, timeout: float | None = None) -> Run:
        """Build and run ``scenario``; its evidence goes to ``<test evidence>/run-<n>``."""
        evidence = self.evidence_dir / f"run-{len(self.runs) + 1}"
        result = run_scenario(self.target, scenario, evidence, timeout or self.timeout)
        self.runs.append(result)
        return result


@dataclass
class _State:
    configs: list
    evidence_root: Path
    timeout: float | None
    sessions: dict[str, TargetSession] = field(default_factory=dict)

    def session(self, name: str) -> TargetSession:
        if name not in self.sessions:
            config = next(c for c in self.configs if c.name == name)
            self.sessions[name] = TargetSession(open_target(config), config.deny, self.evidence_root)
        return self.sessions[name]


_STATE = pytest.StashKey[_State]()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "vtx_target" not in metafunc.fixturenames:
        return
    state = metafunc.config.stash[_STATE]
    params = []
    for c in state.configs:
        from .targets import kinds
        emulated = kinds()[c.kind].EMULATED
        marks = [pytest.mark.emulated if emulated else pytest.mark.baremetal]
        if not emulated:
            marks.append(pytest.mark.xdist_group(name=f"host-{c.name}"))   # one worker per host
        params.append(pytest.param(c.name, id=c.name, marks=marks))
    metafunc.parametrize("vtx_target", params, indirect=True)


def _safe(nodeid: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid).strip("_")[:150]


@pytest.fixture
def evidence_dir(request: pytest.FixtureRequest) -> Path:
    """This test's evidence directory (emptied at the start of the test)."""
    state = request.config.stash[_STATE]
    path = state.evidence_root / _safe(request.node.nodeid)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    request.node.stash[_EVIDENCE] = path
    return path


_EVIDENCE = pytest.StashKey[Path]()


@pytest.fixture
def vtx_target(request: pytest.FixtureRequest, evidence_dir: Path) -> TestTarget:
    """The target this test instance runs on, probed, with its requirements checked."""
    state = request.config.stash[_STATE]
    session = state.session(request.param)
    request.node.user_properties.append(("target", session.name))
    why = session.unavailable()
    if why:
        pytest.skip(f"target {session.name} unavailable: {why}")
    required = [c for m in request.node.iter_markers("requires") for c in m.args]
    if required:
        have = session.caps
        missing = [c for c in required if c not in have]
        if missing:
            pytest.skip(skip_reason(missing, have, session.name))
    return TestTarget(session, evidence_dir, state.timeout)


def _family(cap: str) -> str:
    return re.split(r"[._]", cap, maxsplit=1)[0]


def skip_reason(missing: list[str], have: set[str], target: str) -> str:
    """"requires X; target T has Y (probed)", where Y lists only capabilities of X's families."""
    families = {_family(m) for m in missing}
    related = sorted(c for c in have if _family(c) in families)
    shown = ", ".join(related) if related else f"no {'/'.join(sorted(families))} capabilities"
    return f"requires {', '.join(missing)}; target {target} has {shown} (probed)"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    path = item.stash.get(_EVIDENCE, None)
    if path is not None and report.when == "call":
        item.user_properties.append(("evidence", str(path)))
    if report.failed and path is not None:
        report.sections.append(("vtx evidence", str(path)))
    if call.excinfo is not None and call.excinfo.errisinstance(InfraError) and report.when == "call":
        # An infrastructure failure is not a verdict on the behaviour under test: report it as an
        # error (pytest's name for a failure outside the test body), with the stage that broke.
        report.when = "setup"
        stage = getattr(call.excinfo.value, "stage", "run")
        report.sections.append(("vtx infrastructure error", f"stage: {stage}"))
