"""Fixtures for the remote and bare-metal target tests: a real OpenSSH server on loopback."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.targets import proc

SSHD = "/usr/sbin/sshd"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float, what: str, process: subprocess.Popen | None = None) -> None:
    """Wait (bounded) until 127.0.0.1:port accepts connections."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout} s")


def keygen(path: Path, comment: str) -> str:
    """Generate an ed25519 key pair at ``path``; return the public key line."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, capture_output=True)
    return path.with_suffix(".pub").read_text().strip()


@dataclass
class LoopbackSshd:
    """An sshd on 127.0.0.1 with a generated host key and one generated client key."""

    port: int
    user: str
    client_key: Path
    host_pub: str             # "ssh-ed25519 AAAA..."
    known_hosts: Path         # holds the right host key
    wrong_known_hosts: Path   # holds a different key for the same host:port
    directory: Path
    process: subprocess.Popen

    def ssh_section(self, known_hosts: Path | None = None, **over) -> dict:
        """The ``ssh:`` mapping of a target YAML for this server."""
        d = {"host": "127.0.0.1", "port": self.port, "user": self.user, "key_file": str(self.client_key),
             "use_agent": False, "known_hosts": str(known_hosts or self.known_hosts)}
        d.update(over)
        return d

    def session_pids(self) -> list[int]:
        """Per-connection sshd processes (children of the listener)."""
        out = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True)
        return [int(x) for x in out.stdout.split()]


@pytest.fixture(scope="session")
def loopback_sshd(tmp_path_factory) -> LoopbackSshd:
    if not os.path.exists(SSHD) or shutil.which("ssh-keygen") is None:
        pytest.fail("openssh-server is not installed (apt-get install openssh-server)")
    d = tmp_path_factory.mktemp("sshd")
    os.chmod(d, 0o700)
    host_pub = keygen(d / "host_ed25519", "vtx-test-host")
    keygen(d / "wrong_host_ed25519", "vtx-test-wrong-host")
    client_pub = keygen(d / "client_ed25519", "vtx-test-client")
    (d / "authorized_keys").write_text(client_pub + "\n")
    port = free_port()
    (d / "sshd_config").write_text(f"""\
ListenAddress 127.0.0.1
Port {port}
HostKey {d / 'host_ed25519'}
AuthorizedKeysFile {d / 'authorized_keys'}
PidFile {d / 'sshd.pid'}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
AllowTcpForwarding no
AllowStreamLocalForwarding no
AllowAgentForwarding no
X11Forwarding no
PermitTunnel no
Subsystem sftp internal-sftp
LogLevel VERBOSE
""")
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)   # sshd's privilege-separation directory
    log = open(d / "sshd.log", "wb")
    p = proc.spawn([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stdout=log, stderr=log)
    try:
        wait_port(port, 10, "sshd", p)
    except RuntimeError as e:
        proc.end(p)
        pytest.fail(f"{e}; log: {(d / 'sshd.log').read_text()[-500:]}")
    key_b64 = host_pub.split()[1]
    wrong_b64 = (d / "wrong_host_ed25519.pub").read_text().split()[1]
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} ssh-ed25519 {key_b64}\n")
    (d / "wrong_known_hosts").write_text(f"[127.0.0.1]:{port} ssh-ed25519 {wrong_b64}\n")
    user = os.environ.get("USER") or subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
    yield LoopbackSshd(port=port, user=user, client_key=d / "client_ed25519", host_pub=host_pub,
                       known_hosts=d / "known_hosts", wrong_known_hosts=d / "wrong_known_hosts",
                       directory=d, process=p)
    proc.end(p)
    log.close()


def qemu_processes_in(directory_fragment: str) -> list[str]:
    """Command lines of live QEMU processes whose arguments mention ``directory_fragment``."""
    out = []
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            cmd = (pid_dir / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and b"qemu-system" in cmd[0] and any(directory_fragment.encode() in a for a in cmd):
            out.append(" ".join(a.decode(errors="replace") for a in cmd))
    return out


@pytest.fixture
def qemu_procs():
    """``qemu_procs(fragment)``: live QEMU command lines mentioning ``fragment``."""
    return qemu_processes_in
