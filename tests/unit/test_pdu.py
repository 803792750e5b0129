"""The BHS codec: field layout of responses, LUN encoding, digests, serial arithmetic."""

import struct

import google_crc32c
from hypothesis import given, strategies as st

from istgt.iscsi import pdu as wire


def test_crc32c_known_vector_and_wire_order():
    # RFC 3720 B.4: 32 bytes of zeros -> 0x8a9136aa
    assert wire.crc32c(bytes(32)) == 0x8A9136AA
    assert wire.digest_bytes(0x8A9136AA) == bytes([0xAA, 0x36, 0x91, 0x8A])


def test_crc32c_accepts_writable_buffers():
    data = bytearray(b"abc" * 100)
    assert wire.crc32c(memoryview(data)) == google_crc32c.value(bytes(data))
    assert wire.crc32c(memoryview(data)[10:]) == google_crc32c.value(bytes(data[10:]))


def test_crc32c_extend_equals_one_shot():
    data = bytes(range(200))
    assert wire.crc32c_extend(wire.crc32c(data[:77]), data[77:]) == google_crc32c.value(data)


@given(st.integers(0, 255))
def test_lun_round_trip_peripheral(lun):
    assert wire.decode_lun(wire.encode_lun(lun)) == lun


@given(st.integers(256, 0x3FFF))
def test_lun_round_trip_flat(lun):
    field = wire.encode_lun(lun)
    assert field >> 62 == 1
    assert wire.decode_lun(field) == lun


def test_unsupported_lun_address_method_is_no_lun():
    assert wire.decode_lun(2 << 62) == 0xFFFF
    assert wire.decode_lun(3 << 62 | 5 << 48) == 0xFFFF


def test_scsi_response_layout():
    r = wire.scsi_response(0x11223344, 0x02, b"\x70\x00\x05", residual_flags=0x02, residual=512,
                           exp_data_sn=3)
    wire.stamp(r, 7, 8, 40)
    b = r.bhs
    assert b[0] == 0x21 and b[1] == 0x82 and b[2] == 0 and b[3] == 0x02
    assert int.from_bytes(b[5:8], "big") == 5          # 2-byte sense length + 3 bytes
    assert r.data == b"\x00\x03\x70\x00\x05"
    assert struct.unpack_from(">IIIIII", b, 16) == (0x11223344, 0, 7, 8, 40, 3)
    assert struct.unpack_from(">I", b, 44)[0] == 512
    assert r.ends_command and r.takes_statsn


def test_data_in_with_status_sets_s_and_f():
    r = wire.data_in(5, wire.encode_lun(1), b"abcd", data_sn=2, offset=8192, final=True,
                     status=0, residual_flags=0x02, residual=100)
    assert r.bhs[1] == 0x80 | 0x01 | 0x02
    assert struct.unpack_from(">Q", r.bhs, 8)[0] == 1 << 48
    assert struct.unpack_from(">III", r.bhs, 36) == (2, 8192, 100)
    assert r.takes_statsn


def test_data_in_without_status_does_not_take_statsn():
    r = wire.data_in(5, 0, b"abcd", data_sn=0, offset=0, final=False)
    assert r.bhs[1] == 0 and not r.takes_statsn and not r.ends_command
    assert struct.unpack_from(">I", r.bhs, 20)[0] == wire.RESERVED_TAG


def test_r2t_fields():
    r = wire.r2t(9, 0, ttt=77, r2t_sn=1, offset=65536, length=262144)
    assert r.bhs[0] == 0x31 and r.bhs[1] == 0x80 and not r.takes_statsn
    assert struct.unpack_from(">II", r.bhs, 16) == (9, 77)
    assert struct.unpack_from(">III", r.bhs, 36) == (1, 65536, 262144)


def test_reject_carries_rejected_header_only():
    bhs = bytes(range(48))
    r = wire.reject(wire.RejectReason.PROTOCOL_ERROR, bhs + b"digest")
    assert r.bhs[0] == 0x3F and r.bhs[2] == 0x04
    assert r.data == bhs
    assert struct.unpack_from(">I", r.bhs, 16)[0] == wire.RESERVED_TAG


def test_login_response_echoes_isid_and_sets_stages():
    req = bytearray(48)
    req[0] = 0x43
    req[1] = 0x87          # T=1, CSG=1, NSG=3
    req[8:14] = b"\x80\x01\x02\x03\x04\x05"
    struct.pack_into(">I", req, 16, 0xABCD)
    r = wire.login_response(wire.Pdu(req), True, 1, 3, 0x0102, 0x02, 0x01, b"")
    assert r.bhs[1] == 0x87
    assert r.bhs[8:14] == req[8:14]
    assert struct.unpack_from(">H", r.bhs, 14)[0] == 0x0102
    assert (r.bhs[36], r.bhs[37]) == (2, 1)


def test_logout_response_times():
    r = wire.logout_response(1, 0, time2wait=2, time2retain=20)
    assert struct.unpack_from(">HH", r.bhs, 40) == (2, 20)


def test_request_field_decoding():
    bhs = bytearray(48)
    bhs[0] = 0x41                      # immediate SCSI command
    bhs[1] = 0x80 | 0x40 | 0x02        # F, R, ORDERED
    bhs[5:8] = (300).to_bytes(3, "big")
    struct.pack_into(">QIIII", bhs, 8, 3 << 48, 0x10, 4096, 99, 7)
    bhs[32] = 0x28
    p = wire.Pdu(bhs)
    assert (p.opcode, p.immediate, p.final, p.read_bit, p.write_bit, p.task_attr) == \
        (1, True, True, True, False, 2)
    assert (p.data_length, p.itt, p.expected_length, p.cmdsn, p.exp_statsn) == \
        (300, 0x10, 4096, 99, 7)
    assert wire.decode_lun(p.lun_field) == 3 and p.cdb[0] == 0x28


def test_serial_number_arithmetic_wraps():
    assert wire.sn_lt(0xFFFFFFFF, 0)
    assert not wire.sn_lt(0, 0xFFFFFFFF)
    assert wire.sn_le(5, 5) and wire.sn_lt(5, 6) and not wire.sn_lt(6, 5)
