"""The pytest plugin: target selection, markers, capability skips and deselection, evidence,
settings from option / environment / ini, strictness, probes shared by xdist workers, variants,
the per-target summary, and the target catalog's search path."""

import os
import re
from pathlib import Path

import pytest

from harness.errors import ConfigError
from harness.targets import catalog

pytest_plugins = ["pytester"]

INNER = """
import pytest
from harness.payload.image import Scenario

@pytest.mark.requires("vtd")
def test_needs_vtd(vtx_target):
    assert vtx_target.run(Scenario()).probe.dmar_units[0].base == 0xFED90000

@pytest.mark.requires("vmx", "ept")
def test_needs_vmx(vtx_target):
    pass

@pytest.mark.requires("vtd.intremap")
def test_needs_intremap(vtx_target):
    pass

def test_fails_with_evidence(vtx_target):
    run = vtx_target.run(Scenario())
    assert run.probe.max_leaf == -1

def test_without_target():
    pass
"""

BOTH = ("--vtx-target", "qemu-tcg-vtd", "--vtx-target", "qemu-tcg")


def test_requires_skips_with_the_probed_reason_and_inapplicable_tests_are_deselected(pytester):
    pytester.makepyfile(INNER)
    r = pytester.runpytest_subprocess(*BOTH, "-rs", "--strict-markers", f"--vtx-evidence-dir={pytester.path / 'ev'}")
    # qemu-tcg-vtd: needs_vtd passes, needs_intremap skips (the probe decides), needs_vmx is
    # deselected (TCG has no VMX); qemu-tcg (no intel-iommu): all three deselected.
    r.assert_outcomes(passed=2, failed=2, skipped=1, deselected=4)
    out = r.stdout.str()
    assert re.search(r"requires vtd\.intremap; target qemu-tcg-vtd has vtd, .*vtd\.qi.* \(probed\)", out)
    assert "n/a on qemu-tcg: 3 tests deselected (they need vmx or vtd, which QEMU TCG (no intel-iommu) cannot offer)" in out
    assert "n/a on qemu-tcg-vtd: 1 test deselected (they need vmx, which QEMU TCG cannot offer)" in out
    assert out.count("SKIPPED") == 1
    # The per-target table comes from the plugin itself (plain pytest shows it).
    assert re.search(r"qemu-tcg-vtd +1 +1 +0 +1 +0 +0 +1\n", out), out
    assert re.search(r"qemu-tcg +0 +1 +0 +0 +0 +0 +3\n", out), out
    assert f"evidence: {pytester.path / 'ev'}" in out
    # A failure names its evidence directory, which holds the run's files.
    assert "vtx evidence" in out
    ev = pytester.path / "ev" / ("test_requires_skips_with_the_probed_reason_and_inapplicable_tests_are_deselected.py_"
                                 "test_fails_with_evidence_qemu-tcg")
    assert (ev / "run-1" / "serial.log").exists() and (ev / "run-1" / "cmdline.sh").exists()
    assert (ev / "run-1" / "payload.elf").exists() and (ev / "run-1" / "qmp.jsonl").exists()


def test_markers_select_emulated_runs(pytester):
    pytester.makepyfile(INNER)
    r = pytester.runpytest_subprocess("--vtx-target", "qemu-tcg-vtd", "-m", "baremetal")
    r.assert_outcomes(deselected=5)
    r = pytester.runpytest_subprocess("--vtx-target", "qemu-tcg-vtd", "-m", "emulated", "-k", "needs_vtd")
    r.assert_outcomes(passed=1, deselected=4)


def test_unknown_target_is_a_one_line_usage_error(pytester):
    pytester.makepyfile(INNER)
    r = pytester.runpytest_subprocess("--vtx-target", "nosuch")
    assert r.ret == pytest.ExitCode.USAGE_ERROR
    err = r.stderr.str()
    assert "--vtx-target nosuch: no such target in " in err and "(known: " in err and "qemu-tcg-vtd" in err
    assert "Traceback" not in err and "INTERNALERROR" not in r.stdout.str() + err


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_bad_run_timeout_is_a_usage_error_from_option_and_environment(pytester, monkeypatch, value):
    pytester.makepyfile(INNER)
    r = pytester.runpytest_subprocess("--vtx-run-timeout", value, "-k", "without_target")
    assert r.ret == pytest.ExitCode.USAGE_ERROR
    assert "--vtx-run-timeout: expected a number of seconds in (0, 86400]" in r.stderr.str()
    monkeypatch.setenv("VTX_RUN_TIMEOUT", value)
    r = pytester.runpytest_subprocess("-k", "without_target")
    assert r.ret == pytest.ExitCode.USAGE_ERROR
    assert "VTX_RUN_TIMEOUT: expected a number of seconds" in r.stderr.str()


def test_env_var_selects_targets_and_option_beats_env_beats_ini(pytester, monkeypatch):
    pytester.makepyfile(INNER)
    pytester.makeini("[pytest]\nvtx_targets = qemu-tcg-vtd\nvtx_evidence_dir = out/ev\n")
    r = pytester.runpytest_subprocess("-k", "without_target or needs_intremap", "-v")
    r.assert_outcomes(passed=1, skipped=1)
    assert "test_needs_intremap[qemu-tcg-vtd]" in r.stdout.str()
    assert f"evidence: {pytester.path / 'out' / 'ev'}" in r.stdout.str()
    monkeypatch.setenv("VTX_TARGETS", "qemu-tcg")
    r = pytester.runpytest_subprocess("-k", "without_target or fails_with_evidence", "-v")
    r.assert_outcomes(passed=1, failed=1)
    assert "test_fails_with_evidence[qemu-tcg]" in r.stdout.str()
    r = pytester.runpytest_subprocess("--vtx-target", "qemu-tcg-vtd", "-k", "needs_vtd", "-v")
    r.assert_outcomes(passed=1)
    assert "test_needs_vtd[qemu-tcg-vtd]" in r.stdout.str()


def test_named_unavailable_target_fails_the_run_unless_allowed(pytester, monkeypatch, tmp_path):
    pytester.makepyfile(INNER)
    missing = tmp_path / "ghost.yaml"
    missing.write_text("name: ghost\nkind: qemu\nqemu:\n  binary: qemu-system-ghost-not-installed\n")
    r = pytester.runpytest_subprocess("--vtx-target", str(missing))
    assert r.ret == pytest.ExitCode.USAGE_ERROR
    assert ("target ghost (named by --vtx-target) cannot run here: qemu-system-ghost-not-installed is not "
            "installed; pass --vtx-allow-unavailable") in r.stderr.str()
    monkeypatch.setenv("VTX_TARGETS", str(missing))
    r = pytester.runpytest_subprocess()
    assert r.ret == pytest.ExitCode.USAGE_ERROR and "(named by VTX_TARGETS)" in r.stderr.str()
    r = pytester.runpytest_subprocess("--vtx-allow-unavailable", "-rs")
    r.assert_outcomes(passed=1, skipped=1, deselected=3)
    assert "target ghost unavailable: qemu-system-ghost-not-installed is not installed" in r.stdout.str()
    monkeypatch.setenv("VTX_ALLOW_UNAVAILABLE", "1")
    pytester.runpytest_subprocess().assert_outcomes(passed=1, skipped=1, deselected=3)


def test_junit_xml_carries_the_evidence_path(pytester):
    pytester.makepyfile(INNER)
    r = pytester.runpytest_subprocess("--vtx-target", "qemu-tcg", "-k", "fails_with_evidence",
                                      f"--junitxml={pytester.path / 'j.xml'}")
    r.assert_outcomes(failed=1)
    xml = (pytester.path / "j.xml").read_text()
    assert '<property name="evidence" value="' in xml


SPIN = """
from harness.payload.image import Scenario
def test_hangs(vtx_target):
    s = Scenario()
    s.asm.append("spin:\\n1: jmp 1b\\n")
    s.steps.call("spin")
    vtx_target.run(s, timeout=60.0)
"""


def test_run_timeout_overrides_an_explicit_timeout_and_is_an_infrastructure_error(pytester):
    pytester.makepyfile(SPIN)
    r = pytester.runpytest_subprocess("--vtx-target", "qemu-tcg", "--vtx-run-timeout", "1.5")
    r.assert_outcomes(errors=1)
    out = r.stdout.str()
    assert "no terminal record within 1.5 s" in out
    assert re.search(r"qemu-tcg +0 +0 +1 +0 +0 +0 +0\n", out), "counted as an error in the per-target table"
    assert "vtx infrastructure error" in out and "stage: timeout" in out
    # 1.5 s, not the explicit 60 s: the whole session stays far below the explicit bound.
    assert float(re.search(r"in ([\d.]+)s", out.splitlines()[-1]).group(1)) < 40


PROBES = """
import os, pytest
@pytest.mark.requires("vtd")
@pytest.mark.parametrize("n", range(8))
def test_probe_user(vtx_target, n):
    assert "vtd" in vtx_target.caps
    with open(os.environ["PIDS"], "a") as f:
        f.write(f"{os.getpid()}\\n")
"""


def test_xdist_workers_share_one_probe_per_target(pytester, monkeypatch):
    pytester.makepyfile(PROBES)
    pids = pytester.path / "pids"
    monkeypatch.setenv("PIDS", str(pids))
    r = pytester.runpytest_subprocess("--vtx-target", "qemu-tcg-vtd", "-n", "2", f"--vtx-evidence-dir={pytester.path / 'ev'}")
    r.assert_outcomes(passed=8)
    assert len(set(pids.read_text().split())) == 2, "both workers used the target"
    probe_dirs = list((pytester.path / "ev" / "_probe").iterdir())
    assert len(probe_dirs) == 1
    assert len((probe_dirs[0] / "boots").read_text().split()) == 1, "one probe boot for the session"
    # A new session probes again (the cache is per session, keyed by the configuration).
    r = pytester.runpytest_subprocess("--vtx-target", "qemu-tcg-vtd", "-n", "2", "-k", "test_probe_user and 0",
                                      f"--vtx-evidence-dir={pytester.path / 'ev'}")
    r.assert_outcomes(passed=1)
    assert len((probe_dirs[0] / "boots").read_text().split()) == 2


GROUPED = """
import os, pytest
@pytest.mark.parametrize("n", range(6))
def test_vtd_user(vtd, n):
    with open(os.environ["WORKERS"], "a") as f:
        f.write(os.environ["PYTEST_XDIST_WORKER"] + "\\n")
"""


def test_a_targets_vtd_tests_share_one_xdist_worker(pytester, monkeypatch):
    """Batches are planned per process: under --dist loadgroup every VT-d test of a target runs on
    the worker that planned them (pytest 9.2 with pytest-xdist 3.8 spread them over both)."""
    pytester.makepyfile(GROUPED)
    workers = pytester.path / "workers"
    monkeypatch.setenv("WORKERS", str(workers))
    r = pytester.runpytest_subprocess("--vtx-target", "qemu-tcg-vtd", "-n", "2", "--dist", "loadgroup",
                                      f"--vtx-evidence-dir={pytester.path / 'ev'}")
    r.assert_outcomes(passed=6)
    assert len(set(workers.read_text().split())) == 1, workers.read_text()


@pytest.mark.parametrize("versions, refused", [(("9.2.0", "3.8.0"), True), (("9.1.1", "3.8.0"), False),
                                               (("9.2.0", "3.9.0"), False)])
def test_loadgroup_on_a_pytest_xdist_pair_that_drops_groups_is_a_usage_error(monkeypatch, versions, refused):
    import types
    import xdist
    from harness import pytest_plugin

    monkeypatch.setattr(pytest, "__version__", versions[0])
    monkeypatch.setattr(xdist, "__version__", versions[1])
    config = types.SimpleNamespace(option=types.SimpleNamespace(dist="loadgroup"))
    if refused:
        with pytest.raises(pytest.UsageError, match=r"pytest 9.2.0 with pytest-xdist 3.8.0 does not group tests"):
            pytest_plugin._check_loadgroup(config)
    else:
        pytest_plugin._check_loadgroup(config)


VARIANT = """
import pytest
from harness.payload.image import Scenario

def test_variant(vtx_target):
    v = vtx_target.variant(iommu={"intremap": True})
    assert v.name == vtx_target.name + "+iommu"
    assert "vtd.intremap" in v.caps and "vtd.intremap" not in vtx_target.caps
    assert v.config.section["iommu"]["aw_bits"] == vtx_target.config.section["iommu"]["aw_bits"]  # merged
    v.run(Scenario()).expect_ok()
    assert (v.evidence_dir / "run-1" / "serial.log").exists()
    assert v.evidence_dir.parent == vtx_target.evidence_dir
    two = vtx_target.variant(devices=[{"driver": "edu", "addr": "0x5.0"}])
    assert two.config.section["devices"] == [{"driver": "edu", "addr": "0x5.0", "bus": None, "id": None, "options": {}}]

def test_variant_of_a_kind_without_the_key_skips(vtx_target):
    vtx_target.variant(devices=[])

def test_variant_with_a_key_no_kind_has_is_an_error(vtx_target):
    vtx_target.variant(devicse=[])
"""


def test_variant_changes_the_kind_section_and_is_probed_on_its_own(pytester):
    pytester.makepyfile(VARIANT)
    r = pytester.runpytest_subprocess("--vtx-target", "qemu-tcg-vtd", "--vtx-target", "bochs-skylake", "-rs")
    r.assert_outcomes(passed=2, skipped=2, failed=2)
    out = r.stdout.str()
    assert "target bochs-skylake is kind bochs, which has no 'devices' to vary" in out
    assert "variant(): devicse: no target kind has this key" in out


def test_progress_is_logged(pytester):
    pytester.makepyfile(INNER)
    r = pytester.runpytest_subprocess("--vtx-target", "qemu-tcg-vtd", "-k", "needs_vtd", "--log-cli-level=INFO")
    r.assert_outcomes(passed=1)
    out = r.stdout.str()
    assert re.search(r"INFO +vtx\.plugin:.* probe of qemu-tcg-vtd: boot start", out), out
    assert re.search(r"probe of qemu-tcg-vtd: done in [\d.]+ s", out)
    assert re.search(r"run scenario on qemu-tcg-vtd: start \(evidence .*run-1\)", out)
    assert re.search(r"run scenario on qemu-tcg-vtd: end after [\d.]+ s", out)


UNRELATED = """
import pytest
def test_one():
    assert 1
@pytest.mark.skip(reason="unrelated skip")
def test_two():
    pass
"""


def _normal(text: str) -> list[str]:
    lines = [re.sub(r"\d+\.\d+s", "Ns", line) for line in text.splitlines()]
    return [line for line in lines if not line.startswith(("plugins:", "rootdir:", "platform"))]


def test_an_unrelated_pytest_run_is_unchanged_and_writes_nothing(pytester, monkeypatch):
    pytester.makepyfile(UNRELATED)
    # A broken setting that only matters once targets are used must not break this run.
    monkeypatch.setenv("VTX_EVIDENCE_DIR", str(pytester.path / "ev"))
    for args in ([], ["--markers"], ["--help"], ["--co", "-q"]):
        with_plugin = pytester.runpytest_subprocess(*args)
        without = pytester.runpytest_subprocess("-p", "no:vtx", *args)
        assert with_plugin.ret == without.ret, args
        if not args or args[0] == "--co":
            assert _normal(with_plugin.stdout.str()) == _normal(without.stdout.str()), args
    assert not (pytester.path / "ev").exists() and not (pytester.path / "evidence").exists()


def test_the_plugin_loads_and_works_without_xdist(pytester):
    """pytest-xdist is a dev extra: a user's install may lack it, so xdist-only hooks must be
    optional (an unknown hook would stop every pytest run in that environment)."""
    pytester.makepyfile(INNER)
    r = pytester.runpytest_subprocess("-p", "no:xdist", "-p", "no:xdist.looponfail", "--vtx-target", "qemu-tcg-vtd",
                                      "-k", "needs_vtd or without_target")
    assert "PluginValidationError" not in r.stdout.str() + r.stderr.str(), r.stderr.str()[-2000:]
    r.assert_outcomes(passed=2, deselected=3)


# --- the catalog ------------------------------------------------------------------------------

def _yaml(path: Path, name: str, kind: str = "qemu") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"name: {name}\nkind: {kind}\ndescription: from {path.parent.name}\n{kind}: {{}}\n")
    return path


def test_names_resolve_in_cwd_targets_then_env_path_then_package(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VTX_TARGET_PATH", f"{tmp_path / 'a'}:{tmp_path / 'b'}")
    assert catalog.resolve("qemu-tcg") == catalog.PACKAGE_DIR / "qemu-tcg.yaml"
    _yaml(tmp_path / "b" / "qemu-tcg.yaml", "qemu-tcg")
    assert catalog.resolve("qemu-tcg") == tmp_path / "b" / "qemu-tcg.yaml"
    _yaml(tmp_path / "a" / "qemu-tcg.yaml", "qemu-tcg")
    assert catalog.resolve("qemu-tcg") == tmp_path / "a" / "qemu-tcg.yaml"
    _yaml(tmp_path / "targets" / "qemu-tcg.yaml", "qemu-tcg")
    assert catalog.resolve("qemu-tcg") == tmp_path / "targets" / "qemu-tcg.yaml"
    assert catalog.load_target("qemu-tcg").description == "from targets"
    entries = [e for e in catalog.discover() if e.name == "qemu-tcg"]
    assert [e.path for e in entries] == [tmp_path / d / "qemu-tcg.yaml" for d in ("targets", "a", "b")] + \
        [catalog.PACKAGE_DIR / "qemu-tcg.yaml"]
    assert entries[0].shadowed_by is None and all(e.shadowed_by == entries[0].path for e in entries[1:])
    with pytest.raises(ConfigError, match=r"^--vtx-target '-x': expected a target name"):
        catalog.resolve("-x")
    with pytest.raises(ConfigError, match=r"^--vtx-target nosuch: no such target in .*/targets:.*/a:.*/b:"):
        catalog.resolve("nosuch")
    with pytest.raises(ConfigError, match=r"^--vtx-target ./nope\.yaml: no such file$"):
        catalog.resolve("./nope.yaml")


def test_two_files_defining_one_target_name_are_rejected_naming_both(tmp_path):
    one = _yaml(tmp_path / "one" / "x.yaml", "same")
    two = _yaml(tmp_path / "two" / "y.yaml", "same")
    with pytest.raises(ConfigError) as e:
        catalog.load_many([str(one), str(two)])
    assert str(e.value) == (f"--vtx-target: target name 'same' is defined by both {one} and {two} "
                            "(rename one, or name only one)")
    assert [c.name for c in catalog.load_many([str(one), str(one), "qemu-tcg"])] == ["same", "qemu-tcg"]


def test_discover_lists_every_shipped_target_with_whether_it_can_run(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VTX_TARGET_PATH", raising=False)
    _yaml(tmp_path / "targets" / "broken.yaml", "broken", kind="nosuchkind")
    found = {e.name: e for e in catalog.discover()}
    shipped = {p.stem for p in catalog.PACKAGE_DIR.glob("*.yaml")}
    assert shipped | {"broken"} == set(found)
    assert found["broken"].invalid and "kind: expected one of" in found["broken"].reason
    assert found["qemu-tcg-vtd"].runnable is True and found["qemu-tcg-vtd"].kind == "qemu"
    assert found["bochs-skylake"].runnable is True
    assert found["remote-kvm-example"].runnable is None
    nested = found["qemu-kvm-nested"]
    assert nested.runnable is (not nested.reason) and (nested.reason == "" or "kvm" in nested.reason)


def test_inapplicable_technologies_follow_the_configuration():
    tcg_vtd, tcg, bochs, kvm = (catalog.load_target(n) for n in ("qemu-tcg-vtd", "qemu-tcg", "bochs-skylake",
                                                                 "qemu-kvm-nested"))
    assert catalog.lacking(tcg_vtd, ["vmx", "ept"]) == {"vmx"}
    assert catalog.lacking(tcg_vtd, ["vtd.qi", "x2apic"]) == set()
    assert catalog.lacking(tcg, ["vtd"]) == {"vtd"}
    assert catalog.lacking(bochs, ["vtd"]) == {"vtd"} and catalog.lacking(bochs, ["ept_1g"]) == set()
    assert catalog.lacking(kvm, ["vmx", "vtd.intremap"]) == set()


def test_skip_reason_names_only_related_probed_capabilities():
    from harness.pytest_plugin import skip_reason
    have = {"vmx", "ept", "ept_2m", "vpid", "vtd", "vtd.qi"}
    assert skip_reason(["ept_1g"], have, "b") == "requires ept_1g; target b has ept, ept_2m (probed)"
    assert skip_reason(["vtd.intremap"], have, "q") == "requires vtd.intremap; target q has vtd, vtd.qi (probed)"
    assert skip_reason(["unrestricted_guest"], have, "g") == \
        "requires unrestricted_guest; target g has no unrestricted capabilities (probed)"
