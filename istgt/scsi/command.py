"""ScsiTask, ITNexus, CDB field helpers and the opcode table type.

The opcode table (one `CommandSpec` per operation code / service action) drives dispatch,
the check of reserved CDB bits, and REPORT SUPPORTED OPERATION CODES.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NamedTuple

from istgt.scsi.constants import Asc, DataDirection, ScsiStatus, SenseKey, TaskAttr
from istgt.scsi.sense import CheckCondition, invalid_field_in_cdb


class ITNexus(NamedTuple):
    """One I_T nexus: initiator port `iqn...,i,0x<isid>`, target port `iqn...,t,0x<tpgt>`."""

    initiator_port: str
    target_port: str
    relative_port_id: int


class ScsiTask:
    """One SCSI command and its outcome.

    In: lun, cdb, nexus, attr, tag, data_out (all Data-Out gathered), transfer_length (EDTL).
    Out: status, sense (no length prefix), data_in (may be longer than EDTL: the transport
    truncates and reports the residual), data_out_length: the Data-Out length the CDB asks
    for (SPDTL), set for commands that take Data-Out so the transport can report write
    residuals against EDTL (None: not decoded).
    """

    __slots__ = (
        "attr",
        "cdb",
        "data_in",
        "data_out",
        "data_out_length",
        "lun",
        "nexus",
        "sense",
        "status",
        "tag",
        "transfer_length",
    )

    def __init__(
        self,
        lun: int,
        cdb: bytes,
        nexus: ITNexus,
        attr: TaskAttr = TaskAttr.SIMPLE,
        tag: int = 0,
        data_out: memoryview | bytes | bytearray | None = None,
        transfer_length: int = 0,
    ) -> None:
        self.lun = lun
        self.cdb = bytes(cdb)
        self.nexus = nexus
        self.attr = attr
        self.tag = tag
        self.data_out = memoryview(data_out) if data_out is not None else None
        self.transfer_length = transfer_length
        self.status: int = ScsiStatus.GOOD
        self.sense: bytes = b""
        self.data_in: bytes | bytearray | memoryview | None = None
        self.data_out_length: int | None = None

    def __repr__(self) -> str:
        return (
            f"ScsiTask(lun={self.lun}, cdb={self.cdb.hex()}, tag={self.tag:#x}, "
            f"status={self.status:#x})"
        )


def cdb_length_for(opcode: int) -> int | None:
    """CDB length implied by the operation code's group (SPC-4 4.2.5.1); None if variable."""
    group = opcode >> 5
    return {0: 6, 1: 10, 2: 10, 4: 16, 5: 12}.get(group)


def u16(cdb: bytes, offset: int) -> int:
    return int.from_bytes(cdb[offset : offset + 2], "big")


def u24(cdb: bytes, offset: int) -> int:
    return int.from_bytes(cdb[offset : offset + 3], "big")


def u32(cdb: bytes, offset: int) -> int:
    return int.from_bytes(cdb[offset : offset + 4], "big")


def u64(cdb: bytes, offset: int) -> int:
    return int.from_bytes(cdb[offset : offset + 8], "big")


Handler = Callable[[Any, ScsiTask], None]


@dataclass(frozen=True)
class CommandSpec:
    """One supported command.

    `usage` is the CDB usage data of REPORT SUPPORTED OPERATION CODES: byte 0 is the opcode,
    every other byte has a 1 for each bit the device server looks at. A CDB with a bit set
    outside that mask is rejected with INVALID FIELD IN CDB pointing at the bit.
    """

    opcode: int
    service_action: int | None
    name: str
    handler: Handler
    direction: DataDirection
    usage: bytes
    medium_access: bool = False  # needs the unit started
    allowed_offline: bool = False

    @property
    def cdb_length(self) -> int:
        return len(self.usage)

    @cached_property
    def reserved_bits(self) -> int:
        """The CDB bits (as one big-endian integer) a command must leave zero. Byte 0 is the
        opcode; for a service-action command the action field was matched by lookup."""
        usage = bytearray(self.usage)
        usage[0] = 0xFF
        if self.service_action is not None:
            usage[1] |= SERVICE_ACTION_MASK
        return ~int.from_bytes(usage, "big") & ((1 << (8 * len(usage))) - 1)


class CommandTable:
    """Lookup from (opcode, service action) to CommandSpec."""

    def __init__(self, specs: list[CommandSpec]) -> None:
        self._by_opcode: dict[int, CommandSpec] = {}
        self._by_service_action: dict[int, dict[int, CommandSpec]] = {}
        for spec in specs:
            if len(spec.usage) != cdb_length_for(spec.opcode) or spec.usage[0] != spec.opcode:
                raise ValueError(f"bad usage data for {spec.name}")
            if spec.service_action is None:
                self._by_opcode[spec.opcode] = spec
            else:
                self._by_service_action.setdefault(spec.opcode, {})[spec.service_action] = spec
        self.specs = tuple(
            sorted(specs, key=lambda s: (s.opcode, -1 if s.service_action is None else s.service_action))
        )

    def has_service_actions(self, opcode: int) -> bool:
        return opcode in self._by_service_action

    def find(self, opcode: int, service_action: int | None = None) -> CommandSpec | None:
        if opcode in self._by_service_action:
            if service_action is None:
                return None
            return self._by_service_action[opcode].get(service_action)
        return self._by_opcode.get(opcode)

    def lookup(self, cdb: bytes) -> CommandSpec:
        """The spec for this CDB, or CheckCondition for an unknown opcode or service action."""
        opcode = cdb[0]
        if opcode in self._by_service_action:
            if len(cdb) < 2:
                raise invalid_field_in_cdb(1)
            spec = self._by_service_action[opcode].get(cdb[1] & 0x1F)
            if spec is None:
                # SPC-4: an unsupported service action is INVALID FIELD IN CDB.
                raise invalid_field_in_cdb(1, 4)
            return spec
        spec = self._by_opcode.get(opcode)
        if spec is None:
            raise CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_COMMAND_OPERATION_CODE)
        return spec


def check_reserved_bits(spec: CommandSpec, cdb: bytes) -> None:
    """Reject a CDB that sets a bit its usage mask does not allow (INVALID FIELD IN CDB)."""
    length = spec.cdb_length
    if len(cdb) < length:
        raise invalid_field_in_cdb(0)
    stray = int.from_bytes(cdb[:length], "big") & spec.reserved_bits
    if stray:
        # The first offending byte from the left, and its highest offending bit.
        byte = length - 1 - (stray.bit_length() - 1) // 8
        bits = cdb[byte] & (spec.reserved_bits >> (8 * (length - 1 - byte))) & 0xFF
        raise invalid_field_in_cdb(byte, bits.bit_length() - 1)


def usage_mask(opcode: int, *fields: tuple[int, int]) -> bytes:
    """Build CDB usage data: `fields` are (byte index, mask) pairs; the length follows the
    opcode group; the control byte allows only the vendor-specific bits (NACA and LINK are
    not supported, so a CDB setting them is rejected)."""
    length = cdb_length_for(opcode)
    if length is None:
        raise ValueError(f"opcode {opcode:#x} has no fixed CDB length")
    data = bytearray(length)
    data[0] = opcode
    data[length - 1] = CONTROL_BYTE_USAGE
    for index, mask in fields:
        data[index] |= mask
    return bytes(data)


SERVICE_ACTION_MASK = 0x1F

# Control byte: vendor-specific bits 7-6 are ignored; NACA (bit 2) and LINK (bit 0) are
# rejected because NormACA and linked commands are not supported.
CONTROL_BYTE_USAGE = 0xC0
