"""The copy manager: EXTENDED COPY (LID1) and RECEIVE COPY RESULTS (SPC-4 6.4, 6.18), and
the Third-party Copy VPD page (SPC-4 7.8.17) that advertises them.

What is supported, as VMware's VAAI XCOPY uses it: identification-descriptor CSCDs (E4h)
naming a LU of this target by the NAA designator its Device Identification page reports,
and block-to-block segments (02h) between any two of those LUs (or within one).

Error model. Everything in the parameter list is checked, and every segment is resolved and
checked against its copy targets, before any block moves:
- a malformed parameter list ends in ILLEGAL REQUEST (the SPC "errors detected before
  starting processing of the segment descriptors");
- a segment that cannot be carried out ends in COPY ABORTED with the segment number in the
  COMMAND-SPECIFIC INFORMATION field: UNREACHABLE COPY TARGET (08/04) for a CSCD index or
  designator we cannot resolve, INCORRECT COPY TARGET DEVICE TYPE (0D/03) for a CSCD whose
  device type or block length does not match the LU, and NO ADDITIONAL SENSE (00/00) with
  the copy target's own answer forwarded (LBA OUT OF RANGE, WRITE PROTECTED, NOT READY,
  RESERVATION CONFLICT, or a medium error while copying) in the sense data.
A copy target is checked as if the initiator's own I_T nexus sent it READ(16) (source) or
WRITE(16) (destination): a LU reserved by another nexus is never written behind the
reservation holder's back.
"""

from __future__ import annotations

import contextlib
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from istgt.lu.copy_targets import CopyTargets
from istgt.scsi import spc
from istgt.scsi.command import ITNexus, ScsiTask, u16, u24, u32, u64
from istgt.scsi.constants import Asc, Opcode, PeripheralDeviceType, ScsiStatus, SenseKey
from istgt.scsi.sense import (
    DESCRIPTOR_CURRENT,
    FIXED_CURRENT,
    FIXED_SENSE_LENGTH,
    CheckCondition,
    invalid_field_in_cdb,
    invalid_field_in_parameter_list,
)

# --- limits (reported alike by OPERATING PARAMETERS and the Third-party Copy VPD page) ------

MAX_CSCD_DESCRIPTORS = 8
MAX_SEGMENT_DESCRIPTORS = 16
MAX_DESCRIPTOR_LIST_LENGTH = 1024
MAX_SEGMENT_BYTES = 32 * 1024 * 1024   # the Block Limits page's maximum transfer length
MAX_INLINE_DATA_LENGTH = 0             # no segment type we support uses inline data
# Identified copies (LIST ID USAGE 00b/10b) one I_T nexus may have remembered at once.
MAX_IDENTIFIED_COPIES = 16
COPY_CHUNK_BYTES = 1024 * 1024         # one read + one write per chunk

PARAMETER_HEADER = 16
CSCD_DESCRIPTOR_LENGTH = 32
BLOCK_TO_BLOCK_LENGTH = 28

IDENTIFICATION_CSCD = 0xE4
BLOCK_TO_BLOCK_SEGMENT = 0x02
SUPPORTED_DESCRIPTOR_TYPES = (BLOCK_TO_BLOCK_SEGMENT, IDENTIFICATION_CSCD)

# LIST ID USAGE (parameter list header byte 1, bits 4-3)
HOLD = 0         # remember the outcome for RECEIVE COPY RESULTS
NO_HOLD = 2      # list identifier unique while running, outcome not remembered
NO_LIST_ID = 3   # list identifier ignored

# RECEIVE COPY RESULTS service actions
COPY_STATUS = 0x00
OPERATING_PARAMETERS = 0x03
FAILED_SEGMENT_DETAILS = 0x04

# COPY MANAGER STATUS
IN_PROGRESS = 0x00
COMPLETED = 0x01
FAILED = 0x02

# SENSE DATA SOURCE of a forwarded sense data descriptor
COPY_SOURCE = 1
COPY_DESTINATION = 2

_FORWARDED_SENSE_DESCRIPTOR = 0x0C
_COMMAND_SPECIFIC_DESCRIPTOR = 0x01
_SENSE_KEY_SPECIFIC_DESCRIPTOR = 0x02
_SD = 0x20          # segment pointer: the field pointer is relative to the segment descriptor


def _parameter_list_length_error() -> CheckCondition:
    return CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.PARAMETER_LIST_LENGTH_ERROR)


# --- COPY ABORTED sense data --------------------------------------------------------------


@dataclass(frozen=True)
class Forwarded:
    """What a copy target answered: its status and, for CHECK CONDITION, its sense."""

    source: int                          # COPY_SOURCE or COPY_DESTINATION
    status: int
    condition: CheckCondition | None = None


class CopyAborted(CheckCondition):
    """COPY ABORTED for segment `segment` (SPC-4 4.5.2 / 6.4.5)."""

    def __init__(self, asc: int, segment: int, field_pointer: int | None = None,
                 in_segment: bool = True, forwarded: Forwarded | None = None) -> None:
        super().__init__(SenseKey.COPY_ABORTED, asc, field_pointer=field_pointer, cd=False)
        self.segment = segment
        self.in_segment = in_segment
        self.forwarded = forwarded

    def _segment_pointer(self) -> bytes | None:
        if self.field_pointer is None:
            return None
        flags = 0x80 | (_SD if self.in_segment else 0)
        return struct.pack(">BH", flags, self.field_pointer & 0xFFFF)

    def encode(self, descriptor: bool) -> bytes:
        pointer = self._segment_pointer()
        forwarded = self.forwarded
        if descriptor:
            body = bytearray(struct.pack(">BBxxQ", _COMMAND_SPECIFIC_DESCRIPTOR, 0x0A, self.segment))
            if pointer is not None:
                body += struct.pack(">BBxx3sx", _SENSE_KEY_SPECIFIC_DESCRIPTOR, 0x06, pointer)
            if forwarded is not None:
                inner = forwarded.condition.encode(True) if forwarded.condition else b""
                body += struct.pack(">BBBB", _FORWARDED_SENSE_DESCRIPTOR, 2 + len(inner),
                                    forwarded.source, forwarded.status) + inner
            header = struct.pack(">BBBBxxxB", DESCRIPTOR_CURRENT, SenseKey.COPY_ABORTED,
                                 self.asc >> 8, self.asc & 0xFF, len(body))
            return header + bytes(body)
        sense = bytearray(FIXED_SENSE_LENGTH)
        sense[0] = FIXED_CURRENT
        sense[2] = SenseKey.COPY_ABORTED
        struct.pack_into(">H", sense, 10, self.segment & 0xFFFF)
        sense[12], sense[13] = self.asc >> 8, self.asc & 0xFF
        if pointer is not None:
            sense[15:18] = pointer
        if forwarded is not None and forwarded.condition is not None:
            # COMMAND-SPECIFIC INFORMATION bytes 0/1: where the copy source's / copy
            # destination's own sense data starts in this sense data.
            sense[8 if forwarded.source == COPY_SOURCE else 9] = len(sense)
            sense += forwarded.condition.encode(False)
        sense[7] = len(sense) - 8
        return bytes(sense)


@contextlib.contextmanager
def _forwarding(source: int, segment: int) -> Iterator[None]:
    """A copy target's CHECK CONDITION becomes COPY ABORTED carrying it."""
    try:
        yield
    except CopyAborted:
        raise
    except CheckCondition as condition:
        raise CopyAborted(Asc.NO_ADDITIONAL_SENSE, segment,
                          forwarded=Forwarded(source, ScsiStatus.CHECK_CONDITION, condition)
                          ) from None


# --- parameter list -----------------------------------------------------------------------


@dataclass(frozen=True)
class Cscd:
    """An identification descriptor CSCD (E4h)."""

    offset: int                 # in the parameter list
    peripheral_type: int
    association: int
    designator_type: int
    designator: bytes
    block_length: int


@dataclass(frozen=True)
class Segment:
    """A block device to block device segment (02h)."""

    number: int
    offset: int                 # in the parameter list
    source: int                 # CSCD indexes
    destination: int
    destination_count: bool     # DC: the block count is in destination blocks
    blocks: int
    source_lba: int
    destination_lba: int


@dataclass(frozen=True)
class CopyRequest:
    list_id: int
    list_id_usage: int
    cscds: tuple[Cscd, ...]
    segments: tuple[Segment, ...]


def parse_parameter_list(data: bytes | memoryview) -> CopyRequest:
    """Decode and check an EXTENDED COPY(LID1) parameter list; CheckCondition when wrong."""
    data = bytes(data)
    if len(data) < PARAMETER_HEADER:
        raise _parameter_list_length_error()
    usage = (data[1] >> 3) & 0x03
    if usage == 1:
        raise invalid_field_in_parameter_list(1, 4)
    cscd_length, segment_length, inline_length = u16(data, 2), u32(data, 8), u32(data, 12)
    if cscd_length + segment_length > MAX_DESCRIPTOR_LIST_LENGTH:
        raise _parameter_list_length_error()
    if PARAMETER_HEADER + cscd_length + segment_length + inline_length > len(data):
        raise _parameter_list_length_error()     # the lists run past the parameter data
    if inline_length > MAX_INLINE_DATA_LENGTH:
        raise CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.INLINE_DATA_LENGTH_EXCEEDED,
                             field_pointer=12, cd=False)
    if cscd_length % CSCD_DESCRIPTOR_LENGTH:
        raise invalid_field_in_parameter_list(2)
    if cscd_length // CSCD_DESCRIPTOR_LENGTH > MAX_CSCD_DESCRIPTORS:
        raise CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.TOO_MANY_TARGET_DESCRIPTORS,
                             field_pointer=2, cd=False)
    first_segment = PARAMETER_HEADER + cscd_length
    placed = _segment_extents(data, first_segment, first_segment + segment_length)
    cscds = tuple(_parse_cscd(data, offset)
                  for offset in range(PARAMETER_HEADER, first_segment, CSCD_DESCRIPTOR_LENGTH))
    segments = tuple(_parse_segment(data, number, offset, length)
                     for number, (offset, length) in enumerate(placed))
    return CopyRequest(data[0], usage, cscds, segments)


def _segment_extents(data: bytes, offset: int, end: int) -> list[tuple[int, int]]:
    """(offset, length) of each segment descriptor; their lengths must tile the list."""
    extents = []
    while offset < end:
        if end - offset < 4:
            raise invalid_field_in_parameter_list(8)
        length = 4 + u16(data, offset + 2)
        if offset + length > end:
            raise invalid_field_in_parameter_list(offset + 2)
        extents.append((offset, length))
        if len(extents) > MAX_SEGMENT_DESCRIPTORS:
            raise CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.TOO_MANY_SEGMENT_DESCRIPTORS,
                                 field_pointer=8, cd=False)
        offset += length
    return extents


def _parse_cscd(data: bytes, offset: int) -> Cscd:
    if data[offset] != IDENTIFICATION_CSCD:
        raise CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.UNSUPPORTED_TARGET_DESCRIPTOR_TYPE_CODE,
                             field_pointer=offset, cd=False)
    # Byte 1: LU ID TYPE (ignored for this CSCD type in SPC-4), NUL (obsolete), device type.
    designator_length = data[offset + 7]
    if designator_length > 16:
        raise invalid_field_in_parameter_list(offset + 7)
    return Cscd(
        offset=offset,
        peripheral_type=data[offset + 1] & 0x1F,
        association=(data[offset + 5] >> 4) & 0x03,
        designator_type=data[offset + 5] & 0x0F,
        designator=data[offset + 8: offset + 8 + designator_length],
        block_length=u24(data, offset + 29),
    )


def _parse_segment(data: bytes, number: int, offset: int, length: int) -> Segment:
    if data[offset] != BLOCK_TO_BLOCK_SEGMENT:
        raise CheckCondition(SenseKey.ILLEGAL_REQUEST,
                             Asc.UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE_CODE,
                             field_pointer=offset, cd=False)
    if length != BLOCK_TO_BLOCK_LENGTH:
        raise invalid_field_in_parameter_list(offset + 2)
    return Segment(
        number=number,
        offset=offset,
        source=u16(data, offset + 4),
        destination=u16(data, offset + 6),
        destination_count=bool(data[offset + 1] & 0x02),
        blocks=u16(data, offset + 10),
        source_lba=u64(data, offset + 12),
        destination_lba=u64(data, offset + 20),
    )


# --- remembered outcomes per I_T nexus -----------------------------------------------------


@dataclass
class CopyRecord:
    list_id: int
    hold: bool                            # LIST ID USAGE 00b: RECEIVE COPY RESULTS may ask
    status: int = IN_PROGRESS
    segments_processed: int = 0
    transferred: int = 0                  # bytes written to copy destinations
    sense: bytes | None = field(default=None, repr=False)   # of a failed copy, until fetched


class CopyResults:
    """The last identified copies of each I_T nexus, bounded, for RECEIVE COPY RESULTS."""

    def __init__(self, per_nexus: int = MAX_IDENTIFIED_COPIES) -> None:
        self._per_nexus = per_nexus
        self._lock = threading.Lock()
        self._by_nexus: dict[ITNexus, OrderedDict[int, CopyRecord]] = {}  # guarded by _lock

    def begin(self, nexus: ITNexus, list_id: int, usage: int) -> CopyRecord:
        record = CopyRecord(list_id, hold=usage == HOLD)
        if usage == NO_LIST_ID:
            return record
        with self._lock:
            history = self._by_nexus.setdefault(nexus, OrderedDict())
            previous = history.get(list_id)
            if previous is not None and previous.status == IN_PROGRESS:
                raise CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.OPERATION_IN_PROGRESS)
            history.pop(list_id, None)
            if len(history) >= self._per_nexus:
                finished = next((key for key, old in history.items()
                                 if old.status != IN_PROGRESS), None)
                if finished is None:
                    raise CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.INSUFFICIENT_RESOURCES)
                del history[finished]
            history[list_id] = record
        return record

    def finish(self, nexus: ITNexus, record: CopyRecord, status: int,
               sense: bytes | None = None) -> None:
        with self._lock:
            record.status = status
            record.sense = sense if record.hold else None
            history = self._by_nexus.get(nexus)
            if not record.hold and history is not None and history.get(record.list_id) is record:
                del history[record.list_id]

    def find(self, nexus: ITNexus, list_id: int) -> CopyRecord | None:
        with self._lock:
            history = self._by_nexus.get(nexus)
            return None if history is None else history.get(list_id)

    def take_failure(self, nexus: ITNexus, list_id: int, allocation_length: int) -> bytes:
        """FAILED SEGMENT DETAILS data; the details are discarded once fully delivered."""
        with self._lock:
            history = self._by_nexus.get(nexus) or {}
            record = history.get(list_id)
            if record is None or record.sense is None:
                return bytes(4)
            sense = record.sense
            data = bytearray(60)
            struct.pack_into(">I", data, 0, 56 + len(sense))
            data[56] = ScsiStatus.CHECK_CONDITION
            struct.pack_into(">H", data, 58, len(sense))
            data += sense
            if allocation_length == 0 or allocation_length >= len(data):
                record.sense = None
            return bytes(data)

    def forget(self, nexus: ITNexus) -> None:
        with self._lock:
            self._by_nexus.pop(nexus, None)

    def clear(self) -> None:
        with self._lock:
            self._by_nexus.clear()


# --- EXTENDED COPY ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Step:
    segment: Segment
    source: Any
    destination: Any


def extended_copy(device: Any, task: ScsiTask) -> None:
    """EXTENDED COPY(LID1): `device` is the copy manager."""
    length = u32(task.cdb, 10)
    task.data_out_length = length
    if length == 0:
        return          # SPC-4: not an error; nothing to copy
    if length > PARAMETER_HEADER + MAX_DESCRIPTOR_LIST_LENGTH + MAX_INLINE_DATA_LENGTH:
        raise _parameter_list_length_error()
    request = parse_parameter_list(spc.parameter_list(task, length))
    results: CopyResults = device.copy_results
    record = results.begin(task.nexus, request.list_id, request.list_id_usage)
    status, sense = FAILED, None
    try:
        steps = [_resolve(device, task.nexus, request, segment) for segment in request.segments]
        for step in steps:
            _copy(step, record)
            record.segments_processed += 1
        status = COMPLETED
    except CheckCondition as condition:
        sense = condition.encode(device.descriptor_sense)
        raise
    finally:
        results.finish(task.nexus, record, status, sense)


def _targets(device: Any) -> CopyTargets:
    registry = getattr(device, "copy_targets", None)
    return registry if registry is not None else CopyTargets([device])


def _copy_target(device: Any, request: CopyRequest, segment: Segment, index: int,
                 index_field: int) -> Any:
    if index >= len(request.cscds):
        raise CopyAborted(Asc.UNREACHABLE_COPY_TARGET, segment.number, field_pointer=index_field)
    cscd = request.cscds[index]
    target = None
    if cscd.designator_type == spc.DESIGNATOR_NAA and cscd.association == spc.ASSOCIATION_LU:
        target = _targets(device).find(cscd.designator)
    if target is None:
        raise CopyAborted(Asc.UNREACHABLE_COPY_TARGET, segment.number,
                          field_pointer=cscd.offset + 4, in_segment=False)
    if (cscd.peripheral_type != PeripheralDeviceType.DIRECT_ACCESS
            or target.peripheral_type != PeripheralDeviceType.DIRECT_ACCESS):
        raise CopyAborted(Asc.INCORRECT_COPY_TARGET_DEVICE_TYPE, segment.number,
                          field_pointer=cscd.offset + 1, in_segment=False)
    if cscd.block_length != target.block_length:
        raise CopyAborted(Asc.INCORRECT_COPY_TARGET_DEVICE_TYPE, segment.number,
                          field_pointer=cscd.offset + 29, in_segment=False)
    return target


def _resolve(device: Any, nexus: ITNexus, request: CopyRequest, segment: Segment) -> _Step:
    source = _copy_target(device, request, segment, segment.source, 4)
    destination = _copy_target(device, request, segment, segment.destination, 6)
    if source.block_length != destination.block_length:
        # Never within one target (all its LUNs share BlockLength); not worth the residue
        # handling (CAT/PAD) a mixed copy would need.
        raise CopyAborted(Asc.INCORRECT_COPY_TARGET_DEVICE_TYPE, segment.number,
                          field_pointer=6)
    if segment.blocks * source.block_length > MAX_SEGMENT_BYTES:
        raise invalid_field_in_parameter_list(segment.offset + 10)
    _check_copy_target(source, nexus, COPY_SOURCE, segment.source_lba, segment)
    _check_copy_target(destination, nexus, COPY_DESTINATION, segment.destination_lba, segment)
    return _Step(segment, source, destination)


def _check_copy_target(target: Any, nexus: ITNexus, role: int, lba: int,
                       segment: Segment) -> None:
    """Refuse what the LU would refuse if this nexus sent it READ(16)/WRITE(16)."""
    opcode = Opcode.READ_16 if role == COPY_SOURCE else Opcode.WRITE_16
    probe = ScsiTask(target.lun_number,
                     struct.pack(">BxQIxx", opcode, lba, segment.blocks), nexus)
    if target.reservations.conflicts(probe):
        raise CopyAborted(Asc.NO_ADDITIONAL_SENSE, segment.number,
                          forwarded=Forwarded(role, ScsiStatus.RESERVATION_CONFLICT))
    with _forwarding(role, segment.number):
        if not target.online:
            raise CheckCondition(SenseKey.NOT_READY,
                                 Asc.LOGICAL_UNIT_NOT_READY_MANUAL_INTERVENTION_REQUIRED)
        not_ready = target.medium.not_ready_asc()
        if not_ready is not None:
            raise CheckCondition(SenseKey.NOT_READY, not_ready)
        target.check_range(lba, segment.blocks)
        if role == COPY_DESTINATION:
            target.check_writable()


def _copy(step: _Step, record: CopyRecord) -> None:
    segment, source, destination = step.segment, step.source, step.destination
    blocks = segment.blocks
    per_chunk = max(1, COPY_CHUNK_BYTES // source.block_length)
    starts = list(range(0, blocks, per_chunk))
    if (source is destination
            and segment.source_lba < segment.destination_lba < segment.source_lba + blocks):
        starts.reverse()    # overlapping, destination above source: copy from the end
    for start in starts:
        count = min(per_chunk, blocks - start)
        with _forwarding(COPY_SOURCE, segment.number):
            data = source.read_blocks(segment.source_lba + start, count, from_medium=False)
        with _forwarding(COPY_DESTINATION, segment.number):
            destination.write_blocks(segment.destination_lba + start, data,
                                     force_unit_access=False)
        record.transferred += len(data)


# --- RECEIVE COPY RESULTS -----------------------------------------------------------------


def receive_copy_results(device: Any, task: ScsiTask) -> None:
    cdb = task.cdb
    action, list_id, allocation_length = cdb[1] & 0x1F, cdb[2], u32(cdb, 10)
    results: CopyResults = device.copy_results
    if action == OPERATING_PARAMETERS:
        data = operating_parameters(device.block_length)
    elif action == COPY_STATUS:
        record = results.find(task.nexus, list_id)
        if record is None:
            raise invalid_field_in_cdb(2)       # no copy with this list identifier
        data = copy_status(record)
    elif action == FAILED_SEGMENT_DETAILS:
        data = results.take_failure(task.nexus, list_id, allocation_length)
    else:                                       # the opcode table lets no other action in
        raise invalid_field_in_cdb(1, 4)
    spc.respond(task, data, allocation_length)


def copy_status(record: CopyRecord) -> bytes:
    transferred, units = record.transferred, 0x00        # bytes
    if transferred > 0xFFFFFFFF:
        transferred, units = transferred >> 10, 0x01     # kibibytes
    return struct.pack(">IBHBI", 8, record.status & 0x7F, min(record.segments_processed, 0xFFFF),
                       units, transferred)


def operating_parameters(block_length: int) -> bytes:
    data = bytearray(44)
    data[4] = 0x01                                       # SNLID: LIST ID USAGE 11b works
    struct.pack_into(">HHIII", data, 8, MAX_CSCD_DESCRIPTORS, MAX_SEGMENT_DESCRIPTORS,
                     MAX_DESCRIPTOR_LIST_LENGTH, MAX_SEGMENT_BYTES, MAX_INLINE_DATA_LENGTH)
    # HELD DATA LIMIT and MAXIMUM STREAM DEVICE TRANSFER SIZE stay zero: neither exists here.
    struct.pack_into(">HB", data, 34, MAX_IDENTIFIED_COPIES, MAX_IDENTIFIED_COPIES)
    data[37] = block_length.bit_length() - 1              # DATA SEGMENT GRANULARITY (log2)
    data[43] = len(SUPPORTED_DESCRIPTOR_TYPES)
    data += bytes(SUPPORTED_DESCRIPTOR_TYPES)
    struct.pack_into(">I", data, 0, len(data) - 4)
    return bytes(data)


# --- Third-party Copy VPD page (8Fh) --------------------------------------------------------

THIRD_PARTY_COPY_VPD = 0x8F
# (opcode, service actions) the copy manager answers
_COPY_COMMANDS = ((Opcode.EXTENDED_COPY, (0x00,)),
                  (Opcode.RECEIVE_COPY_RESULTS, (COPY_STATUS, OPERATING_PARAMETERS,
                                                 FAILED_SEGMENT_DETAILS)))


def _tpc_descriptor(kind: int, body: bytes) -> bytes:
    body += bytes(-len(body) % 4)                        # descriptors are 4-byte multiples
    return struct.pack(">HH", kind, len(body)) + body


def third_party_copy_vpd_body(block_length: int) -> bytes:
    commands = b"".join(bytes([opcode, len(actions), *actions]) for opcode, actions in _COPY_COMMANDS)
    return b"".join((
        _tpc_descriptor(0x0001, bytes([len(commands)]) + commands),          # supported commands
        _tpc_descriptor(0x0004, struct.pack(                                  # parameter data
            ">4xHHII12x", MAX_CSCD_DESCRIPTORS, MAX_SEGMENT_DESCRIPTORS,
            MAX_DESCRIPTOR_LIST_LENGTH, MAX_INLINE_DATA_LENGTH)),
        _tpc_descriptor(0x0008, bytes([len(SUPPORTED_DESCRIPTOR_TYPES),       # supported descriptors
                                       *SUPPORTED_DESCRIPTOR_TYPES])),
        _tpc_descriptor(0x000C, struct.pack(">H", 0)),                       # no CSCD IDs
        _tpc_descriptor(0x8001, struct.pack(                                  # general copy operations
            ">IIIBB18x", MAX_IDENTIFIED_COPIES, MAX_IDENTIFIED_COPIES, MAX_SEGMENT_BYTES,
            block_length.bit_length() - 1, 0)),
    ))
