#!/usr/bin/env python3
"""Harness overhead: a trivial scenario run through the harness vs the same image started by a
bare qemu-system-x86_64 command, interleaved in one run (these machines are noisy), cold each time.

    .venv/bin/python tools/bench_harness.py [--runs N] [--target qemu-tcg]

Prints the two medians and their ratio (goal <= 1.10, limit 1.15; median harness run <= 0.25 s).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.observe.runner import run_scenario  # noqa: E402
from harness.payload import layout  # noqa: E402
from harness.payload.image import Scenario, build  # noqa: E402
from harness.targets import open_target  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--target", default="qemu-tcg")
    args = ap.parse_args()
    target = open_target(args.target)
    scenario = Scenario(name="bench")
    scenario.steps.mark(1)
    image = build(scenario)
    q = target.q
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bare = [q["binary"], "-machine", f"{q['machine']},accel={q['accel']}", "-cpu", q["cpu"],
                "-m", str(q["memory_mb"]), "-nodefaults", "-no-user-config", "-display", "none",
                "-no-reboot", "-serial", f"file:{tmp / 'bare.log'}",
                "-device", f"isa-debug-exit,iobase={layout.DEBUG_EXIT_PORT:#x},iosize=4",
                "-kernel", str(image.elf)]
        harness_times, bare_times = [], []
        run_scenario(target, scenario, tmp / "warm")          # warm the page cache once
        for i in range(args.runs):
            t0 = time.perf_counter()
            run = run_scenario(target, scenario, tmp / f"h{i}").expect_ok()
            harness_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            rc = subprocess.run(bare, stdin=subprocess.DEVNULL).returncode
            bare_times.append(time.perf_counter() - t0)
            if rc != 0x21 or len(run.records) < 3:
                print(f"unexpected result: bare exit {rc}, {len(run.records)} records", file=sys.stderr)
                return 1
        if b"*" not in (tmp / "bare.log").read_bytes():
            print("the bare run printed no records", file=sys.stderr)
            return 1
    h, b = statistics.median(harness_times), statistics.median(bare_times)
    print(f"target {args.target}, {args.runs} interleaved cold runs each")
    print(f"harness median {h * 1000:.1f} ms (min {min(harness_times) * 1000:.1f}, max {max(harness_times) * 1000:.1f})")
    print(f"bare    median {b * 1000:.1f} ms (min {min(bare_times) * 1000:.1f}, max {max(bare_times) * 1000:.1f})")
    print(f"ratio harness/bare = {h / b:.3f}  (goal <= 1.10, limit 1.15); harness median <= 250 ms: {'yes' if h <= 0.25 else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
