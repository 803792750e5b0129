"""PERSISTENT RESERVE IN / OUT as an initiator sends them (SPC-4 6.15, 6.16), for the
functional tests."""

from __future__ import annotations

import struct
from typing import NamedTuple

from tests.functional.conftest import CHECK_CONDITION, GOOD, sense_key

PERSISTENT_RESERVE_IN, PERSISTENT_RESERVE_OUT = 0x5E, 0x5F
RESERVATION_CONFLICT = 0x18
UNIT_ATTENTION = 0x06

READ_KEYS, READ_RESERVATION, READ_FULL_STATUS = 0x00, 0x01, 0x03
REGISTER, RESERVE, RELEASE, CLEAR, PREEMPT = 0x00, 0x01, 0x02, 0x03, 0x04

WRITE_EXCLUSIVE = 0x1
EXCLUSIVE_ACCESS = 0x3
WRITE_EXCLUSIVE_REGISTRANTS_ONLY = 0x5
EXCLUSIVE_ACCESS_REGISTRANTS_ONLY = 0x6
WRITE_EXCLUSIVE_ALL_REGISTRANTS = 0x7
EXCLUSIVE_ACCESS_ALL_REGISTRANTS = 0x8


class Reservation(NamedTuple):
    key: int
    type: int


def pr_out(initiator, action: int, key: int = 0, service_action_key: int = 0,
           pr_type: int = 0, aptpl: bool = False):
    """One PR OUT with the basic 24-byte parameter list (LU scope)."""
    params = struct.pack(">QQ4xB3x", key, service_action_key, 0x01 if aptpl else 0)
    cdb = struct.pack(">BBB2xIB", PERSISTENT_RESERVE_OUT, action, pr_type, len(params), 0)
    return initiator.scsi(cdb, data_out=params)


def register(initiator, key: int, current_key: int = 0, aptpl: bool = False):
    return pr_out(initiator, REGISTER, current_key, key, aptpl=aptpl)


def reserve(initiator, key: int, pr_type: int):
    return pr_out(initiator, RESERVE, key, pr_type=pr_type)


def release(initiator, key: int, pr_type: int):
    return pr_out(initiator, RELEASE, key, pr_type=pr_type)


def clear(initiator, key: int):
    return pr_out(initiator, CLEAR, key)


def preempt(initiator, key: int, victim_key: int, pr_type: int):
    return pr_out(initiator, PREEMPT, key, victim_key, pr_type=pr_type)


def pr_in(initiator, action: int, length: int = 1024):
    cdb = struct.pack(">BB5xHB", PERSISTENT_RESERVE_IN, action, length, 0)
    return initiator.scsi(cdb, read_length=length)


def parse_keys(data: bytes) -> list[int]:
    length = struct.unpack_from(">I", data, 4)[0]
    return [struct.unpack_from(">Q", data, 8 + i)[0] for i in range(0, length, 8)]


def parse_reservation(data: bytes) -> Reservation | None:
    if struct.unpack_from(">I", data, 4)[0] == 0:
        return None
    return Reservation(struct.unpack_from(">Q", data, 8)[0], data[21] & 0x0F)


class Registrant(NamedTuple):
    """One READ FULL STATUS descriptor."""
    key: int
    holder: bool
    type: int               # 0 unless holder
    initiator_port: str     # from the TransportID: "name,i,0x<isid>" or a bare name


def parse_full_status(data: bytes) -> list[Registrant]:
    end = 8 + struct.unpack_from(">I", data, 4)[0]
    registrants, offset = [], 8
    while offset < end:
        key = struct.unpack_from(">Q", data, offset)[0]
        holder, scope_type = bool(data[offset + 12] & 0x01), data[offset + 13]
        length = struct.unpack_from(">I", data, offset + 20)[0]
        transport_id = data[offset + 24 + 4:offset + 24 + length]
        name = transport_id.split(b"\0", 1)[0].decode()
        registrants.append(Registrant(key, holder, scope_type & 0x0F, name))
        offset += 24 + length
    return registrants


def generation(data: bytes) -> int:
    """PRGENERATION of any PR IN reply."""
    return struct.unpack_from(">I", data, 0)[0]


def read_keys(initiator) -> list[int]:
    result = past_unit_attentions(lambda: pr_in(initiator, READ_KEYS))
    assert result.status == GOOD, f"READ KEYS: status {result.status:#x}"
    return parse_keys(result.data)


def read_reservation(initiator) -> Reservation | None:
    result = past_unit_attentions(lambda: pr_in(initiator, READ_RESERVATION))
    assert result.status == GOOD, f"READ RESERVATION: status {result.status:#x}"
    return parse_reservation(result.data)


def past_unit_attentions(command, attempts: int = 4):
    """Run `command()` again while it reports a unit attention (PR changes made by another
    nexus queue them), so a check is not decided by an unrelated pending condition."""
    for _ in range(attempts):
        result = command()
        if not (result.status == CHECK_CONDITION and sense_key(result.sense) == UNIT_ATTENTION):
            return result
    return result
