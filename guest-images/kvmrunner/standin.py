"""Boot the KVM-runner stand-in (build.py's disk) in Bochs and talk to it.

Bochs 2.7 runs headless (``display_library: term`` on a pty of its own, never rfb) under
``nice``, with:
  * COM1 in ``term`` mode on a second pty whose master end this process holds: Linux's console
    (ttyS0) and its root shell are read and written there, and a QEMU started with ``-serial
    stdio`` in that shell writes the payload's records through it;
  * an e1000 on Bochs' slirp, ``restricted`` (the guest reaches nothing outside), with one host
    forward ``tcp:127.0.0.1:<free port>-:22`` to the stand-in's sshd — loopback only, and only
    while a stand-in runs.

``StandIn`` is a context manager: Bochs (and so everything inside it) ends and the private runtime
directory goes on every way out of the block, including timeouts and Ctrl-C; the process is also
started with PR_SET_PDEATHSIG (harness.targets.proc), so it dies with the harness.
"""

from __future__ import annotations

import os
import re
import select
import shlex
import signal
import socket
import threading
import time
import tty
from pathlib import Path
from typing import Any

import pexpect

from harness.targets import load, open_target, proc
from harness.targets.base import Target, remove_runtime_dir, runtime_dir
from harness.targets.config import from_dict
from harness.targets.qemu import QemuTarget

READY = b"kvmrunner: ready"
NESTED_TARGET = "qemu-kvm-nested"  # whose QEMU settings the stand-in runs
PROMPT_MARK = "vtx-done"          # the shell prints "<mark> <n> <status>" after each command


class StandInError(RuntimeError):
    """Booting or driving the stand-in failed; the message names the stage and the console tail."""


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StandIn:
    """One Bochs running the stand-in; see the module docstring."""

    def __init__(self, disk: Path, evidence: Path, *, memory_mb: int = 768, ips: int = 50_000_000,
                 cpu_model: str = "corei7_skylake_x", nice: int = 10, ssh_port: int | None = None):
        self.disk, self.evidence = disk, evidence
        self.memory_mb, self.ips, self.cpu_model, self.nice = memory_mb, ips, cpu_model, nice
        self.ssh_port = ssh_port or free_loopback_port()
        self.console = bytearray()            # everything COM1 sent so far
        self.arrivals: list[tuple[int, float]] = []   # (console length, seconds since start)
        self.events: dict[str, float] = {}    # stage -> seconds since Bochs started
        self._cond = threading.Condition()
        self._child: pexpect.spawn | None = None
        self._rt: Path | None = None
        self._serial_fd: int | None = None
        self._slave_fd: int | None = None
        self._stop = threading.Event()
        self._pump: threading.Thread | None = None
        self._seq = 0
        self.t0 = 0.0

    # -- life cycle -------------------------------------------------------------------------------
    def bochsrc(self, rt: Path, serial_dev: str) -> str:
        """Bochs' configuration: the harness' Bochs settings plus the disk, COM1 pty and e1000."""
        return "\n".join([
            f"megs: {self.memory_mb}",
            "romimage: file=/usr/share/bochs/BIOS-bochs-latest",
            "vgaromimage: file=/usr/share/vgabios/vgabios.bin",
            f"cpu: model={self.cpu_model}, ips={self.ips}",
            "clock: sync=none, time0=1",
            "display_library: term",
            "sound: driver=dummy",
            "speaker: enabled=0",
            f"ata0-master: type=disk, path={rt / 'disk.img'}, mode=flat",
            "boot: disk",
            f"com1: enabled=1, mode=term, dev={serial_dev}",
            "pci: enabled=1, chipset=i440fx, slot1=e1000",
            f"e1000: enabled=1, mac=52:54:00:12:34:56, ethmod=slirp, script={rt / 'slirp.conf'}",
            f"log: {self.evidence / 'bochs.log'}",
            "panic: action=fatal",
            "error: action=report",
            "info: action=ignore",
            "debug: action=ignore",
        ]) + "\n"

    def start(self) -> "StandIn":
        self.evidence.mkdir(parents=True, exist_ok=True)
        self._rt = rt = runtime_dir("kvmrunner")
        # Bochs locks '<disk>.lock': a private name per run, so a killed Bochs leaves no stale lock.
        (rt / "disk.img").symlink_to(self.disk)
        (rt / "slirp.conf").write_text(
            "# slirp config\n"      # Bochs requires this first line
            "restricted = 1\n"      # the guest reaches only slirp's own services; forwards still work
            f"hostfwd = tcp:127.0.0.1:{self.ssh_port}-:22\n")
        master, slave = os.openpty()
        tty.setraw(slave)
        self._serial_fd, self._slave_fd = master, slave      # the slave stays open: no hangup
        rc = self.bochsrc(rt, os.ttyname(slave))
        (rt / "bochsrc").write_text(rc)
        (self.evidence / "bochsrc").write_text(rc)
        (rt / "cmds").write_text("c\nq\n")     # the debugger: continue, then quit
        argv = ["nice", "-n", str(self.nice), "bochs-bin", "-q", "-f", str(rt / "bochsrc"),
                "-rc", str(rt / "cmds")]
        (self.evidence / "cmdline.sh").write_text(f"cd {shlex.quote(str(rt))} && TERM=vt100 {shlex.join(argv)}\n")
        self.t0 = time.monotonic()
        self._child = pexpect.spawn(argv[0], argv[1:], cwd=str(rt), env={**os.environ, "TERM": "vt100"},
                                    echo=False, dimensions=(25, 80), timeout=None,
                                    preexec_fn=proc.dies_with_parent())
        proc.adopt(self._child.pid)
        self._pump = threading.Thread(target=self._pump_loop, name="kvmrunner-console", daemon=True)
        self._pump.start()
        return self

    def stop(self) -> None:
        """End Bochs (SIGKILL: it holds nothing worth a graceful stop) and remove the runtime dir."""
        self._stop.set()
        child, self._child = self._child, None
        if child is not None:
            pid = child.pid
            try:
                if child.isalive():
                    os.kill(pid, signal.SIGKILL)
                child.wait()
            except Exception:
                pass
            finally:
                try:
                    child.close(force=True)
                except Exception:
                    pass
                proc.end(pid, grace=0.5)        # unregisters it; a no-op once reaped
        if self._pump is not None:
            self._pump.join(timeout=2)
        for fd in (self._serial_fd, self._slave_fd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._serial_fd = self._slave_fd = None
        if self._rt is not None:
            remove_runtime_dir(self._rt)
            self._rt = None

    def __enter__(self) -> "StandIn":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child is not None else None

    # -- console ----------------------------------------------------------------------------------
    def _pump_loop(self) -> None:
        """Drain Bochs' display (so it never blocks on its pty) and collect COM1's output."""
        display = open(self.evidence / "display.log", "wb")
        serial_log = open(self.evidence / "serial.log", "wb", buffering=0)
        child = self._child
        try:
            while not self._stop.is_set() and child is not None:
                fds = [child.child_fd, self._serial_fd]
                try:
                    ready, _, _ = select.select(fds, [], [], 0.2)
                except (OSError, ValueError):
                    break
                for fd in ready:
                    try:
                        data = os.read(fd, 65536)
                    except OSError:
                        data = b""
                    if fd == self._serial_fd:
                        serial_log.write(data)
                        with self._cond:
                            self.console += data
                            self.arrivals.append((len(self.console), time.monotonic() - self.t0))
                            self._cond.notify_all()
                    elif not data:             # Bochs has gone
                        with self._cond:
                            self._stop.set()
                            self._cond.notify_all()
                        return
                    elif display.tell() < 1 << 20:
                        display.write(data)
        finally:
            display.close()
            serial_log.close()

    def arrived(self, offset: int) -> float:
        """Seconds from Bochs' start until the console byte at ``offset`` had arrived."""
        return next(t for end, t in self.arrivals if end > offset)

    def tail(self, n: int = 600) -> str:
        return bytes(self.console[-n:]).decode(errors="replace")

    def wait_for(self, pattern: bytes, timeout: float, what: str, start: int = 0) -> re.Match:
        """Wait (bounded) until ``pattern`` (a regex) appears in the console after ``start``."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                m = rx.search(self.console, start)
                if m:
                    return m
                if self._stop.is_set():
                    raise StandInError(f"kvmrunner: Bochs ended while waiting for {what}; console tail:\n{self.tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StandInError(f"kvmrunner: no {what} within {timeout:.0f} s; console tail:\n{self.tail()}")
                self._cond.wait(min(left, 1.0))

    def write(self, data: bytes) -> None:
        assert self._serial_fd is not None
        os.write(self._serial_fd, data)

    def boot(self, timeout: float = 900) -> float:
        """Wait for /init's ready line; return the seconds since Bochs started."""
        self.wait_for(re.escape(READY), timeout, "'kvmrunner: ready' line (boot)")
        self.events["ready"] = time.monotonic() - self.t0
        # The shell: no echo, no prompt noise, so command output can be cut out exactly.
        self.shell("stty -echo; PS1=''", timeout=60)
        return self.events["ready"]

    def shell(self, command: str, timeout: float = 120) -> tuple[int, str]:
        """Run ``command`` in the console's root shell; return (status, output)."""
        self._seq += 1
        n = self._seq
        start = len(self.console)
        # The mark is printed by printf from pieces, so the echoed command line never matches it.
        # One line: the shell has read all of it before the command runs, so a command that reads
        # the console itself (QEMU's -serial stdio) cannot swallow the mark's printf.
        self.write(f"{command}; printf '%s %d %d\\n' '{PROMPT_MARK[:4]}''{PROMPT_MARK[4:]}' {n} $?\n".encode())
        m = self.wait_for(re.escape(PROMPT_MARK.encode()) + rb" %d (\d+)\r?\n" % n, timeout,
                          f"the end of console command {command[:60]!r}", start)
        out = bytes(self.console[start:m.start()]).decode(errors="replace")
        return int(m.group(1)), out

    # -- what runs inside ------------------------------------------------------------------------
    def known_hosts(self, host_key_pub: str, path: Path) -> Path:
        """A known_hosts file that pins the image's host key for this stand-in's forwarded port."""
        path.write_text(f"[127.0.0.1]:{self.ssh_port} {host_key_pub}\n")
        return path

    def remote_target(self, client_key: Path, known_hosts: Path, *, base: str = NESTED_TARGET,
                      timeout_s: float = 300) -> Target:
        """The ``remote-qemu`` target that runs ``base``'s QEMU settings inside this stand-in."""
        section = _given(load(base).section)
        section["ssh"] = {"host": "127.0.0.1", "port": self.ssh_port, "user": "root",
                          "key_file": str(client_key), "use_agent": False,
                          "known_hosts": str(known_hosts), "connect_timeout_s": 120.0}
        return open_target(from_dict({"name": "kvmrunner-standin", "kind": "remote-qemu",
                                      "timeout_s": timeout_s, "remote_qemu": section},
                                     f"kvmrunner stand-in ({base})"))


def _given(value: Any) -> Any:
    """A validated section as YAML would give it again: keys whose value is None (defaults that
    mean "absent") are left out, so the mapping validates a second time."""
    if isinstance(value, dict):
        return {k: _given(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_given(v) for v in value]
    return value


def console_qemu_argv(elf: str, base: str = NESTED_TARGET) -> list[str]:
    """``base``'s QEMU argv for the stand-in's console: the harness' QMP and serial sockets become
    ``-serial stdio`` (and without QMP nobody would resume a ``-S`` start, so that goes too)."""
    target = open_target(base)
    assert isinstance(target, QemuTarget), f"{base} is not a QEMU target"

    class _Elf:                   # argv() needs only the image's ELF path
        pass
    image = _Elf()
    image.elf = Path(elf)         # type: ignore[attr-defined]
    argv = target.argv(image, Path("/tmp"), Path("/tmp"))   # type: ignore[arg-type]
    harness_socket = ("socket,id=qmp,", "socket,id=ser0,", "chardev=qmp,", "chardev:ser0")
    out: list[str] = []
    for i, arg in enumerate(argv):
        if arg == "-S" or arg.startswith(harness_socket):
            continue
        if arg in ("-chardev", "-mon", "-serial") and i + 1 < len(argv) and argv[i + 1].startswith(harness_socket):
            continue
        out.append(arg)
    return out + ["-serial", "stdio"]
