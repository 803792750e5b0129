"""SPC commands of the Disk device: INQUIRY/VPD, REPORT LUNS, MODE SENSE/SELECT, RSOC."""

from __future__ import annotations

import struct

from istgt.scsi import spc
from istgt.scsi.command import ScsiTask
from istgt.scsi.constants import Asc, ScsiStatus, SenseKey
from tests.unit.test_scsi_disk import (
    BLOCKS,
    NEXUS,
    OTHER,
    TARGET,
    cdb10,
    cdb16,
    expect_check,
    make_device,
    make_lu,
    make_lun,
    run,
    sense_of,
)


def inquiry(device, page=None, length=255):
    cdb = [0x12, 1 if page is not None else 0, page or 0, length >> 8, length & 0xFF, 0]
    return run(device, cdb)


def parse_designators(body):
    found = []
    offset = 0
    while offset < len(body):
        code_set, kind, _, length = body[offset : offset + 4]
        found.append(
            {
                "protocol": code_set >> 4,
                "code_set": code_set & 0x0F,
                "piv": bool(kind & 0x80),
                "association": (kind >> 4) & 0x03,
                "type": kind & 0x0F,
                "value": body[offset + 4 : offset + 4 + length],
            }
        )
        offset += 4 + length
    assert offset == len(body)
    return found


# --- INQUIRY ---------------------------------------------------------------------------------


def test_standard_inquiry_layout():
    data = bytes(inquiry(make_device()).data_in)
    assert len(data) == 96 and data[4] == 91
    assert data[0] == 0x00 and data[1] == 0x00  # disk, not removable
    assert data[2] == 0x06 and data[3] == 0x12  # SPC-4, HISUP + format 2
    assert data[5] == 0x10  # TPGS 01b: implicit ALUA only
    assert data[7] == 0x02  # CMDQUE
    assert data[8:16] == b"FreeBSD " and data[16:32] == b"iSCSI DISK      "
    assert data[32:36] == b"0001"
    descriptors = struct.unpack(">4H", data[58:66])
    assert 0x0460 in descriptors and 0x04C0 in descriptors


def test_inquiry_truncates_to_allocation_length():
    device = make_device()
    for length in (5, 36, 95, 511):
        task = inquiry(device, length=length)
        assert task.status == ScsiStatus.GOOD and len(task.data_in) == min(96, length)


def test_inquiry_page_code_without_evpd_is_invalid():
    task = run(make_device(), [0x12, 0, 0x80, 0, 255, 0])
    expect_check(task, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB)
    assert task.sense[16:18] == b"\x00\x02"


def test_inquiry_cmddt_is_invalid():
    expect_check(run(make_device(), [0x12, 2, 0, 0, 255, 0]), SenseKey.ILLEGAL_REQUEST,
                 Asc.INVALID_FIELD_IN_CDB)


def test_supported_vpd_pages_are_sorted_and_each_answers():
    device = make_device()
    data = bytes(inquiry(device, 0x00).data_in)
    pages = list(data[4 : 4 + data[3]])
    assert pages == sorted(pages) == [0x00, 0x80, 0x83, 0x86, 0x8F, 0xB0, 0xB1, 0xB2]
    for page in pages:
        answer = bytes(inquiry(device, page).data_in)
        assert answer[1] == page and len(answer) == 4 + struct.unpack(">H", answer[2:4])[0]


def test_unsupported_vpd_page_is_invalid_field():
    expect_check(inquiry(make_device(), 0xB9), SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB)


def test_unit_serial_number_prefers_lun_serial():
    device = make_device(lun=make_lun(serial="LUNSERIAL"))
    assert bytes(inquiry(device, 0x80).data_in)[4:] == b"LUNSERIAL"
    assert bytes(inquiry(make_device(), 0x80).data_in)[4:] == b"10000001"


def test_device_identification_designators():
    data = bytes(inquiry(make_device(), 0x83).data_in)
    designators = parse_designators(data[4:])
    naa, t10, device_name, port_name, relative, port_group = designators
    assert (naa["type"], naa["association"], naa["code_set"]) == (3, 0, 1)
    assert len(naa["value"]) == 16 and naa["value"][0] >> 4 == 6
    assert (t10["type"], t10["code_set"]) == (1, 2) and t10["value"].startswith(b"FreeBSD ")
    assert (device_name["type"], device_name["association"], device_name["protocol"]) == (8, 2, 5)
    assert device_name["piv"] and device_name["value"] == TARGET.encode() + b"\0" * (
        4 - len(TARGET) % 4
    )
    assert len(device_name["value"]) % 4 == 0
    assert (port_name["type"], port_name["association"]) == (8, 1)
    assert port_name["value"].rstrip(b"\0") == NEXUS.target_port.encode()
    assert (relative["type"], relative["association"]) == (4, 1)
    assert relative["value"] == b"\x00\x00\x00\x01"
    assert (port_group["type"], port_group["association"]) == (5, 1)
    assert port_group["value"] == b"\x00\x00\x00\x01"


def test_naa_is_stable_and_unique_per_target_and_lun():
    def naa(device):
        return parse_designators(bytes(inquiry(device, 0x83).data_in)[4:])[0]["value"]

    first = naa(make_device())
    assert naa(make_device()) == first
    assert naa(make_device(lun=make_lun(number=1))) != first
    assert naa(make_device(lu=make_lu(name=TARGET + "x"))) != first


def test_block_limits_page():
    data = bytes(inquiry(make_device(), 0xB0).data_in)
    assert data[3] == 0x3C
    assert data[5] == 255  # MAXIMUM COMPARE AND WRITE LENGTH
    assert struct.unpack(">H", data[6:8])[0] == 8  # 4 KiB granularity in 512-byte blocks
    assert struct.unpack(">I", data[8:12])[0] == 32 * 1024 * 1024 // 512
    assert struct.unpack(">II", data[20:28]) == (0xFFFFFFFF, 256)  # UNMAP limits
    assert struct.unpack(">II", data[28:36]) == (8, 0x80000000)  # granularity, UGAVALID


def test_block_limits_without_provisioning_has_no_unmap():
    from istgt.lu.backends import MemoryBackend

    device = make_device(backend=MemoryBackend(BLOCKS * 512, supports_unmap=False))
    data = bytes(inquiry(device, 0xB0).data_in)
    assert data[20:36] == bytes(16)


def test_block_device_characteristics_from_config():
    data = bytes(inquiry(make_device(lun=make_lun(rpm=1, form_factor=3)), 0xB1).data_in)
    assert data[3] == 0x3C and data[4:6] == b"\x00\x01" and data[7] & 0x0F == 3


def test_logical_block_provisioning_page():
    from istgt.lu.backends import MemoryBackend

    data = bytes(inquiry(make_device(), 0xB2).data_in)
    assert data[1] == 0xB2 and data[3] == 4 and data[5] == 0xE4 and data[6] == 0x02
    full = make_device(backend=MemoryBackend(BLOCKS * 512, supports_unmap=False))
    data = bytes(inquiry(full, 0xB2).data_in)
    assert data[3] == 4 and data[5] == 0 and data[6] == 0


# --- REPORT LUNS -----------------------------------------------------------------------------


def test_report_luns_encoding():
    assert spc.report_luns([3, 0, 300]) == (
        struct.pack(">I4x", 24) + bytes([0, 0] + [0] * 6 + [0, 3] + [0] * 6 + [0x41, 0x2C] + [0] * 6)
    )


def test_report_luns_through_device():
    device = make_device(lu=make_lu(luns={0: None, 1: None}))
    data = bytes(run(device, [0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]).data_in)
    assert data[:4] == b"\x00\x00\x00\x10" and data[8:10] == b"\x00\x00" and data[16:18] == b"\x00\x01"


def test_report_luns_small_allocation_and_bad_select():
    device = make_device()
    expect_check(run(device, [0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0]), SenseKey.ILLEGAL_REQUEST,
                 Asc.INVALID_FIELD_IN_CDB)
    expect_check(run(device, [0xA0, 0, 7, 0, 0, 0, 0, 0, 1, 0, 0, 0]), SenseKey.ILLEGAL_REQUEST,
                 Asc.INVALID_FIELD_IN_CDB)


def test_no_such_lun():
    task = ScsiTask(5, bytes([0x12, 0, 0, 0, 96, 0]), NEXUS)
    spc.no_such_lun(task)
    assert task.status == ScsiStatus.GOOD and bytes(task.data_in)[0] == 0x7F
    task = ScsiTask(5, bytes([0x00] * 6), NEXUS)
    spc.no_such_lun(task)
    expect_check(task, SenseKey.ILLEGAL_REQUEST, Asc.LOGICAL_UNIT_NOT_SUPPORTED)
    task = ScsiTask(5, bytes([0x03, 0, 0, 0, 18, 0]), NEXUS)
    spc.no_such_lun(task)
    data = bytes(task.data_in)
    assert task.status == ScsiStatus.GOOD and data[2] == 5 and data[12] == 0x25


# --- MODE SENSE / MODE SELECT -------------------------------------------------------------


def mode_sense6(device, page, pc=0, subpage=0, dbd=False, length=255, nexus=NEXUS):
    return run(device, [0x1A, 0x08 if dbd else 0, pc << 6 | page, subpage, length, 0], nexus=nexus)


def mode_sense10(device, page, pc=0, llbaa=False, length=1024):
    return run(device, [0x5A, 0x10 if llbaa else 0, pc << 6 | page, 0, 0, 0, 0, length >> 8,
                        length & 0xFF, 0])


def pages_of(data, header=4):
    descriptor_length = data[3] if header == 4 else struct.unpack(">H", data[6:8])[0]
    offset = header + descriptor_length
    pages = {}
    while offset < len(data):
        if data[offset] & 0x40:
            key = (data[offset] & 0x3F, data[offset + 1])
            length = 4 + struct.unpack(">H", data[offset + 2 : offset + 4])[0]
        else:
            key = (data[offset] & 0x3F, 0)
            length = 2 + data[offset + 1]
        pages[key] = data[offset : offset + length]
        offset += length
    return pages


def test_mode_sense_6_all_pages_header_and_block_descriptor():
    data = bytes(mode_sense6(make_device(), 0x3F).data_in)
    assert data[0] == len(data) - 1 and data[2] == 0x10 and data[3] == 8  # DPOFUA
    assert data[4:12] == struct.pack(">II", BLOCKS, 512)
    pages = pages_of(data)
    assert {(0x08, 0), (0x0A, 0), (0x01, 0), (0x1C, 0)} <= set(pages)
    assert (0x0A, 1) not in pages  # subpages only with subpage FFh
    assert pages[(0x08, 0)][2] & 0x04  # WCE by default


def test_mode_sense_all_subpages_include_control_extension():
    pages = pages_of(bytes(mode_sense6(make_device(), 0x3F, subpage=0xFF).data_in))
    assert (0x0A, 1) in pages and len(pages[(0x0A, 1)]) == 32


def test_mode_sense_10_long_lba_descriptor():
    data = bytes(mode_sense10(make_device(), 0x08, llbaa=True).data_in)
    assert data[4] & 0x01 and struct.unpack(">H", data[6:8])[0] == 16
    assert data[8:24] == struct.pack(">Q4xI", BLOCKS, 512)
    assert struct.unpack(">H", data[0:2])[0] == len(data) - 2


def test_mode_sense_dbd_and_unknown_page():
    device = make_device()
    assert bytes(mode_sense6(device, 0x08, dbd=True).data_in)[3] == 0
    expect_check(mode_sense6(device, 0x05), SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB)


def test_mode_sense_read_only_sets_wp():
    assert bytes(mode_sense6(make_device(lu=make_lu(read_only=True)), 0x3F).data_in)[2] & 0x80


def test_mode_sense_allocation_length_truncates():
    task = mode_sense6(make_device(), 0x3F, length=4)
    assert len(task.data_in) == 4


def test_mode_sense_changeable_default_and_saved():
    device = make_device(lun=make_lun(write_cache=False))
    changeable = pages_of(bytes(mode_sense6(device, 0x3F, pc=1).data_in))
    assert changeable[(0x08, 0)][2] == 0x05 and changeable[(0x0A, 0)][2] == 0x04
    assert changeable[(0x0A, 0)][4] == 0x08 and changeable[(0x01, 0)][2] == 0
    default = pages_of(bytes(mode_sense6(device, 0x08, pc=2).data_in))
    saved = pages_of(bytes(mode_sense6(device, 0x08, pc=3).data_in))
    assert default[(0x08, 0)][2] & 0x04 == 0 and default == saved


def mode_select6(device, page_bytes, nexus=NEXUS, sp=False):
    parameters = bytes(4) + bytes(page_bytes)
    cdb = [0x15, 0x10 | (1 if sp else 0), 0, 0, len(parameters), 0]
    return run(device, cdb, parameters, nexus=nexus)


def current_page(device, page, subpage=0):
    return bytearray(pages_of(bytes(mode_sense6(device, page, subpage=subpage).data_in))[(page, subpage)])


def test_mode_select_round_trip_and_unit_attention_to_others():
    device = make_device()
    run(device, [0] * 6, nexus=OTHER)  # OTHER consumes its power-on UA
    control = current_page(device, 0x0A)
    control[2] |= 0x04  # D_SENSE
    assert mode_select6(device, control).status == ScsiStatus.GOOD
    assert current_page(device, 0x0A)[2] & 0x04
    assert run(device, [0] * 6).status == ScsiStatus.GOOD  # the changer gets no UA
    expect_check(run(device, [0] * 6, nexus=OTHER), SenseKey.UNIT_ATTENTION,
                 Asc.MODE_PARAMETERS_CHANGED)


def test_d_sense_switches_to_descriptor_sense():
    device = make_device()
    control = current_page(device, 0x0A)
    control[2] |= 0x04
    mode_select6(device, control)
    task = run(device, cdb16(0x88, 0xFFFFFFFFFFFFFFFF, 1))
    assert task.sense[0] == 0x72 and sense_of(task) == (SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE)
    task = run(device, cdb10(0x28, 0, 1, flags=0x20))
    assert task.sense[0] == 0x72 and task.sense[7] == 8
    assert task.sense[8:16] == bytes([0x02, 0x06, 0, 0, 0xCD, 0, 1, 0])  # SKS descriptor


def test_swp_write_protects():
    device = make_device()
    control = current_page(device, 0x0A)
    control[4] |= 0x08
    assert mode_select6(device, control).status == ScsiStatus.GOOD
    assert bytes(mode_sense6(device, 0x0A).data_in)[2] & 0x80  # WP
    assert run(device, cdb10(0x28, 0, 1)).status == ScsiStatus.GOOD
    expect_check(run(device, cdb10(0x2A, 0, 1), bytes(512)), SenseKey.DATA_PROTECT,
                 Asc.LOGICAL_UNIT_SOFTWARE_WRITE_PROTECTED)


def test_wce_off_via_mode_select_makes_writes_durable():
    from istgt.lu.backends import MemoryBackend

    backend = MemoryBackend(BLOCKS * 512)
    device = make_device(backend=backend)
    caching = current_page(device, 0x08)
    caching[2] &= ~0x04
    assert mode_select6(device, caching).status == ScsiStatus.GOOD
    run(device, cdb10(0x2A, 0, 1), bytes(512))
    assert backend.durable_writes == 1


def test_mode_select_rejects_changing_a_fixed_bit():
    device = make_device()
    control = current_page(device, 0x0A)
    control[3] ^= 0x02  # QERR is not changeable
    task = mode_select6(device, control)
    expect_check(task, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_PARAMETER_LIST)
    assert task.sense[15] & 0x40 == 0  # C/D = 0: the parameter list
    assert task.sense[16:18] == struct.pack(">H", 4 + 3)


def test_mode_select_errors():
    device = make_device()
    caching = current_page(device, 0x08)
    expect_check(mode_select6(device, caching, sp=True), SenseKey.ILLEGAL_REQUEST,
                 Asc.SAVING_PARAMETERS_NOT_SUPPORTED)
    expect_check(mode_select6(device, bytes([0x05, 0x0A]) + bytes(10)), SenseKey.ILLEGAL_REQUEST,
                 Asc.INVALID_FIELD_IN_PARAMETER_LIST)
    expect_check(mode_select6(device, caching[:12]), SenseKey.ILLEGAL_REQUEST,
                 Asc.INVALID_FIELD_IN_PARAMETER_LIST)
    short = run(device, [0x15, 0x10, 0, 0, 2, 0], bytes(2))
    expect_check(short, SenseKey.ILLEGAL_REQUEST, Asc.PARAMETER_LIST_LENGTH_ERROR)
    assert run(device, [0x15, 0x10, 0, 0, 0, 0]).status == ScsiStatus.GOOD


def test_mode_select_block_descriptor_must_keep_block_length():
    device = make_device()
    good = struct.pack(">BBBB", 0, 0, 0, 8) + struct.pack(">II", 0, 512)
    assert run(device, [0x15, 0x10, 0, 0, len(good), 0], good).status == ScsiStatus.GOOD
    bad = struct.pack(">BBBB", 0, 0, 0, 8) + struct.pack(">II", 0, 4096)
    expect_check(run(device, [0x15, 0x10, 0, 0, len(bad), 0], bad), SenseKey.ILLEGAL_REQUEST,
                 Asc.INVALID_FIELD_IN_PARAMETER_LIST)


def test_mode_select_10():
    device = make_device()
    caching = current_page(device, 0x08)
    caching[2] |= 0x01  # RCD
    parameters = bytes(8) + bytes(caching)
    cdb = [0x55, 0x10, 0, 0, 0, 0, 0, 0, len(parameters), 0]
    assert run(device, cdb, parameters).status == ScsiStatus.GOOD
    assert current_page(device, 0x08)[2] & 0x01


def test_reset_restores_mode_pages():
    device = make_device()
    control = current_page(device, 0x0A)
    control[2] |= 0x04
    mode_select6(device, control)
    device.reset("lun")
    expect_check(mode_sense6(device, 0x0A), SenseKey.UNIT_ATTENTION,
                 Asc.BUS_DEVICE_RESET_FUNCTION_OCCURRED)
    assert not current_page(device, 0x0A)[2] & 0x04


# --- REPORT SUPPORTED OPERATION CODES ------------------------------------------------------


def rsoc(device, option, opcode=0, action=0, rctd=False, length=65535):
    return run(device, [0xA3, 0x0C, (0x80 if rctd else 0) | option, opcode, action >> 8,
                        action & 0xFF, 0, 0, length >> 8, length & 0xFF, 0, 0])


def parse_all(data):
    length = struct.unpack(">I", data[:4])[0]
    offset, found = 4, []
    while offset < 4 + length:
        opcode, action, flags, cdb_length = data[offset], *struct.unpack(">H", data[offset + 2 : offset + 4]), data[offset + 5], struct.unpack(">H", data[offset + 6 : offset + 8])[0]
        found.append((opcode, action, flags, cdb_length))
        offset += 8 + (12 if flags & 0x02 else 0)
    return found


def test_rsoc_all_commands_matches_table():
    device = make_device()
    found = parse_all(bytes(rsoc(device, 0).data_in))
    assert len(found) == len(device.table.specs)
    assert (0x28, 0, 0, 10) in found and (0x9E, 0x10, 1, 16) in found
    with_timeouts = parse_all(bytes(rsoc(device, 0, rctd=True).data_in))
    assert all(flags & 0x02 for _, _, flags, _ in with_timeouts)


def test_rsoc_one_command_usage_data():
    device = make_device()
    data = bytes(rsoc(device, 1, 0x28).data_in)
    assert data[1] & 0x07 == 3 and struct.unpack(">H", data[2:4])[0] == 10
    assert data[4:14] == bytes([0x28, 0x1A, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0xC0])
    not_supported = bytes(rsoc(device, 1, 0xC7).data_in)
    assert not_supported[1] & 0x07 == 1
    expect_check(rsoc(device, 1, 0x9E), SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB)
    expect_check(rsoc(device, 2, 0x28), SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB)
    with_action = bytes(rsoc(device, 2, 0x9E, 0x10).data_in)
    assert with_action[4:6] == bytes([0x9E, 0x10])
    expect_check(rsoc(device, 5), SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB)


def test_every_table_entry_rejects_bits_outside_its_usage_mask():
    device = make_device()
    for spec in device.table.specs:
        for index in range(1, spec.cdb_length):
            stray = ~spec.usage[index] & 0xFF
            if index == 1 and spec.service_action is not None:
                stray &= ~0x1F  # the service action field selects the command
            if not stray:
                continue
            cdb = bytearray(spec.cdb_length)
            cdb[0] = spec.opcode
            if spec.service_action is not None:
                cdb[1] = spec.service_action
            cdb[index] |= stray & -stray  # lowest stray bit
            task = run(device, bytes(cdb))
            expect_check(task, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB)
            assert task.sense[16:18] == struct.pack(">H", index), spec.name


def test_report_supported_tmfs():
    data = bytes(run(make_device(), [0xA3, 0x0D, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0]).data_in)
    assert data[0] & 0x80 and data[0] & 0x08  # ABORT TASK, LOGICAL UNIT RESET
