"""Virtual tape files move between the C istgt (Debian `istgt`) and this target: a cartridge
the C istgt wrote reads here record by record, and one written here reads there."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from istgt.lu.vtape import VirtualTape
from tests.functional.initiator import Initiator
from tests.interop.conftest import NODE_BASE, free_ports, stop_process

pytestmark = pytest.mark.interop

C_ISTGT = "/usr/sbin/istgt"
RECORDS = [b"alpha" * 10, bytes(range(256)) * 12, None, b"beta", None]   # None: filemark


@pytest.fixture
def c_tape_target(tmp_path):
    if not os.access(C_ISTGT, os.X_OK):
        pytest.fail(f"{C_ISTGT} is not installed: run `make test`", pytrace=False)
    port, control_port = free_ports(2)
    cartridge = tmp_path / "cart.vt"
    (tmp_path / "auth.conf").write_text("")
    (tmp_path / "istgt.conf").write_text(f"""\
[Global]
  NodeBase "{NODE_BASE}"
  PidFile {tmp_path}/istgt.pid
  AuthFile {tmp_path}/auth.conf
  MediaDirectory {tmp_path}
  DiscoveryAuthMethod None
[UnitControl]
  AuthMethod None
  Portal UC1 127.0.0.1:{control_port}
  Netmask 127.0.0.1
[PortalGroup1]
  Portal DA1 127.0.0.1:{port}
[InitiatorGroup1]
  InitiatorName "ALL"
  Netmask 127.0.0.0/8
[LogicalUnit1]
  TargetName tape
  Mapping PortalGroup1 InitiatorGroup1
  AuthMethod None
  UnitType Tape
  LUN0 Removable rw {cartridge} 64MB
""")
    processes = []

    def start():
        log = open(tmp_path / "istgt.log", "ab")
        process = subprocess.Popen([C_ISTGT, "-D", "-c", str(tmp_path / "istgt.conf")],
                                   stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
        processes.append((process, log))
        deadline = time.monotonic() + 20
        while True:
            try:
                initiator = Initiator("127.0.0.1", port, timeout=10)
                initiator.login(f"{NODE_BASE}:tape")
                for _ in range(5):
                    if initiator.tur().status == 0:
                        return initiator
                return initiator
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the C istgt did not start: "
                                f"{(tmp_path / 'istgt.log').read_text()}")
                time.sleep(0.2)

    def stop():
        for process, log in processes:
            stop_process(process)
            log.close()
        processes.clear()

    yield start, stop, cartridge
    stop()


def test_a_cartridge_written_by_the_c_istgt_reads_here(c_tape_target):
    start, stop, cartridge = c_tape_target
    start().close()          # the C istgt formats a new cartridge, but fails writes to it
    stop()                   # until it is loaded again (its bug)
    initiator = start()
    for record in RECORDS:
        if record is None:
            cdb, data = bytes([0x10, 0, 0, 0, 1, 0]), b""
        else:
            cdb, data = bytes([0x0A, 0]) + len(record).to_bytes(3, "big") + b"\0", record
        assert initiator.scsi(cdb, data_out=data).status == 0
    assert initiator.scsi(bytes([0x1B, 0, 0, 0, 0, 0])).status == 0    # unload: all on disk
    initiator.close()
    stop()
    tape = VirtualTape.open(str(cartridge), None, read_only=True)
    try:
        assert [r.filemark for r in tape.records] == [r is None for r in RECORDS]
        for index, record in enumerate(RECORDS):
            if record is not None:
                assert tape.read_payload(index) == record
    finally:
        tape.close()


def test_a_cartridge_written_here_reads_in_the_c_istgt(c_tape_target):
    start, _stop, cartridge = c_tape_target
    tape = VirtualTape.open(str(cartridge), 64 << 20, read_only=False)
    for record in RECORDS:
        tape.append(record)
    tape.finish()
    tape.close()
    initiator = start()
    assert initiator.scsi(bytes([0x01, 0, 0, 0, 0, 0])).status == 0     # REWIND
    for record in RECORDS:
        wanted = len(record) if record is not None else 16
        result = initiator.scsi(bytes([0x08, 0]) + wanted.to_bytes(3, "big") + b"\0",
                                read_length=wanted)
        if record is None:
            assert result.status == 2 and result.sense[12:14] == bytes([0, 1])   # filemark
        else:
            assert (result.status, result.data) == (0, record)
    end = initiator.scsi(bytes([0x08, 0, 0, 0, 16, 0]), read_length=16)
    assert end.status == 2 and end.sense[2] & 0x0F == 8 and end.sense[12:14] == bytes([0, 5])
