"""Direct assignment: the payload VMM gives a DMA agent to an L2 guest (VMX and VT-d on one target).

The seeds' model, as a hypervisor does it: guest ``n`` sees its RAM at the same guest-physical
window (``GUEST_RAM_GPA``) whatever host-physical pages back it; the guest's EPT maps that window
to those pages, and its agent's VT-d domain maps the same guest-physical addresses to the same
host-physical pages, so the guest can program the device with the addresses it knows.  Nothing
else of guest RAM is reachable: the EPT withholds the host-physical pages of every guest's RAM and
of the VMM's own pages (``vmm_page``), and a domain maps nothing but its guest's window.

    @pytest.mark.combined("ept")
    def test_dma_lands_in_guest_memory(direct):
        s = direct.scenario("gpa-dma")                # resets the unit, finds edu, one guest
        g = s.guests[0]
        g.vmx.guest(dma_asm(g, to_ram=True, gpa=g.gpa(0), count=XFER) + done_asm(read=g.gpa(0)))
        s.enter(g)                                    # VMLAUNCH; steps below run after its exit
        s.vtd.compare("landed", g.hpa(0), XFER, g.pattern)
        out = direct.run(s)
        assert out.mismatches("landed") == 0 and out.guest(g).exit.regs["rsi"] == g.pattern

Built from the VT-d and VMX builders (``VtdScenario``, ``VmxTest``) into one ``Scenario``: the
guests' code is the guest half of a driver for the agent (``dma_asm``: edu's registers, QEMU
hw/misc/edu.c), the VMM publishes the agent's BAR0 in the guest's information page (as firmware
would), and the guest's last VMCALL reports its results in registers (``VmExit.regs``).

On a target without VMX and VT-d together (QEMU TCG, Bochs) the ``direct`` fixture skips with
"requires vmx and vtd on one target"; the KVM-runner stand-in and real KVM runners have both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ..observe.probe import PciFunction, Probe
from ..observe.vmx import VmxResult, split
from ..payload import layout, vtd
from ..payload.edu import (BUFFER, DMA_START, DMA_TO_RAM, MAX_TRANSFER_END, REG_DMA_CMD, REG_DMA_COUNT,
                           REG_DMA_DST, REG_DMA_SRC, REG_IRQ_RAISE, Edu)
from ..payload.vmx import ept
from ..payload.vmx.builder import VmxTest
from ..targets.catalog import lacking
from .vmx import vmx_caps
from .vtd import PAGES, PATTERN, STAGING, VtdOutcome, VtdRunner, VtdScenario

REASON = "requires vmx and vtd on one target"

# Every guest's RAM window, guest-physical.  Below 256 MiB: edu clamps DMA addresses to its
# dma_mask, 28 bits unless the target widens it (as the VT-d targets do; kept low for any edu).
GUEST_RAM_GPA = 0x0800_0000
GUEST_PAGES = 16
INFO_PAGE = GUEST_PAGES - 1               # the guest's boot information: qword 0 = its agent's BAR0
# Host-physical RAM of guest n: 64 KiB at GUEST_RAM_HPA + n * GUEST_RAM_STRIDE (scratch memory,
# clear of vtd.PAGES, the VMM's own pages).
GUEST_RAM_HPA = layout.SCRATCH_BASE + 0x40_0000
GUEST_RAM_STRIDE = 0x10_0000
VMM_PAGES = 8                             # vtd.PAGES .. + 8 pages: the VMM's own (FILL), never mapped
GUEST_FILL = 0x6E6E_6E6E_6E6E_6E6E        # guest RAM before the guest runs

# What a guest reports in RAX at its last VMCALL.
GUEST_DONE = 0x600D
GUEST_DMA_TIMEOUT = 0xD7A0
# A guest's DMA wait: at most POLL_BOUND reads of edu's command register, POLL_PAUSES PAUSEs
# apart.  edu completes a DMA on a 100 ms timer; an L2 MMIO read is an exit to L0 and QEMU.
POLL_BOUND = 200_000
POLL_PAUSES = 64
WAIT_BOUND = 2_000_000                    # PAUSEs a guest waits for an interrupt (msi_wait_asm)


def guest_pattern(n: int) -> int:
    """The qword pattern in guest n's agent buffer (distinct per guest; guest 0's is PATTERN)."""
    return PATTERN ^ (n * 0x1111_0000_0000_1111)


def vmm_page(n: int) -> int:
    """The VMM's n-th own page (host-physical; holds FILL, mapped by no EPT and no domain)."""
    if not 0 <= n < VMM_PAGES:
        raise ValueError(f"VMM page {n} is outside 0..{VMM_PAGES - 1}")
    return PAGES + n * 0x1000


@dataclass
class L2Guest:
    """Guest ``index``: its VMX description (``vmx``, a VmxTest), its assigned agent and the
    agent's function (source-id from the probe), its domain and where its RAM really is."""

    index: int
    vmx: VmxTest
    agent: Edu
    function: PciFunction
    domain: vtd.SecondLevel
    domain_id: int
    pattern: int                 # what its agent's buffer holds before the guest runs
    entered: bool = False

    @property
    def ram(self) -> int:
        """Host-physical base of its RAM."""
        return GUEST_RAM_HPA + self.index * GUEST_RAM_STRIDE

    @staticmethod
    def gpa(page: int, offset: int = 0) -> int:
        """Guest-physical address of its RAM page ``page`` (the same window for every guest)."""
        return GUEST_RAM_GPA + page * 0x1000 + offset

    def hpa(self, page: int, offset: int = 0) -> int:
        """Host-physical address behind ``gpa(page, offset)``."""
        return self.ram + page * 0x1000 + offset

    @property
    def source_id(self) -> int:
        return self.agent.source_id


class DirectScenario:
    """One scenario: the unit reset, ``guests`` L2 guests each given one edu (in probe order),
    their domains attached and translation on.  Write each guest's code and actions on
    ``guest.vmx``, ``enter(guest)`` where it should run, and add VMM checks (``vtd.compare``,
    ``unit.faults()``) after.  Subclasses may override ``map_domain`` / ``map_ept``."""

    def __init__(self, name: str, probe: Probe, target_name: str, guests: int = 1):
        self.vtd = VtdScenario(name, probe, target_name, agents=guests, agent_types=(Edu,))
        self.scenario, self.steps, self.arena, self.unit = (self.vtd.scenario, self.vtd.steps,
                                                            self.vtd.arena, self.vtd.unit)
        self.scenario.asm.append(PUBLISH_ASM)
        caps = vmx_caps(probe)
        # Agents ready (ID checked against the probe), buffers := PATTERN, VMM pages := FILL,
        # all before translation is on.
        self.vtd.prepare(fill_pages=VMM_PAGES)
        self.guests: list[L2Guest] = []
        for n, (agent, fn) in enumerate(zip(self.vtd.agents, self.vtd.functions)):
            assert isinstance(agent, Edu)
            g = L2Guest(n, VmxTest(caps, name=f"{name}-guest{n}"), agent, fn, self.vtd.domain(), n + 1,
                        guest_pattern(n))
            if g.pattern != PATTERN:          # its own pattern, so guests' data can be told apart
                self.steps.mem_fill(STAGING + 0x1000 * n, 4096, g.pattern)
                agent.dma_read(STAGING + 0x1000 * n, MAX_TRANSFER_END & ~7)
            self.steps.mem_fill(g.ram, GUEST_PAGES * 0x1000, GUEST_FILL)
            # The VMM tells the guest where its device is (as firmware would): BAR0 -> info page.
            self.steps.call("combined_publish_var", agent.bar_var, g.hpa(INFO_PAGE), quiet=True)
            self.map_domain(g)
            self.vtd.attach(agent, g.domain, g.domain_id)
            self.guests.append(g)
        for g in self.guests:
            self.map_ept(g)
        self.unit.setup_translation(self.vtd.tables.root)

    def map_domain(self, g: L2Guest) -> None:
        """The agent's domain: the guest's window, guest-physical -> its host pages (VT-d 3.6)."""
        for page in range(GUEST_PAGES):
            g.domain.map(g.gpa(page), g.hpa(page))

    def map_ept(self, g: L2Guest) -> None:
        """Identity EPT (the guest runs on the engine's code, page tables and descriptor tables)
        except: the window maps to its RAM; every guest's RAM and the VMM's pages are withheld
        at their host-physical addresses (SDM Vol. 3C, 29.3.2: a leaf with R=W=X=0 is not present)."""
        g.vmx.use_ept()
        for page in range(GUEST_PAGES):
            g.vmx.ept_map(g.gpa(page), ept.RWX, raw=ept.leaf(g.hpa(page), ept.RWX))
        for other in range(len(self.vtd.agents)):
            for page in range(GUEST_PAGES):
                g.vmx.ept_map(GUEST_RAM_HPA + other * GUEST_RAM_STRIDE + page * 0x1000, 0, raw=0)
        for n in range(VMM_PAGES):
            g.vmx.ept_map(vmm_page(n), 0, raw=0)

    def enter(self, g: L2Guest) -> None:
        """Run guest ``g`` here (VMLAUNCH and its exit loop; it leaves VMX operation after)."""
        if g.entered:
            raise ValueError(f"guest {g.index} is already placed in the scenario")
        g.vmx.enter_guest()
        g.vmx.build(self.scenario, g.index)
        g.entered = True

    def remap_interrupts(self, entries: dict[int, tuple[int, int]], size: int = 16) -> None:
        """Interrupt remapping on (VT-d 5.1, 11.4.8.1): a ``size``-entry table holding ``entries``
        (handle -> IRTE, ``dmar.irte``), queued invalidation, then a global interrupt-entry-cache
        invalidation (6.5.2.7) whose wait the test reads as ``vtd.checks['iec']``."""
        table = self.arena.alloc(16 * size, 4096)
        for handle, entry in entries.items():
            self.arena.write(table + 16 * handle, vtd.desc_bytes(entry))
        queue = vtd.InvQueue(self.arena, self.unit)
        queue.setup()
        self.unit.setup_intremap(table, size)
        status = self.arena.alloc(8, 8)
        self.vtd.check("iec", queue.submit(vtd.iec_inv_desc(), wait_status=status))
        self.vtd.checks["iec-data"] = queue.status_data[self.vtd.checks["iec"]]


# [rsi] := vars[rdi]: the VMM copies an engine variable (e.g. an agent's BAR0) into guest RAM.
PUBLISH_ASM = """
.globl combined_publish_var
combined_publish_var:
    lea rax, [rip + vars]
    mov rax, [rax + rdi*8]
    mov [rsi], rax
    ret
"""


# -- the guest half of the driver (64-bit guest code, Intel syntax) --------------------------------

def _bar(g: L2Guest) -> str:
    return f"    mov rax, {g.gpa(INFO_PAGE):#x}\n    mov rbx, [rax]                  # BAR0, from the info page\n"


def dma_asm(g: L2Guest, to_ram: bool, gpa: int, count: int, buffer_offset: int = 0) -> str:
    """Guest code: program its edu with guest-physical ``gpa`` (to_ram: buffer -> memory, a DMA
    write; else memory -> buffer, a DMA read), then poll the command register until the device
    clears START (edu.c); if it never does, VMCALL with RAX = GUEST_DMA_TIMEOUT."""
    if count <= 0 or buffer_offset + count > MAX_TRANSFER_END:
        raise ValueError(f"edu DMA of {count} bytes at buffer offset {buffer_offset:#x} ends beyond "
                         f"{MAX_TRANSFER_END:#x}")
    src, dst = (BUFFER + buffer_offset, gpa) if to_ram else (gpa, BUFFER + buffer_offset)
    cmd = DMA_START | (DMA_TO_RAM if to_ram else 0)
    return _bar(g) + f"""\
    mov rax, {src:#x}
    mov [rbx + {REG_DMA_SRC:#x}], rax
    mov rax, {dst:#x}
    mov [rbx + {REG_DMA_DST:#x}], rax
    mov rax, {count:#x}
    mov [rbx + {REG_DMA_COUNT:#x}], rax
    mov rax, {cmd:#x}
    mov [rbx + {REG_DMA_CMD:#x}], rax
    mov r8d, {POLL_BOUND}
1:  mov rax, [rbx + {REG_DMA_CMD:#x}]
    test al, {DMA_START}
    jz 3f
    mov ecx, {POLL_PAUSES}
2:  pause
    dec ecx
    jnz 2b
    dec r8d
    jnz 1b
    mov eax, {GUEST_DMA_TIMEOUT:#x}
    vmcall
    hlt
3:
"""


def store_asm(gpa: int, nbytes: int, pattern: int) -> str:
    """Guest code: fill ``nbytes`` at guest-physical ``gpa`` with the qword ``pattern`` (CPU stores)."""
    if nbytes <= 0 or nbytes % 8:
        raise ValueError(f"length {nbytes} is not a positive multiple of 8")
    return f"""\
    mov rdi, {gpa:#x}
    mov rcx, {nbytes // 8}
    mov rax, {pattern:#x}
    cld
    rep stosq
"""


def raise_irq_asm(g: L2Guest, status: int = 1) -> str:
    """Guest code: set edu's interrupt status (0x60), so the device signals its MSI."""
    return _bar(g) + f"    mov dword ptr [rbx + {REG_IRQ_RAISE:#x}], {status:#x}\n"


def wait_asm(pauses: int = WAIT_BOUND) -> str:
    """Guest code: spin ``pauses`` PAUSEs (an interrupt that should exit to the VMM arrives here)."""
    return f"""\
    mov ecx, {pauses}
1:  pause
    dec ecx
    jnz 1b
"""


def done_asm(read: int | None = None) -> str:
    """Guest code: VMCALL with RAX = GUEST_DONE and, with ``read``, RSI = the qword the guest reads
    at guest-physical ``read`` through its own EPT mapping."""
    load = f"    mov rax, {read:#x}\n    mov rsi, [rax]\n" if read is not None else ""
    return load + f"    mov eax, {GUEST_DONE:#x}\n    vmcall\n    hlt\n"


# -- running ---------------------------------------------------------------------------------------

@dataclass
class DirectOutcome:
    """A run of a DirectScenario: the VT-d side (``vtd``: compares, faults, values) and each
    guest's VMX result."""

    vtd: VtdOutcome
    guests: dict[int, VmxResult]

    def guest(self, g: L2Guest | int) -> VmxResult:
        """Guest ``g``'s result; it must have run to its end mark."""
        n = g if isinstance(g, int) else g.index
        res = self.guests.get(n)
        if res is None or not res.complete:
            raise AssertionError(f"guest {n} did not run to its end (evidence: {self.vtd.run.evidence})")
        return res

    def mismatches(self, label: str) -> int:
        return self.vtd.mismatches(label)

    def faults(self, step: int | None = None):
        return self.vtd.faults(step)

    def value(self, step: int) -> int:
        return self.vtd.value(step)

    def finished(self, g: L2Guest | int) -> dict[str, int]:
        """The registers of the guest's final VMCALL, which must say GUEST_DONE (not a DMA
        timeout, not another exit)."""
        res = self.guest(g)
        last = res.last
        rax = last.regs.get("rax", -1) & 0xFFFF_FFFF
        if last.name() != "VMCALL" or rax != GUEST_DONE:
            why = "its DMA never completed" if rax == GUEST_DMA_TIMEOUT else "it did not finish"
            raise AssertionError(f"guest {res.index}: {why}: last exit {last}, rax={rax:#x}; {res.describe()}")
        return last.regs


class DirectRunner:
    """The ``direct`` fixture: makes direct-assignment scenarios for this test's target and runs them."""

    def __init__(self, vtd_runner: VtdRunner):
        self.vtd = vtd_runner

    @property
    def name(self) -> str:
        return self.vtd.name

    @property
    def apic_id(self) -> int:
        return self.vtd.apic_id

    def scenario(self, name: str, guests: int = 1, kind: type[DirectScenario] = DirectScenario) -> DirectScenario:
        """A scenario with ``guests`` L2 guests, each given its own edu (skips with fewer edus);
        ``kind`` may be a subclass that maps differently (a deliberately broken one, say)."""
        return kind(name, self.vtd.probe, self.name, guests)

    def variant(self, **changes: Any) -> "DirectRunner":
        """This target with its configuration changed (e.g. ``TWO_EDU``)."""
        return DirectRunner(self.vtd.variant(**changes))

    def run(self, s: DirectScenario) -> DirectOutcome:
        """Run ``s``: a clean end, every agent where the probe found it, every guest complete."""
        out = self.vtd.run(s.vtd)
        results = split(out.run.records)
        for g in s.guests:
            if g.entered and not (g.index in results and results[g.index].complete):
                raise AssertionError(f"guest {g.index} did not run to its end (evidence: {out.run.evidence})")
        return DirectOutcome(out, results)


def missing(caps: set[str], needs: tuple[str, ...]) -> list[str]:
    """The capabilities of ``vmx``, ``vtd`` and ``needs`` that ``caps`` lacks."""
    return [c for c in ("vmx", "vtd", *needs) if c not in caps]


def skip_unless_combined(vtx_target: Any, needs: tuple[str, ...] = ()) -> None:
    """Skip unless ``vtx_target`` has VMX and VT-d (and ``needs``): "requires vmx and vtd on one
    target; ..." — decided from the target's kind when it can never have both (no probe boots),
    else from its probe."""
    config = vtx_target.config
    never = lacking(config, ["vmx", "vtd"])
    if never:
        pytest.skip(f"{REASON}; target {vtx_target.name} can never offer {', '.join(sorted(never))}")
    caps = vtx_target.caps
    lack = missing(caps, needs)
    if lack:
        have = ", ".join(sorted(c for c in caps if c.split(".")[0] in {x.split(".")[0] for x in lack}))
        pytest.skip(f"{REASON}; requires {', '.join(lack)}; target {vtx_target.name} has {have or 'none'} (probed)")


@pytest.fixture
def direct(vtx_target: Any, evidence_dir: Path, request: pytest.FixtureRequest) -> DirectRunner:
    """Direct-assignment scenarios for this test's target; skips unless it has VMX and VT-d (and
    the capabilities named by the test's ``combined(...)`` marker)."""
    needs = tuple(c for m in request.node.iter_markers("combined") for c in m.args)
    skip_unless_combined(vtx_target, needs)
    return DirectRunner(VtdRunner(vtx_target, evidence_dir))
