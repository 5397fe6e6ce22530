"""tools/deviations.py: the per-target table of spec deviations, generated from strict xfails."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from harness.testing import Deviation, deviation

_TOOL = Path(__file__).resolve().parents[2] / "tools" / "deviations.py"
_spec = importlib.util.spec_from_file_location("vtx_tools_deviations", _TOOL)
deviations = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = deviations
_spec.loader.exec_module(deviations)
Row = deviations.Row


@pytest.mark.parametrize("reason, section", [
    ("QEMU 7.2 blocks ...; VT-d 7.1.2/appendix A require fault reason 5", "VT-d 7.1.2"),
    ("bochs deviates from SDM Vol. 3C 26.3.1.4 (RIP canonical): VM entry", "Vol. 3C 26.3.1.4"),
    ("SDM 26.2.1.3: type 7", "SDM 26.2.1.3"),
    ("Vol. 3D A.9 (IA32_VMX_VMCS_ENUM)", "Vol. 3D A.9"),
    ("see 10.4.2 of the spec", "10.4.2"),
    ("no section cited at all", "?"),
])
def test_section_is_taken_from_the_reason(reason: str, section: str) -> None:
    assert deviations.section_of(reason) == section


def test_markdown_orders_by_section_escapes_cells_and_names_empty_targets() -> None:
    rows = [Row("t1", "Vol. 3C 26.3.1.4", "RIP | canonical", "VM entry", "m.py::test_b[t1]"),
            Row("t1", "Vol. 3C 26.2.1.3", "type 7", "panic", "m.py::test_a[t1]"),
            Row("t1", "Vol. 3D A.9", "VMCS_ENUM", "0x34", "m.py::test_c[t1]"),
            Row("t1", "Vol. 3C 9.10", "earlier chapter", "x", "m.py::test_d[t1]")]
    text = deviations.markdown(rows, ["t1", "t2"])
    lines = text.splitlines()
    assert lines[0] == "### t1"
    body = [line for line in lines if line.startswith("| Vol.")]
    assert [b.split("|")[1].strip() for b in body] == ["Vol. 3C 9.10", "Vol. 3C 26.2.1.3", "Vol. 3C 26.3.1.4", "Vol. 3D A.9"]
    assert "RIP \\| canonical" in text                      # a '|' in a cell does not split the row
    assert "`test_b[t1]`" in text
    assert text.split("### t2")[1].strip() == "No deviations recorded (no strict xfails on this target)."


FAKE_TESTS = '''
import pytest
from dataclasses import dataclass

from harness.testing import deviation


@dataclass(frozen=True)
class Record:
    target: str
    section: str
    rule: str

    def observed_text(self):
        return "VM entry"


RECORDS = [Record("bochs-skylake", "Vol. 3C 26.3.1.4", "RIP must be canonical"),
           Record("qemu-tcg-vtd", "VT-d 7.1.2", "fault reason 5")]


@pytest.mark.xfail(strict=True, reason="the emulator misses SDM Vol. 3C, 26.2.2 (host PAT); observed 0x3")
def test_static_strict(vtx_target):
    pass


@pytest.mark.xfail(reason="not strict: SDM 1.2.3")
def test_static_not_strict(vtx_target):
    pass


@pytest.mark.xfail(strict=True, reason="needs no target: SDM 4.5")
def test_without_a_target():
    pass


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.target)
def test_record(vtx_target, record):
    pass


def test_plain(vtx_target):
    pass


@deviation("bochs", "SDM Vol. 3C 26.3.1.1 (reserved IA32_DEBUGCTL bits must be 0)", "bit 2 is accepted",
           layer="Bochs 2.7")
def test_kind_deviation(vtx_target):
    pass


@deviation(("qemu-tcg-vtd", "bochs-skylake"), "VT-d 7.1.2 (fault reason 5)", "no fault recorded", not_run=True)
def test_not_run_deviation(vtx_target):
    pass


@pytest.mark.parametrize("n", [pytest.param(1, marks=deviation("qemu-tcg-vtd", "VT-d 9.3 (context entry)", "y")), 2])
def test_param_deviation(vtx_target, n):
    pass
'''


def test_collect_lists_strict_xfails_deviations_and_records_on_their_own_target(tmp_path: Path) -> None:
    path = tmp_path / f"test_fake_{uuid.uuid4().hex[:8]}.py"
    path.write_text(textwrap.dedent(FAKE_TESTS))
    rows = deviations.collect([str(path)], ["bochs-skylake", "qemu-tcg-vtd"])
    got = {(r.target, r.section, r.test.split("::")[-1]) for r in rows}
    assert got == {
        ("bochs-skylake", "Vol. 3C 26.2.2", "test_static_strict[bochs-skylake]"),
        ("qemu-tcg-vtd", "Vol. 3C 26.2.2", "test_static_strict[qemu-tcg-vtd]"),
        ("bochs-skylake", "Vol. 3C 26.3.1.4", "test_record[bochs-skylake-bochs-skylake]"),
        ("qemu-tcg-vtd", "VT-d 7.1.2", "test_record[qemu-tcg-vtd-qemu-tcg-vtd]"),
        # a kind ("bochs") names every target of that kind, and only those
        ("bochs-skylake", "Vol. 3C 26.3.1.1", "test_kind_deviation[bochs-skylake]"),
        # a not-run deviation is listed too (its test is skipped there), on each target it names
        ("bochs-skylake", "VT-d 7.1.2", "test_not_run_deviation[bochs-skylake]"),
        ("qemu-tcg-vtd", "VT-d 7.1.2", "test_not_run_deviation[qemu-tcg-vtd]"),
        # one parameter's deviation: that parameter only
        ("qemu-tcg-vtd", "VT-d 9.3", "test_param_deviation[qemu-tcg-vtd-1]"),
    }
    record_row = next(r for r in rows if r.section == "Vol. 3C 26.3.1.4")
    assert (record_row.requirement, record_row.observed) == ("RIP must be canonical", "VM entry")
    kind_row = next(r for r in rows if r.test.endswith("test_kind_deviation[bochs-skylake]"))
    assert (kind_row.requirement, kind_row.observed) == ("reserved IA32_DEBUGCTL bits must be 0",
                                                         "bit 2 is accepted [layer: Bochs 2.7]")
    not_run = next(r for r in rows if r.test.endswith("test_not_run_deviation[qemu-tcg-vtd]"))
    assert not_run.observed == "no fault recorded (not run there: skipped)"


def test_a_missing_path_is_one_line_and_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert deviations.main(["/nonexistent/tests"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "deviations: path /nonexistent/tests: no such file or directory"


# Run for real (no emulator: the test file's own ``vtx_target`` fixture gives the target's name
# without booting it; the plugin still parametrises it per target and applies the deviations).
RUN_TESTS = '''
import pytest

from harness.testing import deviation


@pytest.fixture
def vtx_target(request):
    return request.param


@deviation("bochs", "SDM Vol. 3C 26.3.1.1 (a rule)", "a value")
def test_passes_everywhere(vtx_target):
    assert vtx_target


@deviation("bochs-skylake", "SDM Vol. 3C 26.3.1.1 (a rule)", "a value", layer="the emulator")
def test_fails_on_bochs_skylake_only(vtx_target):
    assert vtx_target != "bochs-skylake"


@deviation("bochs", "SDM Vol. 3C 25.5.1 (a rule)", "no exit: it would hang", not_run=True)
def test_would_fail_on_bochs(vtx_target):
    assert vtx_target != "bochs-skylake"
'''

SOLO_DUMP = '''
import json


def pytest_collection_finish(session):
    with open("solo.json", "w") as f:
        json.dump({i.name: bool(i.get_closest_marker("solo")) for i in session.items}, f)
'''


def _outcomes(junit: Path) -> dict[str, tuple[str, str]]:
    """Test name -> (outcome, message) from a JUnit XML report."""
    out = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        kids = [k for k in case if k.tag in ("failure", "error", "skipped")]
        if not kids:
            out[case.get("name")] = ("passed", "")
        else:
            k = kids[0]
            kind = "xfailed" if k.tag == "skipped" and k.get("type") == "pytest.xfail" else k.tag
            out[case.get("name")] = (kind, k.get("message", ""))
    return out


def test_a_deviation_applies_on_its_targets_only_and_an_unexpected_pass_fails(tmp_path: Path) -> None:
    (tmp_path / "test_run_deviations.py").write_text(textwrap.dedent(RUN_TESTS))
    (tmp_path / "conftest.py").write_text(textwrap.dedent(SOLO_DUMP))
    junit = tmp_path / "junit.xml"
    p = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", "-q",
                        "--rootdir", str(tmp_path), "--vtx-target", "bochs-skylake", "--vtx-target", "qemu-tcg-vtd",
                        "--vtx-allow-unavailable", "--vtx-evidence-dir", str(tmp_path / "evidence"),
                        f"--junitxml={junit}", "test_run_deviations.py"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    got = _outcomes(junit)
    assert got["test_passes_everywhere[bochs-skylake]"][0] == "failure", p.stdout    # XPASS(strict) fails
    assert "XPASS(strict)" in got["test_passes_everywhere[bochs-skylake]"][1]
    assert got["test_passes_everywhere[qemu-tcg-vtd]"][0] == "passed"                  # not a Bochs target
    assert got["test_fails_on_bochs_skylake_only[bochs-skylake]"] == (
        "xfailed", "bochs-skylake deviates from SDM Vol. 3C 26.3.1.1 (a rule): a value [layer: the emulator]")
    assert got["test_fails_on_bochs_skylake_only[qemu-tcg-vtd]"][0] == "passed"
    assert got["test_would_fail_on_bochs[bochs-skylake]"] == (
        "skipped", "bochs-skylake deviates from SDM Vol. 3C 25.5.1 (a rule): no exit: it would hang (not run there)")
    assert got["test_would_fail_on_bochs[qemu-tcg-vtd]"][0] == "passed"
    assert p.returncode == 1                                                          # the XPASS fails the run
    solo = json.loads((tmp_path / "solo.json").read_text())
    assert solo == {"test_passes_everywhere[bochs-skylake]": False, "test_passes_everywhere[qemu-tcg-vtd]": False,
                    "test_fails_on_bochs_skylake_only[bochs-skylake]": False,
                    "test_fails_on_bochs_skylake_only[qemu-tcg-vtd]": False,
                    "test_would_fail_on_bochs[bochs-skylake]": True,                  # kept out of batches
                    "test_would_fail_on_bochs[qemu-tcg-vtd]": False}


@pytest.mark.parametrize("args, message", [
    (((), "SDM Vol. 3C 26.3.1.1", "x"), "expected a target name or kind"),
    (("bochs", "SDM, somewhere", "x"), "expected the spec and a section number"),
    (("bochs", "SDM Vol. 3C 26.3.1.1", " "), "say what the target did instead"),
])
def test_a_deviation_without_target_section_or_observation_is_an_error(args: tuple, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        deviation(*args)


def test_the_reason_cites_target_section_observation_and_layer() -> None:
    d = Deviation(("kvmrunner",), "SDM Vol. 3C 28.2.1 (no qualification)", "0x181", "KVM's nested EPT")
    assert d.applies("kvmrunner-standin", "kvmrunner") and not d.applies("bochs-skylake", "bochs")
    assert d.reason("kvmrunner-standin") == ("kvmrunner-standin deviates from SDM Vol. 3C 28.2.1 (no qualification): "
                                             "0x181 [layer: KVM's nested EPT]")
    assert (d.cited, d.rule) == ("SDM Vol. 3C 28.2.1", "no qualification")
