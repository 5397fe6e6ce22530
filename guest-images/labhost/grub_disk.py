#!/usr/bin/env python3
"""Build the GRUB-booted lab host: a BIOS-bootable raw disk with GRUB 2 and an ext2 /boot.

The kexec lab host (build.py) boots with QEMU's -kernel/-initrd; this variant boots like a
Debian machine does: SeaBIOS -> GRUB's MBR boot.img -> core.img (embedded after the MBR) ->
/boot/grub/grub.cfg -> the lab-host kernel and initrd.  Its Linux mounts that partition at /boot
and carries Debian's real grub-reboot (a shell script around grub-editenv), so the bare-metal
target's one-shot ``grub`` boot method runs against real GRUB.

No root, loop devices or mounts are needed:
  * the initrd is build.py's initrd (unchanged, from its cache) followed by a second gzip'd cpio
    archive with the extras (the kernel unpacks both; later files replace earlier ones, so /init
    is replaced by init-grub.sh): the AHCI/SCSI/ext4 modules in dependency order (read from
    each module's .modinfo), grub-editenv, grub-probe, grub-mkrelpath and grub-mkconfig_lib from
    this machine's grub-common, grub-reboot from Debian's grub2-common (``apt-get download``);
  * the /boot partition is ``mke2fs -t ext2 -d <dir>`` on a plain file;
  * core.img is ``grub-mkimage -O i386-pc`` with the modules that read (hd0,msdos1)/grub; the
    MBR is GRUB's boot.img with this disk's partition table.  grub-bios-setup (grub-pc-bin's
    /usr/lib/grub/i386-pc/grub-bios-setup) cannot be used: it insists on opening the block device
    that holds its -d directory, which a container does not have.  The placement it would write
    is the one boot.img and diskboot.img encode by default (core.img at LBA 1, the rest at LBA 2),
    so the MBR needs only the partition table and grub-bios-setup's hard-disk drive-check patch.

Cached by content under ``<cache>/labhost/grub-<key>`` (the key covers this file, init-grub.sh,
the base image's key, package versions and the host GRUB binaries).  The SSH keys are the base
image's (``client_key``, ``ssh_host_ed25519_key.pub`` are copied).  ``python grub_disk.py
[--force]`` prints the directory and the time taken.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECIPE_VERSION = "1"
GRUB_DIR = Path("/usr/lib/grub/i386-pc")
GRUB_REBOOT_PKG = "grub2-common"                 # /usr/sbin/grub-reboot
GRUB_HOST_PKGS = ("grub-pc-bin", "grub-common")  # modules + boot images; grub-mkimage, grub-editenv
GRUB_HOST_BINARIES = ("/usr/bin/grub-editenv", "/usr/sbin/grub-probe", "/usr/bin/grub-mkrelpath")
GRUB_HOST_FILES = ("/usr/share/grub/grub-mkconfig_lib",)
# Roots of the disk stack; their .modinfo "depends=" pull in the rest.  The crypto providers are
# softdeps (ext4/jbd2: crypto-crc32c, crc-t10dif: crct10dif, t10-pi: crc64-rocksoft), named here.
DISK_MODULES = ("crc32c_generic", "crct10dif_generic", "crc64_rocksoft_generic", "ahci", "sd_mod", "ext4")
APPLETS = ("sed", "basename", "dirname", "tee", "cp", "mv", "umount", "halt", "cut", "tr", "wc",
           "readlink", "realpath", "od", "sort", "stat", "touch")
# The command line of test_baremetal_labhost's -append: serial console, the IOMMU on.
CMDLINE = "console=ttyS0,115200 intel_iommu=on quiet panic=-1"
PART_START = 2048                                # sectors: the usual 1 MiB gap holds core.img
PART_SLACK = 32 << 20                            # free space on /boot for payload ELFs
SECTOR = 512


def base_builder():
    """build.py as a module (guest-images is not a package); shared with the tests' loader."""
    mod = sys.modules.get("labhost_build")
    if mod is None:
        spec = importlib.util.spec_from_file_location("labhost_build", HERE / "build.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["labhost_build"] = mod          # dataclasses look their module up by name
        spec.loader.exec_module(mod)
    return mod


@dataclass(frozen=True)
class GrubDiskImage(base_builder().CachedImage):
    @property
    def disk(self) -> Path:
        return self.directory / "disk.img"

    @property
    def manifest(self) -> dict:
        return json.loads((self.directory / "manifest.json").read_text())


def installed(pkg: str) -> str:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True)
    if r.returncode != 0 or not r.stdout:
        raise RuntimeError(f"Debian package {pkg} is not installed (tools/setup installs it)")
    return r.stdout


def cache_key(base_key: str, versions: dict[str, str]) -> str:
    h = hashlib.sha256()
    h.update(RECIPE_VERSION.encode())
    h.update(Path(__file__).read_bytes())
    h.update((HERE / "init-grub.sh").read_bytes())
    h.update(json.dumps({"base": base_key, **versions}, sort_keys=True).encode())
    for b in GRUB_HOST_BINARIES + GRUB_HOST_FILES:
        h.update(hashlib.sha256(Path(b).read_bytes()).digest())
    return h.hexdigest()[:24]


def modinfo(path: Path) -> dict[str, list[str]]:
    """The key=value strings of an ELF64 kernel module's .modinfo section."""
    d = path.read_bytes()
    shoff, = struct.unpack_from("<Q", d, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", d, 0x3A)
    secs = [struct.unpack_from("<IIQQQQ", d, shoff + i * shentsize) for i in range(shnum)]
    strtab = secs[shstrndx][4]
    info: dict[str, list[str]] = {}
    for name, _type, _flags, _addr, off, size in secs:
        if d[strtab + name:d.index(b"\0", strtab + name)] == b".modinfo":
            for item in d[off:off + size].split(b"\0"):
                if b"=" in item:
                    k, v = item.decode().split("=", 1)
                    info.setdefault(k, []).append(v)
    return info


def module_order(moddir: Path, roots: tuple[str, ...]) -> list[Path]:
    """``roots`` and their dependencies, each after what it depends on."""
    files = {p.name[:-3].replace("-", "_"): p for p in moddir.rglob("*.ko")}
    order: list[Path] = []
    state: dict[str, str] = {}

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if state.get(name) == "done":
            return
        if state.get(name) == "active":
            raise RuntimeError(f"module dependency cycle at {name}")
        if name not in files:
            raise RuntimeError(f"module {name} not found under {moddir}")
        state[name] = "active"
        for dep in ",".join(modinfo(files[name]).get("depends", [""])).split(","):
            if dep:
                visit(dep)
        state[name] = "done"
        order.append(files[name])

    for r in roots:
        visit(r)
    return order


GRUB_CFG = """\
# grub.cfg of the vtx lab host (written by guest-images/labhost/grub_disk.py).  Where the harness
# relies on it, it acts like Debian's generated file: the console is serial, a next_entry left in
# grubenv by grub-reboot is used for one boot and cleared, and custom.cfg (41_custom) is sourced.
serial --unit=0 --speed=115200
terminal_input serial
terminal_output serial
if [ -s $prefix/grubenv ]; then
  load_env
fi
if [ "${{next_entry}}" ]; then
  set default="${{next_entry}}"
  set next_entry=
  save_env next_entry
else
  set default=0
fi
set timeout_style=hidden
set timeout=0

menuentry 'Debian GNU/Linux (vtx lab host, {abi})' --id labhost-linux {{
  echo 'Loading Linux {abi} ...'
  linux /vmlinuz-{abi} {cmdline}
  echo 'Loading initial ramdisk ...'
  initrd /initrd.img-{abi}
}}

if [ -f ${{config_directory}}/custom.cfg ]; then
  source ${{config_directory}}/custom.cfg
elif [ -z "${{config_directory}}" -a -f $prefix/custom.cfg ]; then
  source $prefix/custom.cfg
fi
"""


def grubenv_block() -> bytes:
    """An empty GRUB environment block: the header padded with '#' to 1024 bytes (no holes,
    so GRUB's save_env can rewrite it in place)."""
    head = b"# GRUB Environment Block\n"
    return head + b"#" * (1024 - len(head))


def mbr(boot_img: bytes, part_start: int, part_sectors: int) -> bytes:
    """GRUB's boot.img with one bootable Linux partition, as grub-bios-setup would write it."""
    m = bytearray(boot_img)
    assert len(m) == SECTOR and m[510:512] == b"\x55\xaa", "unexpected boot.img"
    assert struct.unpack_from("<Q", m, 0x5C)[0] == 1, "boot.img does not load core.img from LBA 1"
    m[0x66:0x68] = b"\x90\x90"        # grub-bios-setup's hard-disk patch: skip the drive-number check
    m[0x1B8:0x1FE] = bytes(0x1FE - 0x1B8)
    chs_max = b"\xfe\xff\xff"         # "use the LBA fields"
    m[0x1BE:0x1CE] = struct.pack("<B3sB3sII", 0x80, chs_max, 0x83, chs_max, part_start, part_sectors)
    return bytes(m)


def write_disk(boot: Path, out: Path, slack: int = PART_SLACK, size_multiple: int = SECTOR) -> int:
    """Write a BIOS GRUB disk to ``out``: MBR (boot.img), core.img in the gap, and one ext2
    partition holding ``boot`` (which must contain grub/grub.cfg; GRUB's i386-pc modules are added
    here) plus ``slack`` free bytes.  The disk's size is a multiple of ``size_multiple`` (Bochs sees
    whole 16x63 cylinders only).  Returns the partition's size."""
    (boot / "grub" / "i386-pc").mkdir(parents=True, exist_ok=True)
    for f in GRUB_DIR.iterdir():
        if f.suffix in (".mod", ".lst"):
            shutil.copy2(f, boot / "grub" / "i386-pc" / f.name)
    used = sum(f.stat().st_size for f in boot.rglob("*") if f.is_file())
    # ext2's own metadata (inode tables, bitmaps, indirect blocks): about 1/16 plus 2 MiB.
    part_bytes = (used + used // 16 + (2 << 20) + slack + (1 << 20) - 1) & ~((1 << 20) - 1)
    part = out.with_name(out.name + ".ext2")
    core = out.with_name(out.name + ".core")
    try:
        subprocess.run(["mke2fs", "-q", "-F", "-t", "ext2", "-L", "boot", "-E", "root_owner=0:0",
                        "-d", str(boot), str(part), f"{part_bytes // 1024}k"],
                       check=True, capture_output=True)
        # core.img reads (hd0,msdos1)/grub; normal.mod and the rest load from there.
        subprocess.run(["grub-mkimage", "-O", "i386-pc", "-d", str(GRUB_DIR), "-o", str(core),
                        "-p", "(hd0,msdos1)/grub", "biosdisk", "part_msdos", "ext2"],
                       check=True, capture_output=True)
        core_bytes = core.read_bytes()
        if 1 + -(-len(core_bytes) // SECTOR) > PART_START:
            raise RuntimeError(f"core.img ({len(core_bytes)} bytes) does not fit before sector {PART_START}")
        end = PART_START * SECTOR + part_bytes
        with open(out, "wb") as d:
            d.write(mbr((GRUB_DIR / "boot.img").read_bytes(), PART_START, part_bytes // SECTOR))
            d.write(core_bytes)
            d.seek(PART_START * SECTOR)
            with open(part, "rb") as p:           # sparse: the partition's free space stays holes
                while chunk := p.read(1 << 16):
                    if chunk.count(0) == len(chunk):
                        d.seek(len(chunk), os.SEEK_CUR)
                    else:
                        d.write(chunk)
            d.truncate(end + -end % size_multiple)
    finally:
        part.unlink(missing_ok=True)
        core.unlink(missing_ok=True)
    return part_bytes


def build(force: bool = False, log=print) -> GrubDiskImage:
    """Build the GRUB disk (or return the cached one with the same key)."""
    t0 = time.monotonic()
    lb = base_builder()
    base = lb.build(log=log)
    base_manifest = json.loads((base.directory / "manifest.json").read_text())
    kpkg = base_manifest["kernel"]
    abi = kpkg.removeprefix("linux-image-")
    versions = {GRUB_REBOOT_PKG: lb.candidate(GRUB_REBOOT_PKG),
                **{p: installed(p) for p in GRUB_HOST_PKGS}}
    key = cache_key(base_manifest["key"], versions)
    final = lb.cache_root() / f"grub-{key}"
    if (final / "disk.img").exists() and not force:
        return GrubDiskImage(final, False, time.monotonic() - t0)
    with lb.building(final, ".build-grub-") as work:
        root = work / "pkgroot"
        lb.unpack_debs(lb.fetch_debs({kpkg: base_manifest["versions"][kpkg],
                                      GRUB_REBOOT_PKG: versions[GRUB_REBOOT_PKG]}, log), root)

        # The second initramfs archive: disk modules, GRUB's user-space tools, the new /init.
        c = lb.Cpio()
        c.dir("boot")
        c.dir("lib/modules/disk")
        mods = module_order(root / "lib" / "modules" / abi / "kernel", DISK_MODULES)
        for m in mods:
            c.file(f"lib/modules/disk/{m.name}", m.read_bytes())
        c.file("lib/modules/disk/order", "".join(f"{m.name}\n" for m in mods).encode())
        for applet in APPLETS:
            c.symlink(f"bin/{applet}", "busybox")
        for b in GRUB_HOST_BINARIES + GRUB_HOST_FILES:
            c.host_file(b)
        for lib in lb.host_libraries(GRUB_HOST_BINARIES):
            c.host_file(lib)
        c.file("usr/sbin/grub-reboot", (root / "usr" / "sbin" / "grub-reboot").read_bytes(), 0o755)
        c.file("init", (HERE / "init-grub.sh").read_bytes(), 0o755)
        initrd = base.initrd.read_bytes() + gzip.compress(c.finish(), compresslevel=1)

        # /boot: kernel, initrd, GRUB's config, environment block and i386-pc modules.
        boot = work / "boot"
        (boot / "grub").mkdir(parents=True)
        shutil.copy2(base.kernel, boot / f"vmlinuz-{abi}")
        (boot / f"initrd.img-{abi}").write_bytes(initrd)
        (boot / "grub" / "grub.cfg").write_text(GRUB_CFG.format(abi=abi, cmdline=CMDLINE))
        (boot / "grub" / "grubenv").write_bytes(grubenv_block())
        part_bytes = write_disk(boot, work / "disk.img")
        shutil.rmtree(boot)
        shutil.rmtree(root)
        for f in ("client_key", "client_key.pub", "ssh_host_ed25519_key.pub"):
            shutil.copy2(base.directory / f, work / f)
        (work / "manifest.json").write_text(json.dumps(
            {"key": key, "base": base_manifest["key"], "kernel": kpkg, "versions": versions,
             "cmdline": CMDLINE, "disk_modules": [m.name for m in mods],
             "partition": {"start_sector": PART_START, "bytes": part_bytes, "fs": "ext2"},
             "build_seconds": round(time.monotonic() - t0, 2)}, indent=2) + "\n")
    return GrubDiskImage(final, True, time.monotonic() - t0)


def main() -> int:
    img = build(force="--force" in sys.argv[1:])
    print(f"{img.directory} ({'built' if img.built_now else 'cached'} in {img.seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
