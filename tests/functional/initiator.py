"""A small iSCSI test initiator written from RFC 7143, independent of the target's own codec.

It speaks the wire protocol with plain `struct` so that a bug in `istgt.iscsi.pdu` cannot hide
behind the same bug here. It checks what a strict initiator would check (StatSN order, DataSN
order, buffer offsets, burst and segment limits, residuals) and raises `ProtocolViolation`.
Raw `send_pdu`/`recv_pdu` are public so that negative tests can put anything on the wire.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import socket
import struct
from dataclasses import dataclass, field
from typing import Iterator

import google_crc32c

# Initiator opcodes (RFC 7143 11.1.1)
NOP_OUT, SCSI_CMD, TMF_REQ, LOGIN_REQ, TEXT_REQ, DATA_OUT, LOGOUT_REQ, SNACK_REQ = (
    0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x10)
# Target opcodes
NOP_IN, SCSI_RSP, TMF_RSP, LOGIN_RSP, TEXT_RSP, DATA_IN, LOGOUT_RSP = (
    0x20, 0x21, 0x22, 0x23, 0x24, 0x25, 0x26)
R2T, ASYNC_MSG, REJECT = 0x31, 0x32, 0x3F

RESERVED_TAG = 0xFFFFFFFF
SECURITY, OPERATIONAL, FULL_FEATURE = 0, 1, 3
# Task attributes (RFC 7143 11.3.1.1)
UNTAGGED, SIMPLE, ORDERED, HEAD_OF_QUEUE, ACA = range(5)
# Task management functions (RFC 7143 11.5.1)
ABORT_TASK, ABORT_TASK_SET, CLEAR_ACA, CLEAR_TASK_SET = 1, 2, 3, 4
LOGICAL_UNIT_RESET, TARGET_WARM_RESET, TARGET_COLD_RESET, TASK_REASSIGN = 5, 6, 7, 8
# Logout reasons (RFC 7143 11.14.1)
CLOSE_SESSION, CLOSE_CONNECTION, REMOVE_FOR_RECOVERY = 0, 1, 2
# CHAP_A values: 5 is RFC 1994 MD5; 6-8 are the Linux LIO / RFC 7143bis numbers.
CHAP_HASHES = {"5": hashlib.md5, "6": hashlib.sha1, "7": hashlib.sha256, "8": hashlib.sha3_256}

# RFC 7143 defaults, used for every key the login did not settle.
RFC_DEFAULTS = {
    "HeaderDigest": "None", "DataDigest": "None", "MaxConnections": "1",
    "InitialR2T": "Yes", "ImmediateData": "Yes", "MaxRecvDataSegmentLength": "8192",
    "MaxBurstLength": "262144", "FirstBurstLength": "65536", "DefaultTime2Wait": "2",
    "DefaultTime2Retain": "20", "MaxOutstandingR2T": "1", "DataPDUInOrder": "Yes",
    "DataSequenceInOrder": "Yes", "ErrorRecoveryLevel": "0",
}
# Keys a target declares (not an answer to an offer): never echoed back.
DECLARATIVE = {"TargetAlias", "TargetAddress", "TargetPortalGroupTag", "MaxRecvDataSegmentLength",
               "TargetName", "InitiatorName", "InitiatorAlias", "SessionType"}


class ProtocolViolation(AssertionError):
    """The target broke RFC 7143 in a way a strict initiator must notice."""


class ConnectionClosed(EOFError):
    """The target closed (or reset) the TCP connection."""


class LoginFailed(Exception):
    def __init__(self, pdu: Pdu):
        super().__init__(f"login status 0x{pdu.status:04x}: {pdu.text!r}")
        self.pdu = pdu


def crc32c(data: bytes) -> bytes:
    """The digest as it travels: standard CRC32C, least significant byte first (RFC 7143 B.4:
    32 zero bytes give aa 36 91 8a; Linux stores it with cpu_to_le32)."""
    return struct.pack("<I", google_crc32c.value(bytes(data)))


def pad4(length: int) -> int:
    return -length % 4


def sn_gt(a: int, b: int) -> bool:
    """Serial number arithmetic (RFC 1982) on 32 bits."""
    return a != b and ((a - b) & 0xFFFFFFFF) < 0x80000000


def encode_text(pairs) -> bytes:
    return b"".join(f"{k}={v}".encode() + b"\0" for k, v in pairs)


def decode_text(data: bytes) -> list[tuple[str, str]]:
    pairs = []
    for item in bytes(data).split(b"\0"):
        if item:
            key, _, value = item.decode("utf-8", "replace").partition("=")
            pairs.append((key, value))
    return pairs


def encode_lun(lun: int) -> bytes:
    """SAM single-level LUN: peripheral addressing below 256, flat space above."""
    first = lun.to_bytes(2, "big") if lun < 256 else (0x4000 | lun).to_bytes(2, "big")
    return first + bytes(6)


def decode_binary(value: str) -> bytes:
    if value[:2].lower() == "0x":
        return bytes.fromhex(value[2:] if len(value) % 2 == 0 else "0" + value[2:])
    if value[:2].lower() == "0b":
        return base64.b64decode(value[2:])
    raise ProtocolViolation(f"bad binary value {value!r}")


# Named BHS fields per target opcode: (name, offset, size). RFC 7143 section 11.
_COMMON_SNS = [("stat_sn", 24, 4), ("exp_cmd_sn", 28, 4), ("max_cmd_sn", 32, 4)]
LAYOUTS: dict[int, list[tuple[str, int, int]]] = {
    NOP_IN: [("lun", 8, 8), ("ttt", 20, 4), *_COMMON_SNS],
    SCSI_RSP: [("response", 2, 1), ("status", 3, 1), ("snack_tag", 20, 4), *_COMMON_SNS,
               ("exp_data_sn", 36, 4), ("bidi_residual", 40, 4), ("residual", 44, 4)],
    TMF_RSP: [("response", 2, 1), *_COMMON_SNS],
    LOGIN_RSP: [("version_max", 2, 1), ("version_active", 3, 1), ("isid", 8, 6),
                ("tsih", 14, 2), *_COMMON_SNS, ("status_class", 36, 1), ("status_detail", 37, 1)],
    TEXT_RSP: [("lun", 8, 8), ("ttt", 20, 4), *_COMMON_SNS],
    DATA_IN: [("status", 3, 1), ("lun", 8, 8), ("ttt", 20, 4), *_COMMON_SNS, ("data_sn", 36, 4),
              ("buffer_offset", 40, 4), ("residual", 44, 4)],
    LOGOUT_RSP: [("response", 2, 1), *_COMMON_SNS, ("time2wait", 40, 2), ("time2retain", 42, 2)],
    R2T: [("lun", 8, 8), ("ttt", 20, 4), *_COMMON_SNS, ("r2t_sn", 36, 4),
          ("buffer_offset", 40, 4), ("desired_length", 44, 4)],
    ASYNC_MSG: [("lun", 8, 8), *_COMMON_SNS, ("async_event", 36, 1), ("async_vcode", 37, 1),
                ("parameter1", 38, 2), ("parameter2", 40, 2), ("parameter3", 42, 2)],
    REJECT: [("reason", 2, 1), *_COMMON_SNS, ("data_sn", 36, 4)],
}


class Pdu:
    """A received PDU: every BHS field of its opcode as an attribute, plus data."""

    def __init__(self, bhs: bytes, ahs: bytes = b"", data: bytes = b""):
        self.bhs, self.ahs, self.data = bytes(bhs), bytes(ahs), bytes(data)
        self.opcode = bhs[0] & 0x3F
        self.immediate = bool(bhs[0] & 0x40)
        self.flags = bhs[1]
        self.total_ahs_length = bhs[4]
        self.data_segment_length = int.from_bytes(bhs[5:8], "big")
        self.itt = int.from_bytes(bhs[16:20], "big")
        for name, offset, size in LAYOUTS.get(self.opcode, []):
            setattr(self, name, int.from_bytes(bhs[offset:offset + size], "big"))

    final = property(lambda self: bool(self.flags & 0x80))
    transit = final
    cont = property(lambda self: bool(self.flags & 0x40))
    csg = property(lambda self: (self.flags >> 2) & 3)
    nsg = property(lambda self: self.flags & 3)
    status_bit = property(lambda self: bool(self.flags & 0x01))  # Data-In S
    overflow = property(lambda self: bool(self.flags & 0x04))
    underflow = property(lambda self: bool(self.flags & 0x02))
    # Login Response status as one 16-bit number, e.g. 0x0201.
    status16 = property(lambda self: (self.status_class << 8) | self.status_detail)
    pairs = property(lambda self: decode_text(self.data))
    text = property(lambda self: dict(decode_text(self.data)))

    @property
    def carries_stat_sn(self) -> bool:
        """True when this PDU consumed a StatSN (RFC 7143 4.2.2.2)."""
        if self.opcode in (R2T,):
            return False
        if self.opcode == DATA_IN:
            return self.status_bit
        if self.opcode == NOP_IN:
            return self.itt != RESERVED_TAG
        return self.opcode in LAYOUTS

    def __repr__(self) -> str:
        names = ", ".join(f"{n}={getattr(self, n):#x}" for n, _, _ in LAYOUTS.get(self.opcode, []))
        return (f"Pdu(opcode={self.opcode:#04x}, flags={self.flags:#04x}, itt={self.itt:#x}, "
                f"{names}, data={len(self.data)}B)")

    # Login Response exposes 'status' as the 16-bit class/detail pair for convenience.
    def __getattr__(self, name):
        if name == "status" and self.opcode == LOGIN_RSP:
            return self.status16
        raise AttributeError(name)


def build_bhs(opcode: int, *, immediate: bool = False, flags: int = 0, b2: int = 0, b3: int = 0,
              data_length: int = 0, ahs_length: int = 0, lun8: bytes = bytes(8),
              itt: int = 0, words: dict[int, int] | None = None, cdb: bytes = b"") -> bytes:
    """A 48-byte BHS; `words` maps a byte offset to a 32-bit big-endian value."""
    bhs = bytearray(48)
    bhs[0] = opcode | (0x40 if immediate else 0)
    bhs[1], bhs[2], bhs[3] = flags, b2, b3
    bhs[4] = ahs_length // 4
    bhs[5:8] = data_length.to_bytes(3, "big")
    bhs[8:16] = lun8
    bhs[16:20] = itt.to_bytes(4, "big")
    for offset, value in (words or {}).items():
        bhs[offset:offset + 4] = (value & 0xFFFFFFFF).to_bytes(4, "big")
    if cdb:
        bhs[32:32 + len(cdb)] = cdb
    return bytes(bhs)


@dataclass
class Negotiated:
    """Effective operational values after login (strings as negotiated, ints where numeric)."""
    keys: dict[str, str]

    def __getitem__(self, key: str) -> str:
        value = self.keys.get(key)
        if value in (None, "Reject", "NotUnderstood", "Irrelevant"):
            return RFC_DEFAULTS.get(key, "")
        return value

    def num(self, key: str) -> int:
        return int(self[key])

    def yes(self, key: str) -> bool:
        return self[key] == "Yes"


@dataclass
class ScsiResult:
    status: int
    sense: bytes
    data: bytes
    response: Pdu
    data_in: list[Pdu] = field(default_factory=list)
    r2ts: list[Pdu] = field(default_factory=list)
    residual: int = 0
    underflow: bool = False
    overflow: bool = False

    def __iter__(self) -> Iterator:  # status, sense, data, response = initiator.scsi(...)
        return iter((self.status, self.sense, self.data, self.response))


@dataclass
class _Task:
    itt: int
    lun: int
    edtl: int
    data_out: bytes
    read_length: int
    buffer: bytearray = field(default_factory=bytearray)
    next_data_sn: int = 0
    next_r2t_sn: int = 0
    burst_bytes: int = 0
    result: ScsiResult | None = None
    data_in: list[Pdu] = field(default_factory=list)
    r2ts: list[Pdu] = field(default_factory=list)


class Initiator:
    def __init__(self, host: str, port: int, initiator_name: str = "iqn.2024-01.org.example:test",
                 isid: bytes | None = None, timeout: float = 10.0):
        self.host, self.port = host, port
        self.initiator_name = initiator_name
        self.isid = isid if isid is not None else bytes([0x80, 0, 0]) + secrets.token_bytes(3)
        self.timeout = timeout
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.header_digest = self.data_digest = False
        self.tsih = 0
        self.cid = 0
        self.cmd_sn = 1
        self.exp_stat_sn = 0
        self.exp_cmd_sn = self.max_cmd_sn = 0
        self.statsn_initialised = False
        self.params = Negotiated({})
        self.target_mrdsl = 8192      # how much we may send per PDU
        self.my_mrdsl = 8192          # how much we declared we accept
        self.next_itt = 1
        self.tasks: dict[int, _Task] = {}
        self.answer_nop_in = True     # reply to target pings automatically
        self.nop_ins: list[Pdu] = []  # target-initiated NOP-Ins seen
        self.async_events: list[Pdu] = []
        self.rejects: list[Pdu] = []
        self.violations: list[str] = []
        self.strict = True            # raise on a violation (False: only record it)
        self.closed = False
        self.login_responses: list[Pdu] = []

    # ---- raw transport ---------------------------------------------------------------
    def send_pdu(self, bhs: bytes, data: bytes = b"", ahs: bytes = b"",
                 header_digest: bytes | None = None, data_digest: bytes | None = None) -> None:
        """Send one PDU; digests are computed when negotiated unless given explicitly."""
        parts = [bhs, ahs]
        if self.header_digest:
            parts.append(header_digest if header_digest is not None else crc32c(bhs + ahs))
        if data:
            padded = bytes(data) + bytes(pad4(len(data)))
            parts.append(padded)
            if self.data_digest:
                parts.append(data_digest if data_digest is not None else crc32c(padded))
        self.sock.sendall(b"".join(parts))

    def send_raw(self, raw: bytes) -> None:
        self.sock.sendall(raw)

    def _recv_exact(self, count: int) -> bytes:
        buf = bytearray(count)
        view, got = memoryview(buf), 0
        while got < count:
            try:
                n = self.sock.recv_into(view[got:])
            except (ConnectionResetError, BrokenPipeError) as exc:
                self.closed = True
                raise ConnectionClosed(str(exc)) from exc
            if n == 0:
                self.closed = True
                raise ConnectionClosed(f"EOF after {got} of {count} bytes")
            got += n
        return bytes(buf)

    def recv_pdu(self, timeout: float | None = None) -> Pdu:
        """Read one PDU, verify digests and padding, track StatSN/ExpCmdSN/MaxCmdSN."""
        self.sock.settimeout(self.timeout if timeout is None else timeout)
        bhs = self._recv_exact(48)
        self.sock.settimeout(self.timeout)
        ahs = self._recv_exact(bhs[4] * 4) if bhs[4] else b""
        if self.header_digest:
            got = self._recv_exact(4)
            if got != crc32c(bhs + ahs):
                raise ProtocolViolation(f"bad header digest {got.hex()} on {bhs.hex()}")
        length = int.from_bytes(bhs[5:8], "big")
        data = b""
        if length:
            if length > self.my_mrdsl and bhs[0] & 0x3F != LOGIN_RSP:
                self._violation(f"data segment {length} > declared MRDSL {self.my_mrdsl}")
            padded = self._recv_exact(length + pad4(length))
            if self.data_digest:
                got = self._recv_exact(4)
                if got != crc32c(padded):
                    raise ProtocolViolation(f"bad data digest {got.hex()}")
            if any(padded[length:]):
                self._violation("non-zero padding")
            data = padded[:length]
        pdu = Pdu(bhs, ahs, data)
        self._track_sequence_numbers(pdu)
        return pdu

    def _violation(self, message: str) -> None:
        self.violations.append(message)
        if self.strict:
            raise ProtocolViolation(message)

    def _track_sequence_numbers(self, pdu: Pdu) -> None:
        if pdu.opcode not in LAYOUTS or pdu.opcode == DATA_IN and not pdu.status_bit:
            return
        if pdu.carries_stat_sn:
            if self.statsn_initialised and pdu.stat_sn != self.exp_stat_sn:
                self.violations.append(f"StatSN {pdu.stat_sn} != expected {self.exp_stat_sn}"
                                       f" on opcode {pdu.opcode:#x}")
            self.exp_stat_sn = (pdu.stat_sn + 1) & 0xFFFFFFFF
            self.statsn_initialised = True
        if pdu.opcode == LOGIN_RSP and pdu.status_class:
            return  # ExpCmdSN/MaxCmdSN are not meaningful on a failed login
        if not self.max_cmd_sn and not self.exp_cmd_sn or sn_gt(pdu.max_cmd_sn, self.max_cmd_sn):
            self.max_cmd_sn = pdu.max_cmd_sn
        if not self.exp_cmd_sn or sn_gt(pdu.exp_cmd_sn, self.exp_cmd_sn):
            self.exp_cmd_sn = pdu.exp_cmd_sn

    def wait_closed(self, timeout: float = 5.0) -> list[Pdu]:
        """Read until the target closes the connection; returns what arrived before.
        Raises TimeoutError if the connection stays open."""
        seen = []
        while True:
            try:
                seen.append(self.recv_pdu(timeout))
            except ConnectionClosed:
                return seen
            except (TimeoutError, socket.timeout) as exc:
                raise TimeoutError(f"connection still open after {timeout}s; got {seen}") from exc

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass

    def new_itt(self) -> int:
        itt = self.next_itt
        self.next_itt = (self.next_itt + 1) & 0x7FFFFFFF or 1
        return itt

    def _cmd_sn_for(self, immediate: bool) -> int:
        sn = self.cmd_sn
        if not immediate:
            self.cmd_sn = (self.cmd_sn + 1) & 0xFFFFFFFF
        return sn

    # ---- login ---------------------------------------------------------------------
    def login_pdu(self, pairs, csg: int, nsg: int, transit: bool, cont: bool = False,
                  itt: int = 0, version_max: int = 0, version_min: int = 0) -> Pdu:
        flags = (0x80 if transit else 0) | (0x40 if cont else 0) | (csg << 2) | nsg
        bhs = build_bhs(LOGIN_REQ, immediate=True, flags=flags, b2=version_max, b3=version_min,
                        data_length=len(encode_text(pairs)),
                        lun8=self.isid + self.tsih.to_bytes(2, "big"), itt=itt,
                        words={20: self.cid << 16, 24: self.cmd_sn, 28: self.exp_stat_sn})
        self.send_pdu(bhs, encode_text(pairs))
        rsp = self.recv_pdu()
        self.login_responses.append(rsp)
        if rsp.opcode != LOGIN_RSP:
            raise ProtocolViolation(f"expected Login Response, got {rsp!r}")
        if rsp.itt != itt:
            raise ProtocolViolation(f"login ITT {rsp.itt:#x} != {itt:#x}")
        return rsp

    def login(self, target_name: str | None = None, auth=None, chap_algorithms=("5",),
              header_digest: str = "None", data_digest: str = "None",
              keys: dict[str, str] | None = None, expect_status: int = 0,
              max_recv_data_segment_length: int | None = 262144, tsih: int = 0, cid: int = 0,
              security_stage: bool = True, initiator_name: str | None = "default",
              session_type: str | None = None) -> Negotiated | Pdu:
        """Log in through the security and operational stages.

        auth: None, (user, secret) or (user, secret, mutual_user, mutual_secret).
        Returns the negotiated keys, or the failing Login Response when expect_status != 0
        (a different status raises LoginFailed)."""
        self.tsih, self.cid = tsih, cid
        itt = self.new_itt()
        name = self.initiator_name if initiator_name == "default" else initiator_name
        leading = [("InitiatorName", name)] if name is not None else []
        stype = session_type or ("Normal" if target_name else "Discovery")
        leading.append(("SessionType", stype))
        if target_name:
            leading.append(("TargetName", target_name))
        offered = {"HeaderDigest": header_digest, "DataDigest": data_digest}
        if max_recv_data_segment_length is not None:
            offered["MaxRecvDataSegmentLength"] = str(max_recv_data_segment_length)
        offered.update(keys or {})
        answers: dict[str, str] = {}

        def check(rsp: Pdu) -> bool:
            """True when the login ended (failure expected); raises on an unexpected status."""
            if rsp.status16 != 0:
                if rsp.status16 == expect_status:
                    return True
                raise LoginFailed(rsp)
            answers.update(rsp.text)
            return False

        if auth is not None:
            rsp = self.login_pdu(leading + [("AuthMethod", "CHAP")], SECURITY, OPERATIONAL,
                                 False, itt=itt)
            leading = []
            if check(rsp):
                return rsp
            if rsp.text.get("AuthMethod") != "CHAP":
                raise ProtocolViolation(f"target did not accept CHAP: {rsp.pairs}")
            rsp = self.login_pdu([("CHAP_A", ",".join(chap_algorithms))], SECURITY, OPERATIONAL,
                                 False, itt=itt)
            if check(rsp):
                return rsp
            rsp = self._chap_answer(rsp, auth, itt)
            if check(rsp):
                return rsp
            stage = rsp.nsg if rsp.transit else SECURITY
            while stage == SECURITY:  # target may need another round before transiting
                rsp = self.login_pdu([], SECURITY, OPERATIONAL, True, itt=itt)
                if check(rsp):
                    return rsp
                stage = rsp.nsg if rsp.transit else SECURITY
        elif security_stage:
            rsp = self.login_pdu(leading + [("AuthMethod", "None")], SECURITY, OPERATIONAL, True,
                                 itt=itt)
            leading = []
            if check(rsp):
                return rsp
            if not rsp.transit:
                raise ProtocolViolation(f"target kept us in security stage: {rsp.pairs}")
        pairs = leading + list(offered.items())
        while True:
            rsp = self.login_pdu(pairs, OPERATIONAL, FULL_FEATURE, True, itt=itt)
            if check(rsp):
                return rsp
            if rsp.transit and rsp.nsg == FULL_FEATURE:
                break
            # Answer any key the target proposed on its own, accepting its value.
            pairs = [(k, v) for k, v in rsp.pairs if k not in offered and k not in DECLARATIVE]
        if expect_status:
            raise AssertionError(f"login succeeded, expected status {expect_status:#06x}")
        if rsp.tsih == 0:
            raise ProtocolViolation("final Login Response has TSIH 0")
        self.tsih = rsp.tsih
        return self._apply_negotiation(offered, answers)

    def _chap_answer(self, challenge: Pdu, auth, itt: int) -> Pdu:
        keys = challenge.text
        algorithm = keys.get("CHAP_A")
        if algorithm not in CHAP_HASHES:
            raise ProtocolViolation(f"target chose unsupported CHAP_A {algorithm!r}")
        digest = CHAP_HASHES[algorithm]
        identifier = int(keys["CHAP_I"])
        challenge_bytes = decode_binary(keys["CHAP_C"])
        user, secret = auth[0], auth[1]
        response = digest(bytes([identifier]) + secret.encode() + challenge_bytes).hexdigest()
        pairs = [("CHAP_N", user), ("CHAP_R", "0x" + response)]
        mutual = len(auth) == 4
        if mutual:
            my_id = secrets.randbelow(256)
            my_challenge = secrets.token_bytes(digest().digest_size)
            pairs += [("CHAP_I", str(my_id)), ("CHAP_C", "0x" + my_challenge.hex())]
        rsp = self.login_pdu(pairs, SECURITY, OPERATIONAL, True, itt=itt)
        if mutual and rsp.status16 == 0:
            answer = rsp.text
            expected = digest(bytes([my_id]) + auth[3].encode() + my_challenge).digest()
            if answer.get("CHAP_N") != auth[2]:
                raise ProtocolViolation(f"mutual CHAP_N {answer.get('CHAP_N')!r} != {auth[2]!r}")
            if decode_binary(answer.get("CHAP_R", "0x")) != expected:
                raise ProtocolViolation("target's mutual CHAP_R is wrong")
        return rsp

    def _apply_negotiation(self, offered: dict[str, str], answers: dict[str, str]) -> Negotiated:
        keys = {k: v for k, v in offered.items() if k != "MaxRecvDataSegmentLength"}
        keys.update({k: v for k, v in answers.items()
                     if k != "MaxRecvDataSegmentLength" and not k.startswith("CHAP_")})
        keys["TargetMaxRecvDataSegmentLength"] = answers.get("MaxRecvDataSegmentLength", "8192")
        self.params = Negotiated(keys)
        self.target_mrdsl = int(keys["TargetMaxRecvDataSegmentLength"])
        self.my_mrdsl = int(offered.get("MaxRecvDataSegmentLength", "8192"))
        self.header_digest = self.params["HeaderDigest"] == "CRC32C"
        self.data_digest = self.params["DataDigest"] == "CRC32C"
        return self.params

    # ---- full feature phase: text, NOP, TMF, logout ------------------------------------
    def text(self, pairs, immediate: bool = False) -> list[tuple[str, str]]:
        """Text Request; follows C-bit continuations and returns all pairs."""
        itt, ttt, data, result = self.new_itt(), RESERVED_TAG, encode_text(pairs), b""
        while True:
            bhs = build_bhs(TEXT_REQ, immediate=immediate, flags=0x80, data_length=len(data),
                            itt=itt, words={20: ttt, 24: self._cmd_sn_for(immediate),
                                            28: self.exp_stat_sn})
            self.send_pdu(bhs, data)
            rsp = self.wait_for(lambda p: p.opcode == TEXT_RSP and p.itt == itt
                                or p.opcode == REJECT)
            if rsp.opcode == REJECT:
                raise ProtocolViolation(f"Text rejected: reason {rsp.reason:#x}")
            result += rsp.data
            if rsp.final and not rsp.cont:
                if rsp.ttt != RESERVED_TAG:
                    self._violation(f"final Text Response with TTT {rsp.ttt:#x}")
                return decode_text(result)
            ttt, data = rsp.ttt, b""  # ask for the rest with an empty request

    def send_targets(self, value: str = "All") -> list[tuple[str, list[str]]]:
        targets: list[tuple[str, list[str]]] = []
        for key, val in self.text([("SendTargets", value)]):
            if key == "TargetName":
                targets.append((val, []))
            elif key == "TargetAddress" and targets:
                targets[-1][1].append(val)
            else:
                raise ProtocolViolation(f"unexpected key in SendTargets answer: {key}={val}")
        return targets

    def nop_out(self, data: bytes = b"", immediate: bool = True, lun: int = 0) -> Pdu:
        itt = self.new_itt()
        bhs = build_bhs(NOP_OUT, immediate=immediate, flags=0x80, data_length=len(data),
                        lun8=encode_lun(lun), itt=itt,
                        words={20: RESERVED_TAG, 24: self._cmd_sn_for(immediate),
                               28: self.exp_stat_sn})
        self.send_pdu(bhs, data)
        return self.wait_for(lambda p: p.opcode == NOP_IN and p.itt == itt)

    def tmf(self, function: int, ref_itt: int = RESERVED_TAG, lun: int = 0,
            ref_cmd_sn: int | None = None, immediate: bool = True) -> Pdu:
        itt = self.new_itt()
        sn = self._cmd_sn_for(immediate)
        bhs = build_bhs(TMF_REQ, immediate=immediate, flags=0x80 | function,
                        lun8=encode_lun(lun), itt=itt,
                        words={20: ref_itt, 24: sn, 28: self.exp_stat_sn,
                               32: sn if ref_cmd_sn is None else ref_cmd_sn})
        self.send_pdu(bhs)
        rsp = self.wait_for(lambda p: p.opcode == TMF_RSP and p.itt == itt)
        if not rsp.final:
            self._violation("TMF Response without F bit")
        return rsp

    def logout(self, reason: int = CLOSE_SESSION, cid: int | None = None) -> Pdu:
        itt = self.new_itt()
        bhs = build_bhs(LOGOUT_REQ, immediate=True, flags=0x80 | reason, itt=itt,
                        words={20: (self.cid if cid is None else cid) << 16,
                               24: self.cmd_sn, 28: self.exp_stat_sn})
        self.send_pdu(bhs)
        return self.wait_for(lambda p: p.opcode == LOGOUT_RSP and p.itt == itt)

    # ---- PDU dispatch ------------------------------------------------------------------
    def wait_for(self, predicate, timeout: float | None = None) -> Pdu:
        """Receive PDUs, feeding SCSI traffic to its tasks, until one matches `predicate`."""
        while True:
            pdu = self.recv_pdu(timeout)
            if predicate(pdu):
                return pdu
            self._dispatch(pdu)

    def handle(self, pdu: Pdu) -> None:
        """Process a PDU the caller received itself (e.g. an R2T it held back)."""
        self._dispatch(pdu)

    def _dispatch(self, pdu: Pdu) -> None:
        if pdu.opcode == NOP_IN and pdu.itt == RESERVED_TAG:
            self.nop_ins.append(pdu)
            if pdu.ttt != RESERVED_TAG and self.answer_nop_in:
                bhs = build_bhs(NOP_OUT, immediate=True, flags=0x80, lun8=pdu.bhs[8:16],
                                itt=RESERVED_TAG, words={20: pdu.ttt, 24: self.cmd_sn,
                                                         28: self.exp_stat_sn})
                self.send_pdu(bhs)
        elif pdu.opcode == ASYNC_MSG:
            self.async_events.append(pdu)
        elif pdu.opcode == REJECT:
            self.rejects.append(pdu)
        elif pdu.opcode in (DATA_IN, R2T, SCSI_RSP):
            task = self.tasks.get(pdu.itt)
            if task is None:
                self._violation(f"PDU for unknown ITT: {pdu!r}")
            {DATA_IN: self._on_data_in, R2T: self._on_r2t, SCSI_RSP: self._on_response}[
                pdu.opcode](task, pdu)
        else:
            self._violation(f"unexpected PDU {pdu!r}")

    # ---- SCSI --------------------------------------------------------------------------
    def submit(self, cdb: bytes, lun: int = 0, data_out: bytes = b"", read_length: int = 0,
               immediate: bool = False, attr: int = SIMPLE, edtl: int | None = None,
               use_immediate_data: bool = True, write: bool | None = None) -> int:
        """Send a SCSI Command (and its unsolicited data); returns the ITT.
        `edtl` and `write` override what data_out/read_length imply (negative tests)."""
        itt = self.new_itt()
        write = bool(data_out) if write is None else write
        edtl = edtl if edtl is not None else (len(data_out) if data_out else read_length)
        task = _Task(itt, lun, edtl, bytes(data_out), read_length)
        self.tasks[itt] = task
        first_burst = min(self.params.num("FirstBurstLength"), edtl)
        immediate_len = 0
        if data_out and use_immediate_data and self.params.yes("ImmediateData"):
            immediate_len = min(first_burst, self.target_mrdsl, len(data_out))
        unsolicited = immediate_len
        if data_out and not self.params.yes("InitialR2T"):
            unsolicited = first_burst  # immediate data plus unsolicited Data-Out
        flags = 0x80 | (0x40 if read_length else 0) | (0x20 if write else 0) | attr
        final_in_cmd = unsolicited == immediate_len
        if not final_in_cmd:
            flags &= ~0x80  # F=0: unsolicited Data-Out follows
        bhs = build_bhs(SCSI_CMD, immediate=immediate, flags=flags, data_length=immediate_len,
                        lun8=encode_lun(lun), itt=itt,
                        words={20: edtl, 24: self._cmd_sn_for(immediate), 28: self.exp_stat_sn},
                        cdb=cdb.ljust(16, b"\0"))
        self.send_pdu(bhs, data_out[:immediate_len])
        if not final_in_cmd:
            self._send_data_out(task, RESERVED_TAG, immediate_len, unsolicited - immediate_len)
        return itt

    def _send_data_out(self, task: _Task, ttt: int, offset: int, length: int) -> None:
        data_sn, end = 0, offset + length
        while offset < end:
            chunk = min(self.target_mrdsl, end - offset)
            last = offset + chunk == end
            bhs = build_bhs(DATA_OUT, flags=0x80 if last else 0, data_length=chunk,
                            lun8=encode_lun(task.lun), itt=task.itt,
                            words={20: ttt, 28: self.exp_stat_sn, 36: data_sn, 40: offset})
            self.send_pdu(bhs, task.data_out[offset:offset + chunk])
            offset, data_sn = offset + chunk, data_sn + 1

    def _on_r2t(self, task: _Task, pdu: Pdu) -> None:
        task.r2ts.append(pdu)
        if pdu.r2t_sn != task.next_r2t_sn:
            self._violation(f"R2TSN {pdu.r2t_sn} != expected {task.next_r2t_sn}")
        task.next_r2t_sn += 1
        if pdu.desired_length == 0 or pdu.desired_length > self.params.num("MaxBurstLength"):
            self._violation(f"R2T desired length {pdu.desired_length} vs MaxBurstLength "
                            f"{self.params.num('MaxBurstLength')}")
        if pdu.buffer_offset + pdu.desired_length > len(task.data_out):
            self._violation(f"R2T beyond the data: {pdu!r}")
        if pdu.ttt == RESERVED_TAG:
            self._violation("R2T with reserved TTT")
        self._send_data_out(task, pdu.ttt, pdu.buffer_offset, pdu.desired_length)

    def _on_data_in(self, task: _Task, pdu: Pdu) -> None:
        task.data_in.append(pdu)
        if pdu.data_sn != task.next_data_sn:
            self._violation(f"DataSN {pdu.data_sn} != expected {task.next_data_sn}")
        task.next_data_sn += 1
        if pdu.buffer_offset != len(task.buffer):
            self._violation(f"Data-In offset {pdu.buffer_offset} != {len(task.buffer)}")
        task.buffer += pdu.data
        task.burst_bytes += len(pdu.data)
        if task.burst_bytes > self.params.num("MaxBurstLength"):
            self._violation(f"Data-In sequence {task.burst_bytes} > MaxBurstLength")
        if pdu.final:
            task.burst_bytes = 0
        if pdu.status_bit:
            if not pdu.final:
                self._violation("Data-In with S bit but without F bit")
            self._finish(task, pdu, pdu.status, b"")
        elif pdu.flags & 0x06:
            self._violation("Data-In with O/U bits but no S bit")

    def _on_response(self, task: _Task, pdu: Pdu) -> None:
        if not pdu.final:
            self._violation("SCSI Response without F bit")
        sense = b""
        if pdu.data:
            length = int.from_bytes(pdu.data[:2], "big")
            if length + 2 > len(pdu.data):
                self._violation(f"SenseLength {length} beyond the data segment")
            sense = pdu.data[2:2 + length]
        if pdu.response != 0:
            task.buffer = bytearray()
        self._finish(task, pdu, pdu.status, sense)

    def _finish(self, task: _Task, pdu: Pdu, status: int, sense: bytes) -> None:
        if len(task.buffer) > task.read_length:
            self._violation(f"{len(task.buffer)} bytes read > EDTL {task.read_length}")
        if status == 0 and task.read_length and not pdu.underflow \
                and len(task.buffer) < task.read_length:
            self._violation(f"short read ({len(task.buffer)} of {task.read_length}) without U")
        if pdu.underflow and status == 0 and task.read_length and \
                pdu.residual != task.read_length - len(task.buffer):
            self._violation(f"residual {pdu.residual} != {task.read_length - len(task.buffer)}")
        task.result = ScsiResult(status, sense, bytes(task.buffer), pdu, task.data_in, task.r2ts,
                                 pdu.residual, pdu.underflow, pdu.overflow)

    def collect(self, itt: int, timeout: float | None = None) -> ScsiResult:
        task = self.tasks[itt]
        while task.result is None:
            self._dispatch(self.recv_pdu(timeout))
        del self.tasks[itt]
        return task.result

    def scsi(self, cdb: bytes, lun: int = 0, data_out: bytes = b"", read_length: int = 0,
             immediate: bool = False, attr: int = SIMPLE, **kwargs) -> ScsiResult:
        return self.collect(self.submit(cdb, lun, data_out, read_length, immediate, attr, **kwargs))

    def pipeline(self, commands: list[dict]) -> list[ScsiResult]:
        """Send every command (kwargs of submit) before reading any response."""
        itts = [self.submit(**command) for command in commands]
        return [self.collect(itt) for itt in itts]

    # ---- SCSI helpers ------------------------------------------------------------------
    def tur(self, lun: int = 0) -> ScsiResult:
        return self.scsi(bytes(6), lun)

    def inquiry(self, lun: int = 0, evpd: bool = False, page: int = 0, length: int = 255):
        return self.scsi(bytes([0x12, int(evpd), page]) + length.to_bytes(2, "big") + b"\0",
                         lun, read_length=length)

    def read_capacity16(self, lun: int = 0) -> tuple[int, int]:
        """(number of blocks, block length)."""
        result = self.scsi(bytes([0x9E, 0x10]) + bytes(8) + (32).to_bytes(4, "big") + bytes(2),
                           lun, read_length=32)
        if result.status != 0:
            raise AssertionError(f"READ CAPACITY(16): status {result.status:#x}, "
                                 f"sense {result.sense.hex()}")
        return int.from_bytes(result.data[:8], "big") + 1, int.from_bytes(result.data[8:12], "big")

    def read10(self, lba: int, blocks: int, block_size: int = 512, lun: int = 0, **kw):
        cdb = struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)
        return self.scsi(cdb, lun, read_length=blocks * block_size, **kw)

    def write10(self, lba: int, data: bytes, block_size: int = 512, lun: int = 0, **kw):
        cdb = struct.pack(">BBIBHB", 0x2A, 0, lba, 0, len(data) // block_size, 0)
        return self.scsi(cdb, lun, data_out=data, **kw)

    def read16(self, lba: int, blocks: int, block_size: int = 512, lun: int = 0, **kw):
        cdb = struct.pack(">BBQIBB", 0x88, 0, lba, blocks, 0, 0)
        return self.scsi(cdb, lun, read_length=blocks * block_size, **kw)

    def write16(self, lba: int, data: bytes, block_size: int = 512, lun: int = 0, **kw):
        cdb = struct.pack(">BBQIBB", 0x8A, 0, lba, len(data) // block_size, 0, 0)
        return self.scsi(cdb, lun, data_out=data, **kw)
