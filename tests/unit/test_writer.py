"""PduWriter.send_and_wait (login answers) when the peer is gone."""

import logging
import socket
import time

from istgt.iscsi import pdu as wire
from istgt.iscsi.writer import PduWriter


def test_send_and_wait_returns_at_once_when_the_writer_has_failed():
    """A login answer for a peer that already closed: the first send fails and stops the
    writer; a later answer must not wait 30 s for a write that will never happen (that held
    dead connections, their threads and login slots on a loaded machine)."""
    ours, theirs = socket.socketpair()
    theirs.close()
    failures = []
    writer = PduWriter(ours, logging.getLogger("test"), lambda: failures.append(1), "tx-test")
    writer.start()
    try:
        bhs = bytes(48)
        writer.send_and_wait(wire.reject(0x04, bhs))      # fails: the peer is gone
        started = time.monotonic()
        writer.send_and_wait(wire.reject(0x04, bhs))
        assert time.monotonic() - started < 2
        assert failures
    finally:
        writer.stop(1)
        ours.close()
