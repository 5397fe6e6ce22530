"""``vtx``: the command-line entry point.

    vtx --version
    vtx suite [--vtx-target T ...] [--evidence DIR] [--workers N] [-- PYTEST ARGS]
                                     the conformance suite shipped in the package, from any directory
    vtx probe --vtx-target T         boot the probe, show capabilities
    vtx targets                      every target along the search path: kind, runnable here or why not

Target names resolve in ./targets, $VTX_TARGET_PATH, then the package (see harness.targets.catalog).
Errors in user input are one line naming what was wrong; no traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from pathlib import Path

from . import __version__
from .errors import ConfigError, HarnessError, InfraError

log = logging.getLogger("vtx.cli")

# The conformance suite ships inside the package, so `vtx suite` runs the installed copy.
SUITE_PACKAGE = Path(__file__).resolve().parent / "conformance"
SUITE_DIRS = ("vtd", "vmx")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vtx", description="VT-x / VT-d conformance harness")
    parser.add_argument("--version", action="version", version=f"vtx {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("suite", help="run the conformance suite and print a summary")
    s.add_argument("--vtx-target", "--target", dest="target", action="append", metavar="NAME|PATH",
                   help="target name or YAML path (repeatable); default: the plugin's defaults")
    s.add_argument("--evidence", default="evidence", help="evidence directory (default: ./evidence)")
    s.add_argument("--workers", type=int, default=None,
                   help="parallel pytest workers (default 2 when pytest-xdist is installed, else 0: one process)")
    s.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    p = sub.add_parser("probe", help="boot the probe on a target and print what it found")
    p.add_argument("--vtx-target", "--target", dest="target", required=True, metavar="NAME|PATH")
    p.add_argument("--evidence", default=str(Path("evidence") / "probe"), help="evidence directory")
    sub.add_parser("targets", help="list every target: kind, whether it can run here and why not")
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


def targets(args: argparse.Namespace) -> int:
    from .targets.catalog import discover, search_path

    print("search path: " + ":".join(str(d) for d in search_path()))
    entries = discover()
    width = max([len(e.name) for e in entries] + [6]) + 2
    print(f"{'target':{width}}{'kind':13}{'here':6}why / description")
    bad = 0
    for e in entries:
        if e.invalid:
            bad += 1
            print(f"{e.name:{width}}{'?':13}{'bad':6}{e.reason}")
        elif e.shadowed_by is not None:
            print(f"{e.name:{width}}{'':13}{'-':6}{e.path}: {e.reason}")
        elif e.runnable is None:
            print(f"{e.name:{width}}{e.kind:13}{'?':6}{e.description} ({e.reason})")
        elif e.runnable:
            print(f"{e.name:{width}}{e.kind:13}{'yes':6}{e.description}")
        else:
            print(f"{e.name:{width}}{e.kind:13}{'no':6}{e.reason}")
    return 1 if bad else 0


def probe(args: argparse.Namespace) -> int:
    from .observe import capabilities
    from .observe.runner import run_scenario
    from .payload.image import Scenario
    from .targets import open_target
    from .targets.catalog import load_target

    t = open_target(load_target(args.target))
    why = t.unavailable()
    if why:
        print(f"vtx: target {t.name} unavailable: {why}", file=sys.stderr)
        return 4
    run = run_scenario(t, Scenario(name="probe"), Path(args.evidence).resolve()).expect_ok()
    p = run.probe
    print(f"target {t.name}: {p.vendor} family {p.family:#x} model {p.model:#x}, CPUID.VMX={int(p.cpuid_vmx)}")
    for u in p.dmar_units:
        print(f"  DMAR unit {u.index} at {u.base:#x}: VER {u.ver:#x} CAP {u.cap:#018x} ECAP {u.ecap:#018x} "
              f"(levels {','.join(map(str, u.levels))}, CM={int(u.caching_mode)}, QI={int(u.qi)}, IR={int(u.intremap)})")
    print("  capabilities: " + (", ".join(sorted(capabilities(p, t.config.deny))) or "(none)"))
    print(f"  evidence: {run.evidence}")
    return 0


def suite_args(args: argparse.Namespace) -> list[str]:
    """pytest's arguments for the shipped suite: only its own directories, none of the current
    directory's ini files or conftests, evidence and JUnit XML where the user asked."""
    from .targets.catalog import load_many

    load_many(args.target or [])     # a bad target is a one-line error, before pytest starts
    evidence = Path(args.evidence).resolve()
    workers = args.workers
    if workers is None:
        workers = 2 if importlib.util.find_spec("xdist") else 0
    elif workers and not importlib.util.find_spec("xdist"):
        raise ConfigError(f"--workers {workers}: needs pytest-xdist (pip install pytest-xdist), "
                          "or --workers 0 for one process")
    out = [str(SUITE_PACKAGE / d) for d in SUITE_DIRS if (SUITE_PACKAGE / d).is_dir()]
    out += ["-c", os.devnull, f"--rootdir={SUITE_PACKAGE}",
            f"--confcutdir={SUITE_PACKAGE}", "-p", "no:cacheprovider", "-q", "-ra", "--strict-markers",
            f"--vtx-evidence-dir={evidence}", f"--junitxml={evidence / 'junit.xml'}",
            # This process imported the package before pytest could mark it for assertion
            # rewriting; its submodules (the test API) are still rewritten when pytest loads them.
            "-W", "ignore:Module already imported so cannot be rewritten:pytest.PytestAssertRewriteWarning"]
    out += [f"--vtx-target={t}" for t in args.target or []]
    if workers:
        out += ["-n", str(workers), "--dist", "loadgroup"]   # one worker per host / VMX batch
    return out + list(args.pytest_args)


def suite(args: argparse.Namespace) -> int:
    import pytest

    pytest_args = suite_args(args)
    log.info("pytest %s", " ".join(pytest_args))
    return int(pytest.main(pytest_args))


if __name__ == "__main__":
    sys.exit(main())
