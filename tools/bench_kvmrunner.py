#!/usr/bin/env python3
"""Measure the KVM-runner stand-in's boot path (issue 11): build, Bochs to shell, kvm_intel,
QEMU/KVM start, and one probe run through each transport.

    .venv/bin/python tools/bench_kvmrunner.py [--evidence DIR] [--runs N] [--no-bochs-probe]

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
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness.observe.probe import Probe  # noqa: E402
from harness.observe.runner import run_scenario  # noqa: E402
from harness.payload.image import Scenario, build as build_image  # noqa: E402
from harness.payload.records import FrameParser  # noqa: E402
from harness.targets import open_target  # noqa: E402
from harness.targets.kvmrunner import StandIn, console_qemu_argv, load_recipe  # noqa: E402
from harness.targets.qemu import qemu_exit_status  # noqa: E402
from harness.targets.ssh import SshConnection, settings_or_error  # noqa: E402

KVMRUNNER = REPO / "guest-images" / "kvmrunner"
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
    args = ap.parse_args()
    ev = args.evidence or Path(tempfile.mkdtemp(prefix="bench-kvmrunner-"))
    ev.mkdir(parents=True, exist_ok=True)
    recipe = load_recipe(KVMRUNNER)
    t = time.monotonic()
    img = recipe.build(log=lambda m: print(f"  {m}"))
    print(f"image: {img.directory} ({'built' if img.built_now else 'cached'} in {time.monotonic() - t:.1f} s)")
    probe_image = build_image(Scenario(name="probe"))
    results: dict[str, float] = {}
    probes: dict[str, Probe] = {}
    with StandIn(img.disk, ev / "standin", memory_mb=args.memory_mb) as s:
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


if __name__ == "__main__":
    sys.exit(main())
