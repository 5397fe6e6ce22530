"""Fixtures and hooks of the VMX suite; the helpers themselves live in vmx_support.py (importable
by name, unlike a conftest, whose module name every test directory shares)."""

from .vmx_support import pytest_collection_modifyitems, vmx  # noqa: F401  (hook and fixture)
