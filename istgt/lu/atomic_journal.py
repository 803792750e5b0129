"""Power-loss atomicity for WRITE ATOMIC on a store that can tear a write.

A file or block device may keep part of a write and lose the rest when the machine stops
(page cache writeback and device writes go in pieces). SBC-4 promises that an atomic write
changes every block or none, power loss included, so each one goes through this journal:

1. the record (header with the store offset, length and CRC32C of the data, then the data)
   is written to the journal file and made durable;
2. the data is written to the store and made durable;
3. the record is cleared, durably.

A crash before 1 completes leaves the store untouched (the torn record fails its CRC and is
ignored); a crash after it is repaired at the next start by `recover`, which writes the
recorded data again. The caller holds the written range exclusive from 1 to 3, so no later
write to those blocks can be overtaken by a replay.
"""

from __future__ import annotations

import os
import struct
import threading

import google_crc32c

MAGIC = b"ISTGTAW1"
# magic, store offset, data length, CRC32C of the data, CRC32C of the fields before it
HEADER = struct.Struct(">8sQQII")
EMPTY = bytes(HEADER.size)


def _crc(data: bytes | bytearray | memoryview) -> int:
    return google_crc32c.value(bytes(data))


class AtomicWriteJournal:
    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._lock = threading.Lock()   # one record slot: atomic writes take turns

    def recover(self, store) -> int | None:
        """Finish the atomic write a crash interrupted, if the journal holds a whole record.
        Returns the store offset it rewrote, or None."""
        with self._lock:
            header = os.pread(self._fd, HEADER.size, 0)
            if len(header) < HEADER.size or header[:8] != MAGIC:
                return None
            _magic, offset, length, data_crc, header_crc = HEADER.unpack(header)
            if _crc(header[:HEADER.size - 4]) != header_crc:
                return None
            data = os.pread(self._fd, length, HEADER.size)
            if len(data) != length or _crc(data) != data_crc:
                return None     # torn record: the store was never touched
            store.write(offset, data)
            store.flush()
            self._clear()
            return offset

    def write(self, store, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write `data` at `offset` of `store` so that all of it or none survives a crash;
        durable when it returns."""
        with self._lock:
            fields = struct.pack(">8sQQI", MAGIC, offset, len(data), _crc(data))
            record = fields + struct.pack(">I", _crc(fields))
            _write_all(self._fd, record, 0)
            _write_all(self._fd, data, HEADER.size)
            os.fdatasync(self._fd)
            store.write(offset, data)
            store.flush()
            self._clear()

    def _clear(self) -> None:
        _write_all(self._fd, EMPTY, 0)
        os.fdatasync(self._fd)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def _write_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
