"""The host-side memory witness (issue 14): on QEMU every memory compare of the payload is also
read by the host through QMP, at a sync point after the compares, and the two must agree.  A
payload that lies about its compare is caught; an honest one passes, match or mismatch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.observe.witness import MemoryWitness, WitnessDisagreement
from harness.testing import FILL, PATTERN, XFER, VtdScenario, page

from .support import require_qmp

pytestmark = [pytest.mark.requires("vtd"), pytest.mark.solo]

IOVA = 0x40_0000

# A compare routine that lies: it reports MEMCMP(step, 0 mismatches, no offset, 0) for the step
# index in rdi without looking at memory (records.py: MEMCMP layout).
LYING_COMPARE = """
lying_compare:
    mov rax, rdi
    mov edi, K_MEMCMP
    call rec_begin
    mov rdi, rax
    call rec_u64
    xor edi, edi
    call rec_u64
    mov rdi, -1
    call rec_u64
    xor edi, edi
    call rec_u64
    call rec_end
    xor eax, eax
    ret
"""


def write_to_page1(scen: VtdScenario, nbytes: int = XFER) -> int:
    """A translated DMA write of ``nbytes`` to page(1); returns the faults() step."""
    scen.prepare()
    dom = scen.domain()
    dom.map(IOVA, page(1))
    scen.attach(scen.agent, dom, domain_id=1)
    scen.unit.setup_translation(scen.tables.root)
    scen.agent.dma_write(IOVA, nbytes)
    return scen.unit.faults()


def witness_log(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out.run.evidence) / "witness.jsonl").read_text().splitlines()]


def test_witness_agrees_with_honest_compares(vtd):
    """A DMA write of 256 bytes: the host reads the same memory the payload compared and agrees on
    every value of each record (mismatches, first mismatching offset, value there): a match where
    the data landed, and 32 mismatching qwords starting at +0x100 where a 512-byte compare runs
    past the transfer."""
    target = require_qmp(vtd)
    scen = vtd.scenario("witness-honest")
    snap = write_to_page1(scen)
    scen.compare("data", page(1), XFER, PATTERN)
    scen.compare("past-the-end", page(1), 2 * XFER, PATTERN)
    witness = MemoryWitness.attach(scen.steps, "witness")
    with target.at(witness.point, witness.read):
        out = vtd.run(scen)
    results = witness.check(out.run, scen.checks)
    assert [(r["label"], r["host"], r["agree"]) for r in results] == [
        ("data", [0, (1 << 64) - 1, 0], True),
        ("past-the-end", [XFER // 8, XFER, FILL], True)]
    assert (out.mismatches("data"), out.mismatches("past-the-end")) == (0, XFER // 8)
    assert out.faults(snap).pending == []
    logged = witness_log(out)      # the runner's own automatic witness may have logged these too
    assert {"data", "past-the-end"} <= {e["label"] for e in logged} and all(e["agree"] for e in logged)


def test_a_payload_lying_about_its_compare_is_caught(vtd):
    """No DMA reaches page(1) (it goes to page(2)), yet a lying compare routine reports a match
    for page(1): the payload's own record says 0 mismatches, the host reads FILL there, and the
    witness fails the check naming the compare and both readings."""
    target = require_qmp(vtd)
    scen = vtd.scenario("witness-lie")
    scen.prepare()
    dom = scen.domain()
    dom.map(IOVA, page(2))
    scen.attach(scen.agent, dom, domain_id=1)
    scen.unit.setup_translation(scen.tables.root)
    scen.agent.dma_write(IOVA, XFER)
    scen.scenario.asm.append(LYING_COMPARE)
    lie = scen.check("data", scen.steps.call("lying_compare", len(scen.steps.steps), quiet=True))
    witness = MemoryWitness.attach(scen.steps, "witness")
    witness.expect(lie, page(1), XFER, PATTERN, "data")
    with target.at(witness.point, witness.read):
        out = vtd.run(scen)
    assert out.mismatches("data") == 0                 # the lie, as the payload tells it
    with pytest.raises(WitnessDisagreement) as caught:
        witness.check(out.run, scen.checks)
    assert (f"compare 'data' of {XFER} bytes at {page(1):#x} against {PATTERN:#x}: the payload reports "
            f"a match, the host read {XFER // 8} mismatching qwords, first at +0x0 holding {FILL:#x}") \
        in str(caught.value)
    assert [(e["payload"], e["host"]) for e in witness_log(out) if not e["agree"]] == \
        [([0, (1 << 64) - 1, 0], [XFER // 8, 0, FILL])]
