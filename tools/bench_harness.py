#!/usr/bin/env python3
"""Harness overhead: a trivial scenario run through the harness vs the same image started by a
bare qemu-system-x86_64 command, cold each time.

    .venv/bin/python tools/bench_harness.py [--runs N] [--vtx-target qemu-tcg] [--evidence DIR]

These machines are shared and noisy, so the runs are taken in pairs (harness and bare back to
back, alternating which goes first) and the figure of merit is the median of the per-pair ratios:
a load spike that slows one pair slows both of its runs.  The ratio of the two medians is printed
too.  Goal: <= 1.10.  Also printed: where a harness run's time goes (median per phase, from the
run's own qmp.jsonl timestamps), so a regression points at its cause.

Evidence goes where a user's would (``./evidence``, here ``./evidence/_bench``, removed after),
not to /tmp: on the project's CI machines creating a file directly below /tmp costs ~0.5 ms,
40 times more than elsewhere on the same disk, which would measure the machine, not the harness.
Pass ``--evidence /tmp/x`` to see that effect.
"""

from __future__ import annotations

import argparse
import json
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
from harness.targets.catalog import load_target  # noqa: E402

GOAL = 1.10


def bare_argv(q: dict, elf: Path, log: Path) -> list[str]:
    """The same machine as the harness starts, minus its sockets: serial to a file."""
    return [q["binary"], "-machine", f"{q['machine']},accel={q['accel']}", "-cpu", q["cpu"],
            "-m", str(q["memory_mb"]), "-nodefaults", "-no-user-config", "-display", "none",
            "-no-reboot", "-serial", f"file:{log}",
            "-device", f"isa-debug-exit,iobase={layout.DEBUG_EXIT_PORT:#x},iosize=4", "-kernel", str(elf)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=31)
    ap.add_argument("--vtx-target", "--target", dest="target", default="qemu-tcg")
    ap.add_argument("--evidence", type=Path, default=Path("evidence") / "_bench",
                    help="parent of the scratch evidence directory (default ./evidence/_bench)")
    args = ap.parse_args()
    target = open_target(load_target(args.target))
    if target.config.kind != "qemu":
        print(f"--vtx-target {args.target}: a local QEMU target is needed, got kind {target.config.kind}",
              file=sys.stderr)
        return 2
    scenario = Scenario(name="bench")
    scenario.steps.mark(1)
    image = build(scenario)
    args.evidence.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.evidence) as tmp:
        tmp = Path(tmp)
        bare = bare_argv(target.q, image.elf, tmp / "bare.log")

        def harness_run(i: int) -> float:
            t0 = time.perf_counter()
            run = run_scenario(target, scenario, tmp / f"h{i}").expect_ok()
            took = time.perf_counter() - t0
            if len(run.records) < 3:
                raise SystemExit(f"harness run {i}: only {len(run.records)} records")
            return took

        def bare_run(i: int) -> float:
            t0 = time.perf_counter()
            rc = subprocess.run(bare, stdin=subprocess.DEVNULL).returncode
            took = time.perf_counter() - t0
            if rc != 0x21:
                raise SystemExit(f"bare run {i}: exit status {rc}, expected 0x21 (END status OK)")
            return took

        harness_run(-1)                                    # warm the page cache once
        bare_run(-1)
        h, b = [], []
        for i in range(args.runs):
            if i % 2:
                b.append(bare_run(i))
                h.append(harness_run(i))
            else:
                h.append(harness_run(i))
                b.append(bare_run(i))
        if b"*" not in (tmp / "bare.log").read_bytes():
            print("the bare run printed no records", file=sys.stderr)
            return 1
        phases = phase_medians([tmp / f"h{i}" / "qmp.jsonl" for i in range(args.runs)])
    pair = statistics.median(x / y for x, y in zip(h, b))
    hm, bm = statistics.median(h), statistics.median(b)
    print(f"target {args.target}, {args.runs} pairs of cold runs (harness, bare; alternating order), "
          f"evidence under {args.evidence.resolve()}")
    print(f"harness median {hm * 1000:.1f} ms (min {min(h) * 1000:.1f}, max {max(h) * 1000:.1f})")
    print(f"bare    median {bm * 1000:.1f} ms (min {min(b) * 1000:.1f}, max {max(b) * 1000:.1f})")
    if phases:
        print("harness run, QMP timeline (median ms since the transcript opened): "
              + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))
    print(f"ratio of medians harness/bare = {hm / bm:.3f}")
    print(f"ratio harness/bare (median of pairs) = {pair:.3f}  (goal <= {GOAL:.2f}: {'met' if pair <= GOAL else 'NOT met'})")
    return 0


def phase_medians(transcripts: list[Path]) -> dict[str, float]:
    """Median time of each QMP milestone (greeting, each command's reply) across the runs."""
    marks: dict[str, list[float]] = {}
    for path in transcripts:
        try:
            entries = [json.loads(line) for line in path.read_text().splitlines()]
        except (OSError, ValueError):
            continue
        pending = ""
        for e in entries:
            if "greeting" in e:
                marks.setdefault("greeting", []).append(e["t"] * 1000)
            elif "execute" in e:
                pending = e["execute"]
            elif "reply" in e and pending:
                marks.setdefault(f"{pending} answered", []).append(e["t"] * 1000)
                pending = ""
    return {k: statistics.median(v) for k, v in marks.items()}


if __name__ == "__main__":
    sys.exit(main())
