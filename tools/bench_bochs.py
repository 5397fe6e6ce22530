#!/usr/bin/env python3
"""Bochs scenario wall time: one boot (BIOS POST + payload) and VMX scenarios batched per boot.

    .venv/bin/python tools/bench_bochs.py [--target bochs-skylake] [--boots 5] [--batch 16]

Reports the median wall time of a bare boot and, for batches of ``--batch`` VMX scenarios
(CPUID exit + VMCALL each), the median wall time per scenario.  The budget is 0.35 s per
scenario (goal 0.25 s).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.observe.runner import run_scenario  # noqa: E402
from harness.observe.vmx import split  # noqa: E402
from harness.payload.image import Scenario  # noqa: E402
from harness.payload.vmx.builder import Action, VmxTest, batch  # noqa: E402
from harness.payload.vmx.controls import VmxCaps  # noqa: E402
from harness.payload.vmx.fields import Exit  # noqa: E402
from harness.targets import open_target  # noqa: E402


def scenario(caps: VmxCaps, i: int) -> VmxTest:
    v = VmxTest(caps)
    v.guest(f"""
        mov eax, {i}
        cpuid
        vmcall
    """)
    v.on(Exit.CPUID, Action.skip())
    v.enter_guest()
    return v


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="bochs-skylake")
    ap.add_argument("--boots", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    t = open_target(args.target)
    with tempfile.TemporaryDirectory() as tmp:
        ev = Path(tmp)
        probe = run_scenario(t, Scenario(name="probe"), ev / "probe").probe
        caps = VmxCaps(dict(probe.msrs), probe.features_ecx)
        bare = Scenario(name="bare", probe=False)
        bare.steps.mark(1)
        boots, per = [], []
        for n in range(args.boots):
            t0 = time.monotonic()
            run_scenario(t, bare, ev / f"bare-{n}")
            boots.append(time.monotonic() - t0)
        for n in range(args.boots):
            sc = batch([scenario(caps, i) for i in range(args.batch)], name="bench")
            t0 = time.monotonic()
            run = run_scenario(t, sc, ev / f"batch-{n}")
            dt = time.monotonic() - t0
            done = sum(1 for r in split(run.records).values()
                       if r.complete and r.reasons() == [Exit.CPUID, Exit.VMCALL])
            if done != args.batch:
                print(f"batch {n}: only {done} of {args.batch} scenarios completed", file=sys.stderr)
                return 1
            per.append(dt / args.batch)
    med = statistics.median(per)
    print(f"target {args.target}: bare boot median {statistics.median(boots):.3f} s "
          f"(min {min(boots):.3f}, max {max(boots):.3f}) over {args.boots} boots")
    print(f"VMX scenario median {med:.3f} s in batches of {args.batch} "
          f"(min {min(per):.3f}, max {max(per):.3f}); budget 0.35 s, goal 0.25 s: "
          + ("within budget" if med <= 0.35 else "OVER BUDGET"))
    return 0 if med <= 0.35 else 1


if __name__ == "__main__":
    sys.exit(main())
