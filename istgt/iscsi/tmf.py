"""Task management functions (RFC 7143 11.5, SAM-5 7) for one connection's request."""

from __future__ import annotations

import logging

from istgt.iscsi import pdu as wire
from istgt.iscsi.pdu import RejectReason, TmfFunction, TmfResponse
from istgt.lu.unit import TaskStillRunning

log = logging.getLogger("istgt.iscsi")


def _still_running(fn: int, exc: TaskStillRunning) -> TmfResponse:
    """An aborted command did not end: not done, so the initiator escalates."""
    log.error("TMF %d: %s", fn, exc)
    return TmfResponse.REJECTED


def handle(conn, pdu) -> None:
    s = conn.session
    if s.discovery:
        conn.send([wire.reject(RejectReason.PROTOCOL_ERROR, pdu.bhs)])
        return
    if not s.accept_cmdsn(pdu.cmdsn, pdu.immediate):
        return
    fn = pdu.function
    lun = wire.decode_lun(pdu.lun_field)
    target = s.target
    nexus = s.nexus
    after = None
    if fn == TmfFunction.ABORT_TASK:
        rtt = pdu.ref_task_tag
        try:
            found = conn.abort_writes(lambda c: c.itt == rtt) or target.abort_task(nexus, rtt)
        except TaskStillRunning as exc:
            response = _still_running(fn, exc)
        else:
            if found or s.consume_unseen(pdu.ref_cmdsn, pdu.cmdsn):
                response = TmfResponse.COMPLETE
            else:
                response = TmfResponse.TASK_DOES_NOT_EXIST
    elif fn in (TmfFunction.ABORT_TASK_SET, TmfFunction.CLEAR_TASK_SET,
                TmfFunction.LOGICAL_UNIT_RESET):
        if lun not in target.devices:
            response = TmfResponse.LUN_DOES_NOT_EXIST
        else:
            response = TmfResponse.COMPLETE
            try:
                if fn == TmfFunction.ABORT_TASK_SET:
                    conn.abort_writes(lambda c: c.task.lun == lun)
                    target.abort_task_set(nexus, lun)
                elif fn == TmfFunction.CLEAR_TASK_SET:
                    conn.server.abort_writes_everywhere(target, lambda c: c.task.lun == lun)
                    target.clear_task_set(lun, nexus)
                else:
                    conn.server.abort_writes_everywhere(target, lambda c: c.task.lun == lun)
                    target.lun_reset(lun)
            except TaskStillRunning as exc:
                response = _still_running(fn, exc)
    elif fn in (TmfFunction.TARGET_WARM_RESET, TmfFunction.TARGET_COLD_RESET):
        conn.server.abort_writes_everywhere(target, lambda c: True)
        cold = fn == TmfFunction.TARGET_COLD_RESET
        response = TmfResponse.COMPLETE
        try:
            target.target_reset("cold" if cold else "warm")
        except TaskStillRunning as exc:
            response = _still_running(fn, exc)
        if cold:
            after = lambda: conn.server.close_target_sessions(target, "target cold reset")
    elif fn == TmfFunction.CLEAR_ACA:
        response = TmfResponse.NOT_SUPPORTED           # NACA=1 is refused in CDBs
    elif fn == TmfFunction.TASK_REASSIGN:
        response = TmfResponse.REASSIGNMENT_NOT_SUPPORTED   # ERL 0
    else:
        response = TmfResponse.REJECTED
    log.info("TMF %d LUN %d from %s: response %d", fn, lun, s.initiator_port, response)
    r = wire.tmf_response(pdu.itt, response, ends_command=not pdu.immediate)
    r.after_send = after
    conn.send([r])
    if fn == TmfFunction.TARGET_COLD_RESET:
        # The session ends with this response (RFC 7143 11.5.1): read nothing more from
        # this connection, or a command sent after the response would still run on the
        # reset I_T nexus (libiscsi's PreventAllow.ColdReset raced it).
        conn.closing = True
