"""Data transfer: round trips, immediate/unsolicited data, R2T and Data-In sequencing,
residuals, command queueing and concurrent sessions."""

import os
import struct
import threading

import pytest

from tests.functional.conftest import CHECK_CONDITION, GOOD, asc_ascq, sense_key
from tests.functional.initiator import R2T

KIB, MIB = 1024, 1024 * 1024


def round_up(size, block):
    return -(-size // block) * block


@pytest.mark.parametrize("size", [1, 8 * 512, 64 * KIB + 512, 256 * KIB, MIB + 512, 8 * MIB],
                         ids=["1-block", "4KiB", "64KiB+512", "256KiB", "1MiB+512", "8MiB"])
def test_round_trip(variant_target, size):
    initiator = variant_target.session()
    blocks, block = initiator.read_capacity16()
    assert block == variant_target.options.block_length
    assert blocks * block == 64 * MIB
    data = os.urandom(round_up(size, block))
    lba = 5
    written = initiator.write16(lba, data, block)
    if variant_target.options.read_only:
        assert written.status == CHECK_CONDITION
        assert sense_key(written.sense) == 0x7 and asc_ascq(written.sense) == (0x27, 0x00)
        assert initiator.read16(lba, len(data) // block, block).status == GOOD
        return
    assert written.status == GOOD, written.sense.hex()
    read = initiator.read16(lba, len(data) // block, block)
    assert read.status == GOOD
    assert read.data == data
    if variant_target.options.luns > 1:
        other = os.urandom(len(data))
        assert initiator.write16(lba, other, block, lun=1).status == GOOD
        assert initiator.read16(lba, len(data) // block, block, lun=1).data == other
        assert initiator.read16(lba, len(data) // block, block, lun=0).data == data


def test_report_luns_with_two_luns(make_target):
    initiator = make_target(luns=2).session()
    result = initiator.scsi(bytes([0xA0, 0, 0, 0, 0, 0]) + (256).to_bytes(4, "big") + bytes(2),
                            read_length=256)
    assert result.status == GOOD
    assert int.from_bytes(result.data[:4], "big") == 16
    assert result.data[8:24] == bytes(8) + bytes([0, 1]) + bytes(6)


@pytest.mark.parametrize("immediate_data", ["Yes", "No"])
@pytest.mark.parametrize("initial_r2t", ["Yes", "No"])
def test_write_with_immediate_and_unsolicited_data(make_target, immediate_data, initial_r2t):
    # InitialR2T is OR-negotiated: it is No only when both sides say No; then up to
    # FirstBurstLength goes unsolicited (immediate data plus Data-Out without an R2T).
    target = make_target(iscsi={"ImmediateData": immediate_data, "FirstBurstLength": "65536",
                                "MaxBurstLength": "262144", "MaxRecvDataSegmentLength": "16384",
                                "InitialR2T": "No"})
    initiator = target.session(keys={"InitialR2T": initial_r2t, "ImmediateData": immediate_data,
                                     "FirstBurstLength": "65536", "MaxBurstLength": "262144"})
    assert initiator.params["InitialR2T"] == initial_r2t
    assert initiator.params["ImmediateData"] == immediate_data
    assert initiator.target_mrdsl == 16384
    data = os.urandom(MIB)
    result = initiator.write10(0, data)
    assert result.status == GOOD
    if initial_r2t == "No":
        unsolicited = 65536                                  # the whole first burst
    else:
        unsolicited = 16384 if immediate_data == "Yes" else 0  # one immediate PDU at most
    offsets = sorted((r.buffer_offset, r.desired_length) for r in result.r2ts)
    assert offsets[0][0] == unsolicited
    assert sum(length for _, length in offsets) == MIB - unsolicited
    assert initiator.read10(0, MIB // 512).data == data


def test_small_write_fits_in_immediate_data_without_r2t(target):
    initiator = target.session(keys={"ImmediateData": "Yes"})
    result = initiator.write10(10, os.urandom(4096))
    assert result.status == GOOD
    assert result.r2ts == []


def test_data_in_split_at_mrdsl_with_status_in_last_pdu(target):
    initiator = target.session(max_recv_data_segment_length=8192)
    data = os.urandom(64 * KIB)
    assert initiator.write10(0, data).status == GOOD
    result = initiator.read10(0, 128)
    assert result.data == data
    pdus = result.data_in
    assert [len(p.data) for p in pdus] == [8192] * 8
    assert [p.data_sn for p in pdus] == list(range(8))
    assert [p.buffer_offset for p in pdus] == [i * 8192 for i in range(8)]
    assert [p.status_bit for p in pdus] == [False] * 7 + [True]
    assert pdus[-1].final and pdus[-1].status == GOOD
    assert result.response is pdus[-1]  # phase collapse: no separate SCSI Response
    assert all(p.ttt == 0xFFFFFFFF for p in pdus)


def test_data_in_sequences_end_at_max_burst_length(make_target):
    target = make_target(iscsi={"MaxBurstLength": "262144"})
    initiator = target.session(max_recv_data_segment_length=8192,
                               keys={"MaxBurstLength": "16384", "FirstBurstLength": "16384"})
    assert initiator.params["MaxBurstLength"] == "16384"
    result = initiator.read10(0, 128)
    assert result.status == GOOD
    # F closes every 16 KiB sequence: PDUs 1, 3, 5, 7; S only on the last.
    assert [p.final for p in result.data_in] == [False, True] * 4
    assert [p.status_bit for p in result.data_in] == [False] * 7 + [True]


def test_r2t_honours_max_burst_length(target):
    initiator = target.session(keys={"MaxBurstLength": "65536", "FirstBurstLength": "65536",
                                     "ImmediateData": "No"})
    data = os.urandom(MIB)
    result = initiator.write10(0, data)
    assert result.status == GOOD
    assert [r.r2t_sn for r in result.r2ts] == list(range(16))
    assert [(r.buffer_offset, r.desired_length) for r in result.r2ts] == \
        [(i * 65536, 65536) for i in range(16)]
    assert all(r.ttt != 0xFFFFFFFF for r in result.r2ts)
    assert initiator.read10(0, MIB // 512).data == data


def test_max_outstanding_r2t_above_one(make_target):
    target = make_target(iscsi={"MaxOutstandingR2T": "8", "MaxBurstLength": "65536"})
    initiator = target.session(keys={"MaxOutstandingR2T": "4", "MaxBurstLength": "65536",
                                     "FirstBurstLength": "65536", "ImmediateData": "No"})
    assert initiator.params["MaxOutstandingR2T"] == "4"
    data = os.urandom(MIB)
    itt = initiator.submit(struct.pack(">BBIBHB", 0x2A, 0, 0, 0, MIB // 512, 0), data_out=data)
    held = [initiator.recv_pdu(timeout=5) for _ in range(4)]
    assert [(p.opcode, p.r2t_sn) for p in held] == [(R2T, n) for n in range(4)]
    with pytest.raises(TimeoutError):  # never more than MaxOutstandingR2T unanswered
        extra = initiator.recv_pdu(timeout=0.5)
        pytest.fail(f"a 5th PDU arrived before any R2T was answered: {extra!r}")
    for pdu in held:
        initiator.handle(pdu)
    result = initiator.collect(itt)
    assert result.status == GOOD
    assert initiator.read10(0, MIB // 512).data == data


def test_read_residual_underflow(target):
    initiator = target.session()
    result = initiator.scsi(struct.pack(">BBIBHB", 0x28, 0, 0, 0, 1, 0), read_length=4096)
    assert result.status == GOOD
    assert len(result.data) == 512
    assert result.underflow and not result.overflow and result.residual == 3584


def test_read_residual_overflow(target):
    initiator = target.session()
    result = initiator.scsi(struct.pack(">BBIBHB", 0x28, 0, 0, 0, 8, 0), read_length=1024)
    assert result.status == GOOD
    assert len(result.data) == 1024
    assert result.overflow and not result.underflow and result.residual == 3072


def test_read_beyond_capacity(target):
    initiator = target.session()
    blocks, _ = initiator.read_capacity16()
    result = initiator.read16(blocks - 1, 2)
    assert result.status == CHECK_CONDITION
    assert sense_key(result.sense) == 0x5 and asc_ascq(result.sense) == (0x21, 0x00)
    assert result.data == b""


def test_block_length_4096_capacity(make_target):
    initiator = make_target(block_length=4096).session()
    assert initiator.read_capacity16() == (64 * MIB // 4096, 4096)


# ---- queueing ------------------------------------------------------------------------------

@pytest.mark.parametrize("queue_depth", [0, 32])
def test_pipelined_commands_all_complete(make_target, queue_depth):
    target = make_target(queue_depth=queue_depth)
    initiator = target.session()
    window = (initiator.max_cmd_sn - initiator.exp_cmd_sn + 1) & 0xFFFFFFFF
    if queue_depth:
        assert window == queue_depth
    pattern = os.urandom(32 * 4096)
    assert initiator.write10(0, pattern).status == GOOD
    count = min(32, window)
    results = initiator.pipeline([
        {"cdb": struct.pack(">BBIBHB", 0x28, 0, i * 8, 0, 8, 0), "read_length": 4096}
        for i in range(count)])
    assert [r.status for r in results] == [GOOD] * count
    assert b"".join(r.data for r in results) == pattern[:count * 4096]


def test_command_beyond_max_cmd_sn_is_ignored(make_target):
    target = make_target(queue_depth=32)
    initiator = target.session(keys={"ImmediateData": "No", "InitialR2T": "Yes"})
    assert (initiator.max_cmd_sn - initiator.exp_cmd_sn + 1) & 0xFFFFFFFF == 32
    # 32 writes that cannot finish: their R2Ts stay unanswered, so the window cannot move.
    write = struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 8, 0)
    itts = [initiator.submit(write, data_out=bytes(4096)) for _ in range(32)]
    assert initiator.cmd_sn == (initiator.max_cmd_sn + 1) & 0xFFFFFFFF
    beyond_sn = initiator.cmd_sn
    beyond = initiator.submit(bytes(6))  # TEST UNIT READY with CmdSN = MaxCmdSN + 1
    held = []
    while True:
        try:
            pdu = initiator.recv_pdu(timeout=1)
        except TimeoutError:
            break
        assert pdu.opcode == R2T, f"only R2Ts may arrive, got {pdu!r}"
        held.append(pdu)
    for pdu in held:
        initiator.handle(pdu)
    for itt in itts:
        assert initiator.collect(itt).status == GOOD
    assert initiator.tasks.keys() == {beyond}  # never answered: it was outside the window
    # Retrying with the same CmdSN now that the window has opened executes it.
    del initiator.tasks[beyond]
    initiator.cmd_sn = beyond_sn
    assert initiator.tur().status == GOOD


def test_concurrent_sessions_write_disjoint_regions(target):
    sessions = [target.session(isid=bytes([0x80, 0, 0, 0, 0, n + 1])) for n in range(4)]
    chunks = [os.urandom(2 * MIB) for _ in sessions]
    errors = []

    def writer(index):
        try:
            lba = index * (2 * MIB // 512)
            result = sessions[index].write10(lba, chunks[index])
            assert result.status == GOOD
        except BaseException as exc:  # reported below, in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(len(sessions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors, errors
    for index, chunk in enumerate(chunks):
        reader = sessions[(index + 1) % len(sessions)]
        assert reader.read10(index * (2 * MIB // 512), 2 * MIB // 512).data == chunk


def test_data_out_data_sn_and_offsets_accepted_in_order(target):
    """Also a check on ourselves: the target accepted our Data-Out numbering."""
    initiator = target.session(keys={"ImmediateData": "No", "MaxBurstLength": "262144"})
    data = os.urandom(512 * KIB)
    assert initiator.write10(100, data).status == GOOD
    assert initiator.read10(100, len(data) // 512).data == data
