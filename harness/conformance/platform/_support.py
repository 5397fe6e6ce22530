"""Helpers of the platform checks' tests: the shared snapshot per target configuration and the
one way a check becomes a verdict."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable

import pytest

from harness.observe.platform import DmarContext, Finding, NotApplicable, PlatformSnapshot, explain, take_snapshot

_SNAPSHOTS: dict[str, PlatformSnapshot] = {}


def config_key(target: Any) -> str:
    """A target configuration's identity (name and content: variants differ in content)."""
    raw = json.dumps({"kind": target.config.kind, "raw": target.config.raw}, sort_keys=True, default=str)
    return f"{target.name}-{hashlib.sha256(raw.encode()).hexdigest()[:12]}"


def snapshot_of(target: Any) -> PlatformSnapshot:
    """The (shared) snapshot of ``target``: booted once per configuration and process."""
    key = config_key(target)
    if key not in _SNAPSHOTS:
        _SNAPSHOTS[key] = take_snapshot(target)
    return _SNAPSHOTS[key]


def assert_no_findings(check: Callable[..., list[Finding]], *args: Any, origin: str = "") -> None:
    """Run one check; no findings passes, NotApplicable skips with its reason.  ``origin``
    (default: the DmarContext argument's) says which target and evidence the input came from."""
    if not origin:
        origin = next((a.origin for a in args if isinstance(a, DmarContext)), "")
    try:
        found = check(*args)
    except NotApplicable as e:
        pytest.skip(str(e))
    assert not found, explain(found, origin)
