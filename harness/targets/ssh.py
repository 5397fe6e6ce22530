"""SSH for remote targets: paramiko with host-key verification, argv-only remote commands.

Host keys are checked against a known_hosts file; an unknown key is refused unless the YAML sets
``accept_unknown_host_key: true`` (and even then it is only used for this connection, never
written back).  A *changed* key is always refused.  Authentication is by key file or agent; a
password, where one is unavoidable, is named by an environment variable and never logged.

Remote commands are argv lists joined with ``shlex.join``; nothing from a config is pasted into a
shell string unquoted.
"""

from __future__ import annotations

import os
import shlex
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import paramiko

from ..errors import InfraError
from .config import ENV_NAME, HOST_NAME, USER_NAME, Field, duration

SSH_SCHEMA: dict[str, Field] = {
    "host": Field(str, required=True, check=HOST_NAME, doc="host name or address of the SSH server"),
    "port": Field(int, default=22, low=1, high=65535),
    "user": Field(str, required=True, check=USER_NAME, doc="login name"),
    "key_file": Field((str, type(None)), default=None, doc="private key file (default: agent / ~/.ssh keys)"),
    "use_agent": Field(bool, default=True, doc="try keys offered by ssh-agent"),
    "password_env": Field((str, type(None)), default=None, check=ENV_NAME,
                          doc="name of an environment variable holding the password (never the password)"),
    "known_hosts": Field(str, default="~/.ssh/known_hosts", doc="known_hosts file the host key is checked against"),
    "accept_unknown_host_key": Field(bool, default=False,
                                     doc="accept a host missing from known_hosts (never a changed key)"),
    "connect_timeout_s": duration(15.0),
}


class SshError(InfraError):
    """An SSH step failed; the message names the host and the stage."""


@dataclass(frozen=True)
class SshSettings:
    host: str
    port: int
    user: str
    key_file: str | None
    use_agent: bool
    password_env: str | None
    known_hosts: str
    accept_unknown_host_key: bool
    connect_timeout_s: float

    @classmethod
    def from_section(cls, section: dict[str, Any]) -> "SshSettings":
        return cls(**{k: section[k] for k in SSH_SCHEMA})

    @property
    def where(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


class _RememberOnce(paramiko.MissingHostKeyPolicy):
    """Accept an unknown host key for this connection only (explicit YAML opt-in)."""

    def missing_host_key(self, client, hostname, key):  # noqa: D401 - paramiko API
        client.get_host_keys().add(hostname, key.get_name(), key)


class SshConnection:
    """One authenticated SSH connection: run argv commands, copy files, open raw channels."""

    def __init__(self, settings: SshSettings, label: str):
        self.s = settings
        self.label = label          # e.g. "host lab1" - prefixed to every error
        self.client = paramiko.SSHClient()

    # -- connecting -----------------------------------------------------------------------------
    def connect(self, stage: str = "ssh-connect") -> "SshConnection":
        s = self.s
        known = Path(os.path.expanduser(s.known_hosts))
        if known.exists():
            try:
                self.client.load_host_keys(str(known))
            except (OSError, paramiko.SSHException) as e:
                raise SshError(f"{self.label}: {stage}: cannot read known_hosts {known}: {e}", stage=stage) from None
        elif not s.accept_unknown_host_key:
            raise SshError(f"{self.label}: {stage}: known_hosts file {known} does not exist and "
                           f"accept_unknown_host_key is false", stage=stage)
        self.client.set_missing_host_key_policy(
            _RememberOnce() if s.accept_unknown_host_key else paramiko.RejectPolicy())
        password = None
        if s.password_env:
            password = os.environ.get(s.password_env)
            if password is None:
                raise SshError(f"{self.label}: {stage}: environment variable {s.password_env} "
                               f"(ssh.password_env) is not set", stage=stage)
        key_file = os.path.expanduser(s.key_file) if s.key_file else None
        if key_file and not os.path.exists(key_file):
            raise SshError(f"{self.label}: {stage}: ssh.key_file {s.key_file} does not exist", stage=stage)
        # A host that is still booting (or a port forward whose far end is not listening yet)
        # accepts TCP and closes it without a banner: retry such transient failures until the
        # connect timeout.  Host-key and authentication failures are final at once.
        deadline = time.monotonic() + s.connect_timeout_s
        attempts = 0
        while True:
            attempts += 1
            left = max(deadline - time.monotonic(), 1.0)
            try:
                self.client.connect(s.host, port=s.port, username=s.user, key_filename=key_file,
                                    password=password, allow_agent=s.use_agent,
                                    look_for_keys=key_file is None, timeout=left,
                                    banner_timeout=left, auth_timeout=left)
                break
            except paramiko.BadHostKeyException as e:
                self.close()
                raise SshError(f"{self.label}: {stage}: host key mismatch for {s.host}:{s.port}: server offered "
                               f"{e.key.get_name()} {e.key.get_fingerprint().hex()}, known_hosts {known} has "
                               f"{e.expected_key.get_fingerprint().hex()}; refusing to connect", stage=stage) from None
            except paramiko.AuthenticationException as e:
                self.close()
                raise SshError(f"{self.label}: {stage}: authentication as {s.user} failed: {e}", stage=stage) from None
            except (paramiko.SSHException, OSError, EOFError) as e:
                self.client.close()
                text = str(e)
                if "not found in known_hosts" in text:
                    self.close()
                    raise SshError(f"{self.label}: {stage}: host key of {s.host}:{s.port} is not in {known} (add it "
                                   f"with ssh-keyscan after checking it, or set accept_unknown_host_key: true)",
                                   stage=stage) from None
                if time.monotonic() + 0.5 >= deadline:
                    self.close()
                    what = "cannot reach" if isinstance(e, (OSError, EOFError)) else "no SSH session with"
                    raise SshError(f"{self.label}: {stage}: {what} {s.where} after {attempts} attempts in "
                                   f"{s.connect_timeout_s:.0f} s: {text}", stage=stage) from None
                time.sleep(0.5)
        transport = self.client.get_transport()
        if transport is not None:
            transport.set_keepalive(5)
        return self

    @property
    def transport(self) -> paramiko.Transport:
        return self._transport("ssh")

    def _transport(self, stage: str) -> paramiko.Transport:
        t = self.client.get_transport()
        if t is None or not t.is_active():
            raise SshError(f"{self.label}: {stage}: connection to {self.s.where} is closed", stage=stage)
        return t

    def alive(self) -> bool:
        t = self.client.get_transport()
        return t is not None and t.is_active()

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:
            pass

    def __enter__(self) -> "SshConnection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- commands -------------------------------------------------------------------------------
    def run(self, argv: Sequence[str], *, stage: str, timeout: float = 30.0, check: bool = True,
            stdin: bytes | None = None) -> tuple[int, bytes, bytes]:
        """Run ``argv`` remotely (quoted with shlex.join); return (status, stdout, stderr)."""
        return self.run_script(shlex.join(argv), stage=stage, timeout=timeout, check=check, stdin=stdin)

    def run_script(self, script: str, *, stage: str, timeout: float = 30.0, check: bool = True,
                   stdin: bytes | None = None) -> tuple[int, bytes, bytes]:
        """Run a shell script whose every config-derived word was passed through shlex.quote."""
        try:
            chan = self._transport(stage).open_session(timeout=timeout)
        except (paramiko.SSHException, EOFError, OSError) as e:
            raise SshError(f"{self.label}: {stage}: cannot open a channel to {self.s.where}: {e}",
                           stage=stage) from None
        try:
            chan.settimeout(timeout)
            chan.exec_command(script)
            if stdin:
                chan.sendall(stdin)
            chan.shutdown_write()
            out, err = bytearray(), bytearray()
            deadline = time.monotonic() + timeout
            while True:
                if chan.recv_ready():
                    out += chan.recv(65536)
                elif chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)
                elif chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
                    break
                elif time.monotonic() > deadline:
                    raise SshError(f"{self.label}: {stage}: remote command did not finish within {timeout:.0f} s: "
                                   f"{_short(script)}", stage=stage)
                elif not self.alive():
                    raise SshError(f"{self.label}: {stage}: connection lost while running {_short(script)}",
                                   stage=stage)
                else:
                    time.sleep(0.01)
            status = chan.recv_exit_status()
        except socket.timeout:
            raise SshError(f"{self.label}: {stage}: remote command timed out: {_short(script)}", stage=stage) from None
        finally:
            chan.close()
        if check and status != 0:
            tail = bytes(err).decode(errors="replace").strip()[-300:]
            raise SshError(f"{self.label}: {stage}: remote command failed with status {status}: "
                           f"{_short(script)}: {tail or '(no stderr)'}", stage=stage)
        return status, bytes(out), bytes(err)

    def start(self, script: str, timeout: float = 15.0) -> paramiko.Channel:
        """Start a long-running remote command; the caller owns the channel."""
        chan = self.transport.open_session(timeout=timeout)
        chan.exec_command(script)
        return chan

    def put(self, local: Path, remote: str, mode: int = 0o600, *, stage: str, timeout: float = 120.0) -> None:
        """Upload one file (every SFTP exchange bounded by ``timeout``: a stalled runner is an error)."""
        try:
            with self.client.open_sftp() as sftp:
                sftp.get_channel().settimeout(timeout)
                sftp.put(str(local), remote)
                sftp.chmod(remote, mode)
        except socket.timeout:
            raise SshError(f"{self.label}: {stage}: upload of {local.name} to {remote} stalled for "
                           f"{timeout:.0f} s", stage=stage) from None
        except (OSError, paramiko.SSHException) as e:
            raise SshError(f"{self.label}: {stage}: upload of {local.name} to {remote} failed: {e}",
                           stage=stage) from None

    def get(self, remote: str, local: Path, *, stage: str, timeout: float = 120.0) -> bool:
        """Copy one remote file back; False when it does not exist (bounded like put())."""
        try:
            with self.client.open_sftp() as sftp:
                sftp.get_channel().settimeout(timeout)
                sftp.get(remote, str(local))
            return True
        except FileNotFoundError:
            return False
        except socket.timeout:
            raise SshError(f"{self.label}: {stage}: download of {remote} stalled for {timeout:.0f} s",
                           stage=stage) from None
        except (OSError, paramiko.SSHException) as e:
            raise SshError(f"{self.label}: {stage}: download of {remote} failed: {e}", stage=stage) from None


def bridge(chan: paramiko.Channel, name: str) -> socket.socket:
    """A local socket whose peer is ``chan``'s stdin/stdout (pumped by daemon threads).

    Lets pexpect and qemu.qmp speak to a byte stream carried over SSH as if it were a local socket.
    When the channel ends, the local socket sees EOF.
    """
    ours, theirs = socket.socketpair()

    def down() -> None:          # remote -> local
        try:
            while True:
                data = chan.recv(65536)
                if not data:
                    break
                theirs.sendall(data)
        except OSError:
            pass
        finally:
            try:
                theirs.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def up() -> None:            # local -> remote
        try:
            while True:
                data = theirs.recv(65536)
                if not data:
                    break
                chan.sendall(data)
        except OSError:
            pass
        finally:
            try:
                chan.shutdown_write()
            except (OSError, EOFError):
                pass

    for fn, d in ((down, "down"), (up, "up")):
        threading.Thread(target=fn, name=f"ssh-bridge-{name}-{d}", daemon=True).start()
    return ours


def settings_or_error(section: dict[str, Any], where: str) -> SshSettings:
    """Settings from a validated ``ssh:`` section (files are checked when connecting)."""
    return SshSettings.from_section(section)


def _short(script: str) -> str:
    line = " ".join(script.split())
    return line if len(line) <= 160 else line[:157] + "..."
