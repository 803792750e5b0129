"""Stream sockets: listening TCP portals (iSCSI and UnitControl alike), and connections to
local Unix sockets (the control socket, qemu-storage-daemon's NBD and QMP sockets)."""

from __future__ import annotations

import socket
from typing import Any


def listen_tcp(portal: Any, what: str, backlog: int) -> socket.socket:
    """A socket bound and listening on `portal` (host, port, family, display); OSError
    names `what` and the portal when that fails. IPv6 sockets take IPv6 only, so the
    same port may also be an IPv4 portal."""
    try:
        info = socket.getaddrinfo(portal.host, portal.port, portal.family, socket.SOCK_STREAM,
                                  0, socket.AI_NUMERICHOST | socket.AI_PASSIVE)
        sock = socket.socket(portal.family, socket.SOCK_STREAM)
    except OSError as e:
        raise OSError(e.errno, f"{what} {portal.display}: {e.strerror or e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if portal.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(info[0][4])
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"{what} {portal.display}: {e.strerror}") from None
    return sock


def connect_unix(path: str, timeout: float | None) -> socket.socket:
    """A stream connection to the Unix socket at `path` (closed again if it fails)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    return sock
