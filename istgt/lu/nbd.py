"""An NBD client (the protocol of github.com/NetworkBlockDevice/nbd, doc/proto.md) for disk
images served by qemu-storage-daemon over a Unix socket.

Requests are pipelined: any number of threads send on one connection and a reader thread
hands each reply to its waiter by cookie, reading READ payloads straight into the caller's
buffer. If the server goes away, requests still unanswered are sent again on a new
connection once `reconnect` (the daemon's supervisor) says the export is back; every
command we send (READ, WRITE, FLUSH, TRIM, WRITE_ZEROES) may be repeated safely.

Block status needs structured replies, which make qemu's server look up allocation on every
READ as well; so it has a connection of its own, opened on first use.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import socket
import struct
import threading
import time

from istgt.listen import connect_unix

log = logging.getLogger("istgt.nbd")

# Handshake (fixed newstyle)
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x0003E889045565A9
FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
OPT_GO, OPT_STRUCTURED_REPLY, OPT_SET_META_CONTEXT = 7, 8, 10
REP_ACK, REP_INFO, REP_META_CONTEXT = 1, 3, 4
REP_ERROR_BIT = 1 << 31
INFO_EXPORT, INFO_BLOCK_SIZE = 0, 3

# Transmission
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM = 0, 1, 2, 3, 4
CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = 6, 7
CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLAG_REQ_ONE = 0x01, 0x02, 0x08
FLAG_READ_ONLY, FLAG_SEND_FLUSH, FLAG_SEND_FUA = 0x02, 0x04, 0x08
FLAG_SEND_TRIM, FLAG_SEND_WRITE_ZEROES = 0x20, 0x40
REPLY_FLAG_DONE = 1
REPLY_TYPE_NONE, REPLY_TYPE_BLOCK_STATUS = 0, 5
REPLY_TYPE_ERROR_BIT = 1 << 15
STATE_HOLE = 1

_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")
_STRUCTURED_REPLY = struct.Struct(">IHHQI")
RECONNECT_S = 30.0               # how long unanswered requests wait for the export to return
CONNECT_TIMEOUT_S = 10.0

# NBD error values are errno numbers of Linux.
_ERRORS = {1: errno.EPERM, 5: errno.EIO, 12: errno.ENOMEM, 22: errno.EINVAL,
           28: errno.ENOSPC, 75: errno.EOVERFLOW, 95: errno.EOPNOTSUPP, 108: errno.ESHUTDOWN}


class NbdError(OSError):
    """The handshake failed, or the server answered a request with an error."""


def _recv_exact(sock: socket.socket, length: int) -> bytes:
    buffer = bytearray(length)
    _recv_into(sock, memoryview(buffer))
    return bytes(buffer)


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    while view:
        count = sock.recv_into(view)
        if count == 0:
            raise ConnectionError("NBD server closed the connection")
        view = view[count:]


class Export:
    """What the handshake learnt about the export."""

    def __init__(self, size: int, flags: int, block_sizes: tuple[int, int, int] | None):
        self.size = size
        self.flags = flags
        self.block_sizes = block_sizes         # (minimum, preferred, maximum) or None
        self.meta_context: int | None = None   # base:allocation's id, when negotiated

    @property
    def read_only(self) -> bool:
        return bool(self.flags & FLAG_READ_ONLY)


def handshake(sock: socket.socket, name: str, block_status: bool = False) -> Export:
    """Fixed-newstyle negotiation ending in NBD_OPT_GO; NbdError on any refusal."""
    magic, opt, server_flags = struct.unpack(">QQH", _recv_exact(sock, 18))
    if magic != NBDMAGIC or opt != IHAVEOPT or not server_flags & FLAG_FIXED_NEWSTYLE:
        raise NbdError(errno.EPROTO, "not a fixed-newstyle NBD server")
    sock.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | (server_flags & FLAG_NO_ZEROES)))
    encoded = name.encode()
    context = None
    if block_status:
        _option(sock, OPT_STRUCTURED_REPLY, b"")
        _expect_ack(sock, OPT_STRUCTURED_REPLY)
        query = b"base:allocation"
        _option(sock, OPT_SET_META_CONTEXT, struct.pack(">I", len(encoded)) + encoded
                + struct.pack(">II", 1, len(query)) + query)
        for kind, data in _replies(sock, OPT_SET_META_CONTEXT):
            if kind == REP_META_CONTEXT:
                context = struct.unpack_from(">I", data)[0]
        if context is None:
            raise NbdError(errno.EOPNOTSUPP, "the server offers no base:allocation")
    _option(sock, OPT_GO, struct.pack(">I", len(encoded)) + encoded
            + struct.pack(">HH", 1, INFO_BLOCK_SIZE))
    size = flags = None
    block_sizes = None
    for kind, data in _replies(sock, OPT_GO):
        if kind == REP_INFO and len(data) >= 2:
            info = struct.unpack_from(">H", data)[0]
            if info == INFO_EXPORT:
                size, flags = struct.unpack_from(">QH", data, 2)
            elif info == INFO_BLOCK_SIZE:
                block_sizes = struct.unpack_from(">III", data, 2)
    if size is None:
        raise NbdError(errno.EPROTO, f"export {name!r}: no size in the server's answer")
    export = Export(size, flags, block_sizes)
    export.meta_context = context
    return export


def _option(sock: socket.socket, option: int, data: bytes) -> None:
    sock.sendall(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)


def _replies(sock: socket.socket, option: int):
    """(type, data) of each reply to `option` up to its ACK; NbdError for an error reply."""
    while True:
        magic, answered, kind, length = struct.unpack(">QIII", _recv_exact(sock, 20))
        if magic != OPTION_REPLY_MAGIC or answered != option or length > 1 << 20:
            raise NbdError(errno.EPROTO, f"bad reply to NBD option {option}")
        data = _recv_exact(sock, length)
        if kind & REP_ERROR_BIT:
            text = data.decode("utf-8", "replace") or f"error {kind & ~REP_ERROR_BIT}"
            raise NbdError(errno.ENOENT, f"NBD option {option} refused: {text}")
        if kind == REP_ACK:
            return
        yield kind, data


def _expect_ack(sock: socket.socket, option: int) -> None:
    for _ in _replies(sock, option):
        pass


def _send_parts(sock: socket.socket, header: bytes, payload) -> None:
    """Header and payload in one sendmsg where the kernel takes it all, without copying."""
    parts = [memoryview(header), memoryview(payload).cast("B")]
    while parts:
        sent = sock.sendmsg(parts)
        while parts and sent >= len(parts[0]):
            sent -= len(parts[0])
            parts.pop(0)
        if parts:
            parts[0] = parts[0][sent:]


class _Pending:
    """One request in flight. `done` is a lock held until the reply arrives: cheaper than an
    Event for the one waiter there is."""
    __slots__ = ("header", "payload", "into", "done", "error")

    def __init__(self, header: bytes, payload, into):
        self.header = header
        self.payload = payload
        self.into = into
        self.done = threading.Lock()
        self.done.acquire()
        self.error = 0

    def finish(self, error: int) -> None:
        self.error = error
        self.done.release()


class NbdClient:
    """One export over one connection, shared by every thread of the LU.

    `reconnect()` is called (from the reader thread) when the connection breaks; it returns
    once the export can be connected to again, or raises to give up."""

    def __init__(self, path: str, name: str, reconnect=None) -> None:
        self.path = path
        self.name = name
        self._reconnect = reconnect
        self._cookies = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._lock = threading.Lock()           # _pending, _sock and sending
        self._closing = False
        self._sock = self._open()
        self._status_lock = threading.Lock()
        self._status_sock: socket.socket | None = None
        self._reader = threading.Thread(target=self._read_replies, name=f"nbd-{name}",
                                        daemon=True)
        self._reader.start()

    @property
    def export(self) -> Export:
        """What the latest handshake said (a reconnect may bring a new size)."""
        return self._export

    def reconnect_now(self, timeout: float = 30.0) -> None:
        """Drop the connection and wait until the reader has a new one (the export was
        re-added, e.g. with a new size); unanswered requests are sent again."""
        old = self._sock
        self._shutdown_socket()
        deadline = time.monotonic() + timeout
        while self._sock is old and not self._closing and time.monotonic() < deadline:
            time.sleep(0.01)
        if self._sock is old:
            raise OSError(errno.ETIMEDOUT, f"NBD export {self.name}: no new connection")

    def _open(self) -> socket.socket:
        sock = connect_unix(self.path, CONNECT_TIMEOUT_S)
        try:
            self._export = handshake(sock, self.name)
        except BaseException:
            sock.close()
            raise
        sock.settimeout(None)
        return sock

    # --- requests ---------------------------------------------------------------------------

    def request(self, command: int, offset: int, length: int, flags: int = 0, payload=None,
                into: memoryview | None = None) -> None:
        """Send one request and wait for its reply; OSError with the server's errno."""
        cookie = next(self._cookies)
        pending = _Pending(_REQUEST.pack(REQUEST_MAGIC, flags, command, cookie, offset, length),
                           payload, into)
        with self._lock:
            if self._closing:
                raise OSError(errno.ESHUTDOWN, f"NBD export {self.name} is closed")
            self._pending[cookie] = pending
            self._send(pending)
        pending.done.acquire()
        if pending.error:
            code = _ERRORS.get(pending.error, errno.EIO)
            raise OSError(code, f"NBD export {self.name}: {os.strerror(code)}")

    def _send(self, pending: _Pending) -> None:
        """Under _lock. A send that fails leaves the request pending: the reader thread
        sees the broken connection and sends it again after reconnecting."""
        try:
            if pending.payload is None:
                self._sock.sendall(pending.header)
            else:
                _send_parts(self._sock, pending.header, pending.payload)
        except OSError:
            self._shutdown_socket()

    def _shutdown_socket(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _read_replies(self) -> None:
        try:
            while True:
                try:
                    self._serve_replies()
                except (OSError, struct.error, ValueError) as exc:
                    if self._closing:
                        break
                    log.warning("NBD export %s: connection lost (%s); reconnecting",
                                self.name, exc)
                    if not self._recover():
                        break
        except Exception:                      # never leave a waiter without an answer
            log.exception("NBD export %s: reply reader failed", self.name)
        finally:
            self._fail_all(errno.ESHUTDOWN)

    def _serve_replies(self) -> None:
        sock = self._sock
        header = bytearray(_SIMPLE_REPLY.size)
        view = memoryview(header)
        while True:
            _recv_into(sock, view)
            magic, error, cookie = _SIMPLE_REPLY.unpack(header)
            if magic != SIMPLE_REPLY_MAGIC:
                raise ValueError(f"bad NBD reply magic {magic:#x}")
            # Only this thread removes entries, and single dict operations are atomic.
            pending = self._pending.get(cookie)
            if pending is None:
                raise ValueError(f"NBD reply for unknown cookie {cookie}")
            if not error and pending.into is not None:
                _recv_into(sock, pending.into)    # a break here sends the READ again
            del self._pending[cookie]
            pending.finish(error)

    def _recover(self) -> bool:
        """Reconnect and send every unanswered request again; False when it cannot."""
        deadline = time.monotonic() + RECONNECT_S
        while not self._closing and time.monotonic() < deadline:
            try:
                if self._reconnect is not None:
                    self._reconnect()
                sock = self._open()
            except (OSError, struct.error, ValueError) as exc:
                log.warning("NBD export %s: reconnect failed: %s", self.name, exc)
                time.sleep(0.5)
                continue
            with self._lock:
                old, self._sock = self._sock, sock
                old.close()
                unanswered = [self._pending[cookie] for cookie in sorted(self._pending)]
            # Sent again by another thread: this one must go back to reading replies at
            # once, or a server that stops reading while its replies wait would block both.
            threading.Thread(target=self._send_again, args=(unanswered,),
                             name=f"nbd-resend-{self.name}", daemon=True).start()
            log.warning("NBD export %s: reconnected, %d requests sent again", self.name,
                        len(unanswered))
            return True
        log.error("NBD export %s: gave up reconnecting", self.name)
        return False

    def _send_again(self, unanswered: list[_Pending]) -> None:
        for pending in unanswered:
            with self._lock:
                if self._closing:
                    return
                self._send(pending)

    def _fail_all(self, error: int) -> None:
        with self._lock:
            pending, self._pending = list(self._pending.values()), {}
            self._closing = True
        for item in pending:
            item.finish(error)

    # --- block status (its own connection, structured replies) ---------------------------

    def block_status(self, offset: int, length: int) -> tuple[bool, int]:
        """(allocated, bytes) from base:allocation for the extent at `offset`."""
        with self._status_lock:
            for attempt in range(2):
                try:
                    if self._status_sock is None:
                        self._status_sock, context = self._open_status()
                        self._status_context = context
                    return self._query_status(offset, length)
                except (OSError, struct.error, ValueError):
                    if self._status_sock is not None:
                        self._status_sock.close()
                        self._status_sock = None
                    if attempt:
                        raise
        raise AssertionError("unreachable")

    def _open_status(self):
        sock = connect_unix(self.path, CONNECT_TIMEOUT_S)
        try:
            export = handshake(sock, self.name, block_status=True)
        except BaseException:
            sock.close()
            raise
        return sock, export.meta_context

    def _query_status(self, offset: int, length: int) -> tuple[bool, int]:
        sock = self._status_sock
        sock.sendall(_REQUEST.pack(REQUEST_MAGIC, CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 1,
                                   offset, min(length, 0xFFFFFFFF)))
        answer = None
        while True:
            magic, flags, kind, _, size = _STRUCTURED_REPLY.unpack(
                _recv_exact(sock, _STRUCTURED_REPLY.size))
            if magic != STRUCTURED_REPLY_MAGIC:
                raise ValueError(f"bad NBD structured reply magic {magic:#x}")
            data = _recv_exact(sock, size)
            if kind & REPLY_TYPE_ERROR_BIT:
                code = struct.unpack_from(">I", data)[0] if len(data) >= 4 else 5
                raise OSError(_ERRORS.get(code, errno.EIO), "NBD block status failed")
            if kind == REPLY_TYPE_BLOCK_STATUS and len(data) >= 12:
                context, extent, state = struct.unpack_from(">III", data)
                if context == self._status_context and answer is None:
                    answer = (not state & STATE_HOLE, min(extent, length))
            if flags & REPLY_FLAG_DONE:
                break
        if answer is None or answer[1] == 0:
            return True, length           # no answer: count it as mapped
        return answer

    # --- end ---------------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._closing = True
            try:
                self._sock.sendall(_REQUEST.pack(REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
            except OSError:
                pass
            self._shutdown_socket()
        self._reader.join(5)
        self._sock.close()
        with self._status_lock:
            if self._status_sock is not None:
                self._status_sock.close()
                self._status_sock = None
