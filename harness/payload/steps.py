"""Steps: the instructions Python gives the engine's interpreter.

Each step is eight 64-bit words: opcode, flags, then up to six arguments.  An argument may be a
number or a symbol name (resolved by the linker, e.g. a scenario's own routine for ``call``).
Flags pick the access size, an optional base variable added to the address, an optional variable
that receives the result, and whether a record is emitted.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

STEP_WORDS = 8
NUM_VARS = 16

# Variables the engine itself fills during the boot probe.
VAR_ZERO = 0           # always 0
VAR_DMAR0 = 1          # register base of the first DRHD unit (0 when there is none)
VAR_DMAR1 = 2
VAR_DMAR2 = 3
VAR_DMAR3 = 4
FIRST_FREE_VAR = 5


class Op(enum.IntEnum):
    END = 0
    MMIO_WRITE = 1      # a=addr b=value
    MMIO_READ = 2       # a=addr                      -> READ
    IO_WRITE = 3        # a=port b=value
    IO_READ = 4         # a=port                      -> READ
    POLL = 5            # a=addr b=mask c=expected d=max iterations (and POLL_TSC_BOUND ticks) -> POLL
    RDMSR = 6           # a=msr                       -> MSR
    WRMSR = 7           # a=msr b=value               -> STEP_FAULT if it faults
    CPUID = 8           # a=leaf b=subleaf            -> CPUID
    MEM_READ = 9        # a=addr b=qwords (1..8)      -> MEM
    MEM_FILL = 10       # a=addr b=bytes c=qword pattern
    MEM_COMPARE = 11    # a=addr b=bytes c=qword pattern -> MEMCMP
    MEM_COPY = 12       # a=dst b=src c=bytes
    CALL = 13           # a=routine b,c,d = rdi,rsi,rdx -> CALL
    MARK = 14           # a=tag                        -> MARK
    WAIT_IRQ = 15       # a=vector b=max iterations   -> IRQ
    DELAY = 16          # a=iterations of PAUSE
    SET_VAR = 17        # a=value (plus base var) stored into the store var
    SYNC = 18           # a=max receiver polls, b..e=point name -> SYNC, then SYNC_DONE


class Flag(enum.IntFlag):
    NONE = 0
    USE_BASE = 1 << 8      # add vars[base] to argument a
    STORE = 1 << 9         # store the result into vars[store]
    QUIET = 1 << 10        # emit no record for this step (result only stored)
    IO_SPACE = 1 << 11     # POLL reads an I/O port instead of memory
    ABORT_ON_TIMEOUT = 1 << 12  # a failed POLL / WAIT_IRQ ends the run (END status POLL_TIMEOUT)
    GUARD = 1 << 13        # an exception inside the step is reported (STEP_FAULT), not fatal


class SyncKind(enum.IntEnum):
    """Records of the SYNC step.  They extend protocol 2 (records.py) without changing any existing
    record, so PROTOCOL_VERSION stays 2: a host that does not know them only sees unknown kinds.

    SYNC (0x1A): step, name qwords (1..4).  Sent when the payload arrives at the point; it then
    waits for the release token (``release_token``) on COM1's receiver.  SYNC_DONE (0x1B): step,
    receiver polls spent waiting, ok (1: released; 0: the bound ran out and the run ends with END
    status POLL_TIMEOUT)."""

    SYNC = 0x1A
    SYNC_DONE = 0x1B


SYNC_NAME_BYTES = 32            # four qwords of ASCII in the SYNC record
SYNC_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$")
SYNC_MAX_POLLS = 1 << 28        # receiver polls before the payload gives up waiting for the host


def sync_name_words(name: str) -> tuple[int, ...]:
    """A sync point's name as the qwords the SYNC record carries (ASCII, little-endian, NUL-padded)."""
    if not SYNC_NAME.match(name):
        raise ValueError(f"sync point name {name!r}: expected 1..{SYNC_NAME_BYTES} characters of "
                         "letters, digits, '.', '_' or '-', starting with a letter or digit")
    raw = name.encode().ljust((len(name) + 7) // 8 * 8, b"\0")
    return tuple(int.from_bytes(raw[i:i + 8], "little") for i in range(0, len(raw), 8))


def sync_name(words: tuple[int, ...] | list[int]) -> str:
    """The name a SYNC record's qwords spell (the inverse of sync_name_words)."""
    raw = b"".join((w & (1 << 64) - 1).to_bytes(8, "little") for w in words)
    return raw.rstrip(b"\0").decode("ascii", "replace")


def release_token(sync_seq: int) -> bytes:
    """What the host sends on the console to release the payload waiting after SYNC record number
    ``sync_seq``: '@', 'G' and the sequence number's low byte as two hex digits.  The payload
    matches exactly these four bytes, so console noise or a stale release cannot release it; what
    follows (a line end for line-buffered consoles) is ignored."""
    return b"@G%02x\r\n" % (sync_seq & 0xFF)


SIZE_SHIFT = 16            # bits 16..19: access size in bytes (1, 2, 4, 8)
BASE_SHIFT = 0             # bits 0..3: base variable
STORE_SHIFT = 4            # bits 4..7: store variable

Arg = int | str


@dataclass(frozen=True)
class Step:
    op: Op
    args: tuple[Arg, ...] = ()
    size: int = 8
    base: int | None = None
    store: int | None = None
    quiet: bool = False
    guard: bool = False
    extra: Flag = Flag.NONE
    comment: str = ""

    def flags(self) -> int:
        if self.size not in (1, 2, 4, 8):
            raise ValueError(f"access size {self.size} is not 1, 2, 4 or 8")
        f = int(self.extra) | (self.size << SIZE_SHIFT)
        if self.base is not None:
            _check_var(self.base)
            f |= int(Flag.USE_BASE) | (self.base << BASE_SHIFT)
        if self.store is not None:
            _check_var(self.store)
            f |= int(Flag.STORE) | (self.store << STORE_SHIFT)
        if self.quiet:
            f |= int(Flag.QUIET)
        if self.guard:
            f |= int(Flag.GUARD)
        return f

    def words(self) -> list[Arg]:
        if len(self.args) > STEP_WORDS - 2:
            raise ValueError(f"{self.op.name} takes at most {STEP_WORDS - 2} arguments")
        for a in self.args:
            if isinstance(a, int) and not 0 <= a < 1 << 64:
                raise ValueError(f"{self.op.name} argument {a:#x} does not fit 64 bits")
        return [int(self.op), self.flags(), *self.args] + [0] * (STEP_WORDS - 2 - len(self.args))


def _check_var(v: int) -> None:
    if not 0 <= v < NUM_VARS:
        raise ValueError(f"variable {v} out of range 0..{NUM_VARS - 1}")


@dataclass
class StepList:
    """The ordered steps of a scenario; each builder method returns the step's index."""

    steps: list[Step] = field(default_factory=list)

    def add(self, step: Step) -> int:
        self.steps.append(step)
        return len(self.steps) - 1

    # Convenience builders: one per opcode, named after what they do.
    def mmio_write(self, addr: int, value: int, size: int = 4, **kw) -> int:
        return self.add(Step(Op.MMIO_WRITE, (addr, value), size=size, **kw))

    def mmio_read(self, addr: int, size: int = 4, **kw) -> int:
        return self.add(Step(Op.MMIO_READ, (addr,), size=size, **kw))

    def io_write(self, port: int, value: int, size: int = 1, **kw) -> int:
        return self.add(Step(Op.IO_WRITE, (port, value), size=size, **kw))

    def io_read(self, port: int, size: int = 1, **kw) -> int:
        return self.add(Step(Op.IO_READ, (port,), size=size, **kw))

    def poll(self, addr: int, mask: int, expected: int, max_iterations: int, size: int = 4,
             io: bool = False, abort: bool = False, **kw) -> int:
        """Read until ``value & mask == expected``: at most ``max_iterations`` reads and at most
        ``engine.POLL_TSC_BOUND`` TSC ticks, whichever ends first (the POLL record says which
        iteration it stopped at and whether the value came)."""
        extra = (Flag.IO_SPACE if io else Flag.NONE) | (Flag.ABORT_ON_TIMEOUT if abort else Flag.NONE)
        return self.add(Step(Op.POLL, (addr, mask, expected, max_iterations), size=size, extra=extra, **kw))

    def rdmsr(self, msr: int, **kw) -> int:
        return self.add(Step(Op.RDMSR, (msr,), **kw))

    def wrmsr(self, msr: int, value: int, **kw) -> int:
        return self.add(Step(Op.WRMSR, (msr, value), **kw))

    def cpuid(self, leaf: int, subleaf: int = 0, **kw) -> int:
        return self.add(Step(Op.CPUID, (leaf, subleaf), **kw))

    def mem_read(self, addr: int, qwords: int = 1, **kw) -> int:
        if not 1 <= qwords <= 8:
            raise ValueError("mem_read reports 1..8 qwords per step")
        return self.add(Step(Op.MEM_READ, (addr, qwords), **kw))

    def mem_fill(self, addr: int, nbytes: int, pattern: int, **kw) -> int:
        _check_qword_multiple(nbytes)
        return self.add(Step(Op.MEM_FILL, (addr, nbytes, pattern), **kw))

    def mem_compare(self, addr: int, nbytes: int, pattern: int, **kw) -> int:
        _check_qword_multiple(nbytes)
        return self.add(Step(Op.MEM_COMPARE, (addr, nbytes, pattern), **kw))

    def mem_copy(self, dst: int, src: int, nbytes: int, **kw) -> int:
        return self.add(Step(Op.MEM_COPY, (dst, src, nbytes), **kw))

    def call(self, routine: str, *args: Arg, **kw) -> int:
        if len(args) > 3:
            raise ValueError("call passes at most three arguments")
        return self.add(Step(Op.CALL, (routine, *args), **kw))

    def mark(self, tag: int, **kw) -> int:
        return self.add(Step(Op.MARK, (tag,), **kw))

    def wait_irq(self, vector: int, max_iterations: int, abort: bool = False, **kw) -> int:
        extra = Flag.ABORT_ON_TIMEOUT if abort else Flag.NONE
        return self.add(Step(Op.WAIT_IRQ, (vector, max_iterations), extra=extra, **kw))

    def wait_irq_halted(self, vector: int, max_halts: int, watchdog_count: int, **kw) -> int:
        """HLT until ``vector`` arrives, at most ``max_halts`` times, each bounded by a LAPIC timer
        of ``watchdog_count`` ticks (engine ``irq_wait_halted``).  The CALL value is the number of
        interrupts seen; an IRQ_HALTED record also gives the halts used."""
        return self.call("irq_wait_halted", vector, max_halts, watchdog_count, **kw)

    def delay(self, iterations: int, **kw) -> int:
        return self.add(Step(Op.DELAY, (iterations,), **kw))

    def set_var(self, var: int, value: int, **kw) -> int:
        return self.add(Step(Op.SET_VAR, (value,), store=var, quiet=True, **kw))

    def sync(self, name: str, max_polls: int = SYNC_MAX_POLLS, **kw) -> int:
        """Stop at the named point until the host has run its action there (``Target.at``) and
        released the payload over the console; bounded by ``max_polls`` polls of the UART's
        receiver (then the run ends with END status POLL_TIMEOUT).  Names are unique per scenario."""
        words = sync_name_words(name)
        if name in self.sync_points():
            raise ValueError(f"sync point {name!r} is already step {self.sync_points()[name]}")
        if not 1 <= max_polls < 1 << 63:
            raise ValueError(f"sync point {name!r}: max_polls {max_polls} is not positive")
        return self.add(Step(Op.SYNC, (max_polls, *words), comment=f"sync {name!r}", **kw))

    def sync_points(self) -> dict[str, int]:
        """The scenario's sync points: name -> step index."""
        return {sync_name(list(s.args[1:])): i for i, s in enumerate(self.steps) if s.op == Op.SYNC}


def _check_qword_multiple(nbytes: int) -> None:
    if nbytes <= 0 or nbytes % 8:
        raise ValueError(f"length {nbytes} is not a positive multiple of 8")


def steps_asm(steps: list[Step], label: str = "steps") -> str:
    """The step table as assembler data (symbols are resolved by the linker)."""
    lines = [".section .data", ".balign 64", f".globl {label}", f"{label}:"]
    for i, step in enumerate([*steps, Step(Op.END)]):
        words = ", ".join(w if isinstance(w, str) else f"{w:#x}" for w in step.words())
        note = f"  # {i}: {step.op.name}" + (f" {step.comment}" if step.comment else "")
        lines.append(f"    .quad {words}{note}")
    return "\n".join(lines) + "\n"
