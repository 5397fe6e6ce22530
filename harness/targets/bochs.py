"""Bochs 2.7: the CI target for VMX (EPT, VPID, unrestricted guest on the newer Intel models).

Bochs runs headless under a pty (``display_library: term``; it opens no port), with its built-in
debugger bypassed by an ``-rc`` file holding ``c`` then ``q``.  COM1 goes to a file in a private
runtime directory that the harness tails.  Bochs has no exit port: once the terminal record has
arrived the harness ends the ``bochs-bin`` PID itself.  A Bochs that leaves on its own before that
(panic, SIGINT through the debugger, ...) exits with status 0 — that is never read as success; the
record stream alone decides, and the run's notes say how it ended.
"""

from __future__ import annotations

import os
import re
import select
import shlex
import shutil
import signal
import time
import tty
from pathlib import Path
from typing import Callable

import pexpect

from ..errors import ConfigError, InfraError
from ..payload.image import Image
from . import proc
from .base import (ConsoleWatch, HostControl, RawRun, Target, remove_runtime_dir, runtime_dir, write_records,
                   write_replay)
from .config import Field, command_name
from .quoting import (Unquotable, bochs_host_files, check_escape_hatch, bochs_key, bochs_line, bochs_listeners, bochs_rc_line,
                      bochs_value, config_check)

POLL_S = 0.002           # how often the serial file is checked while Bochs runs
LOG_TAIL_LINES = 12      # Bochs log lines quoted in a timeout diagnostic
END_QUIET_S = 0.5        # after END: Bochs never exits by itself, so listen this long for more


class BochsTarget(Target):
    KIND = "bochs"
    SECTION = "bochs"
    IMAGE_FORMAT = "disk"
    SCHEMA = {
        "binary": Field(str, default="bochs-bin", check=command_name,
                        doc="the Bochs binary itself (not the 'bochs' wrapper)"),
        "cpu_model": Field(str, required=True, check=config_check(bochs_key),
                           doc="a Bochs CPU model, see 'bochs-bin --help cpu'"),
        "cpu_options": Field(dict, default={}, keys=config_check(bochs_key),
                             values=Field((str, int, bool), low=0, high=(1 << 64) - 1,
                                          check=config_check(bochs_value)),
                             doc="extra 'cpu:' options, e.g. {reset_on_triple_fault: 0}"),
        # Bochs' own bounds for ips (BX_MIN_IPS .. 32 bits) and a RAM size it can allocate.
        "ips": Field(int, default=50_000_000, low=1_000_000, high=(1 << 32) - 1,
                     doc="emulated instructions per second (clock sync=none)"),
        "memory_mb": Field(int, default=64, low=32, high=2048),
        "bios": Field(str, default="/usr/share/bochs/BIOS-bochs-latest", check=config_check(bochs_value)),
        "vgabios": Field(str, default="/usr/share/vgabios/vgabios.bin", check=config_check(bochs_value)),
        "extra_rc": Field(list, default=[], items=Field(str, check=config_check(bochs_rc_line)),
                          doc="extra bochsrc lines (no listeners unless allowed)"),
        "allow_network_listeners": Field(bool, default=False,
                                         doc="let extra_rc open ports (rfb/vncsrv display, socket com ports, gdbstub, NICs)"),
        "allow_host_files": Field(bool, default=False,
                                  doc="let extra_rc write host files or load plugins (log, disks, file com ports, ...)"),
    }

    @classmethod
    def check_config(cls, config) -> None:
        b = config.section
        check_escape_hatch(config.source, f"{cls.SECTION}.extra_rc", b, bochs_listeners(b["extra_rc"]),
                           bochs_host_files(b["extra_rc"]))

    def __init__(self, config):
        super().__init__(config)
        self.b = config.section
        type(self).check_config(config)

    def unavailable(self) -> str | None:
        """Why this target cannot run here (None when it can)."""
        if shutil.which(self.b["binary"]) is None:
            return f"{self.b['binary']} is not installed (Debian: apt-get install bochs bochsbios vgabios)"
        for key in ("bios", "vgabios"):
            if not os.path.exists(self.b[key]):
                return f"{key} image {self.b[key]} is missing (Debian packages bochsbios, vgabios)"
        return None

    def bochsrc(self, disk: Path, serial: Path, log: Path, terminal: str | None = None) -> str:
        """The configuration file: headless, no sound, no port, serial to a private file.  Every
        value, paths included (an evidence directory may hold blanks or commas), goes through
        quoting.bochs_value; extra_rc lines were checked on load and are checked again here.
        With ``terminal`` (a pty's slave path) COM1 is that terminal instead (``mode=term``), which
        carries input too: a run with sync points needs it (the file is loss-free, so it stays the
        default)."""
        b = self.b
        com1 = ({"enabled": 1, "mode": "term", "dev": terminal} if terminal
                else {"enabled": 1, "mode": "file", "dev": serial})
        cpu = {"model": b["cpu_model"], "ips": b["ips"], **b["cpu_options"]}
        try:
            lines = [
                f"megs: {bochs_value(b['memory_mb'])}",
                bochs_line("romimage", {"file": b["bios"]}),
                bochs_line("vgaromimage", {"file": b["vgabios"]}),
                bochs_line("cpu", cpu),
                "clock: sync=none, time0=1",
                "display_library: term",
                "sound: driver=dummy",
                "speaker: enabled=0",
                bochs_line("ata0-master", {"type": "disk", "path": disk, "mode": "flat"}),
                "boot: disk",
                bochs_line("com1", com1),
                f"log: {bochs_value(log)}",
                "panic: action=fatal",
                "error: action=report",
                "info: action=ignore",
                "debug: action=ignore",
                *(bochs_rc_line(line) for line in b["extra_rc"]),
            ]
        except Unquotable as e:        # a config that bypassed load(), or a path Bochs cannot take
            raise ConfigError(f"{self.config.source}: {self.SECTION}: {e}") from None
        return "\n".join(lines) + "\n"

    def run(self, image: Image, evidence: Path, timeout: float | None = None) -> RawRun:
        timeout = self.begin_run(evidence, timeout)
        rt = runtime_dir("bochs", evidence)
        pty: tuple[int, int] | None = None
        try:
            serial_path, log_path = rt / "serial.out", evidence / "bochs.log"
            # Bochs locks '<disk path>.lock' and a killed Bochs leaves the lock behind: give each run
            # its own name for the cached image, so runs never contend and nothing stale outlives a run.
            disk = rt / "disk.img"
            disk.symlink_to(image.disk())
            if self.sync_actions:
                pty = _raw_pty()
            rc = self.bochsrc(disk, serial_path, log_path, os.ttyname(pty[1]) if pty else None)
            (rt / "bochsrc").write_text(rc)
            (rt / "cmds").write_text("c\nq\n")        # the debugger: continue, then quit
            (evidence / "bochsrc").write_text(rc)
            argv = [self.b["binary"], "-q", "-f", str(rt / "bochsrc"), "-rc", str(rt / "cmds")]
            (evidence / "cmdline.sh").write_text(
                "#!/bin/sh\n# The exact command (its private directory is gone: replay.sh runs it by hand).\n"
                f"cd {shlex.quote(str(rt))} && TERM=vt100 " + shlex.join(argv) + "\n")
            image.copy_to(evidence)
            self._write_replay(image, evidence)
            serial_path.touch()
        except BaseException:
            if pty:
                _close(*pty)
            remove_runtime_dir(rt)
            raise
        watch = ConsoleWatch(evidence / "serial.log", timeout, f"target {self.name}", self.sync_actions)
        env = {**os.environ, "TERM": "vt100"}
        child: pexpect.spawn | None = None
        display = open(evidence / "display.log", "wb")
        notes: list[str] = []
        status: int | None = None
        serial = None
        try:
            child = pexpect.spawn(argv[0], argv[1:], cwd=str(rt), env=env, echo=False,
                                  dimensions=(25, 80), timeout=None, preexec_fn=proc.dies_with_parent())
            proc.adopt(child.pid)
            (evidence / "bochs.pid").write_text(f"{child.pid}\n")
            if pty:
                watch.sync.connect(lambda data: _write_all(pty[0], data), HostControl(self.name, evidence))
                reader = self._reader(child, display, None, pty[0])
            else:
                serial = open(serial_path, "rb")
                reader = self._reader(child, display, serial)
            exited = watch.follow(reader,
                                  lambda: self._exit_reason(evidence), quiet_s=END_QUIET_S)
            if exited or not child.isalive():
                status = self._end(child)
                child = None
                notes.append(f"bochs-bin left on its own (status {status}) "
                             + ("after" if watch.parser.ended else "before") + " the terminal record")
                if not watch.parser.ended:
                    display.flush()
                    raise InfraError(
                        f"target {self.name}: bochs-bin exited (status {status}) before the terminal record; "
                        f"{self._exit_reason(evidence)}; evidence: {evidence}",
                        stage="start" if not watch.parser.records else "run", evidence=str(evidence))
            else:
                status = self._end(child)
                child = None
                notes.append(f"terminal record received; the harness ended bochs-bin (status {status})")
            watch.check(evidence)
            return RawRun(target=self.name, records=watch.parser.records, console=bytes(watch.raw),
                          exit_status=status, exit_expected=None,
                          duration_s=time.monotonic() - watch.started, evidence=evidence, notes=notes)
        finally:
            watch.close()
            write_records(evidence, watch.parser.records)
            if serial is not None:
                serial.close()
            if child is not None:
                self._end(child)
            if pty:
                _close(*pty)
            display.close()
            remove_runtime_dir(rt)

    def _reader(self, child: pexpect.spawn, display, serial, terminal: int | None = None) -> Callable[[float], bytes | None]:
        """A ConsoleWatch.follow() reader: COM1's file (or its terminal's master side), while the
        display pty is kept drained; None (end of stream) once bochs-bin has gone and its last
        serial bytes were read."""
        gone = False

        def com1() -> bytes:
            if terminal is None:
                return serial.read()
            out = b""
            while select.select([terminal], [], [], 0)[0]:
                try:
                    data = os.read(terminal, 65536)
                except OSError:             # EIO: nobody holds the slave side any more
                    break
                if not data:
                    break
                out += data
            return out

        def read(wait: float) -> bytes | None:
            nonlocal gone
            if gone:
                return com1() or None
            gone = self._drain_display(child, display, min(POLL_S, wait))
            return com1()
        return read

    def _write_replay(self, image: Image, evidence: Path) -> None:
        """replay.sh with the disk image and an rc file kept in the evidence (paths relative to it).
        Bochs' term display needs a terminal: script(1) gives it one; COM1 is shown on stdout."""
        shutil.copyfile(image.disk(), evidence / "disk.img")
        (evidence / "replay.bochsrc").write_text(
            self.bochsrc(Path("disk.img"), Path("replay-serial.out"), Path("replay-bochs.log")))
        write_replay(evidence, f"""\
export VTX_BOCHS={shlex.quote(self.b['binary'])}
rm -f replay-serial.out replay-bochs.pid disk.img.lock
: > replay-serial.out
printf 'c\\nq\\n' > replay-cmds
TERM=vt100 script -qefc 'echo $$ > replay-bochs.pid; exec "$VTX_BOCHS" -q -f replay.bochsrc -rc replay-cmds' \\
    /dev/null </dev/null >replay-display.log 2>&1 &
term=$!
tail -n +1 -f replay-serial.out &
tailer=$!
stop() {{
    if [ -s replay-bochs.pid ]; then kill -KILL "$(cat replay-bochs.pid)" 2>/dev/null || true; fi
    kill $term $tailer 2>/dev/null || true
    rm -f disk.img.lock
}}
trap stop EXIT
trap 'exit 130' INT TERM HUP
# Bochs has no exit port: stop it a moment after the terminal record (kind 7e) has arrived.
while kill -0 $term 2>/dev/null && ! grep -q '^@[0-9a-f]* 7e ' replay-serial.out; do sleep 0.2; done
sleep 1
if ! grep -q '^@[0-9a-f]* 7e ' replay-serial.out; then
    echo "replay.sh: Bochs stopped without a terminal record; its display said:" >&2
    tail -n 5 replay-display.log >&2
    exit 1
fi
""")

    def _exit_reason(self, evidence: Path) -> str:
        """What Bochs said about why it stopped: its exit message on the display, then its log."""
        try:
            text = (evidence / "display.log").read_bytes().decode(errors="replace")
        except OSError:
            text = ""
        text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\r", "", text)
        said = ""
        m = re.search(r"Bochs is exiting with the following message:\s*\n(.*?)(?:\n=+|\Z)", text, re.S)
        if m:
            said = "Bochs said: " + " ".join(m.group(1).split())[:300]
        else:
            flagged = [ln.strip() for ln in text.splitlines() if re.search(r"\b[ep]\[|PANIC|ERROR", ln)]
            if flagged:
                said = "Bochs display: " + " | ".join(f[:160] for f in flagged[-4:])
        log = self._log_tail(evidence / "bochs.log")
        return f"{said}; {log}" if said else log

    @staticmethod
    def _drain_display(child: pexpect.spawn, sink, wait: float) -> bool:
        """Read (and keep) what the term display writes, so Bochs never blocks on the pty.

        Returns True once the pty reports end of file (bochs-bin has gone)."""
        try:
            ready, _, _ = select.select([child.child_fd], [], [], wait)
        except (OSError, ValueError):
            return True
        if not ready:
            return False
        try:
            data = os.read(child.child_fd, 65536)
        except OSError:          # EIO: the slave side closed
            return True
        if not data:
            return True
        if sink.tell() < 1 << 20:
            sink.write(data)
        return False

    @staticmethod
    def _end(child: pexpect.spawn) -> int | None:
        """End that PID and reap it; return its status (negative: the signal that ended it).

        Bochs holds nothing worth a graceful stop (it only reads the disk image), and SIGINT would
        make its debugger quit with status 0, so it gets SIGKILL while it is still our unreaped
        child (no PID-reuse hazard)."""
        pid = child.pid
        status = None
        try:
            if child.isalive():
                os.kill(pid, signal.SIGKILL)
            child.wait()
        except Exception:
            pass
        finally:
            status = -child.signalstatus if child.signalstatus is not None else child.exitstatus
            try:
                child.close(force=True)
            except Exception:
                pass
            if _alive(pid):
                proc.end(pid, grace=0.2)
            else:
                proc.forget_pid(pid)
        return status

    @staticmethod
    def _log_tail(log: Path) -> str:
        try:
            lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return "no Bochs log"
        interesting = [ln for ln in lines if re.search(r"\b[ep]\[|PANIC|ERROR|shutdown|reset", ln, re.I)]
        tail = (interesting or lines)[-LOG_TAIL_LINES:]
        return "Bochs log: " + " | ".join(t.strip()[:160] for t in tail) if tail else "Bochs log is empty"


def _raw_pty() -> tuple[int, int]:
    """A pseudo-terminal in raw mode (no echo, no line editing, no CR/LF mapping): (master, slave).
    The harness keeps the slave open too, so the master never reads EIO before Bochs opens it."""
    master, slave = os.openpty()
    tty.setraw(slave)
    os.set_blocking(master, False)
    return master, slave


def _write_all(fd: int, data: bytes) -> None:
    """Write ``data`` to the pty master (bounded: a full pty for 1 s is an OSError)."""
    deadline = time.monotonic() + 1.0
    while data:
        if not select.select([], [fd], [], max(deadline - time.monotonic(), 0))[1]:
            raise OSError("the COM1 terminal took no input for 1 s")
        data = data[os.write(fd, data):]


def _close(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
