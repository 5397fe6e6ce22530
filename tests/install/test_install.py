"""The package as a user gets it: a wheel built from this checkout, installed (not editable) into a
fresh virtualenv outside the checkout, used from a project directory of the user's own.

- three user tests written only against the public API and the names of shipped targets (a probe
  read, a VT-d DMA, a VMX CPUID exit) pass under plain pytest, and a wrong expectation fails;
- ``vtx --version``, ``vtx targets`` and ``vtx suite`` work there (the suite from the installed
  package, in one process: the virtualenv has no pytest-xdist);
- a plain pytest run of an unrelated project is unchanged by the installed plugin;
- with labgrid installed next to it, both plugins load and work in one run.

The virtualenvs are cached under ``<vtx cache>/install/<key>``, the key being the hash of
pyproject.toml, README.md and every file of the package, so they are rebuilt only when the package
changes.  pip uses the package index for the dependencies.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.payload.image import cache_dir

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "harness")
SHIPPED = ("bochs-generic", "bochs-skylake", "kvmrunner-standin", "lab-example", "lab-labgrid-example",
           "qemu-kvm-nested", "qemu-tcg", "qemu-tcg-vtd", "remote-kvm-example")
TARGETS = ("--vtx-target", "qemu-tcg-vtd", "--vtx-target", "bochs-skylake")

# Both targets must be usable here: the install test is about packaging, not about skipping.
pytestmark = pytest.mark.xdist_group(name="install")


def _files() -> list[Path]:
    out = []
    for name in SOURCES:
        p = ROOT / name
        out += [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and "__pycache__" not in f.parts)
    return out


def source_key() -> str:
    h = hashlib.sha256()
    for f in _files():
        h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _run(argv: list[str], cwd: Path, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, cwd=cwd, env=env or clean_env(), capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(argv)} did not finish within {timeout} s; output so far:\n{e.stdout}\n{e.stderr}")


def clean_env() -> dict[str, str]:
    """The environment of a user's shell: none of this run's pytest, vtx or Python path settings."""
    drop = ("PYTHONPATH", "PYTEST_ADDOPTS", "PYTEST_PLUGINS", "PYTEST_XDIST_WORKER", "PYTEST_CURRENT_TEST",
            "VIRTUAL_ENV")
    return {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("VTX_") or k == "VTX_CACHE"}


def _ok(r: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"{what} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


def _venv(name: str, extra: list[str], extras: str = "") -> Path:
    """A virtualenv with the wheel (with its optional ``extras``, and ``extra`` packages) installed,
    built once per source key."""
    key = source_key()
    home = cache_dir().parent / "install"
    where = home / key
    where.mkdir(parents=True, exist_ok=True)
    venv = where / name
    with open(where / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)        # another worker building the same venv: wait for it
        if (venv / "ready").exists():
            return venv
        wheel = _wheel(where)
        shutil.rmtree(venv, ignore_errors=True)
        _ok(_run([sys.executable, "-m", "venv", str(venv)], where, 300), "python -m venv")
        spec = f"{wheel}[{extras}]" if extras else str(wheel)
        _ok(_run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", spec, *extra],
                 where, 900), f"pip install {Path(spec).name} {' '.join(extra)}")
        (venv / "ready").write_text(key + "\n")
    # Old keys' environments go once nothing has touched them for a day.
    for old in home.iterdir():
        if old != where and old.is_dir() and time.time() - old.stat().st_mtime > 86400:
            shutil.rmtree(old, ignore_errors=True)
    return venv


def _wheel(where: Path) -> Path:
    """The wheel, built from a copy of the package's sources (so the checkout gets no build files)."""
    found = sorted(where.glob("dist/*.whl"))
    if found:
        return found[-1]
    src = where / "src"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir()
    for name in SOURCES:
        p = ROOT / name
        if p.is_file():
            shutil.copy2(p, src / name)
        else:
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _ok(_run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--disable-pip-version-check",
              "-w", str(where / "dist"), str(src)], where, 600), "pip wheel")
    shutil.rmtree(src, ignore_errors=True)
    return sorted(where.glob("dist/*.whl"))[-1]


@pytest.fixture(scope="module")
def venv() -> Path:
    """The package alone (no pytest-xdist, no labgrid)."""
    return _venv("plain", [])


@pytest.fixture(scope="module")
def labgrid_venv() -> Path:
    return _venv("labgrid", [], extras="labgrid")        # the package's own extra brings labgrid


# --- the user's project -------------------------------------------------------------------------

PROBE_TEST = '''
import pytest
from harness.testing import Scenario

@pytest.mark.requires("vtd")
def test_dmar_version_register_reads_1_0(vtx_target):
    s = Scenario(name="ver")
    i = s.steps.mmio_read(0x0, size=4, base=1)      # vars[1]: the first DMAR unit's base (probed)
    run = vtx_target.run(s).expect_ok()
    assert run.value(i) == EXPECTED
    assert vtx_target.probe.dmar_units[0].ver == EXPECTED
'''

VTD_TEST = '''
import pytest
from harness.testing import PATTERN, XFER, page

@pytest.mark.requires("vtd")
def test_write_lands_at_translated_address(vtd):
    s = vtd.scenario("write-4k")
    s.prepare()
    dom = s.domain()
    dom.map(0x40_0000, page(1))
    s.attach(s.agent, dom, domain_id=1)
    s.unit.setup_translation(s.tables.root)
    s.agent.dma_write(0x40_0000, XFER)
    snap = s.unit.faults()
    s.compare("data", page(1), XFER, PATTERN)
    out = vtd.run(s)
    assert out.mismatches("data") == 0 and out.faults(snap).pending == []
'''

VMX_TEST = '''
from harness.testing import Action, Exit, vmx_test

@vmx_test()
def test_cpuid_exits(v):
    v.guest("""
        xor eax, eax
        cpuid
        vmcall
    """)
    v.on(Exit.CPUID, Action.skip())
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.CPUID, Exit.VMCALL]
    assert r.exit.length == 2                        # 0F A2
'''


def _project(path: Path, expected_version: int = 0x10) -> Path:
    assert not path.resolve().is_relative_to(ROOT), "the user's project lies outside the checkout"
    path.mkdir(parents=True, exist_ok=True)
    (path / "test_probe_read.py").write_text(PROBE_TEST.replace("EXPECTED", hex(expected_version)))
    (path / "test_vtd_dma.py").write_text(VTD_TEST)
    (path / "test_vmx_cpuid.py").write_text(VMX_TEST)
    return path


def _outcomes(out: str) -> dict[str, int]:
    last = [line for line in out.splitlines() if re.search(r"\d+ (passed|failed|error|deselected)", line)][-1]
    return {k: int(n) for n, k in re.findall(r"(\d+) (\w+)", last)}


def test_the_installed_package_is_the_one_in_use(venv):
    r = _ok(_run([str(venv / "bin" / "python"), "-c", "import harness, harness.testing; print(harness.__file__)"],
                 venv, 60), "import harness")
    assert Path(r.stdout.strip()).is_relative_to(venv) and "site-packages" in r.stdout


def test_user_tests_pass_with_shipped_targets(venv, tmp_path):
    project = _project(tmp_path / "project")
    r = _run([str(venv / "bin" / "pytest"), "-p", "no:cacheprovider", *TARGETS, "-rs"], project, 600)
    _ok(r, "the user's tests")
    # Probe and VT-d tests run on QEMU, the VMX test on Bochs; the rest cannot apply (deselected).
    assert _outcomes(r.stdout) == {"passed": 3, "deselected": 3}, r.stdout
    assert "vtx targets" in r.stdout and f"evidence: {project / 'evidence'}" in r.stdout
    assert (project / "evidence").is_dir()
    assert not list(venv.rglob("site-packages/evidence")), "evidence never goes into site-packages"


def test_a_wrong_expectation_fails(venv, tmp_path):
    project = _project(tmp_path / "project", expected_version=0x20)
    r = _run([str(venv / "bin" / "pytest"), "-p", "no:cacheprovider", "--vtx-target", "qemu-tcg-vtd",
              "test_probe_read.py"], project, 300)
    assert r.returncode == 1 and _outcomes(r.stdout) == {"failed": 1}, r.stdout
    assert "assert 16 == 32" in r.stdout


def test_vtx_version_and_targets(venv, tmp_path):
    from harness import __version__

    r = _ok(_run([str(venv / "bin" / "vtx"), "--version"], tmp_path, 60), "vtx --version")
    assert r.stdout.strip() == f"vtx {__version__}"
    r = _ok(_run([str(venv / "bin" / "vtx"), "targets"], tmp_path, 120), "vtx targets")
    rows = {line.split()[0]: line.split()[1:3] for line in r.stdout.splitlines()[2:]}
    assert set(rows) == set(SHIPPED), r.stdout
    assert rows["qemu-tcg-vtd"] == ["qemu", "yes"] and rows["bochs-skylake"] == ["bochs", "yes"]
    assert rows["remote-kvm-example"] == ["remote-qemu", "?"]
    # The stand-in's recipe lives in the checkout, not in the wheel: installed, it says so.
    assert rows["kvmrunner-standin"] == ["kvmrunner", "no"] and "set kvmrunner.recipe" in r.stdout


def test_vtx_suite_runs_the_shipped_suite_from_the_users_directory(venv, tmp_path):
    project = _project(tmp_path / "project")
    r = _run([str(venv / "bin" / "vtx"), "suite"], project, 1800)
    _ok(r, "vtx suite")
    out = _outcomes(r.stdout)
    assert out.get("passed", 0) > 100 and not out.get("failed") and not out.get("error"), r.stdout[-3000:]
    # Only the suite ran: none of the user's own tests, which sit in the current directory.
    assert "test_probe_read" not in r.stdout and "test_cpuid_exits " not in r.stdout
    assert re.search(r"qemu-tcg-vtd +\d+ +0 +0 ", r.stdout) and re.search(r"bochs-skylake +\d+ +0 +0 ", r.stdout)
    assert (project / "evidence" / "junit.xml").is_file()


UNRELATED = '''
import pytest

def test_one():
    assert 1

@pytest.mark.skip(reason="not today")
def test_two():
    pass

def test_three(tmp_path):
    assert tmp_path.is_dir()
'''


def _normal(text: str) -> list[str]:
    text = re.sub(r"\d+\.\d+s", "Ns", text)
    return [line for line in text.splitlines() if not line.startswith(("plugins:", "rootdir:", "platform", "cachedir:"))]


def test_an_unrelated_project_is_unchanged(venv, tmp_path):
    project = tmp_path / "unrelated"
    project.mkdir()
    (project / "test_plain.py").write_text(UNRELATED)
    pytest_bin = str(venv / "bin" / "pytest")
    for args in ([], ["-v"], ["--co", "-q"], ["--markers"], ["--help"], ["--fixtures"]):
        with_vtx = _run([pytest_bin, "-p", "no:cacheprovider", *args], project, 120)
        without = _run([pytest_bin, "-p", "no:cacheprovider", "-p", "no:vtx", *args], project, 120)
        assert with_vtx.returncode == without.returncode, (args, with_vtx.stdout, with_vtx.stderr)
        if args in ([], ["-v"], ["--co", "-q"]):
            assert _normal(with_vtx.stdout) == _normal(without.stdout), args
    assert sorted(p.name for p in project.iterdir()) == ["test_plain.py"], "the plugin wrote nothing"


LABGRID_ENV = """
targets:
  main:
    resources: {}
    drivers: {}
"""

LABGRID_TEST = '''
def test_labgrid_target(target):
    assert target.name == "main"

def test_labgrid_env(env):
    assert env.get_target("main") is not None

def test_labgrid_lease_config():
    from harness.targets.baremetal.labgrid import LabgridLease
    from harness.targets.config import validate
    cfg = validate({"backend": "labgrid", "coordinator": "lab", "tags": "vtd=1"}, LabgridLease.SCHEMA, "t")
    assert cfg["coordinator"] == "lab:20408"
'''


def test_labgrid_installed_next_to_it(labgrid_venv, tmp_path):
    project = _project(tmp_path / "project")
    (project / "env.yaml").write_text(LABGRID_ENV)
    (project / "test_labgrid.py").write_text(LABGRID_TEST)
    pytest_bin = str(labgrid_venv / "bin" / "pytest")
    r = _ok(_run([pytest_bin, "--markers"], project, 120), "pytest --markers with labgrid")
    assert "@pytest.mark.lg_feature" in r.stdout and "@pytest.mark.requires(*capabilities)" in r.stdout
    r = _ok(_run([pytest_bin, "--help"], project, 120), "pytest --help with labgrid")
    assert "--lg-env" in r.stdout and "--vtx-target" in r.stdout
    r = _run([pytest_bin, "-p", "no:cacheprovider", "--lg-env", "env.yaml", *TARGETS], project, 600)
    _ok(r, "labgrid's and vtx's tests in one run")
    assert _outcomes(r.stdout) == {"passed": 6, "deselected": 3}, r.stdout
