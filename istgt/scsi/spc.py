"""Commands every device type shares (SPC-4): INQUIRY and VPD, REPORT LUNS, REQUEST SENSE,
TEST UNIT READY, MODE SENSE/SELECT, REPORT SUPPORTED OPERATION CODES / TMFs.

Handlers take `(device, task)`; what they read from the device is listed in `SpcDevice`.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from istgt.scsi.command import CommandTable, ITNexus, ScsiTask, u16, u32
from istgt.scsi.constants import Asc, Opcode, PeripheralDeviceType, ScsiStatus, SenseKey
from istgt.scsi.modepages import ModePages, PageControl
from istgt.scsi.sense import CheckCondition, encode_sense, invalid_field_in_cdb

# --- identity ---------------------------------------------------------------------------

# IEEE Company ID used in our NAA 6 designators. It has the "X" bit set in the first octet,
# the range the IEEE keeps for locally administered identifiers, so it cannot collide with
# a registered company's OUI; the 100 vendor-specific bits come from a hash.
NAA_COMPANY_ID = 0x0A7069

PROTOCOL_ISCSI = 0x5
CODE_SET_BINARY = 0x1
CODE_SET_ASCII = 0x2
CODE_SET_UTF8 = 0x3
ASSOCIATION_LU = 0
ASSOCIATION_TARGET_PORT = 1
ASSOCIATION_TARGET_DEVICE = 2
DESIGNATOR_T10_VENDOR = 0x1
DESIGNATOR_NAA = 0x3
DESIGNATOR_RELATIVE_TARGET_PORT = 0x4
DESIGNATOR_TARGET_PORT_GROUP = 0x5
DESIGNATOR_SCSI_NAME = 0x8

VERSION_DESCRIPTORS = (0x00A0, 0x0960, 0x0460, 0x04C0)  # SAM-5, iSCSI, SPC-4, SBC-3
STANDARD_INQUIRY_LENGTH = 96


@dataclass(frozen=True)
class DeviceIdentity:
    vendor: str
    product: str
    revision: str
    serial: str
    target_name: str
    lun: int

    @property
    def naa(self) -> bytes:
        """NAA 6 (IEEE Registered Extended) from the target name and LUN: stable across
        restarts, different for every LU and LUN."""
        digest = hashlib.sha256(f"{self.target_name.lower()},{self.lun}".encode()).digest()
        vendor_bits = int.from_bytes(digest[:13], "big") >> 4  # 100 bits
        value = (0x6 << 124) | (NAA_COMPANY_ID << 100) | vendor_bits
        return value.to_bytes(16, "big")


def ascii_field(text: str, width: int) -> bytes:
    """Left-aligned, space-padded printable ASCII (SPC-4 4.4.1)."""
    cleaned = "".join(c if 0x20 <= ord(c) <= 0x7E else " " for c in text)
    return cleaned.encode("ascii")[:width].ljust(width, b" ")


class SpcDevice(Protocol):
    identity: DeviceIdentity
    peripheral_type: int
    removable: bool
    command_queuing: bool
    mode_pages: ModePages
    table: CommandTable

    def vpd_page(self, page: int, nexus: ITNexus) -> bytes | None: ...

    def supported_vpd_pages(self) -> list[int]: ...

    def device_specific_parameter(self) -> int: ...

    def block_descriptor(self, long_lba: bool) -> bytes: ...

    def pending_sense(self, nexus: ITNexus, descriptor: bool) -> bytes | None: ...

    def mode_select_changed(self, nexus: ITNexus) -> None: ...

    def lun_numbers(self) -> Iterable[int]: ...


def respond(task: ScsiTask, data: bytes | bytearray, allocation_length: int) -> None:
    """Data-In truncated to the allocation length (the transport truncates to EDTL)."""
    task.data_in = data[:allocation_length] if len(data) > allocation_length else data


# --- INQUIRY ----------------------------------------------------------------------------


def standard_inquiry(
    identity: DeviceIdentity | None,
    peripheral_type: int,
    qualifier: int = 0,
    removable: bool = False,
    command_queuing: bool = True,
    tpgs: int = 0,
) -> bytes:
    data = bytearray(STANDARD_INQUIRY_LENGTH)
    data[0] = (qualifier << 5) | peripheral_type
    data[1] = 0x80 if removable else 0
    data[2] = 0x06  # SPC-4
    data[3] = 0x12  # HISUP, response data format 2
    data[4] = STANDARD_INQUIRY_LENGTH - 5
    data[5] = (tpgs & 0x3) << 4  # TPGS: asymmetric logical unit access (SPC-4 5.16)
    data[7] = 0x02 if command_queuing else 0  # CMDQUE
    if identity is not None:
        data[8:16] = ascii_field(identity.vendor, 8)
        data[16:32] = ascii_field(identity.product, 16)
        data[32:36] = ascii_field(identity.revision, 4)
    for index, descriptor in enumerate(VERSION_DESCRIPTORS):
        struct.pack_into(">H", data, 58 + 2 * index, descriptor)
    return bytes(data)


def vpd(page: int, peripheral_type: int, body: bytes) -> bytes:
    return struct.pack(">BBH", peripheral_type, page, len(body)) + body


def designator(
    code_set: int, association: int, kind: int, value: bytes, protocol: int | None = None
) -> bytes:
    piv = 0x80 if protocol is not None else 0
    return (
        struct.pack(
            ">BBxB",
            ((protocol or 0) << 4) | code_set,
            piv | (association << 4) | kind,
            len(value),
        )
        + value
    )


def scsi_name(name: str) -> bytes:
    """A SCSI name string: UTF-8, NUL-terminated, padded to a multiple of 4 (SPC-4 7.8.6.11)."""
    raw = name.encode("utf-8") + b"\0"
    return raw + b"\0" * (-len(raw) % 4)


def device_identification_body(
    identity: DeviceIdentity, nexus: ITNexus, port_group: int | None = None
) -> bytes:
    """`port_group`: the target port group of the nexus's port, when the LU reports ALUA."""
    t10 = ascii_field(identity.vendor, 8) + ascii_field(identity.product, 16)
    t10 += identity.serial.encode("ascii", "replace")
    return b"".join([
        designator(CODE_SET_BINARY, ASSOCIATION_LU, DESIGNATOR_NAA, identity.naa),
        designator(CODE_SET_ASCII, ASSOCIATION_LU, DESIGNATOR_T10_VENDOR, t10),
        designator(
            CODE_SET_UTF8,
            ASSOCIATION_TARGET_DEVICE,
            DESIGNATOR_SCSI_NAME,
            scsi_name(identity.target_name),
            PROTOCOL_ISCSI,
        ),
        target_port_designators(nexus, port_group),
    ])


def target_port_designators(nexus: ITNexus, port_group: int | None = None) -> bytes:
    """The target port's designators of VPD page 83h: its name, its relative port
    identifier and, with ALUA, its target port group (pass-through LUs add these to the
    device's own)."""
    parts = [
        designator(
            CODE_SET_UTF8,
            ASSOCIATION_TARGET_PORT,
            DESIGNATOR_SCSI_NAME,
            scsi_name(nexus.target_port),
            PROTOCOL_ISCSI,
        ),
        designator(
            CODE_SET_BINARY,
            ASSOCIATION_TARGET_PORT,
            DESIGNATOR_RELATIVE_TARGET_PORT,
            struct.pack(">xxH", nexus.relative_port_id & 0xFFFF),
            PROTOCOL_ISCSI,
        ),
    ]
    if port_group is not None:
        parts.append(
            designator(
                CODE_SET_BINARY,
                ASSOCIATION_TARGET_PORT,
                DESIGNATOR_TARGET_PORT_GROUP,
                struct.pack(">xxH", port_group & 0xFFFF),
                PROTOCOL_ISCSI,
            )
        )
    return b"".join(parts)


def extended_inquiry_body() -> bytes:
    body = bytearray(0x3C)
    body[1] = 0x07  # HEADSUP, ORDSUP, SIMPSUP
    body[2] = 0x01  # V_SUP: a volatile cache exists (FUA has meaning)
    return bytes(body)


def common_vpd_page(device: SpcDevice, page: int, nexus: ITNexus) -> bytes | None:
    """The VPD pages every device type answers alike."""
    pdt = device.peripheral_type
    if page == 0x00:
        return vpd(0x00, pdt, bytes(device.supported_vpd_pages()))
    if page == 0x80:
        return vpd(0x80, pdt, device.identity.serial.encode("ascii", "replace"))
    if page == 0x83:
        groups = getattr(device, "port_groups", None)
        group = groups.group_of(nexus) if groups is not None else None
        return vpd(0x83, pdt, device_identification_body(device.identity, nexus, group))
    if page == 0x86:
        return vpd(0x86, pdt, extended_inquiry_body())
    return None


def _tpgs(device: SpcDevice) -> int:
    """TPGS of a device with target port groups (`port_groups`, see alua.py); 0 without."""
    groups = getattr(device, "port_groups", None)
    return groups.tpgs if groups is not None else 0


def inquiry(device: SpcDevice, task: ScsiTask) -> None:
    cdb = task.cdb
    evpd = cdb[1] & 0x01
    page = cdb[2]
    allocation_length = u16(cdb, 3)
    if not evpd:
        if page:
            raise invalid_field_in_cdb(2)
        data = standard_inquiry(
            device.identity,
            device.peripheral_type,
            removable=device.removable,
            command_queuing=device.command_queuing,
            tpgs=_tpgs(device),
        )
    else:
        found = device.vpd_page(page, task.nexus)
        if found is None:
            raise invalid_field_in_cdb(2)
        data = found
    respond(task, data, allocation_length)


# --- LUN addressing ---------------------------------------------------------------------


def encode_lun(lun: int) -> bytes:
    """SAM-5 single-level LUN: peripheral addressing below 256, flat space up to 16383."""
    if lun < 256:
        return bytes([0, lun, 0, 0, 0, 0, 0, 0])
    return bytes([0x40 | (lun >> 8), lun & 0xFF, 0, 0, 0, 0, 0, 0])


def report_luns(luns: Iterable[int]) -> bytes:
    """REPORT LUNS parameter data for these LUN numbers."""
    body = b"".join(encode_lun(lun) for lun in sorted(set(luns)))
    return struct.pack(">I4x", len(body)) + body


def execute_report_luns(task: ScsiTask, luns: Iterable[int]) -> None:
    """REPORT LUNS, whichever LUN it is addressed to."""
    cdb = task.cdb
    select_report = cdb[2]
    allocation_length = u32(cdb, 6)
    if select_report not in (0x00, 0x01, 0x02):
        raise invalid_field_in_cdb(2)
    if allocation_length < 16:
        raise invalid_field_in_cdb(6)
    # Select 01h asks for well-known LUNs only; we have none.
    data = report_luns([] if select_report == 0x01 else luns)
    respond(task, data, allocation_length)


def no_such_lun(task: ScsiTask, descriptor_sense: bool = False) -> None:
    """Answer a command addressed to a LUN that does not exist (SPC-4 4.6.2 / SAM-5 5.9.6).

    INQUIRY gets data with peripheral qualifier 3; REQUEST SENSE reports 25/00 as data;
    every other command gets CHECK CONDITION, ILLEGAL REQUEST, LOGICAL UNIT NOT SUPPORTED.
    """
    task.data_in = None
    task.sense = b""
    cdb = task.cdb
    if cdb and cdb[0] == Opcode.INQUIRY and len(cdb) >= 6:
        if cdb[1] & 0x01 or cdb[2]:
            # No VPD for a missing LU.
            pass
        else:
            task.status = ScsiStatus.GOOD
            data = standard_inquiry(None, PeripheralDeviceType.UNKNOWN, qualifier=3)
            respond(task, data, u16(cdb, 3))
            return
    if cdb and cdb[0] == Opcode.REQUEST_SENSE and len(cdb) >= 6:
        task.status = ScsiStatus.GOOD
        sense = encode_sense(
            SenseKey.ILLEGAL_REQUEST,
            Asc.LOGICAL_UNIT_NOT_SUPPORTED,
            descriptor=bool(cdb[1] & 0x01),
        )
        respond(task, sense, cdb[4])
        return
    task.status = ScsiStatus.CHECK_CONDITION
    task.sense = encode_sense(
        SenseKey.ILLEGAL_REQUEST, Asc.LOGICAL_UNIT_NOT_SUPPORTED, descriptor=descriptor_sense
    )


# --- REQUEST SENSE / TEST UNIT READY -----------------------------------------------------


def request_sense(device: SpcDevice, task: ScsiTask) -> None:
    """Report (and clear) a pending unit attention or not-ready state as parameter data;
    NO SENSE otherwise (autosense means there is never a stored error to return)."""
    descriptor = bool(task.cdb[1] & 0x01)
    allocation_length = task.cdb[4]
    sense = device.pending_sense(task.nexus, descriptor)
    if sense is None:
        sense = encode_sense(SenseKey.NO_SENSE, Asc.NO_ADDITIONAL_SENSE, descriptor=descriptor)
    respond(task, sense, allocation_length)


def test_unit_ready(device: SpcDevice, task: ScsiTask) -> None:
    """Readiness is checked by dispatch before any medium-access command; nothing else."""


# --- MODE SENSE / MODE SELECT -----------------------------------------------------------


def mode_sense(device: SpcDevice, task: ScsiTask) -> None:
    cdb = task.cdb
    ten = cdb[0] == Opcode.MODE_SENSE_10
    disable_block_descriptors = bool(cdb[1] & 0x08)
    long_lba = ten and bool(cdb[1] & 0x10)
    control = PageControl(cdb[2] >> 6)
    page = cdb[2] & 0x3F
    subpage = cdb[3]
    allocation_length = u16(cdb, 7) if ten else cdb[4]
    pages = device.mode_pages.sense(page, subpage, control)
    if pages is None:
        if subpage and device.mode_pages.sense(page, 0, control) is not None:
            raise invalid_field_in_cdb(3)
        raise invalid_field_in_cdb(2, 5)
    descriptors = b"" if disable_block_descriptors else device.block_descriptor(long_lba)
    specific = device.device_specific_parameter()
    if ten:
        length = 8 + len(descriptors) + len(pages)
        header = struct.pack(
            ">HBBBxH", length - 2, 0, specific, 0x01 if len(descriptors) == 16 else 0,
            len(descriptors),
        )
    else:
        length = 4 + len(descriptors) + len(pages)
        length = min(length, 0xFF)  # cannot happen with our pages; keeps the byte field valid
        header = struct.pack(">BBBB", length - 1, 0, specific, len(descriptors))
    respond(task, header + descriptors + pages, allocation_length)


def mode_select(device: SpcDevice, task: ScsiTask) -> None:
    cdb = task.cdb
    ten = cdb[0] == Opcode.MODE_SELECT_10
    save_pages = bool(cdb[1] & 0x01)
    page_format = bool(cdb[1] & 0x10)
    length = u16(cdb, 7) if ten else cdb[4]
    task.data_out_length = length
    if save_pages:
        raise CheckCondition(
            SenseKey.ILLEGAL_REQUEST, Asc.SAVING_PARAMETERS_NOT_SUPPORTED
        )
    if length == 0:
        return
    if not page_format:
        raise invalid_field_in_cdb(1, 4)
    data = parameter_list(task, length)
    header_length = 8 if ten else 4
    if length < header_length:
        raise CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.PARAMETER_LIST_LENGTH_ERROR)
    if ten:
        descriptor_length = u16(data, 6)
        long_lba = bool(data[4] & 0x01)
    else:
        descriptor_length = data[3]
        long_lba = False
    descriptor_size = 16 if long_lba else 8
    if descriptor_length % descriptor_size:
        raise CheckCondition(
            SenseKey.ILLEGAL_REQUEST,
            Asc.INVALID_FIELD_IN_PARAMETER_LIST,
            field_pointer=6 if ten else 3,
            cd=False,
        )
    if header_length + descriptor_length > length:
        raise CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.PARAMETER_LIST_LENGTH_ERROR)
    current = device.block_descriptor(long_lba)
    select_descriptor = getattr(device, "select_block_descriptor", None)   # a tape's
    for offset in range(header_length, header_length + descriptor_length, descriptor_size):
        if select_descriptor is not None:
            select_descriptor(data[offset:offset + descriptor_size], long_lba)
            continue
        # The block length cannot change; a block count of 0 or ours means "unchanged".
        given = data[offset : offset + descriptor_size]
        length_at = 12 if long_lba else 5
        if bytes(given[length_at:]) != current[length_at:]:
            raise CheckCondition(
                SenseKey.ILLEGAL_REQUEST,
                Asc.INVALID_FIELD_IN_PARAMETER_LIST,
                field_pointer=offset + length_at,
                cd=False,
            )
    pages_at = header_length + descriptor_length
    if device.mode_pages.select(data[pages_at:length], pages_at):
        device.mode_select_changed(task.nexus)


def parameter_list(task: ScsiTask, length: int) -> memoryview:
    """The first `length` bytes of Data-Out; CHECK CONDITION when fewer arrived."""
    data = task.data_out
    if data is None or len(data) < length:
        raise CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_INFORMATION_UNIT)
    return data[:length]


# --- REPORT SUPPORTED OPERATION CODES / TASK MANAGEMENT FUNCTIONS ------------------------

NOMINAL_TIMEOUT_SECONDS = 0  # not specified
RECOMMENDED_TIMEOUT_SECONDS = 30


def _timeouts() -> bytes:
    return struct.pack(">HxBII", 0x0A, 0, NOMINAL_TIMEOUT_SECONDS, RECOMMENDED_TIMEOUT_SECONDS)


def report_supported_operation_codes(device: SpcDevice, task: ScsiTask) -> None:
    cdb = task.cdb
    with_timeouts = bool(cdb[2] & 0x80)
    option = cdb[2] & 0x07
    requested_opcode = cdb[3]
    requested_action = u16(cdb, 4)
    allocation_length = u32(cdb, 6)
    table = device.table
    if option == 0:
        body = bytearray()
        for spec in table.specs:
            has_action = spec.service_action is not None
            body += struct.pack(
                ">BxHxBH",
                spec.opcode,
                spec.service_action or 0,
                (0x02 if with_timeouts else 0) | (0x01 if has_action else 0),
                spec.cdb_length,
            )
            if with_timeouts:
                body += _timeouts()
        data = struct.pack(">I", len(body)) + bytes(body)
        respond(task, data, allocation_length)
        return
    if option == 1:
        if table.has_service_actions(requested_opcode):
            raise invalid_field_in_cdb(3)
        spec = table.find(requested_opcode)
    elif option == 2:
        if not table.has_service_actions(requested_opcode):
            raise invalid_field_in_cdb(3)
        spec = table.find(requested_opcode, requested_action)
    elif option == 3:
        if table.has_service_actions(requested_opcode):
            spec = table.find(requested_opcode, requested_action)
        else:
            spec = table.find(requested_opcode)
    else:
        raise invalid_field_in_cdb(2, 2)
    flags = 0x80 if with_timeouts else 0
    if spec is None:
        data = struct.pack(">xBH", flags | 0x01, 0)  # SUPPORT 001b: not supported
    else:
        data = struct.pack(">xBH", flags | 0x03, spec.cdb_length) + spec.usage
        if with_timeouts:
            data += _timeouts()
    respond(task, data, allocation_length)


def report_supported_task_management_functions(device: SpcDevice, task: ScsiTask) -> None:
    repd = bool(task.cdb[2] & 0x80)
    allocation_length = u32(task.cdb, 6)
    if allocation_length < 4:
        raise invalid_field_in_cdb(6)
    # ABORT TASK, ABORT TASK SET, CLEAR TASK SET, LOGICAL UNIT RESET, TARGET RESET.
    data = bytearray(16 if repd else 4)
    data[0] = 0x80 | 0x40 | 0x10 | 0x08 | 0x02  # ATS ATSS CTSS LURS TRS
    if repd:
        data[3] = 0x0C  # additional data length
    respond(task, bytes(data), allocation_length)
