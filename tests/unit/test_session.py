"""CmdSN window rules (RFC 7143 4.2.2.1) and the session registry."""

import pytest

from istgt.iscsi.session import LoginRefused, Session, SessionRegistry
from istgt.scsi.command import ITNexus


def make_session(first_cmdsn=10, window=4, name="iqn.x:i", isid=b"\x80\0\0\0\0\1", tpgt=1):
    nexus = ITNexus(f"{name},i,0x{isid.hex()}", f"iqn.t,t,0x{tpgt:04x}", tpgt)
    return Session(isid=isid, initiator_name=name, initiator_alias="", target=object(),
                   target_name="iqn.t", portal_group_tag=tpgt, discovery=False, values=None,
                   window=window, first_cmdsn=first_cmdsn, nexus=nexus)


def test_window_accepts_in_order_and_ignores_outside():
    s = make_session()
    assert s.window() == (10, 13)
    assert s.accept_cmdsn(10, False)
    assert s.window() == (11, 13)
    assert not s.accept_cmdsn(10, False)        # duplicate
    assert not s.accept_cmdsn(14, False)        # beyond MaxCmdSN
    assert not s.accept_cmdsn(9, False)         # already passed


def test_immediate_commands_do_not_advance():
    s = make_session()
    assert s.accept_cmdsn(10, True)
    assert s.window() == (10, 13)


def test_gap_then_fill_advances_over_both():
    s = make_session()
    assert s.accept_cmdsn(11, False)            # arrived first on another connection
    assert s.window()[0] == 10
    assert not s.accept_cmdsn(11, False)        # a copy is ignored
    assert s.accept_cmdsn(10, False)
    assert s.window()[0] == 12


def test_release_slot_widens_window():
    s = make_session(window=1)
    assert s.accept_cmdsn(10, False)
    assert not s.accept_cmdsn(11, False)
    s.release_slot()
    assert s.accept_cmdsn(11, False)


def test_window_wraps_at_2_32():
    s = make_session(first_cmdsn=0xFFFFFFFF, window=4)
    assert s.accept_cmdsn(0xFFFFFFFF, False)
    assert s.accept_cmdsn(0, False)
    assert s.window()[0] == 1


def test_consume_unseen_only_inside_window_and_before_tmf():
    s = make_session()
    assert s.consume_unseen(11, 12)
    assert not s.accept_cmdsn(11, False)        # a late copy of the aborted command
    assert not s.consume_unseen(9, 12)          # already completed: task does not exist
    assert not s.consume_unseen(12, 12)         # not before the TMF itself


class FakeConn:
    def __init__(self, cid):
        self.cid = cid
        self.closed = None

    def close_async(self, reason):
        self.closed = reason


def test_max_connections_and_reinstatement_of_cid():
    s = make_session()
    a, b = FakeConn(0), FakeConn(1)
    s.add_connection(a, 2)
    s.add_connection(b, 2)
    with pytest.raises(LoginRefused) as e:
        s.add_connection(FakeConn(2), 2)
    assert e.value.status == 0x0206
    again = FakeConn(1)
    s.add_connection(again, 2)                  # same CID: the old connection is closed
    assert b.closed and s.connections[1] is again
    assert not s.remove_connection(a)
    assert s.remove_connection(again)           # the last one ends the session


def test_registry_tsih_reinstatement_and_max_sessions():
    reg = SessionRegistry(max_sessions=2)
    s1 = make_session()
    assert reg.register(s1) == [] and s1.tsih == 1
    s2 = make_session(isid=b"\x80\0\0\0\0\2")
    reg.register(s2)
    with pytest.raises(LoginRefused) as e:
        reg.register(make_session(isid=b"\x80\0\0\0\0\3"))
    assert e.value.status == 0x0302
    s1b = make_session()                        # same I_T nexus as s1: reinstatement
    assert reg.register(s1b) == [s1]
    assert reg.find(s1b.tsih, s1b.isid, "iqn.x:i", "IQN.T", 1) is s1b
    assert reg.find(s1.tsih, s1.isid, "iqn.x:i", "iqn.t", 1) is None


def test_same_isid_through_another_portal_group_is_another_session():
    reg = SessionRegistry(max_sessions=4)
    first, second = make_session(tpgt=1), make_session(tpgt=2)
    reg.register(first)
    assert reg.register(second) == []           # another target port: no reinstatement
    # A connection joins a session only through the session's own portal group.
    assert reg.find(first.tsih, first.isid, "iqn.x:i", "iqn.t", 2) is None
    assert reg.find(second.tsih, second.isid, "iqn.x:i", "iqn.t", 2) is second
