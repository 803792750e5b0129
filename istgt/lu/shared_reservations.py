"""What the gateways of one RBD image (target processes exporting it as one LU) share
through the Ceph cluster: the persistent reservations, LOGICAL UNIT RESETs, and which
gateways are alive (a roll call answered with their target port groups, for ALUA).

The state is a JSON object `istgt.pr.<image>` next to the image (same pool and namespace).
A PERSISTENT RESERVE OUT runs under a cluster lock on that object, on the state read from
it, and its result is written back and announced with a RADOS notify that waits for every
other gateway to acknowledge: each reloads the state (and takes the unit attentions and
aborts meant for its own nexuses) before acknowledging, so when GOOD goes out the change is
in force everywhere.

A gateway that opens the LU while no other one is serving it is a power-on: the state is
kept when APTPL is set and cleared otherwise (SPC-4 5.14.5). With another gateway alive
(it answers the opening notify) the state is in use and is taken as it is.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import queue
import secrets
import struct
import threading
import time

from istgt.lu.rbd import RbdBackend, libraries
from istgt.scsi import pr

log = logging.getLogger("istgt.pr")

LOCK_NAME = b"istgt.pr"
LOCK_DURATION_S = 30            # a gateway that dies holding it frees it after this
LOCK_WAIT_S = 10.0
NOTIFY_TIMEOUT_MS = 5000
MAX_STATE_BYTES = 4 << 20


ROLL_CALL_TIMEOUT_MS = 1000
ROLL_CALL_CACHE_S = 2.0


def _ack_payloads(reply: bytes) -> list[bytes]:
    """The acknowledgers' payloads in a notify reply: le32 count, then per ack le64 gid,
    le64 cookie, le32 length and the payload (then the timed-out watchers, unused here)."""
    if len(reply) < 4:
        return []
    count, = struct.unpack_from("<I", reply)
    position, payloads = 4, []
    for _ in range(count):
        if position + 20 > len(reply):
            break
        size, = struct.unpack_from("<I", reply, position + 16)
        payloads.append(reply[position + 20:position + 20 + size])
        position += 20 + size
    return payloads


class _Timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


class SharedReservations:
    """The StateFile of a DiskDevice whose reservations live in the cluster."""

    shared = True

    def __init__(self, backend: RbdBackend) -> None:
        location = backend.location
        self._ioctx = backend.ioctx
        self._oid = f"istgt.pr.{location.image}".encode()
        self._token = secrets.token_hex(8)      # tells our own notifications from others'
        self._cluster_handle = backend.cluster_handle
        self._device = None
        # Reload before the next command: a change could not be taken when it came (no
        # device yet, or an error), or the watch broke (then watch again too).
        self._reload = threading.Event()
        self._watch_broken = threading.Event()
        # Notifications are handled here, not on librados's callback thread (which librbd
        # also needs): reading the state and resetting the LU block.
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._handle_notifications, name="pr-notify",
                         daemon=True).start()
        lib = libraries()
        self._rados = lib.rados
        # kept referenced: librados calls them from its own threads
        self._on_notify = lib.watch_callback(self._notified)
        self._on_error = lib.watch_error_callback(self._watch_failed)
        self._rewatch_lock = threading.Lock()
        self._own_groups: list[int] = []
        self._roll_call: list[int] = []
        self._roll_call_at = -ROLL_CALL_CACHE_S
        self._watch = ctypes.c_uint64()
        self._start_watch()

    def _start_watch(self) -> None:
        # only an existing object can be watched: appending nothing creates it, if missing
        self._check(self._rados.rados_append(self._ioctx, self._oid, b"", 0), "create")
        watch = ctypes.c_uint64()
        self._check(self._rados.rados_watch2(self._ioctx, self._oid, ctypes.byref(watch),
                                             self._on_notify, self._on_error, None), "watch")
        self._watch = watch

    def attach(self, device) -> None:
        """The DiskDevice that takes other gateways' changes (apply_remote_reservations);
        its target port groups are what this gateway answers to a roll call."""
        self._device = device
        self._own_groups = list(device.port_groups.tags)

    def live_groups(self) -> list[int]:
        """The target port groups of every gateway that answers a roll call now (kept for
        ROLL_CALL_CACHE_S: path checkers ask often, a dead gateway delays the answer)."""
        now = time.monotonic()
        if now - self._roll_call_at > ROLL_CALL_CACHE_S:
            payload = json.dumps({"from": self._token, "rollcall": True}).encode()
            groups = set(self._own_groups)
            try:
                for answer in _ack_payloads(self._notify(payload, ROLL_CALL_TIMEOUT_MS)):
                    groups.update(int(g) for g in json.loads(answer).get("groups", []))
            except (OSError, ValueError) as exc:
                log.warning("%s: roll call of the gateways failed: %s", self._oid.decode(), exc)
            self._roll_call, self._roll_call_at = sorted(groups), now
        return self._roll_call

    # --- the StateFile interface ---------------------------------------------------------------

    def load(self) -> dict | None:
        snapshot = self._read()
        if snapshot is not None and not snapshot.get("aptpl") and not self._others_alive():
            log.info("%s: reservations without APTPL cleared (no other gateway serves it)",
                     self._oid.decode())
            self._write(pr.EMPTY_SNAPSHOT)
            return None
        return snapshot

    def save(self, produce, effects: dict | None = None) -> None:
        """Write the state (inside a transaction) and wait for the other gateways to take
        it; OSError if it cannot be written (the PR OUT then fails)."""
        self._write(produce())
        payload = json.dumps({"from": self._token, "effects": effects or {}}).encode()
        self._notify(payload)

    def announce_reset(self) -> None:
        """A LOGICAL UNIT RESET here: the other gateways reset the LU for their nexuses
        before this returns (a gateway that cannot be told is only logged)."""
        try:
            self._notify(json.dumps({"from": self._token, "reset": "lun"}).encode())
        except OSError as exc:
            log.error("%s: LU reset not passed to the other gateways: %s",
                      self._oid.decode(), exc)

    @contextlib.contextmanager
    def transaction(self, reservations):
        """One PR OUT at a time across the gateways, starting from the state in the
        cluster. A lock that cannot be had in LOCK_WAIT_S ends the command BUSY."""
        cookie = secrets.token_hex(8).encode()
        self._lock(cookie)
        try:
            snapshot = self._read()
            reservations.restore(snapshot if snapshot is not None else pr.EMPTY_SNAPSHOT)
            try:
                yield
            except BaseException:
                # the local state may have changed without reaching the cluster
                self._reload.set()
                raise
        finally:
            self._rados.rados_unlock(self._ioctx, self._oid, LOCK_NAME, cookie)

    def refresh_if_stale(self) -> None:
        """Before a command: take the cluster's state if a change was missed, and watch
        again if the watch broke (OSError: the command fails rather than run on a state
        that may be old)."""
        if not self._reload.is_set() or self._device is None:
            return
        with self._rewatch_lock:
            if not self._reload.is_set():
                return
            if self._watch_broken.is_set():
                self.close()
                self._start_watch()
                self._watch_broken.clear()
            self._reload.clear()
            snapshot = self._read()
            self._device.apply_remote_reservations(snapshot or pr.EMPTY_SNAPSHOT, {})
            log.info("%s: reservations reloaded from the cluster", self._oid.decode())

    def close(self) -> None:
        if self._watch.value:
            self._rados.rados_unwatch2(self._ioctx, self._watch.value)
            self._watch = ctypes.c_uint64()
            # callbacks may still run after unwatch: wait for them before the ioctx goes
            self._rados.rados_watch_flush(self._cluster_handle)

    def stop(self) -> None:
        """The LU closes: no more watch, and the notification thread ends."""
        self.close()
        self._inbox.put(None)

    # --- RADOS -----------------------------------------------------------------------------

    def _lock(self, cookie: bytes) -> None:
        duration = _Timeval(LOCK_DURATION_S, 0)
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            result = self._rados.rados_lock_exclusive(self._ioctx, self._oid, LOCK_NAME, cookie,
                                                      b"istgt PERSISTENT RESERVE OUT",
                                                      ctypes.byref(duration), 0)
            if result == 0:
                return
            if result != -errno.EBUSY:
                self._check(result, "lock")
            if time.monotonic() > deadline:
                raise TimeoutError(errno.EBUSY, f"{self._oid.decode()}: another gateway holds "
                                                f"the reservation lock")
            time.sleep(0.005)

    def _read(self) -> dict | None:
        buffer = ctypes.create_string_buffer(MAX_STATE_BYTES)
        count = self._rados.rados_read(self._ioctx, self._oid, buffer, MAX_STATE_BYTES, 0)
        if count == -errno.ENOENT or count == 0:
            return None
        self._check(count, "read")
        try:
            return json.loads(buffer.raw[:count])
        except ValueError as exc:
            raise OSError(errno.EIO, f"{self._oid.decode()}: unreadable state: {exc}") from None

    def _write(self, snapshot: dict) -> None:
        data = json.dumps(snapshot, sort_keys=True).encode()
        self._check(self._rados.rados_write_full(self._ioctx, self._oid, data, len(data)),
                    "write")

    def _notify(self, payload: bytes, timeout_ms: int = NOTIFY_TIMEOUT_MS) -> bytes:
        reply, length = ctypes.c_void_p(), ctypes.c_size_t()
        result = self._rados.rados_notify2(self._ioctx, self._oid, payload, len(payload),
                                           timeout_ms, ctypes.byref(reply),
                                           ctypes.byref(length))
        try:
            data = ctypes.string_at(reply, length.value) if reply.value else b""
        finally:
            if reply.value:
                self._rados.rados_buffer_free(reply)
        if result == -errno.ETIMEDOUT:
            # a gateway that does not answer has a broken watch: it reloads before it
            # serves again (_watch_failed), so the change stands
            log.warning("%s: a gateway did not acknowledge a reservation change",
                        self._oid.decode())
            return data
        self._check(result, "notify")
        return data

    def _others_alive(self) -> bool:
        """Whether another gateway acknowledges a notify on the state object."""
        payload = json.dumps({"from": self._token, "hello": True}).encode()
        reply = self._notify(payload)
        if len(reply) < 4:
            return False
        acks = struct.unpack_from("<I", reply)[0]
        return acks > 1                   # our own watch acknowledges too

    def _notified(self, _arg, notify_id, handle, _notifier, data, length) -> None:
        """From a librados thread: queue it; the acknowledgement follows the handling."""
        self._inbox.put((notify_id, handle, ctypes.string_at(data, length) if length else b""))

    def _handle_notifications(self) -> None:
        while True:
            item = self._inbox.get()
            if item is None:
                return
            notify_id, handle, data = item
            answer = b""
            try:
                message = json.loads(data) if data else {}
                foreign = message.get("from") != self._token
                if message.get("rollcall"):
                    answer = json.dumps({"groups": self._own_groups}).encode()
                elif message.get("hello") or not foreign:
                    pass
                elif self._device is None:
                    self._reload.set()           # still starting: load before serving
                elif message.get("reset"):
                    self._device.reset_by_peer()
                else:
                    snapshot = self._read()
                    self._device.apply_remote_reservations(snapshot or pr.EMPTY_SNAPSHOT,
                                                           message.get("effects", {}))
            except (OSError, ValueError) as exc:
                log.error("%s: change from another gateway not taken: %s",
                          self._oid.decode(), exc)
                self._reload.set()
            except Exception:                    # the acknowledgement must still go out
                log.exception("%s: handling a notification failed", self._oid.decode())
                self._reload.set()
            finally:
                self._rados.rados_notify_ack(self._ioctx, self._oid, notify_id, handle,
                                             answer, len(answer))

    def _watch_failed(self, _arg, _cookie, error) -> None:
        log.error("%s: watch failed (%s); the state is reloaded before the next command",
                  self._oid.decode(), -error)
        self._watch_broken.set()
        self._reload.set()

    def _check(self, result: int, what: str) -> int:
        if result < 0:
            raise OSError(-result, f"{self._oid.decode()}: {what}: "
                                   f"{errno.errorcode.get(-result, -result)}")
        return result
