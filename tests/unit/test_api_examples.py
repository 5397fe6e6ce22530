"""The README's "Writing a test" examples, run for real on the selected targets; a check keeps the
README's code blocks identical to the code here."""

from __future__ import annotations

import re
from pathlib import Path

# --- README: a VT-d test -------------------------------------------------------------------------
import pytest
from harness.testing import PATTERN, XFER, FaultReason, assert_single_fault, page


@pytest.mark.requires("vtd")
def test_dma_write_lands_in_the_mapped_page_only(vtd):
    s = vtd.scenario("dma-write")            # resets the DMAR unit; finds a DMA agent (edu) in the probe
    s.prepare()                              # agent buffer := PATTERN, target pages := FILL
    dom = s.domain()                         # second-level tables (3 levels)
    dom.map(0x40_0000, page(1))
    s.attach(s.agent, dom, domain_id=1)      # context entry at the agent's probed source-id
    s.unit.setup_translation(s.tables.root)
    s.agent.dma_write(0x40_0000, XFER)       # mapped: lands in page 1
    s.agent.dma_write(0x80_0000, XFER)       # unmapped: blocked and recorded
    snapshot = s.unit.faults()
    s.compare("data", page(1), XFER, PATTERN)
    out = vtd.run(s)
    assert out.mismatches("data") == 0
    assert_single_fault(out, FaultReason.WRITE, s.agent.source_id, 0x80_0000, "write", step=snapshot)
# --- end -----------------------------------------------------------------------------------------


# --- README: a VMX test --------------------------------------------------------------------------
from harness.testing import Action, Exit, vmx_test


@vmx_test()
def test_cpuid_exits_and_is_skipped_by_its_length(v):
    v.guest("""
        xor eax, eax
        cpuid
        vmcall
    """)
    v.on(Exit.CPUID, Action.skip())          # resume after the instruction (Action.resume(): retry it)
    v.enter_guest()
    r = yield                                # this guest's VmxResult (guests share boots in batches)
    assert r.reasons() == [Exit.CPUID, Exit.VMCALL]
    assert r.exit.length == 2 and r.exits[1].rip == r.exit.rip + 2
# --- end -----------------------------------------------------------------------------------------


# --- README: a probe read ------------------------------------------------------------------------
from harness.testing import Scenario


@pytest.mark.requires("vtd")
def test_dmar_version_register_reads_1_0(vtx_target):
    s = Scenario(name="ver")
    i = s.steps.mmio_read(0x0, size=4, base=1)       # vars[1] = first DMAR unit's base (probed)
    assert vtx_target.run(s).expect_ok().value(i) == 0x10
# --- end -----------------------------------------------------------------------------------------


def test_readme_shows_exactly_these_examples():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Writing a test", 1)[1].split("\n## ", 1)[0]
    shown = re.findall(r"```python\n(.*?)```", section, re.S)
    here = re.findall(r"# --- README: .*?-\n(.*?)# --- end", Path(__file__).read_text(), re.S)
    assert [b.strip() for b in shown] == [b.strip() for b in here]
