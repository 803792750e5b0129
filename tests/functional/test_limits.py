"""Bounded resources (write buffers, immediate commands) and a slow backend kept apart from
the connection's own answers."""

import struct
import threading
import time

from istgt.iscsi.connection import MAX_IMMEDIATE, MAX_WRITE_BUFFER, WRITE_BUDGET
from tests.functional.initiator import REJECT

GOOD, BUSY = 0x00, 0x08


def write16_cdb(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQIBB", 0x8A, 0, lba, blocks, 0, 0)


def test_write_buffers_beyond_the_budget_get_busy(target):
    initiator = target.session()
    initiator.strict = False       # the R2Ts for the withheld data are expected and ignored
    per_command = MAX_WRITE_BUFFER // 2
    blocks = per_command // 512
    # Commands without their data: the target must buffer each until its Data-Out arrives.
    fits = WRITE_BUDGET // per_command
    itts = [initiator.submit(write16_cdb(i * blocks, blocks), edtl=per_command, write=True,
                             use_immediate_data=False)
            for i in range(fits + 1)]
    over = initiator.collect(itts[-1], timeout=10)
    assert over.status == BUSY
    assert all(r.startswith("R2T beyond the data") for r in initiator.violations)
    initiator.violations.clear()   # they were the point of the test, not target faults


def hold_backend(target) -> threading.Event:
    """Make LUN 0 of the in-process target wait in its backend until the event is set."""
    device = target.server.units[1].devices[0]
    gate = threading.Event()
    execute = device.execute

    def held_execute(task):
        gate.wait(10)
        execute(task)
    device.execute = held_execute
    return gate


def test_immediate_commands_beyond_the_bound_are_rejected(target):
    """Immediate commands bypass the CmdSN window, so their number in flight is bounded:
    beyond it the target answers Reject (immediate command reject, 0x06)."""
    initiator = target.session()
    gate = hold_backend(target)
    itts = [initiator.submit(bytes(6), immediate=True) for _ in range(MAX_IMMEDIATE + 2)]
    rejects = []
    deadline = time.monotonic() + 5
    while len(rejects) < 2 and time.monotonic() < deadline:
        pdu = initiator.recv_pdu(timeout=5)
        if pdu.opcode == REJECT:
            rejects.append(pdu)
    assert [r.reason for r in rejects] == [0x06, 0x06]
    gate.set()
    for itt in itts[:MAX_IMMEDIATE]:
        assert initiator.collect(itt, timeout=10).status == GOOD
    for itt in itts[MAX_IMMEDIATE:]:
        initiator.tasks.pop(itt, None)


def test_a_slow_backend_does_not_delay_nop_out_answers(target):
    """Commands run on the LU's workers, never on the connection's threads: a NOP-Out is
    answered at once while a command on the same connection is stuck in the backend."""
    initiator = target.session()
    gate = hold_backend(target)
    itt = initiator.submit(bytes(6))               # TEST UNIT READY, held in the backend
    started = time.monotonic()
    assert initiator.nop_out(b"ping").data == b"ping"
    assert time.monotonic() - started < 1.0
    gate.set()
    assert initiator.collect(itt, timeout=10).status == GOOD
