"""End to end: the bare-metal target drives a "lab host" (Debian kernel + sshd + kexec, booted in
QEMU TCG with intel-iommu (interrupt remapping offered) and intel_iommu=on) over loopback: SSH in
with a verified host key, kexec the payload, read records from a TCP serial console, then
power-cycle it back to Linux through a command driver that speaks QMP.  Linux leaves the unit
with queued invalidation and interrupt remapping on; the payload copes.  The lab host's DMA agent
is what real hosts have, an NVMe controller (issue 12): its VT-d scenarios use it, not edu."""

from __future__ import annotations

import json
import time

import pytest

from harness.observe.runner import run_scenario
from harness.observe import vtd as ovtd
from harness.payload import layout, vtd
from harness.payload.image import Scenario
from harness.payload.edu import Edu
from harness.payload.nvme import NVME_CLASS, Nvme, status_of
from harness.payload.records import Kind
from harness.payload.vtd_reset import reset_unit
from harness.targets import open_target
from harness.targets.config import from_dict
from labhost_support import CAP_39, DMAR_BASE, ECAP_IR, LINUX_CMDLINE, load_builder, start_labhost

pytestmark = pytest.mark.xdist_group("labhost")

# The lab host's DMA agent: an NVMe controller on a zero-reading, read-only null-co drive (no host
# file).  Appended to the lab host's QEMU arguments.
NVME_BDF = vtd.bdf(0, 6)
NVME_ARGS = ["-drive", "if=none,id=vtxnvm0,driver=null-co,read-zeroes=on,readonly=on",
             "-device", "nvme,addr=0x6.0,drive=vtxnvm0,serial=vtx-nvme0"]


@pytest.fixture(scope="module")
def labhost(tmp_path_factory):
    """The lab-host VM, booted to sshd; yields the target YAML mapping that drives it."""
    t0 = time.monotonic()
    img = load_builder().build(log=lambda m: None)
    print(f"\nlab-host image: {img.directory} ({'built' if img.built_now else 'cached'} in {img.seconds:.1f} s)")
    vm = start_labhost(["-kernel", str(img.kernel), "-initrd", str(img.initrd),
                        "-append", LINUX_CMDLINE],
                       img.host_key_pub, img.client_key, tmp_path_factory.mktemp("labhost"),
                       name="labhost-vm", boot={"method": "kexec"}, source="test:labhost", intremap=True,
                       agent_args=NVME_ARGS)      # NVMe is the only DMA agent: no edu, as on a real host
    print(f"lab host {vm.up}; total fixture time {time.monotonic() - t0:.1f} s")
    yield vm.cfg
    vm.stop()


def test_kexec_probe_on_lab_host(labhost, tmp_path):
    target = open_target(from_dict(labhost, "test:labhost"))
    ev = tmp_path / "ev"
    run = run_scenario(target, Scenario(name="labhost-probe"), ev).expect_ok()
    assert run.raw.exit_status is None                       # no exit device on a "real" host
    assert [(u.base, u.cap, u.ecap) for u in run.probe.dmar_units] == [(DMAR_BASE, CAP_39, ECAP_IR)]
    assert run.probe.vendor in ("GenuineIntel", "AuthenticAMD")
    # QEMU 7.2's TCG has no x2APIC, so Linux remapped interrupts in xAPIC mode and left the APIC
    # as the BSP's, enabled, xAPIC (0x900), software-enabled with its spurious vector 0x0F.
    assert (run.probe.apic_base, run.probe.apic_svr, run.probe.apic_id) == (0xFEE0_0900, 0x10F, 0)
    restore = json.loads((ev / "restore.json").read_text())
    assert restore["ok"] is True and restore["ssh"].startswith("up after ") and "6.1.0" in restore["ssh"]
    assert any(n.startswith("kexec: loaded /tmp/vtx-kexec-") for n in run.raw.notes)
    # A SeaBIOS host has no /sys/firmware/efi: no acpi_rsdp= is passed and the payload's own
    # search of the BIOS areas finds the RSDP (test_baremetal_uefi.py has the UEFI case).
    assert not any("acpi_rsdp=" in n for n in run.raw.notes), run.raw.notes
    assert run.probe.dmar_table is not None


def test_kexec_vtd_nvme_on_lab_host(labhost, tmp_path):
    """Linux (kexec'ing) leaves queued invalidation and interrupt remapping on; the payload resets
    the unit and the NVMe controller (the probe finds it by class code 01:08:02), then through
    translation: a device write lands at the mapped page with the controller's own data; a write to
    an unmapped IOVA and a read of another each record one fault (reasons 5 and 6) with the
    controller's source-id and the IOVA's page; the controller's queues are translated too."""
    s = Scenario(name="labhost-nvme")
    unit = vtd.Unit(s.steps)
    found = reset_unit(s.steps)
    after = unit.read32(vtd.REG_GSTS)
    pages = layout.SCRATCH_BASE + 0x10_0000
    fill = 0x0F0F_0F0F_0F0F_0F0F
    s.steps.mem_fill(pages, 0x3000, fill)
    nvme = Nvme(s.steps, NVME_BDF)
    ident = nvme.setup()
    nvme.load(layout.SCRATCH_BASE)
    tables = vtd.DmarTables(s.arena)
    dom = vtd.SecondLevel(s.arena, 3)
    iova, unmapped_write, unmapped_read = 0x0234_5000, 0x0400_0000, 0x0500_0000
    dom.map(iova, pages + 0x1000)
    for addr, size in nvme.private_ranges():
        dom.map_range(addr, addr, size)
    tables.attach(nvme.source_id, dom, domain_id=1)
    unit.setup_translation(tables.root)
    written = nvme.dma_write(iova, 256)
    data = nvme.check_written(pages + 0x1000, 256)
    tail = s.steps.mem_compare(pages + 0x1100, 0x1000 - 256, fill)
    before = s.steps.mem_compare(pages, 0x1000, fill)
    clean = unit.faults()
    nvme.dma_write(unmapped_write, 256)
    write_fault = unit.faults()
    unit.clear_faults()
    nvme.dma_read(unmapped_read, 512)
    read_fault = unit.faults()
    untouched = s.steps.mem_compare(pages + 0x2000, 0x1000, fill)
    target = open_target(from_dict(labhost, "test:labhost"))
    run = run_scenario(target, s, tmp_path / "ev").expect_ok()
    agents = [f for f in run.probe.pci if f.class_code == NVME_CLASS]
    assert [f.bdf for f in agents] == [NVME_BDF], f"NVMe functions probed: {[str(f) for f in agents]}"
    assert not [f for f in run.probe.pci if Edu.matches(f.vendor, f.device, f.class_code)], "an edu is present"
    assert run.value(ident) == agents[0].vendor | agents[0].device << 16
    gsts_found = run.value(found)
    assert gsts_found & int(vtd.Gcmd.QIE | vtd.Gcmd.IRE) == int(vtd.Gcmd.QIE | vtd.Gcmd.IRE), \
        f"Linux left GSTS {gsts_found:#x}"
    assert run.value(after) & int(vtd.Gcmd.TE | vtd.Gcmd.QIE | vtd.Gcmd.IRE) == 0
    assert status_of(run.value(written)) == 0 and run.value(data) == 0
    assert [run.step_record(i, Kind.MEMCMP).fields[1] for i in (tail, before, untouched)] == [0, 0, 0]
    assert ovtd.fault_snapshot(run, clean).pending == []
    for step, reason, addr, access in ((write_fault, vtd.FaultReason.WRITE, unmapped_write, "write"),
                                       (read_fault, vtd.FaultReason.READ, unmapped_read, "read")):
        pending = ovtd.fault_snapshot(run, step).pending
        assert [(r.reason, r.source_id, r.access, r.fault_info) for r in pending] == \
            [(reason, NVME_BDF, access, addr)], f"{[str(r) for r in pending]}"
