"""Where target names resolve, and what each known target is.

A target is named either by a YAML path or by a name, looked up along a search path:

1. ``./targets`` (the current directory's own targets),
2. each directory of ``$VTX_TARGET_PATH`` (colon-separated),
3. the targets shipped inside the package (``harness/configs/targets``).

The first directory holding ``<name>.yaml`` wins.  ``config.load(path)`` validates what a file
says; this module only decides which file a name means, and that no two files in one selection
define the same target name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from .config import CONFIG_DIR, SAFE_NAME, TargetConfig, load

ENV_TARGET_PATH = "VTX_TARGET_PATH"
PACKAGE_DIR = CONFIG_DIR

# Kinds whose availability is only known once a run reaches another machine: listing them must
# not open connections, so `vtx targets` says so instead of guessing.
REMOTE_KINDS = ("remote-qemu", "baremetal")


def search_path(cwd: Path | None = None) -> list[Path]:
    """The directories names resolve in, in order (missing ones included: they are skipped)."""
    here = (cwd or Path.cwd()) / "targets"
    extra = [Path(p) for p in os.environ.get(ENV_TARGET_PATH, "").split(os.pathsep) if p.strip()]
    out: list[Path] = []
    for d in [here, *extra, PACKAGE_DIR]:
        if d not in out:
            out.append(d)
    return out


def _is_path(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml")) or os.sep in spec or (os.altsep or os.sep) in spec


def resolve(spec: str, where: str = "--vtx-target") -> Path:
    """The YAML file ``spec`` means: a path as given, or ``<name>.yaml`` along the search path."""
    if _is_path(spec):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ConfigError(f"{where} {spec}: no such file")
        return path
    if not SAFE_NAME.fullmatch(spec):
        raise ConfigError(f"{where} {spec!r}: expected a target name (letters, digits, '.', '_', '-', '+') "
                          "or a YAML path")
    dirs = search_path()
    for d in dirs:
        path = d / f"{spec}.yaml"
        if path.is_file():
            return path
    known = ", ".join(sorted({p.stem for d in dirs if d.is_dir() for p in d.glob("*.yaml")}))
    raise ConfigError(f"{where} {spec}: no such target in {':'.join(map(str, dirs))} "
                      f"(known: {known or 'none'}; or give a YAML path)")


def load_target(spec: str, where: str = "--vtx-target") -> TargetConfig:
    """Resolve and validate one target."""
    return load(resolve(spec, where))


def load_many(specs: list[str], where: str = "--vtx-target") -> list[TargetConfig]:
    """Resolve and validate several targets, in order, each once.  Two different files that
    define the same target name are a one-line error naming both files."""
    out: dict[str, TargetConfig] = {}
    for spec in specs:
        config = load_target(spec, where)
        seen = out.get(config.name)
        if seen is None:
            out[config.name] = config
        elif Path(seen.source).resolve() != Path(config.source).resolve():
            raise ConfigError(f"{where}: target name {config.name!r} is defined by both {seen.source} "
                              f"and {config.source} (rename one, or name only one)")
    return list(out.values())


# What a target of a given configuration can offer at all, before any probe: tests that need
# something outside this set are not applicable to it (deselected, not skipped one by one).
# QEMU's TCG accelerator does not emulate VMX (only KVM passes it through); QEMU offers VT-d only
# with an intel-iommu device; Bochs 2.7 has a VMX model but no DMA-remapping unit.  None: unknown
# before probing (a real host may have anything).
def possible_technologies(config: TargetConfig) -> frozenset[str] | None:
    """The subset of {"vmx", "vtd"} a target with this configuration could ever probe."""
    if config.kind in ("qemu", "remote-qemu"):
        q = config.section
        found: set[str] = set()
        if q.get("accel") == "kvm":
            found.add("vmx")
        if q.get("iommu") is not None or any("intel-iommu" in a for a in q.get("extra_args", [])):
            found.add("vtd")
        return frozenset(found)
    if config.kind == "bochs":
        return frozenset({"vmx"})
    if config.kind == "kvmrunner":               # QEMU/KVM with intel-iommu inside the stand-in
        return frozenset({"vmx", "vtd"})
    return None


NEUTRAL_CAPABILITIES = ("intel", "x2apic")


def technology(capability: str) -> str | None:
    """Which technology a capability name belongs to: "vtd", "vmx", or None (CPU-wide ones)."""
    if capability == "vtd" or capability.startswith("vtd."):
        return "vtd"
    if capability in NEUTRAL_CAPABILITIES:
        return None
    return "vmx"


def lacking(config: TargetConfig, required: list[str]) -> frozenset[str]:
    """The technologies a test needing ``required`` lacks on this target whatever it probes
    (empty: the test might apply; the probe decides)."""
    possible = possible_technologies(config)
    if possible is None:
        return frozenset()
    return frozenset(t for t in map(technology, required) if t is not None and t not in possible)


def describe_kind(config: TargetConfig) -> str:
    """A short phrase for the kind, e.g. "QEMU TCG" or "Bochs"."""
    if config.kind in ("qemu", "remote-qemu"):
        accel = str(config.section.get("accel", "")).upper()
        iommu = "" if config.section.get("iommu") is not None else " (no intel-iommu)"
        return f"QEMU {accel}{iommu}"
    return {"bochs": "Bochs", "kvmrunner": "QEMU/KVM in Bochs (stand-in)"}.get(config.kind, config.kind)


@dataclass(frozen=True)
class Entry:
    """One target file found along the search path."""

    name: str
    path: Path
    kind: str = ""
    description: str = ""
    runnable: bool | None = None      # None: cannot be known without connecting
    reason: str = ""                  # why not runnable / not checked / invalid
    invalid: bool = False
    shadowed_by: Path | None = None   # an earlier directory has a file of the same name


def discover() -> list[Entry]:
    """Every target file along the search path, validated, with whether it can run here."""
    from . import kinds

    registry = kinds()
    entries: list[Entry] = []
    first: dict[str, Path] = {}
    for d in search_path():
        if not d.is_dir():
            continue
        for path in sorted(d.glob("*.yaml")):
            name = path.stem
            if name in first:
                entries.append(Entry(name, path, shadowed_by=first[name], reason=f"shadowed by {first[name]}"))
                continue
            first[name] = path
            try:
                config = load(path)
            except ConfigError as e:
                entries.append(Entry(name, path, invalid=True, reason=str(e)))
                continue
            if config.kind in REMOTE_KINDS:
                entries.append(Entry(config.name, path, config.kind, config.description, None,
                                     "checked when a run connects"))
                continue
            try:
                why = registry[config.kind](config).unavailable()
            except ConfigError as e:
                entries.append(Entry(config.name, path, config.kind, config.description, invalid=True,
                                     reason=str(e)))
                continue
            entries.append(Entry(config.name, path, config.kind, config.description, why is None, why or ""))
    return entries
