"""NVMe and AHCI agents, built without booting: their structures match the specifications'
layouts, and nothing that writes media (or might) can be built or issued."""

from __future__ import annotations

import struct

import pytest

from harness.payload import ahci, nvme
from harness.payload.dma import AGENT_AREA, AGENT_AREA_SIZE, DestructiveCommand, agent_area
from harness.payload.edu import Edu
from harness.payload.steps import FIRST_FREE_VAR, Op, StepList

# Commands that write, erase or re-flash media, or change what the host can read back: each must be
# refused.  NVMe 1.4 Figure 139 (admin) and Figure 346 (NVM); ACS-3 Table 206 (ATA).
NVME_ADMIN_DESTRUCTIVE = {0x09: "Set Features", 0x0D: "Namespace Management", 0x10: "Firmware Commit",
                          0x11: "Firmware Image Download", 0x14: "Device Self-test", 0x15: "Namespace Attachment",
                          0x19: "Directive Send", 0x1D: "NVMe-MI Send", 0x80: "Format NVM", 0x81: "Security Send",
                          0x84: "Sanitize", **{op: "vendor specific" for op in range(0xC0, 0x100)}}
NVM_DESTRUCTIVE = {0x00: "Flush", 0x01: "Write", 0x04: "Write Uncorrectable", 0x08: "Write Zeroes",
                   0x09: "Dataset Management (deallocate/trim)", 0x0D: "Reservation Register",
                   0x11: "Reservation Acquire", 0x15: "Reservation Release", 0x19: "Copy",
                   **{op: "vendor specific" for op in range(0x80, 0x100)}}
ATA_DESTRUCTIVE = {0x06: "DATA SET MANAGEMENT (TRIM)", 0x30: "WRITE SECTORS", 0x34: "WRITE SECTORS EXT",
                   0x35: "WRITE DMA EXT", 0x3F: "WRITE LOG EXT", 0x45: "WRITE UNCORRECTABLE EXT",
                   0x61: "WRITE FPDMA QUEUED", 0x92: "DOWNLOAD MICROCODE", 0x93: "DOWNLOAD MICROCODE DMA",
                   0xB4: "SANITIZE DEVICE", 0xC5: "WRITE MULTIPLE", 0xCA: "WRITE DMA", 0xEF: "SET FEATURES",
                   0xF3: "SECURITY ERASE PREPARE", 0xF4: "SECURITY ERASE UNIT", 0xF6: "SECURITY SET PASSWORD",
                   **{op: "vendor specific" for op in range(0x80, 0x90)}}


@pytest.mark.parametrize("opcode", sorted(NVME_ADMIN_DESTRUCTIVE))
def test_nvme_admin_commands_that_change_media_cannot_be_built(opcode):
    with pytest.raises(DestructiveCommand, match=f"opcode {opcode:#04x}"):
        nvme.admin_command(opcode, 0)


@pytest.mark.parametrize("opcode", sorted(NVM_DESTRUCTIVE))
def test_nvm_commands_that_write_media_cannot_be_built(opcode):
    with pytest.raises(DestructiveCommand, match=f"opcode {opcode:#04x}"):
        nvme.nvm_command(opcode, 0, nsid=1)


@pytest.mark.parametrize("command", sorted(ATA_DESTRUCTIVE))
def test_ata_commands_that_write_media_cannot_be_built(command):
    with pytest.raises(DestructiveCommand, match=f"ATA command {command:#04x}"):
        ahci.h2d_fis(command)


def test_only_the_allow_lists_build():
    """Of all 256 opcodes of each set, exactly the allow-listed ones build."""
    def builds(make) -> set[int]:
        ok = set()
        for op in range(256):
            try:
                make(op)
            except DestructiveCommand:
                continue
            ok.add(op)
        return ok
    assert builds(lambda op: nvme.admin_command(op, 0, cdw=(nvme.LOG_COMMAND_EFFECTS,))) == set(nvme.ADMIN_ALLOWED)
    assert builds(lambda op: nvme.nvm_command(op, 0, nsid=1)) == {0x05}
    assert builds(ahci.h2d_fis) == {0xEC, 0xA1}


@pytest.mark.parametrize("lid", [0x04, 0x06, 0x80, 0xC0, 0xFF])
def test_get_log_page_only_for_allowed_logs(lid):
    """Log pages outside the list (changed-namespace list, device self-test, vendor logs, ...) refused."""
    with pytest.raises(DestructiveCommand, match="log page"):
        nvme.admin_command(nvme.OP_GET_LOG_PAGE, 0, cdw=(lid,))


def test_submission_entry_layout():
    """NVMe 1.4, 4.2 Figure 105: CDW0 opcode 7:0 and CID 31:16, NSID at 4, PRP1 at 24, PRP2 at 32,
    CDW10..15 at 40..63."""
    e = nvme.admin_command(nvme.OP_GET_LOG_PAGE, 7, nsid=0xFFFFFFFF, prp1=0x1234_5000, prp2=0x1234_6000,
                           cdw=(0x003F_0005, 0, 0x100, 0))
    assert len(e) == 64
    cdw0, nsid = struct.unpack_from("<II", e, 0)
    assert (cdw0 & 0xFF, cdw0 >> 16, cdw0 >> 8 & 0xFF, nsid) == (0x02, 7, 0, 0xFFFFFFFF)
    assert struct.unpack_from("<QQ", e, 24) == (0x1234_5000, 0x1234_6000)
    assert struct.unpack_from("<6I", e, 40) == (0x003F_0005, 0, 0x100, 0, 0, 0)


@pytest.mark.parametrize("addr, n, want", [(0x40_0000, 256, (0x40_0000, 0)), (0x40_0F00, 0x200, (0x40_0F00, 0x40_1000)),
                                           (0x40_0000, 0x1000, (0x40_0000, 0))])
def test_prp_entries(addr, n, want):
    """PRP1 carries the offset; PRP2 is the next page only when the transfer crosses (4.3)."""
    assert nvme.prps(addr, n) == want


def test_prp_refuses_what_needs_a_list_or_misaligns():
    with pytest.raises(ValueError, match="two PRP"):
        nvme.prps(0x40_0800, 0x1000 + 0x900)
    with pytest.raises(ValueError, match="dword"):
        nvme.prps(0x40_0002, 8)


def test_ahci_structures():
    """AHCI 1.3.1 4.2.2/4.2.3.3 and SATA 10.5.5: header CFL 5 and PRDTL, CTBA; PRD DBC = n - 1;
    H2D FIS type 27h, C bit, command byte."""
    hdr = ahci.command_header(0x1E0_0800, 3)
    assert struct.unpack_from("<IIII", hdr) == (5 | 3 << 16, 0, 0x1E0_0800, 0) and len(hdr) == 32
    assert struct.unpack("<IIII", ahci.prd(0x1_2345_6780, 256)) == (0x2345_6780, 1, 0, 255)
    fis = ahci.h2d_fis(0xEC)
    assert fis[:3] == bytes([0x27, 0x80, 0xEC]) and len(fis) == 20
    with pytest.raises(ValueError, match="128-byte"):
        ahci.command_header(0x1E0_0840, 1)
    with pytest.raises(ValueError, match="even"):
        ahci.prd(0x1000, 255)


def _written_qwords(steps: StepList) -> dict[int, int]:
    """Memory the steps store with 8-byte writes (address -> last value)."""
    return {s.args[0]: s.args[1] for s in steps.steps if s.op == Op.MMIO_WRITE and s.size == 8 and s.base is None}


def test_an_nvme_agent_issues_only_allowed_commands():
    """Every submission queue entry an agent's steps place (set-up, reads, writes, Identify) has an
    allow-listed opcode; the queues sit in the agent's private slice."""
    steps = StepList()
    a = nvme.Nvme(steps, bdf=0x30)
    a.setup()
    a.load(0x100_0000)
    a.dma_write(0x40_0000, 256, buffer_offset=0x40)
    a.dma_read(0x40_0000, 256)
    a.identify(0x50_0000)
    mem = _written_qwords(steps)
    found = []
    for queue, ring, allowed in ((0, nvme.ASQ_OFF, nvme.ADMIN_ALLOWED), (1, nvme.IOSQ_OFF, nvme.NVM_ALLOWED)):
        slot = 0
        while a.area + ring + 64 * slot in mem:
            opcode = mem[a.area + ring + 64 * slot] & 0xFF
            assert opcode in allowed, f"queue {queue} slot {slot}: opcode {opcode:#x}"
            found.append((queue, opcode))
            slot += 1
    assert found == [(0, 0x05), (0, 0x01), (0, 0x02), (0, 0x02), (0, 0x06), (1, 0x05)]
    assert [e[0] for e in a.commands] == [0x05, 0x01, 0x02, 0x02, 0x05, 0x06]    # in issue order
    assert a.private_ranges() == [(AGENT_AREA, nvme.PRIVATE_BYTES)] and a.reference >= AGENT_AREA + nvme.PRIVATE_BYTES


def test_an_ahci_agent_issues_only_identify_and_scatters_exactly():
    """Every command FIS is IDENTIFY DEVICE; a write of n bytes from offset k puts exactly n bytes
    at the IOVA, the rest of the 512 into the private sink."""
    steps = StepList()
    a = ahci.Ahci(steps, bdf=0xFA, bar_var=FIRST_FREE_VAR + 1)
    a.setup()
    a.load(0x100_0000)
    a.dma_write(0x40_0000, 256, buffer_offset=0x40)
    a.dma_read(0x50_0000, 256)
    assert {f[2] for f in a.fises} == {0xEC}
    mem = _written_qwords(steps)
    table = a.area + ahci.TABLE_OFF
    prds = [struct.unpack("<IIII", struct.pack("<QQ", mem[table + 0x80 + 16 * i], mem[table + 0x88 + 16 * i]))
            for i in range(3)]
    assert [(p[0], p[3] + 1) for p in prds] == [(a.area + ahci.SINK_OFF, 0x40), (0x40_0000, 256),
                                                 (a.area + ahci.SINK_OFF + 0x140, 512 - 0x40 - 256)]
    assert a.area == AGENT_AREA + AGENT_AREA_SIZE


def test_agents_match_by_class_code_and_edu_by_id():
    """NVMe 01:08:02 and AHCI 01:06:01 by class code whatever the vendor; edu by 1234:11e8."""
    assert nvme.Nvme.matches(0x8086, 0xF1A8, 0x010802) and not nvme.Nvme.matches(0x1B36, 0x0010, 0x010801)
    assert ahci.Ahci.matches(0x8086, 0x2922, 0x010601) and not ahci.Ahci.matches(0x8086, 0x2922, 0x010185)
    assert Edu.matches(0x1234, 0x11E8, 0x00FF00) and not Edu.matches(0x1234, 0x11E9, 0x00FF00)


def test_agent_slices_are_bounded():
    assert agent_area(FIRST_FREE_VAR) == AGENT_AREA
    with pytest.raises(ValueError, match="at most 2"):
        agent_area(FIRST_FREE_VAR + 2)
