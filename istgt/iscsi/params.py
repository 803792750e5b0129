"""iSCSI text key=value codec and operational parameter negotiation (pure: no sockets).

The target is always the *responder* to the initiator's offers, plus the originator of a few
declarations and proposals of its own. Rules implemented (RFC 7143 section numbers):

Text format (6.1, 6.2):
  * Every ``key=value`` pair ends with one NUL; a missing final NUL and trailing padding NULs
    are tolerated, an empty pair between two others is not.
  * Key names: 1..63 bytes of letters, digits and ``. - + @ _`` (plus ``#`` for ``X#`` public
    extension keys), beginning with a letter (not only a capital one: the RFC's own
    ``iSCSIProtocolLevel`` does not). Values are UTF-8 without NUL.
  * ``parse_text`` caps a value at 8192 bytes (anti-abuse bound for the whole text layer); the
    RFC's 255-byte limit on a *simple value* is applied per key by the negotiator (``Reject``).
  * A key twice in one request is a protocol error (``TextError``).
  * A key offered again in a later Login PDU of the same login is a protocol error
    (``NegotiationError``, Login reject "initiator error"), except (a) a repeated declaration
    with the identical value (libiscsi and others re-send InitiatorName), and (b) a new offer of
    a key whose previous answer was ``Reject`` (an initiator retrying AuthMethod).
  * Value encodings (6.1): numerical values are decimal or ``0x``/``0X`` hex; binary values are
    ``0x`` hex (an odd digit count means a leading zero nibble) or ``0b``/``0B`` base64;
    booleans are exactly ``Yes``/``No``; lists are comma-separated without empty items.

Answers (6.2, 13):
  * List keys (HeaderDigest, DataDigest, AuthMethod, TaskReporting): the first value in the
    *initiator's* list that the target allows; none -> ``Reject`` (the key keeps its default).
  * Numerical keys, result function Minimum: MaxConnections, MaxBurstLength, FirstBurstLength,
    DefaultTime2Retain, MaxOutstandingR2T, ErrorRecoveryLevel (target supports only 0),
    iSCSIProtocolLevel (13.24: an RFC 7143 implementation uses 1). Maximum: DefaultTime2Wait.
  * Booleans: InitialR2T OR, ImmediateData AND, DataPDUInOrder OR, DataSequenceInOrder OR.
    The target always answers, although the RFC makes the answer optional for "OR offered Yes"
    and "AND offered No" (6.2.2).
  * FirstBurstLength never ends above MaxBurstLength (13.14): its answer is also capped by the
    MaxBurstLength of the same request or of an earlier one, and ``result`` clamps it.
  * Out-of-range or malformed values, and simple values over 255 bytes -> ``Reject``; the key
    keeps its RFC default.
  * Unknown keys -> ``NotUnderstood``; ``X-`` and ``X#`` extension keys get the same answer but
    are not reported in ``not_understood`` (they are legitimate, just not ours).
  * Declarative keys get no answer: InitiatorName, InitiatorAlias, TargetName, SessionType,
    MaxRecvDataSegmentLength (the initiator's value limits what the *target sends*; the target
    declares its own receive limit separately, see ``declarations``; istgt bug B6).
  * Keys only a target may send (TargetAlias, TargetAddress, TargetPortalGroupTag) -> ``Reject``.
  * Keys irrelevant in a Discovery session (13.x "Irrelevant when: SessionType=Discovery"):
    MaxConnections, InitialR2T, ImmediateData, MaxBurstLength, FirstBurstLength,
    MaxOutstandingR2T, DataPDUInOrder, DataSequenceInOrder, TaskReporting -> ``Irrelevant``;
    their values stay at the RFC defaults.
  * Leading-only (LO) keys on a non-leading connection of a session -> ``Irrelevant`` (the
    session's values were settled by the leading login; SessionType is still read, unanswered).
  * Obsoleted marker keys (13.25): OFMarker/IFMarker -> ``No`` (allowed there, and what RFC 3720
    initiators expect); OFMarkInt/IFMarkInt -> ``Reject`` (required there).
  * AuthMethod outside the security stage -> ``Reject``. CHAP_A/I/C/N/R are skipped in the
    security stage (the login hands them to ``istgt.chap``) and rejected in other stages.
    Operational keys are accepted in the security stage as well (lenient, like most targets).
  * Full Feature Phase text negotiation: only keys with "Use: ALL" may be renegotiated
    (MaxRecvDataSegmentLength, InitiatorAlias) plus extension keys; every IO/LO key (digests,
    session keys, names) -> ``Reject`` (fixes istgt bug B32). SendTargets is skipped here: the
    discovery module answers it.

Target-originated keys (``declarations``), sent only in the operational stage:
  * MaxRecvDataSegmentLength=<configured>, once per connection. Without an operational stage the
    target's limit is the RFC default 8192, and ``result`` says so.
  * Proposals only where the RFC default would break the target's configuration: a required
    CRC32C digest, ImmediateData=No, MaxBurstLength or FirstBurstLength below their defaults.
    The initiator's next mention of a proposed key is taken as the *answer* (checked against the
    result function; an invalid answer or a refusal is a ``NegotiationError``). While an answer
    is outstanding ``awaiting_answer`` is non-empty and the login must not set T=1.
  * ``check_ready`` (before Full Feature Phase) fails the login when the outcome still breaks the
    configuration: a required digest refused with ``Reject``, or defaults above the configured
    limits because the initiator skipped the operational stage.

On a non-leading connection the session-wide fields of ``result`` are RFC defaults: the values
in force are those of the session's leading connection.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import Any, Iterable, Sequence

REJECT = "Reject"
IRRELEVANT = "Irrelevant"
NOT_UNDERSTOOD = "NotUnderstood"
_SPECIAL_ANSWERS = frozenset({REJECT, IRRELEVANT, NOT_UNDERSTOOD})

MAX_KEY_LENGTH = 63
MAX_TEXT_VALUE_LENGTH = 8192
MAX_SIMPLE_VALUE_LENGTH = 255
MAX_ISCSI_NAME_LENGTH = 223

# Login status (class << 8 | detail) a NegotiationError maps to.
STATUS_INITIATOR_ERROR = 0x0200
STATUS_MISSING_PARAMETER = 0x0207

CHAP_KEYS = frozenset({"CHAP_A", "CHAP_I", "CHAP_C", "CHAP_N", "CHAP_R"})

_KEY_NAME = re.compile(r"[A-Za-z][A-Za-z0-9.\-+@_#]*\Z")
_DECIMAL = re.compile(r"[0-9]+\Z")
_HEX = re.compile(r"0[xX][0-9a-fA-F]+\Z")
_ISCSI_NAME = re.compile(r"(?i:iqn\.|eui\.|naa\.)[^\s,\x00-\x1f\x7f]+\Z")


class TextError(ValueError):
    """Malformed text data segment (a protocol error for the login or text request)."""


class NegotiationError(Exception):
    """The negotiation cannot continue; ``status`` is the Login Response status to send."""

    def __init__(self, message: str, status: int = STATUS_INITIATOR_ERROR) -> None:
        super().__init__(message)
        self.status = status


class Phase(IntEnum):
    """Where a request was received; login values equal the PDU's CSG field."""

    SECURITY = 0
    OPERATIONAL = 1
    FULL_FEATURE = 3


class SessionType(str, Enum):
    NORMAL = "Normal"
    DISCOVERY = "Discovery"


# ---------------------------------------------------------------------------------------------
# Text codec


def parse_text(data: bytes) -> list[tuple[str, str]]:
    """Split a text data segment into ``(key, value)`` pairs, in order."""
    body = bytes(data).rstrip(b"\x00")
    if not body:
        return []
    pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    for raw in body.split(b"\x00"):
        key, value = _parse_pair(raw)
        if key in seen:
            raise TextError(f"key {key} appears twice in one request")
        seen.add(key)
        pairs.append((key, value))
    return pairs


def _parse_pair(raw: bytes) -> tuple[str, str]:
    if not raw:
        raise TextError("empty key=value pair")
    raw_key, equals, raw_value = raw.partition(b"=")
    if not equals:
        raise TextError(f"pair without '=': {raw[:64]!r}")
    if len(raw_key) > MAX_KEY_LENGTH:
        raise TextError(f"key longer than {MAX_KEY_LENGTH} bytes: {raw_key[:64]!r}")
    if len(raw_value) > MAX_TEXT_VALUE_LENGTH:
        raise TextError(f"value of {raw_key[:64]!r} longer than {MAX_TEXT_VALUE_LENGTH} bytes")
    try:
        key = raw_key.decode("ascii")
        value = raw_value.decode("utf-8")
    except UnicodeDecodeError:
        raise TextError(f"key or value of {raw_key[:64]!r} is not valid UTF-8") from None
    if not _KEY_NAME.match(key):
        raise TextError(f"invalid key name {key!r}")
    return key, value


def encode_text(pairs: Iterable[tuple[str, str]]) -> bytes:
    """Encode pairs as NUL-terminated ``key=value`` strings (no padding)."""
    out = bytearray()
    for key, value in pairs:
        if not _KEY_NAME.match(key) or len(key) > MAX_KEY_LENGTH:
            raise ValueError(f"invalid key name {key!r}")
        if "\x00" in value:
            raise ValueError(f"value of {key} contains NUL")
        out += f"{key}={value}".encode("utf-8") + b"\x00"
    return bytes(out)


# ---------------------------------------------------------------------------------------------
# Value helpers (RFC 7143 6.1)


def parse_number(text: str) -> int:
    """A numerical value: decimal, or hex with a 0x/0X prefix. Raises ValueError."""
    if _DECIMAL.match(text):
        return int(text, 10)
    if _HEX.match(text):
        return int(text[2:], 16)
    raise ValueError(f"not a numerical value: {text[:64]!r}")


def decode_binary(text: str) -> bytes:
    """A binary value: 0x/0X hex (odd digit count = leading zero nibble) or 0b/0B base64."""
    prefix, digits = text[:2], text[2:]
    if prefix in ("0x", "0X"):
        if not digits or not all(c in "0123456789abcdefABCDEF" for c in digits):
            raise ValueError(f"malformed hex value: {text[:64]!r}")
        if len(digits) % 2:
            digits = "0" + digits
        return bytes.fromhex(digits)
    if prefix in ("0b", "0B"):
        try:
            decoded = base64.b64decode(digits.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise ValueError(f"malformed base64 value: {text[:64]!r}") from None
        if not decoded:
            raise ValueError("empty base64 value")
        return decoded
    raise ValueError(f"binary value needs a 0x or 0b prefix: {text[:64]!r}")


def encode_hex(data: bytes) -> str:
    return "0x" + bytes(data).hex()


def encode_base64(data: bytes) -> str:
    return "0b" + base64.b64encode(bytes(data)).decode("ascii")


def parse_boolean(text: str) -> bool:
    if text == "Yes":
        return True
    if text == "No":
        return False
    raise ValueError(f"not a boolean value: {text[:64]!r}")


def format_boolean(value: bool) -> str:
    return "Yes" if value else "No"


def parse_list(text: str) -> list[str]:
    items = text.split(",")
    if any(not item for item in items):
        raise ValueError(f"empty item in list: {text[:64]!r}")
    return items


def is_valid_iscsi_name(name: str) -> bool:
    """iqn./eui./naa. name of at most 223 bytes without blanks or control characters."""
    return bool(_ISCSI_NAME.match(name)) and len(name.encode("utf-8")) <= MAX_ISCSI_NAME_LENGTH


# ---------------------------------------------------------------------------------------------
# Login identity (first Login PDU)


@dataclass(frozen=True)
class LoginIdentity:
    initiator_name: str
    initiator_alias: str | None
    session_type: SessionType
    target_name: str | None


def parse_session_type(value: str) -> SessionType:
    try:
        return SessionType(value)
    except ValueError:
        raise NegotiationError(
            f"unknown SessionType {value[:64]!r}", STATUS_MISSING_PARAMETER
        ) from None


def read_login_identity(pairs: Sequence[tuple[str, str]]) -> LoginIdentity:
    """Declarations the first Login PDU must carry; raises NegotiationError (0x0207/0x0200).

    SessionType defaults to Normal (13.21); a Normal session requires TargetName.
    """
    keys = dict(pairs)
    initiator_name = keys.get("InitiatorName")
    if not initiator_name:
        raise NegotiationError("InitiatorName missing", STATUS_MISSING_PARAMETER)
    if not is_valid_iscsi_name(initiator_name):
        raise NegotiationError(f"invalid InitiatorName {initiator_name[:64]!r}")
    session_type = parse_session_type(keys.get("SessionType", SessionType.NORMAL.value))
    target_name = keys.get("TargetName")
    if session_type is SessionType.NORMAL:
        if not target_name:
            raise NegotiationError("TargetName missing", STATUS_MISSING_PARAMETER)
        if not is_valid_iscsi_name(target_name):
            raise NegotiationError(f"invalid TargetName {target_name[:64]!r}")
    return LoginIdentity(initiator_name, keys.get("InitiatorAlias"), session_type, target_name)


# ---------------------------------------------------------------------------------------------
# Key table


class Kind(Enum):
    LIST = "list"
    MIN = "minimum"
    MAX = "maximum"
    AND = "and"
    OR = "or"
    DECLARATIVE = "declarative"
    TARGET_ONLY = "target-only"  # only a target may send it
    FFP_ONLY = "ffp-only"  # SendTargets
    MARKER = "obsolete marker"
    MARKER_INTERVAL = "obsolete marker interval"


class Use(Enum):
    IO = "initialize only"  # any login of a connection
    LO = "leading only"  # leading login of a session
    ALL = "login and full feature phase"
    SECURITY = "security stage only"


@dataclass(frozen=True)
class KeySpec:
    name: str
    kind: Kind
    use: Use
    default: Any = None
    low: int = 0
    high: int = 0
    limit: str = ""  # IscsiParams attribute with the target's own value
    fixed: int | None = None  # the target's value when the configuration cannot change it


_LEN_HIGH = 2**24 - 1
_SPECS = (
    KeySpec("HeaderDigest", Kind.LIST, Use.IO, "None"),
    KeySpec("DataDigest", Kind.LIST, Use.IO, "None"),
    KeySpec("AuthMethod", Kind.LIST, Use.SECURITY, "None"),
    KeySpec("TaskReporting", Kind.LIST, Use.LO, "RFC3720"),
    KeySpec("MaxConnections", Kind.MIN, Use.LO, 1, 1, 65535, "max_connections"),
    KeySpec("InitialR2T", Kind.OR, Use.LO, True, limit="initial_r2t"),
    KeySpec("ImmediateData", Kind.AND, Use.LO, True, limit="immediate_data"),
    KeySpec("MaxBurstLength", Kind.MIN, Use.LO, 262144, 512, _LEN_HIGH, "max_burst_length"),
    KeySpec("FirstBurstLength", Kind.MIN, Use.LO, 65536, 512, _LEN_HIGH, "first_burst_length"),
    KeySpec("DefaultTime2Wait", Kind.MAX, Use.LO, 2, 0, 3600, "default_time2wait"),
    KeySpec("DefaultTime2Retain", Kind.MIN, Use.LO, 20, 0, 3600, "default_time2retain"),
    KeySpec("MaxOutstandingR2T", Kind.MIN, Use.LO, 1, 1, 65535, "max_outstanding_r2t"),
    KeySpec("DataPDUInOrder", Kind.OR, Use.LO, True, limit="data_pdu_in_order"),
    KeySpec("DataSequenceInOrder", Kind.OR, Use.LO, True, limit="data_sequence_in_order"),
    # Only error recovery level 0 is implemented, whatever the configuration says.
    KeySpec("ErrorRecoveryLevel", Kind.MIN, Use.LO, 0, 0, 2, fixed=0),
    # 13.24: an implementation of RFC 7143 without extensions uses level 1.
    KeySpec("iSCSIProtocolLevel", Kind.MIN, Use.LO, 0, 0, 31, fixed=1),
    KeySpec(
        "MaxRecvDataSegmentLength",
        Kind.DECLARATIVE,
        Use.ALL,
        8192,
        512,
        _LEN_HIGH,
        "max_recv_data_segment_length",
    ),
    KeySpec("InitiatorName", Kind.DECLARATIVE, Use.IO),
    KeySpec("InitiatorAlias", Kind.DECLARATIVE, Use.ALL),
    KeySpec("TargetName", Kind.DECLARATIVE, Use.IO),
    KeySpec("SessionType", Kind.DECLARATIVE, Use.LO, SessionType.NORMAL.value),
    KeySpec("TargetAlias", Kind.TARGET_ONLY, Use.ALL),
    KeySpec("TargetAddress", Kind.TARGET_ONLY, Use.ALL),
    KeySpec("TargetPortalGroupTag", Kind.TARGET_ONLY, Use.IO),
    KeySpec("SendTargets", Kind.FFP_ONLY, Use.ALL),
    KeySpec("OFMarker", Kind.MARKER, Use.IO),
    KeySpec("IFMarker", Kind.MARKER, Use.IO),
    KeySpec("OFMarkInt", Kind.MARKER_INTERVAL, Use.IO),
    KeySpec("IFMarkInt", Kind.MARKER_INTERVAL, Use.IO),
)
# "Irrelevant when: SessionType=Discovery" in RFC 7143 section 13.
DISCOVERY_IRRELEVANT = frozenset(
    {
        "MaxConnections",
        "InitialR2T",
        "ImmediateData",
        "MaxBurstLength",
        "FirstBurstLength",
        "MaxOutstandingR2T",
        "DataPDUInOrder",
        "DataSequenceInOrder",
        "TaskReporting",
    }
)
KEYS: dict[str, KeySpec] = {spec.name: spec for spec in _SPECS}

SUPPORTED_TASK_REPORTING = ("RFC3720",)


def _is_extension_key(key: str) -> bool:
    return key.startswith(("X-", "X#"))


# ---------------------------------------------------------------------------------------------
# Result


@dataclass(frozen=True)
class OperationalValues:
    """Every operational key of one connection after negotiation (RFC default where omitted)."""

    header_digest: bool = False
    data_digest: bool = False
    max_recv_data_segment_length_initiator: int = 8192  # what the target may send
    max_recv_data_segment_length_target: int = 8192  # what the target declared it receives
    max_burst_length: int = 262144
    first_burst_length: int = 65536
    initial_r2t: bool = True
    immediate_data: bool = True
    max_outstanding_r2t: int = 1
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    default_time2wait: int = 2
    default_time2retain: int = 20
    error_recovery_level: int = 0
    max_connections: int = 1
    task_reporting: str = "RFC3720"
    iscsi_protocol_level: int = 0
    auth_method: str | None = None  # None until AuthMethod was negotiated
    initiator_name: str | None = None
    initiator_alias: str | None = None
    target_name: str | None = None
    session_type: SessionType = SessionType.NORMAL


# ---------------------------------------------------------------------------------------------
# Negotiator


@dataclass
class _Offer:
    value: str
    answer: str | None  # our answer; None for a declaration


class Negotiator:
    """Answers the initiator's keys for one connection (login, then FFP text requests).

    ``limits`` is any object with IscsiParams' attributes (istgt.config.IscsiParams).
    """

    def __init__(
        self,
        limits: Any,
        session_type: SessionType | str = SessionType.NORMAL,
        header_digests: Sequence[str] = ("CRC32C", "None"),
        data_digests: Sequence[str] = ("CRC32C", "None"),
        leading: bool = True,
        auth_methods: Sequence[str] = ("None",),
    ) -> None:
        self._limits = limits
        self._session_type = SessionType(session_type)
        self._leading = leading
        self._allowed_lists: dict[str, tuple[str, ...]] = {
            "HeaderDigest": _checked_digests(header_digests),
            "DataDigest": _checked_digests(data_digests),
            "AuthMethod": tuple(auth_methods),
            "TaskReporting": SUPPORTED_TASK_REPORTING,
        }
        _check_limits(limits)
        self._values: dict[str, Any] = {spec.name: spec.default for spec in _SPECS}
        self._auth_method: str | None = None
        self._names: dict[str, str] = {}
        self._login_offers: dict[str, _Offer] = {}
        self._proposed: dict[str, str] = {}
        self._declared_receive_limit = False
        self.not_understood: list[str] = []

    # -- public API ---------------------------------------------------------------------------

    @property
    def awaiting_answer(self) -> frozenset[str]:
        """Keys the target proposed and the initiator has not answered yet."""
        return frozenset(self._proposed)

    @property
    def discovery(self) -> bool:
        return self._session_type is SessionType.DISCOVERY

    def negotiate(
        self, pairs: Sequence[tuple[str, str]], phase: Phase = Phase.OPERATIONAL
    ) -> list[tuple[str, str]]:
        """Answer one request's keys; the answers keep the keys' arrival order."""
        phase = Phase(phase)
        answers: dict[int, str] = {}
        # FirstBurstLength is settled last so that MaxBurstLength of the same request caps it.
        order = sorted(range(len(pairs)), key=lambda i: pairs[i][0] == "FirstBurstLength")
        for index in order:
            key, value = pairs[index]
            answer = self._answer(key, value, phase)
            if answer is not None:
                answers[index] = answer
        return [(pairs[i][0], answers[i]) for i in sorted(answers)]

    def declarations(self, phase: Phase = Phase.OPERATIONAL) -> list[tuple[str, str]]:
        """Target-originated keys for the response being built (operational stage only)."""
        if Phase(phase) is not Phase.OPERATIONAL:
            return []
        out: list[tuple[str, str]] = []
        if not self._declared_receive_limit:
            self._declared_receive_limit = True
            limit = self._limits.max_recv_data_segment_length
            out.append(("MaxRecvDataSegmentLength", str(limit)))
        for key, value in self._wanted_proposals():
            if key not in self._login_offers and key not in self._proposed:
                self._proposed[key] = value
                out.append((key, value))
        return out

    def check_ready(self) -> None:
        """Raise NegotiationError if the outcome breaks the target's configuration.

        The login calls this before entering Full Feature Phase. It catches a required digest
        the initiator refused, and RFC defaults left above the configured limits when the
        initiator skipped the operational stage (the login can avoid that by answering NSG=1).
        """
        if self._proposed:
            raise NegotiationError(f"no answer to {sorted(self._proposed)}")
        result = self.result
        for key, used in (
            ("HeaderDigest", result.header_digest),
            ("DataDigest", result.data_digest),
        ):
            if not used and "None" not in self._allowed_lists[key]:
                raise NegotiationError(f"{key}=CRC32C is required by this target")
        if not self._leading or self.discovery:
            return  # session-wide values belong to the leading connection
        limits = self._limits
        if result.immediate_data and not limits.immediate_data:
            raise NegotiationError("ImmediateData=Yes (RFC default) but this target wants No")
        if result.max_burst_length > limits.max_burst_length:
            raise NegotiationError(
                f"MaxBurstLength={result.max_burst_length} above {limits.max_burst_length}"
            )
        if result.first_burst_length > limits.first_burst_length and not (
            result.initial_r2t and not result.immediate_data
        ):
            raise NegotiationError(
                f"FirstBurstLength={result.first_burst_length} above {limits.first_burst_length}"
            )

    @property
    def result(self) -> OperationalValues:
        values = self._values
        max_burst = values["MaxBurstLength"]
        return OperationalValues(
            header_digest=values["HeaderDigest"] == "CRC32C",
            data_digest=values["DataDigest"] == "CRC32C",
            max_recv_data_segment_length_initiator=values["MaxRecvDataSegmentLength"],
            max_recv_data_segment_length_target=(
                self._limits.max_recv_data_segment_length
                if self._declared_receive_limit
                else KEYS["MaxRecvDataSegmentLength"].default
            ),
            max_burst_length=max_burst,
            first_burst_length=min(values["FirstBurstLength"], max_burst),
            initial_r2t=values["InitialR2T"],
            immediate_data=values["ImmediateData"],
            max_outstanding_r2t=values["MaxOutstandingR2T"],
            data_pdu_in_order=values["DataPDUInOrder"],
            data_sequence_in_order=values["DataSequenceInOrder"],
            default_time2wait=values["DefaultTime2Wait"],
            default_time2retain=values["DefaultTime2Retain"],
            error_recovery_level=values["ErrorRecoveryLevel"],
            max_connections=values["MaxConnections"],
            task_reporting=values["TaskReporting"],
            iscsi_protocol_level=values["iSCSIProtocolLevel"],
            auth_method=self._auth_method,
            initiator_name=self._names.get("InitiatorName"),
            initiator_alias=self._names.get("InitiatorAlias"),
            target_name=self._names.get("TargetName"),
            session_type=self._session_type,
        )

    # -- dispatch -----------------------------------------------------------------------------

    def _answer(self, key: str, value: str, phase: Phase) -> str | None:
        if key in CHAP_KEYS:
            return None if phase is Phase.SECURITY else REJECT
        spec = KEYS.get(key)
        if spec is None:
            if not _is_extension_key(key):
                self.not_understood.append(key)
            return NOT_UNDERSTOOD
        if phase is Phase.FULL_FEATURE:
            return self._answer_in_full_feature(spec, value)
        if key in self._proposed:
            self._take_answer(spec, value)
            return None
        if spec.kind is Kind.FFP_ONLY or spec.kind is Kind.TARGET_ONLY:
            return REJECT
        if self._is_repeat(spec, value):
            return None
        answer = self._answer_in_login(spec, value, phase)
        self._login_offers[key] = _Offer(value, answer)
        return answer

    def _answer_in_full_feature(self, spec: KeySpec, value: str) -> str | None:
        if spec.kind is Kind.FFP_ONLY:
            return None  # SendTargets: answered by the discovery module
        if spec.use is not Use.ALL or spec.kind is Kind.TARGET_ONLY:
            return REJECT
        return self._declare(spec, value)

    def _is_repeat(self, spec: KeySpec, value: str) -> bool:
        """True for a tolerated repeat; raises for a forbidden renegotiation during login."""
        earlier = self._login_offers.get(spec.name)
        if earlier is None or earlier.answer == REJECT:
            return False
        if spec.kind is Kind.DECLARATIVE and earlier.value == value:
            return True
        raise NegotiationError(f"{spec.name} negotiated twice during login")

    def _answer_in_login(self, spec: KeySpec, value: str, phase: Phase) -> str | None:
        if spec.kind is Kind.MARKER:
            return "No"
        if spec.kind is Kind.MARKER_INTERVAL:
            return REJECT
        if spec.use is Use.SECURITY and phase is not Phase.SECURITY:
            return REJECT
        if spec.use is Use.LO and not self._leading:
            return self._declare(spec, value) if spec.name == "SessionType" else IRRELEVANT
        if spec.kind is Kind.DECLARATIVE:
            return self._declare(spec, value)
        if self.discovery and spec.name in DISCOVERY_IRRELEVANT:
            return IRRELEVANT
        if spec.kind is Kind.LIST:
            return self._answer_list(spec, value)
        if spec.kind in (Kind.AND, Kind.OR):
            return self._answer_boolean(spec, value)
        return self._answer_number(spec, value)

    # -- answers to offers --------------------------------------------------------------------

    def _answer_list(self, spec: KeySpec, value: str) -> str:
        try:
            offered = parse_list(value)
        except ValueError:
            return REJECT
        allowed = self._allowed_lists[spec.name]
        for item in offered:
            if len(item.encode()) <= MAX_SIMPLE_VALUE_LENGTH and item in allowed:
                self._store_list(spec.name, item)
                return item
        return REJECT

    def _store_list(self, key: str, item: str) -> None:
        if key == "AuthMethod":
            self._auth_method = item
        else:
            self._values[key] = item

    def _answer_boolean(self, spec: KeySpec, value: str) -> str:
        try:
            offered = parse_boolean(value)
        except ValueError:
            return REJECT
        mine = self._target_boolean(spec)
        result = (offered and mine) if spec.kind is Kind.AND else (offered or mine)
        self._values[spec.name] = result
        return format_boolean(result)

    def _answer_number(self, spec: KeySpec, value: str) -> str:
        offered = _number_in_range(spec, value)
        if offered is None:
            return REJECT
        mine = self._target_number(spec)
        result = max(offered, mine) if spec.kind is Kind.MAX else min(offered, mine)
        self._values[spec.name] = result
        return str(result)

    def _declare(self, spec: KeySpec, value: str) -> str | None:
        if spec.name == "MaxRecvDataSegmentLength":
            length = _number_in_range(spec, value)
            if length is None:
                return REJECT
            self._values[spec.name] = length
            return None
        if spec.name == "SessionType":
            if parse_session_type(value) is not self._session_type:
                raise NegotiationError(
                    f"SessionType {value} differs from {self._session_type.value}"
                )
            return None
        if spec.name in ("InitiatorName", "TargetName") and not is_valid_iscsi_name(value):
            raise NegotiationError(f"invalid {spec.name} {value[:64]!r}")
        if len(value.encode()) > MAX_SIMPLE_VALUE_LENGTH:
            return REJECT
        self._names[spec.name] = value
        return None

    # -- the target's own values --------------------------------------------------------------

    def _target_boolean(self, spec: KeySpec) -> bool:
        return bool(getattr(self._limits, spec.limit))

    def _target_number(self, spec: KeySpec) -> int:
        if spec.fixed is not None:
            return spec.fixed
        value = int(getattr(self._limits, spec.limit))
        if spec.name == "FirstBurstLength":
            return min(value, self._max_burst_cap())
        return value

    def _max_burst_cap(self) -> int:
        """MaxBurstLength as known now (negotiated, or the default capped by our value)."""
        return min(int(self._values["MaxBurstLength"]), int(self._limits.max_burst_length))

    # -- proposals ----------------------------------------------------------------------------

    def _wanted_proposals(self) -> list[tuple[str, str]]:
        wanted = []
        for key in ("HeaderDigest", "DataDigest"):
            allowed = self._allowed_lists[key]
            if "None" not in allowed:
                wanted.append((key, ",".join(allowed)))
        if not self._leading or self.discovery:
            return wanted
        limits = self._limits
        if not limits.immediate_data:
            wanted.append(("ImmediateData", "No"))
        if limits.max_burst_length < KEYS["MaxBurstLength"].default:
            wanted.append(("MaxBurstLength", str(limits.max_burst_length)))
        first_burst = min(limits.first_burst_length, limits.max_burst_length)
        if first_burst < KEYS["FirstBurstLength"].default and not self._first_burst_irrelevant():
            wanted.append(("FirstBurstLength", str(first_burst)))
        return wanted

    def _first_burst_irrelevant(self) -> bool:
        """13.14: FirstBurstLength is irrelevant when InitialR2T=Yes and ImmediateData=No."""
        immediate = self._values["ImmediateData"] and self._limits.immediate_data
        return bool(self._values["InitialR2T"]) and not immediate

    def _take_answer(self, spec: KeySpec, value: str) -> None:
        offer = self._proposed.pop(spec.name)
        self._login_offers[spec.name] = _Offer(value, None)
        if value == IRRELEVANT and spec.name == "FirstBurstLength":
            return
        if value in _SPECIAL_ANSWERS:
            raise NegotiationError(
                f"initiator answered {spec.name}={value} to the target's {offer}; "
                "the RFC default does not fit this target"
            )
        if not self._apply_answer(spec, offer, value):
            raise NegotiationError(f"invalid answer {spec.name}={value[:64]} to {offer}")

    def _apply_answer(self, spec: KeySpec, offer: str, value: str) -> bool:
        """Store the initiator's answer to our offer; False if the result function forbids it."""
        if spec.kind is Kind.LIST:
            if value not in parse_list(offer):
                return False
            self._store_list(spec.name, value)
            return True
        if spec.kind is Kind.AND:
            if value != "No":
                return False
            self._values[spec.name] = False
            return True
        answered = _number_in_range(spec, value)
        if answered is None or answered > int(offer):  # only MIN keys are proposed
            return False
        self._values[spec.name] = answered
        return True


def _number_in_range(spec: KeySpec, value: str) -> int | None:
    try:
        number = parse_number(value)
    except ValueError:
        return None
    return number if spec.low <= number <= spec.high else None


def _checked_digests(allowed: Sequence[str]) -> tuple[str, ...]:
    allowed = tuple(allowed)
    if not allowed or any(item not in ("CRC32C", "None") for item in allowed):
        raise ValueError(f"digest list must be made of CRC32C and None: {allowed}")
    return allowed


def _check_limits(limits: Any) -> None:
    """Reject a configuration outside the RFC ranges (the config layer should have already)."""
    for spec in _SPECS:
        if spec.limit and spec.high:
            value = getattr(limits, spec.limit)
            if not spec.low <= value <= spec.high:
                raise ValueError(f"{spec.limit}={value} outside {spec.low}..{spec.high}")


__all__: tuple[str, ...] = (
    "CHAP_KEYS",
    "DISCOVERY_IRRELEVANT",
    "IRRELEVANT",
    "KEYS",
    "LoginIdentity",
    "NOT_UNDERSTOOD",
    "NegotiationError",
    "Negotiator",
    "OperationalValues",
    "Phase",
    "REJECT",
    "SessionType",
    "TextError",
    "decode_binary",
    "encode_base64",
    "encode_hex",
    "encode_text",
    "format_boolean",
    "is_valid_iscsi_name",
    "parse_boolean",
    "parse_list",
    "parse_number",
    "parse_session_type",
    "parse_text",
    "read_login_identity",
)
