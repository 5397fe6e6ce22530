"""The payload's fixed physical memory map.

Python owns every address: the linker script places the engine and the data arena where this
module says, so table builders can compute absolute pointers before anything is assembled.
"""

IMAGE_BASE = 0x0010_0000      # multiboot load address: header, 32-bit stub, engine, steps
ENGINE_LIMIT = 0x0018_0000    # engine code + steps must end below this (checked by the linker)
ARENA_BASE = 0x0018_0000      # Python-built data blobs (page tables, VT-d tables, ...)
ARENA_LIMIT = 0x0080_0000     # arena must end below this; .bss (stack, IDT) follows the arena
SCRATCH_BASE = 0x0100_0000    # free RAM for scenarios (DMA buffers, guest memory): 16 MiB upward

# Disk boot: sectors are read to a low bounce buffer, then copied above 1 MiB (INT 15h AH=87h).
BOUNCE_BUFFER = 0x0001_0000
DISK_CHUNK_SECTORS = 64

# Values the 32-bit entry finds in EAX: multiboot v1 (spec section 3.2) or our own disk loader.
MULTIBOOT_MAGIC = 0x2BAD_B002
DISK_BOOT_MAGIC = 0x4449_534B  # "DISK"

# QEMU isa-debug-exit: a write of n makes QEMU exit with (n << 1) | 1.
DEBUG_EXIT_PORT = 0xF4
EXIT_BASE = 0x10              # the payload writes EXIT_BASE | status, so a clean end is 0x21

LAPIC_BASE = 0xFEE0_0000
COM1 = 0x3F8
