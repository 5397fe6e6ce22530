"""The framed record protocol: a whole stream parses; any damage is an error, never a pass.

Besides hand-picked cases, a generated corpus of damaged streams (every single-bit flip, every
truncation, byte substitutions, dropped, duplicated and swapped records, premature END, data after
END, single-token records) goes through the same checks a real run does (parser, ConsoleWatch,
observe with the scenario's step count): each one raises, or, where the damage only hit bytes that
do not matter, yields exactly the original records."""

import random
import tracemalloc
import zlib
from pathlib import Path

import pytest

from harness.errors import InfraError, RecordStreamError
from harness.observe.run import observe
from harness.payload.records import PROTOCOL_VERSION, FrameError, FrameParser, Kind, Record, frame
from harness.targets import base
from harness.targets.base import ConsoleWatch, RawRun

STEPS = 2                                     # the scenario behind GOOD: two MARK steps


def stream(*records: tuple[int, ...], steps: int = STEPS) -> list[bytes]:
    """Frame (kind, *fields) tuples in order, followed by a consistent END record."""
    out = [frame(i, kind, *fields) for i, (kind, *fields) in enumerate(records)]
    out.append(frame(len(records), Kind.END, 0, len(records), steps))
    return out


HELLO = (Kind.HELLO, PROTOCOL_VERSION, 0x2BADB002, 0x9500, 0x1234)
GOOD = stream(HELLO, (Kind.MARK, 0, 0x42), (Kind.MARK, 1, 0x43))


def parse(lines: list[bytes]) -> FrameParser:
    p = FrameParser()
    p.feed(b"".join(lines))
    return p


def judge(data: bytes, steps: int = STEPS) -> list[Record]:
    """What a run does with console bytes: parse, check the stream, check END against the scenario."""
    p = FrameParser()
    p.feed(data)
    p.check_complete()
    raw = RawRun(target="t", records=p.records, console=data, exit_status=None, exit_expected=None,
                 duration_s=0.0, evidence=Path("/nonexistent"))
    return observe(raw, steps=steps).records


def test_round_trip_gives_fields_in_order():
    p = parse(GOOD)
    p.check_complete()
    assert [(r.seq, r.kind, r.fields) for r in p.records] == [
        (0, Kind.HELLO, (PROTOCOL_VERSION, 0x2BADB002, 0x9500, 0x1234)),
        (1, Kind.MARK, (0, 0x42)),
        (2, Kind.MARK, (1, 0x43)),
        (3, Kind.END, (0, 3, 2)),
    ]


def test_byte_at_a_time_feeding_gives_the_same_records():
    p = FrameParser()
    for b in b"".join(GOOD):
        p.feed(bytes([b]))
    p.check_complete()
    assert [r.kind for r in p.records] == [Kind.HELLO, Kind.MARK, Kind.MARK, Kind.END]


def test_firmware_noise_between_records_is_kept_aside():
    p = parse([b"SeaBIOS (version 1.16)\r\n", GOOD[0], b"Booting from ROM..\n", *GOOD[1:]])
    p.check_complete()
    assert b"Booting from ROM.." in p.noise
    assert len(p.records) == 4


@pytest.mark.parametrize("text", [
    b"[  OK  ] Started serial-getty@ttyS0.service - Serial Getty on ttyS0.\r\n",
    b"root@lab-host:~# kexec -e\n",
    b"mail admin@a1b2c3 now\n",                     # '@' and hex digits, but no record shape
    b"@ \n", b"@\n", b"@@@\n", b"@g 1*00000000\n",
])
def test_at_sign_in_console_text_is_noise_not_damage(text):
    p = parse([text, GOOD[0], text, *GOOD[1:]])
    p.check_complete()
    assert len(p.records) == 4 and text.strip()[:40] in b"".join(p.noise)


def test_encoding_matches_the_payload_format():
    body = b"1 18 0 42"
    assert frame(1, 0x18, 0, 0x42) == b"@" + body + b"*" + f"{zlib.crc32(body):08x}".encode() + b"\n"


def _single_token(seq: int) -> bytes:
    body = f"{seq:x}".encode()
    return b"@" + body + b"*" + f"{zlib.crc32(body):08x}".encode() + b"\n"


@pytest.mark.parametrize("damage, message", [
    (lambda l: [l[0], l[1].replace(b" 42", b" 43"), *l[2:]], "checksum mismatch"),
    (lambda l: [l[0], *l[2:]], "where #1 was expected"),
    (lambda l: [l[1], l[0], *l[2:]], "where #0 was expected"),
    (lambda l: [*l[:3], l[3][:-6] + b"\n"], "damaged record line"),
    (lambda l: l[:3], "no terminal record"),
    (lambda l: [*l[:3], l[3][:10]], "no terminal record"),
    (lambda l: [*l[:3], frame(3, Kind.END, 0, 5, 2)], "terminal record counts"),
    (lambda l: [*l[:3], frame(3, Kind.END, 0, 3)], "terminal record has 2 fields"),
    (lambda l: [*l, frame(4, Kind.MARK, 0, 1)], "after the terminal record"),
    (lambda l: [*l, l[3]], "after the terminal record"),
    (lambda l: [*l, b"@4 18 0"], "partial record after the terminal record"),
    (lambda l: [l[1].replace(b"@1", b"@0")], "checksum mismatch"),
    (lambda l: [l[0], _single_token(1), *l[1:]], "record without a kind"),
    (lambda l: [l[0], frame(1, Kind.MARK, *range(20)), *l[1:]], "too many"),
    (lambda l: [frame(0, Kind.HELLO, 1, 0, 0, 0), *l[1:]], "protocol"),
    (lambda l: [], "no records at all"),
], ids=["corrupted", "missing", "reordered", "truncated-line", "no-end", "truncated-end",
        "end-count", "end-without-steps", "after-end", "end-twice", "partial-after-end", "renumbered",
        "single-token", "too-many-fields", "old-protocol", "empty"])
def test_damaged_stream_is_an_error(damage, message):
    p = parse(damage(list(GOOD)))
    with pytest.raises(FrameError, match=message):
        p.check_complete()


def test_stream_must_begin_with_hello():
    p = parse([frame(0, Kind.MARK, 0, 1), frame(1, Kind.END, 0, 1, 1)])
    with pytest.raises(FrameError, match="does not start with HELLO"):
        p.check_complete()


def test_premature_end_with_fewer_steps_than_the_scenario_is_an_error():
    """A well-formed END after one of two steps (a stray routine's, or a cut-short walk)."""
    early = stream(HELLO, (Kind.MARK, 0, 0x42), steps=1)
    with pytest.raises(RecordStreamError, match="status 0 after 1 steps, the scenario has 2"):
        judge(b"".join(early))
    assert judge(b"".join(GOOD)) == parse(GOOD).records      # the whole walk passes


def corpus() -> list[tuple[str, bytes]]:
    """Damaged variants of GOOD (with console noise around it, as on a real console)."""
    lines = [b"SeaBIOS\r\n", *GOOD]
    whole = b"".join(lines)
    rng = random.Random(10)
    out: list[tuple[str, bytes]] = []
    for i in range(len(whole)):
        for bit in range(8):
            out.append((f"flip {i}.{bit}", whole[:i] + bytes([whole[i] ^ (1 << bit)]) + whole[i + 1:]))
    for i in range(len(whole)):
        out.append((f"truncate {i}", whole[:i]))
        out.append((f"substitute {i}", whole[:i] + bytes([rng.choice(b"0123456789abcdef@* \n")]) + whole[i + 1:]))
        out.append((f"delete {i}", whole[:i] + whole[i + 1:]))
    recs = lines[1:]
    for i in range(len(recs)):
        out.append((f"drop {i}", b"".join(recs[:i] + recs[i + 1:])))
        out.append((f"duplicate {i}", b"".join(recs[:i + 1] + recs[i:])))
        if i + 1 < len(recs):
            out.append((f"swap {i}", b"".join(recs[:i] + [recs[i + 1], recs[i]] + recs[i + 2:])))
        out.append((f"single-token at {i}", b"".join(recs[:i] + [_single_token(i)] + recs[i:])))
    for k in range(1, 3):        # a well-formed END after k records, then the rest renumbered
        early = [frame(j, *GOOD_FIELDS[j]) for j in range(k)] + [frame(k, Kind.END, 0, k, k - 1)]
        rest = [frame(k + 1 + j, *GOOD_FIELDS[k + j]) for j in range(len(GOOD_FIELDS) - k)]
        out.append((f"premature END after {k}", b"".join(early)))
        out.append((f"END after {k} then data", b"".join(early + rest)))
    out.append(("data after END", whole + frame(4, Kind.MARK, 0, 1)))
    out.append(("damage after END", whole + b"@4 18 0 1*00000000\n"))
    out.append(("END with a forged count", b"".join(recs[:3]) + frame(3, Kind.END, 0, 3, 3)))
    return out


GOOD_FIELDS = [(r.kind, *r.fields) for r in parse(GOOD).records[:-1]]


def test_generated_corpus_of_damaged_streams_never_passes():
    original = parse(GOOD).records
    cases = corpus()
    assert len(cases) > 1000
    passed_altered = []
    harmless = 0
    for name, data in cases:
        try:
            records = judge(data)
        except (FrameError, InfraError):
            continue
        if records != original:
            passed_altered.append(name)
        harmless += 1                        # e.g. a flipped bit inside the SeaBIOS noise line
    assert passed_altered == []
    assert harmless < 100, "nearly every damage must be caught"


def test_generated_corpus_fails_at_once_in_the_console_watch(tmp_path):
    """The watch raises at the first damaged line (no waiting for a timeout), on every target kind."""
    for name, data in [c for c in corpus() if c[0].startswith(("swap", "drop", "single-token", "END after"))]:
        watch = ConsoleWatch(tmp_path / "serial.log", 60, "target t")
        try:
            with pytest.raises(RecordStreamError):
                for line in data.splitlines(keepends=True):
                    watch.feed(line)
                watch.check(tmp_path)
            assert watch.remaining() > 59, name
        finally:
            watch.close()


def test_feed_reports_damage_before_the_terminal_record(tmp_path):
    watch = ConsoleWatch(tmp_path / "serial.log", 60, "target t")
    watch.feed(GOOD[0])
    with pytest.raises(RecordStreamError, match=r"record #2 where #1 was expected.*last good records: #0 HELLO"):
        watch.feed(GOOD[2])
    watch.close()


def scripted(chunks: list[bytes | None]):
    """A follow() reader that returns ``chunks`` in turn, then quiet (b"")."""
    it = iter(chunks)
    return lambda wait: next(it, b"")


def test_follow_drains_after_end_and_catches_a_record_that_follows(tmp_path):
    watch = ConsoleWatch(tmp_path / "serial.log", 60, "target t")
    with pytest.raises(RecordStreamError, match="after the terminal record"):
        watch.follow(scripted([b"".join(GOOD), b"", b"", frame(4, Kind.MARK, 0, 1)]), quiet_s=5.0)
    watch.close()


def test_follow_returns_after_a_quiet_period_or_end_of_stream(tmp_path):
    watch = ConsoleWatch(tmp_path / "serial.log", 60, "target t")
    assert watch.follow(scripted([b"".join(GOOD)]), quiet_s=0.05) is False
    watch.check(tmp_path)
    watch.close()
    watch = ConsoleWatch(tmp_path / "serial.log", 60, "target t")
    assert watch.follow(scripted([b"".join(GOOD), b"trailing text\n", None]), quiet_s=5.0) is True
    watch.check(tmp_path)
    assert watch.parser.noise[-1] == b"trailing text"
    watch.close()


def test_console_memory_is_bounded(tmp_path, monkeypatch):
    """Issue 10 #16: 5.7 MB of console in 10 s cost 37 MB.  Now: raw, noise and log are capped."""
    monkeypatch.setattr(base, "LOG_CAP", 2 << 20)
    watch = ConsoleWatch(tmp_path / "serial.log", 60, "target t")
    chunk = b"".join(b"kernel: noise line %06d with some text to make it longer\n" % i for i in range(1000))
    noise_only = b"x" * 10_000                 # and lines without any newline at all
    tracemalloc.start()
    watch.feed(GOOD[0])
    for _ in range(100):                       # ~6 MB of lines, then 1 MB of one endless line
        watch.feed(chunk)
    for _ in range(100):
        watch.feed(noise_only)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    watch.close()
    assert watch.received > 6_000_000
    assert peak < 6 << 20, f"peak {peak} bytes while reading {watch.received}"
    assert len(watch.raw) <= 2 * base.RAW_KEPT
    assert len(watch.parser.noise) <= 2 * 64 and watch.parser.noise_dropped > 90_000
    log = (tmp_path / "serial.log").read_bytes()
    assert len(log) < (2 << 20) + 200 and log.rstrip().endswith(b"the console went on]")
    assert [r.kind for r in watch.parser.records] == [Kind.HELLO]


def test_timeout_names_the_pending_step_with_its_arguments():
    """Issue 10 #15: the timeout message names what the payload was doing (poll address, value)."""
    from harness.observe.runner import pending_step
    from harness.payload.image import Scenario

    s = Scenario(name="t")
    s.steps.mark(1)
    s.steps.mmio_write(0x18, 0x8000_0000, base=1)            # silent: no record of its own
    s.steps.poll(0x1C, 0x8000_0000, 0x8000_0000, 1000, base=1, comment="GSTS.TES")
    s.steps.mark(2)
    hello, probed = Record(0, Kind.HELLO, (PROTOCOL_VERSION,)), Record(1, Kind.PROBE_DONE, ())
    mark = Record(2, Kind.MARK, (0, 1))
    assert pending_step(s, []).startswith("boot (no HELLO")
    assert pending_step(s, [hello]).startswith("the boot probe")
    assert pending_step(s, [hello, probed]) == "step 0 MARK tag=0x1"
    said = pending_step(s, [hello, probed, mark])
    assert said.startswith("one of steps 1..2 (no record after step 0)")
    assert "step 2 POLL addr=0x1c mask=0x80000000 expected=0x80000000 max_iterations=0x3e8 (+ var 1) [GSTS.TES]" in said
