"""DMA remapping through second-level tables (VT-d 3.6, 9.8): data lands at the translated
address and nowhere else."""

from __future__ import annotations

import pytest

from harness.testing import AW48, FILL, PATTERN, XFER, VtdScenario, dmar, page

pytestmark = pytest.mark.requires("vtd")


def write_through(scen: VtdScenario, iova: int, dom: dmar.SecondLevel, nbytes: int = XFER) -> int:
    """Attach the agent to ``dom``, translate, one DMA write to ``iova``; returns the faults() step."""
    scen.attach(scen.agent, dom, domain_id=1)
    scen.unit.setup_translation(scen.tables.root)
    scen.agent.dma_write(iova, nbytes)
    return scen.unit.faults()


@pytest.mark.parametrize("iova", [0x0, 0x7FF000, 0x1234_5000, 0x7F_FFFF_F000],
                         ids=["zero", "below-8M", "mid", "top-of-39-bit"])
def test_write_4k_lands_at_translated_address(vtd, iova):
    """A DMA write to a 4 KiB mapping fills the mapped page only; the page's tail and the
    neighbouring pages keep their old contents."""
    scen = vtd.scenario("write-4k")
    scen.prepare()
    dom = scen.domain()
    dom.map(iova, page(1))
    snap = write_through(scen, iova, dom)
    scen.compare("data", page(1), XFER, PATTERN)
    scen.compare("tail", page(1) + XFER, 0x1000 - XFER, FILL)
    scen.compare("before", page(0), 0x1000, FILL)
    scen.compare("after", page(2), 0x1000, FILL)
    out = vtd.run(scen)
    assert [out.mismatches(k) for k in ("data", "tail", "before", "after")] == [0, 0, 0, 0]
    assert out.faults(snap).pending == []


@pytest.mark.parametrize("nbytes", [8, 64, 4088])
def test_write_size_is_exact(vtd, nbytes):
    """Exactly ``nbytes`` arrive: the qword after the transfer keeps its old value."""
    scen = vtd.scenario("write-size")
    scen.prepare()
    dom = scen.domain()
    dom.map(0x40_0000, page(3))
    snap = write_through(scen, 0x40_0000, dom, nbytes)
    scen.compare("data", page(3), nbytes, PATTERN)
    scen.compare("rest", page(3) + nbytes, 0x1000 - nbytes, FILL)
    out = vtd.run(scen)
    assert (out.mismatches("data"), out.mismatches("rest")) == (0, 0)
    assert out.faults(snap).pending == []


def test_write_crossing_pages_splits_between_frames(vtd):
    """A DMA crossing an IOVA page boundary continues in the frame the next PTE names, even when
    the frames are not adjacent (and not in IOVA order)."""
    scen = vtd.scenario("write-cross")
    scen.prepare()
    dom = scen.domain()
    dom.map(0x10_0000, page(5))
    dom.map(0x10_1000, page(2))
    snap = write_through(scen, 0x10_0C00, dom, 0x800)
    scen.compare("first-part", page(5) + 0xC00, 0x400, PATTERN)
    scen.compare("first-head", page(5), 0xC00, FILL)
    scen.compare("second-part", page(2), 0x400, PATTERN)
    scen.compare("second-tail", page(2) + 0x400, 0xC00, FILL)
    scen.compare("between", page(3), 0x2000, FILL)
    out = vtd.run(scen)
    assert [out.mismatches(k) for k in scen.checks] == [0] * 5
    assert out.faults(snap).pending == []


def test_read_4k_round_trip(vtd):
    """A DMA read fetches the translated page: read it into the buffer, write it back elsewhere."""
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


LARGE = {"2M": dmar.PAGE_2M, "1G": dmar.PAGE_1G}


@pytest.mark.parametrize("size", ["2M", "1G"])
@pytest.mark.parametrize("levels", [3, 4])
def test_large_page_write(vtd, size, levels):
    """A 2 MiB / 1 GiB leaf (PS=1) maps the IOVA's offset within the large page (9.8)."""
    big = LARGE[size]
    runner = vtd.variant(**AW48) if levels == 4 else vtd
    scen = runner.scenario(f"large-{size}-{levels}", levels=levels)
    scen.prepare()
    dom = scen.domain()
    base_iova = 3 * big if size == "2M" else 5 * big
    phys_base = page(0) & ~(big - 1)               # the large frame holding the target pages
    offset = page(2) - phys_base
    dom.map(base_iova, phys_base, big)
    snap = write_through(scen, base_iova + offset, dom)
    scen.compare("data", page(2), XFER, PATTERN)
    scen.compare("around", page(0), 0x2000, FILL)
    scen.compare("after", page(2) + XFER, 0x1000 - XFER, FILL)
    out = runner.run(scen)
    assert [out.mismatches(k) for k in scen.checks] == [0, 0, 0]
    assert out.faults(snap).pending == []


def test_4level_write_above_39_bits(vtd):
    """With 4-level tables (aw-bits=48, AW=2) an IOVA above 2^39 translates."""
    wide = vtd.variant(**AW48)
    scen = wide.scenario("4level-high", levels=4)
    scen.prepare()
    dom = scen.domain()
    iova = 0x7A_BCDE_F000 | 1 << 45
    dom.map(iova, page(7))
    snap = write_through(scen, iova, dom)
    scen.compare("data", page(7), XFER, PATTERN)
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
