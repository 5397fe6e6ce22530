"""Boot methods: kexec over SSH, PXE/iPXE through a boot-server directory, a one-shot GRUB entry.

Each puts the multiboot ELF in front of the host and starts it; the console then carries the
records.  Remote commands are argv lists quoted by the SSH helper; config values never reach a
shell unquoted.

On a UEFI host the payload cannot find the RSDP itself (it is not in the BIOS areas and a multiboot
image gets no EFI system table), so kexec and GRUB read the address the host's Linux found
(/sys/firmware/efi/systab) and name it on the payload's multiboot command line as ``acpi_rsdp=``
(Multiboot 0.6.96, 3.3: ``cmdline``, flags bit 2), which the payload's ``acpi_find_rsdp`` reads.
PXE has no way into the running host; iPXE's EFI build does not boot multiboot images anyway, and
a BIOS host's RSDP is found by the search.
"""

from __future__ import annotations

import os
import re
import shlex
import tempfile
from pathlib import Path
from typing import Any

from ...errors import ConfigError
from ...payload.acpi import CMDLINE_KEY as RSDP_KEY
from ...payload.image import Image
from ..config import Field, absolute_path, command_name, safe_component, show
from ..quoting import config_check, grub_word, grub_words, ipxe_url_prefix, ipxe_word, ipxe_words
from ..ssh import SSH_SCHEMA, SshConnection, SshError, SshSettings
from .common import HostError
from .power import PowerDriver


def _empty_or(check):
    """A Field check that also accepts the empty string (meaning: not set)."""
    def empty_or(value: Any, where: str) -> Any:
        return value if value == "" else check(value, where)
    return empty_or


def _command_line(value: Any, where: str) -> Any:
    """A Field check: a command with arguments, split as sh would (run over SSH as an argv)."""
    try:
        words = shlex.split(value)
    except ValueError as e:
        raise ConfigError(f"{where}: expected a command with balanced quotes ({e}), got {show(value)}") from None
    if not words:
        raise ConfigError(f"{where}: expected a command, got an empty string")
    command_name(words[0], where)
    return value


# Where a UEFI-booted Linux shows the EFI configuration table's ACPI entries: "ACPI20=0x..." is the
# ACPI 2.0 table GUID's (UEFI 2.10, 4.6.1.1: 8868e871-e4f1-11d3-bc22-0080c73c8881), "ACPI=0x..."
# the ACPI 1.0 GUID's (eb9d2d30-2d88-11d3-9a16-0090273fc14d).  A host booted by a legacy BIOS has
# no /sys/firmware/efi: its RSDP is in the BIOS areas the payload searches (ACPI 6.5, 5.2.5.1).
EFI_SYSTAB = "/sys/firmware/efi/systab"
_SYSTAB_LINE = re.compile(r"^(ACPI20|ACPI)=(0x[0-9a-fA-F]{1,16})$")


def rsdp_from_systab(text: str) -> tuple[int, str] | None:
    """(address, entry name) of the RSDP in a systab file: ACPI20 preferred, else ACPI; None if
    it names neither (or only address 0)."""
    found = dict(m.groups() for m in map(_SYSTAB_LINE.match, text.splitlines()) if m)
    for name in ("ACPI20", "ACPI"):
        if name in found and int(found[name], 16):
            return int(found[name], 16), name
    return None


def _rsdp_setting(value: Any, where: str) -> Any:
    """A Field check: "auto", "off" or an RSDP address in hex (0x...)."""
    if value in ("auto", "off"):
        return value
    try:
        address = int(value, 16) if isinstance(value, str) and value.lower().startswith("0x") else -1
    except ValueError:
        address = -1
    if not 0 < address < 1 << 64:
        raise ConfigError(f"{where}: expected 'auto', 'off' or an RSDP address in hex like 0x7ffe0014, "
                          f"got {show(value)}")
    return value


def _names_rsdp(words: list[str]) -> bool:
    return any(w.startswith(RSDP_KEY) for w in words)


ACPI_RSDP_FIELD = Field(
    str, default="auto", check=_rsdp_setting,
    doc="RSDP address for the payload (acpi_rsdp=<hex> on its multiboot command line): 'auto' reads "
        f"{EFI_SYSTAB} on a UEFI host (nothing on a BIOS host), 'off' passes none, or 0x<hex>")


class BootMethod:
    NAME = ""
    SCHEMA: dict[str, Field] = {}
    NEEDS_SSH = False

    def __init__(self, cfg: dict[str, Any], label: str, ssh: SshSettings | None):
        self.cfg, self.label, self.ssh = cfg, label, ssh

    @classmethod
    def check_config(cls, cfg: dict[str, Any], where: str) -> None:
        """Rules across this method's fields, checked at load (``where``: file and key path)."""

    def boot(self, image: Image, power: PowerDriver) -> str:
        """Start ``image`` on the host; return a one-line note for the evidence."""
        raise NotImplementedError

    def disarm(self) -> str | None:
        """After the run: make the next power-on boot the host's own OS again.  Returns a note,
        or None when the method leaves nothing behind (kexec, GRUB's one-shot entry)."""
        return None

    def rsdp(self, c: SshConnection, words: list[str]) -> tuple[int, str] | None:
        """The RSDP address to name on the payload's command line (``words``: the configured
        one's) and where it came from, per ``acpi_rsdp``; None to name none.  On UEFI firmware
        the RSDP is not in the BIOS areas (ACPI 6.5, 5.2.5.1: UEFI systems find it in the EFI
        system table), and a multiboot payload gets no EFI system table, so the address the
        host's Linux found is passed on (Linux's own ``acpi_rsdp=`` parameter)."""
        setting = self.cfg["acpi_rsdp"]
        if setting == "off" or _names_rsdp(words):
            return None
        if setting != "auto":
            return int(setting, 16), "baremetal.boot.acpi_rsdp"
        status, out, _ = c.run(["cat", EFI_SYSTAB], stage="boot", check=False)
        if status != 0:
            return None                                   # not UEFI-booted: the payload searches
        found = rsdp_from_systab(out.decode("ascii", errors="replace"))
        if found is None:
            raise HostError(f"{self.label}: boot: {EFI_SYSTAB} names no ACPI20= or ACPI= address "
                            f"(it holds: {out.decode(errors='replace').strip()[:200] or 'nothing'}); set "
                            "baremetal.boot.acpi_rsdp to the RSDP address or 'off'", stage="boot")
        return found[0], f"{EFI_SYSTAB} {found[1]}"


class KexecBoot(BootMethod):
    """Upload the ELF over SSH, ``kexec -l --type multiboot-x86``, then ``kexec -e`` detached."""

    NAME = "kexec"
    NEEDS_SSH = True
    SCHEMA = {
        "kexec": Field(str, default="kexec", check=command_name, doc="kexec binary on the host"),
        "remote_tmp": Field(str, default="/tmp", check=absolute_path,
                            doc="where the image is uploaded (a private mktemp dir)"),
        "command_line": Field(str, default="", doc="multiboot command line passed to the payload"),
        "sudo": Field(bool, default=False, doc="prefix kexec with 'sudo -n' (when not logging in as root)"),
        "acpi_rsdp": ACPI_RSDP_FIELD,
    }

    def boot(self, image: Image, power: PowerDriver) -> str:
        assert self.ssh is not None
        sudo = ["sudo", "-n"] if self.cfg["sudo"] else []
        with SshConnection(self.ssh, self.label).connect("boot") as c:
            _, out, _ = c.run(["mktemp", "-d", f"{self.cfg['remote_tmp'].rstrip('/')}/vtx-kexec-XXXXXXXX"],
                              stage="boot")
            rdir = out.decode().strip()
            remote = f"{rdir}/payload.elf"
            c.put(image.elf, remote, stage="boot")
            line = self.cfg["command_line"]
            rsdp = self.rsdp(c, line.split())
            if rsdp is not None:                          # a number we format: nothing to escape
                line = f"{line} {RSDP_KEY}{rsdp[0]:#x}".lstrip()
            load = [*sudo, self.cfg["kexec"], "-l", remote, "--type", "multiboot-x86"]
            if line:
                load.append(f"--command-line={line}")     # one argv word: shlex-quoted by c.run
            c.run(load, stage="boot", timeout=60)
            # Detach so that the SSH session ends cleanly before the kernel is replaced.
            execute = shlex.join([*sudo, self.cfg["kexec"], "-e"])
            # No nohup: a minimal host may lack it, and an exec channel without a pty sends no SIGHUP.
            c.run_script(f"sh -c {shlex.quote('sleep 1; ' + execute)} </dev/null >/dev/null 2>&1 &",
                         stage="boot", timeout=15)
        return f"kexec: loaded {remote} as multiboot-x86 and executed{_rsdp_note(rsdp)}"


class PxeBoot(BootMethod):
    """Write the ELF and an iPXE script into the boot server's directory, then power-cycle."""

    NAME = "pxe"
    SCHEMA = {
        "directory": Field(str, required=True, doc="boot server directory (TFTP/HTTP root) for this host"),
        "image_name": Field(str, default="vtx-payload.elf", check=safe_component,
                            doc="file name of the ELF in that directory (a name, not a path)"),
        "script_name": Field(str, default="boot.ipxe", check=safe_component,
                             doc="iPXE script the host chains to (a name, not a path)"),
        "url_prefix": Field(str, default="", check=config_check(ipxe_url_prefix),
                            doc="how the host fetches the directory, e.g. http://boot/lab1/"),
        "command_line": Field(str, default="", check=config_check(ipxe_words),
                              doc="payload command line (iPXE has no quoting: words without blanks, '$', '#')"),
    }

    @classmethod
    def check_config(cls, cfg: dict[str, Any], where: str) -> None:
        if cfg["image_name"] == cfg["script_name"]:
            raise ConfigError(f"{where}image_name: must differ from script_name (disarming rewrites the "
                              f"script and removes the image), both are {show(cfg['image_name'])}")

    def script(self) -> str:
        """The iPXE script that boots the image: every config word checked by quoting.ipxe_*."""
        words = ["kernel", ipxe_word(ipxe_url_prefix(self.cfg["url_prefix"]) + self.cfg["image_name"])]
        if self.cfg["command_line"]:
            words.append(ipxe_words(self.cfg["command_line"]))
        return f"#!ipxe\n# written by the vtx harness for {self.label}\n{' '.join(words)}\nboot\n"

    def _directory(self) -> Path:
        return Path(os.path.expanduser(self.cfg["directory"]))

    def _write(self, name: str, data: bytes) -> None:
        """Write ``name`` in the boot directory as a new file replacing the old one: never through
        a symlink or a stale temporary file that could point elsewhere."""
        d = self._directory()
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".vtx-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, d / safe_component(name, f"{self.label}: boot file"))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def boot(self, image: Image, power: PowerDriver) -> str:
        d = self._directory()
        try:
            d.mkdir(parents=True, exist_ok=True)
            self._write(self.cfg["image_name"], image.elf.read_bytes())
            self._write(self.cfg["script_name"], self.script().encode())
        except OSError as e:
            raise HostError(f"{self.label}: boot: cannot write to boot directory {d}: {e.strerror}",
                            stage="boot") from None
        power.cycle()
        return f"pxe: wrote {d / self.cfg['image_name']} and {self.cfg['script_name']}; power cycled"

    def disarm(self) -> str:
        """Replace the script by one that hands back to the BIOS (its next boot device, the local
        disk) and remove the image: otherwise the restore cycle would boot the payload again.

        Both names are single path components (checked on load and here), so nothing outside the
        boot directory is ever written or removed; a symlink there is replaced or removed itself."""
        d = self._directory()
        try:
            self._write(self.cfg["script_name"], f"#!ipxe\n# written by the vtx harness for {self.label}: "
                                                 "no payload armed, boot the next device\nexit\n".encode())
            (d / safe_component(self.cfg["image_name"], f"{self.label}: boot file")).unlink(missing_ok=True)
        except OSError as e:
            raise HostError(f"{self.label}: restore: cannot disarm the PXE script in {d}: {e.strerror}",
                            stage="restore") from None
        return f"pxe: {self.cfg['script_name']} now exits to the next boot device; image removed"


class GrubBoot(BootMethod):
    """Install the ELF and a ``vtx-payload`` menu entry in /boot/grub/custom.cfg, select it once
    with ``grub-reboot``, check that grubenv now names it, and reboot.

    GRUB reads the ELF from its own view of the disk: where /boot is a partition of its own,
    /boot/vtx-payload.elf is /vtx-payload.elf to GRUB, so the entry uses ``grub-mkrelpath``'s
    answer (as grub-mkconfig does) and finds the filesystem holding it with ``search --file``."""

    NAME = "grub"
    NEEDS_SSH = True
    SCHEMA = {
        "image_path": Field(str, default="/boot/vtx-payload.elf", check=absolute_path,
                            doc="where the ELF is installed on the host"),
        "grub_path": Field(str, default="", check=_empty_or(absolute_path),
                           doc="the ELF's path as GRUB sees it; empty: ask grub_mkrelpath"),
        "custom_cfg": Field(str, default="/boot/grub/custom.cfg", check=absolute_path,
                            doc="GRUB file sourced by 41_custom"),
        "grub_reboot": Field(str, default="grub-reboot", check=_command_line,
                             doc="command (and arguments) that selects the next boot"),
        "grubenv": Field(str, default="/boot/grub/grubenv", check=_empty_or(absolute_path),
                         doc="environment block checked for next_entry after grub_reboot; empty: no check"),
        "grub_editenv": Field(str, default="grub-editenv", check=command_name),
        "grub_mkrelpath": Field(str, default="grub-mkrelpath", check=command_name),
        "command_line": Field(str, default="", check=config_check(grub_words),
                              doc="payload command line, split as sh would (quotes allowed)"),
        "sudo": Field(bool, default=False),
        "acpi_rsdp": ACPI_RSDP_FIELD,
    }
    ENTRY = "vtx-payload"

    def entry(self, grub_path: str, rsdp: int | None = None) -> str:
        """The menu entry; every config-derived or read word is quoted by quoting.grub_word.
        ``rsdp``: the address to pass as ``acpi_rsdp=`` (read from the running host: GRUB itself
        cannot put the firmware's RSDP address into a command line)."""
        q = grub_word(grub_path)
        args = grub_words(self.cfg["command_line"])
        if rsdp is not None:
            args = f"{args} {grub_word(f'{RSDP_KEY}{rsdp:#x}')}".lstrip()
        return (f"menuentry {grub_word(self.ENTRY)} {{\n"
                f"  search --no-floppy --set=root --file {q}\n"
                f"  echo {grub_word(f'vtx: multiboot {grub_path}')}\n"
                f"  multiboot {q}{' ' + args if args else ''}\n"
                f"  boot\n}}\n")

    def boot(self, image: Image, power: PowerDriver) -> str:
        assert self.ssh is not None
        sudo = ["sudo", "-n"] if self.cfg["sudo"] else []
        path = self.cfg["image_path"]
        with SshConnection(self.ssh, self.label).connect("boot") as c:
            _, out, _ = c.run(["mktemp", "/tmp/vtx-grub-XXXXXXXX"], stage="boot")
            staged = out.decode().strip()
            c.put(image.elf, staged, stage="boot")
            # cp + chmod rather than install(1), which busybox-based hosts lack.
            c.run([*sudo, "cp", staged, path], stage="boot")
            c.run([*sudo, "chmod", "0644", path], stage="boot")
            c.run(["rm", "-f", staged], stage="boot", check=False)
            grub_path = self.cfg["grub_path"] or self._relpath(c, path)
            # Read now, from the host's running Linux; the payload uses the address only if an
            # RSDP is there after the reboot (signature and checksum), else it searches.
            rsdp = self.rsdp(c, shlex.split(self.cfg["command_line"]))
            entry = self.entry(grub_path, None if rsdp is None else rsdp[0])
            c.run([*sudo, "tee", self.cfg["custom_cfg"]], stage="boot", stdin=entry.encode())
            c.run([*sudo, *shlex.split(self.cfg["grub_reboot"]), self.ENTRY], stage="boot")
            if self.cfg["grubenv"]:
                self._check_next_entry(c, sudo)
            # No nohup (a minimal host may lack it; an exec channel without a pty sends no SIGHUP).
            try:
                c.run_script(f"sh -c {shlex.quote('sleep 1; ' + shlex.join([*sudo, 'reboot']))} "
                             f"</dev/null >/dev/null 2>&1 &", stage="boot", timeout=15)
            except SshError:
                pass                                       # the connection may drop as it reboots
        return f"grub: one-shot entry {self.ENTRY} -> {path} (GRUB path {grub_path}); rebooted{_rsdp_note(rsdp)}"

    def _relpath(self, c: SshConnection, path: str) -> str:
        status, out, err = c.run([self.cfg["grub_mkrelpath"], path], stage="boot", check=False)
        rel = out.decode().strip()
        if status != 0 or not rel.startswith("/"):
            raise HostError(f"{self.label}: boot: {self.cfg['grub_mkrelpath']} {path} failed "
                            f"(status {status}: {err.decode(errors='replace').strip()[-200:] or '(no stderr)'}); "
                            f"set baremetal.boot.grub_path to the ELF's path as GRUB sees it", stage="boot")
        return rel

    def _check_next_entry(self, c: SshConnection, sudo: list[str]) -> None:
        """grub-reboot exits 0 even when grub-editenv could not write: read the block back."""
        env = self.cfg["grubenv"]
        _, out, _ = c.run([*sudo, self.cfg["grub_editenv"], env, "list"], stage="boot")
        lines = out.decode(errors="replace").splitlines()
        if f"next_entry={self.ENTRY}" not in lines:
            raise HostError(f"{self.label}: boot: after {self.cfg['grub_reboot']} {self.ENTRY}, {env} "
                            f"has no next_entry={self.ENTRY} (it holds: {'; '.join(lines) or 'nothing'})",
                            stage="boot")


def _rsdp_note(rsdp: tuple[int, str] | None) -> str:
    return "" if rsdp is None else f"; {RSDP_KEY}{rsdp[0]:#x} (from {rsdp[1]})"


METHODS: dict[str, type[BootMethod]] = {m.NAME: m for m in (KexecBoot, PxeBoot, GrubBoot)}
__all__ = ["BootMethod", "METHODS", "SSH_SCHEMA"]
