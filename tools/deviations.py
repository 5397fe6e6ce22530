#!/usr/bin/env python3
"""The per-target table of spec deviations, generated from the conformance suite's strict xfails.

    .venv/bin/python tools/deviations.py [--vtx-target NAME ...] [PATH ...] > deviations.md

Collects the suite (no emulator starts) the way pytest would for those targets (default: the
plugin's default targets) and lists, per target, every test that is a strict xfail there:

* a static ``@pytest.mark.xfail(strict=True, reason=...)`` (the section is taken from the
  reason: "SDM 26.3.1.4", "VT-d 7.1.3", "section 9.2" ...);
* a ``@deviation(on, section, observed, layer, not_run)`` marker (harness.testing.deviations) that
  applies to the target (its name or kind), including the not-run ones (skipped there);
* a test parametrized with a deviation record (an object with ``target``, ``section``, ``rule``
  and ``observed_text()``, as ``test_entry_checks.DEVIATIONS``), which becomes a strict xfail on
  its own target at run time.

Prints Markdown: one table per target (section, what the spec requires, what the target does, the
test).  Exit status 0; a usage error is one line on stderr and status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.testing.deviations import applied

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PATHS = (str(ROOT / "harness" / "conformance"),)
# "SDM Vol. 3C, 26.3.1.4", "SDM 26.2.1.3", "VT-d 7.1.3", "VT-d spec section 9.2", "Vol. 3D A.9"
_NUMBER = r"\b([A-C]\.\d+(?:\.\d+)*|\d+(?:\.\d+)+)\b"
_SECTION = re.compile(r"(SDM|VT-d|spec|section|§|Vol\. \w+)[^0-9\n]{0,24}?" + _NUMBER, re.I)
_ANY_SECTION = re.compile(_NUMBER)


@dataclass(frozen=True, order=True)
class Row:
    target: str
    section: str
    requirement: str
    observed: str
    test: str


def section_of(text: str) -> str:
    """The first section a reason cites, with its spec when named ("VT-d 7.1.2", "SDM 26.3.1.4",
    "Vol. 3C 26.2.2"); "?" when it cites none."""
    m = _SECTION.search(text)
    if m:
        spec = m.group(1)
        return f"{spec} {m.group(2)}" if spec in ("SDM", "VT-d") or spec.startswith("Vol.") else m.group(2)
    m = _ANY_SECTION.search(text)
    return m.group(1) if m else "?"


def section_number(section: str) -> str:
    """The bare number of a cited section ("Vol. 3C 26.2.2" -> "26.2.2")."""
    found = _ANY_SECTION.findall(section)
    return found[-1] if found else "?"


def _is_record(value: object) -> bool:
    return all(hasattr(value, a) for a in ("target", "section", "rule", "observed_text"))


def rows_of(item: pytest.Item) -> list[Row]:
    """The deviation rows one collected test contributes (on its own target)."""
    spec = getattr(item, "callspec", None)
    target = spec.params.get("vtx_target") if spec is not None else None
    if target is None:
        return []
    name = item.nodeid
    out: list[Row] = []
    covered: set[str] = set()                        # reasons of xfails already listed
    d = applied(item)
    if d is not None:
        covered.add(d.reason(target))                # the xfail the deviation hook made of it
        observed = d.observed + (f" [layer: {d.layer}]" if d.layer else "")
        observed += " (not run there: skipped)" if d.not_run else ""
        out.append(Row(target, section_of(d.cited), d.rule or item.name.split("[")[0], observed, name))
    for value in (spec.params.values() if spec is not None else ()):
        if _is_record(value) and value.target == target:
            out.append(Row(target, str(value.section), str(value.rule), str(value.observed_text()), name))
    strict_default = item.config.getini("xfail_strict")
    for m in item.iter_markers("xfail"):
        reason = str(m.kwargs.get("reason", m.args[1] if len(m.args) > 1 else ""))
        if not m.kwargs.get("strict", strict_default) or reason in covered:
            continue
        condition = m.kwargs.get("condition", m.args[0] if m.args else True)
        if condition is False:
            continue
        out.append(Row(target, section_of(reason), item.name.split("[")[0], reason, name))
    return out


class _Collector:
    """A pytest plugin that keeps the rows of every item left after collection."""

    def __init__(self) -> None:
        self.rows: list[Row] = []

    @pytest.hookimpl(trylast=True)
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        for item in session.items:
            self.rows += rows_of(item)


def _collect_here(paths: list[str], targets: list[str]) -> list[Row]:
    """Collect in this process (the child of ``collect``)."""
    collector = _Collector()
    args = ["--collect-only", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "--vtx-allow-unavailable",
            "--rootdir", str(ROOT), *paths]
    for t in targets:
        args += ["--vtx-target", t]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = pytest.main(args, plugins=[collector])
    if status not in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        tail = [line for line in out.getvalue().splitlines() if line.strip()][-3:]
        raise SystemExit(f"deviations: collecting {' '.join(paths)} failed ({status!r}): " + " | ".join(tail))
    return sorted(set(collector.rows))


def collect(paths: list[str], targets: list[str], timeout: float = 300.0) -> list[Row]:
    """Rows for ``targets`` from the tests under ``paths``: collection only, in a process of its
    own (pytest plugins such as labgrid's refuse a second session in one process)."""
    with tempfile.TemporaryDirectory(prefix="vtx-deviations-") as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--rows-to", str(out), *paths]
        for t in targets:
            cmd += ["--vtx-target", t]
        try:
            p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise SystemExit(f"deviations: collecting {' '.join(paths)} took more than {timeout:.0f} s") from None
        if p.returncode != 0 or not out.exists():
            last = (p.stderr.strip().splitlines() or p.stdout.strip().splitlines() or ["no output"])[-1]
            raise SystemExit(f"deviations: collecting {' '.join(paths)} failed (status {p.returncode}): {last}")
        return [Row(**r) for r in json.loads(out.read_text())]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip()


def _section_key(section: str) -> tuple:
    """Numeric order of the cited section (appendix sections "A.9" after chapters; none last)."""
    number = section_number(section)
    if number == "?":
        return (2,)
    head, *rest = number.split(".")
    if head.isdigit():
        return (0, int(head), *map(int, rest))
    return (1, head, *map(int, rest))


def markdown(rows: list[Row], targets: list[str]) -> str:
    """One table per target, rows ordered by section number; a target without rows says so."""
    out = []
    for target in targets:
        mine = sorted((r for r in rows if r.target == target), key=lambda r: (_section_key(r.section), r.test))
        out.append(f"### {target}\n")
        if not mine:
            out.append("No deviations recorded (no strict xfails on this target).\n")
            continue
        out.append("| Section | Required | Observed | Test |")
        out.append("|---|---|---|---|")
        for r in mine:
            test = r.test.split("::", 1)[-1]
            out.append(f"| {_cell(r.section)} | {_cell(r.requirement)} | {_cell(r.observed)} | `{_cell(test)}` |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="*", default=list(DEFAULT_PATHS), help="test files or directories")
    ap.add_argument("--vtx-target", "--target", dest="targets", action="append", default=None,
                    help="target name (repeatable); default: the plugin's default targets")
    ap.add_argument("--rows-to", help=argparse.SUPPRESS)     # internal: the collecting child
    args = ap.parse_args(argv)
    if args.targets is None:
        from harness.pytest_plugin import DEFAULT_TARGETS
        args.targets = list(DEFAULT_TARGETS)
    for p in args.paths:
        if not Path(p).exists():
            print(f"deviations: path {p}: no such file or directory", file=sys.stderr)
            return 2
    if args.rows_to:
        rows = _collect_here(args.paths, args.targets)
        Path(args.rows_to).write_text(json.dumps([dataclasses.asdict(r) for r in rows]))
        return 0
    rows = collect(args.paths, args.targets)
    print(markdown(rows, args.targets))
    return 0


if __name__ == "__main__":
    sys.exit(main())
