"""The framed record protocol: a whole stream parses; any damage is an error, never a pass."""

import zlib

import pytest

from harness.payload.records import FrameError, FrameParser, Kind, frame


def stream(*records: tuple[int, ...]) -> list[bytes]:
    """Frame (kind, *fields) tuples in order, followed by a consistent END record."""
    out = [frame(i, kind, *fields) for i, (kind, *fields) in enumerate(records)]
    out.append(frame(len(records), Kind.END, 0, len(records)))
    return out


GOOD = stream((Kind.HELLO, 1, 0x2BADB002, 0x9500, 0x1234), (Kind.MARK, 0, 0x42))


def parse(lines: list[bytes]) -> FrameParser:
    p = FrameParser()
    p.feed(b"".join(lines))
    return p


def test_round_trip_gives_fields_in_order():
    p = parse(GOOD)
    p.check_complete()
    assert [(r.seq, r.kind, r.fields) for r in p.records] == [
        (0, Kind.HELLO, (1, 0x2BADB002, 0x9500, 0x1234)),
        (1, Kind.MARK, (0, 0x42)),
        (2, Kind.END, (0, 2)),
    ]


def test_byte_at_a_time_feeding_gives_the_same_records():
    p = FrameParser()
    for b in b"".join(GOOD):
        p.feed(bytes([b]))
    p.check_complete()
    assert [r.kind for r in p.records] == [Kind.HELLO, Kind.MARK, Kind.END]


def test_firmware_noise_between_records_is_kept_aside():
    p = parse([b"SeaBIOS (version 1.16)\r\n", GOOD[0], b"Booting from ROM..\n", *GOOD[1:]])
    p.check_complete()
    assert b"Booting from ROM.." in p.noise
    assert len(p.records) == 3


def test_encoding_matches_the_payload_format():
    body = b"1 18 0 42"
    assert frame(1, 0x18, 0, 0x42) == b"@" + body + b"*" + f"{zlib.crc32(body):08x}".encode() + b"\n"


@pytest.mark.parametrize("damage, message", [
    (lambda l: [l[0], l[1].replace(b" 42", b" 43"), l[2]], "checksum mismatch"),
    (lambda l: [l[0], l[2]], "where #1 was expected"),
    (lambda l: [l[1], l[0], l[2]], "where #0 was expected"),
    (lambda l: [l[0], l[1], l[2][:-6] + b"\n"], "damaged record line"),
    (lambda l: [l[0], l[1]], "no terminal record"),
    (lambda l: [l[0], l[1], l[2][:10]], "no terminal record"),
    (lambda l: [l[0], l[1], frame(2, Kind.END, 0, 5)], "terminal record counts"),
    (lambda l: [l[0], l[1], l[2], frame(3, Kind.MARK, 0, 1)], "after the terminal record"),
    (lambda l: [l[1].replace(b"@1", b"@0")], "checksum mismatch"),
    (lambda l: [], "no records at all"),
], ids=["corrupted", "missing", "reordered", "truncated-line", "no-end", "truncated-end",
        "end-count", "after-end", "renumbered", "empty"])
def test_damaged_stream_is_an_error(damage, message):
    p = parse(damage(list(GOOD)))
    with pytest.raises(FrameError, match=message):
        p.check_complete()


def test_stream_must_begin_with_hello():
    p = parse([frame(0, Kind.MARK, 0, 1), frame(1, Kind.END, 0, 1)])
    with pytest.raises(FrameError, match="does not start with HELLO"):
        p.check_complete()
