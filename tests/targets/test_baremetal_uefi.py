"""A UEFI lab host: the lab-host stand-in (tests/targets/labhost_support.py) booted by OVMF instead
of SeaBIOS, so that, as on today's real hosts, no RSDP lies in the BIOS areas the payload searches
(ACPI 6.5, 5.2.5.1: on UEFI systems OSPM finds the RSDP through the EFI system table's
configuration table, UEFI 2.10, 4.6.1.1, ACPI 2.0 table GUID).  Linux shows that entry as
``ACPI20=0x...`` in /sys/firmware/efi/systab; the kexec boot method reads it there and passes
``acpi_rsdp=0x...`` on the payload's multiboot command line (Multiboot 0.6.96, 3.3, flags bit 2),
where the payload's RSDP finder (``acpi_find_rsdp``, used by the boot probe and ``acpi_dump``)
takes it.  With ``acpi_rsdp: off`` the payload is left to the BIOS-area search, as it was before
the boot methods passed the address: it finds no ACPI at all.

OVMF comes from Debian's ``ovmf`` package; the firmware code is read-only, each VM gets its own
copy of the variable store (``OVMF_VARS_4M.fd``) in its private runtime directory.  QEMU loads the
Debian kernel (an EFI stub) with ``-kernel`` under OVMF as under SeaBIOS.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from harness.observe import platform as P
from harness.observe.runner import run_scenario
from harness.payload.acpi import RsdpFrom, dump_scenario
from harness.targets import open_target
from harness.targets.baremetal.boot import EFI_SYSTAB, rsdp_from_systab
from harness.targets.config import from_dict
from harness.targets.ssh import SshConnection, SshSettings
from labhost_support import CAP_39, DMAR_BASE, ECAP_IR, LINUX_CMDLINE, REPO, load_builder, start_labhost

pytestmark = pytest.mark.xdist_group("labhost")

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
BIOS_AREAS_END = 0x10_0000          # the EBDA and 0xE0000-0xFFFFF both lie below 1 MiB


@pytest.fixture(scope="module")
def uefi_labhost(tmp_path_factory):
    """The lab-host VM booted by OVMF, up to sshd; yields (target mapping, systab text)."""
    if not (OVMF_CODE.is_file() and OVMF_VARS.is_file()):
        pytest.skip(f"{OVMF_CODE} or {OVMF_VARS} missing: install Debian's 'ovmf' package")
    work = tmp_path_factory.mktemp("uefi-labhost")
    img = load_builder().build(log=lambda m: None)
    vars_copy = work / "OVMF_VARS.fd"                  # OVMF writes its variables: never the package's
    shutil.copyfile(OVMF_VARS, vars_copy)
    t0 = time.monotonic()
    vm = start_labhost(["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
                        "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}",
                        "-kernel", str(img.kernel), "-initrd", str(img.initrd), "-append", LINUX_CMDLINE],
                       img.host_key_pub, img.client_key, work, name="labhost-uefi", boot={"method": "kexec"},
                       source="test:labhost-uefi", intremap=True)
    try:
        target = open_target(from_dict(vm.cfg, "test:labhost-uefi"))
        with SshConnection(SshSettings.from_section(target.config.section["ssh"]), "labhost-uefi").connect() as c:
            status, out, err = c.run(["cat", EFI_SYSTAB], stage="test")
        print(f"\nUEFI lab host {vm.up} ({time.monotonic() - t0:.1f} s); {EFI_SYSTAB}: {out.decode().split()}")
        yield vm.cfg, out.decode()
    finally:
        vm.stop()


def _with_rsdp(cfg: dict, setting: str) -> dict:
    cfg = copy.deepcopy(cfg)
    cfg["baremetal"]["boot"]["acpi_rsdp"] = setting
    return cfg


def test_rsdp_from_efi_systab_reaches_the_payload(uefi_labhost, tmp_path):
    """The kexec boot passes the RSDP Linux found (systab's ACPI20 entry); the payload takes it
    from its command line, walks the XSDT to the DMAR, and the boot probe finds the unit."""
    cfg, systab = uefi_labhost
    found = rsdp_from_systab(systab)
    assert found is not None and found[1] == "ACPI20", systab
    rsdp = found[0]
    assert rsdp >= BIOS_AREAS_END, f"OVMF's RSDP {rsdp:#x} is in the BIOS areas: this host proves nothing"
    run = run_scenario(open_target(from_dict(cfg, "test:labhost-uefi")), dump_scenario(), tmp_path / "ev").expect_ok()
    snap = P.PlatformSnapshot.from_run("labhost-uefi", run)
    assert (snap.acpi.rsdp_from, snap.acpi.rsdp_address) == (RsdpFrom.CMDLINE, rsdp), snap.describe()
    assert any(n.startswith("kexec: loaded ") and n.endswith(f"acpi_rsdp={rsdp:#x} (from {EFI_SYSTAB} ACPI20)")
               for n in run.raw.notes), run.raw.notes
    assert snap.acpi.root is not None and snap.acpi.root.signature == "XSDT", snap.describe()
    assert [(u.base, u.cap, u.ecap) for u in snap.probe.dmar_units] == [(DMAR_BASE, CAP_39, ECAP_IR)]
    # The platform checks on what an OS would use: RSDP, root table, DMAR; every DMAR check that
    # applies passes (the conformance suite's own run is test_platform_suite_passes_on_uefi_host).
    assert P.rsdp_findings(snap) == [] and P.table_findings(snap.acpi.root) == []
    ctx = snap.firmware_dmar()
    assert [(d["register_base"], d["flags"]) for d in ctx.drhds] == [(DMAR_BASE, 0)]
    applied = []
    for name, check in P.DMAR_CHECKS.items():
        try:
            assert check(ctx) == [], f"{name}: {P.explain(check(ctx), snap.describe())}"
        except P.NotApplicable:
            continue
        applied.append(name)
    assert len(applied) >= 15, f"only {applied} applied"


def test_without_the_rsdp_the_payload_finds_no_acpi(uefi_labhost, tmp_path):
    """The counterpart: with ``acpi_rsdp: off`` (what every boot did before) the payload searches
    the EBDA and 0xE0000-0xFFFFF, where OVMF put no RSDP: no ACPI tables, no DMAR unit, and the
    RSDP check fails saying where it looked."""
    cfg, _ = uefi_labhost
    run = run_scenario(open_target(from_dict(_with_rsdp(cfg, "off"), "test:labhost-uefi")), dump_scenario(),
                       tmp_path / "ev").expect_ok()
    snap = P.PlatformSnapshot.from_run("labhost-uefi", run)
    assert (snap.acpi.rsdp_from, snap.acpi.rsdp_address, snap.acpi.tables) == (RsdpFrom.NOT_FOUND, 0, [])
    assert snap.probe.dmar_units == [] and snap.probe.dmar_table is None
    assert [f.field for f in P.rsdp_findings(snap)] == ["RSDP"]
    with pytest.raises(P.NotApplicable):
        snap.firmware_dmar()


@pytest.mark.slow
def test_platform_suite_passes_on_uefi_host(uefi_labhost, tmp_path):
    """harness/conformance/platform itself, run against the UEFI lab host as a bare-metal target
    (a YAML target file, as a lab user writes one): it finds the DMAR and no check fails."""
    cfg, _ = uefi_labhost
    target_file = tmp_path / "labhost-uefi.yaml"
    target_file.write_text(yaml.safe_dump(cfg))
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-n", "0", "-rs",
            "--vtx-target", str(target_file), "--vtx-evidence-dir", str(tmp_path / "evidence"),
            "harness/conformance/platform/test_acpi.py", "harness/conformance/platform/test_dmar.py"]
    r = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={k: v for k, v in os.environ.items() if not k.startswith(("VTX_TARGET", "PYTEST_"))})
    tail = (r.stdout + r.stderr)[-3000:]
    assert r.returncode == 0, tail
    summary = [ln for ln in r.stdout.splitlines() if ln.startswith("labhost-uefi")]
    assert summary, tail
    print(f"\nconformance/platform on the UEFI lab host: {summary[0]}")
    passed, failed, errors = (int(x) for x in summary[0].split()[1:4])
    assert (failed, errors) == (0, 0) and passed >= 20, tail
