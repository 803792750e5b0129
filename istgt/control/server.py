"""The UnitControl listeners: a Unix socket (mode 0600: its file permissions are the access
check) and, when `[UnitControl]` names a `Portal`, istgt's TCP control portal with its
Netmask ACL and CHAP from its AuthGroup. One thread per control connection, bounded.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import threading
import time
from typing import Any

from istgt.config import load_auth
from istgt.control.auth import ServerChap
from istgt.control.commands import ControlSession, banner
from istgt.control.protocol import LineBuffer
from istgt.listen import listen_tcp

log = logging.getLogger("istgt.ctl")

IO_TIMEOUT_S = 60          # as istgt: a silent control connection is dropped after a minute
AUTH_DEADLINE_S = 10       # a TCP peer that must authenticate has this long to do it
MAX_CONTROL_CONNECTIONS = 16   # each, on the Unix socket and on the TCP portals
LISTEN_BACKLOG = 8


class ControlServer:
    def __init__(self, server: Any, config: Any, auth_file: str) -> None:
        self.server = server
        self.config = config          # UnitControlConfig
        self.auth_file = auth_file
        self._listeners: list[tuple[socket.socket, bool]] = []    # (socket, is TCP)
        self._socket_path: str | None = None
        self._lock = threading.Lock()
        # guarded by _lock: open connections, TCP and Unix socket apart, so peers on the
        # network can never crowd out root on the socket
        self._active: dict[bool, set[socket.socket]] = {False: set(), True: set()}
        self._stopping = threading.Event()
        self.tcp_addresses: list[tuple[str, int]] = []

    # --- listeners ------------------------------------------------------------------------

    def open(self) -> None:
        """Bind the Unix socket and the TCP portals; OSError names what failed."""
        try:
            if self.config.socket_path:
                self._open_default_or_configured_unix()
            for portal in self.config.portals:
                self._open_tcp(portal)
        except OSError:
            self.close()
            raise

    def _open_default_or_configured_unix(self) -> None:
        # absolute now: relative paths keep their meaning whatever the directory later
        path = os.path.abspath(self.config.socket_path)
        try:
            self._open_unix(path)
        except OSError as e:
            if self.config.socket_configured or e.errno != errno.EADDRINUSE:
                raise
            # A config written for the C istgt names no socket: a second daemon on the
            # machine must still start (without one; its TCP portals still serve).
            log.warning("%s; no control socket for this daemon (set [UnitControl] "
                        "ControlSocket)", e.strerror)

    def _open_unix(self, path: str) -> None:
        directory = os.path.dirname(path) or "."
        try:
            os.makedirs(directory, mode=0o755, exist_ok=True)
            _remove_stale_socket(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as e:
            raise OSError(e.errno, f"ControlSocket {path}: {e.strerror}") from None
        try:
            old_mask = os.umask(0o177)      # created 0600: no window with a wider mode
            try:
                sock.bind(path)
            finally:
                os.umask(old_mask)
            os.chmod(path, 0o600)
            sock.listen(LISTEN_BACKLOG)
        except OSError as e:
            sock.close()
            raise OSError(e.errno, f"ControlSocket {path}: {e.strerror}") from None
        self._socket_path = path
        self._listeners.append((sock, False))
        log.info("control socket %s", path)

    def _open_tcp(self, portal: Any) -> None:
        sock = listen_tcp(portal, "UnitControl portal", LISTEN_BACKLOG)
        self.tcp_addresses.append(sock.getsockname()[:2])
        self._listeners.append((sock, True))
        log.info("control portal %s", portal.display)

    def reconfigure(self, config: Any, auth_file: str) -> None:
        """A reloaded [UnitControl]: auth and Netmask apply to new connections; a changed
        ControlSocket or Portal list is re-opened (on failure the old one is kept)."""
        old = self.config
        self.auth_file = auth_file
        if (old.socket_path, old.portals) == (config.socket_path, config.portals):
            self.config = config
            return
        self.close()
        self._stopping = threading.Event()
        self.tcp_addresses = []
        self.config = config
        try:
            self.open()
        except OSError as e:
            log.error("control channel: %s; keeping the previous ControlSocket and Portals", e)
            self.config = old
            self.open()
        self.start()

    def start(self) -> None:
        for sock, tcp in self._listeners:
            threading.Thread(target=self._accept_loop, args=(sock, tcp), daemon=True,
                             name="uctl-acceptor").start()

    def close(self) -> None:
        self._stopping.set()
        for sock, _ in self._listeners:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        self._listeners = []
        if self._socket_path is not None:
            try:
                os.unlink(self._socket_path)
            except OSError:
                pass
            self._socket_path = None
        with self._lock:
            active = [*self._active[False], *self._active[True]]
        for sock in active:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # --- connections ----------------------------------------------------------------------

    def _accept_loop(self, listener: socket.socket, tcp: bool) -> None:
        while not self._stopping.is_set():
            try:
                sock, peer = listener.accept()
            except OSError:
                if self._stopping.is_set() or listener.fileno() < 0:
                    return            # closed by shutdown or by a reconfigure
                self._stopping.wait(0.05)
                continue
            peer_ip = peer[0] if tcp else "local"
            if tcp and self.config.netmasks and \
                    not any(mask.matches(peer_ip) for mask in self.config.netmasks):
                log.warning("UCTL access denied from %s", peer_ip)
                sock.close()
                continue
            with self._lock:
                full = len(self._active[tcp]) >= MAX_CONTROL_CONNECTIONS
                if not full:
                    self._active[tcp].add(sock)
            if full:
                log.warning("UCTL connection from %s refused: %d already open", peer_ip,
                            MAX_CONTROL_CONNECTIONS)
                sock.close()
                continue
            threading.Thread(target=self._serve, args=(sock, peer_ip, tcp), daemon=True,
                             name="uctl").start()

    def _session_for(self, peer_ip: str, tcp: bool) -> ControlSession:
        auth = self.config.auth
        if not tcp or auth.method == "none":
            return ControlSession(self.server, peer_ip, None)
        group = auth.group

        def lookup(user: str) -> Any:
            if group is None:
                return None
            return load_auth(self.auth_file).lookup(group, user)  # re-read, as istgt does

        chap = ServerChap(lookup, mutual_required=auth.mutual)
        return ControlSession(self.server, peer_ip, chap, auth_optional=auth.method == "auto")

    def _serve(self, sock: socket.socket, peer_ip: str, tcp: bool) -> None:
        try:
            sock.settimeout(IO_TIMEOUT_S)
            local = sock.getsockname()[0] if tcp else (self._socket_path or "")
            session = self._session_for(peer_ip, tcp)
            must_authenticate = session.auth is not None and not session.auth_optional
            deadline = time.monotonic() + AUTH_DEADLINE_S
            _send(sock, [banner(local, peer_ip)])
            lines = LineBuffer()
            while not self._stopping.is_set():
                if must_authenticate and not session.auth.authenticated:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        log.warning("UCTL connection from %s closed: no AUTH within %d s",
                                    peer_ip, AUTH_DEADLINE_S)
                        return
                    sock.settimeout(min(left, IO_TIMEOUT_S))
                else:
                    sock.settimeout(IO_TIMEOUT_S)
                try:
                    data = sock.recv(4096)
                except socket.timeout:
                    if must_authenticate and not session.auth.authenticated:
                        continue         # the deadline check above closes it
                    raise
                if not data:
                    break
                for line in lines.feed(data):
                    reply, close = session.handle(line)
                    _send(sock, reply)
                    if close:
                        return
        except (OSError, UnicodeError) as e:
            log.debug("UCTL connection from %s ended: %s", peer_ip, e)
        except Exception:        # a control command must never take the daemon down
            log.exception("UCTL connection from %s failed", peer_ip)
        finally:
            with self._lock:
                self._active[tcp].discard(sock)
            sock.close()


def _send(sock: socket.socket, lines: list[str]) -> None:
    if lines:
        sock.sendall("".join(f"{line}\r\n" for line in lines).encode("utf-8"))


def _remove_stale_socket(path: str) -> None:
    """A socket file left by a daemon that died: remove it, unless a live daemon answers
    there (then binding fails with a clear error instead of stealing its socket)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.EEXIST, "exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1)
        probe.connect(path)
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "another istgt is listening there")
