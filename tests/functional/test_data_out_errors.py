"""Errors in a write's Data-Out at ERL 0: the command fails with CHECK CONDITION, ABORTED
COMMAND, and the connection carries on (RFC 7143 7.1.4 and 7.8)."""

import struct

from tests.functional.conftest import CHECK_CONDITION, GOOD, asc_ascq, sense_key
from tests.functional.initiator import DATA_OUT, R2T, REJECT, SCSI_RSP, build_bhs

ABORTED_COMMAND = 0x0B
DATA_PHASE_ERROR = (0x4B, 0x00)
CRC_ERROR = (0x47, 0x05)
DATA_DIGEST_ERROR = 0x02


def write10(blocks: int, lba: int = 0) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0)


def send_data_out(initiator, itt, ttt, data_sn, offset, data, final=True, digest=None):
    bhs = build_bhs(DATA_OUT, flags=0x80 if final else 0, data_length=len(data), itt=itt,
                    words={20: ttt, 28: initiator.exp_stat_sn, 36: data_sn, 40: offset})
    if digest is None:
        initiator.send_pdu(bhs, data)
    else:
        initiator.send_pdu(bhs, data, data_digest=digest)
    return bhs


def response_of(initiator, itt):
    """(status, sense) of the SCSI Response for `itt`."""
    while True:
        pdu = initiator.recv_pdu(timeout=5)
        if pdu.opcode == SCSI_RSP and pdu.itt == itt:
            length = int.from_bytes(pdu.data[:2], "big") if pdu.data else 0
            return pdu.status, pdu.data[2:2 + length]


def test_wrong_data_sn_fails_the_command_and_keeps_the_connection(target):
    initiator = target.session(keys={"ImmediateData": "No", "MaxRecvDataSegmentLength": "512"})
    initiator.strict = False
    itt = initiator.submit(write10(2), data_out=bytes(1024))
    del initiator.tasks[itt]                  # this test answers the R2T itself
    r2t = initiator.recv_pdu(timeout=5)
    assert r2t.opcode == R2T
    send_data_out(initiator, itt, r2t.ttt, 0, 0, bytes(512), final=False)
    send_data_out(initiator, itt, r2t.ttt, 0, 512, bytes(512))     # DataSN 0 again
    status, sense = response_of(initiator, itt)
    assert status == CHECK_CONDITION
    assert sense_key(sense) == ABORTED_COMMAND and asc_ascq(sense) == DATA_PHASE_ERROR
    initiator.violations.clear()
    assert initiator.tur().status == GOOD     # the connection is still usable


def test_data_digest_error_on_data_out_rejects_the_pdu_and_fails_the_command(make_target):
    target = make_target(digest="Header Data")
    initiator = target.session(keys={"ImmediateData": "No"})
    initiator.strict = False
    itt = initiator.submit(write10(1), data_out=bytes(512))
    del initiator.tasks[itt]
    r2t = initiator.recv_pdu(timeout=5)
    assert r2t.opcode == R2T
    bhs = send_data_out(initiator, itt, r2t.ttt, 0, 0, bytes(512), digest=b"\xde\xad\xbe\xef")
    reject = initiator.recv_pdu(timeout=5)
    assert reject.opcode == REJECT and reject.reason == DATA_DIGEST_ERROR
    assert reject.data[:48] == bhs[:48]
    status, sense = response_of(initiator, itt)
    assert status == CHECK_CONDITION
    assert sense_key(sense) == ABORTED_COMMAND and asc_ascq(sense) == CRC_ERROR
    initiator.violations.clear()
    assert initiator.tur().status == GOOD


def _solicited_write(initiator, lba, blocks):
    """A WRITE whose Data-Out this test sends itself; returns (itt, r2t)."""
    itt = initiator.submit(write10(blocks, lba), data_out=bytes(blocks * 512))
    del initiator.tasks[itt]
    r2t = initiator.recv_pdu(timeout=5)
    assert r2t.opcode == R2T and r2t.desired_length == blocks * 512
    return itt, r2t


def _expect_data_phase_error(initiator, itt):
    status, sense = response_of(initiator, itt)
    assert status == CHECK_CONDITION
    assert sense_key(sense) == ABORTED_COMMAND and asc_ascq(sense) == DATA_PHASE_ERROR


def test_overlapping_data_out_fails_the_command_and_writes_nothing(target):
    """DataPDUInOrder=Yes: a Data-Out that lays over bytes already sent is an error, never
    GOOD with a hole of zeros (it was GOOD before, with half the blocks zeroed)."""
    initiator = target.session(keys={"ImmediateData": "No"})
    initiator.strict = False
    old = b"\x11" * 4096
    assert initiator.write10(8, old).status == GOOD
    itt, r2t = _solicited_write(initiator, 8, 8)
    send_data_out(initiator, itt, r2t.ttt, 0, 0, b"\x22" * 2048, final=False)
    send_data_out(initiator, itt, r2t.ttt, 1, 0, b"\x33" * 2048)      # offset 0 again
    _expect_data_phase_error(initiator, itt)
    initiator.violations.clear()
    assert initiator.read10(8, 8).data == old          # the failed WRITE changed nothing


def test_data_out_that_skips_ahead_fails_the_command(target):
    initiator = target.session(keys={"ImmediateData": "No"})
    initiator.strict = False
    itt, r2t = _solicited_write(initiator, 0, 8)
    send_data_out(initiator, itt, r2t.ttt, 0, 2048, bytes(2048))       # a gap at 0..2047
    _expect_data_phase_error(initiator, itt)
    initiator.violations.clear()
    assert initiator.tur().status == GOOD


def test_burst_ended_early_by_the_f_bit_fails_the_command_not_the_connection(target):
    """The F bit after half of what the R2T asked for: at ERL 0 no one will send the rest, so
    the command fails at once (it used to wait forever, holding its CmdSN slot and buffer)."""
    initiator = target.session(keys={"ImmediateData": "No"})
    initiator.strict = False
    itt, r2t = _solicited_write(initiator, 0, 8)
    send_data_out(initiator, itt, r2t.ttt, 0, 0, bytes(2048), final=True)
    _expect_data_phase_error(initiator, itt)
    initiator.violations.clear()
    assert initiator.tur().status == GOOD
    assert initiator.write10(0, b"\x44" * 4096).status == GOOD
    assert initiator.read10(0, 8).data == b"\x44" * 4096


def test_unsolicited_burst_ended_before_first_burst_length_fails_the_command(make_target):
    target = make_target(iscsi={"InitialR2T": "No", "FirstBurstLength": "65536"})
    initiator = target.session(keys={"InitialR2T": "No", "ImmediateData": "No",
                                     "FirstBurstLength": "65536"})
    initiator.strict = False
    itt = initiator.new_itt()
    bhs = build_bhs(0x01, flags=0x20 | 0x01, data_length=0, itt=itt,         # W, F=0, SIMPLE
                    words={20: 4096, 24: initiator._cmd_sn_for(False), 28: initiator.exp_stat_sn},
                    cdb=write10(8).ljust(16, b"\0"))
    initiator.send_pdu(bhs, b"")
    send_data_out(initiator, itt, 0xFFFFFFFF, 0, 0, bytes(1024), final=True)   # 1 KiB of 4
    _expect_data_phase_error(initiator, itt)
    initiator.violations.clear()
    assert initiator.tur().status == GOOD
