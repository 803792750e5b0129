"""Configuration reload (SIGHUP / istgtcontrol refresh) on the running target: every section,
all or nothing, and initiators of untouched LUs never notice."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from istgt.config import ConfigError
from istgt.server import StartupError
from tests.functional.conftest import (
    CHECK_CONDITION, GOOD, NODE_BASE, asc_ascq, free_port, sense_key,
)
from tests.functional.initiator import ConnectionClosed
from tests.functional.test_control import Control, socket_path

NEW = f"{NODE_BASE}:newdisk"
REPORT_LUNS = bytes([0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0])
LOGIN_TARGET_NOT_FOUND = 0x0203


def new_lu(directory, size="16MB", extra="") -> str:
    return (f"[LogicalUnit9]\n  TargetName newdisk\n  Mapping PortalGroup1 InitiatorGroup1\n"
            f"  AuthMethod None\n  UnitType Disk\n{extra}"
            f"  LUN0 Storage {directory}/newdisk.img {size}\n")


def rewrite(target, text: str) -> None:
    target.config_path.write_text(text)


def luns_reported(initiator) -> list[int]:
    result = initiator.scsi(REPORT_LUNS, read_length=256)
    assert result.status == GOOD
    count = int.from_bytes(result.data[:4], "big") // 8
    return [int.from_bytes(result.data[8 + 8 * i: 10 + 8 * i], "big") & 0x3FFF
            for i in range(count)]


def expect_closed(initiator) -> None:
    try:
        initiator.wait_closed(timeout=10)
    except ConnectionClosed:
        pass


def test_an_added_lu_is_served_and_a_removed_one_ends_its_sessions(target, tmp_path):
    original = target.config_path.read_text()
    rewrite(target, original + new_lu(tmp_path))
    report = target.server.reload()
    assert report.added == [NEW] and report.removed == []
    newcomer = target.session(target=NEW)
    assert newcomer.tur().status == GOOD
    rewrite(target, original)
    report = target.server.reload()
    assert report.removed == [NEW] and report.sessions_ended == 1
    expect_closed(newcomer)
    late = target.connect()
    assert late.login(NEW, expect_status=LOGIN_TARGET_NOT_FOUND).status == LOGIN_TARGET_NOT_FOUND


def test_adding_and_removing_a_lun_is_reported(target, tmp_path):
    original = target.config_path.read_text()
    initiator = target.session()
    assert luns_reported(initiator) == [0]
    with_lun1 = original.replace("  LUN0 Storage", f"  LUN1 Storage {tmp_path}/lun1.img 8MB\n"
                                 "  LUN0 Storage", 1)
    rewrite(target, with_lun1)
    report = target.server.reload()
    assert report.updated == [f"{NODE_BASE}:disk1"] and report.sessions_ended == 0
    result = initiator.tur()
    assert result.status == CHECK_CONDITION and asc_ascq(result.sense) == (0x3F, 0x0E)
    assert luns_reported(initiator) == [0, 1]
    assert initiator.tur(lun=1).status in (GOOD, CHECK_CONDITION)   # 29/00: a new LUN
    rewrite(target, original)
    target.server.reload()
    assert asc_ascq(initiator.tur().sense) == (0x3F, 0x0E)
    assert luns_reported(initiator) == [0]
    result = initiator.tur(lun=1)
    assert result.status == CHECK_CONDITION and asc_ascq(result.sense) == (0x25, 0x00)


def test_a_config_that_fails_is_rejected_whole(target, tmp_path):
    original = target.config_path.read_text()
    initiator = target.session()
    rewrite(target, original + "[LogicalUnit9]\n  TargetName newdisk\n  UnitType Floppy\n")
    with pytest.raises(ConfigError, match="istgt.conf:"):
        target.server.reload()
    # A config that reads but cannot be served (a missing Auto-sized file) changes nothing
    # either, not even the portal it also adds.
    port = free_port("127.0.0.1")
    broken = (original.replace("[PortalGroup1]\n", f"[PortalGroup1]\n  Portal NEW 127.0.0.1:{port}\n")
              + new_lu(tmp_path, size="Auto").replace("newdisk.img", "missing.img"))
    rewrite(target, broken)
    with pytest.raises(StartupError, match="missing.img"):
        target.server.reload()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    assert initiator.tur().status == GOOD
    assert target.server.generation == 0


def test_sessions_that_lost_access_end_and_others_stay(target):
    original = target.config_path.read_text()
    keeps = target.session(initiator_name="iqn.2024-01.org.example:allowed")
    loses = target.session(initiator_name="iqn.2024-01.org.example:other")
    narrowed = original.replace(
        "[InitiatorGroup1]\n  InitiatorName ALL\n",
        '[InitiatorGroup1]\n  InitiatorName "iqn.2024-01.org.example:allowed"\n', 1)
    assert narrowed != original
    rewrite(target, narrowed)
    assert target.server.reload().sessions_ended == 1
    expect_closed(loses)
    assert keeps.tur().status == GOOD


def test_portals_open_and_close(target):
    original = target.config_path.read_text()
    port = free_port("127.0.0.1")
    widened = original.replace("[PortalGroup1]\n", f"[PortalGroup1]\n  Portal NEW 127.0.0.1:{port}\n")
    rewrite(target, widened)
    assert target.server.reload().portals_opened == [f"127.0.0.1:{port}"]
    initiator = target.connect(port=port)
    initiator.login(f"{NODE_BASE}:disk1")
    assert initiator.tur().status in (GOOD, CHECK_CONDITION)
    rewrite(target, original)
    assert target.server.reload().portals_closed == [f"127.0.0.1:{port}"]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_a_grown_size_in_the_config_resizes_online(target):
    original = target.config_path.read_text()
    initiator = target.session()
    grown = original.replace("disk1.img 64MB", "disk1.img 80MB", 1)
    assert grown != original
    rewrite(target, grown)
    assert target.server.reload().sessions_ended == 0
    result = initiator.tur()
    assert (sense_key(result.sense), asc_ascq(result.sense)) == (6, (0x2A, 0x09))
    rewrite(target, original)                       # smaller than the LUN now: refused
    with pytest.raises(ValueError, match="never shrinks"):
        target.server.reload()


def dvd_lu(directory, image) -> str:
    return (f"[LogicalUnit8]\n  TargetName dvd\n  Mapping PortalGroup1 InitiatorGroup1\n"
            f"  AuthMethod None\n  UnitType DVD\n  LUN0 Removable ro {image} Auto\n")


def test_writes_to_an_untouched_lu_never_notice(target, tmp_path):
    """The issue's scenario: LU A keeps writing while LU B is added, changed and removed by
    reload and the disc in DVD LU C is changed: A sees no error, C sees the media change."""
    directory = target.config_path.parent
    (directory / "first.iso").write_bytes(b"\x01" * (1 << 20))
    (directory / "second.iso").write_bytes(b"\x02" * (2 << 20))
    original = target.config_path.read_text() + dvd_lu(directory, directory / "first.iso")
    rewrite(target, original)
    target.server.reload()
    drive = target.session(target=f"{NODE_BASE}:dvd")
    assert drive.tur().status == GOOD
    control = Control(socket_path(target))
    writer = target.session()
    errors: list[str] = []
    stop = threading.Event()
    written = [0]

    def keep_writing():
        lba = 0
        while not stop.is_set():
            result = writer.write10(lba % 1024, bytes([lba % 251]) * 4096)
            if result.status != GOOD:
                errors.append(f"WRITE status {result.status:#x} sense {result.sense.hex()}")
                return
            lba += 8
            written[0] += 1

    thread = threading.Thread(target=keep_writing)
    thread.start()
    try:
        for step in (new_lu(tmp_path),                                 # B added
                     new_lu(tmp_path, extra="  QueueDepth 4\n"),        # B changed (rebuilt)
                     new_lu(tmp_path, size="32MB", extra="  QueueDepth 4\n"),  # B grown
                     ""):                                               # B removed
            rewrite(target, original + step)
            target.server.reload()
            b = target.session(target=NEW) if step else None
            if b is not None:
                assert b.tur().status in (GOOD, CHECK_CONDITION)
            time.sleep(0.2)
        assert control.ask(f"CHANGE {NODE_BASE}:dvd 0 - ro second.iso auto") == ["OK CHANGE"]
        result = drive.tur()                               # C: NOT READY TO READY CHANGE
        assert result.status == CHECK_CONDITION and asc_ascq(result.sense) == (0x28, 0x00)
        assert drive.tur().status == GOOD
    finally:
        stop.set()
        thread.join(10)
        control.close()
    assert not errors, errors
    assert written[0] > 10


def test_refresh_through_the_control_socket(target, tmp_path):
    control = Control(socket_path(target))
    original = target.config_path.read_text()
    rewrite(target, original + new_lu(tmp_path))
    assert control.ask("REFRESH VERBOSE") == ["REFRESH reload configuration #1",
                                              f"REFRESH add {NEW}", "OK REFRESH"]
    assert control.ask("REFRESH") == ["OK REFRESH"]       # plain: what the C tool expects
    rewrite(target, "[Global]\n  Timeout soon\n")
    reply = control.ask("refresh")
    assert len(reply) == 1 and reply[0].startswith("ERR refresh: ") and "istgt.conf:2" in reply[0]
    assert control.ask(f"LIST {NEW}")[-1] == "OK LIST"          # the previous config stays
    control.close()


def test_global_parameters_apply_to_new_sessions_only(target):
    original = target.config_path.read_text()
    before = target.connect()
    assert before.login(f"{NODE_BASE}:disk1", keys={"FirstBurstLength": "65536"}).num(
        "FirstBurstLength") == 65536
    changed = original.replace("[Global]\n", "[Global]\n  FirstBurstLength 8192\n", 1)
    rewrite(target, changed)
    assert target.server.reload().sessions_ended == 0
    after = target.connect()
    assert after.login(f"{NODE_BASE}:disk1", keys={"FirstBurstLength": "65536"}).num(
        "FirstBurstLength") == 8192
    assert before.params.num("FirstBurstLength") == 65536      # what it negotiated stays
    assert before.tur().status in (GOOD, CHECK_CONDITION)


def test_a_failing_step_does_not_leave_the_rest_unapplied(target, tmp_path):
    """Growing a LUN past what the file system allows fails at commit; the portal and LU
    the same file adds are still served, and the failure is reported."""
    original = target.config_path.read_text()
    port = free_port("127.0.0.1")
    changed = (original.replace("[PortalGroup1]\n", f"[PortalGroup1]\n  Portal NEW 127.0.0.1:{port}\n")
               .replace("disk1.img 64MB", "disk1.img 64TB", 1) + new_lu(tmp_path))
    rewrite(target, changed)
    report = target.server.reload()
    assert report.added == [NEW] and report.portals_opened == [f"127.0.0.1:{port}"]
    assert any("resize" in error for error in report.errors)
    late = target.connect(port=port)
    late.login(NEW)
    assert late.tur().status in (GOOD, CHECK_CONDITION)
