"""The public test-writing API without a target: agents found in the probe's PCI list, scenario
building, fault-record fields, snapshots and waits looked up by step, distinct wait data."""

from __future__ import annotations

import struct
from types import SimpleNamespace

import pytest

from harness.observe import vtd as ovtd
from harness.observe.probe import PciFunction, Probe
from harness.payload.image import build
from harness.payload.pci import PCI_RECORD, bdf
from harness.payload.records import Kind, Record
from harness.payload.vtd import VtdKind, WAIT_DATA_BASE
from harness.testing import Edu, FaultReason, InvQueue, VtdScenario, assert_fault, find_agents, page, vmx_test

EDU_ID = (0x1234, 0x11E8)


def probe_with(*functions: PciFunction) -> Probe:
    return Probe(pci=list(functions))


def fn(b: int, vendor_device: tuple[int, int] = EDU_ID, class_code: int = 0xFF00) -> PciFunction:
    return PciFunction(b, vendor_device[0], vendor_device[1], class_code, 0x10, 0)


def test_probe_records_decode_into_pci_functions():
    records = [Record(0, PCI_RECORD, (0x00, 0x29C0_8086, 0x0600_0000, 0x00, 0)),
               Record(1, PCI_RECORD, (0x08, 0x0001_1B36, 0x0604_0000, 0x01, 0x0002_0200)),  # bridge to bus 2
               Record(2, PCI_RECORD, (0x0200, 0x11E8_1234, 0x00FF_0010, 0x80, 0)),
               Record(3, Kind.PROBE_DONE, ())]
    p = Probe.from_records(records)
    assert [str(f) for f in p.pci] == ["00:00.0 8086:29c0 class 060000", "00:01.0 1b36:0001 class 060400",
                                       "02:00.0 1234:11e8 class 00ff00"]
    bridge = p.pci[1]
    assert (bridge.is_bridge, bridge.secondary_bus) == (True, 2)
    assert p.pci_functions(vendor=0x1234) == [p.pci[2]]
    assert p.pci_functions(class_code=0x060400) == [bridge]


def test_agents_come_from_the_probe_not_from_constants():
    """Two edu functions, one behind a bridge on bus 2: the scenario's agents carry their probed
    source-ids, and attaching one fills the context table of its own bus (VT-d 9.1, 9.3)."""
    probe = probe_with(fn(bdf(0, 0), (0x8086, 0x29C0), 0x060000), fn(bdf(0, 7)), fn(bdf(2, 0, 3)))
    assert [f.bdf for _, f in find_agents(probe)] == [bdf(0, 7), bdf(2, 0, 3)]
    scen = VtdScenario("agents", probe, "synthetic", agents=2)
    assert [a.source_id for a in scen.agents] == [bdf(0, 7), bdf(2, 0, 3)]
    assert [a.vector for a in scen.agents] == [0x50, 0x51] and scen.agents[0].bar_var != scen.agents[1].bar_var
    dom = scen.domain()
    dom.map(0x1000, page(1))
    entry = scen.attach(scen.agents[1], dom, domain_id=9)
    assert entry == scen.tables.context_tables[2] + 16 * bdf(0, 0, 3)
    lo, hi = struct.unpack("<QQ", scen.arena.read(entry, 16))
    assert (lo & ~0xFFF, lo & 1, hi >> 8 & 0xFFFF) == (dom.root, 1, 9)
    assert scen.steps.steps[0].args[0] == "vtd_reset"           # the unit is reset first
    build(scen.scenario)                                          # routines bring their assembly


def test_too_few_agents_skip_with_what_the_target_has():
    with pytest.raises(pytest.skip.Exception, match=r"requires 2 DMA agent\(s\) \(edu\); target t has "
                                                    r"edu at 00:04.0 1234:11e8 class 00ff00 \(probed\)"):
        VtdScenario("two", probe_with(fn(bdf(0, 4))), "t", agents=2)


def test_edu_matches_only_its_ids():
    assert Edu.matches(0x1234, 0x11E8, 0xFF00) and not Edu.matches(0x1234, 0x11E9, 0xFF00)


def test_wait_status_data_is_distinct_per_submit():
    scen = VtdScenario("qi", probe_with(fn(bdf(0, 4))), "t")
    q = InvQueue(scen.arena, scen.unit)
    status = scen.arena.alloc(8, 8)
    a, b = q.submit((2 | 1 << 4, 0), wait_status=status), q.submit((2 | 1 << 4, 0), wait_status=status)
    c = q.submit((2 | 1 << 4, 0), wait_status=status, status_data=0x77)
    assert (q.status_data[a], q.status_data[b], q.status_data[c]) == (WAIT_DATA_BASE + 1, WAIT_DATA_BASE + 2, 0x77)
    wait_lo = struct.unpack("<Q", scen.arena.read(q.base + 16 * 3, 8))[0]      # the second batch's wait
    assert (wait_lo & 0xF, wait_lo >> 32) == (5, WAIT_DATA_BASE + 2)
    with pytest.raises(ValueError, match="non-zero dword"):
        q.submit(wait_status=status, status_data=0)


def frcd(lo: int, hi: int) -> ovtd.FaultRecord:
    return ovtd.FaultRecord(0, lo, hi)


def test_fault_record_fields_and_exact_assertion():
    sid = bdf(0, 4)
    rec = frcd(0x50_0000, 1 << 63 | FaultReason.WRITE << 32 | sid)
    assert (rec.fault_info, rec.address, rec.address_type, rec.pasid) == (0x50_0000, 0x50_0000, 0, None)
    assert_fault(rec, FaultReason.WRITE, sid, 0x50_0123, "write")    # FI holds the page only (11.4.14)
    for wrong in ((FaultReason.READ, sid, 0x50_0000, "write"), (FaultReason.WRITE, sid + 1, 0x50_0000, "write"),
                  (FaultReason.WRITE, sid, 0x51_0000, "write"), (FaultReason.WRITE, sid, 0x50_0000, "read")):
        with pytest.raises(AssertionError):
            assert_fault(rec, *wrong)
    with pytest.raises(AssertionError, match="FI"):                     # a reserved bit 11:0 set
        assert_fault(frcd(0x50_0004, rec.hi), FaultReason.WRITE, sid, 0x50_0000, "write")
    with pytest.raises(AssertionError):                                 # a translated request (AT 2)
        assert_fault(frcd(0x50_0000, rec.hi | 2 << 60), FaultReason.WRITE, sid, 0x50_0000, "write")
    with_pasid = frcd(0x50_0000, rec.hi | 1 << 31 | 0x123 << 40)
    assert with_pasid.pasid == 0x123


def test_snapshots_and_waits_are_found_by_step():
    """Records of a routine sit between the previous step's record and the routine's CALL record."""
    def call(step: int, value: int = 0) -> tuple[int, tuple[int, ...]]:
        return (Kind.CALL, (step, value, 0))
    raw = [(Kind.PROBE_DONE, ()),
           (VtdKind.FSTS, (0xFED9_0000, 0, 0)), (VtdKind.FRCD, (0xFED9_0000, 0, 0, 0)), call(3, 0),
           (Kind.READ, (4, 7, 0)),
           (VtdKind.QI_WAIT, (0x2000, WAIT_DATA_BASE + 1, 5)), call(6, WAIT_DATA_BASE + 1),
           (VtdKind.FSTS, (0xFED9_0000, 2, 0)),
           (VtdKind.FRCD, (0xFED9_0000, 0, 0x7000, 1 << 63 | 6 << 32 | 1 << 62 | 0x20)), call(9, 2)]
    run = SimpleNamespace(records=[Record(i, k, f) for i, (k, f) in enumerate(raw)], evidence="/nowhere")
    first, second = ovtd.fault_snapshot(run, 3), ovtd.fault_snapshot(run, 9)
    assert (first.pending, first.ppf) == ([], False)
    assert_fault(second.pending[0], FaultReason.READ, bdf(0, 4), 0x7000, "read")
    assert ovtd.qi_wait(run, 6) == ovtd.QiWait(0x2000, WAIT_DATA_BASE + 1, 5)
    with pytest.raises(AssertionError, match="step 6 is not a faults"):
        ovtd.fault_snapshot(run, 6)
    with pytest.raises(AssertionError, match="step 4 emitted no CALL"):
        ovtd.fault_snapshot(run, 4)


def test_vmx_test_needs_a_generator():
    with pytest.raises(TypeError, match="yields once"):
        @vmx_test()
        def test_not_a_generator(v):
            v.guest("vmcall")
