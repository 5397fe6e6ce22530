"""Fixtures of the VT-d suite; the helpers themselves live in vtd_support.py (importable by name,
unlike a conftest, whose module name every test directory shares)."""

from .vtd_support import vtd_run  # noqa: F401  (a fixture: registered by being named here)
