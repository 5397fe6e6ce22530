"""VMX observations: typed VM exits, VM-instruction outcomes and entry failures of one test.

A batch run holds many VMX tests; ``split()`` cuts the record stream at the MARK records the
builder placed around each one and types each slice as a ``VmxResult``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..payload.records import Kind as BaseKind, Record
from ..payload.vmx.builder import MARK_BEGIN, MARK_END
from ..payload.vmx.fields import ENTRY_FAILURE, Exit, VmError
from ..payload.vmx.vmm import Kind, Op, StopWhy

# Exit reasons for which the guest-linear-address field is defined (SDM Vol. 3C, 28.2.1 and
# 29.3.3.2): EPT violations with bit 7 of the qualification, string I/O, LMSW from memory is in
# the qualification-free path and INVLPG reports the address in the qualification instead.
_LINEAR_VALID = {Exit.IO, Exit.EPT_VIOLATION}
_PHYSICAL_VALID = {Exit.EPT_VIOLATION, Exit.EPT_MISCONFIG}


@dataclass(frozen=True)
class VmExit:
    """One VM exit as the exit loop recorded it (fields: SDM Vol. 3C, 25.9)."""

    n: int
    full_reason: int
    qualification: int
    rip: int
    length: int
    instruction_info: int
    raw_linear: int
    raw_physical: int
    intr_info: int
    intr_error: int
    idt_vectoring: int
    tsc: int
    regs: dict[str, int] = field(default_factory=dict, compare=False)

    @property
    def reason(self) -> int:
        """Basic exit reason, bits 15:0 (25.9.1)."""
        return self.full_reason & 0xFFFF

    @property
    def entry_failure(self) -> bool:
        return bool(self.full_reason & ENTRY_FAILURE)

    @property
    def linear_address(self) -> int | None:
        """Guest linear address where the SDM defines it for this exit (None otherwise)."""
        if self.reason == Exit.EPT_VIOLATION:
            return self.raw_linear if self.qualification >> 7 & 1 else None
        if self.reason == Exit.IO:
            return self.raw_linear if self.qualification >> 4 & 1 else None
        return None

    @property
    def physical_address(self) -> int | None:
        return self.raw_physical if self.reason in _PHYSICAL_VALID else None

    @property
    def interruption(self) -> tuple[int, int, int] | None:
        """(type, vector, error code or -1) of the VM-exit interruption information (25.9.2)."""
        if not self.intr_info >> 31 & 1:
            return None
        err = self.intr_error if self.intr_info >> 11 & 1 else -1
        return (self.intr_info >> 8 & 7, self.intr_info & 0xFF, err)

    def name(self) -> str:
        try:
            return Exit(self.reason).name
        except ValueError:
            return f"reason {self.reason}"

    def __str__(self) -> str:
        fail = " (entry failure)" if self.entry_failure else ""
        return (f"exit #{self.n} {self.name()}{fail} qual={self.qualification:#x} rip={self.rip:#x} "
                f"len={self.length} intr={self.intr_info:#x}")


@dataclass(frozen=True)
class InsnResult:
    """The outcome of one VMX instruction: status 0 VMsucceed, 1 VMfailInvalid, 2 VMfailValid."""

    op: int
    operand: int
    status: int
    error: int
    value: int

    @property
    def ok(self) -> bool:
        return self.status == 0

    @property
    def fail_invalid(self) -> bool:
        return self.status == 1

    @property
    def fail_valid(self) -> bool:
        return self.status == 2

    def __str__(self) -> str:
        try:
            op = Op(self.op).name
        except ValueError:
            op = f"op {self.op}"
        st = {0: "VMsucceed", 1: "VMfailInvalid", 2: "VMfailValid"}.get(self.status, str(self.status))
        err = ""
        if self.status == 2:
            try:
                err = f" error {self.error} ({VmError(self.error).name})"
            except ValueError:
                err = f" error {self.error}"
        return f"{op}({self.operand:#x}) -> {st}{err} value={self.value:#x}"


@dataclass
class VmxResult:
    """Everything one VMX test produced."""

    index: int
    records: list[Record]
    exits: list[VmExit]
    insns: list[InsnResult]
    stop: tuple[int, int, int] | None          # (exits, why, last reason)
    reads: dict[int, int]                      # VMREAD after the run: encoding -> value
    memory: dict[int, list[int]]               # mem_read after the run: address -> qwords
    msrs: dict[int, int]                       # rdmsr after the run: MSR -> value
    complete: bool                             # both MARK records were seen
    irqs: dict[int, int] = field(default_factory=dict)   # wait_irq after the run: vector -> count

    @property
    def exit(self) -> VmExit:
        """The first exit (most tests provoke exactly one)."""
        if not self.exits:
            raise AssertionError(f"the guest made no VM exit; {self.describe()}")
        return self.exits[0]

    @property
    def last(self) -> VmExit:
        if not self.exits:
            raise AssertionError(f"the guest made no VM exit; {self.describe()}")
        return self.exits[-1]

    @property
    def stop_why(self) -> StopWhy | None:
        return StopWhy(self.stop[1]) if self.stop else None

    def insn(self, op: Op) -> InsnResult:
        found = [i for i in self.insns if i.op == op]
        if not found:
            raise AssertionError(f"no {op.name} outcome recorded; {self.describe()}")
        return found[-1]

    @property
    def entry_error(self) -> InsnResult | None:
        """The VMLAUNCH / VMRESUME failure, if the entry failed as an instruction."""
        for i in self.insns:
            if i.op in (Op.VMLAUNCH, Op.VMRESUME):
                return i
        return None

    def failures(self) -> list[InsnResult]:
        return [i for i in self.insns if not i.ok]

    def reasons(self) -> list[int]:
        return [e.reason for e in self.exits]

    def describe(self) -> str:
        lines = [str(e) for e in self.exits] + [str(i) for i in self.insns]
        if self.stop:
            lines.append(f"stop: exits={self.stop[0]} why={StopWhy(self.stop[1]).name} last={self.stop[2]:#x}")
        return "recorded: " + ("; ".join(lines) if lines else "nothing")


def parse(index: int, records: list[Record], complete: bool) -> VmxResult:
    exits: list[VmExit] = []
    insns: list[InsnResult] = []
    stop = None
    reads: dict[int, int] = {}
    memory: dict[int, list[int]] = {}
    msrs: dict[int, int] = {}
    irqs: dict[int, int] = {}
    for r in records:
        f = r.fields
        if r.kind == Kind.VMX_EXIT:
            exits.append(VmExit(*f[:12]))
        elif r.kind == Kind.VMX_REGS and exits and exits[-1].n == f[0]:
            exits[-1].regs.update(zip(("rax", "rbx", "rcx", "rdx", "rsi", "rdi"), f[1:7]))
        elif r.kind == Kind.VMX_INSN:
            if len(f) == 2:                                  # vmx_on refused before VMXON
                insns.append(InsnResult(f[1], 0, 3, f[0], 0))
            else:
                ins = InsnResult(*f[:5])
                insns.append(ins)
                if ins.op == Op.VMREAD and ins.ok:
                    reads[ins.operand] = ins.value
        elif r.kind == Kind.VMX_STOP:
            stop = (f[0], f[1], f[2])
        elif r.kind == BaseKind.MEM:
            memory[f[1]] = list(f[2:])
        elif r.kind == BaseKind.MSR and not f[2]:
            msrs[f[0]] = f[1]
        elif r.kind == BaseKind.IRQ:                         # step, vector, count, iterations, ok
            irqs[f[1]] = f[2]
    return VmxResult(index, records, exits, insns, stop, reads, memory, msrs, complete, irqs)


def split(records: list[Record]) -> dict[int, VmxResult]:
    """Cut a batch's records into per-test results (a test without its END mark is incomplete)."""
    out: dict[int, VmxResult] = {}
    current: int | None = None
    chunk: list[Record] = []
    for r in records:
        if r.kind == BaseKind.MARK and len(r.fields) >= 2:
            tag = r.fields[1]
            if tag & 0xF000_0000 == MARK_BEGIN:
                if current is not None:
                    out[current] = parse(current, chunk, False)
                current, chunk = tag & 0x0FFF_FFFF, []
                continue
            if tag & 0xF000_0000 == MARK_END and current == tag & 0x0FFF_FFFF:
                out[current] = parse(current, chunk, True)
                current, chunk = None, []
                continue
        if current is not None:
            chunk.append(r)
    if current is not None:
        out[current] = parse(current, chunk, False)
    return out
