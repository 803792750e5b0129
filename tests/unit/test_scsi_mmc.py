"""DvdDevice (istgt/scsi/mmc.py): a read-only DVD-ROM drive (MMC-6) whose discs are images.

Byte vectors for the MMC commands an initiator uses to find, mount and watch a disc (GET
CONFIGURATION, GET EVENT STATUS NOTIFICATION, READ TOC, READ DISC INFORMATION, READ DISC
STRUCTURE, MECHANISM STATUS), the removable-medium life cycle (START STOP UNIT, PREVENT ALLOW
MEDIUM REMOVAL, operator change/unload) and what a DVD keeps or drops from the disk table.
"""

from __future__ import annotations

import struct

import pytest

from istgt.lu.backends import MemoryBackend
from istgt.scsi.constants import Asc, ScsiStatus, SenseKey
from istgt.scsi.mmc import DVD_COMMANDS, DvdDevice
from istgt.scsi.sbc import DiskDevice
from tests.unit.test_scsi_disk import NEXUS, OTHER, expect_check, make_lu, make_lun, run, sense_of

DVD_BLOCK = 2048
IMAGE_BLOCKS = 64
PROFILE_DVD_ROM = 0x0010
PROFILE_CD_ROM = 0x0008
ALL_FEATURES = [0x0000, 0x0001, 0x0003, 0x0010, 0x001D, 0x001E, 0x001F]
SUPPORTED_EVENT_CLASSES = 0x1E          # operational change, power, external request, media
MEDIA_CLASS_REQUEST = 0x10               # bit 4 of the Notification Class Request
NEW_MEDIA, MEDIA_REMOVAL, NO_CHANGE = 2, 3, 0
MEDIA_PRESENT = 0x02                     # media event descriptor, byte 1
TRAY_OPEN = 0x01                         # ... and an empty drive's tray is open

TUR = [0x00] * 6
REQUEST_SENSE = [0x03, 0, 0, 0, 252, 0]
PREVENT = [0x1E, 0, 0, 0, 0x01, 0]
ALLOW = [0x1E, 0, 0, 0, 0x00, 0]
EJECT = [0x1B, 0, 0, 0, 0x02, 0]         # LOEJ=1 START=0
LOAD = [0x1B, 0, 0, 0, 0x03, 0]          # LOEJ=1 START=1
READ_CAPACITY = [0x25] + [0] * 9
REPORT_ALL_OPCODES = [0xA3, 0x0C, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0]


# --- building drives and images ----------------------------------------------------------


def image_bytes(blocks: int, seed: int) -> bytes:
    """Every 2048-byte block says which image (seed) and which block it is."""
    return b"".join(struct.pack(">II", seed, block) * (DVD_BLOCK // 8) for block in range(blocks))


def disc(blocks: int = IMAGE_BLOCKS, seed: int = 1) -> MemoryBackend:
    backend = MemoryBackend(blocks * DVD_BLOCK)
    backend.write(0, image_bytes(blocks, seed))
    return backend


def make_dvd(backend: MemoryBackend | None, known=(NEXUS,)) -> DvdDevice:
    """A DVD LUN as the config builds it; `backend` None is an empty drive. Each nexus in
    `known` has consumed its power-on unit attention, so the device knows it."""
    lun = make_lun(path="/x/a.iso", size=None, kind="removable", flags=("ro",))
    device = DvdDevice(make_lu(block_length=DVD_BLOCK), lun, backend)
    for nexus in known:
        expect_check(run(device, TUR, nexus=nexus), SenseKey.UNIT_ATTENTION,
                     Asc.POWER_ON_RESET_OR_BUS_DEVICE_RESET)
    return device


def good(device, cdb, nexus=NEXUS, data=None) -> bytes:
    """Run a command that must succeed; its Data-In."""
    task = run(device, cdb, nexus=nexus, data=data)
    assert task.status == ScsiStatus.GOOD, f"sense {bytes(task.sense).hex()}"
    return bytes(task.data_in or b"")


def expect_invalid_field(task, byte: int) -> None:
    expect_check(task, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB)
    assert task.sense[15] & 0xC0 == 0xC0, "SKSV and C/D: the pointer is into the CDB"
    assert struct.unpack(">H", task.sense[16:18])[0] == byte


def expect_not_present(task) -> None:
    expect_check(task, SenseKey.NOT_READY, Asc.MEDIUM_NOT_PRESENT)


def expect_medium_changed(device, nexus=NEXUS) -> None:
    """The nexus sees NOT READY TO READY CHANGE once, then the drive is ready."""
    expect_check(run(device, TUR, nexus=nexus), SenseKey.UNIT_ATTENTION,
                 Asc.NOT_READY_TO_READY_CHANGE)
    assert run(device, TUR, nexus=nexus).status == ScsiStatus.GOOD


# --- CDBs ----------------------------------------------------------------------------------


def inquiry(evpd=0, page=0, alloc=255):
    return [0x12, evpd, page, alloc >> 8, alloc & 0xFF, 0]


def read10(lba, blocks):
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def read12(lba, blocks):
    return struct.pack(">BBIIBB", 0xA8, 0, lba, blocks, 0, 0)


def get_configuration(request_type=0, start=0, alloc=0xFFFF):
    return struct.pack(">BBHxxxHB", 0x46, request_type, start, alloc, 0)


def get_event_status(classes=MEDIA_CLASS_REQUEST, polled=True, alloc=8):
    return struct.pack(">BBxxBxxHB", 0x4A, 0x01 if polled else 0, classes, alloc, 0)


def read_toc(toc_format=0, track=0, msf=False, alloc=0xFFFF):
    return struct.pack(">BBBxxxBHB", 0x43, 0x02 if msf else 0, toc_format, track, alloc, 0)


def read_disc_information(data_type=0, alloc=0xFFFF):
    return struct.pack(">BBxxxxxHB", 0x51, data_type, alloc, 0)


def read_disc_structure(structure=0, media_type=0, alloc=0xFFFF):
    return struct.pack(">BBxxxxxBHxB", 0xAD, media_type, structure, alloc, 0)


def mechanism_status(alloc=0xFFFF):
    return struct.pack(">BxxxxxxxHxB", 0xBD, alloc, 0)


def mode_sense6(page, alloc=255):
    return [0x1A, 0, page, 0, alloc, 0]


# --- decoding answers ----------------------------------------------------------------------


def features_of(data: bytes) -> list[tuple[int, int, bytes]]:
    """GET CONFIGURATION feature descriptors as (code, flags byte, additional data)."""
    end = 4 + struct.unpack(">I", data[:4])[0]
    found, offset = [], 8
    while offset < end:
        code, flags, length = struct.unpack(">HBB", data[offset : offset + 4])
        found.append((code, flags, data[offset + 4 : offset + 4 + length]))
        offset += 4 + length
    assert offset == end, "descriptors fill the data length exactly"
    return found


def current_profile(device) -> int:
    return struct.unpack(">H", good(device, get_configuration(alloc=8))[6:8])[0]


def media_event(device, nexus=NEXUS) -> tuple[int, int]:
    """(event code, media status) of a media-class GESN poll, after checking its header."""
    data = good(device, get_event_status(), nexus=nexus)
    assert data[:4] == bytes([0, 6, 4, SUPPORTED_EVENT_CLASSES])  # length 6, class Media
    assert data[6:8] == b"\x00\x00"                                 # start and end slot
    return data[4] & 0x0F, data[5]


def capacity(device) -> tuple[int, int]:
    return struct.unpack(">II", good(device, READ_CAPACITY))


def mode_pages_of(data: bytes) -> dict[int, bytes]:
    """MODE SENSE(6) answer: page code -> whole page."""
    pages, offset = {}, 4 + data[3]
    while offset < data[0] + 1:
        pages[data[offset] & 0x3F] = data[offset : offset + 2 + data[offset + 1]]
        offset += 2 + data[offset + 1]
    return pages


# --- identity: INQUIRY and the command table ----------------------------------------------


def test_dvd_is_a_read_only_disk_device_with_2048_byte_blocks():
    device = make_dvd(disc())
    assert isinstance(device, DiskDevice)
    assert device.read_only and device.removable
    assert (device.block_length, device.block_count) == (DVD_BLOCK, IMAGE_BLOCKS)


def test_inquiry_reports_cd_dvd_device_with_removable_medium():
    data = good(make_dvd(disc()), inquiry())
    assert data[0] == 0x05            # qualifier 0, peripheral device type 5 (CD/DVD)
    assert data[1] & 0x80             # RMB


def test_supported_vpd_pages_lists_only_the_generic_pages():
    data = good(make_dvd(disc()), inquiry(evpd=1, page=0x00))
    assert data == bytes([0x05, 0x00, 0x00, 4, 0x00, 0x80, 0x83, 0x86])


@pytest.mark.parametrize("page", [0x80, 0x83, 0x86])
def test_every_listed_vpd_page_is_answered(page):
    data = good(make_dvd(disc()), inquiry(evpd=1, page=page))
    assert data[0] == 0x05 and data[1] == page


@pytest.mark.parametrize("page", [0x8F, 0xB0, 0xB1, 0xB2])
def test_block_device_vpd_pages_are_not_offered(page):
    expect_invalid_field(run(make_dvd(disc()), inquiry(evpd=1, page=page)), 2)


@pytest.mark.parametrize(
    "cdb",
    [
        [0x0A, 0, 0, 0, 1, 0],                                    # WRITE(6)
        list(struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 1, 0)),        # WRITE(10)
        list(struct.pack(">BBIIBB", 0xAA, 0, 0, 1, 0, 0)),        # WRITE(12)
        list(struct.pack(">BBQIBB", 0x8A, 0, 0, 1, 0, 0)),        # WRITE(16)
        [0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0],                       # UNMAP
        [0x35] + [0] * 9,                                         # SYNCHRONIZE CACHE(10)
        [0x04, 0, 0, 0, 0, 0],                                    # FORMAT UNIT
    ],
    ids=["write6", "write10", "write12", "write16", "unmap", "sync10", "format"],
)
def test_disk_commands_that_change_data_are_invalid_opcodes(cdb):
    backend = disc()
    device = make_dvd(backend)
    task = run(device, cdb, data=bytes(DVD_BLOCK))
    expect_check(task, SenseKey.ILLEGAL_REQUEST, Asc.INVALID_COMMAND_OPERATION_CODE)
    assert backend.read(0, 2 * DVD_BLOCK) == image_bytes(2, seed=1)    # untouched


def test_report_supported_opcodes_matches_the_dvd_table():
    data = good(make_dvd(disc()), REPORT_ALL_OPCODES)
    listed = {data[i] for i in range(4, 4 + struct.unpack(">I", data[:4])[0], 8)}
    assert {0x1B, 0x1E, 0x25, 0x28, 0x43, 0x46, 0x4A, 0x51, 0xA8, 0xAD, 0xBD} <= listed
    assert listed.isdisjoint({0x0A, 0x2A, 0x8A, 0xAA, 0x35, 0x42, 0x9E})
    assert listed == {spec.opcode for spec in DVD_COMMANDS.specs}


# --- READ CAPACITY and READ ----------------------------------------------------------------


def test_read_capacity_10_reports_last_lba_and_2048_byte_blocks():
    assert capacity(make_dvd(disc())) == (IMAGE_BLOCKS - 1, DVD_BLOCK)


@pytest.mark.parametrize("build", [read10, read12], ids=["read10", "read12"])
def test_read_returns_the_image_bytes(build):
    device = make_dvd(disc(seed=7))
    assert good(device, build(3, 2)) == image_bytes(5, seed=7)[3 * DVD_BLOCK :]


def test_read_of_the_last_block_works_and_past_it_is_lba_out_of_range():
    device = make_dvd(disc())
    assert len(good(device, read10(IMAGE_BLOCKS - 1, 1))) == DVD_BLOCK
    expect_check(run(device, read10(IMAGE_BLOCKS - 1, 2)), SenseKey.ILLEGAL_REQUEST,
                 Asc.LBA_OUT_OF_RANGE)


# --- an empty drive ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cdb",
    [TUR, list(read10(0, 1)), list(read12(0, 1)), READ_CAPACITY, list(read_toc()),
     list(read_disc_information()), list(read_disc_structure())],
    ids=["tur", "read10", "read12", "capacity", "toc", "disc_info", "disc_structure"],
)
def test_empty_drive_medium_access_is_not_ready_medium_not_present(cdb):
    expect_not_present(run(make_dvd(None), cdb))


def test_empty_drive_request_sense_reports_medium_not_present():
    data = good(make_dvd(None), REQUEST_SENSE)
    assert data[0] == 0x70
    assert (data[2] & 0x0F, data[12], data[13]) == (SenseKey.NOT_READY, 0x3A, 0x00)


@pytest.mark.parametrize(
    "cdb",
    [inquiry(), list(get_configuration()), list(mechanism_status()), list(get_event_status()),
     mode_sense6(0x2A)],
    ids=["inquiry", "get_configuration", "mechanism_status", "gesn", "mode_sense"],
)
def test_empty_drive_still_answers_commands_that_do_not_touch_the_medium(cdb):
    assert good(make_dvd(None), cdb)


def test_current_profile_is_none_when_empty_and_dvd_rom_when_loaded():
    assert current_profile(make_dvd(None)) == 0
    assert current_profile(make_dvd(disc())) == PROFILE_DVD_ROM


# --- GET CONFIGURATION ---------------------------------------------------------------------


def test_get_configuration_lists_every_feature_in_order_with_exact_length():
    data = good(make_dvd(disc()), get_configuration(request_type=0))
    features = features_of(data)
    assert [code for code, _, _ in features] == ALL_FEATURES
    assert struct.unpack(">I", data[:4])[0] == 4 + sum(4 + len(body) for *_, body in features)
    assert len(data) == 8 + sum(4 + len(body) for *_, body in features)
    assert all(len(body) % 4 == 0 for *_, body in features)   # MMC: multiples of 4


def test_profile_list_offers_dvd_rom_current_and_cd_rom():
    (code, flags, body), *_ = features_of(good(make_dvd(disc()), get_configuration()))
    assert code == 0x0000 and flags & 0x03 == 0x03            # persistent, current
    assert body == bytes([0x00, 0x10, 0x01, 0, 0x00, 0x08, 0x00, 0])


def test_profile_list_marks_no_profile_current_when_empty():
    (_, _, body), *_ = features_of(good(make_dvd(None), get_configuration()))
    assert body[2] & 0x01 == 0 and body[6] & 0x01 == 0


def test_core_and_removable_medium_features_describe_a_locking_tray():
    features = {code: (flags, body) for code, flags, body in
                features_of(good(make_dvd(disc()), get_configuration()))}
    core_flags, core = features[0x0001]
    assert core_flags & 0x01 and struct.unpack(">I", core[:4])[0] == 1    # SCSI family
    removable_flags, removable = features[0x0003]
    assert removable_flags & 0x01
    assert removable[0] >> 5 == 0b001                 # loading mechanism: tray
    assert removable[0] & 0x08 and removable[0] & 0x01   # Eject, Lock


def test_starting_feature_skips_lower_features():
    data = good(make_dvd(disc()), get_configuration(request_type=0, start=0x0010))
    assert [code for code, _, _ in features_of(data)] == [0x0010, 0x001D, 0x001E, 0x001F]


def test_request_type_2_returns_only_the_starting_feature():
    data = good(make_dvd(disc()), get_configuration(request_type=2, start=0x0010))
    [(code, flags, body)] = features_of(data)
    assert code == 0x0010 and flags & 0x01                 # Random Readable, current
    assert struct.unpack(">I", body[:4])[0] == DVD_BLOCK   # logical block size
    assert struct.unpack(">I", data[:4])[0] == 4 + 4 + 8
    assert data[6:8] == b"\x00\x10"                         # the header keeps the profile


def test_request_type_2_for_an_unknown_feature_returns_the_header_only():
    data = good(make_dvd(disc()), get_configuration(request_type=2, start=0x0107))
    assert data == bytes([0, 0, 0, 4, 0, 0, 0x00, 0x10])


@pytest.mark.parametrize(
    ("backend", "expected"),
    [(disc, [0x0000, 0x0001, 0x0003, 0x0010, 0x001D, 0x001F]),
     (lambda: None, [0x0000, 0x0001, 0x0003])],
    ids=["loaded", "empty"],
)
def test_request_type_1_lists_only_current_features(backend, expected):
    features = features_of(good(make_dvd(backend()), get_configuration(request_type=1)))
    assert [code for code, _, _ in features] == expected
    assert all(flags & 0x01 for _, flags, _ in features)


def test_media_features_are_not_current_when_empty():
    features = features_of(good(make_dvd(None), get_configuration(request_type=0)))
    current = {code for code, flags, _ in features if flags & 0x01}
    assert [code for code, _, _ in features] == ALL_FEATURES    # still all listed
    assert current == {0x0000, 0x0001, 0x0003}


def test_request_type_3_is_invalid_field_in_cdb():
    expect_invalid_field(run(make_dvd(disc()), get_configuration(request_type=3)), 1)


def test_get_configuration_is_cut_to_the_allocation_length():
    data = good(make_dvd(disc()), get_configuration(alloc=8))
    assert len(data) == 8
    full = good(make_dvd(disc()), get_configuration())
    assert data == full[:8]   # the data length still tells the whole size


def test_only_features_that_are_always_current_are_persistent():
    # MMC-6 5.2.2: Persistent=1 means the Feature is always current; Random Readable,
    # Multi-Read, CD Read and DVD Read come and go with the medium.
    for backend in (None, disc()):
        for code, flags, _ in features_of(good(make_dvd(backend), get_configuration())):
            if flags & 0x02:
                assert flags & 0x01, f"feature {code:04X} is Persistent but not Current"


# --- GET EVENT STATUS NOTIFICATION ----------------------------------------------------------


def test_gesn_asynchronous_mode_is_invalid_field_in_cdb():
    expect_invalid_field(run(make_dvd(disc()), get_event_status(polled=False)), 1)


def test_gesn_on_a_quiet_drive_reports_no_change_and_media_present():
    device = make_dvd(disc())
    assert media_event(device) == (NO_CHANGE, MEDIA_PRESENT)


def test_gesn_on_an_empty_drive_reports_no_media():
    assert media_event(make_dvd(None)) == (NO_CHANGE, TRAY_OPEN)


def test_gesn_reports_new_media_once_after_a_change():
    device = make_dvd(disc())
    assert device.change_medium(disc(seed=2), "/x/b.iso")
    expect_medium_changed(device)      # the unit attention comes first (see the xfail below)
    assert media_event(device) == (NEW_MEDIA, MEDIA_PRESENT)
    assert media_event(device) == (NO_CHANGE, MEDIA_PRESENT)


def test_gesn_media_events_are_kept_per_nexus():
    device = make_dvd(disc(), known=(NEXUS, OTHER))
    device.change_medium(disc(seed=2), "/x/b.iso")
    for nexus in (NEXUS, OTHER):
        expect_medium_changed(device, nexus)
    assert media_event(device, NEXUS) == (NEW_MEDIA, MEDIA_PRESENT)
    # NEXUS having seen it does not take the event away from OTHER
    assert media_event(device, OTHER) == (NEW_MEDIA, MEDIA_PRESENT)
    assert media_event(device, OTHER) == (NO_CHANGE, MEDIA_PRESENT)


def test_gesn_reports_media_removal_after_operator_unload():
    device = make_dvd(disc())
    assert device.operator_unload()
    assert media_event(device) == (MEDIA_REMOVAL, TRAY_OPEN)
    assert media_event(device) == (NO_CHANGE, TRAY_OPEN)


def test_gesn_reports_media_removal_after_an_eject_command():
    device = make_dvd(disc(), known=(NEXUS, OTHER))
    good(device, EJECT)
    assert media_event(device, OTHER) == (MEDIA_REMOVAL, TRAY_OPEN)


def test_gesn_for_no_supported_class_sets_nea_and_returns_the_header_only():
    data = good(make_dvd(disc()), get_event_status(classes=0x80))
    assert data == bytes([0, 2, 0x80, SUPPORTED_EVENT_CLASSES])


def test_gesn_power_class_reports_the_drive_active():
    data = good(make_dvd(disc()), get_event_status(classes=0x04))
    assert data == bytes([0, 6, 2, SUPPORTED_EVENT_CLASSES, 0, 1, 0, 0])


def test_gesn_that_asks_for_no_media_class_does_not_consume_the_media_event():
    device = make_dvd(disc())
    device.operator_unload()
    data = good(device, get_event_status(classes=0x02))      # operational change only
    assert data[2] == 1 and data[4] & 0x0F == 0
    assert media_event(device) == (MEDIA_REMOVAL, TRAY_OPEN)


def test_gesn_and_get_configuration_run_under_a_pending_unit_attention():
    # MMC lets GET CONFIGURATION and GET EVENT STATUS NOTIFICATION complete while a unit
    # attention is pending (QEMU's ATAPI flags both ALLOW_UA for this); the UA stays.
    device = make_dvd(disc())
    device.change_medium(disc(seed=2), "/x/b.iso")
    assert run(device, get_configuration(alloc=8)).status == ScsiStatus.GOOD
    assert media_event(device) == (NEW_MEDIA, MEDIA_PRESENT)
    expect_medium_changed(device)


# --- READ TOC/PMA/ATIP ---------------------------------------------------------------------


def toc_entry(track: int, address: bytes) -> bytes:
    return bytes([0, 0x14, track, 0]) + address   # ADR 1 (Q position), CONTROL 4 (data)


def msf(lba: int) -> bytes:
    frames = lba + 150
    return bytes([0, frames // (60 * 75), frames // 75 % 60, frames % 75])


def test_read_toc_format_0_with_lba_addresses():
    data = good(make_dvd(disc()), read_toc(toc_format=0))
    assert data == (bytes([0, 18, 1, 1]) + toc_entry(1, struct.pack(">I", 0))
                    + toc_entry(0xAA, struct.pack(">I", IMAGE_BLOCKS)))


def test_read_toc_format_0_with_msf_addresses():
    data = good(make_dvd(disc()), read_toc(toc_format=0, msf=True))
    assert data[8:12] == bytes([0, 0, 2, 0])                 # track 1 at 00:02:00
    assert data[16:20] == msf(IMAGE_BLOCKS) == bytes([0, 0, 2, 64])


def test_read_toc_track_1_lists_track_and_lead_out():
    data = good(make_dvd(disc()), read_toc(toc_format=0, track=1))
    assert [data[6], data[14]] == [1, 0xAA]


def test_read_toc_lead_out_track_alone():
    data = good(make_dvd(disc()), read_toc(toc_format=0, track=0xAA))
    assert data == bytes([0, 10, 1, 1]) + toc_entry(0xAA, struct.pack(">I", IMAGE_BLOCKS))


@pytest.mark.parametrize("track", [2, 5, 0x99])
def test_read_toc_of_a_track_that_does_not_exist_is_invalid_field(track):
    expect_invalid_field(run(make_dvd(disc()), read_toc(toc_format=0, track=track)), 6)


def test_read_toc_format_1_session_information():
    data = good(make_dvd(disc()), read_toc(toc_format=1))
    assert data == bytes([0, 10, 1, 1]) + toc_entry(1, struct.pack(">I", 0))


def test_read_toc_old_format_field_in_the_control_byte():
    cdb = bytearray(read_toc(toc_format=0))
    cdb[9] = 0x40                          # pre-MMC Format bits: 01b, session information
    assert good(make_dvd(disc()), cdb) == good(make_dvd(disc()), read_toc(toc_format=1))


@pytest.mark.parametrize("toc_format", [2, 3, 4, 5])
def test_read_toc_formats_a_dvd_lacks_are_invalid_field(toc_format):
    expect_invalid_field(run(make_dvd(disc()), read_toc(toc_format=toc_format)), 2)


def test_read_toc_is_cut_to_the_allocation_length():
    assert good(make_dvd(disc()), read_toc(alloc=4)) == bytes([0, 18, 1, 1])


# --- READ DISC INFORMATION, READ DISC STRUCTURE, MECHANISM STATUS ------------------------


def test_read_disc_information_describes_a_finalized_single_session_disc():
    data = good(make_dvd(disc()), read_disc_information())
    assert len(data) == 34 and data[:2] == b"\x00\x20"       # 32 bytes follow the length
    assert data[2] == 0x0E               # not erasable, last session complete, finalized
    assert data[3:7] == bytes([1, 1, 1, 1])  # first track, sessions, first/last track
    assert data[7] & 0x20                # URU


def test_read_disc_information_other_data_types_are_invalid_field():
    expect_invalid_field(run(make_dvd(disc()), read_disc_information(data_type=1)), 1)


def test_read_disc_structure_physical_format_information():
    data = good(make_dvd(disc()), read_disc_structure(structure=0x00))
    assert len(data) == 4 + 2048 and data[:4] == b"\x08\x02\x00\x00"
    assert data[4:7] == bytes([0x01, 0x0F, 0x01])  # DVD-ROM v1, 120 mm, 1 embossed layer
    start, end = struct.unpack(">II", data[8:16])
    assert (start, end) == (0x030000, 0x030000 + IMAGE_BLOCKS - 1)


def test_read_disc_structure_copyright_information_is_unprotected():
    data = good(make_dvd(disc()), read_disc_structure(structure=0x01))
    assert data == bytes([0, 6, 0, 0, 0, 0, 0, 0])


@pytest.mark.parametrize(("kwargs", "byte"),
                         [({"media_type": 1}, 1), ({"structure": 0x02}, 7),
                          ({"structure": 0xFF}, 7)],
                         ids=["bd_media", "disc_key", "structure_list"])
def test_read_disc_structure_unsupported_requests_are_invalid_field(kwargs, byte):
    expect_invalid_field(run(make_dvd(disc()), read_disc_structure(**kwargs)), byte)


def test_mechanism_status_shows_the_disc_while_loaded():
    data = good(make_dvd(disc()), mechanism_status())
    assert len(data) == 12
    assert data[1] & 0x10 == 0                       # door closed
    assert data[5] == 1 and data[6:8] == b"\x00\x04"  # one slot, a 4-byte slot table
    assert data[8] & 0x80                            # Disc Present


def test_mechanism_status_follows_the_medium_out_and_back():
    device = make_dvd(disc())
    good(device, EJECT)
    ejected = good(device, mechanism_status())
    assert ejected[8] & 0x80 == 0 and ejected[1] & 0x10
    good(device, LOAD)
    expect_medium_changed(device)
    assert good(device, mechanism_status())[8] & 0x80


def test_mechanism_status_of_an_empty_drive_has_no_disc():
    assert good(make_dvd(None), mechanism_status())[8] & 0x80 == 0


# --- START STOP UNIT and PREVENT ALLOW MEDIUM REMOVAL ---------------------------------------


def test_eject_then_medium_access_is_not_present():
    device = make_dvd(disc())
    good(device, EJECT)
    expect_not_present(run(device, TUR))
    expect_not_present(run(device, read10(0, 1)))


def test_load_after_eject_tells_every_nexus_the_medium_may_have_changed():
    device = make_dvd(disc(seed=3), known=(NEXUS, OTHER))
    good(device, EJECT)
    good(device, LOAD, nexus=OTHER)
    for nexus in (NEXUS, OTHER):       # the loading nexus is told as well
        expect_medium_changed(device, nexus)
    assert good(device, read10(0, 1)) == image_bytes(1, seed=3)
    assert media_event(device, OTHER) == (NEW_MEDIA, MEDIA_PRESENT)


def test_load_of_a_loaded_drive_raises_no_unit_attention():
    device = make_dvd(disc(), known=(NEXUS, OTHER))
    good(device, LOAD)
    assert run(device, TUR, nexus=OTHER).status == ScsiStatus.GOOD


@pytest.mark.parametrize("ejector", [NEXUS, OTHER], ids=["other_nexus", "preventing_nexus"])
def test_prevented_removal_refuses_eject(ejector):
    device = make_dvd(disc(), known=(NEXUS, OTHER))
    good(device, PREVENT, nexus=OTHER)
    task = run(device, EJECT, nexus=ejector)
    expect_check(task, SenseKey.ILLEGAL_REQUEST, Asc.MEDIUM_REMOVAL_PREVENTED)
    assert run(device, TUR).status == ScsiStatus.GOOD      # the disc stayed in
    assert not device.operator_unload()                     # the button is locked too


def test_allow_medium_removal_unlocks_the_tray():
    device = make_dvd(disc(), known=(NEXUS, OTHER))
    good(device, PREVENT, nexus=OTHER)
    good(device, ALLOW, nexus=OTHER)
    good(device, EJECT)
    expect_not_present(run(device, TUR))


def test_a_lost_nexus_stops_preventing_removal():
    device = make_dvd(disc(), known=(NEXUS, OTHER))
    good(device, PREVENT, nexus=OTHER)
    device.nexus_lost(OTHER)
    good(device, EJECT)
    expect_not_present(run(device, TUR))


@pytest.mark.parametrize("byte4", [0x00, 0x01], ids=["stop", "start"])
def test_start_stop_without_loej_changes_nothing(byte4):
    loaded = make_dvd(disc())
    good(loaded, [0x1B, 0, 0, 0, byte4, 0])
    assert run(loaded, TUR).status == ScsiStatus.GOOD
    ejected = make_dvd(disc())
    good(ejected, EJECT)
    good(ejected, [0x1B, 0, 0, 0, byte4, 0])
    expect_not_present(run(ejected, TUR))


def test_start_stop_with_a_power_condition_ignores_loej():
    device = make_dvd(disc())
    good(device, [0x1B, 0, 0, 0, 0x22, 0])    # POWER CONDITION 2 (idle), LOEJ=1 START=0
    assert run(device, TUR).status == ScsiStatus.GOOD


def test_start_stop_reserved_bits_are_invalid_field():
    expect_invalid_field(run(make_dvd(disc()), [0x1B, 0, 0, 0, 0x06, 0]), 4)  # bit 2


# --- change_medium (istgtcontrol change) ---------------------------------------------------


def test_change_medium_is_refused_while_removal_is_prevented():
    old, new = disc(), disc(blocks=8, seed=2)
    device = make_dvd(old)
    good(device, PREVENT)
    assert device.change_medium(new, "/x/b.iso") is False
    assert capacity(device) == (IMAGE_BLOCKS - 1, DVD_BLOCK)
    assert good(device, read10(0, 1)) == image_bytes(1, seed=1)
    assert not old.closed


def test_change_medium_serves_the_new_image_and_closes_the_old():
    old, new = disc(), disc(blocks=8, seed=2)
    device = make_dvd(old)
    assert device.change_medium(new, "/x/b.iso") is True
    assert old.closed and not new.closed
    expect_medium_changed(device)
    assert capacity(device) == (7, DVD_BLOCK)
    assert good(device, read10(0, 8)) == image_bytes(8, seed=2)
    expect_check(run(device, read10(8, 1)), SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE)
    toc = good(device, read_toc(track=0xAA))
    assert toc[8:12] == struct.pack(">I", 8)            # the lead-out moved too


def test_change_medium_to_none_empties_the_drive():
    old = disc()
    device = make_dvd(old)
    assert device.change_medium(None, "/dev/null") is True
    assert old.closed
    expect_not_present(run(device, TUR))
    assert current_profile(device) == 0
    assert media_event(device) == (MEDIA_REMOVAL, TRAY_OPEN)


def test_load_command_cannot_bring_back_a_disc_that_was_taken_away():
    device = make_dvd(disc())
    device.change_medium(None, "/dev/null")
    good(device, LOAD)
    expect_not_present(run(device, TUR))


def test_change_medium_loads_an_empty_drive():
    device = make_dvd(None)
    assert device.change_medium(disc(blocks=4, seed=5), "/x/c.iso")
    expect_medium_changed(device)
    assert capacity(device) == (3, DVD_BLOCK)
    assert good(device, read12(1, 2)) == image_bytes(3, seed=5)[DVD_BLOCK:]
    assert current_profile(device) == PROFILE_DVD_ROM


def test_change_medium_after_an_eject_command_loads_the_new_disc():
    device = make_dvd(disc())
    good(device, EJECT)
    assert device.change_medium(disc(blocks=2, seed=6), "/x/d.iso")
    expect_medium_changed(device)
    assert good(device, read10(1, 1)) == image_bytes(2, seed=6)[DVD_BLOCK:]


# --- MODE SENSE ------------------------------------------------------------------------------


def test_mode_sense_capabilities_page_reads_dvd_rom():
    data = good(make_dvd(disc()), mode_sense6(0x2A))
    assert data[2] == 0                     # device-specific parameter: no WP/DPOFUA in MMC
    page = mode_pages_of(data)[0x2A]
    assert page[0] & 0x3F == 0x2A and page[1] == len(page) - 2
    assert page[2] & 0x08                   # DVD-ROM Read
    assert page[3] == 0                     # writes nothing
    assert page[6] >> 5 == 0b001 and page[6] & 0x09 == 0x09   # tray, Eject, Lock


def test_mode_sense_block_descriptor_follows_the_medium():
    loaded = good(make_dvd(disc()), mode_sense6(0x2A))
    assert loaded[3] == 8 and loaded[4 + 5 : 4 + 8] == b"\x00\x08\x00"   # 2048-byte blocks
    assert struct.unpack(">I", loaded[4:8])[0] == IMAGE_BLOCKS
    empty = good(make_dvd(None), mode_sense6(0x2A))
    assert empty[3] == 8 and empty[4:12] == bytes(8)


def test_mode_sense_all_pages_are_the_dvd_pages():
    data = good(make_dvd(disc()), mode_sense6(0x3F))
    assert sorted(mode_pages_of(data)) == [0x08, 0x0A, 0x1C, 0x2A]
    assert data[2] == 0


def test_sense_data_of_a_dvd_is_fixed_format_by_default():
    task = run(make_dvd(None), TUR)
    expect_not_present(task)
    assert task.sense[0] == 0x70 and sense_of(task) == (SenseKey.NOT_READY, 0x3A00)
