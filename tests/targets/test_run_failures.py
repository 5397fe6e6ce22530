"""Every way a run can go wrong is reported precisely: exceptions with their vector, hangs with a
diagnosis, damaged streams as infrastructure errors — and no emulator process survives any of it."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from harness.errors import InfraError, RecordStreamError, RunTimeout
from harness.observe.runner import run_scenario
from harness.payload.image import Scenario, build, elf32_segments
from harness.payload.records import EndStatus, Kind
from harness.targets import open_target
from harness.targets import proc

pytestmark = pytest.mark.emulated
ROOT = Path(__file__).resolve().parents[2]


def with_routine(name: str, body: str) -> Scenario:
    s = Scenario(name=name)
    s.asm.append(f"{name}:\n{textwrap.indent(textwrap.dedent(body), '    ')}\n")
    return s


def assert_gone(pid: int, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        stat = Path(f"/proc/{pid}/stat")
        if stat.exists() and stat.read_text().split()[2] == "Z":
            return                               # a zombie has ended; only its parent can reap it
        time.sleep(0.05)
    raise AssertionError(f"emulator process {pid} still runs: {Path(f'/proc/{pid}/cmdline').read_bytes()[:200]!r}")


def test_undefined_opcode_is_reported_with_vector_6_and_its_rip(vtx_target):
    s = with_routine("raise_ud", "mark_ud: ud2\nret")
    s.steps.mark(1)
    s.steps.call("raise_ud")
    s.steps.mark(2)                               # never reached
    run = vtx_target.run(s)
    assert run.end_status == EndStatus.EXCEPTION
    assert run.exception.vector == 6 and run.exception.name == "#UD"
    entry, segs = elf32_segments((run.evidence / "payload.elf").read_bytes())
    code = next(data[run.exception.rip - base:][:2] for base, data in segs if base <= run.exception.rip < base + len(data))
    assert code == b"\x0f\x0b"                    # RIP points at the UD2 itself (a fault)
    assert [r.fields[1] for r in run.of(Kind.MARK)] == [1]


def test_page_fault_reports_cr2_and_error_code(vtx_target):
    s = Scenario(name="pf")
    s.steps.mmio_read(0x1_2345_6000, size=8)      # above the 4 GiB identity map: not present
    run = vtx_target.run(s)
    assert run.end_status == EndStatus.EXCEPTION
    assert (run.exception.vector, run.exception.cr2) == (14, 0x1_2345_6000)
    assert run.exception.error_code == 0          # not present, read, supervisor (SDM 4.7)


def emulator_pid(evidence: Path) -> int:
    """The PID the target recorded for its emulator (qemu.pid or bochs.pid)."""
    (pid_file,) = evidence.glob("*.pid")
    return int(pid_file.read_text())


def test_hung_payload_times_out_with_a_diagnosis_and_leaves_no_process(vtx_target):
    s = with_routine("spin", "1: jmp 1b")
    s.steps.mark(0xAB)
    s.steps.call("spin")
    with pytest.raises(RunTimeout) as e:
        vtx_target.run(s, timeout=2.0)
    msg = str(e.value)
    assert "no terminal record within 2.0 s" in msg
    assert "MARK 0x0 0xab" in msg                 # the last record seen
    if vtx_target.name.startswith("qemu"):
        assert "registers:" in msg and "RIP=" in msg  # QMP register dump
    pid = emulator_pid(vtx_target.evidence_dir / "run-1")
    assert_gone(pid)
    assert pid not in proc.live_pids()        # other tests in this worker may own emulators


def test_garbage_record_on_the_console_is_a_stream_error(vtx_target):
    # A record line with a wrong checksum, written straight to COM1 between two good records.
    line = "@2 18 0 1*00000000\n"
    body = "\n".join(f"mov edi, {ord(c)}\ncall putc" for c in line)      # the engine's polled UART output
    s = with_routine("garble", body + "\nret")
    s.steps.call("garble", quiet=True)
    with pytest.raises(RecordStreamError, match="checksum mismatch"):
        vtx_target.run(s)


def test_exit_without_terminal_record_is_an_infrastructure_error(evidence_dir):
    """isa-debug-exit written mid-run: QEMU leaves with a 'success-looking' status, no END."""
    s = with_routine("early_exit", "mov eax, 0x10\nout 0xf4, eax\n1: jmp 1b")
    s.steps.call("early_exit")
    with pytest.raises(RecordStreamError, match="no terminal record"):
        run_scenario(open_target("qemu-tcg"), s, evidence_dir)


def test_triple_fault_exit_status_0_is_never_success(evidence_dir):
    """With -no-reboot a triple fault makes QEMU exit 0 silently; the stream must say why not."""
    s = with_routine("triple", "lea rax, [rip + null_idt]\nlidt [rax]\nint3\nnull_idt: .word 0\n.quad 0")
    s.steps.call("triple")
    with pytest.raises(RecordStreamError, match="no terminal record"):
        run_scenario(open_target("qemu-tcg"), s, evidence_dir)


def test_exit_status_that_disagrees_with_the_end_record_is_an_error(evidence_dir):
    from harness.observe import observe
    from harness.targets.qemu import qemu_exit_status
    raw = open_target("qemu-tcg").run(build(Scenario()), evidence_dir)
    assert raw.exit_status == qemu_exit_status(EndStatus.OK) == 0x21
    raw.exit_status = 0
    with pytest.raises(InfraError, match="exit status 0 disagrees"):
        observe(raw)


RUNNER = """
import sys
from pathlib import Path
from harness.observe.runner import run_scenario
from harness.payload.image import Scenario
from harness.targets import open_target
s = Scenario(name="spin")
s.asm.append("spin:\\n1: jmp 1b\\n")
s.steps.call("spin")
run_scenario(open_target(sys.argv[2]), s, Path(sys.argv[1]), timeout=120)
"""


@pytest.mark.parametrize("emulator", ["qemu-tcg", "bochs-generic"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["ctrl-c", "term", "kill"])
def test_interrupted_harness_leaves_no_emulator(evidence_dir, sig, emulator):
    child = subprocess.Popen([sys.executable, "-c", RUNNER, str(evidence_dir), emulator], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    serial = evidence_dir / "serial.log"
    deadline = time.monotonic() + 30
    # Wait until the emulator runs the payload (its first record reached the console).
    while not (list(evidence_dir.glob("*.pid")) and serial.exists() and b"@0 " in serial.read_bytes()):
        if time.monotonic() > deadline or child.poll() is not None:
            child.kill()
            raise AssertionError(f"the run never got going: {child.communicate()[0][-800:]!r}")
        time.sleep(0.05)
    pid = emulator_pid(evidence_dir)
    os.kill(pid, 0)                               # running now
    child.send_signal(sig)
    out, _ = child.communicate(timeout=20)
    assert child.returncode != 0, out
    assert_gone(pid)
