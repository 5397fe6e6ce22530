"""DMA remapping through second-level tables (VT-d 3.6, 9.8): data lands at the translated
address and nowhere else.  Every test that moves data runs per DMA agent (edu, NVMe, AHCI)."""

from __future__ import annotations

import pytest

from harness.testing import AW48, FILL, XFER, FaultReason as FR, VtdScenario, assert_single_fault, dmar, page
from harness.testing.vtd import AGENT_KINDS, per_agent

pytestmark = pytest.mark.requires("vtd")


def write_through(scen: VtdScenario, iova: int, dom: dmar.SecondLevel, nbytes: int = XFER) -> int:
    """Attach the agent to ``dom``, translate, one DMA write to ``iova``; returns the faults() step."""
    scen.attach(scen.agent, dom, domain_id=1)
    scen.unit.setup_translation(scen.tables.root)
    scen.agent.dma_write(iova, nbytes)
    return scen.unit.faults()


@per_agent
@pytest.mark.parametrize("iova", [0x0, 0x7FF000, 0x1234_5000, 0x7F_FFFF_F000],
                         ids=["zero", "below-8M", "mid", "top-of-39-bit"])
def test_write_4k_lands_at_translated_address(vtd, agent, iova):
    """A DMA write to a 4 KiB mapping fills the mapped page only, with the agent's data; the page's
    tail and the neighbouring pages keep their old contents."""
    runner = vtd.with_agent(agent)
    scen = runner.scenario("write-4k")
    scen.prepare()
    dom = scen.domain()
    dom.map(iova, page(1))
    snap = write_through(scen, iova, dom)
    scen.compare_written("data", scen.agent, page(1), XFER)
    scen.compare("tail", page(1) + XFER, 0x1000 - XFER, FILL)
    scen.compare("before", page(0), 0x1000, FILL)
    scen.compare("after", page(2), 0x1000, FILL)
    out = runner.run(scen)
    assert [out.mismatches(k) for k in ("data", "tail", "before", "after")] == [0, 0, 0, 0]
    assert out.faults(snap).pending == []


@per_agent
@pytest.mark.parametrize("nbytes", [8, 64, 504, 4088])
def test_write_size_is_exact(vtd, agent, nbytes):
    """Exactly ``nbytes`` arrive: the qword after the transfer keeps its old value."""
    runner = vtd.with_agent(agent)
    scen = runner.scenario("write-size")
    scen.require_transfer(nbytes)
    scen.prepare()
    dom = scen.domain()
    dom.map(0x40_0000, page(3))
    snap = write_through(scen, 0x40_0000, dom, nbytes)
    scen.compare_written("data", scen.agent, page(3), nbytes)
    scen.compare("rest", page(3) + nbytes, 0x1000 - nbytes, FILL)
    out = runner.run(scen)
    assert (out.mismatches("data"), out.mismatches("rest")) == (0, 0)
    assert out.faults(snap).pending == []


@per_agent
def test_write_crossing_pages_splits_between_frames(vtd, agent):
    """A DMA crossing an IOVA page boundary continues in the frame the next PTE names, even when
    the frames are not adjacent (and not in IOVA order): its first half ends the first frame, its
    second half (the agent's data from that offset on) starts the second."""
    runner = vtd.with_agent(agent)
    scen = runner.scenario("write-cross")
    half = min(0x400, scen.agent.max_transfer // 2)
    scen.prepare()
    dom = scen.domain()
    dom.map(0x10_0000, page(5))
    dom.map(0x10_1000, page(2))
    snap = write_through(scen, 0x10_1000 - half, dom, 2 * half)
    scen.compare_written("first-part", scen.agent, page(5) + 0x1000 - half, half)
    scen.compare("first-head", page(5), 0x1000 - half, FILL)
    scen.compare_written("second-part", scen.agent, page(2), half, buffer_offset=half)
    scen.compare("second-tail", page(2) + half, 0x1000 - half, FILL)
    scen.compare("between", page(3), 0x2000, FILL)
    out = runner.run(scen)
    assert [out.mismatches(k) for k in scen.checks] == [0] * 5
    assert out.faults(snap).pending == []


@per_agent
def test_read_4k_round_trip(vtd, agent):
    """A DMA read fetches the translated page: read it into the buffer, write it back elsewhere."""
    if not AGENT_KINDS[agent].reads_into_buffer:
        pytest.skip(f"{agent}'s device reads do not load the data its writes carry (see test_device_read_*)")
    scen = vtd.scenario("read-4k")
    scen.prepare()
    other = 0x6B6B_6B6B_0000_1111
    scen.steps.mem_fill(page(4), 0x1000, other)
    dom = scen.domain()
    dom.map(0x20_0000, page(4), write=False)      # source: read-only is enough
    dom.map(0x30_0000, page(6))                   # sink
    scen.attach(scen.agent, dom, domain_id=1)
    scen.unit.setup_translation(scen.tables.root)
    scen.agent.dma_read(0x20_0000, XFER)
    scen.agent.dma_write(0x30_0000, XFER)
    snap = scen.unit.faults()
    scen.compare("sink", page(6), XFER, other)
    scen.compare("source-kept", page(4), 0x1000, other)
    out = vtd.run(scen)
    assert (out.mismatches("sink"), out.mismatches("source-kept")) == (0, 0)
    assert out.faults(snap).pending == []


@per_agent
def test_device_read_through_translation(vtd, agent):
    """A device read of a read-only mapping (to the page the agent reads: plain data for edu and
    NVMe Compare, its own command table for AHCI) completes without a fault and changes nothing
    there; a read of the next, unmapped page faults (reason 6, the agent's source-id, that page)."""
    runner = vtd.with_agent(agent)
    scen = runner.scenario("read-translated")
    scen.prepare()
    source = scen.agent.read_source(page(4))
    dom = scen.domain()
    dom.map(0x20_0000, source, write=False)
    scen.attach(scen.agent, dom, domain_id=1)
    scen.unit.setup_translation(scen.tables.root)
    before = scen.steps.mem_read(source, 8)
    done = scen.agent.dma_read(0x20_0000, XFER)
    clean = scen.unit.faults()
    scen.agent.dma_read(0x20_1000, XFER)
    snap = scen.unit.faults()
    after = scen.steps.mem_read(source, 8)
    scen.compare("untouched", page(0), 0x8000, FILL)
    out = runner.run(scen)
    assert out.value(done) != 0
    assert out.faults(clean).pending == []
    assert_single_fault(out, FR.READ, scen.agent.source_id, 0x20_1000, "read", step=snap)
    assert out.memory(after) == out.memory(before)
    assert out.mismatches("untouched") == 0


LARGE = {"2M": dmar.PAGE_2M, "1G": dmar.PAGE_1G}


@per_agent
@pytest.mark.parametrize("size", ["2M", "1G"])
@pytest.mark.parametrize("levels", [3, 4])
def test_large_page_write(vtd, agent, size, levels):
    """A 2 MiB / 1 GiB leaf (PS=1) maps the IOVA's offset within the large page (9.8)."""
    big = LARGE[size]
    runner = vtd.with_agent(agent)
    runner = runner.variant(**AW48) if levels == 4 else runner
    scen = runner.scenario(f"large-{size}-{levels}", levels=levels)
    scen.prepare()
    dom = scen.domain()
    base_iova = 3 * big if size == "2M" else 5 * big
    phys_base = page(0) & ~(big - 1)               # the large frame holding the target pages
    offset = page(2) - phys_base
    dom.map(base_iova, phys_base, big)
    snap = write_through(scen, base_iova + offset, dom)
    scen.compare_written("data", scen.agent, page(2), XFER)
    scen.compare("around", page(0), 0x2000, FILL)
    scen.compare("after", page(2) + XFER, 0x1000 - XFER, FILL)
    out = runner.run(scen)
    assert [out.mismatches(k) for k in scen.checks] == [0, 0, 0]
    assert out.faults(snap).pending == []


@per_agent
def test_4level_write_above_39_bits(vtd, agent):
    """With 4-level tables (aw-bits=48, AW=2) an IOVA above 2^39 translates."""
    wide = vtd.with_agent(agent).variant(**AW48)
    scen = wide.scenario("4level-high", levels=4)
    scen.prepare()
    dom = scen.domain()
    iova = 0x7A_BCDE_F000 | 1 << 45
    dom.map(iova, page(7))
    snap = write_through(scen, iova, dom)
    scen.compare_written("data", scen.agent, page(7), XFER)
    scen.compare("rest", page(0), 0x7000, FILL)
    out = wide.run(scen)
    assert (out.mismatches("data"), out.mismatches("rest")) == (0, 0)
    assert out.faults(snap).pending == []


def test_4level_unit_reports_sagaw(vtd):
    """aw-bits=48: CAP.SAGAW has bit 1 (39-bit) and bit 2 (48-bit), MGAW is 48 (11.4.2)."""
    wide = vtd.variant(**AW48)
    scen = wide.scenario("sagaw48")
    cap = scen.unit.read64(dmar.REG_CAP)
    out = wide.run(scen)
    value = out.value(cap)
    assert (value >> 8 & 0x1F, (value >> 16 & 0x3F) + 1) == (0b00110, 48)
