"""The pytest plugin: target selection, markers, capability skips, evidence on failure."""

import pytest

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

def test_fails_with_evidence(vtx_target):
    run = vtx_target.run(Scenario())
    assert run.probe.max_leaf == -1

def test_without_target():
    pass
"""


def test_requires_skips_with_the_probed_reason_and_runs_when_met(pytester):
    pytester.makepyfile(INNER)
    r = pytester.runpytest_subprocess("--target", "qemu-tcg-vtd", "--target", "qemu-tcg", "-rs",
                                      "--strict-markers", f"--evidence-dir={pytester.path / 'ev'}")
    r.assert_outcomes(passed=2, failed=2, skipped=3)
    out = r.stdout.str()
    assert "requires vtd; target qemu-tcg has no vtd capabilities (probed)" in out
    assert "requires vmx, ept; target qemu-tcg-vtd has no ept/vmx capabilities (probed)" in out
    # A failure names its evidence directory, which holds the run's files.
    assert "vtx evidence" in out
    ev = pytester.path / "ev" / "test_requires_skips_with_the_probed_reason_and_runs_when_met.py_test_fails_with_evidence_qemu-tcg"
    assert (ev / "run-1" / "serial.log").exists() and (ev / "run-1" / "cmdline.sh").exists()
    assert (ev / "run-1" / "payload.elf").exists() and (ev / "run-1" / "qmp.jsonl").exists()


def test_markers_select_emulated_runs(pytester):
    pytester.makepyfile(INNER)
    r = pytester.runpytest_subprocess("--target", "qemu-tcg", "-m", "baremetal")
    r.assert_outcomes(deselected=4)
    r = pytester.runpytest_subprocess("--target", "qemu-tcg", "-m", "emulated", "-k", "needs_vtd")
    r.assert_outcomes(skipped=1)


def test_unknown_target_is_a_one_line_usage_error(pytester):
    pytester.makepyfile(INNER)
    r = pytester.runpytest_subprocess("--target", "nosuch")
    assert r.ret == pytest.ExitCode.USAGE_ERROR
    assert "--target nosuch: no such target (known:" in r.stderr.str()
    assert "Traceback" not in r.stderr.str()


def test_env_var_selects_targets(pytester, monkeypatch):
    pytester.makepyfile(INNER)
    monkeypatch.setenv("VTX_TARGETS", "qemu-tcg")
    r = pytester.runpytest_subprocess("-k", "without_target or needs_vmx", "-v")
    r.assert_outcomes(passed=1, skipped=1)
    assert "test_needs_vmx[qemu-tcg]" in r.stdout.str()


def test_junit_xml_carries_the_evidence_path(pytester):
    pytester.makepyfile(INNER)
    r = pytester.runpytest_subprocess("--target", "qemu-tcg", "-k", "fails_with_evidence",
                                      f"--junitxml={pytester.path / 'j.xml'}")
    r.assert_outcomes(failed=1)
    xml = (pytester.path / "j.xml").read_text()
    assert '<property name="evidence" value="' in xml


def test_infrastructure_error_is_reported_as_an_error_not_a_failure(pytester):
    pytester.makepyfile("""
        from harness.payload.image import Scenario
        def test_hangs(vtx_target):
            s = Scenario()
            s.asm.append("spin:\\n1: jmp 1b\\n")
            s.steps.call("spin")
            vtx_target.run(s, timeout=1.0)
    """)
    r = pytester.runpytest_subprocess("--target", "qemu-tcg")
    r.assert_outcomes(errors=1)
    assert "vtx infrastructure error" in r.stdout.str() and "stage: timeout" in r.stdout.str()


def test_skip_reason_names_only_related_probed_capabilities():
    from harness.pytest_plugin import skip_reason
    have = {"vmx", "ept", "ept_2m", "vpid", "vtd", "vtd.qi"}
    assert skip_reason(["ept_1g"], have, "b") == "requires ept_1g; target b has ept, ept_2m (probed)"
    assert skip_reason(["vtd.intremap"], have, "q") == "requires vtd.intremap; target q has vtd, vtd.qi (probed)"
    assert skip_reason(["unrestricted_guest"], have, "g") == \
        "requires unrestricted_guest; target g has no unrestricted capabilities (probed)"
