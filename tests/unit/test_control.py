"""The UnitControl line protocol, its CHAP exchange and the command logic, without sockets."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from istgt.control.auth import (
    ControlAuthError, ServerChap, check_mutual_answer, client_response,
)
from istgt.control.commands import ControlSession, lun_description
from istgt.control.protocol import MAX_LINE, LineBuffer, parse_request, quote, split_line
from istgt.lu.stats import IoStats

ENTRY = SimpleNamespace(user="ctl", secret="ctlsecret", mutual_user="tgt",
                        mutual_secret="tgtsecret")


# --- framing and tokens ----------------------------------------------------------------------


def test_split_line_honours_quotes_and_backslashes():
    assert split_line('LIST "iqn.x:a b" 0') == ["LIST", "iqn.x:a b", "0"]
    assert split_line("CHANGE 'it''s' a\\ b") == ["CHANGE", "its", "a b"]
    assert split_line('X "a\\"b"  \t "" ') == ["X", 'a"b', ""]
    assert split_line("   ") == []


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_quote_round_trips_through_split_line(value):
    assert split_line(f"CMD {quote(value)}") == ["CMD", value]


def test_parse_request_upper_cases_the_command_only():
    assert parse_request("  list iqn.X:Disk  ") == ("LIST", ["iqn.X:Disk"])
    assert parse_request("") == ("", [])


def test_line_buffer_accepts_lf_crlf_and_a_lone_cr():
    lines = LineBuffer()
    assert lines.feed(b"A\r\nB\nC\rD") == ["A", "B", "C"]
    assert lines.feed(b"\r") == []            # a CR at the end may be half of CRLF
    assert lines.feed(b"\nE\n") == ["D", "E"]
    assert lines.flush() is None


def test_line_buffer_cuts_over_long_lines():
    lines = LineBuffer()
    got = lines.feed(b"x" * (MAX_LINE * 2 + 10) + b"\n")
    assert [len(line) for line in got] == [MAX_LINE, MAX_LINE, 10]


# --- CHAP ------------------------------------------------------------------------------------


def test_chap_with_mutual_round_trip():
    server = ServerChap(lambda user: ENTRY if user == "ctl" else None, mutual_required=True)
    challenge = server.step(["CHAP_A", "5"])
    assert len(challenge) == 1 and challenge[0].startswith("AUTH CHAP_IC ")
    line, expected = client_response(split_line(challenge[0])[1:], "ctl", "ctlsecret", True)
    answer = server.step(split_line(line)[1:])
    assert server.authenticated
    assert answer[0].startswith('AUTH CHAP_NR "tgt" 0x')
    assert check_mutual_answer(split_line(answer[0])[1:], expected, "tgtsecret")
    assert not check_mutual_answer(split_line(answer[0])[1:], expected, "wrong")


def test_chap_response_is_md5_of_id_secret_challenge():
    server = ServerChap(lambda user: ENTRY, mutual_required=False)
    _, _, ident, hexed = server.step(["CHAP_A", "5"])[0].split()
    digest = hashlib.md5(bytes([int(ident)]) + b"ctlsecret" + bytes.fromhex(hexed[2:]))
    server.step(["CHAP_NR", "ctl", "0x" + digest.hexdigest()])
    assert server.authenticated


@pytest.mark.parametrize("steps, message", [
    ([["CHAP_A", "7"]], "invalid algorithm"),
    ([["CHAP_NR", "ctl", "0x00"]], "CHAP sequence error"),
    ([["CHAP_A", "5"], ["CHAP_NR", "ctl"]], "no response"),
    ([["CHAP_A", "5"], ["CHAP_NR", "ctl", "00ff"]], "response format error"),
    ([["CHAP_A", "5"], ["CHAP_NR", "ctl", "0x" + "00" * 16]], "auth user or secret is missing"),
    ([["CHAP_A", "5"], ["CHAP_NR", "nobody", "0x" + "00" * 16]], "auth user or secret is missing"),
    ([["BOGUS"]], "CHAP sequence error"),
])
def test_chap_errors(steps, message):
    server = ServerChap(lambda user: ENTRY if user == "ctl" else None, mutual_required=False)
    with pytest.raises(ControlAuthError, match=message):
        for step in steps:
            server.step(step)
    assert not server.authenticated
    assert server.step(["CHAP_A", "5"])          # back at the start after any error


def test_mutual_required_refuses_one_way_chap():
    server = ServerChap(lambda user: ENTRY, mutual_required=True)
    challenge = server.step(["CHAP_A", "5"])[0]
    line, _ = client_response(split_line(challenge)[1:], "ctl", "ctlsecret", False)
    with pytest.raises(ControlAuthError, match="CHAP sequence error"):
        server.step(split_line(line)[1:])


# --- commands --------------------------------------------------------------------------------


class FakeMedium:
    def __init__(self, removable=True):
        self.removable, self.loaded, self.prevented = removable, True, False


class FakeDevice:
    block_length = 512
    block_count = 2048
    read_only = False

    def __init__(self, removable=False):
        self.medium = FakeMedium(removable)
        self.calls = []

    def operator_unload(self):
        self.calls.append("unload")
        if self.medium.prevented:
            return False
        self.medium.loaded = False
        return True

    def operator_load(self):
        self.calls.append("load")
        self.medium.loaded = True
        return True


class FakeUnit(SimpleNamespace):
    __hash__ = object.__hash__      # the STATS command keys a table by unit, as LogicalUnit allows


def fake_unit(number, name, removable=False):
    lun = SimpleNamespace(number=0, kind="storage", path=f"/d/{name}.img", size=None, flags=(),
                          removable_disk=removable)
    unit = FakeUnit(number=number, name=f"iqn.x:{name}", devices={0: FakeDevice(removable)},
                    config=SimpleNamespace(luns={0: lun}), resets=[], stats=IoStats())
    unit.lun_reset = unit.resets.append
    return unit


@pytest.fixture
def server():
    units = {1: fake_unit(1, "disk"), 2: fake_unit(2, "cd", removable=True)}
    return SimpleNamespace(units=units, sessions=SimpleNamespace(all=lambda: []))


def ask(session, line):
    return session.handle(line)[0]


def test_list_info_version_noop_quit(server):
    session = ControlSession(server, "127.0.0.1", None)
    assert ask(session, "list") == ["LIST iqn.x:disk", "LIST iqn.x:cd", "OK LIST"]
    assert ask(session, 'LIST "iqn.x:DISK"') == ['LIST lun0 storage "/d/disk.img" 1048576',
                                                 "OK LIST"]
    assert ask(session, "LIST iqn.x:disk 1") == ["ERR no target"]
    assert ask(session, "LIST a b c") == ["ERR invalid parameters"]
    assert ask(session, "INFO") == ["INFO no login", "OK INFO"]
    assert ask(session, "VERSION")[0].startswith("VERSION 0.")
    assert ask(session, "noop") == ["OK NOOP"]
    assert ask(session, "frobnicate") == ["ERR unknown command"]
    assert ask(session, "AUTH CHAP_A 5") == ["ERR auth not required"]
    assert session.handle("QUIT") == (["OK QUIT"], True)


def test_media_commands(server):
    session = ControlSession(server, "127.0.0.1", None)
    assert ask(session, "UNLOAD iqn.x:disk") == ["ERR not removable"]
    assert ask(session, "UNLOAD iqn.x:cd 0") == ["OK UNLOAD"]
    assert ask(session, "LIST iqn.x:cd")[0] == 'LIST lun0 removable absent unlock - rw "/d/cd.img" auto'
    server.units[2].devices[0].medium.prevented = True
    assert ask(session, "UNLOAD iqn.x:cd") == ["ERR unload"]
    assert ask(session, "LOAD iqn.x:cd") == ["OK LOAD"]
    assert ask(session, "UNLOAD iqn.x:cd 5") == ["ERR no LUN"]
    assert ask(session, "UNLOAD iqn.x:nope") == ["ERR no target"]
    assert ask(session, "UNLOAD") == ["ERR invalid parameters"]
    assert ask(session, "CHANGE iqn.x:cd 0 - ro /x auto") == ["ERR change"]
    assert ask(session, "CHANGE iqn.x:cd 0") == ["ERR invalid parameters"]
    assert ask(session, "RESET iqn.x:disk 0") == ["OK RESET"]
    assert server.units[1].resets == [0]
    assert ask(session, "RESET iqn.x:disk x") == ["ERR invalid parameters"]


def test_commands_wait_for_authentication_when_it_is_required(server):
    chap = ServerChap(lambda user: ENTRY, mutual_required=False)
    session = ControlSession(server, "127.0.0.1", chap)
    assert ask(session, "LIST") == ["ERR auth required"]
    assert session.handle("QUIT") == (["OK QUIT"], True)
    challenge = ask(session, "AUTH CHAP_A 5")
    assert len(challenge) == 1                    # the challenge line alone
    line, _ = client_response(split_line(challenge[0])[1:], "ctl", "ctlsecret", False)
    assert ask(session, line) == ["OK AUTH"]
    assert ask(session, "LIST")[-1] == "OK LIST"
    assert ask(session, "AUTH CHAP_A 5") == ["ERR CHAP sequence error"]


def test_auto_lets_commands_through_without_auth(server):
    chap = ServerChap(lambda user: ENTRY, mutual_required=False)
    session = ControlSession(server, "127.0.0.1", chap, auth_optional=True)
    assert ask(session, "NOOP") == ["OK NOOP"]


def test_lun_description_of_a_device_and_a_removable_medium():
    device_lun = SimpleNamespace(number=1, kind="device", path="/dev/sg0")
    assert lun_description(device_lun, None) == 'lun1 device "/dev/sg0"'
    medium = SimpleNamespace(number=0, kind="removable", path="/m/a.iso", size=None,
                             flags=("ro",))
    device = SimpleNamespace(medium=SimpleNamespace(loaded=True, prevented=True))
    assert lun_description(medium, device) == 'lun0 removable present lock - ro "/m/a.iso" auto'


@given(st.text(max_size=200))
def test_no_request_line_raises(line):
    units = {1: fake_unit(1, "disk"), 2: fake_unit(2, "cd", removable=True)}
    server = SimpleNamespace(units=units, sessions=SimpleNamespace(all=lambda: []))
    replies, _ = ControlSession(server, "x", None).handle(line)
    assert all(r.startswith(("OK ", "ERR ", "LIST ", "INFO ", "VERSION ", "STATS "))
               for r in replies)
