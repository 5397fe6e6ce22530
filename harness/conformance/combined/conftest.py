"""The ``direct`` fixture and the ``combined`` marker for this directory, until the vtx plugin
registers them for every test (harness.testing.combined)."""

from __future__ import annotations

import pytest

from harness.testing.combined import direct  # noqa: F401  (a fixture, found by pytest here)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "combined(*capabilities): needs VMX and VT-d on one target (and "
                            "these capabilities); skips elsewhere with 'requires vmx and vtd on one target'")
