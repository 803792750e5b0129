"""Graceful shutdown: commands in flight finish and are answered, what was acknowledged is on
the disk, and the connection closes only after its answers went out."""

import os
import struct
import threading
import time

import pytest

from tests.functional.conftest import C_TARGET

GOOD = 0x00
CHUNK = 4096                   # fits in immediate data: no R2T round trip needed


def write10_cdb(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0)


@pytest.mark.skipif(C_TARGET, reason="drives the in-process Python server")
def test_shutdown_finishes_and_answers_commands_in_flight(target):
    initiator = target.session()
    device = target.server.units[1].devices[0]
    started = threading.Event()
    execute = device.execute

    def slow_execute(task):        # keep the writes in flight while the shutdown begins
        started.set()
        time.sleep(0.3)
        execute(task)
    device.execute = slow_execute
    payloads = [os.urandom(CHUNK) for _ in range(4)]
    blocks = CHUNK // 512
    itts = [initiator.submit(write10_cdb(i * blocks, blocks), data_out=data)
            for i, data in enumerate(payloads)]
    assert started.wait(5)
    time.sleep(0.1)                # every command has reached the target by now
    stopper = threading.Thread(target=target.server.shutdown)
    stopper.start()
    statuses = [initiator.collect(itt, timeout=10).status for itt in itts]
    stopper.join(30)
    assert not stopper.is_alive()
    assert statuses == [GOOD] * len(itts)
    disk = (target.config_path.parent / "disk1.img").read_bytes()
    for i, data in enumerate(payloads):
        assert disk[i * CHUNK:(i + 1) * CHUNK] == data
    initiator.wait_closed(5)       # and then the target closes the connection
