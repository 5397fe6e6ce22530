"""Bare-metal target infrastructure errors: held lease, lost console, a boot that never reports.

Real TCP consoles (a listener in the test), real child processes (an ipmitool stand-in script, a
console command); each error names the host and the stage, and nothing is left running.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from harness.errors import ConfigError, InfraError
from harness.payload.image import Scenario, build
from harness.targets import open_target, proc
from harness.targets.baremetal.lease import FileLease, LeaseNotObtained
from harness.targets.baremetal.power import ManualPower
from harness.targets.config import from_dict

PY = sys.executable
NOOP = [PY, "-c", "pass"]


class ConsoleServer:
    """A TCP console on 127.0.0.1: sends ``greeting`` then closes (``close``) or stays silent."""

    def __init__(self, greeting: bytes = b"", close: bool = False):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.clients: list[socket.socket] = []
        self.greeting, self.close_after = greeting, close
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        try:
            while True:
                c, _ = self.sock.accept()
                self.connections += 1
                c.sendall(self.greeting)
                if self.close_after:
                    c.close()
                else:
                    self.clients.append(c)
        except OSError:
            pass

    def stop(self) -> None:
        self.sock.close()
        for c in self.clients:
            c.close()


def config(tmp_path: Path, console: dict, *, boot_timeout: float = 2.0, power: dict | None = None,
           lease_timeout: float = 0.5) -> dict:
    return {
        "name": "lab-t", "kind": "baremetal", "timeout_s": 5,
        "baremetal": {
            "host": "labt",
            "power": power or {"driver": "command", "on": NOOP, "off": NOOP, "cycle": NOOP},
            "console": console,
            "boot": {"method": "pxe", "directory": str(tmp_path / "tftp" / "labt")},
            "lease": {"backend": "file", "directory": str(tmp_path / "locks"), "timeout_s": lease_timeout},
            "boot_timeout_s": boot_timeout,
        },
    }


@pytest.fixture
def image():
    global _BASELINE
    _BASELINE = set(proc.live_pids())      # e.g. a session-scoped sshd of other tests
    return build(Scenario(name="bm-errors"))


_BASELINE: set[int] = set()


def no_children_left() -> None:
    """No child the test started is still tracked (ended and reaped)."""
    assert set(proc.live_pids()) - _BASELINE == set()


def test_held_lease_is_an_error_naming_host_and_stage(tmp_path, image, caplog):
    caplog.set_level("INFO", logger="vtx.lease")
    server = ConsoleServer()
    target = open_target(from_dict(config(tmp_path, {"driver": "tcp", "host": "127.0.0.1", "port": server.port}),
                                   "test"))
    other = FileLease("labt", target.lease_cfg, "other")
    other.acquire("pytest-holder")
    try:
        with pytest.raises(LeaseNotObtained) as e:
            target.run(image, tmp_path / "ev")
    finally:
        other.release()
        server.stop()
    assert e.value.stage == "lease"
    assert re.fullmatch(
        r"target lab-t \(host labt\): lease: host labt is held by pytest-holder \(pid %d on \S+ since "
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\); not obtained within 0\.5 s \(%s\)" % (
            os.getpid(), re.escape(str(tmp_path / "locks" / "labt.lock"))), str(e.value)), str(e.value)
    assert server.connections == 0                       # no console, no boot, no power without the lease
    assert not (tmp_path / "ev" / "restore.json").exists()
    waits = [r.getMessage() for r in caplog.records if r.name == "vtx.lease"]
    assert waits == [f"target lab-t (host labt): waiting up to 0.5 s for host labt, held by pytest-holder "
                     f"(pid {os.getpid()} on {socket.gethostname()} since {waits[0].rsplit('since ', 1)[-1]}"], waits
    no_children_left()


def test_lost_console_is_an_error_and_the_host_is_restored(tmp_path, image):
    server = ConsoleServer(greeting=b"hello", close=True)
    target = open_target(from_dict(config(tmp_path, {"driver": "tcp", "host": "127.0.0.1", "port": server.port}),
                                   "test"))
    ev = tmp_path / "ev"
    with pytest.raises(InfraError) as e:
        target.run(image, ev)
    server.stop()
    assert e.value.stage == "console"
    assert str(e.value) == (f"target lab-t (host labt): console: TCP console 127.0.0.1:{server.port} closed the "
                            f"stream (EOF) after 5 bytes and 0 records; evidence: {ev}")
    restore = json.loads((ev / "restore.json").read_text())
    assert restore["host"] == "labt" and restore["action"] == "cycle" and restore["ok"] is True
    # The lease was given back.
    FileLease("labt", target.lease_cfg, "next").acquire("next")
    no_children_left()


def test_boot_that_never_reports_is_an_error(tmp_path, image):
    server = ConsoleServer(greeting=b"BIOS v1.0\r\n")
    tftp, seen = tmp_path / "tftp" / "labt", tmp_path / "seen-at-power-on"
    # The "host" powering on sees the boot directory as PxeBoot left it: snapshot it then.
    snapshot = [PY, "-c", f"import shutil; shutil.copytree({str(tftp)!r}, {str(seen)!r})"]
    power = {"driver": "command", "on": NOOP, "off": NOOP, "cycle": snapshot}
    target = open_target(from_dict(config(tmp_path, {"driver": "tcp", "host": "127.0.0.1", "port": server.port},
                                          boot_timeout=1.5, power=power), "test"))
    ev = tmp_path / "ev"
    t0 = time.monotonic()
    with pytest.raises(InfraError) as e:
        target.run(image, ev)
    server.stop()
    assert 1.5 <= time.monotonic() - t0 < 10
    assert e.value.stage == "boot"
    assert str(e.value) == (f"target lab-t (host labt): boot: no record within 1.5 s of booting (pxe: wrote "
                            f"{tftp / 'vtx-payload.elf'} and boot.ipxe; power cycled); console: TCP console "
                            f"127.0.0.1:{server.port}; last console text: 'BIOS v1.0'; evidence: {ev}")
    assert (seen / "vtx-payload.elf").read_bytes() == image.elf.read_bytes()
    assert (seen / "boot.ipxe").read_text().splitlines()[-2:] == ["kernel vtx-payload.elf", "boot"]
    # Disarmed before the restore cycle, which would otherwise boot the payload again.
    assert sorted(f.name for f in tftp.iterdir()) == ["boot.ipxe"]
    assert (tftp / "boot.ipxe").read_text().splitlines()[-1] == "exit"
    no_children_left()


def test_console_command_child_is_ended_on_boot_timeout(tmp_path, image):
    pidfile = tmp_path / "console.pid"
    argv = [PY, "-c", f"import os,time; open({str(pidfile)!r},'w').write(str(os.getpid())); print('up', flush=True); "
                      "time.sleep(600)"]
    target = open_target(from_dict(config(tmp_path, {"driver": "command", "argv": argv}, boot_timeout=1.0), "test"))
    with pytest.raises(InfraError, match=r"^target lab-t \(host labt\): boot: no record within 1\.0 s"):
        target.run(image, tmp_path / "ev")
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    no_children_left()


IPMITOOL_STANDIN = """#!{py}
import os, sys, time
log = open({log!r}, "a")
log.write(" ".join(sys.argv[1:]) + " | IPMI_PASSWORD=" + ("set" if os.environ.get("IPMI_PASSWORD") == {secret!r} else "missing") + "\\n")
log.close()
args = sys.argv[sys.argv.index("-U") + 2:]
if "-E" in args:
    args.remove("-E")
if args[:3] == ["chassis", "power", "status"]:
    print("Chassis Power is on")
elif args[:2] == ["sol", "activate"]:
    sys.stdout.write("[SOL Session operational.  Use ~? for help]\\n"); sys.stdout.flush()
    time.sleep(600)
"""


def test_ipmi_power_and_sol_pass_the_password_only_by_environment(tmp_path, image, monkeypatch):
    secret = "s3cret-never-logged"
    monkeypatch.setenv("VTX_TEST_BMC_PASSWORD", secret)
    log = tmp_path / "ipmitool.log"
    standin = tmp_path / "ipmitool"
    standin.write_text(IPMITOOL_STANDIN.format(py=PY, log=str(log), secret=secret))
    standin.chmod(0o755)
    ipmi = {"bmc": "bmc-labt.example", "user": "admin", "password_env": "VTX_TEST_BMC_PASSWORD",
            "binary": str(standin)}
    cfg = config(tmp_path, {"driver": "ipmi-sol", **ipmi}, boot_timeout=1.0,
                 power={"driver": "ipmitool", **ipmi})
    target = open_target(from_dict(cfg, "test"))
    assert target.power.status() == "on"
    ev = tmp_path / "ev"
    with pytest.raises(InfraError, match=r"^target lab-t \(host labt\): boot: no record within 1\.0 s"):
        target.run(image, ev)
    base = "-I lanplus -H bmc-labt.example -p 623 -U admin -E"
    assert log.read_text().splitlines() == [
        f"{base} chassis power status | IPMI_PASSWORD=set",
        f"{base} sol deactivate | IPMI_PASSWORD=set",          # a stale session is cleared first
        f"{base} sol activate | IPMI_PASSWORD=set",
        f"{base} chassis power cycle | IPMI_PASSWORD=set",     # PXE boot
        f"{base} chassis power cycle | IPMI_PASSWORD=set",     # restore
    ]
    assert "SOL Session operational" in (ev / "serial.log").read_text()
    for p in ev.rglob("*"):
        if p.is_file():
            assert secret.encode() not in p.read_bytes(), p
    no_children_left()


def test_config_errors_are_one_line(tmp_path):
    bad = config(tmp_path, {"driver": "telnet", "host": "x"})
    with pytest.raises(ConfigError) as e:
        open_target(from_dict(bad, "lab.yaml"))
    assert str(e.value) == ("lab.yaml: baremetal.console.driver: expected one of command, ipmi-sol, serial, tcp, "
                            "got 'telnet'")
    bad = config(tmp_path, {"driver": "tcp", "host": "x", "port": 1})
    bad["baremetal"]["boot"] = {"method": "kexec"}
    with pytest.raises(ConfigError) as e:
        open_target(from_dict(bad, "lab.yaml"))
    assert str(e.value) == "lab.yaml: baremetal.ssh: missing (boot method kexec needs it)"
    bad = config(tmp_path, {"driver": "tcp", "host": "x", "port": "23"})
    with pytest.raises(ConfigError) as e:
        open_target(from_dict(bad, "lab.yaml"))
    assert str(e.value) == "lab.yaml: baremetal.console.port: expected an integer, got '23'"


def test_manual_power_asks_a_person_then_waits_the_configured_time(capsys):
    driver = ManualPower({"wait_s": 0.5}, "target lab-t (host labt)", "test")
    t0 = time.monotonic()
    driver.cycle()
    assert 0.5 <= time.monotonic() - t0 < 3
    assert driver.status() == "unknown"                    # a person's switch cannot be read
    assert capsys.readouterr().err == "target lab-t (host labt): please power cycle the host now (waiting 0.5 s)\n"


def test_unset_password_env_is_an_infrastructure_error_naming_the_variable(tmp_path, image, monkeypatch):
    monkeypatch.delenv("VTX_TEST_UNSET_PASSWORD", raising=False)
    standin = tmp_path / "ipmitool"
    standin.write_text(f"#!{PY}\nimport sys; sys.exit(0)\n")
    standin.chmod(0o755)
    ipmi = {"bmc": "bmc-labt.example", "user": "admin", "password_env": "VTX_TEST_UNSET_PASSWORD",
            "binary": str(standin)}
    server = ConsoleServer()
    target = open_target(from_dict(config(tmp_path, {"driver": "tcp", "host": "127.0.0.1", "port": server.port},
                                          power={"driver": "ipmitool", **ipmi}), "lab.yaml"))
    ev = tmp_path / "ev"
    try:
        with pytest.raises(InfraError) as e:
            target.run(image, ev)
    finally:
        server.stop()
    assert not isinstance(e.value, ConfigError) and e.value.stage == "credentials"
    assert str(e.value) == ("target lab-t (host labt): power-cycle: password_env: "
                            "environment variable VTX_TEST_UNSET_PASSWORD is not set")
    # The restore cycle met the same missing variable: recorded, and the run's own error kept.
    restore = json.loads((ev / "restore.json").read_text())
    assert restore["ok"] is False and "VTX_TEST_UNSET_PASSWORD is not set" in restore["error"]
    FileLease("labt", target.lease_cfg, "next").acquire("next")     # the lease was given back
    no_children_left()


def test_a_failing_restore_never_replaces_the_error_that_ended_the_run(tmp_path, image):
    server = ConsoleServer(greeting=b"BIOS\r\n")
    fail = [PY, "-c", "import sys; print('PDU says no'); sys.exit(3)"]
    # The boot's power cycle works once (a file marks it), the restore's fails.
    marker = tmp_path / "cycled"
    cycle = [PY, "-c", f"import os, sys; p = {str(marker)!r}; "
                       "sys.exit(3) if os.path.exists(p) else open(p, 'w').close()"]
    target = open_target(from_dict(config(tmp_path, {"driver": "tcp", "host": "127.0.0.1", "port": server.port},
                                          boot_timeout=1.0, power={"driver": "command", "on": NOOP, "off": fail,
                                                                   "cycle": cycle}), "test"))
    ev = tmp_path / "ev"
    try:
        with pytest.raises(InfraError, match=r"^target lab-t \(host labt\): boot: no record within 1\.0 s") as e:
            target.run(image, ev)
    finally:
        server.stop()
    assert e.value.stage == "boot"
    restore = json.loads((ev / "restore.json").read_text())
    assert restore["ok"] is False
    assert restore["error"].startswith("target lab-t (host labt): power-cycle: ") and "status 3" in restore["error"]
    no_children_left()


def test_pxe_files_are_written_and_removed_only_inside_the_boot_directory(tmp_path, image):
    """Symlinks planted in the boot directory are replaced or removed themselves: the files they
    point at, outside the directory, are neither written nor deleted."""
    tftp = tmp_path / "tftp" / "labt"
    tftp.mkdir(parents=True)
    outside_script, outside_image = tmp_path / "precious.cfg", tmp_path / "precious.img"
    outside_script.write_text("keep me\n")
    outside_image.write_text("keep me too\n")
    (tftp / "boot.ipxe").symlink_to(outside_script)
    (tftp / "vtx-payload.elf").symlink_to(outside_image)
    server = ConsoleServer()
    target = open_target(from_dict(config(tmp_path, {"driver": "tcp", "host": "127.0.0.1", "port": server.port},
                                          boot_timeout=0.5), "test"))
    try:
        with pytest.raises(InfraError, match="boot: no record within 0.5 s"):
            target.run(image, tmp_path / "ev")
    finally:
        server.stop()
    assert outside_script.read_text() == "keep me\n" and outside_image.read_text() == "keep me too\n"
    assert sorted(p.name for p in tftp.iterdir()) == ["boot.ipxe"]
    assert not (tftp / "boot.ipxe").is_symlink() and (tftp / "boot.ipxe").read_text().splitlines()[-1] == "exit"
    no_children_left()


@pytest.mark.parametrize("boot, message", [
    ({"image_name": "/etc/passwd"}, "baremetal.boot.image_name: expected a plain file name"),
    ({"script_name": "../x"}, "baremetal.boot.script_name: expected a plain file name"),
    ({"image_name": "boot.ipxe"}, "baremetal.boot.image_name: must differ from script_name"),
    ({"command_line": "x\nchain http://evil/"}, "baremetal.boot.command_line: expected text without control"),
])
def test_pxe_names_that_would_leave_the_directory_are_refused_at_load(tmp_path, boot, message):
    cfg = config(tmp_path, {"driver": "tcp", "host": "127.0.0.1", "port": 1})
    cfg["baremetal"]["boot"].update(boot)
    with pytest.raises(ConfigError) as e:
        from_dict(cfg, "lab.yaml")
    assert str(e.value).startswith(f"lab.yaml: {message}")


def test_a_lease_host_that_is_a_path_is_refused(tmp_path):
    cfg = config(tmp_path, {"driver": "tcp", "host": "127.0.0.1", "port": 1})
    cfg["baremetal"]["host"] = "../../x"
    with pytest.raises(ConfigError, match=r"^lab.yaml: baremetal.host: expected a plain file name"):
        from_dict(cfg, "lab.yaml")
    with pytest.raises(ConfigError, match="host: expected a plain file name"):
        FileLease("../../x", {"backend": "file", "directory": str(tmp_path), "timeout_s": 1}, "label")
    assert list(tmp_path.iterdir()) == []
