"""A bump allocator for the data arena: blobs get fixed physical addresses before assembly."""

from __future__ import annotations


class Arena:
    """Collects byte blobs at known physical addresses from ``base`` upward."""

    def __init__(self, base: int, limit: int):
        self.base = base
        self.limit = limit
        self._data = bytearray()
        self.symbols: dict[str, int] = {}

    def alloc(self, size: int, align: int = 8, name: str | None = None) -> int:
        """Reserve ``size`` zeroed bytes aligned to ``align``; return the physical address."""
        if align & (align - 1):
            raise ValueError(f"alignment {align} is not a power of two")
        offset = (len(self._data) + align - 1) & ~(align - 1)
        end = offset + size
        if self.base + end > self.limit:
            raise ValueError(f"arena overflow: {end:#x} bytes needed, {self.limit - self.base:#x} available")
        self._data.extend(b"\0" * (end - len(self._data)))
        addr = self.base + offset
        if name is not None:
            if name in self.symbols:
                raise ValueError(f"arena symbol {name!r} defined twice")
            self.symbols[name] = addr
        return addr

    def place(self, blob: bytes, align: int = 8, name: str | None = None) -> int:
        """Copy ``blob`` into the arena; return its physical address."""
        addr = self.alloc(len(blob), align, name)
        self.write(addr, blob)
        return addr

    def write(self, addr: int, blob: bytes) -> None:
        """Overwrite bytes already allocated (for tables that point at each other)."""
        offset = addr - self.base
        if offset < 0 or offset + len(blob) > len(self._data):
            raise ValueError(f"write at {addr:#x}+{len(blob):#x} is outside the allocated arena")
        self._data[offset:offset + len(blob)] = blob

    def read(self, addr: int, size: int) -> bytes:
        offset = addr - self.base
        return bytes(self._data[offset:offset + size])

    def bytes(self) -> bytes:
        return bytes(self._data)
