"""The suite's checks catch a wrong engine: deliberately broken VMM variants make them fail.

Each variant patches one behaviour of the exit loop; the same checks the conformance tests use
pass on the real engine and fail on the broken one.
"""

import pytest

import harness.payload.vmx.builder as builder
from harness.payload.vmx.vmm import VMM_ASM
from harness.testing import Action, Exit, new_guest, run_guest

GOOD_SKIP = "    add rax, [rip + vmx_exit_len]\n"
BAD_SKIP = "    add rax, 1\n"                        # skips one byte, whatever the instruction
GOOD_REASON = "    mov rax, [rip + rec_buf + 8]\n    mov [rip + vmx_reason], rax\n"
STALE_REASON = ("    mov rax, [rip + rec_buf + 8]\n    xchg rax, [rip + vmx_reason]\n"
                "    mov [rip + rec_buf + 8], rax\n")  # records the previous exit's reason


def check_cpuid_then_vmcall(r) -> None:
    """The checks of test_cpuid_exits_unconditionally."""
    assert r.reasons() == [Exit.CPUID, Exit.VMCALL]
    assert r.exit.length == 2
    assert r.exits[1].rip == r.exit.rip + 2


def _run(vtx_target, monkeypatch, asm: str):
    assert GOOD_SKIP in VMM_ASM and GOOD_REASON in VMM_ASM
    monkeypatch.setattr(builder, "VMM_ASM", asm)
    v = new_guest(vtx_target)
    v.guest("""
        xor eax, eax
        cpuid
        vmcall
    """)
    v.on(Exit.CPUID, Action.skip())
    v.enter_guest()
    return run_guest(vtx_target, v, name="broken-engine")


@pytest.mark.requires("vmx")
def test_real_engine_passes_the_checks(vtx_target, monkeypatch):
    check_cpuid_then_vmcall(_run(vtx_target, monkeypatch, VMM_ASM))


@pytest.mark.requires("vmx")
def test_wrong_skip_length_is_caught(vtx_target, monkeypatch):
    r = _run(vtx_target, monkeypatch, VMM_ASM.replace(GOOD_SKIP, BAD_SKIP))
    with pytest.raises(AssertionError):
        check_cpuid_then_vmcall(r)


@pytest.mark.requires("vmx")
def test_stale_exit_reason_is_caught(vtx_target, monkeypatch):
    r = _run(vtx_target, monkeypatch, VMM_ASM.replace(GOOD_REASON, STALE_REASON))
    assert r.exit.reason == 0                        # the variant really reports the previous one
    with pytest.raises(AssertionError):
        check_cpuid_then_vmcall(r)
