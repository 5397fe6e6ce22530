"""The test-writing API's fixtures and hooks, registered by the vtx pytest plugin.

* ``vtd``: a ``VtdRunner`` for this test's target (``vtx_target``): ``vtd.scenario(...)``,
  ``vtd.run(...)``, ``vtd.variant(...)``.
* ``vmx``: the VMX batch session of this test's target, used by ``@vmx_test`` tests.
* A collection hook that keeps a target's VMX tests on one xdist worker (``--dist loadgroup``), so
  its batches boot once.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .vmx import VmxSession, is_vmx_test, session_for
from .vtd import VtdRunner


@pytest.fixture
def vtd(vtx_target, evidence_dir: Path) -> VtdRunner:
    """Make VT-d scenarios for this test's target and run them (see harness.testing.vtd)."""
    return VtdRunner(vtx_target, evidence_dir)


@pytest.fixture
def vmx(vtx_target, request: pytest.FixtureRequest) -> VmxSession:
    """The VMX batch session of this test's target (capability skips already applied)."""
    return session_for(vtx_target, request.session.items)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        spec = getattr(item, "callspec", None)
        if is_vmx_test(item) and spec is not None and "vtx_target" in spec.params:
            item.add_marker(pytest.mark.xdist_group(name=f"vmx-{spec.params['vtx_target']}"))
