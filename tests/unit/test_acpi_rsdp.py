"""How the payload is told where a UEFI host's RSDP is, without an emulator: the systab lines a
boot method reads, the ``acpi_rsdp`` setting, the GRUB entry that carries it, and the engine's one
RSDP finder.  The end-to-end runs are tests/targets/test_baremetal_uefi.py (OVMF) and
harness/conformance/platform/test_acpi.py (QEMU, command line and caller)."""

from __future__ import annotations

import re
import shlex

import pytest

from harness.errors import ConfigError
from harness.payload.acpi import RSDP_FIND_ASM, dump_scenario
from harness.payload.engine import engine_asm
from harness.payload.image import labels
from harness.targets import config
from harness.targets.baremetal.boot import GrubBoot, rsdp_from_systab

# /sys/firmware/efi/systab of the lab-host stand-in under OVMF 2022.11 (Linux 6.1), as read.
OVMF_SYSTAB = "ACPI20=0x1f77d014\nACPI=0x1f77d000\nSMBIOS=0x1f520000\n"


def test_systab_acpi20_entry_is_preferred():
    assert rsdp_from_systab(OVMF_SYSTAB) == (0x1F77D014, "ACPI20")


def test_systab_acpi_entry_serves_when_there_is_no_acpi20():
    assert rsdp_from_systab("ACPI=0xfe300\nSMBIOS=0xf0000\n") == (0xFE300, "ACPI")


@pytest.mark.parametrize("text", ["", "SMBIOS=0x1f520000\n", "ACPI20=0x0\n", "ACPI20=0x1f77d014; reboot\n",
                                  "ACPI20=1f77d014\n", "ACPI20=0x1f77d014 acpi_rsdp=0x1\n",
                                  "ACPI20=0x11111111111111111\n", " ACPI20=0x1f77d014\n"])
def test_systab_lines_that_are_not_one_hex_address_name_nothing(text):
    """Only a whole line ``ACPI20=0x<hex>`` (or ``ACPI=``) counts: whatever else a file holds
    never reaches a command line."""
    assert rsdp_from_systab(text) is None


def _lab_config(tmp_path, acpi_rsdp: str, method: str = "kexec"):
    text = (config.CONFIG_DIR / "lab-example.yaml").read_text()
    text = re.sub(r"(?m)^    acpi_rsdp:.*\n", "", text)      # the example may set it: ours replaces it
    line = "    sudo: false                    # true: run kexec through 'sudo -n' (non-root login)\n"
    assert line in text
    text = text.replace(line, line + f"    acpi_rsdp: {acpi_rsdp!r}\n")
    path = tmp_path / "t.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("value", ["auto", "off", "0x1f77d014", "0X7FFE0014"])
def test_acpi_rsdp_setting_accepts_auto_off_and_hex(tmp_path, value):
    cfg = config.load(str(_lab_config(tmp_path, value)))
    assert cfg.section["boot"]["acpi_rsdp"] == value


@pytest.mark.parametrize("value", ["", "1f77d014", "0x", "0x1f77d014 quiet", "0x1;reboot", "0x0",
                                   "0x1" + "0" * 16, "yes"])
def test_acpi_rsdp_setting_refuses_anything_else_in_one_line(tmp_path, value):
    path = _lab_config(tmp_path, value)
    with pytest.raises(ConfigError) as e:
        config.load(str(path))
    assert str(e.value).startswith(f"{path}: baremetal.boot.acpi_rsdp: expected 'auto', 'off' or an RSDP address")
    assert "\n" not in str(e.value)


def test_grub_entry_carries_the_rsdp_as_one_quoted_word():
    boot = GrubBoot({"command_line": "quiet 'a b'", "acpi_rsdp": "auto"}, "t", None)
    entry = boot.entry("/vtx payload.elf", 0x1F77D014)
    [line] = [ln.strip() for ln in entry.splitlines() if ln.strip().startswith("multiboot ")]
    assert shlex.split(line) == ["multiboot", "/vtx payload.elf", "quiet", "a b", "acpi_rsdp=0x1f77d014"]
    assert "acpi_rsdp" not in boot.entry("/vtx payload.elf")


def test_engine_has_one_rsdp_finder_and_the_probe_uses_it():
    """One mechanism: the engine carries acpi.py's finder (the BIOS-area search, the command line,
    a named address) once, and its boot probe calls it instead of searching on its own."""
    text = engine_asm(0x1000, 1)
    assert RSDP_FIND_ASM in text
    for label in ("rsdp_scan", "acpi_find_rsdp", "acpi_cmdline_rsdp"):
        assert len(re.findall(rf"^{label}:", text, re.M)) == 1, label
    assert text.count("0xE0000") == 1                      # the BIOS-area search exists once
    probe = text[text.index("\nprobe_acpi:"):text.index("\nparse_dmar:")]
    assert "call acpi_find_rsdp" in probe and "rsdp_scan" not in probe
    assert not labels(dump_scenario().asm[0]) & labels(text), "acpi_dump redefines an engine routine"
