"""The receiver polls the socket briefly before sleeping, only after a short wait, and only
while a polling slot is free (istgt/iscsi/reader.py)."""

import socket
import threading
import time

import pytest

from istgt.iscsi import reader as reader_module
from istgt.iscsi.reader import ConnectionClosed, PduReader

BHS = bytes([0x01]) + bytes(47)


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def make_reader(sock):
    return PduReader(sock, lambda: None, None)


def send_later(sock, data, delay):
    threading.Timer(delay, sock.sendall, args=(data,)).start()


def test_a_quick_peer_turns_polling_on_and_a_slow_one_turns_it_off(pair, monkeypatch):
    monkeypatch.setattr(reader_module, "SPIN_NS", 30_000_000)     # 30 ms, for a slow test box
    ours, peer = pair
    r = make_reader(ours)
    peer.sendall(BHS)
    r.read_header()
    assert r._spin                              # the data was there at once
    send_later(peer, BHS, 0.2)                  # longer than twice the polling time
    r.read_header()
    assert not r._spin


def test_polling_receives_what_arrives_meanwhile_without_sleeping(pair, monkeypatch):
    monkeypatch.setattr(reader_module, "SPIN_NS", 500_000_000)
    ours, peer = pair
    r = make_reader(ours)
    r._spin = True
    calls = []
    real_poll = r._poll
    monkeypatch.setattr(r, "_poll", lambda view: calls.append(real_poll(view)) or calls[-1])
    send_later(peer, BHS, 0.05)
    bhs, _ = r.read_header()
    assert bhs == BHS and calls == [48]         # got by the poll, not by a sleeping recv


def test_no_polling_without_a_free_slot(pair, monkeypatch):
    monkeypatch.setattr(reader_module, "SPIN_NS", 500_000_000)
    ours, _peer = pair
    r = make_reader(ours)
    slots = reader_module.SPIN_SLOTS
    for slot in slots:
        slot.acquire()
    try:
        started = time.monotonic()
        assert r._poll(memoryview(bytearray(64))) is None
        assert time.monotonic() - started < 0.1     # gave up at once, did not spin 500 ms
    finally:
        for slot in slots:
            slot.release()


def test_end_of_stream_while_polling_closes(pair, monkeypatch):
    monkeypatch.setattr(reader_module, "SPIN_NS", 500_000_000)
    ours, peer = pair
    r = make_reader(ours)
    r._spin = True
    threading.Timer(0.05, peer.shutdown, args=(socket.SHUT_WR,)).start()
    with pytest.raises(ConnectionClosed):
        r.read_header()


def test_polling_off(pair, monkeypatch):
    monkeypatch.setattr(reader_module, "SPIN_NS", 0)
    ours, peer = pair
    r = make_reader(ours)
    peer.sendall(BHS)
    r.read_header()
    assert not r._spin


def test_no_polling_while_another_receiver_is_awake(pair, monkeypatch):
    monkeypatch.setattr(reader_module, "SPIN_NS", 500_000_000)
    census = reader_module.ReceiverCensus()
    monkeypatch.setattr(reader_module, "CENSUS", census)
    ours, peer = pair
    r = make_reader(ours)
    r._spin = True
    polls = []
    monkeypatch.setattr(r, "_poll", lambda view: polls.append(view) and None)
    census.joined()
    census.joined()                      # another receiver, busy
    send_later(peer, BHS, 0.05)
    r.read_header()
    assert polls == []                   # slept in recv instead
    assert census.sleeping == 0          # and is counted awake again
    census.asleep()                      # the other one sleeps now
    send_later(peer, BHS, 0.05)
    r.read_header()
    assert len(polls) == 1


def test_the_census_counts_sleepers_through_errors():
    census = reader_module.ReceiverCensus()
    a, b = socket.socketpair()
    try:
        census.joined()
        r = make_reader(a)
        b.close()
        original = reader_module.CENSUS
        reader_module.CENSUS = census
        try:
            with pytest.raises(ConnectionClosed):
                r.read_header()
        finally:
            reader_module.CENSUS = original
        assert census.sleeping == 0 and census.receivers == 1
    finally:
        a.close()
