"""Connections still logging in are bounded per peer address and per portal: idle half-open
connections cannot use up the target (issue 7)."""

import socket
import time

import istgt.server
from tests.functional.conftest import DISK


def closed_at_once(sock: socket.socket) -> bool:
    sock.settimeout(2)
    try:
        return sock.recv(1) == b""
    except socket.timeout:
        return False
    except ConnectionResetError:
        return True


def test_idle_connections_from_one_address_are_bounded(target, monkeypatch):
    monkeypatch.setattr(istgt.server, "MAX_LOGINS_PER_ADDRESS", 3)
    idle = [socket.create_connection((target.host, target.port)) for _ in range(3)]
    try:
        time.sleep(0.2)
        extra = socket.create_connection((target.host, target.port))
        assert closed_at_once(extra)                 # a fourth one is refused at accept
        extra.close()
        idle.pop().close()                           # one leaves: a login fits again
        time.sleep(0.2)
        session = target.session()                   # logged in: no longer counted
        assert session.tsih != 0
        late = socket.create_connection((target.host, target.port))
        late.settimeout(0.5)
        assert not closed_at_once(late)              # 2 idle + this one: within the bound
        late.close()
    finally:
        for sock in idle:
            sock.close()


def test_the_portal_bound_counts_every_address(target, monkeypatch):
    monkeypatch.setattr(istgt.server, "MAX_LOGINS_PER_PORTAL", 2)
    idle = [socket.create_connection((target.host, target.port)) for _ in range(2)]
    try:
        time.sleep(0.2)
        extra = socket.create_connection((target.host, target.port))
        assert closed_at_once(extra)
        extra.close()
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.2)
    assert target.session(DISK).tsih != 0            # freed when they closed
