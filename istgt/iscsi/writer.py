"""The write side of one connection: PDUs stamped with sequence numbers and written.

Exactly one thread writes at a time: whoever holds the writer token (_writing). A thread that
queues responses while nobody writes takes the token and tries the write itself without
blocking (MSG_DONTWAIT), saving a hand-off to the sender thread; whatever the socket does not
take at once, and any PDU with an after-send action, goes to the sender thread, which alone
blocks on the socket, so a slow initiator never holds up an LU worker. Bytes queued but not yet
written are counted so the receiver can stop reading from a peer that does not read.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import deque

from istgt.iscsi import pdu as wire
from istgt.iscsi.pdu import Op, ProtocolError
from istgt.iscsi.reader import hexdump

log = logging.getLogger("istgt.iscsi")

IOV_MAX = 1000
OUT_LIMIT = 64 * 1024 * 1024            # answers queued for a peer that does not read them
M32 = 0xFFFFFFFF
_DATA_IN = int(Op.DATA_IN)


class PduWriter:
    def __init__(self, sock: socket.socket, conn_log, on_failure, name: str):
        self.sock = sock
        self.log = conn_log
        self.on_failure = on_failure          # called (from a writer) when the socket fails
        self.header_digest = False
        self.data_digest = False
        self.session = None                   # set at full feature phase (CmdSN window)
        self.login_cmdsn = 0                  # ExpCmdSN/MaxCmdSN before there is a session
        self.stat_sn = 0                      # touched only by the token holder
        self._out_lock = threading.Lock()
        self._outq: deque = deque()           # guarded by _out_lock
        self._send_stop = False               # guarded by _out_lock
        self._sender_parked = False           # guarded by _out_lock
        self._writing = False                 # a thread holds the writer token; _out_lock
        self._token_to_sender = False         # ... and it is the sender thread; _out_lock
        self._leftover = None                 # encoded bytes the sender must write first
        self._leftover_size = 0
        self._unsent = 0                      # bytes queued but not yet written; _out_lock
        self._drained = threading.Condition(self._out_lock)
        self._sender_wake = threading.Lock()  # released to wake the parked sender
        self._sender_wake.acquire()
        self._sender = threading.Thread(target=self._send_main, daemon=True, name=name)

    def start(self) -> None:
        self._sender.start()

    @property
    def backlog(self) -> int:
        return self._unsent

    def queue(self, responses) -> None:
        """Queue without writing (the caller has the write done later with send(()))."""
        with self._out_lock:
            self._outq.extend(responses)
            self._unsent += _wire_size(responses)

    def send(self, responses) -> None:
        """Queue `responses` and write them now if no other thread is writing."""
        with self._out_lock:
            self._outq.extend(responses)
            self._unsent += _wire_size(responses)
            if self._writing or self._send_stop or not self._outq:
                return              # the token holder drains the queue before letting go
            self._writing = True
            batch = self._outq
            self._outq = deque()
        try:
            while True:
                if any(r.after_send is not None for r in batch):
                    self._hand_to_sender(batch, None, 0)
                    return
                size = _wire_size(batch)
                rest = self._sendmsg(self._encode(batch), blocking=False)
                if rest:
                    self._hand_to_sender(None, rest, size)
                    return
                with self._out_lock:
                    self._written(size)
                    if not self._outq:
                        self._writing = False
                        return
                    batch = self._outq
                    self._outq = deque()
        except OSError as e:
            with self._out_lock:
                self._writing = False
            self._failed(e)

    def _written(self, size: int) -> None:
        """`size` bytes went out (call with _out_lock held)."""
        self._unsent -= size
        if self._unsent <= OUT_LIMIT // 2:
            self._drained.notify_all()

    def wait_for_reader(self, timeout: float) -> None:
        """Stop reading requests while too many answers wait for a peer that does not read
        them; a peer that reads nothing for Timeout seconds loses the connection."""
        deadline = time.monotonic() + timeout
        with self._out_lock:
            while self._unsent > OUT_LIMIT // 2 and not self._send_stop:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ProtocolError(f"the initiator read no answers for {timeout} s")
                self._drained.wait(left)

    def _hand_to_sender(self, batch, leftover, leftover_size: int) -> None:
        """Give the writer token to the sender thread with what is still to be written."""
        with self._out_lock:
            if batch is not None:
                batch.extend(self._outq)
                self._outq = batch
            self._leftover = leftover
            self._leftover_size = leftover_size
            self._token_to_sender = True
            if self._sender_parked:
                self._sender_parked = False
                self._sender_wake.release()

    def send_and_wait(self, response) -> None:
        done = threading.Event()
        prev = response.after_send

        def mark():
            if prev:
                prev()
            done.set()
        response.after_send = mark
        self.send([response])
        # Until it is written, or the writer stopped (a failed send: the peer is gone, and
        # nothing will write it). Waiting the full 30 s then kept a dead connection, its
        # threads and its login slot; on a loaded machine a fuzz run left 128 of them.
        deadline = time.monotonic() + 30
        while not done.wait(0.05):
            if self._send_stop or time.monotonic() > deadline:
                return

    def _send_main(self) -> None:
        try:
            while True:
                with self._out_lock:
                    owns_token = self._token_to_sender
                    if owns_token:
                        leftover, self._leftover = self._leftover, None
                        leftover_size = self._leftover_size
                    elif self._send_stop:
                        return
                    else:
                        self._sender_parked = True
                if not owns_token:
                    self._sender_wake.acquire()
                    continue
                if leftover:
                    self._sendmsg(leftover, blocking=True)
                    with self._out_lock:
                        self._written(leftover_size)
                while True:
                    with self._out_lock:
                        if not self._outq:
                            self._writing = self._token_to_sender = False
                            break
                        batch = self._outq
                        self._outq = deque()
                    self._write_batch(batch)
                    with self._out_lock:
                        self._written(_wire_size(batch))
        except OSError as e:
            self._failed(e)
        finally:
            with self._out_lock:
                self._send_stop = True
                self._writing = self._token_to_sender = False
                self._outq.clear()
                self._unsent = 0
                self._drained.notify_all()

    def stop(self, timeout: float) -> None:
        """Let the sender finish what it holds, then end it; wait (bounded) until no other
        thread is writing, so the socket may be closed."""
        with self._out_lock:
            self._send_stop = True
            if self._sender_parked:
                self._sender_parked = False
                self._sender_wake.release()
        self._sender.join(timeout)

    def wait_no_writer(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._out_lock:
                if not self._writing:
                    return
            time.sleep(0.01)      # a worker is finishing a write: its fd must stay valid

    def _failed(self, error: OSError) -> None:
        self.log.debug("send failed: %s", error)
        self.on_failure()

    def _encode(self, batch) -> list:
        """Stamp the sequence numbers and lay out headers, data, padding and digests."""
        bufs = []
        session = self.session
        trace = log.isEnabledFor(logging.DEBUG)
        if session is None:
            for r in batch:
                self._stamp(r, self.login_cmdsn, self.login_cmdsn)
        else:
            with session.lock:        # once per batch: the window moves as answers go out
                exp, mx = session.exp_cmdsn, session.max_cmdsn
                for r in batch:
                    if r.ends_command:
                        mx = (mx + 1) & M32
                        session.max_cmdsn = mx
                    self._stamp(r, exp, mx)
        for r in batch:
            if trace:                              # PDU dumps only with -t iscsi
                self.log.debug("PDU out: %s", hexdump(r.bhs))
            self._append_pdu(bufs, r)
        return bufs

    def _stamp(self, r, exp: int, mx: int) -> None:
        sn = self.stat_sn
        if r.takes_statsn:
            self.stat_sn = (sn + 1) & M32
        elif r.bhs[0] == _DATA_IN:
            sn = 0      # StatSN is reserved in a Data-In without status
        wire.stamp(r, sn, exp, mx)

    def _append_pdu(self, bufs: list, r) -> None:
        bufs.append(r.bhs)
        if self.header_digest:
            bufs.append(wire.digest_bytes(wire.crc32c(bytes(r.bhs))))
        data = r.data
        if data:
            n = len(data)
            bufs.append(data)
            pad = wire.PADDING[n & 3]
            if pad:
                bufs.append(pad)
            if self.data_digest:
                crc = wire.crc32c(data)
                if pad:
                    crc = wire.crc32c_extend(crc, pad)
                bufs.append(wire.digest_bytes(crc))

    def _write_batch(self, batch) -> None:
        """The sender's blocking write; runs after-send actions once their PDU is out."""
        pending = []
        for r in batch:
            pending.append(r)
            if r.after_send is not None:
                # write now: the action may change digests or close the socket
                self._sendmsg(self._encode(pending), blocking=True)
                pending = []
                r.after_send()
        if pending:
            self._sendmsg(self._encode(pending), blocking=True)

    def _sendmsg(self, bufs: list, blocking: bool) -> list | None:
        """Write `bufs`; without blocking, return what the socket did not take (or None)."""
        sock = self.sock
        flags = 0 if blocking else socket.MSG_DONTWAIT
        while bufs:
            chunk = bufs[:IOV_MAX]
            try:
                sent = sock.sendmsg(chunk, (), flags)
            except BlockingIOError:
                return bufs
            total = sum(len(b) for b in chunk)
            if sent == total:
                bufs = bufs[IOV_MAX:]
                continue
            # partial send: drop what went out and go on with the rest
            rest = []
            for b in chunk:
                n = len(b)
                if sent >= n:
                    sent -= n
                    continue
                rest.append(memoryview(b)[sent:] if sent else b)
                sent = 0
            bufs = rest + bufs[IOV_MAX:]
            if not blocking:
                return bufs
        return None


def _wire_size(responses) -> int:
    return sum(wire.BHS_LEN + len(r.data) for r in responses)
