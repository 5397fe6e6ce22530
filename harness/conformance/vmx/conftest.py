"""Per-target SDM deviations of the VMX suite.

``@deviation(targets, section, observed)`` turns a test into a strict xfail on the named targets
only (every other target must pass it), citing the SDM section and what the target did; a name is
a target kind (``"bochs"``: every Bochs target, including a user's own YAML) or a target name.  The
reason reads ``<target> deviates from SDM <section>: <observed>``.  ``not_run=True`` is for a
deviation whose run cannot end as a verdict (the CPU misses the only event that ends the guest,
or the emulator panics): the test is then skipped on those targets with the same reason, and
kept out of VMX batches so it cannot take other tests down."""

from __future__ import annotations

import functools
from typing import Callable

import pytest

from harness.errors import ConfigError
from harness.targets.catalog import load_target

MARKER = "vmx_deviation"


def deviation(targets: tuple[str, ...] | str, section: str, observed: str, not_run: bool = False) -> Callable:
    if isinstance(targets, str):
        targets = (targets,)
    return getattr(pytest.mark, MARKER)(targets=tuple(targets), section=section, observed=observed, not_run=not_run)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{MARKER}(targets, section, observed, not_run=False): a strict xfail "
                            "on those targets only, citing the SDM section and the observed value")


def deviation_reason(target: str, section: str, observed: str) -> str:
    return f"{target} deviates from SDM {section}: {observed}"


@functools.lru_cache(maxsize=None)
def _kind(target: str) -> str | None:
    """The kind of the target named ``target`` (None if the name does not resolve on its own)."""
    try:
        return load_target(target).kind
    except ConfigError:
        return None


def applies(marker: pytest.Mark, target: str | None) -> bool:
    """Whether a ``vmx_deviation`` marker names ``target`` or its kind (tools/deviations.py too)."""
    return target is not None and bool({target, _kind(target)} & set(marker.kwargs["targets"]))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        spec = getattr(item, "callspec", None)
        target = spec.params.get("vtx_target") if spec is not None else None
        for m in item.iter_markers(MARKER):
            if not applies(m, target):
                continue
            reason = deviation_reason(target, m.kwargs["section"], m.kwargs["observed"])
            if m.kwargs.get("not_run"):
                item.add_marker(pytest.mark.skip(reason=f"{reason} (not run there)"))
                item.add_marker(pytest.mark.requires(f"not-hanging-on-{target}"))   # keeps it out of batches
            else:
                item.add_marker(pytest.mark.xfail(strict=True, reason=reason))
