"""Connection reinstatement: the old connection's receiver, busy with a READ when the close
comes, must not go on to run a stale WRITE still in its socket after the initiator's newer
WRITE on the new connection was acknowledged (it once drained and overwrote that data)."""
import os
import time

from tests.functional.conftest import DISK, GOOD

SLOW_LBA, LBA = 1000, 2000


def rw10(op, lba, blocks=1):
    return bytes([op, 0]) + lba.to_bytes(4, "big") + bytes([0]) + blocks.to_bytes(2, "big") + bytes([0])


def test_stale_write_of_reinstated_connection_does_not_overwrite(target, monkeypatch):
    unit = next(iter(target.server.units.values()))
    backend = unit.devices[0].backend
    real_read = backend.read

    def read(offset, length):                 # the old connection's receiver is busy
        if offset == SLOW_LBA * 512:
            time.sleep(1.5)
        return real_read(offset, length)

    monkeypatch.setattr(backend, "read", read)
    old = target.session()
    old.strict = False
    old.submit(rw10(0x28, SLOW_LBA), read_length=512)
    time.sleep(0.2)
    old.submit(rw10(0x2A, LBA), data_out=b"O" * 512)       # still in the old socket
    time.sleep(0.1)
    new = target.connect(isid=old.isid)
    new.cmd_sn = old.cmd_sn                                  # a new task, a new CmdSN
    new.login(DISK, tsih=old.tsih, cid=0)                    # connection reinstatement
    new.strict = False
    result = new.scsi(rw10(0x2A, LBA), data_out=b"N" * 512)
    while result.status != GOOD:                             # unit attentions first
        result = new.scsi(rw10(0x2A, LBA), data_out=b"N" * 512)
    time.sleep(3)
    with open(os.path.join(os.path.dirname(target.config_path), "disk1.img"), "rb") as f:
        f.seek(LBA * 512)
        block = f.read(512)
    assert block == b"N" * 512, "an acknowledged WRITE was overwritten by the old connection"
