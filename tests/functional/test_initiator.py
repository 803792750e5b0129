"""Self-checks of the test initiator's codec against RFC 7143 vectors, so that a failing
functional test points at the target and not at our own encoding."""

import pytest

from tests.functional.initiator import (
    LOGIN_RSP, Pdu, build_bhs, crc32c, decode_binary, decode_text, encode_lun, encode_text,
    pad4, sn_gt,
)


@pytest.mark.parametrize("data,wire", [
    (bytes(32), "aa36918a"),                      # RFC 7143 B.4: 32 bytes of zeroes
    (b"\xff" * 32, "43aba862"),                   # 32 bytes of ones
    (bytes(range(32)), "4e79dd46"),               # incrementing
    (bytes(range(31, -1, -1)), "5cdb3f11"),       # decrementing
])
def test_crc32c_matches_rfc_examples(data, wire):
    assert crc32c(data).hex() == wire


def test_text_codec_round_trip():
    pairs = [("InitiatorName", "iqn.2024-01.org.example:a"), ("Empty", ""), ("A", "x=y")]
    assert decode_text(encode_text(pairs)) == pairs
    assert encode_text([("K", "v")]) == b"K=v\0"


def test_lun_encoding_single_level():
    assert encode_lun(0) == bytes(8)
    assert encode_lun(5) == bytes([0, 5]) + bytes(6)
    assert encode_lun(300) == bytes([0x41, 0x2C]) + bytes(6)


def test_binary_values():
    assert decode_binary("0x0aFF") == b"\x0a\xff"
    assert decode_binary("0xabc") == b"\x0a\xbc"
    assert decode_binary("0bAQI=") == b"\x01\x02"


def test_serial_number_arithmetic():
    assert sn_gt(1, 0) and not sn_gt(0, 1)
    assert sn_gt(0, 0xFFFFFFFF)  # wraps
    assert not sn_gt(5, 5)


def test_pad4():
    assert [pad4(n) for n in range(6)] == [0, 3, 2, 1, 0, 3]


def test_login_response_fields_by_name():
    bhs = bytearray(build_bhs(LOGIN_RSP, flags=0x87, b2=0, b3=0, data_length=5,
                              lun8=bytes.fromhex("800000000001") + (7).to_bytes(2, "big"),
                              itt=9, words={24: 10, 28: 11, 32: 42}))
    bhs[36], bhs[37] = 2, 1
    pdu = Pdu(bytes(bhs))
    assert (pdu.opcode, pdu.transit, pdu.csg, pdu.nsg) == (LOGIN_RSP, True, 1, 3)
    assert (pdu.isid, pdu.tsih, pdu.itt) == (0x800000000001, 7, 9)
    assert (pdu.stat_sn, pdu.exp_cmd_sn, pdu.max_cmd_sn) == (10, 11, 42)
    assert pdu.status == 0x0201 and pdu.data_segment_length == 5
