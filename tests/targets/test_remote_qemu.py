"""The remote QEMU target against a real OpenSSH server on loopback, host-key verification on."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from harness.errors import InfraError, RunTimeout
from harness.observe.runner import run_scenario
from harness.payload.image import Scenario
from harness.targets import open_target
from harness.targets.config import from_dict
from harness.targets.ssh import SshConnection, SshError, SshSettings


# QEMU 7.2 intel-iommu defaults (aw-bits=39, no caching mode): see DESIGN.md.
DMAR_BASE = 0xFED90000
QEMU_VTD_CAP_39 = 0x00D2008C22260206
QEMU_VTD_ECAP = 0xF42


def remote_config(sshd, *, known_hosts: Path | None = None, timeout: float = 60, qemu: dict | None = None,
                  **ssh_over):
    return from_dict({
        "name": "remote-loopback", "kind": "remote-qemu", "timeout_s": timeout,
        "remote_qemu": {"accel": "tcg", "machine": "q35", "cpu": "max", "memory_mb": 128,
                        "iommu": {"aw_bits": 39}, "devices": [{"driver": "edu", "addr": "0x4.0"}],
                        "trace": ["vtd_dmar_fault"],
                        "ssh": sshd.ssh_section(known_hosts, **ssh_over), **(qemu or {})},
    }, "test:remote-loopback")


def hang_scenario() -> Scenario:
    s = Scenario(name="hang", asm=["hang_forever:\n    cli\n1:  hlt\n    jmp 1b\n"])
    s.steps.call("hang_forever")
    return s


def remote_dir(evidence: Path) -> str:
    return (evidence / "remote-dir.txt").read_text().strip().rsplit(":", 1)[1]


def test_probe_runs_on_remote_qemu(loopback_sshd, tmp_path, qemu_procs):
    target = open_target(remote_config(loopback_sshd))
    run = run_scenario(target, Scenario(name="probe"), tmp_path / "ev").expect_ok()
    assert [(u.base, u.cap, u.ecap) for u in run.probe.dmar_units] == [(DMAR_BASE, QEMU_VTD_CAP_39, QEMU_VTD_ECAP)]
    assert run.raw.exit_status == 33                      # isa-debug-exit: ((EXIT_BASE 0x10 | OK 0) << 1) | 1
    ev = tmp_path / "ev"
    qmp = [json.loads(line) for line in (ev / "qmp.jsonl").read_text().splitlines()]
    assert qmp[0]["greeting"]["QMP"]["version"]["qemu"]["major"] >= 7
    assert {"execute": "cont", "arguments": {}}.items() <= qmp[1].items()
    assert (ev / "qemu.status").read_text().strip() == "33"      # fetched back from the runner
    assert (ev / "qemu-trace.log").exists()
    rdir = remote_dir(ev)
    assert rdir.startswith("/tmp/vtx-run-") and not Path(rdir).exists()   # removed after the run
    assert "-chardev pipe,id=qmp" in (ev / "cmdline.sh").read_text()
    assert qemu_procs(rdir) == []


def test_wrong_host_key_is_refused(loopback_sshd, tmp_path):
    target = open_target(remote_config(loopback_sshd, known_hosts=loopback_sshd.wrong_known_hosts))
    with pytest.raises(InfraError) as e:
        run_scenario(target, Scenario(name="probe"), tmp_path / "ev")
    assert e.value.stage == "ssh-connect"
    msg = str(e.value)
    assert msg.startswith("target remote-loopback (host 127.0.0.1): ssh-connect: host key mismatch for "
                          f"127.0.0.1:{loopback_sshd.port}")
    assert "refusing to connect" in msg
    # Even an explicit opt-in for unknown keys never accepts a changed key.
    target = open_target(remote_config(loopback_sshd, known_hosts=loopback_sshd.wrong_known_hosts,
                                       accept_unknown_host_key=True))
    with pytest.raises(InfraError, match="host key mismatch"):
        run_scenario(target, Scenario(name="probe"), tmp_path / "ev2")


def test_unknown_host_key_needs_explicit_opt_in(loopback_sshd, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    settings = SshSettings.from_section({**loopback_sshd.ssh_section(empty), "password_env": None,
                                         "accept_unknown_host_key": False, "connect_timeout_s": 10.0})
    with pytest.raises(SshError) as e:
        SshConnection(settings, "host lab-test").connect()
    assert str(e.value) == (f"host lab-test: ssh-connect: host key of 127.0.0.1:{loopback_sshd.port} is not in "
                            f"{empty} (add it with ssh-keyscan after checking it, or set accept_unknown_host_key: true)")
    opted = SshSettings(**{**settings.__dict__, "accept_unknown_host_key": True})
    with SshConnection(opted, "host lab-test").connect() as c:
        assert c.run(["echo", "it's; $(not) run"], stage="t")[1] == b"it's; $(not) run\n"   # quoted argv
    assert empty.read_text() == ""           # an accepted unknown key is never written back


def test_password_env_missing_is_reported_without_value(loopback_sshd, tmp_path, monkeypatch):
    monkeypatch.delenv("VTX_TEST_NO_SUCH_PASSWORD", raising=False)
    target = open_target(remote_config(loopback_sshd, password_env="VTX_TEST_NO_SUCH_PASSWORD"))
    with pytest.raises(InfraError, match=r"ssh-connect: environment variable VTX_TEST_NO_SUCH_PASSWORD "
                                         r"\(ssh.password_env\) is not set"):
        run_scenario(target, Scenario(name="probe"), tmp_path / "ev")


def test_timeout_ends_remote_qemu(loopback_sshd, tmp_path, qemu_procs):
    target = open_target(remote_config(loopback_sshd, timeout=3))
    ev = tmp_path / "ev"
    with pytest.raises(RunTimeout) as e:
        run_scenario(target, hang_scenario(), ev)
    assert str(e.value).startswith("target remote-loopback (host 127.0.0.1): no terminal record within 3.0 s")
    assert "registers: " in str(e.value) and (ev / "registers.txt").exists()
    rdir = remote_dir(ev)
    assert qemu_procs(rdir) == [] and not Path(rdir).exists()


def test_backstop_on_the_runners_clock_ends_qemu_before_the_run_timeout(loopback_sshd, tmp_path, qemu_procs):
    """``backstop_s``: the runner's own `timeout` ends QEMU after that many seconds of its clock,
    even while the harness still waits (the stand-in sets a long one: its clock outruns the wall's).
    The run ends when QEMU does, as a broken record stream whose stderr names `timeout`."""
    target = open_target(remote_config(loopback_sshd, timeout=60, qemu={"backstop_s": 4}))
    ev = tmp_path / "ev"
    t0 = time.monotonic()
    with pytest.raises(InfraError, match=r"terminating on signal 15 from pid \d+ \(timeout\)") as e:
        run_scenario(target, hang_scenario(), ev)
    assert not isinstance(e.value, RunTimeout)
    assert 4 <= time.monotonic() - t0 < 30
    rdir = remote_dir(ev)
    assert qemu_procs(rdir) == [] and not Path(rdir).exists()


def test_guest_stopped_for_good_ends_the_remote_run_at_once(loopback_sshd, tmp_path, qemu_procs):
    """A guest QEMU stops for good on the runner (here a pvpanic report with panic=pause; on a KVM
    runner a KVM internal error) ends the run at once, named, and QEMU is ended on the runner."""
    config = remote_config(loopback_sshd, timeout=60, qemu={
        "devices": [{"driver": "edu", "addr": "0x4.0"}, {"driver": "pvpanic"}], "extra_args": ["-action", "panic=pause"]})
    s = Scenario(name="panic", asm=["spin_forever:\n1:  jmp 1b\n"])
    s.steps.io_write(0x505, 1)                  # pvpanic: the guest panicked
    s.steps.call("spin_forever")
    ev = tmp_path / "ev"
    t0 = time.monotonic()
    with pytest.raises(InfraError, match=r"QEMU stopped the guest for good \(run state 'guest-panicked'") as e:
        run_scenario(open_target(config), s, ev)
    assert not isinstance(e.value, RunTimeout)
    assert time.monotonic() - t0 < 30
    rdir = remote_dir(ev)
    assert qemu_procs(rdir) == [] and not Path(rdir).exists()


def test_interrupt_ends_remote_qemu(loopback_sshd, tmp_path, qemu_procs):
    target = open_target(remote_config(loopback_sshd))
    seen: list[list[str]] = []

    def ctrl_c(qmp) -> None:           # QEMU is up (paused) on the runner when hooks run
        seen.append(qemu_procs("/tmp/vtx-run-"))
        raise KeyboardInterrupt

    target.before_start.append(ctrl_c)
    ev = tmp_path / "ev"
    with pytest.raises(KeyboardInterrupt):
        run_scenario(target, Scenario(name="probe"), ev)
    rdir = remote_dir(ev)
    assert len([c for c in seen[0] if rdir in c]) == 1
    assert qemu_procs(rdir) == [] and not Path(rdir).exists()


def test_lost_connection_ends_remote_qemu(loopback_sshd, tmp_path, qemu_procs):
    target = open_target(remote_config(loopback_sshd, timeout=30))
    ev = tmp_path / "ev"
    before = set(loopback_sshd.session_pids())
    cut: list[int] = []

    def cut_connection() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            # The probe's records have arrived: the run is in its console stage.
            if (ev / "serial.log").exists() and (ev / "serial.log").stat().st_size > 0:
                for pid in set(loopback_sshd.session_pids()) - before:
                    os.kill(pid, signal.SIGKILL)      # the runner's side of the connection dies
                    cut.append(pid)
                return
            time.sleep(0.05)

    t = threading.Thread(target=cut_connection)
    t.start()
    t0 = time.monotonic()
    with pytest.raises(InfraError) as e:
        run_scenario(target, hang_scenario(), ev)
    t.join()
    assert cut, "the test never found the session to cut"
    assert time.monotonic() - t0 < 25
    assert e.value.stage == "console"
    assert str(e.value).startswith("target remote-loopback (host 127.0.0.1): console: SSH connection lost")
    rdir = remote_dir(ev)
    deadline = time.monotonic() + 5          # the launcher kills QEMU on EOF, then removes rdir
    while (qemu_procs(rdir) or Path(rdir).exists()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert qemu_procs(rdir) == []
    assert not Path(rdir).exists(), "the run directory was left on the runner"


def test_run_directory_goes_even_when_the_harness_cannot_clean_up(loopback_sshd, tmp_path, qemu_procs,
                                                                 monkeypatch):
    """The launcher is the backstop: when the harness's own cleanup does not happen after a normal
    run (its connection already counted as lost), the launcher removes the directory at EOF."""
    from harness.targets.remote_qemu import RemoteQemuTarget
    monkeypatch.setattr(RemoteQemuTarget, "_cleanup", lambda self, conn, rdir, evidence: None)
    target = open_target(remote_config(loopback_sshd))
    ev = tmp_path / "ev"
    run_scenario(target, Scenario(name="probe"), ev).expect_ok()
    rdir = remote_dir(ev)
    deadline = time.monotonic() + 5
    while Path(rdir).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert qemu_procs(rdir) == []
    assert not Path(rdir).exists(), "the run directory outlived the launcher's channel"


def test_sync_point_acts_over_the_ssh_qmp_channel(loopback_sshd, tmp_path, qemu_procs):
    """Issue 14 on remote QEMU: at a sync point the host reads guest memory and injects an NMI over
    the SSH-carried QMP channel, and the release token reaches the payload through the serial FIFO."""
    target = open_target(remote_config(loopback_sshd))
    s = Scenario(name="remote-sync")
    s.steps.mem_fill(0x120_0000, 16, 0x1122_3344_5566_7788)
    sync = s.steps.sync("filled")
    nmi = s.steps.wait_irq(2, 1_000_000)
    seen: dict[str, object] = {}

    def act(host) -> None:
        seen["memory"] = host.read_memory(0x120_0000, 16)
        host.inject_nmi()
    with target.at("filled", act):
        run = run_scenario(target, s, tmp_path / "ev").expect_ok()
    assert seen["memory"] == (0x1122_3344_5566_7788).to_bytes(8, "little") * 2
    assert run.value(nmi) == 1                       # the NMI arrived while the payload waited
    done = [r for r in run.step(sync) if r.kind == 0x1B]
    assert len(done) == 1 and done[0].fields[2] == 1  # released, not given up
    qmp = [json.loads(line) for line in (tmp_path / "ev" / "qmp.jsonl").read_text().splitlines()]
    assert [e["execute"] for e in qmp if "execute" in e][:3] == ["cont", "human-monitor-command", "inject-nmi"]
