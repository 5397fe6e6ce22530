"""Hot-unplug and replug of a DMA agent behind a PCIe root port while translation is on (issue 14).

The edu function sits at 01:00.0 behind a pcie-root-port with native hot-plug (QEMU's ACPI hot-plug
of bridges is switched off, so the slot's own controller is used: PCIe Base 5.0, 6.7).  The host
asks for the unplug (QMP device_del presses the attention button), the payload powers the slot off
(Slot Control, 7.5.3.10: Power Controller Control = off, Power Indicator = off) and QEMU removes
the function (DEVICE_DELETED).  The host plugs a new edu into the same slot; the payload powers the
slot on, gives the function the BAR the firmware gave the old one and sets it up again.  Its
requests carry the same source-id 01:00.0, so the context entry that was live all along translates
them again (VT-d 3.4): the spec implies no fault, and the data lands at the translated page; a
write to an IOVA that entry's tables do not map faults with reason 5 and source-id 01:00.0.
"""

from __future__ import annotations

from typing import Any

import pytest

from harness.payload.pci import cfg_addr
from harness.testing import PATTERN, XFER, assert_single_fault, page
from harness.payload.vtd import FaultReason
from harness.testing.vtd import STAGING

from .support import require_qmp

pytestmark = [pytest.mark.requires("vtd"), pytest.mark.solo]

ROOT_PORT = 0x06 << 3                   # 00:06.0
AGENT = 1 << 8                          # 01:00.0, on the root port's secondary bus
HOTPLUG = {"devices": [{"driver": "pcie-root-port", "addr": "0x6.0", "id": "rp0", "options": {"chassis": "1"}},
                       {"driver": "edu", "bus": "rp0", "addr": "0x0.0", "id": "dma0",
                        "options": {"dma_mask": "0xffffffffffffffff"}}],
           "extra_args": ["-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off"]}
# QEMU 7.2's pcie-root-port: the PCI Express capability at 0x54 (checked by the test: ID 0x10).
PCIE_CAP = 0x54
SLOT_CONTROL = PCIE_CAP + 0x18          # Slot Control 15:0, Slot Status 31:16 (7.5.3.10, 7.5.3.11)
ATTENTION_OFF = 0b11 << 6               # Attention Indicator Control: off
POWER_ON_INDICATOR = 0b01 << 8          # Power Indicator Control: on
POWER_OFF_INDICATOR = 0b11 << 8         # Power Indicator Control: off
POWER_OFF = 1 << 10                     # Power Controller Control: 1 = off
EDU_ID = 0x11E8_1234
IOVA, IOVA_STAGING, IOVA_AGAIN, IOVA_UNMAPPED = 0x40_0000, 0x50_0000, 0x60_0000, 0x70_0000

# restore_bar(rdi = bdf << 8 | 0x10, rsi = engine variable holding the old BAR0): the firmware
# assigned BAR0 at boot; a hot-plugged function starts unassigned, inside the same bridge window.
RESTORE_BAR = """
restore_bar:
    lea rax, [rip + vars]
    mov rsi, [rax + rsi*8]
    jmp pci_cfg_write32
"""


def test_unplug_and_replug_under_translation_reaches_the_same_context_entry(vtd):
    runner = vtd.variant(**HOTPLUG)
    target = require_qmp(runner)
    scen = runner.scenario("hotplug")
    cap = scen.steps.call("pci_cfg_read32", cfg_addr(ROOT_PORT, PCIE_CAP))
    scen.prepare()
    agent = scen.agent
    dom = scen.domain()
    dom.map(IOVA, page(1))
    dom.map(IOVA_STAGING, STAGING)
    dom.map(IOVA_AGAIN, page(2))
    scen.attach(agent, dom, domain_id=1)
    scen.unit.setup_translation(scen.tables.root)
    first = agent.dma_write(IOVA, XFER)
    scen.steps.sync("unplug")
    scen.steps.call("pci_cfg_write32", cfg_addr(ROOT_PORT, SLOT_CONTROL), POWER_OFF | POWER_OFF_INDICATOR | ATTENTION_OFF)
    scen.steps.sync("replug")
    scen.steps.call("pci_cfg_write32", cfg_addr(ROOT_PORT, SLOT_CONTROL), POWER_ON_INDICATOR | ATTENTION_OFF)
    scen.scenario.asm.append(RESTORE_BAR)
    scen.steps.call("restore_bar", cfg_addr(AGENT, 0x10), agent.bar_var, quiet=True)
    ident = agent.setup()
    agent.dma_read(IOVA_STAGING, XFER)               # translated: the new function's buffer := PATTERN
    again = agent.dma_write(IOVA_AGAIN, XFER)
    snap = scen.unit.faults()
    agent.dma_write(IOVA_UNMAPPED, XFER)             # and a miss is judged by that entry's tables
    missed = scen.unit.faults()
    scen.compare("first", page(1), XFER, PATTERN)
    scen.compare("again", page(2), XFER, PATTERN)
    seen: dict[str, Any] = {}

    def unplug(host) -> None:
        host.device_del("dma0")

    def replug(host) -> None:
        seen["deleted"] = host.wait_event("DEVICE_DELETED", 10.0, device="dma0")
        seen["gone"] = [(d["bus"], d["slot"]) for d in host.query_pci()]
        host.device_add("edu", "dma0", bus="rp0", addr="0x0", dma_mask=(1 << 64) - 1)
        seen["back"] = [(d["bus"], d["slot"], d["vendor"], d["device"]) for d in host.query_pci()]
    with target.at({"unplug": unplug, "replug": replug}):
        out = runner.run(scen)
    assert out.value(cap) & 0xFF == 0x10, f"no PCI Express capability at {PCIE_CAP:#x}: {out.value(cap):#x}"
    assert out.value(first) == 1
    assert seen["deleted"]["data"]["device"] == "dma0"
    assert (1, 0) not in seen["gone"]
    assert (1, 0, 0x1234, 0x11E8) in seen["back"]
    assert out.value(ident) == EDU_ID
    assert out.value(again) == 1
    assert (out.mismatches("first"), out.mismatches("again")) == (0, 0)
    assert out.faults(snap).pending == []
    assert_single_fault(out, FaultReason.WRITE, AGENT, IOVA_UNMAPPED, "write", step=missed)
