"""SCSI reservations of one LUN: persistent reservations (SPC-4 5.12, PERSISTENT RESERVE
IN/OUT) and SPC-2 RESERVE/RELEASE.

Pure state machine: no I/O, no knowledge of the device. One `ReservationState` per LUN,
thread-safe (its own lock, taken after the LU's and before the task queue's; callbacks run
after the lock is released).

Integration (what `DiskDevice` does):

    self.reservations = ReservationState(
        raise_ua=...,            # (pattern: ITNexus, asc: int) -> None, see below
        on_preempt_abort=...,    # (patterns: frozenset[ITNexus]) -> None, optional: abort
                                 # this LUN's tasks from those nexuses (called from the
                                 # worker running the PR OUT: it must not wait for it)
        state_changed=...,       # (effects) -> None after each change, optional (APTPL saving)
        target_ports=...,        # () -> Mapping[relative port id, target port], optional
    )
    # In execute, after the unit-attention check and CDB validation, before the handler:
    if self.reservations.conflicts(task):
        task.status = ScsiStatus.RESERVATION_CONFLICT   # no sense data
        return
    # Handlers (each sets task.data_in / task.status, or raises CheckCondition):
    #   0x5E PERSISTENT RESERVE IN   -> reservations.persistent_reserve_in(task)
    #   0x5F PERSISTENT RESERVE OUT  -> reservations.persistent_reserve_out(task)
    #   0x16 RESERVE(6) / 0x56 RESERVE(10) -> reservations.reserve6(task) / reserve10(task)
    #   0x17 RELEASE(6) / 0x57 RELEASE(10) -> reservations.release6(task) / release10(task)
    # A handler that finds a reservation conflict sets task.status = RESERVATION CONFLICT
    # itself and returns normally.
    # DiskDevice.nexus_lost(nexus) -> reservations.nexus_lost(nexus)
    # DiskDevice.reset(kind)       -> reservations.reset()
    # (both drop an SPC-2 reservation; persistent reservations survive them)

Unit attentions and aborts name their recipients with a *pattern* ITNexus: its
`initiator_port` is either a full initiator port (`iqn...,i,0x<isid>`) or a bare iSCSI name
(a registration made from a format 00h TransportID: every ISID of that name), and its
`target_port` is "" when the registration was made with ALL_TG_PT (every target port). The
owner applies the event to each nexus it knows for which `nexus_matches(pattern, nexus)`.

Registrations are kept per I_T nexus (initiator port, target port). ALL_TG_PT keeps one
registration flagged as covering every target port (READ FULL STATUS reports it once with
ALL_TG_PT set, as SPC-4 allows). APTPL is accepted: `persist_through_power_loss` tells the
owner whether to save `snapshot()` (a JSON-safe dict) and feed it to `restore()` at start.
"""

from __future__ import annotations

import logging
import struct
import threading
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Callable, Mapping

from istgt.scsi.command import ITNexus, ScsiTask, u16, u32, u64
from istgt.scsi.constants import Asc, Opcode, ScsiStatus, SenseKey
from istgt.scsi.sense import CheckCondition, invalid_field_in_cdb, invalid_field_in_parameter_list

log = logging.getLogger(__name__)

MAX_REGISTRATIONS = 256
BASIC_PARAMETER_LIST_LENGTH = 24
SPEC_I_PT_HEADER_LENGTH = 28  # basic list + TRANSPORTID PARAMETER DATA LENGTH
REGISTER_AND_MOVE_HEADER_LENGTH = 24
LU_SCOPE = 0

# Not (yet) in constants.Asc: ILLEGAL REQUEST 26/04 INVALID RELEASE OF PERSISTENT RESERVATION.
INVALID_RELEASE_OF_PERSISTENT_RESERVATION = 0x2604

ISCSI_PROTOCOL_ID = 0x5
TRANSPORT_ID_NAME_ONLY = 0x0  # format 00h: iSCSI name
TRANSPORT_ID_WITH_ISID = 0x1  # format 01h: iSCSI name ",i,0x" ISID
ISID_SEPARATOR = ",i,0x"
MIN_TRANSPORT_ID_LENGTH = 24  # SPC-4: ADDITIONAL LENGTH at least 20, a multiple of 4
_HEX_DIGITS = frozenset("0123456789abcdef")


class PrType(IntEnum):
    WRITE_EXCLUSIVE = 1
    EXCLUSIVE_ACCESS = 3
    WRITE_EXCLUSIVE_REGISTRANTS_ONLY = 5
    EXCLUSIVE_ACCESS_REGISTRANTS_ONLY = 6
    WRITE_EXCLUSIVE_ALL_REGISTRANTS = 7
    EXCLUSIVE_ACCESS_ALL_REGISTRANTS = 8

    @property
    def all_registrants(self) -> bool:
        """Every registered I_T nexus is a reservation holder."""
        return self in (
            PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS,
            PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS,
        )

    @property
    def registrants_only(self) -> bool:
        return self in (
            PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY,
            PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY,
        )

    @property
    def admits_registrants(self) -> bool:
        """Registered I_T nexuses get full access (the RO and AR types)."""
        return self.registrants_only or self.all_registrants

    @property
    def exclusive_access(self) -> bool:
        """Reads are blocked too, not only writes."""
        return self in (
            PrType.EXCLUSIVE_ACCESS,
            PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY,
            PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS,
        )


_VALID_TYPES = frozenset(int(t) for t in PrType)


class PrInAction(IntEnum):
    READ_KEYS = 0x00
    READ_RESERVATION = 0x01
    REPORT_CAPABILITIES = 0x02
    READ_FULL_STATUS = 0x03


class PrOutAction(IntEnum):
    REGISTER = 0x00
    RESERVE = 0x01
    RELEASE = 0x02
    CLEAR = 0x03
    PREEMPT = 0x04
    PREEMPT_AND_ABORT = 0x05
    REGISTER_AND_IGNORE_EXISTING_KEY = 0x06
    REGISTER_AND_MOVE = 0x07


# --- which commands a reservation blocks ------------------------------------------------


class Access(IntEnum):
    """How a command meets a persistent reservation held by another I_T nexus."""

    ALLOWED = 0  # never blocked (INQUIRY, REPORT LUNS, PR IN, ...)
    READ = 1  # blocked only by the Exclusive Access types
    WRITE = 2  # blocked by every type


AccessRule = Access | Callable[[bytes], Access]
Spc2Rule = bool | Callable[[bytes], bool]


@dataclass(frozen=True)
class ReservationRule:
    """One opcode's row. `persistent`: its Access class for a nexus the persistent
    reservation does not admit (SPC-4 table "SPC commands that are allowed in the presence
    of various reservations", SBC-3 table for block commands). `spc2_allowed`: a nexus other
    than the SPC-2 reservation holder may still run it. Either may depend on the CDB."""

    persistent: AccessRule
    spc2_allowed: Spc2Rule = False


def _start_stop_access(cdb: bytes) -> Access:
    # SBC-3: START=1 with POWER CONDITION 0 is allowed, stopping or power changes are not.
    byte4 = cdb[4] if len(cdb) > 4 else 0
    return Access.ALLOWED if byte4 & 0x01 and byte4 >> 4 == 0 else Access.WRITE


def _prevent_allow_access(cdb: bytes) -> Access:
    return Access.ALLOWED if len(cdb) <= 4 or cdb[4] & 0x03 == 0 else Access.WRITE


def _prevent_allow_spc2(cdb: bytes) -> bool:
    return _prevent_allow_access(cdb) is Access.ALLOWED


_READ_CAPACITY_16 = 0x10
_ALWAYS_ALLOWED_MAINTENANCE_IN = frozenset(
    {
        0x05,  # REPORT IDENTIFYING INFORMATION
        0x0A,  # REPORT TARGET PORT GROUPS
        0x0B,  # REPORT ALIASES
        0x0E,  # REPORT PRIORITY
        0x0F,  # REPORT TIMESTAMP
    }
)


def _service_action_in_16_access(cdb: bytes) -> Access:
    sa = cdb[1] & 0x1F if len(cdb) > 1 else None
    return Access.ALLOWED if sa == _READ_CAPACITY_16 else Access.READ


def _maintenance_in_access(cdb: bytes) -> Access:
    # REPORT SUPPORTED OPERATION CODES / TASK MANAGEMENT FUNCTIONS are in the ALLOW COMMANDS
    # list (allowed through Write Exclusive); the rest of MAINTENANCE IN is always allowed.
    sa = cdb[1] & 0x1F if len(cdb) > 1 else None
    return Access.ALLOWED if sa in _ALWAYS_ALLOWED_MAINTENANCE_IN else Access.READ


_ALLOWED = ReservationRule(Access.ALLOWED)
_READ = ReservationRule(Access.READ)
_WRITE = ReservationRule(Access.WRITE)
# RESERVE/RELEASE and PR OUT decide conflicts in their handlers (CRH=1 and per service action).
_HANDLER_DECIDES = ReservationRule(Access.ALLOWED, spc2_allowed=True)

RESERVATION_RULES: dict[int, ReservationRule] = {
    Opcode.TEST_UNIT_READY: _ALLOWED,
    Opcode.REQUEST_SENSE: ReservationRule(Access.ALLOWED, spc2_allowed=True),
    Opcode.FORMAT_UNIT: _WRITE,
    Opcode.READ_6: _READ,
    Opcode.WRITE_6: _WRITE,
    Opcode.INQUIRY: ReservationRule(Access.ALLOWED, spc2_allowed=True),
    Opcode.MODE_SELECT_6: _WRITE,
    Opcode.RESERVE_6: _HANDLER_DECIDES,
    Opcode.RELEASE_6: _HANDLER_DECIDES,
    Opcode.MODE_SENSE_6: _READ,
    Opcode.START_STOP_UNIT: ReservationRule(_start_stop_access),
    Opcode.RECEIVE_DIAGNOSTIC_RESULTS: _READ,
    Opcode.SEND_DIAGNOSTIC: _WRITE,
    Opcode.PREVENT_ALLOW_MEDIUM_REMOVAL: ReservationRule(
        _prevent_allow_access, _prevent_allow_spc2
    ),
    Opcode.READ_CAPACITY_10: _ALLOWED,
    Opcode.READ_10: _READ,
    Opcode.WRITE_10: _WRITE,
    Opcode.WRITE_AND_VERIFY_10: _WRITE,
    Opcode.VERIFY_10: _READ,
    Opcode.PRE_FETCH_10: _READ,
    Opcode.SYNCHRONIZE_CACHE_10: _WRITE,
    Opcode.READ_DEFECT_DATA_10: _READ,
    Opcode.WRITE_BUFFER: _WRITE,
    Opcode.READ_BUFFER: _READ,
    Opcode.WRITE_SAME_10: _WRITE,
    Opcode.UNMAP: _WRITE,
    Opcode.SANITIZE: _WRITE,
    Opcode.LOG_SELECT: _WRITE,
    Opcode.LOG_SENSE: ReservationRule(Access.ALLOWED, spc2_allowed=True),
    Opcode.MODE_SELECT_10: _WRITE,
    Opcode.RESERVE_10: _HANDLER_DECIDES,
    Opcode.RELEASE_10: _HANDLER_DECIDES,
    Opcode.MODE_SENSE_10: _READ,
    Opcode.PERSISTENT_RESERVE_IN: _ALLOWED,
    Opcode.PERSISTENT_RESERVE_OUT: _ALLOWED,
    Opcode.EXTENDED_COPY: _WRITE,
    Opcode.RECEIVE_COPY_RESULTS: _ALLOWED,
    Opcode.READ_16: _READ,
    Opcode.COMPARE_AND_WRITE: _WRITE,
    Opcode.WRITE_16: _WRITE,
    Opcode.ORWRITE_16: _WRITE,
    Opcode.WRITE_AND_VERIFY_16: _WRITE,
    Opcode.VERIFY_16: _READ,
    Opcode.PRE_FETCH_16: _READ,
    Opcode.SYNCHRONIZE_CACHE_16: _WRITE,
    Opcode.WRITE_SAME_16: _WRITE,
    Opcode.WRITE_ATOMIC_16: _WRITE,
    Opcode.SERVICE_ACTION_IN_16: ReservationRule(_service_action_in_16_access),
    Opcode.SERVICE_ACTION_OUT_16: _WRITE,
    Opcode.REPORT_LUNS: ReservationRule(Access.ALLOWED, spc2_allowed=True),
    Opcode.MAINTENANCE_IN: ReservationRule(_maintenance_in_access),
    Opcode.MAINTENANCE_OUT: _WRITE,
    Opcode.READ_12: _READ,
    Opcode.WRITE_12: _WRITE,
    Opcode.WRITE_AND_VERIFY_12: _WRITE,
    Opcode.VERIFY_12: _READ,
    Opcode.READ_DEFECT_DATA_12: _READ,
}
# Anything not listed is treated as a write: blocking an unknown command is the safe side.
DEFAULT_RULE = _WRITE

# REPORT CAPABILITIES: ALLOW COMMANDS 010b = TEST UNIT READY is allowed through Write
# Exclusive and Exclusive Access; MODE SENSE, READ BUFFER, RECEIVE DIAGNOSTIC RESULTS,
# REPORT SUPPORTED OPERATION CODES/TMF and READ DEFECT DATA are allowed through Write
# Exclusive only (the READ rows above).
ALLOW_COMMANDS = 0b010


def _resolve(rule: Any, cdb: bytes) -> Any:
    return rule(cdb) if callable(rule) else rule


# --- I_T nexus names and TransportIDs ---------------------------------------------------


def _initiator_matches(pattern: str, initiator_port: str) -> bool:
    """A bare iSCSI name (no ISID) matches every initiator port of that name."""
    if pattern == initiator_port:
        return True
    return ISID_SEPARATOR not in pattern and initiator_port.split(ISID_SEPARATOR, 1)[0] == pattern


def nexus_matches(pattern: ITNexus, nexus: ITNexus) -> bool:
    """Whether an event addressed to `pattern` (see the module docstring) applies to the
    I_T nexus `nexus`."""
    if pattern.target_port and pattern.target_port.lower() != nexus.target_port.lower():
        return False
    return _initiator_matches(pattern.initiator_port.lower(), nexus.initiator_port.lower())


def _normalised(nexus: ITNexus) -> ITNexus:
    return ITNexus(nexus.initiator_port.lower(), nexus.target_port.lower(), nexus.relative_port_id)


def encode_transport_id(initiator_port: str) -> bytes:
    """iSCSI TransportID (SPC-4 7.6.4.6): format 01h for `name,i,0x<isid>`, 00h for a bare
    name; the name is NUL-terminated and padded to a multiple of 4 (at least 20 bytes)."""
    with_isid = ISID_SEPARATOR in initiator_port.lower()
    fmt = TRANSPORT_ID_WITH_ISID if with_isid else TRANSPORT_ID_NAME_ONLY
    name = initiator_port.encode("utf-8") + b"\0"
    padded_length = max(MIN_TRANSPORT_ID_LENGTH - 4, (len(name) + 3) // 4 * 4)
    name = name.ljust(padded_length, b"\0")
    return struct.pack(">BBH", fmt << 6 | ISCSI_PROTOCOL_ID, 0, len(name)) + name


def parse_transport_id(data: bytes, offset: int, end: int) -> tuple[str, int]:
    """Decode the iSCSI TransportID at data[offset:end]: (initiator port or bare name, length).
    Errors are INVALID FIELD IN PARAMETER LIST pointing at the bad byte."""
    if end - offset < 4:
        raise invalid_field_in_parameter_list(offset)
    fmt = data[offset] >> 6
    if data[offset] & 0x0F != ISCSI_PROTOCOL_ID:
        raise invalid_field_in_parameter_list(offset, 3)
    if fmt not in (TRANSPORT_ID_NAME_ONLY, TRANSPORT_ID_WITH_ISID) or data[offset] & 0x30:
        raise invalid_field_in_parameter_list(offset, 7)
    length = 4 + u16(data, offset + 2)
    if offset + length > end:
        raise invalid_field_in_parameter_list(offset + 2)
    raw = data[offset + 4 : offset + length].split(b"\0", 1)[0]
    try:
        text = raw.decode("utf-8").lower()
    except UnicodeDecodeError:
        raise invalid_field_in_parameter_list(offset + 4) from None
    name, separator, isid = text.partition(ISID_SEPARATOR)
    if not name or any(c in name for c in " ,\t"):
        raise invalid_field_in_parameter_list(offset + 4)
    if fmt == TRANSPORT_ID_NAME_ONLY:
        if separator:
            raise invalid_field_in_parameter_list(offset, 7)
        return name, length
    if not separator or not 0 < len(isid) <= 12 or any(c not in _HEX_DIGITS for c in isid):
        raise invalid_field_in_parameter_list(offset + 4)
    return f"{name}{ISID_SEPARATOR}{int(isid, 16):012x}", length


# --- state ------------------------------------------------------------------------------


@dataclass
class Registration:
    """One registered I_T nexus (or, with a bare-name initiator or ALL_TG_PT, a group)."""

    key: int
    initiator_port: str
    target_port: str
    relative_port_id: int
    all_tg_pt: bool = False

    def covers(self, nexus: ITNexus) -> bool:
        if not self.all_tg_pt and self.target_port != nexus.target_port:
            return False
        return _initiator_matches(self.initiator_port, nexus.initiator_port)

    @property
    def pattern(self) -> ITNexus:
        return ITNexus(
            self.initiator_port, "" if self.all_tg_pt else self.target_port, self.relative_port_id
        )


@dataclass
class Reservation:
    type: PrType
    holder: ITNexus | None  # None for the all-registrants types (every registrant holds it)


@dataclass
class _Effects:
    """What a command does outside this object; run after the lock is released."""

    unit_attentions: list[tuple[ITNexus, int]] = field(default_factory=list)
    aborted: set[ITNexus] = field(default_factory=set)
    changed: bool = False

    def unit_attention(self, registrations: list[Registration], asc: int) -> None:
        self.unit_attentions.extend((registration.pattern, asc) for registration in registrations)

    def summary(self) -> dict:
        """The unit attentions and aborts as JSON-safe lists (for other gateways)."""
        return {"unit_attentions": [[*pattern, asc] for pattern, asc in self.unit_attentions],
                "aborted": [list(pattern) for pattern in sorted(self.aborted)]}


def effects_from_summary(summary: Mapping[str, Any]) -> tuple[list[tuple[ITNexus, int]],
                                                              frozenset[ITNexus]]:
    """What `_Effects.summary` encoded; ValueError if it is malformed."""
    try:
        attentions = [(ITNexus(str(i), str(t), int(r)), int(asc))
                      for i, t, r, asc in summary.get("unit_attentions", [])]
        aborted = frozenset(ITNexus(str(i), str(t), int(r))
                            for i, t, r in summary.get("aborted", []))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"malformed reservation effects: {exc!r}") from None
    return attentions, aborted


EMPTY_SNAPSHOT = {"version": 1, "generation": 0, "aptpl": False, "registrations": [],
                  "reservation": None}


class _Conflict(Exception):
    """The command ends with RESERVATION CONFLICT status."""


def _conflict_status(task: ScsiTask) -> None:
    task.status = ScsiStatus.RESERVATION_CONFLICT
    task.sense = b""
    task.data_in = None


def _parameter_list_length_error() -> CheckCondition:
    return CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.PARAMETER_LIST_LENGTH_ERROR)


def _no_registration_resources() -> CheckCondition:
    return CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.INSUFFICIENT_REGISTRATION_RESOURCES)


class ReservationState:
    """Registrations, the persistent reservation and the SPC-2 reservation of one LUN."""

    def __init__(
        self,
        raise_ua: Callable[[ITNexus, int], None] | None = None,
        *,
        on_preempt_abort: Callable[[frozenset[ITNexus]], None] | None = None,
        state_changed: Callable[[dict], None] | None = None,
        target_ports: Callable[[], Mapping[int, str]] | None = None,
        max_registrations: int = MAX_REGISTRATIONS,
        aptpl_supported: bool = True,
    ) -> None:
        # aptpl_supported: the owner can persist state_changed's snapshot (a state directory
        # is configured); without it APTPL=1 is refused rather than silently not kept
        self.aptpl_supported = aptpl_supported
        self.raise_ua = raise_ua
        self.on_preempt_abort = on_preempt_abort
        self.state_changed = state_changed
        self.target_ports = target_ports
        self.max_registrations = max_registrations
        self._lock = threading.Lock()
        # All below guarded by _lock.
        self._registrations: list[Registration] = []
        self._reservation: Reservation | None = None
        self._generation = 0
        self._aptpl = False
        self._spc2_holder: tuple[str, str] | None = None  # (initiator port, target port)

    # --- public queries -----------------------------------------------------------------

    @property
    def persist_through_power_loss(self) -> bool:
        with self._lock:
            return self._aptpl

    @property
    def generation(self) -> int:
        with self._lock:
            return self._generation

    def conflicts(self, task: ScsiTask) -> bool:
        """Whether `task` must end in RESERVATION CONFLICT before it runs."""
        cdb = task.cdb
        if not cdb:
            return False
        if self._spc2_holder is None and self._reservation is None:
            return False          # the common case, decided without the lock (a hot path)
        opcode = cdb[0]
        rule = RESERVATION_RULES.get(opcode, DEFAULT_RULE)
        nexus = _normalised(task.nexus)
        with self._lock:
            if self._spc2_holder is not None:
                # SPC-3 5.6.3: PR commands conflict while an SPC-2 reservation is held,
                # whoever sends them.
                if opcode in (Opcode.PERSISTENT_RESERVE_IN, Opcode.PERSISTENT_RESERVE_OUT):
                    return True
                if self._spc2_holder == (nexus.initiator_port, nexus.target_port):
                    return False
                return not _resolve(rule.spc2_allowed, cdb)
            reservation = self._reservation
            if reservation is None:
                return False
            access = _resolve(rule.persistent, cdb)
            if access is Access.ALLOWED or self._is_holder(nexus):
                return False
            if reservation.type.admits_registrants and self._find(nexus) is not None:
                return False
            return access is Access.WRITE or reservation.type.exclusive_access

    # --- PERSISTENT RESERVE IN ------------------------------------------------------------

    def persistent_reserve_in(self, task: ScsiTask) -> None:
        cdb = task.cdb
        if len(cdb) < 10:
            raise invalid_field_in_cdb(0)
        action = cdb[1] & 0x1F
        allocation_length = u16(cdb, 7)
        builders = {
            PrInAction.READ_KEYS: self._read_keys,
            PrInAction.READ_RESERVATION: self._read_reservation,
            PrInAction.REPORT_CAPABILITIES: self._report_capabilities,
            PrInAction.READ_FULL_STATUS: self._read_full_status,
        }
        builder = builders.get(action)
        if builder is None:
            raise invalid_field_in_cdb(1, 4)
        with self._lock:
            if self._spc2_holder is not None:
                _conflict_status(task)
                return
            data = builder()
        task.data_in = data[:allocation_length]

    def _read_keys(self) -> bytes:
        keys = b"".join(struct.pack(">Q", r.key) for r in self._registrations)
        return struct.pack(">II", self._generation, len(keys)) + keys

    def _read_reservation(self) -> bytes:
        reservation = self._reservation
        if reservation is None:
            return struct.pack(">II", self._generation, 0)
        key = 0 if reservation.type.all_registrants else self._holder_key()
        body = struct.pack(">Q4xxBxx", key, LU_SCOPE << 4 | reservation.type)
        return struct.pack(">II", self._generation, len(body)) + body

    def _report_capabilities(self) -> bytes:
        # CRH, SIP_C, ATP_C, PTPL_C; TMV, ALLOW COMMANDS, PTPL_A; the six types.
        flags = 0x10 | 0x08 | 0x04 | (0x01 if self.aptpl_supported else 0)
        state = 0x80 | ALLOW_COMMANDS << 4 | (0x01 if self._aptpl else 0)
        type_mask = 0x80 | 0x40 | 0x20 | 0x08 | 0x02  # WE-AR, EA-RO, WE-RO, EA, WE
        return struct.pack(">HBBBBxx", 8, flags, state, type_mask, 0x01)  # 0x01: EA-AR

    def _read_full_status(self) -> bytes:
        reservation = self._reservation
        descriptors = bytearray()
        for registration in self._registrations:
            holder = reservation is not None and (
                reservation.type.all_registrants
                or (reservation.holder is not None and registration.covers(reservation.holder))
            )
            scope_type = LU_SCOPE << 4 | reservation.type if holder and reservation else 0
            transport_id = encode_transport_id(registration.initiator_port)
            if holder and registration.all_tg_pt and reservation.holder is not None:
                # One descriptor may stand for every port only when all of them hold the
                # reservation; here just the holder's port does: one descriptor per port.
                for port, holds in self._ports_of(reservation.holder):
                    descriptors += struct.pack(
                        ">Q4xBB4xHI", registration.key, 0x01 if holds else 0,
                        scope_type if holds else 0, port, len(transport_id),
                    )
                    descriptors += transport_id
                continue
            descriptors += struct.pack(
                ">Q4xBB4xHI",
                registration.key,
                (0x02 if registration.all_tg_pt else 0) | (0x01 if holder else 0),
                scope_type,
                registration.relative_port_id,
                len(transport_id),
            )
            descriptors += transport_id
        return struct.pack(">II", self._generation, len(descriptors)) + bytes(descriptors)

    def _ports_of(self, holder: ITNexus) -> list[tuple[int, bool]]:
        """(relative target port id, holds the reservation) for every known target port."""
        ports = set(self.target_ports()) if self.target_ports is not None else set()
        ports.add(holder.relative_port_id)
        return [(port, port == holder.relative_port_id) for port in sorted(ports)]

    # --- PERSISTENT RESERVE OUT -----------------------------------------------------------

    def persistent_reserve_out(self, task: ScsiTask) -> None:
        cdb = task.cdb
        if len(cdb) < 10:
            raise invalid_field_in_cdb(0)
        parameter_length = u32(cdb, 5)
        task.data_out_length = parameter_length
        try:
            action = PrOutAction(cdb[1] & 0x1F)
        except ValueError:
            raise invalid_field_in_cdb(1, 4) from None
        data = bytes(task.data_out[:parameter_length]) if task.data_out is not None else b""
        if len(data) < parameter_length:
            raise _parameter_list_length_error()
        effects = _Effects()
        try:
            with self._lock:
                if self._spc2_holder is not None:
                    raise _Conflict
                self._persistent_reserve_out(action, cdb, data, _normalised(task.nexus), effects)
        except _Conflict:
            _conflict_status(task)
            return
        self._run(effects)

    def _persistent_reserve_out(
        self, action: PrOutAction, cdb: bytes, data: bytes, nexus: ITNexus, effects: _Effects
    ) -> None:
        scope, type_code = cdb[2] >> 4, cdb[2] & 0x0F
        if action is PrOutAction.REGISTER_AND_MOVE:
            self._register_and_move(data, nexus, effects)
            return
        if len(data) < BASIC_PARAMETER_LIST_LENGTH:
            raise _parameter_list_length_error()
        key, service_action_key = u64(data, 0), u64(data, 8)
        flags = data[20]
        spec_i_pt, all_tg_pt, aptpl = bool(flags & 0x08), bool(flags & 0x04), bool(flags & 0x01)
        if aptpl and not self.aptpl_supported:
            raise invalid_field_in_parameter_list(20, 0)
        if spec_i_pt and action is PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY:
            raise invalid_field_in_parameter_list(20, 3)
        if spec_i_pt and action is PrOutAction.REGISTER:
            if len(data) < SPEC_I_PT_HEADER_LENGTH:
                raise _parameter_list_length_error()
        elif len(data) != BASIC_PARAMETER_LIST_LENGTH:
            raise _parameter_list_length_error()

        if action in (PrOutAction.REGISTER, PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY):
            self._register(
                nexus,
                key,
                service_action_key,
                ignore_existing=action is PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY,
                all_tg_pt=all_tg_pt,
                aptpl=aptpl,
                specified_ports=self._specified_ports(data) if spec_i_pt else None,
                effects=effects,
            )
        elif action is PrOutAction.RESERVE:
            self._check_scope_and_type(scope, type_code)
            self._reserve(nexus, key, PrType(type_code), effects)
        elif action is PrOutAction.RELEASE:
            self._release(nexus, key, scope, type_code, effects)
        elif action is PrOutAction.CLEAR:
            self._clear(nexus, key, effects)
        else:
            self._preempt(
                nexus,
                key,
                service_action_key,
                scope,
                type_code,
                abort=action is PrOutAction.PREEMPT_AND_ABORT,
                effects=effects,
            )

    def _specified_ports(self, data: bytes) -> list[str]:
        """The initiator ports of a SPEC_I_PT parameter list's TransportIDs."""
        end = SPEC_I_PT_HEADER_LENGTH + u32(data, 24)
        if end > len(data):
            raise _parameter_list_length_error()
        ports = []
        offset = SPEC_I_PT_HEADER_LENGTH
        while offset < end:
            port, length = parse_transport_id(data, offset, end)
            ports.append(port)
            offset += length
        return ports

    # --- service actions (called with the lock held) ------------------------------------------

    def _register(
        self,
        nexus: ITNexus,
        key: int,
        service_action_key: int,
        *,
        ignore_existing: bool,
        all_tg_pt: bool,
        aptpl: bool,
        specified_ports: list[str] | None,
        effects: _Effects,
    ) -> None:
        registration = self._find(nexus)
        if registration is None:
            if not ignore_existing and key != 0:
                raise _Conflict
            if service_action_key == 0:
                return  # unregistering an unregistered nexus: nothing happens
            added = [
                Registration(
                    service_action_key,
                    nexus.initiator_port,
                    nexus.target_port,
                    nexus.relative_port_id,
                    all_tg_pt,
                )
            ]
            for port in specified_ports or ():
                probe = ITNexus(port, nexus.target_port, nexus.relative_port_id)
                if any(new.covers(probe) for new in added):
                    continue  # the sender itself, or named twice
                if self._find(probe) is not None:
                    raise invalid_field_in_parameter_list(SPEC_I_PT_HEADER_LENGTH)
                added.append(
                    Registration(
                        service_action_key,
                        port,
                        nexus.target_port,
                        nexus.relative_port_id,
                        all_tg_pt,
                    )
                )
            if len(self._registrations) + len(added) > self.max_registrations:
                raise _no_registration_resources()
            self._registrations.extend(added)
        else:
            if not ignore_existing and key != registration.key:
                raise _Conflict
            if specified_ports is not None:
                # SPC-4 5.12.7: SPEC_I_PT from a registered nexus is INVALID FIELD IN CDB.
                raise invalid_field_in_cdb(1)
            if service_action_key == 0:
                self._unregister(registration, effects)
            else:
                registration.key = service_action_key
        self._aptpl = aptpl
        self._bump(effects)

    def _reserve(self, nexus: ITNexus, key: int, pr_type: PrType, effects: _Effects) -> None:
        self._registered(nexus, key)
        reservation = self._reservation
        if reservation is not None:
            if self._is_holder(nexus) and reservation.type == pr_type:
                return
            raise _Conflict
        holder = None if pr_type.all_registrants else nexus
        self._reservation = Reservation(pr_type, holder)
        effects.changed = True

    def _release(
        self, nexus: ITNexus, key: int, scope: int, type_code: int, effects: _Effects
    ) -> None:
        self._registered(nexus, key)
        reservation = self._reservation
        if reservation is None or not self._is_holder(nexus):
            return  # SPC-4: a release by a non-holder succeeds and does nothing
        if scope != LU_SCOPE or type_code != reservation.type:
            raise CheckCondition(
                SenseKey.ILLEGAL_REQUEST, INVALID_RELEASE_OF_PERSISTENT_RESERVATION
            )
        self._reservation = None
        if reservation.type.admits_registrants:
            effects.unit_attention(self._others(nexus), Asc.RESERVATIONS_RELEASED)
        effects.changed = True

    def _clear(self, nexus: ITNexus, key: int, effects: _Effects) -> None:
        self._registered(nexus, key)
        effects.unit_attention(self._others(nexus), Asc.RESERVATIONS_PREEMPTED)
        self._registrations.clear()
        self._reservation = None
        self._bump(effects)

    def _preempt(
        self,
        nexus: ITNexus,
        key: int,
        service_action_key: int,
        scope: int,
        type_code: int,
        *,
        abort: bool,
        effects: _Effects,
    ) -> None:
        own = self._registered(nexus, key)
        reservation = self._reservation
        others = [r for r in self._registrations if r is not own]
        if reservation is not None and (
            (reservation.type.all_registrants and service_action_key == 0)
            or (not reservation.type.all_registrants and service_action_key == self._holder_key())
        ):
            # Preempt the reservation itself: take it over with the CDB's scope and type.
            self._check_scope_and_type(scope, type_code)
            new_type = PrType(type_code)
            if reservation.type.all_registrants:
                victims = others
            else:
                victims = [r for r in others if r.key == service_action_key]
            self._remove(victims)
            self._reservation = Reservation(new_type, None if new_type.all_registrants else nexus)
            if new_type != reservation.type or scope != LU_SCOPE:
                survivors = [r for r in self._registrations if r is not own]
                effects.unit_attention(survivors, Asc.RESERVATIONS_RELEASED)
        else:
            # Only remove registrations; any reservation stays as it is.
            if service_action_key == 0:
                raise invalid_field_in_parameter_list(8)
            if not any(r.key == service_action_key for r in self._registrations):
                raise _Conflict
            victims = [r for r in others if r.key == service_action_key]
            self._remove(victims)
        effects.unit_attention(victims, Asc.REGISTRATIONS_PREEMPTED)
        if abort:
            effects.aborted.update(v.pattern for v in victims)
        self._bump(effects)

    def _register_and_move(self, data: bytes, nexus: ITNexus, effects: _Effects) -> None:
        if len(data) < REGISTER_AND_MOVE_HEADER_LENGTH:
            raise _parameter_list_length_error()
        key, service_action_key = u64(data, 0), u64(data, 8)
        unregister, aptpl = bool(data[17] & 0x02), bool(data[17] & 0x01)
        if aptpl and not self.aptpl_supported:
            raise invalid_field_in_parameter_list(17, 0)
        relative_port_id = u16(data, 18)
        end = REGISTER_AND_MOVE_HEADER_LENGTH + u32(data, 20)
        if end > len(data):
            raise _parameter_list_length_error()
        own = self._registered(nexus, key)
        reservation = self._reservation
        if reservation is None or reservation.type.all_registrants or not self._is_holder(nexus):
            raise _Conflict
        if service_action_key == 0:
            raise invalid_field_in_parameter_list(8)
        port, _ = parse_transport_id(data, REGISTER_AND_MOVE_HEADER_LENGTH, end)
        target_port = self._target_port(relative_port_id, nexus)
        if target_port is None:
            raise invalid_field_in_parameter_list(18)
        destination = ITNexus(port, target_port, relative_port_id)
        if own.covers(destination) or nexus_matches(destination, nexus):
            raise invalid_field_in_parameter_list(REGISTER_AND_MOVE_HEADER_LENGTH)
        existing = self._find(destination)
        if existing is not None:
            existing.key = service_action_key
        else:
            if len(self._registrations) >= self.max_registrations:
                raise _no_registration_resources()
            self._registrations.append(
                Registration(service_action_key, port, target_port, relative_port_id)
            )
        self._reservation = Reservation(reservation.type, destination)
        if unregister:
            self._registrations.remove(own)
        self._aptpl = aptpl
        self._bump(effects)

    # --- helpers (lock held) ------------------------------------------------------------------

    def _find(self, nexus: ITNexus) -> Registration | None:
        for registration in self._registrations:
            if registration.covers(nexus):
                return registration
        return None

    def _registered(self, nexus: ITNexus, key: int) -> Registration:
        """The nexus's registration; RESERVATION CONFLICT if none or the key differs."""
        registration = self._find(nexus)
        if registration is None or registration.key != key:
            raise _Conflict
        return registration

    def _others(self, nexus: ITNexus) -> list[Registration]:
        return [r for r in self._registrations if not r.covers(nexus)]

    def _is_holder(self, nexus: ITNexus) -> bool:
        reservation = self._reservation
        if reservation is None:
            return False
        if reservation.holder is None:
            return self._find(nexus) is not None
        return nexus_matches(reservation.holder, nexus)

    def _holder_key(self) -> int:
        reservation = self._reservation
        assert reservation is not None and reservation.holder is not None
        registration = self._find(reservation.holder)
        return registration.key if registration is not None else 0

    def _unregister(self, registration: Registration, effects: _Effects) -> None:
        reservation = self._reservation
        was_holder = (
            reservation is not None
            and reservation.holder is not None
            and registration.covers(reservation.holder)
        )
        self._remove([registration])
        if was_holder and reservation is not None and reservation.type.registrants_only:
            # SPC-4 5.12.11.2.2: the holder of a registrants-only reservation left.
            effects.unit_attention(self._registrations, Asc.RESERVATIONS_RELEASED)

    def _remove(self, victims: list[Registration]) -> None:
        """Drop registrations; a reservation whose holder is gone is released."""
        for victim in victims:
            self._registrations.remove(victim)
        reservation = self._reservation
        if reservation is None:
            return
        if reservation.holder is None:
            if not self._registrations:
                self._reservation = None
        elif self._find(reservation.holder) is None:
            self._reservation = None

    def _check_scope_and_type(self, scope: int, type_code: int) -> None:
        if scope != LU_SCOPE:
            raise invalid_field_in_cdb(2, 7)
        if type_code not in _VALID_TYPES:
            raise invalid_field_in_cdb(2, 3)

    def _target_port(self, relative_port_id: int, nexus: ITNexus) -> str | None:
        # The port the command came in on exists even if the owner's list does not name it.
        if relative_port_id == nexus.relative_port_id:
            return nexus.target_port
        if self.target_ports is not None:
            port = self.target_ports().get(relative_port_id)
            return port.lower() if port is not None else None
        return None

    def _bump(self, effects: _Effects) -> None:
        self._generation = (self._generation + 1) & 0xFFFFFFFF
        effects.changed = True

    def _run(self, effects: _Effects) -> None:
        """Deliver a command's side effects (lock released)."""
        try:
            if self.raise_ua is not None:
                for pattern, asc in effects.unit_attentions:
                    self.raise_ua(pattern, asc)
            if effects.aborted and self.on_preempt_abort is not None:
                self.on_preempt_abort(frozenset(effects.aborted))
        except Exception:  # noqa: BLE001 - the PR change is done; report it as such
            log.exception("persistent reservation callback failed")
        if effects.changed and self.state_changed is not None:
            try:
                self.state_changed(effects.summary())
            except OSError as exc:
                # the change is in effect but could not be made to persist: never GOOD then
                log.error("persistent reservation state not saved: %s", exc)
                raise CheckCondition(SenseKey.HARDWARE_ERROR, Asc.INTERNAL_TARGET_FAILURE) from None

    # --- SPC-2 RESERVE / RELEASE -----------------------------------------------------------

    def reserve6(self, task: ScsiTask) -> None:
        if len(task.cdb) > 1 and task.cdb[1] & 0x01:
            raise invalid_field_in_cdb(1, 0)  # extent reservations (obsolete)
        self._spc2_reserve(task)

    def reserve10(self, task: ScsiTask) -> None:
        cdb = task.cdb
        if len(cdb) > 1 and cdb[1] & 0x10:
            raise invalid_field_in_cdb(1, 4)  # third-party reservations are not supported
        if len(cdb) > 1 and cdb[1] & 0x02:
            raise invalid_field_in_cdb(1, 1)  # LONGID only goes with 3RDPTY
        self._spc2_reserve(task)

    def release6(self, task: ScsiTask) -> None:
        self._spc2_release(task)

    def release10(self, task: ScsiTask) -> None:
        if len(task.cdb) > 1 and task.cdb[1] & 0x10:
            raise invalid_field_in_cdb(1, 4)
        self._spc2_release(task)

    def _spc2_reserve(self, task: ScsiTask) -> None:
        nexus = _normalised(task.nexus)
        with self._lock:
            if self._registrations:
                # CRH=1 (SPC-4 5.12.3): a persistent reservation holder gets GOOD and
                # nothing changes; anyone else conflicts while registrations exist.
                if not self._is_holder(nexus):
                    _conflict_status(task)
                return
            ports = (nexus.initiator_port, nexus.target_port)
            if self._spc2_holder is not None and self._spc2_holder != ports:
                _conflict_status(task)
                return
            self._spc2_holder = ports

    def _spc2_release(self, task: ScsiTask) -> None:
        nexus = _normalised(task.nexus)
        with self._lock:
            if self._registrations:
                if not self._is_holder(nexus):
                    _conflict_status(task)
                return
            if self._spc2_holder == (nexus.initiator_port, nexus.target_port):
                self._spc2_holder = None
            # A release by anyone else is GOOD and changes nothing (SPC-2 7.21).

    def nexus_lost(self, nexus: ITNexus) -> None:
        """I_T nexus loss releases its SPC-2 reservation; registrations stay."""
        nexus = _normalised(nexus)
        with self._lock:
            if self._spc2_holder == (nexus.initiator_port, nexus.target_port):
                self._spc2_holder = None

    def reset(self) -> None:
        """Logical unit / target reset releases the SPC-2 reservation; PR state stays."""
        with self._lock:
            self._spc2_holder = None

    # --- persistence (APTPL) -----------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The persistent state as a JSON-safe dict (the SPC-2 reservation is not part)."""
        with self._lock:
            reservation = self._reservation
            return {
                "version": 1,
                "generation": self._generation,
                "aptpl": self._aptpl,
                "registrations": [
                    {
                        "key": r.key,
                        "initiator_port": r.initiator_port,
                        "target_port": r.target_port,
                        "relative_port_id": r.relative_port_id,
                        "all_tg_pt": r.all_tg_pt,
                    }
                    for r in self._registrations
                ],
                "reservation": None
                if reservation is None
                else {
                    "type": int(reservation.type),
                    "holder": None if reservation.holder is None else list(reservation.holder),
                },
            }

    def restore(self, snapshot: Mapping[str, Any]) -> None:
        """Load a `snapshot()`; ValueError (and no change) if it is malformed."""
        try:
            if snapshot["version"] != 1:
                raise ValueError(f"unsupported snapshot version {snapshot['version']!r}")
            generation = _checked_int(snapshot["generation"], 0xFFFFFFFF)
            aptpl = snapshot["aptpl"]
            if not isinstance(aptpl, bool):
                raise ValueError("aptpl must be a boolean")
            registrations = [
                Registration(
                    key=_checked_int(item["key"], 0xFFFFFFFFFFFFFFFF, minimum=1),
                    initiator_port=_checked_str(item["initiator_port"]),
                    target_port=_checked_str(item["target_port"]),
                    relative_port_id=_checked_int(item["relative_port_id"], 0xFFFF),
                    all_tg_pt=bool(item["all_tg_pt"]),
                )
                for item in snapshot["registrations"]
            ]
            reservation = None
            if snapshot["reservation"] is not None:
                pr_type = PrType(snapshot["reservation"]["type"])
                holder_fields = snapshot["reservation"]["holder"]
                holder = None
                if not pr_type.all_registrants:
                    initiator, target, relative = holder_fields
                    holder = ITNexus(
                        _checked_str(initiator),
                        _checked_str(target),
                        _checked_int(relative, 0xFFFF),
                    )
                reservation = Reservation(pr_type, holder)
        except (KeyError, TypeError, IndexError) as exc:
            raise ValueError(f"malformed reservation snapshot: {exc!r}") from None
        with self._lock:
            self._registrations = registrations
            self._reservation = reservation
            self._generation = generation
            self._aptpl = aptpl
            if reservation is not None and (
                (reservation.holder is None and not registrations)
                or (reservation.holder is not None and self._find(reservation.holder) is None)
            ):
                self._reservation = None  # a holder without a registration cannot hold it


def _checked_int(value: Any, maximum: int, minimum: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= maximum:
        raise ValueError(f"integer out of range: {value!r}")
    return value


def _checked_str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string: {value!r}")
    return value.lower()
