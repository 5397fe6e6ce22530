"""NVMe and AHCI as DMA agents through DMA remapping (VT-d 3.6, 7.1): their writes land at the
translated address only, a write to an unmapped IOVA faults with the agent's source-id (taken from
the probe), and the controllers' own queue and command-list traffic is translated too."""

from __future__ import annotations

import pytest

from harness.payload.ahci import Ahci
from harness.payload.nvme import Nvme, status_of
from harness.testing import FILL, XFER, FaultReason as FR, assert_single_fault, page

from .agents import AHCI, NVME, agent_scenario, attach, prepare

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
