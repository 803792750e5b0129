"""SANITIZE (SBC-4 5.30) on a DiskDevice: what each service action leaves on the medium,
how the CDB and the OVERWRITE parameter list are checked, write protection and
reservations, the restrictions while an operation runs and the failure mode after one
failed, and the WABEREQ/WACEREQ bits of the Block Device Characteristics VPD page.

The CDB values are written out here (not taken from istgt.scsi.sanitize) so the tests
check the wire format rather than the module against itself.
"""

from __future__ import annotations

import errno
import struct
import threading
from contextlib import contextmanager

import pytest

from istgt.lu.backends import FileBackend, MemoryBackend
from istgt.scsi.constants import Asc, ScsiStatus, SenseKey
from tests.unit.test_scsi_disk import (
    BLOCKS,
    NEXUS,
    OTHER,
    cdb16,
    expect_check,
    make_device,
    make_lu,
    make_lun,
    run,
)
from tests.unit.test_scsi_variants import supported_opcodes, vpd

SANITIZE = 0x48
OVERWRITE, BLOCK_ERASE, CRYPTO_ERASE, EXIT_FAILURE_MODE = 0x01, 0x02, 0x03, 0x1F
IMMED, AUSE = 0x80, 0x20
BLOCK = 512
DEVICE_BYTES = BLOCKS * BLOCK

TUR = [0] * 6
INQUIRY = [0x12, 0, 0, 0, 96, 0]
REPORT_LUNS = [0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0]
MODE_SENSE_6 = [0x1A, 0, 0x3F, 0, 255, 0]
READ_CAPACITY_10 = [0x25] + [0] * 9
RESERVE_6 = [0x16, 0, 0, 0, 0, 0]
OLD_DATA = b"\x11" * DEVICE_BYTES   # what every test writes first, so an erase is visible


# --- helpers ----------------------------------------------------------------------------------


def sanitize_cdb(action, flags=0, length=0):
    return bytes([SANITIZE, flags | action, 0, 0, 0, 0, 0]) + struct.pack(">H", length) + b"\0"


def overwrite_parameters(pattern, passes=1, invert=False, test=0):
    flags = (0x80 if invert else 0) | test << 4 | passes
    return bytes([flags, 0]) + struct.pack(">H", len(pattern)) + pattern


def overwrite(device, pattern, passes=1, invert=False, flags=0, nexus=NEXUS):
    parameters = overwrite_parameters(pattern, passes, invert)
    return run(device, sanitize_cdb(OVERWRITE, flags, len(parameters)), parameters, nexus=nexus)


def erase(device, action, flags=0, nexus=NEXUS):
    return run(device, sanitize_cdb(action, flags), nexus=nexus)


def read_all(device, nexus=NEXUS):
    task = run(device, cdb16(0x88, 0, BLOCKS), nexus=nexus)
    assert task.status == ScsiStatus.GOOD, task.sense.hex()
    return bytes(task.data_in)


def fill(device, data=OLD_DATA):
    assert run(device, cdb16(0x8A, 0, BLOCKS), data).status == ScsiStatus.GOOD


def field_pointer(task):
    """(C/D bit set, byte pointed at) from fixed sense, after checking SKSV."""
    sks = task.sense[15:18]
    assert sks[0] & 0x80, "SKSV: the sense names the field in error"
    return bool(sks[0] & 0x40), struct.unpack(">H", sks[1:])[0]


def progress_of(sense):
    """The progress indication of fixed sense data, after checking SKSV."""
    assert sense[15] & 0x80, "SKSV: a progress indication is present"
    return struct.unpack(">H", sense[16:18])[0]


def expect_invalid_cdb(task, byte):
    expect_check(task, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB)
    assert field_pointer(task) == (True, byte)


def expect_invalid_parameter(task, byte):
    expect_check(task, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_PARAMETER_LIST)
    assert field_pointer(task) == (False, byte)


def expect_in_progress(task):
    expect_check(task, SenseKey.NOT_READY, Asc.LOGICAL_UNIT_NOT_READY_SANITIZE_IN_PROGRESS)
    return progress_of(task.sense)


def expect_sanitize_failed(task):
    expect_check(task, SenseKey.MEDIUM_ERROR, Asc.SANITIZE_COMMAND_FAILED)


def one_command_support(device, action):
    """REPORT SUPPORTED OPERATION CODES, reporting options 010b (opcode and service
    action): (SUPPORT field, CDB usage data)."""
    cdb = [0xA3, 0x0C, 0x02, SANITIZE, 0, action, 0, 0, 0, 64, 0, 0]
    task = run(device, cdb)
    assert task.status == ScsiStatus.GOOD
    data = bytes(task.data_in)
    return data[1] & 0x07, data[4:4 + struct.unpack(">H", data[2:4])[0]]


def listed_sanitize_actions(device):
    """The SANITIZE service actions of REPORT SUPPORTED OPERATION CODES' full list."""
    cdb = [0xA3, 0x0C, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0]
    data = bytes(run(device, cdb).data_in)
    end = 4 + struct.unpack(">I", data[:4])[0]
    return {struct.unpack(">H", data[i + 2:i + 4])[0]
            for i in range(4, end, 8) if data[i] == SANITIZE and data[i + 5] & 0x01}


def full_device(**kwargs):
    return make_device(lun=make_lun(provisioning="full"), **kwargs)


class GatedBackend(MemoryBackend):
    """A RAM disk whose writes (and deallocations) selected by `holds(data)` wait until the
    test opens `gate`, so a sanitize operation can be caught running. `held` is set once a
    write is waiting."""

    def __init__(self, size, holds=lambda data: True):
        super().__init__(size)
        self.holds = holds
        self.armed = False          # the test's own set-up writes pass freely
        self.gate = threading.Event()
        self.held = threading.Event()

    def _pass_gate(self, data):
        if self.armed and self.holds(data):
            self.held.set()
            self.gate.wait(10)      # bounded: a broken test must not leave a thread forever

    def write(self, offset, data):
        self._pass_gate(bytes(memoryview(data)[:1]))
        super().write(offset, data)

    def unmap(self, offset, length):
        self._pass_gate(b"")
        super().unmap(offset, length)


@contextmanager
def opened_at_exit(device, backend):
    """Whatever happens in the block, open the gate and let the operation finish."""
    try:
        yield
    finally:
        backend.gate.set()
        device.sanitizing.wait()


class FlakyBackend(MemoryBackend):
    """A RAM disk whose writes, zeroing and deallocation fail with EIO while `failing`."""

    failing = False

    def _check(self):
        if self.failing:
            raise OSError(errno.EIO, "injected")

    def write(self, offset, data):
        self._check()
        super().write(offset, data)

    def write_zeroes(self, offset, length, durable=False):
        self._check()
        super().write_zeroes(offset, length, durable)

    def unmap(self, offset, length):
        self._check()
        super().unmap(offset, length)


def failed_device(ause, provisioning="thin"):
    """A device whose last SANITIZE OVERWRITE failed (with or without AUSE); its backend
    works again afterwards."""
    backend = FlakyBackend(DEVICE_BYTES)
    device = make_device(backend=backend, lun=make_lun(provisioning=provisioning))
    fill(device)
    backend.failing = True
    expect_sanitize_failed(overwrite(device, b"\x5a", flags=AUSE if ause else 0))
    backend.failing = False
    return device


# --- OVERWRITE ------------------------------------------------------------------------------


def test_overwrite_fills_every_block_with_a_whole_block_pattern():
    device = make_device()
    fill(device)
    flushes = device.backend.flush_count
    pattern = bytes(range(256)) * 2
    assert overwrite(device, pattern).status == ScsiStatus.GOOD
    assert read_all(device) == pattern * BLOCKS
    assert device.backend.flush_count > flushes, "flushed before GOOD"


@pytest.mark.parametrize("pattern", [b"\xde\xad\xbe\xef", b"abc", b"\x00", b"\xff"])
def test_overwrite_repeats_a_short_pattern_from_the_start_of_each_block(pattern):
    device = make_device()
    fill(device)
    assert overwrite(device, pattern).status == ScsiStatus.GOOD
    one_block = (pattern * BLOCK)[:BLOCK]
    assert read_all(device) == one_block * BLOCKS


def test_overwrite_pattern_may_be_as_long_as_a_4k_block():
    blocks = 64
    device = make_device(blocks=blocks, block_length=4096)
    pattern = bytes(range(256)) * 16
    parameters = overwrite_parameters(pattern)
    assert len(parameters) == 4096 + 4
    task = run(device, sanitize_cdb(OVERWRITE, 0, len(parameters)), parameters)
    assert task.status == ScsiStatus.GOOD
    assert device.backend.read(0, blocks * 4096) == pattern * blocks


class RecordingBackend(MemoryBackend):
    """Remembers every write, to tell the overwrite passes apart."""

    def __init__(self, size):
        super().__init__(size)
        self.writes = []

    def write(self, offset, data):
        self.writes.append((offset, bytes(data)))
        super().write(offset, data)


def passes_written(backend):
    """The medium image each pass wrote: a pass starts again at offset 0."""
    passes = []
    for offset, data in backend.writes:
        if offset == 0:
            passes.append(b"")
        assert offset == len(passes[-1]), "each pass writes the device front to back"
        passes[-1] += data
    return passes


@pytest.mark.parametrize("count, invert, expected", [
    (1, True, ["plain"]),                          # nothing to invert between
    (2, False, ["plain", "plain"]),
    (2, True, ["plain", "inverted"]),
    (3, True, ["plain", "inverted", "plain"]),
])
def test_overwrite_passes_and_invert(count, invert, expected):
    backend = RecordingBackend(DEVICE_BYTES)
    device = make_device(backend=backend)
    pattern = b"\x0f\x5a"
    images = {"plain": pattern * (DEVICE_BYTES // 2), "inverted": b"\xf0\xa5" * (DEVICE_BYTES // 2)}
    backend.writes.clear()
    assert overwrite(device, pattern, passes=count, invert=invert).status == ScsiStatus.GOOD
    assert passes_written(backend) == [images[name] for name in expected]
    # What stays on the medium is the last pass: inverted after an even count with INVERT.
    assert read_all(device) == images[expected[-1]]


def test_overwrite_fifteen_passes_is_the_maximum_owcount():
    backend = RecordingBackend(DEVICE_BYTES)
    device = make_device(backend=backend)
    backend.writes.clear()
    assert overwrite(device, b"\x77", passes=15).status == ScsiStatus.GOOD
    assert len(passes_written(backend)) == 15


# --- CDB and parameter list checks ------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 1, 2, 3, 4, BLOCK + 5, 0xFFFF])
def test_overwrite_parameter_list_length_out_of_range_is_invalid_field_in_cdb(length):
    device = make_device()
    fill(device)
    # A well-formed list cut or padded to `length`: only the CDB field is at fault.
    parameters = (overwrite_parameters(b"\x5a") + bytes(length))[:length]
    task = run(device, sanitize_cdb(OVERWRITE, 0, length), parameters or None)
    expect_invalid_cdb(task, 7)
    assert read_all(device) == OLD_DATA


def test_overwrite_parameter_list_length_limit_follows_the_block_length():
    device = make_device(blocks=64, block_length=4096)
    parameters = overwrite_parameters(b"\x5a") + bytes(4096)
    expect_invalid_cdb(run(device, sanitize_cdb(OVERWRITE, 0, 4101), parameters[:4101]), 7)


@pytest.mark.parametrize("parameters, byte", [
    (overwrite_parameters(b"\x5a", passes=0), 0),                  # OWCOUNT 0
    (overwrite_parameters(b"\x5a", test=1), 0),                    # TEST is vendor only
    (overwrite_parameters(b"\x5a", test=2), 0),
    (overwrite_parameters(b"\x5a", test=3), 0),
    (bytes([0x41, 0, 0, 1, 0x5a]), 0),                             # reserved bit 6
    (bytes([0x01, 0xFF, 0, 1, 0x5a]), 1),                          # reserved byte 1
    (bytes([0x01, 0, 0, 0, 0x5a]), 2),                             # pattern length 0
    (bytes([0x01, 0, 0x02, 0x01]) + bytes(BLOCK), 2),              # pattern longer than a block
    (bytes([0x01, 0, 0, 8, 0x5a, 0x5a]), 2),                       # pattern longer than the list
], ids=["owcount0", "test1", "test2", "test3", "reserved-bit", "reserved-byte",
        "pattern0", "pattern-over-block", "pattern-over-list"])
def test_bad_overwrite_parameter_list_is_invalid_field_in_parameter_list(parameters, byte):
    device = make_device()
    fill(device)
    task = run(device, sanitize_cdb(OVERWRITE, 0, len(parameters)), parameters)
    expect_invalid_parameter(task, byte)
    assert read_all(device) == OLD_DATA
    assert not device.sanitizing.running


def test_overwrite_without_the_parameter_data_is_parameter_list_length_error():
    device = make_device()
    fill(device)
    parameters = overwrite_parameters(b"\x5a\x5a\x5a\x5a")
    task = run(device, sanitize_cdb(OVERWRITE, 0, len(parameters)), parameters[:6])
    expect_check(task, SenseKey.ILLEGAL_REQUEST, Asc.PARAMETER_LIST_LENGTH_ERROR)
    assert read_all(device) == OLD_DATA


@pytest.mark.parametrize("action", [BLOCK_ERASE, CRYPTO_ERASE, EXIT_FAILURE_MODE])
@pytest.mark.parametrize("length", [1, 8])
def test_actions_without_a_parameter_list_refuse_a_parameter_list_length(action, length):
    device = make_device()   # thin: BLOCK ERASE is offered
    fill(device)
    task = run(device, sanitize_cdb(action, 0, length), bytes(length))
    expect_invalid_cdb(task, 7)
    assert read_all(device) == OLD_DATA, "a refused erase erased nothing"
    assert device.backend.unmapped == []


@pytest.mark.parametrize("byte, bit", [(1, 6), (2, 0), (3, 7), (4, 3), (5, 1), (6, 7), (9, 2)])
def test_reserved_cdb_bits_are_invalid_field_in_cdb(byte, bit):
    device = make_device()
    fill(device)
    cdb = bytearray(sanitize_cdb(CRYPTO_ERASE))
    cdb[byte] |= 1 << bit
    task = run(device, cdb)
    expect_invalid_cdb(task, byte)
    assert task.sense[15] & 0x0F == 0x08 | bit   # BPV and the bit
    assert read_all(device) == OLD_DATA


@pytest.mark.parametrize("action", [0x00, *range(0x04, 0x1F)])
def test_unsupported_service_actions_are_invalid_field_in_cdb(action):
    device = make_device()
    fill(device)
    expect_invalid_cdb(erase(device, action), 1)
    assert read_all(device) == OLD_DATA


# --- BLOCK ERASE and CRYPTOGRAPHIC ERASE --------------------------------------------------------


def test_block_erase_is_offered_only_on_a_thin_lun():
    thin, full = make_device(), full_device()
    assert SANITIZE in supported_opcodes(thin) and SANITIZE in supported_opcodes(full)
    assert listed_sanitize_actions(thin) == {OVERWRITE, BLOCK_ERASE, CRYPTO_ERASE, EXIT_FAILURE_MODE}
    assert listed_sanitize_actions(full) == {OVERWRITE, CRYPTO_ERASE, EXIT_FAILURE_MODE}
    support, usage = one_command_support(thin, BLOCK_ERASE)
    assert support == 0b011                      # supported as the standard says
    assert usage[:2] == bytes([SANITIZE, IMMED | AUSE | BLOCK_ERASE]) and len(usage) == 10
    assert usage[7:9] == b"\xff\xff"
    assert one_command_support(full, BLOCK_ERASE)[0] == 0b001   # not supported
    for action in (OVERWRITE, CRYPTO_ERASE, EXIT_FAILURE_MODE):
        assert one_command_support(full, action)[0] == 0b011


def test_block_erase_deallocates_every_block_of_a_thin_lun():
    device = make_device()
    fill(device)
    assert erase(device, BLOCK_ERASE).status == ScsiStatus.GOOD
    assert device.backend.unmapped == [(0, DEVICE_BYTES)]
    assert read_all(device) == bytes(DEVICE_BYTES)


def get_lba_status(device, lba):
    cdb = [0x9E, 0x12] + list(struct.pack(">Q", lba)) + [0, 0, 0, 24, 0, 0]
    task = run(device, cdb)
    assert task.status == ScsiStatus.GOOD
    return struct.unpack(">QIB", bytes(task.data_in)[8:21])


def test_block_erase_of_a_sparse_file_reports_every_lba_deallocated(tmp_path):
    backend = FileBackend.open(str(tmp_path / "thin.img"), DEVICE_BYTES, read_only=False)
    try:
        device = make_device(backend=backend)
        fill(device)
        assert get_lba_status(device, 0) == (0, BLOCKS, 0)     # all mapped by the fill
        assert erase(device, BLOCK_ERASE).status == ScsiStatus.GOOD
        assert get_lba_status(device, 0) == (0, BLOCKS, 1)     # all deallocated
        assert read_all(device) == bytes(DEVICE_BYTES)
    finally:
        backend.close()


def test_block_erase_on_a_full_lun_is_an_unsupported_service_action():
    device = full_device()
    fill(device)
    expect_invalid_cdb(erase(device, BLOCK_ERASE), 1)
    assert read_all(device) == OLD_DATA


@pytest.mark.parametrize("provisioning", ["thin", "full"])
def test_cryptographic_erase_zeroes_the_data(provisioning):
    device = make_device(lun=make_lun(provisioning=provisioning))
    fill(device)
    flushes = device.backend.flush_count
    assert erase(device, CRYPTO_ERASE).status == ScsiStatus.GOOD
    assert read_all(device) == bytes(DEVICE_BYTES)
    assert device.backend.flush_count > flushes, "flushed before GOOD"
    # Only a thin LUN may give the blocks back; a full one keeps them allocated.
    assert bool(device.backend.unmapped) == (provisioning == "thin")


def test_cryptographic_erase_of_a_preallocated_file_keeps_it_mapped(tmp_path):
    backend = FileBackend.open(str(tmp_path / "full.img"), DEVICE_BYTES, read_only=False)
    try:
        device = full_device(backend=backend)
        fill(device)
        assert erase(device, CRYPTO_ERASE).status == ScsiStatus.GOOD
        assert backend.read(0, DEVICE_BYTES) == bytes(DEVICE_BYTES)
        assert backend.allocation(0, DEVICE_BYTES) == (True, DEVICE_BYTES)
    finally:
        backend.close()


def test_exit_failure_mode_outside_failure_mode_changes_nothing():
    device = make_device()
    fill(device)
    assert erase(device, EXIT_FAILURE_MODE).status == ScsiStatus.GOOD
    assert read_all(device) == OLD_DATA


# --- write protection and reservations ----------------------------------------------------------


@pytest.mark.parametrize("action", [OVERWRITE, BLOCK_ERASE, CRYPTO_ERASE])
def test_read_only_lu_refuses_sanitize_with_write_protected(action):
    backend = MemoryBackend(DEVICE_BYTES)
    backend.write(0, OLD_DATA)
    device = make_device(backend=backend, lu=make_lu(read_only=True))
    if action == OVERWRITE:
        task = overwrite(device, b"\x5a")
    else:
        task = erase(device, action)
    expect_check(task, SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED)
    assert backend.read(0, DEVICE_BYTES) == OLD_DATA
    assert not device.sanitizing.running


def test_spc2_reservation_of_another_initiator_is_a_reservation_conflict():
    device = make_device()
    fill(device)
    assert run(device, TUR, nexus=OTHER).status != ScsiStatus.GOOD   # its power-on attention
    assert run(device, RESERVE_6, nexus=OTHER).status == ScsiStatus.GOOD
    for task in (overwrite(device, b"\x5a"), erase(device, CRYPTO_ERASE),
                 erase(device, BLOCK_ERASE)):
        assert task.status == ScsiStatus.RESERVATION_CONFLICT == 0x18
        assert task.sense == b""
    assert not device.sanitizing.running
    # The holder of the reservation may sanitize.
    assert erase(device, CRYPTO_ERASE, nexus=OTHER).status == ScsiStatus.GOOD
    assert read_all(device, nexus=OTHER) == bytes(DEVICE_BYTES)


# --- restrictions while an operation runs ---------------------------------------------------------


def start_held_overwrite(holds=lambda data: True, passes=1, invert=False, nexus=NEXUS):
    """A device running an IMMED OVERWRITE of 0x5A whose writes selected by `holds` wait
    for the test; OTHER has seen its power-on unit attention already."""
    backend = GatedBackend(DEVICE_BYTES, holds)
    device = make_device(backend=backend)
    run(device, TUR, nexus=OTHER)
    fill(device)
    backend.armed = True
    task = overwrite(device, b"\x5a", passes=passes, invert=invert, flags=IMMED, nexus=nexus)
    return device, backend, task


@pytest.mark.timeout(10)
def test_immed_overwrite_returns_good_while_it_still_runs():
    device, backend, task = start_held_overwrite()
    with opened_at_exit(device, backend):
        assert task.status == ScsiStatus.GOOD and task.sense == b""
        assert backend.held.wait(5), "the operation reached the medium"
        assert device.sanitizing.running
    assert not device.sanitizing.running
    assert read_all(device) == b"\x5a" * DEVICE_BYTES


@pytest.mark.timeout(10)
def test_commands_during_sanitize_are_not_ready_sanitize_in_progress():
    device, backend, _ = start_held_overwrite()
    with opened_at_exit(device, backend):
        assert backend.held.wait(5)
        refused = [
            (TUR, None, NEXUS), (TUR, None, OTHER),
            (cdb16(0x88, 0, 1), None, NEXUS), (cdb16(0x88, 0, 1), None, OTHER),
            (cdb16(0x8A, 0, 1), b"w" * BLOCK, OTHER),
            (READ_CAPACITY_10, None, NEXUS),
            (MODE_SENSE_6, None, NEXUS),               # not medium access, refused all the same
            (RESERVE_6, None, OTHER),
        ]
        for cdb, data, nexus in refused:
            task = run(device, cdb, data, nexus=nexus)
            assert expect_in_progress(task) == 0, bytes(cdb).hex()
    assert read_all(device) == b"\x5a" * DEVICE_BYTES, "the refused WRITE left no trace"
    assert run(device, RESERVE_6, nexus=OTHER).status == ScsiStatus.GOOD, "nor did RESERVE"


@pytest.mark.timeout(10)
def test_inquiry_and_report_luns_are_served_during_sanitize():
    device, backend, _ = start_held_overwrite()
    with opened_at_exit(device, backend):
        assert backend.held.wait(5)
        for nexus in (NEXUS, OTHER):
            inquiry = run(device, INQUIRY, nexus=nexus)
            assert inquiry.status == ScsiStatus.GOOD and bytes(inquiry.data_in)[0] == 0x00
            assert run(device, [0x12, 1, 0xB1, 0, 64, 0], nexus=nexus).status == ScsiStatus.GOOD
            luns = run(device, REPORT_LUNS, nexus=nexus)
            assert luns.status == ScsiStatus.GOOD
            assert bytes(luns.data_in)[:4] == struct.pack(">I", 8)
        assert device.sanitizing.running


@pytest.mark.timeout(10)
def test_request_sense_reports_sanitize_in_progress_with_progress():
    # OWCOUNT 2 with INVERT: hold the first write of the inverted pass, so exactly half
    # the work (the whole plain pass) is done, whatever size the writes come in.
    device, backend, _ = start_held_overwrite(holds=lambda data: data == b"\xa5",
                                              passes=2, invert=True)
    with opened_at_exit(device, backend):
        assert backend.held.wait(5)
        fixed = run(device, [0x03, 0, 0, 0, 252, 0], nexus=OTHER)
        assert fixed.status == ScsiStatus.GOOD
        data = bytes(fixed.data_in)
        assert data[0] == 0x70 and data[2] & 0x0F == SenseKey.NOT_READY
        assert data[12:14] == b"\x04\x1b"
        assert progress_of(data) == 0x8000
        descriptor = bytes(run(device, [0x03, 0x01, 0, 0, 252, 0]).data_in)
        assert descriptor[:4] == bytes([0x72, SenseKey.NOT_READY, 0x04, 0x1B])
        # Sense key specific descriptor (02h, length 6): SKSV, then the progress.
        assert descriptor[8:10] == b"\x02\x06" and descriptor[12:15] == b"\x80\x80\x00"
        # CHECK CONDITION sense carries the same indication.
        assert expect_in_progress(run(device, TUR)) == 0x8000
    assert read_all(device) == b"\xa5" * DEVICE_BYTES   # the inverted pass ran to its end
    after = bytes(run(device, [0x03, 0, 0, 0, 252, 0]).data_in)
    assert after[2] & 0x0F == SenseKey.NO_SENSE and after[12:14] == b"\0\0"


class PlainAfterInverted:
    """Holds the first plain (5Ah) write that follows an inverted (A5h) one: the start of
    the third pass of OWCOUNT 3 with INVERT."""

    def __init__(self):
        self.inverted_seen = False

    def __call__(self, first_byte):
        self.inverted_seen |= first_byte == b"\xa5"
        return self.inverted_seen and first_byte == b"\x5a"


@pytest.mark.timeout(10)
def test_progress_counts_the_passes_already_done():
    device, backend, _ = start_held_overwrite(holds=PlainAfterInverted(), passes=3, invert=True)
    with opened_at_exit(device, backend):
        assert backend.held.wait(5)
        # Two of three passes are done: floor(2 * BLOCKS / 3) blocks of BLOCKS, in 1/65536.
        assert expect_in_progress(run(device, TUR)) == (2 * BLOCKS // 3) * 0x10000 // BLOCKS
    assert read_all(device) == b"\x5a" * DEVICE_BYTES


@pytest.mark.timeout(10)
@pytest.mark.parametrize("nexus", [NEXUS, OTHER])
def test_a_second_sanitize_is_refused_while_one_runs(nexus):
    device, backend, _ = start_held_overwrite()
    with opened_at_exit(device, backend):
        assert backend.held.wait(5)
        expect_in_progress(erase(device, CRYPTO_ERASE, nexus=nexus))
        expect_in_progress(overwrite(device, b"\x33", nexus=nexus))
        expect_in_progress(erase(device, EXIT_FAILURE_MODE, nexus=nexus))
    assert read_all(device) == b"\x5a" * DEVICE_BYTES, "only the first operation ran"


@pytest.mark.timeout(10)
def test_commands_are_served_again_when_the_operation_ends():
    device, backend, _ = start_held_overwrite()
    with opened_at_exit(device, backend):
        assert backend.held.wait(5)
        expect_in_progress(run(device, TUR))
        backend.gate.set()
        device.sanitizing.wait()
        assert run(device, TUR).status == ScsiStatus.GOOD
        assert run(device, TUR, nexus=OTHER).status == ScsiStatus.GOOD
        assert read_all(device) == b"\x5a" * DEVICE_BYTES


@pytest.mark.timeout(10)
def test_a_held_block_erase_refuses_commands_too():
    backend = GatedBackend(DEVICE_BYTES)
    device = make_device(backend=backend)
    fill(device)
    backend.armed = True
    with opened_at_exit(device, backend):
        assert erase(device, BLOCK_ERASE, flags=IMMED).status == ScsiStatus.GOOD
        assert backend.held.wait(5)
        expect_in_progress(run(device, cdb16(0x88, 0, 1)))
    assert read_all(device) == bytes(DEVICE_BYTES)


@pytest.mark.timeout(10)
def test_the_operation_survives_a_reset_and_the_end_of_the_nexus():
    device, backend, _ = start_held_overwrite()
    with opened_at_exit(device, backend):
        assert backend.held.wait(5)
        device.reset("lun")
        device.nexus_lost(NEXUS)
        assert device.sanitizing.running
        # The reset's unit attention comes first, then the sanitize is still reported.
        expect_check(run(device, TUR, nexus=OTHER), SenseKey.UNIT_ATTENTION,
                     Asc.BUS_DEVICE_RESET_FUNCTION_OCCURRED)
        expect_in_progress(run(device, TUR, nexus=OTHER))
    assert read_all(device, nexus=OTHER) == b"\x5a" * DEVICE_BYTES


@pytest.mark.timeout(10)
def test_close_waits_for_the_running_operation():
    device, backend, _ = start_held_overwrite()
    with opened_at_exit(device, backend):
        assert backend.held.wait(5)
        closer = threading.Thread(target=device.close, daemon=True)
        closer.start()
        closer.join(0.2)
        assert closer.is_alive() and not backend.closed, "close did not wait"
        backend.gate.set()
        closer.join(5)
        assert not closer.is_alive() and backend.closed
    assert backend.read(0, DEVICE_BYTES) == b"\x5a" * DEVICE_BYTES


# --- failure mode -------------------------------------------------------------------------------


@pytest.mark.parametrize("ause", [False, True])
def test_failed_overwrite_ends_in_sanitize_command_failed_and_blocks_medium_access(ause):
    device = failed_device(ause)
    assert not device.sanitizing.running
    run(device, TUR, nexus=OTHER)     # OTHER's power-on attention comes before anything
    expect_sanitize_failed(run(device, cdb16(0x88, 0, 1)))
    expect_sanitize_failed(run(device, cdb16(0x8A, 0, 1), b"w" * BLOCK))
    expect_sanitize_failed(run(device, cdb16(0x88, 0, 1), nexus=OTHER))
    assert run(device, INQUIRY).status == ScsiStatus.GOOD
    assert run(device, REPORT_LUNS).status == ScsiStatus.GOOD


@pytest.mark.parametrize("provisioning", ["thin", "full"])
def test_failed_cryptographic_erase_ends_in_sanitize_command_failed(provisioning):
    backend = FlakyBackend(DEVICE_BYTES)
    device = make_device(backend=backend, lun=make_lun(provisioning=provisioning))
    backend.failing = True
    expect_sanitize_failed(erase(device, CRYPTO_ERASE))
    backend.failing = False
    expect_sanitize_failed(run(device, cdb16(0x88, 0, 1)))


def test_failed_immed_overwrite_shows_on_the_next_medium_access():
    backend = FlakyBackend(DEVICE_BYTES)
    device = make_device(backend=backend)
    backend.failing = True
    assert overwrite(device, b"\x5a", flags=IMMED).status == ScsiStatus.GOOD
    device.sanitizing.wait()
    backend.failing = False
    expect_sanitize_failed(run(device, cdb16(0x88, 0, 1)))


def test_exit_failure_mode_is_refused_when_the_failed_command_had_no_ause():
    device = failed_device(ause=False)
    expect_invalid_cdb(erase(device, EXIT_FAILURE_MODE), 1)
    # AUSE of the EXIT FAILURE MODE command itself does not matter.
    expect_invalid_cdb(erase(device, EXIT_FAILURE_MODE, flags=AUSE), 1)
    expect_sanitize_failed(run(device, cdb16(0x88, 0, 1)))


def test_exit_failure_mode_ends_failure_mode_after_a_failed_command_with_ause():
    device = failed_device(ause=True)
    assert erase(device, EXIT_FAILURE_MODE).status == ScsiStatus.GOOD
    assert read_all(device) == OLD_DATA      # nothing was overwritten before the failure
    assert run(device, TUR).status == ScsiStatus.GOOD


@pytest.mark.parametrize("ause", [False, True])
def test_a_successful_sanitize_ends_failure_mode(ause):
    device = failed_device(ause)
    assert overwrite(device, b"\x3c").status == ScsiStatus.GOOD
    assert read_all(device) == b"\x3c" * DEVICE_BYTES


def test_a_successful_erase_ends_failure_mode_on_a_full_lun():
    device = failed_device(ause=False, provisioning="full")
    assert erase(device, CRYPTO_ERASE).status == ScsiStatus.GOOD
    assert read_all(device) == bytes(DEVICE_BYTES)


def test_a_sanitize_failing_again_keeps_failure_mode():
    device = failed_device(ause=True)
    device.backend.failing = True
    expect_sanitize_failed(overwrite(device, b"\x3c"))    # this one without AUSE
    device.backend.failing = False
    expect_invalid_cdb(erase(device, EXIT_FAILURE_MODE), 1)
    expect_sanitize_failed(run(device, cdb16(0x88, 0, 1)))


# --- Block Device Characteristics VPD page -----------------------------------------------------


@pytest.mark.parametrize("provisioning, waber", [("thin", 0b01), ("full", 0b00)])
def test_vpd_b1_wabereq_and_wacereq(provisioning, waber):
    device = make_device(lun=make_lun(provisioning=provisioning))
    page = vpd(device, 0xB1)
    assert page[1] == 0xB1 and struct.unpack(">H", page[2:4])[0] == 0x3C
    assert page[7] >> 6 == waber                 # WABEREQ: reads after BLOCK ERASE
    assert (page[7] >> 4) & 0x03 == 0b01         # WACEREQ: reads after CRYPTOGRAPHIC ERASE
    assert page[7] & 0x0F == 2                   # the form factor is still there
    assert struct.unpack(">H", page[4:6])[0] == 7200
