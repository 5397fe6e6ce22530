#!/usr/bin/env python3
"""Benchmark the VT-d suite: median wall time of one DMA scenario, and the whole suite's time.

    .venv/bin/python tools/bench_vtd.py [--target qemu-tcg-vtd] [--runs 9] [--no-suite]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.observe import Probe  # noqa: E402
from harness.observe.runner import run_scenario  # noqa: E402
from harness.payload.image import Scenario  # noqa: E402
from harness.targets import load, open_target  # noqa: E402
from harness.testing import PATTERN, XFER, VtdScenario, page  # noqa: E402


def dma_scenario(probe: Probe, target: str) -> VtdScenario:
    """The typical DMA scenario: boot, probe, agent set-up, buffer load, tables, one translated
    write DMA, fault read-out, memory compare."""
    scen = VtdScenario("bench-dma", probe, target)
    scen.prepare()
    dom = scen.domain()
    dom.map(0x40_0000, page(1))
    scen.attach(scen.agent, dom, 1)
    scen.unit.setup_translation(scen.tables.root)
    scen.agent.dma_write(0x40_0000, XFER)
    scen.unit.faults()
    scen.compare("data", page(1), XFER, PATTERN)
    return scen


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="qemu-tcg-vtd")
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--no-suite", action="store_true", help="skip timing the whole suite")
    args = ap.parse_args()
    target = open_target(load(args.target))
    times = []
    with tempfile.TemporaryDirectory(prefix="bench-vtd-") as tmp:
        probe = run_scenario(target, Scenario(name="probe"), Path(tmp) / "probe").expect_ok().probe
        scen = dma_scenario(probe, target.name)
        run_scenario(target, scen.scenario, Path(tmp) / "warm").expect_ok()    # builds the image
        for i in range(args.runs):
            t0 = time.monotonic()
            run = run_scenario(target, scen.scenario, Path(tmp) / f"run-{i}").expect_ok()
            times.append(time.monotonic() - t0)
            if run.step_record(scen.checks["data"], 0x14).fields[1] != 0:
                print("DMA scenario did not deliver its data", file=sys.stderr)
                return 1
    print(f"DMA scenario ({args.target}): median {statistics.median(times):.3f} s, "
          f"min {min(times):.3f} s, max {max(times):.3f} s over {args.runs} runs")
    if not args.no_suite:
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "pytest", "harness/conformance/vtd", "--vtx-target", args.target, "-q",
                            "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True)
        elapsed = time.monotonic() - t0
        summary = (r.stdout.strip().splitlines() or ["(no output)"])[-1]
        print(f"suite harness/conformance/vtd ({args.target}): {elapsed:.1f} s wall; {summary}")
        return r.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
