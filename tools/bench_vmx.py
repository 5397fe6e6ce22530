#!/usr/bin/env python3
"""VMX suite wall time on a target: the generated VM-entry checks, and the rest of the suite.

    .venv/bin/python tools/bench_vmx.py [--target bochs-skylake] [--skip-rest]

Issue 13's budgets: every generated entry-check case (at least 1,500) in at most 300 s, and the
rest of the VMX conformance suite (harness/conformance/vmx without test_entry_checks.py) in at
most 90 s.  Prints each wall time with its ratio to the budget (below 1.00 is within it).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.conformance.vmx.test_entry_checks import execute  # noqa: E402
from harness.observe.runner import run_scenario  # noqa: E402
from harness.payload.image import Scenario  # noqa: E402
from harness.payload.vmx.controls import VmxCaps  # noqa: E402
from harness.targets import open_target  # noqa: E402

ENTRY_BUDGET = 300.0
REST_BUDGET = 90.0
SUITE = ROOT / "harness" / "conformance" / "vmx"


def entry_checks(target_name: str, evidence: Path) -> tuple[float, int, int, int]:
    """(wall seconds, cases with an outcome, cases generated, boots) for every entry-check case."""
    t = open_target(target_name)
    why = t.unavailable()
    if why:
        raise SystemExit(f"bench_vmx: target {target_name} unavailable: {why}")
    probe = run_scenario(t, Scenario(name="probe"), evidence / "probe").probe
    caps = VmxCaps(dict(probe.msrs), probe.features_ecx)
    t0 = time.monotonic()
    run = execute(t, caps, target_name, evidence / "entry-checks")
    return time.monotonic() - t0, len(run.seen), len(run.cases), run.boots


def rest_of_suite(target_name: str, evidence: Path, timeout: float) -> tuple[float, str]:
    """Wall time of the VMX suite without the entry checks, as a user would run it (one process)."""
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-n", "0", str(SUITE),
           "--ignore", str(SUITE / "test_entry_checks.py"), "--vtx-target", target_name,
           "--vtx-evidence-dir", str(evidence / "suite")]
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return time.monotonic() - t0, f"did not finish within {timeout:.0f} s"
    tail = [line for line in p.stdout.splitlines() if line.strip()][-1:] or ["(no output)"]
    return time.monotonic() - t0, tail[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="bochs-skylake")
    ap.add_argument("--skip-rest", action="store_true", help="time only the entry checks")
    ap.add_argument("--rest-timeout", type=float, default=900.0, help="bound on the rest of the suite (s)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-vmx-") as tmp:
        ev = Path(tmp)
        wall, ran, generated, boots = entry_checks(args.target, ev)
        print(f"entry checks on {args.target}: {ran} of {generated} cases ran in {wall:.1f} s "
              f"({boots} boot(s), {ran / wall:.0f} cases/s); budget {ENTRY_BUDGET:.0f} s: "
              f"ratio {wall / ENTRY_BUDGET:.2f}")
        if not args.skip_rest:
            rest, summary = rest_of_suite(args.target, ev, args.rest_timeout)
            print(f"rest of the VMX suite on {args.target}: {rest:.1f} s ({summary}); budget "
                  f"{REST_BUDGET:.0f} s: ratio {rest / REST_BUDGET:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
