"""Logical block provisioning of one Disk LUN (SBC-4 4.7): thin or full, what unmapped
blocks read as, and the physical block size; the fields READ CAPACITY(16) and the Logical
Block Provisioning / Block Limits VPD pages report about them."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

# Transfers and unmaps are best done in page-sized pieces even when the physical block is
# smaller: the optimal granularities are at least this many bytes.
PREFERRED_GRANULARITY_BYTES = 4096

PROVISIONING_FULL = 0x00
PROVISIONING_THIN = 0x02
# VPD B2 byte 5 flags
LBPU, LBPWS, LBPWS10 = 0x80, 0x40, 0x20
LBPRZ_VPD = 0x04
# READ CAPACITY(16) byte 14 flags
LBPME, LBPRZ_RC16 = 0x80, 0x40


class ProvisioningError(ValueError):
    """The configured provisioning cannot be honoured by the backing store."""


@dataclass(frozen=True)
class Provisioning:
    thin: bool
    zeroes_unmapped: bool          # LBPRZ: a deallocated block reads as zeros
    block_length: int
    physical_block_size: int

    @property
    def blocks_per_physical_exponent(self) -> int:
        return (self.physical_block_size // self.block_length).bit_length() - 1

    @property
    def granularity_blocks(self) -> int:
        """Optimal transfer length and unmap granularity: whole physical blocks."""
        return max(PREFERRED_GRANULARITY_BYTES, self.physical_block_size) // self.block_length

    def read_capacity_16_bytes(self) -> bytes:
        """Bytes 13..15: LBPPBE; LBPME, LBPRZ and the lowest aligned LBA (0)."""
        flags = (LBPME | (LBPRZ_RC16 if self.zeroes_unmapped else 0)) if self.thin else 0
        return struct.pack(">BBB", self.blocks_per_physical_exponent, flags, 0)

    def vpd_b2_body(self) -> bytes:
        body = bytearray(4)
        if self.thin:
            body[1] = LBPU | LBPWS | LBPWS10 | (LBPRZ_VPD if self.zeroes_unmapped else 0)
            body[2] = PROVISIONING_THIN
        else:
            body[2] = PROVISIONING_FULL
        return bytes(body)


def _attr(obj: Any, name: str, default: Any) -> Any:
    value = getattr(obj, name, default)
    return default if value is None else value


def decide(lun: Any, backend: Any, block_length: int) -> Provisioning:
    """From the LUN's options (`provisioning`: None, "thin" or "full";
    `physical_block_size`) and what the backend can do (`supports_unmap`,
    `unmap_zeroes`). Thin is the default where the store can deallocate."""
    can_deallocate = bool(getattr(backend, "supports_unmap", False))
    wanted = _attr(lun, "provisioning", None)
    if wanted == "thin" and not can_deallocate:
        raise ProvisioningError(
            f"Provisioning Thin: {getattr(backend, 'path', 'the backing store')} cannot "
            "deallocate blocks (needs a regular file on a file system that punches holes, "
            "or a block device that supports discard)")
    thin = can_deallocate if wanted is None else wanted == "thin"
    physical = int(_attr(lun, "physical_block_size", block_length))
    ratio = physical // block_length
    if physical % block_length or ratio & (ratio - 1) or not 1 <= ratio <= 1 << 15:
        raise ProvisioningError(
            f"PhysicalBlockSize {physical} is not a power-of-two multiple of {block_length}")
    return Provisioning(
        thin=thin,
        zeroes_unmapped=thin and bool(getattr(backend, "unmap_zeroes", True)),
        block_length=block_length,
        physical_block_size=physical,
    )
