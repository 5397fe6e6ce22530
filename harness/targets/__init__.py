"""Layer 2: running.  A target takes an image and returns a raw run with its evidence."""

from __future__ import annotations

import importlib

from .base import RawRun, Target
from .catalog import load_target as load
from .config import TargetConfig

# Modules that define target kinds; each defines one Target subclass with a KIND.
KIND_MODULES = ("harness.targets.qemu", "harness.targets.bochs", "harness.targets.remote_qemu",
                "harness.targets.baremetal", "harness.targets.kvmrunner")


def kinds() -> dict[str, type[Target]]:
    out: dict[str, type[Target]] = {}
    for name in KIND_MODULES:
        module = importlib.import_module(name)
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, Target) and obj.KIND:
                out[obj.KIND] = obj
    return out


def open_target(spec: str | TargetConfig) -> Target:
    """A target from a name, a YAML path or a loaded config."""
    config = spec if isinstance(spec, TargetConfig) else load(str(spec))
    return kinds()[config.kind](config)


__all__ = ["RawRun", "Target", "TargetConfig", "kinds", "load", "open_target"]
