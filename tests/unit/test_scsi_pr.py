"""Persistent reservations (SPC-4) and SPC-2 RESERVE/RELEASE: istgt.scsi.pr."""

from __future__ import annotations

import json
import struct
import threading

import pytest

from istgt.scsi.command import ITNexus, ScsiTask
from istgt.scsi.constants import Asc, Opcode, ScsiStatus, SenseKey
from istgt.scsi.pr import (
    PrInAction,
    PrOutAction,
    PrType,
    ReservationState,
    encode_transport_id,
    nexus_matches,
    parse_transport_id,
)
from istgt.scsi.sense import CheckCondition

TARGET1 = "iqn.2007-09.jp.ne.peach.istgt:disk1,t,0x0001"
TARGET2 = "iqn.2007-09.jp.ne.peach.istgt:disk1,t,0x0002"
NAME_A = "iqn.1994-05.com.redhat:alpha"
NAME_B = "iqn.1994-05.com.redhat:bravo"
NAME_C = "iqn.1994-05.com.redhat:charlie"
I1 = ITNexus(f"{NAME_A},i,0x23d000000001", TARGET1, 1)
I2 = ITNexus(f"{NAME_B},i,0x23d000000002", TARGET1, 1)
I3 = ITNexus(f"{NAME_C},i,0x23d000000003", TARGET1, 1)
I1_ON_PORT2 = ITNexus(I1.initiator_port, TARGET2, 2)

K1, K2, K3 = 0x1111222233334444, 0xAAAABBBBCCCCDDDD, 0x0102030405060708
ALL_TYPES = list(PrType)

SPEC_I_PT = 0x08
ALL_TG_PT = 0x04
APTPL = 0x01

READ10 = bytes([Opcode.READ_10, 0, 0, 0, 0, 1, 0, 0, 1, 0])
WRITE10 = bytes([Opcode.WRITE_10, 0, 0, 0, 0, 1, 0, 0, 1, 0])


class Recorder:
    """Stands in for the owning device: records unit attentions, aborts and changes."""

    def __init__(self) -> None:
        self.unit_attentions: list[tuple[ITNexus, int]] = []
        self.aborted: list[frozenset[ITNexus]] = []
        self.changes = 0

    def raise_ua(self, pattern: ITNexus, asc: int) -> None:
        self.unit_attentions.append((pattern, asc))

    def abort(self, patterns: frozenset[ITNexus]) -> None:
        self.aborted.append(patterns)

    def changed(self, effects: dict) -> None:
        self.changes += 1
        self.last_effects = effects

    def attentions_for(self, nexus: ITNexus) -> list[int]:
        return [asc for pattern, asc in self.unit_attentions if nexus_matches(pattern, nexus)]


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def state(recorder: Recorder) -> ReservationState:
    return ReservationState(
        recorder.raise_ua, on_preempt_abort=recorder.abort, state_changed=recorder.changed
    )


# --- command builders ------------------------------------------------------------------------


def parameter_list(key: int = 0, sa_key: int = 0, flags: int = 0, extra: bytes = b"") -> bytes:
    return struct.pack(">QQ4xBx2x", key, sa_key, flags) + extra


def prout(
    state: ReservationState,
    nexus: ITNexus,
    action: int,
    key: int = 0,
    sa_key: int = 0,
    pr_type: int = 0,
    scope: int = 0,
    flags: int = 0,
    extra: bytes = b"",
    data: bytes | None = None,
    length: int | None = None,
) -> ScsiTask:
    if data is None:
        data = parameter_list(key, sa_key, flags, extra)
    if length is None:
        length = len(data)
    cdb = struct.pack(">BBBxxIB", Opcode.PERSISTENT_RESERVE_OUT, action, scope << 4 | pr_type, length, 0)
    task = ScsiTask(0, cdb, nexus, data_out=data, transfer_length=len(data))
    state.persistent_reserve_out(task)
    return task


def prin(state: ReservationState, nexus: ITNexus, action: int, allocation: int = 8192) -> ScsiTask:
    cdb = struct.pack(">BBxxxxxHB", Opcode.PERSISTENT_RESERVE_IN, action, allocation, 0)
    task = ScsiTask(0, cdb, nexus, transfer_length=allocation)
    state.persistent_reserve_in(task)
    return task


def good(task: ScsiTask) -> ScsiTask:
    assert task.status == ScsiStatus.GOOD, task
    return task


def conflict(task: ScsiTask) -> None:
    assert task.status == ScsiStatus.RESERVATION_CONFLICT
    assert task.sense == b""


def register(state: ReservationState, nexus: ITNexus, key: int, flags: int = 0) -> None:
    good(prout(state, nexus, PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY, sa_key=key, flags=flags))


def reserve(state: ReservationState, nexus: ITNexus, key: int, pr_type: PrType) -> ScsiTask:
    return prout(state, nexus, PrOutAction.RESERVE, key=key, pr_type=pr_type)


def read_keys(state: ReservationState, nexus: ITNexus = I1) -> tuple[int, list[int]]:
    data = bytes(good(prin(state, nexus, PrInAction.READ_KEYS)).data_in)
    generation, length = struct.unpack_from(">II", data)
    assert len(data) == 8 + length
    return generation, [struct.unpack_from(">Q", data, 8 + i)[0] for i in range(0, length, 8)]


def read_reservation(state: ReservationState, nexus: ITNexus = I1) -> tuple[int, int, int] | None:
    data = bytes(good(prin(state, nexus, PrInAction.READ_RESERVATION)).data_in)
    generation, length = struct.unpack_from(">II", data)
    if length == 0:
        assert len(data) == 8
        return None
    assert length == 16 and len(data) == 24
    key = struct.unpack_from(">Q", data, 8)[0]
    return generation, key, data[21]


def keys(state: ReservationState) -> list[int]:
    return read_keys(state)[1]


def generation(state: ReservationState) -> int:
    return read_keys(state)[0]


def check_condition(exc: pytest.ExceptionInfo[CheckCondition], asc: int) -> None:
    assert exc.value.sense_key == SenseKey.ILLEGAL_REQUEST
    assert exc.value.asc == asc


def io_conflicts(state: ReservationState, nexus: ITNexus, cdb: bytes) -> bool:
    return state.conflicts(ScsiTask(0, cdb, nexus))


# --- REGISTER / REGISTER AND IGNORE EXISTING KEY --------------------------------------------------


def test_register_and_ignore_registers_and_bumps_generation(state: ReservationState, recorder: Recorder) -> None:
    assert read_keys(state) == (0, [])
    register(state, I1, K1)
    assert read_keys(state) == (1, [K1])
    register(state, I2, K2)
    assert read_keys(state) == (2, [K1, K2])
    assert recorder.changes == 2


def test_register_from_unregistered_nexus_with_a_key_conflicts(state: ReservationState) -> None:
    conflict(prout(state, I1, PrOutAction.REGISTER, key=K2, sa_key=K1))
    assert read_keys(state) == (0, [])


def test_register_zero_key_from_unregistered_nexus_is_a_no_op(state: ReservationState) -> None:
    good(prout(state, I1, PrOutAction.REGISTER, key=0, sa_key=0))
    assert read_keys(state) == (0, [])


def test_reregister_needs_the_current_key(state: ReservationState) -> None:
    good(prout(state, I1, PrOutAction.REGISTER, sa_key=K1))
    # libiscsi prout_reregister_key_fails: REGISTER with reservation key 0
    conflict(prout(state, I1, PrOutAction.REGISTER, key=0, sa_key=K1 + 1))
    assert read_keys(state) == (1, [K1])
    good(prout(state, I1, PrOutAction.REGISTER, key=K1, sa_key=K2))
    assert read_keys(state) == (2, [K2])


def test_register_and_ignore_replaces_the_key_without_checking(state: ReservationState) -> None:
    register(state, I1, K1)
    good(prout(state, I1, PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY, key=0xDEAD, sa_key=K2))
    assert read_keys(state) == (2, [K2])


def test_unregister(state: ReservationState) -> None:
    register(state, I1, K1)
    good(prout(state, I1, PrOutAction.REGISTER, key=K1, sa_key=0))
    assert read_keys(state) == (2, [])


def test_key_change_of_the_holder_keeps_the_reservation(state: ReservationState) -> None:
    register(state, I1, K1)
    good(reserve(state, I1, K1, PrType.WRITE_EXCLUSIVE))
    good(prout(state, I1, PrOutAction.REGISTER, key=K1, sa_key=K3))
    assert read_reservation(state)[1:] == (K3, PrType.WRITE_EXCLUSIVE)


def test_registration_is_per_i_t_nexus(state: ReservationState) -> None:
    register(state, I1, K1)
    # Same initiator port through another target port is another I_T nexus.
    conflict(prout(state, I1_ON_PORT2, PrOutAction.REGISTER, key=K1, sa_key=K2))
    register(state, I1_ON_PORT2, K2)
    assert keys(state) == [K1, K2]


def test_all_tg_pt_registers_on_every_target_port(state: ReservationState) -> None:
    register(state, I1, K1, flags=ALL_TG_PT)
    good(reserve(state, I1_ON_PORT2, K1, PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY))
    assert keys(state) == [K1]
    assert not io_conflicts(state, I1, WRITE10)  # registered, type admits registrants
    assert io_conflicts(state, I2, READ10)


def test_registration_limit(recorder: Recorder) -> None:
    state = ReservationState(recorder.raise_ua, max_registrations=2)
    register(state, I1, K1)
    register(state, I2, K2)
    with pytest.raises(CheckCondition) as exc:
        prout(state, I3, PrOutAction.REGISTER, sa_key=K3)
    check_condition(exc, Asc.INSUFFICIENT_REGISTRATION_RESOURCES)
    assert keys(state) == [K1, K2]


# --- PERSISTENT RESERVE IN --------------------------------------------------------------------


def test_read_keys_truncated_to_allocation_length_keeps_additional_length(state: ReservationState) -> None:
    register(state, I1, K1)
    register(state, I2, K2)
    data = bytes(good(prin(state, I1, PrInAction.READ_KEYS, allocation=8)).data_in)
    assert data == struct.pack(">II", 2, 16)
    data = bytes(good(prin(state, I1, PrInAction.READ_KEYS, allocation=12)).data_in)
    assert data == struct.pack(">II", 2, 16) + struct.pack(">Q", K1)[:4]
    assert len(prin(state, I1, PrInAction.READ_FULL_STATUS, allocation=0).data_in) == 0


@pytest.mark.parametrize("action", range(4, 0x20))
def test_prin_unknown_service_action(state: ReservationState, action: int) -> None:
    with pytest.raises(CheckCondition) as exc:
        prin(state, I1, action)
    check_condition(exc, Asc.INVALID_FIELD_IN_CDB)
    assert exc.value.field_pointer == 1


def test_report_capabilities(state: ReservationState) -> None:
    data = bytes(good(prin(state, I1, PrInAction.REPORT_CAPABILITIES)).data_in)
    assert len(data) == 8
    assert struct.unpack_from(">H", data)[0] == 8
    assert data[2] == 0x10 | 0x08 | 0x04 | 0x01  # CRH SIP_C ATP_C PTPL_C
    assert data[3] & 0x80  # TMV
    assert (data[3] >> 4) & 0x07 <= 5  # ALLOW COMMANDS
    assert data[3] & 0x01 == 0  # PTPL_A: APTPL not active
    mask = struct.unpack_from(">H", data, 4)[0]
    supported = {1: 0x0200, 3: 0x0800, 5: 0x2000, 6: 0x4000, 7: 0x8000, 8: 0x0001}
    assert mask == sum(supported.values())


def test_read_full_status_layout(state: ReservationState) -> None:
    register(state, I1, K1)
    register(state, I2, K2, flags=ALL_TG_PT)
    good(reserve(state, I1, K1, PrType.EXCLUSIVE_ACCESS))
    data = bytes(good(prin(state, I3, PrInAction.READ_FULL_STATUS)).data_in)
    generation_, length = struct.unpack_from(">II", data)
    assert generation_ == 2 and len(data) == 8 + length
    descriptors = []
    offset = 8
    while offset < len(data):
        key, flags, scope_type, relative, tid_length = struct.unpack_from(">Q4xBB4xHI", data, offset)
        tid = data[offset + 24 : offset + 24 + tid_length]
        assert tid_length % 4 == 0 and tid_length >= 24
        descriptors.append((key, flags, scope_type, relative, parse_transport_id(tid, 0, len(tid))[0], tid[0]))
        offset += 24 + tid_length
    assert descriptors == [
        (K1, 0x01, PrType.EXCLUSIVE_ACCESS, 1, I1.initiator_port, 0x45),  # R_HOLDER, format 01h
        (K2, 0x02, 0, 1, I2.initiator_port, 0x45),  # ALL_TG_PT
    ]


def test_read_full_status_marks_every_registrant_for_all_registrants(state: ReservationState) -> None:
    register(state, I1, K1)
    register(state, I2, K2)
    good(reserve(state, I1, K1, PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS))
    data = bytes(good(prin(state, I1, PrInAction.READ_FULL_STATUS)).data_in)
    first = data[8:]
    second = first[24 + struct.unpack_from(">I", first, 20)[0] :]
    for descriptor in (first, second):
        assert descriptor[12] & 0x01
        assert descriptor[13] == PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS


# --- RESERVE / RELEASE -------------------------------------------------------------------------


@pytest.mark.parametrize("pr_type", ALL_TYPES)
def test_reserve_and_release_every_type(state: ReservationState, pr_type: PrType) -> None:
    register(state, I1, K1)
    good(reserve(state, I1, K1, pr_type))
    expected_key = 0 if pr_type.all_registrants else K1
    assert read_reservation(state) == (1, expected_key, pr_type)
    good(reserve(state, I1, K1, pr_type))  # the holder may repeat it
    good(prout(state, I1, PrOutAction.RELEASE, key=K1, pr_type=pr_type))
    assert read_reservation(state) is None
    assert generation(state) == 1  # RESERVE and RELEASE leave PRgeneration alone


def test_reserve_needs_a_registration_with_the_right_key(state: ReservationState) -> None:
    conflict(reserve(state, I1, 0, PrType.WRITE_EXCLUSIVE))
    register(state, I1, K1)
    conflict(reserve(state, I1, K2, PrType.WRITE_EXCLUSIVE))
    assert read_reservation(state) is None


def test_reserve_held_by_another_or_other_type_conflicts(state: ReservationState) -> None:
    register(state, I1, K1)
    register(state, I2, K2)
    good(reserve(state, I1, K1, PrType.WRITE_EXCLUSIVE))
    conflict(reserve(state, I2, K2, PrType.WRITE_EXCLUSIVE))
    conflict(reserve(state, I1, K1, PrType.EXCLUSIVE_ACCESS))
    assert read_reservation(state)[1:] == (K1, PrType.WRITE_EXCLUSIVE)


@pytest.mark.parametrize("type_code", [0, 2, 4, 9, 15])
def test_reserve_invalid_type(state: ReservationState, type_code: int) -> None:
    register(state, I1, K1)
    with pytest.raises(CheckCondition) as exc:
        reserve(state, I1, K1, type_code)  # type: ignore[arg-type]
    check_condition(exc, Asc.INVALID_FIELD_IN_CDB)
    assert exc.value.field_pointer == 2


def test_reserve_non_lu_scope(state: ReservationState) -> None:
    register(state, I1, K1)
    with pytest.raises(CheckCondition) as exc:
        prout(state, I1, PrOutAction.RESERVE, key=K1, pr_type=PrType.WRITE_EXCLUSIVE, scope=2)
    check_condition(exc, Asc.INVALID_FIELD_IN_CDB)


def test_release_by_non_holder_is_good_and_does_nothing(state: ReservationState) -> None:
    register(state, I1, K1)
    register(state, I2, K2)
    good(reserve(state, I1, K1, PrType.EXCLUSIVE_ACCESS))
    good(prout(state, I2, PrOutAction.RELEASE, key=K2, pr_type=PrType.EXCLUSIVE_ACCESS))
    assert read_reservation(state)[1:] == (K1, PrType.EXCLUSIVE_ACCESS)
    conflict(prout(state, I3, PrOutAction.RELEASE, key=0, pr_type=PrType.EXCLUSIVE_ACCESS))


def test_release_with_another_type_is_an_invalid_release(state: ReservationState) -> None:
    register(state, I1, K1)
    good(reserve(state, I1, K1, PrType.EXCLUSIVE_ACCESS))
    with pytest.raises(CheckCondition) as exc:
        prout(state, I1, PrOutAction.RELEASE, key=K1, pr_type=PrType.WRITE_EXCLUSIVE)
    check_condition(exc, 0x2604)
    assert read_reservation(state) is not None


@pytest.mark.parametrize("pr_type", ALL_TYPES)
def test_release_unit_attentions(state: ReservationState, recorder: Recorder, pr_type: PrType) -> None:
    register(state, I1, K1)
    register(state, I2, K2)
    good(reserve(state, I1, K1, pr_type))
    good(prout(state, I1, PrOutAction.RELEASE, key=K1, pr_type=pr_type))
    expected = [Asc.RESERVATIONS_RELEASED] if pr_type.admits_registrants else []
    assert recorder.attentions_for(I2) == expected
    assert recorder.attentions_for(I1) == []
    assert recorder.attentions_for(I3) == []


def test_all_registrants_release_by_any_registrant(state: ReservationState) -> None:
    register(state, I1, K1)
    register(state, I2, K2)
    good(reserve(state, I1, K1, PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS))
    conflict(reserve(state, I3, 0, PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS))
    good(reserve(state, I2, K2, PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS))  # already a holder
    good(prout(state, I2, PrOutAction.RELEASE, key=K2, pr_type=PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS))
    assert read_reservation(state) is None


# --- ownership when the holder unregisters (libiscsi prout_reserve_ownership) ---------------------


@pytest.mark.parametrize("pr_type", ALL_TYPES)
def test_holder_unregistering(state: ReservationState, recorder: Recorder, pr_type: PrType) -> None:
    register(state, I1, K1)
    register(state, I2, K2)
    good(reserve(state, I1, K1, pr_type))
    good(prout(state, I1, PrOutAction.REGISTER, key=K1, sa_key=0))
    if pr_type.all_registrants:
        assert read_reservation(state)[1:] == (0, pr_type)
        good(prout(state, I2, PrOutAction.REGISTER, key=K2, sa_key=0))  # last registrant
        assert read_reservation(state) is None
    else:
        assert read_reservation(state) is None
    expected = [Asc.RESERVATIONS_RELEASED] if pr_type.registrants_only else []
    assert recorder.attentions_for(I2) == expected


# --- conflicts ------------------------------------------------------------------------------------

# libiscsi prout_reserve_access: (registered I2 read, write, unregistered I2 read, write)
ACCESS = {
    PrType.EXCLUSIVE_ACCESS: (False, False, False, False),
    PrType.WRITE_EXCLUSIVE: (True, False, True, False),
    PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY: (True, True, False, False),
    PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY: (True, True, True, False),
    PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS: (True, True, False, False),
    PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS: (True, True, True, False),
}


@pytest.mark.parametrize("pr_type", ALL_TYPES)
def test_access_per_type(state: ReservationState, pr_type: PrType) -> None:
    register(state, I1, K1)
    register(state, I2, K2)
    good(reserve(state, I1, K1, pr_type))
    assert not io_conflicts(state, I1, READ10)
    assert not io_conflicts(state, I1, WRITE10)
    reg_read, reg_write, unreg_read, unreg_write = ACCESS[pr_type]
    assert io_conflicts(state, I2, READ10) is not reg_read
    assert io_conflicts(state, I2, WRITE10) is not reg_write
    good(prout(state, I2, PrOutAction.REGISTER, key=K2, sa_key=0))
    assert io_conflicts(state, I2, READ10) is not unreg_read
    assert io_conflicts(state, I2, WRITE10) is not unreg_write


def test_nothing_conflicts_without_a_reservation(state: ReservationState) -> None:
    register(state, I1, K1)
    for cdb in (READ10, WRITE10, bytes([0xEE] + [0] * 9)):
        assert not io_conflicts(state, I2, cdb)


@pytest.mark.parametrize(
    "cdb",
    [
        bytes([Opcode.TEST_UNIT_READY, 0, 0, 0, 0, 0]),
        bytes([Opcode.INQUIRY, 0, 0, 0, 96, 0]),
        bytes([Opcode.REQUEST_SENSE, 0, 0, 0, 18, 0]),
        bytes([Opcode.REPORT_LUNS] + [0] * 11),
        bytes([Opcode.READ_CAPACITY_10] + [0] * 9),
        bytes([Opcode.SERVICE_ACTION_IN_16, 0x10] + [0] * 14),  # READ CAPACITY(16)
        bytes([Opcode.MAINTENANCE_IN, 0x0A] + [0] * 10),  # REPORT TARGET PORT GROUPS
        bytes([Opcode.LOG_SENSE] + [0] * 9),
        bytes([Opcode.PERSISTENT_RESERVE_IN] + [0] * 9),
        bytes([Opcode.PERSISTENT_RESERVE_OUT] + [0] * 9),
        bytes([Opcode.START_STOP_UNIT, 0, 0, 0, 0x01, 0]),  # START=1
        bytes([Opcode.PREVENT_ALLOW_MEDIUM_REMOVAL, 0, 0, 0, 0, 0]),  # allow
    ],
)
def test_commands_never_blocked(state: ReservationState, cdb: bytes) -> None:
    register(state, I1, K1)
    good(reserve(state, I1, K1, PrType.EXCLUSIVE_ACCESS))
    assert not io_conflicts(state, I2, cdb)


@pytest.mark.parametrize(
    "cdb, under_write_exclusive",
    [
        (bytes([Opcode.MODE_SENSE_6, 0, 0x3F, 0, 255, 0]), False),
        (bytes([Opcode.READ_16] + [0] * 15), False),
        (bytes([Opcode.VERIFY_10] + [0] * 9), False),
        (bytes([Opcode.SERVICE_ACTION_IN_16, 0x12] + [0] * 14), False),  # GET LBA STATUS
        (bytes([Opcode.MODE_SELECT_6, 0x10, 0, 0, 12, 0]), True),
        (bytes([Opcode.SYNCHRONIZE_CACHE_10] + [0] * 9), True),
        (bytes([Opcode.WRITE_SAME_16] + [0] * 15), True),
        (bytes([Opcode.COMPARE_AND_WRITE] + [0] * 15), True),
        (bytes([Opcode.UNMAP] + [0] * 9), True),
        (bytes([Opcode.START_STOP_UNIT, 0, 0, 0, 0x00, 0]), True),  # stop
        (bytes([Opcode.PREVENT_ALLOW_MEDIUM_REMOVAL, 0, 0, 0, 1, 0]), True),
        (bytes([0xEE] + [0] * 9), True),  # unknown: blocked to be safe
    ],
)
def test_reads_pass_write_exclusive_writes_do_not(
    state: ReservationState, cdb: bytes, under_write_exclusive: bool
) -> None:
    register(state, I1, K1)
    good(reserve(state, I1, K1, PrType.WRITE_EXCLUSIVE))
    assert io_conflicts(state, I2, cdb) is under_write_exclusive
    good(prout(state, I1, PrOutAction.RELEASE, key=K1, pr_type=PrType.WRITE_EXCLUSIVE))
    good(reserve(state, I1, K1, PrType.EXCLUSIVE_ACCESS))
    assert io_conflicts(state, I2, cdb)


def test_registered_nexus_is_not_the_holder_under_exclusive_access(state: ReservationState) -> None:
    register(state, I1, K1)
    register(state, I2, K1)  # the same key does not make I2 a holder
    good(reserve(state, I1, K1, PrType.EXCLUSIVE_ACCESS))
    assert io_conflicts(state, I2, READ10)


# --- CLEAR -------------------------------------------------------------------------------------


def test_clear(state: ReservationState, recorder: Recorder) -> None:
    register(state, I1, K1)
    register(state, I2, K2)
    good(reserve(state, I1, K1, PrType.EXCLUSIVE_ACCESS))
    conflict(prout(state, I2, PrOutAction.CLEAR, key=K1))  # wrong key for I2
    good(prout(state, I2, PrOutAction.CLEAR, key=K2))
    assert read_keys(state) == (3, [])
    assert read_reservation(state) is None
    assert recorder.attentions_for(I1) == [Asc.RESERVATIONS_PREEMPTED]
    assert recorder.attentions_for(I2) == []


def test_clear_from_unregistered_nexus_conflicts(state: ReservationState) -> None:
    register(state, I1, K1)
    conflict(prout(state, I2, PrOutAction.CLEAR, key=0))
    assert keys(state) == [K1]


# --- PREEMPT / PREEMPT AND ABORT ------------------------------------------------------------------


def test_preempt_without_reservation_removes_registrations(state: ReservationState, recorder: Recorder) -> None:
    # libiscsi prout_preempt_rm_reg
    register(state, I1, K1)
    register(state, I2, K2)
    old = generation(state)
    good(prout(state, I2, PrOutAction.PREEMPT, key=K2, sa_key=K1, pr_type=PrType.EXCLUSIVE_ACCESS))
    assert read_keys(state) == (old + 1, [K2])
    assert read_reservation(state) is None
    assert recorder.attentions_for(I1) == [Asc.REGISTRATIONS_PREEMPTED]
    assert recorder.attentions_for(I2) == []


def test_preempt_zero_key_without_reservation(state: ReservationState) -> None:
    register(state, I1, K1)
    register(state, I2, K2)
    with pytest.raises(CheckCondition) as exc:
        prout(state, I2, PrOutAction.PREEMPT, key=K2, sa_key=0)
    check_condition(exc, Asc.INVALID_FIELD_IN_PARAMETER_LIST)
    assert keys(state) == [K1, K2]


def test_preempt_unknown_key_conflicts(state: ReservationState) -> None:
    register(state, I1, K1)
    register(state, I2, K2)
    conflict(prout(state, I2, PrOutAction.PREEMPT, key=K2, sa_key=K3))
    conflict(prout(state, I2, PrOutAction.PREEMPT, key=K1, sa_key=K1))  # caller's key wrong
    assert generation(state) == 2


def test_preempt_the_holder(state: ReservationState, recorder: Recorder) -> None:
    register(state, I1, K1)
    register(state, I2, K2)
    register(state, I3, K3)
    good(reserve(state, I1, K1, PrType.WRITE_EXCLUSIVE))
    good(prout(state, I2, PrOutAction.PREEMPT, key=K2, sa_key=K1, pr_type=PrType.EXCLUSIVE_ACCESS))
    assert read_reservation(state) == (4, K2, PrType.EXCLUSIVE_ACCESS)
    assert keys(state) == [K2, K3]
    assert recorder.attentions_for(I1) == [Asc.REGISTRATIONS_PREEMPTED]
    # The type changed: the remaining registrant learns the old reservation is gone.
    assert recorder.attentions_for(I3) == [Asc.RESERVATIONS_RELEASED]
    assert recorder.attentions_for(I2) == []
    assert io_conflicts(state, I1, READ10)
    assert not io_conflicts(state, I2, WRITE10)


def test_preempt_holder_with_same_type_sends_no_released_attention(
    state: ReservationState, recorder: Recorder
) -> None:
    register(state, I1, K1)
    register(state, I2, K2)
    register(state, I3, K3)
    good(reserve(state, I1, K1, PrType.WRITE_EXCLUSIVE))
    good(prout(state, I2, PrOutAction.PREEMPT, key=K2, sa_key=K1, pr_type=PrType.WRITE_EXCLUSIVE))
    assert recorder.attentions_for(I3) == []


def test_preempt_non_holder_key_keeps_the_reservation(state: ReservationState) -> None:
    register(state, I1, K1)
    register(state, I2, K2)
    register(state, I3, K3)
    good(reserve(state, I1, K1, PrType.EXCLUSIVE_ACCESS))
    good(prout(state, I2, PrOutAction.PREEMPT, key=K2, sa_key=K3, pr_type=PrType.EXCLUSIVE_ACCESS))
    assert read_reservation(state)[1:] == (K1, PrType.EXCLUSIVE_ACCESS)
    assert keys(state) == [K1, K2]
    with pytest.raises(CheckCondition) as exc:
        prout(state, I2, PrOutAction.PREEMPT, key=K2, sa_key=0, pr_type=PrType.EXCLUSIVE_ACCESS)
    check_condition(exc, Asc.INVALID_FIELD_IN_PARAMETER_LIST)


def test_preempt_all_registrants_with_zero_key(state: ReservationState, recorder: Recorder) -> None:
    register(state, I1, K1)
    register(state, I2, K2)
    register(state, I3, K3)
    good(reserve(state, I1, K1, PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS))
    good(prout(state, I2, PrOutAction.PREEMPT, key=K2, sa_key=0, pr_type=PrType.WRITE_EXCLUSIVE))
    assert keys(state) == [K2]
    assert read_reservation(state)[1:] == (K2, PrType.WRITE_EXCLUSIVE)
    assert recorder.attentions_for(I1) == [Asc.REGISTRATIONS_PREEMPTED]
    assert recorder.attentions_for(I3) == [Asc.REGISTRATIONS_PREEMPTED]


def test_preempt_all_registrants_with_a_key_removes_only_those(state: ReservationState) -> None:
    register(state, I1, K1)
    register(state, I2, K2)
    register(state, I3, K3)
    good(reserve(state, I1, K1, PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS))
    good(prout(state, I2, PrOutAction.PREEMPT, key=K2, sa_key=K3))
    assert keys(state) == [K1, K2]
    assert read_reservation(state)[1:] == (0, PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS)


def test_preempt_and_abort_reports_the_preempted_nexuses(state: ReservationState, recorder: Recorder) -> None:
    register(state, I1, K1)
    register(state, I2, K2)
    register(state, I3, K1)
    good(reserve(state, I1, K1, PrType.EXCLUSIVE_ACCESS))
    good(prout(state, I2, PrOutAction.PREEMPT_AND_ABORT, key=K2, sa_key=K1, pr_type=PrType.EXCLUSIVE_ACCESS))
    assert len(recorder.aborted) == 1
    aborted = recorder.aborted[0]
    assert {p.initiator_port for p in aborted} == {I1.initiator_port, I3.initiator_port}
    assert all(nexus_matches(p, n) for p, n in zip(sorted(aborted), sorted([I1, I3])))
    assert keys(state) == [K2]


def test_plain_preempt_aborts_nothing(state: ReservationState, recorder: Recorder) -> None:
    register(state, I1, K1)
    register(state, I2, K2)
    good(prout(state, I2, PrOutAction.PREEMPT, key=K2, sa_key=K1))
    assert recorder.aborted == []


# --- REGISTER AND MOVE ------------------------------------------------------------------------------


def move_list(key: int, sa_key: int, port: str, relative: int = 1, flags: int = 0) -> bytes:
    tid = encode_transport_id(port)
    return struct.pack(">QQxBHI", key, sa_key, flags, relative, len(tid)) + tid


def test_register_and_move(state: ReservationState) -> None:
    register(state, I1, K1)
    good(reserve(state, I1, K1, PrType.WRITE_EXCLUSIVE))
    good(prout(state, I1, PrOutAction.REGISTER_AND_MOVE, data=move_list(K1, K2, I2.initiator_port)))
    assert read_reservation(state) == (2, K2, PrType.WRITE_EXCLUSIVE)
    assert keys(state) == [K1, K2]
    assert io_conflicts(state, I1, WRITE10)
    assert not io_conflicts(state, I2, WRITE10)


def test_register_and_move_with_unreg(state: ReservationState) -> None:
    register(state, I1, K1)
    good(reserve(state, I1, K1, PrType.EXCLUSIVE_ACCESS))
    good(prout(state, I1, PrOutAction.REGISTER_AND_MOVE, data=move_list(K1, K2, I2.initiator_port, flags=0x02)))
    assert keys(state) == [K2]
    assert read_reservation(state)[1:] == (K2, PrType.EXCLUSIVE_ACCESS)


def test_register_and_move_errors(state: ReservationState) -> None:
    register(state, I1, K1)
    register(state, I2, K2)
    conflict(prout(state, I1, PrOutAction.REGISTER_AND_MOVE, data=move_list(K1, K3, I3.initiator_port)))
    good(reserve(state, I1, K1, PrType.WRITE_EXCLUSIVE))
    conflict(prout(state, I2, PrOutAction.REGISTER_AND_MOVE, data=move_list(K2, K3, I3.initiator_port)))
    conflict(prout(state, I1, PrOutAction.REGISTER_AND_MOVE, data=move_list(K2, K3, I3.initiator_port)))
    for data, byte in (
        (move_list(K1, 0, I3.initiator_port), 8),  # zero service action key
        (move_list(K1, K3, I1.initiator_port), 24),  # to itself
        (move_list(K1, K3, I3.initiator_port, relative=7), 18),  # no such target port
    ):
        with pytest.raises(CheckCondition) as exc:
            prout(state, I1, PrOutAction.REGISTER_AND_MOVE, data=data)
        check_condition(exc, Asc.INVALID_FIELD_IN_PARAMETER_LIST)
        assert exc.value.field_pointer == byte
    truncated = move_list(K1, K3, I3.initiator_port)[:-4]
    with pytest.raises(CheckCondition) as exc:
        prout(state, I1, PrOutAction.REGISTER_AND_MOVE, data=truncated)
    check_condition(exc, Asc.PARAMETER_LIST_LENGTH_ERROR)
    assert read_reservation(state) == (2, K1, PrType.WRITE_EXCLUSIVE)


def test_register_and_move_to_another_target_port(recorder: Recorder) -> None:
    state = ReservationState(recorder.raise_ua, target_ports=lambda: {1: TARGET1, 2: TARGET2})
    register(state, I1, K1)
    good(reserve(state, I1, K1, PrType.EXCLUSIVE_ACCESS))
    good(prout(state, I1, PrOutAction.REGISTER_AND_MOVE, data=move_list(K1, K2, I1.initiator_port, relative=2)))
    assert not io_conflicts(state, I1_ON_PORT2, READ10)
    assert io_conflicts(state, I1, READ10)


def test_read_full_status_splits_an_all_tg_pt_registration_when_one_port_holds(
    recorder: Recorder,
) -> None:
    # Only the nexus that reserved holds a Write Exclusive reservation, so one ALL_TG_PT
    # descriptor (which says "every port alike") would be wrong: one per target port.
    state = ReservationState(recorder.raise_ua, target_ports=lambda: {1: TARGET1, 2: TARGET2})
    register(state, I1, K1, flags=ALL_TG_PT)
    good(reserve(state, I1_ON_PORT2, K1, PrType.WRITE_EXCLUSIVE))
    data = bytes(good(prin(state, I2, PrInAction.READ_FULL_STATUS)).data_in)
    found, offset = [], 8
    while offset < len(data):
        key, flags, scope_type, relative, tid_length = struct.unpack_from(">Q4xBB4xHI", data, offset)
        found.append((key, flags, scope_type, relative))
        offset += 24 + tid_length
    assert found == [(K1, 0x00, 0, 1), (K1, 0x01, PrType.WRITE_EXCLUSIVE, 2)]
    assert io_conflicts(state, I1, WRITE10) and not io_conflicts(state, I1_ON_PORT2, WRITE10)


def test_register_and_move_not_for_all_registrants(state: ReservationState) -> None:
    register(state, I1, K1)
    good(reserve(state, I1, K1, PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS))
    conflict(prout(state, I1, PrOutAction.REGISTER_AND_MOVE, data=move_list(K1, K2, I2.initiator_port)))


# --- SPEC_I_PT and TransportIDs -----------------------------------------------------------------------


def spec_i_pt_extra(*ports: str) -> bytes:
    tids = b"".join(encode_transport_id(p) for p in ports)
    return struct.pack(">I", len(tids)) + tids


def test_spec_i_pt_registers_the_named_ports(state: ReservationState) -> None:
    extra = spec_i_pt_extra(I2.initiator_port, NAME_C)
    good(prout(state, I1, PrOutAction.REGISTER, sa_key=K1, flags=SPEC_I_PT, extra=extra))
    assert read_keys(state) == (1, [K1, K1, K1])
    # A format 00h TransportID (name only) covers every ISID of that initiator.
    other_isid = ITNexus(f"{NAME_C},i,0x400000000099", TARGET1, 1)
    good(reserve(state, other_isid, K1, PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY))
    # I3 shares that registration but is another I_T nexus: registered, not the holder.
    conflict(reserve(state, I3, K1, PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY))
    assert not io_conflicts(state, I3, WRITE10)
    assert not io_conflicts(state, I2, WRITE10)
    assert io_conflicts(state, ITNexus("iqn.stranger,i,0x1", TARGET1, 1), WRITE10)
    data = bytes(good(prin(state, I1, PrInAction.READ_FULL_STATUS)).data_in)
    assert f"{NAME_C}\0".encode() in data and data.count(b"\x05\x00") >= 1  # format 00h


def test_spec_i_pt_naming_the_sender_registers_it_once(state: ReservationState) -> None:
    extra = spec_i_pt_extra(I1.initiator_port)
    good(prout(state, I1, PrOutAction.REGISTER, sa_key=K1, flags=SPEC_I_PT, extra=extra))
    assert keys(state) == [K1]


def test_spec_i_pt_with_register_and_ignore(state: ReservationState) -> None:
    extra = spec_i_pt_extra(I2.initiator_port)
    with pytest.raises(CheckCondition) as exc:
        prout(state, I1, PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY, sa_key=K1, flags=SPEC_I_PT, extra=extra)
    check_condition(exc, Asc.INVALID_FIELD_IN_PARAMETER_LIST)
    assert (exc.value.field_pointer, exc.value.bit_pointer) == (20, 3)


def test_spec_i_pt_from_registered_nexus(state: ReservationState) -> None:
    register(state, I1, K1)
    with pytest.raises(CheckCondition) as exc:
        prout(state, I1, PrOutAction.REGISTER, key=K1, sa_key=K2, flags=SPEC_I_PT, extra=spec_i_pt_extra(I2.initiator_port))
    check_condition(exc, Asc.INVALID_FIELD_IN_CDB)
    assert keys(state) == [K1]


def test_spec_i_pt_naming_a_registered_nexus_fails_atomically(state: ReservationState) -> None:
    register(state, I2, K2)
    extra = spec_i_pt_extra(I3.initiator_port, I2.initiator_port)
    with pytest.raises(CheckCondition) as exc:
        prout(state, I1, PrOutAction.REGISTER, sa_key=K1, flags=SPEC_I_PT, extra=extra)
    check_condition(exc, Asc.INVALID_FIELD_IN_PARAMETER_LIST)
    assert keys(state) == [K2]


@pytest.mark.parametrize(
    "tid",
    [
        bytes([0x41, 0, 0, 20]) + b"iqn.x,i,0x1\0".ljust(20, b"\0"),  # protocol 1 (FC-ish)
        bytes([0x85, 0, 0, 20]) + b"iqn.x\0".ljust(20, b"\0"),  # format 10b
        bytes([0x45, 0, 0, 20]) + b"iqn.x\0".ljust(20, b"\0"),  # format 01h without ISID
        bytes([0x05, 0, 0, 20]) + b"iqn.x,i,0x1\0".ljust(20, b"\0"),  # format 00h with ISID
        bytes([0x45, 0, 0, 20]) + b"iqn.x,i,0xZZ\0".ljust(20, b"\0"),  # ISID not hex
        bytes([0x05, 0, 0, 20]) + b"\0" * 20,  # empty name
        bytes([0x05, 0, 0, 40]) + b"iqn.x\0".ljust(20, b"\0"),  # longer than the list
        bytes([0x05, 0]),  # truncated header
        bytes([0x05, 0, 0, 20]) + b"\xff\xfe\0".ljust(20, b"\0"),  # not UTF-8
    ],
)
def test_bad_transport_ids(state: ReservationState, tid: bytes) -> None:
    extra = struct.pack(">I", len(tid)) + tid
    with pytest.raises(CheckCondition) as exc:
        prout(state, I1, PrOutAction.REGISTER, sa_key=K1, flags=SPEC_I_PT, extra=extra)
    check_condition(exc, Asc.INVALID_FIELD_IN_PARAMETER_LIST)
    assert exc.value.cd is False
    assert keys(state) == []


def test_transport_id_length_beyond_parameter_list(state: ReservationState) -> None:
    tid = encode_transport_id(I2.initiator_port)
    extra = struct.pack(">I", len(tid) + 4) + tid
    with pytest.raises(CheckCondition) as exc:
        prout(state, I1, PrOutAction.REGISTER, sa_key=K1, flags=SPEC_I_PT, extra=extra)
    check_condition(exc, Asc.PARAMETER_LIST_LENGTH_ERROR)


def test_transport_id_round_trip() -> None:
    for port in (I1.initiator_port, NAME_B, "iqn.2001-04.com.example:" + "x" * 200 + ",i,0x000000000001"):
        tid = encode_transport_id(port)
        assert len(tid) % 4 == 0 and len(tid) >= 24
        assert tid[0] & 0x0F == 5
        assert parse_transport_id(tid, 0, len(tid)) == (port, len(tid))
    assert parse_transport_id(encode_transport_id("IQN.X,I,0X00023D000001"), 0, 28)[0] == "iqn.x,i,0x00023d000001"


# --- parameter list checks ----------------------------------------------------------------------------


@pytest.mark.parametrize("action", [a for a in PrOutAction if a is not PrOutAction.REGISTER_AND_MOVE])
@pytest.mark.parametrize("length", [0, 8, 23, 25, 32])
def test_parameter_list_length(state: ReservationState, action: PrOutAction, length: int) -> None:
    data = parameter_list(0, K1).ljust(length, b"\0")[:length]
    with pytest.raises(CheckCondition) as exc:
        prout(state, I1, action, data=data, pr_type=PrType.WRITE_EXCLUSIVE)
    check_condition(exc, Asc.PARAMETER_LIST_LENGTH_ERROR)


def test_data_out_shorter_than_parameter_list_length(state: ReservationState) -> None:
    with pytest.raises(CheckCondition) as exc:
        prout(state, I1, PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY, data=parameter_list(0, K1)[:20], length=24)
    check_condition(exc, Asc.PARAMETER_LIST_LENGTH_ERROR)
    assert keys(state) == []


def test_spec_i_pt_needs_the_transport_id_length(state: ReservationState) -> None:
    with pytest.raises(CheckCondition) as exc:
        prout(state, I1, PrOutAction.REGISTER, sa_key=K1, flags=SPEC_I_PT)
    check_condition(exc, Asc.PARAMETER_LIST_LENGTH_ERROR)


@pytest.mark.parametrize("action", range(8, 0x20))
def test_prout_unknown_service_action(state: ReservationState, action: int) -> None:
    with pytest.raises(CheckCondition) as exc:
        prout(state, I1, action, sa_key=K1)
    check_condition(exc, Asc.INVALID_FIELD_IN_CDB)


def test_prout_sets_the_data_out_length(state: ReservationState) -> None:
    task = prout(state, I1, PrOutAction.REGISTER, sa_key=K1)
    assert task.data_out_length == 24


def test_short_cdbs_are_rejected(state: ReservationState) -> None:
    for method in (state.persistent_reserve_in, state.persistent_reserve_out):
        with pytest.raises(CheckCondition):
            method(ScsiTask(0, bytes([Opcode.PERSISTENT_RESERVE_OUT, 0]), I1))


# --- APTPL, snapshot and restore ------------------------------------------------------------------------


def test_aptpl_snapshot_restore_round_trip(state: ReservationState, recorder: Recorder) -> None:
    register(state, I1, K1, flags=APTPL)
    register(state, I2, K2, flags=APTPL | ALL_TG_PT)
    good(prout(state, I3, PrOutAction.REGISTER, sa_key=K3, flags=APTPL | SPEC_I_PT, extra=spec_i_pt_extra(NAME_A + "x")))
    good(reserve(state, I1, K1, PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY))
    assert state.persist_through_power_loss
    caps = bytes(good(prin(state, I1, PrInAction.REPORT_CAPABILITIES)).data_in)
    assert caps[3] & 0x01  # PTPL_A
    saved = json.loads(json.dumps(state.snapshot()))

    restored = ReservationState(Recorder().raise_ua)
    restored.restore(saved)
    assert restored.persist_through_power_loss
    for action in PrInAction:
        assert prin(restored, I2, action).data_in == prin(state, I2, action).data_in
    assert not io_conflicts(restored, I1, WRITE10)
    assert io_conflicts(restored, ITNexus("iqn.other,i,0x1", TARGET1, 1), READ10)
    assert recorder.changes == 4


def test_aptpl_is_cleared_by_a_later_register_without_it(state: ReservationState) -> None:
    register(state, I1, K1, flags=APTPL)
    register(state, I2, K2)
    assert not state.persist_through_power_loss


@pytest.mark.parametrize(
    "mutate",
    [
        lambda s: s.update(version=2),
        lambda s: s.pop("registrations"),
        lambda s: s["registrations"][0].update(key=0),
        lambda s: s["registrations"][0].update(key="1"),
        lambda s: s.update(generation=-1),
        lambda s: s.update(aptpl="yes"),
        lambda s: s["reservation"].update(type=2),
        lambda s: s["reservation"].update(holder=["a"]),
    ],
)
def test_restore_rejects_malformed_snapshots(state: ReservationState, mutate) -> None:
    register(state, I1, K1)
    good(reserve(state, I1, K1, PrType.WRITE_EXCLUSIVE))
    snapshot = json.loads(json.dumps(state.snapshot()))
    mutate(snapshot)
    fresh = ReservationState()
    register(fresh, I3, K3)
    with pytest.raises(ValueError):
        fresh.restore(snapshot)
    assert keys(fresh) == [K3]


def test_restore_drops_a_reservation_without_its_holder(state: ReservationState) -> None:
    register(state, I1, K1)
    good(reserve(state, I1, K1, PrType.WRITE_EXCLUSIVE))
    snapshot = state.snapshot()
    snapshot["registrations"] = []
    fresh = ReservationState()
    fresh.restore(snapshot)
    assert read_reservation(fresh) is None


# --- SPC-2 RESERVE / RELEASE ------------------------------------------------------------------------------


def spc2(state: ReservationState, method: str, nexus: ITNexus, cdb: bytes | None = None) -> ScsiTask:
    opcodes = {"reserve6": 0x16, "release6": 0x17, "reserve10": 0x56, "release10": 0x57}
    if cdb is None:
        cdb = bytes([opcodes[method]] + [0] * (5 if method.endswith("6") else 9))
    task = ScsiTask(0, cdb, nexus)
    getattr(state, method)(task)
    return task


MODE_SENSE6 = bytes([Opcode.MODE_SENSE_6, 0, 0x3F, 0, 255, 0])
INQUIRY = bytes([Opcode.INQUIRY, 0, 0, 0, 96, 0])


@pytest.mark.parametrize("size", ["6", "10"])
def test_spc2_two_initiators(state: ReservationState, size: str) -> None:
    # libiscsi reserve6_2initiators
    good(spc2(state, "reserve" + size, I1))
    good(spc2(state, "reserve" + size, I1))
    conflict(spc2(state, "reserve" + size, I2))
    good(spc2(state, "release" + size, I2))  # not the holder: no effect
    assert not io_conflicts(state, I1, MODE_SENSE6)
    assert io_conflicts(state, I2, MODE_SENSE6)
    assert io_conflicts(state, I2, READ10)
    assert io_conflicts(state, I2, bytes([Opcode.TEST_UNIT_READY] + [0] * 5))
    assert not io_conflicts(state, I2, INQUIRY)
    assert not io_conflicts(state, I2, bytes([Opcode.RELEASE_6] + [0] * 5))
    conflict(spc2(state, "reserve" + size, I2))
    good(spc2(state, "release" + size, I1))
    good(spc2(state, "reserve" + size, I2))
    assert io_conflicts(state, I1, READ10)


def test_spc2_reservation_blocks_persistent_reservation_commands(state: ReservationState) -> None:
    good(spc2(state, "reserve6", I1))
    for nexus in (I1, I2):
        assert io_conflicts(state, nexus, bytes([Opcode.PERSISTENT_RESERVE_IN] + [0] * 9))
        assert io_conflicts(state, nexus, bytes([Opcode.PERSISTENT_RESERVE_OUT] + [0] * 9))
        conflict(prin(state, nexus, PrInAction.READ_KEYS))
        conflict(prout(state, nexus, PrOutAction.REGISTER, sa_key=K1))
    good(spc2(state, "release6", I1))
    register(state, I1, K1)


@pytest.mark.parametrize("event", ["nexus_lost", "reset"])
def test_spc2_released_by_nexus_loss_and_reset(state: ReservationState, event: str) -> None:
    register(state, I3, K3)
    good(reserve(state, I3, K3, PrType.EXCLUSIVE_ACCESS))
    good(prout(state, I3, PrOutAction.REGISTER, key=K3, sa_key=0))  # back to no PR state
    good(spc2(state, "reserve6", I1))
    state.nexus_lost(I2)  # someone else's loss changes nothing
    conflict(spc2(state, "reserve6", I2))
    if event == "nexus_lost":
        state.nexus_lost(I1)
    else:
        state.reset()
    good(spc2(state, "reserve6", I2))


def test_persistent_reservations_survive_nexus_loss_and_reset(state: ReservationState) -> None:
    register(state, I1, K1)
    good(reserve(state, I1, K1, PrType.EXCLUSIVE_ACCESS))
    state.nexus_lost(I1)
    state.reset()
    assert read_reservation(state)[1:] == (K1, PrType.EXCLUSIVE_ACCESS)
    assert keys(state) == [K1]


def test_spc2_with_persistent_registrations(state: ReservationState) -> None:
    # CRH=1: the PR holder gets GOOD without effect, everyone else conflicts.
    register(state, I1, K1)
    conflict(spc2(state, "reserve6", I1))  # registered but not holding a reservation
    good(reserve(state, I1, K1, PrType.WRITE_EXCLUSIVE))
    good(spc2(state, "reserve6", I1))
    good(spc2(state, "release10", I1))
    conflict(spc2(state, "reserve10", I2))
    conflict(spc2(state, "release6", I2))
    assert read_reservation(state)[1:] == (K1, PrType.WRITE_EXCLUSIVE)
    assert not io_conflicts(state, I2, READ10)  # still just the persistent reservation


def test_reserve10_third_party_is_not_supported(state: ReservationState) -> None:
    with pytest.raises(CheckCondition) as exc:
        spc2(state, "reserve10", I1, bytes([Opcode.RESERVE_10, 0x10] + [0] * 8))
    check_condition(exc, Asc.INVALID_FIELD_IN_CDB)
    good(spc2(state, "reserve10", I2))


def test_spc2_uses_the_exact_i_t_nexus(state: ReservationState) -> None:
    good(spc2(state, "reserve6", I1))
    conflict(spc2(state, "reserve6", I1_ON_PORT2))
    assert io_conflicts(state, I1_ON_PORT2, READ10)


# --- robustness -----------------------------------------------------------------------------------------


def test_callback_failure_does_not_undo_the_command() -> None:
    def broken(pattern: ITNexus, asc: int) -> None:
        raise RuntimeError("device gone")

    state = ReservationState(broken)
    register(state, I1, K1)
    register(state, I2, K2)
    good(prout(state, I2, PrOutAction.CLEAR, key=K2))
    assert keys(state) == []


def test_concurrent_registrations() -> None:
    state = ReservationState()
    nexuses = [ITNexus(f"iqn.host{i},i,0x{i:012x}", TARGET1, 1) for i in range(64)]

    def run(nexus: ITNexus, key: int) -> None:
        for _ in range(10):
            register(state, nexus, key)

    threads = [threading.Thread(target=run, args=(n, i + 1)) for i, n in enumerate(nexuses)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    generation_, found = read_keys(state)
    assert sorted(found) == list(range(1, 65))
    assert generation_ == 640


def test_nexus_matches_patterns() -> None:
    assert nexus_matches(I1, I1)
    assert not nexus_matches(I1, I1_ON_PORT2)
    assert nexus_matches(I1._replace(target_port=""), I1_ON_PORT2)
    assert nexus_matches(ITNexus(NAME_A, TARGET1, 1), I1)
    assert not nexus_matches(ITNexus(NAME_A, TARGET1, 1), I2)
    assert not nexus_matches(ITNexus(NAME_A + "x", "", 1), I1)
