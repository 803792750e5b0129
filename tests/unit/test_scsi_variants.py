"""Per-LUN variants of a Disk: thin/full provisioning, physical block size, removable medium."""

from __future__ import annotations

import struct

import pytest

from istgt.lu.backends import FileBackend, MemoryBackend
from istgt.scsi.constants import Asc, ScsiStatus, SenseKey
from istgt.scsi.provisioning import ProvisioningError
from istgt.scsi.sbc import DiskDevice
from tests.unit.test_scsi_disk import (
    BLOCKS,
    NEXUS,
    OTHER,
    cdb10,
    cdb16,
    expect_check,
    make_device,
    make_lu,
    make_lun,
    run,
    unmap_cdb,
    unmap_parameters,
)

READ_CAPACITY_16 = [0x9E, 0x10] + [0] * 8 + [0, 0, 0, 32, 0, 0]
REPORT_ALL_OPCODES = [0xA3, 0x0C, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0]
TUR = [0] * 6
PREVENT = [0x1E, 0, 0, 0, 1, 0]
ALLOW = [0x1E, 0, 0, 0, 0, 0]
EJECT = [0x1B, 0, 0, 0, 0x02, 0]
LOAD = [0x1B, 0, 0, 0, 0x03, 0]


def vpd(device, page):
    return bytes(run(device, [0x12, 1, page, 0x01, 0, 0]).data_in)


def supported_opcodes(device):
    data = bytes(run(device, REPORT_ALL_OPCODES).data_in)
    return {data[i] for i in range(4, 4 + struct.unpack(">I", data[:4])[0], 8)}


# --- provisioning -----------------------------------------------------------------------------


def test_thin_is_the_default_where_the_backend_can_deallocate():
    device = make_device()
    assert 0x42 in supported_opcodes(device)
    assert bytes(run(device, READ_CAPACITY_16).data_in)[14] == 0xC0  # LBPME, LBPRZ
    assert vpd(device, 0xB2)[4:8] == bytes([0, 0xE4, 0x02, 0])  # LBPU/WS/WS10/RZ, thin


def test_full_provisioning_hides_every_unmap_path():
    backend = MemoryBackend(BLOCKS * 512)
    device = make_device(backend=backend, lun=make_lun(provisioning="full"))
    assert 0x42 not in supported_opcodes(device)
    expect_check(run(device, unmap_cdb(24), unmap_parameters((0, 1))), SenseKey.ILLEGAL_REQUEST,
                 Asc.INVALID_COMMAND_OPERATION_CODE)
    rc16 = bytes(run(device, READ_CAPACITY_16).data_in)
    assert rc16[14] & 0xC0 == 0  # LBPME=0, LBPRZ=0
    assert vpd(device, 0xB2)[4:8] == bytes(4)  # no LBPU/LBPWS, provisioning type full
    block_limits = vpd(device, 0xB0)
    assert block_limits[20:28] == bytes(8)  # no unmap limits
    for cdb in (cdb10(0x41, 0, 1, flags=0x08), cdb16(0x93, 0, 1, flags=0x08)):
        task = run(device, cdb, bytes(512))
        expect_check(task, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB)
        assert task.sense[15:18] == bytes([0xCB, 0, 1])  # SKSV, C/D, BPV, bit 3; byte 1
    assert backend.unmapped == []
    assert run(device, cdb10(0x41, 0, 1), b"z" * 512).status == ScsiStatus.GOOD  # plain WRITE SAME


def test_thin_on_a_backend_that_cannot_deallocate_is_refused():
    backend = MemoryBackend(BLOCKS * 512, supports_unmap=False)
    with pytest.raises(ProvisioningError, match="Provisioning Thin"):
        DiskDevice(make_lu(), make_lun(provisioning="thin"), backend)


def test_lbprz_follows_what_the_backend_promises():
    backend = MemoryBackend(BLOCKS * 512)
    backend.unmap_zeroes = False          # a block device whose discards leave old data
    device = make_device(backend=backend)
    assert bytes(run(device, READ_CAPACITY_16).data_in)[14] == 0x80  # LBPME only
    assert vpd(device, 0xB2)[5] == 0xE0


@pytest.mark.parametrize(("block_length", "physical", "exponent"),
                         [(512, 4096, 3), (512, 512, 0), (4096, 16384, 2), (512, 65536, 7)])
def test_physical_block_size_sets_exponent_and_granularities(block_length, physical, exponent):
    device = make_device(block_length=block_length,
                         lun=make_lun(physical_block_size=physical))
    rc16 = bytes(run(device, READ_CAPACITY_16).data_in)
    assert rc16[13] == exponent and rc16[15] == 0  # lowest aligned LBA 0
    limits = vpd(device, 0xB0)
    granularity = max(4096, physical) // block_length
    assert struct.unpack(">H", limits[6:8])[0] == granularity      # optimal transfer granularity
    assert struct.unpack(">I", limits[28:32])[0] == granularity    # optimal unmap granularity
    assert struct.unpack(">I", limits[32:36])[0] == 0x80000000     # UGAVALID, alignment 0
    if exponent:
        assert granularity == 1 << exponent


def test_unaligned_write_same_unmap_succeeds_and_reads_zeros():
    backend = MemoryBackend(BLOCKS * 512)
    device = make_device(backend=backend, lun=make_lun(physical_block_size=4096))
    run(device, cdb10(0x2A, 0, 8), b"q" * 8 * 512)
    for lba in range(1, 8):
        assert run(device, cdb10(0x41, lba, 8 - lba, flags=0x08), b"\xa6" * 512).status == ScsiStatus.GOOD
    assert bytes(run(device, cdb10(0x28, 0, 8)).data_in) == b"q" * 512 + bytes(7 * 512)


def test_unknown_physical_block_size_is_refused_by_the_device():
    with pytest.raises(ProvisioningError):
        DiskDevice(make_lu(), make_lun(physical_block_size=1536), MemoryBackend(BLOCKS * 512))


# --- removable medium -------------------------------------------------------------------------


def removable():
    return make_device(lun=make_lun(removable_disk=True))


def test_rmb_bit_only_on_a_removable_lun():
    assert bytes(run(removable(), [0x12, 0, 0, 0, 36, 0]).data_in)[1] == 0x80
    assert bytes(run(make_device(), [0x12, 0, 0, 0, 36, 0]).data_in)[1] == 0


def test_eject_makes_media_commands_not_ready_until_load():
    device = removable()
    assert run(device, EJECT).status == ScsiStatus.GOOD
    for cdb in (TUR, cdb10(0x28, 0, 1), [0x25] + [0] * 9, READ_CAPACITY_16):
        expect_check(run(device, cdb), SenseKey.NOT_READY, Asc.MEDIUM_NOT_PRESENT)
    expect_check(run(device, cdb10(0x2A, 0, 1), bytes(512)), SenseKey.NOT_READY,
                 Asc.MEDIUM_NOT_PRESENT)
    sense = bytes(run(device, [0x03, 0, 0, 0, 18, 0]).data_in)
    assert (sense[2] & 0x0F, sense[12], sense[13]) == (SenseKey.NOT_READY, 0x3A, 0x00)
    assert run(device, [0x12, 0, 0, 0, 36, 0]).status == ScsiStatus.GOOD
    assert run(device, EJECT).status == ScsiStatus.GOOD     # ejecting nothing is fine
    assert run(device, LOAD).status == ScsiStatus.GOOD
    assert run(device, TUR).status == ScsiStatus.GOOD


def test_prevention_refuses_eject_and_load_from_every_nexus():
    device = removable()
    run(device, TUR, nexus=OTHER)                            # OTHER's power-on attention
    assert run(device, PREVENT).status == ScsiStatus.GOOD
    for nexus in (NEXUS, OTHER):
        expect_check(run(device, EJECT, nexus=nexus), SenseKey.ILLEGAL_REQUEST,
                     Asc.MEDIUM_REMOVAL_PREVENTED)
    assert run(device, TUR).status == ScsiStatus.GOOD
    assert run(device, ALLOW, nexus=OTHER).status == ScsiStatus.GOOD  # only its own prevention
    expect_check(run(device, EJECT), SenseKey.ILLEGAL_REQUEST, Asc.MEDIUM_REMOVAL_PREVENTED)
    assert run(device, ALLOW).status == ScsiStatus.GOOD
    assert run(device, EJECT).status == ScsiStatus.GOOD
    assert run(device, PREVENT).status == ScsiStatus.GOOD   # allowed without medium
    expect_check(run(device, LOAD), SenseKey.ILLEGAL_REQUEST, Asc.MEDIUM_REMOVAL_PREVENTED)
    run(device, ALLOW)
    assert run(device, LOAD).status == ScsiStatus.GOOD


@pytest.mark.parametrize("end", ["nexus_lost", "lun", "warm", "cold"])
def test_prevention_ends_with_the_nexus_and_with_resets(end):
    device = removable()
    run(device, PREVENT)
    if end == "nexus_lost":
        device.nexus_lost(NEXUS)
    else:
        device.reset(end)
    for _ in range(2):                                       # the reset's unit attention
        if run(device, TUR).status == ScsiStatus.GOOD:
            break
    assert run(device, EJECT).status == ScsiStatus.GOOD
    expect_check(run(device, TUR), SenseKey.NOT_READY, Asc.MEDIUM_NOT_PRESENT)


def test_removable_lun_without_loej_stays_ready():
    device = removable()
    for immediate_no_flush_start in ([0, 0], [1, 0x04], [0, 0x01], [1, 0x05]):
        immediate, flags = immediate_no_flush_start
        assert run(device, [0x1B, immediate, 0, 0, flags, 0]).status == ScsiStatus.GOOD
        assert run(device, TUR).status == ScsiStatus.GOOD


def test_power_condition_ignores_load_eject():
    device = removable()
    for condition in range(1, 16):
        assert run(device, [0x1B, 1, 0, 0, condition << 4 | 0x02, 0]).status == ScsiStatus.GOOD
        assert run(device, TUR).status == ScsiStatus.GOOD


def test_fixed_disk_ignores_load_eject_and_prevention():
    device = make_device()
    run(device, PREVENT)
    assert run(device, EJECT).status == ScsiStatus.GOOD      # a stop, nothing to eject
    expect_check(run(device, TUR), SenseKey.NOT_READY,
                 Asc.LOGICAL_UNIT_NOT_READY_INITIALIZING_COMMAND_REQUIRED)
    assert run(device, LOAD).status == ScsiStatus.GOOD
    assert run(device, TUR).status == ScsiStatus.GOOD


# --- full backing store -------------------------------------------------------------------------


class SpaceLimitedBackend(MemoryBackend):
    """Refuses writes once `budget` bytes have been written, like a full file system."""

    def __init__(self, size, budget):
        super().__init__(size)
        self.budget = budget

    def write(self, offset, data):
        import errno

        if len(memoryview(data).cast("B")) > self.budget:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.budget -= len(memoryview(data).cast("B"))
        super().write(offset, data)


@pytest.mark.parametrize("cdb", [cdb10(0x2A, 4, 2), cdb16(0x8A, 4, 2), cdb10(0x2E, 4, 2)])
def test_out_of_space_is_data_protect_space_allocation_failed(cdb):
    backend = SpaceLimitedBackend(BLOCKS * 512, budget=1024)
    device = make_device(backend=backend)
    assert run(device, cdb10(0x2A, 0, 2), b"k" * 1024).status == ScsiStatus.GOOD
    task = run(device, cdb, b"n" * 1024)
    expect_check(task, SenseKey.DATA_PROTECT, Asc.SPACE_ALLOCATION_FAILED_WRITE_PROTECT)
    assert task.sense[3:7] == struct.pack(">I", 4)          # INFORMATION: the failing LBA
    assert bytes(run(device, cdb10(0x28, 0, 2)).data_in) == b"k" * 1024


def test_full_provisioning_preallocates_the_file(tmp_path):
    path = tmp_path / "full.img"
    backend = FileBackend.open(str(path), 1 << 20, read_only=False)
    assert path.stat().st_blocks == 0
    backend.preallocate()
    assert path.stat().st_blocks * 512 >= 1 << 20
    assert path.stat().st_size == 1 << 20
    backend.close()


# --- start-up ---------------------------------------------------------------------------------


def lu_config(tmp_path, *options):
    from istgt.config import load_config

    conf = tmp_path / "istgt.conf"
    conf.write_text(
        "[Global]\n[UnitControl]\n[PortalGroup1]\n  Portal DA1 127.0.0.1:3260\n"
        "[InitiatorGroup1]\n  InitiatorName ALL\n[LogicalUnit1]\n  TargetName disk1\n"
        "  Mapping PortalGroup1 InitiatorGroup1\n  UnitType Disk\n"
        f"  LUN0 Storage {tmp_path}/lun0.img 1MB\n  LUN1 Storage {tmp_path}/lun1.img 1MB\n"
        + "".join(f"  {line}\n" for line in options))
    return load_config(conf).logical_units[1]


def test_thin_lun_on_a_store_that_cannot_deallocate_stops_start_up(tmp_path, monkeypatch):
    from istgt.lu import backends
    from istgt.server import StartupError, build_logical_unit

    monkeypatch.setattr(backends, "_can_punch_holes", lambda fd: False)
    config = lu_config(tmp_path, "LUN1 Option Provisioning Thin")
    with pytest.raises(StartupError, match=r"LU1 \(.*disk1\) LUN1: Provisioning Thin: .*lun1.img "
                                           "cannot deallocate"):
        build_logical_unit(config, 4)
    unit = build_logical_unit(lu_config(tmp_path), 4)   # the default just falls back to full
    try:
        assert [unit.devices[n].thin for n in (0, 1)] == [False, False]
    finally:
        unit.shutdown()


def test_configured_variants_reach_the_device(tmp_path):
    from istgt.server import build_logical_unit

    unit = build_logical_unit(lu_config(
        tmp_path, "LUN0 Option Provisioning Full", "LUN1 Option PhysicalBlockSize 4096",
        "LUN1 Option Removable Yes"), 4)
    try:
        full, thin = unit.devices[0], unit.devices[1]
        assert (full.thin, full.removable) == (False, False)
        assert (tmp_path / "lun0.img").stat().st_blocks * 512 >= 1 << 20   # preallocated
        assert (thin.thin, thin.removable, thin.provisioning.blocks_per_physical_exponent) == (
            True, True, 3)
    finally:
        unit.shutdown()


def test_hole_punch_probe_leaves_a_longer_file_untouched(tmp_path):
    path = tmp_path / "longer.img"
    path.write_bytes(b"t" * 10000)                     # longer than the LU, not page aligned
    backend = FileBackend.open(str(path), 4096, read_only=False)
    try:
        assert backend.supports_unmap and backend.unmap_zeroes and not backend.block_device
        assert path.read_bytes() == b"t" * 10000
    finally:
        backend.close()
