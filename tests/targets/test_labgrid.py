"""The labgrid lease against a real labgrid coordinator and exporter on loopback (no emulator).

Places, tags, reservations, waiting and release are the coordinator's own; the tests check what
the harness makes of them: distinct places for concurrent holders, a logged and bounded wait that
names the tags and the coordinator, infrastructure errors for a coordinator that is down or does
not answer, a place taken away mid-run ending the run with an error (not a verdict), and nothing
acquired or reserved afterwards.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from harness.errors import ConfigError, InfraError
from harness.payload.image import Scenario, build
from harness.targets import open_target
from harness.targets.baremetal.labgrid import LabgridLease
from harness.targets.baremetal.lease import LeaseNotObtained
from harness.targets.baremetal.target import BareMetalTarget
from harness.targets.config import from_dict, validate
from labhost_support import LabgridLab, free_port

pytest.importorskip("labgrid", reason="the labgrid extra is not installed (pip install 'vtx-harness[labgrid]')")

PY = sys.executable
NOOP = [PY, "-c", "pass"]
TAGS = {"vmx": "1", "vtd": "1"}
LABEL = "target lab-t (host pool)"


class SilentConsole:
    """A TCP console on 127.0.0.1 that accepts and never sends (a host that does not boot)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self.clients: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        try:
            while True:
                self.clients.append(self.sock.accept()[0])
        except OSError:
            pass

    def stop(self) -> None:
        self.sock.close()
        for c in self.clients:
            c.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A coordinator, one exporter with three hosts' resources, places pool-1/pool-2 (vmx=1 vtd=1)
    and solo (vtd=1 bench=solo)."""
    work = tmp_path_factory.mktemp("labgrid")
    console = SilentConsole()
    lab = LabgridLab(work)
    try:
        lab.exporter("rack", {
            f"host{i}": {
                "ssh": {"cls": "NetworkService", "address": "127.0.0.1", "port": 22000 + i, "username": "root"},
                "NetworkSerialPort": {"host": "127.0.0.1", "port": console.port, "protocol": "raw"},
            } for i in (1, 2, 3)} | {"host4": {
                "ssh": {"cls": "NetworkService", "address": "127.0.0.1", "port": 22004, "username": "vtx"},
                "bmc": {"cls": "NetworkService", "address": "bmc4.lab", "username": "ADMIN"},
            }})
        lab.wait_resources(8)
        lab.add_place("pool-1", "rack/host1/*", TAGS)
        lab.add_place("pool-2", "rack/host2/*", TAGS)
        lab.add_place("solo", "rack/host3/*", {"vtd": "1", "bench": "solo"})
        lab.add_place("ipmi-host", "rack/host4/*", {"ipmi": "1"})
        yield lab
    finally:
        lab.stop()
        console.stop()


def lease_cfg(lab: LabgridLab, **keys) -> dict:
    keys.setdefault("tags", "vmx=1 vtd=1")
    return validate({"backend": "labgrid", "coordinator": lab.address, "timeout_s": 60, **keys},
                    LabgridLease.SCHEMA, "test", "baremetal.lease.")


def assert_nothing_held(lab: LabgridLab) -> None:
    places, reservations = lab.state()
    assert places == {"pool-1": None, "pool-2": None, "solo": None, "ipmi-host": None} and reservations == []


def test_two_holders_get_two_places_and_leave_nothing_behind(lab):
    first, second = LabgridLease("pool", lease_cfg(lab), LABEL), LabgridLease("pool", lease_cfg(lab), LABEL)
    first.acquire("one")
    try:
        second.acquire("two")
        try:
            assert {first.place, second.place} == {"pool-1", "pool-2"}
            places, reservations = lab.state()
            assert places["pool-1"] == places["pool-2"] == first.session.name
            assert len(reservations) == 2 and places["solo"] is None
            # the place's resources, as its exporter published them
            ports = sorted(lease.resources[("ssh", "NetworkService")].args["port"] for lease in (first, second))
            assert ports == [22001, 22002]
        finally:
            second.release()
    finally:
        first.release()
    assert_nothing_held(lab)


def test_a_second_job_waits_logs_its_tags_then_runs(lab, caplog):
    caplog.set_level("INFO", logger="vtx.lease")
    holder = LabgridLease("solo", lease_cfg(lab, tags=None, place="solo"), "target a (host solo)")
    holder.acquire("first job")
    waiter = LabgridLease("solo", lease_cfg(lab, tags="bench=solo", timeout_s=60), "target b (host solo)")
    got: dict = {}

    def second_job() -> None:
        t0 = time.monotonic()
        try:
            waiter.acquire("second job")
            got["place"], got["waited"] = waiter.place, time.monotonic() - t0
        except BaseException as e:          # reported by the main thread's assert
            got["error"] = e

    job = threading.Thread(target=second_job)
    job.start()
    time.sleep(3.0)
    assert job.is_alive() and "place" not in got            # still waiting: the place is held
    holder.release()
    job.join(60)
    try:
        assert got.get("place") == "solo", got
        assert got["waited"] >= 2.5
        print(f"waited {got['waited']:.1f} s")
    finally:
        waiter.release()
    waits = [r.getMessage() for r in caplog.records if r.name == "vtx.lease"]
    assert waits == [f"target b (host solo): waiting up to 60.0 s for a place with tags bench=solo at labgrid "
                     f"coordinator {lab.address} (matching places: solo acquired by {holder_name()})",
                     "target b (host solo): place solo acquired (tags bench=solo)"], waits
    assert_nothing_held(lab)


def holder_name() -> str:
    import getpass
    import os
    return f"{socket.gethostname()}/{getpass.getuser()}-vtx{os.getpid()}"


def test_the_wait_is_bounded_and_names_tags_and_coordinator(lab):
    held = [LabgridLease("pool", lease_cfg(lab), LABEL) for _ in range(2)]
    for lease in held:
        lease.acquire("holder")
    try:
        late = LabgridLease("pool", lease_cfg(lab, timeout_s=1.5), LABEL)
        t0 = time.monotonic()
        with pytest.raises(LeaseNotObtained) as e:
            late.acquire("late")
        assert time.monotonic() - t0 < 15
    finally:
        for lease in held:
            lease.release()
    assert e.value.stage == "lease"
    assert str(e.value) == (f"{LABEL}: lease: no place with tags vmx=1 vtd=1 became free at labgrid coordinator "
                            f"{lab.address} within 1.5 s (matching places: pool-1 acquired by {holder_name()}, "
                            f"pool-2 acquired by {holder_name()})")
    assert_nothing_held(lab)                # the late reservation was cancelled


def test_no_matching_place_is_an_error_naming_the_places(lab):
    with pytest.raises(LeaseNotObtained) as e:
        LabgridLease("pool", lease_cfg(lab, tags="vmx=1 sata=1"), LABEL).acquire("x")
    assert str(e.value) == (f"{LABEL}: lease: no place at labgrid coordinator {lab.address} matches tags sata=1 "
                            "vmx=1 (places: ipmi-host, pool-1, pool-2, solo)")
    assert_nothing_held(lab)


def test_a_coordinator_that_is_down_is_an_infrastructure_error_naming_it():
    address = f"127.0.0.1:{free_port()}"                  # nothing listens there
    cfg = validate({"backend": "labgrid", "coordinator": address, "tags": "vtd=1", "connect_timeout_s": 20},
                   LabgridLease.SCHEMA, "test", "baremetal.lease.")
    t0 = time.monotonic()
    with pytest.raises(InfraError) as e:
        LabgridLease("pool", cfg, LABEL).acquire("x")
    assert time.monotonic() - t0 < 20
    assert e.value.stage == "lease"
    assert str(e.value) == (f"{LABEL}: lease: labgrid coordinator {address}: connect: unreachable or not a "
                            "labgrid coordinator (Error: Could not connect to coordinator)")


def test_a_coordinator_that_does_not_answer_is_bounded_and_named():
    """A listener that accepts and stays silent (a hung coordinator, a wrong service)."""
    silent = SilentConsole()
    address = f"127.0.0.1:{silent.port}"
    cfg = validate({"backend": "labgrid", "coordinator": address, "tags": "vtd=1", "connect_timeout_s": 2},
                   LabgridLease.SCHEMA, "test", "baremetal.lease.")
    t0 = time.monotonic()
    try:
        with pytest.raises(InfraError) as e:
            LabgridLease("pool", cfg, LABEL).acquire("x")
    finally:
        silent.stop()
    assert time.monotonic() - t0 < 12
    assert e.value.stage == "lease"
    assert str(e.value) == f"{LABEL}: lease: labgrid coordinator {address} did not answer (connect) within 2.0 s"


@pytest.mark.parametrize("keys, message", [
    ({"tags": "vtd=1", "place": "solo"}, "test: baremetal.lease.place / test: baremetal.lease.tags: expected exactly "
                                          "one of them (a place name, or a tag filter such as 'vmx=1 vtd=1')"),
    ({"tags": "vtd"}, "test: baremetal.lease.tags: expected key=value words such as 'vmx=1 vtd=1', got 'vtd'"),
    ({"tags": "VTD=1"}, "test: baremetal.lease.tags: tag key 'VTD': expected a labgrid tag key (a lower-case "
                        "letter, then lower-case letters, digits or '_')"),
    ({"tags": "vtd=1", "coordinator": "lab example"}, "test: baremetal.lease.coordinator: expected HOST[:PORT] of a "
                                                      "labgrid coordinator (e.g. lab.example:20408), got 'lab example'"),
    ({"tags": "vtd=1", "coordinator": "lab:99999"}, "test: baremetal.lease.coordinator: port: expected 1..65535, "
                                                    "got 'lab:99999'"),
    ({"tags": "vtd=1", "ssh": {"host": "x"}}, "test: baremetal.lease.ssh.host: unknown key (expected one of: "
                                              "accept_unknown_host_key, connect_timeout_s, key_file, known_hosts, "
                                              "password_env, use_agent)"),
])
def test_lease_config_errors_are_one_line(keys, message):
    with pytest.raises(ConfigError) as e:
        cfg = validate({"backend": "labgrid", "coordinator": "127.0.0.1:20408", **keys}, LabgridLease.SCHEMA,
                       "test", "baremetal.lease.")
        LabgridLease.check_config(cfg, "test: baremetal.lease.")
    assert str(e.value) == message


def test_the_coordinator_defaults_to_lg_coordinator_as_in_labgrid(lab, monkeypatch):
    assert validate({"coordinator": "lab.example"}, LabgridLease.SCHEMA, "t")["coordinator"] == "lab.example:20408"
    cfg = validate({"backend": "labgrid", "place": "solo"}, LabgridLease.SCHEMA, "test", "baremetal.lease.")
    monkeypatch.delenv("LG_COORDINATOR", raising=False)
    with pytest.raises(InfraError) as e:
        LabgridLease("solo", cfg, LABEL).acquire("x")
    assert str(e.value) == (f"{LABEL}: lease: no labgrid coordinator: baremetal.lease.coordinator is not set and "
                            "LG_COORDINATOR is not in the environment")
    monkeypatch.setenv("LG_COORDINATOR", lab.address)
    lease = LabgridLease("solo", cfg, LABEL)
    lease.acquire("x")
    try:
        assert lease.place == "solo" and lease.coordinator == lab.address
    finally:
        lease.release()
    assert_nothing_held(lab)


def test_only_a_tag_filter_lets_a_targets_tests_spread_over_workers(lab, tmp_path):
    from harness.targets.baremetal.lease import pooled
    console = {"driver": "tcp", "host": "127.0.0.1", "port": 9}

    def config(**lease) -> dict:
        cfg = target_config(lab, tmp_path, **lease)
        cfg["baremetal"]["console"] = console
        return cfg
    by_file = config()
    by_file["baremetal"]["lease"] = {"backend": "file", "directory": str(tmp_path)}
    assert [pooled(from_dict(config(tags="vmx=1 vtd=1"), "test")), pooled(from_dict(config(place="solo"), "test")),
            pooled(from_dict(by_file, "test"))] == [True, False, False]


def test_a_place_with_a_bmc_service_is_driven_by_ipmitool_and_sol(lab, tmp_path):
    """NetworkService 'bmc' -> the harness's ipmitool power and SOL console (BMC address and user from
    the place, the rest from baremetal.lease.bmc); NetworkService 'ssh' -> the SSH address and login."""
    cfg = target_config(lab, tmp_path, place="ipmi-host",
                        bmc={"password_env": "VTX_BMC_PASSWORD", "interface": "lanplus"},
                        ssh={"key_file": str(tmp_path / "key"), "use_agent": False})
    cfg["baremetal"]["console"] = {"driver": "tcp", "host": "127.0.0.1", "port": 9}   # the place's win
    cfg["baremetal"]["boot"] = {"method": "kexec"}
    cfg["baremetal"]["ssh"] = {"host": "127.0.0.1", "user": "unused"}  # needed until target.py knows SUPPLIES
    target = BareMetalTarget(from_dict(cfg, "test"))
    lease = target.make_lease()
    lease.acquire("mapping")
    try:
        placed = lease.attach(target)
        power, console = placed.power._inner, placed.console._inner
        assert (type(power).__name__, power.cfg["bmc"], power.cfg["user"], power.cfg["password_env"]) == \
            ("IpmiPower", "bmc4.lab", "ADMIN", "VTX_BMC_PASSWORD")
        assert (type(console).__name__, console.describe()) == ("SolConsole", "IPMI SOL via bmc4.lab")
        assert (placed.ssh.host, placed.ssh.port, placed.ssh.user, placed.ssh.key_file) == \
            ("127.0.0.1", 22004, "vtx", str(tmp_path / "key"))
        assert placed.boot.ssh is placed.ssh and placed.label == "target lab-t (host ipmi-host)"
        assert target.power is not placed.power and target.host == "pool"   # the original is untouched
        lab.client("-p", "ipmi-host", "release", "--kick")                   # taken away:
        with pytest.raises(InfraError) as e:
            placed.power.cycle()                                             # the host is not touched
        assert e.value.stage == "lease" and "place ipmi-host was taken away" in str(e.value)
    finally:
        lease.release()
    assert_nothing_held(lab)


def target_config(lab: LabgridLab, tmp_path: Path, **lease) -> dict:
    return {
        "name": "lab-t", "kind": "baremetal", "timeout_s": 5,
        "baremetal": {
            "host": "pool",
            # the places export no power: the target file's own power section serves
            "power": {"driver": "command", "on": NOOP, "off": NOOP, "cycle": NOOP},
            "boot": {"method": "pxe", "directory": str(tmp_path / "tftp")},
            "lease": {"backend": "labgrid", "coordinator": lab.address, "timeout_s": 30, **lease},
            "boot_timeout_s": 60,
        },
    }


def test_a_place_taken_away_mid_run_ends_the_run_with_an_error_not_a_verdict(lab, tmp_path):
    target = open_target(from_dict(target_config(lab, tmp_path, place="pool-2"), "test"))
    image = build(Scenario(name="lg-taken"))
    ev = tmp_path / "ev"

    def take_away() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and lab.state()[0]["pool-2"] is None:
            time.sleep(0.2)
        time.sleep(1.0)                       # the run is reading the (silent) console by now
        lab.client("-p", "pool-2", "release", "--kick")

    thief = threading.Thread(target=take_away)
    thief.start()
    t0 = time.monotonic()
    with pytest.raises(InfraError) as e:
        target.run(image, ev)
    thief.join(30)
    assert time.monotonic() - t0 < 40                     # not the 60 s boot bound
    assert e.value.stage == "lease"
    assert str(e.value) == (f"target lab-t (host pool-2): lease: place pool-2 was taken away at labgrid coordinator "
                            f"{lab.address} mid-run (now released); the run ends without a verdict")
    # The host was not touched after it was taken away: no restore cycle on someone else's place.
    restore = json.loads((ev / "restore.json").read_text())
    assert restore["ok"] is False and "was taken away" in restore["error"], restore
    assert (tmp_path / "tftp" / "vtx-payload.elf").exists() is False   # disarm still removed our image
    assert_nothing_held(lab)


def test_a_target_file_needs_power_unless_the_lease_supplies_it(lab, tmp_path):
    cfg = target_config(lab, tmp_path, place="pool-1")
    del cfg["baremetal"]["power"]
    target = open_target(from_dict(cfg, "test"))          # accepted: the place may supply power
    with pytest.raises(InfraError) as e:
        target.run(build(Scenario(name="lg-nopower")), tmp_path / "ev")
    assert str(e.value) == (f"target lab-t (host pool-1): lease: labgrid place pool-1 at {lab.address} offers no "
                            "power resource and the target file has no baremetal.power; its resources: "
                            "NetworkSerialPort NetworkSerialPort, NetworkService ssh")
    assert_nothing_held(lab)
    cfg["baremetal"]["lease"] = {"backend": "file", "directory": str(tmp_path / "locks")}
    with pytest.raises(ConfigError) as c:
        from_dict(cfg, "test")
    assert str(c.value) == ("test: baremetal.power: missing (expected a mapping with 'driver'; only a lease backend "
                            "that supplies it, such as labgrid, lets it be left out)")


POOL_TEST = '''
import json, os, time
from pathlib import Path
import pytest
from harness.targets.baremetal.labgrid import LabgridLease
from harness.targets.config import validate

@pytest.mark.parametrize("job", ["a", "b"])
def test_job(job):
    cfg = validate({{"backend": "labgrid", "coordinator": "{address}", "tags": "vmx=1 vtd=1", "timeout_s": 60}},
                   LabgridLease.SCHEMA, "pool", "lease.")
    lease = LabgridLease("pool", cfg, "job " + job)
    lease.acquire(job)
    try:
        start = time.time()
        time.sleep(4.0)
        Path("{out}", job + ".json").write_text(json.dumps(
            {{"place": lease.place, "start": start, "end": time.time(),
              "worker": os.environ.get("PYTEST_XDIST_WORKER")}}))
    finally:
        lease.release()
'''


def test_xdist_workers_each_get_a_different_place_in_parallel(lab, tmp_path):
    """Two xdist workers, two places matching the tags: both jobs hold a place at the same time."""
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "test_pool.py").write_text(textwrap.dedent(POOL_TEST.format(address=lab.address, out=out)))
    r = subprocess.run([PY, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-n", "2", "test_pool.py"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    jobs = {j: json.loads((out / f"{j}.json").read_text()) for j in ("a", "b")}
    assert {jobs["a"]["place"], jobs["b"]["place"]} == {"pool-1", "pool-2"}
    assert {jobs["a"]["worker"], jobs["b"]["worker"]} == {"gw0", "gw1"}
    overlap = min(jobs["a"]["end"], jobs["b"]["end"]) - max(jobs["a"]["start"], jobs["b"]["start"])
    assert overlap > 2.0, jobs                             # in parallel, not one after the other
    assert_nothing_held(lab)


INTERRUPTED = '''
import sys
from harness.targets.baremetal.labgrid import LabgridLease
from harness.targets.config import validate
cfg = validate({{"backend": "labgrid", "coordinator": "{address}", "place": sys.argv[1], "timeout_s": 300}},
               LabgridLease.SCHEMA, "t", "lease.")
lease = LabgridLease(sys.argv[1], cfg, "interrupted")
lease.acquire("interrupted")           # Ctrl-C while waiting: acquire cancels its reservation
try:
    print("held", flush=True)
    sys.stdin.read()                   # Ctrl-C while holding: the caller's finally releases
finally:
    lease.release()
'''


@pytest.mark.parametrize("phase", ["waiting", "holding"])
def test_ctrl_c_leaves_no_place_acquired_and_no_reservation(lab, tmp_path, phase):
    import signal
    script = tmp_path / "interrupted.py"
    script.write_text(INTERRUPTED.format(address=lab.address))
    holder = LabgridLease("solo", lease_cfg(lab, tags=None, place="solo"), "holder")
    if phase == "waiting":
        holder.acquire("holder")
    try:
        job = subprocess.Popen([PY, str(script), "solo"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            if phase == "waiting":         # its reservation is there, waiting behind the holder's
                while len(lab.state()[1]) < 2 and time.monotonic() < deadline:
                    time.sleep(0.2)
                assert len(lab.state()[1]) == 2
            else:
                assert job.stdout.readline() == "held\n"
                assert lab.state()[0]["solo"] not in (None, holder_name())
            job.send_signal(signal.SIGINT)
            job.wait(60)
        finally:
            job.kill()
            job.wait(10)
            job.stdin.close()
            job.stdout.close()
        assert job.returncode != 0                         # KeyboardInterrupt ended it
        places, reservations = lab.state()
        if phase == "waiting":
            assert places["solo"] == holder_name() and reservations == [holder.token]
    finally:
        if phase == "waiting":
            holder.release()
    assert_nothing_held(lab)


def test_a_place_left_by_a_killed_holder_of_this_host_is_released(lab, tmp_path):
    """A worker killed with SIGKILL cannot release; the next run of this host releases its place."""
    script = tmp_path / "holder.py"
    script.write_text(textwrap.dedent(f'''
        import sys, time
        from harness.targets.baremetal.labgrid import LabgridLease
        from harness.targets.config import validate
        cfg = validate({{"backend": "labgrid", "coordinator": "{lab.address}", "place": "solo"}},
                       LabgridLease.SCHEMA, "t", "lease.")
        lease = LabgridLease("solo", cfg, "killed")
        lease.acquire("killed")
        print("held", lease.session.name, flush=True)
        time.sleep(600)
    '''))
    holder = subprocess.Popen([PY, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        line = holder.stdout.readline()
        assert line.startswith("held "), line
    finally:
        holder.kill()
        holder.wait(10)
        holder.stdout.close()
    dead = line.split()[1]
    assert lab.state()[0]["solo"] == dead
    lease = LabgridLease("solo", lease_cfg(lab, tags=None, place="solo", timeout_s=20), "next")
    lease.acquire("next")
    try:
        assert lease.place == "solo" and lab.state()[0]["solo"] == lease.session.name
    finally:
        lease.release()
    assert_nothing_held(lab)               # the dead holder's reservation was cancelled too
    assert re.fullmatch(r"\S+/\S+-vtx\d+", dead)
