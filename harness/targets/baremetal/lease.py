"""Leases: one holder per host at a time, covering power, console and boot.

``Lease`` is the one interface every backend serves.  ``FileLease`` is the embedded default for a
single site: an flock()ed file per host in a shared directory, holding who has it.  The kernel
drops an flock when its holder dies, so a crashed run never leaves a host locked.
``LabgridLease`` (labgrid.py) reserves and acquires a place from a labgrid coordinator instead,
and the place's exported resources then serve as the host's power, console and SSH address.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from ..config import Field, duration, safe_component
from .common import HostError

log = logging.getLogger("vtx.lease")


class LeaseNotObtained(HostError):
    def __init__(self, message: str):
        super().__init__(message, stage="lease")


class Lease(ABC):
    """Exclusive use of one host."""

    # Target sections the leased thing may provide instead of the YAML ("power", "console",
    # "ssh"): such a section may then be left out of the target file.
    SUPPLIES: frozenset[str] = frozenset()

    def __init__(self, host: str, cfg: dict[str, Any], label: str):
        self.host, self.cfg, self.label = host, cfg, label

    @classmethod
    def check_config(cls, cfg: dict[str, Any], where: str) -> None:
        """Rules across this backend's keys (``where`` ends in "baremetal.lease.")."""

    def attach(self, target: Any) -> Any:
        """The target to run while the lease is held: ``target`` itself, or (a lab coordinator) a
        copy wired to what was leased.  Called after ``acquire``; the caller releases on error."""
        return target

    def check(self) -> None:
        """Raise HostError (stage lease) if the lease was lost while held; the run then ends with
        an error, not a verdict.  A lock file cannot be taken away, so the default does nothing."""

    @abstractmethod
    def acquire(self, holder: str) -> None:
        """Obtain the host within the configured time, or raise LeaseNotObtained."""

    @abstractmethod
    def release(self) -> None:
        """Give the host back (idempotent)."""

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class FileLease(Lease):
    SCHEMA = {
        "backend": Field(str, default="file", choices=("file",)),
        "directory": Field(str, default="/var/lock/vtx", doc="shared directory of per-host lock files"),
        "timeout_s": duration(600.0, "how long to wait for another holder"),
    }

    def __init__(self, host: str, cfg: dict[str, Any], label: str):
        super().__init__(host, cfg, label)
        # The host name is a checked path component, so the lock file stays in its directory.
        self.path = Path(os.path.expanduser(cfg["directory"])) / f"{safe_component(host, label + ': host')}.lock"
        self.fd: int | None = None

    def acquire(self, holder: str) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise LeaseNotObtained(f"{self.label}: lease: cannot open {self.path}: {e.strerror}") from None
        deadline = time.monotonic() + self.cfg["timeout_s"]
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited:
                    waited = True
                    log.info("%s: waiting up to %.1f s for host %s, held by %s", self.label,
                             self.cfg["timeout_s"], self.host, _read_holder(fd))
                if time.monotonic() >= deadline:
                    who = _read_holder(fd)
                    os.close(fd)
                    raise LeaseNotObtained(
                        f"{self.label}: lease: host {self.host} is held by {who}; not obtained within "
                        f"{self.cfg['timeout_s']:.1f} s ({self.path})") from None
                time.sleep(0.1)
        if waited:
            log.info("%s: host %s leased", self.label, self.host)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"holder": holder, "pid": os.getpid(), "node": socket.gethostname(),
                                  "since": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode() + b"\n", 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
                self.fd = None


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return "another process"
    if not info:
        return "another process"
    return f"{info.get('holder', '?')} (pid {info.get('pid', '?')} on {info.get('node', '?')} since {info.get('since', '?')})"


def pooled(config: Any) -> bool:
    """Whether a target's tests may spread over xdist workers: its lease hands out one of several
    hosts (a labgrid tag filter), so each worker holds a different one.  A single host (a lock
    file, a named place) keeps its tests on one worker."""
    lease = config.section.get("lease") if config.kind == "baremetal" and isinstance(config.section, dict) else None
    return isinstance(lease, dict) and lease.get("backend") == "labgrid" and lease.get("tags") is not None


def _backends() -> dict[str, type[Lease]]:
    from .labgrid import LabgridLease      # imports labgrid itself only when a lease is taken
    return {"file": FileLease, "labgrid": LabgridLease}


BACKENDS: dict[str, type[Lease]] = _backends()
