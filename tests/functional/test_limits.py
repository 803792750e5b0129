"""Bounded resources: write buffers held by one connection are capped (istgt bug B20)."""

import struct

from istgt.iscsi.connection import MAX_WRITE_BUFFER, WRITE_BUDGET

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
