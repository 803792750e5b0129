"""istgt's virtual tape file (`.vt`), so tapes written by the C istgt load here and back.

Layout: a 128 KiB control block ("ISVTCTRL", an endian marker, lengths, then a table of
filemarks at 4096), then the data area, whose offsets are counted from the end of the
control block: a BOT mark, then records, each a 128-byte mark header ("ISVTDATA" with its
payload length, or "ISVTEOFB" for a filemark) plus payload, 8-byte aligned, and an "ISVTEODB"
mark after the last one. Files are written little-endian (what istgt writes on x86); files
with the other byte order are read too.

`VirtualTape` keeps an index of the records (data or filemark, offset, length) built when
the file is opened, so positioning is a list lookup. Object number n (SSC's logical object
identifier, from 0) is the file's `lbpos` n + 1 (the BOT mark is lbpos 0).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

CTL_LENGTH = 128 * 1024
MARK_LENGTH = 128
ALIGNMENT = 8
MARK_TABLE_AT = 4096
MARK_ENTRIES = 1024
END = 0xFFFFFFFFFFFFFFFF
ENDIAN = 0x1122334455667788
GROW_STEP = 256 << 20          # extend/dynamic media grow by this much at a time
MAX_RECORD = 16 * 1024 * 1024

CTRL, BOT, DATA, FILEMARK, EOD = b"ISVTCTRL", b"ISVTBOTB", b"ISVTDATA", b"ISVTEOFB", b"ISVTEODB"
# magic, endian, version, marklen, lblen, lbpos, offset, prev, compalgo, vtcompalgo,
# vtdecomplen, junk, then 32 reserved bytes
_MARK = "8s11Q32x"
# magic, endian, version, ctlblocklen, blocklen, marklen, alignment, allocate, type, id,
# size, junk
_CONTROL = "8s11Q"


class TapeFileError(ValueError):
    """The file is not a virtual tape this code can read."""


class VolumeOverflow(Exception):
    """The medium is full (and may not grow)."""


@dataclass(frozen=True)
class Record:
    filemark: bool
    offset: int          # of its mark header, from the end of the control block
    length: int          # payload bytes (0 for a filemark)

    @property
    def end(self) -> int:
        return _aligned(self.offset + MARK_LENGTH + self.length)


def _aligned(offset: int) -> int:
    return -(-offset // ALIGNMENT) * ALIGNMENT


class VirtualTape:
    def __init__(self, path: str, fd: int, size: int, read_only: bool, growable: bool) -> None:
        self.path = path
        self._fd = fd
        self.size = size                  # of the medium, control block included
        self.read_only = read_only
        self.growable = growable          # the extend / dynamic media flags
        self._order = "<"
        self.records: list[Record] = []

    @classmethod
    def open(cls, path: str, size: int | None, read_only: bool, growable: bool = False
             ) -> VirtualTape:
        """Open (or, when writable and missing, create) a tape file. `size` None (Auto) is
        the file's size. TapeFileError when an existing file is not a virtual tape."""
        flags = (os.O_RDONLY if read_only else os.O_RDWR | os.O_CREAT) | os.O_CLOEXEC
        fd = os.open(path, flags, 0o666)
        try:
            actual = os.fstat(fd).st_size
            # Auto: the file's size now, and the medium grows as it is written
            tape = cls(path, fd, size if size is not None else actual, read_only,
                       growable or size is None)
            if actual == 0:
                if read_only:
                    raise TapeFileError(f"{path}: empty, and a read-only tape cannot be formatted")
                tape.format()
            else:
                tape._load()
            return tape
        except BaseException:
            os.close(fd)
            raise

    # --- reading the file -----------------------------------------------------------------

    def _read(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise TapeFileError(f"{self.path}: short read at {offset}")
        return data

    def _load(self) -> None:
        header = self._read(0, struct.calcsize("<" + _CONTROL))
        if header[:8] != CTRL:
            raise TapeFileError(f"{self.path}: not a virtual tape (no ISVTCTRL magic)")
        for order in "<>":
            if struct.unpack_from(order + "Q", header, 8)[0] == ENDIAN:
                self._order = order
                break
        else:
            raise TapeFileError(f"{self.path}: unknown byte order")
        _, _, version, ctl_length, _, mark_length, _, _, _, _, _, _ = struct.unpack(
            self._order + _CONTROL, header)
        if version != 0 or ctl_length != CTL_LENGTH or mark_length != MARK_LENGTH:
            raise TapeFileError(f"{self.path}: version {version}, control block {ctl_length},"
                                f" marks {mark_length} bytes: not supported")
        file_size = os.fstat(self._fd).st_size
        offset, records = 0, []
        while CTL_LENGTH + offset + MARK_LENGTH <= file_size:
            mark = struct.unpack(self._order + _MARK, self._read(CTL_LENGTH + offset, MARK_LENGTH))
            magic, length = mark[0], mark[4]
            if magic == EOD or CTL_LENGTH + offset + MARK_LENGTH + length > file_size:
                break             # the end, or a record cut off by a crash: the end too
            if magic == DATA:
                records.append(Record(False, offset, length))
            elif magic == FILEMARK:
                records.append(Record(True, offset, 0))
            elif magic != BOT:
                raise TapeFileError(f"{self.path}: bad mark {magic!r} at {CTL_LENGTH + offset}")
            offset = _aligned(offset + MARK_LENGTH + length)
        self.records = records

    def read_payload(self, index: int) -> bytes:
        record = self.records[index]
        return self._read(CTL_LENGTH + record.offset + MARK_LENGTH, record.length)

    # --- writing the file -----------------------------------------------------------------

    def _write(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(self._fd, view, offset)
            view, offset = view[written:], offset + written

    def _mark(self, magic: bytes, offset: int, length: int, lbpos: int, prev: int) -> bytes:
        return struct.pack(self._order + _MARK, magic, ENDIAN, 0, MARK_LENGTH, length, lbpos,
                           offset, prev, 0, 0, 0, 0)

    def _data_end(self) -> int:
        return self.records[-1].end if self.records else MARK_LENGTH     # after BOT

    def _save_control(self) -> None:
        block = bytearray(CTL_LENGTH)
        struct.pack_into(self._order + _CONTROL, block, 0, CTRL, ENDIAN, 0, CTL_LENGTH, 512,
                         MARK_LENGTH, ALIGNMENT, 0, 0, 0, 0, 0)
        entries = [(0, 0, 0)]                                   # BOT
        previous = 0
        for number, record in enumerate(self.records):
            if record.filemark:
                entries.append((number + 1, record.offset, previous))
            previous = record.offset
        entries.append((END, END, self._data_end()))
        for index, (lbpos, offset, prev) in enumerate(entries[:MARK_ENTRIES]):
            struct.pack_into(self._order + "4Q", block, MARK_TABLE_AT + 32 * index,
                             lbpos, offset, prev, 0)
        self._write(0, bytes(block))

    def format(self) -> None:
        """An empty tape: control block, BOT, EOD (also what ERASE at BOT does)."""
        self.records = []
        self._save_control()
        self._write(CTL_LENGTH, self._mark(BOT, 0, 0, 0, 0))
        self._write_eod()
        os.fsync(self._fd)

    def _write_eod(self) -> None:
        prev = self.records[-1].offset if self.records else 0
        end = self._data_end()
        self._write(CTL_LENGTH + end, self._mark(EOD, end, 0, len(self.records) + 1, prev))

    def truncate(self, index: int) -> None:
        """Forget the records from `index` on (a write in the middle of the tape)."""
        del self.records[index:]

    def _room_for(self, length: int) -> None:
        needed = CTL_LENGTH + self._data_end() + MARK_LENGTH + length + 2 * MARK_LENGTH
        while needed > self.size:
            if not self.growable:
                raise VolumeOverflow()
            self.size += GROW_STEP

    def append(self, payload: bytes | None) -> None:
        """Write one data record (`payload`) or, with None, a filemark, after the last
        record, then the EOD mark behind it."""
        length = 0 if payload is None else len(payload)
        self._room_for(length)
        offset = self._data_end()
        prev = self.records[-1].offset if self.records else 0
        lbpos = len(self.records) + 1
        magic = FILEMARK if payload is None else DATA
        record = Record(payload is None, offset, length)
        # The record and the EOD mark behind it in one write: whatever stops the process,
        # the file never shows the old records that followed as if they still counted.
        padding = bytes(record.end - (offset + MARK_LENGTH + length))
        self._write(CTL_LENGTH + offset,
                    self._mark(magic, offset, length, lbpos, prev) + (payload or b"")
                    + padding + self._mark(EOD, record.end, 0, lbpos + 1, offset))
        self.records.append(record)

    def finish(self) -> None:
        """After writing: the EOD mark and the control block (its filemark table)."""
        self._write_eod()
        self._save_control()

    def flush(self) -> None:
        if not self.read_only:
            os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
