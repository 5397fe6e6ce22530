"""End to end through labgrid: the lab-host stand-in VM exported by a real labgrid exporter (its SSH
as a NetworkService, its TCP serial console as a NetworkSerialPort, its QMP behind a labgrid
``rest`` NetworkPowerPort), a real coordinator on loopback, and a bare-metal target whose file
names only the coordinator and the tags: the harness reserves and acquires the place, kexecs the
payload over the place's SSH, reads records from the place's serial port, power-cycles the VM back
to Linux through labgrid's own power driver, and leaves nothing acquired or reserved.
"""

from __future__ import annotations

import json
import time

import pytest

from harness.observe.runner import run_scenario
from harness.payload.image import Scenario
from harness.targets import open_target
from harness.targets.config import from_dict
from harness.targets import proc
from labhost_support import (BOOT_BOUND_S, CAP_39, DMAR_BASE, ECAP_IR, LINUX_CMDLINE, LabgridLab, load_builder,
                             start_labhost, start_power_rest)

pytest.importorskip("labgrid", reason="the labgrid extra is not installed (pip install 'vtx-harness[labgrid]')")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.xdist_group("labhost"),
]

PLACE = "vtd-lab-1"


@pytest.fixture(scope="module")
def labgrid_labhost(tmp_path_factory):
    """The lab-host VM behind a coordinator and an exporter; yields (lab, target mapping)."""
    work = tmp_path_factory.mktemp("labgrid-labhost")
    img = load_builder().build(log=lambda m: None)
    vm = start_labhost(["-kernel", str(img.kernel), "-initrd", str(img.initrd), "-append", LINUX_CMDLINE],
                       img.host_key_pub, img.client_key, work, name="labhost-lg", boot={"method": "kexec"},
                       source="test:labgrid-labhost", intremap=True)
    power = lab = None
    try:
        power, power_port = start_power_rest(vm.runtime / "qmp.sock", work)
        lab = LabgridLab(work)
        direct = vm.cfg["baremetal"]
        lab.exporter("rack", {"labhost-vm": {
            "ssh": {"cls": "NetworkService", "address": "127.0.0.1", "port": direct["ssh"]["port"],
                    "username": "root"},
            "NetworkSerialPort": {"host": "127.0.0.1", "port": direct["console"]["port"], "protocol": "raw",
                                  "speed": 115200},
            "NetworkPowerPort": {"model": "rest", "host": f"http://127.0.0.1:{power_port}/power/{{index}}",
                                 "index": 0},
        }})
        lab.wait_resources(3)
        lab.add_place(PLACE, "rack/labhost-vm/*", {"vtd": "1", "kexec": "1"})
        cfg = {
            "name": "labgrid-labhost", "kind": "baremetal", "timeout_s": 120,
            "baremetal": {
                "host": "lab-pool",
                "boot": {"method": "kexec"},
                "lease": {"backend": "labgrid", "coordinator": lab.address, "tags": "vtd=1 kexec=1",
                          "timeout_s": 60,
                          "ssh": {"key_file": direct["ssh"]["key_file"], "use_agent": False,
                                  "known_hosts": direct["ssh"]["known_hosts"]}},
                "boot_timeout_s": 60,
                "restore": {"action": "cycle", "ssh_wait_s": BOOT_BOUND_S},
            },
        }
        print(f"\nlab host {vm.up}; exported as labgrid place {PLACE} at {lab.address}")
        yield lab, cfg
    finally:
        if lab is not None:
            lab.stop()
        if power is not None:
            proc.end(power)
        vm.stop()


def test_kexec_probe_through_the_labgrid_coordinator(labgrid_labhost, tmp_path):
    lab, cfg = labgrid_labhost
    target = open_target(from_dict(cfg, "test:labgrid-labhost"))
    ev = tmp_path / "ev"
    t0 = time.monotonic()
    run = run_scenario(target, Scenario(name="labgrid-probe"), ev).expect_ok()
    print(f"run through the coordinator, restore included: {time.monotonic() - t0:.1f} s")
    assert [(u.base, u.cap, u.ecap) for u in run.probe.dmar_units] == [(DMAR_BASE, CAP_39, ECAP_IR)]
    assert run.raw.exit_status is None
    assert any(n.startswith("kexec: loaded /tmp/vtx-kexec-") for n in run.raw.notes), run.raw.notes
    # Restored through the place's NetworkPowerPort (labgrid's rest driver -> QMP), back to Linux.
    restore = json.loads((ev / "restore.json").read_text())
    assert restore["host"] == PLACE and restore["ok"] is True, restore
    assert restore["ssh"].startswith("up after ") and "6.1.0" in restore["ssh"]
    assert "power_rest: " in (lab.work / "power_rest.log").read_text()     # the switch was used
    places, reservations = lab.state()
    assert places == {PLACE: None} and reservations == []
