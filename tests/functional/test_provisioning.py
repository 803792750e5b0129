"""Thin provisioning on real storage, through our initiator: UNMAP on a loop block device
(BLKDISCARD), a backing file system that fills up (ENOSPC), and a removable LUN whose
medium prevention ends with the I_T nexus.

The loop and mount tests need root. As root they must run: a missing tool fails them."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest

from tests.functional.conftest import CHECK_CONDITION, GOOD, asc_ascq, sense_key

DATA_PROTECT, NOT_READY, ILLEGAL_REQUEST = 0x7, 0x2, 0x5
MiB = 1 << 20
CHUNK = 64 * 1024                     # bytes per WRITE while filling the file system


def require_root_with(*tools: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (loop devices, mounts)")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"running as root but {', '.join(missing)} missing: install util-linux / "
                    "e2fsprogs; this test must not be skipped in CI")


def run(*command: str) -> str:
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()


def unmap(initiator, *ranges):
    body = b"".join(struct.pack(">QI4x", lba, count) for lba, count in ranges)
    parameters = struct.pack(">HH4x", len(body) + 6, len(body)) + body
    cdb = struct.pack(">BBxxxxBHB", 0x42, 0, 0, len(parameters), 0)
    return initiator.scsi(cdb, data_out=parameters)


def read_capacity_16(initiator) -> bytes:
    result = initiator.scsi(bytes([0x9E, 0x10]) + bytes(8) + struct.pack(">I", 32) + bytes(2),
                            read_length=32)
    assert result.status == GOOD, result.sense.hex()
    return result.data


def synchronize_cache(initiator):
    return initiator.scsi(bytes([0x35]) + bytes(9))


def data_offsets(path: Path) -> tuple[int, int]:
    """(first data offset from 0, first hole offset from 0) of a file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            data = os.lseek(fd, 0, os.SEEK_DATA)
        except OSError:
            data = os.fstat(fd).st_size       # no data at all
        return data, os.lseek(fd, 0, os.SEEK_HOLE)
    finally:
        os.close(fd)


# --- a loop block device -----------------------------------------------------------------------


@pytest.fixture
def loop_device(tmp_path):
    require_root_with("losetup")
    backing = tmp_path / "loop-backing.img"
    with open(backing, "wb") as f:
        f.truncate(32 * MiB)
    device = run("losetup", "--find", "--show", str(backing))
    try:
        yield device, backing
    finally:
        subprocess.run(["losetup", "--detach", device], check=False)


def test_unmap_on_a_block_device_discards(loop_device, make_target):
    device, backing = loop_device
    name = Path(device).name
    zeroes = Path(f"/sys/block/{name}/queue/discard_zeroes_data").read_text().strip() == "1"
    target = make_target(lun0_storage=f"{device} Auto")
    initiator = target.session()

    rc16 = read_capacity_16(initiator)
    assert struct.unpack(">Q", rc16[:8])[0] + 1 == 32 * MiB // 512
    assert rc16[14] & 0x80, "LBPME: a device that discards is thin provisioned"
    assert bool(rc16[14] & 0x40) == zeroes, "LBPRZ says what the kernel promises, no more"
    b2 = initiator.inquiry(evpd=True, page=0xB2).data
    assert b2[5] & 0xE0 == 0xE0 and b2[6] & 0x07 == 0x02  # LBPU, LBPWS, LBPWS10; thin

    pattern = bytes(range(256)) * (MiB // 256)
    for lba in (0, 4096):                                # 0 and 2 MiB
        assert initiator.write10(lba, pattern[:512 * 2048]).status == GOOD
    assert synchronize_cache(initiator).status == GOOD
    assert data_offsets(backing)[0] == 0                 # the loop file holds data at 0

    assert unmap(initiator, (0, 2048)).status == GOOD
    assert data_offsets(backing)[0] >= MiB, "the discard punched the first MiB out of the file"
    write_same_unmap = struct.pack(">BBQIBB", 0x93, 0x08, 4096, 2048, 0, 0)
    assert initiator.scsi(write_same_unmap, data_out=bytes(512)).status == GOOD
    assert data_offsets(backing)[0] >= 3 * MiB or data_offsets(backing)[0] == 32 * MiB

    # GET LBA STATUS on a block device cannot know: it says mapped, for the whole extent.
    status = initiator.scsi(bytes([0x9E, 0x12]) + bytes(8) + struct.pack(">I", 24) + bytes(2),
                            read_length=24)
    assert status.status == GOOD
    assert struct.unpack(">QIB", status.data[8:21]) == (0, 32 * MiB // 512, 0)
    assert initiator.write10(8192, pattern[:4096]).status == GOOD
    assert initiator.read10(8192, 8).data == pattern[:4096]


# --- a backing file system that fills up -------------------------------------------------------


@pytest.fixture(params=["tmpfs", "ext4"])
def small_filesystem(request, tmp_path):
    """A 4 MiB file system mounted under tmp_path (the test's 16 MiB LU cannot fit)."""
    kind = request.param
    require_root_with("mount", "umount", *(["mkfs.ext4"] if kind == "ext4" else []))
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    if kind == "tmpfs":
        run("mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mountpoint))
    else:
        image = tmp_path / "ext4.img"
        with open(image, "wb") as f:
            f.truncate(4 * MiB)
        run("mkfs.ext4", "-q", "-F", "-m", "0", str(image))
        run("mount", "-o", "loop", str(image), str(mountpoint))
    try:
        yield mountpoint
    finally:
        if subprocess.run(["umount", str(mountpoint)], check=False).returncode:
            subprocess.run(["umount", "--lazy", str(mountpoint)], check=False)


def chunk_pattern(index: int) -> bytes:
    return struct.pack(">I", index) * (CHUNK // 4)


def test_full_file_system_fails_writes_and_keeps_acknowledged_data(small_filesystem, make_target):
    # small_filesystem comes first: torn down after the target has closed the file
    target = make_target(lun0_storage=f"{small_filesystem}/disk.img 16MB")
    initiator = target.session()
    blocks_per_chunk = CHUNK // 512
    acknowledged, refused = [], []
    for index in range(16 * MiB // CHUNK):
        result = initiator.write10(index * blocks_per_chunk, chunk_pattern(index))
        if result.status == GOOD:
            acknowledged.append(index)
        else:
            assert result.status == CHECK_CONDITION
            assert (sense_key(result.sense), asc_ascq(result.sense)) == (DATA_PROTECT, (0x27, 0x07)), \
                "SBC-4 4.7.3.7: out of space on a thin LU is SPACE ALLOCATION FAILED WRITE PROTECT"
            refused.append(index)
    assert acknowledged and refused, (len(acknowledged), len(refused))
    assert len(acknowledged) * CHUNK <= 4 * MiB

    # Everything acknowledged is on stable storage and reads back; writes into blocks
    # that are already allocated still work on the full file system.
    assert synchronize_cache(initiator).status == GOOD
    fua_read = 0x08
    for index in acknowledged:
        result = initiator.read10(index * blocks_per_chunk, blocks_per_chunk)
        assert result.status == GOOD and result.data == chunk_pattern(index), index
        cdb = struct.pack(">BBIBHB", 0x28, fua_read, index * blocks_per_chunk, 0, 1, 0)
        assert initiator.scsi(cdb, read_length=512).data == chunk_pattern(index)[:512]
    first = acknowledged[0]
    assert initiator.write10(first * blocks_per_chunk, chunk_pattern(999)).status == GOOD

    # UNMAP gives space back: the write refused first now fits.
    freed = acknowledged[: len(acknowledged) // 2]
    assert unmap(initiator, *((i * blocks_per_chunk, blocks_per_chunk) for i in freed)).status == GOOD
    retry = refused[0]
    assert initiator.write10(retry * blocks_per_chunk, chunk_pattern(retry)).status == GOOD
    assert initiator.read10(retry * blocks_per_chunk, blocks_per_chunk).data == chunk_pattern(retry)
    for index in acknowledged[len(freed):]:
        assert initiator.read10(index * blocks_per_chunk, blocks_per_chunk).data == \
            chunk_pattern(index)


# --- a removable LUN ---------------------------------------------------------------------------


EJECT = bytes([0x1B, 0, 0, 0, 0x02, 0])
LOAD = bytes([0x1B, 0, 0, 0, 0x03, 0])
PREVENT = bytes([0x1E, 0, 0, 0, 1, 0])


def test_removable_lun_prevention_ends_with_the_connection(make_target):
    target = make_target(lun0_options=("Removable Yes",))
    first = target.session()
    assert first.inquiry(length=36).data[1] & 0x80, "RMB"
    assert first.scsi(PREVENT).status == GOOD
    second = target.session(isid=b"\x80\x00\x00\x00\x00\x02")
    refused = second.scsi(EJECT)
    assert (sense_key(refused.sense), asc_ascq(refused.sense)) == (ILLEGAL_REQUEST, (0x53, 0x02))
    first.close()                                        # nexus loss ends its prevention
    for _ in range(50):
        result = second.scsi(EJECT)
        if result.status == GOOD:
            break
        assert asc_ascq(result.sense) == (0x53, 0x02)    # until the target notices
        time.sleep(0.1)
    assert result.status == GOOD
    gone = second.tur()
    assert (sense_key(gone.sense), asc_ascq(gone.sense)) == (NOT_READY, (0x3A, 0x00))
    assert second.scsi(LOAD).status == GOOD
    assert second.tur().status == GOOD


def test_full_lun_larger_than_its_file_system_refuses_to_start(small_filesystem, make_target):
    from istgt.server import StartupError

    with pytest.raises(StartupError, match=r"LUN0: Provisioning Full: .*disk.img: cannot allocate"):
        make_target(lun0_storage=f"{small_filesystem}/disk.img 16MB",
                    lun0_options=("Provisioning Full",))
    target = make_target(lun0_storage=f"{small_filesystem}/fits.img 2MB",
                         lun0_options=("Provisioning Full",))
    initiator = target.session()
    assert read_capacity_16(initiator)[14] & 0x80 == 0       # LBPME=0
    for lba in range(0, 4096, 128):                          # every block has its space
        assert initiator.write10(lba, bytes([lba % 251]) * CHUNK).status == GOOD
