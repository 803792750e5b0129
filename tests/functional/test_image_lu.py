"""Disk image LUs served through qemu-storage-daemon (issue 8): the SCSI features of a disk
LU over NBD, the daemon's supervision, and the errors an admin sees."""

import os
import signal
import struct
import subprocess
import time

import pytest

from istgt.lu.qsd import daemon
from istgt.server import StartupError
from tests.functional.conftest import (
    C_TARGET, CHECK_CONDITION, GOOD, NODE_BASE, asc_ascq, sense_key,
)
from tests.functional.test_provisioning import synchronize_cache, unmap

pytestmark = pytest.mark.skipif(C_TARGET, reason="the C istgt here has no image support")

MiB = 1 << 20
UNIT_ATTENTION = 0x06


def image_target(make_target, tmp_path, name="disk.qcow2", size="16MB"):
    return make_target(lun0_storage=f"{tmp_path}/{name} {size}")


def get_lba_status(initiator, lba):
    """(provisioning status, extent blocks) of the first descriptor."""
    result = initiator.scsi(bytes([0x9E, 0x12]) + struct.pack(">QI", lba, 24) + bytes(2),
                            read_length=24)
    assert result.status == GOOD, result.sense.hex()
    return result.data[20] & 0x0F, struct.unpack_from(">I", result.data, 16)[0]


def test_unmap_reads_back_zeros_and_get_lba_status_follows_the_image(make_target, tmp_path):
    target = image_target(make_target, tmp_path)
    initiator = target.session()
    assert get_lba_status(initiator, 2048)[0] == 1          # a fresh qcow2 is unallocated
    data = os.urandom(MiB)
    assert initiator.write10(2048, data).status == GOOD
    assert get_lba_status(initiator, 2048) == (0, 2048)     # mapped, 1 MiB of it
    assert unmap(initiator, (2048, 2048)).status == GOOD
    assert initiator.read10(2048, 2048).data == bytes(MiB)
    assert get_lba_status(initiator, 2048)[0] == 1
    assert synchronize_cache(initiator).status == GOOD


def write_through_attentions(initiator, lba, payload, seen):
    """WRITE, retried after unit attentions (recorded in `seen`); the final status."""
    for _ in range(4):
        result = initiator.write10(lba, payload)
        if result.status != CHECK_CONDITION or sense_key(result.sense) != UNIT_ATTENTION:
            return result.status
        seen.append(asc_ascq(result.sense))
    return result.status


def test_a_killed_storage_daemon_loses_no_durable_write_and_says_so_for_the_rest(
        make_target, tmp_path):
    """Writes made durable before the daemon dies survive; writes sent while it restarts
    complete and survive; writes acknowledged but not yet flushed either survive or every
    initiator gets a power-on attention (a write-back cache lost, never silently)."""
    target = image_target(make_target, tmp_path, size="64MB")
    initiator = target.session()
    cluster = 128                                    # 64 KiB qcow2 clusters, in blocks
    durable = {i * cluster: os.urandom(4096) for i in range(0, 32)}
    unflushed = {i * cluster: os.urandom(4096) for i in range(32, 64)}
    later = {i * cluster: os.urandom(4096) for i in range(64, 96)}
    seen: list = []
    for lba, payload in durable.items():
        assert write_through_attentions(initiator, lba, payload, seen) == GOOD
    assert synchronize_cache(initiator).status == GOOD
    for lba, payload in unflushed.items():
        assert write_through_attentions(initiator, lba, payload, seen) == GOOD
    first_pid, restarts = daemon.pid, daemon.restarts
    os.kill(first_pid, signal.SIGKILL)
    for lba, payload in later.items():               # sent while it is restarted
        assert write_through_attentions(initiator, lba, payload, seen) == GOOD, lba
    assert daemon.restarts == restarts + 1 and daemon.pid not in (None, first_pid)
    for _ in range(3):
        if synchronize_cache(initiator).status == GOOD:
            break
    for lba, payload in {**durable, **later}.items():
        assert initiator.read10(lba, 8).data == payload, lba
    lost = [lba for lba, payload in unflushed.items() if initiator.read10(lba, 8).data != payload]
    if lost:
        assert (0x29, 0x01) in seen, f"{len(lost)} acknowledged writes lost without a word"


def test_an_image_locked_by_another_process_is_refused_naming_it(make_target, tmp_path):
    image = tmp_path / "busy.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M"], check=True)
    holder = subprocess.Popen(["qemu-storage-daemon", "--blockdev",
                               f"driver=file,node-name=f,filename={image}", "--blockdev",
                               "driver=qcow2,node-name=q,file=f"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)                         # let it take the lock
        assert holder.poll() is None
        with pytest.raises(StartupError, match=r"busy\.qcow2: the image is locked by another"):
            image_target(make_target, tmp_path, name="busy.qcow2")
    finally:
        holder.kill()
        holder.wait()
    assert daemon.pid is None                   # nothing left behind after the refused start


def test_a_missing_storage_daemon_is_a_clear_start_up_error(make_target, tmp_path, monkeypatch):
    monkeypatch.setattr("istgt.lu.qsd.BINARY", "qemu-storage-daemon-not-installed")
    with pytest.raises(StartupError, match=r"need qemu-storage-daemon-not-installed, which is "
                                           r"not installed"):
        image_target(make_target, tmp_path)
    assert not (tmp_path / "disk.qcow2").exists() or os.path.getsize(tmp_path / "disk.qcow2")


def test_one_daemon_serves_every_image_and_stops_after_the_last(tmp_path):
    from istgt.lu.images import ImageBackend
    first = ImageBackend.open(str(tmp_path / "a.vdi"), 4 * MiB, False, 512)
    second = ImageBackend.open(str(tmp_path / "b.qed"), 4 * MiB, False, 512)
    pid = daemon.pid
    assert pid is not None
    again = ImageBackend.open(str(tmp_path / "a.vdi"), None, False, 512)   # a reload's new LU
    assert again.size == 4 * MiB and daemon.pid == pid
    first.write(0, b"A" * 512)
    assert bytes(again.read(0, 512)) == b"A" * 512           # one export, both see it
    first.close()
    second.close()
    assert daemon.pid == pid                                 # `again` still uses a.vdi
    again.close()
    assert daemon.pid is None
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


def test_auto_size_takes_the_images_and_a_larger_size_is_refused(make_target, tmp_path):
    image = tmp_path / "sized.vmdk"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(image), "8M"], check=True)
    target = make_target(lun0_storage=f"{image} Auto")
    assert target.server.units[1].devices[0].backend.size == 8 * MiB
    target.stop()
    with pytest.raises(StartupError, match=r"sized\.vmdk: image holds 8388608 bytes, less than"):
        make_target(lun0_storage=f"{image} 16MB")


def test_reload_adds_and_removes_image_exports(target, tmp_path):
    """A reload adds an image LU (the daemon gets a new export over QMP) and removes it again
    (the export goes, the daemon stops with its last image); the file LU never notices."""
    original = target.config_path.read_text()
    image = tmp_path / "added.qed"
    target.config_path.write_text(
        original + "[LogicalUnit9]\n  TargetName imagedisk\n  Mapping PortalGroup1 "
        f"InitiatorGroup1\n  AuthMethod None\n  UnitType Disk\n  LUN0 Storage {image} 8MB\n")
    assert target.server.reload().added == [f"{NODE_BASE}:imagedisk"]
    assert daemon.pid is not None and image.exists()
    newcomer = target.session(target=f"{NODE_BASE}:imagedisk")
    assert newcomer.write10(0, b"\x77" * 4096).status == GOOD
    assert newcomer.read10(0, 8).data == b"\x77" * 4096
    target.config_path.write_text(original)
    assert target.server.reload().removed == [f"{NODE_BASE}:imagedisk"]
    assert daemon.pid is None
    assert target.session().tur().status == GOOD


def test_an_image_lu_grows_online(make_target, tmp_path):
    """RESIZE of an image LU grows the image (the export is re-added: NBD exports have a
    fixed size) while the session goes on; the new blocks are there for the initiator."""
    target = image_target(make_target, tmp_path, name="grow.qcow2", size="8MB")
    initiator = target.session()
    assert initiator.write10(0, b"\x31" * 512).status == GOOD
    device = target.server.units[1].devices[0]
    assert device.resize(16 * MiB) == 16 * MiB // 512
    attention = initiator.tur()                     # CAPACITY DATA HAS CHANGED
    assert attention.status == CHECK_CONDITION and asc_ascq(attention.sense) == (0x2A, 0x09)
    capacity = initiator.scsi(bytes([0x9E, 0x10]) + bytes(8) + struct.pack(">I", 32) + bytes(2),
                              read_length=32)
    assert struct.unpack_from(">Q", capacity.data)[0] == 16 * MiB // 512 - 1
    assert initiator.write10(24 * 1024, b"\x32" * 512).status == GOOD   # past the old end
    assert initiator.read10(24 * 1024, 1).data == b"\x32" * 512
    assert initiator.read10(0, 1).data == b"\x31" * 512
    target.stop()
    info = subprocess.run(["qemu-img", "info", "--output=json", str(tmp_path / "grow.qcow2")],
                          capture_output=True, text=True, check=True).stdout
    assert '"virtual-size": 16777216' in info
