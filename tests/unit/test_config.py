"""Target YAML is validated on load: each problem is one line naming the file, key and expectation."""

import subprocess
import sys
from pathlib import Path

import pytest

from harness.errors import ConfigError
from harness.targets import catalog, config

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "t.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text, message", [
    ("name: x\nkind: qemu\nqemu: {accel: tcg, memroy_mb: 64}\n",
     "qemu.memroy_mb: unknown key (expected one of: "),
    ("name: x\nkind: qemu\nqemu: {memory_mb: lots}\n", "qemu.memory_mb: expected an integer, got 'lots'"),
    ("name: x\nkind: qemu\nqemu: {accel: hvf}\n", "qemu.accel: expected one of tcg, kvm, got 'hvf'"),
    ("kind: qemu\nqemu: {}\n", "name: missing (expected a string"),
    ("name: x\nkind: qemu\n", "qemu: missing (expected a mapping"),
    ("name: x\nkind: vmware\nqemu: {}\n", "kind: expected one of "),
    ("name: x\nkind: qemu\nqemu: {iommu: {aw_bits: 52}}\n", "qemu.iommu.aw_bits: expected one of 39, 48, got 52"),
    ("name: x\nkind: qemu\nqemu: {devices: [{driver: edu}, {addr: '0x4.0'}]}\n",
     "qemu.devices[1].driver: missing"),
    ("name: x\nkind: qemu\nqemu: {memory_mb: true}\n", "qemu.memory_mb: expected an integer, got True"),
    ("name: x\nkind: qemu\ntimeout_s: soon\nqemu: {}\n", "timeout_s: expected a number"),
    ("name: [x\n", "line 2: not valid YAML (expected ',' or ']'"),
    ("- just a list\n", "(top level): expected a mapping"),
])
def test_bad_config_is_one_line_naming_file_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        config.load(path)
    assert str(e.value).startswith(f"{path}: ")
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_defaults_are_filled_in(tmp_path):
    c = config.load(write(tmp_path, "name: x\nkind: qemu\nqemu: {}\n"))
    assert c.section["accel"] == "tcg" and c.section["machine"] == "q35" and c.section["iommu"] is None
    assert c.timeout_s == 60.0 and c.deny == ()


def test_every_shipped_target_config_is_valid():
    names = sorted(p.stem for p in config.CONFIG_DIR.glob("*.yaml"))
    assert {"qemu-tcg", "qemu-tcg-vtd", "qemu-kvm-nested"} <= set(names)
    for name in names:
        assert config.load(config.CONFIG_DIR / f"{name}.yaml").name == name
        assert catalog.load_target(name).name == name


def test_unknown_target_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"--vtx-target nosuch: no such target in .*\(known: .*qemu-tcg"):
        catalog.load_target("nosuch")


def test_config_load_takes_files_only_names_resolve_in_the_catalog(tmp_path):
    with pytest.raises(ConfigError, match=r"qemu-tcg: cannot read"):
        config.load("qemu-tcg")


def test_cli_reports_a_bad_target_in_one_line_without_traceback(tmp_path):
    path = write(tmp_path, "name: x\nkind: qemu\nqemu: {cpus: 2}\n")
    r = subprocess.run([sys.executable, "-m", "harness.cli", "probe", "--target", str(path)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"vtx: {path}: qemu.cpus: unknown key (expected one of: "
                                             + r.stderr.split("expected one of: ")[1].strip()]
    assert "Traceback" not in r.stderr


def test_intel_iommu_on_a_machine_other_than_q35_is_refused(tmp_path):
    from harness.targets import open_target
    with pytest.raises(ConfigError, match="qemu.machine: intel-iommu needs q35, got 'pc'"):
        open_target(config.load(write(tmp_path, "name: x\nkind: qemu\nqemu: {machine: pc, iommu: {}}\n")))


# -- shared checks ---------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [0.001, 1, 30.5, 86400])
def test_seconds_accepts_durations_up_to_a_day(value):
    assert config.seconds(value, "--vtx-run-timeout") == float(value)


@pytest.mark.parametrize("value", [0, -1, float("inf"), float("-inf"), float("nan"), 10**26, 86400.5, True, "5", None])
def test_seconds_refuses_everything_else_in_one_line(value):
    with pytest.raises(ConfigError) as e:
        config.seconds(value, "--vtx-run-timeout")
    assert str(e.value).startswith("--vtx-run-timeout: expected a number of seconds in (0, 86400], got ")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["qemu-tcg", "qemu-tcg-vtd+nvme", "lab1.example", "a_b", "X9"])
def test_safe_names_are_single_path_components(name):
    assert config.safe_component(name, "name") == name


@pytest.mark.parametrize("name", ["/tmp/x", "../../x", "..", ".", ".hidden", "-option", "a/b", "a\\b", "", "a b",
                                  "a\n", "x" * 101, "é", None, 5])
def test_unsafe_names_are_refused(name):
    with pytest.raises(ConfigError, match=r"^name: expected a plain file name"):
        config.safe_component(name, "name")


def all_schemas():
    """Every schema a target file can reach: the kinds, their nested sections and every driver."""
    from harness.targets import kinds
    from harness.targets.baremetal import boot, console, lease, power
    out = {"(common)": config.COMMON_SCHEMA}
    out.update({kind: cls.SCHEMA for kind, cls in kinds().items()})
    for registry in (boot.METHODS, console.DRIVERS, lease.BACKENDS, power.DRIVERS):
        out.update({f"{cls.__module__}.{cls.__name__}": cls.SCHEMA for cls in registry.values()})
    return out


def test_every_numeric_field_names_its_bounds():
    unbounded = {name: config.numeric_fields_without_bounds(schema) for name, schema in all_schemas().items()}
    assert {name: keys for name, keys in unbounded.items() if keys} == {}


def test_a_field_without_bounds_is_found():
    schema = {"n": config.Field(int), "ok": config.Field(int, low=0, high=1),
              "sub": config.Field(dict, schema={"t": config.Field(float)})}
    assert config.numeric_fields_without_bounds(schema) == ["n", "sub.t"]


def test_broken_driver_section_is_refused_at_load_not_at_open(tmp_path):
    ipmi_timeout = "    timeout_s: 30                  # bound on one ipmitool call"
    text = (config.CONFIG_DIR / "lab-example.yaml").read_text().replace(ipmi_timeout, "    timeout_s: -30")
    assert "timeout_s: -30" in text
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        config.load(path)
    assert str(e.value) == f"{path}: baremetal.power.timeout_s: expected a number of seconds in (0, 86400], got -30"


def test_unknown_key_with_a_newline_stays_one_line(tmp_path):
    path = write(tmp_path, 'name: x\nkind: qemu\nqemu: {"mem\\nory": 1}\n')
    with pytest.raises(ConfigError) as e:
        config.load(path)
    assert str(e.value).startswith(f"{path}: qemu.'mem\\nory': unknown key") and "\n" not in str(e.value)


def test_file_name_with_a_newline_is_shown_quoted(tmp_path):
    path = tmp_path / "a\nb.yaml"
    path.write_text("name: x\nkind: qemu\nqemu: {memory_mb: 1}\n")
    with pytest.raises(ConfigError) as e:
        config.load(path)
    assert str(e.value) == f"{str(path)!r}: qemu.memory_mb: expected a number in [32, 65536], got 1"


def test_listeners_are_allowed_when_the_file_says_so(tmp_path):
    c = config.load(write(tmp_path, "name: x\nkind: qemu\nqemu: {extra_args: ['-gdb', 'tcp:127.0.0.1:1234'], "
                                    "allow_network_listeners: true}\n"))
    assert c.section["extra_args"] == ["-gdb", "tcp:127.0.0.1:1234"]
    c = config.load(write(tmp_path, "name: x\nkind: bochs\nbochs: {cpu_model: bx_generic, extra_rc: "
                                    "['display_library: rfb'], allow_network_listeners: true}\n"))
    assert c.section["extra_rc"] == ["display_library: rfb"]


def test_host_files_are_allowed_when_the_file_says_so(tmp_path):
    c = config.load(write(tmp_path, "name: x\nkind: qemu\nqemu: {extra_args: ['-D', '/tmp/q.log'], "
                                    "allow_host_files: true}\n"))
    assert c.section["extra_args"] == ["-D", "/tmp/q.log"]
    with pytest.raises(ConfigError, match="allow_network_listeners"):        # one permission is not the other
        config.load(write(tmp_path, "name: x\nkind: qemu\nqemu: {extra_args: ['-gdb', 'tcp::1'], "
                                    "allow_host_files: true}\n"))
