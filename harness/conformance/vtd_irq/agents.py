"""Target variants with the DMA agents real hosts have, and the scenario steps controller agents
need (see ``harness.payload.dma``): private ranges mapped in every domain, a reference instead
of a pattern.

QEMU's drives here are ``null-co`` block nodes with ``read-zeroes=on``: no host file exists at all
(reads return zeros, nothing is stored), so there is nothing to create or remove; the agents never
issue a media-writing command anyway.  NVMe's drive is read-only.  ``ide-hd`` refuses a read-only
node, and the harness' escape-hatch check counts every writable ``-drive`` as a host file, so the
AHCI variants say ``allow_host_files: true`` for this one drive that has no file.
"""

from __future__ import annotations

from typing import Any, Sequence

from harness.payload.ahci import Ahci
from harness.payload.dma import DmaAgent
from harness.payload.nvme import Nvme
from harness.payload.pci import bdf
from harness.testing import FILL, PAGES, STAGING, VtdRunner, VtdScenario, dmar

NVME_ADDR = "0x6.0"
NVME_BDF = bdf(0, 6)
AHCI_BDF = bdf(0, 0x1F, 2)        # q35's built-in ICH9 AHCI; its port 0 is bus "ide.0"

_NVME_DEVICE = {"driver": "nvme", "addr": NVME_ADDR, "options": {"drive": "vtxnvm0", "serial": "vtx-nvme0"}}
_NVME_DRIVE = ["-drive", "if=none,id=vtxnvm0,driver=null-co,read-zeroes=on,readonly=on"]
_AHCI_DEVICE = {"driver": "ide-hd", "bus": "ide.0", "options": {"drive": "vtxsata0"}}
_AHCI_DRIVE = ["-drive", "if=none,id=vtxsata0,driver=null-co,read-zeroes=on"]

NVME: dict[str, Any] = {"devices": [_NVME_DEVICE], "extra_args": _NVME_DRIVE}
AHCI: dict[str, Any] = {"devices": [_AHCI_DEVICE], "extra_args": _AHCI_DRIVE, "allow_host_files": True}
NVME_AHCI: dict[str, Any] = {"devices": [_NVME_DEVICE, _AHCI_DEVICE], "extra_args": _NVME_DRIVE + _AHCI_DRIVE,
                             "allow_host_files": True}
NVME_INTREMAP: dict[str, Any] = {**NVME, "iommu": {"intremap": True}}
# Two agents of one kind (isolation between two domains): a second NVMe controller with its own
# drive; a second AHCI HBA (ich9-ahci) at 00:07.0 whose port 0 has a disk.
TWO_NVME: dict[str, Any] = {
    "devices": [_NVME_DEVICE, {"driver": "nvme", "addr": "0x7.0", "options": {"drive": "vtxnvm1", "serial": "vtx-nvme1"}}],
    "extra_args": _NVME_DRIVE + ["-drive", "if=none,id=vtxnvm1,driver=null-co,read-zeroes=on,readonly=on"]}
TWO_AHCI: dict[str, Any] = {
    "devices": [{"driver": "ich9-ahci", "addr": "0x7.0", "id": "vtxahci"},
                {"driver": "ide-hd", "bus": "vtxahci.0", "options": {"drive": "vtxsata1"}}, _AHCI_DEVICE],
    "extra_args": _AHCI_DRIVE + ["-drive", "if=none,id=vtxsata1,driver=null-co,read-zeroes=on"],
    "allow_host_files": True}


def agent_scenario(vtd: VtdRunner, name: str, kinds: Sequence[type[DmaAgent]], agents: int = 1) -> VtdScenario:
    """A scenario whose agents are of ``kinds`` (skips when the target has fewer than ``agents``)."""
    return vtd.scenario(name, agents=agents, agent_types=tuple(kinds))


def prepare(scen: VtdScenario, fill_pages: int = 8) -> None:
    """Before translation: fill the target pages with FILL, set every agent up and let it make its
    reference (edu: loaded from STAGING)."""
    scen.steps.mem_fill(PAGES, fill_pages * 0x1000, FILL)
    for a, fn in zip(scen.agents, scen.functions):
        scen.identity_checks.append((a.setup(), fn.vendor | fn.device << 16, fn))
        a.load(STAGING)


def attach(scen: VtdScenario, agent: DmaAgent, domain: dmar.SecondLevel, domain_id: int) -> int:
    """Map the agent's private ranges 1:1 in ``domain``, then point its context entry at it."""
    for addr, size in agent.private_ranges():
        domain.map_range(addr, addr, size)
    return scen.attach(agent, domain, domain_id)


__all__ = ["AHCI", "Ahci", "NVME", "NVME_AHCI", "NVME_INTREMAP", "Nvme", "TWO_AHCI", "TWO_NVME", "agent_scenario", "attach", "prepare"]
