"""The agents never issue a media-writing command: QEMU's own trace of every NVMe admin and I/O
command (``pci_nvme_admin_cmd``, ``pci_nvme_io_cmd``) and every ATA command an IDE/AHCI device
executes (``ide_exec_cmd``) is read back, and each one the payload caused is on the allow-lists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from harness.payload.ahci import ATA_ALLOWED, Ahci
from harness.payload.nvme import ADMIN_ALLOWED, NVM_ALLOWED, Nvme
from harness.testing import XFER, page

from .agents import NVME_AHCI, agent_scenario, attach, prepare

pytestmark = pytest.mark.requires("vtd")

COMMAND_TRACES = ["pci_nvme_admin_cmd", "pci_nvme_io_cmd", "ide_exec_cmd"]
_NVME = re.compile(r"pci_nvme_(admin|io)_cmd\b.*?\bopc 0x([0-9a-f]+)")
_ATA = re.compile(r"ide_exec_cmd\b.*?\bcmd 0x([0-9a-f]+)")


def commands(trace: Path) -> list[tuple[str, int]]:
    """(set, opcode) of every command QEMU traced, in order; set is admin, io or ata.  Commands
    before the payload's first DMAR register write are the firmware's and are left out."""
    out: list[tuple[str, int]] = []
    started = False
    for line in trace.read_text(errors="replace").splitlines():
        if "vtd_reg_write" in line:
            started = True
        elif started and (m := _NVME.search(line)):
            out.append((m[1], int(m[2], 16)))
        elif started and (m := _ATA.search(line)):
            out.append(("ata", int(m[1], 16)))
    return out


@pytest.mark.solo          # reads its own QEMU trace: never batched with other scenarios
def test_agents_issue_only_allow_listed_commands(vtd):
    """Set-up, references, translated writes and reads and Identify on an NVMe and an AHCI agent:
    QEMU executed commands, and every one is allow-listed (none writes media)."""
    base = vtd.target.config.section.get("trace") or []      # a kvmrunner section: None = the base's
    runner = vtd.variant(**NVME_AHCI, trace=[*base, "vtd_reg_write", *COMMAND_TRACES])
    scen = agent_scenario(runner, "no-media-writes", [Nvme, Ahci], agents=2)
    nvme, ahci = scen.agents
    prepare(scen)
    for i, agent in enumerate(scen.agents):
        dom = scen.domain()
        dom.map(0x40_0000, page(1 + i))
        dom.map(0x50_0000, agent.read_source(page(3 + i)), write=False)
        attach(scen, agent, dom, 1 + i)
    scen.unit.setup_translation(scen.tables.root)
    for agent in scen.agents:
        agent.dma_write(0x40_0000, XFER)
        agent.dma_read(0x50_0000, XFER)
    nvme.identify(0x40_0000)
    nvme.wait()
    out = runner.run(scen)
    seen = commands(Path(out.run.evidence) / "qemu-trace.log")
    allowed = ({("admin", op) for op in ADMIN_ALLOWED} | {("io", op) for op in NVM_ALLOWED}
               | {("ata", op) for op in ATA_ALLOWED})
    assert [c for c in seen if c not in allowed] == []
    # exactly the commands the steps asked for, in order: QEMU's trace saw all of them
    assert seen == [("admin", 0x05), ("admin", 0x01), ("admin", 0x02),   # I/O CQ, I/O SQ, NVMe reference
                    ("ata", 0xEC),                                        # AHCI reference
                    ("admin", 0x02), ("io", 0x05),                        # NVMe write (log page), read (Compare)
                    ("ata", 0xEC), ("ata", 0xEC),                         # AHCI write, read (table fetch)
                    ("admin", 0x06)], f"QEMU traced {seen}"               # Identify
