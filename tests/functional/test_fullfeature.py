"""Full feature phase housekeeping: NOP-Out/NOP-In, target pings and timeouts, Text,
Logout, digests."""

import os
import time

import pytest

from tests.functional.conftest import DISK, GOOD
from tests.functional.initiator import (
    CLOSE_CONNECTION, CLOSE_SESSION, NOP_IN, NOP_OUT, REMOVE_FOR_RECOVERY, RESERVED_TAG,
    build_bhs, encode_lun,
)


def test_nop_out_ping_is_echoed(target):
    initiator = target.session()
    before = initiator.exp_stat_sn
    payload = os.urandom(1000)
    rsp = initiator.nop_out(payload, lun=0)
    assert rsp.opcode == NOP_IN and rsp.final
    assert rsp.data == payload
    assert rsp.ttt == RESERVED_TAG
    assert rsp.stat_sn == before  # a NOP-In answer consumes a StatSN
    assert rsp.lun == 0


def test_nop_out_ping_with_odd_length_is_padded_and_echoed(target):
    initiator = target.session()
    assert initiator.nop_out(b"abcde").data == b"abcde"


def test_non_immediate_nop_advances_the_window(target):
    initiator = target.session()
    exp = initiator.exp_cmd_sn
    initiator.nop_out(b"", immediate=False)
    assert initiator.exp_cmd_sn == (exp + 1) & 0xFFFFFFFF


def test_nop_out_without_ping_request_gets_no_answer(target):
    initiator = target.session()
    # ITT 0xffffffff: "no response expected" (RFC 7143 11.18). I must be 1.
    bhs = build_bhs(NOP_OUT, immediate=True, flags=0x80, itt=RESERVED_TAG, lun8=encode_lun(0),
                    words={20: RESERVED_TAG, 24: initiator.cmd_sn, 28: initiator.exp_stat_sn})
    initiator.send_pdu(bhs)
    with pytest.raises(TimeoutError):
        extra = initiator.recv_pdu(timeout=1)
        pytest.fail(f"unexpected answer {extra!r}")
    assert initiator.nop_out(b"after").data == b"after"


def test_target_pings_idle_connection(make_target):
    target = make_target(nop_in_interval=1, timeout=30)
    initiator = target.session()
    ping = initiator.recv_pdu(timeout=4)
    assert ping.opcode == NOP_IN
    assert ping.itt == RESERVED_TAG and ping.ttt != RESERVED_TAG
    assert ping.stat_sn == initiator.exp_stat_sn  # a ping does not consume a StatSN
    initiator.handle(ping)  # answers with the TTT echoed
    time.sleep(1.5)
    assert initiator.nop_out(b"alive").data == b"alive"


def test_unanswered_target_pings_drop_the_connection(make_target):
    target = make_target(nop_in_interval=1, timeout=2)
    initiator = target.session()
    initiator.answer_nop_in = False
    seen = initiator.wait_closed(timeout=10)
    assert any(p.opcode == NOP_IN for p in seen)


def test_answered_pings_keep_the_connection(make_target):
    target = make_target(nop_in_interval=1, timeout=2)
    initiator = target.session()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # wait_for answers each ping as it arrives
        try:
            initiator.wait_for(lambda p: False, timeout=0.5)
        except TimeoutError:
            pass
    assert len(initiator.nop_ins) >= 3
    assert initiator.nop_out(b"ok").data == b"ok"


def test_text_unknown_key_not_understood(target):
    initiator = target.session()
    assert initiator.text([("X-com.example.Thing", "1")]) == [("X-com.example.Thing",
                                                              "NotUnderstood")]


def test_text_send_targets_all_in_normal_session(target):
    initiator = target.session()
    pairs = initiator.text([("SendTargets", "All")])
    # RFC 7143 allows All only in discovery sessions; C istgt answers Reject.
    assert pairs == [("SendTargets", "Reject")] or ("TargetName", DISK) in pairs


def test_logout_close_session(target):
    initiator = target.session()
    rsp = initiator.logout(CLOSE_SESSION)
    assert rsp.final and rsp.response == 0
    assert rsp.stat_sn == initiator.exp_stat_sn - 1 & 0xFFFFFFFF
    initiator.wait_closed()


def test_logout_close_connection(target):
    initiator = target.session()
    rsp = initiator.logout(CLOSE_CONNECTION)
    assert rsp.response == 0
    initiator.wait_closed()


def test_logout_remove_connection_for_recovery_at_erl0(target):
    initiator = target.session()
    rsp = initiator.logout(REMOVE_FOR_RECOVERY)
    # RFC 7143 11.15.1: 2 = "connection recovery is not supported" (ERL 0).
    assert rsp.response == 2


def test_logout_close_connection_with_unknown_cid(target):
    initiator = target.session()
    rsp = initiator.logout(CLOSE_CONNECTION, cid=9)
    assert rsp.response == 1  # CID not found
    assert initiator.nop_out(b"still").data == b"still"


def test_logout_then_new_session(target):
    first = target.session()
    first.logout()
    first.wait_closed()
    second = target.session()
    assert second.tur().status == GOOD


@pytest.mark.parametrize("digest", ["Header", "Data", "Header Data"])
def test_digests_protect_data(make_target, digest):
    target = make_target(digest=digest)
    initiator = target.session()
    assert initiator.header_digest == ("Header" in digest)
    assert initiator.data_digest == ("Data" in digest)
    data = os.urandom(300 * 1024)
    assert initiator.write10(0, data).status == GOOD
    assert initiator.read10(0, len(data) // 512).data == data
    assert initiator.nop_out(b"xyz").data == b"xyz"


def test_digest_required_but_refused_by_initiator(make_target):
    target = make_target(digest="Header")
    initiator = target.connect()
    try:
        params = initiator.login(DISK, header_digest="None")
    except Exception as failure:  # a login reject (0x0200s) or a dropped connection
        assert getattr(getattr(failure, "pdu", None), "status_class", 2) == 2
        return
    assert params.keys["HeaderDigest"] == "Reject"
    pytest.fail("login succeeded although the only acceptable digest was refused")


def test_logout_one_connection_of_a_session_from_another(make_target):
    target = make_target(max_connections=2)
    first = target.session(keys={"MaxConnections": "2"})
    second = target.connect(isid=first.isid)
    second.cmd_sn = first.cmd_sn
    second.login(DISK, tsih=first.tsih, cid=1, keys={"MaxConnections": "2"})
    rsp = first.logout(CLOSE_CONNECTION, cid=1)  # RFC 7143 11.14: close CID 1 from CID 0
    assert rsp.response == 0
    second.wait_closed(timeout=5)
    assert first.nop_out(b"left").data == b"left"
