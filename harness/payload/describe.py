"""One record as a line a person can read: its kind by name and its fields decoded.

``records.txt`` in every evidence directory is written with ``describe``.  The base kinds are
records.py's; the payload libraries add theirs (PCI from pci.py, VT-d 0x40.. from vtd.py, VMX
0x50.. from vmx/vmm.py).  Decoding follows the layouts those modules document: FSTS/FECTL (VT-d
11.4.6), FRCD (11.4.14), VM-exit reasons (SDM Vol. 3D, Appendix C), VM-instruction errors (SDM
Vol. 3C, 31.4).  A kind nobody knows stays a number; the raw fields always follow.
"""

from __future__ import annotations

import enum
import struct
from typing import Callable

from .pci import PCI_RECORD
from .records import EndStatus, Kind, Record
from .steps import SyncKind, sync_name
from .vmx.fields import Exit, VmError
from .vmx.vmm import Kind as VmxKind, Op as VmxOp, StopWhy
from .vtd import FSTS_IQE, FSTS_PFO, FSTS_PPF, FECTL_IM, FECTL_IP, FaultReason, VtdKind, WaitWhat

_EXCEPTIONS = {0: "#DE", 1: "#DB", 2: "NMI", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM",
               8: "#DF", 10: "#TS", 11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF",
               17: "#AC", 18: "#MC", 19: "#XM", 20: "#VE", 21: "#CP"}


def _name(enum_type: type[enum.IntEnum], value: int) -> str:
    try:
        return enum_type(value).name
    except ValueError:
        return f"{value:#x}"


def _fault(code: int) -> str:
    """A fault field: 0 none, else FAULT_FLAG | vector."""
    return "ok" if not code else f"fault {_EXCEPTIONS.get(code & 0xFF, code & 0xFF)}"


def _bdf(v: int) -> str:
    return f"{v >> 8 & 0xFF:02x}:{v >> 3 & 0x1F:02x}.{v & 7}"


def _flags(value: int, names: dict[int, str]) -> str:
    set_ = [n for bit, n in names.items() if value & bit]
    return "|".join(set_) if set_ else "-"


def frcd_text(lo: int, hi: int) -> str:
    """A fault recording register (VT-d 11.4.14)."""
    if not hi >> 63 & 1:
        return "empty"
    reason = hi >> 32 & 0xFF
    text = (f"reason {reason:#x} {_name(FaultReason, reason)} sid {_bdf(hi & 0xFFFF)} "
            f"{'read' if hi >> 62 & 1 else 'write'} fi {lo:#x}")
    if reason >= FaultReason.IR_RESERVED_REQ:
        text += f" (interrupt index {lo >> 48})"
    if hi >> 60 & 3:
        text += f" at {hi >> 60 & 3}"
    if hi >> 31 & 1:
        text += f" pasid {hi >> 40 & 0xFFFFF:#x}"
    return text


def _fields(f: tuple[int, ...], names: tuple[str, ...]) -> str:
    return " ".join(f"{n}={v:#x}" for n, v in zip(names, f))


def _cpu(f: tuple[int, ...]) -> str:
    vendor = struct.pack("<III", *(x & 0xFFFF_FFFF for x in f[1:4])).decode("ascii", "replace")
    return f"max leaf {f[0]:#x} vendor {vendor!r} signature {f[4]:#x} ecx {f[6]:#x} edx {f[7]:#x}"


def _pci(f: tuple[int, ...]) -> str:
    text = f"{_bdf(f[0])} {f[1] & 0xFFFF:04x}:{f[1] >> 16:04x} class {f[2] >> 8:06x} rev {f[2] & 0xFF:#x}"
    if f[3] & 0x7F == 1:
        text += f" bridge to bus {f[4] >> 8 & 0xFF:#x}"
    return text + (" multi-function" if f[3] & 0x80 else "")


def _fsts(f: tuple[int, ...]) -> str:
    fsts, fectl = f[1], f[2]
    return (f"unit {f[0]:#x} FSTS {fsts:#x} [{_flags(fsts, {FSTS_PFO: 'PFO', FSTS_PPF: 'PPF', FSTS_IQE: 'IQE'})}"
            f" FRI {fsts >> 8 & 0xFF}] FECTL {fectl:#x} [{_flags(fectl, {FECTL_IM: 'IM', FECTL_IP: 'IP'})}]")


def _vmx_exit(f: tuple[int, ...]) -> str:
    reason = f[1] & 0xFFFF
    fail = " (VM-entry failure)" if f[1] >> 31 & 1 else ""
    return (f"exit #{f[0]} {_name(Exit, reason)}{fail} qualification {f[2]:#x} rip {f[3]:#x} "
            f"length {f[4]} info {f[5]:#x} linear {f[6]:#x} physical {f[7]:#x} "
            f"interruption {f[8]:#x} error {f[9]:#x} idt-vectoring {f[10]:#x} tsc {f[11]}")


def _vmx_insn(f: tuple[int, ...]) -> str:
    if len(f) == 2:
        return f"{_name(VmxOp, f[1])} refused: {'no VMX' if f[0] == 0x10 else 'VMX disabled and locked'}"
    status = {0: "VMsucceed", 1: "VMfailInvalid", 2: "VMfailValid"}.get(f[2], f"status {f[2]}")
    err = f" error {f[3]} {_name(VmError, f[3])}" if f[2] == 2 else ""
    return f"{_name(VmxOp, f[0])}({f[1]:#x}) {status}{err} value {f[4]:#x}"


_DECODERS: dict[int, tuple[str, Callable[[tuple[int, ...]], str]]] = {
    Kind.HELLO: ("HELLO", lambda f: _fields(f, ("protocol", "boot_magic", "boot_info", "image"))),
    Kind.CPU: ("CPU", _cpu),
    Kind.MSR: ("MSR", lambda f: (f"step {f[3]} " if len(f) > 3 else "") + f"msr {f[0]:#x} = {f[1]:#x} {_fault(f[2])}"),
    Kind.DMAR: ("DMAR", lambda f: f"table {f[0]:#x} host address width {f[1] + 1} flags {f[2]:#x} units {f[3]}"),
    Kind.DMAR_UNIT: ("DMAR_UNIT", lambda f: f"unit {f[0]} base {f[1]:#x} flags {f[2]:#x} segment {f[3]} "
                                            f"VER {f[4]:#x} CAP {f[5]:#x} ECAP {f[6]:#x}"
                                            + ("" if len(f) < 8 or f[7] else
                                               " (registers not read: base beyond the 4 GiB identity map)")),
    Kind.PROBE_DONE: ("PROBE_DONE", lambda f: ""),
    Kind.APIC: ("APIC", lambda f: f"IA32_APIC_BASE {f[0]:#x} SVR {f[1]:#x} APIC ID {f[2]:#x}"),
    PCI_RECORD: ("PCI", _pci),
    Kind.READ: ("READ", lambda f: f"step {f[0]} value {f[1]:#x} {_fault(f[2])}"),
    Kind.POLL: ("POLL", lambda f: f"step {f[0]} last {f[1]:#x} iterations {f[2]} {'ok' if f[3] else 'timed out'}"),
    Kind.CPUID: ("CPUID", lambda f: f"step {f[0]} leaf {f[1]:#x}.{f[2]:#x} eax {f[3]:#x} ebx {f[4]:#x} "
                                    f"ecx {f[5]:#x} edx {f[6]:#x}"),
    Kind.MEM: ("MEM", lambda f: f"step {f[0]} at {f[1]:#x}: " + " ".join(f"{q:#018x}" for q in f[2:])),
    Kind.MEMCMP: ("MEMCMP", lambda f: f"step {f[0]} " + ("match" if not f[1] else
                                      f"{f[1]} mismatching qwords, first at +{f[2]:#x} holds {f[3]:#x}")),
    Kind.CALL: ("CALL", lambda f: f"step {f[0]} returned {f[1]:#x} {_fault(f[2])}"),
    Kind.IRQ: ("IRQ", lambda f: f"step {f[0]} vector {f[1]:#x} count {f[2]} iterations {f[3]} "
                                f"{'ok' if f[4] else 'timed out'}"),
    Kind.STEP_FAULT: ("STEP_FAULT", lambda f: f"step {f[0]} {_fault(f[1])} error code {f[2]:#x}"),
    Kind.MARK: ("MARK", lambda f: f"step {f[0]} tag {f[1]:#x}"),
    Kind.IRQ_HALTED: ("IRQ_HALTED", lambda f: f"vector {f[0]:#x} interrupts {f[1]} halts {f[2]}"),
    # Sync points (steps.SyncKind; protocol 2, records.py): the payload waits for the host here.
    SyncKind.SYNC: ("SYNC", lambda f: f"step {f[0]} point {sync_name(f[1:])!r}"),
    SyncKind.SYNC_DONE: ("SYNC_DONE", lambda f: f"step {f[0]} " + ("released" if f[2] else "not released")
                                                + f" after {f[1]} receiver polls"),
    Kind.EXCEPTION: ("EXCEPTION", lambda f: f"{_EXCEPTIONS.get(f[0], f[0])} error {f[1]:#x} rip {f[2]:#x} "
                                            f"cr2 {f[3]:#x} cs {f[4]:#x} rflags {f[5]:#x}"),
    Kind.END: ("END", lambda f: f"{_name(EndStatus, f[0])} after {f[1]} records" + (f", {f[2]} steps" if len(f) > 2 else "")),
    VtdKind.FRCD: ("VTD_FRCD", lambda f: f"unit {f[0]:#x} FRCD{f[1]}: {frcd_text(f[2], f[3])}"),
    VtdKind.FSTS: ("VTD_FSTS", _fsts),
    VtdKind.TIMEOUT: ("VTD_TIMEOUT", lambda f: f"waiting for {_name(WaitWhat, f[0])}, last read {f[1]:#x}"),
    VtdKind.QI_WAIT: ("VTD_QI_WAIT", lambda f: f"status at {f[0]:#x} = {f[1]:#x} after {f[2]} polls"),
    VmxKind.VMX_EXIT: ("VMX_EXIT", _vmx_exit),
    VmxKind.VMX_REGS: ("VMX_REGS", lambda f: f"exit #{f[0]} " + _fields(f[1:], ("rax", "rbx", "rcx", "rdx", "rsi", "rdi"))),
    VmxKind.VMX_INSN: ("VMX_INSN", _vmx_insn),
    VmxKind.VMX_STOP: ("VMX_STOP", lambda f: f"after {f[0]} exits: {_name(StopWhy, f[1])}, last reason "
                                             f"{_name(Exit, f[2] & 0xFFFF)}"),
}


def kind_name(kind: int) -> str:
    entry = _DECODERS.get(kind)
    return entry[0] if entry else f"kind {kind:#x}"


def describe(record: Record) -> str:
    """``#seq NAME decoded fields  [raw fields]``; never raises (a short record keeps its raw form)."""
    raw = " ".join(f"{v:#x}" for v in record.fields)
    entry = _DECODERS.get(record.kind)
    if entry is None:
        return f"#{record.seq} kind {record.kind:#x} {raw}".rstrip()
    name, decode = entry
    try:
        text = decode(record.fields)
    except (IndexError, struct.error, ValueError):
        text = "(fields do not match the kind's layout)"
    head = f"#{record.seq} {name} {text}".rstrip()
    return f"{head}  [{raw}]" if raw else head
