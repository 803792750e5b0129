"""Task management functions (RFC 7143 11.5/11.6) and the unit attentions they leave."""

import struct
import time

import pytest

from tests.functional.conftest import CHECK_CONDITION, GOOD, asc_ascq, sense_key
from tests.functional.initiator import (
    ABORT_TASK, ABORT_TASK_SET, CLEAR_ACA, CLEAR_TASK_SET, LOGICAL_UNIT_RESET, R2T,
    TARGET_COLD_RESET, TARGET_WARM_RESET, TASK_REASSIGN, TMF_RSP,
)

# TMF response codes (RFC 7143 11.6.1)
COMPLETE, TASK_DOES_NOT_EXIST, LUN_DOES_NOT_EXIST = 0, 1, 2
REASSIGNMENT_NOT_SUPPORTED, NOT_SUPPORTED, REJECTED = 4, 5, 255
OTHER_INITIATOR = "iqn.2024-01.org.example:other"


def stalled_write(initiator, lba=0, blocks=64):
    """A WRITE whose R2T we hold back, so the task stays in progress at the target."""
    data = bytes(blocks * 512)
    itt = initiator.submit(struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0), data_out=data)
    r2t = initiator.recv_pdu(timeout=5)
    assert r2t.opcode == R2T and r2t.itt == itt
    return itt


def test_abort_task_unknown_tag(target):
    initiator = target.session()
    assert initiator.tur().status == GOOD
    old_sn = (initiator.cmd_sn - 1) & 0xFFFFFFFF  # RefCmdSN of a command already done
    rsp = initiator.tmf(ABORT_TASK, ref_itt=0x0BAD0BAD, ref_cmd_sn=old_sn)
    assert rsp.opcode == TMF_RSP and rsp.final
    assert rsp.response == TASK_DOES_NOT_EXIST


def test_abort_task_in_progress(target):
    initiator = target.session(keys={"ImmediateData": "No"})
    itt = stalled_write(initiator)
    ref_sn = (initiator.cmd_sn - 1) & 0xFFFFFFFF
    rsp = initiator.tmf(ABORT_TASK, ref_itt=itt, ref_cmd_sn=ref_sn)
    assert rsp.response == COMPLETE
    del initiator.tasks[itt]  # an aborted task gets no SCSI Response (RFC 7143 4.2.3.3)
    assert initiator.tur().status == GOOD
    with pytest.raises(TimeoutError):
        late = initiator.recv_pdu(timeout=0.5)
        pytest.fail(f"aborted task still answered: {late!r}")


def test_abort_task_set(target):
    initiator = target.session(keys={"ImmediateData": "No"})
    stalled = stalled_write(initiator)
    rsp = initiator.tmf(ABORT_TASK_SET, lun=0)
    assert rsp.response == COMPLETE
    del initiator.tasks[stalled]
    assert initiator.tur().status == GOOD


def test_clear_task_set(target):
    initiator = target.session()
    assert initiator.tmf(CLEAR_TASK_SET, lun=0).response == COMPLETE
    assert initiator.tur().status == GOOD


def test_clear_aca_not_supported(target):
    initiator = target.session()
    assert initiator.tmf(CLEAR_ACA, lun=0).response in (COMPLETE, NOT_SUPPORTED)


def test_task_reassign_at_erl0(target):
    initiator = target.session()
    rsp = initiator.tmf(TASK_REASSIGN, ref_itt=0x1234)
    assert rsp.response == REASSIGNMENT_NOT_SUPPORTED


def test_unsupported_function_rejected(target):
    initiator = target.session()
    rsp = initiator.tmf(14)
    assert rsp.response == REJECTED
    assert initiator.nop_out(b"still").data == b"still"


@pytest.mark.parametrize("function", [ABORT_TASK_SET, CLEAR_TASK_SET, LOGICAL_UNIT_RESET])
def test_lun_function_on_missing_lun(target, function):
    initiator = target.session()
    assert initiator.tmf(function, lun=7).response == LUN_DOES_NOT_EXIST


def unit_attention_after(observer):
    result = observer.tur()
    assert result.status == CHECK_CONDITION, "no unit attention reported"
    assert sense_key(result.sense) == 0x6
    return asc_ascq(result.sense)


def test_lun_reset_raises_unit_attention_for_other_sessions(target):
    resetter = target.session()
    observer = target.session(initiator_name=OTHER_INITIATOR)
    assert observer.tur().status == GOOD
    assert resetter.tmf(LOGICAL_UNIT_RESET, lun=0).response == COMPLETE
    asc, ascq = unit_attention_after(observer)
    assert asc == 0x29  # POWER ON, RESET, OR BUS DEVICE RESET OCCURRED (29/xx)
    assert observer.tur().status == GOOD  # reported once


def test_lun_reset_keeps_the_resetting_session(target):
    resetter = target.session()
    assert resetter.tmf(LOGICAL_UNIT_RESET, lun=0).response == COMPLETE
    assert resetter.nop_out(b"me").data == b"me"


def test_lun_reset_raises_unit_attention_for_the_resetting_session_too(target):
    # SAM-5: a reset is an event of the logical unit; every I_T nexus is told, the issuer
    # included (libiscsi's MultipathIO.Reset checks both paths).
    resetter = target.session()
    assert resetter.tur().status == GOOD
    assert resetter.tmf(LOGICAL_UNIT_RESET, lun=0).response == COMPLETE
    asc, ascq = unit_attention_after(resetter)
    assert (asc, ascq) == (0x29, 0x03)  # BUS DEVICE RESET FUNCTION OCCURRED
    assert resetter.tur().status == GOOD


def test_lun_reset_of_one_lun_leaves_the_other(make_target):
    target = make_target(luns=2)
    resetter = target.session()
    observer = target.session(initiator_name=OTHER_INITIATOR)
    assert resetter.tmf(LOGICAL_UNIT_RESET, lun=1).response == COMPLETE
    assert observer.tur(lun=0).status == GOOD
    result = observer.tur(lun=1)
    assert result.status == CHECK_CONDITION and asc_ascq(result.sense)[0] == 0x29


def test_target_warm_reset(target):
    resetter = target.session()
    observer = target.session(initiator_name=OTHER_INITIATOR)
    assert resetter.tmf(TARGET_WARM_RESET).response == COMPLETE
    asc, _ = unit_attention_after(observer)
    assert asc == 0x29


def test_target_cold_reset_closes_every_connection(target):
    resetter = target.session()
    observer = target.session(initiator_name=OTHER_INITIATOR)
    rsp = resetter.tmf(TARGET_COLD_RESET)
    assert rsp.response == COMPLETE
    # RFC 7143 11.5.1: a cold reset terminates all TCP connections to the target.
    resetter.wait_closed(timeout=5)
    observer.wait_closed(timeout=5)
    assert target.session().nop_out(b"again").data == b"again"


def test_nothing_sent_after_a_cold_reset_response_runs(target, monkeypatch):
    """The session ends with the response: a command the initiator sends right after it
    is neither run nor answered on the reset I_T nexus, however late the connections are
    then closed (libiscsi's PreventAllow.ColdReset got a stray unit attention that way)."""
    close_sessions = target.server.close_target_sessions

    def close_late(*args):
        time.sleep(0.2)     # what a busy machine may do between the response and the close
        close_sessions(*args)

    monkeypatch.setattr(target.server, "close_target_sessions", close_late)
    resetter = target.session()
    assert resetter.tmf(TARGET_COLD_RESET).response == COMPLETE
    resetter.submit(bytes(6))                                   # TEST UNIT READY
    after = resetter.wait_closed(timeout=5)
    assert after == [], f"answered after the cold reset: {after}"
    assert target.session().tur().status == GOOD


def test_tmf_response_carries_sequence_numbers(target):
    initiator = target.session()
    expected_stat_sn = initiator.exp_stat_sn
    rsp = initiator.tmf(CLEAR_TASK_SET, lun=0)
    assert rsp.stat_sn == expected_stat_sn
    assert rsp.exp_cmd_sn == initiator.cmd_sn
