"""Hostile and broken initiators: the target answers per RFC 7143 or drops the one connection,
never crashes, never allocates what a header merely claims, and keeps serving others."""

import socket
import struct
import threading

import pytest

from tests.functional.conftest import C_TARGET, CHECK_CONDITION, DISK, GOOD, asc_ascq, sense_key
from tests.functional.initiator import (
    DATA_OUT, LOGIN_RSP, LOGOUT_REQ, NOP_OUT, R2T, REJECT, RESERVED_TAG, SCSI_CMD, SCSI_RSP,
    SNACK_REQ, TEXT_REQ, TMF_REQ, ConnectionClosed, build_bhs, crc32c, encode_lun,
)

# Reject reasons (RFC 7143 11.17.1)
DATA_DIGEST_ERROR, PROTOCOL_ERROR, COMMAND_NOT_SUPPORTED, INVALID_PDU_FIELD = 0x02, 0x04, 0x05, 0x09


def assert_target_still_serves(target):
    initiator = target.session()
    assert initiator.nop_out(b"alive").data == b"alive"


def expect_reject(initiator, bhs, reason):
    pdu = initiator.recv_pdu(timeout=5)
    assert pdu.opcode == REJECT, f"expected Reject, got {pdu!r}"
    assert pdu.reason == reason, f"Reject reason {pdu.reason:#x}, expected {reason:#x}"
    assert pdu.itt == RESERVED_TAG and pdu.final
    assert pdu.data[:48] == bhs  # the rejected header comes back (RFC 7143 11.17)
    return pdu


def nop_bhs(initiator, length=0, itt=0x55):
    return build_bhs(NOP_OUT, immediate=True, flags=0x80, data_length=length, itt=itt,
                     words={20: RESERVED_TAG, 24: initiator.cmd_sn, 28: initiator.exp_stat_sn})


def test_logout_before_login(target):
    initiator = target.connect()
    initiator.send_pdu(build_bhs(LOGOUT_REQ, immediate=True, flags=0x80, itt=1,
                                 words={24: 1, 28: 0}))
    try:
        pdu = initiator.recv_pdu(timeout=5)
    except ConnectionClosed:
        pdu = None
    assert_refused_before_login(initiator, pdu)
    assert_target_still_serves(target)


def assert_refused_before_login(initiator, pdu):
    """Only Login is valid before full feature phase (RFC 7143 6.1): a Login reject
    (0x020b "invalid during login") or a Reject (protocol error), then the connection closes;
    or it just closes. C istgt crashed here (bug B1)."""
    if pdu is not None:
        if pdu.opcode == LOGIN_RSP:
            assert pdu.status_class == 2, repr(pdu)
        else:
            assert pdu.opcode == REJECT and pdu.reason == PROTOCOL_ERROR, repr(pdu)
        initiator.wait_closed()


@pytest.mark.parametrize("opcode", [NOP_OUT, SCSI_CMD, DATA_OUT, SNACK_REQ, TEXT_REQ, TMF_REQ])
def test_other_pdus_before_login(target, opcode):
    initiator = target.connect()
    initiator.send_pdu(build_bhs(opcode, immediate=True, flags=0x80, itt=1))
    try:
        pdu = initiator.recv_pdu(timeout=5)
    except ConnectionClosed:
        pdu = None
    assert_refused_before_login(initiator, pdu)
    assert_target_still_serves(target)


def test_short_bhs_then_close(target):
    with socket.create_connection((target.host, target.port)) as sock:
        sock.sendall(bytes([0x43, 0x87]) + bytes(18))
    assert_target_still_serves(target)


def test_garbage_instead_of_login(target):
    initiator = target.connect()
    initiator.send_raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(40))
    initiator.close()
    assert_target_still_serves(target)


def test_login_with_absurd_data_segment_length(target):
    initiator = target.connect()
    bhs = bytearray(build_bhs(0x03, immediate=True, flags=0x87, lun8=initiator.isid + bytes(2)))
    bhs[5:8] = (0xFFFFFF).to_bytes(3, "big")
    initiator.send_raw(bytes(bhs))
    try:
        pdu = initiator.recv_pdu(timeout=5)
        assert pdu.opcode == LOGIN_RSP and pdu.status_class == 2, repr(pdu)
        initiator.wait_closed()
    except ConnectionClosed:
        pass
    assert_target_still_serves(target)


def test_full_feature_absurd_data_segment_length(target):
    initiator = target.session()
    bhs = nop_bhs(initiator, length=0xFFFFFF)
    # Claim 16 MiB - 1 and really send it: the target may reject (after skipping it) or drop.
    sender = threading.Thread(target=_send_quietly,
                              args=(initiator.sock, bhs + bytes(0xFFFFFF + 1)), daemon=True)
    sender.start()
    try:
        expect_reject(initiator, bhs, PROTOCOL_ERROR)
    except ConnectionClosed:
        pass
    else:
        sender.join(10)
        assert initiator.nop_out(b"resync").data == b"resync"
    assert_target_still_serves(target)


def _send_quietly(sock, raw):
    try:
        sock.sendall(raw)
    except OSError:
        pass


def test_unknown_opcode_rejected(target):
    initiator = target.session()
    bhs = build_bhs(0x0B, immediate=True, flags=0x80, itt=0x77,
                    words={24: initiator.cmd_sn, 28: initiator.exp_stat_sn})
    initiator.send_pdu(bhs)
    expect_reject(initiator, bhs, PROTOCOL_ERROR)
    assert initiator.nop_out(b"next").data == b"next"


def test_vendor_opcode_rejected_as_not_supported(target):
    initiator = target.session()
    bhs = build_bhs(0x1C, immediate=True, flags=0x80, itt=0x78,
                    words={24: initiator.cmd_sn, 28: initiator.exp_stat_sn})
    initiator.send_pdu(bhs)
    expect_reject(initiator, bhs, COMMAND_NOT_SUPPORTED)


def test_snack_rejected_at_erl0(target):
    initiator = target.session()
    bhs = build_bhs(SNACK_REQ, flags=0x80, itt=0x79, words={20: RESERVED_TAG,
                                                             28: initiator.exp_stat_sn})
    initiator.send_pdu(bhs)
    expect_reject(initiator, bhs, PROTOCOL_ERROR)
    assert initiator.nop_out(b"next").data == b"next"


def test_login_request_in_full_feature_phase_rejected(target):
    initiator = target.session()
    bhs = build_bhs(0x03, immediate=True, flags=0x87, lun8=initiator.isid + bytes(2), itt=0x7A,
                    words={24: initiator.cmd_sn, 28: initiator.exp_stat_sn})
    initiator.send_pdu(bhs)
    expect_reject(initiator, bhs, PROTOCOL_ERROR)


def test_data_out_for_unknown_task_rejected(target):
    initiator = target.session()
    bhs = build_bhs(DATA_OUT, flags=0x80, data_length=512, itt=0x4242,
                    words={20: 0x1234, 28: initiator.exp_stat_sn, 36: 0, 40: 0})
    initiator.send_pdu(bhs, bytes(512))
    expect_reject(initiator, bhs, INVALID_PDU_FIELD)
    assert initiator.nop_out(b"next").data == b"next"


def test_data_out_with_wrong_ttt_rejected(target):
    initiator = target.session(keys={"ImmediateData": "No"})
    itt = initiator.submit(struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 8, 0), data_out=bytes(4096))
    r2t = initiator.recv_pdu()
    assert r2t.opcode == R2T
    bhs = build_bhs(DATA_OUT, flags=0x80, data_length=4096, itt=itt,
                    words={20: r2t.ttt ^ 0x5A5A, 28: initiator.exp_stat_sn, 36: 0, 40: 0})
    initiator.send_pdu(bhs, bytes(4096))
    expect_reject(initiator, bhs, INVALID_PDU_FIELD)
    initiator.handle(r2t)  # now the right data; the command completes
    assert initiator.collect(itt).status == GOOD


def test_cmd_sn_out_of_window_is_ignored(target):
    initiator = target.session()
    right_sn = initiator.cmd_sn
    initiator.cmd_sn = (initiator.max_cmd_sn + 1000) & 0xFFFFFFFF
    stray = initiator.submit(bytes(6))  # TEST UNIT READY far beyond MaxCmdSN
    with pytest.raises(TimeoutError):
        pdu = initiator.recv_pdu(timeout=1)
        pytest.fail(f"an out-of-window command was answered: {pdu!r}")
    del initiator.tasks[stray]
    initiator.cmd_sn = right_sn
    assert initiator.tur().status == GOOD  # the connection stays usable


def test_cmd_sn_behind_the_window_is_ignored(target):
    initiator = target.session()
    assert initiator.tur().status == GOOD
    right_sn = initiator.cmd_sn
    initiator.cmd_sn = (right_sn - 1) & 0xFFFFFFFF  # a duplicate of an executed command
    stray = initiator.submit(bytes(6))
    with pytest.raises(TimeoutError):
        initiator.recv_pdu(timeout=1)
    del initiator.tasks[stray]
    initiator.cmd_sn = right_sn
    assert initiator.tur().status == GOOD


def test_huge_edtl_write_with_small_cdb(target):
    """EDTL 4 GiB - 1 for a 1-block WRITE: the target must not ask for (or buffer) 4 GiB."""
    initiator = target.session(keys={"ImmediateData": "No"})
    itt = initiator.submit(struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 1, 0), edtl=0xFFFFFFFF,
                           write=True)
    asked = 0
    while True:
        pdu = initiator.recv_pdu(timeout=5)
        if pdu.opcode == R2T:
            asked += pdu.desired_length
            assert asked <= 16 * 1024 * 1024, "target solicits far more than the CDB needs"
            bhs = build_bhs(DATA_OUT, flags=0x80, data_length=pdu.desired_length, itt=itt,
                            words={20: pdu.ttt, 28: initiator.exp_stat_sn, 36: 0,
                                   40: pdu.buffer_offset})
            initiator.send_pdu(bhs, bytes(pdu.desired_length))
            continue
        break
    del initiator.tasks[itt]
    if not C_TARGET:            # ours refuses an EDTL over its write buffer cap at once
        assert asked == 0 and pdu.opcode == SCSI_RSP and pdu.status == CHECK_CONDITION
        assert sense_key(pdu.data[2:]) == 0x5 and asc_ascq(pdu.data[2:]) == (0x24, 0x00)
    if pdu.opcode == REJECT:
        assert pdu.reason in (PROTOCOL_ERROR, INVALID_PDU_FIELD)
    else:
        assert pdu.opcode == SCSI_RSP
        # CHECK CONDITION, or GOOD with the rest reported as a residual underflow.
        if pdu.status == GOOD:
            assert pdu.underflow and pdu.residual == 0xFFFFFFFF - 512
        else:
            assert pdu.status == CHECK_CONDITION
    assert initiator.nop_out(b"ok").data == b"ok"


def test_huge_write_beyond_capacity_is_refused_without_r2t(target):
    initiator = target.session(keys={"ImmediateData": "No"})
    cdb = struct.pack(">BBQIBB", 0x8A, 0, 0, 0x7FFFFF, 0, 0)  # 4 GiB - 512 at LBA 0
    itt = initiator.submit(cdb, edtl=0x7FFFFF * 512, write=True)
    pdu = initiator.recv_pdu(timeout=5)
    del initiator.tasks[itt]
    assert pdu.opcode == SCSI_RSP, f"expected an immediate CHECK CONDITION, got {pdu!r}"
    assert pdu.status == CHECK_CONDITION
    sense = pdu.data[2:]
    # LBA OUT OF RANGE, or INVALID FIELD IN CDB when over the Block Limits maximum transfer.
    assert sense_key(sense) == 0x5 and asc_ascq(sense) in ((0x21, 0x00), (0x24, 0x00))


def test_bidirectional_command_refused(target):
    initiator = target.session()
    bhs = build_bhs(SCSI_CMD, flags=0x80 | 0x40 | 0x20 | 1, itt=0x90, lun8=encode_lun(0),
                    words={20: 512, 24: initiator.cmd_sn, 28: initiator.exp_stat_sn},
                    cdb=bytes(16))
    initiator.cmd_sn += 1
    initiator.send_pdu(bhs)
    try:
        pdu = initiator.recv_pdu(timeout=5)
    except ConnectionClosed:
        assert C_TARGET, "the Python target answers and keeps the connection"
        assert_target_still_serves(target)
        return
    if not C_TARGET:            # ours: CHECK CONDITION, INVALID FIELD IN CDB
        assert pdu.opcode == SCSI_RSP and pdu.status == CHECK_CONDITION
        assert sense_key(pdu.data[2:]) == 0x5 and asc_ascq(pdu.data[2:]) == (0x24, 0x00)
    # Either a Reject or a CHECK CONDITION: never a crash.
    assert pdu.opcode in (REJECT, SCSI_RSP), repr(pdu)
    if pdu.opcode == SCSI_RSP:
        assert pdu.status == CHECK_CONDITION or pdu.response != 0


def test_wrong_header_digest_drops_connection(make_target):
    target = make_target(digest="Header")
    initiator = target.session()
    bhs = nop_bhs(initiator)
    initiator.send_pdu(bhs, header_digest=bytes(4) if crc32c(bhs) != bytes(4) else b"\1\2\3\4")
    initiator.wait_closed(timeout=5)  # ERL 0: a header cannot be trusted, so drop
    assert_target_still_serves(target)


def test_wrong_data_digest_rejected_or_dropped(make_target):
    target = make_target(digest="Header Data")
    initiator = target.session()
    bhs = nop_bhs(initiator, length=8)
    initiator.send_pdu(bhs, b"12345678", data_digest=b"\xde\xad\xbe\xef")
    try:
        pdu = initiator.recv_pdu(timeout=5)
    except ConnectionClosed:
        assert C_TARGET, "the Python target rejects the PDU and keeps the connection"
        assert_target_still_serves(target)
        return
    assert pdu.opcode == REJECT and pdu.reason == DATA_DIGEST_ERROR, repr(pdu)
    assert initiator.nop_out(b"next").data == b"next"


def test_many_connections_dropped_mid_login(target):
    for _ in range(30):
        initiator = target.connect()
        initiator.login_pdu([("InitiatorName", "iqn.2024-01.org.example:drop"),
                             ("SessionType", "Normal"), ("TargetName", DISK),
                             ("AuthMethod", "None")], 0, 1, True)
        initiator.close()
    assert_target_still_serves(target)


def test_data_segment_over_target_mrdsl(target):
    initiator = target.session()
    limit = initiator.target_mrdsl
    bhs = nop_bhs(initiator, length=limit + 512)
    initiator.send_pdu(bhs, bytes(limit + 512))
    try:
        expect_reject(initiator, bhs, PROTOCOL_ERROR)
    except ConnectionClosed:
        assert_target_still_serves(target)
        return
    assert initiator.nop_out(b"next").data == b"next"


def test_data_out_beyond_the_r2t_window_rejected(target):
    initiator = target.session(keys={"ImmediateData": "No"})
    itt = initiator.submit(struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 8, 0), data_out=bytes(4096))
    r2t = initiator.recv_pdu()
    assert r2t.opcode == R2T and r2t.desired_length == 4096
    bhs = build_bhs(DATA_OUT, flags=0x80, data_length=512, itt=itt,
                    words={20: r2t.ttt, 28: initiator.exp_stat_sn, 36: 0, 40: 4096})
    initiator.send_pdu(bhs, bytes(512))  # offset 4096: outside what the R2T asked for
    try:
        expect_reject(initiator, bhs, INVALID_PDU_FIELD)
    except ConnectionClosed:
        return
    initiator.handle(r2t)
    assert initiator.collect(itt).status == GOOD
