"""Isolation between requesters (VT-d 3.4, 9.3): each device reaches only its domain's memory.
Every test runs per DMA agent kind (two of a kind where two devices are needed); isolation
between an NVMe and an AHCI controller is in harness/conformance/vtd_irq/test_agents.py."""

from __future__ import annotations

import pytest

from harness.testing import (
    FILL, XFER, FaultReason as FR, assert_single_fault, page,
)
from harness.testing.vtd import per_agent

pytestmark = pytest.mark.requires("vtd")

IOVA = 0x60_0000


@per_agent
def test_two_domains_same_iova_reach_own_pages(vtd, agent):
    """Both devices write the same IOVA; domain 1 maps it to page 1, domain 2 to page 2."""
    vtd = vtd.with_agent(agent, 2)
    two = vtd
    scen = two.scenario("two-domains", agents=2)
    scen.prepare()
    d1, d2 = scen.domain(), scen.domain()
    d1.map(IOVA, page(1))
    d2.map(IOVA, page(2))
    scen.attach(scen.agents[0], d1, 1)
    scen.attach(scen.agents[1], d2, 2)
    scen.unit.setup_translation(scen.tables.root)
    scen.agents[0].dma_write(IOVA, XFER)
    scen.compare_written("p1-after-dev0", scen.agents[0], page(1), XFER)
    scen.compare("p2-after-dev0", page(2), 0x1000, FILL)
    scen.agents[1].dma_write(IOVA, XFER)
    scen.compare_written("p2-after-dev1", scen.agents[1], page(2), XFER)
    scen.compare("others", page(3), 0x3000, FILL)
    snap = scen.unit.faults()
    out = two.run(scen)
    assert [out.mismatches(k) for k in scen.checks] == [0, 0, 0, 0]
    assert out.faults(snap).pending == []


@per_agent
def test_device_cannot_reach_other_domain(vtd, agent):
    """Device 2 writing an IOVA mapped only in device 1's domain faults (reason 5, its own
    source-id) and device 1's page stays untouched."""
    vtd = vtd.with_agent(agent, 2)
    two = vtd
    scen = two.scenario("cross-domain", agents=2)
    scen.prepare()
    d1, d2 = scen.domain(), scen.domain()
    d1.map(IOVA, page(1))
    d2.map(IOVA + 0x1000, page(2))
    scen.attach(scen.agents[0], d1, 1)
    scen.attach(scen.agents[1], d2, 2)
    scen.unit.setup_translation(scen.tables.root)
    scen.agents[1].dma_write(IOVA, XFER)
    snap = scen.unit.faults()
    scen.compare("all", page(0), 0x8000, FILL)
    out = two.run(scen)
    assert scen.agents[0].source_id != scen.agents[1].source_id
    assert_single_fault(out, FR.WRITE, scen.agents[1].source_id, IOVA, "write", step=snap)
    assert out.mismatches("all") == 0


@per_agent
def test_device_without_context_entry_reaches_nothing(vtd, agent):
    """Device 1 translates normally; device 2 has no context entry: reason 2, nothing written."""
    vtd = vtd.with_agent(agent, 2)
    two = vtd
    scen = two.scenario("no-context", agents=2)
    scen.require_self_contained()
    scen.prepare()
    d1 = scen.domain()
    d1.map(IOVA, page(1))
    scen.attach(scen.agents[0], d1, 1)
    scen.unit.setup_translation(scen.tables.root)
    scen.agents[1].dma_write(page(3), XFER)        # an identity-looking address: still blocked
    snap = scen.unit.faults()
    scen.compare("blocked", page(3), 0x1000, FILL)
    scen.unit.clear_faults()
    scen.agents[0].dma_write(IOVA, XFER)
    scen.compare_written("dev0-ok", scen.agents[0], page(1), XFER)
    out = two.run(scen)
    assert_single_fault(out, FR.CONTEXT_NOT_PRESENT, scen.agents[1].source_id, page(3), "write", step=snap)
    assert (out.mismatches("blocked"), out.mismatches("dev0-ok")) == (0, 0)


@pytest.mark.requires("vtd.pass_through")
@per_agent
def test_pass_through_reaches_physical_memory(vtd, agent):
    """TT = 10b: the DMA address is the physical address (9.3), no fault."""
    vtd = vtd.with_agent(agent)
    scen = vtd.scenario("pass-through")
    scen.prepare()
    scen.tables.pass_through(scen.agent.source_id, 3)
    scen.unit.setup_translation(scen.tables.root)
    scen.agent.dma_write(page(4) + 0x100, XFER)
    snap = scen.unit.faults()
    scen.compare_written("data", scen.agent, page(4) + 0x100, XFER)
    scen.compare("head", page(4), 0x100, FILL)
    scen.compare("tail", page(4) + 0x100 + XFER, 0x1000 - 0x100 - XFER, FILL)
    out = vtd.run(scen)
    assert [out.mismatches(k) for k in scen.checks] == [0, 0, 0]
    assert out.faults(snap).pending == []


@per_agent
def test_translation_disabled_is_physical(vtd, agent):
    """Root table set but GCMD.TE never set: DMA addresses are physical (10.4.4 TES=0)."""
    vtd = vtd.with_agent(agent)
    scen = vtd.scenario("te-off")
    scen.prepare()
    scen.tables.context_table(scen.agent.source_id >> 8)
    scen.unit.set_root_table(scen.tables.root)
    scen.agent.dma_write(page(5), XFER)
    snap = scen.unit.faults()
    scen.compare_written("data", scen.agent, page(5), XFER)
    out = vtd.run(scen)
    assert out.mismatches("data") == 0
    assert out.faults(snap).pending == []


@per_agent
def test_agent_behind_a_root_port_uses_its_own_bus(vtd, agent):
    """An agent behind a PCIe root port is found on the port's secondary bus, and its requests
    carry that bus in their source-id (3.4.1): its context entry lives in that bus's context table,
    and a fault records that source-id."""
    behind = vtd.with_agent(agent, behind_root_port=True)
    ports = [f for f in behind.probe.pci if f.is_bridge]
    assert ports, f"no bridge in the probe: {[str(f) for f in behind.probe.pci]}"
    scen = behind.scenario("behind-root-port")
    assert scen.agent.source_id >> 8 == ports[0].secondary_bus != 0
    scen.prepare()
    dom = scen.domain()
    dom.map(IOVA, page(1))
    scen.attach(scen.agent, dom, 1)
    scen.unit.setup_translation(scen.tables.root)
    scen.agent.dma_write(IOVA, XFER)
    scen.agent.dma_write(IOVA + 0x1000, XFER)     # unmapped
    snap = scen.unit.faults()
    scen.compare_written("data", scen.agent, page(1), XFER)
    scen.compare("rest", page(2), 0x6000, FILL)
    out = behind.run(scen)
    assert (out.mismatches("data"), out.mismatches("rest")) == (0, 0)
    assert_single_fault(out, FR.WRITE, scen.agent.source_id, IOVA + 0x1000, "write", step=snap)
