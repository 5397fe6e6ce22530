"""End to end: the bare-metal target drives a "lab host" (Debian kernel + sshd + kexec, booted in
QEMU TCG with intel-iommu (interrupt remapping offered) and intel_iommu=on) over loopback: SSH in
with a verified host key, kexec the payload, read records from a TCP serial console, then
power-cycle it back to Linux through a command driver that speaks QMP.  Linux leaves the unit
with queued invalidation and interrupt remapping on; the payload copes."""

from __future__ import annotations

import json
import time

import pytest

from harness.observe.runner import run_scenario
from harness.payload import edu as pedu
from harness.payload import layout, vtd
from harness.payload.image import Scenario
from harness.payload.records import Kind
from harness.payload.vtd_reset import VTD_RESET_ASM, reset_unit
from harness.targets import open_target
from harness.targets.config import from_dict
from labhost_support import CAP_39, DMAR_BASE, ECAP_IR, LINUX_CMDLINE, load_builder, start_labhost

pytestmark = pytest.mark.xdist_group("labhost")


@pytest.fixture(scope="module")
def labhost(tmp_path_factory):
    """The lab-host VM, booted to sshd; yields the target YAML mapping that drives it."""
    t0 = time.monotonic()
    img = load_builder().build(log=lambda m: None)
    print(f"\nlab-host image: {img.directory} ({'built' if img.built_now else 'cached'} in {img.seconds:.1f} s)")
    vm = start_labhost(["-kernel", str(img.kernel), "-initrd", str(img.initrd),
                        "-append", LINUX_CMDLINE],
                       img.host_key_pub, img.client_key, tmp_path_factory.mktemp("labhost"),
                       name="labhost-vm", boot={"method": "kexec"}, source="test:labhost", intremap=True)
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


def test_kexec_vtd_dma_on_lab_host(labhost, tmp_path):
    """Linux (kexec'ing) leaves queued invalidation and interrupt remapping on; the payload resets
    the unit, then a translated edu DMA write lands at the mapped page and both completion
    interrupts (compatibility format, to the probed APIC ID) arrive."""
    s = Scenario(name="labhost-dma")
    s.asm += [vtd.VTD_ASM, VTD_RESET_ASM, pedu.PCI_ASM]
    unit = vtd.Unit(s.steps)
    found = reset_unit(s.steps)
    after = unit.read32(vtd.REG_GSTS)
    staging, pages = layout.SCRATCH_BASE, layout.SCRATCH_BASE + 0x10_0000
    pattern, fill = 0x5A5A_1234_C3C3_8765, 0x0F0F_0F0F_0F0F_0F0F
    s.steps.mem_fill(staging, 4096, pattern)
    s.steps.mem_fill(pages, 0x3000, fill)
    edu = pedu.Edu(s.steps, vtd.bdf(0, 4), bar_var=5, vector=0x50)
    edu.setup()
    loaded = edu.dma_read(staging, 4088)
    tables = vtd.DmarTables(s.arena)
    dom = vtd.SecondLevel(s.arena, 3)
    iova = 0x0234_5000                       # below edu's default 28-bit DMA mask
    dom.map(iova, pages + 0x1000)
    tables.attach(vtd.bdf(0, 4), dom, domain_id=1)
    unit.setup_translation(tables.root)
    written = edu.dma_write(iova, 256)
    data = s.steps.mem_compare(pages + 0x1000, 256, pattern)
    tail = s.steps.mem_compare(pages + 0x1100, 0x1000 - 256, fill)
    before = s.steps.mem_compare(pages, 0x1000, fill)
    target = open_target(from_dict(labhost, "test:labhost"))
    run = run_scenario(target, s, tmp_path / "ev").expect_ok()
    gsts_found = run.value(found)
    assert gsts_found & int(vtd.Gcmd.QIE | vtd.Gcmd.IRE) == int(vtd.Gcmd.QIE | vtd.Gcmd.IRE), \
        f"Linux left GSTS {gsts_found:#x}"
    assert run.value(after) & int(vtd.Gcmd.TE | vtd.Gcmd.QIE | vtd.Gcmd.IRE) == 0
    assert [run.step_record(i, Kind.MEMCMP).fields[1] for i in (data, tail, before)] == [0, 0, 0]
    assert [run.value(loaded), run.value(written)] == [1, 1]
