"""The framed record protocol, as both ends know it.

A record is one ASCII line on COM1::

    @<body>*<crc>\\n      body = "<seq> <kind> <v1> <v2> ..."   (lower-case hex, no leading zeros)

``crc`` is CRC-32 (the zlib polynomial, 8 hex digits) of the body bytes.  ``seq`` counts records
from 0; the run ends with an END record whose fields are (status, number of records before it).
Anything on the line that is not a well-formed record is console noise (BIOS banners) unless it
starts with '@', in which case it is a damaged record.
"""

from __future__ import annotations

import enum
import re
import zlib
from dataclasses import dataclass

PROTOCOL_VERSION = 1
MAX_FIELDS = 12


class Kind(enum.IntEnum):
    """Record kinds; the payload emits the numbers, observe/ decodes the fields."""

    HELLO = 0x01        # protocol version, boot magic, boot info pointer, image id
    CPU = 0x02          # max leaf, vendor ebx/edx/ecx, leaf1 eax/ebx/ecx/edx
    MSR = 0x03          # msr, value, fault (0 = none, else 0x100 | vector)
    DMAR = 0x04         # table address, host address width, flags, number of DRHD units
    DMAR_UNIT = 0x05    # index, register base, flags, segment, VER, CAP, ECAP
    PROBE_DONE = 0x06   # nothing
    APIC = 0x07         # IA32_APIC_BASE as found, SVR as found, APIC ID
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
    END = 0x7E          # status, records before this one


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
    """Feed console bytes; get validated records in order.  Console noise is kept as ``noise``."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.noise: list[bytes] = []
        self.errors: list[str] = []
        self._partial = b""

    @property
    def ended(self) -> bool:
        return bool(self.records) and self.records[-1].kind == Kind.END

    def feed(self, data: bytes) -> list[Record]:
        """Parse complete lines in ``data``; return the new records.  Damage goes to ``errors``."""
        new: list[Record] = []
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            rec = self._line(line)
            if rec is not None:
                new.append(rec)
        return new

    def _line(self, line: bytes) -> Record | None:
        at = line.find(b"@")
        if at < 0:
            if line.strip():
                self.noise.append(line)
            return None
        if at > 0:
            # Firmware output without a newline may precede a record; keep it as noise.
            self.noise.append(line[:at])
            line = line[at:]
        m = _LINE.match(line)
        if m is None:
            self.errors.append(f"damaged record line {line[:120]!r}")
            return None
        body, crc = m.group(1), int(m.group(2), 16)
        if zlib.crc32(body) != crc:
            self.errors.append(f"checksum mismatch on {line[:120]!r}")
            return None
        seq, kind, *fields = (int(x, 16) for x in body.split())
        expected = len(self.records)
        if self.ended:
            self.errors.append(f"record #{seq} after the terminal record")
            return None
        if seq != expected:
            self.errors.append(f"record #{seq} where #{expected} was expected (missing or reordered)")
            return None
        rec = Record(seq, kind, tuple(fields))
        self.records.append(rec)
        return rec

    def check_complete(self) -> None:
        """Raise FrameError unless the stream is whole: no damage and a consistent END record."""
        if self.errors:
            raise FrameError(self.errors[0] + (f" (+{len(self.errors) - 1} more)" if len(self.errors) > 1 else ""))
        if not self.records:
            raise FrameError("no records at all")
        if self.records[0].kind != Kind.HELLO:
            raise FrameError("the stream does not start with HELLO")
        if not self.ended:
            tail = f" (partial line {self._partial[:80]!r})" if self._partial else ""
            raise FrameError(f"no terminal record after #{self.records[-1].seq}{tail}")
        end = self.records[-1]
        if len(end.fields) < 2 or end.fields[1] != end.seq:
            raise FrameError(f"terminal record counts {end.fields[1:2]} records, {end.seq} were received")

    def tail(self, n: int = 8) -> list[str]:
        return [str(r) for r in self.records[-n:]]


def frame(seq: int, kind: int, *fields: int) -> bytes:
    """Encode a record exactly as the payload does (used by tests of the parser)."""
    body = " ".join(f"{x:x}" for x in (seq, kind, *fields)).encode()
    return b"@" + body + b"*" + f"{zlib.crc32(body):08x}".encode() + b"\n"
