"""The KVM-runner stand-in as a target kind: Linux with ``kvm_intel nested=1`` booted in Bochs
(which models VMX), running each scenario under QEMU/KVM with a QEMU target's settings
(``qemu-kvm-nested`` by default), so that to the harness it looks like an Intel KVM runner.

One stand-in per process (per pytest session, or per xdist worker), booted lazily by the first
run and reused by every later run of any ``kvmrunner`` target with the same stand-in settings.
Each run goes through the ``remote-qemu`` kind over SSH (slirp forwards a loopback port to the
stand-in's sshd, host key pinned): QMP and the serial port are FIFO chardevs bridged over that
connection, so register dumps, QMP events and QEMU trace files work as on a real runner.

Bochs 2.7 runs headless (``display_library: term`` on a pty of its own, never rfb) under
``nice``, with:
  * COM1 in ``term`` mode on a second pty whose master end this process holds: Linux's console
    (ttyS0) and its root shell are read and written there;
  * an e1000 on Bochs' slirp, ``restricted`` (the guest reaches nothing outside), with one host
    forward ``tcp:127.0.0.1:<free port>-:22`` to the stand-in's sshd: loopback only, and only
    while a stand-in runs.

Bochs (and so everything inside it) ends, and its private runtime directory goes: at process exit
(atexit, after Ctrl-C and SIGTERM too: harness.targets.proc unwinds them), when a boot fails or
times out, when a run finds Bochs gone, and by ``close()``.  A SIGKILLed harness takes Bochs along
twice over: Bochs is started with PR_SET_PDEATHSIG, and it quits on the SIGHUP of its display pty,
whose master end dies with the harness.  A boot has phases, each named when it
fails: the kernel (up to /init's ``kvmrunner: init`` line), modprobe (``kvm loaded``: kvm_intel
must show nested=Y and /dev/kvm, else stage ``standin-modprobe``, not retried in this process:
a CPU without VMX stays so), then network and sshd (``kvmrunner: ready``).  A run's QEMU is ended
inside the stand-in by the remote-qemu path on every exit of a run (timeout, crash, Ctrl-C).

The stand-in's disk is built by the recipe in the checkout's ``guest-images/kvmrunner`` (Debian
packages, cached by content under ~/.cache/vtx).  That directory is not part of the installed
package: without a checkout, ``kvmrunner.recipe`` must name it, or the kind reports itself
unavailable and says so.
"""

from __future__ import annotations

import atexit
import importlib.util
import logging
import os
import re
import select
import shlex
import shutil
import signal
import socket
import sys
import threading
import time
import tty
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, overload

import pexpect

from ..errors import ConfigError, InfraError
from ..payload.image import Image
from . import proc
from .base import RawRun, Target, remove_runtime_dir, runtime_dir
from .config import Field, TargetConfig, duration
from .qemu import QemuTarget
from .quoting import Unquotable, bochs_line, bochs_value

log = logging.getLogger("vtx.kvmrunner")

READY = b"kvmrunner: ready"
# /init's lines (guest-images/kvmrunner/init.sh) that mark the phases of a boot.
INIT_LINE = b"kvmrunner: init at"              # the kernel is up; insmod irqbypass, kvm, kvm-intel next
KVM_LINE = rb"kvmrunner: kvm loaded at [^\r\n]*\r?\n"   # modprobe done: kvm_intel's parameters, /dev/kvm
PROMPT_MARK = "vtx-done"          # the shell prints "<mark> <n> <status>" after each command
DROPPED_LINE = b"^C"               # what busybox ash prints for a line it drops unrun (see shell())
DISCARDED_RESENDS = 2             # times shell() sends a line again that the shell dropped unrun
STANDIN_BACKSTOP_S = 24 * 3600       # QEMU's `timeout` inside the stand-in (see _remote_section)
BOCHS_BIOS = "/usr/share/bochs/BIOS-bochs-latest"
VGA_BIOS = "/usr/share/vgabios/vgabios.bin"
# The checkout's recipe (absent from an installed wheel): <repo>/guest-images/kvmrunner.
CHECKOUT_RECIPE = Path(__file__).resolve().parents[2] / "guest-images" / "kvmrunner"
# A boot that failed is not retried more than this many times in one process: each costs minutes.
MAX_BOOTS = 2
# Stages named in InfraErrors (pytest_infra reports them as "infrastructure error at <stage>").
STAGE_BUILD, STAGE_BOOT, STAGE_LOST = "standin-build", "standin-boot", "standin-lost"
STAGE_MODPROBE = "standin-modprobe"


class StandInError(InfraError):
    """Booting or driving the stand-in failed; the message names the stage and the console tail."""

    def __init__(self, message: str, stage: str = STAGE_BOOT):
        super().__init__(message, stage=stage)


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StandIn:
    """One Bochs running the stand-in's disk; see the module docstring."""

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
        self._shell_lock = threading.Lock()
        self.t0 = 0.0

    # -- life cycle -------------------------------------------------------------------------------
    def bochsrc(self, rt: Path, serial_dev: str) -> str:
        """Bochs' configuration: the harness' Bochs settings plus the disk, COM1 pty and e1000.
        Every value goes through quoting.bochs_value (an evidence path may hold blanks or commas)."""
        try:
            return "\n".join([
                f"megs: {bochs_value(self.memory_mb)}",
                bochs_line("romimage", {"file": BOCHS_BIOS}),
                bochs_line("vgaromimage", {"file": VGA_BIOS}),
                bochs_line("cpu", {"model": self.cpu_model, "ips": self.ips}),
                "clock: sync=none, time0=1",
                "display_library: term",
                "sound: driver=dummy",
                "speaker: enabled=0",
                bochs_line("ata0-master", {"type": "disk", "path": rt / "disk.img", "mode": "flat"}),
                "boot: disk",
                bochs_line("com1", {"enabled": 1, "mode": "term", "dev": serial_dev}),
                "pci: enabled=1, chipset=i440fx, slot1=e1000",
                bochs_line("e1000", {"enabled": 1, "mac": "52:54:00:12:34:56", "ethmod": "slirp",
                                     "script": rt / "slirp.conf"}),
                f"log: {bochs_value(self.evidence / 'bochs.log')}",
                "panic: action=fatal",
                "error: action=report",
                "info: action=ignore",
                "debug: action=ignore",
            ]) + "\n"
        except Unquotable as e:
            raise StandInError(f"kvmrunner: bochsrc: {e}") from None

    def start(self) -> "StandIn":
        self.evidence.mkdir(parents=True, exist_ok=True)
        self._rt = rt = runtime_dir("kvmrunner")
        try:
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
            (self.evidence / "cmdline.sh").write_text(
                f"cd {shlex.quote(str(rt))} && TERM=vt100 {shlex.join(argv)}\n")
            self.t0 = time.monotonic()
            self._child = pexpect.spawn(argv[0], argv[1:], cwd=str(rt), env={**os.environ, "TERM": "vt100"},
                                        echo=False, dimensions=(25, 80), timeout=None,
                                        preexec_fn=proc.dies_with_parent())
            proc.adopt(self._child.pid)
            (self.evidence / "bochs.pid").write_text(f"{self._child.pid}\n")
            self._pump = threading.Thread(target=self._pump_loop, name="kvmrunner-console", daemon=True)
            self._pump.start()
        except BaseException:
            self.stop()
            raise
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
        if self._pump is not None and self._pump is not threading.current_thread():
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

    @property
    def runtime(self) -> Path | None:
        return self._rt

    @property
    def alive(self) -> bool:
        """Bochs is running and its console is open."""
        child = self._child
        return child is not None and not self._stop.is_set() and child.isalive()

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
                except (OSError, ValueError, TypeError):
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
                        return
                    elif display.tell() < 1 << 20:
                        display.write(data)
        finally:
            with self._cond:
                self._stop.set()
                self._cond.notify_all()
            display.close()
            serial_log.close()

    def arrived(self, offset: int) -> float:
        """Seconds from Bochs' start until the console byte at ``offset`` had arrived."""
        return next(t for end, t in self.arrivals if end > offset)

    def tail(self, n: int = 600) -> str:
        return bytes(self.console[-n:]).decode(errors="replace")

    @overload
    def wait_for(self, pattern: bytes, timeout: float, what: str, start: int = 0,
                 stage: str = STAGE_BOOT) -> re.Match: ...
    @overload
    def wait_for(self, pattern: bytes, timeout: float, what: str, start: int = 0,
                 stage: str = STAGE_BOOT, or_first: bytes | None = None) -> re.Match | None: ...

    def wait_for(self, pattern: bytes, timeout: float, what: str, start: int = 0,
                 stage: str = STAGE_BOOT, or_first: bytes | None = None) -> re.Match | None:
        """Wait (bounded) until ``pattern`` (a regex) appears in the console after ``start``; or,
        with ``or_first``, until the console after ``start`` begins with those bytes (None)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                m = rx.search(self.console, start)
                if m:
                    return m
                if or_first is not None and self.console.startswith(or_first, start):
                    return None
                if self._stop.is_set():
                    raise StandInError(f"kvmrunner: Bochs ended while waiting for {what}; console tail:\n"
                                       f"{self.tail()}", stage)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StandInError(f"kvmrunner: no {what} within {timeout:.0f} s; console tail:\n"
                                       f"{self.tail()}", stage)
                self._cond.wait(min(left, 1.0))

    def write(self, data: bytes) -> None:
        if self._serial_fd is None:
            raise StandInError("kvmrunner: the console is closed (the stand-in was stopped)", STAGE_LOST)
        os.write(self._serial_fd, data)

    def boot(self, timeout: float = 900) -> float:
        """Wait (one bound for the whole boot) for /init's lines: the kernel's ``kvmrunner: init``,
        the modprobe step's ``kvm loaded`` (kvm_intel must report nested=Y and /dev/kvm, else a
        StandInError at stage standin-modprobe ends the boot at once), then ``kvmrunner: ready``.
        Return the seconds since Bochs started; each phase's time goes into ``events``."""
        deadline = time.monotonic() + timeout

        def left() -> float:
            return max(deadline - time.monotonic(), 0.0)

        bound = f"boot bound {timeout:.0f} s"
        at = self.wait_for(re.escape(INIT_LINE), left(), f"'kvmrunner: init' line (kernel boot; {bound})").start()
        self.events["init"] = self.arrived(at)
        m = self.wait_for(KVM_LINE, left(), f"'kvmrunner: kvm loaded' line (modprobe kvm, kvm_intel nested=1; "
                          f"{bound})", at, stage=STAGE_MODPROBE)
        self.events["kvm"] = self.arrived(m.start())
        self.check_modprobe(m.group(0).decode(errors="replace"))
        self.wait_for(re.escape(READY), left(), f"'kvmrunner: ready' line (network, sshd; {bound})", m.end())
        self.events["ready"] = time.monotonic() - self.t0
        at = self.console.find(b"kvmrunner: sshd started at")
        if at >= 0:
            self.events["sshd"] = self.arrived(at)
        # The shell: no echo, no prompt noise, so command output can be cut out exactly.
        self.shell("stty -echo; PS1=''", timeout=60)
        return self.events["ready"]

    def check_modprobe(self, line: str) -> None:
        """The ``kvm loaded`` line must show what a KVM runner has: nested VMX and /dev/kvm."""
        values = dict(re.findall(r"(\w+)=(\S*)", line))
        if values.get("nested") != "Y" or values.get("dev_kvm") != "yes":
            failed = [ln.strip() for ln in bytes(self.console).decode(errors="replace").splitlines()
                      if "insmod" in ln or "kvm" in ln.lower()][-8:]
            raise StandInError(f"kvmrunner: modprobe: kvm_intel did not load with nested VMX (nested="
                               f"{values.get('nested') or '(absent)'}, dev_kvm={values.get('dev_kvm')}); "
                               f"the console says:\n" + "\n".join(failed), STAGE_MODPROBE)

    def shell(self, command: str, timeout: float = 120) -> tuple[int, str]:
        """Run ``command`` in the console's root shell; return (status, output)."""
        with self._shell_lock:
            what = f"the end of console command {command[:60]!r}"
            deadline = time.monotonic() + timeout
            for _ in range(1 + DISCARDED_RESENDS):
                self._seq += 1
                n = self._seq
                start = len(self.console)
                # The mark is printed by printf from pieces, so the echoed command line never
                # matches it.  One line: the shell has read all of it before the command runs, so a
                # command that reads the console itself (QEMU's -serial stdio) cannot swallow the
                # mark's printf.
                self.write(f"{command}; printf '%s %d %d\\n' '{PROMPT_MARK[:4]}''{PROMPT_MARK[4:]}' {n} $?\n".encode())
                m = self.wait_for(re.escape(PROMPT_MARK.encode()) + rb" %d (\d+)\r?\n" % n,
                                  max(deadline - time.monotonic(), 0.0), what, start, stage=STAGE_LOST,
                                  or_first=DROPPED_LINE)
                if m is not None:
                    return int(m.group(1)), bytes(self.console[start:m.start()]).decode(errors="replace")
                # Busybox ash answers a line whose first byte is NUL with "^C" and drops the whole
                # line unrun (its fallback reader, used with echo off, sees an empty string).  Seen
                # once in CI: a NUL arrived on Bochs' COM1 just before a command.  Nothing ran, so
                # the same line goes again.
                log.warning("kvmrunner: the stand-in's shell dropped console command %d (it printed ^C: "
                            "a NUL arrived first); sending it again", n)
            raise StandInError(f"kvmrunner: the stand-in's shell dropped {what} {1 + DISCARDED_RESENDS} "
                               f"times (^C); console tail:\n{self.tail()}", STAGE_LOST)

    # -- what runs inside ------------------------------------------------------------------------
    def known_hosts(self, host_key_pub: str, path: Path) -> Path:
        """A known_hosts file that pins the image's host key for this stand-in's forwarded port."""
        path.write_text(f"[127.0.0.1]:{self.ssh_port} {host_key_pub}\n")
        return path

    def remote_target(self, client_key: Path, known_hosts: Path, config: TargetConfig | None = None) -> Target:
        """The remote-qemu target that reaches QEMU/KVM inside this stand-in, with the QEMU settings
        of ``config`` (a kvmrunner target; default: the shipped ``kvmrunner-standin``)."""
        from . import load, open_target
        from .config import from_dict

        config = config or load("kvmrunner-standin")
        section = KvmRunnerTarget._remote_section(config, self.ssh_section(client_key, known_hosts))
        return open_target(from_dict({"name": config.name, "kind": "remote-qemu", "timeout_s": config.timeout_s,
                                      "remote_qemu": section}, f"{config.source} (QEMU/KVM in the stand-in)"))

    def ssh_section(self, client_key: Path, known_hosts: Path) -> dict[str, Any]:
        """The ``ssh`` section of a remote-qemu target that reaches this stand-in."""
        return {"host": "127.0.0.1", "port": self.ssh_port, "user": "root", "key_file": str(client_key),
                "use_agent": False, "known_hosts": str(known_hosts), "connect_timeout_s": 120.0}


def given(value: Any) -> Any:
    """A validated section as YAML would give it again: keys whose value is None (defaults that
    mean "absent") are left out, so the mapping validates a second time."""
    if isinstance(value, dict):
        return {k: given(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [given(v) for v in value]
    return value


def console_qemu_argv(elf: str, base: str = "qemu-kvm-nested") -> list[str]:
    """``base``'s QEMU argv for the stand-in's console: the harness' QMP and serial sockets become
    ``-serial stdio`` (and without QMP nobody would resume a ``-S`` start, so that goes too)."""
    from . import open_target

    target = open_target(base)
    if not isinstance(target, QemuTarget):
        raise ConfigError(f"{base}: expected a qemu target, got kind {target.config.kind}")

    class _Elf:                   # argv() needs only the image's ELF path
        def __init__(self, path: Path):
            self.elf = path
    argv = target.argv(_Elf(Path(elf)), Path("/tmp"), Path("/tmp"))   # type: ignore[arg-type]
    harness_socket = ("socket,id=qmp,", "socket,id=ser0,", "chardev=qmp,", "chardev:ser0")
    out: list[str] = []
    for i, arg in enumerate(argv):
        if arg == "-S" or arg.startswith(harness_socket):
            continue
        if arg in ("-chardev", "-mon", "-serial") and i + 1 < len(argv) and argv[i + 1].startswith(harness_socket):
            continue
        out.append(arg)
    return out + ["-serial", "stdio"]


# -- the recipe -----------------------------------------------------------------------------------

def load_recipe(directory: Path) -> ModuleType:
    """The stand-in's recipe (``<directory>/build.py``) as a module; loaded once per directory."""
    name = "vtx_kvmrunner_recipe_" + re.sub(r"\W", "_", str(directory.resolve()))
    mod = sys.modules.get(name)
    if mod is None:
        spec = importlib.util.spec_from_file_location(name, directory / "build.py")
        if spec is None or spec.loader is None:
            raise ConfigError(f"{directory / 'build.py'}: not a loadable recipe")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod                   # dataclasses look their module up by name
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            del sys.modules[name]
            raise
    return mod


# -- the target kind ------------------------------------------------------------------------------

# The QEMU settings a kvmrunner section may override (e.g. a variant's iommu or devices): the QEMU
# kind's keys, with no defaults of their own, so only what a file or a variant gives counts.
_QEMU_KEYS = tuple(k for k in QemuTarget.SCHEMA if k != "binary")
_OVERRIDES = {k: replace(QemuTarget.SCHEMA[k], default=None, required=False) for k in _QEMU_KEYS}


class _Session:
    """The process' stand-in for one set of stand-in settings: booted at first use."""

    def __init__(self, key: tuple):
        self.key = key
        self.lock = threading.Lock()
        self.standin: StandIn | None = None
        self.known_hosts: Path | None = None
        self.client_key: Path | None = None
        self.boots = 0
        self.failure: str | None = None       # why the last boot failed (no endless re-boots)
        self.final = False                    # that failure does not fix itself: no further boot
        self.ready_s: float | None = None

    def stop(self) -> None:
        s, self.standin = self.standin, None
        if s is not None:
            s.stop()


_SESSIONS: dict[tuple, _Session] = {}
_SESSIONS_LOCK = threading.Lock()


def stop_all() -> None:
    """End every stand-in of this process (atexit; also for tests and tools)."""
    with _SESSIONS_LOCK:
        sessions = list(_SESSIONS.values())
    for s in sessions:
        s.stop()


atexit.register(stop_all)


# The Bochs that runs the stand-in (its own keys: the section's top level holds QEMU's).
STANDIN_SCHEMA = {
    "cpu_model": Field(str, default="corei7_skylake_x", check=lambda v, w: _bochs_word(v, w),
                       doc="Bochs CPU model (must model VMX with EPT)"),
    "ips": Field(int, default=50_000_000, low=1_000_000, high=(1 << 32) - 1,
                 doc="Bochs' emulated instructions per second"),
    "memory_mb": Field(int, default=768, low=512, high=4096,
                       doc="the stand-in's RAM (QEMU inside needs >= 512: pc.ram)"),
    "nice": Field(int, default=10, low=0, high=19, doc="Bochs' niceness"),
    "boot_timeout_s": duration(1200, "Bochs start to the stand-in's ready line"),
}


class KvmRunnerTarget(Target):
    """See the module docstring."""

    KIND = "kvmrunner"
    SECTION = "kvmrunner"
    IMAGE_FORMAT = "elf"
    EMULATED = True
    # One stand-in per process: tests of this kind belong in one xdist worker (a second worker
    # would boot a second Bochs of 768 MB on a machine with two cores).
    SHARED_INSTANCE = True
    SCHEMA = {
        "base": Field(str, default="qemu-kvm-nested", check=lambda v, w: _target_name(v, w),
                      doc="the qemu target whose QEMU settings run inside the stand-in"),
        **_OVERRIDES,
        "recipe": Field((str, type(None)), default=None,
                        doc="directory of the stand-in's recipe (build.py); default: the checkout's "
                            "guest-images/kvmrunner"),
        "standin": Field(dict, default={}, schema=STANDIN_SCHEMA, doc="the Bochs that runs the stand-in"),
    }

    def __init__(self, config: TargetConfig):
        super().__init__(config)
        self.k = config.section
        # An absent 'standin' mapping is not validated, so its defaults are filled in here.
        self.b = {**{key: f.default for key, f in STANDIN_SCHEMA.items()}, **config.section["standin"]}
        type(self).check_config(config)

    # -- configuration ---------------------------------------------------------------------------
    @classmethod
    def check_config(cls, config: TargetConfig) -> None:
        cls._remote_section(config)          # the merged QEMU settings validate as a remote-qemu target

    @classmethod
    def _remote_section(cls, config: TargetConfig, ssh: dict[str, Any] | None = None) -> dict[str, Any]:
        """The remote-qemu section: ``base``'s QEMU settings, this section's overrides on top (an
        ``iommu`` mapping is merged key by key, as variants do), and ``ssh``; validated."""
        from . import load
        from .config import from_dict

        k = config.section
        where = f"{config.source}: {cls.SECTION}.base"
        base = load(k["base"], where)
        if base.kind != "qemu":
            raise ConfigError(f"{where}: expected a qemu target, got {base.name!r} of kind {base.kind}")
        section = given(base.section)
        raw = config.raw.get(cls.SECTION, {}) if isinstance(config.raw, dict) else {}
        for key in _QEMU_KEYS:
            if key not in raw:
                continue
            value = k[key]
            if key == "iommu" and isinstance(value, dict) and isinstance(section.get("iommu"), dict):
                section["iommu"] = {**section["iommu"], **given(value)}
            elif value is None:
                section.pop(key, None)
            else:
                section[key] = given(value)
        section["accel"] = "kvm"                 # what the stand-in stands in for
        # The stand-in's clock is no wall clock: while its CPU idles (a payload that halts), Bochs
        # skips ahead and its `sleep 2` takes 0.3 s, so a backstop of the run's timeout + 60 s on
        # that clock ended a halted QEMU before the harness's own timeout.  The stand-in needs none
        # on its clock: it dies with the harness (PR_SET_PDEATHSIG), and the launcher ends QEMU
        # when the harness closes the connection.
        section["backstop_s"] = STANDIN_BACKSTOP_S
        section.pop("require_kvm_vmx", None)     # a local check; the probe shows VMX inside
        # Before a stand-in runs, a placeholder of the same shape checks the rest of the section.
        section["ssh"] = ssh or {"host": "127.0.0.1", "port": 22, "user": "root", "use_agent": False,
                                 "known_hosts": "/dev/null"}
        from_dict({"name": config.name, "kind": "remote-qemu", "timeout_s": config.timeout_s,
                   "remote_qemu": section}, f"{config.source} ({cls.SECTION} with {base.name}'s QEMU settings)")
        return section

    def recipe_dir(self) -> Path:
        given_dir = self.k["recipe"]
        if given_dir is None:
            return CHECKOUT_RECIPE
        path = Path(given_dir).expanduser()
        if not path.is_absolute():            # relative to the target file, as pytest's ini paths
            path = Path(self.config.source).resolve().parent / path
        return path

    def build_image(self, progress: Callable[[str], None] = lambda m: None) -> Any:
        """The recipe's image for this target's Bochs (built now, or the cached one): the guest
        kernel is told Bochs' TSC rate, one tick per instruction, ``ips`` per emulated second."""
        return load_recipe(self.recipe_dir()).build(log=progress, tsc_khz=self.b["ips"] // 1000)

    def unavailable(self) -> str | None:
        """Why the stand-in cannot run here: Bochs, its BIOS images, the recipe and its inputs."""
        if shutil.which("bochs-bin") is None:
            return "bochs-bin is not installed (Debian: apt-get install bochs bochsbios vgabios)"
        for path in (BOCHS_BIOS, VGA_BIOS):
            if not os.path.exists(path):
                return f"{path} is missing (Debian packages bochsbios, vgabios)"
        recipe = self.recipe_dir()
        if not (recipe / "build.py").is_file():
            return (f"needs the stand-in's recipe {recipe}/build.py: it lives in the project's checkout "
                    f"(guest-images/kvmrunner, not in the installed package); set {self.SECTION}.recipe")
        try:
            missing = load_recipe(recipe).missing_inputs()
        except Exception as e:              # a broken recipe is reported, not raised while listing
            return f"recipe {recipe}/build.py cannot be loaded: {type(e).__name__}: {e}"
        if missing:
            return "the stand-in's build inputs are missing: " + "; ".join(missing)
        return None

    # -- the stand-in ----------------------------------------------------------------------------
    def _session(self) -> _Session:
        b = self.b
        key = (str(self.recipe_dir()), b["cpu_model"], b["ips"], b["memory_mb"], b["nice"])
        with _SESSIONS_LOCK:
            s = _SESSIONS.get(key)
            if s is None:
                s = _SESSIONS[key] = _Session(key)
        return s

    def standin(self, evidence_hint: Path) -> _Session:
        """The process' stand-in, booted now if it is not up (evidence beside ``evidence_hint``)."""
        s = self._session()
        with s.lock:
            if s.standin is not None and s.standin.alive:
                return s
            if s.standin is not None:            # Bochs went away since the last run
                s.stop()
            if s.failure is not None and (s.final or s.boots >= MAX_BOOTS):
                raise StandInError(f"target {self.name}: the stand-in failed {s.boots} time(s) in this "
                                   f"process{' (not retried: it would fail again)' if s.final else ''}; "
                                   f"last: {s.failure}")
            s.boots += 1
            try:
                image = self.build_image()
            except Exception as e:
                s.failure = f"building the stand-in's disk failed: {type(e).__name__}: {e}"
                s.final = True                      # a build failure does not fix itself
                raise StandInError(f"target {self.name}: {s.failure}", STAGE_BUILD) from None
            evidence = _standin_evidence(evidence_hint, self.name, s.boots)
            b = self.b
            standin = StandIn(image.disk, evidence, memory_mb=b["memory_mb"], ips=b["ips"],
                              cpu_model=b["cpu_model"], nice=b["nice"])
            try:
                standin.start()
                s.ready_s = standin.boot(timeout=b["boot_timeout_s"])
                s.known_hosts = standin.known_hosts(image.host_key_pub, evidence / "known_hosts")
                s.client_key = image.client_key
            except BaseException as e:
                standin.stop()
                s.failure = str(e).splitlines()[0] if str(e) else type(e).__name__
                if isinstance(e, StandInError) and e.stage == STAGE_MODPROBE:
                    s.final = True                  # a CPU without VMX stays without it: no re-boot
                if isinstance(e, InfraError) and not isinstance(e, StandInError):
                    raise StandInError(f"target {self.name}: {e}") from None
                raise
            s.standin, s.failure = standin, None
            (evidence / "ready.txt").write_text(
                f"ready after {s.ready_s:.1f} s; ssh 127.0.0.1:{standin.ssh_port}; "
                + ", ".join(f"{k} at {v:.1f} s" for k, v in sorted(standin.events.items(), key=lambda kv: kv[1]))
                + "\n")
            return s

    def remote(self, s: _Session):
        """The remote-qemu target that reaches QEMU/KVM inside the stand-in of session ``s``."""
        assert s.standin is not None and s.known_hosts is not None and s.client_key is not None
        return s.standin.remote_target(s.client_key, s.known_hosts, self.config)

    def run(self, image: Image, evidence: Path, timeout: float | None = None) -> RawRun:
        timeout = self.begin_run(evidence, timeout)
        s = self.standin(evidence)
        standin = s.standin
        assert standin is not None
        (evidence / "standin.txt").write_text(
            f"KVM-runner stand-in: Bochs pid {standin.pid}, ssh 127.0.0.1:{standin.ssh_port}, "
            f"evidence {standin.evidence}\n")
        try:
            raw = self.remote(s).run(image, evidence, timeout)
        except InfraError as e:
            if not standin.alive:
                with s.lock:
                    if s.standin is standin:
                        s.stop()
                raise StandInError(f"target {self.name}: the stand-in's Bochs ended during the run ({e}); "
                                   f"console tail:\n{standin.tail()}", STAGE_LOST) from None
            raise
        raw.notes.append(f"in the KVM-runner stand-in (Bochs pid {standin.pid}, evidence {standin.evidence})")
        return raw

    def close(self) -> None:
        """End this target's stand-in now (the next run boots a new one)."""
        self._session().stop()


def _standin_evidence(hint: Path, name: str, boot: int) -> Path:
    """Where a stand-in's own evidence goes: beside the run that booted it."""
    d = hint.parent / f"_standin-{name}-{os.getpid()}-{boot}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _target_name(value: Any, where: str) -> Any:
    from .config import SAFE_NAME, show
    if not SAFE_NAME.fullmatch(value):
        raise ConfigError(f"{where}: expected a target name, got {show(value)}")
    return value


def _bochs_word(value: Any, where: str) -> Any:
    from .config import show
    if not re.fullmatch(r"[a-z0-9_]{1,64}", value):
        raise ConfigError(f"{where}: expected a Bochs CPU model name (lower-case letters, digits, '_'), "
                          f"got {show(value)}")
    return value
