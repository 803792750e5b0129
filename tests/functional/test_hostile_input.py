"""Hostile input, layer by layer, for the classes the other suites leave out (issue 7's list;
doc/SECURITY.md maps every class to its tests). Each input gets the answer RFC 7143 or SPC
names, and the target goes on serving: the same session where the RFC keeps it, and always
a fresh login."""

import struct
import time

import pytest

from tests.functional.conftest import (
    CHAP_SECRET, CHAP_USER, CHAPDISK, CHECK_CONDITION, DISK, GOOD, INITIATOR, asc_ascq, sense_key,
)
from tests.functional.initiator import (
    LOGIN_REQ, LOGIN_RSP, OPERATIONAL, REJECT, RESERVED_TAG, SCSI_CMD, SECURITY, TEXT_REQ,
    TEXT_RSP, TMF_REQ, TMF_RSP, ConnectionClosed, build_bhs, encode_lun, encode_text,
)
from tests.functional.test_negative import (
    INVALID_PDU_FIELD, PROTOCOL_ERROR, assert_target_still_serves, expect_reject,
)

TASK_IN_PROGRESS = 0x07
INITIATOR_ERROR, AUTH_FAILURE, SESSION_TYPE_UNSUPPORTED = 0x0200, 0x0201, 0x0209


def tur_bhs(initiator, itt, ahs_length=0):
    return build_bhs(SCSI_CMD, flags=0x80 | 0x01, ahs_length=ahs_length, itt=itt,
                     words={20: 0, 24: initiator._cmd_sn_for(False), 28: initiator.exp_stat_sn})


# --- PDU layer ------------------------------------------------------------------------------

@pytest.mark.parametrize("ahs", [
    struct.pack(">HBB", 0xFFFF, 1, 0) + bytes(4),      # an extended CDB far past TotalAHSLength
    struct.pack(">HBB", 0, 1, 0),                      # an AHS of no bytes
], ids=["past-the-end", "empty"])
def test_ahs_running_past_its_total_length_is_rejected(target, ahs):
    initiator = target.session()
    itt = initiator.new_itt()
    bhs = tur_bhs(initiator, itt, ahs_length=len(ahs))
    initiator.send_pdu(bhs, b"", ahs=ahs)
    expect_reject(initiator, bhs, INVALID_PDU_FIELD)
    assert initiator.tur().status == GOOD             # its CmdSN slot was given back


def test_a_task_tag_still_in_use_is_rejected_and_the_first_command_completes(target):
    initiator = target.session(keys={"ImmediateData": "No"})
    itt = initiator.submit(struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 1, 0), data_out=b"\x5a" * 512)
    r2t = initiator.recv_pdu(timeout=5)             # the WRITE waits for its Data-Out
    bhs = build_bhs(SCSI_CMD, flags=0x80 | 0x01, itt=itt,
                    words={20: 0, 24: initiator._cmd_sn_for(False), 28: initiator.exp_stat_sn})
    initiator.send_pdu(bhs, b"")
    expect_reject(initiator, bhs, TASK_IN_PROGRESS)
    initiator.handle(r2t)
    assert initiator.collect(itt).status == GOOD
    assert initiator.read10(0, 1).data == b"\x5a" * 512


# --- login layer ----------------------------------------------------------------------------

LEADING = encode_text([("InitiatorName", INITIATOR), ("SessionType", "Normal"),
                       ("TargetName", DISK)])


def raw_login(initiator, text: bytes, csg=SECURITY, nsg=OPERATIONAL, transit=True, cont=False):
    """One Login Request with `text` as is; the Login Response, or None if the target closed."""
    flags = (0x80 if transit else 0) | (0x40 if cont else 0) | (csg << 2) | nsg
    bhs = build_bhs(LOGIN_REQ, immediate=True, flags=flags, data_length=len(text),
                    lun8=initiator.isid + b"\0\0", itt=1, words={24: 1, 28: 0})
    initiator.send_pdu(bhs, text)
    try:
        return initiator.recv_pdu(timeout=5)
    except ConnectionClosed:
        return None


def assert_login_refused(initiator, rsp, status):
    assert rsp is not None and rsp.opcode == LOGIN_RSP, repr(rsp)
    assert rsp.status16 == status, f"status {rsp.status16:#06x}, expected {status:#06x}"
    initiator.wait_closed(timeout=5)                # RFC 7143 11.13.5: then the target closes


@pytest.mark.parametrize("text, status", [
    (encode_text([("InitiatorName", INITIATOR), ("SessionType", "Bogus"),
                  ("AuthMethod", "None")]), SESSION_TYPE_UNSUPPORTED),
    (LEADING + b"AuthMethod\0", INITIATOR_ERROR),                     # no '='
    (LEADING + encode_text([("AuthMethod", "None"), ("AuthMethod", "None")]), INITIATOR_ERROR),
    (LEADING + encode_text([("AuthMethod", "None"), ("TargetAlias", "a" * 8193)]),
     INITIATOR_ERROR),
    (LEADING + encode_text([("K" * 64, "x"), ("AuthMethod", "None")]), INITIATOR_ERROR),
    (LEADING + b"AuthMethod=\xff\xfe\0", INITIATOR_ERROR),             # not UTF-8
], ids=["session-type", "no-equals", "duplicate-key", "huge-value", "long-key-name",
        "not-utf8"])
def test_malformed_login_text_is_refused(target, text, status):
    initiator = target.connect()
    assert_login_refused(initiator, raw_login(initiator, text), status)
    assert_target_still_serves(target)


@pytest.mark.parametrize("csg, nsg", [(2, 3), (SECURITY, 2), (3, 3)],
                         ids=["reserved-csg", "reserved-nsg", "csg-full-feature"])
def test_reserved_login_stages_are_refused(target, csg, nsg):
    initiator = target.connect()
    rsp = raw_login(initiator, LEADING + encode_text([("AuthMethod", "None")]), csg, nsg)
    assert_login_refused(initiator, rsp, INITIATOR_ERROR)
    assert_target_still_serves(target)


def test_login_text_past_its_bound_across_continuations_is_refused(target):
    """C-bit continuations are gathered up to a bound, not without end (RFC 7143 6.6)."""
    initiator = target.connect()
    chunk = b"X-Pad=" + b"p" * 8000
    rsp = raw_login(initiator, LEADING + chunk, transit=False, cont=True)
    sent = len(chunk)
    while rsp is not None and rsp.status16 == 0 and sent < 1 << 20:
        rsp = raw_login(initiator, b"p" * 8000, transit=False, cont=True)
        sent += 8000
    assert sent < 1 << 20, "a megabyte of login text was gathered without complaint"
    assert_login_refused(initiator, rsp, INITIATOR_ERROR)
    assert_target_still_serves(target)


@pytest.mark.parametrize("stall_after_first_pdu", [False, True], ids=["silent", "half-way"])
def test_a_login_never_finished_is_closed_after_the_timeout(make_target, stall_after_first_pdu):
    target = make_target(timeout=2)
    initiator = target.connect()
    started = time.monotonic()
    if stall_after_first_pdu:
        rsp = raw_login(initiator, LEADING + encode_text([("AuthMethod", "None")]),
                        transit=False)
        assert rsp is not None and rsp.status16 == 0
    initiator.wait_closed(timeout=10)
    assert 1.5 <= time.monotonic() - started <= 8
    assert_target_still_serves(target)


# --- CHAP -----------------------------------------------------------------------------------

def chap_challenge(target):
    initiator = target.connect()
    leading = encode_text([("InitiatorName", INITIATOR), ("SessionType", "Normal"),
                           ("TargetName", CHAPDISK), ("AuthMethod", "CHAP")])
    rsp = raw_login(initiator, leading, transit=False)
    assert rsp.status16 == 0 and rsp.text["AuthMethod"] == "CHAP"
    rsp = raw_login(initiator, encode_text([("CHAP_A", "5")]), transit=False)
    assert rsp.status16 == 0 and rsp.text["CHAP_A"] == "5"
    return initiator, int(rsp.text["CHAP_I"]), bytes.fromhex(rsp.text["CHAP_C"][2:])


def good_response(identifier, challenge):
    import hashlib
    return "0x" + hashlib.md5(bytes([identifier]) + CHAP_SECRET.encode() + challenge).hexdigest()


@pytest.mark.parametrize("answer", [
    lambda i, c: [("CHAP_N", CHAP_USER), ("CHAP_R", "0xZZ" + "00" * 15)],          # not hex
    lambda i, c: [("CHAP_N", CHAP_USER), ("CHAP_R", "0x" + "00" * 4000)],          # huge
    lambda i, c: [("CHAP_N", CHAP_USER), ("CHAP_R", "")],                          # empty
    lambda i, c: [("CHAP_N", CHAP_USER)],                                          # no CHAP_R
    lambda i, c: [("CHAP_R", good_response(i, c))],                                # no CHAP_N
    lambda i, c: [("CHAP_N", CHAP_USER), ("CHAP_R", good_response(i, c)),
                  ("CHAP_I", "256"), ("CHAP_C", "0x" + "11" * 16)],                # bad mutual id
    lambda i, c: [("CHAP_N", CHAP_USER), ("CHAP_R", good_response(i, c)),
                  ("CHAP_I", "7"), ("CHAP_C", "0x" + c.hex())],                    # reflection
    lambda i, c: [("CHAP_A", "5"), ("CHAP_N", CHAP_USER), ("CHAP_R", good_response(i, c))],
], ids=["r-not-hex", "r-huge", "r-empty", "r-missing", "n-missing", "mutual-id-256",
        "reflected-challenge", "algorithm-again"])
def test_hostile_chap_answers_fail_authentication(target, answer):
    initiator, identifier, challenge = chap_challenge(target)
    rsp = raw_login(initiator, encode_text(answer(identifier, challenge)))
    assert_login_refused(initiator, rsp, AUTH_FAILURE)
    assert_target_still_serves(target)


# --- Text / discovery -----------------------------------------------------------------------

def text_bhs(initiator, length, flags=0x80, ttt=RESERVED_TAG, itt=None):
    return build_bhs(TEXT_REQ, flags=flags, data_length=length,
                     itt=initiator.new_itt() if itt is None else itt,
                     words={20: ttt, 24: initiator._cmd_sn_for(False), 28: initiator.exp_stat_sn})


def test_text_request_with_both_final_and_continue_is_rejected(target):
    initiator = target.session()
    data = encode_text([("SendTargets", "All")])
    bhs = text_bhs(initiator, len(data), flags=0xC0)
    initiator.send_pdu(bhs, data)
    expect_reject(initiator, bhs, PROTOCOL_ERROR)
    assert initiator.nop_out(b"ok").data == b"ok"


def test_text_request_with_a_target_transfer_tag_never_issued_is_rejected(target):
    initiator = target.session()
    data = encode_text([("SendTargets", "All")])
    bhs = text_bhs(initiator, len(data), ttt=0x1234)
    initiator.send_pdu(bhs, data)
    expect_reject(initiator, bhs, INVALID_PDU_FIELD)
    assert initiator.nop_out(b"ok").data == b"ok"


def test_text_past_its_bound_across_continuations_is_rejected(target):
    initiator = target.session()
    itt, ttt = initiator.new_itt(), RESERVED_TAG
    sent = 0
    while sent < 1 << 20:
        data = b"X-Pad=" + b"p" * 8000 if sent == 0 else b"p" * 8000
        bhs = text_bhs(initiator, len(data), flags=0x40, itt=itt, ttt=ttt)
        initiator.send_pdu(bhs, data)
        sent += len(data)
        pdu = initiator.recv_pdu(timeout=5)
        if pdu.opcode == REJECT:
            break
        assert pdu.opcode == TEXT_RSP and pdu.itt == itt
        ttt = pdu.ttt                               # continue the same request
    assert sent < 1 << 20, "a megabyte of text was gathered without complaint"
    assert pdu.reason == PROTOCOL_ERROR
    assert initiator.nop_out(b"ok").data == b"ok"


# --- Data-Out and the SCSI command's own data -----------------------------------------------

def test_unsolicited_data_out_when_initial_r2t_is_yes_is_rejected(target):
    initiator = target.session(keys={"ImmediateData": "No"})
    initiator.strict = False
    itt = initiator.submit(struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 1, 0), data_out=bytes(512))
    r2t = initiator.recv_pdu(timeout=5)
    bhs = build_bhs(0x05, flags=0x80, data_length=512, itt=itt,
                    words={20: RESERVED_TAG, 28: initiator.exp_stat_sn, 36: 0, 40: 0})
    initiator.send_pdu(bhs, bytes(512))
    expect_reject(initiator, bhs, INVALID_PDU_FIELD)
    initiator.handle(r2t)                           # the solicited data still completes it
    assert initiator.collect(itt).status == GOOD


@pytest.mark.parametrize("flags, edtl, data", [
    (0x80 | 0x20, 512, bytes(1024)),                # immediate data beyond EDTL
    (0x80 | 0x40, 512, bytes(512)),                 # a READ that carries data
], ids=["immediate-over-edtl", "read-with-data"])
def test_command_data_that_cannot_belong_to_it_is_rejected(target, flags, edtl, data):
    initiator = target.session()
    opcode = 0x2A if flags & 0x20 else 0x28
    cdb = struct.pack(">BBIBHB", opcode, 0, 0, 0, 1, 0).ljust(16, b"\0")
    bhs = build_bhs(SCSI_CMD, flags=flags | 0x01, data_length=len(data),
                    itt=initiator.new_itt(), cdb=cdb,
                    words={20: edtl, 24: initiator._cmd_sn_for(False), 28: initiator.exp_stat_sn})
    initiator.send_pdu(bhs, data)
    expect_reject(initiator, bhs, PROTOCOL_ERROR)
    assert initiator.tur().status == GOOD


# --- task management ------------------------------------------------------------------------

def test_task_management_in_a_discovery_session_is_rejected(target):
    initiator = target.connect()
    initiator.login()                               # discovery
    bhs = build_bhs(TMF_REQ, immediate=True, flags=0x80 | 5, itt=initiator.new_itt(),
                    lun8=encode_lun(0), words={20: RESERVED_TAG, 24: initiator.cmd_sn,
                                               28: initiator.exp_stat_sn})
    initiator.send_pdu(bhs, b"")
    expect_reject(initiator, bhs, PROTOCOL_ERROR)
    assert initiator.send_targets()                 # the discovery session goes on


def test_lu_reset_while_a_write_waits_for_data_ends_it_and_reports_the_reset(target):
    initiator = target.session(keys={"ImmediateData": "No"})
    initiator.strict = False
    itt = initiator.submit(struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 8, 0), data_out=bytes(4096))
    del initiator.tasks[itt]
    r2t = initiator.recv_pdu(timeout=5)
    rsp = initiator.tmf(5, lun=0)                   # LOGICAL UNIT RESET
    assert rsp.opcode == TMF_RSP and rsp.response == 0
    bhs = build_bhs(0x05, flags=0x80, data_length=4096, itt=itt,         # too late now
                    words={20: r2t.ttt, 28: initiator.exp_stat_sn, 36: 0, 40: 0})
    initiator.send_pdu(bhs, bytes(4096))
    task = initiator.tur()
    assert task.status == CHECK_CONDITION
    assert sense_key(task.sense) == 0x06 and asc_ascq(task.sense)[0] == 0x29
    assert initiator.tur().status == GOOD
