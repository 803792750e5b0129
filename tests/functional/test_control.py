"""The control channel of the running target: what its commands do to logged-in initiators,
its socket and portal, and input that must not hurt it."""

from __future__ import annotations

import os
import socket
import time

import pytest

from istgt.control.client import main as client_main
from istgt.control.server import ControlServer
from tests.functional.conftest import (
    CHECK_CONDITION, GOOD, NODE_BASE, asc_ascq, free_port, sense_key,
)

DISK1 = f"{NODE_BASE}:disk1"
PREVENT = bytes([0x1E, 0, 0, 0, 1, 0])
ALLOW = bytes([0x1E, 0, 0, 0, 0, 0])
NOT_READY, UNIT_ATTENTION = 2, 6


class Control:
    """A raw UnitControl connection over the target's Unix socket."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")
        self.banner = self.read()

    def read(self) -> str:
        line = self.file.readline()
        if not line:
            raise ConnectionError("closed")
        return line.decode().rstrip("\r\n")

    def ask(self, line: str | bytes) -> list[str]:
        self.sock.sendall((line.encode() if isinstance(line, str) else line) + b"\r\n")
        replies = []
        while True:
            reply = self.read()
            replies.append(reply)
            if reply.startswith(("OK", "ERR")):
                return replies

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def socket_path(target) -> str:
    return f"{target.control_directory}/ctl.sock"


@pytest.fixture
def control(target):
    connection = Control(socket_path(target))
    yield connection
    connection.close()


def expect_sense(result, key, asc):
    assert result.status == CHECK_CONDITION
    assert (sense_key(result.sense), asc_ascq(result.sense)) == (key, asc)


def test_banner_and_the_socket_file(target, control):
    assert control.banner.startswith("iSCSI Target Controller version ")
    assert control.banner.endswith(" from local")
    assert os.stat(socket_path(target)).st_mode & 0o777 == 0o600
    assert control.ask("NOOP") == ["OK NOOP"]


def test_unload_and_load_reach_the_initiator(make_target):
    target = make_target(lun0_options=("Removable Yes",))
    control = Control(socket_path(target))
    initiator = target.session()
    assert control.ask(f"UNLOAD {DISK1} 0") == ["OK UNLOAD"]
    expect_sense(initiator.tur(), NOT_READY, (0x3A, 0x00))          # MEDIUM NOT PRESENT
    assert control.ask(f"LOAD {DISK1} 0") == ["OK LOAD"]
    expect_sense(initiator.tur(), UNIT_ATTENTION, (0x28, 0x00))     # NOT READY TO READY
    assert initiator.tur().status == GOOD
    assert initiator.scsi(PREVENT).status == GOOD
    assert control.ask(f"UNLOAD {DISK1}") == ["ERR unload"]         # removal prevented
    assert initiator.tur().status == GOOD
    assert initiator.scsi(ALLOW).status == GOOD
    assert control.ask(f"UNLOAD {DISK1}") == ["OK UNLOAD"]
    control.close()


def test_reset_raises_the_reset_unit_attention(target, control):
    initiator = target.session()
    assert control.ask(f'RESET "{DISK1}" 0') == ["OK RESET"]
    expect_sense(initiator.tur(), UNIT_ATTENTION, (0x29, 0x03))
    assert initiator.tur().status == GOOD


def test_info_lists_every_connection_of_normal_sessions(target, control):
    first = target.session()
    second = target.session(initiator_name="iqn.2024-01.org.example:second")
    lines = control.ask("INFO")
    assert lines[-1] == "OK INFO" and len(lines) == 3
    for initiator in (first, second):
        isid = f"{int.from_bytes(initiator.isid, 'big'):x}"
        assert any(f"ISID={isid}, TSIH={initiator.tsih}, CID=0," in line for line in lines)
    assert control.ask(f"INFO {NODE_BASE}:other") == ["INFO no login", "OK INFO"]


def test_hostile_lines_are_answered_and_the_daemon_carries_on(target, control):
    replies = control.ask(b"A" * 100_000)           # no terminator for 100 kB: cut in pieces
    assert replies == ["ERR unknown command"]        # the first piece; the rest follow
    control.sock.sendall(b"\x00\xff\xfe garbage\r\n" + b"LIST \"unterminated\r\n")
    control.sock.sendall(b"NOOP\r\n")
    seen = []
    while "OK NOOP" not in seen:
        seen.append(control.read())
    assert all(line.startswith(("ERR ", "OK ")) for line in seen)
    fresh = Control(socket_path(target))
    assert fresh.ask("VERSION")[-1] == "OK VERSION"
    fresh.close()


def test_tcp_portal_refuses_addresses_outside_its_netmask(make_target):
    port = free_port("127.0.0.1")
    target = make_target(control_lines=(f"Portal UC1 127.0.0.1:{port}", "Netmask 192.0.2.0/24"))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        assert sock.recv(100) == b""                 # closed without a banner
    assert Control(socket_path(target)).ask("NOOP") == ["OK NOOP"]   # the socket still works


def test_a_live_socket_is_never_taken_over_but_a_stale_one_is(target, tmp_path):
    rival = ControlServer(target.server, target.server.config.unit_control,
                          target.server.config.global_.auth_file)
    with pytest.raises(OSError, match="another istgt is listening there"):
        rival.open()
    stale = str(tmp_path / "stale.sock")
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(stale)
    leftover.close()                                   # the file stays, nobody listens
    config = target.server.config.unit_control.__class__(socket_path=stale)
    replacement = ControlServer(target.server, config, "")
    replacement.open()
    replacement.close()
    assert not os.path.exists(stale)


def test_a_second_daemon_on_the_default_socket_starts_without_one(target, caplog):
    """A config written for the C istgt names no ControlSocket: every daemon then wants the
    default path, and the second must still start (its TCP portals still serve)."""
    busy = target.server.config.unit_control      # ControlSocket of the running target
    default = busy.__class__(socket_path=busy.socket_path, socket_configured=False)
    second = ControlServer(target.server, default, "")
    second.open()
    assert "no control socket for this daemon" in caplog.text
    second.close()
    assert os.path.exists(socket_path(target))     # the first daemon's socket is untouched
    assert Control(socket_path(target)).ask("NOOP") == ["OK NOOP"]


def test_the_socket_is_removed_at_shutdown(make_target):
    target = make_target()
    path = socket_path(target)
    assert os.path.exists(path)
    target.server.shutdown()
    assert not os.path.exists(path)


# --- online resize ---------------------------------------------------------------------------

READ_CAPACITY_16 = bytes([0x9E, 0x10]) + bytes(8) + (32).to_bytes(4, "big") + bytes(2)


def capacity_bytes(initiator) -> int:
    result = initiator.scsi(READ_CAPACITY_16, read_length=32)
    assert result.status == GOOD
    last_lba, block_length = int.from_bytes(result.data[:8], "big"), int.from_bytes(
        result.data[8:12], "big")
    return (last_lba + 1) * block_length


def test_resize_grows_the_lun_and_tells_every_nexus(target, control):
    first = target.session()
    second = target.session(initiator_name="iqn.2024-01.org.example:second")
    assert capacity_bytes(first) == 64 << 20
    assert control.ask(f"RESIZE {DISK1} 0 96MB") == [f"RESIZE lun0 {96 << 20}", "OK RESIZE"]
    for initiator in (first, second):
        expect_sense(initiator.tur(), UNIT_ATTENTION, (0x2A, 0x09))  # CAPACITY DATA HAS CHANGED
        assert capacity_bytes(initiator) == 96 << 20
    assert control.ask(f"LIST {DISK1} 0")[0].endswith(f" {96 << 20}")
    assert control.ask(f"RESIZE {DISK1} 0 32MB")[0].startswith("ERR resize: ")   # no shrink
    assert control.ask(f"RESIZE {DISK1} 0 96MB") == [f"RESIZE lun0 {96 << 20}", "OK RESIZE"]
    assert first.tur().status == GOOD                                # same size: no news
    assert control.ask(f"RESIZE {DISK1} 0 lots") == ["ERR invalid parameters"]


def test_an_auto_sized_lun_follows_its_growing_file(make_target, tmp_path):
    backing = tmp_path / "auto.img"
    with open(backing, "wb") as f:
        f.truncate(8 << 20)
    target = make_target(lun0_storage=f"{backing} Auto")
    initiator = target.session()
    assert capacity_bytes(initiator) == 8 << 20
    with open(backing, "r+b") as f:
        f.truncate(12 << 20)                      # the admin grew the file (or the zvol)
    deadline = time.monotonic() + 10
    while True:
        result = initiator.tur()
        if result.status != GOOD:
            expect_sense(result, UNIT_ATTENTION, (0x2A, 0x09))
            break
        assert time.monotonic() < deadline, "the LUN never noticed its file grew"
        time.sleep(0.2)
    assert capacity_bytes(initiator) == 12 << 20


def test_istgtcontrol_resize_and_list_through_the_socket(target, tmp_path, capsys):
    conf = tmp_path / "ctl.conf"
    conf.write_text(f"[Global]\n  ControlSocket {socket_path(target)}\n")
    assert client_main(["-c", str(conf), "-t", DISK1, "-s", "80MB", "resize"]) == 0
    assert capsys.readouterr().out == f"lun0 {80 << 20}\nDONE RESIZE command\n"
    assert client_main(["-c", str(conf), "-t", DISK1, "list"]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith(f" {80 << 20}")
    assert client_main(["-c", str(conf), "-t", DISK1, "-s", "1MB", "resize"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "ABORT RESIZE command\n" and captured.err.startswith("ERROR resize: ")


# --- statistics ------------------------------------------------------------------------------


def parse_stats(line: str) -> tuple[str, dict[str, str]]:
    """`STATS <label> commands=.. read_bytes=..` -> (label, {name: value})."""
    label, _, counters = line.partition(" commands=")
    return label, dict(pair.split("=") for pair in f"commands={counters}".split())


def test_stats_count_commands_bytes_and_latency_per_lun_and_session(target, control):
    reader = target.session()
    writer = target.session(initiator_name="iqn.2024-01.org.example:writer")
    before = control.ask(f"STATS {DISK1}")
    assert before[-1] == "OK STATS"
    assert writer.write10(0, b"\x11" * 8192).status == GOOD
    result = reader.scsi(bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0]), read_length=4096)
    assert result.status == GOOD
    lines = control.ask(f"STATS {DISK1}")
    fields = dict(parse_stats(line) for line in lines[:-1])
    lun0 = fields[f"STATS LU1 {DISK1} lun0"]
    assert int(lun0["written_bytes"]) >= 8192 and int(lun0["read_bytes"]) >= 4096
    assert int(lun0["commands"]) >= 2 and int(lun0["avg_latency_us"]) > 0
    sessions = {key: value for key, value in fields.items() if key.startswith("STATS session")}
    assert len(sessions) == 2
    by_initiator = {key.split()[3].split(",")[0]: value for key, value in sessions.items()}
    assert int(by_initiator["iqn.2024-01.org.example:writer"]["written_bytes"]) == 8192
    assert int(by_initiator["iqn.2024-01.org.example:writer"]["read_bytes"]) == 0
    assert int(by_initiator[reader.initiator_name]["read_bytes"]) == 4096
    assert control.ask("STATS iqn.none:x") == ["ERR no target"]


def test_peers_that_never_authenticate_cannot_crowd_out_the_socket(make_target, monkeypatch):
    import istgt.control.server as control_server
    monkeypatch.setattr(control_server, "AUTH_DEADLINE_S", 1)
    port = free_port("127.0.0.1")
    target = make_target(control_lines=(f"Portal UC1 127.0.0.1:{port}", "Netmask 127.0.0.1",
                                        "AuthMethod CHAP", "AuthGroup AuthGroup1"))
    hogs = []
    for _ in range(control_server.MAX_CONTROL_CONNECTIONS):
        hog = socket.create_connection(("127.0.0.1", port), timeout=5)
        hog.recv(200)                                  # the banner, then silence
        hogs.append(hog)
    assert Control(socket_path(target)).ask("NOOP") == ["OK NOOP"]    # root still gets in
    time.sleep(1.5)
    for hog in hogs:                                   # and the silent peers were dropped
        assert hog.recv(100) == b""
        hog.close()


def test_the_socket_file_is_0600_from_the_moment_it_exists(make_target, monkeypatch):
    modes = []
    real_bind = socket.socket.bind

    def bind(sock, address):
        real_bind(sock, address)
        if sock.family == socket.AF_UNIX:         # the file bind just created, before chmod
            modes.append(os.stat(address).st_mode & 0o777)
    monkeypatch.setattr(socket.socket, "bind", bind)
    old_mask = os.umask(0o022)                    # a usual umask would give 0755
    try:
        make_target()
    finally:
        os.umask(old_mask)
    assert modes and all(mode == 0o600 for mode in modes), modes
