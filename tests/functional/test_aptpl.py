"""Persistent reservations made with APTPL survive a restart of the target (a StateDirectory
is configured); without APTPL they do not; without a StateDirectory APTPL is refused."""

import struct

import pytest

from tests.functional.conftest import C_TARGET, CHECK_CONDITION, GOOD, asc_ascq, sense_key

KEY = 0x1122334455667788


def register(initiator, key: int, aptpl: bool):
    params = struct.pack(">QQ4xBx2x", 0, key, 0x01 if aptpl else 0)
    cdb = struct.pack(">BBB2xIB", 0x5F, 0x00, 0x00, len(params), 0)   # PR OUT REGISTER
    return initiator.scsi(cdb, data_out=params)


def read_keys(initiator) -> list[int]:
    result = initiator.scsi(struct.pack(">BB5xHB", 0x5E, 0x00, 1024, 0), read_length=1024)
    assert result.status == GOOD
    length = struct.unpack_from(">I", result.data, 4)[0]
    return [struct.unpack_from(">Q", result.data, 8 + i)[0] for i in range(0, length, 8)]


def restart(target):
    """Stop the in-process server and start a new one on the same configuration."""
    from istgt.config import load_config
    from istgt.server import Server

    for initiator in target.initiators:
        initiator.close()
    target.server.shutdown()
    server = Server(load_config(target.config_path))
    server.open_portals()
    server.start()
    target.server = server


@pytest.mark.skipif(C_TARGET, reason="restarts the in-process Python server")
@pytest.mark.parametrize("aptpl", [True, False])
def test_registration_survives_a_restart_only_with_aptpl(make_target, tmp_path, aptpl):
    state = tmp_path / "state"
    target = make_target(iscsi={"StateDirectory": str(state)})
    initiator = target.session()
    assert register(initiator, KEY, aptpl).status == GOOD
    assert read_keys(initiator) == [KEY]
    restart(target)
    assert read_keys(target.session()) == ([KEY] if aptpl else [])
    assert any(state.iterdir()) == aptpl      # the file is removed when APTPL is off


def test_aptpl_without_a_state_directory_is_refused(target):
    initiator = target.session()
    result = register(initiator, KEY, aptpl=True)
    assert result.status == CHECK_CONDITION
    assert sense_key(result.sense) == 0x05 and asc_ascq(result.sense) == (0x26, 0x00)
    assert read_keys(initiator) == []
