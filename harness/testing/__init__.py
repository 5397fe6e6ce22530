"""The public API for writing VT-x / VT-d tests against the installed harness.

Fixtures (registered by the ``vtx`` pytest plugin): ``vtx_target`` (the target, parametrised per
selected target), ``evidence_dir``, ``vtd`` (VT-d scenarios, :class:`VtdRunner`) and ``vmx`` (the
VMX batch session behind :func:`vmx_test`).  Everything a test imports comes from here::

    from harness.testing import FaultReason, PATTERN, XFER, assert_single_fault, page, vmx_test

The building blocks underneath are public too: ``dmar`` is ``harness.payload.vtd`` (root, context,
second-level and interrupt-remapping entries, invalidation descriptors, register offsets; the
fixture ``vtd`` takes that short name), and the VMX names come from ``harness.payload.vmx``.
``@deviation(on, section, observed, layer)`` declares a target's known spec deviation: the test is a
strict xfail there only (:mod:`harness.testing.deviations`).
"""

from ..observe.probe import PciFunction, Probe
from ..observe.vmx import VmExit, VmxResult
from ..observe.vtd import FaultRecord, FaultStatus, QiWait
from ..payload import vtd as dmar  # DMA-remapping structures and registers (VT-d 9, 11)
from ..payload.dma import DmaAgent
from ..payload.edu import Edu
from ..payload.image import Scenario
from ..payload.vmx import ept  # EPT entries and permissions (SDM Vol. 3C, 29.3.2)
from ..payload.vmx.builder import RFLAGS_FIXED, RFLAGS_IF, Action, Mode, VmxTest
from ..payload.vmx.controls import EntryCtl, ExitCtl, Pin, Proc, Proc2, VmxCaps
from ..payload.vmx.fields import ENTRY_FAILURE, Exit, F, VmError
from ..payload.vmx.vmm import Op, StopWhy
from ..payload.vtd import FaultReason, Gcmd, InvQueue
from .combined import (
    DirectOutcome, DirectRunner, DirectScenario, L2Guest, dma_asm, done_asm, raise_irq_asm, store_asm, vmm_page,
    wait_asm,
)
from .deviations import Deviation, deviation
from .vmx import new_guest, requires, run_guest, vmx_caps, vmx_test
from ..observe.platform import DMAR_CHECKS, Finding, NotApplicable, PlatformSnapshot, take_snapshot
from ..payload import acpi  # ACPI table dump routine and byte builders (ACPI 6.x, VT-d 8)
from ..payload.ahci import Ahci
from ..payload.nvme import Nvme
from .vtd import (
    AGENT_KINDS, AGENT_TYPES, AHCI, AW48, BEHIND_ROOT_PORT, CACHING_MODE, FILL, INTREMAP, NVME, NVME_AHCI,
    NVME_BEHIND_ROOT_PORT, NVME_INTREMAP, PAGES, PATTERN, QEMU_IOMMU, STAGING, TWO_AHCI, TWO_EDU, TWO_NVME, XFER, AgentKind,
    VtdOutcome, VtdRunner, VtdScenario, assert_fault, assert_single_fault, find_agents, page, per_agent,
)

__all__ = [
    "AGENT_TYPES", "AW48", "BEHIND_ROOT_PORT", "ENTRY_FAILURE", "RFLAGS_FIXED", "RFLAGS_IF", "StopWhy", "VmxCaps", "ept",
    "new_guest", "run_guest", "vmx_caps", "Action", "CACHING_MODE", "DmaAgent", "Edu", "EntryCtl", "Exit", "ExitCtl",
    "F", "FILL", "FaultReason", "FaultRecord", "FaultStatus", "Gcmd", "INTREMAP", "InvQueue", "Mode",
    "Op", "PAGES", "PATTERN", "PciFunction", "Pin", "Probe", "Proc", "Proc2", "QiWait", "STAGING",
    "Scenario", "TWO_EDU", "VmError", "VmExit", "VmxResult", "VmxTest", "VtdOutcome", "VtdRunner",
    "VtdScenario", "XFER", "assert_fault", "assert_single_fault", "find_agents", "page", "vmx_test",
    "dmar", "Deviation", "deviation", "requires",
    "AGENT_KINDS", "AHCI", "Ahci", "AgentKind", "NVME", "NVME_AHCI", "NVME_BEHIND_ROOT_PORT", "NVME_INTREMAP",
    "Nvme", "QEMU_IOMMU", "TWO_AHCI", "TWO_NVME", "per_agent",
    "DirectOutcome", "DirectRunner", "DirectScenario", "L2Guest", "dma_asm", "done_asm", "raise_irq_asm",
    "store_asm", "vmm_page", "wait_asm",
    "DMAR_CHECKS", "Finding", "NotApplicable", "PlatformSnapshot", "acpi", "take_snapshot",
]
