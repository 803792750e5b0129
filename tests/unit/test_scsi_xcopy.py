"""EXTENDED COPY(LID1) / RECEIVE COPY RESULTS / Third-party Copy VPD: parsing, limits,
errors, and copies within one LU and across the LUs of one target."""

from __future__ import annotations

import os
import struct

import pytest

from istgt.lu.backends import FileBackend, MemoryBackend
from istgt.lu.copy_targets import CopyTargets
from istgt.scsi import xcopy
from istgt.scsi.constants import Asc, ScsiStatus, SenseKey
from istgt.scsi.sense import CheckCondition
from tests.unit.test_scsi_disk import (
    NEXUS,
    OTHER,
    expect_check,
    make_device,
    make_lu,
    make_lun,
    run,
)

BL = 512


# --- parameter list builders ---------------------------------------------------------------


def cscd(device=None, naa=None, block_length=BL, peripheral_type=0, kind=0xE4):
    naa = naa if naa is not None else device.identity.naa
    descriptor = bytearray(32)
    descriptor[0] = kind
    descriptor[1] = peripheral_type
    descriptor[4] = 0x01                      # binary code set
    descriptor[5] = 0x03                      # association LU, designator type NAA
    descriptor[7] = len(naa)
    descriptor[8:8 + len(naa)] = naa
    descriptor[29:32] = block_length.to_bytes(3, "big")
    return bytes(descriptor)


def segment(blocks, source_lba, destination_lba, source=0, destination=0, kind=0x02):
    return struct.pack(">BBHHH2xHQQ", kind, 0, 0x18, source, destination, blocks,
                       source_lba, destination_lba)


def parameter_list(cscds, segments, list_id=1, usage=xcopy.HOLD, inline=0):
    targets, segs = b"".join(cscds), b"".join(segments)
    header = struct.pack(">BBH4xII", list_id, usage << 3, len(targets), len(segs), inline)
    return header + targets + segs


def xcopy_cdb(length):
    return bytes([0x83, 0]) + bytes(8) + length.to_bytes(4, "big") + bytes(2)


def extended_copy(device, data, nexus=NEXUS, length=None):
    return run(device, xcopy_cdb(len(data) if length is None else length), data, nexus=nexus)


def receive_copy_results(device, action, list_id=1, allocation_length=1024, nexus=NEXUS):
    cdb = bytes([0x84, action, list_id]) + bytes(7) + allocation_length.to_bytes(4, "big") + bytes(2)
    return run(device, cdb, nexus=nexus)


def target_pair(blocks=4096, second_backend=None):
    """Two LUNs of one target sharing a copy-target registry (as the server builds them)."""
    lu = make_lu(luns={0: None, 1: None})
    first = make_device(blocks, lu=lu, lun=make_lun(number=0))
    second = make_device(blocks, lu=lu, lun=make_lun(number=1), backend=second_backend)
    registry = CopyTargets([first, second])
    first.copy_targets = second.copy_targets = registry
    return first, second


def fill(device, lba, data):
    device.write_blocks(lba, data, force_unit_access=False)


def blocks_of(device, lba, count):
    return bytes(device.read_blocks(lba, count, from_medium=False))


def expect_copy_aborted(task, asc, segment_number=0):
    expect_check(task, SenseKey.COPY_ABORTED, asc)
    assert struct.unpack(">H", task.sense[10:12])[0] == segment_number


# --- copies ----------------------------------------------------------------------------------


def test_copy_within_one_lu():
    device = make_device(4096)
    data = os.urandom(64 * BL)
    fill(device, 10, data)
    task = extended_copy(device, parameter_list([cscd(device)], [segment(64, 10, 3000)]))
    assert task.status == ScsiStatus.GOOD, task.sense.hex()
    assert blocks_of(device, 3000, 64) == data


def test_copy_across_lus_of_one_target_file_to_memory(tmp_path):
    backend = FileBackend.open(str(tmp_path / "lun1.img"), 4096 * BL, read_only=False,
                               block_length=BL)
    first, second = target_pair(second_backend=backend)
    data = os.urandom(3000 * BL)                 # more than one 1 MiB chunk
    fill(second, 5, data)
    # Sent to LUN 0, copying from LUN 1 (CSCD 1) into LUN 0 (CSCD 0), and back to LUN 1.
    request = parameter_list([cscd(first), cscd(second)],
                             [segment(3000, 5, 100, source=1, destination=0),
                              segment(3000, 100, 1000, source=0, destination=1)])
    task = extended_copy(first, request)
    assert task.status == ScsiStatus.GOOD, task.sense.hex()
    assert blocks_of(first, 100, 3000) == data
    assert blocks_of(second, 1000, 3000) == data
    backend.close()


def test_overlapping_copy_upwards_within_one_lu_keeps_the_source_bytes():
    device = make_device(8192)
    data = os.urandom(5000 * BL)                 # several chunks, overlapping by 4900 blocks
    fill(device, 0, data)
    task = extended_copy(device, parameter_list([cscd(device)], [segment(5000, 0, 100)]))
    assert task.status == ScsiStatus.GOOD
    assert blocks_of(device, 100, 5000) == data


def test_overlapping_copy_downwards_within_one_lu():
    device = make_device(8192)
    data = os.urandom(5000 * BL)
    fill(device, 100, data)
    assert extended_copy(device, parameter_list([cscd(device)], [segment(5000, 100, 0)])).status == 0
    assert blocks_of(device, 0, 5000) == data


def test_copy_from_a_read_only_lu_is_allowed():
    lu = make_lu(luns={0: None, 1: None})
    source_backend = MemoryBackend(4096 * BL)
    source_backend.write(0, b"\x5a" * BL * 8)
    source = make_device(lu=make_lu(luns={0: None, 1: None}, read_only=True),
                         lun=make_lun(number=1), backend=source_backend)
    manager = make_device(lu=lu, lun=make_lun(number=0))
    manager.copy_targets = CopyTargets([manager, source])
    task = extended_copy(manager, parameter_list([cscd(source), cscd(manager)],
                                                 [segment(8, 0, 0, source=0, destination=1)]))
    assert task.status == ScsiStatus.GOOD
    assert blocks_of(manager, 0, 8) == b"\x5a" * BL * 8


def test_zero_length_parameter_list_is_not_an_error():
    device = make_device()
    assert extended_copy(device, b"", length=0).status == ScsiStatus.GOOD


def test_zero_block_segment_copies_nothing():
    device = make_device()
    task = extended_copy(device, parameter_list([cscd(device)], [segment(0, 0, 10)]))
    assert task.status == ScsiStatus.GOOD


# --- parameter list errors (ILLEGAL REQUEST, nothing copied) ---------------------------------


def one_segment(device, **kw):
    return parameter_list([cscd(device)], [segment(8, 0, 100)], **kw)


def test_parameter_list_shorter_than_the_header():
    device = make_device()
    expect_check(extended_copy(device, bytes(15)), SenseKey.ILLEGAL_REQUEST,
                 Asc.PARAMETER_LIST_LENGTH_ERROR)


@pytest.mark.parametrize("cut", [1, 28, 29])
def test_parameter_list_length_truncating_a_descriptor(cut):
    device = make_device()
    data = one_segment(device)
    expect_check(extended_copy(device, data[:-cut]), SenseKey.ILLEGAL_REQUEST,
                 Asc.PARAMETER_LIST_LENGTH_ERROR)


def test_descriptor_lists_longer_than_the_maximum():
    device = make_device()
    count = xcopy.MAX_DESCRIPTOR_LIST_LENGTH // 28 + 1
    data = parameter_list([cscd(device)], [segment(1, 0, 1)] * count)
    expect_check(extended_copy(device, data), SenseKey.ILLEGAL_REQUEST,
                 Asc.PARAMETER_LIST_LENGTH_ERROR)


def test_parameter_list_length_above_the_maximum_is_refused_before_data():
    device = make_device()
    too_long = xcopy.PARAMETER_HEADER + xcopy.MAX_DESCRIPTOR_LIST_LENGTH + 1
    expect_check(extended_copy(device, bytes(too_long)), SenseKey.ILLEGAL_REQUEST,
                 Asc.PARAMETER_LIST_LENGTH_ERROR)


def test_too_many_cscd_descriptors():
    device = make_device()
    data = parameter_list([cscd(device)] * (xcopy.MAX_CSCD_DESCRIPTORS + 1), [segment(1, 0, 1)])
    task = extended_copy(device, data)
    expect_check(task, SenseKey.ILLEGAL_REQUEST, Asc.TOO_MANY_TARGET_DESCRIPTORS)
    assert task.sense[15:18] == bytes([0x80, 0, 2])      # SKSV, C/D=0: parameter list byte 2


def test_too_many_segment_descriptors():
    device = make_device()
    data = parameter_list([cscd(device)], [segment(1, 0, 1)] * (xcopy.MAX_SEGMENT_DESCRIPTORS + 1))
    expect_check(extended_copy(device, data), SenseKey.ILLEGAL_REQUEST,
                 Asc.TOO_MANY_SEGMENT_DESCRIPTORS)


def test_unsupported_cscd_type_points_at_it():
    device = make_device()
    data = parameter_list([cscd(device), cscd(device, kind=0xE0)], [segment(1, 0, 1)])
    task = extended_copy(device, data)
    expect_check(task, SenseKey.ILLEGAL_REQUEST, Asc.UNSUPPORTED_TARGET_DESCRIPTOR_TYPE_CODE)
    assert task.sense[15:18] == bytes([0x80, 0, 48])


def test_unsupported_segment_type():
    device = make_device()
    stream = struct.pack(">BBHHH", 0x03, 0, 0x10, 0, 0) + bytes(12)
    task = extended_copy(device, parameter_list([cscd(device)], [stream]))
    expect_check(task, SenseKey.ILLEGAL_REQUEST, Asc.UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE_CODE)
    assert task.sense[15:18] == bytes([0x80, 0, 48])


def test_wrong_block_to_block_descriptor_length():
    device = make_device()
    bad = bytearray(segment(1, 0, 1) + bytes(4))
    bad[2:4] = (0x1C).to_bytes(2, "big")
    task = extended_copy(device, parameter_list([cscd(device)], [bytes(bad)]))
    expect_check(task, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_PARAMETER_LIST)
    assert task.sense[15:18] == bytes([0x80, 0, 50])


def test_reserved_list_id_usage_is_invalid():
    device = make_device()
    task = extended_copy(device, one_segment(device, usage=1))
    expect_check(task, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_PARAMETER_LIST)


def test_inline_data_is_refused():
    device = make_device()
    data = one_segment(device, inline=4) + bytes(4)
    expect_check(extended_copy(device, data), SenseKey.ILLEGAL_REQUEST,
                 Asc.INLINE_DATA_LENGTH_EXCEEDED)


def test_segment_longer_than_the_maximum_segment_length():
    device = make_device(block_length=4096, blocks=64)
    data = parameter_list([cscd(device, block_length=4096)], [segment(0xFFFF, 0, 0)])
    task = extended_copy(device, data)
    expect_check(task, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_PARAMETER_LIST)
    assert task.sense[15:18] == bytes([0x80, 0, 48 + 10])


def test_lu_id_type_is_ignored_as_spc4_says():
    device = make_device()
    target = bytearray(cscd(device))
    target[1] |= 0xC0
    assert extended_copy(device, parameter_list([bytes(target)], [segment(8, 0, 8)])).status == 0


# --- copy target errors (COPY ABORTED, nothing copied) ----------------------------------------


def test_unknown_designator_is_an_unreachable_copy_target():
    device = make_device()
    data = parameter_list([cscd(device), cscd(naa=bytes(16))],
                          [segment(8, 0, 8), segment(8, 0, 16, destination=1)])
    fill(device, 0, b"\x11" * 8 * BL)
    task = extended_copy(device, data)
    expect_copy_aborted(task, Asc.UNREACHABLE_COPY_TARGET, segment_number=1)
    assert task.sense[15:18] == bytes([0x80, 0, 48 + 4])        # SD=0: the CSCD's designator
    assert blocks_of(device, 8, 1) == bytes(BL)                 # segment 0 did not run either


def test_lu_of_another_target_is_unreachable():
    device = make_device()
    stranger = make_device(lu=make_lu(name="iqn.2007-09.jp.ne.peach.istgt:elsewhere"))
    data = parameter_list([cscd(device), cscd(stranger)], [segment(8, 0, 8, destination=1)])
    expect_copy_aborted(extended_copy(device, data), Asc.UNREACHABLE_COPY_TARGET)


def test_cscd_index_beyond_the_list():
    device = make_device()
    task = extended_copy(device, parameter_list([cscd(device)], [segment(8, 0, 8, destination=1)]))
    expect_copy_aborted(task, Asc.UNREACHABLE_COPY_TARGET)
    assert task.sense[15:18] == bytes([0x80 | 0x20, 0, 6])      # SD=1: segment byte 6


@pytest.mark.parametrize("target", [dict(block_length=4096), dict(peripheral_type=1)])
def test_cscd_that_does_not_describe_the_lu(target):
    device = make_device()
    task = extended_copy(device, parameter_list([cscd(device, **target)], [segment(8, 0, 8)]))
    expect_copy_aborted(task, Asc.INCORRECT_COPY_TARGET_DEVICE_TYPE)


def forwarded_fixed_sense(task, role):
    """The copy target's own sense appended to COPY ABORTED fixed sense data."""
    offset = task.sense[8 if role == xcopy.COPY_SOURCE else 9]
    assert offset == 18
    inner = task.sense[offset:]
    return inner[2] & 0x0F, inner[12] << 8 | inner[13]


def test_destination_beyond_capacity_forwards_lba_out_of_range():
    device = make_device(4096)
    fill(device, 0, b"\x22" * 8 * BL)
    task = extended_copy(device, parameter_list([cscd(device)], [segment(2048, 0, 4095)]))
    expect_copy_aborted(task, Asc.NO_ADDITIONAL_SENSE)
    assert forwarded_fixed_sense(task, xcopy.COPY_DESTINATION) == (
        SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE)
    assert blocks_of(device, 4095, 1) == bytes(BL)


def test_source_beyond_capacity_forwards_lba_out_of_range():
    device = make_device(4096)
    task = extended_copy(device, parameter_list([cscd(device)], [segment(8, 4090, 0)]))
    expect_copy_aborted(task, Asc.NO_ADDITIONAL_SENSE)
    assert forwarded_fixed_sense(task, xcopy.COPY_SOURCE) == (
        SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE)


def test_read_only_destination_forwards_write_protected():
    lu = make_lu(luns={0: None, 1: None})
    manager = make_device(lu=lu, lun=make_lun(number=0))
    protected = make_device(lu=make_lu(luns={0: None, 1: None}, read_only=True),
                            lun=make_lun(number=1))
    manager.copy_targets = CopyTargets([manager, protected])
    task = extended_copy(manager, parameter_list([cscd(manager), cscd(protected)],
                                                 [segment(8, 0, 0, destination=1)]))
    expect_copy_aborted(task, Asc.NO_ADDITIONAL_SENSE)
    assert forwarded_fixed_sense(task, xcopy.COPY_DESTINATION) == (
        SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED)


def test_stopped_destination_forwards_not_ready():
    first, second = target_pair()
    assert run(second, [0x1B, 0, 0, 0, 0, 0]).status == ScsiStatus.GOOD     # STOP
    task = extended_copy(first, parameter_list([cscd(first), cscd(second)],
                                               [segment(8, 0, 0, destination=1)]))
    expect_copy_aborted(task, Asc.NO_ADDITIONAL_SENSE)
    assert forwarded_fixed_sense(task, xcopy.COPY_DESTINATION)[0] == SenseKey.NOT_READY


def test_destination_reserved_by_another_nexus_is_not_written():
    first, second = target_pair()
    run(second, [0x00] * 6, nexus=OTHER)                    # OTHER's power-on attention
    assert run(second, [0x16, 0, 0, 0, 0, 0], nexus=OTHER).status == ScsiStatus.GOOD  # RESERVE
    fill(first, 0, b"\x33" * 8 * BL)
    request = parameter_list([cscd(first), cscd(second)], [segment(8, 0, 0, destination=1)])
    task = extended_copy(first, request)
    expect_copy_aborted(task, Asc.NO_ADDITIONAL_SENSE)
    assert blocks_of(second, 0, 8) == bytes(8 * BL)
    # The holder itself may copy into it.
    run(first, [0x00] * 6, nexus=OTHER)
    assert extended_copy(first, request, nexus=OTHER).status == ScsiStatus.GOOD
    assert blocks_of(second, 0, 8) == b"\x33" * 8 * BL


def test_medium_error_while_copying_is_forwarded_and_counted(monkeypatch):
    device = make_device(8192)
    calls = []

    def failing_write(lba, data, force_unit_access):
        calls.append(lba)
        if len(calls) == 2:
            raise CheckCondition(SenseKey.MEDIUM_ERROR, Asc.WRITE_ERROR, info=lba)
        type(device).write_blocks(device, lba, data, force_unit_access)

    monkeypatch.setattr(device, "write_blocks", failing_write)
    task = extended_copy(device, parameter_list([cscd(device)], [segment(4096, 0, 4096)]))
    expect_copy_aborted(task, Asc.NO_ADDITIONAL_SENSE)
    assert forwarded_fixed_sense(task, xcopy.COPY_DESTINATION) == (
        SenseKey.MEDIUM_ERROR, Asc.WRITE_ERROR)
    status = bytes(receive_copy_results(device, xcopy.COPY_STATUS).data_in)
    assert status[4] == xcopy.FAILED
    assert struct.unpack(">I", status[8:12])[0] == xcopy.COPY_CHUNK_BYTES   # one chunk landed


# --- sense data layout -----------------------------------------------------------------------


def test_copy_aborted_descriptor_format_carries_segment_pointer_and_forwarded_sense():
    inner = CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE)
    sense = xcopy.CopyAborted(
        Asc.NO_ADDITIONAL_SENSE, 3, field_pointer=20,
        forwarded=xcopy.Forwarded(xcopy.COPY_DESTINATION, ScsiStatus.CHECK_CONDITION, inner),
    ).encode(True)
    assert sense[0] == 0x72 and sense[1] == SenseKey.COPY_ABORTED
    assert len(sense) == 8 + sense[7]
    body = sense[8:]
    assert body[:12] == bytes([0x01, 0x0A, 0, 0]) + (3).to_bytes(8, "big")
    assert body[12:20] == bytes([0x02, 0x06, 0, 0, 0xA0, 0, 20, 0])
    forwarded = body[20:]
    assert forwarded[0] == 0x0C and forwarded[1] == len(forwarded) - 2
    assert forwarded[2] == xcopy.COPY_DESTINATION and forwarded[3] == ScsiStatus.CHECK_CONDITION
    assert forwarded[4:] == inner.encode(True)


def test_reservation_conflict_is_forwarded_as_a_status_in_descriptor_format():
    sense = xcopy.CopyAborted(Asc.NO_ADDITIONAL_SENSE, 0, forwarded=xcopy.Forwarded(
        xcopy.COPY_SOURCE, ScsiStatus.RESERVATION_CONFLICT)).encode(True)
    assert sense[8 + 12:] == bytes([0x0C, 2, xcopy.COPY_SOURCE, 0x18])


# --- RECEIVE COPY RESULTS ----------------------------------------------------------------------


def test_operating_parameters_match_the_third_party_copy_vpd_page():
    device = make_device()
    data = bytes(receive_copy_results(device, xcopy.OPERATING_PARAMETERS, list_id=0).data_in)
    assert struct.unpack(">I", data[:4])[0] == len(data) - 4
    max_cscd, max_segments, max_list, max_segment, max_inline = struct.unpack(">HHIII", data[8:24])
    assert (max_cscd, max_segments, max_list, max_inline) == (8, 16, 1024, 0)
    assert max_list >= max_cscd * 32 + max_segments * 28
    assert max_segment == xcopy.MAX_SEGMENT_BYTES
    assert data[37] == 9                                   # 2**9 = 512-byte blocks
    assert data[43:] == bytes([2, 0x02, 0xE4])             # implemented descriptor types
    page = bytes(run(device, [0x12, 1, 0x8F, 0, 255, 0]).data_in)
    assert page[1] == 0x8F and struct.unpack(">H", page[2:4])[0] == len(page) - 4
    descriptors = {}
    offset = 4
    while offset < len(page):
        kind, length = struct.unpack_from(">HH", page, offset)
        descriptors[kind] = page[offset + 4: offset + 4 + length]
        assert length % 4 == 0
        offset += 4 + length
    assert offset == len(page)
    assert descriptors[0x0001] == bytes([8, 0x83, 1, 0x00, 0x84, 3, 0x00, 0x03, 0x04, 0, 0, 0])
    assert struct.unpack_from(">HHII", descriptors[0x0004], 4) == (
        max_cscd, max_segments, max_list, max_inline)
    assert descriptors[0x0008][:3] == bytes([2, 0x02, 0xE4])
    assert struct.unpack_from(">I", descriptors[0x8001], 8)[0] == max_segment


def test_copy_status_of_an_unknown_list_identifier_is_invalid_field_in_cdb():
    task = receive_copy_results(make_device(), xcopy.COPY_STATUS, list_id=7)
    expect_check(task, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB)
    assert task.sense[15:18] == bytes([0xC0, 0, 2])


def test_copy_status_after_a_completed_copy():
    device = make_device(4096)
    assert extended_copy(device, parameter_list(
        [cscd(device)], [segment(16, 0, 100), segment(8, 0, 200)], list_id=5)).status == 0
    data = bytes(receive_copy_results(device, xcopy.COPY_STATUS, list_id=5).data_in)
    assert data == struct.pack(">IBHBI", 8, xcopy.COMPLETED, 2, 0, 24 * BL)
    # Another nexus has its own history.
    run(device, [0x00] * 6, nexus=OTHER)
    expect_check(receive_copy_results(device, xcopy.COPY_STATUS, list_id=5, nexus=OTHER),
                 SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB)


@pytest.mark.parametrize("usage", [xcopy.NO_HOLD, xcopy.NO_LIST_ID])
def test_copies_that_ask_not_to_be_held_are_not_reported(usage):
    device = make_device()
    assert extended_copy(device, one_segment(device, list_id=9, usage=usage)).status == 0
    expect_check(receive_copy_results(device, xcopy.COPY_STATUS, list_id=9),
                 SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB)


def test_failed_copy_status_and_failed_segment_details_then_discarded():
    device = make_device(4096)
    task = extended_copy(device, parameter_list([cscd(device)], [segment(8, 0, 4095)], list_id=2))
    assert task.status == ScsiStatus.CHECK_CONDITION
    status = bytes(receive_copy_results(device, xcopy.COPY_STATUS, list_id=2).data_in)
    assert status == struct.pack(">IBHBI", 8, xcopy.FAILED, 0, 0, 0)
    details = bytes(receive_copy_results(device, xcopy.FAILED_SEGMENT_DETAILS, list_id=2).data_in)
    assert struct.unpack(">I", details[:4])[0] == len(details) - 4
    assert details[56] == ScsiStatus.CHECK_CONDITION
    assert details[60:] == task.sense and struct.unpack(">H", details[58:60])[0] == len(task.sense)
    again = bytes(receive_copy_results(device, xcopy.FAILED_SEGMENT_DETAILS, list_id=2).data_in)
    assert again == bytes(4)


def test_failed_segment_details_kept_when_allocation_length_cuts_them():
    device = make_device(4096)
    extended_copy(device, parameter_list([cscd(device)], [segment(8, 0, 4095)], list_id=2))
    short = receive_copy_results(device, xcopy.FAILED_SEGMENT_DETAILS, list_id=2,
                                 allocation_length=16)
    assert len(bytes(short.data_in)) == 16
    full = bytes(receive_copy_results(device, xcopy.FAILED_SEGMENT_DETAILS, list_id=2).data_in)
    assert full[56] == ScsiStatus.CHECK_CONDITION


def test_history_per_nexus_is_bounded_oldest_first():
    device = make_device()
    for list_id in range(xcopy.MAX_IDENTIFIED_COPIES + 1):
        assert extended_copy(device, one_segment(device, list_id=list_id)).status == 0
    expect_check(receive_copy_results(device, xcopy.COPY_STATUS, list_id=0),
                 SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB)
    last = xcopy.MAX_IDENTIFIED_COPIES
    assert receive_copy_results(device, xcopy.COPY_STATUS, list_id=last).status == 0


def test_nexus_loss_and_reset_forget_the_history():
    device = make_device()
    extended_copy(device, one_segment(device, list_id=3))
    device.nexus_lost(NEXUS)
    run(device, [0x00] * 6)                               # the new nexus's attention
    expect_check(receive_copy_results(device, xcopy.COPY_STATUS, list_id=3),
                 SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB)
    extended_copy(device, one_segment(device, list_id=3))
    device.reset("lun")
    run(device, [0x00] * 6)
    expect_check(receive_copy_results(device, xcopy.COPY_STATUS, list_id=3),
                 SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB)


def test_list_identifier_in_use_is_refused_and_a_full_history_of_running_copies_too():
    results = xcopy.CopyResults(per_nexus=2)
    running = results.begin(NEXUS, 1, xcopy.HOLD)
    with pytest.raises(CheckCondition) as refused:
        results.begin(NEXUS, 1, xcopy.NO_HOLD)
    assert refused.value.asc == Asc.OPERATION_IN_PROGRESS
    results.begin(NEXUS, 2, xcopy.HOLD)
    with pytest.raises(CheckCondition) as full:
        results.begin(NEXUS, 3, xcopy.HOLD)
    assert full.value.asc == Asc.INSUFFICIENT_RESOURCES
    results.finish(NEXUS, running, xcopy.COMPLETED)
    results.begin(NEXUS, 3, xcopy.HOLD)                   # evicts the finished one
    assert results.find(NEXUS, 1) is None


def test_unsupported_receive_copy_results_action_and_reserved_cdb_bits():
    device = make_device()
    expect_check(receive_copy_results(device, 0x01), SenseKey.ILLEGAL_REQUEST,
                 Asc.INVALID_FIELD_IN_CDB)                 # RECEIVE DATA: no held data
    expect_check(run(device, bytes([0x83, 0x01]) + bytes(14)), SenseKey.ILLEGAL_REQUEST,
                 Asc.INVALID_FIELD_IN_CDB)                 # EXTENDED COPY(LID4)
    cdb = bytearray(xcopy_cdb(0))
    cdb[3] = 1
    expect_check(run(device, bytes(cdb)), SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB)


def test_registry_refuses_two_lus_with_one_designator():
    device = make_device()
    twin = make_device()
    with pytest.raises(ValueError):
        CopyTargets([device, twin])
    assert CopyTargets([device]).find(device.identity.naa) is device

