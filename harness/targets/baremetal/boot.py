"""Boot methods: kexec over SSH, PXE/iPXE through a boot-server directory, a one-shot GRUB entry.

Each puts the multiboot ELF in front of the host and starts it; the console then carries the
records.  Remote commands are argv lists quoted by the SSH helper; config values never reach a
shell unquoted.
"""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path
from typing import Any

from ...payload.image import Image
from ..config import Field
from ..ssh import SSH_SCHEMA, SshConnection, SshError, SshSettings
from .common import HostError
from .power import PowerDriver


class BootMethod:
    NAME = ""
    SCHEMA: dict[str, Field] = {}
    NEEDS_SSH = False

    def __init__(self, cfg: dict[str, Any], label: str, ssh: SshSettings | None):
        self.cfg, self.label, self.ssh = cfg, label, ssh

    def boot(self, image: Image, power: PowerDriver) -> str:
        """Start ``image`` on the host; return a one-line note for the evidence."""
        raise NotImplementedError


    def disarm(self) -> str | None:
        """After the run: make the next power-on boot the host's own OS again.  Returns a note,
        or None when the method leaves nothing behind (kexec, GRUB's one-shot entry)."""
        return None


class KexecBoot(BootMethod):
    """Upload the ELF over SSH, ``kexec -l --type multiboot-x86``, then ``kexec -e`` detached."""

    NAME = "kexec"
    NEEDS_SSH = True
    SCHEMA = {
        "kexec": Field(str, default="kexec", doc="kexec binary on the host"),
        "remote_tmp": Field(str, default="/tmp", doc="where the image is uploaded (a private mktemp dir)"),
        "command_line": Field(str, default="", doc="multiboot command line passed to the payload"),
        "sudo": Field(bool, default=False, doc="prefix kexec with 'sudo -n' (when not logging in as root)"),
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
            load = [*sudo, self.cfg["kexec"], "-l", remote, "--type", "multiboot-x86"]
            if self.cfg["command_line"]:
                load.append(f"--command-line={self.cfg['command_line']}")
            c.run(load, stage="boot", timeout=60)
            # Detach so that the SSH session ends cleanly before the kernel is replaced.
            execute = shlex.join([*sudo, self.cfg["kexec"], "-e"])
            # No nohup: a minimal host may lack it, and an exec channel without a pty sends no SIGHUP.
            c.run_script(f"sh -c {shlex.quote('sleep 1; ' + execute)} </dev/null >/dev/null 2>&1 &",
                         stage="boot", timeout=15)
        return f"kexec: loaded {remote} as multiboot-x86 and executed"


class PxeBoot(BootMethod):
    """Write the ELF and an iPXE script into the boot server's directory, then power-cycle."""

    NAME = "pxe"
    SCHEMA = {
        "directory": Field(str, required=True, doc="boot server directory (TFTP/HTTP root) for this host"),
        "image_name": Field(str, default="vtx-payload.elf", doc="file name of the ELF in that directory"),
        "script_name": Field(str, default="boot.ipxe", doc="iPXE script the host chains to"),
        "url_prefix": Field(str, default="", doc="how the host fetches the directory, e.g. http://boot/lab1/"),
        "command_line": Field(str, default=""),
    }

    def boot(self, image: Image, power: PowerDriver) -> str:
        d = Path(os.path.expanduser(self.cfg["directory"]))
        try:
            d.mkdir(parents=True, exist_ok=True)
            tmp = d / f".{self.cfg['image_name']}.tmp"
            shutil.copyfile(image.elf, tmp)
            os.replace(tmp, d / self.cfg["image_name"])
            args = f" {self.cfg['command_line']}" if self.cfg["command_line"] else ""
            script = (f"#!ipxe\n# written by the vtx harness for {self.label}\n"
                      f"kernel {self.cfg['url_prefix']}{self.cfg['image_name']}{args}\nboot\n")
            (d / self.cfg["script_name"]).write_text(script)
        except OSError as e:
            raise HostError(f"{self.label}: boot: cannot write to boot directory {d}: {e.strerror}",
                            stage="boot") from None
        power.cycle()
        return f"pxe: wrote {d / self.cfg['image_name']} and {self.cfg['script_name']}; power cycled"


    def disarm(self) -> str:
        """Replace the script by one that hands back to the BIOS (its next boot device, the local
        disk) and remove the image: otherwise the restore cycle would boot the payload again."""
        d = Path(os.path.expanduser(self.cfg["directory"]))
        try:
            (d / self.cfg["script_name"]).write_text(
                f"#!ipxe\n# written by the vtx harness for {self.label}: no payload armed, boot the next device\nexit\n")
            (d / self.cfg["image_name"]).unlink(missing_ok=True)
        except OSError as e:
            raise HostError(f"{self.label}: restore: cannot disarm the PXE script in {d}: {e.strerror}",
                            stage="restore") from None
        return f"pxe: {self.cfg['script_name']} now exits to the next boot device; image removed"


class GrubBoot(BootMethod):
    """Install the ELF and a ``vtx-payload`` menu entry in /boot/grub/custom.cfg, select it once
    with ``grub-reboot``, and reboot."""

    NAME = "grub"
    NEEDS_SSH = True
    SCHEMA = {
        "image_path": Field(str, default="/boot/vtx-payload.elf", doc="where the ELF is installed on the host"),
        "custom_cfg": Field(str, default="/boot/grub/custom.cfg", doc="GRUB file sourced by 41_custom"),
        "grub_reboot": Field(str, default="grub-reboot"),
        "command_line": Field(str, default=""),
        "sudo": Field(bool, default=False),
    }
    ENTRY = "vtx-payload"

    def boot(self, image: Image, power: PowerDriver) -> str:
        assert self.ssh is not None
        sudo = ["sudo", "-n"] if self.cfg["sudo"] else []
        entry = (f"menuentry '{self.ENTRY}' {{\n  multiboot {self.cfg['image_path']} {self.cfg['command_line']}\n"
                 f"  boot\n}}\n")
        with SshConnection(self.ssh, self.label).connect("boot") as c:
            _, out, _ = c.run(["mktemp", "/tmp/vtx-grub-XXXXXXXX"], stage="boot")
            staged = out.decode().strip()
            c.put(image.elf, staged, stage="boot")
            c.run([*sudo, "install", "-m", "0644", staged, self.cfg["image_path"]], stage="boot")
            c.run([*sudo, "tee", self.cfg["custom_cfg"]], stage="boot", stdin=entry.encode())
            c.run([*sudo, self.cfg["grub_reboot"], self.ENTRY], stage="boot")
            c.run(["rm", "-f", staged], stage="boot", check=False)
            try:
                c.run_script(f"nohup sh -c {shlex.quote('sleep 1; ' + shlex.join([*sudo, 'reboot']))} "
                             f"</dev/null >/dev/null 2>&1 &", stage="boot", timeout=15)
            except SshError:
                pass                                       # the connection may drop as it reboots
        return f"grub: one-shot entry {self.ENTRY} -> {self.cfg['image_path']}; rebooted"


METHODS: dict[str, type[BootMethod]] = {m.NAME: m for m in (KexecBoot, PxeBoot, GrubBoot)}
__all__ = ["BootMethod", "METHODS", "SSH_SCHEMA"]
