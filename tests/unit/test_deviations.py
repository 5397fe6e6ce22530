"""tools/deviations.py: the per-target table of spec deviations, generated from strict xfails."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

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
'''


def test_collect_lists_strict_xfails_and_records_on_their_own_target(tmp_path: Path) -> None:
    path = tmp_path / f"test_fake_{uuid.uuid4().hex[:8]}.py"
    path.write_text(textwrap.dedent(FAKE_TESTS))
    rows = deviations.collect([str(path)], ["bochs-skylake", "qemu-tcg-vtd"])
    got = {(r.target, r.section, r.test.split("::")[-1]) for r in rows}
    assert got == {
        ("bochs-skylake", "Vol. 3C 26.2.2", "test_static_strict[bochs-skylake]"),
        ("qemu-tcg-vtd", "Vol. 3C 26.2.2", "test_static_strict[qemu-tcg-vtd]"),
        ("bochs-skylake", "Vol. 3C 26.3.1.4", "test_record[bochs-skylake-bochs-skylake]"),
        ("qemu-tcg-vtd", "VT-d 7.1.2", "test_record[qemu-tcg-vtd-qemu-tcg-vtd]"),
    }
    record_row = next(r for r in rows if r.section == "Vol. 3C 26.3.1.4")
    assert (record_row.requirement, record_row.observed) == ("RIP must be canonical", "VM entry")


def test_a_missing_path_is_one_line_and_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert deviations.main(["/nonexistent/tests"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "deviations: path /nonexistent/tests: no such file or directory"


@dataclass(frozen=True)
class _Mark:
    """A marker as ``rows_of`` reads it (a conftest's own marker need not be registered here)."""

    name: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


class _Item:
    """The parts of a collected pytest item that ``rows_of`` reads."""

    def __init__(self, target: str, marks: list[_Mark]):
        self.callspec = type("CallSpec", (), {"params": {"vtx_target": target}})()
        self.name = f"test_ept_bits[{target}]"
        self.nodeid = f"harness/conformance/vmx/test_ept.py::{self.name}"
        self.config = type("Config", (), {"getini": staticmethod(lambda name: False)})()
        self._marks = marks

    def iter_markers(self, name: str):
        return (m for m in self._marks if m.name == name)


def test_a_vmx_deviation_marker_is_one_row_on_its_targets_only() -> None:
    dev = _Mark("vmx_deviation", kwargs={"targets": ("bochs-skylake",), "observed": "bit 12 is an address bit",
                                         "section": "Vol. 3C 29.3.3.1 (bits 20:12 are reserved)"})
    # the conftest turns the marker into this xfail on the target: not a second row
    xfail = _Mark("xfail", kwargs={"strict": True, "reason": "bochs-skylake deviates from SDM Vol. 3C 29.3.3.1 (bits ...): x"})
    rows = deviations.rows_of(_Item("bochs-skylake", [dev, xfail]))
    assert rows == [Row("bochs-skylake", "Vol. 3C 29.3.3.1", "bits 20:12 are reserved", "bit 12 is an address bit",
                        "harness/conformance/vmx/test_ept.py::test_ept_bits[bochs-skylake]")]
    assert deviations.rows_of(_Item("qemu-tcg", [dev])) == []
