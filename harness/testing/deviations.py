"""Known deviations from the specification, per target: ``@deviation``.

A target (an emulator, a nested hypervisor) that does not behave as the SDM or the VT-d
specification requires keeps its test: the test becomes a strict xfail on that target alone, and
must still pass everywhere else (a target that starts passing it fails the run: XPASS(strict)).

    @deviation("kvmrunner", "SDM Vol. 3C 28.2.1 (an EPT misconfiguration saves no qualification)",
               "qualification 0x181", layer="KVM's nested EPT (arch/x86/kvm/vmx/nested.c)")
    @vmx_test("ept")
    def test_ept_misconfiguration_...(v): ...

``on`` is a target name or a target kind (``"bochs"``: every Bochs target, a user's own YAML
too), or a tuple of them; ``section`` names the specification and its section (and, in
parentheses, the rule); ``observed`` is what the target did instead (the concrete value);
``layer`` says which layer misbehaves, when that is known.  The skip or xfail reason reads
``<target> deviates from <section>: <observed> [layer: <layer>]``.

``not_run=True`` is for a deviation whose run cannot end as a verdict (the CPU misses the only
event that ends the guest, or the emulator panics): the test is skipped there with that reason
and marked ``solo``, which keeps it out of VMX and VT-d batches.

The marker works on any test that runs on a target (``vtx_target``, ``vtd``, ``vmx``, ``direct``),
on a function or on one ``pytest.param``; it is applied at collection, so deselection, batch
planning and tools/deviations.py (the README's per-target table) see it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest

MARKER = "deviation"
_SECTION_NUMBER = re.compile(r"\b([A-C]\.\d+(?:\.\d+)*|\d+(?:\.\d+)+)\b")   # "28.2.1", "A.9"


@dataclass(frozen=True)
class Deviation:
    """One declared deviation: the targets (names or kinds) it is known on, where the spec
    defines the behaviour, what those targets do instead, and which layer is at fault."""

    on: tuple[str, ...]
    section: str
    observed: str
    layer: str = ""
    not_run: bool = False

    def applies(self, name: str, kind: str) -> bool:
        """Whether this deviation is declared for the target ``name`` of kind ``kind``."""
        return name in self.on or kind in self.on

    @property
    def cited(self) -> str:
        """The section as cited, without the rule in parentheses ("SDM Vol. 3C 28.2.1")."""
        return self.section.partition(" (")[0].strip()

    @property
    def rule(self) -> str:
        """The rule given in parentheses after the section ("" when none is)."""
        rest = self.section.partition(" (")[2].strip()
        return rest[:-1] if rest.endswith(")") else rest

    def reason(self, target: str) -> str:
        text = f"{target} deviates from {self.section}: {self.observed}"
        if self.layer:
            text += f" [layer: {self.layer}]"
        return text + (" (not run there)" if self.not_run else "")

    @classmethod
    def of(cls, mark: pytest.Mark) -> "Deviation":
        return cls(**mark.kwargs)


def deviation(on: str | tuple[str, ...], section: str, observed: str, layer: str = "",
              not_run: bool = False) -> pytest.MarkDecorator:
    """Declare a known deviation (see the module docstring); a decorator for a test function,
    or ``marks=`` of a ``pytest.param``.  A deviation that names no target, cites no section
    number or says nothing about what was observed is an error at import."""
    names = (on,) if isinstance(on, str) else tuple(on)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise TypeError(f"deviation(on={on!r}): expected a target name or kind, or a tuple of them")
    if not _SECTION_NUMBER.search(section):
        raise TypeError(f"deviation(section={section!r}): expected the spec and a section number, "
                        "e.g. 'SDM Vol. 3C 26.3.1.1 (rule)' or 'VT-d 7.1.2'")
    if not observed.strip():
        raise TypeError("deviation(observed=''): say what the target did instead (the concrete value)")
    return getattr(pytest.mark, MARKER)(on=names, section=section, observed=observed, layer=layer,
                                        not_run=not_run)


def declared(item: pytest.Item) -> list[Deviation]:
    """Every deviation declared on ``item`` (closest first: a parameter's before its function's)."""
    return [Deviation.of(m) for m in item.iter_markers(MARKER)]


_APPLIED = pytest.StashKey["Deviation"]()


def applied(item: pytest.Item) -> Deviation | None:
    """The deviation that made ``item`` a strict xfail (or a not-run skip) on its target."""
    return item.stash.get(_APPLIED, None)


def target_of(item: pytest.Item) -> str | None:
    spec = getattr(item, "callspec", None)
    return spec.params.get("vtx_target") if spec is not None else None


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Turn each deviation declared for an item's target (its name or kind) into a strict xfail,
    or for ``not_run`` a skip that stays out of batches."""
    from ..pytest_plugin import target_config

    for item in items:
        found = declared(item)
        if not found:
            continue
        name = target_of(item)
        if name is None:
            raise pytest.UsageError(f"{item.nodeid}: @deviation on a test that runs on no target "
                                    "(it uses none of the vtx_target, vtd, vmx or direct fixtures)")
        kind = target_config(config, name).kind
        d = next((d for d in found if d.applies(name, kind)), None)
        if d is None:
            continue
        item.stash[_APPLIED] = d
        if d.not_run:
            item.add_marker(pytest.mark.skip(reason=d.reason(name)))
            item.add_marker(pytest.mark.solo)               # keeps it out of VMX and VT-d batches
        else:
            item.add_marker(pytest.mark.xfail(strict=True, reason=d.reason(name)))
