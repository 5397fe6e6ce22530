"""A VMX scenario in Python: controls, guest state, guest code, exit actions → engine steps.

``VmxTest`` describes one guest the way kvm-unit-tests' VMX tests do (set controls, write the
guest's code, ``enter_guest()``), but nothing runs here: ``build()`` turns it into the VMCS field
table (assembler data, so guest symbols resolve at link time), the action block, bitmaps and EPT
tables in the arena, and the call steps that drive the VMM routines.  Several tests can be built
into one ``Scenario`` (a batch): each is bracketed by MARK records and leaves VMX operation at its
end, so one boot serves many.
"""

from __future__ import annotations

import enum
import struct
import textwrap
from dataclasses import dataclass, field

from ..image import Scenario
from .controls import EntryCtl, ExitCtl, Pin, Proc, Proc2, VmxCaps
from .ept import Ept
from .fields import MAX_EXIT_REASON, F, Exit
from .vmm import ACTION_WORDS, MODE_CR0_OR, MODE_CR4_OR, MODE_IMM, REGS_WORDS, TABLE_END, VMM_ASM, Act, Op

MARK_BEGIN = 0xB000_0000      # MARK tags bracketing test n: BEGIN | n and END | n
MARK_END = 0xE000_0000

# Guest selectors and access rights (SDM Vol. 3C, 25.4.1, table 25-2; GDT of engine.py).
CS64, CS32, DS, TR = 0x08, 0x18, 0x10, 0x28
AR_CODE64 = 0xA09B            # present, S, type 11 (execute/read, accessed), L=1, G=1
AR_CODE32 = 0xC09B            # D=1, G=1
AR_DATA = 0xC093              # read/write accessed, D/B=1, G=1
AR_TSS64 = 0x008B             # present, type 11 (busy TSS)
AR_UNUSABLE = 1 << 16
AR_REAL_CODE, AR_REAL_DATA = 0x9B, 0x93
EFER_LME_LMA = 0x500
CR0_PE, CR0_ET, CR0_NE, CR0_PG = 1 << 0, 1 << 4, 1 << 5, 1 << 31
CR4_PSE = 1 << 4
RFLAGS_FIXED = 0x2
RFLAGS_IF = 1 << 9


class Mode(enum.Enum):
    LONG = "64-bit"
    PROTECTED = "32-bit protected mode with paging"
    REAL = "real mode (unrestricted guest)"


@dataclass(frozen=True)
class Action:
    """What the exit loop does after an exit of one reason (see ``vmm.Act``)."""

    flags: Act
    field: int = 0
    value: int = 0
    address: int | tuple = 0
    bits: int = 0
    cpuid: tuple[int, int, int, int] = (0, 0, 0, 0)
    inject: int = 0
    error_code: int = 0

    @classmethod
    def stop(cls) -> "Action":
        return cls(Act.STOP)

    @classmethod
    def skip(cls) -> "Action":
        """Resume after the exiting instruction (guest RIP += VM-exit instruction length)."""
        return cls(Act.SKIP)

    @classmethod
    def resume(cls) -> "Action":
        """VMRESUME with guest RIP unchanged: the guest retries the instruction that exited (a
        fault-like exit, or one whose cause another action removed)."""
        return cls(Act(0))

    @classmethod
    def emulate_cpuid(cls, eax: int, ebx: int, ecx: int, edx: int) -> "Action":
        return cls(Act.CPUID | Act.SKIP, cpuid=(eax, ebx, ecx, edx))

    @classmethod
    def write(cls, field: int, value: int, skip: bool = False) -> "Action":
        return cls(Act.VMWRITE | (Act.SKIP if skip else Act(0)), field=field, value=value)

    @classmethod
    def grant(cls, entry_address: int | tuple, bits: int) -> "Action":
        """OR permission bits into an EPT entry, invalidate EPT-derived translations, resume."""
        return cls(Act.MEM_OR | Act.INVEPT, address=entry_address, bits=bits)

    @classmethod
    def revoke(cls, entry_address: int | tuple, bits: int, single_context: bool = False,
               skip: bool = False) -> "Action":
        """Clear permission bits of an EPT entry, then INVEPT (all-context, or single-context of
        the current EPTP), and resume (after the exiting instruction with ``skip``)."""
        inv = Act.INVEPT_SINGLE if single_context else Act.INVEPT
        return cls(Act.MEM_AND | inv | (Act.SKIP if skip else Act(0)), address=entry_address, bits=bits)

    @classmethod
    def inject_event(cls, info: int, error_code: int = 0, skip: bool = False,
                     length: int | None = None) -> "Action":
        """Inject an event on the next entry (26.6); its VM-entry instruction length is the exit's
        instruction length unless ``length`` is given."""
        flags = Act.INJECT | (Act.SKIP if skip else Act(0))
        if length is None:
            return cls(flags, inject=info, error_code=error_code)
        return cls(flags | Act.VMWRITE | Act.KEEP_LENGTH, field=int(F.ENTRY_INSTR_LEN), value=length,
                   inject=info, error_code=error_code)

    def words(self) -> list[int]:
        a, b, c, d = (x & 0xFFFF_FFFF for x in self.cpuid)
        return [int(self.flags), self.field, self.value, self.address, self.bits,
                a | b << 32, c | d << 32, (self.inject & 0xFFFF_FFFF) | (self.error_code & 0xFFFF_FFFF) << 32]


@dataclass
class VmxTest:
    """One guest and everything around it.  Build with ``build(scenario, index)``."""

    caps: VmxCaps
    name: str = "vmx"
    mode: Mode = Mode.LONG
    code: str = "vmcall\n"
    pin: int = 0
    proc: int = 0
    proc2: int = 0
    exit_ctls: int = 0
    entry_ctls: int = 0
    fields: dict[int, int] = field(default_factory=dict)          # explicit VMCS values
    symbolic: dict[int, str] = field(default_factory=dict)        # VMCS values that are symbols
    force: dict[int, int] = field(default_factory=dict)           # written after reconciliation
    regs: dict[str, int] = field(default_factory=dict)            # initial guest GPRs
    actions: dict[int, Action] = field(default_factory=dict)
    max_exits: int = 16
    rflags: int = RFLAGS_FIXED
    enter_with_resume: bool = False
    io_ports: set[int] = field(default_factory=set)
    msr_reads: set[int] = field(default_factory=set)
    msr_writes: set[int] = field(default_factory=set)
    ept: Ept | None = None
    ept_options: dict = field(default_factory=dict)
    vpid: int = 0
    guest_idt: bool = True
    after: list = field(default_factory=list)   # (kind, args) steps after the run
    setup: list = field(default_factory=list)   # (kind, args) steps before the run
    ept_maps: list = field(default_factory=list)   # (level, gpa, perms, raw) applied at build
    ept_entries: dict = field(default_factory=dict)  # (level, gpa) -> entry address, after build
    ept_bits: list = field(default_factory=list)     # (level, gpa, bits) ORed into entries at build
    msr_bitmap: bool = False                          # an MSR bitmap even if no MSR exits
    pages: list = field(default_factory=list)         # names of zeroed 4 KiB pages to allocate
    guest_tables: tuple | None = None                 # (linear, gpa, accessed) for own page tables
    eptp_alternates: list = field(default_factory=list)  # per EPTP-list entry 1..: [(gpa, perms)]
    shadow: tuple | None = None                       # (VMREAD-exiting, VMWRITE-exiting encodings)
    handles: dict = field(default_factory=dict)       # handle -> address, after build
    entered: bool = False
    _prefix: str = ""

    # -- what a test says ------------------------------------------------------------------------
    def guest(self, asm: str) -> None:
        """The guest's code (Intel syntax; its first instruction is the entry point)."""
        self.code = textwrap.dedent(asm)

    def on(self, reason: int, action: Action) -> None:
        self.actions[int(reason)] = action

    def use_ept(self, page_1g: bool = False, ad: bool = False, dirty: bool = False) -> None:
        """Turn on EPT with an identity map (the tables are made at build time); ``ad`` enables
        accessed/dirty flags, ``dirty`` presets them on the identity leaves."""
        self.proc2 |= Proc2.EPT
        self.ept_options = {"page_1g": page_1g, "ad": ad, "dirty": dirty}

    def ept_map(self, gpa: int | tuple, perms: int, level: int = 1, raw: int | None = None) -> tuple:
        """Give the EPT leaf mapping ``gpa`` (an address or a page handle) at ``level`` (1: 4 KiB,
        2: 2 MiB, 3: 1 GiB) these permissions (or the exact ``raw`` entry).  Returns a handle
        usable as an address in ``Action.grant`` and ``mem_read_after`` once built."""
        self.ept_maps.append((level, gpa, perms, raw))
        return ("ept", level, gpa)

    def ept_set_bits(self, gpa: int, level: int, bits: int) -> tuple:
        """OR ``bits`` into the EPT entry at ``level`` (4: PML4E, 3: PDPTE, 2: PDE, 1: PTE, the
        PTE after splitting the 2 MiB page) on the walk of ``gpa``, e.g. a reserved bit."""
        self.ept_bits.append((level, gpa, bits))
        return ("ept", level, gpa)

    def page(self, name: str) -> tuple:
        """A zeroed, 4 KiB-aligned page of this test (e.g. a virtual-APIC or PML page): a handle
        usable as a field value, in ``poke``, ``mem_read_after`` and ``Action`` addresses."""
        if name not in self.pages:
            self.pages.append(name)
        return ("page", name)

    def own_page_tables(self, linear: int, gpa: int, accessed: bool = False) -> None:
        """Give the guest its own 4-level paging (SDM Vol. 3A, 4.5): the engine's identity map for
        the first 512 GiB plus one 4 KiB page ``linear`` -> ``gpa`` through fresh PDPT, PD and PT
        pages (PML4 index of ``linear`` must be above 0).  Handles ("gpt", 3/2/1) are those table
        pages' addresses, ("gpte", 4..1) the entries on the walk of ``linear``.  ``accessed``
        presets their accessed (and the PTE's dirty) flags, so the walk itself writes nothing."""
        if not linear >> 39 & 511:
            raise ValueError("own_page_tables: the linear address must lie above the first 512 GiB")
        self.guest_tables = (linear, gpa, accessed)

    def eptp_switching(self, *alternates: list[tuple[int, int]]) -> None:
        """Enable VM functions with EPTP switching (25.6.14, 25.6.15): EPTP-list entry 0 is this
        guest's EPT, entry n an identity EPT of the same shape with the 4 KiB pages of
        ``alternates[n-1]`` given those permissions.  Handles ("eptp", n) are the EPTP values."""
        self.proc2 |= Proc2.VMFUNC
        self.eptp_alternates = list(alternates)

    def vmcs_shadowing(self, read_exits: set[int] = frozenset(), write_exits: set[int] = frozenset()) -> None:
        """Give the guest a shadow VMCS (24.10, 25.6.15): VMREAD/VMWRITE in the guest use it,
        except for the encodings whose VMREAD/VMWRITE-bitmap bits are set, which exit."""
        self.proc2 |= Proc2.VMCS_SHADOWING
        self.shadow = (set(read_exits), set(write_exits))

    def fill(self, address: int | tuple, nbytes: int, pattern: int = 0) -> None:
        """Before the run: fill ``nbytes`` at ``address`` with the qword ``pattern``."""
        self.setup.append(("fill", address, nbytes, pattern))

    def self_ipi(self, vector: int) -> None:
        """Before the run: send a fixed self-IPI; with the host's RFLAGS.IF = 0 it stays pending
        in the local APIC and is there when the guest is entered (SDM Vol. 3A, 11.6.1)."""
        self.setup.append(("call", "vmx_self_ipi", vector))

    def wait_irq_after(self, vector: int, iterations: int = 1000) -> None:
        """After the run: open the host's interrupts until ``vector`` arrives (bounded), recording
        how many arrived (``VmxResult.irqs``)."""
        self.after.append(("irq", vector, iterations))

    def wrmsr_after(self, msr: int, value: int) -> None:
        self.after.append(("wrmsr", msr, value))

    def enter_guest(self) -> None:
        self.entered = True

    def vmread_after(self, encoding: int) -> None:
        """Record a VMREAD of ``encoding`` once the exit loop has stopped."""
        self.after.append(("vmread", int(encoding)))

    def mem_read_after(self, address: int | tuple, qwords: int = 1, offset: int = 0) -> None:
        """Record ``qwords`` at ``address`` (+ ``offset``; an address or a handle) after the run;
        ``VmxResult.memory`` keys them by the resolved address."""
        self.after.append(("mem", address, qwords, offset))

    def insn_after(self, op: Op, a: int | str = 0, b: int | str = 0) -> None:
        """A VMX instruction after the run; "VMXON" / "VMCS" name this test's regions."""
        self.after.append(("insn", int(op), a, b))

    def call_after(self, routine: str, *args: int | str) -> None:
        self.after.append(("call", routine, *args))

    def enter_again(self, resume: bool = False, max_exits: int = 4, keep_registers: bool = True) -> None:
        """After the exit loop stopped, enter the same guest again with VMLAUNCH (or VMRESUME)
        and run a second exit loop; on a launched VMCS VMLAUNCH fails (error 4, SDM Vol. 3C 31.4).
        The guest's general registers are those it had at its last exit (``keep_registers``) or
        the initial ``regs``.  The second loop's exits and entry outcome are recorded like the
        first's."""
        self.after.append(("call", "vmx_run", "ACTIONS", max_exits, int(resume) | int(keep_registers) << 1))

    def poke(self, address: int | tuple, value: int, offset: int = 0) -> None:
        """Before the run: store the qword ``value`` at ``address`` (+ ``offset``; an address or
        a handle)."""
        self.setup.append(("poke", address, value, offset))

    def address(self, handle: int | tuple, offset: int = 0) -> int:
        """The address of a handle once built (in the test's code after ``yield``)."""
        return self._resolve(handle) + offset

    def rdmsr_after(self, msr: int) -> None:
        self.after.append(("rdmsr", msr))

    # -- reconciliation (SDM Vol. 3D, A.3-A.5) -----------------------------------------------------
    def controls(self) -> dict[int, int]:
        c = self.caps
        proc2 = c.proc2.reconcile(self.proc2) if self.proc2 else 0
        proc = self.proc | (Proc.SECONDARY if proc2 else 0)
        if self.io_ports:
            proc |= Proc.IO_BITMAPS
        if self.msr_reads or self.msr_writes or self.msr_bitmap:
            proc |= Proc.MSR_BITMAPS
        proc = c.proc.reconcile(proc)
        entry = self.entry_ctls | (EntryCtl.IA32E_GUEST if self.mode is Mode.LONG else 0)
        if c.entry.may1 & EntryCtl.LOAD_EFER:
            entry |= EntryCtl.LOAD_EFER
        out = {F.PIN_CONTROLS: c.pin.reconcile(self.pin), F.PROC_CONTROLS: proc,
               F.EXIT_CONTROLS: c.exit.reconcile(ExitCtl.HOST_64BIT | self.exit_ctls),
               F.ENTRY_CONTROLS: c.entry.reconcile(entry)}
        if proc & Proc.SECONDARY:
            out[F.PROC_CONTROLS2] = proc2
        return out

    # -- building --------------------------------------------------------------------------------
    def build(self, sc: Scenario, index: int) -> None:
        p = self._prefix = f"vt{index}"
        a = sc.arena
        vmxon = a.alloc(4096, 4096)
        vmcs = a.alloc(4096, 4096)
        ctl = self.controls()
        table: dict[int, tuple[int | str, int]] = {}

        def put(enc: int, value: int | str, mode: int = MODE_IMM) -> None:
            table[int(enc)] = (value, mode)

        for enc, v in ctl.items():
            put(enc, v)
        self._host(put, sc)
        self._guest(put, sc, a)
        for name in self.pages:
            self.handles[("page", name)] = a.alloc(4096, 4096)
        if self.guest_tables:
            self._own_tables(put, sc)
        if ctl[F.PROC_CONTROLS] & Proc.IO_BITMAPS:
            bm_a, bm_b = a.alloc(4096, 4096), a.alloc(4096, 4096)
            for port in self.io_ports:
                base = bm_a if port < 0x8000 else bm_b
                off = (port & 0x7FFF) >> 3
                cur = a.read(base + off, 1)[0]
                a.write(base + off, bytes([cur | 1 << (port & 7)]))
            put(F.IO_BITMAP_A, bm_a)
            put(F.IO_BITMAP_B, bm_b)
        if ctl[F.PROC_CONTROLS] & Proc.MSR_BITMAPS:
            put(F.MSR_BITMAP, msr_bitmap(a, self.msr_reads, self.msr_writes))
        if ctl.get(F.PROC_CONTROLS2, 0) & Proc2.EPT:
            if self.ept is None:
                self.ept = Ept(a, **self.ept_options)
            for level, gpa, perms, raw in self.ept_maps:
                self.ept_entries[("ept", level, gpa)] = self._ept_leaf(level, self._resolve(gpa), perms, raw)
            for level, gpa, bits in self.ept_bits:
                addr = self.ept.entry_addr(gpa, level)
                self.ept.arena.write(addr, struct.pack("<Q", self.ept.entry(addr) | bits))
                self.ept_entries[("ept", level, gpa)] = addr
            put(F.EPTP, self.ept.eptp)
            if self.eptp_alternates:
                eptps = [self.ept.eptp]
                for maps in self.eptp_alternates:
                    alt = Ept(a, **self.ept_options)
                    for gpa, perms in maps:
                        alt.map_4k(gpa, perms=perms)
                    eptps.append(alt.eptp)
                eptp_list = a.alloc(4096, 4096)
                a.write(eptp_list, struct.pack(f"<{len(eptps)}Q", *eptps))
                self.handles.update({("eptp", n): e for n, e in enumerate(eptps)})
                put(F.EPTP_LIST, eptp_list)
                put(F.VMFUNC_CONTROLS, 1)           # bit 0: EPTP switching (25.6.14)
        if self.shadow is not None:
            reads, writes = self.shadow
            shadow_vmcs = a.alloc(4096, 4096)
            self.handles[("shadow",)] = shadow_vmcs
            for enc_field, exits in ((F.VMREAD_BITMAP, reads), (F.VMWRITE_BITMAP, writes)):
                bm = bytearray(4096)            # bit n: encodings with bits 14:0 = n (25.6.15)
                for enc in exits:
                    bm[(enc & 0x7FFF) >> 3] |= 1 << (enc & 7)
                addr = a.alloc(4096, 4096)
                a.write(addr, bytes(bm))
                put(enc_field, addr)
            put(F.VMCS_LINK_POINTER, shadow_vmcs)
        if ctl.get(F.PROC_CONTROLS2, 0) & Proc2.VPID:
            put(F.VPID, self.vpid)
        for enc, v in self.fields.items():
            put(enc, sc.pml4 if v == "PML4" else self._resolve(v))
        for enc, sym in self.symbolic.items():
            put(enc, sym)
        for enc, v in self.force.items():
            put(enc, self._resolve(v))

        lines = [".section .data", ".balign 8", f"{p}_vmcs_table:"]
        for enc, (v, mode) in table.items():
            lines.append(f"    .quad {enc:#x}, {v if isinstance(v, str) else hex(v)}, {mode}")
        lines.append(f"    .quad {TABLE_END:#x}, 0, 0")
        lines += self._action_block(p)
        lines += [".section .bss", ".balign 4096", f"{p}_stack: .skip 4096", f"{p}_stack_top:",
                  ".section .text", ".balign 16", f"{p}_guest:"]
        if self.mode is Mode.REAL:
            lines.append(".code16")
        elif self.mode is Mode.PROTECTED:
            lines.append(".code32")
        lines += [self.code.replace("@", f"{p}_"), ".code64", ""]
        sc.asm.append("\n".join(lines))

        s = sc.steps
        s.mark(MARK_BEGIN | index)
        names = {"VMXON": vmxon, "VMCS": vmcs, "ACTIONS": f"{p}_actions"}
        names.update(self.ept_entries)
        names.update(self.handles)
        for item in self.setup:
            _emit(s, item, names)
        s.call("vmx_on", vmxon)
        if self.shadow is not None:             # a shadow VMCS: revision | bit 31, clear (24.2)
            shadow_vmcs = self.handles[("shadow",)]
            s.call("vmx_insn", int(Op.SET_REVISION), shadow_vmcs, self.caps.revision | 1 << 31, quiet=True)
            s.call("vmx_insn", int(Op.VMCLEAR), shadow_vmcs, quiet=True)
        s.call("vmx_insn", int(Op.SET_REVISION), vmcs, 0, quiet=True)
        s.call("vmx_insn", int(Op.VMCLEAR), vmcs, quiet=True)
        s.call("vmx_insn", int(Op.VMPTRLD), vmcs, quiet=True)
        s.call("vmcs_load", f"{p}_vmcs_table")
        if self.mode is Mode.LONG and self.guest_idt:
            s.call("idt_fill", "vmx_guest_idt", "vmx_gh_table", CS64, quiet=True)
        if self.entered:
            s.call("vmx_run", f"{p}_actions", self.max_exits, int(self.enter_with_resume), quiet=True)
        for item in self.after:
            _emit(s, item, names)
        s.call("vmx_insn", int(Op.VMCLEAR), vmcs, quiet=True)
        s.call("vmx_insn", int(Op.VMXOFF), quiet=True)
        s.mark(MARK_END | index)

    def _ept_leaf(self, level: int, gpa: int, perms: int, raw: int | None) -> int:
        from .ept import leaf
        e = self.ept
        assert e is not None
        if level == 1:
            return e.map_4k(gpa, perms=perms, raw=raw)
        addr = e.pde_addr(gpa) if level == 2 else e.pdpte_addr(gpa)
        size = 1 << (21 if level == 2 else 30)
        value = raw if raw is not None else leaf(gpa & ~(size - 1), perms, large=True)
        e.arena.write(addr, struct.pack("<Q", value))
        return addr

    def _resolve(self, x):
        if not isinstance(x, tuple):
            return x
        return self.ept_entries[x] if x in self.ept_entries else self.handles[x]

    def _own_tables(self, put, sc: Scenario) -> None:
        """The guest's own 4-level paging for ``own_page_tables`` (tables 4-15 to 4-20)."""
        linear, gpa, accessed = self.guest_tables
        a = sc.arena
        present_rw, acc, dirty = 0x3, 0x20 if accessed else 0, 0x40 if accessed else 0
        pml4, pdpt, pd, pt = (a.alloc(4096, 4096) for _ in range(4))
        a.write(pml4, a.read(sc.pml4, 8))                # entry 0: the engine's identity map
        walk = ((pml4, linear >> 39 & 511, pdpt | present_rw | acc),
                (pdpt, linear >> 30 & 511, pd | present_rw | acc),
                (pd, linear >> 21 & 511, pt | present_rw | acc),
                (pt, linear >> 12 & 511, (gpa & ~0xFFF) | present_rw | acc | dirty))
        for level, (tbl, index, entry) in zip((4, 3, 2, 1), walk):
            a.write(tbl + 8 * index, struct.pack("<Q", entry))
            self.handles[("gpte", level)] = tbl + 8 * index
        self.handles.update({("gpt", 4): pml4, ("gpt", 3): pdpt, ("gpt", 2): pd, ("gpt", 1): pt})
        put(F.GUEST_CR3, pml4)

    def _action_block(self, p: str) -> list[str]:
        names = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
                 "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
        unknown = set(self.regs) - set(names)
        if unknown:
            raise ValueError(f"unknown guest registers {sorted(unknown)}")
        regs = [self._resolve(self.regs.get(n, 0)) for n in names]
        out = [".balign 8", f"{p}_actions:", "    .quad " + ", ".join(f"{r & (1 << 64) - 1:#x}" for r in regs)]
        stop = Action.stop().words()
        for reason in range(MAX_EXIT_REASON):
            if reason in self.actions:
                act = self.actions[reason]
                words = Action(act.flags, act.field, act.value, self._resolve(act.address), act.bits,
                               act.cpuid, act.inject, act.error_code).words()
            else:
                words = stop
            out.append("    .quad " + ", ".join(f"{w:#x}" for w in words))
        assert len(stop) == ACTION_WORDS and len(regs) == REGS_WORDS
        return out

    def _host(self, put, sc: Scenario) -> None:
        """Host state (SDM Vol. 3C, 25.5): the engine's own segments and tables; RIP/RSP are
        written by vmx_run."""
        put(F.HOST_CR0, 0, MODE_CR0_OR)
        put(F.HOST_CR3, sc.pml4)
        put(F.HOST_CR4, 0, MODE_CR4_OR)
        put(F.HOST_CS_SEL, CS64)
        for enc in (F.HOST_SS_SEL, F.HOST_DS_SEL, F.HOST_ES_SEL):
            put(enc, DS)
        put(F.HOST_FS_SEL, 0)
        put(F.HOST_GS_SEL, 0)
        put(F.HOST_TR_SEL, TR)
        put(F.HOST_FS_BASE, 0)
        put(F.HOST_GS_BASE, 0)
        put(F.HOST_TR_BASE, "tss")
        put(F.HOST_GDTR_BASE, "gdt")
        put(F.HOST_IDTR_BASE, "idt")
        put(F.HOST_SYSENTER_CS, 0)
        put(F.HOST_SYSENTER_ESP, 0)
        put(F.HOST_SYSENTER_EIP, 0)

    def _guest(self, put, sc: Scenario, arena) -> None:
        """Guest state (25.4) for the chosen mode; checked on entry as in 26.3."""
        p = self._prefix
        c = self.caps
        put(F.VMCS_LINK_POINTER, (1 << 64) - 1)
        put(F.GUEST_DR7, 0x400)
        put(F.GUEST_RFLAGS, self.rflags)
        put(F.GUEST_INTERRUPTIBILITY, 0)
        put(F.GUEST_ACTIVITY, 0)
        put(F.GUEST_PENDING_DBG, 0)
        put(F.GUEST_DEBUGCTL, 0)
        put(F.GUEST_SYSENTER_CS, 0)
        put(F.GUEST_SYSENTER_ESP, 0)
        put(F.GUEST_SYSENTER_EIP, 0)
        put(F.EXCEPTION_BITMAP, 0)
        put(F.PF_ERROR_MASK, 0)
        put(F.PF_ERROR_MATCH, 0)
        put(F.CR3_TARGET_COUNT, 0)
        put(F.EXIT_MSR_STORE_COUNT, 0)
        put(F.EXIT_MSR_LOAD_COUNT, 0)
        put(F.ENTRY_MSR_LOAD_COUNT, 0)
        put(F.ENTRY_INTR_INFO, 0)
        put(F.CR0_MASK, 0)
        put(F.CR4_MASK, 0)
        put(F.CR0_SHADOW, 0)
        put(F.CR4_SHADOW, 0)
        put(F.GUEST_LDTR_SEL, 0)
        put(F.GUEST_LDTR_BASE, 0)
        put(F.GUEST_LDTR_LIMIT, 0)
        put(F.GUEST_LDTR_AR, AR_UNUSABLE)
        segs = ((F.GUEST_ES_SEL, F.GUEST_ES_BASE, F.GUEST_ES_LIMIT, F.GUEST_ES_AR),
                (F.GUEST_SS_SEL, F.GUEST_SS_BASE, F.GUEST_SS_LIMIT, F.GUEST_SS_AR),
                (F.GUEST_DS_SEL, F.GUEST_DS_BASE, F.GUEST_DS_LIMIT, F.GUEST_DS_AR),
                (F.GUEST_FS_SEL, F.GUEST_FS_BASE, F.GUEST_FS_LIMIT, F.GUEST_FS_AR),
                (F.GUEST_GS_SEL, F.GUEST_GS_BASE, F.GUEST_GS_LIMIT, F.GUEST_GS_AR))
        if self.mode is Mode.REAL:
            put(F.GUEST_CR0, c.fixed_cr0(CR0_ET | CR0_NE, unrestricted=True))
            put(F.GUEST_CR3, 0)
            put(F.GUEST_CR4, c.fixed_cr4(0))
            put(F.GUEST_CS_SEL, 0)
            put(F.GUEST_CS_BASE, f"{p}_guest")
            put(F.GUEST_CS_LIMIT, 0xFFFF)
            put(F.GUEST_CS_AR, AR_REAL_CODE)
            for sel, base, limit, ar in segs:
                put(sel, 0)
                put(base, f"{p}_stack")
                put(limit, 0xFFFF)
                put(ar, AR_REAL_DATA)
            put(F.GUEST_TR_SEL, 0)
            put(F.GUEST_TR_BASE, 0)
            put(F.GUEST_TR_LIMIT, 0xFFFF)
            put(F.GUEST_TR_AR, AR_TSS64)
            put(F.GUEST_GDTR_BASE, 0)
            put(F.GUEST_GDTR_LIMIT, 0xFFFF)
            put(F.GUEST_IDTR_BASE, 0)
            put(F.GUEST_IDTR_LIMIT, 0x3FF)
            put(F.GUEST_RIP, 0)
            put(F.GUEST_RSP, 0xFF0)
            put(F.GUEST_EFER, 0)
            return
        if self.mode is Mode.PROTECTED:
            pd = arena.alloc(4096, 4096)     # 32-bit paging, 4 MiB pages (SDM Vol. 3A, 4.3)
            arena.write(pd, struct.pack("<1024I", *((i << 22) | 0x83 for i in range(1024))))
            put(F.GUEST_CR0, c.fixed_cr0(CR0_PE | CR0_ET | CR0_NE | CR0_PG))
            put(F.GUEST_CR3, pd)
            put(F.GUEST_CR4, c.fixed_cr4(CR4_PSE))
            put(F.GUEST_CS_SEL, CS32)
            put(F.GUEST_CS_AR, AR_CODE32)
            put(F.GUEST_EFER, 0)
            put(F.GUEST_IDTR_BASE, 0)
            put(F.GUEST_IDTR_LIMIT, 0)
        else:
            put(F.GUEST_CR0, 0, MODE_CR0_OR)
            put(F.GUEST_CR3, sc.pml4)
            put(F.GUEST_CR4, 0, MODE_CR4_OR)
            put(F.GUEST_CS_SEL, CS64)
            put(F.GUEST_CS_AR, AR_CODE64)
            put(F.GUEST_EFER, EFER_LME_LMA)
            put(F.GUEST_IDTR_BASE, "vmx_guest_idt")
            put(F.GUEST_IDTR_LIMIT, 0xFFF)
        put(F.GUEST_CS_BASE, 0)
        put(F.GUEST_CS_LIMIT, 0xFFFF_FFFF)
        for sel, base, limit, ar in segs:
            put(sel, DS)
            put(base, 0)
            put(limit, 0xFFFF_FFFF)
            put(ar, AR_DATA)
        put(F.GUEST_TR_SEL, TR)
        put(F.GUEST_TR_BASE, "tss")
        put(F.GUEST_TR_LIMIT, 0x67)
        put(F.GUEST_TR_AR, AR_TSS64)
        put(F.GUEST_GDTR_BASE, "gdt")
        put(F.GUEST_GDTR_LIMIT, "gdt_end - gdt - 1")
        put(F.GUEST_RIP, f"{p}_guest")
        put(F.GUEST_RSP, f"{p}_stack_top")


def msr_bitmap(arena, reads: set[int], writes: set[int]) -> int:
    """The 4 KiB MSR bitmap (SDM Vol. 3C, 25.6.9): read-low, read-high, write-low, write-high
    (1 KiB each; low = 0..0x1FFF, high = 0xC0000000..0xC0001FFF)."""
    addr = arena.alloc(4096, 4096)
    bm = bytearray(4096)
    for base, msrs in ((0, reads), (2048, writes)):
        for msr in msrs:
            if msr <= 0x1FFF:
                off = base
            elif 0xC000_0000 <= msr <= 0xC000_1FFF:
                off = base + 1024
            else:
                raise ValueError(f"MSR {msr:#x} is outside both bitmap ranges (it always exits)")
            bit = msr & 0x1FFF
            bm[off + bit // 8] |= 1 << (bit % 8)
    arena.write(addr, bytes(bm))
    return addr


def _emit(s, item, names: dict) -> None:
    kind, *args = item
    args = [names.get(a, a) if isinstance(a, (str, tuple)) else a for a in args]
    if kind == "vmread":
        s.call("vmx_insn", int(Op.VMREAD), args[0], quiet=True)
    elif kind == "mem":
        s.mem_read(args[0] + args[2], args[1])
    elif kind == "insn":
        s.call("vmx_insn", *args, quiet=True)
    elif kind == "call":
        s.call(*args)
    elif kind == "irq":
        s.wait_irq(args[0], args[1])
    elif kind == "poke":
        s.mem_fill(args[0] + args[2], 8, args[1], quiet=True)
    elif kind == "rdmsr":
        s.rdmsr(args[0])
    elif kind == "wrmsr":
        s.wrmsr(args[0], args[1], quiet=True)
    elif kind == "fill":
        s.mem_fill(args[0], args[1], args[2], quiet=True)
    else:
        raise ValueError(f"unknown step kind {kind!r}")


def batch(tests: list[VmxTest], name: str = "vmx-batch") -> Scenario:
    """One image that runs ``tests`` one after another (each bracketed by MARK records)."""
    sc = Scenario(name=name, probe=False)
    sc.asm.append(VMM_ASM)
    for i, t in enumerate(tests):
        t.build(sc, i)
    return sc
