"""What every target provides: run an image, return the raw run with its evidence."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import pexpect
import pexpect.fdpexpect

from ..errors import InfraError, RecordStreamError, RunTimeout
from ..payload.describe import describe
from ..payload.image import Image
from ..payload.records import FrameError, FrameParser, Record
from ..payload.steps import SyncKind, release_token, sync_name
from .config import Field, TargetConfig


@dataclass
class RawRun:
    """A run as the target saw it: records, console bytes, exit status, host-side evidence."""

    target: str
    records: list[Record]
    console: bytes
    exit_status: int | None          # the process' exit status, or None where there is none
    exit_expected: Callable[[int], int | None] | None   # END status -> the exit status it implies
    duration_s: float
    evidence: Path
    host_events: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class Target(ABC):
    """A place where images run.  Subclasses set KIND, SECTION and SCHEMA and implement run()."""

    KIND: str = ""
    SECTION: str = ""
    SCHEMA: dict[str, Field] = {}
    IMAGE_FORMAT: str = "elf"        # "elf" (multiboot) or "disk" (BIOS boot)
    EMULATED: bool = True

    def __init__(self, config: TargetConfig):
        self.config = config
        self.name = config.name
        # Host actions at the payload's sync points (name -> action), for the runs made inside
        # ``at()``; every run hands them to its ConsoleWatch (see SyncPoints).
        self.sync_actions: dict[str, SyncAction] = {}

    # What a HostControl of this kind can do beyond releasing sync points ("qmp": QmpControl).
    HOST_ACTIONS: frozenset[str] = frozenset()

    @contextlib.contextmanager
    def at(self, point: str | Mapping[str, "SyncAction"], action: "SyncAction | None" = None,
           repeat: bool = False) -> Iterator[None]:
        """Run ``action(control)`` when the payload reaches sync point ``point`` (``steps.sync``),
        then release it; for the runs made inside the ``with`` block.  ``at({name: action, ...})``
        registers several.  A point with an action that the run never reaches, and a point the
        payload reaches without one (or, unless ``repeat``, a second time), are infrastructure
        errors naming the point.  ``repeat`` serves a point that several scenarios of one boot
        share (a batch): the action runs at every arrival."""
        actions = dict(point) if isinstance(point, Mapping) else {point: action}
        for name, act in actions.items():
            if not callable(act):
                raise TypeError(f"sync point {name!r}: the action must be callable, got {act!r}")
            if name in self.sync_actions:
                raise ValueError(f"target {self.name}: sync point {name!r} already has an action")
        if repeat:
            actions = {name: RepeatedAction(act) for name, act in actions.items()}   # type: ignore[arg-type]
        self.sync_actions.update(actions)       # type: ignore[arg-type]
        try:
            yield
        finally:
            for name in actions:
                self.sync_actions.pop(name, None)

    @classmethod
    def check_config(cls, config: TargetConfig) -> None:
        """Cross-field rules of this kind, run when the file is loaded (raise ConfigError, one line
        naming ``config.source`` and the key).  Rules about one field belong in SCHEMA."""

    @property
    def emulated(self) -> bool:
        return self.EMULATED

    @abstractmethod
    def run(self, image: Image, evidence: Path, timeout: float | None = None) -> RawRun:
        """Boot ``image``, collect the record stream until its terminal record, end the target."""

    def unavailable(self) -> str | None:
        """Why this target cannot run here (None when it can)."""
        return None

    def begin_run(self, evidence: Path, timeout: float | None) -> float:
        """Common start of run(): refuse an unavailable target, create the evidence directory,
        return the effective timeout."""
        why = self.unavailable()
        if why:
            raise InfraError(f"target {self.name}: {why}", stage="start")
        evidence.mkdir(parents=True, exist_ok=True)
        return timeout if timeout is not None else self.config.timeout_s

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


# ---------------------------------------------------------------------------------------------
# Runtime directories: private (0700) scratch space of one run, named after the owning process
# (``vtx-<pid>-<start time>-<tag>-XXXXXXXX``) so that a later run can tell that the owner is dead
# (the start time guards against PID reuse) and sweep what a SIGKILL left behind.  While a run is
# in progress its evidence directory holds INCOMPLETE; the sweep completes such evidence (records
# decoded from serial.log, a note that the run was killed) instead of deleting it.

RUNTIME_PREFIX = "vtx-"
INCOMPLETE = "INCOMPLETE"            # marker file in an evidence directory while its run is going on
_OWNER_FILE = "owner"               # in a runtime directory: the evidence directory, one line
_RUNTIME_NAME = re.compile(r"^vtx-(\d+)-(\d+)-.+$")
_swept = False


MAX_BASE_LEN = 60        # sockets live below it: AF_UNIX paths are limited to 107 bytes


def runtime_base() -> Path:
    """Where runtime directories go: $XDG_RUNTIME_DIR, else $TMPDIR when set, else /dev/shm (a
    tmpfs: on the project's CI machines creating a file in /tmp costs ~1-3 ms, in /dev/shm ~0.05 ms,
    and a run creates several), else the temporary directory, else /tmp — the first that is
    writable and short enough for the socket paths below it.  Directories are 0700 (mkdtemp)."""
    for base in (os.environ.get("XDG_RUNTIME_DIR"), os.environ.get("TMPDIR"), "/dev/shm",
                 tempfile.gettempdir(), "/tmp"):
        if base and len(base) <= MAX_BASE_LEN and os.path.isdir(base) and os.access(base, os.W_OK):
            return Path(base)
    return Path("/tmp")


def process_start_time(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot (/proc/<pid>/stat field 22), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[19])


def runtime_dir(tag: str = "run", evidence: Path | None = None) -> Path:
    """A private (0700) directory for sockets and scratch files of one run.

    With ``evidence``, that directory is marked INCOMPLETE until remove_runtime_dir() (or, after a
    SIGKILL, a later run's sweep) completes it.  The first call in a process sweeps leftovers."""
    global _swept
    if not _swept:
        _swept = True
        sweep_runtime_dirs()
    me = os.getpid()
    tag = re.sub(r"[^A-Za-z0-9_]+", "_", tag.removeprefix(RUNTIME_PREFIX)).strip("_") or "run"
    d = Path(tempfile.mkdtemp(prefix=f"{RUNTIME_PREFIX}{me}-{process_start_time(me)}-{tag}-",
                              dir=runtime_base()))
    os.chmod(d, 0o700)
    if evidence is not None:
        (evidence / INCOMPLETE).write_text(f"run in progress: pid {me}, runtime directory {d}\n")
        (d / _OWNER_FILE).write_text(f"{evidence}\n")
    return d


def remove_runtime_dir(d: Path) -> None:
    """Remove a run's runtime directory; its evidence is complete now (the INCOMPLETE mark goes)."""
    try:
        evidence = Path((d / _OWNER_FILE).read_text().strip())
    except OSError:
        evidence = None
    if evidence is not None:
        (evidence / INCOMPLETE).unlink(missing_ok=True)
    shutil.rmtree(d, ignore_errors=True)


def owner_alive(name: str) -> bool | None:
    """Whether the process that owns runtime directory ``name`` still runs (None: not ours)."""
    m = _RUNTIME_NAME.match(name)
    if m is None:
        return None
    pid, started = int(m.group(1)), int(m.group(2))
    return process_start_time(pid) == started


def sweep_runtime_dirs(base: Path | None = None) -> list[Path]:
    """Remove runtime directories whose owner is dead, completing their evidence; return them."""
    base = base or runtime_base()
    swept = []
    try:
        names = os.listdir(base)
    except OSError:
        return swept
    me = os.getpid()
    for name in names:
        if name.startswith(".swept-vtx-") and owner_alive(name[len(".swept-"):].split("+", 1)[0]) is False:
            shutil.rmtree(base / name, ignore_errors=True)      # a sweeper that was killed mid-sweep
            continue
        if owner_alive(name) is not False:
            continue
        d = base / name
        claimed = base / f".swept-{RUNTIME_PREFIX}{me}-{process_start_time(me)}-sweep-x+{name}"
        try:
            os.rename(d, claimed)          # one sweeper wins when several runs start at once
        except OSError:
            continue
        try:
            evidence = Path((claimed / _OWNER_FILE).read_text().strip())
        except OSError:
            evidence = None
        if evidence is not None and (evidence / INCOMPLETE).exists():
            complete_killed_evidence(evidence, int(name.split("-")[1]))
        shutil.rmtree(claimed, ignore_errors=True)
        swept.append(d)
    return swept


def parse_serial_log(evidence: Path) -> FrameParser:
    """The record stream of an evidence directory's serial.log, parsed (empty if there is none)."""
    parser = FrameParser()
    try:
        with open(evidence / "serial.log", "rb") as f:
            while chunk := f.read(1 << 16):
                parser.feed(chunk)
    except OSError:
        pass
    return parser


def complete_killed_evidence(evidence: Path, pid: int) -> None:
    """Finish the evidence of a run whose process was killed: records from serial.log and a note."""
    parser = parse_serial_log(evidence)
    write_records(evidence, parser.records)
    (evidence / "KILLED.txt").write_text(
        f"The run (harness pid {pid}) was killed before it finished; a later run's sweep wrote "
        f"records.txt from serial.log ({len(parser.records)} records"
        + (f", stream damage: {parser.first_error()}" if parser.damaged else "") + ").\n")
    (evidence / INCOMPLETE).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Sync points (issue 14): the payload's SYNC step stops it and names the point; the host runs the
# action registered for that name (Target.at) and sends steps.release_token on the console.

# An action may return a callable: it runs right after the release (e.g. an NMI that must reach
# the guest the payload enters once released).
SyncAction = Callable[["HostControl"], "Callable[[], None] | None"]


class RepeatedAction:
    """An action served at every arrival at its point (``Target.at(..., repeat=True)``)."""

    def __init__(self, action: SyncAction):
        self.action = action

    def __call__(self, control: "HostControl") -> "Callable[[], None] | None":
        return self.action(control)


class HostActionUnavailable(InfraError):
    """A sync action asked for something this target cannot do (e.g. QMP on Bochs)."""

    def __init__(self, message: str):
        super().__init__(message, stage="sync")


class HostControl:
    """What a sync action is given: the point (``point``, ``step``), the records so far, and this
    target's means to act.  This base offers none beyond releasing; QEMU's QmpControl adds QMP."""

    def __init__(self, target: str, evidence: Path):
        self.target = target
        self.evidence = evidence
        self.point = ""
        self.step = -1
        self.records: list[Record] = []
        # Set by an action that reset the platform: the payload boots again, nothing is released
        # and the record stream starts over (the earlier boot's records stay in serial.log).
        self.rebooting = False
        # The console's write side (raw bytes to the payload's UART), set once the run is connected.
        self.write_console: Callable[[bytes], None] | None = None

    def booted_again(self) -> None:
        """Called at the first record after a reset this control made (``rebooting``)."""

    def unavailable(self, what: str) -> HostActionUnavailable:
        return HostActionUnavailable(f"target {self.target}: sync point {self.point!r}: {what} needs QMP, "
                                     f"which this target kind does not offer")

    def __getattr__(self, name: str) -> Any:
        # The QMP vocabulary on a target without QMP: one clear error, not an AttributeError.
        if name in QMP_VOCABULARY:
            raise self.unavailable(name)
        raise AttributeError(name)


# QmpControl's actions (qemu.py), named here so that a target without QMP can refuse them by name.
QMP_VOCABULARY = frozenset({"command", "hmp", "inject_nmi", "stop", "cont", "system_reset", "status",
                            "device_del", "device_add", "query_pci", "read_memory", "wait_event"})


class SyncPoints:
    """One run's sync points: runs the registered action when a SYNC record arrives, then sends the
    release token through ``send``; checks at the end that every registered point was reached."""

    def __init__(self, actions: Mapping[str, SyncAction], what: str, evidence: Path):
        self.actions = dict(actions)
        self.what = what
        self.evidence = evidence
        self.send: Callable[[bytes], None] | None = None
        self.control: HostControl | None = None
        self.no_sender = "its console cannot carry input to the payload"
        self.reached: list[str] = []
        self.restarted = False

    def connect(self, send: Callable[[bytes], None], control: HostControl) -> None:
        """The console's write side and the control object actions get (once the target runs)."""
        self.send, self.control = send, control
        control.write_console = send

    def refuse(self, why: str) -> None:
        """This run cannot release the payload (``why``): fail at once if actions were registered."""
        self.no_sender = why
        if self.actions:
            raise InfraError(f"{self.what}: cannot serve sync points {sorted(self.actions)}: {why}; "
                             f"evidence: {self.evidence}", stage="sync", evidence=str(self.evidence))

    def on_record(self, rec: Record, records: list[Record]) -> None:
        if rec.kind == SyncKind.SYNC:
            name = sync_name(rec.fields[1:])
            action = self.actions.get(name)
            if action is None:
                known = ", ".join(repr(n) for n in self.actions) or "none"
                raise InfraError(f"{self.what}: the payload reached sync point {name!r} (step {rec.fields[0]}) "
                                 f"but the host has no action for it (registered: {known}); evidence: "
                                 f"{self.evidence}", stage="sync", evidence=str(self.evidence))
            if name in self.reached and not isinstance(action, RepeatedAction):
                raise InfraError(f"{self.what}: sync point {name!r} reached a second time (step "
                                 f"{rec.fields[0]}); evidence: {self.evidence}", stage="sync",
                                 evidence=str(self.evidence))
            if self.send is None or self.control is None:
                raise InfraError(f"{self.what}: the payload waits at sync point {name!r} but {self.no_sender}; "
                                 f"evidence: {self.evidence}", stage="sync", evidence=str(self.evidence))
            self.control.point, self.control.step, self.control.records = name, rec.fields[0], records
            self.reached.append(name)
            then = action(self.control)
            if self.control.rebooting:
                self.control.rebooting = False
                self.restarted = True
            else:
                try:
                    self.send(release_token(rec.seq))
                except OSError:
                    # The console's far end has gone (the payload gave up, the emulator left):
                    # what the stream says next (SYNC_DONE, END or its absence) is the verdict.
                    pass
                if callable(then):
                    then()          # an action's second half: what must happen after the release
        elif rec.kind == SyncKind.SYNC_DONE and len(rec.fields) >= 3 and not rec.fields[2]:
            raise InfraError(f"{self.what}: the payload gave up waiting at sync point "
                             f"{self.reached[-1] if self.reached else '?'!r} (step {rec.fields[0]}) after "
                             f"{rec.fields[1]} receiver polls: the release did not reach it; evidence: "
                             f"{self.evidence}", stage="sync", evidence=str(self.evidence))

    def missing(self) -> list[str]:
        return [n for n in self.actions if n not in self.reached]

    def check_end(self, records: list[Record]) -> None:
        """After END: every point with an action was reached."""
        missed = self.missing()
        if missed:
            end = records[-1] if records else None
            walked = f"after {end.fields[2]} steps" if end is not None and len(end.fields) > 2 else "early"
            raise InfraError(f"{self.what}: sync point(s) {', '.join(repr(n) for n in missed)} never reached: "
                             f"the payload ended {walked} (reached: {self.reached or 'none'}); evidence: "
                             f"{self.evidence}", stage="sync", evidence=str(self.evidence))

    def pending_text(self) -> str:
        """For a timeout message: the points still awaited."""
        missed = self.missing()
        return ("waiting for sync point(s) " + ", ".join(repr(n) for n in missed)
                + f" (reached: {self.reached or 'none'})") if missed else ""


# ---------------------------------------------------------------------------------------------
# The console: every target's bytes go through one ConsoleWatch.

RAW_KEPT = 1 << 20           # console bytes kept in memory (the newest); serial.log keeps more
LOG_CAP = 64 << 20           # serial.log stops growing here (with a note saying so)
DRAIN_BOUND_S = 5.0          # after END: the longest we keep listening for what follows


class ConsoleWatch:
    """Feeds console bytes to the frame parser, keeps the raw log, and enforces one deadline.

    Damage is reported at once (feed() raises RecordStreamError), on every target kind; after the
    terminal record the console is drained (until the target's end of stream or a quiet period),
    and anything that looks like a record there is damage too.  Memory is bounded: the newest
    RAW_KEPT bytes stay in ``raw``, serial.log is cut at LOG_CAP with a note."""

    def __init__(self, log_path: Path, timeout: float, what: str,
                 sync_actions: Mapping[str, SyncAction] | None = None):
        self.parser = FrameParser()
        self.sync = SyncPoints(sync_actions or {}, what, log_path.parent)
        self.earlier_boots: list[list[Record]] = []       # boots ended by a host reset (sync action)
        self.evidence = log_path.parent
        self.log = open(log_path, "wb")
        self.logged = 0
        self.received = 0
        self.raw = bytearray()
        self.started = time.monotonic()
        self.deadline = self.started + timeout
        self.timeout = timeout
        self.what = what

    def feed(self, data: bytes) -> None:
        """Take console bytes; raise RecordStreamError at the first damage."""
        if not data:
            return
        self.received += len(data)
        self.raw += data
        if len(self.raw) > 2 * RAW_KEPT:
            del self.raw[:-RAW_KEPT]
        if self.logged < LOG_CAP:
            part = data[:LOG_CAP - self.logged]
            self.log.write(part)
            self.logged += len(part)
            if self.logged >= LOG_CAP:
                self.log.write(f"\n[vtx: serial.log cut at {LOG_CAP} bytes; the console went on]\n".encode())
            self.log.flush()
        new = self.parser.feed(data)
        if self.parser.damaged:
            self.check(self.evidence)
        if new and self.earlier_boots and len(self.parser.records) == len(new) and self.sync.control:
            self.sync.control.booted_again()
        for rec in new:
            if rec.kind in (SyncKind.SYNC, SyncKind.SYNC_DONE):
                self.sync.on_record(rec, self.parser.records)
                if self.sync.restarted:
                    self.restart()
                    break

    def restart(self) -> None:
        """The platform was reset by a sync action: keep the earlier boot's records (earlier-boots.txt)
        and parse the next boot's stream from its HELLO."""
        self.sync.restarted = False
        self.earlier_boots.append(self.parser.records)
        with open(self.evidence / "earlier-boots.txt", "a") as f:
            f.write(f"# boot {len(self.earlier_boots)}: reset by the host at sync point {self.sync.reached[-1]!r}\n"
                    + "".join(f"{describe(r)}\n" for r in self.parser.records))
        self.parser = FrameParser()

    def follow(self, read: Callable[[float], bytes | None], diagnose: Callable[[], str] = lambda: "",
               check_alive: Callable[[], None] | None = None, quiet_s: float = 0.5) -> bool:
        """The one console loop: ``read(wait)`` returns bytes (b"" when quiet, None at end of
        stream).  Reads until the terminal record, then drains until end of stream or ``quiet_s``
        without bytes (bounded by DRAIN_BOUND_S).  Returns True when the stream ended (EOF).

        On expiry raises the timeout error with ``diagnose()`` (e.g. a register dump) in its
        message; ``check_alive`` may raise first (a dead process, a lost connection)."""
        while not self.parser.ended:
            if self.expired():
                raise self.timeout_error(self.evidence, diagnose())
            if check_alive is not None:
                check_alive()
            data = read(min(max(self.remaining(), 0.01), 0.5))
            if data is None:
                return True
            self.feed(data)
        self.sync.check_end(self.parser.records)
        return self.drain(read, quiet_s)

    def drain(self, read: Callable[[float], bytes | None], quiet_s: float) -> bool:
        """After END: read what follows until EOF (True) or a quiet period (False)."""
        bound = time.monotonic() + DRAIN_BOUND_S
        last = time.monotonic()
        while True:
            now = time.monotonic()
            if now - last >= quiet_s or now >= bound:
                return False
            data = read(min(quiet_s - (now - last), bound - now, 0.5))
            if data is None:
                return True
            if data:
                last = time.monotonic()
                self.feed(data)

    def pump(self, fd: int, evidence: Path, diagnose: Callable[[], str] = lambda: "",
             check_alive: Callable[[], None] | None = None, quiet_s: float = 0.5) -> bool:
        """follow() on a file descriptor (a socket or pipe: EOF when the writer has gone)."""
        return self.follow(fd_reader(fd), diagnose, check_alive, quiet_s)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def expired(self) -> bool:
        return self.remaining() <= 0

    def close(self) -> None:
        self.log.close()

    def timeout_error(self, evidence: Path, extra: str = "") -> RunTimeout:
        tail = self.parser.tail(6)
        seen = "\n    ".join(tail) if tail else "(no records)"
        noise = b"\n".join(self.parser.noise[-3:]).decode(errors="replace")
        msg = (f"{self.what}: no terminal record within {self.timeout:.1f} s; last records:\n    {seen}"
               + (f"\n  last console text: {noise[-300:]}" if noise else "")
               + (f"\n  {self.sync.pending_text()}" if self.sync.pending_text() else "")
               + (f"\n  {extra}" if extra else "") + f"\n  evidence: {evidence}")
        return RunTimeout(msg, evidence=str(evidence))

    def check_exit(self, evidence: Path, status: int | None, stderr: Callable[[], str]) -> None:
        """When the emulator has exited (``status``) before the terminal record, raise the
        RecordStreamError that says so, with the first line of its ``stderr()`` (read only then:
        KVM's "kvm run failed ..." says more than a cut stream)."""
        if self.parser.ended or status is None:
            return
        first = next((line.strip() for line in stderr().splitlines() if line.strip()), "")
        tail = "; ".join(self.parser.tail(3)) or "no records"
        raise RecordStreamError(f"{self.what}: record stream broken: no terminal record: the emulator exited with status {status}"
                                + (f" ({first[:200]!r})" if first else "") + f"; last good records: {tail}; "
                                f"evidence: {evidence}", evidence=str(evidence))

    def check(self, evidence: Path) -> None:
        """Raise RecordStreamError unless the stream is complete and undamaged."""
        try:
            self.parser.check_complete()
        except FrameError as e:
            tail = "; ".join(self.parser.tail(3)) or "no records"
            raise RecordStreamError(f"{self.what}: record stream broken: {e}; last good records: {tail}; "
                                    f"evidence: {evidence}", evidence=str(evidence)) from None


def fd_reader(fd: int) -> Callable[[float], bytes | None]:
    """A follow() reader for a file descriptor: None at end of file."""
    console = pexpect.fdpexpect.fdspawn(fd, timeout=None)

    def read(wait: float) -> bytes | None:
        try:
            return console.read_nonblocking(65536, timeout=wait)
        except pexpect.TIMEOUT:
            return b""
        except pexpect.EOF:
            return None
    return read


def write_replay(evidence: Path, body: str) -> None:
    """An executable replay.sh: runs the evidence's scenario again by hand, serial on stdout."""
    path = evidence / "replay.sh"
    path.write_text("#!/bin/sh\n# Replays this run by hand from the files in this directory; the serial "
                    "console goes to stdout.\nset -eu\ncd \"$(dirname \"$0\")\"\n" + body)
    path.chmod(0o755)


def write_records(evidence: Path, records: list[Record]) -> None:
    (evidence / "records.txt").write_text("".join(f"{describe(r)}\n" for r in records))
