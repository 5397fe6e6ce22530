"""Shared pieces of the host-driven scenarios (issue 14): the target behind a ``vtd`` runner and the
skip for targets whose host cannot act through QMP."""

from __future__ import annotations

from typing import Any

import pytest

from harness.targets.base import Target


def host_target(runner: Any) -> Target:
    """The Target behind a ``vtd`` runner (or a ``vtx_target``) whose sync points ``at`` serves."""
    t = getattr(runner, "target", runner)
    return getattr(t, "target", t)


def require_qmp(runner: Any) -> Target:
    """Skip unless the target's host can act through QMP (QEMU, remote QEMU); return the target."""
    target = host_target(runner)
    if "qmp" not in target.HOST_ACTIONS:
        pytest.skip(f"requires host actions through QMP; target {target.name} is kind {target.KIND}, "
                    "whose host cannot inject NMIs, pause, reset, hot-plug or read guest memory")
    return target
