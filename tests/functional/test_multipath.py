"""One LU through two portal groups (two target ports): what multipath software relies on.

disk1 is mapped through PortalGroup1 and PortalGroup2 (different TCP ports). Both paths
report the same target port groups and LU identifiers but their own target port; PR and
SPC-2 reservations and unit attentions are kept per I_T nexus and apply across the paths.
"""

from __future__ import annotations

import struct

import pytest

from tests.functional.conftest import (
    C_TARGET,
    CHECK_CONDITION,
    DISK,
    GOOD,
    INITIATOR,
    asc_ascq,
    sense_key,
)
from tests.functional.initiator import LOGICAL_UNIT_RESET

pytestmark = pytest.mark.skipif(C_TARGET, reason="the C istgt reports no ALUA (TPGS=0)")

OTHER_INITIATOR = "iqn.2024-01.org.example:other"
ISID = bytes([0x80, 0, 0, 0x12, 0x34, 0x56])
RESERVATION_CONFLICT = 0x18
KEY, OTHER_KEY = 0xA1A1A1A1A1A1A1A1, 0xB2B2B2B2B2B2B2B2
ALL_TG_PT = 0x04
WRITE_EXCLUSIVE, EXCLUSIVE_ACCESS, WRITE_EXCLUSIVE_REGISTRANTS_ONLY = 1, 3, 5


@pytest.fixture
def paths(make_target):
    """(target, port of PortalGroup1, port of PortalGroup2)."""
    target = make_target(second_portal_group=True)
    first, second = target.addresses[0][1], target.addresses[-1][1]
    assert first != second
    return target, first, second


def login(target, port, initiator_name=INITIATOR, isid=ISID):
    """A session through `port` with its power-on unit attention consumed."""
    initiator = target.connect(initiator_name, isid, port=port)
    initiator.login(DISK)
    for _ in range(4):
        result = initiator.tur()
        if not (result.status == CHECK_CONDITION and sense_key(result.sense) == 6):
            break
    assert initiator.tur().status == GOOD
    return initiator


def rtpg(initiator, parameter_format=0):
    cdb = struct.pack(">BBxxxxIxB", 0xA3, parameter_format << 5 | 0x0A, 4096, 0)
    result = initiator.scsi(cdb, read_length=4096)
    assert result.status == GOOD, result
    return result.data


def groups_of(data: bytes, offset: int) -> list[tuple[int, int, list[int]]]:
    """(asymmetric access state, target port group, relative target port ids)."""
    found = []
    while offset < len(data):
        state, group, count = data[offset] & 0x0F, *struct.unpack_from(">H", data, offset + 2), data[offset + 7]
        ports = [struct.unpack_from(">H", data, offset + 8 + 4 * i + 2)[0] for i in range(count)]
        found.append((state, group, ports))
        offset += 8 + 4 * count
    return found


def designators(initiator) -> dict[tuple[int, int], bytes]:
    """Device Identification VPD: (association, designator type) -> value."""
    result = initiator.inquiry(evpd=True, page=0x83, length=1024)
    assert result.status == GOOD
    data = result.data
    found, offset = {}, 4
    while offset < 4 + struct.unpack_from(">H", data, 2)[0]:
        association, kind, length = (data[offset + 1] >> 4) & 3, data[offset + 1] & 0xF, data[offset + 3]
        found[(association, kind)] = data[offset + 4 : offset + 4 + length]
        offset += 4 + length
    return found


def pr_out(initiator, action, params, scope_type=0):
    cdb = struct.pack(">BBB2xIB", 0x5F, action, scope_type, len(params), 0)
    return initiator.scsi(cdb, data_out=params)


def register(initiator, key, flags=0):
    return pr_out(initiator, 0x00, struct.pack(">QQ4xBx2x", 0, key, flags))


def reserve(initiator, key, pr_type):
    return pr_out(initiator, 0x01, struct.pack(">QQ4xBx2x", key, 0, 0), scope_type=pr_type)


def read_keys(initiator) -> list[int]:
    result = initiator.scsi(struct.pack(">BB5xHB", 0x5E, 0x00, 1024, 0), read_length=1024)
    assert result.status == GOOD
    length = struct.unpack_from(">I", result.data, 4)[0]
    return [struct.unpack_from(">Q", result.data, 8 + i)[0] for i in range(0, length, 8)]


def write_status(initiator) -> int:
    return initiator.write10(0, bytes(512)).status


def test_both_paths_report_the_same_groups_and_lu_but_their_own_port(paths):
    target, first, second = paths
    path_a, path_b = login(target, first), login(target, second)
    for path in (path_a, path_b):
        assert (path.inquiry().data[5] >> 4) & 0x3 == 0b01       # TPGS: implicit only
        data = rtpg(path)
        assert struct.unpack_from(">I", data)[0] == len(data) - 4
        assert groups_of(data, 4) == [(0, 1, [1]), (0, 2, [2])]  # both active/optimized
        extended = rtpg(path, parameter_format=1)
        assert extended[4] == 0x10 and groups_of(extended, 8) == groups_of(data, 4)
    ids_a, ids_b = designators(path_a), designators(path_b)
    assert ids_a[(0, 3)] == ids_b[(0, 3)] and len(ids_a[(0, 3)]) == 16   # one NAA: one LU
    for ids, tag in ((ids_a, 1), (ids_b, 2)):
        assert ids[(1, 8)].rstrip(b"\0").decode() == f"{DISK},t,0x{tag:04x}"
        assert ids[(1, 4)] == struct.pack(">xxH", tag)    # relative target port
        assert ids[(1, 5)] == struct.pack(">xxH", tag)    # target port group


def test_same_isid_through_the_other_portal_group_does_not_reinstate(paths):
    target, first, second = paths
    path_a = login(target, first)
    path_b = login(target, second)        # same initiator port, other target port
    assert path_a.nop_out(b"alive").data == b"alive"
    assert path_a.tur().status == GOOD and path_b.tur().status == GOOD


def test_a_connection_joins_a_session_only_through_its_portal_group(paths):
    target, first, second = paths
    path_a = login(target, first)
    stray = target.connect(INITIATOR, ISID, port=second)
    response = stray.login(DISK, tsih=path_a.tsih, cid=1, expect_status=0x020A)
    assert response.status16 == 0x020A      # session does not exist (in this portal group)


def test_all_tg_pt_registration_is_effective_through_the_other_path(paths):
    target, first, second = paths
    path_a, path_b = login(target, first), login(target, second)
    other = login(target, first, OTHER_INITIATOR, isid=bytes([0x80, 0, 0, 0, 0, 9]))
    assert register(path_a, KEY, flags=ALL_TG_PT).status == GOOD
    assert read_keys(path_b) == [KEY]
    # Registered through path B too: it may reserve with the key and then write.
    assert reserve(path_b, KEY, WRITE_EXCLUSIVE_REGISTRANTS_ONLY).status == GOOD
    assert write_status(path_b) == GOOD
    assert write_status(path_a) == GOOD                        # a registrant as well
    assert write_status(other) == RESERVATION_CONFLICT


def test_registration_without_all_tg_pt_stays_on_its_path(paths):
    target, first, second = paths
    path_a, path_b = login(target, first), login(target, second)
    assert register(path_a, KEY).status == GOOD
    assert reserve(path_b, KEY, WRITE_EXCLUSIVE).status == RESERVATION_CONFLICT
    assert register(path_b, OTHER_KEY).status == GOOD       # its own registration
    assert sorted(read_keys(path_a)) == sorted([KEY, OTHER_KEY])


def test_reservation_through_path_a_conflicts_with_another_initiator_on_path_b(paths):
    target, first, second = paths
    holder = login(target, first)
    other_b = login(target, second, OTHER_INITIATOR, isid=bytes([0x80, 0, 0, 0, 0, 9]))
    assert register(holder, KEY).status == GOOD
    assert reserve(holder, KEY, EXCLUSIVE_ACCESS).status == GOOD
    assert write_status(other_b) == RESERVATION_CONFLICT
    assert other_b.read10(0, 1).status == RESERVATION_CONFLICT
    assert write_status(holder) == GOOD


def test_spc2_reservation_is_per_nexus_across_paths(paths):
    target, first, second = paths
    path_a, path_b = login(target, first), login(target, second)
    assert path_a.scsi(bytes([0x16, 0, 0, 0, 0, 0])).status == GOOD     # RESERVE(6)
    assert write_status(path_a) == GOOD
    # Same initiator port through the other target port is another I_T nexus.
    assert write_status(path_b) == RESERVATION_CONFLICT
    assert path_a.scsi(bytes([0x17, 0, 0, 0, 0, 0])).status == GOOD     # RELEASE(6)
    assert write_status(path_b) == GOOD


def test_lun_reset_on_one_path_is_a_unit_attention_on_the_other(paths):
    target, first, second = paths
    path_a, path_b = login(target, first), login(target, second)
    assert path_a.tmf(LOGICAL_UNIT_RESET, lun=0).response == 0
    result = path_b.tur()
    assert result.status == CHECK_CONDITION and sense_key(result.sense) == 0x6
    assert asc_ascq(result.sense)[0] == 0x29       # POWER ON, RESET, OR BUS DEVICE RESET
    assert path_b.tur().status == GOOD             # reported once


def test_preempt_through_one_path_reaches_the_other_path_of_the_victim(paths):
    target, first, second = paths
    victim_a, victim_b = login(target, first), login(target, second)
    preemptor = login(target, second, OTHER_INITIATOR, isid=bytes([0x80, 0, 0, 0, 0, 9]))
    assert register(victim_a, KEY, flags=ALL_TG_PT).status == GOOD
    assert register(preemptor, OTHER_KEY).status == GOOD
    params = struct.pack(">QQ4xBx2x", OTHER_KEY, KEY, 0)
    assert pr_out(preemptor, 0x04, params, scope_type=WRITE_EXCLUSIVE).status == GOOD  # PREEMPT
    for victim in (victim_a, victim_b):
        result = victim.tur()
        assert result.status == CHECK_CONDITION and sense_key(result.sense) == 0x6
        assert asc_ascq(result.sense) == (0x2A, 0x05)   # REGISTRATIONS PREEMPTED
    assert read_keys(victim_b) == [OTHER_KEY]
