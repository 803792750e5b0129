"""istgt's virtual tape file format: layout, both byte orders, growth, and files that are not
virtual tapes."""

from __future__ import annotations

import os
import struct

import pytest

from istgt.lu.vtape import (
    CTL_LENGTH, ENDIAN, MARK_LENGTH, MARK_TABLE_AT, TapeFileError, VirtualTape, VolumeOverflow,
)

RECORDS = [b"one", b"\x02" * 100, None, b"three" * 9, None]


def written(path, size=8 << 20, records=RECORDS) -> VirtualTape:
    tape = VirtualTape.open(str(path), size, read_only=False)
    for record in records:
        tape.append(record)
    tape.finish()
    return tape


def test_layout_and_filemark_table(tmp_path):
    tape = written(tmp_path / "t.vt")
    tape.close()
    raw = (tmp_path / "t.vt").read_bytes()
    assert raw[:8] == b"ISVTCTRL" and struct.unpack_from("<Q", raw, 8)[0] == ENDIAN
    # BOT entry, the filemarks as (lbpos, offset), then the END sentinel
    table = [struct.unpack_from("<QQQ", raw, MARK_TABLE_AT + 32 * i) for i in range(4)]
    assert table[0] == (0, 0, 0)
    assert [entry[0] for entry in table[1:3]] == [3, 5]        # object numbers + 1
    assert table[3][:2] == (2**64 - 1, 2**64 - 1)
    offsets = [CTL_LENGTH + table[1][1], CTL_LENGTH + table[2][1]]
    assert all(raw[o:o + 8] == b"ISVTEOFB" for o in offsets)
    # every record starts 8-byte aligned, and EOD follows the last one
    reopened = VirtualTape.open(str(tmp_path / "t.vt"), None, read_only=True)
    assert all(r.offset % 8 == 0 for r in reopened.records)
    eod = CTL_LENGTH + reopened.records[-1].end
    assert raw[eod:eod + 8] == b"ISVTEODB"
    assert [reopened.read_payload(i) if r is not None else None
            for i, r in enumerate(RECORDS)] == RECORDS
    reopened.close()


def test_a_big_endian_file_reads_too(tmp_path):
    path = tmp_path / "be.vt"
    tape = VirtualTape(str(path), 0, 8 << 20, False, False)
    tape._order = ">"                            # as written on a big-endian machine
    tape._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    tape.format()
    for record in RECORDS:
        tape.append(record)
    tape.finish()
    tape.close()
    assert struct.unpack_from(">Q", path.read_bytes(), 8)[0] == ENDIAN
    reopened = VirtualTape.open(str(path), None, read_only=True)
    assert [r.filemark for r in reopened.records] == [r is None for r in RECORDS]
    assert reopened.read_payload(3) == RECORDS[3]
    reopened.close()


def test_truncating_rewrites_from_the_position(tmp_path):
    tape = written(tmp_path / "t.vt")
    tape.truncate(1)
    tape.append(b"replacement")
    tape.finish()
    tape.close()
    reopened = VirtualTape.open(str(tmp_path / "t.vt"), None, read_only=True)
    assert [reopened.read_payload(i) for i in range(2)] == [b"one", b"replacement"]
    assert len(reopened.records) == 2
    reopened.close()


def test_a_full_medium_overflows_unless_it_may_grow(tmp_path):
    size = CTL_LENGTH + 4 * MARK_LENGTH + 1000
    tape = VirtualTape.open(str(tmp_path / "small.vt"), size, read_only=False)
    tape.append(b"x" * 100)
    with pytest.raises(VolumeOverflow):
        tape.append(b"x" * 2000)
    tape.finish()
    tape.growable = True
    tape.append(b"x" * 2000)                      # grows by a step instead
    assert tape.size > size
    tape.close()


@pytest.mark.parametrize("content", [b"not a tape at all" * 100, b"ISVTCTRL" + bytes(200)])
def test_a_file_that_is_not_a_virtual_tape_is_refused(tmp_path, content):
    path = tmp_path / "bad.vt"
    path.write_bytes(content)
    with pytest.raises(TapeFileError):
        VirtualTape.open(str(path), None, read_only=True)


def test_a_record_cut_off_by_a_crash_is_not_read(tmp_path):
    tape = written(tmp_path / "t.vt", records=[b"a" * 500, b"b" * 5000])
    tape.close()
    raw = (tmp_path / "t.vt").read_bytes()
    second = CTL_LENGTH + 2 * MARK_LENGTH + 504
    (tmp_path / "t.vt").write_bytes(raw[:second + MARK_LENGTH + 100])   # half its payload
    reopened = VirtualTape.open(str(tmp_path / "t.vt"), None, read_only=True)
    assert [r.length for r in reopened.records] == [500]
    reopened.close()


def test_a_cut_off_file_ends_where_its_records_end(tmp_path):
    tape = written(tmp_path / "t.vt", records=[b"a" * 500, b"b" * 500])
    tape.close()
    raw = (tmp_path / "t.vt").read_bytes()
    second = CTL_LENGTH + 2 * MARK_LENGTH + 504   # BOT, the first record: the second mark
    (tmp_path / "t.vt").write_bytes(raw[:second + 10])   # power lost while writing it
    reopened = VirtualTape.open(str(tmp_path / "t.vt"), None, read_only=True)
    assert [r.length for r in reopened.records] == [500]
    reopened.close()
