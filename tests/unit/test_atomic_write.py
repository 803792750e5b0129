"""WRITE ATOMIC(16), its crash journal, and the LBA extent locks that keep COMPARE AND WRITE,
ORWRITE and atomic writes whole against overlapping commands."""

from __future__ import annotations

import struct
import threading
import time

import pytest

from istgt.lu.atomic_journal import HEADER, AtomicWriteJournal
from istgt.lu.backends import MemoryBackend
from istgt.scsi.constants import Asc, ScsiStatus, SenseKey
from istgt.scsi.extents import ExtentLocks
from istgt.scsi.sbc import MAX_ATOMIC_TRANSFER_BYTES, DiskDevice
from tests.unit.test_scsi_disk import BLOCKS, cdb16, expect_check, make_lu, make_lun, run
from tests.unit.test_scsi_variants import supported_opcodes, vpd

BL = 512
WRITE_ATOMIC = 0x9C
READ_16 = 0x88
WRITE_16 = 0x8A
COMPARE_AND_WRITE = 0x89


class PowerLoss(Exception):
    """Stands for the machine stopping in the middle of a write."""


class RecordingBackend(MemoryBackend):
    """A memory store that counts flushes and can lose power at its next write."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.flushes = 0
        self.fail_next_write = False

    def write(self, offset, data):
        if self.fail_next_write:
            self.fail_next_write = False
            raise PowerLoss()
        super().write(offset, data)

    def flush(self):
        self.flushes += 1
        super().flush()


def write_atomic_cdb(lba: int, blocks: int, flags: int = 0, boundary: int = 0) -> bytes:
    return struct.pack(">BBQHHBB", WRITE_ATOMIC, flags, lba, boundary, blocks, 0, 0)


def journaled_device(tmp_path, backend=None, **lu):
    backend = backend or RecordingBackend(BLOCKS * BL)
    journal = AtomicWriteJournal(str(tmp_path / "lun0.atomic"))
    device = DiskDevice(make_lu(**lu), make_lun(), backend, atomic_journal=journal)
    run(device, [0] * 6)  # the power-on unit attention
    return device, backend


def read_back(device, lba, blocks):
    task = run(device, cdb16(READ_16, lba, blocks))
    assert task.status == ScsiStatus.GOOD
    return bytes(task.data_in)


# --- the journal ------------------------------------------------------------------------------


def test_journal_leaves_no_record_after_a_completed_write(tmp_path):
    store = RecordingBackend(1 << 20)
    journal = AtomicWriteJournal(str(tmp_path / "j"))
    journal.write(store, 4096, b"\x5a" * 8192)
    assert store.read(4096, 8192) == b"\x5a" * 8192
    assert store.flushes == 1                      # durable before it returns
    assert (tmp_path / "j").read_bytes()[:HEADER.size] == bytes(HEADER.size)
    assert journal.recover(store) is None


def crash_during_write(path, store, offset: int, data: bytes) -> None:
    """The journal record is durable, then power fails as the store is written."""
    journal = AtomicWriteJournal(str(path))
    store.fail_next_write = True
    with pytest.raises(PowerLoss):
        journal.write(store, offset, data)
    journal.close()


def test_recover_finishes_a_write_the_crash_interrupted(tmp_path):
    store = RecordingBackend(1 << 20)
    crash_during_write(tmp_path / "j", store, 8192, b"\xa5" * 4096)
    assert store.read(8192, 4096) == bytes(4096)   # the store never saw the write
    restarted = AtomicWriteJournal(str(tmp_path / "j"))
    assert restarted.recover(store) == 8192
    assert store.read(8192, 4096) == b"\xa5" * 4096
    assert restarted.recover(store) is None        # replayed once, then cleared


@pytest.mark.parametrize("damage_at", [0, 9, HEADER.size - 1, HEADER.size + 100])
def test_a_torn_record_is_ignored(tmp_path, damage_at):
    store = RecordingBackend(1 << 20)
    path = tmp_path / "j"
    crash_during_write(path, store, 0, b"\x11" * 1024)
    record = bytearray(path.read_bytes())
    record[damage_at] ^= 0xFF
    path.write_bytes(bytes(record))
    assert AtomicWriteJournal(str(path)).recover(store) is None
    assert store.read(0, 1024) == bytes(1024)


def test_the_device_replays_the_journal_before_serving(tmp_path):
    store = RecordingBackend(BLOCKS * BL)
    crash_during_write(tmp_path / "lun0.atomic", store, 3 * BL, b"\x77" * (2 * BL))
    device, _ = journaled_device(tmp_path, backend=store)
    assert read_back(device, 3, 2) == b"\x77" * (2 * BL)


# --- WRITE ATOMIC(16) ------------------------------------------------------------------------


def test_write_atomic_is_offered_only_with_a_journal(tmp_path):
    plain = DiskDevice(make_lu(), make_lun(), MemoryBackend(BLOCKS * BL))
    run(plain, [0] * 6)
    assert WRITE_ATOMIC not in supported_opcodes(plain)
    assert struct.unpack_from(">I", vpd(plain, 0xB0), 44)[0] == 0  # MAXIMUM ATOMIC TRANSFER
    expect_check(run(plain, write_atomic_cdb(0, 1), b"\0" * BL),
                 SenseKey.ILLEGAL_REQUEST, Asc.INVALID_COMMAND_OPERATION_CODE)
    device, _ = journaled_device(tmp_path)
    assert WRITE_ATOMIC in supported_opcodes(device)
    limits = vpd(device, 0xB0)
    max_atomic, alignment, granularity, with_boundary, boundary = struct.unpack_from(
        ">5I", limits, 44)
    assert max_atomic == MAX_ATOMIC_TRANSFER_BYTES // BL
    assert max_atomic <= struct.unpack_from(">I", limits, 8)[0]   # <= MAXIMUM TRANSFER LENGTH
    assert (alignment, granularity, with_boundary, boundary) == (0, 0, 0, 0)


def test_write_atomic_writes_durably_through_the_journal(tmp_path):
    device, backend = journaled_device(tmp_path)
    data = bytes(range(256)) * (8 * BL // 256)
    task = run(device, write_atomic_cdb(10, 8), data)
    assert task.status == ScsiStatus.GOOD
    assert read_back(device, 10, 8) == data
    assert backend.flushes >= 1


def test_write_atomic_checks_its_fields(tmp_path):
    too_many = MAX_ATOMIC_TRANSFER_BYTES // BL + 1
    device, _ = journaled_device(tmp_path, backend=RecordingBackend(2 * too_many * BL))
    expect_check(run(device, write_atomic_cdb(0, too_many), b"\0" * too_many * BL),
                 SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB)
    expect_check(run(device, write_atomic_cdb(0, 1, boundary=1), b"\0" * BL),
                 SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB)
    last = device.block_count - 1
    expect_check(run(device, write_atomic_cdb(last, 2), b"\0" * 2 * BL),
                 SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE)
    expect_check(run(device, write_atomic_cdb(0, 1, flags=0x20), b"\0" * BL),  # WRPROTECT
                 SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB)
    assert run(device, write_atomic_cdb(0, 0)).status == ScsiStatus.GOOD


def test_a_read_only_lu_has_no_atomic_writes(tmp_path):
    device, _ = journaled_device(tmp_path, read_only=True)
    assert device.atomic_journal is None
    assert WRITE_ATOMIC not in supported_opcodes(device)


# --- extent locks ----------------------------------------------------------------------------


def entered_within(locks_call, seconds: float) -> tuple[threading.Event, threading.Event]:
    """Run `with locks_call():` on a thread; returns (entered, leave)."""
    entered, leave = threading.Event(), threading.Event()

    def body():
        with locks_call():
            entered.set()
            leave.wait(5)

    threading.Thread(target=body, daemon=True).start()
    entered.wait(seconds)
    return entered, leave


@pytest.mark.timeout(10)
def test_exclusive_range_keeps_out_overlapping_commands_only():
    locks = ExtentLocks()
    holder, release_holder = entered_within(lambda: locks.exclusive(100, 10), 1)
    assert holder.is_set()
    overlapping, release_overlapping = entered_within(lambda: locks.shared(105, 50), 0.2)
    disjoint, release_disjoint = entered_within(lambda: locks.shared(110, 5), 1)
    assert disjoint.is_set()
    assert not overlapping.is_set()
    release_holder.set()
    assert overlapping.wait(2)
    for event in (release_overlapping, release_disjoint):
        event.set()
    deadline = time.monotonic() + 2
    while not locks.idle() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert locks.idle()


@pytest.mark.timeout(10)
def test_exclusive_waits_for_overlapping_readers_and_keeps_new_ones_out():
    locks = ExtentLocks()
    reader, release_reader = entered_within(lambda: locks.shared(0, 8), 1)
    writer, release_writer = entered_within(lambda: locks.exclusive(4, 1), 0.2)
    assert reader.is_set() and not writer.is_set()
    late_reader, release_late = entered_within(lambda: locks.shared(0, 8), 0.2)
    assert not late_reader.is_set()     # a waiting writer is not starved by new readers
    release_reader.set()
    assert writer.wait(2)
    assert not late_reader.is_set()
    release_writer.set()
    assert late_reader.wait(2)
    release_late.set()


class TimedBackend(MemoryBackend):
    """Logs when each read and write ran, and by which thread; writes are slow enough for
    another thread to slip in, were nothing to stop it."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.log: list[tuple[str, str, float, float]] = []
        self._log_lock = threading.Lock()

    def _record(self, kind: str, started: float) -> None:
        with self._log_lock:
            self.log.append((kind, threading.current_thread().name, started, time.monotonic()))

    def read(self, offset, length):
        started = time.monotonic()
        half = length // 2
        first = bytes(super().read(offset, half))
        time.sleep(0.001)
        data = first + bytes(super().read(offset + half, length - half))
        self._record("read", started)
        return data

    def write(self, offset, data):
        started = time.monotonic()
        view = memoryview(data)
        half = len(view) // 2
        super().write(offset, view[:half])
        time.sleep(0.001)
        super().write(offset + half, view[half:])
        self._record("write", started)


def run_threads(targets, seconds: float) -> None:
    stop = threading.Event()
    threads = [threading.Thread(target=t, args=(stop,), name=name) for name, t in targets]
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join(5)


@pytest.mark.timeout(30)
def test_no_write_lands_between_the_compare_and_the_write_of_compare_and_write():
    backend = TimedBackend(BLOCKS * BL)
    device = DiskDevice(make_lu(), make_lun(), backend)
    run(device, [0] * 6)
    a, c = b"A" * BL, b"C" * BL
    caw = struct.pack(">BBQxxxBBB", COMPARE_AND_WRITE, 0, 7, 1, 0, 0)
    outcomes = []

    def writer(stop):
        while not stop.is_set():
            run(device, cdb16(WRITE_16, 6, 3), b"A" * 3 * BL)   # overlaps block 7
            time.sleep(0.0005)

    def swapper(stop):
        while not stop.is_set():
            outcomes.append(run(device, caw, a + c).status)

    run_threads([("writer", writer), ("caw", swapper)], 1.0)
    assert outcomes.count(ScsiStatus.GOOD) >= 20   # neither side starves the other
    caw_events = [e for e in backend.log if e[1] == "caw"]
    # each successful COMPARE AND WRITE is a read followed by a write on its thread
    spans = [(read[2], write[3]) for read, write in zip(caw_events, caw_events[1:])
             if read[0] == "read" and write[0] == "write"]
    assert spans
    intruders = [e for e in backend.log if e[1] == "writer" and e[0] == "write"
                 and any(e[2] < end and start < e[3] for start, end in spans)]
    assert not intruders, f"{len(intruders)} WRITEs ran inside a COMPARE AND WRITE"


@pytest.mark.timeout(30)
def test_a_read_never_sees_half_of_an_atomic_write(tmp_path):
    device, _ = journaled_device(tmp_path, backend=TimedBackend(BLOCKS * BL))
    patterns = (b"\x11" * 8 * BL, b"\x22" * 8 * BL)
    torn = []

    def atomic_writer(stop):
        turn = 0
        while not stop.is_set():
            assert run(device, write_atomic_cdb(20, 8), patterns[turn % 2]).status == 0
            turn += 1

    def reader(stop):
        while not stop.is_set():
            data = read_back(device, 20, 8)
            if data not in patterns and data != bytes(8 * BL):
                torn.append(data)
            time.sleep(0.0005)

    run_threads([("atomic", atomic_writer), ("reader", reader)], 1.0)
    assert not torn, "a READ saw a mix of two atomic writes"
