"""Config values on their way into other languages: one quoting (or refusing) function per language.

Each function either returns text that the receiving parser reads back as exactly the given value,
or raises ``Unquotable`` naming what cannot be expressed there.  The schema checks
(``config_check``) run them at load time, so a value that could not be written is refused when the
file is read; the writers (``argv()``, ``bochsrc()``, the iPXE and GRUB scripts) call them again.

  * QEMU option strings (``-device edu,addr=...``): QemuOpts/keyval split on ',' and take ',,' as a
    literal comma, so commas in values are doubled; keys, driver and machine names come from a safe
    character set, since a comma or '=' there would start a new property.
  * bochsrc: a line is ``directive: a=b, c=d``; Bochs splits on ',', drops whitespace outside double
    quotes, ends the line at '#' outside quotes, expands ``$NAME`` from the environment everywhere
    and cannot escape '"'.  Values are double-quoted when they hold ',', '#' or blanks; '"', '$' and
    repeated commas (collapsed by Bochs even inside quotes) are refused.
  * iPXE scripts: a line is split on whitespace with no quoting at all, ``${name}`` is expanded and
    ``||``/``&&`` chain commands; so words holding any of these are refused.
  * GRUB scripts: sh-like; single quotes keep everything literal, a quote is written '\\''.
  * remote shell strings: ``shlex.quote``/``shlex.join`` (see ssh.py), not repeated here.
Newlines and other control characters are refused everywhere (``config.text_problem``).
"""

from __future__ import annotations

import re
import shlex
from typing import Any, Callable, Iterable, Mapping

from ..errors import ConfigError
from .config import show, text_problem


class Unquotable(ValueError):
    """A value that the receiving language cannot express safely; the message says why."""


def _plain(value: Any) -> str:
    if not isinstance(value, str):
        raise Unquotable(f"expected a string, got {show(value)}")
    problem = text_problem(value)
    if problem:
        raise Unquotable(problem)
    return value


def config_check(quote: Callable[[Any], Any]) -> Callable[[Any, str], Any]:
    """A schema Field check from a quoting function: the value must be quotable; it is kept as is."""

    def check(value: Any, where: str) -> Any:
        try:
            quote(value)
        except Unquotable as e:
            raise ConfigError(f"{where}: {e}") from None
        return value
    return check


def refuse(where: str, quote: Callable[..., str], *args: Any) -> str:
    """``quote(*args)``, with Unquotable turned into a one-line ConfigError naming ``where``."""
    try:
        return quote(*args)
    except Unquotable as e:
        raise ConfigError(f"{where}: {e}") from None


# -- QEMU ------------------------------------------------------------------------------------------

_QEMU_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# QEMU's own rule for ids (util/id.c id_wellformed): a letter, then letters, digits, '-', '.', '_'.
_QEMU_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,127}")
_QEMU_FEATURE = re.compile(r"[+-][A-Za-z0-9_.-]{1,63}|[A-Za-z0-9_.-]{1,63}(=[A-Za-z0-9_.-]{1,63})?")
_QEMU_TRACE = re.compile(r"[A-Za-z0-9_*?]{1,128}")


def qemu_name(value: Any) -> str:
    """A driver, machine, CPU model or property name: letters, digits, '_', '.', '-' only."""
    if not _QEMU_NAME.fullmatch(_plain(value)):
        raise Unquotable(f"expected a QEMU name (letters, digits, '_', '.', '-'; no ',' or '='), got {show(value)}")
    return value


def qemu_id(value: Any) -> str:
    if not _QEMU_ID.fullmatch(_plain(value)):
        raise Unquotable(f"expected a QEMU id (a letter, then letters, digits, '_', '.', '-'), got {show(value)}")
    return value


def qemu_value(value: Any) -> str:
    """One property value: a string with its commas doubled, an integer, or a boolean as on/off."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int):
        return str(value)
    return _plain(value).replace(",", ",,")


def qemu_opts(head: str, props: Mapping[str, Any]) -> str:
    """``head,key=value,...`` with ``head`` and every key a QEMU name and every value escaped."""
    return ",".join([qemu_name(head), *(f"{qemu_name(k)}={qemu_value(v)}" for k, v in props.items())])


def qemu_cpu(value: Any) -> str:
    """``-cpu``: a model, then features as ``+flag``, ``-flag`` or ``name=value`` (e.g. host,+vmx)."""
    model, *features = _plain(value).split(",")
    qemu_name(model)
    for feature in features:
        if not _QEMU_FEATURE.fullmatch(feature):
            raise Unquotable(f"expected a CPU model and features ('+flag', '-flag', 'name=value'), "
                             f"got the feature {show(feature)}")
    return value


def qemu_keyvals(value: Any) -> str:
    """A whole option string given in the YAML (e.g. icount 'shift=6,sleep=off'): words and
    key=value pairs from the safe character set, nothing that could need escaping."""
    for part in _plain(value).split(","):
        key, _, val = part.partition("=")
        if not _QEMU_NAME.fullmatch(key) or ("=" in part and not _QEMU_NAME.fullmatch(val)):
            raise Unquotable(f"expected 'key=value' pairs of letters, digits, '_', '.', '-' separated by ',', "
                             f"got {show(value)}")
    return value


def qemu_trace_pattern(value: Any) -> str:
    """A trace event name or glob for ``-trace enable=...`` (a ',' would add e.g. file=...)."""
    if not _QEMU_TRACE.fullmatch(_plain(value)):
        raise Unquotable(f"expected a trace event name or pattern (letters, digits, '_', '*', '?'), got {show(value)}")
    return value


# Options that always open a listening port (or a debugger or display server that does).
_QEMU_LISTEN_OPTIONS = {"-gdb", "-s", "-vnc", "-spice", "-qmp", "-qmp-pretty", "-qtest", "-incoming"}
# Options whose argument is a character device, possibly a listening one.
_QEMU_CHARDEV_OPTIONS = {"-chardev", "-serial", "-parallel", "-monitor", "-debugcon", "-virtioconsole"}
# Options that read more options from somewhere this check cannot see.
_QEMU_OPAQUE_OPTIONS = {"-readconfig", "-set"}
_QEMU_NET_OPTIONS = {"-netdev", "-nic", "-net"}
_LISTENING_CHARDEVS = ("tcp:", "telnet:", "tn3270:", "websocket:", "udp:", "unix:")
_LISTENING_BACKENDS = {"socket", "udp", "spicevmc", "spiceport", "websocket"}
_LISTENING_NETDEVS = {"socket", "stream", "dgram", "l2tpv3", "vde", "vhost-user"}


def qemu_listeners(args: Iterable[str]) -> list[str]:
    """The arguments in ``args`` (extra QEMU arguments) that would open a network listener.

    Refusal is by syntax and errs towards refusing: a chardev of a network type, a debugger or
    display server, a migration target, port forwarding, or an option file QEMU would read."""
    found: list[str] = []
    args = list(args)
    for i, arg in enumerate(args):
        option = arg[1:] if arg.startswith("--") else arg
        value = args[i + 1] if i + 1 < len(args) else ""
        if option in _QEMU_LISTEN_OPTIONS and not (option == "-incoming" and value == "defer"):
            found.append(f"{arg} (opens a port or server)")
        elif option in _QEMU_OPAQUE_OPTIONS:
            found.append(f"{arg} (settings this check cannot inspect)")
        elif option in _QEMU_CHARDEV_OPTIONS and _chardev_listens(value):
            found.append(f"{arg} {value} (a network character device)")
        elif option == "-display" and value.split(",")[0].split("=")[0] in ("vnc", "spice-app"):
            found.append(f"{arg} {value} (a VNC or SPICE display)")
        elif option == "-object" and _object_listens(value):
            found.append(f"{arg} {value} (an object with a network socket)")
        elif option in _QEMU_NET_OPTIONS and _netdev_listens(value):
            found.append(f"{arg} {value} (a listening network backend or host forwarding)")
    return found


def _chardev_listens(spec: str) -> bool:
    spec = spec.removeprefix("mon:")
    if spec.startswith("{"):
        return True                                   # JSON: refuse rather than parse
    backend = spec.split(",")[0]
    return spec.startswith(_LISTENING_CHARDEVS) or backend in _LISTENING_BACKENDS


def _object_listens(spec: str) -> bool:
    parts = spec.split(",")
    return spec.startswith("{") or parts[0] in ("x-vfio-user-server", "x-remote-object") \
        or any(p.startswith(("socket.type=inet", "socket.host=", "socket.port=")) for p in parts)


def _netdev_listens(spec: str) -> bool:
    if spec.startswith("{"):
        return True
    parts = spec.split(",")
    return parts[0] in _LISTENING_NETDEVS or any(p.startswith(("hostfwd=", "guestfwd=", "listen="))
                                                 for p in parts)


def qemu_split(spec: str) -> list[str]:
    """The parts of a QEMU option string as QemuOpts reads them: ',' separates, ',,' is a comma."""
    parts, current, i = [], [], 0
    while i < len(spec):
        if spec[i] == ",":
            if spec[i + 1:i + 2] == ",":
                current.append(",")
                i += 2
                continue
            parts.append("".join(current))
            current = []
        else:
            current.append(spec[i])
        i += 1
    return parts + ["".join(current)]


# Options that make QEMU write host files, run host commands or load host code.
_QEMU_FILE_OPTIONS = {"-D", "-pidfile", "-writeconfig", "-hda", "-hdb", "-hdc", "-hdd", "-mtdblock", "-sd",
                      "-pflash", "-blockdev", "-mem-path", "-virtfs", "-fsdev", "-plugin", "-dump-vmstate",
                      "-acpitable"}
_QEMU_WRITING_CHARDEVS = ("file:", "pipe:", "/")
_QEMU_WRITING_BACKENDS = {"file", "pipe", "serial", "tty", "parallel", "parport"}
_QEMU_COMMAND_NETDEVS = {"tap", "bridge"}


def _null_drive(parts: list[str]) -> bool:
    """A -drive on QEMU's null block driver (reads zeroes, discards writes) with no file: it
    touches no host file, so it needs no allow_host_files."""
    return (any(p in ("driver=null-co", "driver=null-aio") for p in parts)
            and not any(p.startswith(("file=", "file.")) for p in parts))


def qemu_host_files(args: Iterable[str]) -> list[str]:
    """The arguments in ``args`` that would make QEMU write a host file outside the run's
    directory, run a host command, load host code or leave the harness' control."""
    found: list[str] = []
    args = list(args)
    for i, arg in enumerate(args):
        option = arg[1:] if arg.startswith("--") else arg
        value = args[i + 1] if i + 1 < len(args) else ""
        parts = qemu_split(value)
        if option == "-daemonize":
            found.append(f"{arg} (QEMU would leave the harness' control)")
        elif option in _QEMU_FILE_OPTIONS:
            found.append(f"{arg} (writes or loads host files)")
        elif option == "-drive" and not any(p in ("readonly=on", "snapshot=on") for p in parts) \
                and not _null_drive(parts):
            found.append(f"{arg} {value} (a writable disk image; add readonly=on or snapshot=on)")
        elif option == "-trace" and any(p.startswith("file=") for p in parts):
            found.append(f"{arg} {value} (a trace file)")
        elif option in _QEMU_CHARDEV_OPTIONS and _chardev_writes(value):
            found.append(f"{arg} {value} (a character device writing a host file or device)")
        elif option == "-object" and (parts[0] in ("memory-backend-file", "filter-dump")
                                      or any(p.startswith(("file=", "logfile=")) for p in parts)):
            found.append(f"{arg} {value} (an object writing a host file)")
        elif option == "-audiodev" and parts[0] == "wav":
            found.append(f"{arg} {value} (a WAV file)")
        elif option in _QEMU_NET_OPTIONS and (parts[0] in _QEMU_COMMAND_NETDEVS
                                              or any(p.startswith(("smb=", "script=", "downscript=", "helper="))
                                                     for p in parts)):
            found.append(f"{arg} {value} (a network backend running host commands)")
        elif option == "-incoming" and value.startswith(("exec:", "file:")):
            found.append(f"{arg} {value} (runs a command or reads a host file)")
    return found


def _chardev_writes(spec: str) -> bool:
    spec = spec.removeprefix("mon:")
    parts = qemu_split(spec)
    return spec.startswith(_QEMU_WRITING_CHARDEVS) or parts[0] in _QEMU_WRITING_BACKENDS \
        or any(p.startswith("logfile=") for p in parts)


# -- Bochs -----------------------------------------------------------------------------------------

_BOCHS_KEY = re.compile(r"[a-z][a-z0-9_]{0,63}")
_BOCHS_DIRECTIVE = re.compile(r"[a-z][a-z0-9_-]{0,63}")
# Bochs copies each parameter into a 512-byte buffer (BX_PATHNAME_LEN) without a bound check.
_BOCHS_MAX_VALUE = 500


def bochs_key(value: Any) -> str:
    if not _BOCHS_KEY.fullmatch(_plain(value)):
        raise Unquotable(f"expected a bochsrc option name (lower-case letters, digits, '_'), got {show(value)}")
    return value


def bochs_value(value: Any) -> str:
    """One bochsrc parameter value, double-quoted when it holds ',', '#' or blanks."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    text = _plain(value if isinstance(value, str) else str(value))
    for bad, why in (('"', "a double quote (bochsrc cannot escape it)"),
                     ("$", "'$' (Bochs expands $NAME from the environment)")):
        if bad in text:
            raise Unquotable(f"expected a value without {why}, got {show(value)}")
    if ",," in text or text.startswith(",") or text.endswith(","):
        raise Unquotable(f"expected a value without leading, trailing or repeated commas "
                         f"(Bochs drops them even in quotes), got {show(value)}")
    if len(text) > _BOCHS_MAX_VALUE:
        raise Unquotable(f"expected at most {_BOCHS_MAX_VALUE} characters, got {len(text)}")
    return f'"{text}"' if (not text or re.search(r"[,#\s]", text)) else text


def bochs_line(directive: str, params: Mapping[str, Any]) -> str:
    """``directive: key=value, ...`` with every key checked and every value quoted."""
    if not _BOCHS_DIRECTIVE.fullmatch(directive):
        raise Unquotable(f"expected a bochsrc directive, got {show(directive)}")
    return f"{directive}: " + ", ".join(f"{bochs_key(k)}={bochs_value(v)}" for k, v in params.items())


def bochs_rc_line(value: Any) -> str:
    """One line of ``extra_rc`` as given: one directive line, no include, no '$' expansion."""
    text = _plain(value)
    stripped = text.strip()
    if stripped.startswith("#include"):
        raise Unquotable(f"expected a bochsrc line, not an #include (its lines could not be checked), got {show(value)}")
    if "$" in text:
        raise Unquotable(f"expected a line without '$' (Bochs expands $NAME from the environment), got {show(value)}")
    if stripped and not stripped.startswith("#") and not re.match(r"[a-z][a-z0-9_-]*\s*:", stripped):
        raise Unquotable(f"expected a bochsrc line 'directive: options', got {show(value)}")
    return text


# Directives and option values that open a listener in Bochs 2.7: the rfb/vncsrv displays, a
# socket-server serial port, the GDB stub, and every network card (slirp forwards, socket/vnet).
# They are matched on the line as Bochs reads it: without blanks and quotes (Bochs drops both).
_BOCHS_LISTEN = [
    (re.compile(r"^display_library:(rfb|vncsrv)\b"), "a VNC display server"),
    (re.compile(r"^com\d:.*\bmode=(socket-server|pipe-server)\b"), "a serial port server"),
    (re.compile(r"^gdbstub:"), "the GDB stub"),
    (re.compile(r"^(ne2k|pnic|e1000)\d*:"), "a network card"),
]


def _bochs_matches(lines: Iterable[str], table: list[tuple[re.Pattern, str]]) -> list[str]:
    """The lines (as Bochs reads them: no blanks or quotes) that a pattern of ``table`` matches."""
    found = []
    for line in lines:
        as_read = re.sub(r'[\s"]', "", line)
        for rx, what in table:
            if rx.search(as_read):
                found.append(f"{line.strip()!r} ({what})")
                break
    return found


def bochs_listeners(lines: Iterable[str]) -> list[str]:
    """The ``extra_rc`` lines that would open a network listener."""
    return _bochs_matches(lines, _BOCHS_LISTEN)


# Directives that make Bochs write host files (logs, disk and CMOS images written back, serial or
# parallel output to files or host devices) or load host code; matched like _BOCHS_LISTEN.
_BOCHS_FILES = [
    (re.compile(r"^(log|debugger_log):"), "a log file"),
    (re.compile(r"^(ata\d-(master|slave)|floppy[ab]):(?!.*\btype=cdrom\b)"), "a writable disk image"),
    (re.compile(r"^com\d:.*\bmode=(file|raw|term|pipe|pipe-client)\b"), "a serial port writing a host file or device"),
    (re.compile(r"^parport\d:.*\bfile="), "a parallel port writing a host file"),
    (re.compile(r"^usb_\w+:.*\bport\d+=(disk|cdrom|floppy)"), "a USB disk image"),
    (re.compile(r"^(cmosimage|user_plugin|sound):"), "a host file or plugin"),
]


def bochs_host_files(lines: Iterable[str]) -> list[str]:
    """The ``extra_rc`` lines that would make Bochs write host files or load host code."""
    return _bochs_matches(lines, _BOCHS_FILES)


# -- iPXE ------------------------------------------------------------------------------------------

_IPXE_WORD = re.compile(r"[A-Za-z0-9_.,:/=+@%~^!?*()\[\]{}<>-]+")


def ipxe_word(value: Any) -> str:
    """One word of an iPXE command line: iPXE splits on blanks and has no quoting, so a word may
    not hold blanks, '$' (settings expansion ``${...}``), '#', quotes, '\\', ';', '|' or '&'."""
    if not _IPXE_WORD.fullmatch(_plain(value)) or value in ("||", "&&"):
        raise Unquotable(f"expected an iPXE word (no blanks, '$', '#', quotes, '\\', ';', '|', '&'), got {show(value)}")
    return value


def ipxe_words(value: Any) -> str:
    """A command line for an iPXE ``kernel`` line: blank-separated words, each an ``ipxe_word``."""
    words = _plain(value).split()
    for word in words:
        ipxe_word(word)
    return " ".join(words)


def ipxe_url_prefix(value: Any) -> str:
    """The start of the image's URL in the script ('' = relative to the script's own URI)."""
    text = _plain(value)
    return ipxe_word(text) if text else text


# -- GRUB ------------------------------------------------------------------------------------------

def grub_word(value: Any) -> str:
    """One word for GRUB's sh-like script parser: single-quoted, a quote written '\\''."""
    return "'" + _plain(value).replace("'", "'\\''") + "'"


def grub_words(value: Any) -> str:
    """A command line split as sh would (the YAML may quote words), each word quoted for GRUB."""
    try:
        words = shlex.split(_plain(value))
    except ValueError as e:                           # an unbalanced quote
        raise Unquotable(f"expected a command line with balanced quotes ({e}), got {show(value)}") from None
    return " ".join(grub_word(w) for w in words)


def check_escape_hatch(where: str, key: str, section: Mapping[str, Any], listeners: list[str],
                       host_files: list[str]) -> None:
    """Refuse raw options (``key``: extra_args, extra_rc) that open a network listener or reach
    host files, unless ``section`` allows them explicitly."""
    name = key.split(".")[0]
    if listeners and not section["allow_network_listeners"]:
        raise ConfigError(f"{where}: {key}: {listeners[0]} would open a network listener; "
                          f"set {name}.allow_network_listeners: true to allow it")
    if host_files and not section["allow_host_files"]:
        raise ConfigError(f"{where}: {key}: {host_files[0]} reaches outside the run's directory; "
                          f"set {name}.allow_host_files: true to allow it")
