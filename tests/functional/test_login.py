"""Login phase: stages, CHAP, status codes, negotiation defaults, TSIH, MCS, reinstatement."""

import pytest

from tests.functional.conftest import (
    ALLOWED_INITIATOR, CHAP_SECRET, CHAP_USER, CHAPDISK, DENIED_INITIATOR, DENIED_NAME, DISK,
    MUTUAL_SECRET, MUTUAL_USER, MUTUALDISK, NETDENIED, RESTRICTED,
)
from tests.functional.initiator import (
    FULL_FEATURE, LOGIN_RSP, OPERATIONAL, SECURITY, ConnectionClosed, encode_text,
)

# Login status codes (RFC 7143 11.13.5)
AUTH_FAILURE, NOT_FOUND, UNSUPPORTED_VERSION = 0x0201, 0x0203, 0x0205
MISSING_PARAMETER, SESSION_DOES_NOT_EXIST, OUT_OF_RESOURCES = 0x0207, 0x020A, 0x0302
# RFC 7143's precise codes where C istgt uses 0x0203 and 0x0208 for everything
ACL_DENIED = 0x0203             # "not found": a target the initiator may not see is hidden
TOO_MANY_CONNECTIONS = 0x0206


def assert_login_rejected_and_closed(initiator, rsp, status):
    assert rsp.opcode == LOGIN_RSP
    assert rsp.status16 == status, f"status {rsp.status16:#06x}, expected {status:#06x}"
    # RFC 7143 11.13.5: after a non-zero status class the target closes the connection.
    initiator.wait_closed(timeout=5)


def test_login_without_auth_reaches_full_feature_phase(target):
    initiator = target.connect()
    params = initiator.login(DISK)
    final = initiator.login_responses[-1]
    assert final.transit and final.csg == OPERATIONAL and final.nsg == FULL_FEATURE
    assert final.version_max == 0 and final.version_active == 0
    assert final.isid == int.from_bytes(initiator.isid, "big")
    assert final.tsih != 0
    assert params["TargetPortalGroupTag"] == "1"
    assert initiator.nop_out(b"ffp").data == b"ffp"


def test_login_security_stage_answer_is_echoed(target):
    initiator = target.connect()
    initiator.login(DISK)
    first = initiator.login_responses[0]
    assert first.csg == SECURITY and first.nsg == OPERATIONAL and first.transit
    assert first.text["AuthMethod"] == "None"
    assert first.tsih == 0  # TSIH is only assigned in the final response


def test_target_declares_max_recv_data_segment_length(target):
    initiator = target.connect()
    initiator.login(DISK)
    declared = [r.text["MaxRecvDataSegmentLength"] for r in initiator.login_responses
                if "MaxRecvDataSegmentLength" in r.text]
    assert len(declared) == 1
    assert 512 <= int(declared[0]) <= 16777215


def test_login_can_skip_security_stage_when_no_auth_is_required(target):
    initiator = target.connect()
    initiator.login(DISK, security_stage=False)
    assert initiator.tsih != 0
    assert initiator.nop_out(b"ping").data == b"ping"


@pytest.mark.parametrize("algorithm", ["5", "6", "7", "8"], ids=["MD5", "SHA1", "SHA-256",
                                                               "SHA3-256"])
def test_chap_each_algorithm(target, algorithm):
    initiator = target.connect()
    initiator.login(CHAPDISK, auth=(CHAP_USER, CHAP_SECRET), chap_algorithms=(algorithm,))
    challenge = initiator.login_responses[1].text
    assert challenge["CHAP_A"] == algorithm
    assert 0 <= int(challenge["CHAP_I"]) <= 255
    assert initiator.nop_out(b"x").data == b"x"


def test_chap_target_picks_first_acceptable_algorithm_in_initiator_order(target):
    initiator = target.connect()
    initiator.login(CHAPDISK, auth=(CHAP_USER, CHAP_SECRET), chap_algorithms=("99", "7", "5"))
    assert initiator.login_responses[1].text["CHAP_A"] == "7"


def test_chap_with_no_acceptable_algorithm_fails(target):
    initiator = target.connect()
    try:
        rsp = initiator.login(CHAPDISK, auth=(CHAP_USER, CHAP_SECRET), chap_algorithms=("99",),
                              expect_status=AUTH_FAILURE)
    except ConnectionClosed:
        return  # RFC 7143 12.1.3: the target may also just close the connection
    assert_login_rejected_and_closed(initiator, rsp, AUTH_FAILURE)


def test_mutual_chap(target):
    initiator = target.connect()
    # The initiator verifies the target's CHAP_N/CHAP_R; a wrong answer raises.
    initiator.login(MUTUALDISK, auth=(CHAP_USER, CHAP_SECRET, MUTUAL_USER, MUTUAL_SECRET))
    assert initiator.nop_out(b"m").data == b"m"


def test_mutual_required_but_initiator_offers_one_way_chap(target):
    initiator = target.connect()
    rsp = initiator.login(MUTUALDISK, auth=(CHAP_USER, CHAP_SECRET), expect_status=AUTH_FAILURE)
    assert_login_rejected_and_closed(initiator, rsp, AUTH_FAILURE)


def test_chap_wrong_secret(target):
    initiator = target.connect()
    rsp = initiator.login(CHAPDISK, auth=(CHAP_USER, "not-the-secret"), expect_status=AUTH_FAILURE)
    assert_login_rejected_and_closed(initiator, rsp, AUTH_FAILURE)


def test_chap_unknown_user(target):
    initiator = target.connect()
    rsp = initiator.login(CHAPDISK, auth=("nobody", CHAP_SECRET), expect_status=AUTH_FAILURE)
    assert_login_rejected_and_closed(initiator, rsp, AUTH_FAILURE)


def test_chap_target_refuses_auth_method_none(target):
    initiator = target.connect()
    rsp = initiator.login_pdu([("InitiatorName", "iqn.2024-01.org.example:x"),
                               ("SessionType", "Normal"), ("TargetName", CHAPDISK),
                               ("AuthMethod", "None")], SECURITY, OPERATIONAL, True)
    # Either AuthMethod=Reject with T=0 (C istgt) or an authentication failure.
    if rsp.status16 == 0:
        assert rsp.text["AuthMethod"] == "Reject" and not rsp.transit
    else:
        assert_login_rejected_and_closed(initiator, rsp, AUTH_FAILURE)


def test_skipping_security_on_a_chap_target_fails(target):
    initiator = target.connect()
    rsp = initiator.login(CHAPDISK, security_stage=False, expect_status=AUTH_FAILURE)
    assert_login_rejected_and_closed(initiator, rsp, AUTH_FAILURE)


def test_unknown_target(target):
    initiator = target.connect()
    rsp = initiator.login("iqn.2007-09.jp.ne.peach.istgt:nosuchdisk", expect_status=NOT_FOUND)
    assert_login_rejected_and_closed(initiator, rsp, NOT_FOUND)


def test_a_denied_target_answers_exactly_like_a_missing_one(target):
    denied = target.connect()
    hidden = denied.login(RESTRICTED, expect_status=ACL_DENIED)
    absent = target.connect().login("iqn.2007-09.jp.ne.peach.istgt:nosuchdisk",
                                    expect_status=NOT_FOUND)
    assert ACL_DENIED == NOT_FOUND
    assert (hidden.bhs[1:4], hidden.bhs[36:38], hidden.data) == \
        (absent.bhs[1:4], absent.bhs[36:38], absent.data)


def test_acl_by_initiator_name(target):
    denied = target.connect()
    rsp = denied.login(RESTRICTED, expect_status=ACL_DENIED)
    assert_login_rejected_and_closed(denied, rsp, ACL_DENIED)
    allowed = target.connect(initiator_name=ALLOWED_INITIATOR)
    allowed.login(RESTRICTED)
    assert allowed.tsih != 0


def test_acl_negated_initiator_name(target):
    denied = target.connect(initiator_name=DENIED_INITIATOR)
    rsp = denied.login(DENIED_NAME, expect_status=ACL_DENIED)
    assert_login_rejected_and_closed(denied, rsp, ACL_DENIED)
    target.connect().login(DENIED_NAME)


def test_acl_by_netmask(target):
    initiator = target.connect()
    rsp = initiator.login(NETDENIED, expect_status=ACL_DENIED)
    assert_login_rejected_and_closed(initiator, rsp, ACL_DENIED)


def test_missing_initiator_name(target):
    initiator = target.connect()
    rsp = initiator.login(DISK, initiator_name=None, expect_status=MISSING_PARAMETER)
    assert_login_rejected_and_closed(initiator, rsp, MISSING_PARAMETER)


def test_missing_target_name_in_normal_session(target):
    initiator = target.connect()
    rsp = initiator.login(None, session_type="Normal", expect_status=MISSING_PARAMETER)
    assert_login_rejected_and_closed(initiator, rsp, MISSING_PARAMETER)


def test_unsupported_version(target):
    initiator = target.connect()
    rsp = initiator.login_pdu([("InitiatorName", "iqn.2024-01.org.example:v"),
                               ("SessionType", "Normal"), ("TargetName", DISK),
                               ("AuthMethod", "None")], SECURITY, OPERATIONAL, True,
                              version_max=2, version_min=1)
    assert_login_rejected_and_closed(initiator, rsp, UNSUPPORTED_VERSION)


def test_tsih_assigned_and_distinct_per_session(target):
    first, second = target.session(), target.session()
    assert first.tsih != 0 and second.tsih != 0
    assert first.tsih != second.tsih


def test_omitted_keys_take_rfc_defaults(target):
    # No MaxRecvDataSegmentLength from us: the target must assume 8192 (RFC 7143 13.12).
    initiator = target.connect()
    initiator.login(DISK, max_recv_data_segment_length=None)
    assert initiator.my_mrdsl == 8192
    initiator.tur()
    result = initiator.read10(0, 128)  # 64 KiB
    assert result.status == 0
    assert [len(p.data) for p in result.data_in] == [8192] * 8


def test_omitted_max_burst_length_means_256k_for_r2t(make_target):
    target = make_target(iscsi={"MaxBurstLength": "1048576", "FirstBurstLength": "65536"})
    initiator = target.connect()
    initiator.login(DISK)  # offers no MaxBurstLength: RFC default 262144 applies
    initiator.tur()
    result = initiator.write10(0, bytes(1024 * 1024), use_immediate_data=False)
    assert result.status == 0
    assert max(r2t.desired_length for r2t in result.r2ts) <= 262144


def test_unknown_keys_answered_not_understood(target):
    initiator = target.connect()
    params = initiator.login(DISK, keys={"X-com.example.Feature": "on", "FooBarKey": "1"})
    assert params.keys["X-com.example.Feature"] == "NotUnderstood"
    assert params.keys["FooBarKey"] == "NotUnderstood"


@pytest.mark.parametrize("key,value", [("MaxBurstLength", "100"), ("FirstBurstLength", "16777216"),
                                       ("InitialR2T", "Maybe"), ("ErrorRecoveryLevel", "9"),
                                       ("DefaultTime2Wait", "3601")])
def test_out_of_range_values_rejected(target, key, value):
    initiator = target.connect()
    params = initiator.login(DISK, keys={key: value})
    assert params.keys[key] == "Reject"


def test_negotiated_values_follow_rfc_functions(make_target):
    target = make_target(iscsi={"MaxBurstLength": "1048576", "FirstBurstLength": "262144",
                                "ImmediateData": "Yes", "MaxOutstandingR2T": "8"})
    initiator = target.connect()
    params = initiator.login(DISK, keys={"MaxBurstLength": "65536", "FirstBurstLength": "1048576",
                                         "ImmediateData": "No", "MaxOutstandingR2T": "4",
                                         "ErrorRecoveryLevel": "2", "DataPDUInOrder": "Yes"})
    assert params.keys["MaxBurstLength"] == "65536"          # min
    assert params.keys["FirstBurstLength"] == "65536"        # min, and <= MaxBurstLength
    assert params.keys["ImmediateData"] == "No"              # AND
    assert params.keys["MaxOutstandingR2T"] == "4"           # min
    assert params.keys["ErrorRecoveryLevel"] == "0"          # min (target supports 0)
    assert params.keys["DataPDUInOrder"] == "Yes"


def test_discovery_session_gets_irrelevant_for_session_keys(target):
    initiator = target.connect()
    params = initiator.login(None, keys={"InitialR2T": "No", "MaxBurstLength": "65536"})
    assert params.keys["InitialR2T"] == "Irrelevant"
    assert params.keys["MaxBurstLength"] == "Irrelevant"


def test_login_request_with_transit_and_continue_is_refused(target):
    initiator = target.connect()
    pairs = [("InitiatorName", "iqn.2024-01.org.example:tc"), ("SessionType", "Normal"),
             ("TargetName", DISK), ("AuthMethod", "None")]
    try:
        rsp = initiator.login_pdu(pairs, SECURITY, OPERATIONAL, transit=True, cont=True)
    except ConnectionClosed:
        return  # dropping the connection is allowed
    assert rsp.status16 == 0x0200  # initiator error
    initiator.wait_closed()


def test_login_with_continuation_over_two_pdus(target):
    initiator = target.connect()
    pairs = [("InitiatorName", "iqn.2024-01.org.example:cont"), ("SessionType", "Normal"),
             ("TargetName", DISK), ("AuthMethod", "None")]
    text = encode_text(pairs)
    half = len(text) // 2  # split in the middle of a key=value pair
    for chunk, cont in ((text[:half], True), (text[half:], False)):
        initiator.send_pdu(_login_bhs(initiator, cont, len(chunk)), chunk)
        rsp = initiator.recv_pdu()
        assert rsp.opcode == LOGIN_RSP and rsp.status16 == 0
        if cont:
            assert not rsp.transit and rsp.data == b""  # RFC 7143 10.12.4: empty, T=0
    assert rsp.text["AuthMethod"] == "None" and rsp.transit


def _login_bhs(initiator, cont, length):
    from tests.functional.initiator import LOGIN_REQ, build_bhs
    flags = (0 if cont else 0x80) | (0x40 if cont else 0) | (SECURITY << 2) | OPERATIONAL
    return build_bhs(LOGIN_REQ, immediate=True, flags=flags, data_length=length,
                     lun8=initiator.isid + bytes(2), itt=7,
                     words={24: initiator.cmd_sn, 28: initiator.exp_stat_sn})


# ---- multiple connections per session, MaxSessions, reinstatement ------------------------

def test_second_connection_joins_session(make_target):
    target = make_target(max_connections=4)
    first = target.session(keys={"MaxConnections": "4"})
    assert first.params["MaxConnections"] == "4"
    second = target.connect(isid=first.isid)
    second.cmd_sn = first.cmd_sn
    second.login(DISK, tsih=first.tsih, cid=1, keys={"MaxConnections": "4"})
    assert second.tsih == first.tsih
    # One CmdSN space across the session: commands alternate connections.
    for initiator in (second, first, second):
        initiator.cmd_sn = max(first.cmd_sn, second.cmd_sn)
        assert initiator.nop_out(b"mcs", immediate=False).data == b"mcs"


def test_max_connections_enforced(make_target):
    target = make_target(max_connections=2)
    first = target.session(keys={"MaxConnections": "8"})
    assert first.params["MaxConnections"] == "2"
    second = target.connect(isid=first.isid)
    second.cmd_sn = first.cmd_sn
    second.login(DISK, tsih=first.tsih, cid=1, keys={"MaxConnections": "8"})
    third = target.connect(isid=first.isid)
    third.cmd_sn = first.cmd_sn
    rsp = third.login(DISK, tsih=first.tsih, cid=2, keys={"MaxConnections": "8"},
                      expect_status=TOO_MANY_CONNECTIONS)
    assert_login_rejected_and_closed(third, rsp, TOO_MANY_CONNECTIONS)
    assert first.nop_out(b"still").data == b"still"


def test_second_connection_refused_when_max_connections_is_default_one(target):
    first = target.session()  # offers no MaxConnections: RFC default 1
    second = target.connect(isid=first.isid)
    second.cmd_sn = first.cmd_sn
    rsp = second.login(DISK, tsih=first.tsih, cid=1, expect_status=TOO_MANY_CONNECTIONS)
    assert_login_rejected_and_closed(second, rsp, TOO_MANY_CONNECTIONS)


def test_join_with_unknown_tsih(target):
    first = target.session()
    other = target.connect(isid=first.isid)
    rsp = other.login(DISK, tsih=(first.tsih + 77) & 0xFFFF or 1, cid=1,
                      expect_status=SESSION_DOES_NOT_EXIST)
    assert_login_rejected_and_closed(other, rsp, SESSION_DOES_NOT_EXIST)


def test_max_sessions_enforced(make_target):
    target = make_target(max_sessions=2)
    target.session()
    target.session()
    third = target.connect()
    rsp = third.login(DISK, expect_status=OUT_OF_RESOURCES)
    assert_login_rejected_and_closed(third, rsp, OUT_OF_RESOURCES)


def test_session_reinstatement_closes_old_session(target):
    old = target.session()
    new = target.connect(isid=old.isid)
    new.login(DISK)  # same initiator name + ISID, TSIH 0: reinstatement (RFC 7143 6.3.5)
    old.wait_closed(timeout=5)
    assert new.nop_out(b"new").data == b"new"


def test_failed_authentication_does_not_reinstate(target):
    old = target.session(CHAPDISK, auth=(CHAP_USER, CHAP_SECRET))
    intruder = target.connect(isid=old.isid)
    intruder.login(CHAPDISK, auth=(CHAP_USER, "wrong-secret"), expect_status=AUTH_FAILURE)
    # The live session must survive a login that never authenticated.
    assert old.nop_out(b"alive").data == b"alive"


def test_a_failed_login_is_logged_with_initiator_name_and_address(target, caplog):
    import logging
    caplog.set_level(logging.WARNING, logger="istgt")
    initiator = target.connect(initiator_name="iqn.2024-01.org.example:intruder")
    initiator.login(CHAPDISK, auth=(CHAP_USER, "a-wrong-secret!!"), expect_status=AUTH_FAILURE)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("iqn.2024-01.org.example:intruder" in line and "127.0.0.1" in line
               for line in lines), lines
    assert not any("a-wrong-secret!!" in line for line in lines)    # never the secret
