"""DvdDevice: a read-only DVD-ROM drive (MMC-6) whose discs are image files (UnitType DVD).

It is a DiskDevice with 2048-byte blocks, a removable medium and the MMC commands an OS
needs to mount and boot from an ISO: GET CONFIGURATION, GET EVENT STATUS NOTIFICATION, READ
TOC/PMA/ATIP, READ DISC INFORMATION, READ DISC STRUCTURE, MECHANISM STATUS, READ(10)/(12),
READ CAPACITY, PREVENT ALLOW MEDIUM REMOVAL, START STOP UNIT (eject/load). Unlike the C
istgt, a disc that arrives raises NOT READY TO READY CHANGE, MEDIUM MAY HAVE CHANGED (28/00)
for every I_T nexus, and GET EVENT STATUS NOTIFICATION reports NewMedia / MediaRemoval.
"""

from __future__ import annotations

import dataclasses
import logging
import struct
import threading
from typing import Any

from istgt.scsi import sbc, spc
from istgt.scsi.command import ITNexus, ScsiTask, u16
from istgt.scsi.constants import Asc, Opcode, PeripheralDeviceType, SenseKey
from istgt.scsi.modepages import ModePages, PageDefinition, _page, disk_page_definitions
from istgt.scsi.sense import CheckCondition, invalid_field_in_cdb

log = logging.getLogger(__name__)

DVD_BLOCK = 2048
PROFILE_CD_ROM = 0x0008
PROFILE_DVD_ROM = 0x0010
MSF_OFFSET = 150             # frames before LBA 0 (MMC: the 2 s pre-gap)
LEAD_OUT = 0xAA
FIRST_PSN = 0x030000         # where a DVD-ROM's data zone starts

# GET EVENT STATUS NOTIFICATION: media event codes and the classes we know
EVENT_NO_CHANGE, EVENT_EJECT_REQUEST, EVENT_NEW_MEDIA, EVENT_MEDIA_REMOVAL = 0, 1, 2, 3
CLASS_OPERATIONAL, CLASS_POWER, CLASS_EXTERNAL, CLASS_MEDIA = 1, 2, 3, 4
SUPPORTED_CLASSES = (1 << CLASS_OPERATIONAL) | (1 << CLASS_POWER) | (1 << CLASS_EXTERNAL) \
    | (1 << CLASS_MEDIA)


def dvd_page_definitions() -> list[PageDefinition]:
    pages = [p for p in disk_page_definitions(write_cache=False, read_cache=True)
             if p.page in (0x08, 0x0A, 0x1C)]
    # MM Capabilities and Mechanical Status: reads DVD-ROM and CD-ROM media; a tray that
    # ejects and locks.
    capabilities = _page(0x2A, 0, 30, {2: 0x08, 4: 0x00, 6: 0x29})
    return [*pages, PageDefinition(0x2A, 0, capabilities, _page(0x2A, 0, 30, {}))]


class DvdDevice(sbc.DiskDevice):
    """One DVD LUN: `DvdDevice(lu, lun, backend_or_None)`; None is an empty drive."""

    peripheral_type = PeripheralDeviceType.CD_DVD
    # MMC: a host polls these while a unit attention waits, which stays pending for it
    UA_EXEMPT = sbc.DiskDevice.UA_EXEMPT | {0x46, 0x4A}

    def __init__(self, lu: Any, lun: Any, backend: Any | None) -> None:
        super().__init__(lu, lun, backend if backend is not None else sbc.NoStore(DVD_BLOCK))
        self.read_only = True                      # nothing writes through MMC here
        self.thin = False
        self.provisioning = dataclasses.replace(self.provisioning, thin=False,
                                                zeroes_unmapped=False)
        self.atomic_journal = None
        self.table = DVD_COMMANDS
        self.mode_pages = ModePages(dvd_page_definitions())
        self.removable = True
        self.medium.removable = True
        self.media_path: str | None = None if backend is None else lun.path
        self._media_lock = threading.Lock()
        # guarded by _state_lock: the media event each nexus has yet to see (GESN)
        self._media_events: dict[ITNexus, int] = {}
        if backend is None:
            self.medium.operator_eject()

    # --- media -----------------------------------------------------------------------------

    def supported_vpd_pages(self) -> list[int]:
        return [0x00, 0x80, 0x83, 0x86]

    def notice_growth(self) -> None:
        """A disc does not grow: another image comes with change_medium."""

    def resize(self, size: int | None = None) -> int:
        raise ValueError("a DVD's size is its disc's: change the disc instead")

    def device_specific_parameter(self) -> int:
        return 0     # MMC: no WP/DPOFUA bits in the mode parameter header

    def block_descriptor(self, long_lba: bool) -> bytes:
        if not self.medium.loaded:
            return bytes(16 if long_lba else 8)
        return super().block_descriptor(long_lba)

    def _media_event(self, code: int) -> None:
        with self._state_lock:
            for nexus in self._unit_attentions:
                self._media_events[nexus] = code

    def take_media_event(self, nexus: ITNexus) -> int:
        with self._state_lock:
            return self._media_events.pop(nexus, EVENT_NO_CHANGE)

    def operator_unload(self) -> bool:
        if not self.medium.operator_eject():
            return False
        self._media_event(EVENT_MEDIA_REMOVAL)
        return True

    def operator_load(self) -> bool:
        if self.media_path is None:
            return False                 # an empty tray closes on nothing
        if self.medium.operator_load():
            self._queue_unit_attention(Asc.NOT_READY_TO_READY_CHANGE)
            self._media_event(EVENT_NEW_MEDIA)
        return True

    def change_medium(self, backend: Any | None, path: str | None) -> bool:
        """Swap the disc (istgtcontrol change): None empties the drive. False when an
        initiator prevents removal. The old image is closed."""
        with self._media_lock:
            if self.medium.loaded and self.medium.prevented:
                return False
            self.medium.operator_eject()
            old = self.backend
            with self.extents.exclusive(0, max(self.block_count, 1)):
                self.backend = backend if backend is not None else sbc.NoStore(DVD_BLOCK)
                self.block_count = self.backend.size // self.block_length
                self.media_path = path if backend is not None else None
            old.close()
            if backend is None:
                self._media_event(EVENT_MEDIA_REMOVAL)
                return True
            self.medium.operator_load()
        self._queue_unit_attention(Asc.NOT_READY_TO_READY_CHANGE)
        self._media_event(EVENT_NEW_MEDIA)
        return True


# --- MMC handlers ----------------------------------------------------------------------------


# Features that are always current (MMC: Persistent); the others come and go with the disc
PERSISTENT_FEATURES = frozenset({0x0000, 0x0001, 0x0003})


def _feature(code: int, current: bool, body: bytes = b"", version: int = 0) -> bytes:
    persistent = 0x02 if code in PERSISTENT_FEATURES else 0
    flags = (version << 2) | persistent | (0x01 if current else 0)
    return struct.pack(">HBB", code, flags, len(body)) + body


def get_configuration(device: DvdDevice, task: ScsiTask) -> None:
    cdb = task.cdb
    request_type = cdb[1] & 0x03
    start = u16(cdb, 2)
    allocation_length = u16(cdb, 7)
    if request_type == 3:
        raise invalid_field_in_cdb(1, 1)
    loaded = device.medium.loaded
    features = [
        (0x0000, True, struct.pack(">HBxHBx", PROFILE_DVD_ROM, 0x01 if loaded else 0,
                                    PROFILE_CD_ROM, 0)),
        (0x0001, True, struct.pack(">IBxxx", 1, 0), 1),       # Core: SCSI family
        (0x0003, True, struct.pack(">Bxxx", 0x29)),          # Removable: tray, eject, lock
        (0x0010, loaded, struct.pack(">IHBx", DVD_BLOCK, 1, 0)),   # Random Readable
        (0x001D, loaded, b""),                               # Multi-Read
        (0x001E, False, struct.pack(">Bxxx", 0), 2),          # CD Read
        (0x001F, loaded, struct.pack(">Bxxx", 0), 1),         # DVD Read
    ]
    body = bytearray()
    for code, current, data, *version in features:
        if request_type == 2 and code != start:
            continue
        if code < start or (request_type == 1 and not current):
            continue
        body += _feature(code, current, data, version[0] if version else 0)
    profile = PROFILE_DVD_ROM if loaded else 0
    header = struct.pack(">IxxH", 4 + len(body), profile)
    spc.respond(task, header + bytes(body), allocation_length)


def get_event_status_notification(device: DvdDevice, task: ScsiTask) -> None:
    cdb = task.cdb
    if not cdb[1] & 0x01:                     # asynchronous operation is not supported
        raise invalid_field_in_cdb(1, 0)
    requested = cdb[4]
    allocation_length = u16(cdb, 7)
    wanted = requested & SUPPORTED_CLASSES
    if not wanted:
        data = struct.pack(">HBB", 2, 0x80, SUPPORTED_CLASSES)       # NEA
        spc.respond(task, data, allocation_length)
        return
    if wanted & (1 << CLASS_MEDIA):
        event = device.take_media_event(task.nexus)
        present = 0x02 if device.medium.loaded else 0x01     # media present / tray open
        descriptor = struct.pack(">BBBB", event, present, 0, 0)
        notification_class = CLASS_MEDIA
    else:
        notification_class = min(c for c in range(8) if wanted & (1 << c))
        descriptor = bytes(4)         # no change; power class: byte 1 = 1 (active)
        if notification_class == CLASS_POWER:
            descriptor = bytes([0, 1, 0, 0])
    data = struct.pack(">HBB", 2 + len(descriptor), notification_class,
                       SUPPORTED_CLASSES) + descriptor
    spc.respond(task, data, allocation_length)


def _address(lba: int, msf: bool) -> bytes:
    if not msf:
        return struct.pack(">I", lba)
    frames = lba + MSF_OFFSET
    if frames // (75 * 60) > 0xFF:          # past what MSF can say (about 2.3 GB of CD)
        return bytes([0, 0xFF, 59, 74])
    return bytes([0, frames // (75 * 60), (frames // 75) % 60, frames % 75])


def read_toc(device: DvdDevice, task: ScsiTask) -> None:
    cdb = task.cdb
    msf = bool(cdb[1] & 0x02)
    toc_format = cdb[2] & 0x0F or (cdb[9] >> 6)
    track = cdb[6]
    allocation_length = u16(cdb, 7)
    blocks = device.block_count
    if toc_format == 0:
        if track not in (0, 1, LEAD_OUT):
            raise invalid_field_in_cdb(6)
        entries = []
        if track in (0, 1):
            entries.append(struct.pack(">xBBx", 0x14, 1) + _address(0, msf))
        entries.append(struct.pack(">xBBx", 0x14, LEAD_OUT) + _address(blocks, msf))
        body = b"".join(entries)
        data = struct.pack(">HBB", 2 + len(body), 1, 1) + body
    elif toc_format == 1:                       # session information
        body = struct.pack(">xBBx", 0x14, 1) + _address(0, msf)
        data = struct.pack(">HBB", 2 + len(body), 1, 1) + body
    else:
        raise invalid_field_in_cdb(2, 3)
    spc.respond(task, data, allocation_length)


def read_disc_information(device: DvdDevice, task: ScsiTask) -> None:
    cdb = task.cdb
    data_type = cdb[1] & 0x07
    allocation_length = u16(cdb, 7)
    if data_type != 0:
        raise invalid_field_in_cdb(1, 2)
    data = bytearray(34)
    struct.pack_into(">H", data, 0, 32)
    data[2] = 0x0E          # not erasable, last session complete, disc finalized
    data[3] = 1             # first track on disc
    data[4] = 1             # sessions
    data[5] = 1             # first track in the last session
    data[6] = 1             # last track in the last session
    data[7] = 0x20          # URU: unrestricted use
    data[8] = 0x00          # disc type: CD-DA or CD-ROM / other media
    struct.pack_into(">II", data, 16, 0xFFFFFFFF, 0xFFFFFFFF)   # no lead-in/out to record
    spc.respond(task, bytes(data), allocation_length)


def read_disc_structure(device: DvdDevice, task: ScsiTask) -> None:
    cdb = task.cdb
    media_type = cdb[1] & 0x0F
    structure = cdb[7]
    allocation_length = u16(cdb, 8)
    if media_type != 0:                           # not a DVD structure (BD and others)
        raise invalid_field_in_cdb(1, 3)
    if structure == 0x00:                         # physical format information
        body = bytearray(2048)
        body[0] = 0x01                            # DVD-ROM, part version 1
        body[1] = 0x0F                            # 120 mm, maximum rate not specified
        body[2] = 0x01                            # one layer, embossed data
        struct.pack_into(">II", body, 4, FIRST_PSN, FIRST_PSN + max(device.block_count, 1) - 1)
    elif structure == 0x01:                       # copyright: no protection, all regions
        body = bytearray(4)
    else:
        raise invalid_field_in_cdb(7)
    data = struct.pack(">Hxx", 2 + len(body)) + bytes(body)
    spc.respond(task, data, allocation_length)


def mechanism_status(device: DvdDevice, task: ScsiTask) -> None:
    allocation_length = u16(task.cdb, 8)
    loaded = device.medium.loaded
    header = struct.pack(">BBxxxBH", 0, 0 if loaded else 0x10, 1, 4)   # door open when empty
    slot = bytes([0x80 if loaded else 0, 0, 0, 0])
    spc.respond(task, header + slot, allocation_length)


def read_capacity_10(device: DvdDevice, task: ScsiTask) -> None:
    task.data_in = struct.pack(">II", max(device.block_count - 1, 0), DVD_BLOCK)


def start_stop_unit(device: DvdDevice, task: ScsiTask) -> None:
    """LOEJ with START=0 ejects (refused while prevented), with START=1 loads the tray's
    disc again; without LOEJ nothing changes."""
    cdb = task.cdb
    if cdb[4] >> 4 or not cdb[4] & 0x02:
        return
    if cdb[4] & 0x01:
        device.operator_load()
    elif not device.operator_unload():
        raise CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.MEDIUM_REMOVAL_PREVENTED)


# --- the opcode table --------------------------------------------------------------------------

_spec = sbc._spec
_IN, _NONE = sbc._IN, sbc._NONE
_MEDIUM = {"medium_access": True}
_ALLOC10 = ((7, 0xFF), (8, 0xFF))

DVD_COMMANDS = sbc.CommandTable([
    *sbc._RESERVATION_COMMANDS,
    *(spec for spec in sbc.DISK_COMMANDS.specs if spec.opcode in (
        Opcode.TEST_UNIT_READY, Opcode.REQUEST_SENSE, Opcode.INQUIRY, Opcode.MODE_SENSE_6,
        Opcode.MODE_SENSE_10, Opcode.MODE_SELECT_6, Opcode.MODE_SELECT_10, Opcode.REPORT_LUNS,
        Opcode.PREVENT_ALLOW_MEDIUM_REMOVAL, Opcode.READ_10, Opcode.READ_12)
      or (spec.opcode == Opcode.MAINTENANCE_IN and spec.service_action in (0x0C, 0x0D))),
    _spec(Opcode.START_STOP_UNIT, "START STOP UNIT", start_stop_unit, _NONE,
          ((1, 0x01), (4, 0xF3))),
    _spec(Opcode.READ_CAPACITY_10, "READ CAPACITY(10)", read_capacity_10, _IN,
          (*sbc._LBA10, (8, 0x01)), **_MEDIUM),
    _spec(0x43, "READ TOC/PMA/ATIP", read_toc, _IN,
          ((1, 0x02), (2, 0x0F), (6, 0xFF), *_ALLOC10, (9, 0xC0)), **_MEDIUM),
    _spec(0x46, "GET CONFIGURATION", get_configuration, _IN,
          ((1, 0x03), (2, 0xFF), (3, 0xFF), *_ALLOC10)),
    _spec(0x4A, "GET EVENT STATUS NOTIFICATION", get_event_status_notification, _IN,
          ((1, 0x01), (4, 0xFF), *_ALLOC10)),
    _spec(0x51, "READ DISC INFORMATION", read_disc_information, _IN,
          ((1, 0x07), *_ALLOC10), **_MEDIUM),
    _spec(0xAD, "READ DISC STRUCTURE", read_disc_structure, _IN,
          ((1, 0x0F), (2, 0xFF), (3, 0xFF), (4, 0xFF), (5, 0xFF), (6, 0xFF), (7, 0xFF),
           (8, 0xFF), (9, 0xFF), (10, 0xC0)), **_MEDIUM),
    _spec(0xBD, "MECHANISM STATUS", mechanism_status, _IN, ((8, 0xFF), (9, 0xFF))),
])
