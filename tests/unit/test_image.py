"""Images: same scenario, same bytes; multiboot ELF32 layout; BIOS disk image layout."""

import struct

from harness.payload import layout
from harness.payload.image import Scenario, build, elf32_segments
from harness.payload.steps import Op, Step, StepList, steps_asm


def scenario(tag: int) -> Scenario:
    s = Scenario(name="img")
    s.steps.mark(tag)
    return s


def test_same_scenario_gives_the_same_image(tmp_path, monkeypatch):
    monkeypatch.setenv("VTX_CACHE", str(tmp_path))
    a, b = build(scenario(1)), build(scenario(1))
    assert a.key == b.key and a.elf.read_bytes() == b.elf.read_bytes()
    assert build(scenario(2)).key != a.key
    assert len(list((tmp_path / "images").iterdir())) == 2          # cached once per content


def test_elf32_multiboot_header_within_first_8k(tmp_path, monkeypatch):
    monkeypatch.setenv("VTX_CACHE", str(tmp_path))
    elf = build(scenario(1)).elf.read_bytes()
    assert elf[:5] == b"\x7fELF\x01" and struct.unpack_from("<H", elf, 18)[0] == 3   # ELF32, EM_386
    at = elf.find(struct.pack("<I", 0x1BADB002))
    assert 0 <= at < 8192 and at % 4 == 0
    magic, flags, checksum = struct.unpack_from("<III", elf, at)
    assert (magic + flags + checksum) & 0xFFFFFFFF == 0              # Multiboot spec 3.1.1
    entry, segs = elf32_segments(elf)
    assert segs[0][0] == layout.IMAGE_BASE and layout.IMAGE_BASE <= entry < layout.ENGINE_LIMIT
    assert any(addr == layout.ARENA_BASE for addr, _ in segs)       # page tables where Python put them


def test_disk_image_boot_sector_and_segment_table(tmp_path, monkeypatch):
    monkeypatch.setenv("VTX_CACHE", str(tmp_path))
    img = build(scenario(1))
    disk = img.disk().read_bytes()
    assert disk[510:512] == b"\x55\xaa"
    assert len(disk) % (16 * 63 * 512) == 0
    entry, segs = elf32_segments(img.elf.read_bytes())
    lba = 1
    for addr, data in segs:                                          # segments follow in order
        assert disk[lba * 512: lba * 512 + len(data)] == data
        lba += -(-len(data) // 512)


def test_step_table_encodes_flags_and_symbols():
    st = StepList()
    st.mmio_write(0x10, 0xAB, size=2, base=1, store=6, quiet=True)
    st.call("routine", 1, 2)
    text = steps_asm(st.steps)
    assert ".quad 0x1, 0x20761, 0x10, 0xab, 0x0, 0x0, 0x0, 0x0" in text   # size 2; USE_BASE|STORE|QUIET; store 6; base 1
    assert ".quad 0xd, 0x80000, routine, 0x1, 0x2, 0x0, 0x0, 0x0" in text
    assert text.rstrip().endswith("END")
    assert Step(Op.MARK, (5,)).words()[:3] == [int(Op.MARK), 8 << 16, 5]


def test_a_called_routine_brings_its_library(tmp_path, monkeypatch):
    """vtd_reset lives in vtd_reset.VTD_RESET_ASM and calls into vtd.VTD_ASM: calling it is enough."""
    from harness.payload import vtd, vtd_reset
    monkeypatch.setenv("VTX_CACHE", str(tmp_path))
    s = Scenario(name="lib")
    s.steps.call("vtd_reset", 1)
    s.steps.call("pci_cfg_read32", 0x2000)                           # the engine's own
    text = s.source(0)
    assert text.count("\nvtd_reset:") == 1 and text.count("\nvtd_gcmd:") == 1
    assert text.index(vtd.VTD_ASM) < text.index(vtd_reset.VTD_RESET_ASM)
    build(s)
    by_hand = Scenario(name="lib")                                   # carried by hand: not twice
    by_hand.asm.append(vtd.VTD_ASM)
    by_hand.steps.call("vtd_faults", 1)
    assert by_hand.source(0).count("\nvtd_faults:") == 1


def test_a_routine_nobody_defines_is_named(tmp_path, monkeypatch):
    import pytest
    from harness.errors import BuildError
    monkeypatch.setenv("VTX_CACHE", str(tmp_path))
    s = Scenario(name="missing")
    s.steps.mark(1)
    s.steps.call("pci_cfg_read64", 0)
    with pytest.raises(BuildError, match=r"step 1 calls 'pci_cfg_read64', which neither the engine"):
        build(s)
    s = Scenario(name="missing-in-asm")
    s.asm.append("my_routine:\n    call vtd_gcmd_typo\n    ret\n")
    with pytest.raises(BuildError, match=r"'vtd_gcmd_typo' is defined nowhere"):
        build(s)
