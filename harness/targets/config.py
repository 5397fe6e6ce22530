"""Target descriptions in YAML, validated on load.

Every problem is reported as one line: ``<file>: <key path>: <what was expected>``.  Each target
kind declares the schema of its own section; the common keys are checked here, and each kind's
cross-field rules (``Target.check_config``) run at load time too, so a broken file stops pytest at
start-up, not when a test first opens the target.

What the checks guarantee for every value that passes:
  * numbers are finite and inside the bounds their Field names (durations through ``seconds``);
  * strings hold no control, format or separator characters (no newline reaches a bochsrc, an
    iPXE script or a log line) and are at most ``MAX_TEXT`` characters long;
  * mapping keys are strings; YAML 1.2 scalars (only ``true``/``false`` are booleans, so an
    unquoted ``on:`` key stays the string "on"; no sexagesimal or leading-zero octal numbers);
    a key given twice is an error, not "the last one wins";
  * names that become path components (target names, configured file names) are one safe
    component (``safe_component``); the language-specific checks live in ``quoting``.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from ..errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "targets"

# The longest wait any configured or command-line timeout may ask for: one day.
MAX_SECONDS = 86400.0
# Limits on what a target file may be: small, shallow, short strings.
MAX_FILE_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_TEXT = 4096

# A name that is one safe path component on every filesystem and in every language the harness
# writes: starts with a letter or digit (no '.', '..', '-option', hidden files), then letters,
# digits, '.', '_', '-' and '+' (variants such as "qemu-tcg+nvme"), at most 100 characters (room
# for variant suffixes).
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")


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
                          f"first a letter or digit; at most 100 characters), got {show(value)}")
    return value


# Unicode categories no configured string may contain: controls (newline, NUL, ESC, ...), format
# characters (bidi overrides, zero-width joiners), surrogates (unencodable) and the line/paragraph
# separators that str.splitlines() and some parsers treat as line ends.
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def text_problem(value: str, multiline: bool = False) -> str | None:
    """Why ``value`` is not acceptable configured text (None when it is)."""
    if len(value) > MAX_TEXT:
        return f"expected at most {MAX_TEXT} characters, got {len(value)}"
    for i, ch in enumerate(value):
        if multiline and ch in "\n\t":
            continue
        if unicodedata.category(ch) in _FORBIDDEN_CATEGORIES:
            return f"expected text without control characters, got U+{ord(ch):04X} at offset {i}"
    return None


def matching(pattern: str, what: str) -> Callable[[Any, str], Any]:
    """A Field check: the whole string matches ``pattern`` (``what`` describes it in the error)."""
    compiled = re.compile(pattern)

    def check(value: Any, where: str) -> Any:
        if not compiled.fullmatch(value):
            raise ConfigError(f"{where}: expected {what}, got {show(value)}")
        return value
    return check


# Reusable string checks for schema fields.
ENV_NAME = matching(r"[A-Za-z_][A-Za-z0-9_]{0,127}", "the name of an environment variable")
HOST_NAME = matching(r"[A-Za-z0-9_:\[][A-Za-z0-9_.:%\[\]-]{0,252}", "a host name or address")
USER_NAME = matching(r"[A-Za-z0-9_][A-Za-z0-9_.@-]{0,63}", "a user name")
CAPABILITY = matching(r"[a-z][a-z0-9_-]{0,31}", "a capability name (lower-case letters, digits, '_', '-')")


def absolute_path(value: Any, where: str) -> Any:
    """A Field check: an absolute, normalised POSIX path (no '..', no '//'), e.g. on a remote host."""
    if not value.startswith("/") or any(part in ("..", ".") for part in value.split("/")) \
            or "//" in value or (len(value) > 1 and value.endswith("/")):
        raise ConfigError(f"{where}: expected an absolute path without '.', '..' or empty components, "
                          f"got {show(value)}")
    return value


def command_name(value: Any, where: str) -> Any:
    """A Field check: a program (name or path) that cannot be mistaken for an option."""
    if not value or value.startswith("-") or value != value.strip():
        raise ConfigError(f"{where}: expected a program name or path (not empty, not starting with '-'), "
                          f"got {show(value)}")
    return value


@dataclass(frozen=True)
class Field:
    """One key of a mapping: its type(s), whether it is required, its default, its bounds, and
    nested schemas.

    Numbers must name their bounds (``low``/``high``, inclusive) or a ``check`` such as
    ``seconds``; strings may add a ``check`` (a language-specific rule from ``quoting`` or one of
    the checks above).  ``check(value, where)`` returns the value (possibly normalised) or raises
    ConfigError.  A mapping without a fixed ``schema`` may constrain its keys (``keys``, a check)
    and its values (``values``, a Field)."""

    types: type | tuple[type, ...]
    required: bool = False
    default: Any = None
    choices: tuple | None = None
    schema: dict[str, "Field"] | None = None     # for a nested mapping with fixed keys
    items: "Field | None" = None                  # for a list
    doc: str = ""
    low: float | None = None                      # inclusive bounds of a number
    high: float | None = None
    check: Callable[[Any, str], Any] | None = None
    multiline: bool = False                       # a string may hold newlines and tabs
    keys: Callable[[Any, str], Any] | None = None  # for an open mapping: its keys' check
    values: "Field | None" = None                 # for an open mapping: its values
    max_items: int = 256                          # for a list or an open mapping


def duration(default: float, doc: str = "", required: bool = False) -> Field:
    """A duration in seconds, checked by ``seconds``."""
    return Field(float, required=required, default=default, check=seconds, doc=doc)


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
        if not isinstance(key, str):
            raise ConfigError(f"{where}: {path.rstrip('.') or '(top level)'}: expected string keys, "
                              f"got the key {show(key)}")
        if key not in schema:
            raise ConfigError(f"{where}: {path}{_key(key)}: unknown key "
                              f"(expected one of: {', '.join(sorted(schema))})")
    for key, f in schema.items():
        if key not in value:
            if f.required:
                raise ConfigError(f"{where}: {path}{key}: missing (expected {_expected(f.types)}"
                                  + (f": {f.doc}" if f.doc else "") + ")")
            out[key] = f.default
            continue
        out[key] = _check(value[key], f, where, f"{path}{key}")
    return out


def _key(key: str) -> str:
    """A key as messages show it: as is when short and printable, else quoted and cut."""
    return key if key.isprintable() and len(key) <= 60 else show(key)


def _check(v: Any, f: Field, where: str, path: str) -> Any:
    types = f.types if isinstance(f.types, tuple) else (f.types,)
    ok = isinstance(v, types) and not (isinstance(v, bool) and bool not in types)
    if float in types and isinstance(v, int) and not isinstance(v, bool):
        ok = True
    if not ok:
        raise ConfigError(f"{where}: {path}: expected {_expected(f.types)}, got {show(v)}")
    if v is None:
        return v
    if f.choices is not None and v not in f.choices:
        raise ConfigError(f"{where}: {path}: expected one of {', '.join(map(str, f.choices))}, got {show(v)}")
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = _check_number(v, f, where, path)
    if isinstance(v, str):
        problem = text_problem(v, f.multiline)
        if problem:
            raise ConfigError(f"{where}: {path}: {problem}")
    if isinstance(v, (list, dict)) and len(v) > f.max_items:
        raise ConfigError(f"{where}: {path}: expected at most {f.max_items} entries, got {len(v)}")
    if isinstance(v, dict) and f.schema is not None:
        v = validate(v, f.schema, where, path + ".")
    elif isinstance(v, dict) and (f.keys is not None or f.values is not None):
        v = _check_open_mapping(v, f, where, path)
    elif isinstance(v, list) and f.items is not None:
        v = [_check(item, f.items, where, f"{path}[{i}]") for i, item in enumerate(v)]
    if f.check is not None:
        v = f.check(v, f"{where}: {path}")
    return v


def _check_number(v: int | float, f: Field, where: str, path: str) -> int | float:
    if f.check is seconds:
        return v                                      # seconds() checks and words it
    if isinstance(v, float) and not math.isfinite(v):
        raise ConfigError(f"{where}: {path}: expected a finite number, got {show(v)}")
    low = -math.inf if f.low is None else f.low
    high = math.inf if f.high is None else f.high
    if not low <= v <= high:
        raise ConfigError(f"{where}: {path}: expected a number in [{_num(f.low)}, {_num(f.high)}], got {show(v)}")
    return v


def _num(bound: float | None) -> str:
    return "unbounded" if bound is None else f"{bound:g}" if isinstance(bound, float) else str(bound)


def _check_open_mapping(v: dict, f: Field, where: str, path: str) -> dict:
    out = {}
    for key, item in v.items():
        if not isinstance(key, str):
            raise ConfigError(f"{where}: {path}: expected string keys, got the key {show(key)}")
        if f.keys is not None:
            f.keys(key, f"{where}: {path}: key")
        out[key] = _check(item, f.values, where, f"{path}.{key}") if f.values is not None else item
    return out


def numeric_fields_without_bounds(schema: dict[str, Field], path: str = "") -> list[str]:
    """Key paths of numeric fields that name no bounds (a schema defect; the unit tests ask)."""
    found = []
    for key, f in schema.items():
        types = f.types if isinstance(f.types, tuple) else (f.types,)
        numeric = (int in types or float in types) and f.choices is None
        if numeric and f.check is None and (f.low is None or f.high is None):
            found.append(path + key)
        for sub in (f.schema, ):
            if sub:
                found += numeric_fields_without_bounds(sub, f"{path}{key}.")
        for inner in (f.items, f.values):
            if inner is not None:
                found += numeric_fields_without_bounds({"[]": inner}, f"{path}{key}")
    return found


COMMON_SCHEMA: dict[str, Field] = {
    "name": Field(str, required=True, check=safe_component,
                  doc="the target's name (one path component: letters, digits, '.', '_', '-', '+')"),
    "kind": Field(str, required=True, doc="qemu, bochs, remote-qemu or baremetal"),
    "description": Field(str, default="", multiline=True),
    "timeout_s": duration(60.0, "the bound on one run, in seconds"),
    "capabilities": Field(dict, default={"deny": []}, schema={
        "deny": Field(list, default=[], items=Field(str, check=CAPABILITY), doc="capabilities to withhold"),
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


# -- YAML ------------------------------------------------------------------------------------------

_BOOL = "tag:yaml.org,2002:bool"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 core-schema scalars and duplicate keys refused.

    YAML 1.1 (PyYAML's default) reads ``on``/``off``/``yes``/``no`` as booleans (an ``on:`` key
    became ``True``), ``1:30`` as 90, ``010`` as 8 and ``2024-01-01`` as a date; YAML 1.2 (and
    this loader) reads them as strings or decimal numbers."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: set = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:                 # unhashable: the base class reports it
                    continue
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {show(key)}", key_node.start_mark)
        return super().construct_mapping(node, deep)

    def construct_yaml_int(self, node):
        text = self.construct_scalar(node)
        sign, digits = (-1, text[1:]) if text[0] == "-" else (1, text.lstrip("+"))
        if digits.startswith("0x"):
            return sign * int(digits[2:], 16)
        if digits.startswith("0o"):
            return sign * int(digits[2:], 8)
        return sign * int(digits, 10)


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers
            if tag not in (_BOOL, _INT, _FLOAT, "tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:value")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))
_Yaml12Loader.add_implicit_resolver(_INT, re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"),
                                    list("-+0123456789"))
_Yaml12Loader.add_implicit_resolver(
    _FLOAT, re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                       r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+.0123456789"))
_Yaml12Loader.add_constructor(_INT, _Yaml12Loader.construct_yaml_int)


def parse_yaml(text: str, where: str) -> Any:
    """Parse one YAML document of a target file; every failure is one line naming ``where``."""
    try:
        depth = 0
        for event in yaml.parse(text, Loader=_Yaml12Loader):   # iterative: bounds the nesting
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_DEPTH:
                    raise ConfigError(f"{where}: line {event.start_mark.line + 1}: nested more than "
                                      f"{MAX_DEPTH} levels deep (a target file is shallow)")
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
        return yaml.load(text, Loader=_Yaml12Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        at = f"line {mark.line + 1}" if mark else "?"
        problem = getattr(e, "problem", None) or getattr(e, "reason", None) or str(e)
        if getattr(e, "character", None) is not None:        # a ReaderError: a forbidden character
            at = f"offset {e.position}"
            problem = f"unacceptable character {show(chr(e.character) if isinstance(e.character, int) else e.character)}"
        raise ConfigError(f"{where}: {at}: not valid YAML ({' '.join(str(problem).split())})") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply to parse") from None


def _display(path: Path) -> str:
    """The file name as messages show it: as is, or quoted when it holds unprintable characters."""
    text = str(path)
    return text if text.isprintable() else repr(text)


def load(spec: str | Path) -> TargetConfig:
    """Load and validate one target file.  Names resolve in ``catalog`` (the search path), which
    calls this with the file it found."""
    path = Path(spec)
    where = _display(path)
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise ConfigError(f"{where}: larger than {MAX_FILE_BYTES} bytes (a target file is small)")
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{where}: cannot read ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where}: offset {e.start}: not UTF-8 text (byte {raw[e.start]:#04x})") from None
    return from_dict(parse_yaml(text, where), where)


def from_dict(data: Any, where: str) -> TargetConfig:
    """Validate a target description (already parsed) against the common and kind schemas, then
    the kind's cross-field rules."""
    from . import kinds

    if not isinstance(data, dict):
        raise ConfigError(f"{where}: (top level): expected a mapping")
    kind = data.get("kind")
    registry = kinds()
    if not isinstance(kind, str) or kind not in registry:
        raise ConfigError(f"{where}: kind: expected one of {', '.join(sorted(registry))}, got {show(kind)}")
    section_key = registry[kind].SECTION
    schema = dict(COMMON_SCHEMA)
    schema[section_key] = Field(dict, required=True, schema=registry[kind].SCHEMA)
    checked = validate(data, schema, where)
    config = TargetConfig(
        name=checked["name"], kind=kind, description=checked["description"],
        timeout_s=float(checked["timeout_s"]), deny=tuple(checked["capabilities"]["deny"]),
        section=checked[section_key], source=where, raw=data)
    registry[kind].check_config(config)
    return config
