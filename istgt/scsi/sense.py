"""The CheckCondition outcome and the one function that lays out sense data (SPC-4 4.5)."""

from __future__ import annotations

import struct

from istgt.scsi.constants import Asc, SenseKey

FIXED_CURRENT = 0x70
DESCRIPTOR_CURRENT = 0x72
FIXED_SENSE_LENGTH = 18

_INFORMATION_DESCRIPTOR = 0x00
_SENSE_KEY_SPECIFIC_DESCRIPTOR = 0x02
_STREAM_COMMANDS_DESCRIPTOR = 0x04
FILEMARK, EOM, ILI = 0x80, 0x40, 0x20        # stream bits (byte 2 of fixed sense)


class CheckCondition(Exception):
    """A command ends in CHECK CONDITION with this sense.

    `field_pointer` (with optional `bit_pointer`) fills the sense-key-specific field: it names
    the byte in the CDB (`cd=True`) or in the parameter list (`cd=False`) that was wrong.
    `progress` (0..65535, fraction of 65536 done) fills it instead for a NOT READY that is
    an operation in progress (SPC-4 4.5.2.4.4). `stream` holds the FILEMARK, EOM and ILI
    bits of sequential-access devices (SSC); `info` may then be negative (a residual).
    """

    def __init__(
        self,
        sense_key: int,
        asc: int,
        info: int | None = None,
        field_pointer: int | None = None,
        bit_pointer: int | None = None,
        cd: bool = True,
        progress: int | None = None,
        stream: int = 0,
    ) -> None:
        super().__init__(sense_key, asc)
        self.progress = progress
        self.stream = stream
        # Data-In that still goes to the host with this CHECK CONDITION (a tape read that
        # met a filemark or a record of another length)
        self.data_in: bytes | None = None
        self.sense_key = sense_key
        self.asc = asc
        self.info = info
        self.field_pointer = field_pointer
        self.bit_pointer = bit_pointer
        self.cd = cd

    def __str__(self) -> str:
        try:
            key_name = SenseKey(self.sense_key).name
        except ValueError:
            key_name = f"{self.sense_key:#x}"
        try:
            asc_name = Asc(self.asc).name
        except ValueError:
            asc_name = ""
        return f"{key_name} {self.asc >> 8:02X}/{self.asc & 0xFF:02X} {asc_name}".rstrip()

    def encode(self, descriptor: bool) -> bytes:
        return encode_sense(
            self.sense_key,
            self.asc,
            descriptor=descriptor,
            info=self.info,
            field_pointer=self.field_pointer,
            bit_pointer=self.bit_pointer,
            cd=self.cd,
            progress=self.progress,
            stream=self.stream,
        )


def invalid_field_in_cdb(byte: int, bit: int | None = None) -> CheckCondition:
    return CheckCondition(
        SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, field_pointer=byte, bit_pointer=bit
    )


def invalid_field_in_parameter_list(byte: int, bit: int | None = None) -> CheckCondition:
    return CheckCondition(
        SenseKey.ILLEGAL_REQUEST,
        Asc.INVALID_FIELD_IN_PARAMETER_LIST,
        field_pointer=byte,
        bit_pointer=bit,
        cd=False,
    )


def _sense_key_specific(
    field_pointer: int | None, bit_pointer: int | None, cd: bool, progress: int | None = None
) -> bytes | None:
    if progress is not None:
        return struct.pack(">BH", 0x80, min(max(progress, 0), 0xFFFF))  # SKSV + indication
    if field_pointer is None:
        return None
    flags = 0x80  # SKSV
    if cd:
        flags |= 0x40
    if bit_pointer is not None:
        flags |= 0x08 | (bit_pointer & 0x07)  # BPV + bit pointer
    return struct.pack(">BH", flags, field_pointer & 0xFFFF)


def encode_sense(
    sense_key: int,
    asc: int,
    *,
    descriptor: bool = False,
    info: int | None = None,
    field_pointer: int | None = None,
    bit_pointer: int | None = None,
    cd: bool = True,
    progress: int | None = None,
    stream: int = 0,
) -> bytes:
    """Current-error sense data, fixed (70h) or descriptor (72h) format."""
    sks = _sense_key_specific(field_pointer, bit_pointer, cd, progress)
    if descriptor:
        body = bytearray()
        if info is not None:
            body += struct.pack(">BBBxQ", _INFORMATION_DESCRIPTOR, 0x0A, 0x80,
                                info & 0xFFFFFFFFFFFFFFFF)
        if stream:
            body += struct.pack(">BBxB", _STREAM_COMMANDS_DESCRIPTOR, 0x02, stream & 0xE0)
        if sks is not None:
            body += struct.pack(">BBxx3sx", _SENSE_KEY_SPECIFIC_DESCRIPTOR, 0x06, sks)
        header = struct.pack(
            ">BBBBxxxB", DESCRIPTOR_CURRENT, sense_key & 0x0F, asc >> 8, asc & 0xFF, len(body)
        )
        return header + bytes(body)
    sense = bytearray(FIXED_SENSE_LENGTH)
    sense[0] = FIXED_CURRENT
    # The fixed format holds 32 bits of INFORMATION; larger values leave VALID clear.
    if info is not None and -(1 << 31) <= info <= 0xFFFFFFFF:
        sense[0] |= 0x80
        struct.pack_into(">I", sense, 3, info & 0xFFFFFFFF)
    sense[2] = (sense_key & 0x0F) | (stream & 0xE0)
    sense[7] = FIXED_SENSE_LENGTH - 8
    sense[12] = asc >> 8
    sense[13] = asc & 0xFF
    if sks is not None:
        sense[15:18] = sks
    return bytes(sense)
