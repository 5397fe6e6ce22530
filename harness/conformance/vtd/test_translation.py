"""DMA remapping through second-level tables (VT-d 3.6, 9.8): data lands at the translated
address and nowhere else."""

from __future__ import annotations

import pytest

from harness.payload import vtd

from .vtd_support import AW48, EDU0, FILL, PATTERN, XFER, VtdScenario, page

pytestmark = pytest.mark.requires("vtd")


def write_through(scen: VtdScenario, iova: int, dom: vtd.SecondLevel, nbytes: int = XFER) -> None:
    scen.tables.attach(EDU0, dom, domain_id=1)
    scen.unit.setup_translation(scen.tables.root)
    scen.edu.dma_write(iova, nbytes)
    scen.unit.faults()


@pytest.mark.parametrize("iova", [0x0, 0x7FF000, 0x1234_5000, 0x7F_FFFF_F000],
                         ids=["zero", "below-8M", "mid", "top-of-39-bit"])
def test_write_4k_lands_at_translated_address(vtx_target, vtd_run, iova):
    """A DMA write to a 4 KiB mapping fills the mapped page only; the page's tail and the
    neighbouring pages keep their old contents."""
    scen = VtdScenario("write-4k")
    scen.prepare()
    dom = scen.domain()
    dom.map(iova, page(1))
    write_through(scen, iova, dom)
    scen.compare("data", page(1), XFER, PATTERN)
    scen.compare("tail", page(1) + XFER, 0x1000 - XFER, FILL)
    scen.compare("before", page(0), 0x1000, FILL)
    scen.compare("after", page(2), 0x1000, FILL)
    out = vtd_run.run(scen)
    assert [out.mismatches(k) for k in ("data", "tail", "before", "after")] == [0, 0, 0, 0]
    assert out.faults().pending == []


@pytest.mark.parametrize("nbytes", [8, 64, 4088])
def test_write_size_is_exact(vtx_target, vtd_run, nbytes):
    """Exactly ``nbytes`` arrive: the qword after the transfer keeps its old value."""
    scen = VtdScenario("write-size")
    scen.prepare()
    dom = scen.domain()
    dom.map(0x40_0000, page(3))
    write_through(scen, 0x40_0000, dom, nbytes)
    scen.compare("data", page(3), nbytes, PATTERN)
    scen.compare("rest", page(3) + nbytes, 0x1000 - nbytes, FILL)
    out = vtd_run.run(scen)
    assert (out.mismatches("data"), out.mismatches("rest")) == (0, 0)


def test_write_crossing_pages_splits_between_frames(vtx_target, vtd_run):
    """A DMA crossing an IOVA page boundary continues in the frame the next PTE names, even when
    the frames are not adjacent (and not in IOVA order)."""
    scen = VtdScenario("write-cross")
    scen.prepare()
    dom = scen.domain()
    dom.map(0x10_0000, page(5))
    dom.map(0x10_1000, page(2))
    write_through(scen, 0x10_0C00, dom, 0x800)
    scen.compare("first-part", page(5) + 0xC00, 0x400, PATTERN)
    scen.compare("first-head", page(5), 0xC00, FILL)
    scen.compare("second-part", page(2), 0x400, PATTERN)
    scen.compare("second-tail", page(2) + 0x400, 0xC00, FILL)
    scen.compare("between", page(3), 0x2000, FILL)
    out = vtd_run.run(scen)
    assert [out.mismatches(k) for k in scen.checks] == [0] * 5


def test_read_4k_round_trip(vtx_target, vtd_run):
    """A DMA read fetches the translated page: read it into the buffer, write it back elsewhere."""
    scen = VtdScenario("read-4k")
    scen.prepare()
    other = 0x6B6B_6B6B_0000_1111
    scen.steps.mem_fill(page(4), 0x1000, other)
    dom = scen.domain()
    dom.map(0x20_0000, page(4), write=False)      # source: read-only is enough
    dom.map(0x30_0000, page(6))                   # sink
    scen.tables.attach(EDU0, dom, domain_id=1)
    scen.unit.setup_translation(scen.tables.root)
    scen.edu.dma_read(0x20_0000, XFER)
    scen.edu.dma_write(0x30_0000, XFER)
    scen.unit.faults()
    scen.compare("sink", page(6), XFER, other)
    scen.compare("source-kept", page(4), 0x1000, other)
    out = vtd_run.run(scen)
    assert (out.mismatches("sink"), out.mismatches("source-kept")) == (0, 0)
    assert out.faults().pending == []


LARGE = {"2M": vtd.PAGE_2M, "1G": vtd.PAGE_1G}


@pytest.mark.parametrize("size", ["2M", "1G"])
@pytest.mark.parametrize("levels", [3, 4])
def test_large_page_write(vtx_target, vtd_run, size, levels):
    """A 2 MiB / 1 GiB leaf (PS=1) maps the IOVA's offset within the large page (9.8)."""
    big = LARGE[size]
    scen = VtdScenario(f"large-{size}-{levels}", levels=levels)
    scen.prepare()
    dom = scen.domain()
    base_iova = 3 * big if size == "2M" else 5 * big
    phys_base = page(0) & ~(big - 1)               # the large frame holding the target pages
    offset = page(2) - phys_base
    dom.map(base_iova, phys_base, big)
    write_through(scen, base_iova + offset, dom)
    scen.compare("data", page(2), XFER, PATTERN)
    scen.compare("around", page(0), 0x2000, FILL)
    scen.compare("after", page(2) + XFER, 0x1000 - XFER, FILL)
    out = vtd_run.run(scen, AW48 if levels == 4 else None)
    assert [out.mismatches(k) for k in scen.checks] == [0, 0, 0]
    assert out.faults().pending == []


def test_4level_write_above_39_bits(vtx_target, vtd_run):
    """With 4-level tables (aw-bits=48, AW=2) an IOVA above 2^39 translates."""
    scen = VtdScenario("4level-high", levels=4)
    scen.prepare()
    dom = scen.domain()
    iova = 0x7A_BCDE_F000 | 1 << 45
    dom.map(iova, page(7))
    write_through(scen, iova, dom)
    scen.compare("data", page(7), XFER, PATTERN)
    scen.compare("rest", page(0), 0x7000, FILL)
    out = vtd_run.run(scen, AW48)
    assert (out.mismatches("data"), out.mismatches("rest")) == (0, 0)
    assert out.faults().pending == []


def test_4level_unit_reports_sagaw(vtx_target, vtd_run):
    """aw-bits=48: CAP.SAGAW has bit 1 (39-bit) and bit 2 (48-bit), MGAW is 48 (11.4.2)."""
    scen = VtdScenario("sagaw48")
    cap = scen.unit.read64(vtd.REG_CAP)
    out = vtd_run.run(scen, AW48)
    value = out.value(cap)
    assert (value >> 8 & 0x1F, (value >> 16 & 0x3F) + 1) == (0b00110, 48)
