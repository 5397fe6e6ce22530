"""NVMe and AHCI as DMA agents through DMA remapping (VT-d 3.6, 7.1): their writes land at the
translated address only, a write to an unmapped IOVA faults with the agent's source-id (taken from
the probe), and the controllers' own queue and command-list traffic is translated too."""

from __future__ import annotations

import pytest

from harness.payload.ahci import Ahci
from harness.payload.nvme import STATUS_COMPARE_FAILURE, Nvme, status_of
from harness.testing import FILL, XFER, FaultReason as FR, assert_single_fault, page

from .agents import AHCI, NVME, NVME_AHCI, agent_scenario, attach, prepare

pytestmark = pytest.mark.requires("vtd")

IOVA = 0x40_0000
KINDS = {"nvme": (Nvme, NVME), "ahci": (Ahci, AHCI)}


@pytest.fixture(params=sorted(KINDS))
def agent_kind(request, vtd):
    kind, variant = KINDS[request.param]
    return kind, vtd.variant(**variant)


def test_write_lands_at_translated_address(agent_kind):
    """A device write of XFER bytes to IOVA lands in the page IOVA maps to, equal to the agent's
    own untranslated reference, and nowhere else; no fault is recorded."""
    kind, runner = agent_kind
    scen = agent_scenario(runner, f"{kind.NAME}-write", [kind])
    prepare(scen)
    dom = scen.domain()
    dom.map(IOVA, page(1))
    attach(scen, scen.agent, dom, 1)
    scen.unit.setup_translation(scen.tables.root)
    done = scen.agent.dma_write(IOVA, XFER)
    snap = scen.unit.faults()
    scen.check("data", scen.agent.check_written(page(1), XFER))
    scen.compare("rest", page(1) + XFER, 0x1000 - XFER, FILL)
    scen.compare("others", page(2), 0x3000, FILL)
    scen.compare("ref-not-fill", scen.agent.reference, XFER, FILL)
    out = runner.run(scen)
    assert out.value(done) != 0
    if kind is Nvme:
        assert status_of(out.value(done)) == 0
    assert out.mismatches("ref-not-fill") == XFER // 8      # the reference is the device's data
    assert out.value(scen.checks["data"]) == 0
    assert out.mismatches("rest") == 0 and out.mismatches("others") == 0
    assert out.faults(snap).pending == []


def test_write_to_unmapped_iova_faults(agent_kind):
    """IOVA unmapped (its private queues mapped): fault reason 5 (a write the second-level
    entry does not permit: it is not present, VT-d appendix A), the agent's probed source-id, the page of IOVA; memory untouched."""
    kind, runner = agent_kind
    scen = agent_scenario(runner, f"{kind.NAME}-unmapped", [kind])
    prepare(scen)
    dom = scen.domain()
    dom.map(IOVA + 0x10_0000, page(1))
    attach(scen, scen.agent, dom, 1)
    scen.unit.setup_translation(scen.tables.root)
    scen.agent.dma_write(IOVA, XFER)
    snap = scen.unit.faults()
    scen.compare("untouched", page(0), 0x8000, FILL)
    out = runner.run(scen)
    assert_single_fault(out, FR.WRITE, scen.agent.source_id, IOVA, "write", step=snap)
    assert out.mismatches("untouched") == 0


def test_device_read_through_translation(agent_kind):
    """A device read of IOVA2 (mapped to the agent's read source) completes without fault; one of
    IOVA (unmapped) faults with reason 6 (read not permitted), the agent's source-id and IOVA's page."""
    kind, runner = agent_kind
    scen = agent_scenario(runner, f"{kind.NAME}-read", [kind])
    prepare(scen)
    dom = scen.domain()
    dom.map(IOVA + 0x10_0000, scen.agent.read_source(page(1)), write=False)
    attach(scen, scen.agent, dom, 1)
    scen.unit.setup_translation(scen.tables.root)
    done = scen.agent.dma_read(IOVA + 0x10_0000, XFER)
    clean = scen.unit.faults()
    scen.agent.dma_read(IOVA, XFER)
    snap = scen.unit.faults()
    scen.compare("untouched", page(0), 0x8000, FILL)
    out = runner.run(scen)
    assert out.value(done) != 0
    assert out.faults(clean).pending == []
    assert_single_fault(out, FR.READ, scen.agent.source_id, IOVA, "read", step=snap)
    assert out.mismatches("untouched") == 0


def test_nvme_compare_reads_the_translated_page(vtd):
    """Compare (NVMe 1.4, 6.6) of one block against QEMU's zero-reading namespace: through an IOVA
    mapped to a zeroed page it succeeds (status 0); through one mapped to a FILL page it reports
    Compare Failure (SCT 2h, SC 85h): the device read exactly the page the domain maps."""
    runner = vtd.variant(**NVME)
    scen = agent_scenario(runner, "nvme-compare", [Nvme])
    prepare(scen)
    scen.steps.mem_fill(page(1), 0x1000, 0)
    dom = scen.domain()
    dom.map(IOVA, page(1), write=False)
    dom.map(IOVA + 0x1000, page(2), write=False)
    attach(scen, scen.agent, dom, 1)
    scen.unit.setup_translation(scen.tables.root)
    zeros = scen.agent.dma_read(IOVA, 512)
    fill = scen.agent.dma_read(IOVA + 0x1000, 512)
    snap = scen.unit.faults()
    out = runner.run(scen)
    assert status_of(out.value(zeros)) == 0
    assert status_of(out.value(fill)) == STATUS_COMPARE_FAILURE
    assert out.faults(snap).pending == []


def test_nvme_and_ahci_isolated_in_two_domains(vtd):
    """NVMe in domain 1 (IOVA -> page 1), AHCI in domain 2 (IOVA -> page 2, IOVA2 unmapped): NVMe's
    512-byte write fills page 1 only and AHCI's 256-byte write page 2 only, each with its own
    device's data (page 2 beyond 256 bytes stays FILL: no NVMe byte reached it); AHCI's write to
    IOVA2, which only domain 1 maps (-> page 3), faults (reason 5, AHCI's source-id) and page 3
    stays FILL.  Every compare is of memory's final state."""
    runner = vtd.variant(**NVME_AHCI)
    scen = agent_scenario(runner, "nvme-ahci-isolation", [Nvme, Ahci], agents=2)
    nvme, ahci = scen.agents
    assert (type(nvme), type(ahci)) == (Nvme, Ahci) and nvme.source_id != ahci.source_id
    prepare(scen)
    d1, d2 = scen.domain(), scen.domain()
    d1.map(IOVA, page(1))
    d1.map(IOVA + 0x10_0000, page(3))
    d2.map(IOVA, page(2))
    attach(scen, nvme, d1, 1)
    attach(scen, ahci, d2, 2)
    scen.unit.setup_translation(scen.tables.root)
    nvme.dma_write(IOVA, 2 * XFER)
    ahci.dma_write(IOVA, XFER)
    clean = scen.unit.faults()
    ahci.dma_write(IOVA + 0x10_0000, XFER)
    snap = scen.unit.faults()
    scen.check("p1-nvme", nvme.check_written(page(1), 2 * XFER))
    scen.compare("p1-rest", page(1) + 2 * XFER, 0x1000 - 2 * XFER, FILL)
    scen.check("p2-ahci", ahci.check_written(page(2), XFER))
    scen.compare("p2-rest", page(2) + XFER, 0x1000 - XFER, FILL)
    scen.compare("p3", page(3), 0x1000, FILL)
    out = runner.run(scen)
    assert [out.value(scen.checks[k]) for k in ("p1-nvme", "p2-ahci")] == [0, 0]
    assert [out.mismatches(k) for k in ("p1-rest", "p2-rest", "p3")] == [0, 0, 0]
    assert out.faults(clean).pending == []
    assert_single_fault(out, FR.WRITE, ahci.source_id, IOVA + 0x10_0000, "write", step=snap)


def test_controller_structures_are_translated_too(agent_kind):
    """Attached without its private ranges mapped, the controller's first DMA is its own command
    fetch (NVMe: the submission queue entry; AHCI: the command header), which faults as a read
    (reason 6) at that structure's address with the agent's source-id; the data never lands and the
    completion never comes.  (Why every domain an agent joins maps ``private_ranges``.)"""
    kind, runner = agent_kind
    scen = agent_scenario(runner, f"{kind.NAME}-own-dma", [kind])
    prepare(scen)
    dom = scen.domain()
    dom.map(IOVA, page(1))
    scen.attach(scen.agent, dom, 1, private=False)      # private ranges left unmapped
    scen.unit.setup_translation(scen.tables.root)
    done = scen.agent.dma_write(IOVA, XFER)
    snap = scen.unit.faults()
    scen.compare("untouched", page(0), 0x8000, FILL)
    out = runner.run(scen)
    fetched = scen.agent.private_ranges()[0][0]          # ASQ slot 0 page / command list
    faults = out.faults(snap).pending
    assert [(f.reason, f.source_id, f.access, f.fault_info) for f in faults][:1] == \
        [(FR.READ, scen.agent.source_id, "read", fetched)], f"{[str(f) for f in faults]}"
    assert out.mismatches("untouched") == 0
    if kind is Nvme:
        assert out.value(done) == 0                      # no completion entry was posted
