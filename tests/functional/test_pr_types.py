"""Every persistent reservation type against READ, WRITE and PR commands from three I_T
nexuses: the reservation holder, another registrant and a non-registrant.

The expectations are SPC-4's table "SPC commands that are allowed in the presence of various
reservations" (PR IN always allowed; PR OUT per its companion table "PERSISTENT RESERVE OUT
service actions that are allowed in the presence of various reservations") and SBC-3's
table for READ and WRITE, written out cell by cell below.
"""

from __future__ import annotations

import pytest

from tests.functional.conftest import CHECK_CONDITION, GOOD, RunningTarget, TargetOptions
from tests.functional.pr_commands import (
    EXCLUSIVE_ACCESS, EXCLUSIVE_ACCESS_ALL_REGISTRANTS, EXCLUSIVE_ACCESS_REGISTRANTS_ONLY,
    READ_KEYS, READ_RESERVATION, RESERVATION_CONFLICT, WRITE_EXCLUSIVE,
    WRITE_EXCLUSIVE_ALL_REGISTRANTS, WRITE_EXCLUSIVE_REGISTRANTS_ONLY, Reservation, clear,
    parse_keys, parse_reservation, past_unit_attentions, pr_in, read_keys, read_reservation,
    register, release, reserve,
)

HOLDER, REGISTRANT, NON_REGISTRANT = "holder", "registrant", "non-registrant"
# Distinct initiator names and ISIDs: three I_T nexuses on the same target port.
NEXUSES = {
    HOLDER: ("iqn.2024-01.org.example:pr-holder", bytes.fromhex("80000000a001")),
    REGISTRANT: ("iqn.2024-01.org.example:pr-registrant", bytes.fromhex("80000000b002")),
    NON_REGISTRANT: ("iqn.2024-01.org.example:pr-outsider", bytes.fromhex("80000000c003")),
}
# The non-registrant's key is the one it presents (and registers with REGISTER).
KEYS = {HOLDER: 0xA1A1A1A1A1A1A1A1, REGISTRANT: 0xB2B2B2B2B2B2B2B2, NON_REGISTRANT: 0xC3C3C3C3C3C3C3C3}

TYPES = {
    "WE": WRITE_EXCLUSIVE,
    "EA": EXCLUSIVE_ACCESS,
    "WE-RO": WRITE_EXCLUSIVE_REGISTRANTS_ONLY,
    "EA-RO": EXCLUSIVE_ACCESS_REGISTRANTS_ONLY,
    "WE-AR": WRITE_EXCLUSIVE_ALL_REGISTRANTS,
    "EA-AR": EXCLUSIVE_ACCESS_ALL_REGISTRANTS,
}

OK, RC = "GOOD", "RESERVATION CONFLICT"
COMMANDS = ("READ", "WRITE", "READ KEYS", "READ RESERVATION", "REGISTER", "RESERVE", "RELEASE")
# How to read a row: the holder gets everything. Another nexus, per SBC-3: READ is blocked
# by the Exclusive Access types, WRITE by every type, except that the registrants-only and
# all-registrants types admit registered nexuses. PR IN is always allowed. PR OUT: REGISTER
# is allowed from anyone; RESERVE only from a holder (same type: GOOD, no change); RELEASE
# from any registrant (a non-holder's release is GOOD and changes nothing), never from a
# non-registrant. With the all-registrants types every registrant is a holder.
EXPECTED = {
    #  type    role              READ WRITE KEYS RESV  REGISTER RESERVE RELEASE
    ("WE",    HOLDER):          (OK,  OK,   OK,  OK,   OK,      OK,     OK),
    ("WE",    REGISTRANT):      (OK,  RC,   OK,  OK,   OK,      RC,     OK),
    ("WE",    NON_REGISTRANT):  (OK,  RC,   OK,  OK,   OK,      RC,     RC),
    ("EA",    HOLDER):          (OK,  OK,   OK,  OK,   OK,      OK,     OK),
    ("EA",    REGISTRANT):      (RC,  RC,   OK,  OK,   OK,      RC,     OK),
    ("EA",    NON_REGISTRANT):  (RC,  RC,   OK,  OK,   OK,      RC,     RC),
    ("WE-RO", HOLDER):          (OK,  OK,   OK,  OK,   OK,      OK,     OK),
    ("WE-RO", REGISTRANT):      (OK,  OK,   OK,  OK,   OK,      RC,     OK),
    ("WE-RO", NON_REGISTRANT):  (OK,  RC,   OK,  OK,   OK,      RC,     RC),
    ("EA-RO", HOLDER):          (OK,  OK,   OK,  OK,   OK,      OK,     OK),
    ("EA-RO", REGISTRANT):      (OK,  OK,   OK,  OK,   OK,      RC,     OK),
    ("EA-RO", NON_REGISTRANT):  (RC,  RC,   OK,  OK,   OK,      RC,     RC),
    ("WE-AR", HOLDER):          (OK,  OK,   OK,  OK,   OK,      OK,     OK),
    ("WE-AR", REGISTRANT):      (OK,  OK,   OK,  OK,   OK,      OK,     OK),
    ("WE-AR", NON_REGISTRANT):  (OK,  RC,   OK,  OK,   OK,      RC,     RC),
    ("EA-AR", HOLDER):          (OK,  OK,   OK,  OK,   OK,      OK,     OK),
    ("EA-AR", REGISTRANT):      (OK,  OK,   OK,  OK,   OK,      OK,     OK),
    ("EA-AR", NON_REGISTRANT):  (RC,  RC,   OK,  OK,   OK,      RC,     RC),
}
CASES = [
    pytest.param(type_name, role, command, expected[i], id=f"{type_name}-{role}-{command}")
    for (type_name, role), expected in EXPECTED.items()
    for i, command in enumerate(COMMANDS)
]
LBA = 16
HOLDER_DATA, NEW_DATA = b"\x5a" * 512, b"\xa5" * 512


@pytest.fixture(scope="module")
def pr_target(tmp_path_factory):
    """One target for the module: each case starts from no registrations (checked)."""
    target = RunningTarget(tmp_path_factory.mktemp("pr-types"), TargetOptions())
    yield target
    target.stop()


@pytest.fixture
def reserved(pr_target, type_name):
    """The three sessions with the holder and the registrant registered and the holder's
    reservation of the case's type in place; CLEAR from the holder afterwards."""
    sessions = {role: pr_target.session(initiator_name=name, isid=isid)
                for role, (name, isid) in NEXUSES.items()}
    holder = sessions[HOLDER]
    assert read_keys(holder) == [], "a previous case left registrations behind"
    assert holder.write10(LBA, HOLDER_DATA).status == GOOD
    assert register(holder, KEYS[HOLDER]).status == GOOD
    assert register(sessions[REGISTRANT], KEYS[REGISTRANT]).status == GOOD
    pr_type = TYPES[type_name]
    assert reserve(holder, KEYS[HOLDER], pr_type).status == GOOD
    yield sessions, pr_type
    assert past_unit_attentions(lambda: clear(holder, KEYS[HOLDER])).status == GOOD
    for session in sessions.values():
        session.logout()
        session.close()


def run_command(command: str, session, key: int, registered: bool, pr_type: int):
    if command == "READ":
        return session.read10(LBA, 1)
    if command == "WRITE":
        return session.write10(LBA, NEW_DATA)
    if command == "READ KEYS":
        return pr_in(session, READ_KEYS)
    if command == "READ RESERVATION":
        return pr_in(session, READ_RESERVATION)
    if command == "REGISTER":
        # a registrant re-registers its own key; a non-registrant registers a new one
        return register(session, key, current_key=key if registered else 0)
    if command == "RESERVE":
        return reserve(session, key, pr_type)          # the type already reserved
    assert command == "RELEASE"
    return release(session, key, pr_type)


@pytest.mark.parametrize("type_name,role,command,expected", CASES)
def test_command_under_each_reservation_type(reserved, type_name, role, command, expected):
    sessions, pr_type = reserved
    session, holder = sessions[role], sessions[HOLDER]
    assert session.tur().status == GOOD                  # no unit attention pending
    keys_before, reservation_before = read_keys(holder), read_reservation(holder)
    all_registrants = pr_type in (WRITE_EXCLUSIVE_ALL_REGISTRANTS,
                                  EXCLUSIVE_ACCESS_ALL_REGISTRANTS)
    assert keys_before == [KEYS[HOLDER], KEYS[REGISTRANT]]
    assert reservation_before == Reservation(0 if all_registrants else KEYS[HOLDER], pr_type)

    result = run_command(command, session, KEYS[role], role != NON_REGISTRANT, pr_type)

    status = {GOOD: OK, RESERVATION_CONFLICT: RC}.get(result.status, hex(result.status))
    detail = result.sense.hex() if result.status == CHECK_CONDITION else ""
    assert status == expected, f"{type_name} / {role} / {command}: {status} {detail}"
    if expected == RC:
        # RESERVATION CONFLICT carries no sense and no data, and changes nothing
        assert (result.sense, result.data) == (b"", b"")
        assert read_keys(holder) == keys_before
        assert read_reservation(holder) == reservation_before
    if command == "READ" and expected == OK:
        assert result.data == HOLDER_DATA
    if command == "WRITE":
        block = past_unit_attentions(lambda: holder.read10(LBA, 1))
        assert block.data == (NEW_DATA if expected == OK else HOLDER_DATA)
    if command == "READ KEYS":
        assert parse_keys(result.data) == keys_before
    if command == "READ RESERVATION":
        assert parse_reservation(result.data) == reservation_before
    if command == "RELEASE" and expected == OK:
        is_holder = role == HOLDER or all_registrants
        assert read_reservation(holder) == (None if is_holder else reservation_before)
