"""Random CDBs never make execute() raise, and CHECK CONDITION always carries sense."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from istgt.scsi.command import ScsiTask
from istgt.scsi.constants import ScsiStatus
from tests.unit.test_scsi_disk import NEXUS, OTHER, make_device

DEVICE = make_device(blocks=64)
KNOWN_OPCODES = sorted({spec.opcode for spec in DEVICE.table.specs})


def valid_sense(sense: bytes) -> bool:
    if not sense:
        return False
    if sense[0] & 0x7F in (0x70, 0x71):
        return len(sense) >= 18 and sense[7] == len(sense) - 8
    if sense[0] & 0x7F in (0x72, 0x73):
        return len(sense) == 8 + sense[7]
    return False


cdbs = st.one_of(
    st.binary(min_size=0, max_size=16),
    st.tuples(st.sampled_from(KNOWN_OPCODES), st.binary(min_size=5, max_size=15)).map(
        lambda pair: bytes([pair[0]]) + pair[1]
    ),
)


@settings(max_examples=3000, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    cdb=cdbs,
    data=st.one_of(st.none(), st.binary(max_size=2048)),
    other=st.booleans(),
)
def test_random_cdbs_never_raise(cdb, data, other):
    device = DEVICE
    task = ScsiTask(0, cdb, OTHER if other else NEXUS, data_out=data,
                    transfer_length=len(data or b""))
    device.execute(task)
    assert task.status in (
        ScsiStatus.GOOD,
        ScsiStatus.CHECK_CONDITION,
        ScsiStatus.CONDITION_MET,
        ScsiStatus.RESERVATION_CONFLICT,
    )
    if task.status == ScsiStatus.CHECK_CONDITION:
        assert valid_sense(task.sense), (cdb.hex(), task.sense.hex())
        assert task.data_in is None
    else:
        assert task.sense == b""
    # A hardware error would mean an unexpected exception inside a handler.
    if task.sense:
        assert task.sense[2 if task.sense[0] & 0x7F < 0x72 else 1] & 0x0F != 0x4, cdb.hex()
