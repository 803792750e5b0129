"""Implicit ALUA: REPORT TARGET PORT GROUPS encoding and the target-port designators of the
Device Identification VPD page, for an LU reached through two portal groups."""

from __future__ import annotations

import struct

import pytest

from istgt.scsi import alua
from istgt.scsi.command import ITNexus
from istgt.scsi.constants import Asc, ScsiStatus, SenseKey
from tests.unit.test_scsi_disk import NEXUS, TARGET, expect_check, make_device, make_lu, run
from tests.unit.test_scsi_spc import inquiry, parse_designators

HOST = NEXUS.initiator_port
PATH1 = ITNexus(HOST, f"{TARGET},t,0x0001", 1)
PATH2 = ITNexus(HOST, f"{TARGET},t,0x0002", 2)
# PortalGroup1 is mapped twice (two initiator groups): still one target port.
TWO_PORTAL_GROUPS = ((1, 1), (2, 1), (1, 2))


def multipath_device(**lu):
    device = make_device(lu=make_lu(mappings=TWO_PORTAL_GROUPS, **lu))
    run(device, [0x00] * 6, nexus=PATH2)       # consume PATH2's power-on unit attention
    return device


def rtpg(device, parameter_format=0, length=1024, nexus=PATH1, byte2=0):
    cdb = struct.pack(">BBB3xIxB", 0xA3, parameter_format << 5 | 0x0A, byte2, length, 0)
    return run(device, cdb, nexus=nexus)


def descriptors(data: bytes, offset: int) -> list[tuple]:
    """(state byte, supported byte, group, status, [relative port ids]) per group."""
    found = []
    while offset < len(data):
        state, supported, group, status, count = struct.unpack_from(">BBHxBxB", data, offset)
        ports = [struct.unpack_from(">xxH", data, offset + 8 + 4 * i)[0] for i in range(count)]
        found.append((state, supported, group, status, ports))
        offset += 8 + 4 * count
    assert offset == len(data)
    return found


def test_length_only_format_lists_one_active_optimized_group_per_portal_group():
    task = rtpg(multipath_device())
    assert task.status == ScsiStatus.GOOD
    data = bytes(task.data_in)
    assert struct.unpack_from(">I", data)[0] == len(data) - 4
    assert descriptors(data, 4) == [
        (0x00, 0x01, 1, 0x00, [1]),   # PREF=0, active/optimized; AO_SUP only
        (0x00, 0x01, 2, 0x00, [2]),
    ]


def test_extended_format_has_format_type_and_implicit_transition_time():
    data = bytes(rtpg(multipath_device(), parameter_format=1).data_in)
    assert struct.unpack_from(">I", data)[0] == len(data) - 4   # counts the extended header
    assert data[4] == 0x10                                       # FORMAT TYPE 001b
    assert data[5] == alua.IMPLICIT_TRANSITION_SECONDS
    assert data[6:8] == b"\0\0"
    assert [d[2] for d in descriptors(data, 8)] == [1, 2]


def test_both_paths_report_the_same_groups():
    device = multipath_device()
    assert bytes(rtpg(device, nexus=PATH1).data_in) == bytes(rtpg(device, nexus=PATH2).data_in)


def test_the_arrival_port_is_listed_even_without_a_mapping():
    device = make_device()     # a config without Mapping lines (unit-test LU)
    data = bytes(rtpg(device).data_in)
    assert descriptors(data, 4) == [(0x00, 0x01, 1, 0x00, [1])]


@pytest.mark.parametrize("parameter_format", range(2, 8))
def test_unknown_parameter_data_format_is_invalid_field(parameter_format):
    task = rtpg(multipath_device(), parameter_format=parameter_format)
    expect_check(task, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB)
    assert task.sense[15] == 0xC0 | 0x08 | 7 and task.sense[16:18] == b"\x00\x01"


def test_reserved_cdb_byte_is_invalid_field():
    task = rtpg(multipath_device(), byte2=0x01)
    expect_check(task, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB)
    assert task.sense[16:18] == b"\x00\x02"


@pytest.mark.parametrize("length", [0, 3, 4, 11, 12])
def test_data_is_cut_to_the_allocation_length(length):
    full = bytes(rtpg(multipath_device()).data_in)
    task = rtpg(multipath_device(), length=length)
    assert task.status == ScsiStatus.GOOD and bytes(task.data_in or b"") == full[:length]


def test_answered_on_an_offline_unit():
    task = rtpg(multipath_device(online=False))
    assert task.status == ScsiStatus.GOOD and len(task.data_in) == 4 + 2 * 12


def test_listed_in_report_supported_operation_codes_with_its_usage_mask():
    cdb = struct.pack(">BBBBHIxB", 0xA3, 0x0C, 0x02, 0xA3, 0x0A, 512, 0)
    data = bytes(run(multipath_device(), cdb).data_in)
    assert data[1] & 0x07 == 0x03                          # supported, as in the standard
    assert data[4:] == bytes([0xA3, 0xEA, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0xC0])


def test_device_identification_names_the_arrival_port_and_its_group():
    device = multipath_device()
    pages = {path: parse_designators(bytes(inquiry_from(device, path))[4:]) for path in (PATH1, PATH2)}
    for path, found in pages.items():
        port = [d for d in found if d["association"] == 1]
        by_type = {d["type"]: d["value"] for d in port}
        assert by_type[8].rstrip(b"\0").decode() == path.target_port
        assert by_type[4] == struct.pack(">xxH", path.relative_port_id)
        assert by_type[5] == struct.pack(">xxH", path.relative_port_id)
        assert all(d["piv"] and d["protocol"] == 5 for d in port)
    # What names the LU and the target device is identical on both paths (multipath merges).
    lu_and_device = {path: [d for d in found if d["association"] != 1]
                     for path, found in pages.items()}
    assert lu_and_device[PATH1] == lu_and_device[PATH2]
    assert lu_and_device[PATH1][0]["type"] == 3                 # NAA first


def inquiry_from(device, nexus):
    return run(device, [0x12, 1, 0x83, 0x04, 0x00, 0], nexus=nexus).data_in


def test_naa_does_not_depend_on_the_mapping():
    def naa(device):
        return parse_designators(bytes(inquiry(device, 0x83).data_in)[4:])[0]["value"]
    assert naa(multipath_device()) == naa(make_device())


def test_register_and_move_to_the_other_target_port():
    # PR REGISTER AND MOVE may name the second port by relative id once the LU knows it.
    device = multipath_device()
    key, new_key = 0x1111, 0x2222
    register = struct.pack(">QQ4xBx2x", 0, key, 0)
    pr_out = lambda action, scope_type, params, nexus=PATH1: run(  # noqa: E731
        device, struct.pack(">BBB2xIB", 0x5F, action, scope_type, len(params), 0), params,
        nexus=nexus)
    assert pr_out(0x00, 0x00, register).status == ScsiStatus.GOOD
    assert pr_out(0x01, 0x01, struct.pack(">QQ4xBx2x", key, 0, 0)).status == ScsiStatus.GOOD
    other = "iqn.1994-05.com.example:other"
    transport_id = struct.pack(">BxH", 0x05, 32) + other.encode().ljust(32, b"\0")
    move = struct.pack(">QQxBHI", key, new_key, 0, 2, len(transport_id)) + transport_id
    assert pr_out(0x07, 0x01, move).status == ScsiStatus.GOOD
    holder_b = ITNexus(f"{other},i,0x00023d000009", PATH2.target_port, 2)
    holder_a = ITNexus(f"{other},i,0x00023d000009", PATH1.target_port, 1)
    run(device, [0x00] * 6, nexus=holder_b)
    run(device, [0x00] * 6, nexus=holder_a)
    write = [0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0]
    assert run(device, write, bytes(512), nexus=holder_b).status == ScsiStatus.GOOD
    # Write Exclusive: the same initiator through the other port is not the holder.
    assert run(device, write, bytes(512), nexus=holder_a).status == ScsiStatus.RESERVATION_CONFLICT


def test_answered_to_a_non_holder_under_exclusive_access():
    # Path checkers of other hosts keep polling while one host holds the LU.
    device = multipath_device()
    params = struct.pack(">QQ4xBx2x", 0, 0x77, 0)
    assert run(device, struct.pack(">BBB2xIB", 0x5F, 0, 0, 24, 0), params).status == ScsiStatus.GOOD
    params = struct.pack(">QQ4xBx2x", 0x77, 0, 0)
    assert run(device, struct.pack(">BBB2xIB", 0x5F, 1, 3, 24, 0), params).status == ScsiStatus.GOOD
    stranger = ITNexus("iqn.1994-05.com.example:stranger,i,0x1", PATH2.target_port, 2)
    run(device, [0x00] * 6, nexus=stranger)
    read = [0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]
    assert run(device, read, nexus=stranger).status == ScsiStatus.RESERVATION_CONFLICT
    assert rtpg(device, nexus=stranger).status == ScsiStatus.GOOD
