"""Sync points themselves (issue 14): only the exact release token releases the payload, a point
the payload never reaches fails within the run's timeout naming it, an unknown or missed point is
an infrastructure error naming it, and the payload's own bound ends a wait nobody releases."""

from __future__ import annotations

import time

import pytest

from harness.errors import InfraError, RunTimeout
from harness.payload.image import Scenario
from harness.payload.steps import release_token

from .support import host_target, require_qmp

SCRATCH = 0x120_0000
OLD, NEW = 0x0123_4567_89AB_CDEF, 0x5EED_5EED_5EED_5EED

HANG = "hang_forever:\n    cli\n1:  hlt\n    jmp 1b\n"


def test_only_the_exact_release_token_releases_the_payload(vtx_target):
    """Noise, a broken token and the token of another record are ignored: the step after the
    sync point has not run 0.3 s later.  Then the real token releases it."""
    target = require_qmp(vtx_target)
    s = Scenario(name="sync-token")
    s.steps.mem_fill(SCRATCH, 8, OLD)
    point = s.steps.sync("hold")
    after = s.steps.mem_fill(SCRATCH, 8, NEW)
    check = s.steps.mem_read(SCRATCH)
    seen: dict[str, bytes] = {}

    def tease(host) -> None:
        sync_seq = next(r.seq for r in host.records if r.kind == 0x1A)
        host.write_console(b"noise @G\r\n@Gzz" + release_token(sync_seq + 1) + b"@" + release_token(sync_seq)[:3])
        time.sleep(0.3)
        seen["held"] = host.read_memory(SCRATCH, 8)
    with target.at("hold", tease):
        run = vtx_target.run(s).expect_ok()
    assert seen["held"] == OLD.to_bytes(8, "little"), f"step {after} ran before the release"
    assert run.value(check) == NEW
    assert [r.fields[2] for r in run.step(point) if r.kind == 0x1B] == [1]


def test_a_point_never_reached_fails_within_the_run_timeout_naming_it(vtx_target):
    """The payload hangs before its sync point: the run ends at its timeout, and the message
    names the point it was waiting for."""
    target = host_target(vtx_target)
    s = Scenario(name="sync-never", asm=[HANG])
    s.steps.call("hang_forever")
    s.steps.sync("dma-pending")
    t0 = time.monotonic()
    with target.at("dma-pending", lambda host: None), pytest.raises(RunTimeout) as caught:
        vtx_target.run(s, timeout=8)
    assert time.monotonic() - t0 < 8 + 15
    assert "waiting for sync point(s) 'dma-pending' (reached: none)" in str(caught.value)


def test_a_sync_point_is_served_and_released_on_every_target(vtx_target):
    """Any target kind (QEMU, remote QEMU, Bochs through a pty on COM1, bare metal over its
    console): the action runs when the SYNC record has arrived and before the next step, and the
    payload, released, walks on."""
    target = host_target(vtx_target)
    s = Scenario(name="sync-any")
    s.steps.mark(0xA)
    point = s.steps.sync("here")
    mark = s.steps.mark(0xB)
    seen: list[tuple[str, int, int]] = []
    with target.at("here", lambda host: seen.append((host.point, host.step, host.records[-1].kind))):
        run = vtx_target.run(s, timeout=60).expect_ok()
    assert seen == [("here", point, 0x1A)]
    assert [r.fields[2] for r in run.step(point) if r.kind == 0x1B] == [1]
    assert run.step_record(mark, 0x18).fields[1] == 0xB


def test_an_unknown_point_is_an_infrastructure_error_naming_it(vtx_target):
    """The payload stops at a point the host has no action for: an InfraError naming it, at once."""
    s = Scenario(name="sync-unknown")
    s.steps.sync("nobody-knows")
    with pytest.raises(InfraError, match=r"sync point 'nobody-knows' \(step 0\) but the host has no action"):
        vtx_target.run(s, timeout=60)


def test_a_registered_point_the_run_misses_is_an_infrastructure_error(vtx_target):
    """An action registered for a point the scenario never reaches: an InfraError naming it."""
    target = host_target(vtx_target)
    s = Scenario(name="sync-missed")
    s.steps.sync("first")
    with target.at({"first": lambda host: None, "second": lambda host: None}), \
            pytest.raises(InfraError, match=r"sync point\(s\) 'second' never reached: the payload ended after 1 steps"):
        vtx_target.run(s, timeout=60)


def test_the_payload_gives_up_a_wait_nobody_releases(vtx_target):
    """With a bound of 1000 receiver polls and a host that takes 0.5 s to act, the payload gives
    up (SYNC_DONE ok=0, END POLL_TIMEOUT), which is an infrastructure error naming the point."""
    target = host_target(vtx_target)
    s = Scenario(name="sync-bound")
    s.steps.sync("slow-host", max_polls=1000)
    with target.at("slow-host", lambda host: time.sleep(0.5)), \
            pytest.raises(InfraError, match=r"gave up waiting at sync point 'slow-host' \(step 0\) after 1000 receiver polls"):
        vtx_target.run(s, timeout=60)
