"""The step interpreter does what each step says, on QEMU TCG (the reference emulated target)."""

import pytest

from harness.payload.image import Scenario
from harness.payload.records import Kind

pytestmark = pytest.mark.emulated

IA32_APIC_BASE = 0x1B
SCRATCH = 0x0200_0000


@pytest.fixture
def scenario():
    return Scenario(name="steps")


def test_rdmsr_reports_the_apic_base_msr(vtx_target, scenario):
    scenario.steps.mark(1)
    i = scenario.steps.rdmsr(IA32_APIC_BASE)
    run = vtx_target.run(scenario).expect_ok()
    _, value, fault, step = _msr(run, IA32_APIC_BASE)
    assert (fault, step) == (0, i)                # the record names its step (the probe's do not)
    assert value & 0xFFFF_F000 == 0xFEE0_0000    # default LAPIC base (SDM Vol. 3A, 11.4.4)
    assert value & (1 << 11)                      # APIC global enable


def _msr(run, index):
    recs = [r for r in run.of(Kind.MSR) if r.fields[0] == index and len(r.fields) == 4]
    assert len(recs) == 1, recs
    return recs[0].fields


def test_guarded_step_reports_its_fault_and_the_walk_goes_on(vtx_target, scenario):
    """A non-canonical access raises #GP(0) on every x86-64 (SDM Vol. 3A, 6.15, interrupt 13)."""
    i = scenario.steps.mmio_read(0x8000_0000_0000_0000, size=8, guard=True)
    j = scenario.steps.mark(0x55)
    run = vtx_target.run(scenario).expect_ok()
    assert run.step_fault(i) == 13
    assert run.step_record(i, Kind.STEP_FAULT).fields[2] == 0      # error code
    assert run.step_record(j, Kind.MARK).fields[1] == 0x55


def test_mmio_read_of_the_lapic_version_register(vtx_target, scenario):
    i = scenario.steps.mmio_read(0xFEE0_0030, size=4)
    run = vtx_target.run(scenario).expect_ok()
    version = run.value(i)
    assert 0x10 <= version & 0xFF <= 0x15          # integrated APIC (SDM Vol. 3A, 11.4.8)
    assert (version >> 16) & 0xFF >= 2             # max LVT entry


def test_port_write_then_read_of_the_cmos_index(vtx_target, scenario):
    scenario.steps.io_write(0x70, 0x0A)            # CMOS status register A
    i = scenario.steps.io_read(0x71)
    run = vtx_target.run(scenario).expect_ok()
    assert run.value(i) & 0x7F == 0x26             # 32.768 kHz time base, 1024 Hz rate


def test_memory_fill_compare_read_and_copy(vtx_target, scenario):
    st = scenario.steps
    st.mem_fill(SCRATCH, 4096, 0x5A5A_1234_0000_FFFF)
    st.mmio_write(SCRATCH + 0x100, 0xBAD, size=8)
    cmp_ = st.mem_compare(SCRATCH, 4096, 0x5A5A_1234_0000_FFFF)
    st.mem_copy(SCRATCH + 0x2000, SCRATCH + 0x100, 16)
    rd = st.mem_read(SCRATCH + 0x2000, qwords=2)
    run = vtx_target.run(scenario).expect_ok()
    _, mismatches, first_offset, found = run.step_record(cmp_, Kind.MEMCMP).fields
    assert (mismatches, first_offset, found) == (1, 0x100, 0xBAD)
    assert run.step_record(rd, Kind.MEM).fields[1:] == (SCRATCH + 0x2000, 0xBAD, 0x5A5A_1234_0000_FFFF)


def test_poll_that_is_satisfied_and_one_that_times_out(vtx_target, scenario):
    st = scenario.steps
    st.mmio_write(SCRATCH, 0x80, size=4)
    ok = st.poll(SCRATCH, mask=0x80, expected=0x80, max_iterations=10)
    late = st.poll(SCRATCH, mask=0x1, expected=0x1, max_iterations=500)
    run = vtx_target.run(scenario).expect_ok()
    assert run.step_record(ok, Kind.POLL).fields[1:] == (0x80, 0, 1)
    assert run.step_record(late, Kind.POLL).fields[1:] == (0x80, 500, 0)


def test_poll_is_also_bounded_by_time(vtx_target, scenario):
    """Every poll ends after engine.POLL_TSC_BOUND TSC ticks at the latest: one that never matches,
    with an iteration bound no target could walk in its run timeout, times out and the walk goes on."""
    if vtx_target.config.kind == "bochs":
        pytest.skip("Bochs' TSC advances one tick per instruction: the bound is minutes of Bochs time")
    st = scenario.steps
    st.mmio_write(SCRATCH, 0x80, size=4)
    late = st.poll(SCRATCH, mask=0x1, expected=0x1, max_iterations=1 << 60)
    after = st.mark(0x66)
    run = vtx_target.run(scenario).expect_ok()
    _, last, iterations, ok = run.step_record(late, Kind.POLL).fields
    assert (last, ok) == (0x80, 0)
    assert 0 < iterations < 1 << 60
    assert run.step_record(after, Kind.MARK).fields[1] == 0x66


def test_poll_with_abort_ends_the_run_with_poll_timeout(vtx_target, scenario):
    from harness.payload.records import EndStatus
    scenario.steps.poll(SCRATCH, mask=1, expected=1, max_iterations=5, abort=True)
    scenario.steps.mark(0x77)                      # must not be reached
    run = vtx_target.run(scenario)
    assert run.end_status == EndStatus.POLL_TIMEOUT
    assert run.of(Kind.MARK) == []


def test_variables_carry_a_read_value_into_a_later_address(vtx_target, scenario):
    st = scenario.steps
    st.mmio_write(SCRATCH, SCRATCH + 0x800, size=8)           # a pointer in memory
    st.mmio_read(SCRATCH, size=8, store=6, quiet=True)        # vars[6] = pointer
    st.mmio_write(0x8, 0xC0FFEE, size=8, base=6)              # write through it
    i = st.mem_read(SCRATCH + 0x808)
    run = vtx_target.run(scenario).expect_ok()
    assert run.step_record(i, Kind.MEM).fields[2] == 0xC0FFEE


def test_cpuid_step_reports_leaf_0_vendor(vtx_target, scenario):
    i = scenario.steps.cpuid(0)
    run = vtx_target.run(scenario).expect_ok()
    _, leaf, sub, eax, ebx, ecx, edx = run.step_record(i, Kind.CPUID).fields
    assert (leaf, sub) == (0, 0)
    assert eax == run.probe.max_leaf
    vendor = b"".join(x.to_bytes(4, "little") for x in (ebx, edx, ecx)).decode()
    assert vendor == run.probe.vendor


def test_value_reads_every_kind_of_reading_step(vtx_target, scenario):
    """``run.value(step)`` answers for each step that reads something, looked up by its step:
    a memory read's first qword, CPUID's eax, a poll's last value, an RDMSR's value."""
    st = scenario.steps
    st.mmio_write(SCRATCH, 0x1234_5678_9ABC_DEF0, size=8)
    mem = st.mem_read(SCRATCH, qwords=2)
    leaf0 = st.cpuid(0)
    polled = st.poll(SCRATCH, mask=0xF0, expected=0xF0, max_iterations=3)
    apic_base = st.rdmsr(0x1B)
    run = vtx_target.run(scenario).expect_ok()
    assert run.value(mem) == 0x1234_5678_9ABC_DEF0
    assert run.value(leaf0) == run.probe.max_leaf
    assert run.value(polled) == 0x9ABC_DEF0          # a 4-byte poll reads the low dword
    assert run.value(apic_base) & 0xFFFF_F000 == 0xFEE0_0000
