#!/usr/bin/env python3
"""Measure the KVM-runner stand-in's boot path (issue 11): build, Bochs to shell, kvm_intel,
QEMU/KVM start, and one probe run through each transport.

    .venv/bin/python tools/bench_kvmrunner.py [--evidence DIR] [--runs N] [--no-bochs-probe]
    .venv/bin/python tools/bench_kvmrunner.py --suites [vmx,vtd,combined] [-k EXPR]
    .venv/bin/python tools/bench_kvmrunner.py --junit FILE.xml
    .venv/bin/python tools/bench_kvmrunner.py --costs [--target NAME]

Steps (one Bochs at a time, under nice):
  1. build (or find cached) guest-images/kvmrunner's disk;
  2. boot it in Bochs ``corei7_skylake_x``; times from Bochs' start to /init's lines (wall clock,
     as the console bytes arrive) and kvm_intel's parameters read in the console shell;
  3. the probe through the console: QEMU/KVM with the ``qemu-kvm-nested`` target's arguments and
     ``-serial stdio`` in the stand-in's shell, so the records come through the nested serial port
     and Bochs' COM1 (the ELF goes in over SSH/SFTP);
  4. the probe through the existing ``remote-qemu`` target over SSH (slirp's loopback forward,
     host key pinned in a private known_hosts), N times: QMP and serial over the SSH connection;
  5. for comparison, the same probe on Bochs directly (``bochs-skylake``).
Prints the times, the ratios that matter, and what each probe reported (VMX revision, TRUE
controls MSRs, DMAR units).  Writes evidence under --evidence (default: a temporary directory
that is removed unless --keep).

``--suites`` instead times the conformance suites on the stand-in (issue 11, item 7): ONE pytest
process (``-n 0``) runs ``harness/conformance/<suite>`` for each named suite with ``--vtx-target
kvmrunner-standin``, so all suites share one stand-in.  This file, loaded into that process as a
pytest plugin (``-p bench_kvmrunner``), boots the stand-in once the tests are collected (its ready
time is not charged to the first suite) and records, per suite, the wall time from its first test's
start to its last test's end and each test's outcome.  Printed: the ready time, each suite's wall
time, tests run, and the cost per test.  ``-k`` narrows the selection (to try the path quickly).

``--costs`` says where a scenario's time goes on a target: one payload whose phases (port reads
and MMIO reads that exit to QEMU, RDMSRs that exit to KVM only, records on the serial console,
edu DMAs, a memory fill) are separated by MARK records, timestamped as they arrive; each phase's
cost per operation is printed, and its ratio to a port read measured in the same run.

``--junit FILE`` reads the same numbers from a JUnit XML of an earlier run (``pytest --junitxml``):
per suite the sum of its test cases' times (setup, call and teardown; with ``-n 0`` that is the
suite's wall time, except that the stand-in's boot is charged to whichever test ran first).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness.observe.probe import Probe  # noqa: E402
from harness.observe.runner import run_scenario  # noqa: E402
from harness.payload.image import Scenario, build as build_image  # noqa: E402
from harness.payload.records import FrameParser  # noqa: E402
from harness.targets import open_target  # noqa: E402
from harness.targets.kvmrunner import StandIn, console_qemu_argv  # noqa: E402
from harness.targets.qemu import qemu_exit_status  # noqa: E402
from harness.targets.ssh import SshConnection, settings_or_error  # noqa: E402

CONFORMANCE = REPO / "harness" / "conformance"
SUITES = ("vmx", "vtd", "combined")
# The pytest process of --suites writes its timings to the file this variable names.
TIMES_ENV = "VTX_BENCH_KVMRUNNER_TIMES"
VMX_BASIC = 0x480
TRUE_CTLS = (0x48D, 0x48E, 0x48F, 0x490)      # IA32_VMX_TRUE_{PINBASED,PROCBASED,EXIT,ENTRY}_CTLS


def describe(p: Probe) -> str:
    basic = p.msr(VMX_BASIC)
    rev = f"{basic & 0x7FFF_FFFF:#x}" if basic is not None else "absent"
    true = " ".join(f"{m:#x}={p.msr(m):#018x}" if p.msr(m) is not None else f"{m:#x}=absent" for m in TRUE_CTLS)
    units = ", ".join(f"{u.base:#x} cap={u.cap:#x} ecap={u.ecap:#x}" for u in p.dmar_units) or "none"
    return f"vendor {p.vendor!r}, VMX revision {rev}, IA32_VMX_BASIC {basic:#x}\n      TRUE ctls: {true}\n      DMAR units: {units}" \
        if basic is not None else f"vendor {p.vendor!r}, no VMX; DMAR units: {units}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--evidence", type=Path)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--runs", type=int, default=2, help="probe runs through the remote-qemu target")
    ap.add_argument("--no-bochs-probe", action="store_true")
    ap.add_argument("--memory-mb", type=int, default=768)
    ap.add_argument("--suites", nargs="?", const=",".join(SUITES), metavar="NAMES",
                    help=f"time these conformance suites (comma-separated; default {','.join(SUITES)}) on the "
                         "stand-in in one pytest process instead of the boot-path steps")
    ap.add_argument("-k", dest="select", metavar="EXPR", help="with --suites: pytest's -k selection")
    ap.add_argument("--target", default="kvmrunner-standin", help="with --suites or --costs: the target")
    ap.add_argument("--suite-timeout", type=float, default=7200, help="with --suites: bound on the pytest run (s)")
    ap.add_argument("--junit", type=Path, metavar="FILE", help="print each suite's time from this JUnit XML")
    ap.add_argument("--costs", action="store_true", help="time a scenario's kinds of operations on --target")
    args = ap.parse_args()
    if args.junit:
        return print_junit(args.junit)
    if args.costs:
        return print_costs(args)
    if args.suites:
        return time_suites(args)
    ev = args.evidence or Path(tempfile.mkdtemp(prefix="bench-kvmrunner-"))
    ev.mkdir(parents=True, exist_ok=True)
    standin = open_target("kvmrunner-standin")    # the image is built for its Bochs' ips (TSC rate)
    t = time.monotonic()
    img = standin.build_image(progress=lambda m: print(f"  {m}"))
    print(f"image: {img.directory} ({'built' if img.built_now else 'cached'} in {time.monotonic() - t:.1f} s)")
    probe_image = build_image(Scenario(name="probe"))
    results: dict[str, float] = {}
    probes: dict[str, Probe] = {}
    with StandIn(img.disk, ev / "standin", memory_mb=args.memory_mb, ips=standin.b["ips"]) as s:
        ready = s.boot(timeout=1200)
        con = bytes(s.console)
        stamps = {}
        for key, pat in (("grub", rb"Booting|Loading Linux|Linux version"), ("init", rb"kvmrunner: init at"),
                         ("kvm", rb"kvmrunner: kvm loaded at"), ("sshd", rb"kvmrunner: sshd started at")):
            m = re.search(pat, con)
            stamps[key] = s.arrived(m.start()) if m else float("nan")
        results.update({"bochs start -> /init": stamps["init"], "kvm modules (insmod x3)": stamps["kvm"] - stamps["init"],
                        "bochs start -> shell (ready)": ready})
        status, out = s.shell("cat /sys/module/kvm_intel/parameters/nested /sys/module/kvm_intel/parameters/ept "
                              "/sys/module/kvm_intel/parameters/vpid; ls -l /dev/kvm; grep -c vmx /proc/cpuinfo")
        print(f"kvm_intel nested/ept/vpid, /dev/kvm, vmx in cpuinfo (status {status}):\n  "
              + "\n  ".join(out.split()[:3] + [" ".join(out.split()[3:-1]), out.split()[-1]]))
        # A fresh module load, timed in the shell (the console's round trip included).
        t = time.monotonic()
        status, out = s.shell("rmmod kvm_intel && insmod /lib/modules/kvm/kvm-intel.ko nested=1 && "
                              "cat /sys/module/kvm_intel/parameters/nested", timeout=300)
        results["rmmod + insmod kvm_intel nested=1"] = time.monotonic() - t
        print(f"reload kvm_intel: status {status}, nested={out.strip()}")

        known = ev / "known_hosts"
        known.write_text(f"[127.0.0.1]:{s.ssh_port} {img.host_key_pub}\n")
        settings = settings_or_error({"host": "127.0.0.1", "port": s.ssh_port, "user": "root",
                                      "key_file": str(img.client_key), "use_agent": False,
                                      "password_env": None, "known_hosts": str(known),
                                      "accept_unknown_host_key": False, "connect_timeout_s": 120.0},
                                     "bench:kvmrunner")
        t = time.monotonic()
        conn = SshConnection(settings, "kvmrunner stand-in").connect()
        results["ssh connect (host key pinned)"] = time.monotonic() - t
        try:
            t = time.monotonic()
            conn.run(["true"], stage="bench")
            results["ssh command round trip"] = time.monotonic() - t
            t = time.monotonic()
            conn.put(probe_image.elf, "/tmp/probe.elf", stage="bench")
            results[f"sftp upload of the probe ELF ({probe_image.elf.stat().st_size} B)"] = time.monotonic() - t
        finally:
            conn.close()

        # The probe through the nested serial port and Bochs' COM1.
        argv = console_qemu_argv("/tmp/probe.elf")
        (ev / "console-qemu.sh").write_text(shlex.join(argv) + "\n")
        start = len(s.console)
        t = time.monotonic()
        status, out = s.shell(shlex.join(argv), timeout=600)
        results["probe via console (QEMU start + run + exit)"] = time.monotonic() - t
        parser = FrameParser()
        parser.feed(out.encode())
        parser.check_complete()
        hello = next(i for i in range(start, len(s.console)) if s.console[i:i + 2] == b"@0")
        results["  of which QEMU start (command -> first record)"] = s.arrived(hello) - (t - s.t0)
        print(f"console run: exit status {status} (isa-debug-exit for END ok: {qemu_exit_status(0)}), "
              f"{len(parser.records)} records, stream complete")
        probes["nested KVM (console)"] = Probe.from_records(parser.records)

        # The probe through the remote-qemu target, over SSH.
        target = s.remote_target(img.client_key, known)
        for i in range(args.runs):
            t = time.monotonic()
            run = run_scenario(target, Scenario(name="probe"), ev / f"remote-{i}").expect_ok()
            results[f"probe via remote-qemu over SSH, run {i + 1}"] = time.monotonic() - t
            probes["nested KVM (remote-qemu)"] = run.probe
    if not args.no_bochs_probe:
        t = time.monotonic()
        run = run_scenario(open_target("bochs-skylake"), Scenario(name="probe"), ev / "bochs").expect_ok()
        results["probe on Bochs directly (bochs-skylake)"] = time.monotonic() - t
        probes["Bochs corei7_skylake_x"] = run.probe

    print("\ntimes (wall, s):")
    for k, v in results.items():
        print(f"  {k:55s} {v:8.1f}")
    print("\nwhat the probe saw:")
    for k, p in probes.items():
        print(f"  {k}: {describe(p)}")
    remote = [v for k, v in results.items() if k.startswith("probe via remote-qemu")]
    if remote:
        print("\nratios:")
        print(f"  ready time / one remote-qemu probe run   {ready / min(remote):6.1f}")
        print(f"  console probe / remote-qemu probe        {results['probe via console (QEMU start + run + exit)'] / min(remote):6.2f}")
        if "probe on Bochs directly (bochs-skylake)" in results:
            print(f"  remote-qemu probe / Bochs-direct probe   {min(remote) / results['probe on Bochs directly (bochs-skylake)']:6.2f}")
    print(f"\nevidence: {ev}")
    if not args.keep and args.evidence is None:
        shutil.rmtree(ev, ignore_errors=True)
    return 0


# -- --suites: each conformance suite's wall time on one stand-in ---------------------------------

def time_suites(args: argparse.Namespace) -> int:
    """Run the named suites in one pytest process on the stand-in; print what the plugin timed."""
    suites = [s.strip() for s in args.suites.split(",") if s.strip()]
    for name in suites:
        if not re.fullmatch(r"[a-z0-9_]+", name) or not (CONFORMANCE / name).is_dir():
            print(f"--suites: {name!r} is not a suite (a directory under {CONFORMANCE})", file=sys.stderr)
            return 2
    ev = args.evidence or Path(tempfile.mkdtemp(prefix="bench-kvmrunner-suites-"))
    ev.mkdir(parents=True, exist_ok=True)
    times = ev / "suite-times.json"
    times.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "0", "-q", "-p", "bench_kvmrunner",
           "--vtx-target", args.target, "--vtx-evidence-dir", str(ev / "evidence"),
           "--junitxml", str(ev / "junit.xml"), *[str(CONFORMANCE.relative_to(REPO) / s) for s in suites]]
    if args.select:
        cmd += ["-k", args.select]
    env = {**os.environ, TIMES_ENV: str(times), "VTX_BENCH_TARGET": args.target,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "tools"), os.environ.get("PYTHONPATH")]))}
    (ev / "command.sh").write_text(shlex.join(cmd) + "\n")
    print(f"+ {shlex.join(cmd)}", flush=True)
    t0 = time.monotonic()
    try:
        rc = subprocess.run(cmd, cwd=REPO, env=env, timeout=args.suite_timeout).returncode
    except subprocess.TimeoutExpired:
        print(f"the suites did not finish within --suite-timeout {args.suite_timeout:.0f} s", file=sys.stderr)
        return 1
    total = time.monotonic() - t0
    if not times.exists():
        print(f"pytest (exit {rc}) wrote no timings to {times}: nothing collected, or it failed early",
              file=sys.stderr)
        return 1
    data = json.loads(times.read_text())
    if data.get("boot_error"):
        print(f"the stand-in did not boot: {data['boot_error']}", file=sys.stderr)
        return 1
    print(f"\nstand-in: ready {data['ready_s']:.1f} s after Bochs' start (boot wall in the pytest process "
          f"{data['boot_wall_s']:.1f} s; target {args.target})")
    print(f"pytest process: {total:.1f} s wall, exit status {rc}")
    print_suite_table({name: (d["end"] - d["start"], d["outcomes"]) for name, d in data["suites"].items()})
    print(f"\nevidence: {ev}")
    return 0 if rc == 0 else 1


def print_suite_table(rows: dict[str, tuple[float, dict[str, int]]]) -> None:
    print(f"\n  {'suite':10s} {'wall s':>8s} {'tests run':>9s} {'s/test':>7s}  outcomes")
    for name, (wall, outcomes) in rows.items():
        ran = sum(n for k, n in outcomes.items() if k != "skipped")
        per = f"{wall / ran:7.1f}" if ran else "      -"
        shown = ", ".join(f"{n} {k}" for k, n in sorted(outcomes.items()))
        print(f"  {name:10s} {wall:8.1f} {ran:9d} {per}  {shown}")


def print_junit(path: Path) -> int:
    """Each suite's summed test-case times from a JUnit XML (suites by the test's module path)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        print(f"--junit {path}: not a readable JUnit XML ({e})", file=sys.stderr)
        return 2
    rows: dict[str, tuple[float, Counter]] = {}
    for case in root.iter("testcase"):
        parts = case.get("classname", "").split(".")
        if parts[:2] != ["harness", "conformance"] or len(parts) < 3:
            continue
        wall, outcomes = rows.get(parts[2], (0.0, Counter()))
        kinds = {child.tag for child in case}
        skipped = case.find("skipped")
        outcome = ("failed" if "failure" in kinds else "error" if "error" in kinds
                   else "xfailed" if skipped is not None and skipped.get("type") == "pytest.xfail"
                   else "skipped" if skipped is not None else "passed")
        outcomes[outcome] += 1
        rows[parts[2]] = (wall + float(case.get("time", 0) or 0), outcomes)
    if not rows:
        print(f"--junit {path}: no test cases under harness/conformance", file=sys.stderr)
        return 2
    print(f"from {path} (times summed per suite; the stand-in's boot is in the first test's time):")
    print_suite_table(rows)
    return 0


# -- --costs: where a scenario's time goes ------------------------------------------------------------

COST_PHASES = (("port read (exit to QEMU)", 200), ("MMIO read (exit to QEMU)", 200), ("RDMSR (exit to KVM)", 200),
               ("record on the console", 50), ("edu DMA (8 bytes, MSI)", 10), ("2 MiB memory fill", 2))


def cost_scenario() -> Scenario:
    from harness.payload import layout
    from harness.payload.edu import Edu

    s = Scenario(name="costs")
    st = s.steps
    counts = [n for _, n in COST_PHASES]
    st.mark(1)
    for _ in range(counts[0]):
        st.io_read(layout.COM1 + 7, quiet=True)            # the UART's scratch register
    st.mark(2)
    for _ in range(counts[1]):
        st.mmio_read(0xFED90000, quiet=True)                # intel-iommu's VER (VT-d 11.4.1)
    st.mark(3)
    for _ in range(counts[2]):
        st.rdmsr(0x3A, quiet=True)                          # IA32_FEATURE_CONTROL
    st.mark(4)
    for _ in range(counts[3]):
        st.mem_read(layout.SCRATCH_BASE)                    # one MEM record each
    st.mark(5)
    edu = Edu(st, bdf=0x20)                                 # 00:04.0, as the VT-d targets place it
    edu.setup()
    for _ in range(counts[4]):
        edu.dma_read(layout.SCRATCH_BASE, 8)
    st.mark(6)
    for _ in range(counts[5]):
        st.mem_fill(layout.SCRATCH_BASE + 0x20_0000, 2 << 20, 0, quiet=True)
    st.mark(7)
    return s


def time_costs(target_name: str, evidence: Path) -> list[float]:
    """Per-operation seconds of each COST_PHASES phase on ``target_name`` (MARK arrival times)."""
    import threading

    arrived: dict[int, float] = {}
    done = threading.Event()
    mark = re.compile(rb"^@[0-9a-f]+ 18 [0-9a-f]+ ([0-9a-f]+)\*", re.M)

    def watch() -> None:
        while not done.is_set():
            log = evidence / "serial.log"
            if log.exists():
                for m in mark.finditer(log.read_bytes()):
                    arrived.setdefault(int(m[1], 16), time.monotonic())
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        run_scenario(open_target(target_name), cost_scenario(), evidence, 900)
    finally:
        done.set()
        watcher.join()
    return [(arrived[k + 2] - arrived[k + 1]) / n if k + 1 in arrived and k + 2 in arrived else float("nan")
            for k, (_, n) in enumerate(COST_PHASES)]


def print_costs(args) -> int:
    ev = args.evidence or Path(tempfile.mkdtemp(prefix="bench-costs-"))
    t = time.monotonic()
    costs = time_costs(args.target, ev / Path(args.target).stem)
    print(f"{args.target}: the cost run took {time.monotonic() - t:.1f} s (with the stand-in's boot, if it is one)")
    print(f"{'operation':28s} {'per operation':>16s}  {'/ port read':>11s}")
    for (what, n), c in zip(COST_PHASES, costs):
        print(f"{what:28s} {c * 1e3:13.2f} ms  {c / costs[0]:10.1f}x   ({n} in a row)")
    print("(MARK records are timestamped as they arrive, polled every 20 ms: only phases well above that "
          "mean anything; on TCG the whole run takes under a second)")
    if not args.keep and not args.evidence:
        shutil.rmtree(ev, ignore_errors=True)
    return 0


# -- the pytest side of --suites: loaded with -p bench_kvmrunner, inert unless TIMES_ENV is set ------

_TIMES: dict = {"ready_s": None, "boot_wall_s": None, "suites": {}}


def _suite_of(nodeid: str) -> str:
    parts = nodeid.split("::")[0].split("/")
    return parts[2] if parts[:2] == ["harness", "conformance"] and len(parts) > 3 else "other"


def pytest_collection_finish(session) -> None:
    """Boot the stand-in now, so that its ready time is not charged to the first suite."""
    if not os.environ.get(TIMES_ENV) or not session.items:
        return
    from harness.errors import InfraError

    target = open_target(os.environ.get("VTX_BENCH_TARGET", "kvmrunner-standin"))
    t = time.monotonic()
    try:
        s = target.standin(Path(os.environ[TIMES_ENV]).parent / "boot" / "run")
    except InfraError as e:           # the tests report it too; the bench says it in one line
        _TIMES["boot_error"] = str(e).splitlines()[0]
        return
    _TIMES["boot_wall_s"] = time.monotonic() - t
    _TIMES["ready_s"] = s.ready_s


def pytest_runtest_logstart(nodeid: str, location) -> None:
    if os.environ.get(TIMES_ENV):
        now = time.monotonic()
        _TIMES["suites"].setdefault(_suite_of(nodeid), {"start": now, "end": now, "outcomes": {}})


def pytest_runtest_logreport(report) -> None:
    if not os.environ.get(TIMES_ENV):
        return
    if report.when == "call" or (report.when == "setup" and not report.passed):
        outcome = ("xfailed" if report.skipped and hasattr(report, "wasxfail") else
                   "xpassed" if report.passed and hasattr(report, "wasxfail") else
                   "error" if report.when == "setup" and report.failed else report.outcome)
        counts = _TIMES["suites"][_suite_of(report.nodeid)]["outcomes"]
        counts[outcome] = counts.get(outcome, 0) + 1


def pytest_runtest_logfinish(nodeid: str, location) -> None:
    if os.environ.get(TIMES_ENV):
        _TIMES["suites"][_suite_of(nodeid)]["end"] = time.monotonic()


def pytest_sessionfinish(session, exitstatus) -> None:
    if os.environ.get(TIMES_ENV) and (_TIMES["ready_s"] is not None or _TIMES.get("boot_error")):
        Path(os.environ[TIMES_ENV]).write_text(json.dumps(_TIMES, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
