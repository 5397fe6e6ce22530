"""Target descriptions in YAML, validated on load.

Every problem is reported as one line: ``<file>: <key path>: <what was expected>``.  Each target
kind declares the schema of its own section; the common keys are checked here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "targets"

# The longest wait any configured or command-line timeout may ask for: one day.
MAX_SECONDS = 86400.0

# A name that is one safe path component on every filesystem and in every language the harness
# writes: starts with a letter or digit (no '.', '..', '-option', hidden files), then letters,
# digits, '.', '_', '-' and '+' (variants such as "qemu-tcg+nvme"), at most 64 characters.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")


def show(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, so a huge or hostile value keeps a message short."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def seconds(value: Any, where: str) -> float:
    """``value`` as a duration: a finite number in (0, MAX_SECONDS], else a one-line ConfigError."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        try:
            number = float(value)          # an int beyond float range raises OverflowError
        except OverflowError:
            ok = False
        else:
            ok = math.isfinite(number) and 0 < number <= MAX_SECONDS
    if not ok:
        raise ConfigError(f"{where}: expected a number of seconds in (0, {MAX_SECONDS:.0f}], got {show(value)}")
    return number


def safe_component(value: Any, where: str) -> str:
    """``value`` if it is one safe path component (see SAFE_NAME), else a one-line ConfigError.

    Used for target names and for every configured file name that must stay in its directory."""
    if not isinstance(value, str) or not SAFE_NAME.fullmatch(value):
        raise ConfigError(f"{where}: expected a plain file name (letters, digits, '.', '_', '-', '+'; "
                          f"first a letter or digit; at most 64 characters), got {show(value)}")
    return value


@dataclass(frozen=True)
class Field:
    """One key of a mapping: its type(s), whether it is required, its default, and nested schemas."""

    types: type | tuple[type, ...]
    required: bool = False
    default: Any = None
    choices: tuple | None = None
    schema: dict[str, "Field"] | None = None     # for a nested mapping
    items: "Field | None" = None                  # for a list
    doc: str = ""


_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false", float: "a number",
               dict: "a mapping", list: "a list", type(None): "null"}


def _expected(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)


def validate(value: Any, schema: dict[str, Field], where: str, path: str = "") -> dict[str, Any]:
    """Check ``value`` against ``schema``; return it with defaults filled in."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {path or '(top level)'}: expected a mapping, got {type(value).__name__}")
    out: dict[str, Any] = {}
    for key in value:
        if key not in schema:
            raise ConfigError(f"{where}: {path}{key}: unknown key (expected one of: {', '.join(sorted(schema))})")
    for key, f in schema.items():
        if key not in value:
            if f.required:
                raise ConfigError(f"{where}: {path}{key}: missing (expected {_expected(f.types)}"
                                  + (f": {f.doc}" if f.doc else "") + ")")
            out[key] = f.default
            continue
        out[key] = _check(value[key], f, where, f"{path}{key}")
    return out


def _check(v: Any, f: Field, where: str, path: str) -> Any:
    types = f.types if isinstance(f.types, tuple) else (f.types,)
    ok = isinstance(v, types) and not (isinstance(v, bool) and bool not in types and int in types)
    if float in types and isinstance(v, int) and not isinstance(v, bool):
        ok = True
    if not ok:
        raise ConfigError(f"{where}: {path}: expected {_expected(f.types)}, got {v!r}")
    if f.choices is not None and v not in f.choices:
        raise ConfigError(f"{where}: {path}: expected one of {', '.join(map(str, f.choices))}, got {v!r}")
    if isinstance(v, dict) and f.schema is not None:
        return validate(v, f.schema, where, path + ".")
    if isinstance(v, list) and f.items is not None:
        return [_check(item, f.items, where, f"{path}[{i}]") for i, item in enumerate(v)]
    return v


COMMON_SCHEMA: dict[str, Field] = {
    "name": Field(str, required=True, doc="the target's name"),
    "kind": Field(str, required=True, doc="qemu, bochs, remote-qemu or baremetal"),
    "description": Field(str, default=""),
    "timeout_s": Field(float, default=60.0, doc="the bound on one run, in seconds"),
    "capabilities": Field(dict, default={"deny": []}, schema={
        "deny": Field(list, default=[], items=Field(str), doc="capabilities to withhold"),
    }),
}


@dataclass(frozen=True)
class TargetConfig:
    name: str
    kind: str
    description: str
    timeout_s: float
    deny: tuple[str, ...]
    section: dict[str, Any]          # the kind's own section, validated
    source: str                      # the file it came from
    raw: dict[str, Any] = field(repr=False, default_factory=dict)


def load(spec: str | Path) -> TargetConfig:
    """Load a target by name (``configs/targets/<name>.yaml``) or by path."""
    path = Path(spec)
    if not (path.suffix in (".yaml", ".yml") or path.exists()):
        path = CONFIG_DIR / f"{spec}.yaml"
        if not path.exists():
            known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
            raise ConfigError(f"--target {spec}: no such target (known: {known}; or give a YAML path)")
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"line {mark.line + 1}" if mark else "?"
        raise ConfigError(f"{path}: {at}: not valid YAML ({getattr(e, 'problem', e)})") from None
    return from_dict(data, str(path))


def from_dict(data: Any, where: str) -> TargetConfig:
    """Validate a target description (already parsed) against the common and kind schemas."""
    from . import kinds

    if not isinstance(data, dict):
        raise ConfigError(f"{where}: (top level): expected a mapping")
    kind = data.get("kind")
    registry = kinds()
    if kind not in registry:
        raise ConfigError(f"{where}: kind: expected one of {', '.join(sorted(registry))}, got {kind!r}")
    section_key = registry[kind].SECTION
    schema = dict(COMMON_SCHEMA)
    schema[section_key] = Field(dict, required=True, schema=registry[kind].SCHEMA)
    checked = validate(data, schema, where)
    return TargetConfig(
        name=checked["name"], kind=kind, description=checked["description"],
        timeout_s=float(checked["timeout_s"]), deny=tuple(checked["capabilities"]["deny"]),
        section=checked[section_key], source=where, raw=data)
