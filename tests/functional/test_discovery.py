"""Discovery sessions and SendTargets."""

from tests.functional.conftest import (
    ALLOWED_INITIATOR, CHAP_SECRET, CHAP_USER, CHAPDISK, DENIED_INITIATOR, DENIED_NAME, DISK,
    MUTUALDISK, NETDENIED, RESTRICTED,
)
from tests.functional.initiator import REJECT


def discover(target, initiator_name=None, **login_kwargs):
    initiator = target.connect(**({"initiator_name": initiator_name} if initiator_name else {}))
    initiator.login(None, **login_kwargs)
    return dict(initiator.send_targets("All")), initiator


def test_send_targets_lists_only_visible_targets(target):
    targets, _ = discover(target)
    # restricted: name ACL; netdenied: netmask ACL excludes 127.0.0.1.
    assert sorted(targets) == sorted([DISK, DENIED_NAME, CHAPDISK, MUTUALDISK])
    assert targets[DISK] == [f"127.0.0.1:{target.port},1"]


def test_send_targets_follows_initiator_name_acl(target):
    allowed, _ = discover(target, ALLOWED_INITIATOR)
    assert RESTRICTED in allowed and NETDENIED not in allowed
    denied, _ = discover(target, DENIED_INITIATOR)
    assert DENIED_NAME not in denied and DISK in denied


def test_send_targets_is_in_lu_number_order(target):
    _, initiator = discover(target)
    names = [name for name, _ in initiator.send_targets("All")]
    assert names == [DISK, DENIED_NAME, CHAPDISK, MUTUALDISK]


def test_send_targets_ipv6_portal_keeps_brackets(make_target):
    target = make_target(ipv6=True)
    targets, _ = discover(target)
    assert targets[DISK] == [f"127.0.0.1:{target.port},1", f"[::1]:{target.port6},1"]


def test_discovery_over_ipv6(make_target):
    target = make_target(ipv6=True)
    initiator = target.connect(host="::1")
    initiator.login(None)
    targets = dict(initiator.send_targets("All"))
    assert f"[::1]:{target.port6},1" in targets[DISK]
    session = target.connect(host="::1")
    session.login(DISK)
    assert session.nop_out(b"v6").data == b"v6"


def test_send_targets_single_name(target):
    _, initiator = discover(target)
    assert initiator.send_targets(CHAPDISK) == [(CHAPDISK, [f"127.0.0.1:{target.port},1"])]
    assert initiator.send_targets(RESTRICTED) == []  # not visible to this initiator


def test_send_targets_in_normal_session_empty_value_is_own_target(target):
    initiator = target.session()
    assert initiator.send_targets("") == [(DISK, [f"127.0.0.1:{target.port},1"])]


def test_text_response_fields(target):
    _, initiator = discover(target)
    pairs = initiator.text([("SendTargets", "All")])  # checks F=1, C=0, TTT=0xffffffff
    assert ("TargetName", DISK) in pairs


def test_discovery_auth_chap_required(make_target):
    target = make_target(discovery_auth="CHAP")
    refused = target.connect()
    rsp = refused.login(None, expect_status=0x0201, security_stage=False)
    assert rsp.status16 == 0x0201
    targets, _ = discover(target, auth=(CHAP_USER, CHAP_SECRET))
    assert DISK in targets


def test_discovery_session_refuses_scsi_commands(target):
    _, initiator = discover(target)
    initiator.submit(bytes(6))
    # RFC 7143 4.3: only Text, NOP and Logout in a discovery session. Reject or drop.
    try:
        pdu = initiator.recv_pdu(timeout=5)
    except EOFError:
        return
    assert pdu.opcode == REJECT, f"expected Reject, got {pdu!r}"


def test_discovery_logout(target):
    _, initiator = discover(target)
    rsp = initiator.logout()
    assert rsp.response == 0
    initiator.wait_closed()


def test_many_discoveries_in_a_row(target):
    for _ in range(20):
        targets, initiator = discover(target)
        assert DISK in targets
        initiator.logout()
        initiator.close()
