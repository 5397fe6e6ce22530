"""Layer 4: selecting.  The pytest plugin: targets, markers, capability skips, per-test evidence.

Registered through the ``pytest11`` entry point, so it is loaded by every pytest run in an
environment where the package is installed.  It therefore stays inert until asked: targets are
loaded only when a collected test uses the ``vtx_target`` fixture or when an option, environment
variable or ini key names targets; nothing is written and nothing is printed otherwise.

Every option lives in the "vtx" group and has an environment and an ini fallback (option first,
then environment, then ini):

    --vtx-target NAME|PATH   VTX_TARGETS (comma-separated)   vtx_targets
    --vtx-evidence-dir DIR   VTX_EVIDENCE_DIR                vtx_evidence_dir
    --vtx-run-timeout S      VTX_RUN_TIMEOUT                 vtx_run_timeout
    --vtx-allow-unavailable  VTX_ALLOW_UNAVAILABLE (1/0)     vtx_allow_unavailable
    --vtx-solo               VTX_SOLO (1/0)                  vtx_solo
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .errors import ConfigError, InfraError

if TYPE_CHECKING:
    from .observe import Probe, Run
    from .payload.image import Scenario
    from .targets import Target, TargetConfig

log = logging.getLogger("vtx.plugin")

# The embedded default targets: the conformance suite's home on an ordinary CI machine.  Used only
# when a collected test needs a target and none is named.
DEFAULT_TARGETS = ("qemu-tcg-vtd", "bochs-skylake")
ENV_TARGETS = "VTX_TARGETS"
ENV_EVIDENCE = "VTX_EVIDENCE_DIR"
ENV_RUN_TIMEOUT = "VTX_RUN_TIMEOUT"
ENV_ALLOW_UNAVAILABLE = "VTX_ALLOW_UNAVAILABLE"
ENV_SOLO = "VTX_SOLO"
TARGET_FIXTURES = ("vtx_target",)

# Hooks for signals, crashed xdist workers and stale runtime directories live in their own module;
# the test-writing API's fixtures (vtd, vmx) and VMX collection hook in harness.testing.fixtures;
# @deviation's collection hook (strict xfails per target) in harness.testing.deviations.
pytest_plugins = ("harness.pytest_infra", "harness.testing.deviations", "harness.testing.fixtures")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("vtx", "VT-x / VT-d harness (vtx)")
    group.addoption("--vtx-target", action="append", default=None, metavar="NAME|PATH",
                    help="run each target-using test on this target (repeatable); names resolve in "
                         "./targets, $VTX_TARGET_PATH, then the package; "
                         f"default: ${ENV_TARGETS} (comma-separated), ini vtx_targets, "
                         f"else {','.join(DEFAULT_TARGETS)}")
    group.addoption("--vtx-evidence-dir", default=None, metavar="DIR",
                    help=f"where per-test evidence goes; default: ${ENV_EVIDENCE}, ini vtx_evidence_dir, "
                         "else ./evidence")
    group.addoption("--vtx-run-timeout", default=None, metavar="SECONDS",
                    help="bound every run (including explicit run(..., timeout=...)) by this; "
                         f"default: ${ENV_RUN_TIMEOUT}, ini vtx_run_timeout, else each target's timeout_s")
    group.addoption("--vtx-allow-unavailable", action="store_true", default=None,
                    help="skip the tests of a named target that cannot run here instead of failing "
                         f"the run; default: ${ENV_ALLOW_UNAVAILABLE}, ini vtx_allow_unavailable")
    group.addoption("--vtx-solo", action="store_true", default=None,
                    help="boot every VT-d scenario alone instead of batching several per boot; "
                         f"default: ${ENV_SOLO}, ini vtx_solo")
    parser.addini("vtx_targets", "targets to run target-using tests on (names or YAML paths)",
                  type="args", default=[])
    parser.addini("vtx_evidence_dir", "where per-test evidence goes (default ./evidence)", default="")
    parser.addini("vtx_run_timeout", "bound on every run, in seconds", default="")
    parser.addini("vtx_allow_unavailable", "skip (not fail) named targets that cannot run here",
                  type="bool", default=False)
    parser.addini("vtx_solo", "boot every VT-d scenario alone (no batching)", type="bool", default=False)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "emulated: the test runs on an emulated target (QEMU, Bochs)")
    config.addinivalue_line("markers", "baremetal: the test runs on a real host (lab machine)")
    config.addinivalue_line("markers", "requires(*capabilities): skip unless the probed target has them")
    config.addinivalue_line("markers", "xdist_group(name): tests that must share one worker")
    config.addinivalue_line("markers", "slow: minutes-long end-to-end runs (the KVM-runner stand-in boots Linux in "
                                       "Bochs); tools/test runs them, -m 'not slow' leaves them out")
    config.addinivalue_line("markers", "combined(*capabilities): needs VMX and VT-d on one target (and these); "
                                       "skips elsewhere with 'requires vmx and vtd on one target'")
    config.addinivalue_line("markers", "solo: boot this test's VT-d scenarios (or VMX guest) alone, never in a batch "
                                       "with others")
    config.addinivalue_line("markers", "deviation(on, section, observed, layer='', not_run=False): a known spec "
                                       "deviation of these targets or kinds: a strict xfail there (not_run: a skip, "
                                       "kept out of batches); see harness.testing.deviations")
    # Under xdist the controller hands its session token to the workers, so that they share one
    # probe per target (see ProbeCache); a worker reads it from its workerinput.
    worker = getattr(config, "workerinput", None)
    token = worker.get("vtx_session") if worker else None
    state = config.stash[_STATE] = _State(config, token or uuid.uuid4().hex)
    config.pluginmanager.register(Summary(state), "vtx-summary")


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist controller: give each worker this session's token."""
    node.workerinput["vtx_session"] = node.config.stash[_STATE].token


def _check_loadgroup(config: pytest.Config) -> None:
    """``--dist loadgroup`` must keep a target's VMX and VT-d tests on one worker: batches are
    planned per process, so ungrouped tests make both workers boot the same batches into the same
    evidence directories.  pytest 9.2 with pytest-xdist up to 3.8 drops the groups without a word
    (xdist issue #1386: xdist carries the group in the node id, which pytest 9.2 keeps fixed)."""
    if getattr(config.option, "dist", "no") != "loadgroup" or hasattr(config, "workerinput"):
        return
    import xdist

    def version(text: str) -> tuple[int, ...]:
        return tuple(int(p) for p in re.findall(r"\d+", text)[:2])

    if version(pytest.__version__) >= (9, 2) and version(xdist.__version__) <= (3, 8):
        raise pytest.UsageError(f"--dist loadgroup: pytest {pytest.__version__} with pytest-xdist {xdist.__version__} "
                                f"does not group tests (xdist issue #1386); install pytest<9.2 (what "
                                f"vtx-harness requires) or run without xdist (-n 0)")


def pytest_sessionstart(session: pytest.Session) -> None:
    """Check what the user named: a bad option is a usage error, and a named target that cannot
    run here fails the run unless unavailable targets are allowed (then its tests skip)."""
    _check_loadgroup(session.config)
    state = session.config.stash[_STATE]
    try:
        state.settings()
        if state.named() is not None:
            state.check_named_available()
    except ConfigError as e:
        raise pytest.UsageError(str(e)) from None


# --- settings ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    """The resolved options (command line, then environment, then ini)."""

    targets: tuple[str, ...] | None     # None: nothing named (defaults apply, lazily)
    targets_from: str                   # which option/variable/key named them
    evidence_root: Path
    run_timeout: float | None
    allow_unavailable: bool
    solo: bool = False                  # --vtx-solo: no batching of VT-d scenarios


def settings_of(config: pytest.Config) -> Settings:
    """This pytest process' resolved vtx settings."""
    return config.stash[_STATE].settings()


def target_config(config: pytest.Config, name: str) -> TargetConfig:
    """The configuration of the selected target called ``name`` (for hooks outside the plugin)."""
    return config.stash[_STATE].config_of(name)


def _env_list(var: str) -> list[str]:
    return [v.strip() for v in os.environ.get(var, "").split(",") if v.strip()]


def _flag(value: str, where: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("", "0", "false", "no", "off"):
        return False
    raise ConfigError(f"{where}: expected 1 or 0 (true/false), got {value!r}")


def resolve_settings(config: pytest.Config) -> Settings:
    """Option, else environment variable, else ini key, else the default; checked values."""
    from .targets.config import seconds

    names: tuple[str, ...] | None = None
    names_from = ""
    for value, where in ((config.getoption("--vtx-target"), "--vtx-target"),
                         (_env_list(ENV_TARGETS), ENV_TARGETS),
                         (config.getini("vtx_targets"), "ini vtx_targets")):
        if value:
            names, names_from = tuple(value), where
            break
    evidence = config.getoption("--vtx-evidence-dir") or os.environ.get(ENV_EVIDENCE)
    if not evidence and config.getini("vtx_evidence_dir"):
        # An ini path is relative to the ini file's directory, as pytest's own ini paths are.
        base = config.inipath.parent if config.inipath else Path.cwd()
        evidence = str(base / config.getini("vtx_evidence_dir"))
    evidence = evidence or "evidence"
    timeout: float | None = None
    for value, where in ((config.getoption("--vtx-run-timeout"), "--vtx-run-timeout"),
                         (os.environ.get(ENV_RUN_TIMEOUT), ENV_RUN_TIMEOUT),
                         (config.getini("vtx_run_timeout"), "ini vtx_run_timeout")):
        if value not in (None, ""):
            try:
                number: Any = float(value)
            except ValueError:
                number = value
            timeout = seconds(number, where)
            break
    allow = config.getoption("--vtx-allow-unavailable")
    if allow is None:
        raw = os.environ.get(ENV_ALLOW_UNAVAILABLE)
        allow = _flag(raw, ENV_ALLOW_UNAVAILABLE) if raw is not None else bool(config.getini("vtx_allow_unavailable"))
    solo = config.getoption("--vtx-solo")
    if solo is None:
        raw = os.environ.get(ENV_SOLO)
        solo = _flag(raw, ENV_SOLO) if raw is not None else bool(config.getini("vtx_solo"))
    return Settings(names, names_from, Path(evidence).resolve(), timeout, bool(allow), bool(solo))


# --- probes shared by every process of a session -----------------------------------------------

class ProbeCache:
    """One boot probe per target configuration per session, shared by xdist workers.

    The probe's records are kept as JSON in ``<evidence>/_probe/<name>-<key>/probe.json``, keyed
    by the configuration's content and stamped with the session token; a lock file makes the first
    worker probe while the others wait (bounded) and then read its result.  A failed probe is
    kept too, so every worker reports the same failure without booting again."""

    def __init__(self, root: Path, token: str):
        self.root = root
        self.token = token
        self.memo: dict[str, tuple[Probe, Path]] = {}

    @staticmethod
    def key(config: TargetConfig) -> str:
        text = json.dumps({"kind": config.kind, "raw": config.raw}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def probe(self, target: Target, timeout: float | None) -> tuple[Probe, Path]:
        key = self.key(target.config)
        if key not in self.memo:
            self.memo[key] = self._shared(target, key, timeout)
        return self.memo[key]

    def _shared(self, target: Target, key: str, timeout: float | None) -> tuple[Probe, Path]:
        from .observe import Probe
        from .payload.records import Record

        where = self.root / "_probe" / f"{target.name}-{key}"
        where.mkdir(parents=True, exist_ok=True)
        result = where / "probe.json"
        # A waiter gives up after the probe's own bound plus room for building and a slow start.
        patience = (timeout or target.config.timeout_s) + 120.0
        with open(where / ".lock", "w") as lock:
            deadline = time.monotonic() + patience
            waited = False
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not waited:
                        log.info("probe of %s: waiting for another worker's probe (lease %s)", target.name, where)
                        waited = True
                    if time.monotonic() > deadline:
                        raise InfraError(f"target {target.name}: another worker's boot probe did not finish "
                                         f"within {patience:.0f} s (lock {where / '.lock'})", stage="probe") from None
                    time.sleep(0.1)
            try:
                saved = self._read(result)
                if saved is None:
                    saved = self._run(target, where, timeout)
                    tmp = result.with_suffix(".tmp")
                    tmp.write_text(json.dumps(saved))
                    tmp.replace(result)
                else:
                    log.info("probe of %s: shared result from %s", target.name, where)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        if saved.get("failure"):
            raise InfraError(saved["failure"], stage="probe")
        records = [Record(seq, kind, tuple(fields)) for seq, kind, fields in saved["records"]]
        return Probe.from_records(records), where

    def _read(self, path: Path) -> dict | None:
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return saved if isinstance(saved, dict) and saved.get("session") == self.token else None

    def _run(self, target: Target, where: Path, timeout: float | None) -> dict:
        from .observe.runner import run_scenario
        from .payload.image import Scenario

        log.info("probe of %s: boot start (evidence %s)", target.name, where)
        with open(where / "boots", "a") as boots:     # one line per probe boot: shows the sharing
            boots.write(f"{os.getpid()}\n")
        t0 = time.monotonic()
        try:
            run = run_scenario(target, Scenario(name="probe"), where, timeout).expect_ok()
        except (InfraError, AssertionError) as e:
            log.info("probe of %s: failed after %.1f s", target.name, time.monotonic() - t0)
            return {"session": self.token, "failure": f"target {target.name}: boot probe failed: {e}"}
        log.info("probe of %s: done in %.1f s", target.name, time.monotonic() - t0)
        return {"session": self.token, "records": [[r.seq, r.kind, list(r.fields)] for r in run.records]}


# --- targets ----------------------------------------------------------------------------------

class TargetSession:
    """One target for the whole pytest session: opened once, probed once (lazily)."""

    def __init__(self, config: TargetConfig, cache: ProbeCache, timeout: float | None):
        from .targets import open_target

        self.config = config
        self.target = open_target(config)
        self.cache = cache
        self.timeout = timeout            # the session's --vtx-run-timeout, if any
        self._probe: tuple[Probe, Path] | None = None

    @property
    def name(self) -> str:
        return self.target.name

    def unavailable(self) -> str | None:
        return self.target.unavailable()

    @property
    def probe(self) -> Probe:
        if self._probe is None:
            self._probe = self.cache.probe(self.target, self.timeout)
        return self._probe[0]

    @property
    def probe_evidence(self) -> Path:
        self.probe
        assert self._probe is not None
        return self._probe[1]

    @property
    def caps(self) -> set[str]:
        from .observe import capabilities

        return capabilities(self.probe, self.config.deny)


@dataclass
class TestTarget:
    """The ``vtx_target`` fixture: a target bound to one test's evidence directory.

    ``run(scenario)`` builds and runs a scenario (evidence under ``<test evidence>/run-<n>``);
    ``probe`` and ``caps`` are the target's boot probe and capability names; ``variant(...)``
    gives the same target with its configuration changed."""

    __test__ = False                       # not a test class, despite its name

    session: TargetSession
    evidence_dir: Path
    timeout: float | None                  # --vtx-run-timeout: overrides every run's timeout
    runs: list[Run] = field(default_factory=list)
    variants: int = 0

    @property
    def name(self) -> str:
        return self.session.name

    @property
    def target(self) -> Target:
        return self.session.target

    @property
    def config(self) -> TargetConfig:
        return self.session.config

    @property
    def kind(self) -> str:
        return self.session.config.kind

    @property
    def caps(self) -> set[str]:
        return self.session.caps

    @property
    def probe(self) -> Probe:
        return self.session.probe

    def run(self, scenario: Scenario, timeout: float | None = None) -> Run:
        """Build and run ``scenario``; its evidence goes to ``<test evidence>/run-<n>``.

        ``timeout`` bounds this run (default: the target's ``timeout_s``); a session-wide
        ``--vtx-run-timeout`` overrides both."""
        from .observe.runner import run_scenario

        evidence = self.evidence_dir / f"run-{len(self.runs) + 1}"
        bound = self.timeout if self.timeout is not None else timeout
        log.info("run %s on %s: start (evidence %s)", scenario.name, self.name, evidence)
        t0 = time.monotonic()
        try:
            result = run_scenario(self.target, scenario, evidence, bound)
        finally:
            log.info("run %s on %s: end after %.2f s", scenario.name, self.name, time.monotonic() - t0)
        self.runs.append(result)
        return result

    def at(self, point: Any, action: Any = None, repeat: bool = False) -> Any:
        """Host actions at the payload's sync points (``steps.sync``), for the runs made inside
        the ``with`` block: see ``Target.at``."""
        return self.target.at(point, action, repeat)

    def variant(self, **changes: Any) -> TestTarget:
        """This target with its kind's section changed, e.g. ``variant(iommu={"intremap": True})``
        or ``variant(devices=[...])``: ``devices`` is replaced, ``iommu`` keys are merged into the
        target's, any other key is replaced.  Named ``<name>+<changed keys>``, probed on its own
        (lazily), with its evidence under this test's evidence directory.  On a kind that has no
        such key (e.g. Bochs and ``devices``) the test skips, naming the kind."""
        from .targets import kinds
        from .targets.config import from_dict

        if not changes:
            raise TypeError("variant() needs at least one change, e.g. iommu={'intremap': True}")
        cfg = self.config
        registry = kinds()
        schema = registry[cfg.kind].SCHEMA
        for key in changes:
            if key not in schema:
                if not any(key in k.SCHEMA for k in registry.values()):
                    raise ConfigError(f"variant(): {key}: no target kind has this key "
                                      f"(kind {cfg.kind} has: {', '.join(sorted(schema))})")
                pytest.skip(f"target {cfg.name} is kind {cfg.kind}, which has no {key!r} to vary")
        raw = copy.deepcopy(cfg.raw)
        section = raw.setdefault(registry[cfg.kind].SECTION, {})
        for key, value in changes.items():
            if key == "iommu" and isinstance(value, dict) and isinstance(section.get("iommu"), dict):
                section["iommu"] = {**section["iommu"], **copy.deepcopy(value)}
            else:
                section[key] = copy.deepcopy(value)
        raw["name"] = "+".join([cfg.name, *sorted(changes)])
        config = from_dict(raw, f"{cfg.source} (variant {changes})")
        self.variants += 1
        evidence = self.evidence_dir / f"variant-{self.variants}"
        evidence.mkdir(parents=True, exist_ok=True)
        session = TargetSession(config, self.session.cache, self.timeout)
        log.info("variant %s of %s: %s", config.name, self.name, changes)
        return TestTarget(session, evidence, self.timeout)


class _State:
    """Per-pytest-process state: settings, target configs and sessions, summary counts."""

    def __init__(self, config: pytest.Config, token: str):
        self.config = config
        self.token = token
        self._settings: Settings | None = None
        self._configs: list[TargetConfig] | None = None
        self.sessions: dict[str, TargetSession] = {}
        self._cache: ProbeCache | None = None
        self.deselected: dict[str, Deselected] = {}

    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = resolve_settings(self.config)
        return self._settings

    def named(self) -> tuple[str, ...] | None:
        return self.settings().targets

    def configs(self) -> list[TargetConfig]:
        """The selected targets' configs (named, else the defaults), loaded on first use."""
        if self._configs is None:
            from .targets.catalog import load_many

            s = self.settings()
            self._configs = load_many(list(s.targets or DEFAULT_TARGETS), s.targets_from or "default target")
            log.info("targets: %s", ", ".join(c.name for c in self._configs))
            # Only now is the harness in use: before its first run, complete what killed runs
            # left (an unrelated pytest run never gets here, so it touches nothing).
            from .targets.base import sweep_runtime_dirs

            sweep_runtime_dirs()
        return self._configs

    def config_of(self, name: str) -> TargetConfig:
        return next(c for c in self.configs() if c.name == name)

    def check_named_available(self) -> None:
        s = self.settings()
        for c in self.configs():
            why = self.session(c.name).unavailable()
            if why and not s.allow_unavailable:
                raise ConfigError(f"target {c.name} (named by {s.targets_from}) cannot run here: {why}; "
                                  f"pass --vtx-allow-unavailable (or {ENV_ALLOW_UNAVAILABLE}=1) to skip its tests instead")

    def cache(self) -> ProbeCache:
        if self._cache is None:
            self._cache = ProbeCache(self.settings().evidence_root, self.token)
        return self._cache

    def session(self, name: str) -> TargetSession:
        if name not in self.sessions:
            self.sessions[name] = TargetSession(self.config_of(name), self.cache(), self.settings().run_timeout)
        return self.sessions[name]


_STATE = pytest.StashKey[_State]()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if not any(f in metafunc.fixturenames for f in TARGET_FIXTURES):
        return
    from .targets import kinds

    state = metafunc.config.stash[_STATE]
    try:
        configs = state.configs()
    except ConfigError as e:
        raise pytest.UsageError(str(e)) from None
    from .targets.baremetal.lease import pooled

    params = []
    for c in configs:
        emulated = kinds()[c.kind].EMULATED
        marks = [pytest.mark.emulated if emulated else pytest.mark.baremetal]
        if getattr(kinds()[c.kind], "SHARED_INSTANCE", False):
            # One instance per process (the KVM-runner stand-in): one worker, not one Bochs each.
            marks.append(pytest.mark.xdist_group(name=f"host-{c.name}"))
        elif not emulated and not pooled(c):
            # One worker per host; a pool of places (a labgrid tag filter) gives each worker its own.
            marks.append(pytest.mark.xdist_group(name=f"host-{c.name}"))
        params.append(pytest.param(c.name, id=c.name, marks=marks))
    metafunc.parametrize("vtx_target", params, indirect=True)


def _required(item: pytest.Item) -> list[str]:
    return [c for m in item.iter_markers("requires") for c in m.args]


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect tests that can never apply to a target's kind (a VMX test on a QEMU TCG target):
    counted in one line per target, instead of one skip line each."""
    from .targets.catalog import lacking

    state = config.stash[_STATE]
    keep, drop = [], []
    for item in items:
        spec = getattr(item, "callspec", None)
        name = spec.params.get("vtx_target") if spec is not None else None
        missing = lacking(state.config_of(name), _required(item)) if name is not None else frozenset()
        if not missing:
            keep.append(item)
            continue
        drop.append(item)
        entry = state.deselected.setdefault(name, Deselected())
        entry.count += 1
        entry.lacking.update(missing)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@dataclass
class Deselected:
    """Tests deselected on one target because its kind can never offer what they need."""

    count: int = 0
    lacking: set[str] = field(default_factory=set)

    def line(self, config: TargetConfig) -> str:
        from .targets.catalog import describe_kind

        tests = "test" if self.count == 1 else "tests"
        return (f"n/a on {config.name}: {self.count} {tests} deselected (they need "
                f"{' or '.join(sorted(self.lacking))}, which {describe_kind(config)} cannot offer)")


def _safe(nodeid: str) -> str:
    """A directory name for a test: its node id without the xdist group suffix that --dist
    loadgroup appends ("...[target]@group"), so evidence lands in one place with or without xdist."""
    if "@" in nodeid.rsplit("]", 1)[-1] or ("]" not in nodeid and "@" in nodeid.rsplit("::", 1)[-1]):
        nodeid = nodeid.rsplit("@", 1)[0]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid).strip("_")[:150]


@pytest.fixture
def evidence_dir(request: pytest.FixtureRequest) -> Path:
    """This test's evidence directory (emptied at the start of the test)."""
    state = request.config.stash[_STATE]
    path = state.settings().evidence_root / _safe(request.node.nodeid)
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
    required = _required(request.node)
    if required:
        have = session.caps
        missing = [c for c in required if c not in have]
        if missing:
            pytest.skip(skip_reason(missing, have, session.name))
    return TestTarget(session, evidence_dir, state.settings().run_timeout)


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
    # Infrastructure errors (InfraError in any phase) are reported by harness.pytest_infra.


# --- the per-target summary --------------------------------------------------------------------

SUMMARY_COLUMNS = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")


class Summary:
    """Outcomes per target, tallied from test reports (the xdist controller sees every worker's
    reports too), and the closing table of the terminal summary."""

    def __init__(self, state: "_State"):
        self.state = state
        self.counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        target = dict(report.user_properties).get("target")
        if target is None or not (report.when == "call" or not report.passed):
            return
        if hasattr(report, "wasxfail"):
            outcome = "xfailed" if report.skipped else "xpassed"
        elif report.failed and (report.when != "call" or dict(report.user_properties).get("infra_stage")):
            outcome = "error"           # outside the test body, or an infrastructure error (pytest_infra)
        else:
            outcome = report.outcome
        self.counts[target][outcome] += 1

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: object | None) -> None:
        """xdist controller: every worker deselected the same items; keep the largest count."""
        data = getattr(node, "workeroutput", {}).get("vtx_deselected")
        for name, (count, lacking) in json.loads(data or "{}").items():
            if count > self.state.deselected.get(name, Deselected()).count:
                self.state.deselected[name] = Deselected(count, set(lacking))

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        """Targets that hold an instance (the KVM-runner stand-in) end it now, not at exit; an
        xdist worker sends its deselection counts to the controller."""
        for s in list(self.state.sessions.values()):
            close = getattr(s.target, "close", None)
            if callable(close):
                try:
                    close()
                except Exception as e:          # never hide the session's own outcome
                    log.warning("ending target %s: %s", s.name, e)
        out = getattr(session.config, "workeroutput", None)
        if out is not None:
            out["vtx_deselected"] = json.dumps({name: [d.count, sorted(d.lacking)]
                                                for name, d in self.state.deselected.items()})

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        deselected = self.state.deselected
        if not (self.counts or deselected):
            return                         # no test used a target: say nothing
        tr = terminalreporter
        tr.section("vtx targets")
        names = sorted(set(self.counts) | set(deselected))
        width = max([len(n) for n in names] + [6]) + 2
        tr.write_line(f"{'target':{width}}" + "".join(f"{c:>9}" for c in SUMMARY_COLUMNS) + f"{'n/a':>9}")
        for name in names:
            row = self.counts.get(name, {})
            tr.write_line(f"{name:{width}}" + "".join(f"{row.get(c, 0):>9}" for c in SUMMARY_COLUMNS)
                          + f"{deselected[name].count if name in deselected else 0:>9}")
        for name, d in sorted(deselected.items()):
            tr.write_line(d.line(self.state.config_of(name)))
        root = self.state.settings().evidence_root
        tr.write_line(f"evidence: {root}  (per test: <evidence>/<test id>/run-N; probes: {root / '_probe'})")
