"""``vtx``: the command-line entry point.

    vtx suite [--target T ...] [--evidence DIR] [-- PYTEST ARGS]   the conformance suite + summary
    vtx probe --target T                                           boot the probe, show capabilities
    vtx targets                                                    list and validate target configs

Errors in user input are one line naming what was wrong; no traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

from .errors import ConfigError, HarnessError, InfraError

ROOT = Path(__file__).resolve().parents[1]
SUITE_DIRS = ("harness/conformance/vtd", "harness/conformance/vmx")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vtx", description="VT-x / VT-d conformance harness")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("suite", help="run the conformance suite and print a summary")
    s.add_argument("--target", action="append", help="target name or YAML path (repeatable)")
    s.add_argument("--evidence", default=str(ROOT / "evidence"), help="evidence directory")
    s.add_argument("--workers", type=int, default=2, help="parallel pytest workers (0: none)")
    s.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    p = sub.add_parser("probe", help="boot the probe on a target and print what it found")
    p.add_argument("--target", required=True)
    p.add_argument("--evidence", default=str(ROOT / "evidence" / "probe"))
    sub.add_parser("targets", help="list and validate the target configs")
    args = parser.parse_args(argv)
    try:
        return {"suite": suite, "probe": probe, "targets": targets}[args.command](args)
    except ConfigError as e:
        print(f"vtx: {e}", file=sys.stderr)
        return 2
    except InfraError as e:
        print(f"vtx: infrastructure error ({e.stage}): {e}", file=sys.stderr)
        return 3
    except HarnessError as e:
        print(f"vtx: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vtx: interrupted", file=sys.stderr)
        return 130


def targets(args) -> int:
    from .targets.config import CONFIG_DIR, load

    bad = 0
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        try:
            c = load(path)
            print(f"{c.name:24} {c.kind:12} {c.description}")
        except ConfigError as e:
            bad += 1
            print(f"invalid: {e}")
    return 1 if bad else 0


def probe(args) -> int:
    from .observe import capabilities
    from .observe.runner import run_scenario
    from .payload.image import Scenario
    from .targets import open_target

    t = open_target(args.target)
    why = t.unavailable()
    if why:
        print(f"vtx: target {t.name} unavailable: {why}", file=sys.stderr)
        return 4
    run = run_scenario(t, Scenario(name="probe"), Path(args.evidence)).expect_ok()
    p = run.probe
    print(f"target {t.name}: {p.vendor} family {p.family:#x} model {p.model:#x}, CPUID.VMX={int(p.cpuid_vmx)}")
    for u in p.dmar_units:
        print(f"  DMAR unit {u.index} at {u.base:#x}: VER {u.ver:#x} CAP {u.cap:#018x} ECAP {u.ecap:#018x} "
              f"(levels {','.join(map(str, u.levels))}, CM={int(u.caching_mode)}, QI={int(u.qi)}, IR={int(u.intremap)})")
    print("  capabilities: " + (", ".join(sorted(capabilities(p, t.config.deny))) or "(none)"))
    print(f"  evidence: {run.evidence}")
    return 0


class _Summary:
    """A pytest plugin that tallies outcomes per target for the closing table."""

    def __init__(self):
        self.counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.seconds: dict[str, float] = defaultdict(float)
        self.problems: list[tuple[str, str]] = []

    def pytest_runtest_logreport(self, report):
        tgt = dict(report.user_properties).get("target", "(no target)")
        self.seconds[tgt] += report.duration
        if report.when == "call" or (report.when == "setup" and not report.passed):
            outcome = ("error" if report.when != "call" and report.failed else report.outcome)
            if hasattr(report, "wasxfail"):
                outcome = "xfailed" if report.skipped else "xpassed"
            self.counts[tgt][outcome] += 1
            if outcome in ("failed", "error"):
                self.problems.append((outcome, report.nodeid))


def suite(args) -> int:
    import pytest

    from .targets.config import load

    for t in args.target or []:
        load(t)                      # a bad --target is a one-line error, before pytest starts
    evidence = Path(args.evidence).resolve()
    evidence.mkdir(parents=True, exist_ok=True)
    junit = evidence / "junit.xml"
    pytest_args = [str(ROOT / d) for d in SUITE_DIRS if (ROOT / d).exists()]
    pytest_args += ["-q", "-p", "no:cacheprovider", f"--evidence-dir={evidence}", f"--junitxml={junit}"]
    pytest_args += [f"--target={t}" for t in args.target or []]
    if args.workers:
        pytest_args += ["-n", str(args.workers), "--dist", "loadgroup"]   # one worker per host / VMX batch
    pytest_args += args.pytest_args
    summary = _Summary()
    t0 = time.monotonic()
    code = pytest.main(pytest_args, plugins=[summary])
    elapsed = time.monotonic() - t0
    cols = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")
    print(f"\nConformance suite: {sum(sum(c.values()) for c in summary.counts.values())} results "
          f"in {elapsed:.1f} s")
    print(f"{'target':24}" + "".join(f"{c:>9}" for c in cols))
    for tgt in sorted(summary.counts):
        print(f"{tgt:24}" + "".join(f"{summary.counts[tgt].get(c, 0):>9}" for c in cols))
    for outcome, nodeid in summary.problems[:20]:
        print(f"  {outcome.upper():7} {nodeid}")
    print(f"Evidence: {evidence}  (per test: <evidence>/<test id>/run-N; JUnit XML: {junit})")
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
