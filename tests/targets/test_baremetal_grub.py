"""End to end: the bare-metal target's one-shot GRUB boot against real GRUB.

The lab host here boots like a Debian machine: SeaBIOS -> GRUB 2 (i386-pc, in the MBR and the gap
after it) -> grub.cfg on an ext2 /boot partition -> the lab-host Linux, which mounts /boot from the
AHCI disk and carries Debian's grub-reboot (guest-images/labhost/grub_disk.py).  The target copies
the payload and a custom.cfg entry over SSH, runs grub-reboot, reboots; GRUB boots the payload once
(next_entry), and the power cycle that restores the host must bring Linux back.
"""

from __future__ import annotations

import json
import time

import pytest

from harness.errors import InfraError
from harness.observe.runner import image_for, run_scenario
from harness.payload.image import Scenario
from harness.targets import open_target
from harness.targets.baremetal.common import HostError
from harness.targets.config import from_dict
from harness.targets.ssh import SshConnection
from labhost_support import BOOT_BOUND_S, CAP_39, DMAR_BASE, ECAP, LINUX_CMDLINE, load_recipe, start_labhost

pytestmark = pytest.mark.xdist_group("labhost-grub")

NAME = "labhost-grub-vm"
SOURCE = "test:labhost-grub"
# What GRUB prints on its serial terminal when it starts an entry.
PAYLOAD_ENTRY = b"Booting `vtx-payload'"
LINUX_ENTRY = b"Booting `Debian GNU/Linux (vtx lab host"
REBOOTING = b"labhost: reboot: unmounting /boot"      # init-grub.sh's TERM handler (busybox reboot)
BOUND_UNREAD_S = 30.0                                 # test_entry_grub_does_not_read_is_a_boot_error


@pytest.fixture(scope="module")
def grubhost(tmp_path_factory):
    """The GRUB-booted lab-host VM at sshd; yields (VM, image)."""
    img = load_recipe("labhost_grub_disk", "grub_disk.py").build(log=lambda m: None)
    print(f"\nlab-host GRUB disk: {img.directory} ({'built' if img.built_now else 'cached'} in {img.seconds:.1f} s)")
    # snapshot=on: the VM's writes (grubenv, custom.cfg, the ELF) go to a temporary overlay that
    # lives as long as this QEMU process, across resets, and never reach the cached image.
    vm = start_labhost(["-drive", f"file={img.disk},format=raw,if=none,id=disk0,snapshot=on",
                        "-device", "ide-hd,drive=disk0,bus=ide.0"],
                       img.host_key_pub, img.client_key, tmp_path_factory.mktemp("labhost-grub"),
                       name=NAME, boot={"method": "grub"}, source=SOURCE)
    print(f"GRUB lab host {vm.up}; {vm.seconds:.1f} s from QEMU's start")
    yield vm, img
    vm.stop()


def _target(vm, section: dict | None = None, **boot):
    """A target for the VM with some boot fields (and bare-metal section keys) changed."""
    cfg = json.loads(json.dumps(vm.cfg))
    cfg["baremetal"]["boot"].update(boot)
    cfg["baremetal"].update(section or {})
    return open_target(from_dict(cfg, SOURCE))


def _ssh(target, argv: list[str]) -> str:
    with SshConnection(target.ssh, target.label).connect("check") as c:
        return c.run(argv, stage="check")[1].decode()


def _grubenv(target) -> list[str]:
    return _ssh(target, ["grub-editenv", "/boot/grub/grubenv", "list"]).splitlines()


def test_linux_was_booted_by_grub(grubhost):
    """The stand-in's Linux came from GRUB's default entry on the disk, not from QEMU -kernel."""
    vm, img = grubhost
    target = _target(vm)
    cmdline = _ssh(target, ["cat", "/proc/cmdline"]).strip()
    abi = img.manifest["kernel"].removeprefix("linux-image-")
    assert cmdline == f"BOOT_IMAGE=/vmlinuz-{abi} {LINUX_CMDLINE}"      # GRUB's linux command adds BOOT_IMAGE
    assert "/dev/sda1 /boot ext2 rw" in _ssh(target, ["cat", "/proc/mounts"])
    assert "next_entry=vtx-payload" not in _grubenv(target)


def test_grub_one_shot_boots_payload_then_linux(grubhost, tmp_path):
    vm, _ = grubhost
    target = _target(vm)
    ev = tmp_path / "ev"
    t0 = time.monotonic()
    run = run_scenario(target, Scenario(name="labhost-grub-probe"), ev).expect_ok()
    print(f"GRUB probe run: {run.raw.duration_s:.1f} s to the last record, {time.monotonic() - t0:.1f} s with restore")
    assert run.raw.duration_s < BOUND_UNREAD_S, "the unread-entry test's bound would not tell success from failure"
    assert run.raw.exit_status is None                       # no exit device on a "real" host
    assert [(u.base, u.cap, u.ecap) for u in run.probe.dmar_units] == [(DMAR_BASE, CAP_39, ECAP)]
    assert run.raw.notes[0] == ("grub: one-shot entry vtx-payload -> /boot/vtx-payload.elf "
                                "(GRUB path /vtx-payload.elf); rebooted")
    # The console shows the chain: Linux rebooting, GRUB starting the one-shot entry (not its
    # default) and loading the ELF from the /boot partition's root, then the records.
    serial = (ev / "serial.log").read_bytes()
    at_reboot = serial.index(REBOOTING)
    at_entry = serial.index(PAYLOAD_ENTRY, at_reboot)
    assert serial.index(b"vtx: multiboot /vtx-payload.elf", at_entry) > at_entry
    assert LINUX_ENTRY not in serial[at_reboot:]
    # Restore power-cycled and SSH answered, with the same kernel: GRUB had cleared next_entry
    # when it used it, so the cycle booted the default Linux entry rather than the payload again.
    restore = json.loads((ev / "restore.json").read_text())
    assert restore["ok"] is True and restore["action"] == "cycle" and restore["host"] == NAME
    assert restore["ssh"].startswith("up after ") and restore["ssh"].endswith(": " + vm.up.split(": ")[-1])
    assert "next_entry=" in _grubenv(target) and "next_entry=vtx-payload" not in _grubenv(target)
    # GRUB booted the ELF this run built, from the entry the target wrote.
    with SshConnection(target.ssh, target.label).connect("check") as c:
        assert c.get("/boot/vtx-payload.elf", tmp_path / "installed.elf", stage="check")
        custom = c.run(["cat", "/boot/grub/custom.cfg"], stage="check")[1].decode()
    assert (tmp_path / "installed.elf").read_bytes() == (ev / "payload.elf").read_bytes()
    assert custom == target.boot.entry("/vtx-payload.elf")
    assert "multiboot '/vtx-payload.elf'\n" in custom


def test_grub_reboot_that_sets_nothing_is_an_error(grubhost, tmp_path):
    """grub-reboot exits 0 even when it could not write grubenv; the target reads it back.
    Here the selector is `true`: nothing is written, the host is not rebooted."""
    vm, _ = grubhost
    target = _target(vm, grub_reboot="true")
    with pytest.raises(HostError) as e:
        target.boot.boot(image_for(target, Scenario(name="labhost-grub-unused")), target.power)
    assert e.value.stage == "boot"
    assert str(e.value).startswith(f"target {NAME} (host {NAME}): boot: after true vtx-payload, "
                                   "/boot/grub/grubenv has no next_entry=vtx-payload (it holds: ")
    assert _ssh(target, ["uname", "-r"]).strip() == vm.up.split(": ")[-1]     # still Linux: no reboot


def test_entry_grub_does_not_read_is_a_boot_error(grubhost, tmp_path):
    """custom.cfg written where GRUB never looks: grub-reboot names an entry GRUB does not have,
    GRUB falls back to its default (Linux), no record arrives: an error at stage boot."""
    vm, _ = grubhost
    # An earlier run's /boot/grub/custom.cfg would still hold a working entry: remove it, so that
    # only the entry written where GRUB does not look exists.
    _ssh(_target(vm), ["rm", "-f", "/boot/grub/custom.cfg"])
    # The one-shot test reaches its last record well within this bound (it asserts so; 7-12 s
    # here), so a working entry could not pass for this failure.  No restore cycle: GRUB's own
    # fallback to Linux is what this test checks, and it saves a boot.
    target = _target(vm, {"boot_timeout_s": BOUND_UNREAD_S, "restore": {"action": "none"}},
                     custom_cfg="/boot/vtx-unread.cfg")
    ev = tmp_path / "ev"
    with pytest.raises(InfraError) as e:
        run_scenario(target, Scenario(name="labhost-grub-unread"), ev)
    assert e.value.stage == "boot"
    assert str(e.value).startswith(f"target {NAME} (host {NAME}): boot: no record within "
                                   f"{BOUND_UNREAD_S:.1f} s of booting (grub: one-shot entry vtx-payload")
    serial = (ev / "serial.log").read_bytes()
    at_reboot = serial.index(REBOOTING)
    assert serial.index(LINUX_ENTRY, at_reboot) > at_reboot and PAYLOAD_ENTRY not in serial
    assert json.loads((ev / "restore.json").read_text())["action"] == "none"
    # Linux comes back without a power cycle, and GRUB consumed next_entry although nothing matched.
    assert target.wait_for_ssh(BOOT_BOUND_S).endswith(": " + vm.up.split(": ")[-1])
    assert "next_entry=" in _grubenv(target) and "next_entry=vtx-payload" not in _grubenv(target)
