#!/usr/bin/env python3
"""Soak: run many mixed QEMU and Bochs scenarios in one process and report what leaks.

    .venv/bin/python tools/soak.py [-n 1000] [--qemu qemu-tcg-vtd] [--bochs bochs-generic]

Each run is a real boot on a real emulator (no mocks).  The scenarios rotate through a probe, plain
steps (marks, reads, CPUID, memory fill/compare), a VT-d register read (QEMU with intel-iommu), and
outcomes that must be reported exactly (an unexpected #UD, a POLL that gives up).  Printed at the end:
passes and errors (with the first few errors), emulator processes left behind, runtime directories
left behind, this process' open file descriptors and resident memory (growth after a warm-up).
Evidence of passing runs is deleted as it goes (kept for errors).  Not part of CI (it takes a while);
exit status 0 only when every run passed and nothing leaked.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.errors import HarnessError  # noqa: E402
from harness.observe.run import Run  # noqa: E402
from harness.observe.runner import run_scenario  # noqa: E402
from harness.payload.image import Scenario  # noqa: E402
from harness.payload.records import EndStatus, Kind  # noqa: E402
from harness.targets import open_target, proc  # noqa: E402
from harness.targets.base import RUNTIME_PREFIX, runtime_base  # noqa: E402

WARM_UP = 10            # runs before the descriptor / memory baseline is taken
EMULATORS = (b"qemu-system", b"bochs-bin")

Check = Callable[[Run], None]


def _expect(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(what)


def scenarios(vtd: bool) -> list[tuple[str, Callable[[], tuple[Scenario, Check]]]]:
    """(name, builder) pairs; a builder returns a fresh scenario and the check of its run."""

    def probe() -> tuple[Scenario, Check]:
        return Scenario(name="probe"), lambda r: (r.expect_ok(), _expect(r.probe is not None, "no probe"))

    def marks() -> tuple[Scenario, Check]:
        s = Scenario(name="marks", probe=False)
        for tag in range(1, 9):
            s.steps.mark(tag)
        return s, lambda r: _expect([x.fields[1] for x in r.expect_ok().of(Kind.MARK)] == list(range(1, 9)),
                                    "marks out of order")

    def cpuid() -> tuple[Scenario, Check]:
        s = Scenario(name="cpuid", probe=False)
        i = s.steps.cpuid(0)
        return s, lambda r: _expect(r.expect_ok().step_record(i, Kind.CPUID).fields[1] == 0, "CPUID leaf")

    def memory() -> tuple[Scenario, Check]:
        s = Scenario(name="memory", probe=False)
        buf = s.arena.alloc(4096, align=4096)
        s.steps.mem_fill(buf, 4096, 0x5A5A_1234_A5A5_4321)
        i = s.steps.mem_compare(buf, 4096, 0x5A5A_1234_A5A5_4321)
        return s, lambda r: _expect(r.expect_ok().step_record(i, Kind.MEMCMP).fields[1] == 0, "memory mismatch")

    def undefined_opcode() -> tuple[Scenario, Check]:
        s = Scenario(name="ud", probe=False)
        s.asm.append("soak_ud:\n    ud2\n    ret\n")
        s.steps.call("soak_ud")
        return s, lambda r: _expect(r.end_status == EndStatus.EXCEPTION and r.exception.vector == 6,
                                    f"expected #UD, got {r.end_status!r} {r.exception}")

    def poll_gives_up() -> tuple[Scenario, Check]:
        s = Scenario(name="poll", probe=False)
        s.steps.poll(0x3F8 + 7, 0xFF, 0x5A, 50, size=1, io=True, abort=True)   # scratch register never 0x5a
        return s, lambda r: _expect(r.end_status == EndStatus.POLL_TIMEOUT, f"expected POLL_TIMEOUT, got {r.end_status!r}")

    def vtd_version() -> tuple[Scenario, Check]:
        s = Scenario(name="vtd-ver")
        i = s.steps.mmio_read(0x0, size=4, base=1)     # VER_REG of the first DMAR unit (VT-d 11.4.1)
        return s, lambda r: _expect(r.expect_ok().value(i) == 0x10, "VER_REG is not 1.0")

    out = [("probe", probe), ("marks", marks), ("cpuid", cpuid), ("memory", memory),
           ("ud", undefined_opcode), ("poll", poll_gives_up)]
    return out + ([("vtd-ver", vtd_version)] if vtd else [])


def emulator_children() -> list[int]:
    """Emulator processes whose parent is this process (what the harness started and did not end)."""
    me, found = os.getpid(), []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            status = (d / "status").read_text()
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("PPid:")))
        state = next(ln.split()[1] for ln in status.splitlines() if ln.startswith("State:"))
        if ppid == me and state != "Z" and any(e in cmd.split(b"\0")[0] for e in EMULATORS):
            found.append(int(d.name))
    return found


def my_runtime_dirs() -> list[str]:
    prefix = f"{RUNTIME_PREFIX}{os.getpid()}-"
    return [n for n in os.listdir(runtime_base()) if n.startswith(prefix)]


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--runs", type=int, default=1000, help="number of runs (default 1000)")
    ap.add_argument("--qemu", default="qemu-tcg-vtd", help="QEMU target (default qemu-tcg-vtd)")
    ap.add_argument("--bochs", default="bochs-generic", help="Bochs target (default bochs-generic)")
    ap.add_argument("--evidence", default=None, help="where evidence goes (default: a temporary directory)")
    args = ap.parse_args()
    if args.runs < 1:
        print(f"soak: --runs: expected a positive number, got {args.runs}", file=sys.stderr)
        return 2

    targets = []
    for name in (args.qemu, args.bochs):
        try:
            t = open_target(name)
        except HarnessError as e:
            print(f"soak: {e}", file=sys.stderr)
            return 2
        why = t.unavailable()
        if why:
            print(f"soak: target {name} cannot run here: {why}", file=sys.stderr)
            return 2
        targets.append(t)
    vtd = {t.name: t.KIND == "qemu" and bool(t.config.section.get("iommu")) for t in targets}
    plans = {t.name: scenarios(vtd[t.name]) for t in targets}

    evidence_root = Path(args.evidence or tempfile.mkdtemp(prefix="soak-evidence-"))
    passes, errors = 0, []
    per_kind: dict[str, list[int]] = {}
    base_fds = base_rss = None
    t0 = time.monotonic()
    for i in range(args.runs):
        target = targets[i % len(targets)]
        name, builder = plans[target.name][(i // len(targets)) % len(plans[target.name])]
        evidence = evidence_root / f"{i:05d}-{target.name}-{name}"
        try:
            scenario, check = builder()
            check(run_scenario(target, scenario, evidence, timeout=120))
            passes += 1
            per_kind.setdefault(target.KIND, [0, 0])[0] += 1
            shutil.rmtree(evidence, ignore_errors=True)
        except (HarnessError, AssertionError) as e:
            errors.append(f"run {i} {target.name} {name}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
            per_kind.setdefault(target.KIND, [0, 0])[1] += 1
        if i + 1 == WARM_UP:
            base_fds, base_rss = fds(), rss_kib()
        if (i + 1) % 50 == 0 or i + 1 == args.runs:
            print(f"  {i + 1}/{args.runs} runs, {passes} passed, {len(errors)} errors, "
                  f"{time.monotonic() - t0:.0f} s", flush=True)
    leaked_procs = emulator_children() + [p for p in proc.live_pids() if p not in emulator_children()]
    leaked_dirs = my_runtime_dirs()
    end_fds, end_rss = fds(), rss_kib()
    base_fds = base_fds if base_fds is not None else end_fds
    base_rss = base_rss if base_rss is not None else end_rss

    print(f"runs:                {args.runs} ({', '.join(f'{k} {v[0] + v[1]}' for k, v in sorted(per_kind.items()))}) "
          f"in {time.monotonic() - t0:.0f} s")
    print(f"passes:              {passes} of {args.runs}")
    print(f"errors:              {len(errors)}")
    for line in errors[:10]:
        print(f"    {line}")
    print(f"leaked processes:    {len(leaked_procs)} {leaked_procs or ''}")
    print(f"leaked runtime dirs: {len(leaked_dirs)} {leaked_dirs or ''}")
    print(f"file descriptors:    {base_fds} after {min(WARM_UP, args.runs)} runs, {end_fds} at the end "
          f"(growth {end_fds - base_fds})")
    print(f"resident memory:     {base_rss / 1024:.1f} MiB after {min(WARM_UP, args.runs)} runs, "
          f"{end_rss / 1024:.1f} MiB at the end (growth {(end_rss - base_rss) / 1024:+.1f} MiB)")
    print(f"evidence of errors:  {evidence_root}" if errors else f"evidence:            {evidence_root} (passing runs removed)")
    if not errors and not args.evidence:
        shutil.rmtree(evidence_root, ignore_errors=True)
    ok = not errors and not leaked_procs and not leaked_dirs and end_fds - base_fds <= 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
