#!/usr/bin/env python3
"""Build the KVM-runner stand-in: Debian Linux with kvm_intel (nested=1) and QEMU, on a BIOS GRUB
disk that Bochs 2.7 ``corei7_skylake_x`` boots.

Inside Bochs (which models VMX), this Linux gets a real ``/dev/kvm`` with nested VMX, so QEMU/KVM
with ``-cpu host,+vmx``, intel-iommu and edu — the ``qemu-kvm-nested`` target's command line — runs
the payload as a nested VMM, as on an Intel KVM runner.  See README.md for the measured boot path.

Ingredients, all Debian packages (the lab-host recipe's helpers fetch, unpack and pack them:
guest-images/labhost/build.py and grub_disk.py, loaded as modules, nothing copied):
  * linux-image-<abi>-amd64 and busybox-static: ``apt-get download`` into the shared .deb cache;
  * the kvm, kvm_intel and irqbypass modules (order from each module's .modinfo), e1000;
  * a QEMU bundle from this machine's Debian packages: qemu-system-x86_64 with the libraries
    ``ldd`` names, SeaBIOS' bios-256k.bin and the option ROMs QEMU loads for ``-kernel`` with a
    multiboot ELF under KVM (multiboot_dma.bin, linuxboot_dma.bin, kvmvapic.bin);
  * sshd (key-only root login, SFTP) with a fresh host key and client key, as the lab host has;
  * GRUB 2 i386-pc (grub-pc-bin) on an MBR disk with an ext2 /boot, console on ttyS0.

Cached by content under ``<cache>/kvmrunner/<key>`` (the key covers this file, init.sh, the
lab-host recipe files it uses, the package versions and the host binaries and firmware).  Output:
``disk.img`` (what Bochs boots), ``vmlinuz`` and ``initrd.img`` (the same, for QEMU -kernel),
``client_key``, ``ssh_host_ed25519_key.pub`` and ``manifest.json``.  ``python build.py [--force]``
prints the directory and the time taken.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
LABHOST = HERE.parent / "labhost"
RECIPE_VERSION = "1"
BUSYBOX = "busybox-static"
QEMU = "/usr/bin/qemu-system-x86_64"
HOST_BINARIES = ("/usr/sbin/sshd", QEMU)
HOST_PACKAGES = ("qemu-system-x86", "seabios", "openssh-server")
# What QEMU opens for `-machine q35 -kernel <multiboot ELF>` (measured with strace); Debian's QEMU
# looks for firmware in <binary>/../share/qemu and ../share/seabios.
QEMU_FIRMWARE = ("/usr/share/seabios/bios-256k.bin", "/usr/share/qemu/kvmvapic.bin",
                 "/usr/share/qemu/multiboot_dma.bin", "/usr/share/qemu/linuxboot_dma.bin")
# Modules loaded by /init, each after what it depends on, with their parameters.
KVM_MODULES = {"kvm_intel": "nested=1"}
NET_MODULE = "kernel/drivers/net/ethernet/intel/e1000/e1000.ko"    # Bochs' e1000 (82540EM)
# The issue's measured hints: no mitigations or KASLR work, no audit/AppArmor, trust Bochs' TSC.
# clearcpuid=aperfmperf: Bochs' corei7_skylake_x reports APERF/MPERF (CPUID.06H:ECX[0]) without the
# MSRs, and Linux read both on every tick for frequency invariance: two "RDMSR: Unknown register"
# lines in bochs.log each time, 60 MB in a 15-minute tier.
CMDLINE = ("console=ttyS0,115200 quiet mitigations=off nokaslr apparmor=0 audit=0 tsc=reliable "
           "no_timer_check clearcpuid=aperfmperf")
# Bochs' TSC advances once per emulated instruction, so its rate is the configured ips; but the CPU
# model's CPUID leaves 15H/16H say 3.5 GHz, and Linux takes a rate from CPUID as known.  The stand-in's
# clock then ran 70x slow: `sleep 1` took 15.7 s of wall time, QEMU's start 6.6 s, and each of edu's
# 100 ms DMA timers 5-7 s.  tsc_early_khz gives Linux the rate instead, which it then refines against
# the HPET (it keeps the refinement only within 1%, so the value must be right): "Refined TSC
# clocksource calibration: 50.000 MHz" for ips 50000000.
DEFAULT_TSC_KHZ = 50_000


def cmdline(tsc_khz: int) -> str:
    """The kernel's command line for a Bochs that runs ``tsc_khz`` thousand instructions per second."""
    return f"{CMDLINE} tsc_early_khz={tsc_khz}"


# Bochs maps a flat disk as 16 heads x 63 sectors: a size in whole cylinders is all visible.
BOCHS_CYLINDER = 16 * 63 * 512
GRUB_CFG = """\
# grub.cfg of the vtx KVM-runner stand-in (guest-images/kvmrunner/build.py)
serial --unit=0 --speed=115200
terminal_input serial
terminal_output serial
set timeout_style=hidden
set timeout=0
menuentry 'Debian GNU/Linux (vtx KVM-runner stand-in, {abi})' --id kvmrunner {{
  linux /vmlinuz-{abi} {cmdline}
  initrd /initrd.img-{abi}
}}
"""


def _load(name: str, path: Path):
    """A lab-host recipe file as a module (guest-images is not a package); shared names with the
    lab-host tests' loader, so each file is loaded once."""
    mod = sys.modules.get(name)
    if mod is None:
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod                     # dataclasses look their module up by name
        spec.loader.exec_module(mod)
    return mod


lb = _load("labhost_build", LABHOST / "build.py")
grub = _load("labhost_grub_disk", LABHOST / "grub_disk.py")


@dataclass(frozen=True)
class KvmRunnerImage(lb.CachedImage):
    """The stand-in in the cache: the disk Bochs boots and the keys to reach its sshd."""

    @property
    def disk(self) -> Path:
        return self.directory / "disk.img"

    @property
    def kernel(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.img"

    @property
    def manifest(self) -> dict:
        return json.loads((self.directory / "manifest.json").read_text())


def busybox_applets(root: Path) -> tuple[str, ...]:
    """Every applet of the unpacked busybox-static (it is a static amd64 binary: run it here)."""
    out = subprocess.run([str(root / "bin" / "busybox"), "--list"], capture_output=True, text=True,
                         check=True).stdout
    return tuple(a for a in out.split() if a != "busybox")


def missing_inputs() -> list[str]:
    """What this machine lacks to build the stand-in (cheap: no package download, no apt query);
    each entry names the file or tool and the Debian package that provides it."""
    wanted = [(f, "qemu-system-x86 / seabios / openssh-server") for f in HOST_BINARIES + QEMU_FIRMWARE]
    wanted += [(str(grub.GRUB_DIR / "boot.img"), "grub-pc-bin")]
    wanted += [(f, "grub-common") for f in grub.GRUB_HOST_BINARIES + grub.GRUB_HOST_FILES]
    missing = [f"{f} (Debian package {pkg})" for f, pkg in wanted if not Path(f).exists()]
    for tool, pkg in (("apt-get", "apt"), ("mke2fs", "e2fsprogs"), ("dpkg-query", "dpkg"),
                      ("grub-mkimage", "grub-common")):
        if shutil.which(tool) is None:
            missing.append(f"{tool} (Debian package {pkg})")
    return missing


def cache_key(kpkg: str, versions: dict[str, str], tsc_khz: int) -> str:
    h = hashlib.sha256()
    h.update(RECIPE_VERSION.encode())
    for f in (Path(__file__), HERE / "init.sh", LABHOST / "build.py", LABHOST / "grub_disk.py"):
        h.update(f.read_bytes())
    h.update(json.dumps({"kernel": kpkg, "cmdline": cmdline(tsc_khz), "modules": KVM_MODULES, **versions},
                        sort_keys=True).encode())
    for f in HOST_BINARIES + QEMU_FIRMWARE:
        h.update(hashlib.sha256(Path(f).read_bytes()).digest())
    return h.hexdigest()[:24]


def build(force: bool = False, log=print, tsc_khz: int = DEFAULT_TSC_KHZ) -> KvmRunnerImage:
    """Build the stand-in for a Bochs of ``tsc_khz`` thousand instructions per second (or return the
    cached one with the same key)."""
    t0 = time.monotonic()
    kpkg = lb.kernel_package()
    versions = {kpkg: lb.candidate(kpkg), BUSYBOX: lb.candidate(BUSYBOX),
                **{p: grub.installed(p) for p in HOST_PACKAGES + grub.GRUB_HOST_PKGS}}
    key = cache_key(kpkg, versions, tsc_khz)
    final = lb.cache_root("kvmrunner") / key
    if (final / "disk.img").exists() and not force:
        return KvmRunnerImage(final, False, time.monotonic() - t0)
    with lb.building(final, ".build-") as work:
        root = work / "pkgroot"
        lb.unpack_debs(lb.fetch_debs({kpkg: versions[kpkg], BUSYBOX: versions[BUSYBOX]}, log), root)
        abi = kpkg.removeprefix("linux-image-")
        moddir = root / "lib" / "modules" / abi

        c = lb.sshd_initramfs(root, work, "kvmrunner", HOST_BINARIES, busybox_applets(root))
        kvm = grub.module_order(moddir / "kernel", tuple(KVM_MODULES))
        c.dir("lib/modules/kvm")
        for m in kvm:
            c.file(f"lib/modules/kvm/{m.name}", m.read_bytes())
        c.file("lib/modules/kvm/order", "".join(
            f"{m.name} {KVM_MODULES.get(m.name[:-3].replace('-', '_'), '')}".rstrip() + "\n"
            for m in kvm).encode())
        c.file("lib/modules/e1000.ko", (moddir / NET_MODULE).read_bytes())
        for f in QEMU_FIRMWARE:
            c.host_file(f)
        c.file("init", (HERE / "init.sh").read_bytes(), 0o755)
        initrd = gzip.compress(c.finish(), compresslevel=6)
        (work / "ssh_host_ed25519_key").unlink()     # the private host key lives only in the initrd

        boot = work / "boot"
        (boot / "grub").mkdir(parents=True)
        shutil.copy2(root / "boot" / f"vmlinuz-{abi}", boot / f"vmlinuz-{abi}")
        (boot / f"initrd.img-{abi}").write_bytes(initrd)
        (boot / "grub" / "grub.cfg").write_text(GRUB_CFG.format(abi=abi, cmdline=cmdline(tsc_khz)))
        part_bytes = grub.write_disk(boot, work / "disk.img", slack=1 << 20, size_multiple=BOCHS_CYLINDER)
        shutil.copy2(boot / f"vmlinuz-{abi}", work / "vmlinuz")
        (work / "initrd.img").write_bytes(initrd)
        shutil.rmtree(boot)
        shutil.rmtree(root)
        (work / "manifest.json").write_text(json.dumps(
            {"key": key, "kernel": kpkg, "versions": versions, "cmdline": cmdline(tsc_khz),
             "kvm_modules": [m.name for m in kvm], "module_parameters": KVM_MODULES,
             "host_binaries": list(HOST_BINARIES), "firmware": list(QEMU_FIRMWARE),
             "initrd_bytes": len(initrd), "partition_bytes": part_bytes,
             "build_seconds": round(time.monotonic() - t0, 2)}, indent=2) + "\n")
    return KvmRunnerImage(final, True, time.monotonic() - t0)


def main() -> int:
    img = build(force="--force" in sys.argv[1:])
    print(f"{img.directory} ({'built' if img.built_now else 'cached'} in {img.seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
