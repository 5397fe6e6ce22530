"""What every target provides: run an image, return the raw run with its evidence."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pexpect
import pexpect.fdpexpect

from ..errors import InfraError, RecordStreamError, RunTimeout
from ..payload.describe import describe
from ..payload.image import Image
from ..payload.records import FrameError, FrameParser, Record
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


def runtime_dir(prefix: str = "vtx-") -> Path:
    """A private (0700) directory for sockets and scratch files of one run."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if not base or not os.access(base, os.W_OK):
        base = None
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    os.chmod(d, 0o700)
    return d


def remove_runtime_dir(d: Path) -> None:
    shutil.rmtree(d, ignore_errors=True)


class ConsoleWatch:
    """Feeds console bytes to the frame parser, keeps the raw log, and enforces one deadline."""

    def __init__(self, log_path: Path, timeout: float, what: str):
        self.parser = FrameParser()
        self.log = open(log_path, "wb")
        self.raw = bytearray()
        self.started = time.monotonic()
        self.deadline = self.started + timeout
        self.timeout = timeout
        self.what = what

    def feed(self, data: bytes) -> None:
        if data:
            self.raw += data
            self.log.write(data)
            self.log.flush()
            self.parser.feed(data)

    def pump(self, fd: int, evidence: Path, diagnose: Callable[[], str] = lambda: "",
             check_alive: Callable[[], None] | None = None) -> bool:
        """Read console bytes from ``fd`` until the terminal record, end of stream or the deadline.

        Returns True when the stream ended (EOF).  On expiry raises the timeout error, with
        ``diagnose()`` (e.g. a register dump) in its message; ``check_alive`` may raise first."""
        console = pexpect.fdpexpect.fdspawn(fd, timeout=None)
        while not self.parser.ended:
            if self.expired():
                raise self.timeout_error(evidence, diagnose())
            if check_alive is not None:
                check_alive()
            try:
                self.feed(console.read_nonblocking(65536, timeout=min(self.remaining(), 0.5)))
            except pexpect.TIMEOUT:
                continue
            except pexpect.EOF:
                return True
        return False

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
        damage = self.parser.errors
        msg = (f"{self.what}: no terminal record within {self.timeout:.1f} s; last records:\n    {seen}"
               + (f"\n  record stream damage: {damage[0]}" + (f" (+{len(damage) - 1} more)" if len(damage) > 1 else "")
                  if damage else "")
               + (f"\n  last console text: {noise[-300:]}" if noise else "")
               + (f"\n  {extra}" if extra else "") + f"\n  evidence: {evidence}")
        return RunTimeout(msg, evidence=str(evidence))

    def check(self, evidence: Path) -> None:
        """Raise RecordStreamError unless the stream is complete and undamaged."""
        try:
            self.parser.check_complete()
        except FrameError as e:
            raise RecordStreamError(f"{self.what}: record stream broken: {e}; evidence: {evidence}",
                                    evidence=str(evidence)) from None


def write_records(evidence: Path, records: list[Record]) -> None:
    (evidence / "records.txt").write_text("".join(f"{describe(r)}\n" for r in records))
