"""Per-target SDM deviations of the VMX suite.

``@deviation(targets, section, observed)`` turns a test into a strict xfail on the named targets
only (every other target must pass it), citing the SDM section and what the target did; the
reason reads ``<target> deviates from SDM <section>: <observed>``.  ``not_run=True`` is for a
deviation whose run cannot end as a verdict (the CPU misses the only event that ends the guest,
or the emulator panics): the test is then skipped on those targets with the same reason, and
kept out of VMX batches so it cannot take other tests down."""

from __future__ import annotations

from typing import Callable

import pytest

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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        spec = getattr(item, "callspec", None)
        target = spec.params.get("vtx_target") if spec is not None else None
        for m in item.iter_markers(MARKER):
            if target not in m.kwargs["targets"]:
                continue
            reason = deviation_reason(target, m.kwargs["section"], m.kwargs["observed"])
            if m.kwargs.get("not_run"):
                item.add_marker(pytest.mark.skip(reason=f"{reason} (not run there)"))
                item.add_marker(pytest.mark.requires(f"not-hanging-on-{target}"))   # keeps it out of batches
            else:
                item.add_marker(pytest.mark.xfail(strict=True, reason=reason))
