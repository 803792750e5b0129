"""One iSCSI connection: a receiver thread and a sender thread around the pure codecs.

The receiver reads PDUs, runs the login, then dispatches full-feature PDUs by opcode. Data-Out
is received straight into the command's buffer. Completed SCSI tasks come back from the LU's
workers and are turned into Data-In/SCSI Response PDUs for the sender, which stamps sequence
numbers and writes every ready PDU with one `sendmsg`.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

from istgt.iscsi import params, pdu as wire, tmf
from istgt.iscsi.discovery import send_targets
from istgt.iscsi.login import CLOSE, ENTER_FFP, LoginProcess
from istgt.iscsi.pdu import Op, ProtocolError, RejectReason
from istgt.iscsi.reader import CENSUS, ConnectionClosed, PduReader
from istgt.iscsi.writer import OUT_LIMIT, PduWriter
from istgt.iscsi.transfer import (Command, MalformedAhs, R2tState, extended_cdb,
                                  scsi_responses)
from istgt.scsi.command import ScsiTask
from istgt.scsi.sense import encode_sense

log = logging.getLogger("istgt.iscsi")

LOGIN_MAX_SEGMENT = 65536
HARD_MAX_SEGMENT = 16 * 1024 * 1024     # beyond this a length cannot be resynchronised
MAX_WRITE_BUFFER = 64 * 1024 * 1024     # EDTL cap for a write (Block Limits advertises less)
WRITE_BUDGET = 256 * 1024 * 1024        # write buffers one connection may hold at once
BUSY = 0x08
MAX_TEXT_REQUEST = 65536                # a (continued) Text request, as for login keys
MAX_IMMEDIATE = 16                      # immediate commands (outside the CmdSN window) at once
DRAIN_S = 5.0                           # a closing connection still reads what has arrived
CHECK_CONDITION = 0x02
ABORTED_COMMAND = 0x0B
DATA_PHASE_ERROR = 0x4B00
PROTOCOL_SERVICE_CRC_ERROR = 0x4705
RESERVED = wire.RESERVED_TAG
M32 = 0xFFFFFFFF
_SCSI_CMD, _DATA_OUT = int(Op.SCSI_CMD), int(Op.DATA_OUT)    # plain ints for the hot loop


_corked = threading.local()


class _Corked:
    """Responses this thread queues inside the block are written when it ends, one write per
    connection (an LU worker finishing several tasks at once). A class rather than a
    generator: it is entered once per batch of commands, on the hot path."""

    __slots__ = ("pending",)

    def __enter__(self):
        if getattr(_corked, "pending", None) is not None:
            self.pending = None             # nested: the outer block writes
        else:
            self.pending = _corked.pending = []
        return self

    def __exit__(self, *exc):
        pending = self.pending
        if pending is None:
            return
        _corked.pending = None
        for conn in pending:
            conn._flush_corked()


def corked() -> _Corked:
    return _Corked()


class _ConnectionLog(logging.LoggerAdapter):
    """Prefixes every message with who is on the connection: peer, initiator, TSIH, CID."""

    def process(self, msg, kwargs):
        return f"[{self.extra['who']}] {msg}", kwargs


class Connection:
    def __init__(self, server, sock: socket.socket, peer, local, portal_group_tag: int):
        self.server = server
        self.sock = sock
        self.peer_ip = _plain_ip(peer[0])
        self.peer_port = peer[1]
        self.local_ip = _plain_ip(local[0])
        self.local_port = local[1]
        self.portal_group_tag = portal_group_tag
        self.log = _ConnectionLog(log, {"who": f"{self.peer_ip}:{self.peer_port}"})
        self.cid = 0
        self.session = None
        self.values = None
        self.in_ffp = False
        self.max_send_segment = 8192          # the initiator's MaxRecvDataSegmentLength
        self.max_recv_segment = LOGIN_MAX_SEGMENT
        # receiver-thread state
        self.writes: dict[int, Command] = {}  # ITT -> command gathering Data-Out
        self.r2ts: dict[int, R2tState] = {}   # TTT -> outstanding R2T
        self.discarding: set[int] = set()     # ITTs whose Data-Out is thrown away
        self.text_rest: dict[int, bytes] = {}  # TTT -> rest of a long Text response
        self.text_in = bytearray()            # C-bit continuation of a Text request
        self._text_in_ttt = None              # the TTT we gave that continuation
        self._to_submit: list = []            # (task, done) not yet handed to the LU
        self._next_ttt = 1                    # guarded by _ttt_lock
        self._ttt_lock = threading.Lock()
        # shared state
        self.lock = threading.Lock()
        self.active: dict[int, Command] = {}  # ITT -> executing command; guarded by lock
        self.buffered = 0                     # bytes of write buffers held; guarded by lock
        self._deferred = 0                    # corked answers not yet written; guarded by lock
        self.idle = threading.Condition(self.lock)
        self.closing = False
        self._drain_until = 0.0               # monotonic(): a closing receiver reads until then
        self.ping_ttt = None
        self.ping_sent_at = 0.0
        self.reader = PduReader(sock, self._flush_submissions, self.log)
        self.writer = PduWriter(sock, self.log, lambda: self.close_async("send failed"),
                                f"conn-tx-{self.peer_ip}:{self.peer_port}")
        self._receiver = threading.Thread(target=self._receive_main, daemon=True,
                                          name=f"conn-rx-{self.peer_ip}:{self.peer_port}")
        self.finished = threading.Event()

    def start(self) -> None:
        self.writer.start()
        self._receiver.start()

    # ================================================================== receiving
    def _receive_main(self) -> None:
        reason = "closed"
        CENSUS.joined()
        try:
            self.sock.settimeout(None)
            if self._login():
                self._full_feature()
        except ConnectionClosed as e:
            reason = str(e)
        except ProtocolError as e:
            reason = f"protocol error: {e}"
            self.log.warning("%s from %s: dropping the connection", reason, self.peer_ip)
        except OSError as e:
            reason = f"socket error: {e}"
        except Exception:
            reason = "internal error"
            self.log.exception("connection from %s failed", self.peer_ip)
        finally:
            CENSUS.left()
            self._teardown(reason)

    # ------------------------------------------------------------------ login
    def _login(self) -> bool:
        login = LoginProcess(self.server, self)
        first = True
        while not self.closing:
            bhs, ahs = self.reader.read_header()
            pdu = wire.Pdu(bhs, ahs)
            length = pdu.data_length
            if pdu.opcode != Op.LOGIN_REQ:
                # RFC 7143 6.1: only Login is valid before full feature phase (istgt bug B1)
                self.log.warning("opcode 0x%02x from %s before login completed",
                                 pdu.opcode, self.peer_ip)
                self.writer.send_and_wait(wire.reject(RejectReason.PROTOCOL_ERROR, bhs))
                return False
            if length > LOGIN_MAX_SEGMENT:
                raise ProtocolError(f"login data segment of {length} bytes")
            pdu.data, _ = self.reader.read_data(length)
            if first:
                first = False
                self.cid = pdu.cid
                self.writer.login_cmdsn = pdu.cmdsn
                self.writer.stat_sn = pdu.exp_statsn
            result = login.handle(pdu)
            if result.outcome == CLOSE:
                self.writer.send_and_wait(result.response)
                return False
            if result.outcome == ENTER_FFP:
                self.session = self.writer.session = result.session
                self.values = result.values
                self.writer.send_and_wait(result.response)
                self._enter_full_feature(login)
                return True
            self.send([result.response])
        return False

    def _enter_full_feature(self, login) -> None:
        v = self.values
        # digests start with the first PDU after the final Login Response, both ways
        self.reader.header_digest = self.writer.header_digest = v.header_digest
        self.reader.data_digest = self.writer.data_digest = v.data_digest
        self.max_send_segment = v.max_recv_data_segment_length_initiator
        self.max_recv_segment = v.max_recv_data_segment_length_target
        self.in_ffp = True
        self.server.login_finished(self)
        s = self.session
        self.log = self.reader.log = self.writer.log = _ConnectionLog(
            log, {"who": f"{self.peer_ip} {s.initiator_name} TSIH={s.tsih} CID={self.cid}"})
        if s.discovery:
            log.info("Login(discovery) from %s (%s) on (%s:%d,%d), ISID=%s, TSIH=%d, CID=%d",
                     s.initiator_name, self.peer_ip, self.local_ip, self.local_port,
                     self.portal_group_tag, s.isid.hex(), s.tsih, self.cid)
        else:
            log.info("Login from %s (%s) on %s LU%d (%s:%d,%d), ISID=%s, TSIH=%d, CID=%d, "
                     "HeaderDigest=%s, DataDigest=%s", s.initiator_name, self.peer_ip,
                     s.target_name, s.target.number, self.local_ip, self.local_port,
                     self.portal_group_tag, s.isid.hex(), s.tsih, self.cid,
                     "on" if v.header_digest else "off",
                     "on" if v.data_digest else "off")

    # ------------------------------------------------------------------ full feature
    def _full_feature(self) -> None:
        handlers = {
            Op.SCSI_CMD: self._on_scsi, Op.NOP_OUT: self._on_nop_out,
            Op.TASK_MGMT_REQ: lambda pdu: tmf.handle(self, pdu), Op.TEXT_REQ: self._on_text,
            Op.LOGOUT_REQ: self._on_logout,
        }
        # When the target shuts down, PDUs that already arrived are still served (commands
        # sent before the shutdown are answered); SHUT_RD ends the stream after them.
        while not self._reading_over():
            bhs, ahs = self.reader.read_header()
            if self._reading_over():
                break         # closed while this PDU arrived: it must not run
            opcode = bhs[0] & 0x3F
            length = (bhs[5] << 16) | (bhs[6] << 8) | bhs[7]
            if length > self.max_recv_segment:
                if length > HARD_MAX_SEGMENT:
                    raise ProtocolError(f"data segment of {length} bytes")
                self.reader.discard(length)
                self.log.warning("data segment of %d bytes over MaxRecvDataSegmentLength %d",
                                 length, self.max_recv_segment)
                self.send([wire.reject(RejectReason.PROTOCOL_ERROR, bhs)])
                continue
            if opcode == _DATA_OUT:
                self._on_data_out(wire.Pdu(bhs, ahs), length)
                continue
            data, ok = self.reader.read_data(length) if length else (b"", True)
            if not ok:
                self.log.warning("data digest error from %s", self.peer_ip)
                self.send([wire.reject(RejectReason.DATA_DIGEST_ERROR, bhs)])
                continue
            pdu = wire.Pdu(bhs, ahs, data)
            if opcode != _SCSI_CMD:
                self._flush_submissions()        # a TMF or Logout must see every command
            if self.writer.backlog > OUT_LIMIT:
                self._flush_submissions()
                self.writer.wait_for_reader(self.server.config.global_.timeout or 60)
            handler = handlers.get(opcode)
            if handler is None:
                self._unsupported(pdu)
            else:
                handler(pdu)

    def _unsupported(self, pdu) -> None:
        if pdu.opcode == Op.LOGIN_REQ:
            reason = RejectReason.PROTOCOL_ERROR     # login in full feature phase
        elif 0x1C <= pdu.opcode <= 0x1E:
            reason = RejectReason.COMMAND_NOT_SUPPORTED
        else:
            reason = RejectReason.PROTOCOL_ERROR     # SNACK at ERL 0, unknown opcodes
        self.send([wire.reject(reason, pdu.bhs)])

    # ------------------------------------------------------------------ SCSI command
    def _on_scsi(self, pdu) -> None:
        s = self.session
        if s.discovery:
            self.send([wire.reject(RejectReason.PROTOCOL_ERROR, pdu.bhs)])
            return
        byte0, flags, lun_field, itt, edtl, cmdsn, _, cdb = wire.scsi_command_fields(pdu.bhs)
        immediate_cmd = bool(byte0 & 0x40)
        writing = bool(flags & 0x20)
        if not s.accept_cmdsn(cmdsn, immediate_cmd):
            self.log.debug("CmdSN %d outside the window: ignored", cmdsn)
            if writing and not flags & 0x80:
                self.discarding.add(itt)        # its unsolicited Data-Out is thrown away
            return
        holds_slot = not immediate_cmd
        if itt in self.writes or itt in self.active:
            self._reject_command(pdu, RejectReason.TASK_IN_PROGRESS, holds_slot)
            return
        if immediate_cmd and self._immediate_in_flight() >= MAX_IMMEDIATE:
            # immediate commands bypass the CmdSN window: bound them (RFC 7143 11.17.1)
            self._reject_command(pdu, RejectReason.IMMEDIATE_COMMAND_REJECT, False)
            return
        self.discarding.discard(itt)        # the ITT is reused: its old Data-Out is over
        if pdu.ahs:
            try:
                cdb = extended_cdb(cdb, pdu.ahs)
            except MalformedAhs as exc:
                self.log.warning("SCSI command ITT 0x%08x: %s", itt, exc)
                self._reject_command(pdu, RejectReason.INVALID_PDU_FIELD, holds_slot)
                return
        task = ScsiTask(wire.decode_lun(lun_field), cdb, s.nexus, flags & 0x07, itt, None, edtl)
        reading = bool(flags & 0x40)
        cmd = Command(itt, lun_field, task, reading, holds_slot)
        if writing and reading:
            # bidirectional commands: no command of ours uses them
            return self._fail_early(cmd, pdu, 0x05, 0x2400)
        if not writing:
            if pdu.data:
                self._reject_command(pdu, RejectReason.PROTOCOL_ERROR, holds_slot)
                return
            self._submit(cmd)
            return
        immediate = pdu.data
        v = self.values
        if len(immediate) > edtl or len(immediate) > v.first_burst_length:
            self._reject_command(pdu, RejectReason.PROTOCOL_ERROR, holds_slot)
            return
        if edtl > MAX_WRITE_BUFFER:
            return self._fail_early(cmd, pdu, 0x05, 0x2400)
        with self.lock:
            over_budget = self.buffered + edtl > WRITE_BUDGET
            if not over_budget:
                self.buffered += edtl
        if over_budget:
            # memory for Data-Out is bounded (istgt bug B20): ask the initiator to retry
            if not pdu.final:
                self.discarding.add(itt)
            self._answer_now(cmd, BUSY)
            return
        if len(immediate) == edtl:
            cmd.buffer = immediate          # all of it came with the command: no copy
        else:
            cmd.buffer = bytearray(edtl)
            if immediate:
                cmd.buffer[:len(immediate)] = immediate
        cmd.received = len(immediate)
        cmd.unsolicited_end = cmd.unsolicited_next = len(immediate)
        if not v.initial_r2t and not pdu.final:
            cmd.unsolicited_end = min(v.first_burst_length, edtl)
        cmd.next_offset = cmd.unsolicited_end
        if cmd.received >= edtl:
            self._submit_write(cmd)
            return
        with self.lock:
            self.writes[itt] = cmd
        self._issue_r2ts(cmd)

    def _answer_now(self, cmd, status: int, sense: bytes = b"") -> None:
        """Answer a command without executing it (it goes through the normal completion)."""
        cmd.task.status = status
        cmd.task.sense = sense
        with self.lock:
            self.active[cmd.itt] = cmd
        self._task_done(cmd, cmd.task, False)

    def _fail_early(self, cmd, pdu, key: int, asc: int) -> None:
        """Answer CHECK CONDITION without executing; any unsolicited data is thrown away."""
        if pdu.write_bit and not pdu.final:
            self.discarding.add(cmd.itt)
        self._answer_now(cmd, CHECK_CONDITION, encode_sense(key, asc))

    def _reject_command(self, pdu, reason, holds_slot) -> None:
        if holds_slot:
            self.session.release_slot()
        if pdu.write_bit and not pdu.final:
            self.discarding.add(pdu.itt)
        self.send([wire.reject(reason, pdu.bhs)])

    def _issue_r2ts(self, cmd: Command) -> None:
        v = self.values
        edtl = cmd.task.transfer_length
        out = []
        while cmd.outstanding_r2t < v.max_outstanding_r2t and cmd.next_offset < edtl:
            length = min(v.max_burst_length, edtl - cmd.next_offset)
            ttt = self._new_ttt()
            with self.lock:
                if self.writes.get(cmd.itt) is not cmd:
                    break                         # aborted meanwhile: ask for nothing more
                self.r2ts[ttt] = R2tState(cmd, cmd.next_offset, length)
            out.append(wire.r2t(cmd.itt, cmd.lun_field, ttt, cmd.r2t_sn, cmd.next_offset,
                                length))
            cmd.r2t_sn += 1
            cmd.next_offset += length
            cmd.outstanding_r2t += 1
        if out:
            self.send(out)

    def _on_data_out(self, pdu, length: int) -> None:
        itt = pdu.itt
        with self.lock:
            cmd = self.writes.get(itt)
            r2t = self.r2ts.get(pdu.ttt) if pdu.ttt != RESERVED else None
        if cmd is None:
            self.reader.discard(length)
            if itt in self.discarding:
                if pdu.final:
                    self.discarding.discard(itt)
                return
            self.log.warning("Data-Out for unknown ITT 0x%08x", itt)
            self.send([wire.reject(RejectReason.INVALID_PDU_FIELD, pdu.bhs)])
            return
        offset = pdu.buffer_offset
        if pdu.ttt != RESERVED:
            in_range = (r2t is not None and r2t.command is cmd and r2t.offset <= offset
                        and offset + length <= r2t.offset + r2t.length)
        else:
            in_range = offset + length <= cmd.unsolicited_end
        if not in_range:
            self.reader.discard(length)
            self.send([wire.reject(RejectReason.INVALID_PDU_FIELD, pdu.bhs)])
            return
        expected_sn = r2t.data_sn if r2t is not None else cmd.unsolicited_sn
        expected_offset = r2t.next_offset if r2t is not None else cmd.unsolicited_next
        if pdu.data_sn != expected_sn or offset != expected_offset:
            # ERL 0 cannot recover a lost or reordered Data-Out, and DataPDUInOrder=Yes
            # forbids gaps and overlays (RFC 7143 13.18): the command fails, the
            # connection goes on (RFC 7143 7.1.4, sense "data phase error")
            self.reader.discard(length)
            self.log.warning("Data-Out DataSN %d offset %d for ITT 0x%08x, expected %d at %d",
                             pdu.data_sn, offset, itt, expected_sn, expected_offset)
            self._fail_gathering(cmd, DATA_PHASE_ERROR)
            return
        if r2t is not None:
            r2t.data_sn += 1
        else:
            cmd.unsolicited_sn += 1
            cmd.unsolicited_next += length
        _, ok = self.reader.read_data(length, memoryview(cmd.buffer)[offset:offset + length])
        if not ok:
            # ERL 0: the data cannot be resent, so the command fails (RFC 7143 7.8)
            self.log.warning("data digest error on Data-Out for ITT 0x%08x", itt)
            self.send([wire.reject(RejectReason.DATA_DIGEST_ERROR, pdu.bhs)])
            self._fail_gathering(cmd, PROTOCOL_SERVICE_CRC_ERROR)
            return
        with self.lock:
            if self.writes.get(itt) is not cmd:
                return                     # aborted meanwhile
            cmd.received += length
            if r2t is not None:
                r2t.received += length
                short = pdu.final and r2t.received < r2t.length
                if pdu.final or r2t.received >= r2t.length:
                    self.r2ts.pop(pdu.ttt, None)
                    cmd.outstanding_r2t -= 1
            else:
                short = pdu.final and cmd.unsolicited_next < cmd.unsolicited_end
            complete = not short and cmd.received >= cmd.task.transfer_length
            if complete:
                del self.writes[itt]
                self._drop_r2ts(cmd)
        if short:
            # a burst ended (F bit) before the length the R2T or FirstBurstLength asked for:
            # nothing will send the rest at ERL 0, so the command fails now rather than wait
            self.log.warning("Data-Out burst for ITT 0x%08x ended early at offset %d",
                             itt, offset + length)
            self._fail_gathering(cmd, DATA_PHASE_ERROR)
        elif complete:
            self._submit_write(cmd)
        elif r2t is not None and cmd.outstanding_r2t < self.values.max_outstanding_r2t:
            self._issue_r2ts(cmd)

    def _fail_gathering(self, cmd: Command, asc: int) -> None:
        """End a write still gathering Data-Out with CHECK CONDITION, ABORTED COMMAND; the
        rest of its Data-Out is thrown away as it arrives."""
        with self.lock:
            if self.writes.pop(cmd.itt, None) is not cmd:
                return
            self._drop_r2ts(cmd)
            self.discarding.add(cmd.itt)
        self._answer_now(cmd, CHECK_CONDITION, encode_sense(ABORTED_COMMAND, asc))

    def _drop_r2ts(self, cmd) -> None:
        for ttt in [t for t, r in self.r2ts.items() if r.command is cmd]:
            del self.r2ts[ttt]

    def _submit_write(self, cmd: Command) -> None:
        cmd.task.data_out = memoryview(cmd.buffer)
        self._submit(cmd)

    def _submit(self, cmd: Command) -> None:
        """Hand a command to its LU. Commands are collected while more PDUs wait in the
        receive buffer and submitted together before the receiver blocks (fewer wake-ups)."""
        with self.lock:
            self.active[cmd.itt] = cmd
        self._to_submit.append(
            (cmd.task, lambda task, aborted: self._task_done(cmd, task, aborted)))

    def _reading_over(self) -> bool:
        """Closed, and not (or no longer) draining what already arrived."""
        return self.closing and time.monotonic() >= self._drain_until

    def _flush_submissions(self) -> None:
        if self._to_submit:
            items, self._to_submit = self._to_submit, []
            if self._reading_over():
                # closed without draining (replaced, reset, refused): what was read but
                # not started never runs (its slot in the CmdSN window is given back)
                for task, done in items:
                    done(task, True)
                return
            self.session.target.submit_many(items, run_here=True)

    # ------------------------------------------------------------------ completion
    def _immediate_in_flight(self) -> int:
        with self.lock:       # rare (immediate SCSI commands), so a count beats bookkeeping
            return sum(1 for c in (*self.active.values(), *self.writes.values())
                       if not c.holds_slot)

    def _task_done(self, cmd: Command, task, aborted: bool) -> None:
        pending = getattr(_corked, "pending", None)
        with self.lock:
            self.active.pop(cmd.itt, None)
            if cmd.buffer is not None:
                self.buffered -= len(cmd.buffer)
            if pending is not None and not aborted and self not in pending:
                # the answer is written when the worker's batch ends: count it as in flight
                # in the same step as the command stops being active (teardown waits for both)
                pending.append(self)
                self._deferred += 1
            if not self.active and not self._deferred:
                self.idle.notify_all()
        if aborted:
            if cmd.holds_slot:
                self.session.release_slot()
            return
        self.send(scsi_responses(cmd, task, self.max_send_segment,
                                  self.values.max_burst_length))

    # ------------------------------------------------------------------ NOP
    def _on_nop_out(self, pdu) -> None:
        itt = pdu.itt
        if itt == RESERVED:
            # an answer to our ping (or a ping that wants no answer): RFC 7143 11.18
            if pdu.ttt != RESERVED and pdu.ttt == self.ping_ttt:
                self.ping_ttt = None
            return
        if pdu.ttt != RESERVED:
            self.send([wire.reject(RejectReason.PROTOCOL_ERROR, pdu.bhs)])
            return
        if not self.session.accept_cmdsn(pdu.cmdsn, pdu.immediate):
            return
        data = bytes(pdu.data[:self.max_send_segment])
        self.send([wire.nop_in(itt, RESERVED, pdu.lun_field, data,
                                ends_command=not pdu.immediate)])

    def ping(self) -> None:
        ttt = self._new_ttt()
        self.ping_ttt = ttt
        self.ping_sent_at = time.monotonic()
        self.send([wire.nop_in(RESERVED, ttt, 0, takes_statsn=False)])

    def tick(self, now: float, nop_interval: int, timeout: int) -> None:
        """Called every KEEPALIVE_TICK by the server's keep-alive thread."""
        if self.closing:
            return
        if not self.in_ffp:
            if timeout and now - self.reader.last_rx > timeout:
                self.close_async("login timed out")
            return
        if self.ping_ttt is not None:
            if timeout and now - self.ping_sent_at > timeout:
                self.log.warning("no NOP-Out from %s for %d s: closing", self.peer_ip, timeout)
                self.close_async("ping timeout")
        elif nop_interval and now - self.reader.last_rx >= nop_interval and \
                now - self.ping_sent_at >= nop_interval:
            self.ping()

    # ------------------------------------------------------------------ task management
    def abort_writes(self, match) -> bool:
        """Abort commands still gathering Data-Out (not yet in the LU's queue); any thread."""
        with self.lock:
            hit = [c for c in self.writes.values() if match(c)]
            for cmd in hit:
                del self.writes[cmd.itt]
                self._drop_r2ts(cmd)
                self.discarding.add(cmd.itt)
                self.buffered -= len(cmd.buffer)
        for cmd in hit:
            if cmd.holds_slot:
                self.session.release_slot()
        return bool(hit)

    # ------------------------------------------------------------------ text
    def _on_text(self, pdu) -> None:
        s = self.session
        if not s.accept_cmdsn(pdu.cmdsn, pdu.immediate):
            return
        ends = not pdu.immediate
        if pdu.final and pdu.cont:
            self._reject_accepted(pdu, RejectReason.PROTOCOL_ERROR)
            return
        ttt = pdu.ttt
        if ttt == RESERVED:
            # a new request: whatever an earlier one left behind is over
            self.text_in.clear()
            self._text_in_ttt = None
            self.text_rest.clear()
        elif ttt == self._text_in_ttt:
            self._text_in_ttt = None              # the next part of a continued request
        else:
            rest = self.text_rest.pop(ttt, None)
            if rest is None:
                self._reject_accepted(pdu, RejectReason.INVALID_PDU_FIELD)
                return
            self._send_text(pdu, rest, ends)     # the initiator asks for more of our answer
            return
        self.text_in += pdu.data
        if len(self.text_in) > MAX_TEXT_REQUEST:
            self.text_in.clear()
            self._reject_accepted(pdu, RejectReason.PROTOCOL_ERROR)
            return
        if pdu.cont:
            self._text_in_ttt = self._new_ttt()
            self.send([wire.text_response(pdu.itt, self._text_in_ttt, b"", False, False,
                                          ends_command=ends)])
            return
        try:
            pairs = params.parse_text(bytes(self.text_in))
        except params.TextError:
            self.text_in.clear()
            self._reject_accepted(pdu, RejectReason.PROTOCOL_ERROR)
            return
        self.text_in.clear()
        answers = []
        new_mrdsl = None
        for key, value in pairs:
            if key == "SendTargets":
                answers += send_targets(self.server, self, value)
            elif key == "MaxRecvDataSegmentLength":
                try:
                    n = int(value, 0)
                except ValueError:
                    n = 0
                if 512 <= n <= 16777215:
                    new_mrdsl = n
                    answers.append((key, str(self.max_recv_segment)))
                else:
                    answers.append((key, "Reject"))
            elif key.startswith(("X-", "X#")):
                answers.append((key, "NotUnderstood"))
            else:
                answers.append((key, "Reject"))      # login-only or unknown in this phase
        self._send_text(pdu, params.encode_text(answers), ends)
        if new_mrdsl:
            self.max_send_segment = new_mrdsl

    def _reject_accepted(self, pdu, reason) -> None:
        """Reject a PDU whose CmdSN was accepted: its slot in the window is freed."""
        r = wire.reject(reason, pdu.bhs)
        r.ends_command = not pdu.immediate
        self.send([r])

    def _new_ttt(self) -> int:
        """A Target Transfer Tag: unique on this connection, never 0 or 0xffffffff (the
        receiver and the keep-alive thread both take them)."""
        with self._ttt_lock:
            ttt = self._next_ttt
            nxt = (ttt + 1) & M32
            self._next_ttt = 1 if nxt in (0, RESERVED) else nxt
            return ttt

    def _send_text(self, pdu, data: bytes, ends: bool) -> None:
        limit = self.max_send_segment
        if len(data) <= limit:
            self.send([wire.text_response(pdu.itt, RESERVED, data, True, False,
                                           ends_command=ends)])
            return
        ttt = self._new_ttt()
        self.text_rest[ttt] = data[limit:]
        self.send([wire.text_response(pdu.itt, ttt, data[:limit], False, True,
                                       ends_command=ends)])

    # ------------------------------------------------------------------ logout
    def _on_logout(self, pdu) -> None:
        s = self.session
        # a logout is honoured even out of window; only an accepted one frees a slot
        accepted = s.accept_cmdsn(pdu.cmdsn, pdu.immediate)
        reason = pdu.reason
        v = self.values
        after = None
        if reason == 0:
            response = 0
            after = lambda: s.close_all("logout (close session)")
        elif reason == 1:
            if pdu.cid == self.cid:
                response = 0
                after = lambda: self.close_async("logout (close connection)")
            else:
                others = [c for c in s.members() if c.cid == pdu.cid]
                response = 0 if others else 1
                for c in others:
                    c.close_async("logout by another connection")
        elif reason == 2:
            response = 2        # connection recovery is not supported (ERL 0)
        else:
            r = wire.reject(RejectReason.PROTOCOL_ERROR, pdu.bhs)
            r.ends_command = accepted and not pdu.immediate
            self.send([r])
            return
        log.info("Logout%s from %s (%s) on %s, TSIH=%d, CID=%d, reason %d",
                 "(discovery)" if s.discovery else "", s.initiator_name, self.peer_ip,
                 s.target_name or "discovery", s.tsih, self.cid, reason)
        if after is not None:
            self._wait_idle(self.server.config.global_.timeout or 60)
            if reason == 0 or len(s.members()) == 1:
                s.end_nexus()
        r = wire.logout_response(pdu.itt, response, v.default_time2wait,
                                 v.default_time2retain,
                                 ends_command=accepted and not pdu.immediate)
        r.after_send = after
        self.send([r])

    def _deferred_done(self) -> None:
        with self.lock:
            self._deferred -= 1
            if not self.active and not self._deferred:
                self.idle.notify_all()

    def _wait_idle(self, timeout: float) -> None:
        """Wait until every command has ended and its answer has been handed to the socket."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while self.active or self._deferred:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.idle.wait(left)

    # ================================================================== sending
    def send(self, responses) -> None:
        """Queue answers for the initiator. Inside a corked() block they are written when the
        block ends (one write for a worker's whole batch); otherwise at once if possible."""
        pending = getattr(_corked, "pending", None)
        if pending is None:
            self.writer.send(responses)
            return
        self.writer.queue(responses)
        if self not in pending:
            pending.append(self)
            with self.lock:
                self._deferred += 1          # teardown waits for that write

    def _flush_corked(self) -> None:
        try:
            self.writer.send(())
        finally:
            self._deferred_done()

    # ================================================================== teardown
    def close_async(self, reason: str, force: bool = False, drain: bool = False) -> None:
        """Ask the connection to end; safe from any thread. Normally only reading stops, so
        commands in flight are still answered; `force` also cuts writing at once. `drain`
        (the target shutting down): PDUs that already arrived are still served, for up to
        DRAIN_S; never for a connection replaced, reset or refused (what it still holds
        must not run after its successor's commands)."""
        if self.closing and not force:
            return
        self._drain_until = time.monotonic() + DRAIN_S if drain and not force else 0.0
        self.closing = True
        if not drain:
            self._abort_started_tasks()
        self.log.debug("closing connection from %s: %s", self.peer_ip, reason)
        try:
            self.sock.shutdown(socket.SHUT_RDWR if force else socket.SHUT_RD)
        except OSError:
            pass

    def _abort_started_tasks(self) -> None:
        """Tasks of this connection in the LU's task set end without an answer: a queued
        one or one a receiver has not reached yet in its batch never runs; one running
        finishes (it cannot be stopped half way). Never waits."""
        session = self.session
        if session is None or session.discovery or session.target is None:
            return
        with self.lock:
            mine = {id(c.task) for c in self.active.values()}
        if mine:
            session.target.abort_now(lambda task: id(task) in mine)

    def _teardown(self, reason: str) -> None:
        self.closing = True
        # Commands already received run to the end and are answered if the socket still works.
        if self.session is not None and not self.session.discovery:
            self._flush_submissions()
        self._wait_idle(30)
        if self.session is not None:
            self.abort_writes(lambda c: True)
        self.writer.stop(10)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)   # also ends a write still blocked on it
        except OSError:
            pass
        self.writer.wait_no_writer(5)
        self.sock.close()
        s = self.session
        if s is not None and s.remove_connection(self):
            self.server.sessions.unregister(s)
            s.end_nexus()
            log.info("session TSIH %d of %s ended (%s)", s.tsih, s.initiator_port, reason)
        self.server.connection_closed(self)
        # The reader and writer call back into this connection: unhook them, so that
        # reference counting frees it (and its receive buffer) now, not a later GC pass.
        self.reader.before_blocking = _nothing
        self.writer.on_failure = _nothing
        self.finished.set()


def _nothing() -> None:
    pass


def _plain_ip(ip: str) -> str:
    return ip.split("%", 1)[0]
