"""Sync points and the memory witness without an emulator (issue 14): the SYNC step's encoding,
the release token, the host side's bookkeeping in ConsoleWatch (fed framed records exactly as a
console delivers them) and the witness's arithmetic.  The emulator end is in
harness/conformance/host and tests/targets/test_remote_qemu.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.errors import InfraError
from harness.observe.run import Run
from harness.observe.witness import NO_MISMATCH, MemoryWitness, Region, WitnessDisagreement
from harness.payload.describe import describe
from harness.payload.records import PROTOCOL_VERSION, Kind, Record, frame
from harness.payload.steps import Op, StepList, SyncKind, release_token, sync_name, sync_name_words
from harness.targets import open_target
from harness.targets.base import ConsoleWatch, HostActionUnavailable, HostControl, RawRun


def hello(seq: int = 0) -> bytes:
    return frame(seq, Kind.HELLO, PROTOCOL_VERSION, 0, 0, 0)


def sync(seq: int, step: int, name: str) -> bytes:
    return frame(seq, SyncKind.SYNC, step, *sync_name_words(name))


def watch_for(tmp_path: Path, actions: dict, control: HostControl | None = None) -> tuple[ConsoleWatch, list[bytes]]:
    sent: list[bytes] = []
    w = ConsoleWatch(tmp_path / "serial.log", 30.0, "target t", actions)
    w.sync.connect(sent.append, control or HostControl("t", tmp_path))
    return w, sent


def test_names_round_trip_through_the_record_words():
    words = sync_name_words("dma-pending")
    assert words == (int.from_bytes(b"dma-pend", "little"), int.from_bytes(b"ing\0\0\0\0\0", "little"))
    assert sync_name(words) == "dma-pending"
    assert sync_name(sync_name_words("x" * 32)) == "x" * 32


@pytest.mark.parametrize("bad", ["", "-lead", "a b", "é", "x" * 33])
def test_bad_names_are_refused_naming_the_rule(bad):
    with pytest.raises(ValueError, match="sync point name .* expected 1..32 characters"):
        sync_name_words(bad)


def test_the_step_carries_its_bound_and_name_and_names_are_unique():
    s = StepList()
    s.mark(1)
    i = s.sync("p1", max_polls=500)
    assert (s.steps[i].op, s.steps[i].args) == (Op.SYNC, (500, *sync_name_words("p1")))
    assert s.sync_points() == {"p1": 1}
    with pytest.raises(ValueError, match="sync point 'p1' is already step 1"):
        s.sync("p1")


def test_release_token_names_the_sync_record_by_its_low_byte():
    assert release_token(0x11) == b"@G11\r\n"
    assert release_token(0x1FF) == b"@Gff\r\n"


def test_records_are_described_by_name():
    assert describe(Record(5, SyncKind.SYNC, (3, *sync_name_words("dma-pending")))).startswith(
        "#5 SYNC step 3 point 'dma-pending'")
    assert describe(Record(6, SyncKind.SYNC_DONE, (3, 0x10, 1))).startswith("#6 SYNC_DONE step 3 released after 16")
    assert "not released" in describe(Record(6, SyncKind.SYNC_DONE, (3, 0x10, 0)))


def test_the_action_runs_at_the_record_and_the_release_follows(tmp_path):
    order: list[str] = []
    w, sent = watch_for(tmp_path, {"p": lambda host: order.append(f"{host.point} step {host.step} "
                                                                   f"after {len(host.records)} records")})
    w.feed(hello() + sync(1, 4, "p"))
    assert order == ["p step 4 after 2 records"]
    assert sent == [release_token(1)]


def test_an_unknown_point_names_itself_and_the_known_ones(tmp_path):
    w, sent = watch_for(tmp_path, {"known": lambda host: None})
    with pytest.raises(InfraError, match=r"reached sync point 'stray' \(step 2\) but the host has no action "
                                         r"for it \(registered: 'known'\)"):
        w.feed(hello() + sync(1, 2, "stray"))
    assert sent == []


def test_a_point_reached_twice_is_an_error_unless_repeated(tmp_path):
    w, _ = watch_for(tmp_path, {"p": lambda host: None})
    with pytest.raises(InfraError, match="sync point 'p' reached a second time"):
        w.feed(hello() + sync(1, 0, "p") + sync(2, 0, "p"))


def test_a_missed_point_is_named_after_the_end(tmp_path):
    w, _ = watch_for(tmp_path, {"p": lambda host: None, "q": lambda host: None})
    w.feed(hello() + sync(1, 0, "p") + frame(2, Kind.END, 0, 2, 1))
    with pytest.raises(InfraError, match=r"sync point\(s\) 'q' never reached: the payload ended after 1 steps"):
        w.sync.check_end(w.parser.records)


def test_a_timeout_names_the_awaited_point(tmp_path):
    w, _ = watch_for(tmp_path, {"dma-pending": lambda host: None})
    w.feed(hello())
    assert "waiting for sync point(s) 'dma-pending' (reached: none)" in str(w.timeout_error(tmp_path))


def test_the_payload_giving_up_is_an_error_naming_the_point(tmp_path):
    w, _ = watch_for(tmp_path, {"p": lambda host: None})
    with pytest.raises(InfraError, match=r"gave up waiting at sync point 'p' \(step 0\) after 1000 receiver polls"):
        w.feed(hello() + sync(1, 0, "p") + frame(2, SyncKind.SYNC_DONE, 0, 1000, 0))


def test_a_console_without_input_refuses_registered_points(tmp_path):
    w = ConsoleWatch(tmp_path / "serial.log", 30.0, "target t", {"p": lambda host: None})
    with pytest.raises(InfraError, match=r"cannot serve sync points \['p'\]: no input here"):
        w.sync.refuse("no input here")


def test_a_reset_by_the_action_restarts_the_stream_without_a_release(tmp_path):
    class Resetting(HostControl):
        def __init__(self) -> None:
            super().__init__("t", tmp_path)
            self.again = 0

        def booted_again(self) -> None:
            self.again += 1
    control = Resetting()
    arrivals: list[int] = []

    def act(host: HostControl) -> None:
        arrivals.append(len(host.records))
        if len(arrivals) == 1:
            host.rebooting = True
    from harness.targets.base import RepeatedAction
    w, sent = watch_for(tmp_path, {"p": RepeatedAction(act)}, control)
    w.feed(hello() + sync(1, 0, "p"))
    assert sent == [] and len(w.earlier_boots) == 1
    w.feed(hello() + sync(1, 0, "p"))
    assert sent == [release_token(1)] and control.again == 1 and arrivals == [2, 2]
    assert "# boot 1: reset by the host at sync point 'p'" in (tmp_path / "earlier-boots.txt").read_text()


def test_qmp_actions_on_a_target_without_qmp_name_what_was_asked(tmp_path):
    host = HostControl("bochs-skylake", tmp_path)
    host.point = "p"
    with pytest.raises(HostActionUnavailable, match="sync point 'p': inject_nmi needs QMP"):
        host.inject_nmi()
    with pytest.raises(AttributeError):
        host.no_such_thing      # noqa: B018


def test_at_registers_for_the_block_only_and_refuses_doubles():
    t = open_target("qemu-tcg-vtd")
    act = lambda host: None       # noqa: E731
    with t.at("p", act):
        assert list(t.sync_actions) == ["p"]
        with pytest.raises(ValueError, match="sync point 'p' already has an action"):
            with t.at("p", act):
                pass
    assert t.sync_actions == {}
    with pytest.raises(TypeError, match="the action must be callable"):
        with t.at("p", "inject_nmi"):        # type: ignore[arg-type]
            pass


def test_region_judges_like_the_engines_compare():
    r = Region(step=3, address=0x1000, nbytes=32, pattern=7)
    assert r.judge((7).to_bytes(8, "little") * 4) == (0, NO_MISMATCH, 0)
    data = (7).to_bytes(8, "little") * 2 + (9).to_bytes(8, "little") + (5).to_bytes(8, "little")
    assert r.judge(data) == (2, 16, 9)


def test_attach_witnesses_constant_compares_once():
    s = StepList()
    a = s.mem_compare(0x2000, 64, 1)
    s.mem_compare(0x10, 8, 1, base=5)          # a runtime address: the host cannot know it
    w = MemoryWitness.attach(s)
    again = MemoryWitness.attach(s)
    assert [r.step for r in w.regions] == [a] == [r.step for r in again.regions]
    assert list(s.sync_points()) == ["vtx-witness"]


def run_with(tmp_path: Path, memcmp: tuple[int, int, int]) -> Run:
    recs = [Record(0, Kind.HELLO, (PROTOCOL_VERSION, 0, 0, 0)), Record(1, Kind.MEMCMP, (0, *memcmp)),
            Record(2, Kind.END, (0, 2, 1))]
    return Run(RawRun("t", recs, b"", None, None, 0.0, tmp_path))


def test_the_witness_passes_agreement_and_names_a_disagreement(tmp_path):
    w = MemoryWitness(regions=[Region(0, 0x3000, 16, 7, "data")])
    w.memory[0] = (7).to_bytes(8, "little") + (8).to_bytes(8, "little")
    assert w.check(run_with(tmp_path, (1, 8, 8)))[0]["agree"]
    with pytest.raises(WitnessDisagreement, match=r"compare 'data' of 16 bytes at 0x3000 against 0x7: the payload "
                                                  r"reports a match, the host read 1 mismatching qwords, first at "
                                                  r"\+0x8 holding 0x8"):
        w.check(run_with(tmp_path, (0, NO_MISMATCH, 0)))
