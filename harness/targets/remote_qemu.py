"""QEMU on a remote KVM runner, driven over one SSH connection (paramiko).

The image is uploaded into a private (0700) directory made by ``mktemp -d`` on the runner.  QEMU's
QMP monitor and serial port are FIFO chardevs (``-chardev pipe``) in that directory: nothing
listens on any socket, on the runner or here.  Two SSH exec channels run ``cat`` on the FIFOs and
are bridged to local sockets that qemu.qmp and pexpect use as if QEMU were local.

The remote QEMU is ended on every path:
  * normally, and on timeout or Ctrl-C, by ``finally``: the launcher is told to kill QEMU, an
    explicit ``kill`` by pid file follows, the evidence is fetched and the directory removed;
  * when the connection is lost, sshd closes the launcher's stdin, and the launcher kills QEMU
    and removes the run directory; it removes it at that EOF in every case, so a cleanup that
    could not run (the connection lost after the run) leaves nothing behind either;
  * if all else fails, QEMU runs under ``timeout -k 5 <run timeout + margin>``.
"""

from __future__ import annotations

import re
import shlex
import socket
import threading
import time
from pathlib import Path, PurePosixPath

import paramiko
from qemu.qmp.legacy import QEMUMonitorProtocol

from ..errors import InfraError
from ..payload.image import Image
from .base import ConsoleWatch, RawRun, remove_runtime_dir, runtime_dir, write_records, write_replay
from .config import Field, absolute_path
from .qemu import END_QUIET_S, GuestStopWatch, QemuTarget, QmpControl, QmpTranscript, qemu_exit_status
from .quoting import qemu_opts
from .ssh import SSH_SCHEMA, SshConnection, SshError, bridge, settings_or_error

# How long QEMU may outlive the run's own deadline before the remote `timeout` ends it anyway.
BACKSTOP_MARGIN_S = 60
# Bound on QEMU's start (pid file written) on the runner.
START_TIMEOUT_S = 20

LAUNCHER = r"""
set -u
cd {dir} || exit 97
mkfifo -m 600 qmp.in qmp.out serial.in serial.out || exit 98
( timeout -k 5 {backstop} {argv} </dev/null >qemu.stdout 2>qemu.stderr; echo $? >qemu.status.tmp; mv qemu.status.tmp qemu.status ) &
i=0
while [ ! -s qemu.pid ] && [ ! -e qemu.status ] && [ $i -lt {start_ticks} ]; do sleep 0.1; i=$((i+1)); done
if [ -s qemu.pid ]; then echo "started $(cat qemu.pid)"; else echo "failed"; fi
# Our stdin stays open for as long as the harness holds the SSH connection.  The harness writes
# "{collect}" when the run ends (normally, on timeout, on Ctrl-C): QEMU is ended, and the directory
# stays while the harness fetches the evidence and removes it itself; it closes our stdin after
# that.  Whatever the harness managed, the directory goes at EOF: a connection lost before or
# after "{collect}" leaves nothing behind.
read -r word || word=lost
if [ -s qemu.pid ]; then
  pid=$(cat qemu.pid)
  kill -TERM "$pid" 2>/dev/null
  i=0; while kill -0 "$pid" 2>/dev/null && [ $i -lt 20 ]; do sleep 0.1; i=$((i+1)); done
  kill -KILL "$pid" 2>/dev/null
fi
if [ "$word" = {collect} ]; then cat >/dev/null; fi
cd / && rm -rf -- {dir}
"""

COLLECT = "collect"

STOP = r"""
cd {dir} 2>/dev/null || exit 0
if [ -s qemu.pid ]; then
  pid=$(cat qemu.pid)
  kill -TERM "$pid" 2>/dev/null
  i=0; while kill -0 "$pid" 2>/dev/null && [ $i -lt 20 ]; do sleep 0.1; i=$((i+1)); done
  kill -KILL "$pid" 2>/dev/null
fi
"""

SERIAL_OPEN = "vtx-serial-open"

EVIDENCE_FILES = ("qemu.stderr", "qemu-trace.log", "qemu.status")


class RemoteQemuTarget(QemuTarget):
    """QEMU (normally KVM) on another machine, reached with SSH; see the module docstring."""

    KIND = "remote-qemu"
    SECTION = "remote_qemu"
    SCHEMA = {
        **QemuTarget.SCHEMA,
        "accel": Field(str, default="kvm", choices=("tcg", "kvm")),
        "ssh": Field(dict, required=True, schema=SSH_SCHEMA, doc="how to reach the runner"),
        "remote_tmp": Field(str, default="/tmp", check=absolute_path,
                            doc="directory on the runner for the private run directory"),
        "backstop_s": Field((int, type(None)), default=None, low=1, high=7 * 24 * 3600,
                            doc="seconds, on the runner's clock, after which its `timeout` ends QEMU even "
                                "if the harness has gone silent; default: the run's timeout + "
                                f"{BACKSTOP_MARGIN_S} s"),
    }

    def __init__(self, config):
        super().__init__(config)
        self.ssh = settings_or_error(self.q["ssh"], config.source)
        self.label = f"target {self.name} (host {self.ssh.host})"

    def unavailable(self) -> str | None:
        return None            # decided on the runner, reported as an InfraError by run()

    def remote_argv(self, image_name: str, rdir: PurePosixPath) -> list[str]:
        """QEMU's argv on the runner: the local argv with the sockets replaced by FIFO chardevs."""
        argv = self.argv(_RemoteImage(rdir / image_name), Path(str(rdir)), Path(str(rdir)))
        swaps = {self.chardev("qmp", rdir / "qmp.sock"): qemu_opts("pipe", {"id": "qmp", "path": str(rdir / "qmp")}),
                 self.chardev("ser0", rdir / "serial.sock"): qemu_opts("pipe", {"id": "ser0", "path": str(rdir / "serial")})}
        out = [swaps.get(a, a) for a in argv]
        if sum(a != b for a, b in zip(argv, out)) != 2:
            raise InfraError(f"{self.label}: internal: QEMU argv lacks the expected chardevs", stage="start")
        return out + ["-pidfile", str(rdir / "qemu.pid")]

    def run(self, image: Image, evidence: Path, timeout: float | None = None) -> RawRun:
        timeout = timeout if timeout is not None else self.config.timeout_s
        evidence.mkdir(parents=True, exist_ok=True)
        image.copy_to(evidence)
        self._write_replay(evidence)
        rt = runtime_dir("remote", evidence)      # marks the evidence in progress until the end
        watch = ConsoleWatch(evidence / "serial.log", timeout, self.label, self.sync_actions)
        transcript = QmpTranscript(evidence / "qmp.jsonl", self.label)
        conn = SshConnection(self.ssh, self.label)
        rdir: PurePosixPath | None = None
        launcher: paramiko.Channel | None = None
        qmp: QEMUMonitorProtocol | None = None
        socks = []
        try:
            conn.connect()
            _, out, _ = conn.run(["mktemp", "-d", f"{self.q['remote_tmp'].rstrip('/')}/vtx-run-XXXXXXXX"],
                                 stage="prepare")
            rdir = PurePosixPath(out.decode().strip())
            conn.run(["chmod", "700", str(rdir)], stage="prepare")
            (evidence / "remote-dir.txt").write_text(f"{self.ssh.where}:{rdir}\n")
            conn.put(image.elf, str(rdir / "payload.elf"), stage="upload")
            argv = self.remote_argv("payload.elf", rdir)
            (evidence / "cmdline.sh").write_text(
                f"#!/bin/sh\n# Ran on {self.ssh.where} in {rdir}; QMP and serial are FIFO chardevs there.\n"
                + shlex.join(argv) + "\n")
            launcher = conn.start(LAUNCHER.format(
                dir=shlex.quote(str(rdir)), argv=shlex.join(argv), collect=COLLECT,
                backstop=self.q["backstop_s"] or int(timeout + BACKSTOP_MARGIN_S), start_ticks=START_TIMEOUT_S * 10))
            started = _read_line(launcher, START_TIMEOUT_S + 10)
            if not started.startswith("started "):
                raise self._remote_start_failure(conn, rdir, evidence, started or "launcher said nothing")
            qmp_sock = bridge(conn.start(f"cd {shlex.quote(str(rdir))} && {{ cat qmp.out & exec cat >qmp.in; }}"), "qmp")
            # The FIFO must be open for reading before QEMU runs: a FIFO's data is dropped when its
            # last writer (QEMU, exiting) closes it with no reader.  The marker says it is open.
            # The channel's input goes to serial.in (QEMU holds it open read-write, so opening it
            # does not block): the release tokens of sync points travel that way.
            # When QEMU exits, serial.out ends, the writer is killed and the channel closes: a QEMU
            # that dies mid-run is seen at once, not at the run's bound (4<&0: a background
            # command's stdin would otherwise be /dev/null).
            ser_sock = bridge(conn.start(f"cd {shlex.quote(str(rdir))} && exec 3<serial.out 4<&0 && echo {SERIAL_OPEN} "
                                         f"&& {{ cat <&4 >serial.in 3<&- & cat <&3 4<&-; kill $! 2>/dev/null; }}"),
                              "serial")
            socks = [qmp_sock, ser_sock]
            if not _await_marker(ser_sock, SERIAL_OPEN.encode() + b"\n", START_TIMEOUT_S):
                raise self._remote_start_failure(conn, rdir, evidence, "serial FIFO could not be opened")
            qmp = QEMUMonitorProtocol(qmp_sock)
            qmp.settimeout(10.0)
            # connect() has no bound of its own: a timer shuts the socket down if the greeting
            # and capability negotiation stall, which makes connect() fail.
            bound = max(watch.remaining(), 1.0)
            guard = threading.Timer(bound, _shut, (qmp_sock,))
            guard.start()
            try:
                greeting = qmp.connect()
            except Exception as e:
                raise self._remote_start_failure(
                    conn, rdir, evidence, f"QMP handshake failed or took over {bound:.0f} s ({e!r})") from None
            finally:
                guard.cancel()
            transcript.greeting(greeting)
            watch.sync.connect(ser_sock.sendall, QmpControl(self.name, evidence, qmp, transcript))
            for hook in self.before_start:
                hook(qmp)
            transcript.cmd(qmp, "cont")
            lost = SshError(f"{self.label}: console: SSH connection lost while waiting for records; "
                            f"evidence: {evidence}", stage="console", evidence=str(evidence))

            guest_stopped = GuestStopWatch(self.label, qmp, transcript, evidence)

            def connection_alive() -> None:
                if not conn.alive():
                    raise lost
                guest_stopped()

            eof = watch.pump(ser_sock.fileno(), evidence, lambda: self._diagnose(None, qmp, transcript, evidence),
                             check_alive=connection_alive, quiet_s=END_QUIET_S)
            try:
                status = self._remote_status(conn, rdir, 3.0)
            except SshError:
                if eof and not watch.parser.ended:
                    raise lost from None
                raise
            if eof and not watch.parser.ended and status is None and not _still_connected(conn, 3.0):
                raise lost
            if status is None:
                transcript.cmd(qmp, "quit", check=False)
                status = self._remote_status(conn, rdir, 2.0)
            transcript.events(qmp)
            watch.check_exit(evidence, status, lambda: conn.run(["head", "-c", "2000", str(rdir / "qemu.stderr")],
                                                                stage="exit-status", check=False)[1].decode(errors="replace"))
            watch.check(evidence)
            return RawRun(target=self.name, records=watch.parser.records, console=bytes(watch.raw),
                          exit_status=status, exit_expected=qemu_exit_status,
                          duration_s=time.monotonic() - watch.started, evidence=evidence,
                          host_events=transcript.entries,
                          notes=[f"ran on {self.ssh.where} in {rdir}"])
        finally:
            watch.close()
            write_records(evidence, watch.parser.records)
            if qmp is not None:
                try:
                    qmp.close()
                except Exception:
                    pass
            for s in socks:
                s.close()
            if launcher is not None:
                try:                              # the launcher ends QEMU and keeps the directory
                    launcher.sendall(f"{COLLECT}\n".encode())
                except (OSError, EOFError):
                    pass
            if rdir is not None and conn.alive():
                self._cleanup(conn, rdir, evidence)
            if launcher is not None:              # EOF: the launcher removes whatever is left
                launcher.close()
            transcript.close()
            conn.close()
            remove_runtime_dir(rt)

    def _write_replay(self, evidence: Path) -> None:
        """replay.sh: upload the payload copy into a private directory on the runner and run QEMU
        there by hand with the serial port on the terminal (same host-key checking as ssh's)."""
        argv = self.replay_argv()
        if argv is None:
            write_replay(evidence, "echo 'replay.sh: see cmdline.sh' >&2\nexit 2\n")
            return
        ssh = ["ssh", "-p", str(self.ssh.port), "-o", f"UserKnownHostsFile={self.ssh.known_hosts}",
               "-o", "StrictHostKeyChecking=" + ("accept-new" if self.ssh.accept_unknown_host_key else "yes")]
        if self.ssh.key_file:
            ssh += ["-i", str(self.ssh.key_file), "-o", "IdentitiesOnly=yes"]
        dest = f"{self.ssh.user}@{self.ssh.host}" if self.ssh.user else self.ssh.host
        tmp = shlex.quote(f"{self.q['remote_tmp'].rstrip('/')}/vtx-replay-XXXXXXXX")
        # The remote command goes inside a double-quoted local string ($d is filled in locally).
        qemu = re.sub(r'([\\"$`])', r"\\\1", shlex.join(argv))
        write_replay(evidence, f"d=$({shlex.join(ssh)} {shlex.quote(dest)} mktemp -d {tmp})\n"
                               f"{shlex.join(ssh)} {shlex.quote(dest)} \"cd $d && trap 'cd / && rm -rf -- $d' EXIT "
                               f"&& cat > payload.elf && {qemu} </dev/null\" < payload.elf\n")

    def _cleanup(self, conn: SshConnection, rdir: PurePosixPath, evidence: Path) -> None:
        """End QEMU for certain, fetch the evidence, remove the private directory; each step runs
        even when an earlier one failed (a runner inside an emulator runs its clock ~10x slow)."""
        errors: list[str] = []
        steps = [lambda: conn.run_script(STOP.format(dir=shlex.quote(str(rdir))), stage="cleanup", timeout=60,
                                         check=False)]
        steps += [lambda n=name: conn.get(str(rdir / n), evidence / n, stage="collect") for name in EVIDENCE_FILES]
        steps.append(lambda: conn.run(["rm", "-rf", "--", str(rdir)], stage="cleanup", timeout=60, check=False))
        for step in steps:
            try:
                step()
            except InfraError as e:
                errors.append(str(e))
        if errors:
            (evidence / "cleanup-error.txt").write_text("\n".join(errors) + "\n")

    def _remote_status(self, conn: SshConnection, rdir: PurePosixPath, wait: float) -> int | None:
        deadline = time.monotonic() + wait
        while True:
            rc, out, _ = conn.run(["cat", str(rdir / "qemu.status")], stage="exit-status", check=False)
            if rc == 0 and out.strip():
                return int(out.strip())
            if time.monotonic() > deadline:
                return None
            time.sleep(0.1)

    def _remote_start_failure(self, conn: SshConnection, rdir: PurePosixPath, evidence: Path,
                              what: str) -> InfraError:
        _, err, _ = conn.run(["cat", str(rdir / "qemu.stderr")], stage="start", check=False)
        status = self._remote_status(conn, rdir, 0.5)
        text = err.decode(errors="replace").strip()[-500:]
        return InfraError(f"{self.label}: start: QEMU did not start on {self.ssh.host}: {what}; exit status "
                          f"{status}; stderr: {text or '(empty)'}; evidence: {evidence}", stage="start",
                          evidence=str(evidence))


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _await_marker(sock, marker: bytes, timeout: float) -> bool:
    """Read exactly ``marker`` from the start of ``sock`` (bounded)."""
    sock.settimeout(timeout)
    got = b""
    try:
        while len(got) < len(marker):
            data = sock.recv(len(marker) - len(got))
            if not data:
                return False
            got += data
    except OSError:
        return False
    finally:
        sock.settimeout(None)
    return got == marker


def _still_connected(conn: SshConnection, wait: float) -> bool:
    """After the console's EOF: is the SSH connection still up (a lost one takes a moment to show)?"""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if not conn.alive():
            return False
        try:
            conn.run(["true"], stage="console", timeout=max(deadline - time.monotonic(), 0.5))
            return True
        except InfraError:
            return False
    return conn.alive()


class _RemoteImage:
    """Stands in for an Image inside QemuTarget.argv: only ``elf`` (a remote path) is used."""

    def __init__(self, elf: PurePosixPath):
        self.elf = elf


def _read_line(chan: paramiko.Channel, timeout: float) -> str:
    chan.settimeout(timeout)
    buf = b""
    deadline = time.monotonic() + timeout
    try:
        while b"\n" not in buf and time.monotonic() < deadline:
            data = chan.recv(256)
            if not data:
                break
            buf += data
    except OSError:
        pass
    return buf.decode(errors="replace").strip()
