"""The framed record protocol, as both ends know it.

A record is one ASCII line on COM1::

    @<body>*<crc>\\n      body = "<seq> <kind> <v1> <v2> ..."   (lower-case hex, no leading zeros)

``crc`` is CRC-32 (the zlib polynomial, 8 hex digits) of the body bytes.  ``seq`` counts records
from 0; the run ends with an END record whose fields are (status, number of records before it,
number of steps executed).  Nothing may follow END.  Text that does not start like a record
('@', a hex number, then a space and a hex digit, or '*') is console noise (BIOS banners, systemd's
``serial-getty@ttyS0.service``); a line that starts like one but is not well-formed is damage.
"""

from __future__ import annotations

import enum
import re
import zlib
from dataclasses import dataclass

PROTOCOL_VERSION = 2      # 2: END gained the number of steps executed
MAX_FIELDS = 12


class Kind(enum.IntEnum):
    """Record kinds; the payload emits the numbers, observe/ decodes the fields."""

    HELLO = 0x01        # protocol version, boot magic, boot info pointer, image id
    CPU = 0x02          # max leaf, vendor ebx/edx/ecx, leaf1 eax/ebx/ecx/edx, leaf 0AH eax (0: none)
    MSR = 0x03          # msr, value, fault (0 = none, else 0x100 | vector)
    DMAR = 0x04         # table address, host address width, flags, number of DRHD units
    DMAR_UNIT = 0x05    # index, register base, flags, segment, VER, CAP, ECAP, registers read (0: base beyond the 4 GiB identity map)
    PROBE_DONE = 0x06   # nothing
    APIC = 0x07         # IA32_APIC_BASE as found, SVR as found, APIC ID
    PCI = 0x08          # bdf, vendor | device << 16, class << 8 | revision, header type, bridge buses
    READ = 0x10         # step, value, fault
    POLL = 0x11         # step, last value, iterations, ok
    CPUID = 0x12        # step, leaf, subleaf, eax, ebx, ecx, edx
    MEM = 0x13          # step, address, up to 8 qwords
    MEMCMP = 0x14       # step, mismatches, first mismatching offset, value found there
    CALL = 0x15         # step, return value, fault
    IRQ = 0x16          # step, vector, count, iterations, ok
    STEP_FAULT = 0x17   # step, fault (0x100 | vector), error code
    MARK = 0x18         # step, tag
    IRQ_HALTED = 0x19   # vector, interrupts consumed, halts used (irq_wait_halted)
    USER = 0x40         # first kind free for engine extensions (VMX exits, VT-d faults, ...)
    EXCEPTION = 0x7D    # vector, error code, rip, cr2, cs, rflags: an unexpected exception
    END = 0x7E          # status, records before this one, steps executed


class EndStatus(enum.IntEnum):
    """Why the payload ended (field 0 of END; also ``EXIT_BASE | status`` on the exit port)."""

    OK = 0
    EXCEPTION = 1
    BAD_STEP = 2
    POLL_TIMEOUT = 3
    ABORTED = 4


FAULT_FLAG = 0x100  # fault fields carry 0x100 | vector so that vector 0 (#DE) is not "no fault"


# ---------------------------------------------------------------------------------------------
# The host end: an incremental parser shared by every target (console bytes in, records out).

_LINE = re.compile(rb"@([0-9a-f]+(?: [0-9a-f]+)*)\*([0-9a-f]{8})\r?$")
# Where a record starts: '@', a hex sequence number, then a hex kind or the checksum mark.  Anything
# else with an '@' in it (``serial-getty@ttyS0.service``, ``root@host:~#``) is console noise.
_START = re.compile(rb"@[0-9a-f]+(?: [0-9a-f]|\*)")
MAX_LINE = 4096          # a record line is at most ~260 bytes; longer unterminated text is noise
MAX_TOKEN = 16           # every field is a u64: at most 16 hex digits
NOISE_KEPT = 64          # console noise lines kept (the newest), each cut to NOISE_LINE bytes
NOISE_LINE = 512
ERRORS_KEPT = 16         # damage messages kept (the first ones: the first damage is the cause)


@dataclass(frozen=True)
class Record:
    seq: int
    kind: int
    fields: tuple[int, ...]

    def __str__(self) -> str:
        try:
            name = Kind(self.kind).name
        except ValueError:
            name = f"kind {self.kind:#x}"
        return f"#{self.seq} {name} " + " ".join(f"{f:#x}" for f in self.fields)


class FrameError(Exception):
    """A damaged, missing or reordered record (the caller turns it into a RecordStreamError)."""


class FrameParser:
    """Feed console bytes; get validated records in order.

    It never raises on input: damage goes to ``errors`` (the caller decides when to stop), console
    noise to ``noise`` (bounded: the newest NOISE_KEPT lines), so memory stays bounded whatever the
    console sends."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.noise: list[bytes] = []
        self.noise_dropped = 0
        self.errors: list[str] = []
        self.error_count = 0
        self._partial = b""

    @property
    def ended(self) -> bool:
        return bool(self.records) and self.records[-1].kind == Kind.END

    @property
    def damaged(self) -> bool:
        return self.error_count > 0

    def feed(self, data: bytes) -> list[Record]:
        """Parse complete lines in ``data``; return the new records.  Damage goes to ``errors``."""
        new: list[Record] = []
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > MAX_LINE:
            # No newline for this long: not a record (too long for one).  Judge it as a line now.
            lines.append(self._partial)
            self._partial = b""
        for line in lines:
            rec = self._line(line)
            if rec is not None:
                new.append(rec)
        return new

    def _noise(self, text: bytes) -> None:
        if not text.strip():
            return
        self.noise.append(text[:NOISE_LINE])
        if len(self.noise) > 2 * NOISE_KEPT:
            self.noise_dropped += len(self.noise) - NOISE_KEPT
            del self.noise[:-NOISE_KEPT]

    def _damage(self, message: str) -> None:
        self.error_count += 1
        if len(self.errors) < ERRORS_KEPT:
            self.errors.append(message)

    def _line(self, line: bytes) -> Record | None:
        start = _START.search(line)
        if start is None:
            self._noise(line)
            return None
        # Firmware output without a newline may precede a record; keep it as noise.
        self._noise(line[:start.start()])
        line = line[start.start():]
        m = _LINE.match(line)
        if m is None:
            self._damage(f"damaged record line {line[:120]!r}")
            return None
        body, crc = m.group(1), int(m.group(2), 16)
        if zlib.crc32(body) != crc:
            self._damage(f"checksum mismatch on {line[:120]!r}")
            return None
        tokens = body.split()
        if len(tokens) < 2:
            self._damage(f"record without a kind {line[:120]!r}")
            return None
        if len(tokens) > 2 + MAX_FIELDS or any(len(t) > MAX_TOKEN for t in tokens):
            self._damage(f"record with too many or too long fields {line[:120]!r}")
            return None
        seq, kind, *fields = (int(x, 16) for x in tokens)
        if self.ended:
            self._damage(f"record #{seq} after the terminal record")
            return None
        expected = len(self.records)
        if seq != expected:
            self._damage(f"record #{seq} where #{expected} was expected (missing or reordered)")
            return None
        rec = Record(seq, kind, tuple(fields))
        self.records.append(rec)
        return rec

    def first_error(self) -> str:
        more = self.error_count - 1
        return self.errors[0] + (f" (+{more} more)" if more > 0 else "") if self.errors else ""

    def check_complete(self) -> None:
        """Raise FrameError unless the stream is whole: no damage and a consistent END record
        (status, records before it, steps executed)."""
        if self.errors:
            raise FrameError(self.first_error())
        if not self.records:
            raise FrameError("no records at all")
        hello = self.records[0]
        if hello.kind != Kind.HELLO:
            raise FrameError("the stream does not start with HELLO")
        if not hello.fields or hello.fields[0] != PROTOCOL_VERSION:
            raise FrameError(f"HELLO speaks protocol {hello.fields[:1]}, the harness {PROTOCOL_VERSION}")
        if not self.ended:
            tail = f" (partial line {self._partial[:80]!r})" if self._partial else ""
            raise FrameError(f"no terminal record after #{self.records[-1].seq}{tail}")
        end = self.records[-1]
        if len(end.fields) != 3:
            raise FrameError(f"terminal record has {len(end.fields)} fields, expected 3 "
                             "(status, records before it, steps executed)")
        if end.fields[1] != end.seq:
            raise FrameError(f"terminal record counts {end.fields[1]} records, {end.seq} were received")
        if _START.search(self._partial):
            raise FrameError(f"partial record after the terminal record {self._partial[:80]!r}")

    def tail(self, n: int = 8) -> list[str]:
        return [str(r) for r in self.records[-n:]]


def frame(seq: int, kind: int, *fields: int) -> bytes:
    """Encode a record exactly as the payload does (used by tests of the parser)."""
    body = " ".join(f"{x:x}" for x in (seq, kind, *fields)).encode()
    return b"@" + body + b"*" + f"{zlib.crc32(body):08x}".encode() + b"\n"
