"""TapeDevice: a tape drive (SSC-3) whose cartridges are istgt's virtual tape files (.vt).

A DiskDevice underneath for what every LU shares (unit attentions, reservations, INQUIRY,
mode pages, medium prevention), with sequential-access commands on a `lu.vtape.VirtualTape`:
READ(6) and WRITE(6) in fixed and variable mode, WRITE FILEMARKS, SPACE (blocks, filemarks,
end of data), REWIND, LOCATE(10), READ POSITION (short and long), READ BLOCK LIMITS, ERASE,
LOAD UNLOAD. Positions are SSC logical object numbers from 0 (the C istgt reported them one
too high). Sense carries FILEMARK, EOM and ILI with the residual in INFORMATION.
"""

from __future__ import annotations

import logging
import struct
import threading
from typing import Any

from istgt.lu.vtape import MAX_RECORD, VirtualTape, VolumeOverflow
from istgt.scsi import sbc
from istgt.scsi.command import ScsiTask, u24, u32
from istgt.scsi.constants import Asc, Opcode, PeripheralDeviceType, SenseKey
from istgt.scsi.modepages import ModePages, PageDefinition, _page, disk_page_definitions
from istgt.scsi.sense import EOM, FILEMARK, ILI, CheckCondition, invalid_field_in_cdb

log = logging.getLogger(__name__)

VOLUME_OVERFLOW = 0x0D
FILEMARK_DETECTED = 0x0001
END_OF_PARTITION_DETECTED = 0x0002
BEGINNING_OF_PARTITION_DETECTED = 0x0004
END_OF_DATA_DETECTED = 0x0005
BUFFERED_MODE = 0x10               # device-specific parameter: writes are buffered (mode 1)


def tape_page_definitions() -> list[PageDefinition]:
    shared = [p for p in disk_page_definitions(write_cache=True, read_cache=True)
              if p.page in (0x0A, 0x1C)]
    return [
        *shared,
        # Data Compression: data compression capable, no compression performed (DCE=0)
        PageDefinition(0x0F, 0, _page(0x0F, 0, 16, {2: 0x40, 3: 0x80}),
                       _page(0x0F, 0, 16, {})),
        # Device Configuration: report early warning, one partition, no buffered setmarks
        PageDefinition(0x10, 0, _page(0x10, 0, 16, {8: 0x18}), _page(0x10, 0, 16, {})),
        PageDefinition(0x11, 0, _page(0x11, 0, 10, {}), _page(0x11, 0, 10, {})),
    ]


class TapeDevice(sbc.DiskDevice):
    """One tape LUN: `TapeDevice(lu, lun, tape_or_None)`."""

    peripheral_type = PeripheralDeviceType.SEQUENTIAL_ACCESS

    def quick(self, cdb: bytes) -> bool:
        return False         # tape motion and filemarks: always on the LU's workers

    def __init__(self, lu: Any, lun: Any, tape: VirtualTape | None) -> None:
        # the tape itself is in self.tape; DiskDevice only needs a store of one block
        super().__init__(lu, lun, sbc.NoStore(512))
        self.thin = False
        self.atomic_journal = None
        self.table = TAPE_COMMANDS
        self.mode_pages = ModePages(tape_page_definitions())
        self.removable = True
        self.medium.removable = True
        self.tape = tape
        self.media_path: str | None = None if tape is None else lun.path
        self.lu_read_only = bool(getattr(lu, "read_only", False))
        self.write_protected = self.lu_read_only or (tape is not None and tape.read_only)
        self.fixed_block_length = 0            # 0: variable-length records
        self.position = 0                      # guarded by _tape_lock: next object number
        # guards tape, position and media_path: every tape command holds it throughout,
        # so a cartridge change never lands in the middle of one (re-entrant: helpers too)
        self._tape_lock = threading.RLock()
        if tape is None:
            self.medium.operator_eject()

    # --- what DiskDevice's SPC handlers ask ------------------------------------------------

    def supported_vpd_pages(self) -> list[int]:
        return [0x00, 0x80, 0x83]

    def device_specific_parameter(self) -> int:
        return (0x80 if self.write_protected else 0) | BUFFERED_MODE

    def block_descriptor(self, long_lba: bool) -> bytes:
        if long_lba:
            return struct.pack(">Q4xI", 0, self.fixed_block_length)
        return struct.pack(">II", 0, self.fixed_block_length & 0xFFFFFF)   # density 0

    def select_block_descriptor(self, descriptor: bytes | memoryview, long_lba: bool) -> None:
        """MODE SELECT's block descriptor sets the fixed block length (0: variable)."""
        length = u32(bytes(descriptor), 12) if long_lba else u24(bytes(descriptor), 5)
        if length > MAX_RECORD:
            raise CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_PARAMETER_LIST,
                                 field_pointer=12 if long_lba else 5, cd=False)
        self.fixed_block_length = length

    def notice_growth(self) -> None:
        """A cartridge's capacity is its own business."""

    def resize(self, size: int | None = None) -> int:
        raise ValueError("a tape is not resized: its medium grows when flagged extend/dynamic")

    def flush(self) -> None:
        if self.tape is not None:
            self.tape.flush()

    def close(self) -> None:
        if self.tape is not None:
            self.tape.close()

    # --- cartridges ------------------------------------------------------------------------

    def operator_unload(self) -> bool:
        if not self.medium.operator_eject():
            return False
        with self._tape_lock:
            self.position = 0
        return True

    def operator_load(self) -> bool:
        if self.tape is None:
            return False
        if self.medium.operator_load():
            with self._tape_lock:
                self.position = 0
            self._queue_unit_attention(Asc.NOT_READY_TO_READY_CHANGE)
        return True

    def change_medium(self, tape: VirtualTape | None, path: str | None) -> bool:
        with self._tape_lock:
            if self.medium.loaded and self.medium.prevented:
                return False
            self.medium.operator_eject()
            old, self.tape = self.tape, tape
            self.media_path = path if tape is not None else None
            self.position = 0
            self.write_protected = self.lu_read_only or (tape is not None and tape.read_only)
            if old is not None:
                old.flush()
                old.close()
        if tape is None:
            return True
        self.medium.operator_load()
        self._queue_unit_attention(Asc.NOT_READY_TO_READY_CHANGE)
        return True



# --- SSC handlers ----------------------------------------------------------------------------


def _loaded_tape(device: TapeDevice) -> VirtualTape:
    tape = device.tape
    if tape is None or not device.medium.loaded:
        raise CheckCondition(SenseKey.NOT_READY, Asc.MEDIUM_NOT_PRESENT)
    return tape


def _check_writable(device: TapeDevice) -> None:
    if device.write_protected:
        raise CheckCondition(SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED)


def _whole_command(handler: Any) -> Any:
    """Run a tape handler with the drive's lock held from start to end."""
    def locked(device: TapeDevice, task: ScsiTask) -> None:
        with device._tape_lock:
            handler(device, task)
    locked.__name__ = handler.__name__
    return locked


def _overflow(residual: int) -> CheckCondition:
    return CheckCondition(VOLUME_OVERFLOW, END_OF_PARTITION_DETECTED, info=residual, stream=EOM)


def read_block_limits(device: TapeDevice, task: ScsiTask) -> None:
    # granularity 0, maximum record length (24 bits), minimum 1 byte
    task.data_in = bytes([0]) + (MAX_RECORD - 1).to_bytes(3, "big") + (1).to_bytes(2, "big")


def rewind(device: TapeDevice, task: ScsiTask) -> None:
    _loaded_tape(device)
    device.position = 0


def read6(device: TapeDevice, task: ScsiTask) -> None:
    cdb = task.cdb
    fixed, sili = bool(cdb[1] & 0x01), bool(cdb[1] & 0x02)
    count = u24(cdb, 2)
    if fixed and sili:
        raise invalid_field_in_cdb(1, 1)
    if fixed and not device.fixed_block_length:
        raise invalid_field_in_cdb(1, 0)
    if fixed and count * device.fixed_block_length > sbc.MAX_TRANSFER_BYTES:
        raise invalid_field_in_cdb(2)               # more than one command may move
    tape = _loaded_tape(device)
    if count == 0:
        return
    if fixed:
        _read_fixed(device, tape, task, count)
    else:
        _read_variable(device, tape, task, count, sili)


def _read_variable(device: TapeDevice, tape: VirtualTape, task: ScsiTask, wanted: int,
                   sili: bool) -> None:
    if device.position >= len(tape.records):
        raise CheckCondition(SenseKey.BLANK_CHECK, END_OF_DATA_DETECTED, info=wanted)
    record = tape.records[device.position]
    device.position += 1
    if record.filemark:
        raise CheckCondition(SenseKey.NO_SENSE, FILEMARK_DETECTED, info=wanted, stream=FILEMARK)
    data = tape.read_payload(device.position - 1)
    task.data_in = data[:wanted]
    if len(data) != wanted and not sili:
        # Incorrect length: the residual is what was asked for minus the record's length
        # (negative when the record was longer and its end was not transferred).
        condition = CheckCondition(SenseKey.NO_SENSE, Asc.NO_ADDITIONAL_SENSE,
                                   info=wanted - len(data), stream=ILI)
        condition.data_in = task.data_in                  # the data still goes to the host
        raise condition


def _read_fixed(device: TapeDevice, tape: VirtualTape, task: ScsiTask, blocks: int) -> None:
    length = device.fixed_block_length
    out = bytearray()
    for done in range(blocks):
        if device.position >= len(tape.records):
            condition = CheckCondition(SenseKey.BLANK_CHECK, END_OF_DATA_DETECTED,
                                       info=blocks - done)
            condition.data_in = bytes(out)
            raise condition
        record = tape.records[device.position]
        device.position += 1
        if record.filemark:
            condition = CheckCondition(SenseKey.NO_SENSE, FILEMARK_DETECTED, info=blocks - done,
                                       stream=FILEMARK)
            condition.data_in = bytes(out)
            raise condition
        data = tape.read_payload(device.position - 1)
        out += data[:length]
        if len(data) != length:
            # requested minus the blocks read; the wrong-length one is not counted
            condition = CheckCondition(SenseKey.NO_SENSE, Asc.NO_ADDITIONAL_SENSE,
                                       info=blocks - done, stream=ILI)
            condition.data_in = bytes(out)
            raise condition
    task.data_in = bytes(out)


def write6(device: TapeDevice, task: ScsiTask) -> None:
    cdb = task.cdb
    fixed = bool(cdb[1] & 0x01)
    count = u24(cdb, 2)
    if fixed and not device.fixed_block_length:
        raise invalid_field_in_cdb(1, 0)
    length = count * device.fixed_block_length if fixed else count
    task.data_out_length = length
    if not fixed and length > MAX_RECORD:
        raise invalid_field_in_cdb(2)
    tape = _loaded_tape(device)
    _check_writable(device)
    if count == 0:
        return
    data = sbc.data_out(task, length)
    tape.truncate(device.position)        # writing ends the tape here
    records = [bytes(data[i:i + device.fixed_block_length])
               for i in range(0, length, device.fixed_block_length)] if fixed \
        else [bytes(data)]
    written = 0
    try:
        for record in records:
            tape.append(record)
            written += 1
    except VolumeOverflow:
        raise _overflow(len(records) - written if fixed else length) from None
    except OSError as exc:
        raise CheckCondition(SenseKey.MEDIUM_ERROR, Asc.WRITE_ERROR) from exc
    finally:
        device.position = len(tape.records)
    try:
        tape.finish()
    except OSError as exc:
        log.error("tape %s: filemark table not saved: %s", tape.path, exc)
        raise CheckCondition(SenseKey.MEDIUM_ERROR, Asc.WRITE_ERROR) from None


def write_filemarks(device: TapeDevice, task: ScsiTask) -> None:
    count = u24(task.cdb, 2)
    tape = _loaded_tape(device)
    _check_writable(device)
    if count == 0:
        tape.flush()                   # WRITE FILEMARKS 0: flush the buffer
        return
    tape.truncate(device.position)
    try:
        for written in range(count):
            tape.append(None)
    except VolumeOverflow:
        raise _overflow(count - written) from None
    finally:
        device.position = len(tape.records)
        tape.finish()
    tape.flush()


def space6(device: TapeDevice, task: ScsiTask) -> None:
    cdb = task.cdb
    code = cdb[1] & 0x0F
    count = int.from_bytes(cdb[2:5], "big", signed=True)
    tape = _loaded_tape(device)
    records = tape.records
    if code == 3:                                   # end of data
        device.position = len(records)
    elif code == 0:
        _space_blocks(device, records, count)
    elif code == 1:
        _space_filemarks(device, records, count)
    else:
        raise invalid_field_in_cdb(1, 3)


def _space_blocks(device: TapeDevice, records: list, count: int) -> None:
    step = 1 if count > 0 else -1
    for done in range(abs(count)):
        if step > 0:
            if device.position >= len(records):
                raise CheckCondition(SenseKey.BLANK_CHECK, END_OF_DATA_DETECTED,
                                     info=abs(count) - done)
            record = records[device.position]
            device.position += 1
            if record.filemark:                        # stops after the filemark
                raise CheckCondition(SenseKey.NO_SENSE, FILEMARK_DETECTED,
                                     info=abs(count) - done, stream=FILEMARK)
        else:
            if device.position == 0:              # residual: requested minus done, signed
                raise CheckCondition(SenseKey.NO_SENSE, BEGINNING_OF_PARTITION_DETECTED,
                                     info=-(abs(count) - done), stream=EOM)
            device.position -= 1
            if records[device.position].filemark:      # stops before it, on its BOP side
                raise CheckCondition(SenseKey.NO_SENSE, FILEMARK_DETECTED,
                                     info=-(abs(count) - done), stream=FILEMARK)


def _space_filemarks(device: TapeDevice, records: list, count: int) -> None:
    remaining = abs(count)
    if count > 0:
        while remaining:
            if device.position >= len(records):
                raise CheckCondition(SenseKey.BLANK_CHECK, END_OF_DATA_DETECTED, info=remaining)
            device.position += 1
            if records[device.position - 1].filemark:
                remaining -= 1
    else:
        while remaining:
            if device.position == 0:
                raise CheckCondition(SenseKey.NO_SENSE, BEGINNING_OF_PARTITION_DETECTED,
                                     info=-remaining, stream=EOM)
            device.position -= 1
            if records[device.position].filemark:
                remaining -= 1


def erase6(device: TapeDevice, task: ScsiTask) -> None:
    """ERASE from the current position to the end (at BOP: a fresh cartridge)."""
    tape = _loaded_tape(device)
    _check_writable(device)
    if device.position == 0:
        tape.format()
    else:
        tape.truncate(device.position)
        tape.finish()
        tape.flush()


def load_unload(device: TapeDevice, task: ScsiTask) -> None:
    flags = task.cdb[4]
    load, hold = bool(flags & 0x01), bool(flags & 0x08)
    if flags & 0x04 and load:                          # EOT with LOAD
        raise invalid_field_in_cdb(4, 2)
    if load:
        if not device.operator_load():
            raise CheckCondition(SenseKey.NOT_READY, Asc.MEDIUM_NOT_PRESENT)
        if not hold:
            device.position = 0
        return
    _loaded_tape(device)
    if hold:
        device.position = 0
        return
    device.flush()
    if not device.operator_unload():
        raise CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.MEDIUM_REMOVAL_PREVENTED)


def locate10(device: TapeDevice, task: ScsiTask) -> None:
    cdb = task.cdb
    if cdb[1] & 0x02 and cdb[8]:                       # another partition: there is one
        raise invalid_field_in_cdb(8)
    address = u32(cdb, 3)
    tape = _loaded_tape(device)
    if address > len(tape.records):
        device.position = len(tape.records)
        raise CheckCondition(SenseKey.BLANK_CHECK, END_OF_DATA_DETECTED)
    device.position = address


def read_position(device: TapeDevice, task: ScsiTask) -> None:
    cdb = task.cdb
    service_action = cdb[1] & 0x1F
    tape = _loaded_tape(device)
    position = device.position
    files = sum(1 for record in tape.records[:position] if record.filemark)
    bop = 0x80 if position == 0 else 0
    if service_action in (0, 1):
        # position known, nothing buffered: first = last object, 0 objects and bytes
        if position > 0xFFFFFFFF:
            raise CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB)
        task.data_in = struct.pack(">BBxxIIx3sI", bop, 0, position, position, bytes(3), 0)
    else:                                       # long form
        task.data_in = struct.pack(">BxxxIQQQ", bop, 0, position, files, 0)


# --- the opcode table --------------------------------------------------------------------------

_spec = sbc._spec
_IN, _OUT, _NONE = sbc._IN, sbc._OUT, sbc._NONE
_MEDIUM = {"medium_access": True}
_COUNT = ((2, 0xFF), (3, 0xFF), (4, 0xFF))

TAPE_COMMANDS = sbc.CommandTable([
    *sbc._RESERVATION_COMMANDS,
    *(spec for spec in sbc.DISK_COMMANDS.specs if spec.opcode in (
        Opcode.TEST_UNIT_READY, Opcode.REQUEST_SENSE, Opcode.INQUIRY, Opcode.MODE_SENSE_6,
        Opcode.MODE_SENSE_10, Opcode.MODE_SELECT_6, Opcode.MODE_SELECT_10, Opcode.REPORT_LUNS,
        Opcode.PREVENT_ALLOW_MEDIUM_REMOVAL)
      or (spec.opcode == Opcode.MAINTENANCE_IN and spec.service_action in (0x0C, 0x0D))),
    _spec(0x01, "REWIND", _whole_command(rewind), _NONE, ((1, 0x01),), **_MEDIUM),
    _spec(0x05, "READ BLOCK LIMITS", read_block_limits, _IN, ()),
    _spec(0x08, "READ(6)", _whole_command(read6), _IN, ((1, 0x03), *_COUNT), **_MEDIUM),
    _spec(0x0A, "WRITE(6)", _whole_command(write6), _OUT, ((1, 0x01), *_COUNT), **_MEDIUM),
    _spec(0x10, "WRITE FILEMARKS(6)", _whole_command(write_filemarks), _NONE, ((1, 0x01), *_COUNT), **_MEDIUM),
    _spec(0x11, "SPACE(6)", _whole_command(space6), _NONE, ((1, 0x0F), *_COUNT), **_MEDIUM),
    _spec(0x19, "ERASE(6)", _whole_command(erase6), _NONE, ((1, 0x03),), **_MEDIUM),
    _spec(0x1B, "LOAD UNLOAD", _whole_command(load_unload), _NONE, ((1, 0x01), (4, 0x0F))),
    _spec(0x2B, "LOCATE(10)", _whole_command(locate10), _NONE,
          ((1, 0x07), (3, 0xFF), (4, 0xFF), (5, 0xFF), (6, 0xFF), (8, 0xFF)), **_MEDIUM),
    *(_spec(0x34, f"READ POSITION ({name})", _whole_command(read_position), _IN, ((7, 0xFF), (8, 0xFF)),
            service_action=sa, **_MEDIUM)
      for sa, name in ((0, "SHORT FORM - BLOCK ID"), (1, "SHORT FORM - VENDOR SPECIFIC"),
                       (6, "LONG FORM"))),
])
