"""Batching of VMX tests (harness.testing.vmx), end to end on bochs-skylake: a guest whose run
stops the payload is re-run alone and fails naming that, while the tests after it, which never
ran, boot again together (one boot more, not one per test), and still pass."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

pytestmark = pytest.mark.xdist_group("vmx-batching")

TESTS = """
from harness.testing import Exit, vmx_test

UNMAPPED = 0x7F_0000_0000        # beyond the payload's identity map: reading it is a #PF in the host


def _cpuid_exit(v):
    v.guest('''
        cpuid
        vmcall
    ''')
    v.enter_guest()


@vmx_test()
def test_a_first(v):
    _cpuid_exit(v)
    r = yield
    assert r.reasons()[0] == Exit.CPUID


@vmx_test()
def test_b_host_faults_after_its_guest(v):
    _cpuid_exit(v)
    v.mem_read_after(UNMAPPED)       # the payload ends with an exception: no later guest runs
    r = yield
    assert False, "unreachable: this guest's slice never completes"


@vmx_test()
def test_c_after(v):
    _cpuid_exit(v)
    r = yield
    assert r.reasons()[0] == Exit.CPUID


@vmx_test()
def test_d_last(v):
    _cpuid_exit(v)
    r = yield
    assert r.reasons() == [Exit.CPUID]
"""


def _runs(ev: Path) -> list[str]:
    root = ev / "_vmx" / "bochs-skylake"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def test_a_stopped_batch_reruns_the_culprit_alone_and_the_rest_together(pytester):
    pytester.makepyfile(test_inner=TESTS)
    ev = pytester.path / "ev"
    r = pytester.runpytest_subprocess("--vtx-target", "bochs-skylake", "-p", "no:cacheprovider",
                                      "--vtx-evidence-dir", str(ev), "-p", "no:xdist", timeout=600)
    r.assert_outcomes(passed=3, failed=1)
    assert "the guest's run did not complete" in r.stdout.str()
    runs = _runs(ev)
    solos = [n for n in runs if n.startswith("solo-")]
    assert len(solos) == 1 and "host_faults_after_its_guest" in solos[0], runs
    assert sorted(n for n in runs if n.startswith("batch-")) == ["batch-0", "batch-1"], runs
    # batch-1 ran exactly the two tests after the culprit
    assert (ev / "test_inner.py_test_c_after_bochs-skylake" / "vmx.txt").read_text().startswith(
        f"batch evidence: {ev / '_vmx' / 'bochs-skylake' / 'batch-1'}\ntest index: 0\n")
    assert "test index: 1\n" in (ev / "test_inner.py_test_d_last_bochs-skylake" / "vmx.txt").read_text()


HANGING = TESTS.replace('''    _cpuid_exit(v)
    v.mem_read_after(UNMAPPED)       # the payload ends with an exception: no later guest runs
    r = yield''', '''    v.guest("cli; hlt")              # never exits: the batch's run reaches its time bound
    v.enter_guest()
    r = yield''')


def test_a_batch_that_times_out_keeps_the_verdicts_that_arrived(pytester):
    """The run of a batch ends at its bound in a guest that never exits: the guest before it keeps
    its batched verdict, the hanging one fails alone with the timeout, the rest boot together."""
    assert HANGING != TESTS
    pytester.makepyfile(test_inner=HANGING)
    ev = pytester.path / "ev"
    r = pytester.runpytest_subprocess("--vtx-target", "bochs-skylake", "-p", "no:cacheprovider", "--vtx-run-timeout", "8",
                                      "--vtx-evidence-dir", str(ev), "-p", "no:xdist", timeout=600)
    outcomes = r.parseoutcomes()
    assert outcomes == {"passed": 3, "errors": 1}, outcomes           # the hanging one: an infra error
    assert "no terminal record within 8.0 s" in r.stdout.str()
    runs = _runs(ev)
    assert sorted(n for n in runs if n.startswith("batch-")) == ["batch-0", "batch-1"], runs
    assert (ev / "test_inner.py_test_a_first_bochs-skylake" / "vmx.txt").read_text().startswith(
        f"batch evidence: {ev / '_vmx' / 'bochs-skylake' / 'batch-0'}\n")
    assert "test index: 1\n" in (ev / "test_inner.py_test_d_last_bochs-skylake" / "vmx.txt").read_text()
