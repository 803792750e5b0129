"""The read side of one connection: PDUs from the socket through one reused buffer.

A single recv often brings several PDUs (queue depth > 1), which are then parsed without
further system calls. Payloads too big for the buffer go straight from the socket into their
destination (a write command's buffer).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

from istgt.iscsi import pdu as wire
from istgt.iscsi.pdu import ProtocolError

log = logging.getLogger("istgt.iscsi")

RECV_BUFFER = 256 * 1024
# Before sleeping in recv, a receiver whose peer answered quickly last time polls the socket
# for up to SPIN_NS: at queue depth 1 the next command usually arrives within that, and
# sleeping and being woken again costs more than the command itself (4k QD1 reads: 1.46x
# with 30 us, measured). Only SPIN_SLOTS receivers poll at once, so polling never takes
# every core; an idle connection never polls, and nobody polls while another receiver is
# awake (its work would wait for the GIL). ISTGT_SPIN_US=0 turns it off.
SPIN_NS = int(os.environ.get("ISTGT_SPIN_US", "30")) * 1000
SPIN_SLOTS = [threading.Lock() for _ in range(max(1, (os.cpu_count() or 1) - 1))]


class ReceiverCensus:
    """How many receiver threads exist and how many sleep in recv right now."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.receivers = 0          # guarded by _lock
        self.sleeping = 0           # guarded by _lock

    def joined(self) -> None:
        with self._lock:
            self.receivers += 1

    def left(self) -> None:
        with self._lock:
            self.receivers -= 1

    def asleep(self) -> None:
        with self._lock:
            self.sleeping += 1

    def awake(self) -> None:
        with self._lock:
            self.sleeping -= 1

    def others_awake(self) -> bool:
        """Whether a receiver besides the calling one is not sleeping."""
        return self.receivers - self.sleeping > 1


CENSUS = ReceiverCensus()


class ConnectionClosed(Exception):
    pass


def hexdump(data: bytes) -> str:
    return " ".join(data[i:i + 16].hex(" ") for i in range(0, len(data), 16))


class PduReader:
    def __init__(self, sock: socket.socket, before_blocking, conn_log):
        self.sock = sock
        self.before_blocking = before_blocking   # called before the reader waits on the peer
        self.log = conn_log
        self.header_digest = False
        self.data_digest = False
        self.last_rx = time.monotonic()          # when the last PDU header arrived
        self._buf = memoryview(bytearray(RECV_BUFFER))
        self._start = self._end = 0              # unread bytes are _buf[_start:_end]
        self._spin = False                       # the last wait for the peer was short

    def _fill(self, need: int) -> None:
        """Make at least `need` bytes available in the buffer."""
        start, end = self._start, self._end
        if end - start >= need:
            return
        if start + need > RECV_BUFFER:
            self._buf[:end - start] = self._buf[start:end]
            start, end = 0, end - start
            self._start = 0
        self.before_blocking()
        sock = self.sock
        view = self._buf
        if self._spin and SPIN_NS and not CENSUS.others_awake():
            n = self._poll(view[end:])
            if n is not None:
                if n == 0:
                    self._end = end
                    raise ConnectionClosed("peer closed the connection")
                end += n
        waited_since = time.perf_counter_ns()
        if end - start < need:
            CENSUS.asleep()
            try:
                while end - start < need:
                    n = sock.recv_into(view[end:])
                    if n == 0:
                        self._end = end
                        raise ConnectionClosed("peer closed the connection")
                    end += n
            finally:
                CENSUS.awake()
        if SPIN_NS:
            self._spin = time.perf_counter_ns() - waited_since < 2 * SPIN_NS
        self._end = end

    def _poll(self, view: memoryview) -> int | None:
        """Receive into `view` without sleeping, for up to SPIN_NS, if a polling slot is
        free: bytes received (0 at end of stream), or None."""
        for slot in SPIN_SLOTS:
            if slot.acquire(False):
                break
        else:
            return None
        try:
            sock = self.sock
            deadline = time.perf_counter_ns() + SPIN_NS
            while time.perf_counter_ns() < deadline:
                try:
                    return sock.recv_into(view, 0, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    pass
            return None
        finally:
            slot.release()

    def _take(self, n: int) -> bytes:
        self._fill(n)
        start = self._start
        self._start = start + n
        return bytes(self._buf[start:start + n])

    def recv_into(self, view: memoryview) -> None:
        """Fill `view` exactly: first from the buffer, then directly from the socket."""
        start = self._start
        buffered = min(len(view), self._end - start)
        if buffered:
            view[:buffered] = self._buf[start:start + buffered]
            self._start = start + buffered
            view = view[buffered:]
        if not view:
            return
        if len(view) < RECV_BUFFER // 4:
            self._fill(len(view))
            start = self._start
            view[:] = self._buf[start:start + len(view)]
            self._start = start + len(view)
            return
        self.before_blocking()
        sock = self.sock
        CENSUS.asleep()
        try:
            while view:
                n = sock.recv_into(view, len(view), socket.MSG_WAITALL)
                if n == 0:
                    raise ConnectionClosed("peer closed the connection")
                view = view[n:]
        finally:
            CENSUS.awake()

    def _recv_bytes(self, n: int):
        if n <= RECV_BUFFER // 4:
            return self._take(n)
        buf = bytearray(n)
        self.recv_into(memoryview(buf))
        return buf

    def read_header(self) -> tuple[bytes, bytes]:
        """The next BHS and its AHS; a header digest error ends the stream (ERL 0)."""
        bhs = self._take(wire.BHS_LEN)
        self.last_rx = time.monotonic()
        if log.isEnabledFor(logging.DEBUG):    # PDU dumps only with -t iscsi
            self.log.debug("PDU in: %s", hexdump(bhs))
        ahs_len = bhs[4] * 4
        ahs = self._take(ahs_len) if ahs_len else b""
        if self.header_digest:
            got = int.from_bytes(self._take(4), "little")
            crc = wire.crc32c(bhs + ahs) if ahs else wire.crc32c(bhs)
            if got != crc:
                # the length fields cannot be trusted, so the stream is lost
                raise ProtocolError("header digest error")
        return bhs, ahs

    def read_data(self, length: int, into: memoryview | None = None):
        """A data segment (with its padding and digest) -> (data, digest_ok); `into`
        receives it in place."""
        if into is None:
            data = self._recv_bytes(length)
            view = memoryview(data)
        else:
            data = view = into
            self.recv_into(view)
        pad = wire.pad_len(length)
        padding = self._recv_bytes(pad) if pad else b""
        ok = True
        if self.data_digest and length:
            got = int.from_bytes(self._recv_bytes(4), "little")
            crc = wire.crc32c(view)
            if pad:
                crc = wire.crc32c_extend(crc, bytes(padding))
            ok = got == crc
        return data, ok

    def discard(self, length: int) -> None:
        """Skip a data segment (with padding and digest)."""
        left = length + wire.pad_len(length) + (4 if self.data_digest and length else 0)
        scratch = memoryview(bytearray(min(left, 1 << 20) or 1))
        while left:
            n = min(left, len(scratch))
            self.recv_into(scratch[:n])
            left -= n
