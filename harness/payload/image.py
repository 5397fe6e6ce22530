"""Scenario → image: GNU as/ld/objcopy build a multiboot ELF32 and, on demand, a BIOS disk image.

Images are cached by the hash of everything that goes into them, so the same scenario always maps
to the same bytes and is built once.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path

from ..errors import BuildError
from . import layout
from .arena import Arena
from .bootsector import SECTOR, boot_asm
from .engine import engine_asm
from .paging import build_identity_map
from .steps import Op, StepList, steps_asm

# Bochs computes a flat disk's geometry as 16 heads x 63 sectors: pad to whole cylinders.
DISK_CYLINDER = 16 * 63 * SECTOR

LINKER_SCRIPT = f"""
ENTRY(entry32)
SECTIONS {{
  . = {layout.IMAGE_BASE:#x};
  .boot : {{ KEEP(*(.multiboot)) *(.text32) }}
  .text : {{ *(.text) *(.text.*) }}
  .rodata : {{ *(.rodata) *(.rodata.*) }}
  .data : {{ *(.data) *(.data.*) }}
  __engine_end = .;
  ASSERT(__engine_end <= {layout.ENGINE_LIMIT:#x}, "engine and steps exceed ENGINE_LIMIT")
  . = {layout.ARENA_BASE:#x};
  .arena : {{ *(.arena) }}
  . = ALIGN(4096);
  __bss_start = .;
  .bss (NOLOAD) : {{ *(.bss) *(COMMON) }}
  . = ALIGN(4096);
  __bss_end = .;
  ASSERT(__bss_end <= {layout.SCRATCH_BASE:#x}, "image overlaps scratch memory")
  /DISCARD/ : {{ *(.note*) *(.comment) *(.eh_frame) }}
}}
"""


@dataclass
class Scenario:
    """What the payload should do: steps, the data arena and any extra assembly routines."""

    name: str = "scenario"
    probe: bool = True
    identity_gib: int = 4
    steps: StepList = field(default_factory=StepList)
    asm: list[str] = field(default_factory=list)
    prior_state: list[str] = field(default_factory=list)   # see engine_asm
    arena: Arena = field(default_factory=lambda: Arena(layout.ARENA_BASE, layout.ARENA_LIMIT))

    def __post_init__(self) -> None:
        self.pml4 = build_identity_map(self.arena, self.identity_gib)

    def source(self, image_id: int) -> str:
        engine = _engine_text(self.pml4, image_id, self.probe, tuple(self.prior_state))
        parts = [engine, steps_asm(self.steps.steps)]
        parts += [".intel_syntax noprefix\n.section .text\n" + a for a in self.asm + self.libraries(engine)]
        parts.append('.section .arena, "aw"\n.incbin "arena.bin"\n')
        return "\n".join(parts)


    def libraries(self, engine: str) -> list[str]:
        """The assembly libraries this scenario needs but does not carry: routines bring their
        code.  A CALL step (or a ``call``/``jmp`` in the scenario's own assembly) naming a routine
        that neither the engine nor the scenario defines pulls in the library that defines it,
        with the libraries that one needs.  A routine nobody defines is a BuildError naming it."""
        have = labels(engine) | {name for a in self.asm for name in labels(a)}
        wanted: list[tuple[str, str]] = []
        for i, step in enumerate(self.steps.steps):
            if step.op == Op.CALL and step.args and isinstance(step.args[0], str):
                wanted.append((step.args[0], f"step {i}"))
        for a in self.asm:
            wanted += [(name, "the scenario's assembly") for name in _CALLS.findall(a)]
        added: list[str] = []
        for name, where in wanted:
            if name in have:
                continue
            lib = library_of(name)
            if lib is None:
                if where.startswith("step"):
                    raise BuildError(f"scenario {self.name!r}: {where} calls {name!r}, which neither the "
                                     f"engine, the scenario's assembly nor a payload library defines "
                                     f"(libraries: {', '.join(m + '.' + a for m, a, _ in LIBRARIES)})")
                continue                           # the linker names it, with a hint (see _run)
            for module, attr in _closure(lib):
                text = getattr(importlib.import_module(module), attr)
                if not labels(text) <= have:
                    added.append(text)
                    have |= labels(text)
        return added


# Assembly libraries (module, attribute, libraries it calls into).  Each defines routines that
# steps call; see Scenario.libraries.
LIBRARIES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("harness.payload.pci", "PCI_MSI_ASM", ()),
    ("harness.payload.vtd", "VTD_ASM", ()),
    ("harness.payload.vtd_reset", "VTD_RESET_ASM", ("harness.payload.vtd.VTD_ASM",)),
    ("harness.payload.vmx.vmm", "VMM_ASM", ()),
)
_LABEL = re.compile(r"^[ \t]*([A-Za-z_][\w]*):", re.M)
_CALLS = re.compile(r"^[ \t]*(?:\d+:)?[ \t]*(?:call|jmp)[ \t]+([A-Za-z_]\w*)[ \t]*(?:#.*)?$", re.M)


@lru_cache(maxsize=256)
def _labels(asm: str) -> frozenset[str]:
    return frozenset(_LABEL.findall(asm))


def labels(asm: str) -> set[str]:
    """The global-looking labels an assembly text defines (not numeric or .L local ones)."""
    return set(_labels(asm))


@lru_cache(maxsize=64)
def _engine_text(pml4: int, image_id: int, probe: bool, prior_state: tuple[str, ...]) -> str:
    """engine_asm, generated once per distinct set of arguments (every run builds its image key
    from the source text, and regenerating the engine cost ~1 ms of each run)."""
    return engine_asm(pml4, image_id, probe, list(prior_state))


@cache
def _library_labels() -> dict[str, tuple[str, str]]:
    out: dict[str, tuple[str, str]] = {}
    for module, attr, _ in LIBRARIES:
        for name in labels(getattr(importlib.import_module(module), attr)):
            out.setdefault(name, (module, attr))
    return out


def library_of(symbol: str) -> tuple[str, str] | None:
    """(module, attribute) of the library that defines ``symbol``."""
    return _library_labels().get(symbol)


def _closure(lib: tuple[str, str]) -> list[tuple[str, str]]:
    """``lib`` preceded by the libraries it needs (depth first, each once)."""
    deps = {(m, a): needs for m, a, needs in LIBRARIES}
    out: list[tuple[str, str]] = []

    def visit(item: tuple[str, str]) -> None:
        for need in deps[item]:
            m, a = need.rsplit(".", 1)
            visit((m, a))
        if item not in out:
            out.append(item)
    visit(lib)
    return out


@dataclass(frozen=True)
class Image:
    """A built payload: the multiboot ELF32, its listing and map, and its identity."""

    key: str
    directory: Path

    @property
    def elf(self) -> Path:
        return self.directory / "payload.elf"

    @property
    def listing(self) -> Path:
        return self.directory / "payload.lst"

    @property
    def image_id(self) -> int:
        return int(self.key[:16], 16)

    def disk(self) -> Path:
        """A BIOS-bootable hard-disk image (built once, next to the ELF)."""
        path = self.directory / "disk.img"
        if not path.exists():
            _atomic_write(path, make_disk_image(self.elf.read_bytes(), self.directory))
        return path

    def copy_to(self, dest: Path) -> None:
        """Place the image and its listing in an evidence directory."""
        for p in (self.elf, self.listing, self.directory / "payload.map"):
            if p.exists():
                shutil.copy2(p, dest / p.name)


def cache_dir() -> Path:
    base = os.environ.get("VTX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vtx")
    return Path(base) / "images"


@cache
def _tool_versions() -> str:
    out = []
    for tool in ("as", "ld", "objcopy"):
        try:
            r = subprocess.run([tool, "--version"], capture_output=True, text=True, check=True)
        except (OSError, subprocess.CalledProcessError) as e:
            raise BuildError(f"GNU binutils tool '{tool}' is not usable ({e}); install binutils") from None
        out.append(r.stdout.splitlines()[0])
    return "\n".join(out)


def build(scenario: Scenario) -> Image:
    """Assemble and link ``scenario`` (or return the cached image with the same content)."""
    arena = scenario.arena.bytes()
    h = hashlib.sha256()
    for part in (_tool_versions(), LINKER_SCRIPT, scenario.source(0)):
        h.update(part.encode())
    h.update(arena)
    key = h.hexdigest()
    final = cache_dir() / key[:32]
    if (final / "payload.elf").exists():
        return Image(key, final)
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=final.parent))
    try:
        (work / "payload.s").write_text(scenario.source(int(key[:16], 16)))
        (work / "arena.bin").write_bytes(arena)
        (work / "link.ld").write_text(LINKER_SCRIPT)
        _run(["as", "--64", "-aln=payload.lst", "-o", "payload.o", "payload.s"], work)
        _run(["ld", "-m", "elf_x86_64", "-T", "link.ld", "-z", "max-page-size=0x1000",
              "--build-id=none", "-Map=payload.map", "-o", "payload64.elf", "payload.o"], work)
        _run(["objcopy", "-O", "elf32-i386", "payload64.elf", "payload.elf"], work)
        for tmp in ("payload.o", "payload64.elf", "arena.bin"):
            (work / tmp).unlink()
        try:
            os.rename(work, final)
        except OSError:          # another process built the same image first
            shutil.rmtree(work, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return Image(key, final)


_UNDEFINED = re.compile(r"undefined reference to [`'\"]([\w.]+)'")


def _run(cmd: list[str], cwd: Path) -> None:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        text = (r.stderr or r.stdout).strip()
        detail = text.splitlines()[:12]
        hints = []
        for name in dict.fromkeys(_UNDEFINED.findall(text)):
            lib = library_of(name)
            hints.append(f"'{name}' is defined by {lib[0]}.{lib[1]}: add it to scenario.asm" if lib else
                         f"'{name}' is defined nowhere: add the assembly that defines it to scenario.asm")
        raise BuildError(f"{cmd[0]} failed in {cwd}:\n" + "\n".join(detail + hints))


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def elf32_segments(elf: bytes) -> tuple[int, list[tuple[int, bytes]]]:
    """Entry point and (physical address, file bytes) of each PT_LOAD of an ELF32 image."""
    if elf[:4] != b"\x7fELF" or elf[4] != 1:
        raise BuildError("not an ELF32 image")
    entry, phoff = struct.unpack_from("<II", elf, 24)
    phentsize, phnum = struct.unpack_from("<HH", elf, 42)
    segs = []
    for i in range(phnum):
        p_type, p_offset, _vaddr, p_paddr, p_filesz = struct.unpack_from("<5I", elf, phoff + i * phentsize)
        if p_type == 1 and p_filesz:
            segs.append((p_paddr, elf[p_offset:p_offset + p_filesz]))
    return entry, segs


def make_disk_image(elf: bytes, workdir: Path) -> bytes:
    """Boot sector + the ELF's loadable segments, padded to whole disk cylinders."""
    entry, segs = elf32_segments(elf)
    table, body, lba = [], bytearray(), 1
    for addr, data in segs:
        sectors = -(-len(data) // SECTOR)
        table.append((lba, sectors, addr))
        body += data + b"\0" * (sectors * SECTOR - len(data))
        lba += sectors
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        t = Path(tmp)
        (t / "boot.s").write_text(boot_asm(entry, table))
        _run(["as", "--32", "-o", "boot.o", "boot.s"], t)
        _run(["ld", "-m", "elf_i386", "-Ttext", "0x7c00", "--oformat", "binary", "-e", "_start",
              "-o", "boot.bin", "boot.o"], t)
        boot = (t / "boot.bin").read_bytes()
    if len(boot) != SECTOR or boot[510:] != b"\x55\xaa":
        raise BuildError(f"boot sector is {len(boot)} bytes, expected {SECTOR} ending in 55 aa")
    disk = boot + bytes(body)
    return disk + b"\0" * (-len(disk) % DISK_CYLINDER)
