"""DiskDevice (SBC) byte vectors: status, sense and data layout per opcode."""

from __future__ import annotations

import struct
from types import SimpleNamespace

import pytest

from istgt.lu.backends import MemoryBackend
from istgt.scsi.command import ITNexus, ScsiTask
from istgt.scsi.constants import Asc, ResetKind, ScsiStatus, SenseKey
from istgt.scsi.sbc import DiskDevice

TARGET = "iqn.2007-09.jp.ne.peach.istgt:disk1"
NEXUS = ITNexus("iqn.1994-05.com.example:host,i,0x00023d000001", f"{TARGET},t,0x0001", 1)
OTHER = ITNexus("iqn.1994-05.com.example:other,i,0x00023d000002", f"{TARGET},t,0x0001", 1)
BLOCKS = 2048


def make_lu(**overrides):
    values = {
        "number": 1,
        "name": TARGET,
        "inquiry": SimpleNamespace(
            vendor="FreeBSD", product="iSCSI DISK", revision="0001", serial="10000001"
        ),
        "block_length": 512,
        "read_only": False,
        "online": True,
        "queue_depth": 32,
        "luns": {0: None},
    }
    values.update(overrides)
    return SimpleNamespace(**values)


def make_lun(**overrides):
    values = {
        "number": 0, "serial": None, "rpm": 7200, "form_factor": 2, "read_cache": True, "write_cache": True
    }
    values.update(overrides)
    return SimpleNamespace(**values)


def make_device(blocks=BLOCKS, block_length=512, lu=None, lun=None, backend=None):
    backend = backend or MemoryBackend(blocks * block_length)
    device = DiskDevice(lu or make_lu(block_length=block_length), lun or make_lun(), backend)
    # Consume the power-on unit attention of the default nexus.
    run(device, [0x00] + [0] * 5)
    return device


def run(device, cdb, data=None, nexus=NEXUS, edtl=None):
    task = ScsiTask(
        0,
        bytes(cdb),
        nexus,
        data_out=data,
        transfer_length=edtl if edtl is not None else len(data or b""),
    )
    device.execute(task)
    return task


def sense_of(task):
    """(key, asc<<8|ascq) from fixed or descriptor sense."""
    sense = task.sense
    if sense[0] & 0x7F in (0x70, 0x71):
        return sense[2] & 0x0F, sense[12] << 8 | sense[13]
    return sense[1] & 0x0F, sense[2] << 8 | sense[3]


def expect_check(task, key, asc):
    assert task.status == ScsiStatus.CHECK_CONDITION
    assert task.sense, "every CHECK CONDITION carries sense"
    assert sense_of(task) == (key, asc)


def cdb10(opcode, lba, blocks, flags=0):
    return struct.pack(">BBIBHB", opcode, flags, lba, 0, blocks, 0)


def cdb12(opcode, lba, blocks, flags=0):
    return struct.pack(">BBIIBB", opcode, flags, lba, blocks, 0, 0)


def cdb16(opcode, lba, blocks, flags=0):
    return struct.pack(">BBQIBB", opcode, flags, lba, blocks, 0, 0)


def cdb6(opcode, lba, blocks):
    return bytes([opcode, (lba >> 16) & 0x1F, (lba >> 8) & 0xFF, lba & 0xFF, blocks, 0])


# --- unit attentions -----------------------------------------------------------------------


def test_new_nexus_sees_power_on_once():
    device = make_device()
    first = run(device, [0, 0, 0, 0, 0, 0], nexus=OTHER)
    expect_check(first, SenseKey.UNIT_ATTENTION, Asc.POWER_ON_RESET_OR_BUS_DEVICE_RESET)
    assert run(device, [0, 0, 0, 0, 0, 0], nexus=OTHER).status == ScsiStatus.GOOD


def test_inquiry_does_not_consume_unit_attention():
    device = make_device()
    assert run(device, [0x12, 0, 0, 0, 96, 0], nexus=OTHER).status == ScsiStatus.GOOD
    assert run(device, [0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0], nexus=OTHER).status == 0
    tur = run(device, [0, 0, 0, 0, 0, 0], nexus=OTHER)
    expect_check(tur, SenseKey.UNIT_ATTENTION, Asc.POWER_ON_RESET_OR_BUS_DEVICE_RESET)


def test_request_sense_reports_and_clears_unit_attention():
    device = make_device()
    task = run(device, [0x03, 0, 0, 0, 252, 0], nexus=OTHER)
    assert task.status == ScsiStatus.GOOD
    data = bytes(task.data_in)
    assert data[0] == 0x70 and data[2] == SenseKey.UNIT_ATTENTION and data[12:14] == b"\x29\x00"
    assert run(device, [0, 0, 0, 0, 0, 0], nexus=OTHER).status == ScsiStatus.GOOD
    again = bytes(run(device, [0x03, 0, 0, 0, 252, 0], nexus=OTHER).data_in)
    assert again[2] == SenseKey.NO_SENSE and again[12] == 0


def test_request_sense_descriptor_format():
    device = make_device()
    data = bytes(run(device, [0x03, 0x01, 0, 0, 252, 0]).data_in)
    assert data[0] == 0x72 and data[1] == 0 and data[7] == 0


def test_reset_raises_unit_attention_for_every_nexus():
    device = make_device()
    run(device, [0, 0, 0, 0, 0, 0], nexus=OTHER)  # consume power-on
    device.reset(ResetKind.LOGICAL_UNIT)
    for nexus in (NEXUS, OTHER):
        task = run(device, [0, 0, 0, 0, 0, 0], nexus=nexus)
        expect_check(task, SenseKey.UNIT_ATTENTION, Asc.BUS_DEVICE_RESET_FUNCTION_OCCURRED)
        assert run(device, [0, 0, 0, 0, 0, 0], nexus=nexus).status == ScsiStatus.GOOD


def test_nexus_lost_forgets_state():
    device = make_device()
    device.nexus_lost(NEXUS)
    task = run(device, [0, 0, 0, 0, 0, 0])
    expect_check(task, SenseKey.UNIT_ATTENTION, Asc.POWER_ON_RESET_OR_BUS_DEVICE_RESET)


# --- unknown opcodes, reserved bits, control byte ------------------------------------------


def test_unknown_opcode_is_invalid_command_operation_code():
    expect_check(
        run(make_device(), [0xC7] + [0] * 15),
        SenseKey.ILLEGAL_REQUEST,
        Asc.INVALID_COMMAND_OPERATION_CODE,
    )


def test_empty_cdb_is_rejected_not_crashing():
    task = run(make_device(), b"")
    expect_check(task, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_COMMAND_OPERATION_CODE)


def test_reserved_bit_points_at_byte_and_bit():
    task = run(make_device(), cdb10(0x28, 0, 1, flags=0x20))  # RDPROTECT=1
    expect_check(task, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB)
    assert task.sense[15] == 0x80 | 0x40 | 0x08 | 5  # SKSV, C/D, BPV, bit 5
    assert task.sense[16:18] == b"\x00\x01"


def test_naca_bit_is_rejected():
    cdb = bytearray(cdb10(0x28, 0, 1))
    cdb[9] = 0x04
    task = run(make_device(), cdb)
    expect_check(task, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB)
    assert task.sense[16:18] == b"\x00\x09"


def test_vendor_bits_of_control_byte_are_ignored():
    cdb = bytearray(cdb10(0x28, 0, 1))
    cdb[9] = 0xC0
    assert run(make_device(), cdb).status == ScsiStatus.GOOD


def test_unsupported_service_action_is_invalid_field():
    task = run(make_device(), [0x9E, 0x1F] + [0] * 14)
    expect_check(task, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB)


# --- READ / WRITE ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [6, 10, 12, 16])
def test_write_then_read_round_trip(size):
    device = make_device()
    payload = bytes(range(256)) * 4  # 2 blocks
    build = {6: lambda o, l, b: cdb6(o, l, b), 10: cdb10, 12: cdb12, 16: cdb16}[size]
    write_op = {6: 0x0A, 10: 0x2A, 12: 0xAA, 16: 0x8A}[size]
    read_op = {6: 0x08, 10: 0x28, 12: 0xA8, 16: 0x88}[size]
    assert run(device, build(write_op, BLOCKS - 2, 2), payload).status == ScsiStatus.GOOD
    task = run(device, build(read_op, BLOCKS - 2, 2))
    assert task.status == ScsiStatus.GOOD and bytes(task.data_in) == payload


@pytest.mark.parametrize(
    "cdb",
    [
        cdb10(0x28, BLOCKS - 1, 2),
        cdb10(0x28, BLOCKS, 1),
        cdb10(0x28, BLOCKS + 1, 0),
        cdb10(0x28, 0xFFFFFFFF, 1),
        cdb12(0xA8, BLOCKS - 1, 2),
        cdb16(0x88, 0xFFFFFFFFFFFFFFFF, 1),
        cdb16(0x88, 0xFFFFFFFFFFFFFFFF, 0),
        cdb16(0x88, 1, 0xFFFFFFFF),
        cdb6(0x08, BLOCKS, 1),
        cdb16(0x8A, 0x8000000000000000, 1),
    ],
)
def test_lba_out_of_range_with_64_bit_edges(cdb):
    expect_check(run(make_device(), cdb, bytes(512)), SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE)


def test_transfer_length_zero_is_no_data():
    device = make_device()
    for cdb in (cdb10(0x28, 0, 0), cdb10(0x28, BLOCKS, 0), cdb16(0x8A, 0, 0)):
        task = run(device, cdb)
        assert task.status == ScsiStatus.GOOD and not task.data_in


def test_read6_zero_length_means_256_blocks():
    task = run(make_device(), cdb6(0x08, 0, 0))
    assert task.status == ScsiStatus.GOOD and len(task.data_in) == 256 * 512


def test_read6_uses_all_21_lba_bits():
    device = make_device(blocks=0x110000)
    data = b"\x5a" * 512
    assert run(device, cdb16(0x8A, 0x10FFFF, 1), data).status == 0
    assert bytes(run(device, cdb6(0x08, 0x10FFFF, 1)).data_in) == data


def test_short_data_out_writes_only_whole_blocks_that_arrived():
    device = make_device()
    run(device, cdb10(0x2A, 0, 2), b"a" * 1024)
    task = run(device, cdb10(0x2A, 0, 2), b"b" * 700)  # EDTL shorter than the CDB asks
    assert task.status == ScsiStatus.GOOD and task.data_out_length == 1024
    assert bytes(run(device, cdb10(0x28, 0, 2)).data_in) == b"b" * 512 + b"a" * 512


def test_write_without_data_out_writes_nothing():
    device = make_device()
    run(device, cdb10(0x2A, 0, 1), b"a" * 512)
    assert run(device, cdb10(0x2A, 0, 1)).status == ScsiStatus.GOOD
    assert bytes(run(device, cdb10(0x28, 0, 1)).data_in) == b"a" * 512


def test_longer_data_out_writes_only_what_the_cdb_asks():
    device = make_device()
    task = run(device, cdb10(0x2A, 0, 1), b"\x11" * 1024)
    assert task.status == ScsiStatus.GOOD and task.data_out_length == 512
    assert bytes(run(device, cdb10(0x28, 1, 1)).data_in) == bytes(512)


def test_read_only_lu_answers_writes_with_data_protect():
    device = make_device(lu=make_lu(read_only=True))
    for cdb in (cdb10(0x2A, 0, 1), cdb16(0x8A, 0, 1), cdb10(0x2E, 0, 1), cdb16(0x8B, 0, 1),
                cdb10(0x41, 0, 1), cdb16(0x93, 0, 1, flags=0x08)):
        expect_check(run(device, cdb, bytes(512)), SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED)
    caw = bytes([0x89, 0] + [0] * 11 + [1, 0, 0])
    expect_check(run(device, caw, bytes(1024)), SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED)
    assert run(device, cdb10(0x28, 0, 1)).status == ScsiStatus.GOOD


# --- durability --------------------------------------------------------------------------


def test_fua_write_is_flushed_before_good():
    backend = MemoryBackend(BLOCKS * 512)
    device = make_device(backend=backend)
    before = backend.flush_count
    assert run(device, cdb10(0x2A, 0, 1, flags=0x08), bytes(512)).status == ScsiStatus.GOOD
    assert backend.durable_writes == 1 and backend.flush_count == before + 1
    run(device, cdb10(0x2A, 0, 1), bytes(512))
    assert backend.durable_writes == 1  # WCE=1 and no FUA: write-back


def test_write_cache_disabled_makes_every_write_durable():
    backend = MemoryBackend(BLOCKS * 512)
    device = make_device(backend=backend, lun=make_lun(write_cache=False))
    run(device, cdb10(0x2A, 0, 1), bytes(512))
    run(device, cdb6(0x0A, 0, 1), bytes(512))
    assert backend.durable_writes == 2


def test_quick_is_only_reads_and_cached_writes_that_wait_for_no_flush():
    device = make_device()
    assert device.quick(bytes(cdb10(0x28, 0, 8))) and device.quick(bytes(cdb6(0x08, 0, 8)))
    assert device.quick(bytes(cdb10(0x2A, 0, 8))) and device.quick(bytes(cdb6(0x0A, 0, 8)))
    assert device.quick(bytes([0x88] + [0] * 15)) and device.quick(bytes([0x8A] + [0] * 15))
    assert not device.quick(bytes(cdb10(0x28, 0, 8, flags=0x08)))     # READ with FUA
    assert not device.quick(bytes(cdb10(0x2A, 0, 8, flags=0x08)))     # WRITE with FUA
    for opcode in (0x35, 0x42, 0x89, 0x93, 0x2F, 0x00, 0x12):
        # SYNCHRONIZE CACHE, UNMAP, COMPARE AND WRITE, WRITE SAME, VERIFY, TUR, INQUIRY
        assert not device.quick(bytes([opcode] + [0] * 15)), hex(opcode)
    assert not device.quick(b"") and not device.quick(b"\x28")
    uncached = make_device(lun=make_lun(write_cache=False, read_cache=False))
    assert not uncached.quick(bytes(cdb10(0x2A, 0, 8)))    # WCE=0: every write is flushed
    assert not uncached.quick(bytes(cdb10(0x28, 0, 8)))    # RCD=1: reads go to the medium


def test_synchronize_cache_flushes_and_checks_range():
    backend = MemoryBackend(BLOCKS * 512)
    device = make_device(backend=backend)
    before = backend.flush_count
    assert run(device, cdb10(0x35, 0, 0)).status == ScsiStatus.GOOD
    assert run(device, cdb16(0x91, 0, BLOCKS, flags=0x02)).status == ScsiStatus.GOOD
    assert backend.flush_count == before + 2
    expect_check(run(device, cdb10(0x35, BLOCKS, 1)), SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE)


class FailingBackend(MemoryBackend):
    def __init__(self, size, error):
        super().__init__(size)
        self.error = error

    def write(self, offset, data):
        raise OSError(self.error, "injected")

    def read(self, offset, length):
        raise OSError(self.error, "injected")


def test_io_errors_become_medium_errors_and_enospc_data_protect():
    import errno

    device = make_device(backend=FailingBackend(BLOCKS * 512, errno.EIO))
    expect_check(run(device, cdb10(0x2A, 3, 1), bytes(512)), SenseKey.MEDIUM_ERROR, Asc.WRITE_ERROR)
    task = run(device, cdb10(0x28, 3, 1))
    expect_check(task, SenseKey.MEDIUM_ERROR, Asc.UNRECOVERED_READ_ERROR)
    assert task.sense[0] & 0x80 and task.sense[3:7] == b"\x00\x00\x00\x03"  # INFORMATION = LBA
    full = make_device(backend=FailingBackend(BLOCKS * 512, errno.ENOSPC))
    expect_check(
        run(full, cdb10(0x2A, 0, 1), bytes(512)),
        SenseKey.DATA_PROTECT,
        Asc.SPACE_ALLOCATION_FAILED_WRITE_PROTECT,
    )


def test_unexpected_exception_becomes_internal_target_failure():
    class Broken(MemoryBackend):
        def read(self, offset, length):
            raise RuntimeError("bug")

    device = make_device(backend=Broken(BLOCKS * 512))
    expect_check(run(device, cdb10(0x28, 0, 1)), SenseKey.HARDWARE_ERROR, Asc.INTERNAL_TARGET_FAILURE)


# --- capacity, LBA status --------------------------------------------------------------------


def test_read_capacity_10_and_16():
    device = make_device(block_length=4096, blocks=1000)
    task = run(device, [0x25] + [0] * 9)
    assert bytes(task.data_in) == struct.pack(">II", 999, 4096)
    task = run(device, [0x9E, 0x10] + [0] * 8 + [0, 0, 0, 32, 0, 0])
    data = bytes(task.data_in)
    assert len(data) == 32 and data[:12] == struct.pack(">QI", 999, 4096)
    assert data[12:16] == bytes([0, 0, 0xC0, 0])  # no PI, 1 block per physical, LBPME+LBPRZ
    assert data[16:] == bytes(16)


def test_read_capacity_16_reports_full_provisioning():
    device = make_device(backend=MemoryBackend(BLOCKS * 512, supports_unmap=False))
    data = bytes(run(device, [0x9E, 0x10] + [0] * 8 + [0, 0, 0, 32, 0, 0]).data_in)
    assert data[13] == 0 and data[14] == 0


def test_read_capacity_10_saturates_past_2_tib():
    device = DiskDevice(make_lu(), make_lun(), MemoryBackendStub((1 << 32) + 10))
    run(device, [0] * 6)
    assert bytes(run(device, [0x25] + [0] * 9).data_in)[:4] == b"\xff\xff\xff\xff"
    rc16 = bytes(run(device, [0x9E, 0x10] + [0] * 8 + [0, 0, 0, 32, 0, 0]).data_in)
    assert struct.unpack(">Q", rc16[:8])[0] == (1 << 32) + 9


class MemoryBackendStub:
    """A huge device that is never read: only its size matters."""

    read_only = False

    def __init__(self, blocks):
        self.size = blocks * 512

    def flush(self):
        pass


def test_read_capacity_16_allocation_length_truncates():
    device = make_device()
    for length in range(16):
        task = run(device, [0x9E, 0x10] + [0] * 8 + [0, 0, 0, length, 0, 0])
        assert task.status == ScsiStatus.GOOD and len(task.data_in) == length


def test_read_capacity_10_lba_without_pmi_is_invalid():
    task = run(make_device(), [0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0])
    expect_check(task, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB)


def test_get_lba_status_reports_mapped():
    device = make_device()
    task = run(device, [0x9E, 0x12] + list(struct.pack(">Q", 5)) + [0, 0, 0, 24, 0, 0])
    data = bytes(task.data_in)
    assert data[:4] == struct.pack(">I", 20)
    assert data[8:24] == struct.pack(">QIB3x", 5, BLOCKS - 5, 0)
    beyond = run(device, [0x9E, 0x12] + list(struct.pack(">Q", BLOCKS)) + [0, 0, 0, 24, 0, 0])
    expect_check(beyond, SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE)


# --- VERIFY, WRITE AND VERIFY, ORWRITE, COMPARE AND WRITE, WRITE SAME ------------------------


def test_verify_bytchk_compares_and_reports_offset():
    device = make_device()
    run(device, cdb10(0x2A, 4, 2), b"\x33" * 1024)
    assert run(device, cdb10(0x2F, 4, 2, flags=0x02), b"\x33" * 1024).status == 0
    data = bytearray(b"\x33" * 1024)
    data[700] = 0
    task = run(device, cdb16(0x8F, 4, 2, flags=0x02), data)
    expect_check(task, SenseKey.MISCOMPARE, Asc.MISCOMPARE_DURING_VERIFY)
    assert task.sense[3:7] == struct.pack(">I", 700)
    assert run(device, cdb12(0xAF, 4, 2), data).status == ScsiStatus.GOOD  # BYTCHK=0
    assert run(device, cdb10(0x2F, 4, 2, flags=0x06), b"\x33" * 512).status == 0  # BYTCHK=11b
    expect_check(run(device, cdb10(0x2F, 4, 2, flags=0x04)), SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB)


def test_write_and_verify_writes_durably():
    backend = MemoryBackend(BLOCKS * 512)
    device = make_device(backend=backend)
    assert run(device, cdb10(0x2E, 1, 1, flags=0x02), b"\x44" * 512).status == 0
    assert backend.durable_writes == 1
    assert bytes(run(device, cdb10(0x28, 1, 1)).data_in) == b"\x44" * 512


def test_orwrite_ors_into_the_medium():
    device = make_device()
    run(device, cdb10(0x2A, 0, 1), b"\xa0" * 512)
    assert run(device, cdb16(0x8B, 0, 1), b"\x05" * 512).status == 0
    assert bytes(run(device, cdb10(0x28, 0, 1)).data_in) == b"\xa5" * 512


def caw(lba, blocks):
    return bytes([0x89, 0]) + struct.pack(">Q", lba) + bytes([0, 0, 0, blocks, 0, 0])


def test_compare_and_write_success_and_miscompare():
    device = make_device()
    run(device, cdb10(0x2A, 2, 1), b"A" * 512)
    assert run(device, caw(2, 1), b"A" * 512 + b"B" * 512).status == ScsiStatus.GOOD
    assert bytes(run(device, cdb10(0x28, 2, 1)).data_in) == b"B" * 512
    expected = bytearray(b"B" * 512)
    expected[485] = ord("C")
    task = run(device, caw(2, 1), bytes(expected) + b"D" * 512)
    expect_check(task, SenseKey.MISCOMPARE, Asc.MISCOMPARE_DURING_VERIFY)
    assert task.sense[3:7] == struct.pack(">I", 485)
    assert bytes(run(device, cdb10(0x28, 2, 1)).data_in) == b"B" * 512
    expect_check(run(device, caw(0, 1), bytes(512 * 3)), SenseKey.ILLEGAL_REQUEST,
                 Asc.INVALID_FIELD_IN_INFORMATION_UNIT)


def test_write_same_replicates_one_block():
    device = make_device()
    block = bytes(range(256)) * 2
    assert run(device, cdb10(0x41, 10, 3), block).status == ScsiStatus.GOOD
    assert bytes(run(device, cdb10(0x28, 10, 3)).data_in) == block * 3
    assert run(device, cdb16(0x93, 0, 0), block).status == ScsiStatus.GOOD  # to end
    assert bytes(run(device, cdb10(0x28, BLOCKS - 1, 1)).data_in) == block
    expect_check(run(device, cdb10(0x41, 0, 1), block * 2), SenseKey.ILLEGAL_REQUEST,
                 Asc.INVALID_FIELD_IN_INFORMATION_UNIT)
    expect_check(run(device, cdb10(0x41, 0, 1, flags=0x10), block), SenseKey.ILLEGAL_REQUEST,
                 Asc.INVALID_FIELD_IN_CDB)
    expect_check(run(device, cdb10(0x41, BLOCKS + 1, 0), block), SenseKey.ILLEGAL_REQUEST,
                 Asc.LBA_OUT_OF_RANGE)


def test_write_same_ndob_writes_zeroes():
    device = make_device()
    run(device, cdb10(0x2A, 0, 1), b"\xff" * 512)
    assert run(device, cdb16(0x93, 0, 1, flags=0x01)).status == ScsiStatus.GOOD
    assert bytes(run(device, cdb10(0x28, 0, 1)).data_in) == bytes(512)


def test_pre_fetch_checks_range():
    device = make_device()
    assert run(device, cdb10(0x34, 0, 1, flags=0x02)).status == ScsiStatus.GOOD
    assert run(device, cdb16(0x90, BLOCKS - 1, 1)).status == ScsiStatus.GOOD
    expect_check(run(device, cdb16(0x90, BLOCKS, 1)), SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE)


# --- START STOP UNIT, PREVENT ALLOW -----------------------------------------------------------


def test_stopped_unit_is_not_ready_until_started():
    device = make_device()
    assert run(device, [0x1B, 0, 0, 0, 0x00, 0]).status == ScsiStatus.GOOD
    expect_check(run(device, [0] * 6), SenseKey.NOT_READY,
                 Asc.LOGICAL_UNIT_NOT_READY_INITIALIZING_COMMAND_REQUIRED)
    assert run(device, [0x12, 0, 0, 0, 36, 0]).status == ScsiStatus.GOOD
    assert run(device, [0x1B, 1, 0, 0, 0x01, 0]).status == ScsiStatus.GOOD
    assert run(device, [0] * 6).status == ScsiStatus.GOOD


def test_power_condition_does_not_stop():
    device = make_device()
    assert run(device, [0x1B, 0, 0, 0, 0x30, 0]).status == ScsiStatus.GOOD
    assert run(device, [0] * 6).status == ScsiStatus.GOOD


def test_prevent_allow_accepted():
    device = make_device()
    assert run(device, [0x1E, 0, 0, 0, 1, 0]).status == ScsiStatus.GOOD
    assert run(device, [0x1E, 0, 0, 0, 0, 0]).status == ScsiStatus.GOOD
    expect_check(run(device, [0x1E, 0, 0, 0, 4, 0]), SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB)


def test_offline_unit_is_not_ready_but_answers_inquiry():
    device = make_device(lu=make_lu(online=False))
    assert run(device, [0x12, 0, 0, 0, 36, 0]).status == ScsiStatus.GOOD
    expect_check(run(device, cdb10(0x28, 0, 1)), SenseKey.NOT_READY,
                 Asc.LOGICAL_UNIT_NOT_READY_MANUAL_INTERVENTION_REQUIRED)


# --- thin provisioning ------------------------------------------------------------------------


def unmap_cdb(length):
    return bytes([0x42, 0, 0, 0, 0, 0, 0, length >> 8, length & 0xFF, 0])


def unmap_parameters(*ranges):
    body = b"".join(struct.pack(">QI4x", lba, count) for lba, count in ranges)
    return struct.pack(">HH4x", len(body) + 6, len(body)) + body


def test_unmap_deallocates_ranges_and_reads_zeros():
    backend = MemoryBackend(BLOCKS * 512)
    device = make_device(backend=backend)
    run(device, cdb10(0x2A, 0, 4), b"a" * 2048)
    parameters = unmap_parameters((1, 2), (BLOCKS - 1, 1), (5, 0))
    assert run(device, unmap_cdb(len(parameters)), parameters).status == ScsiStatus.GOOD
    assert backend.unmapped == [(512, 1024), ((BLOCKS - 1) * 512, 512)]
    assert bytes(run(device, cdb10(0x28, 0, 4)).data_in) == b"a" * 512 + bytes(1024) + b"a" * 512


def test_unmap_errors():
    device = make_device()
    beyond = unmap_parameters((BLOCKS - 1, 2))
    expect_check(run(device, unmap_cdb(len(beyond)), beyond), SenseKey.ILLEGAL_REQUEST,
                 Asc.LBA_OUT_OF_RANGE)
    expect_check(run(device, unmap_cdb(4), bytes(4)), SenseKey.ILLEGAL_REQUEST,
                 Asc.PARAMETER_LIST_LENGTH_ERROR)
    assert run(device, unmap_cdb(0)).status == ScsiStatus.GOOD
    assert run(device, unmap_cdb(8), unmap_parameters()).status == ScsiStatus.GOOD
    anchor = bytearray(unmap_cdb(8))
    anchor[1] = 0x01
    expect_check(run(device, anchor, unmap_parameters()), SenseKey.ILLEGAL_REQUEST,
                 Asc.INVALID_FIELD_IN_CDB)
    read_only = make_device(lu=make_lu(read_only=True))
    expect_check(run(read_only, unmap_cdb(24), unmap_parameters((0, 1))), SenseKey.DATA_PROTECT,
                 Asc.WRITE_PROTECTED)


def test_unmap_is_unknown_without_provisioning():
    device = make_device(backend=MemoryBackend(BLOCKS * 512, supports_unmap=False))
    expect_check(run(device, unmap_cdb(24), unmap_parameters((0, 1))), SenseKey.ILLEGAL_REQUEST,
                 Asc.INVALID_COMMAND_OPERATION_CODE)
    expect_check(run(device, cdb10(0x41, 0, 1, flags=0x08), bytes(512)), SenseKey.ILLEGAL_REQUEST,
                 Asc.INVALID_FIELD_IN_CDB)


def test_write_same_unmap_with_zero_block_deallocates():
    backend = MemoryBackend(BLOCKS * 512)
    device = make_device(backend=backend)
    run(device, cdb10(0x2A, 0, 2), b"a" * 1024)
    assert run(device, cdb16(0x93, 0, 2, flags=0x08), bytes(512)).status == ScsiStatus.GOOD
    assert backend.unmapped == [(0, 1024)]
    assert run(device, cdb10(0x41, 1, 1, flags=0x08), b"b" * 512).status == ScsiStatus.GOOD
    assert backend.unmapped[-1] == (512, 512)  # SBC-3: UNMAP set means unmap, whatever the data
    assert bytes(run(device, cdb10(0x28, 0, 2)).data_in) == bytes(1024)


def test_get_lba_status_on_a_sparse_file(tmp_path):
    from istgt.lu.backends import FileBackend

    backend = FileBackend.open(str(tmp_path / "thin.img"), BLOCKS * 512, read_only=False)
    device = make_device(backend=backend)

    def status(lba):
        cdb = [0x9E, 0x12] + list(struct.pack(">Q", lba)) + [0, 0, 0, 24, 0, 0]
        return struct.unpack(">QIB", bytes(run(device, cdb).data_in)[8:21])

    assert status(0) == (0, BLOCKS, 1)  # nothing written yet: deallocated
    run(device, cdb10(0x2A, 16, 16), b"x" * 16 * 512)
    assert status(0) == (0, 16, 1)
    assert status(16) == (16, 16, 0)
    parameters = unmap_parameters((16, 8))
    run(device, unmap_cdb(len(parameters)), parameters)
    assert status(16) == (16, 8, 1) and status(24) == (24, 8, 0)
    assert bytes(run(device, cdb10(0x28, 16, 8)).data_in) == bytes(8 * 512)
    backend.close()


def test_aptpl_save_overtaken_by_aptpl_off_leaves_no_state_file(tmp_path):
    """A PR OUT made with APTPL=1 whose save is still waiting for the state file when APTPL
    is turned off must not write the file afterwards: it would bring the registrations back
    after a restart although the last acknowledged REGISTER said APTPL=0."""
    import threading
    import time

    from istgt.lu.state import StateFile

    state = StateFile(str(tmp_path / "lu.pr.json"))
    device = DiskDevice(make_lu(), make_lun(), MemoryBackend(BLOCKS * 512), state)
    run(device, [0x00] + [0] * 5)                       # the power-on unit attention
    params = struct.pack(">QQ4xB3x", 0, 0x1234, 0x01)  # REGISTER key 0x1234, APTPL=1
    register = [0x5F, 0x00, 0x00, 0, 0, 0, 0, 0, len(params), 0]
    with state._lock:                                  # the save below waits here
        saver = threading.Thread(target=run, args=(device, register, params))
        saver.start()
        time.sleep(0.2)                                # let it reach the file's lock
        off = device.reservations.snapshot()
        assert off["registrations"] and off["aptpl"]   # the REGISTER is in effect
        device.reservations.restore({**off, "aptpl": False})
    saver.join(5)
    assert not saver.is_alive()
    assert state.load() is None


class _RecordingHugeBackend(MemoryBackend):
    """Claims 4 TiB and stores 4 KiB: any read it is asked for shows what the target allocated."""

    def __init__(self):
        super().__init__(4096)
        self.size = 4 << 40
        self.requested: list[int] = []

    def read(self, offset, length):
        self.requested.append(length)
        return bytes(min(length, 4096))

    read_stable = read


@pytest.mark.parametrize("cdb, field", [
    pytest.param(cdb16(0x88, 0, 0xFFFFFFFF), 10, id="READ(16)"),
    pytest.param(cdb12(0xA8, 0, 0xFFFFFFFF), 6, id="READ(12)"),
    pytest.param(cdb16(0x8F, 0, 0xFFFFFFFF), 10, id="VERIFY(16)"),
    pytest.param(cdb16(0x8A, 0, 0xFFFFFFFF), 10, id="WRITE(16)"),
    pytest.param(cdb16(0x8E, 0, 0xFFFFFFFF), 10, id="WRITE AND VERIFY(16)"),
    pytest.param(cdb16(0x8B, 0, 0xFFFFFFFF), 10, id="ORWRITE(16)"),
])
def test_transfer_over_the_maximum_is_refused_before_any_read(cdb, field):
    """A 4 GiB-block transfer inside the LUN: 5/24/00 pointing at TRANSFER LENGTH, nothing
    read or allocated (Block Limits advertise 32 MiB)."""
    backend = _RecordingHugeBackend()
    device = make_device(backend=backend)
    task = run(device, cdb, bytes(512), edtl=512)
    expect_check(task, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB)
    assert task.sense[15] & 0xC0 == 0xC0 and struct.unpack(">H", task.sense[16:18])[0] == field
    assert backend.requested == []


def test_transfer_at_the_maximum_is_served():
    device = make_device(blocks=65536 + 8)
    task = run(device, cdb16(0x88, 0, 65536))       # 32 MiB of 512-byte blocks
    assert task.status == ScsiStatus.GOOD and len(task.data_in) == 32 << 20
    expect_check(run(device, cdb16(0x88, 0, 65537)), SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB)
