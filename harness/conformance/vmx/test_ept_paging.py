"""EPT beyond single leaves (SDM Vol. 3C, 29.3): accessed/dirty flags and the guest's own
paging-structure accesses (29.3.5, 28.2.1 table 28-7), reserved bits at every level and page size
(29.3.3.1), execute-only pages, INVEPT single- against all-context (29.4.3.1), page-modification
logging (29.3.6) and EPTP switching by VMFUNC (25.6.14, 26.5.6.3)."""

import pytest

from harness.testing import Action, Exit, F, Proc2, deviation, ept, requires, vmx_test

from ._support import KVM_EPT_MISCONFIG, KVM_EPT_MISCONFIG_LAYER, TEST_PAGE

BOCHS = "bochs"                     # every Bochs target (Bochs 2.7's VMX model)

R, W, X, RWX, ACCESSED, DIRTY = ept.R, ept.W, ept.X, ept.RWX, ept.ACCESSED, ept.DIRTY
EPT_READ, EPT_WRITE, EPT_FETCH = 1 << 0, 1 << 1, 1 << 2
LINEAR_VALID, TRANSLATION = 1 << 7, 1 << 8
GUEST_LINEAR = 0x80_0000_0000 + 0x5000    # PML4 index 1: reached only through the test's tables
LEVEL_NAMES = {3: "pdpt", 2: "pd", 1: "pt"}


def _own_walk(v, ad: bool, protect_level: int):
    """The guest reads GUEST_LINEAR through its own tables; the page holding the table of
    ``protect_level`` is read-only in EPT.  Every table entry starts accessed (and the PTE dirty),
    so the walk writes nothing unless EPT A/D makes it count as a write."""
    v.use_ept(ad=ad)
    v.own_page_tables(GUEST_LINEAR, TEST_PAGE, accessed=True)
    v.ept_map(("gpt", protect_level), R)
    v.poke(TEST_PAGE, 0x1122_3344_5566_7788)
    v.guest(f"""
        mov rax, {GUEST_LINEAR:#x}
        mov rbx, [rax]
        vmcall
    """)
    v.enter_guest()


@pytest.mark.parametrize("level", [3, 2, 1], ids=LEVEL_NAMES.get)
@vmx_test("ept", "ept_ad")
def test_guest_walk_with_ept_ad_is_a_write_to_its_paging_structures(v, level):
    _own_walk(v, ad=True, protect_level=level)
    r = yield
    e = r.exit
    assert e.reason == Exit.EPT_VIOLATION
    # a write (A/D updates count as writes, 29.3.5) to a readable page, linear address valid,
    # and bit 8 clear: the access was to a paging-structure entry, not the final translation
    assert e.qualification & 0x1FF == EPT_WRITE | R << 3 | LINEAR_VALID
    assert e.physical_address == v.address(("gpte", level))
    assert e.linear_address == GUEST_LINEAR


@pytest.mark.parametrize("level", [3, 2, 1], ids=LEVEL_NAMES.get)
@vmx_test("ept")
def test_guest_walk_without_ept_ad_only_reads_its_paging_structures(v, level):
    _own_walk(v, ad=False, protect_level=level)
    r = yield
    assert r.reasons() == [Exit.VMCALL]
    assert r.exit.regs["rbx"] == 0x1122_3344_5566_7788


@vmx_test("ept", "ept_ad")
def test_guest_walk_sets_accessed_and_dirty_on_the_ept_entries_of_its_tables(v):
    v.use_ept(ad=True)
    v.own_page_tables(GUEST_LINEAR, TEST_PAGE, accessed=True)
    pt_entry = v.ept_map(("gpt", 1), RWX)
    data_entry = v.ept_map(TEST_PAGE, RWX)
    v.guest(f"""
        mov rax, {GUEST_LINEAR:#x}
        mov rbx, [rax]
        vmcall
    """)
    v.mem_read_after(pt_entry)
    v.mem_read_after(data_entry)
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.VMCALL]
    pt = r.memory[v.address(pt_entry)][0]
    data = r.memory[v.address(data_entry)][0]
    assert pt & (ACCESSED | DIRTY) == ACCESSED | DIRTY    # the walk counts as a write (29.3.5)
    assert data & (ACCESSED | DIRTY) == ACCESSED          # the data was only read


# (id, EPT level, page size of the hierarchy, bits ORed into the entry or None, exact leaf or
# None, GPA the guest touches or None for its first instruction fetch): each a misconfiguration
# (29.3.3.1).  Memory types 2, 3 and 7 are reserved (29.3.7).
LARGE = ept.LARGE
RESERVED = [
    ("pml4e-bit-3", 4, "2m", 1 << 3, None, None),
    ("pml4e-bit-7", 4, "2m", 1 << 7, None, None),
    ("pdpte-table-bit-4", 3, "2m", 1 << 4, None, None),
    ("pde-table-bit-5", 2, "4k", 1 << 5, None, TEST_PAGE + 0x10),
    pytest.param("pde-2m-bit-12", 2, "2m", 1 << 12, None, TEST_PAGE + 0x10, marks=deviation(
        BOCHS, "SDM Vol. 3C 29.3.3.1 (bits 20:12 of a 2-MByte EPT PDE are reserved)",
        "bit 12 is taken as an address bit: no misconfiguration, the guest's read completes (reason 18)")),
    ("pde-2m-bit-20", 2, "2m", 1 << 20, None, TEST_PAGE + 0x10),
    pytest.param("pdpte-1g-bit-12", 3, "1g", 1 << 12, None, 0x4000_0010, marks=deviation(
        BOCHS, "SDM Vol. 3C 29.3.3.1 (bits 29:12 of a 1-GByte EPT PDPTE are reserved)",
        "bit 12 is taken as an address bit: no misconfiguration, the guest reads 0xffffffffffffffff")),
    ("pdpte-1g-bit-29", 3, "1g", 1 << 29, None, 0x4000_0010),
    ("pte-memory-type-3", 1, "4k", None, TEST_PAGE | RWX | 3 << 3, TEST_PAGE + 0x10),
    ("pte-memory-type-7", 1, "4k", None, TEST_PAGE | RWX | 7 << 3, TEST_PAGE + 0x10),
    ("pde-2m-memory-type-2", 2, "2m", None, TEST_PAGE | RWX | 2 << 3 | LARGE, TEST_PAGE + 0x10),
    ("pdpte-1g-memory-type-7", 3, "1g", None, 0x4000_0000 | RWX | 7 << 3 | LARGE, 0x4000_0010),
]


def _case(c):
    """A RESERVED row as a pytest parameter (a row that is already one keeps its marks); a 1-GByte
    hierarchy requires ept_1g."""
    values, marks = (c.values, list(c.marks)) if hasattr(c, "marks") else (c, [])
    if values[2] == "1g":
        marks.append(requires("ept_1g"))
    return pytest.param(*values[1:], id=values[0], marks=marks)


@deviation(*KVM_EPT_MISCONFIG, "qualification 0x181 for a data read, 0x81 for an instruction fetch; the exit "
           "reason (49) is right", KVM_EPT_MISCONFIG_LAYER)
@pytest.mark.parametrize("level,size,bits,raw,gpa", [_case(c) for c in RESERVED])
@vmx_test("ept")
def test_reserved_ept_bits_are_a_misconfiguration(v, level, size, bits, raw, gpa):
    v.use_ept(page_1g=size == "1g")
    where = gpa if gpa is not None else 0            # GPA 0's walk also maps the guest's code
    if size == "4k":
        v.ept_map(where, RWX)                       # a PT under the PDE, so the PDE is a table
    if raw is not None:
        v.ept_map(where, 0, level=level, raw=raw)
    else:
        v.ept_set_bits(where, level, bits)
    v.guest(f"""
        mov rax, {gpa if gpa is not None else TEST_PAGE:#x}
        mov rbx, [rax]
        vmcall
    """)
    v.vmread_after(F.GUEST_CR3)
    v.enter_guest()
    r = yield
    e = r.exit
    assert e.reason == Exit.EPT_MISCONFIG
    assert e.qualification == 0
    # the first fetch's walk starts with the guest's PML4 entry 0, at CR3 (SDM Vol. 3A, 4.5.4)
    assert e.physical_address == (gpa if gpa is not None else r.reads[F.GUEST_CR3] & ~0xFFF)


EXEC_ONLY_CODE = 0xC1010F00001234B8         # mov eax, 0x1234; vmcall


@vmx_test("ept", "ept_execute_only")
def test_execute_only_page_runs_code(v):
    v.use_ept()
    v.ept_map(TEST_PAGE, X)
    v.poke(TEST_PAGE, EXEC_ONLY_CODE)
    v.guest(f"""
        mov rax, {TEST_PAGE:#x}
        jmp rax
    """)
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.VMCALL]
    assert r.exit.regs["rax"] == 0x1234 and r.exit.rip == TEST_PAGE + 5


@vmx_test("ept", "ept_execute_only")
def test_execute_only_page_refuses_a_read(v):
    v.use_ept()
    v.ept_map(TEST_PAGE, X)
    v.guest(f"""
        mov rax, {TEST_PAGE + 8:#x}
        mov rbx, [rax]
    """)
    v.enter_guest()
    r = yield
    assert r.exit.reason == Exit.EPT_VIOLATION
    assert r.exit.qualification & 0x1FF == EPT_READ | X << 3 | LINEAR_VALID | TRANSLATION


@vmx_test("ept")
def test_execute_only_entry_without_support_is_a_misconfiguration(v):
    if v.caps.ept_execute_only:
        pytest.skip("the target supports execute-only EPT pages (IA32_VMX_EPT_VPID_CAP bit 0, probed)")
    v.use_ept()
    v.ept_map(TEST_PAGE, X)
    v.guest(f"""
        mov rax, {TEST_PAGE:#x}
        mov rbx, [rax]
    """)
    v.enter_guest()
    r = yield
    assert r.exit.reason == Exit.EPT_MISCONFIG


@pytest.mark.parametrize("single", [pytest.param(True, id="single-context", marks=requires("invept_single")),
                                    pytest.param(False, id="all-context", marks=requires("invept_all"))])
@vmx_test("ept", "invept")
def test_invept_makes_a_revoked_permission_take_effect(v, single):
    v.use_ept()
    pte = v.ept_map(TEST_PAGE, RWX)
    v.guest(f"""
        mov rax, {TEST_PAGE:#x}
        mov rbx, [rax]
        vmcall
        mov rbx, [rax]
        vmcall
    """)
    v.on(Exit.VMCALL, Action.revoke(pte, RWX, single_context=single, skip=True))
    v.max_exits = 3
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.VMCALL, Exit.EPT_VIOLATION]   # cached translation invalidated (29.4.3)
    assert r.last.qualification & 0x1FF == EPT_READ | LINEAR_VALID | TRANSLATION
    assert r.last.physical_address == TEST_PAGE


def _pml(v, index: int):
    v.use_ept(ad=True, dirty=True)                  # only the test's own pages start clean
    v.ept_map(TEST_PAGE, RWX)
    v.ept_map(TEST_PAGE + 0x1000, RWX)
    log = v.page("pml")
    v.proc2 |= Proc2.PML
    v.fields.update({F.PML_ADDR: log, F.PML_INDEX: index})
    v.guest(f"""
        mov rax, {TEST_PAGE:#x}
        mov [rax], rbx
        mov [rax + 8], rbx
        lea rsi, [rip + @second]
    @second:
        mov [rax + 0x1000], rbx
        vmcall
    """)
    v.vmread_after(F.PML_INDEX)
    v.mem_read_after(log, 8)
    v.enter_guest()
    return log


@vmx_test("ept", "ept_ad", "pml")
def test_pml_logs_each_newly_dirtied_page_once(v):
    log = _pml(v, 7)
    r = yield
    assert r.reasons() == [Exit.VMCALL]
    assert r.reads[F.PML_INDEX] == 5                 # two pages logged, downwards (29.3.6)
    entries = r.memory[v.address(log)]
    assert entries[7] == TEST_PAGE and entries[6] == TEST_PAGE + 0x1000
    assert entries[:6] == [0] * 6


@vmx_test("ept", "ept_ad", "pml")
def test_pml_full_exits_before_the_write_that_needs_a_slot(v):
    log = _pml(v, 0)
    r = yield
    e = r.exit
    assert r.reasons() == [Exit.PML_FULL]
    assert e.rip == e.regs["rsi"]                    # the second page's write, not done (29.3.6)
    assert e.qualification & ~(1 << 12) == 0
    assert r.reads[F.PML_INDEX] == 0xFFFF
    assert r.memory[v.address(log)][0] == TEST_PAGE


@vmx_test("ept", "vmfunc", "eptp_switching")
def test_vmfunc_switches_to_an_eptp_from_the_list(v):
    v.use_ept()
    v.eptp_switching([(TEST_PAGE, 0)])              # entry 1: TEST_PAGE not present
    v.guest(f"""
        mov rdi, {TEST_PAGE:#x}
        mov rbx, [rdi]
        xor eax, eax
        mov ecx, 1
        vmfunc
        mov rbx, [rdi]
    """)
    v.vmread_after(F.EPTP)
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.EPT_VIOLATION]       # only the switched-to EPT lacks the page
    assert r.exit.physical_address == TEST_PAGE
    assert r.reads[F.EPTP] == v.address(("eptp", 1))


@pytest.mark.parametrize("eax,ecx", [(0, 5), (1, 0)], ids=["invalid-list-entry", "function-not-enabled"])
@vmx_test("ept", "vmfunc", "eptp_switching")
def test_vmfunc_that_cannot_complete_exits(v, eax, ecx):
    v.use_ept()
    v.eptp_switching([(TEST_PAGE, 0)])              # list entries 2..511 are 0: invalid EPTPs
    v.guest(f"""
        mov eax, {eax}
        mov ecx, {ecx}
        vmfunc
        vmcall
    """)
    v.vmread_after(F.EPTP)
    v.enter_guest()
    r = yield
    assert r.reasons() == [Exit.VMFUNC]              # 25.5.6.2 / 26.5.6.3
    assert r.exit.length == 3                        # 0F 01 D4
    assert r.reads[F.EPTP] == v.address(("eptp", 0))  # unchanged
