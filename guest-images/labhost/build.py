#!/usr/bin/env python3
"""Build the "lab host" stand-in: the Debian kernel + an initramfs with busybox, sshd and kexec.

It boots in QEMU with ``-kernel vmlinuz -initrd initrd.img`` (no disk image, no bootloader) and
behaves like a lab machine for the bare-metal target: an SSH server (root, key only) on eth0 and
kexec-tools to load the payload.

Ingredients, all from Debian packages:
  * linux-image-<abi>-amd64 and busybox-static, fetched with ``apt-get download`` (ordinary apt
    client, no root needed for that step) once into ``<cache>/debs`` (``fetch_debs``, shared with
    the other recipes), unpacked with ``dpkg-deb -x``;
  * /usr/sbin/sshd (openssh-server) and /usr/sbin/kexec (kexec-tools) from this machine's installed
    packages, with the shared libraries ``ldd`` names.

The output is cached by content under ``$VTX_CACHE`` or ``~/.cache/vtx/labhost/<key>``: the key
hashes this file, /init, the package versions and the host binaries.  The build writes a fresh SSH
host key and client key into the image directory (``ssh_host_ed25519_key.pub`` is what known_hosts
must hold; ``client_key`` logs in as root).  ``build()`` returns the directory and whether it was
built now; ``python build.py`` prints the directory and the time taken.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
KERNEL_META = "linux-image-amd64"
BUSYBOX = "busybox-static"
HOST_BINARIES = ("/usr/sbin/sshd", "/usr/sbin/kexec")
MODULES = ("kernel/drivers/net/ethernet/intel/e1000/e1000.ko",)
APPLETS = ("sh", "mount", "ip", "insmod", "sleep", "cat", "echo", "ls", "mkdir", "rm", "poweroff",
           "reboot", "dmesg", "sync", "uname", "true", "ps", "kill", "chmod", "mktemp", "test", "[",
           "printf", "head", "grep")
RECIPE_VERSION = "1"


@dataclass(frozen=True)
class CachedImage:
    """A lab-host image in the cache, and the keys to reach the host it boots."""

    directory: Path
    built_now: bool
    seconds: float

    @property
    def host_key_pub(self) -> str:
        return (self.directory / "ssh_host_ed25519_key.pub").read_text().strip()

    @property
    def client_key(self) -> Path:
        return self.directory / "client_key"


@dataclass(frozen=True)
class LabHostImage(CachedImage):
    @property
    def kernel(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.img"


def cache_root(recipe: str = "labhost") -> Path:
    """Where a recipe's images live: ``$VTX_CACHE`` or ``~/.cache/vtx``, then the recipe's name."""
    base = os.environ.get("VTX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vtx")
    return Path(base) / recipe


def _out(argv: list[str]) -> str:
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {r.stderr.strip()[-400:]}")
    return r.stdout


def kernel_package() -> str:
    """The versioned kernel package that linux-image-amd64 currently depends on."""
    for line in _out(["apt-cache", "depends", KERNEL_META]).splitlines():
        line = line.strip()
        if line.startswith("Depends: linux-image-"):
            return line.split()[1]
    raise RuntimeError(f"apt-cache depends {KERNEL_META}: no linux-image dependency (run apt-get update?)")


def candidate(pkg: str) -> str:
    for line in _out(["apt-cache", "policy", pkg]).splitlines():
        if line.strip().startswith("Candidate:"):
            return line.split(":", 1)[1].strip()
    raise RuntimeError(f"apt-cache policy {pkg}: no candidate version")


def fetch_debs(versions: dict[str, str], log=print) -> list[Path]:
    """The .deb files of ``versions`` (package -> candidate version), downloaded once with
    ``apt-get download`` into ``<cache>/debs/<package>/<version>/`` and reused from there."""
    paths = []
    for pkg, version in versions.items():
        final = cache_root("debs") / pkg / version.replace(":", "%3a")
        if not any(final.glob("*.deb")):
            with building(final, ".fetch-") as work:
                log(f"apt-get download {pkg}={version}")
                subprocess.run(["apt-get", "download", "-q", f"{pkg}={version}"], cwd=work, check=True,
                               capture_output=True)
        paths += sorted(final.glob("*.deb"))
    return paths


def unpack_debs(debs: list[Path], root: Path) -> None:
    for deb in debs:
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)


def host_libraries(binaries: tuple[str, ...]) -> list[str]:
    libs: set[str] = set()
    for b in binaries:
        for line in _out(["ldd", b]).splitlines():
            parts = line.split()
            if "=>" in parts and len(parts) >= 3 and parts[2].startswith("/"):
                libs.add(parts[2])
            elif parts and parts[0].startswith("/"):
                libs.add(parts[0])          # the dynamic loader
    return sorted(libs)


def cache_key(kpkg: str, versions: dict[str, str]) -> str:
    h = hashlib.sha256()
    h.update(RECIPE_VERSION.encode())
    h.update(Path(__file__).read_bytes())
    h.update((HERE / "init.sh").read_bytes())
    h.update(json.dumps({"kernel": kpkg, **versions}, sort_keys=True).encode())
    for b in HOST_BINARIES:
        h.update(hashlib.sha256(Path(b).read_bytes()).digest())
    return h.hexdigest()[:24]


class Cpio:
    """A newc cpio archive written in memory (what the kernel unpacks as initramfs)."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1
        self.seen: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", nlink: int = 1) -> None:
        name = name.lstrip("/")
        if name in self.seen:
            return
        self.seen.add(name)
        nb = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08x}" for v in (
            self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(nb), 0))
        self.ino += 1
        self.buf.write(hdr.encode() + nb)
        self.buf.write(b"\0" * (-(110 + len(nb)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str, mode: int = 0o755) -> None:
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            self._entry("/".join(parts[:i]), stat.S_IFDIR | (mode if i == len(parts) else 0o755), nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self.dir(os.path.dirname(name.strip("/")) or ".")
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self.dir(os.path.dirname(name.strip("/")) or ".")
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def host_file(self, path: str) -> None:
        real = os.path.realpath(path)
        mode = os.stat(real).st_mode & 0o777
        self.file(real, Path(real).read_bytes(), mode)
        if real != path:
            self.symlink(path, real)

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, nlink=1)
        self.buf.write(b"\0" * (-self.buf.tell() % 512))
        return self.buf.getvalue()


@contextlib.contextmanager
def building(final: Path, prefix: str):
    """A private work directory beside the cache entry ``final``; it becomes ``final`` when the
    block succeeds (atomically: if another builder published the same key first, theirs stands)
    and is removed when it fails."""
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    try:
        yield work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    try:
        os.rename(work, final)
    except OSError:                     # someone else built the same key first
        shutil.rmtree(work, ignore_errors=True)


SSHD_CONFIG = (
    "Port 22\nHostKey /etc/ssh/ssh_host_ed25519_key\nPermitRootLogin prohibit-password\n"
    "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
    "Subsystem sftp internal-sftp\nAllowTcpForwarding no\nX11Forwarding no\nUseDNS no\n"
    "PrintMotd no\n")


def sshd_initramfs(root: Path, work: Path, label: str, binaries: tuple[str, ...],
                   applets: tuple[str, ...]) -> Cpio:
    """The common initramfs of the recipes' hosts: busybox (from ``root``, an unpacked
    busybox-static) with ``applets``, ``binaries`` from this machine with their libraries, and an
    sshd that lets root in with a key only.  Writes a fresh host key and client key into ``work``
    (the caller removes the private host key once the archive is written)."""
    for name in ("ssh_host_ed25519_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"vtx-{label}-{name}",
                        "-f", str(work / name)], check=True)
    c = Cpio()
    for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "run/sshd", "var/empty", "root/.ssh",
              "etc/ssh", "usr/bin", "usr/sbin", "lib/modules"):
        c.dir(d)
    c.dir("tmp", 0o1777)
    for b in binaries:
        c.host_file(b)
    for lib in host_libraries(binaries):
        c.host_file(lib)
    c.file("bin/busybox", (root / "bin" / "busybox").read_bytes(), 0o755)
    for applet in applets:
        c.symlink(f"bin/{applet}", "busybox")
    c.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nsshd:x:100:65534::/run/sshd:/bin/false\n")
    c.file("etc/group", b"root:x:0:\nnogroup:x:65534:\n")
    c.file("etc/shadow", b"root:*:19000:0:99999:7:::\nsshd:*:19000:0:99999:7:::\n", 0o600)
    c.file("etc/ssh/sshd_config", SSHD_CONFIG.encode())
    c.file("etc/ssh/ssh_host_ed25519_key", (work / "ssh_host_ed25519_key").read_bytes(), 0o600)
    c.file("root/.ssh/authorized_keys", (work / "client_key.pub").read_bytes(), 0o600)
    return c


def build(force: bool = False, log=print) -> LabHostImage:
    """Build the lab-host image (or return the cached one with the same key)."""
    t0 = time.monotonic()
    kpkg = kernel_package()
    versions = {kpkg: candidate(kpkg), BUSYBOX: candidate(BUSYBOX)}
    key = cache_key(kpkg, versions)
    final = cache_root() / key
    if (final / "initrd.img").exists() and not force:
        return LabHostImage(final, False, time.monotonic() - t0)
    with building(final, ".build-") as work:
        root = work / "pkgroot"
        unpack_debs(fetch_debs(versions, log), root)
        abi = kpkg.removeprefix("linux-image-")
        shutil.copy2(root / "boot" / f"vmlinuz-{abi}", work / "vmlinuz")
        c = sshd_initramfs(root, work, "labhost", HOST_BINARIES, APPLETS)
        for m in MODULES:
            c.file(f"lib/modules/{os.path.basename(m)}",
                   (root / "lib" / "modules" / abi / m).read_bytes())
        c.file("init", (HERE / "init.sh").read_bytes(), 0o755)
        with open(work / "initrd.img", "wb") as f:
            f.write(gzip.compress(c.finish(), compresslevel=1))
        shutil.rmtree(root)
        (work / "ssh_host_ed25519_key").unlink()     # the private host key lives only in the initrd
        (work / "manifest.json").write_text(json.dumps(
            {"key": key, "kernel": kpkg, "versions": versions, "host_binaries": list(HOST_BINARIES),
             "build_seconds": round(time.monotonic() - t0, 2)}, indent=2) + "\n")
    return LabHostImage(final, True, time.monotonic() - t0)


def main() -> int:
    img = build(force="--force" in sys.argv[1:])
    print(f"{img.directory} ({'built' if img.built_now else 'cached'} in {img.seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
