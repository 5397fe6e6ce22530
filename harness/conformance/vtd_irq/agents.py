"""Target variants with the DMA agents real hosts have, and the scenario steps controller agents
need (see ``harness.payload.dma``): private ranges mapped in every domain, a reference instead
of a pattern.

The target variants that add them (NVME, AHCI, ...) are harness.testing.vtd's.
"""

from __future__ import annotations

from typing import Any, Sequence

from harness.payload.ahci import Ahci
from harness.payload.dma import DmaAgent
from harness.payload.nvme import Nvme
from harness.payload.pci import bdf
from harness.testing import VtdRunner, VtdScenario, dmar
from harness.testing.vtd import AHCI, NVME, NVME_AHCI, NVME_INTREMAP, TWO_AHCI, TWO_NVME

NVME_ADDR = "0x6.0"
NVME_BDF = bdf(0, 6)
AHCI_BDF = bdf(0, 0x1F, 2)        # q35's built-in ICH9 AHCI; its port 0 is bus "ide.0"

# The variants are the public API's (harness.testing.vtd); this module keeps the addresses the
# tests here name and the scenario helpers they share.
def agent_scenario(vtd: VtdRunner, name: str, kinds: Sequence[type[DmaAgent]], agents: int = 1) -> VtdScenario:
    """A scenario whose agents are of ``kinds`` (skips when the target has fewer than ``agents``)."""
    return vtd.scenario(name, agents=agents, agent_types=tuple(kinds))


def prepare(scen: VtdScenario, fill_pages: int = 8) -> None:
    """Before translation: target pages := FILL, every agent set up with its reference made."""
    scen.prepare(fill_pages)


def attach(scen: VtdScenario, agent: DmaAgent, domain: dmar.SecondLevel, domain_id: int) -> int:
    """Point the agent's context entry at ``domain`` (its private ranges mapped 1:1 there)."""
    return scen.attach(agent, domain, domain_id)


__all__ = ["AHCI", "Ahci", "NVME", "NVME_AHCI", "NVME_INTREMAP", "Nvme", "TWO_AHCI", "TWO_NVME", "agent_scenario", "attach", "prepare"]
