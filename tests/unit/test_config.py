"""Target YAML is validated on load: each problem is one line naming the file, key and expectation."""

import subprocess
import sys
from pathlib import Path

import pytest

from harness.errors import ConfigError
from harness.targets import config

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
        assert config.load(name).name == name


def test_unknown_target_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"--target nosuch: no such target \(known: .*qemu-tcg"):
        config.load("nosuch")


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
