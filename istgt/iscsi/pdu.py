"""iSCSI PDU wire format (RFC 7143 section 11): the 48-byte BHS, digests, padding.

Pure code: bytes in, objects out, and back. Incoming PDUs are decoded lazily from the
BHS buffer (fields are read on demand); outgoing PDUs are built with `struct.pack_into`.
"""

from __future__ import annotations

import enum
import struct

import google_crc32c

BHS_LEN = 48
DIGEST_LEN = 4
RESERVED_TAG = 0xFFFFFFFF


class Op(enum.IntEnum):
    # initiator opcodes
    NOP_OUT = 0x00
    SCSI_CMD = 0x01
    TASK_MGMT_REQ = 0x02
    LOGIN_REQ = 0x03
    TEXT_REQ = 0x04
    DATA_OUT = 0x05
    LOGOUT_REQ = 0x06
    SNACK = 0x10
    # target opcodes
    NOP_IN = 0x20
    SCSI_RSP = 0x21
    TASK_MGMT_RSP = 0x22
    LOGIN_RSP = 0x23
    TEXT_RSP = 0x24
    DATA_IN = 0x25
    LOGOUT_RSP = 0x26
    R2T = 0x31
    ASYNC = 0x32
    REJECT = 0x3F


class RejectReason(enum.IntEnum):
    DATA_DIGEST_ERROR = 0x02
    SNACK_REJECT = 0x03
    PROTOCOL_ERROR = 0x04
    COMMAND_NOT_SUPPORTED = 0x05
    IMMEDIATE_COMMAND_REJECT = 0x06
    TASK_IN_PROGRESS = 0x07
    INVALID_DATA_ACK = 0x08
    INVALID_PDU_FIELD = 0x09
    LONG_OPERATION_REJECT = 0x0A
    NEGOTIATION_RESET = 0x0B
    WAITING_FOR_LOGOUT = 0x0C


class TmfFunction(enum.IntEnum):
    ABORT_TASK = 1
    ABORT_TASK_SET = 2
    CLEAR_ACA = 3
    CLEAR_TASK_SET = 4
    LOGICAL_UNIT_RESET = 5
    TARGET_WARM_RESET = 6
    TARGET_COLD_RESET = 7
    TASK_REASSIGN = 8


class TmfResponse(enum.IntEnum):
    COMPLETE = 0
    TASK_DOES_NOT_EXIST = 1
    LUN_DOES_NOT_EXIST = 2
    TASK_STILL_ALLEGIANT = 3
    REASSIGNMENT_NOT_SUPPORTED = 4
    NOT_SUPPORTED = 5
    AUTHORIZATION_FAILED = 6
    REJECTED = 255


class ProtocolError(Exception):
    """A PDU the connection cannot continue after (ERL 0: the connection is dropped)."""


_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")

# Offsets common to most opcodes.
OFF_LUN = 8
OFF_ITT = 16
OFF_TTT = 20
OFF_SN1 = 24    # CmdSN (request) / StatSN (response)
OFF_SN2 = 28    # ExpStatSN (request) / ExpCmdSN (response)
OFF_SN3 = 32    # MaxCmdSN (response)


def _readonly(data):
    # google_crc32c parses its argument with "y#", which refuses every buffer but bytes
    # (even a read-only memoryview), so other buffers cost one copy
    return data if isinstance(data, bytes) else bytes(data)


def crc32c(data) -> int:
    return google_crc32c.value(_readonly(data))


def crc32c_extend(crc: int, data) -> int:
    return google_crc32c.extend(crc, _readonly(data))


def digest_bytes(crc: int) -> bytes:
    # RFC 7143 11.1: CRC32C is sent least significant byte first (as Linux and libiscsi do).
    return crc.to_bytes(4, "little")


def pad_len(n: int) -> int:
    return (-n) & 3


PADDING = (b"", b"\0\0\0", b"\0\0", b"\0")


class Pdu:
    """An incoming PDU: its BHS (bytes), AHS and data segment."""

    __slots__ = ("bhs", "ahs", "data")

    def __init__(self, bhs, ahs=b"", data=b""):
        self.bhs = bhs
        self.ahs = ahs
        self.data = data

    # ---- generic fields
    @property
    def opcode(self) -> int:
        return self.bhs[0] & 0x3F

    @property
    def immediate(self) -> bool:
        return bool(self.bhs[0] & 0x40)

    @property
    def flags(self) -> int:
        return self.bhs[1]

    @property
    def final(self) -> bool:
        return bool(self.bhs[1] & 0x80)

    @property
    def ahs_length(self) -> int:
        return self.bhs[4] * 4

    @property
    def data_length(self) -> int:
        b = self.bhs
        return (b[5] << 16) | (b[6] << 8) | b[7]

    @property
    def lun_field(self) -> int:
        return _U64.unpack_from(self.bhs, OFF_LUN)[0]

    @property
    def itt(self) -> int:
        return _U32.unpack_from(self.bhs, OFF_ITT)[0]

    @property
    def ttt(self) -> int:
        return _U32.unpack_from(self.bhs, OFF_TTT)[0]

    @property
    def cmdsn(self) -> int:
        return _U32.unpack_from(self.bhs, OFF_SN1)[0]

    @property
    def exp_statsn(self) -> int:
        return _U32.unpack_from(self.bhs, OFF_SN2)[0]

    def u32(self, offset: int) -> int:
        return _U32.unpack_from(self.bhs, offset)[0]

    def u16(self, offset: int) -> int:
        return _U16.unpack_from(self.bhs, offset)[0]

    # ---- SCSI command
    @property
    def read_bit(self) -> bool:
        return bool(self.bhs[1] & 0x40)

    @property
    def write_bit(self) -> bool:
        return bool(self.bhs[1] & 0x20)

    @property
    def task_attr(self) -> int:
        return self.bhs[1] & 0x07

    @property
    def expected_length(self) -> int:
        return self.u32(20)

    @property
    def cdb(self) -> bytes:
        return bytes(self.bhs[32:48])

    # ---- Data-Out
    @property
    def data_sn(self) -> int:
        return self.u32(36)

    @property
    def buffer_offset(self) -> int:
        return self.u32(40)

    # ---- Login
    @property
    def transit(self) -> bool:
        return bool(self.bhs[1] & 0x80)

    @property
    def cont(self) -> bool:
        return bool(self.bhs[1] & 0x40)

    @property
    def csg(self) -> int:
        return (self.bhs[1] >> 2) & 3

    @property
    def nsg(self) -> int:
        return self.bhs[1] & 3

    @property
    def version_max(self) -> int:
        return self.bhs[2]

    @property
    def version_min(self) -> int:
        return self.bhs[3]

    @property
    def isid(self) -> bytes:
        return bytes(self.bhs[8:14])

    @property
    def tsih(self) -> int:
        return self.u16(14)

    @property
    def cid(self) -> int:
        return self.u16(20)

    # ---- Task management
    @property
    def function(self) -> int:
        return self.bhs[1] & 0x7F

    @property
    def ref_task_tag(self) -> int:
        return self.u32(20)

    @property
    def ref_cmdsn(self) -> int:
        return self.u32(32)

    # ---- Logout
    @property
    def reason(self) -> int:
        return self.bhs[1] & 0x7F


_SCSI_CMD = struct.Struct(">BB6xQIIII16s")


def scsi_command_fields(bhs) -> tuple:
    """(byte0, flags, lun field, ITT, EDTL, CmdSN, ExpStatSN, CDB) in one unpack (hot path)."""
    return _SCSI_CMD.unpack_from(bhs, 0)


def decode_lun(field: int) -> int:
    """SAM LUN field -> LUN number; unsupported address methods give 0xFFFF (no such LUN)."""
    method = field >> 62
    if method == 0:  # peripheral device addressing (bus 0 only)
        if (field >> 56) & 0x3F:
            return 0xFFFF
        return (field >> 48) & 0xFF
    if method == 1:  # flat space addressing
        return (field >> 48) & 0x3FFF
    return 0xFFFF


def encode_lun(lun: int) -> int:
    if lun < 256:
        return lun << 48
    return ((0x4000 | lun) & 0x7FFF) << 48


class Response:
    """An outgoing PDU. The sender stamps StatSN/ExpCmdSN/MaxCmdSN just before it goes out."""

    __slots__ = ("bhs", "data", "takes_statsn", "status_sn", "ends_command", "after_send")

    def __init__(self, opcode: int, flags: int = 0x80, data=b"", takes_statsn=True,
                 ends_command=False):
        bhs = bytearray(BHS_LEN)
        bhs[0] = opcode
        bhs[1] = flags
        n = len(data)
        bhs[5] = (n >> 16) & 0xFF
        bhs[6] = (n >> 8) & 0xFF
        bhs[7] = n & 0xFF
        self.bhs = bhs
        self.data = data
        # takes_statsn: assigns and consumes a StatSN; otherwise the current one is carried
        self.takes_statsn = takes_statsn
        self.status_sn = takes_statsn
        # ends_command: its send frees a CmdSN slot (MaxCmdSN advances)
        self.ends_command = ends_command
        self.after_send = None

    @classmethod
    def packed(cls, header: struct.Struct, fields: tuple, data, takes_statsn: bool,
               ends_command: bool) -> Response:
        """A response whose whole header is laid out by one `header.pack_into` (hot paths:
        Data-In and SCSI Response), without the field-by-field set-up of __init__."""
        r = cls.__new__(cls)
        r.bhs = bhs = bytearray(BHS_LEN)
        header.pack_into(bhs, 0, *fields)
        r.data = data
        r.takes_statsn = r.status_sn = takes_statsn
        r.ends_command = ends_command
        r.after_send = None
        return r

    def set_u32(self, offset: int, value: int) -> None:
        _U32.pack_into(self.bhs, offset, value & 0xFFFFFFFF)

    def set_u16(self, offset: int, value: int) -> None:
        _U16.pack_into(self.bhs, offset, value & 0xFFFF)

    def set_lun(self, field: int) -> None:
        _U64.pack_into(self.bhs, OFF_LUN, field)

    def set_data_length(self, n: int) -> None:
        self.bhs[5] = (n >> 16) & 0xFF
        self.bhs[6] = (n >> 8) & 0xFF
        self.bhs[7] = n & 0xFF

    @property
    def opcode(self) -> int:
        return self.bhs[0] & 0x3F


_SCSI_RSP = struct.Struct(">BBBBI 8xI 16x III")
_OP_SCSI_RSP, _OP_DATA_IN = int(Op.SCSI_RSP), int(Op.DATA_IN)


def scsi_response(itt: int, status: int, sense: bytes = b"", residual_flags: int = 0,
                  residual: int = 0, exp_data_sn: int = 0) -> Response:
    data = b""
    if sense:
        data = len(sense).to_bytes(2, "big") + sense
    # opcode, flags, response 0 (completed at target), status, data segment length, ITT,
    # [sequence numbers stamped later], ExpDataSN, bidirectional residual 0, residual
    return Response.packed(_SCSI_RSP, (_OP_SCSI_RSP, 0x80 | residual_flags, 0, status,
                                       len(data), itt, exp_data_sn, 0, residual),
                           data, True, True)


_DATA_IN = struct.Struct(">BBxBI QII 12x III")


def data_in(itt: int, lun_field: int, data, data_sn: int, offset: int, final: bool,
            status: int | None = None, residual_flags: int = 0, residual: int = 0) -> Response:
    flags = 0x80 if final else 0
    if status is not None:
        flags |= 0x01 | residual_flags
    else:
        residual = 0
    # opcode, flags, status, data segment length, LUN, ITT, TTT, [sequence numbers stamped
    # later], DataSN, buffer offset, residual
    with_status = status is not None
    return Response.packed(_DATA_IN, (_OP_DATA_IN, flags, status or 0, len(data), lun_field,
                                      itt, RESERVED_TAG, data_sn, offset, residual),
                           data, with_status, with_status)


def r2t(itt: int, lun_field: int, ttt: int, r2t_sn: int, offset: int, length: int) -> Response:
    r = Response(Op.R2T, 0x80, takes_statsn=False)
    r.set_lun(lun_field)
    r.set_u32(OFF_ITT, itt)
    r.set_u32(OFF_TTT, ttt)
    r.set_u32(36, r2t_sn)
    r.set_u32(40, offset)
    r.set_u32(44, length)
    return r


def nop_in(itt: int, ttt: int, lun_field: int = 0, data=b"", ends_command=False,
           takes_statsn=True) -> Response:
    r = Response(Op.NOP_IN, 0x80, data, takes_statsn=takes_statsn, ends_command=ends_command)
    r.set_lun(lun_field)
    r.set_u32(OFF_ITT, itt)
    r.set_u32(OFF_TTT, ttt)
    return r


def tmf_response(itt: int, response: int, ends_command: bool) -> Response:
    r = Response(Op.TASK_MGMT_RSP, 0x80, ends_command=ends_command)
    r.bhs[2] = response
    r.set_u32(OFF_ITT, itt)
    return r


def text_response(itt: int, ttt: int, data: bytes, final: bool, cont: bool,
                  lun_field: int = 0, ends_command=False) -> Response:
    flags = (0x80 if final else 0) | (0x40 if cont else 0)
    r = Response(Op.TEXT_RSP, flags, data, ends_command=ends_command)
    r.set_lun(lun_field)
    r.set_u32(OFF_ITT, itt)
    r.set_u32(OFF_TTT, ttt)
    return r


def logout_response(itt: int, response: int, time2wait: int = 0, time2retain: int = 0,
                    ends_command=False) -> Response:
    r = Response(Op.LOGOUT_RSP, 0x80, ends_command=ends_command)
    r.bhs[2] = response
    r.set_u32(OFF_ITT, itt)
    r.set_u16(40, time2wait)
    r.set_u16(42, time2retain)
    return r


def reject(reason: int, rejected_bhs: bytes) -> Response:
    # RFC 7143 11.17.3: the data segment is the rejected PDU's header (no digest).
    r = Response(Op.REJECT, 0x80, bytes(rejected_bhs[:BHS_LEN]))
    r.bhs[2] = reason
    r.set_u32(OFF_ITT, RESERVED_TAG)
    return r


def login_response(req: Pdu, transit: bool, csg: int, nsg: int, tsih: int,
                   status_class: int, status_detail: int, data: bytes) -> Response:
    flags = (0x80 if transit else 0) | (csg << 2) | (nsg if transit else 0)
    r = Response(Op.LOGIN_RSP, flags, data)
    r.bhs[2] = 0  # version-max
    r.bhs[3] = 0  # version-active
    r.bhs[8:14] = req.bhs[8:14]
    r.set_u16(14, tsih)
    r.set_u32(OFF_ITT, req.itt)
    r.bhs[36] = status_class
    r.bhs[37] = status_detail
    return r


def async_message(event: int, lun_field: int = 0, param1=0, param2=0, param3=0,
                  data=b"") -> Response:
    r = Response(Op.ASYNC, 0x80, data)
    r.set_lun(lun_field)
    r.set_u32(OFF_ITT, RESERVED_TAG)
    r.bhs[36] = event
    r.set_u16(38, param1)
    r.set_u16(40, param2)
    r.set_u16(42, param3)
    return r


_SEQUENCE_NUMBERS = struct.Struct(">III")     # StatSN, ExpCmdSN, MaxCmdSN at OFF_SN1


def stamp(resp: Response, stat_sn: int, exp_cmdsn: int, max_cmdsn: int) -> None:
    _SEQUENCE_NUMBERS.pack_into(resp.bhs, OFF_SN1, stat_sn & 0xFFFFFFFF,
                                exp_cmdsn & 0xFFFFFFFF, max_cmdsn & 0xFFFFFFFF)


def sn_lt(a: int, b: int) -> bool:
    """RFC 1982 serial number arithmetic, 32 bits."""
    return a != b and ((a < b and b - a < 0x80000000) or (a > b and a - b > 0x80000000))


def sn_le(a: int, b: int) -> bool:
    return a == b or sn_lt(a, b)
