"""The test-writing API's fixtures and hooks, registered by the vtx pytest plugin.

* ``vtd``: a ``VtdRunner`` for this test's target (``vtx_target``): ``vtd.scenario(...)``,
  ``vtd.run(...)``, ``vtd.variant(...)``; its first run comes from a batch of the session's VT-d
  scenarios booted together (harness.testing.vtd_batch) unless the test is marked ``solo`` or
  ``--vtx-solo`` is given.
* ``vmx``: the VMX batch session of this test's target, used by ``@vmx_test`` tests.
* ``direct``: VMX and VT-d on one target (harness.testing.combined), for direct-assignment tests.
* A collection hook that keeps a target's VMX tests, and its VT-d tests, on one xdist worker each
  (``--dist loadgroup``), so that their batches boot once.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ..pytest_plugin import settings_of
from .combined import direct  # noqa: F401  (the ``direct`` fixture: VMX + VT-d on one target)
from .vmx import VmxSession, is_vmx_test, session_for
from .vtd import VtdRunner
from .vtd_batch import batches_for


@pytest.fixture
def vtd(vtx_target, evidence_dir: Path, request: pytest.FixtureRequest) -> VtdRunner:
    """Make VT-d scenarios for this test's target and run them (see harness.testing.vtd)."""
    runner = VtdRunner(vtx_target, evidence_dir)
    if settings_of(request.config).solo or request.node.get_closest_marker("solo"):
        return runner
    return VtdRunner(vtx_target, evidence_dir, batches_for(runner, request.session.items), request.node.nodeid)


@pytest.fixture
def vmx(vtx_target, request: pytest.FixtureRequest) -> VmxSession:
    """The VMX batch session of this test's target (capability skips already applied)."""
    return session_for(vtx_target, request.session.items)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # tryfirst: xdist's worker reads the xdist_group marker in its own hook of this name (suffixing
    # the node id with the group); a marker added after that is never seen, and then both workers
    # plan and boot the same batches.
    for item in items:
        spec = getattr(item, "callspec", None)
        if spec is None or "vtx_target" not in spec.params:
            continue
        if is_vmx_test(item):
            item.add_marker(pytest.mark.xdist_group(name=f"vmx-{spec.params['vtx_target']}"))
        elif "vtd" in getattr(item, "fixturenames", ()) and not item.get_closest_marker("solo"):
            item.add_marker(pytest.mark.xdist_group(name=f"vtd-{spec.params['vtx_target']}"))
