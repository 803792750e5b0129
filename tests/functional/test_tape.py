"""A virtual tape drive (UnitType Tape) through our initiator: records and filemarks written,
rewound and read back one by one, positioning, fixed blocks, protection, a full medium, and
istgt's .vt file layout on disk."""

from __future__ import annotations

import struct

import pytest

from istgt.lu.vtape import CTL_LENGTH, MARK_LENGTH, VirtualTape
from tests.functional.conftest import CHECK_CONDITION, GOOD, NODE_BASE, asc_ascq, sense_key

TAPE = f"{NODE_BASE}:tape"
NO_SENSE, NOT_READY, UNIT_ATTENTION, DATA_PROTECT, BLANK_CHECK, VOLUME_OVERFLOW = \
    0, 2, 6, 7, 8, 0x0D
FILEMARK_BIT, EOM_BIT, ILI_BIT = 0x80, 0x40, 0x20


def tape_lu(path, flags="rw", size="64MB") -> str:
    return (f"[LogicalUnit7]\n  TargetName tape\n  Mapping PortalGroup1 InitiatorGroup1\n"
            f"  AuthMethod None\n  UnitType Tape\n  LUN0 Removable {flags} {path} {size}\n")


@pytest.fixture
def drive(target, tmp_path):
    """(initiator logged in to a tape LU with a fresh cartridge, the cartridge's path)."""
    cartridge = tmp_path / "cart.vt"
    target.config_path.write_text(target.config_path.read_text() + tape_lu(cartridge))
    target.server.reload()
    initiator = target.session(target=TAPE)
    return initiator, cartridge


def write(initiator, data: bytes, fixed_blocks: int | None = None):
    count = len(data) if fixed_blocks is None else fixed_blocks
    cdb = bytes([0x0A, 1 if fixed_blocks is not None else 0]) + count.to_bytes(3, "big") + b"\0"
    return initiator.scsi(cdb, data_out=data)


def read(initiator, length: int, sili=False, fixed_blocks: int | None = None, block=0):
    count = length if fixed_blocks is None else fixed_blocks
    flags = (0x02 if sili else 0) | (0x01 if fixed_blocks is not None else 0)
    wanted = length if fixed_blocks is None else fixed_blocks * block
    return initiator.scsi(bytes([0x08, flags]) + count.to_bytes(3, "big") + b"\0",
                          read_length=wanted)


def filemarks(initiator, count=1):
    return initiator.scsi(bytes([0x10, 0]) + count.to_bytes(3, "big") + b"\0")


def rewind(initiator):
    return initiator.scsi(bytes([0x01, 0, 0, 0, 0, 0]))


def space(initiator, code: int, count: int):
    return initiator.scsi(bytes([0x11, code]) + count.to_bytes(3, "big", signed=True) + b"\0")


def position(initiator) -> int:
    result = initiator.scsi(bytes([0x34, 0, 0, 0, 0, 0, 0, 0, 0, 0]), read_length=20)
    assert result.status == GOOD
    return struct.unpack_from(">I", result.data, 4)[0]


def information(sense: bytes) -> int:
    return struct.unpack_from(">i", sense, 3)[0]


def expect(result, key, asc, bits=0):
    assert result.status == CHECK_CONDITION, result
    assert (sense_key(result.sense), asc_ascq(result.sense)) == (key, asc)
    assert result.sense[2] & 0xE0 == bits


RECORDS = [b"first record", b"\x02" * 1000, b"third" * 77]
SECOND_FILE = [b"\x04" * 4096, b"last one"]


def write_two_files(initiator) -> None:
    for record in RECORDS:
        assert write(initiator, record).status == GOOD
    assert filemarks(initiator).status == GOOD
    for record in SECOND_FILE:
        assert write(initiator, record).status == GOOD
    assert filemarks(initiator).status == GOOD


def test_records_and_filemarks_read_back_one_by_one_after_a_rewind(drive):
    initiator, _ = drive
    write_two_files(initiator)
    assert position(initiator) == 7                  # 5 records and 2 filemarks
    assert rewind(initiator).status == GOOD and position(initiator) == 0
    for record in RECORDS:
        result = read(initiator, len(record))
        assert (result.status, result.data) == (GOOD, record)
    hit = read(initiator, 100)
    expect(hit, NO_SENSE, (0x00, 0x01), FILEMARK_BIT)   # FILEMARK DETECTED
    assert information(hit.sense) == 100
    for record in SECOND_FILE:
        assert read(initiator, len(record)).data == record
    expect(read(initiator, 10), NO_SENSE, (0x00, 0x01), FILEMARK_BIT)
    expect(read(initiator, 10), BLANK_CHECK, (0x00, 0x05))   # END-OF-DATA DETECTED


def test_a_record_of_another_length_is_reported_with_ili(drive):
    initiator, _ = drive
    write_two_files(initiator)
    rewind(initiator)
    longer = read(initiator, 100)                     # the record holds 12 bytes
    expect(longer, NO_SENSE, (0x00, 0x00), ILI_BIT)
    assert longer.data == RECORDS[0] and information(longer.sense) == 100 - len(RECORDS[0])
    shorter = read(initiator, 10)                     # the record holds 1000 bytes
    expect(shorter, NO_SENSE, (0x00, 0x00), ILI_BIT)
    assert shorter.data == RECORDS[1][:10] and information(shorter.sense) == 10 - 1000
    assert read(initiator, 4096, sili=True).status == GOOD        # SILI: no ILI


def test_positioning(drive):
    initiator, _ = drive
    write_two_files(initiator)
    locate = bytes([0x2B, 0, 0, 0, 0, 0, 2, 0, 0, 0])
    assert initiator.scsi(locate).status == GOOD and position(initiator) == 2
    assert read(initiator, len(RECORDS[2])).data == RECORDS[2]
    rewind(initiator)
    assert space(initiator, 1, 1).status == GOOD and position(initiator) == 4   # past mark 1
    assert read(initiator, len(SECOND_FILE[0])).data == SECOND_FILE[0]
    expect(space(initiator, 0, -3), NO_SENSE, (0x00, 0x01), FILEMARK_BIT)     # stops at it
    assert position(initiator) == 3
    assert space(initiator, 3, 0).status == GOOD and position(initiator) == 7   # end of data
    expect(space(initiator, 0, 1), BLANK_CHECK, (0x00, 0x05))
    rewind(initiator)
    expect(space(initiator, 1, 3), BLANK_CHECK, (0x00, 0x05))
    long_form = initiator.scsi(bytes([0x34, 6, 0, 0, 0, 0, 0, 0, 32, 0]), read_length=32)
    number, files = struct.unpack_from(">QQ", long_form.data, 8)
    assert (number, files) == (7, 2)


def test_fixed_block_mode(drive):
    initiator, _ = drive
    select = bytes([0x15, 0x10, 0, 0, 12, 0])
    parameters = bytes([0, 0, 0x10, 8]) + bytes([0, 0, 0, 0, 0]) + (512).to_bytes(3, "big")
    assert initiator.scsi(select, data_out=parameters).status == GOOD
    blocks = bytes(range(256)) * 8                    # 4 blocks of 512
    assert write(initiator, blocks, fixed_blocks=4).status == GOOD
    rewind(initiator)
    result = read(initiator, 0, fixed_blocks=4, block=512)
    assert (result.status, result.data) == (GOOD, blocks)
    limits = initiator.scsi(bytes([0x05, 0, 0, 0, 0, 0]), read_length=6)
    assert limits.status == GOOD and int.from_bytes(limits.data[4:6], "big") == 1


def test_the_cartridge_is_an_istgt_vt_file(drive, target):
    initiator, cartridge = drive
    write_two_files(initiator)
    raw = cartridge.read_bytes()
    assert raw[:8] == b"ISVTCTRL"
    assert raw[CTL_LENGTH:CTL_LENGTH + 8] == b"ISVTBOTB"
    first = CTL_LENGTH + MARK_LENGTH
    assert raw[first:first + 8] == b"ISVTDATA"
    assert struct.unpack_from("<QQ", raw, first + 32) == (len(RECORDS[0]), 1)   # lblen, lbpos
    reopened = VirtualTape.open(str(cartridge), None, read_only=True)
    assert [r.filemark for r in reopened.records] == [False] * 3 + [True] + [False] * 2 + [True]
    assert reopened.read_payload(4) == SECOND_FILE[0]
    reopened.close()


def test_unload_load_and_write_protection(target, tmp_path):
    target.config_path.write_text(target.config_path.read_text()
                                  + tape_lu(tmp_path / "ro.vt", flags="ro"))
    (tmp_path / "ro.vt").write_bytes(b"")             # an empty file: not formattable read-only
    target.server.reload()
    initiator = target.session(target=TAPE)
    expect(initiator.tur(), NOT_READY, (0x3A, 0x00))
    writable = VirtualTape.open(str(tmp_path / "w.vt"), 64 << 20, read_only=False)
    writable.close()
    unit = next(u for u in target.server.units.values() if u.name == TAPE)
    assert unit.devices[0].change_medium(VirtualTape.open(str(tmp_path / "w.vt"), None, True),
                                         str(tmp_path / "w.vt"))
    expect(initiator.tur(), UNIT_ATTENTION, (0x28, 0x00))
    expect(write(initiator, b"data"), DATA_PROTECT, (0x27, 0x00))
    unload = bytes([0x1B, 0, 0, 0, 0, 0])
    assert initiator.scsi(unload).status == GOOD
    expect(initiator.tur(), NOT_READY, (0x3A, 0x00))
    assert initiator.scsi(bytes([0x1B, 0, 0, 0, 1, 0])).status == GOOD    # load
    expect(initiator.tur(), UNIT_ATTENTION, (0x28, 0x00))


def test_a_full_medium_is_a_volume_overflow(target, tmp_path):
    target.config_path.write_text(target.config_path.read_text()
                                  + tape_lu(tmp_path / "small.vt", size="1MB"))
    target.server.reload()
    initiator = target.session(target=TAPE)
    record = b"\x55" * 65536
    results = [write(initiator, record) for _ in range(20)]
    assert results[0].status == GOOD
    full = next(r for r in results if r.status != GOOD)
    expect(full, VOLUME_OVERFLOW, (0x00, 0x02), EOM_BIT)
    good = sum(1 for r in results if r.status == GOOD)
    rewind(initiator)
    for _ in range(good):                              # what was written is all there
        assert read(initiator, len(record)).data == record


# --- regressions from review -------------------------------------------------------------------


def test_records_written_while_a_reload_runs_are_kept(drive, target, monkeypatch):
    """A tape LU changed by reload is built only once the old drive stopped, so the new
    one knows every record the old one acknowledged."""
    import istgt.reload as reload
    initiator, cartridge = drive
    assert write(initiator, b"one").status == GOOD and write(initiator, b"two").status == GOOD
    commit = reload._commit

    def write_during_reload(server, plan):
        assert write(initiator, b"three").status == GOOD    # after prepare, before commit
        return commit(server, plan)

    monkeypatch.setattr(reload, "_commit", write_during_reload)
    text = target.config_path.read_text()
    target.config_path.write_text(text.replace("cart.vt 64MB", "cart.vt 128MB"))
    assert TAPE in target.server.reload().rebuilt
    again = target.session(target=TAPE)
    assert space(again, 3, 0).status == GOOD and position(again) == 3
    assert write(again, b"four").status == GOOD
    tape = VirtualTape.open(str(cartridge), None, read_only=True)
    assert [tape.read_payload(i) for i in range(len(tape.records))] == \
        [b"one", b"two", b"three", b"four"]
    tape.close()


def test_residuals_count_what_was_not_done(drive):
    initiator, _ = drive
    write_two_files(initiator)
    rewind(initiator)
    assert space(initiator, 0, 1).status == GOOD
    bop = space(initiator, 0, -3)                 # one block back, then the beginning
    expect(bop, NO_SENSE, (0x00, 0x04), EOM_BIT)
    assert information(bop.sense) == -2
    select = bytes([0x15, 0x10, 0, 0, 12, 0])
    parameters = bytes([0, 0, 0x10, 8]) + bytes(5) + (512).to_bytes(3, "big")
    assert initiator.scsi(select, data_out=parameters).status == GOOD
    wrong = read(initiator, 0, fixed_blocks=4, block=512)     # the first record is 12 bytes
    expect(wrong, NO_SENSE, (0x00, 0x00), ILI_BIT)
    assert information(wrong.sense) == 4
    too_much = initiator.scsi(bytes([0x08, 1, 0xFF, 0xFF, 0xFF, 0]), read_length=512)
    expect(too_much, 5, (0x24, 0x00))             # more than one command may move
