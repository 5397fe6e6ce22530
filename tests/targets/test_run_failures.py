"""Every way a run can go wrong is reported precisely: exceptions with their vector, hangs with a
diagnosis, damaged streams as infrastructure errors — and no emulator process survives any of it."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import re
import threading
import time
from pathlib import Path

import pytest

from harness.errors import InfraError, RecordStreamError, RunTimeout
from harness.observe.runner import run_scenario
from harness.payload.image import Scenario, build, elf32_segments
from harness.payload.records import EndStatus, FrameParser, Kind
from harness.targets import open_target
from harness.targets.config import from_dict
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
    assert "pending: step 1 CALL routine=spin" in msg   # the step the payload had not finished
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


# A routine that frames a well-formed END of its own (right sequence number, checksum and step
# count), as a stray or hostile routine could, and returns; the engine then goes on.
FAKE_END = """\
mov edi, 0x7e
call rec_begin
xor edi, edi
call rec_u64
mov rdi, [rip + rec_seq]
call rec_u64
mov rdi, [rip + steps_done]
call rec_u64
call rec_end
"""


@pytest.mark.parametrize("emulator", ["qemu-tcg", "bochs-generic"])
def test_record_after_a_well_formed_end_is_a_stream_error(evidence_dir, emulator):
    """Issue 10 #5: END followed by more output passed nondeterministically; now never."""
    s = with_routine("fake_end", FAKE_END + "ret")
    s.steps.mark(1)
    s.steps.call("fake_end", quiet=True)
    s.steps.mark(2)
    with pytest.raises(RecordStreamError, match="after the terminal record"):
        run_scenario(open_target(emulator), s, evidence_dir, timeout=60)
    # The fake END arrived (what followed it is read only until the damage is seen).
    assert re.search(rb"^@[0-9a-f]+ 7e 0 ", (evidence_dir / "serial.log").read_bytes(), re.M)


def test_premature_end_then_exit_is_a_stream_error(evidence_dir):
    """A well-formed END after one of three steps and a 'success' exit status: the step count
    in END (1) is not the scenario's (3), so it is an error, not a pass."""
    s = with_routine("end_early", FAKE_END + "mov eax, 0x10\nout 0xf4, eax\n1: jmp 1b")
    s.steps.mark(1)
    s.steps.call("end_early")
    s.steps.mark(2)
    with pytest.raises(RecordStreamError, match="status 0 after 1 steps, the scenario has 3"):
        run_scenario(open_target("qemu-tcg"), s, evidence_dir, timeout=60)


def test_qemu_exiting_at_start_up_fails_at_once_with_its_stderr(evidence_dir):
    t = open_target("qemu-tcg")
    t.q["devices"] = [dict(driver="no-such-device", bus=None, addr=None, id=None, options={})]
    t0 = time.monotonic()
    with pytest.raises(InfraError) as e:
        run_scenario(t, Scenario(name="x"), evidence_dir, timeout=120)
    elapsed = time.monotonic() - t0
    assert e.value.stage == "start"
    assert "QEMU exited at start-up" in str(e.value) and "no-such-device" in str(e.value)
    assert elapsed < 20, f"took {elapsed:.1f} s of a 120 s timeout"
    assert not (evidence_dir / "INCOMPLETE").exists()


def _stop_when_running(evidence: Path, stopped: list[float], marker: bytes = b"@0 ") -> None:
    """SIGSTOP the run's QEMU once its first record has arrived."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pid_file, serial = evidence / "qemu.pid", evidence / "serial.log"
        if pid_file.exists() and serial.exists() and marker in serial.read_bytes():
            os.kill(int(pid_file.read_text()), signal.SIGSTOP)
            stopped.append(time.monotonic())
            return
        time.sleep(0.02)


def test_stopped_qemu_ends_the_run_within_its_timeout_and_is_named(evidence_dir):
    """Issue 10 #3: a SIGSTOPped QEMU made a 4 s run wait forever (QMP without bound)."""
    s = with_routine("spin", "1: jmp 1b")
    s.steps.call("spin")
    stopped: list[float] = []
    watcher = threading.Thread(target=_stop_when_running, args=(evidence_dir, stopped), daemon=True)
    watcher.start()
    t0 = time.monotonic()
    with pytest.raises(RunTimeout) as e:
        run_scenario(open_target("qemu-tcg"), s, evidence_dir, timeout=4.0)
    elapsed = time.monotonic() - t0
    watcher.join(5)
    assert stopped, "QEMU was never stopped"
    assert "QEMU is unresponsive" in str(e.value) and "stopped" in str(e.value)
    assert elapsed < 4.0 + 5.0, f"{elapsed:.1f} s for a 4 s run"
    assert_gone(emulator_pid(evidence_dir))
    print(f"SIGSTOP to error: {time.monotonic() - stopped[0]:.2f} s; run {elapsed:.2f} s (timeout 4 s)")


def test_qemu_stopped_before_cont_is_an_unresponsive_qmp_error(evidence_dir):
    """A QEMU that stops answering QMP mid-command: the command is bounded and QEMU is named."""
    t = open_target("qemu-tcg")

    def stop(qmp) -> None:
        os.kill(int((evidence_dir / "qemu.pid").read_text()), signal.SIGSTOP)
    t.before_start.append(stop)
    t0 = time.monotonic()
    with pytest.raises(InfraError, match="QEMU is unresponsive: QMP 'cont' was not answered") as e:
        run_scenario(t, Scenario(name="x"), evidence_dir, timeout=60)
    assert e.value.stage == "qmp"
    assert time.monotonic() - t0 < 20
    assert_gone(emulator_pid(evidence_dir))


def test_emulator_dying_mid_run_is_named_with_its_status_and_stderr(evidence_dir):
    """QEMU aborting mid-run (edu's range check: a transfer that ends at its buffer's end is a
    'hardware error' in QEMU 7.2) ends the run with QEMU's exit status and the first line of its
    stderr, the way a KVM_RUN failure on a runner is reported."""
    from harness.payload import edu as E, layout

    s = Scenario(name="edu-abort")
    edu = E.Edu(s.steps, bdf=0x20)
    edu.setup()
    s.steps.mark(1)
    # Raw register writes: Edu.start_dma refuses exactly this transfer.
    edu.reg_write(E.REG_DMA_SRC, layout.SCRATCH_BASE)
    edu.reg_write(E.REG_DMA_DST, E.BUFFER)
    edu.reg_write(E.REG_DMA_COUNT, E.BUFFER_SIZE)
    edu.reg_write(E.REG_DMA_CMD, E.DMA_START)
    s.steps.delay(10_000_000)
    with pytest.raises(RecordStreamError, match=r"no terminal record: the emulator exited with status -?\d+ "
                                                r"\('[^']*hardware error: EDU: DMA range") as e:
        run_scenario(open_target("qemu-tcg-vtd"), s, evidence_dir, timeout=30)
    assert "#" in str(e.value).split("last good records:", 1)[1]
    assert_gone(emulator_pid(evidence_dir))


PVPANIC_PORT = 0x505          # QEMU's pvpanic ISA device; writing bit 0 reports a guest panic


def panicking() -> Scenario:
    """Reports a guest panic to QEMU's pvpanic device, then spins (QEMU keeps running)."""
    s = with_routine("spin", "1: jmp 1b")
    s.steps.mark(1)
    s.steps.io_write(PVPANIC_PORT, 1)
    s.steps.call("spin")
    return s


@pytest.mark.parametrize("action", ["pause", "none"], ids=["stopped-for-good", "still-running"])
def test_guest_stopped_for_good_ends_the_run_at_once(evidence_dir, action):
    """QEMU does not exit when KVM reports an internal error or the guest panics: it stops the
    guest and waits.  Such a run ends at once with the run state named, not at its timeout; a
    panic QEMU lets the guest run through (panic=none) is not mistaken for one."""
    config = from_dict({"name": "qemu-tcg-pvpanic", "kind": "qemu", "timeout_s": 60 if action == "pause" else 6,
                        "qemu": {"accel": "tcg", "machine": "q35", "cpu": "max", "memory_mb": 128,
                                 "devices": [{"driver": "pvpanic"}], "extra_args": ["-action", f"panic={action}"]}},
                       "test:qemu-tcg-pvpanic")
    t0 = time.monotonic()
    with pytest.raises(InfraError) as e:
        run_scenario(open_target(config), panicking(), evidence_dir)
    took = time.monotonic() - t0
    if action == "pause":
        assert not isinstance(e.value, RunTimeout), str(e.value)
        assert "QEMU stopped the guest for good (run state 'guest-panicked'" in str(e.value)
        assert took < 20, f"the run took {took:.1f} s of its 60 s bound"
        events = [json.loads(line).get("event", {}).get("event") for line in open(evidence_dir / "qmp.jsonl")]
        assert "GUEST_PANICKED" in events and "STOP" in events
    else:
        assert isinstance(e.value, RunTimeout), str(e.value)
    assert_gone(emulator_pid(evidence_dir))


@pytest.mark.parametrize("emulator", ["qemu-tcg", "bochs-generic"])
def test_replay_sh_reruns_the_scenario_by_hand(evidence_dir, emulator):
    """Issue 9 #4: replay.sh in the evidence runs that exact scenario with the serial on stdout."""
    s = Scenario(name="replay")
    s.steps.mark(0x5A)
    s.steps.cpuid(0)
    run = run_scenario(open_target(emulator), s, evidence_dir / "ev", timeout=120).expect_ok()
    replay = evidence_dir / "ev" / "replay.sh"
    assert os.access(replay, os.X_OK)
    out = subprocess.run([str(replay)], capture_output=True, timeout=120, cwd="/")
    parser = FrameParser()
    parser.feed(out.stdout)
    parser.check_complete()
    assert [(r.kind, r.fields) for r in parser.records] == [(r.kind, r.fields) for r in run.records]
    assert not list((evidence_dir / "ev").glob("*.lock"))


def test_replay_sh_of_a_remote_run_reruns_it_on_the_runner(evidence_dir, loopback_sshd):
    """The remote replay.sh uploads the payload copy over ssh (host key checked against the
    target's known_hosts) into a private directory there, runs QEMU with the serial on stdout and
    removes the directory."""
    from harness.targets.config import from_dict
    config = from_dict({"name": "remote-loopback", "kind": "remote-qemu", "timeout_s": 60,
                        "remote_qemu": {"accel": "tcg", "memory_mb": 128, "ssh": loopback_sshd.ssh_section()}},
                       "test:remote-loopback")
    s = Scenario(name="replay")
    s.steps.mark(0x5B)
    run = run_scenario(open_target(config), s, evidence_dir / "ev").expect_ok()
    before = set(Path("/tmp").glob("vtx-replay-*"))
    out = subprocess.run([str(evidence_dir / "ev" / "replay.sh")], capture_output=True, timeout=120,
                         stdin=subprocess.DEVNULL)
    parser = FrameParser()
    parser.feed(out.stdout)
    parser.check_complete()
    assert [(r.kind, r.fields) for r in parser.records] == [(r.kind, r.fields) for r in run.records]
    assert set(Path("/tmp").glob("vtx-replay-*")) == before          # the runner's directory is gone


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
