"""iSCSI sessions: the CmdSN window, TSIH and member connections, and the registry of them."""

from __future__ import annotations

import itertools
import logging
import threading

from istgt.iscsi.pdu import sn_le, sn_lt

log = logging.getLogger("istgt.iscsi")

DISCOVERY_WINDOW = 8
EXCLUSIVE_WINDOW = 8     # QueueDepth 0 still lets the initiator pipeline (istgt's ISCMDQ)


class LoginRefused(Exception):
    """A login that cannot go on: carries the Login Response status class and detail."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Session:
    def __init__(self, *, isid: bytes, initiator_name: str, initiator_alias: str,
                 target, target_name: str, portal_group_tag: int, discovery: bool,
                 values, window: int, first_cmdsn: int, nexus):
        self.isid = isid
        self.initiator_name = initiator_name
        self.initiator_alias = initiator_alias
        self.target = target                  # LogicalUnit, None for discovery
        self.target_name = target_name
        self.portal_group_tag = portal_group_tag
        self.discovery = discovery
        self.values = values                  # negotiated OperationalValues (session-wide)
        self.nexus = nexus
        self.tsih = 0
        self.lock = threading.Lock()
        self.connections: dict[int, object] = {}   # CID -> Connection; guarded by lock
        self.exp_cmdsn = first_cmdsn               # guarded by lock
        self.max_cmdsn = (first_cmdsn + window - 1) & 0xFFFFFFFF   # guarded by lock
        self._ahead: set[int] = set()              # CmdSNs received past a gap; lock
        self.closed = False
        self._nexus_ended = False                  # guarded by lock

    @property
    def initiator_port(self) -> str:
        return self.nexus.initiator_port

    # ---- CmdSN window (RFC 7143 4.2.2.1)
    def accept_cmdsn(self, cmdsn: int, immediate: bool) -> bool:
        """True if a command with this CmdSN is to be executed; False: ignore it silently."""
        with self.lock:
            if immediate:
                return True
            if not (sn_le(self.exp_cmdsn, cmdsn) and sn_le(cmdsn, self.max_cmdsn)):
                return False
            if cmdsn in self._ahead:
                return False
            if cmdsn != self.exp_cmdsn:
                self._ahead.add(cmdsn)   # MCS: an earlier command is still on another connection
                return True
            sn = (cmdsn + 1) & 0xFFFFFFFF
            while sn in self._ahead:
                self._ahead.discard(sn)
                sn = (sn + 1) & 0xFFFFFFFF
            self.exp_cmdsn = sn
            return True

    def release_slot(self) -> None:
        """A non-immediate command has ended (answered or aborted): widen the window."""
        with self.lock:
            self.max_cmdsn = (self.max_cmdsn + 1) & 0xFFFFFFFF

    def window(self) -> tuple[int, int]:
        with self.lock:
            return self.exp_cmdsn, self.max_cmdsn

    def consume_unseen(self, ref_cmdsn: int, tmf_cmdsn: int) -> bool:
        """ABORT TASK of a command never received (RFC 7143 11.5.1): if its CmdSN is in the
        window and before the TMF's, count it as received so a late copy is ignored."""
        with self.lock:
            if not (sn_le(self.exp_cmdsn, ref_cmdsn) and sn_le(ref_cmdsn, self.max_cmdsn)
                    and sn_lt(ref_cmdsn, tmf_cmdsn)) or ref_cmdsn in self._ahead:
                return False
        self.accept_cmdsn(ref_cmdsn, False)
        self.release_slot()
        return True

    # ---- connections
    def add_connection(self, conn, max_connections: int) -> None:
        with self.lock:
            if self.closed:
                raise LoginRefused(0x020A, "session is closing")
            old = self.connections.get(conn.cid)     # connection reinstatement (same CID)
            if old is None and len(self.connections) >= max_connections:
                raise LoginRefused(0x0206, f"session already has {max_connections} connections")
            self.connections[conn.cid] = conn
        if old is not None:
            # outside the lock: closing aborts the old connection's tasks, whose ends give
            # their CmdSN slots back under this lock
            old.close_async("connection reinstated")

    def remove_connection(self, conn) -> bool:
        """Detach `conn`; True when it was the last one (the session is over)."""
        with self.lock:
            if self.connections.get(conn.cid) is conn:
                del self.connections[conn.cid]
            if not self.connections and not self.closed:
                self.closed = True
                return True
            return False

    def end_nexus(self) -> None:
        """The session's I_T nexus is lost (SAM-5): reservations, prevention and pending
        unit attentions go. Once per session, at whichever comes first: the Logout that
        ends it (before its response, so the initiator can rely on it) or the teardown of
        its last connection."""
        with self.lock:
            if self._nexus_ended or self.target is None:
                return
            self._nexus_ended = True
        self.target.nexus_lost(self.nexus)

    def members(self) -> list:
        with self.lock:
            return list(self.connections.values())

    def close_all(self, reason: str, force: bool = False) -> None:
        for conn in self.members():
            conn.close_async(reason, force)


class SessionRegistry:
    """Every session of the target, by TSIH (target-wide: unlike istgt, never reused at once)."""

    def __init__(self, max_sessions: int):
        self.max_sessions = max_sessions
        self._lock = threading.Lock()
        self._sessions: dict[int, Session] = {}    # guarded by _lock
        self._tsih = itertools.count(1)

    def find(self, tsih: int, isid: bytes, initiator_name: str, target_name: str,
             portal_group_tag: int) -> Session | None:
        """The session a connection may join: every connection of a session goes through
        one target portal group (RFC 7143 4.4.1), i.e. one target port."""
        with self._lock:
            s = self._sessions.get(tsih)
        if s is None or s.closed or s.isid != isid or s.initiator_name != initiator_name:
            return None
        if s.portal_group_tag != portal_group_tag:
            return None
        if s.target_name.lower() != target_name.lower():
            return None
        return s

    def register(self, session: Session) -> list[Session]:
        """Give `session` a TSIH; returns the sessions it reinstates (same I_T nexus)."""
        with self._lock:
            replaced = [s for s in self._sessions.values()
                        if not s.discovery and not session.discovery
                        and s.nexus == session.nexus]
            live = sum(1 for s in self._sessions.values() if not s.closed) - len(replaced)
            if live >= self.max_sessions:
                raise LoginRefused(0x0302, f"MaxSessions ({self.max_sessions}) reached")
            for _ in range(0x10000):
                tsih = next(self._tsih) & 0xFFFF
                if tsih == 0:
                    continue
                if tsih not in self._sessions:
                    break
            else:
                raise LoginRefused(0x0302, "no free TSIH")
            session.tsih = tsih
            self._sessions[tsih] = session
            for s in replaced:
                self._sessions.pop(s.tsih, None)
        return replaced

    def unregister(self, session: Session) -> None:
        with self._lock:
            if self._sessions.get(session.tsih) is session:
                del self._sessions[session.tsih]

    def all(self) -> list[Session]:
        with self._lock:
            return list(self._sessions.values())

    def count_for(self, target) -> int:
        with self._lock:
            return sum(1 for s in self._sessions.values() if s.target is target)
