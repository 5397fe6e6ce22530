"""The host acts at a named moment of a VT-d run (issue 14): an NMI or a pause while a DMA is in
flight, a platform reset with translation on, and QEMU's own view of the PCI hierarchy.

Each scenario stops the payload at a sync point (``steps.sync``); the action registered with
``Target.at`` runs there through QMP and then releases the payload.  What the host did is in the
run's qmp.jsonl; what the payload saw is in its records."""

from __future__ import annotations

from typing import Any

import pytest

from harness.payload.edu import DMA_START, REG_DMA_CMD
from harness.payload.records import Kind
from harness.payload.vtd import REG_GSTS, Gcmd
from harness.testing import BEHIND_ROOT_PORT, FILL, PATTERN, XFER, VtdScenario, page

from .support import require_qmp

pytestmark = [pytest.mark.requires("vtd"), pytest.mark.solo]

NMI = 2
IOVA = 0x40_0000


def translated_write(scen: VtdScenario) -> None:
    """Agent -> IOVA 0x400000 -> page(1), translation on, the DMA started (not awaited)."""
    scen.prepare()
    dom = scen.domain()
    dom.map(IOVA, page(1))
    scen.attach(scen.agent, dom, domain_id=1)
    scen.unit.setup_translation(scen.tables.root)
    scen.agent.start_write(IOVA, XFER)


def test_nmi_arrives_while_a_dma_is_pending(vtd):
    """An NMI injected while a translated DMA is in flight is taken (vector 2, once) and leaves the
    DMA alone: it is still in progress after the NMI, completes with its interrupt, the data lands
    at the translated page and nothing faults."""
    target = require_qmp(vtd)
    scen = vtd.scenario("nmi-during-dma")
    translated_write(scen)
    scen.steps.sync("dma-pending")
    busy = scen.agent.reg_read(REG_DMA_CMD)          # edu: bit 0 stays set until the DMA is done
    nmis = scen.steps.wait_irq(NMI, 1000)
    done = scen.agent.wait()
    snap = scen.unit.faults()
    scen.compare("data", page(1), XFER, PATTERN)
    scen.compare("tail", page(1) + XFER, 0x1000 - XFER, FILL)
    with target.at("dma-pending", lambda host: host.inject_nmi()):
        out = vtd.run(scen)
    assert out.value(busy) & DMA_START == DMA_START, "the DMA had completed before the NMI: no overlap"
    assert out.value(nmis) == 1
    assert out.value(done) == 1
    assert (out.mismatches("data"), out.mismatches("tail")) == (0, 0)
    assert out.faults(snap).pending == []


def test_dma_pending_across_stop_and_cont_completes_unchanged(vtd):
    """The VM paused (QMP stop) with a translated DMA in flight: while paused the target page still
    holds its old contents and QEMU reports 'paused'; after cont the DMA completes exactly as
    without the pause (data at the translated page, tail untouched, no fault)."""
    target = require_qmp(vtd)
    scen = vtd.scenario("stop-cont-dma")
    translated_write(scen)
    scen.steps.sync("dma-pending")
    done = scen.agent.wait()
    snap = scen.unit.faults()
    scen.compare("data", page(1), XFER, PATTERN)
    scen.compare("tail", page(1) + XFER, 0x1000 - XFER, FILL)
    seen: dict[str, Any] = {}

    def pause(host) -> None:
        host.stop()
        seen["status"] = host.status()
        seen["page"] = host.read_memory(page(1), XFER)
        host.cont()
        seen["after"] = host.status()
    with target.at("dma-pending", pause):
        out = vtd.run(scen)
    assert (seen["status"], seen["after"]) == ("paused", "running")
    assert seen["page"] == FILL.to_bytes(8, "little") * (XFER // 8), "the DMA landed before the pause"
    assert out.value(done) == 1
    assert (out.mismatches("data"), out.mismatches("tail")) == (0, 0)
    assert out.faults(snap).pending == []


def test_reset_with_translation_on_boots_clean_with_the_unit_off(vtd):
    """A platform reset (QMP system_reset) while translation is on: the payload boots again from
    its first record, finds the unit with translation, interrupt remapping and queued invalidation
    off (GSTS 0, VT-d 10.4.5 / 11.4.5: the register's reset value), and its second walk completes."""
    target = require_qmp(vtd)
    scen = vtd.scenario("reset-mid-run")
    scen.unit.setup_translation(scen.tables.root)
    gsts = scen.unit.read32(REG_GSTS)
    scen.steps.sync("translating")
    mark = scen.steps.mark(0x5E7)
    first_boot: dict[str, Any] = {}

    def reset_once(host) -> None:
        if not first_boot:
            first_boot["gsts"] = next(r.fields[1] for r in host.records
                                      if r.kind == Kind.READ and r.fields[0] == gsts)
            first_boot["records"] = len(host.records)
            host.system_reset()
    with target.at("translating", reset_once, repeat=True):
        out = vtd.run(scen)
    assert first_boot["gsts"] & Gcmd.TE, f"translation was not on before the reset: GSTS {first_boot['gsts']:#x}"
    assert out.run.records[0].kind == Kind.HELLO           # the run's records are the second boot's
    assert out.value(scen.found_gsts) == 0
    assert out.value(gsts) & Gcmd.TE                       # the second boot turned it on again itself
    assert out.run.step_record(mark, Kind.MARK).fields[1] == 0x5E7


@pytest.mark.parametrize("devices", [None, BEHIND_ROOT_PORT], ids=["edu-on-root-bus", "edu-behind-root-port"])
def test_query_pci_agrees_with_the_probe(vtd, devices):
    """QEMU's own PCI hierarchy (query-pci, bridges' secondary buses included) names exactly the
    functions the payload's probe enumerated: the same bus/device/function, vendor, device and
    class for each."""
    runner = vtd.variant(**devices) if devices else vtd
    target = require_qmp(runner)
    scen = runner.scenario("query-pci")
    scen.steps.sync("probed")
    seen: dict[str, Any] = {}
    with target.at("probed", lambda host: seen.update(pci=host.query_pci())):
        out = runner.run(scen)
    qemu = sorted((d["bus"], d["slot"], d["function"], d["vendor"], d["device"], d["class"]) for d in seen["pci"])
    probe = sorted((f.bdf >> 8, f.bdf >> 3 & 0x1F, f.bdf & 7, f.vendor, f.device, f.class_code >> 8)
                   for f in out.run.probe.pci)
    assert qemu == probe
    assert (0x1234, 0x11E8) in {(v, d) for _, _, _, v, d, _ in qemu}
