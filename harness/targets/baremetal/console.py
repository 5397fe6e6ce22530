"""Console drivers, all read through pexpect: IPMI serial-over-LAN, a TCP console (ser2net and
the like), a local serial device, or an external command."""

from __future__ import annotations

import os
import socket
import termios
from typing import Any

import pexpect
import pexpect.fdpexpect

from .. import proc
from ..config import HOST_NAME, Field, absolute_path, duration
from .common import ARGV_FIELD, IPMI_SCHEMA, HostError, ipmi_argv, ipmi_env, run_argv


class ConsoleLost(HostError):
    def __init__(self, message: str):
        super().__init__(message, stage="console")


class ConsoleDriver:
    """Opens a byte stream from the host's serial port; ``read`` returns b"" on a quiet interval."""

    NAME = ""
    SCHEMA: dict[str, Field] = {}

    def __init__(self, cfg: dict[str, Any], label: str, where: str):
        self.cfg, self.label, self.where = cfg, label, where
        self.child: pexpect.spawnbase.SpawnBase | None = None
        self.pending = b""          # bytes consumed while opening (banners): returned first

    def open(self) -> None:
        raise NotImplementedError

    def read(self, timeout: float) -> bytes:
        """Bytes that arrived within ``timeout`` (b"" if none); ConsoleLost when the stream ended."""
        assert self.child is not None
        if self.pending:
            data, self.pending = self.pending, b""
            return data
        try:
            return self.child.read_nonblocking(65536, timeout=timeout)
        except pexpect.TIMEOUT:
            return b""
        except pexpect.EOF:
            raise ConsoleLost(f"{self.label}: console: {self.describe()} closed the stream (EOF)") from None

    def write(self, data: bytes) -> None:
        """Send ``data`` to the host's serial port (a sync point's release token); ConsoleLost when
        the stream has gone."""
        assert self.child is not None
        try:
            self.child.send(data)
        except OSError as e:
            raise ConsoleLost(f"{self.label}: console: {self.describe()} took no input: {e}") from None

    def describe(self) -> str:
        return self.NAME

    def close(self) -> None:
        if self.child is not None:
            pid = getattr(self.child, "pid", None)
            try:
                self.child.close(force=True)
            except Exception:
                pass
            if isinstance(pid, int) and pid > 0:
                proc.end(pid, grace=0.5)
            self.child = None

    def _spawn(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        full_env = dict(os.environ)
        full_env.update(env or {})
        try:
            child = pexpect.spawn(argv[0], argv[1:], env=full_env, timeout=None,
                                  preexec_fn=proc.dies_with_parent())
        except pexpect.ExceptionPexpect as e:
            raise ConsoleLost(f"{self.label}: console: cannot start {argv[0]}: {e}") from None
        proc.adopt(child.pid)
        self.child = child


class SolConsole(ConsoleDriver):
    """``ipmitool sol activate``, after ``sol deactivate`` clears a stale session."""

    NAME = "ipmi-sol"
    SCHEMA = dict(IPMI_SCHEMA)

    def open(self) -> None:
        env = ipmi_env(self.cfg, f"{self.label}: console")
        run_argv(ipmi_argv(self.cfg) + ["sol", "deactivate"], label=self.label, stage="console",
                 timeout=self.cfg["timeout_s"], env=env, check=False)
        self._spawn(ipmi_argv(self.cfg) + ["sol", "activate"], env)
        # Power must not be cycled before the session carries data, or early boot output is lost.
        assert self.child is not None
        try:
            self.child.expect(rb"SOL Session operational", timeout=self.cfg["timeout_s"])
        except pexpect.TIMEOUT:
            raise ConsoleLost(f"{self.label}: console: {self.describe()}: no 'SOL Session operational' "
                              f"within {self.cfg['timeout_s']:.0f} s") from None
        except pexpect.EOF:
            raise ConsoleLost(f"{self.label}: console: {self.describe()}: ipmitool ended before the "
                              "session was operational") from None
        self.pending = self.child.before + self.child.after

    def describe(self) -> str:
        return f"IPMI SOL via {self.cfg['bmc']}"

    def close(self) -> None:
        if self.child is not None:
            try:
                self.child.send(b"~.")           # ipmitool's escape: leave the session politely
            except OSError:
                pass
        super().close()


class TcpConsole(ConsoleDriver):
    """A raw TCP console (ser2net, a terminal server, a QEMU ``-serial tcp:``)."""

    NAME = "tcp"
    SCHEMA = {
        "host": Field(str, required=True, check=HOST_NAME, doc="console server address"),
        "port": Field(int, required=True, low=1, high=65535, doc="console server TCP port"),
        "connect_timeout_s": duration(10.0),
    }

    def open(self) -> None:
        try:
            self.sock = socket.create_connection((self.cfg["host"], self.cfg["port"]),
                                                 timeout=self.cfg["connect_timeout_s"])
        except OSError as e:
            raise ConsoleLost(f"{self.label}: console: cannot connect to {self.describe()}: "
                              f"{e.strerror or e}") from None
        self.sock.settimeout(None)
        self.child = pexpect.fdpexpect.fdspawn(self.sock.fileno(), timeout=None)

    def describe(self) -> str:
        return f"TCP console {self.cfg['host']}:{self.cfg['port']}"

    def close(self) -> None:
        if self.child is not None:
            self.child = None
            self.sock.close()


class SerialConsole(ConsoleDriver):
    """A local serial device (e.g. /dev/ttyUSB0), raw mode at ``baud``."""

    NAME = "serial"
    SCHEMA = {
        "device": Field(str, required=True, check=absolute_path, doc="serial device path"),
        "baud": Field(int, default=115200, choices=(9600, 19200, 38400, 57600, 115200)),
    }

    def open(self) -> None:
        try:
            self.fd = os.open(self.cfg["device"], os.O_RDWR | os.O_NOCTTY)
        except OSError as e:
            raise ConsoleLost(f"{self.label}: console: cannot open {self.cfg['device']}: {e.strerror}") from None
        try:
            attrs = termios.tcgetattr(self.fd)
            speed = getattr(termios, f"B{self.cfg['baud']}")
            attrs[0] = 0                              # iflag: raw
            attrs[1] = 0                              # oflag
            attrs[2] = termios.CS8 | termios.CREAD | termios.CLOCAL
            attrs[3] = 0                              # lflag
            attrs[4] = attrs[5] = speed
            termios.tcsetattr(self.fd, termios.TCSANOW, attrs)
        except termios.error as e:                    # not a tty: termios.error is no OSError
            os.close(self.fd)
            raise ConsoleLost(f"{self.label}: console: {self.cfg['device']} is not a serial line: "
                              f"{e.args[-1]}") from None
        self.child = pexpect.fdpexpect.fdspawn(self.fd, timeout=None)

    def describe(self) -> str:
        return f"serial device {self.cfg['device']}"

    def close(self) -> None:
        if self.child is not None:
            self.child = None
            os.close(self.fd)


class CommandConsole(ConsoleDriver):
    """An external program whose output is the console (e.g. ``conserver``'s ``console -s``)."""

    NAME = "command"
    SCHEMA = {"argv": ARGV_FIELD}

    def open(self) -> None:
        self._spawn(list(self.cfg["argv"]))

    def describe(self) -> str:
        return f"console command {self.cfg['argv'][0]}"


DRIVERS: dict[str, type[ConsoleDriver]] = {d.NAME: d for d in (SolConsole, TcpConsole, SerialConsole, CommandConsole)}
