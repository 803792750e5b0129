"""The sense encoder: fixed (70h) and descriptor (72h) layouts."""

from __future__ import annotations

from istgt.scsi.constants import Asc, SenseKey
from istgt.scsi.sense import CheckCondition, encode_sense


def test_fixed_sense_minimal():
    sense = encode_sense(SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE)
    assert sense == bytes.fromhex("700005000000000a000000002100000000 00".replace(" ", ""))


def test_fixed_sense_with_information_and_field_pointer():
    sense = encode_sense(
        SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, info=0x01020304, field_pointer=2,
        bit_pointer=5,
    )
    assert sense[0] == 0xF0 and sense[3:7] == b"\x01\x02\x03\x04"
    assert sense[15:18] == bytes([0xCD, 0x00, 0x02])


def test_fixed_sense_parameter_list_pointer_without_bit():
    sense = encode_sense(
        SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_PARAMETER_LIST, field_pointer=300, cd=False
    )
    assert sense[15:18] == bytes([0x80, 0x01, 0x2C])


def test_fixed_sense_drops_information_wider_than_32_bits():
    sense = encode_sense(SenseKey.MEDIUM_ERROR, Asc.UNRECOVERED_READ_ERROR, info=1 << 40)
    assert sense[0] == 0x70 and sense[3:7] == bytes(4)


def test_descriptor_sense_minimal():
    sense = encode_sense(SenseKey.UNIT_ATTENTION, Asc.MODE_PARAMETERS_CHANGED, descriptor=True)
    assert sense == bytes([0x72, 0x06, 0x2A, 0x01, 0, 0, 0, 0])


def test_descriptor_sense_with_information_and_sks():
    sense = encode_sense(
        SenseKey.MISCOMPARE, Asc.MISCOMPARE_DURING_VERIFY, descriptor=True, info=1 << 40,
        field_pointer=7,
    )
    assert sense[:8] == bytes([0x72, 0x0E, 0x1D, 0x00, 0, 0, 0, 20])
    assert sense[8:20] == bytes([0x00, 0x0A, 0x80, 0]) + (1 << 40).to_bytes(8, "big")
    assert sense[20:28] == bytes([0x02, 0x06, 0, 0, 0xC0, 0x00, 0x07, 0])


def test_check_condition_encodes_and_names_itself():
    condition = CheckCondition(SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED)
    assert condition.encode(descriptor=False)[2] == 0x07
    assert condition.encode(descriptor=True)[1] == 0x07
    assert str(condition) == "DATA_PROTECT 27/00 WRITE_PROTECTED"
    assert "0x" in str(CheckCondition(0x0C, 0x9999))
