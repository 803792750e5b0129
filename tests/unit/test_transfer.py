"""Data-In sequencing, phase collapse and residuals of a completed SCSI task."""

import struct

import pytest

from istgt.iscsi import pdu as wire
from istgt.iscsi.transfer import Command, MalformedAhs, extended_cdb, scsi_responses
from istgt.scsi.command import ITNexus, ScsiTask

NEXUS = ITNexus("iqn.i,i,0x1", "iqn.t,t,0x1", 1)


def read_task(edtl, data, status=0, sense=b""):
    task = ScsiTask(0, b"\x28" + bytes(9), NEXUS, 1, 7, None, edtl)
    task.status, task.sense, task.data_in = status, sense, data
    return Command(7, 0, task, read=True, holds_slot=True), task


def fields(r):
    return dict(flags=r.bhs[1], data_sn=struct.unpack_from(">I", r.bhs, 36)[0],
                offset=struct.unpack_from(">I", r.bhs, 40)[0],
                residual=struct.unpack_from(">I", r.bhs, 44)[0], length=len(r.data))


def test_data_in_split_by_segment_and_burst_with_status_in_last():
    cmd, task = read_task(20000, bytes(20000))
    out = scsi_responses(cmd, task, max_segment=4096, max_burst=8192)
    got = [fields(r) for r in out]
    assert [g["length"] for g in got] == [4096, 4096, 4096, 4096, 3616]
    assert [g["offset"] for g in got] == [0, 4096, 8192, 12288, 16384]
    assert [g["data_sn"] for g in got] == [0, 1, 2, 3, 4]
    # F at the end of every MaxBurstLength sequence; S (status) only on the last PDU
    assert [g["flags"] & 0x80 for g in got] == [0, 0x80, 0, 0x80, 0x80]
    assert [g["flags"] & 0x01 for g in got] == [0, 0, 0, 0, 1]
    assert out[-1].takes_statsn and out[-1].ends_command
    assert not any(r.takes_statsn for r in out[:-1])


def test_underflow_and_overflow_residuals():
    cmd, task = read_task(1000, bytes(600))
    last = fields(scsi_responses(cmd, task, 8192, 262144)[-1])
    assert last["flags"] & 0x02 and last["residual"] == 400
    cmd, task = read_task(512, bytes(600))
    out = scsi_responses(cmd, task, 8192, 262144)
    assert sum(len(r.data) for r in out) == 512
    assert fields(out[-1])["flags"] & 0x04 and fields(out[-1])["residual"] == 88


def test_check_condition_goes_in_a_separate_response_with_sense():
    cmd, task = read_task(512, None, status=2, sense=b"\x70\x00\x05")
    (r,) = scsi_responses(cmd, task, 8192, 262144)
    assert r.bhs[0] == wire.Op.SCSI_RSP and r.bhs[3] == 2
    assert r.data == b"\x00\x03\x70\x00\x05"


def test_write_residual_compares_cdb_length_with_edtl():
    task = ScsiTask(0, b"\x2a" + bytes(9), NEXUS, 1, 9, None, 1024)
    task.data_out_length = 512
    cmd = Command(9, 0, task, read=False, holds_slot=False)
    cmd.buffer, cmd.received, cmd.r2t_sn = bytearray(1024), 1024, 2
    (r,) = scsi_responses(cmd, task, 8192, 262144)
    assert r.bhs[1] & 0x02 and struct.unpack_from(">I", r.bhs, 44)[0] == 512
    assert struct.unpack_from(">I", r.bhs, 36)[0] == 2       # ExpDataSN = R2Ts sent
    assert not r.ends_command                                  # an immediate command


def test_extended_cdb_ahs_appends_bytes():
    extra = bytes(range(16))
    ahs = struct.pack(">HB", len(extra) + 1, 1) + b"\0" + extra + b"\0" * 3
    assert extended_cdb(b"C" * 16, ahs) == b"C" * 16 + extra


def test_extended_cdb_after_another_ahs():
    bidi = struct.pack(">HBB", 5, 2, 0) + struct.pack(">I", 4096)   # 3 + 5 = 8 bytes
    extra = b"X" * 8
    ext = struct.pack(">HBB", len(extra) + 1, 1, 0) + extra + b"\0" * 3
    assert extended_cdb(b"C" * 16, bidi + ext) == b"C" * 16 + extra


@pytest.mark.parametrize("ahs", [
    struct.pack(">HBB", 0xFFFF, 1, 0) + b"\0" * 4,          # extended CDB far past the end
    struct.pack(">HBB", 9, 1, 0) + b"\0" * 4,                # 12 bytes announced, 8 there
    struct.pack(">HBB", 0, 1, 0),                            # no bytes at all
    struct.pack(">HBB", 5, 2, 0) + struct.pack(">I", 4096) + struct.pack(">HBB", 0x100, 1, 0),
])
def test_ahs_past_total_ahs_length_is_malformed(ahs):
    with pytest.raises(MalformedAhs):
        extended_cdb(b"C" * 16, ahs)
