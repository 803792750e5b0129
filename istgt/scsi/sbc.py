"""DiskDevice: a direct-access block device (SBC-3) on a backing store.

`execute(task)` decodes the CDB through the opcode table (`DISK_COMMANDS`), applies the
SAM-5 checks (unit attentions, readiness, reserved bits), runs the handler and always
leaves a status (and sense data for CHECK CONDITION); it never raises.
"""

from __future__ import annotations

import errno
import functools
import logging
import struct
import threading
from collections.abc import Iterable
from typing import Any

from istgt.scsi import alua, pr, provisioning, sanitize, spc, xcopy
from istgt.scsi.command import (
    CommandSpec,
    CommandTable,
    ITNexus,
    ScsiTask,
    check_reserved_bits,
    u16,
    u24,
    u32,
    u64,
    usage_mask,
)
from istgt.scsi.extents import ExtentLocks
from istgt.scsi.medium import MediumState
from istgt.scsi.attentions import NexusAttentions
from istgt.scsi.constants import (
    Asc,
    DataDirection,
    Opcode,
    PeripheralDeviceType,
    ResetKind,
    ScsiStatus,
    SenseKey,
)
from istgt.scsi.modepages import ModePages, disk_page_definitions
from istgt.scsi.sense import CheckCondition, encode_sense, invalid_field_in_cdb

log = logging.getLogger(__name__)

# What the transport can move in one command; advertised in the Block Limits VPD page.
MAX_TRANSFER_BYTES = 32 * 1024 * 1024
OPTIMAL_TRANSFER_BYTES = 1024 * 1024
MAX_WRITE_SAME_BYTES = 64 * 1024 * 1024
MAX_COMPARE_AND_WRITE_BLOCKS = 255
# WRITE ATOMIC(16): each one passes whole through the LUN's journal.
MAX_ATOMIC_TRANSFER_BYTES = 1024 * 1024
WRITE_SAME_CHUNK_BYTES = 1024 * 1024

MAX_UNMAP_DESCRIPTORS = 256
MAX_UNMAP_BLOCKS = 0xFFFFFFFF  # hole punching is cheap at any size

DEFAULT_RPM = 7200
DEFAULT_FORM_FACTOR = 2  # 3.5 inch

# Byte 1 flag bits shared by the READ/WRITE family
DPO = 0x10
FUA = 0x08
FUA_NV = 0x02

# Commands that normally finish at page-cache speed (see DiskDevice.quick)
_QUICK_READS = frozenset({Opcode.READ_6, Opcode.READ_10, Opcode.READ_12, Opcode.READ_16})
_QUICK_WRITES = frozenset({Opcode.WRITE_6, Opcode.WRITE_10, Opcode.WRITE_12, Opcode.WRITE_16})


class NoStore:
    """The backing store of a drive with nothing in it (DVD, tape): medium access is NOT
    READY before it is reached; it only gives DiskDevice a size of one block."""

    read_only = True
    supports_unmap = False
    served_from_page_cache = True
    path = "/dev/null"

    def __init__(self, size: int) -> None:
        self.size = size

    def read(self, offset: int, length: int) -> bytes:
        raise OSError(errno.EIO, "no medium")

    read_stable = read

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _attr(obj: Any, name: str, default: Any) -> Any:
    value = getattr(obj, name, default)
    return default if value is None else value


class DiskDevice(NexusAttentions):
    """One Disk LUN: `DiskDevice(lu_config, lun_config, backend)`."""

    peripheral_type = PeripheralDeviceType.DIRECT_ACCESS
    # Commands that neither report nor clear a pending unit attention (SAM-5 5.14)
    UA_EXEMPT = frozenset({Opcode.INQUIRY, Opcode.REPORT_LUNS, Opcode.REQUEST_SENSE})

    def __init__(self, lu: Any, lun: Any, backend: Any, pr_state: Any = None,
                 atomic_journal: Any = None) -> None:
        """`pr_state`: a lu.state.StateFile keeping persistent reservations made with APTPL
        across restarts; without one APTPL=1 is refused. `atomic_journal`: a
        lu.atomic_journal.AtomicWriteJournal; without one WRITE ATOMIC is not offered (the
        store alone cannot promise all-or-nothing across a power loss)."""
        self.backend = backend
        self.block_length: int = int(_attr(lu, "block_length", 512))
        self.block_count: int = backend.size // self.block_length
        # Auto-sized LUNs follow their backing store as it grows (notice_growth)
        self.auto_size: bool = getattr(lun, "size", 0) is None
        self._resize_lock = threading.Lock()
        if self.block_count <= 0:
            raise ValueError(f"LUN{lun.number}: backing store smaller than one block")
        self.read_only: bool = bool(_attr(lu, "read_only", False)) or bool(
            getattr(backend, "read_only", False)
        )
        self.online: bool = bool(_attr(lu, "online", True))
        self.command_queuing: bool = int(_attr(lu, "queue_depth", 32)) > 0
        self.lun_number: int = int(lun.number)
        self._all_luns = tuple(sorted(_attr(lu, "luns", {}) or {self.lun_number: None}))
        inquiry = getattr(lu, "inquiry", None)
        serial = _attr(lun, "serial", "") or _attr(inquiry, "serial", "") or f"{lu.number}"
        self.identity = spc.DeviceIdentity(
            vendor=_attr(inquiry, "vendor", "FreeBSD"),
            product=_attr(inquiry, "product", "iSCSI DISK"),
            revision=_attr(inquiry, "revision", "0001"),
            serial=serial,
            target_name=str(lu.name),
            lun=self.lun_number,
        )
        self.rpm: int = min(max(int(_attr(lun, "rpm", DEFAULT_RPM)), 0), 0xFFFE)
        self.form_factor: int = min(max(int(_attr(lun, "form_factor", DEFAULT_FORM_FACTOR)), 0), 15)
        self.mode_pages = ModePages(
            disk_page_definitions(
                write_cache=bool(_attr(lun, "write_cache", True)),
                read_cache=bool(_attr(lun, "read_cache", True)),
            )
        )
        # Thin (UNMAP, WRITE SAME UNMAP, deallocated LBAs) or full, per LUN option and what
        # the backend can do; ProvisioningError (a ValueError) refuses the configuration.
        self.provisioning = provisioning.decide(lun, backend, self.block_length)
        self.thin = self.provisioning.thin
        self.atomic_journal = None if self.read_only else atomic_journal
        if self.atomic_journal is not None:
            self.atomic_journal.recover(backend)    # OSError: the caller refuses to start
        self.table = command_table(thin=self.thin, atomic=self.atomic_journal is not None)
        self.removable: bool = bool(_attr(lun, "removable_disk", False))
        self.medium = MediumState(self.removable)
        self.sanitizing = sanitize.SanitizeState()
        self._init_attentions()
        # Keeps read-modify-write and atomic writes whole against overlapping commands.
        self.extents = ExtentLocks()
        # Set by the owning LogicalUnit: abort this LUN's tasks from the given nexus patterns
        # (PREEMPT AND ABORT); it must not wait for the running PR OUT itself.
        self.abort_nexuses: Any = None
        self.abort_lun_tasks: Any = None      # (lun) -> None, set by the LogicalUnit too
        if hasattr(backend, "on_cache_lost"):
            backend.on_cache_lost = self._cache_lost
        self._pr_state = pr_state
        self._refresh_reservations = getattr(pr_state, "refresh_if_stale", None)
        self.port_groups = alua.TargetPortGroups.of_unit(lu)
        self.reservations = pr.ReservationState(
            raise_ua=self._reservation_unit_attention,
            on_preempt_abort=self._preempt_abort,
            state_changed=self._save_reservations if pr_state is not None else None,
            aptpl_supported=pr_state is not None,
            target_ports=self.port_groups.target_ports,
        )
        # EXTENDED COPY: this target's LUs by NAA (set by the server; None: only this LU)
        # and the outcomes RECEIVE COPY RESULTS reports.
        self.copy_targets: Any = None
        self.copy_results = xcopy.CopyResults()
        if pr_state is not None:
            saved = pr_state.load()          # ValueError: the caller refuses to start
            if saved is not None:
                self.reservations.restore(saved)

    # --- public API -----------------------------------------------------------------

    def execute(self, task: ScsiTask) -> None:
        """Run one command; always sets task.status (and sense for CHECK CONDITION)."""
        task.status = ScsiStatus.GOOD
        task.sense = b""
        task.data_in = None
        try:
            if self._refresh_reservations is not None:
                self._refresh_reservations()     # a gateway whose cluster watch broke
            self._dispatch(task)
        except CheckCondition as condition:
            self._fail(task, condition)
        except Exception:  # a target answers every command, even when a handler is wrong
            log.exception("LUN%d: internal error executing CDB %s", self.lun_number, task.cdb.hex())
            self._fail(
                task, CheckCondition(SenseKey.HARDWARE_ERROR, Asc.INTERNAL_TARGET_FAILURE)
            )

    def quick(self, cdb: bytes) -> bool:
        """Whether the command is expected to finish about as fast as a page-cache copy: a
        READ or a cached WRITE without FUA (anything that waits for stable storage is not),
        so a connection may run it on its own thread."""
        if len(cdb) < 2 or not self.backend.served_from_page_cache:
            return False
        opcode = cdb[0]
        if opcode in _QUICK_READS:
            return not self.mode_pages.read_cache_disabled and (
                opcode == Opcode.READ_6 or not cdb[1] & FUA)
        if opcode in _QUICK_WRITES:
            return self.mode_pages.write_cache_enabled and (
                opcode == Opcode.WRITE_6 or not cdb[1] & FUA)
        return False

    def nexus_lost(self, nexus: ITNexus) -> None:
        """The I_T nexus is gone: forget its state; a later one with the same ports starts
        afresh (and is told about the power-on/reset like any new nexus)."""
        self._forget_nexus(nexus)
        self.medium.nexus_lost(nexus)
        self.reservations.nexus_lost(nexus)
        self.copy_results.forget(nexus)

    def reset(self, kind: ResetKind | str = ResetKind.LOGICAL_UNIT,
              from_peer: bool = False) -> None:
        """A LOGICAL UNIT RESET / target reset: every I_T nexus, the one that asked for it
        included, gets the reset's unit attention (SAM-5 reset semantics: a reset is an event
        of the logical unit, unlike MODE SELECT whose issuer is spared). `kind` is a
        ResetKind or one of "lun", "warm", "cold", "power_on". A LOGICAL UNIT RESET of an
        image other gateways export reaches their nexuses too (`from_peer`: it came from one)."""
        if isinstance(kind, str):
            kind = _RESET_NAMES[kind.lower()]
        if kind is ResetKind.LOGICAL_UNIT and not from_peer and \
                hasattr(self._pr_state, "announce_reset"):
            self._pr_state.announce_reset()
        self.mode_pages.reset()
        try:
            self.flush()
        except OSError:
            log.exception("LUN%d: flush during reset failed", self.lun_number)
        self.reservations.reset()
        self.copy_results.clear()
        self.medium.reset(kind)
        self._reset_unit_attentions(kind.unit_attention)

    def tasks_cleared(self, by_nexus: ITNexus) -> None:
        """CLEAR TASK SET from `by_nexus` aborted other nexuses' commands (SAM-5 7.4)."""
        self._queue_unit_attention(Asc.COMMANDS_CLEARED_BY_ANOTHER_INITIATOR, except_nexus=by_nexus)

    def set_lun_numbers(self, numbers: Iterable[int]) -> None:
        """The LUNs REPORT LUNS lists (the LU's configured LUNs by default)."""
        self._all_luns = tuple(sorted(numbers))

    def flush(self) -> None:
        if not self.read_only:
            self.backend.flush()

    def close(self) -> None:
        self.sanitizing.wait()   # an erase is never left half done by a clean shutdown
        if hasattr(self._pr_state, "stop"):
            self._pr_state.stop()        # the cluster watch goes before the image
        self.backend.close()
        if self.atomic_journal is not None:
            self.atomic_journal.close()

    def lun_numbers(self) -> Iterable[int]:
        return self._all_luns

    # --- dispatch -------------------------------------------------------------------

    @property
    def descriptor_sense(self) -> bool:
        return self.mode_pages.descriptor_sense

    def _fail(self, task: ScsiTask, condition: CheckCondition) -> None:
        task.status = ScsiStatus.CHECK_CONDITION
        task.sense = condition.encode(self.descriptor_sense)
        task.data_in = condition.data_in

    def _dispatch(self, task: ScsiTask) -> None:
        cdb = task.cdb
        if not cdb:
            raise CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_COMMAND_OPERATION_CODE)
        opcode = cdb[0]
        exempt = opcode in self.UA_EXEMPT
        attention = self._take_unit_attention(task.nexus, consume=not exempt)
        if attention is not None:
            raise CheckCondition(SenseKey.UNIT_ATTENTION, attention)
        spec = self.table.lookup(cdb)
        if not self.online and not spec.allowed_offline:
            raise CheckCondition(
                SenseKey.NOT_READY, Asc.LOGICAL_UNIT_NOT_READY_MANUAL_INTERVENTION_REQUIRED
            )
        refusal = self.sanitizing.refusal(opcode, spec.medium_access)
        if refusal is not None:
            raise refusal
        check_reserved_bits(spec, cdb)
        if self.reservations.conflicts(task):
            task.status = ScsiStatus.RESERVATION_CONFLICT   # no sense data (SAM-5)
            return
        if spec.medium_access:
            not_ready = self.medium.not_ready_asc()
            if not_ready is not None:
                raise CheckCondition(SenseKey.NOT_READY, not_ready)
        spec.handler(self, task)

    # --- unit attentions --------------------------------------------------------------

    def pending_sense(self, nexus: ITNexus, descriptor: bool) -> bytes | None:
        """For REQUEST SENSE: the oldest unit attention (cleared), or the not-ready state."""
        with self._state_lock:
            pending = self._unit_attentions.setdefault(nexus, [])
            if pending:
                return encode_sense(SenseKey.UNIT_ATTENTION, pending.pop(0), descriptor=descriptor)
        if self.sanitizing.running:
            return self.sanitizing.in_progress().encode(descriptor)
        not_ready = self.medium.not_ready_asc()
        if not_ready is not None:
            return encode_sense(SenseKey.NOT_READY, not_ready, descriptor=descriptor)
        return None

    def _save_reservations(self, effects: dict) -> None:
        if getattr(self._pr_state, "shared", False):
            # other gateways need every state, and the effects for their own nexuses
            self._pr_state.save(self.reservations.snapshot, effects)
            return
        # Keep or remove, decided from one snapshot under the file's lock: deciding first
        # let a save that decided before a concurrent APTPL=0 REGISTER write after its removal.
        self._pr_state.save(self._reservations_to_persist)

    def _cache_lost(self) -> None:
        """The store lost writes it had acknowledged but not yet made durable (a storage
        daemon died): like a power loss of a write-back cache, every nexus is told by a
        power-on attention before its next command, a SYNCHRONIZE CACHE included."""
        log.error("LUN%d: the backing store lost its write cache; unit attention to every "
                  "initiator", self.lun_number)
        self._queue_unit_attention(Asc.POWER_ON_OCCURRED)

    def reset_by_peer(self) -> None:
        """Another gateway of this shared image received a LOGICAL UNIT RESET."""
        if self.abort_lun_tasks is not None:
            self.abort_lun_tasks(self.lun_number)
        self.reset(ResetKind.LOGICAL_UNIT, from_peer=True)

    def apply_remote_reservations(self, snapshot: dict, effects: dict) -> None:
        """Another gateway changed the persistent reservations of this LU: take its state
        and deliver its unit attentions and aborts to this gateway's nexuses."""
        self.reservations.restore(snapshot)
        attentions, aborted = pr.effects_from_summary(effects)
        for pattern, asc in attentions:
            self._reservation_unit_attention(pattern, asc)
        if aborted:
            self._preempt_abort(aborted)

    def _reservations_to_persist(self) -> dict | None:
        snapshot = self.reservations.snapshot()
        return snapshot if snapshot["aptpl"] else None   # APTPL off: nothing may come back

    def _preempt_abort(self, patterns: frozenset[ITNexus]) -> None:
        if self.abort_nexuses is not None:
            self.abort_nexuses(self.lun_number, patterns)

    def resize(self, size: int | None = None) -> int:
        """Grow the LUN online to `size` bytes (None: what the backing store holds now),
        rounded down to whole blocks; returns the block count. Every I_T nexus is told
        CAPACITY DATA HAS CHANGED (SBC-4 4.10). ValueError for less than now (shrinking
        would cut off data an initiator has); the backend's error when it cannot grow."""
        with self._resize_lock:
            wanted = self.backend.stored_size() if size is None else size
            blocks = wanted // self.block_length
            if blocks < self.block_count:
                raise ValueError(f"{blocks * self.block_length} bytes is less than the "
                                 f"current {self.block_count * self.block_length}")
            if blocks == self.block_count:
                return blocks
            self.backend.grow(blocks * self.block_length)
            old, self.block_count = self.block_count, blocks
        log.warning("LUN%d: capacity %d -> %d blocks of %d bytes", self.lun_number, old,
                    blocks, self.block_length)
        self._queue_unit_attention(Asc.CAPACITY_DATA_HAS_CHANGED)
        return blocks

    def notice_growth(self) -> None:
        """Called now and then: an Auto-sized LUN whose file or device grew grows too."""
        if not self.auto_size:
            return
        try:
            grown = self.backend.stored_size() // self.block_length > self.block_count
        except OSError:
            return       # the next medium access reports the store's trouble
        if grown:
            try:
                self.resize(None)
            except Exception as exc:     # BackendError from the store: keep serving
                log.error("LUN%d: cannot follow the grown backing store: %s",
                          self.lun_number, exc)

    def operator_unload(self) -> bool:
        """Eject at the operator's request (istgtcontrol unload); False when removal is
        prevented or the LUN is not removable."""
        return self.medium.operator_eject()

    def operator_load(self) -> bool:
        """Load at the operator's request (istgtcontrol load). A medium that arrives is
        announced to every I_T nexus: NOT READY TO READY CHANGE, MEDIUM MAY HAVE CHANGED."""
        if not self.medium.removable:
            return False
        if self.medium.operator_load():
            self._queue_unit_attention(Asc.NOT_READY_TO_READY_CHANGE)
        return True

    def luns_changed(self) -> None:
        """The target's LUN inventory changed (reload): REPORTED LUNS DATA HAS CHANGED."""
        self._queue_unit_attention(Asc.REPORTED_LUNS_DATA_HAS_CHANGED)

    def mode_select_changed(self, nexus: ITNexus) -> None:
        self._queue_unit_attention(Asc.MODE_PARAMETERS_CHANGED, except_nexus=nexus)

    # --- data for SPC handlers --------------------------------------------------------

    def supported_vpd_pages(self) -> list[int]:
        return [0x00, 0x80, 0x83, 0x86, xcopy.THIRD_PARTY_COPY_VPD, 0xB0, 0xB1, 0xB2]

    def vpd_page(self, page: int, nexus: ITNexus) -> bytes | None:
        if page not in self.supported_vpd_pages():
            return None
        common = spc.common_vpd_page(self, page, nexus)
        if common is not None:
            return common
        pdt = self.peripheral_type
        if page == xcopy.THIRD_PARTY_COPY_VPD:
            return spc.vpd(page, pdt, xcopy.third_party_copy_vpd_body(self.block_length))
        if page == 0xB0:
            return spc.vpd(0xB0, pdt, self._block_limits())
        if page == 0xB1:
            body = bytearray(0x3C)
            struct.pack_into(">H", body, 0, self.rpm)
            # WABEREQ/WACEREQ 01b: reads after BLOCK or CRYPTOGRAPHIC ERASE return GOOD
            body[3] = (0x40 if self.thin else 0) | 0x10 | self.form_factor
            return spc.vpd(0xB1, pdt, bytes(body))
        if page == 0xB2:
            return spc.vpd(0xB2, pdt, self.provisioning.vpd_b2_body())
        return None

    def _block_limits(self) -> bytes:
        bl = self.block_length
        body = bytearray(0x3C)
        body[1] = min(MAX_COMPARE_AND_WRITE_BLOCKS, MAX_TRANSFER_BYTES // bl // 2)
        granularity = self.provisioning.granularity_blocks
        struct.pack_into(">H", body, 2, granularity)
        struct.pack_into(">I", body, 4, MAX_TRANSFER_BYTES // bl)
        struct.pack_into(">I", body, 8, OPTIMAL_TRANSFER_BYTES // bl)
        struct.pack_into(">I", body, 12, MAX_TRANSFER_BYTES // bl)  # max prefetch
        if self.thin:
            struct.pack_into(">II", body, 16, MAX_UNMAP_BLOCKS, MAX_UNMAP_DESCRIPTORS)
            struct.pack_into(">I", body, 24, granularity)
            struct.pack_into(">I", body, 28, 0x80000000)  # UGAVALID, alignment 0
        struct.pack_into(">Q", body, 32, self.max_write_same_blocks)
        # Page bytes 40..63: atomic transfer length and alignment; no granularity, no
        # boundaries.
        struct.pack_into(">II", body, 40, self.max_atomic_blocks, self.atomic_alignment_blocks)
        return bytes(body)

    @property
    def max_atomic_blocks(self) -> int:
        if self.atomic_journal is None:
            return 0
        most = getattr(self.atomic_journal, "max_bytes", MAX_ATOMIC_TRANSFER_BYTES)
        return most // self.block_length

    @property
    def atomic_alignment_blocks(self) -> int:
        """Where an atomic write must start (0: anywhere): a store that is atomic only
        within pieces of its own (an RBD object) needs writes that stay inside one."""
        alignment = getattr(self.atomic_journal, "alignment_bytes", 0)
        return alignment // self.block_length

    @property
    def max_write_same_blocks(self) -> int:
        return MAX_WRITE_SAME_BYTES // self.block_length

    def device_specific_parameter(self) -> int:
        protected = self.read_only or self.mode_pages.software_write_protect
        return (0x80 if protected else 0) | 0x10  # WP, DPOFUA

    def block_descriptor(self, long_lba: bool) -> bytes:
        if long_lba:
            return struct.pack(">Q4xI", self.block_count, self.block_length)
        count = min(self.block_count, 0xFFFFFFFF)
        return struct.pack(">II", count, self.block_length & 0xFFFFFF)

    # --- helpers for SBC handlers -----------------------------------------------------

    def check_range(self, lba: int, blocks: int) -> None:
        if lba + blocks > self.block_count:
            raise CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE)

    def check_transfer(self, cdb: bytes, blocks: int) -> None:
        """A transfer over the Block Limits' MAXIMUM TRANSFER LENGTH is refused (SBC-4
        6.6.4) before anything is read or allocated for it."""
        if blocks * self.block_length > MAX_TRANSFER_BYTES:
            raise invalid_field_in_cdb(transfer_length_byte(cdb))

    def check_writable(self) -> None:
        if self.read_only:
            raise CheckCondition(SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED)
        if self.mode_pages.software_write_protect:
            raise CheckCondition(SenseKey.DATA_PROTECT, Asc.LOGICAL_UNIT_SOFTWARE_WRITE_PROTECTED)

    def read_blocks(self, lba: int, blocks: int, from_medium: bool) -> bytes | bytearray:
        token = self.extents.acquire_shared(lba, blocks)
        try:
            return self.read_extent(lba, blocks, from_medium)
        finally:
            self.extents.release_shared(token)

    def write_blocks(self, lba: int, data: bytes | bytearray | memoryview, force_unit_access: bool) -> None:
        token = self.extents.acquire_shared(lba, len(data) // self.block_length)
        try:
            self.write_extent(lba, data, force_unit_access)
        finally:
            self.extents.release_shared(token)

    def read_extent(self, lba: int, blocks: int, from_medium: bool) -> bytes | bytearray:
        """read_blocks for a caller that holds the range in `extents`."""
        offset = lba * self.block_length
        length = blocks * self.block_length
        from_medium = from_medium or self.mode_pages.read_cache_disabled
        try:
            if from_medium:
                return self.backend.read_stable(offset, length)
            return self.backend.read(offset, length)
        except OSError as exc:
            log.error("LUN%d: read at LBA %d failed: %s", self.lun_number, lba, exc)
            raise CheckCondition(SenseKey.MEDIUM_ERROR, Asc.UNRECOVERED_READ_ERROR, info=lba) from None

    def write_extent(self, lba: int, data: bytes | bytearray | memoryview, force_unit_access: bool) -> None:
        """write_blocks for a caller that holds the range in `extents`."""
        durable = force_unit_access or not self.mode_pages.write_cache_enabled
        offset = lba * self.block_length
        try:
            if durable:
                self.backend.write_durable(offset, data)
            else:
                self.backend.write(offset, data)
        except OSError as exc:
            raise _write_failure(self.lun_number, lba, exc) from None

    def unmap_blocks(self, lba: int, blocks: int) -> None:
        try:
            with self.extents.shared(lba, blocks):
                self.backend.unmap(lba * self.block_length, blocks * self.block_length)
            if not self.mode_pages.write_cache_enabled:
                self.backend.flush()
        except OSError as exc:
            raise _write_failure(self.lun_number, lba, exc) from None

    def sync(self, lba: int) -> None:
        try:
            self.backend.flush()
        except OSError as exc:
            raise _write_failure(self.lun_number, lba, exc) from None


_RESET_NAMES = {
    "lun": ResetKind.LOGICAL_UNIT,
    "warm": ResetKind.TARGET_WARM,
    "cold": ResetKind.TARGET_COLD,
    "power_on": ResetKind.POWER_ON,
}


def _write_failure(lun: int, lba: int, exc: OSError) -> CheckCondition:
    log.error("LUN%d: write at LBA %d failed: %s", lun, lba, exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return CheckCondition(SenseKey.DATA_PROTECT, Asc.SPACE_ALLOCATION_FAILED_WRITE_PROTECT, info=lba)
    return CheckCondition(SenseKey.MEDIUM_ERROR, Asc.WRITE_ERROR, info=lba)


def data_out(task: ScsiTask, length: int) -> memoryview:
    """The first `length` bytes of Data-Out. Fewer bytes than the CDB asks for means the
    initiator's expected transfer length is short: refuse rather than write garbage."""
    data = task.data_out
    if data is None or len(data) < length:
        raise CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_INFORMATION_UNIT)
    return data[:length]


def lba_and_length(cdb: bytes) -> tuple[int, int]:
    """LBA and transfer length of a READ/WRITE/VERIFY-shaped CDB of any size."""
    size = len(cdb)
    opcode = cdb[0]
    if opcode < 0x20:
        blocks = cdb[4]
        return u24(cdb, 1) & 0x1FFFFF, 256 if blocks == 0 else blocks
    if opcode < 0x60:
        return u32(cdb, 2), u16(cdb, 7)
    if opcode >= 0xA0:
        return u32(cdb, 2), u32(cdb, 6)
    if size >= 14:
        return u64(cdb, 2), u32(cdb, 10)
    raise invalid_field_in_cdb(0)


def transfer_length_byte(cdb: bytes) -> int:
    """Where lba_and_length found the transfer length (the sense field pointer)."""
    opcode = cdb[0]
    if opcode < 0x20:
        return 4
    if opcode < 0x60:
        return 7
    return 6 if opcode >= 0xA0 else 10


# --- SBC handlers -------------------------------------------------------------------------


def read(device: DiskDevice, task: ScsiTask) -> None:
    lba, blocks = lba_and_length(task.cdb)
    device.check_range(lba, blocks)
    device.check_transfer(task.cdb, blocks)
    if blocks == 0:
        return
    fua = task.cdb[0] != Opcode.READ_6 and bool(task.cdb[1] & FUA)
    task.data_in = device.read_blocks(lba, blocks, from_medium=fua)


def arrived_blocks(device: DiskDevice, task: ScsiTask, blocks: int) -> memoryview:
    """The Data-Out of a WRITE-type command, cut to the whole blocks that arrived.

    When the initiator's expected transfer length is shorter than the CDB's (an iSCSI
    overflow), FCP-4/SAM-5 let the command proceed without the data beyond EDTL: only the
    blocks that arrived whole are written and the transport reports the residual.
    """
    wanted = blocks * device.block_length
    task.data_out_length = wanted
    data = task.data_out if task.data_out is not None else memoryview(b"")
    usable = min(len(data), wanted)
    return data[: usable - usable % device.block_length]


def write(device: DiskDevice, task: ScsiTask) -> None:
    lba, blocks = lba_and_length(task.cdb)
    task.data_out_length = blocks * device.block_length
    device.check_range(lba, blocks)
    device.check_transfer(task.cdb, blocks)
    device.check_writable()
    data = arrived_blocks(device, task, blocks)
    if not data:
        return
    fua = task.cdb[0] != Opcode.WRITE_6 and bool(task.cdb[1] & FUA)
    device.write_blocks(lba, data, force_unit_access=fua)


def _compare(device: DiskDevice, lba: int, expected: bytes | memoryview, stored: bytes | bytearray) -> None:
    if expected != stored:
        mismatch = next(i for i, (a, b) in enumerate(zip(bytes(expected), stored)) if a != b)
        raise CheckCondition(SenseKey.MISCOMPARE, Asc.MISCOMPARE_DURING_VERIFY, info=mismatch)


def verify(device: DiskDevice, task: ScsiTask) -> None:
    lba, blocks = lba_and_length(task.cdb)
    byte_check = (task.cdb[1] >> 1) & 0x03
    if byte_check == 2:
        raise invalid_field_in_cdb(1, 2)
    if byte_check:
        task.data_out_length = device.block_length * (blocks if byte_check == 1 else 1)
    device.check_range(lba, blocks)
    device.check_transfer(task.cdb, blocks)
    if blocks == 0:
        return
    stored = device.read_blocks(lba, blocks, from_medium=True)
    if byte_check == 0:
        return  # the medium was readable: verified
    if byte_check == 1:
        expected: bytes | memoryview = data_out(task, blocks * device.block_length)
    else:  # 11b: one block of Data-Out compared with every block
        expected = bytes(data_out(task, device.block_length)) * blocks
    _compare(device, lba, expected, stored)


def write_and_verify(device: DiskDevice, task: ScsiTask) -> None:
    lba, blocks = lba_and_length(task.cdb)
    byte_check = (task.cdb[1] >> 1) & 0x03
    if byte_check > 1:
        raise invalid_field_in_cdb(1, 2)
    task.data_out_length = blocks * device.block_length
    device.check_range(lba, blocks)
    device.check_transfer(task.cdb, blocks)
    device.check_writable()
    data = arrived_blocks(device, task, blocks)
    if not data:
        return
    written = len(data) // device.block_length
    device.write_blocks(lba, data, force_unit_access=True)
    stored = device.read_blocks(lba, written, from_medium=True)
    if byte_check:
        _compare(device, lba, data, stored)


def orwrite(device: DiskDevice, task: ScsiTask) -> None:
    cdb = task.cdb
    lba, blocks = u64(cdb, 2), u32(cdb, 10)
    task.data_out_length = blocks * device.block_length
    device.check_range(lba, blocks)
    device.check_transfer(cdb, blocks)
    device.check_writable()
    if blocks == 0:
        return
    data = data_out(task, blocks * device.block_length)
    with device.extents.exclusive(lba, blocks):
        stored = device.read_extent(lba, blocks, from_medium=False)
        merged = (int.from_bytes(stored, "big") | int.from_bytes(data, "big")).to_bytes(
            len(stored), "big"
        )
        device.write_extent(lba, merged, force_unit_access=bool(cdb[1] & FUA))


def compare_and_write(device: DiskDevice, task: ScsiTask) -> None:
    cdb = task.cdb
    lba, blocks = u64(cdb, 2), cdb[13]
    if blocks > min(MAX_COMPARE_AND_WRITE_BLOCKS, MAX_TRANSFER_BYTES // device.block_length // 2):
        raise invalid_field_in_cdb(13)
    length = blocks * device.block_length
    task.data_out_length = 2 * length
    device.check_range(lba, blocks)
    device.check_writable()
    if blocks == 0:
        if task.data_out is not None and len(task.data_out):
            raise invalid_field_in_cdb(13)  # data for zero blocks: the CDB is wrong
        return
    if task.data_out is None or len(task.data_out) != 2 * length:
        raise CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_INFORMATION_UNIT)
    payload = data_out(task, 2 * length)
    with device.extents.exclusive(lba, blocks):
        atomic = getattr(device.backend, "compare_and_write", None)
        if atomic is not None:
            # a store shared by several targets (RBD gateways) compares and writes in one
            # operation, so no other gateway's write can come between the two
            _atomic_compare_and_write(device, lba, atomic, payload, length, bool(cdb[1] & FUA))
            return
        stored = device.read_extent(lba, blocks, from_medium=False)
        _compare(device, lba, payload[:length], stored)
        device.write_extent(lba, payload[length:], force_unit_access=bool(cdb[1] & FUA))


def _atomic_compare_and_write(device: DiskDevice, lba: int, atomic, payload, length: int,
                              fua: bool) -> None:
    try:
        mismatch = atomic(lba * device.block_length, payload[:length], payload[length:])
        if mismatch is None and (fua or not device.mode_pages.write_cache_enabled):
            device.backend.flush()
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            raise invalid_field_in_cdb(13) from None   # a range the store cannot do at once
        raise _write_failure(device.lun_number, lba, exc) from None
    if mismatch is not None:
        raise CheckCondition(SenseKey.MISCOMPARE, Asc.MISCOMPARE_DURING_VERIFY, info=mismatch)


def write_atomic(device: DiskDevice, task: ScsiTask) -> None:
    """WRITE ATOMIC(16) (SBC-4 5.48): every block or none, as seen by any other command."""
    cdb = task.cdb
    lba, boundary, blocks = u64(cdb, 2), u16(cdb, 10), u16(cdb, 12)
    task.data_out_length = blocks * device.block_length
    if boundary:  # MAXIMUM ATOMIC BOUNDARY SIZE is 0: no boundaries
        raise invalid_field_in_cdb(10)
    device.check_range(lba, blocks)
    if blocks > device.max_atomic_blocks:
        raise invalid_field_in_cdb(12)
    alignment = device.atomic_alignment_blocks
    if alignment and lba % alignment:
        raise invalid_field_in_cdb(2)          # ATOMIC ALIGNMENT of the Block Limits page
    device.check_writable()
    if blocks == 0:
        return
    data = data_out(task, blocks * device.block_length)
    with device.extents.exclusive(lba, blocks):
        try:
            # Durable when it returns, so FUA and the write cache setting change nothing.
            device.atomic_journal.write(device.backend, lba * device.block_length, data)
        except OSError as exc:
            raise _write_failure(device.lun_number, lba, exc) from None


def write_same(device: DiskDevice, task: ScsiTask) -> None:
    cdb = task.cdb
    if cdb[0] == Opcode.WRITE_SAME_10:
        lba, blocks = u32(cdb, 2), u16(cdb, 7)
    else:
        lba, blocks = u64(cdb, 2), u32(cdb, 10)
    flags = cdb[1]
    if flags & 0x10:  # ANCHOR needs logical block provisioning
        raise invalid_field_in_cdb(1, 4)

    if flags & 0x04 or flags & 0x02:  # PBDATA / LBDATA: no protection information
        raise invalid_field_in_cdb(1, 2 if flags & 0x04 else 1)
    if blocks == 0:
        device.check_range(lba, 0)
        blocks = device.block_count - lba
    if blocks > device.max_write_same_blocks:
        raise invalid_field_in_cdb(7 if cdb[0] == Opcode.WRITE_SAME_10 else 10)
    device.check_range(lba, blocks)
    device.check_writable()
    if flags & 0x08 and not device.thin:  # UNMAP without provisioning (LBPWS=0)
        raise invalid_field_in_cdb(1, 3)
    bl = device.block_length
    no_data_out = cdb[0] == Opcode.WRITE_SAME_16 and flags & 0x01  # NDOB
    task.data_out_length = 0 if no_data_out else bl
    if no_data_out:
        pattern = bytes(bl)
    else:
        if task.data_out is None or len(task.data_out) != bl:
            raise CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_INFORMATION_UNIT)
        pattern = bytes(task.data_out[:bl])
    if blocks == 0:
        return
    if flags & 0x08:
        # SBC-3 5.45: with UNMAP set the device server unmaps (the blocks then read as
        # zeros, LBPRZ) rather than writing the Data-Out block.
        device.unmap_blocks(lba, blocks)
        return
    per_chunk = max(1, WRITE_SAME_CHUNK_BYTES // bl)
    chunk = pattern * min(per_chunk, blocks)
    done = 0
    while done < blocks:
        count = min(per_chunk, blocks - done)
        device.write_blocks(lba + done, memoryview(chunk)[: count * bl], force_unit_access=False)
        done += count


UNMAP_HEADER = 8
UNMAP_DESCRIPTOR = 16


def unmap(device: DiskDevice, task: ScsiTask) -> None:
    """UNMAP (SBC-3 5.28): deallocate every range of the parameter list."""
    length = u16(task.cdb, 7)
    task.data_out_length = length
    device.check_writable()
    if length == 0:
        return
    if length < UNMAP_HEADER:
        raise CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.PARAMETER_LIST_LENGTH_ERROR)
    data = spc.parameter_list(task, length)
    descriptors_length = min(u16(data, 2), length - UNMAP_HEADER)
    count = descriptors_length // UNMAP_DESCRIPTOR
    if count > MAX_UNMAP_DESCRIPTORS:
        raise CheckCondition(
            SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_PARAMETER_LIST, field_pointer=2, cd=False
        )
    ranges = []
    total = 0
    for index in range(count):
        offset = UNMAP_HEADER + index * UNMAP_DESCRIPTOR
        lba, blocks = u64(data, offset), u32(data, offset + 8)
        device.check_range(lba, blocks)
        total += blocks
        ranges.append((lba, blocks))
    if total > MAX_UNMAP_BLOCKS:
        raise CheckCondition(
            SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_PARAMETER_LIST, field_pointer=16, cd=False
        )
    for lba, blocks in ranges:
        if blocks:
            device.unmap_blocks(lba, blocks)


def synchronize_cache(device: DiskDevice, task: ScsiTask) -> None:
    cdb = task.cdb
    if cdb[0] == Opcode.SYNCHRONIZE_CACHE_10:
        lba, blocks = u32(cdb, 2), u16(cdb, 7)
    else:
        lba, blocks = u64(cdb, 2), u32(cdb, 10)
    device.check_range(lba, blocks)
    # IMMED: flushing before GOOD is still allowed (and safer).
    if not device.read_only:
        device.sync(lba)


def pre_fetch(device: DiskDevice, task: ScsiTask) -> None:
    cdb = task.cdb
    if cdb[0] == Opcode.PRE_FETCH_10:
        lba, blocks = u32(cdb, 2), u16(cdb, 7)
    else:
        lba, blocks = u64(cdb, 2), u32(cdb, 10)
    device.check_range(lba, blocks)
    # Nothing is held back for later: the page cache does read-ahead by itself.


def read_capacity_10(device: DiskDevice, task: ScsiTask) -> None:
    cdb = task.cdb
    if not cdb[8] & 0x01 and u32(cdb, 2):
        raise invalid_field_in_cdb(2)  # LBA without PMI
    last = min(device.block_count - 1, 0xFFFFFFFF)
    task.data_in = struct.pack(">II", last, device.block_length)


def read_capacity_16(device: DiskDevice, task: ScsiTask) -> None:
    cdb = task.cdb
    if not cdb[14] & 0x01 and u64(cdb, 2):
        raise invalid_field_in_cdb(2)
    allocation_length = u32(cdb, 10)
    data = bytearray(32)
    struct.pack_into(">QI", data, 0, device.block_count - 1, device.block_length)
    data[13:16] = device.provisioning.read_capacity_16_bytes()
    spc.respond(task, bytes(data), allocation_length)


def get_lba_status(device: DiskDevice, task: ScsiTask) -> None:
    cdb = task.cdb
    lba = u64(cdb, 2)
    allocation_length = u32(cdb, 10)
    if lba >= device.block_count:
        raise CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE)
    # One descriptor: the extent starting at LBA that shares its provisioning status.
    bl = device.block_length
    remaining = min(device.block_count - lba, 0xFFFFFFFF)
    mapped, extent = True, remaining * bl
    if device.thin:
        try:
            mapped, extent = device.backend.allocation(lba * bl, remaining * bl)
        except OSError as exc:
            raise CheckCondition(SenseKey.MEDIUM_ERROR, Asc.UNRECOVERED_READ_ERROR, info=lba) from exc
    # A block is deallocated only when all of it is; a partly mapped block is mapped.
    blocks = -(-extent // bl) if mapped else extent // bl
    if blocks == 0:
        mapped, blocks = True, 1
    descriptor = struct.pack(">QIB3x", lba, min(blocks, remaining), 0 if mapped else 1)
    data = struct.pack(">I4x", 4 + len(descriptor)) + descriptor
    spc.respond(task, data, allocation_length)


def start_stop_unit(device: DiskDevice, task: ScsiTask) -> None:
    cdb = task.cdb
    power_condition = cdb[4] >> 4
    start = bool(cdb[4] & 0x01)
    load_eject = bool(cdb[4] & 0x02)
    no_flush = bool(cdb[4] & 0x04)
    if power_condition:
        return  # START and LOEJ are ignored; power use is not modelled
    if not start and not no_flush and not device.read_only:
        device.sync(0)
    device.medium.start_stop(start, load_eject)


def prevent_allow_medium_removal(device: DiskDevice, task: ScsiTask) -> None:
    device.medium.set_prevent(task.nexus, bool(task.cdb[4] & 0x01))


def report_luns(device: DiskDevice, task: ScsiTask) -> None:
    spc.execute_report_luns(task, device.lun_numbers())


def persistent_reserve_in(device: DiskDevice, task: ScsiTask) -> None:
    device.reservations.persistent_reserve_in(task)


def persistent_reserve_out(device: DiskDevice, task: ScsiTask) -> None:
    transaction = getattr(device._pr_state, "transaction", None)
    if transaction is None:
        device.reservations.persistent_reserve_out(task)
        return
    # Shared by several gateways: one PR OUT at a time in the cluster, on the latest state.
    try:
        with transaction(device.reservations):
            device.reservations.persistent_reserve_out(task)
    except TimeoutError:
        task.status = ScsiStatus.BUSY     # another gateway holds the lock: try again
    except OSError as exc:
        log.error("LUN%d: reservations in the cluster: %s", device.lun_number, exc)
        raise CheckCondition(SenseKey.HARDWARE_ERROR, Asc.INTERNAL_TARGET_FAILURE) from None


def reserve(device: DiskDevice, task: ScsiTask) -> None:
    if task.cdb[0] == Opcode.RESERVE_6:
        device.reservations.reserve6(task)
    else:
        device.reservations.reserve10(task)


def release(device: DiskDevice, task: ScsiTask) -> None:
    if task.cdb[0] == Opcode.RELEASE_6:
        device.reservations.release6(task)
    else:
        device.reservations.release10(task)


def read_defect_data(device: DiskDevice, task: ScsiTask) -> None:
    cdb = task.cdb
    lists = cdb[2] & 0x18
    list_format = cdb[2] & 0x07
    if cdb[0] == Opcode.READ_DEFECT_DATA_10:
        allocation_length = u16(cdb, 7)
        data = struct.pack(">xBH", lists | list_format, 0)
    else:
        allocation_length = u32(cdb, 6)
        data = struct.pack(">xBxxI", lists | list_format, 0)
    spc.respond(task, data, allocation_length)


# --- the opcode table ---------------------------------------------------------------------

_IN, _OUT, _NONE = DataDirection.IN, DataDirection.OUT, DataDirection.NONE


def _spec(
    opcode: int,
    name: str,
    handler: Any,
    direction: DataDirection,
    fields: tuple[tuple[int, int], ...],
    service_action: int | None = None,
    **flags: bool,
) -> CommandSpec:
    extra = ((1, service_action),) if service_action is not None else ()
    return CommandSpec(
        opcode=opcode,
        service_action=service_action,
        name=name,
        handler=handler,
        direction=direction,
        usage=usage_mask(opcode, *fields, *extra),
        **flags,
    )


_LBA10 = ((2, 0xFF), (3, 0xFF), (4, 0xFF), (5, 0xFF))
_LBA16 = tuple((i, 0xFF) for i in range(2, 10))
_LEN10 = ((7, 0xFF), (8, 0xFF))
_LEN12 = tuple((i, 0xFF) for i in range(6, 10))
_LEN16 = tuple((i, 0xFF) for i in range(10, 14))
_GROUP10 = ((6, 0x1F),)
_GROUP12 = ((10, 0x1F),)
_GROUP16 = ((14, 0x1F),)
_RW_FLAGS = ((1, DPO | FUA | FUA_NV),)
_MEDIUM = {"medium_access": True}

_PR_IN_FIELDS = ((7, 0xFF), (8, 0xFF))
_PR_OUT_FIELDS = ((2, 0xFF), (5, 0xFF), (6, 0xFF), (7, 0xFF), (8, 0xFF))
_PR_IN_ACTIONS = ("READ KEYS", "READ RESERVATION", "REPORT CAPABILITIES", "READ FULL STATUS")
_PR_OUT_ACTIONS = ("REGISTER", "RESERVE", "RELEASE", "CLEAR", "PREEMPT", "PREEMPT AND ABORT",
                   "REGISTER AND IGNORE EXISTING KEY", "REGISTER AND MOVE")

_RESERVATION_COMMANDS = [
    *(_spec(Opcode.PERSISTENT_RESERVE_IN, f"PERSISTENT RESERVE IN ({name})",
            persistent_reserve_in, _IN, _PR_IN_FIELDS, service_action=sa)
      for sa, name in enumerate(_PR_IN_ACTIONS)),
    *(_spec(Opcode.PERSISTENT_RESERVE_OUT, f"PERSISTENT RESERVE OUT ({name})",
            persistent_reserve_out, _OUT, _PR_OUT_FIELDS, service_action=sa)
      for sa, name in enumerate(_PR_OUT_ACTIONS)),
    _spec(Opcode.RESERVE_6, "RESERVE(6)", reserve, _NONE, ()),
    _spec(Opcode.RELEASE_6, "RELEASE(6)", release, _NONE, ()),
    _spec(Opcode.RESERVE_10, "RESERVE(10)", reserve, _NONE, ()),
    _spec(Opcode.RELEASE_10, "RELEASE(10)", release, _NONE, ()),
]

def _sanitize_spec(action: int, name: str) -> CommandSpec:
    return _spec(Opcode.SANITIZE, f"SANITIZE ({name})", sanitize.sanitize,
                 _NONE if action != sanitize.OVERWRITE else _OUT,
                 ((1, sanitize.IMMED | sanitize.AUSE), (7, 0xFF), (8, 0xFF)),
                 service_action=action, **_MEDIUM)


DISK_COMMANDS = CommandTable(
    [
        *_RESERVATION_COMMANDS,
        _sanitize_spec(sanitize.OVERWRITE, "OVERWRITE"),
        _sanitize_spec(sanitize.CRYPTOGRAPHIC_ERASE, "CRYPTOGRAPHIC ERASE"),
        _sanitize_spec(sanitize.EXIT_FAILURE_MODE, "EXIT FAILURE MODE"),
        *alua.COMMANDS,
        _spec(Opcode.TEST_UNIT_READY, "TEST UNIT READY", spc.test_unit_ready, _NONE, (), **_MEDIUM),
        _spec(
            Opcode.REQUEST_SENSE, "REQUEST SENSE", spc.request_sense, _IN,
            ((1, 0x01), (4, 0xFF)), allowed_offline=True,
        ),
        _spec(
            Opcode.READ_6, "READ(6)", read, _IN,
            ((1, 0x1F), (2, 0xFF), (3, 0xFF), (4, 0xFF)), **_MEDIUM,
        ),
        _spec(
            Opcode.WRITE_6, "WRITE(6)", write, _OUT,
            ((1, 0x1F), (2, 0xFF), (3, 0xFF), (4, 0xFF)), **_MEDIUM,
        ),
        _spec(
            Opcode.INQUIRY, "INQUIRY", spc.inquiry, _IN,
            ((1, 0x01), (2, 0xFF), (3, 0xFF), (4, 0xFF)),
            allowed_offline=True,
        ),
        _spec(Opcode.MODE_SELECT_6, "MODE SELECT(6)", spc.mode_select, _OUT, ((1, 0x11), (4, 0xFF))),
        _spec(
            Opcode.MODE_SENSE_6, "MODE SENSE(6)", spc.mode_sense, _IN,
            ((1, 0x08), (2, 0xFF), (3, 0xFF), (4, 0xFF)),
        ),
        _spec(
            Opcode.START_STOP_UNIT, "START STOP UNIT", start_stop_unit, _NONE,
            ((1, 0x01), (3, 0x0F), (4, 0xF7)),
        ),
        _spec(
            Opcode.PREVENT_ALLOW_MEDIUM_REMOVAL, "PREVENT ALLOW MEDIUM REMOVAL",
            prevent_allow_medium_removal, _NONE, ((4, 0x03),),
        ),
        _spec(
            Opcode.READ_CAPACITY_10, "READ CAPACITY(10)", read_capacity_10, _IN,
            (*_LBA10, (8, 0x01)), **_MEDIUM,
        ),
        _spec(Opcode.READ_10, "READ(10)", read, _IN, (*_RW_FLAGS, *_LBA10, *_GROUP10, *_LEN10), **_MEDIUM),
        _spec(Opcode.WRITE_10, "WRITE(10)", write, _OUT, (*_RW_FLAGS, *_LBA10, *_GROUP10, *_LEN10), **_MEDIUM),
        _spec(
            Opcode.WRITE_AND_VERIFY_10, "WRITE AND VERIFY(10)", write_and_verify, _OUT,
            ((1, DPO | 0x06), *_LBA10, *_GROUP10, *_LEN10), **_MEDIUM,
        ),
        _spec(
            Opcode.VERIFY_10, "VERIFY(10)", verify, _OUT,
            ((1, DPO | 0x06), *_LBA10, *_GROUP10, *_LEN10), **_MEDIUM,
        ),
        _spec(
            Opcode.PRE_FETCH_10, "PRE-FETCH(10)", pre_fetch, _NONE,
            ((1, 0x02), *_LBA10, *_GROUP10, *_LEN10), **_MEDIUM,
        ),
        _spec(
            Opcode.SYNCHRONIZE_CACHE_10, "SYNCHRONIZE CACHE(10)", synchronize_cache, _NONE,
            ((1, 0x06), *_LBA10, *_GROUP10, *_LEN10), **_MEDIUM,
        ),
        _spec(
            Opcode.READ_DEFECT_DATA_10, "READ DEFECT DATA(10)", read_defect_data, _IN,
            ((2, 0x1F), *_LEN10),
        ),
        _spec(
            Opcode.WRITE_SAME_10, "WRITE SAME(10)", write_same, _OUT,
            ((1, 0x08), *_LBA10, *_GROUP10, *_LEN10), **_MEDIUM,
        ),
        _spec(
            Opcode.MODE_SELECT_10, "MODE SELECT(10)", spc.mode_select, _OUT,
            ((1, 0x11), (7, 0xFF), (8, 0xFF)),
        ),
        _spec(
            Opcode.MODE_SENSE_10, "MODE SENSE(10)", spc.mode_sense, _IN,
            ((1, 0x18), (2, 0xFF), (3, 0xFF), (7, 0xFF), (8, 0xFF)),
        ),
        _spec(Opcode.READ_16, "READ(16)", read, _IN, (*_RW_FLAGS, *_LBA16, *_LEN16, *_GROUP16), **_MEDIUM),
        _spec(
            Opcode.COMPARE_AND_WRITE, "COMPARE AND WRITE", compare_and_write, _OUT,
            (*_RW_FLAGS, *_LBA16, (13, 0xFF), *_GROUP16), **_MEDIUM,
        ),
        _spec(Opcode.WRITE_16, "WRITE(16)", write, _OUT, (*_RW_FLAGS, *_LBA16, *_LEN16, *_GROUP16), **_MEDIUM),
        _spec(Opcode.ORWRITE_16, "ORWRITE(16)", orwrite, _OUT, (*_RW_FLAGS, *_LBA16, *_LEN16, *_GROUP16), **_MEDIUM),
        _spec(
            Opcode.WRITE_AND_VERIFY_16, "WRITE AND VERIFY(16)", write_and_verify, _OUT,
            ((1, DPO | 0x06), *_LBA16, *_LEN16, *_GROUP16), **_MEDIUM,
        ),
        _spec(
            Opcode.VERIFY_16, "VERIFY(16)", verify, _OUT,
            ((1, DPO | 0x06), *_LBA16, *_LEN16, *_GROUP16), **_MEDIUM,
        ),
        _spec(
            Opcode.PRE_FETCH_16, "PRE-FETCH(16)", pre_fetch, _NONE,
            ((1, 0x02), *_LBA16, *_LEN16, *_GROUP16), **_MEDIUM,
        ),
        _spec(
            Opcode.SYNCHRONIZE_CACHE_16, "SYNCHRONIZE CACHE(16)", synchronize_cache, _NONE,
            ((1, 0x06), *_LBA16, *_LEN16, *_GROUP16), **_MEDIUM,
        ),
        _spec(
            Opcode.WRITE_SAME_16, "WRITE SAME(16)", write_same, _OUT,
            ((1, 0x09), *_LBA16, *_LEN16, *_GROUP16), **_MEDIUM,
        ),
        _spec(
            Opcode.SERVICE_ACTION_IN_16, "READ CAPACITY(16)", read_capacity_16, _IN,
            (*_LBA16, *_LEN16, (14, 0x01)), service_action=0x10, **_MEDIUM,
        ),
        _spec(
            Opcode.SERVICE_ACTION_IN_16, "GET LBA STATUS", get_lba_status, _IN,
            (*_LBA16, *_LEN16), service_action=0x12, **_MEDIUM,
        ),
        _spec(
            Opcode.REPORT_LUNS, "REPORT LUNS", report_luns, _IN,
            ((2, 0xFF), *_LEN12), allowed_offline=True,
        ),
        _spec(
            Opcode.MAINTENANCE_IN, "REPORT SUPPORTED OPERATION CODES",
            spc.report_supported_operation_codes, _IN,
            ((2, 0x87), (3, 0xFF), (4, 0xFF), (5, 0xFF), *_LEN12), service_action=0x0C,
        ),
        _spec(
            Opcode.MAINTENANCE_IN, "REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS",
            spc.report_supported_task_management_functions, _IN,
            ((2, 0x80), *_LEN12), service_action=0x0D,
        ),
        _spec(Opcode.READ_12, "READ(12)", read, _IN, (*_RW_FLAGS, *_LBA10, *_LEN12, *_GROUP12), **_MEDIUM),
        _spec(Opcode.WRITE_12, "WRITE(12)", write, _OUT, (*_RW_FLAGS, *_LBA10, *_LEN12, *_GROUP12), **_MEDIUM),
        _spec(
            Opcode.WRITE_AND_VERIFY_12, "WRITE AND VERIFY(12)", write_and_verify, _OUT,
            ((1, DPO | 0x06), *_LBA10, *_LEN12, *_GROUP12), **_MEDIUM,
        ),
        _spec(
            Opcode.VERIFY_12, "VERIFY(12)", verify, _OUT,
            ((1, DPO | 0x06), *_LBA10, *_LEN12, *_GROUP12), **_MEDIUM,
        ),
        _spec(
            Opcode.EXTENDED_COPY, "EXTENDED COPY(LID1)", xcopy.extended_copy, _OUT,
            _LEN16, service_action=0x00,
        ),
        *(_spec(Opcode.RECEIVE_COPY_RESULTS, f"RECEIVE COPY RESULTS ({name})",
                xcopy.receive_copy_results, _IN, ((2, 0xFF), *_LEN16), service_action=sa)
          for sa, name in ((0x00, "COPY STATUS"), (0x03, "OPERATING PARAMETERS"),
                           (0x04, "FAILED SEGMENT DETAILS"))),
        _spec(
            Opcode.READ_DEFECT_DATA_12, "READ DEFECT DATA(12)", read_defect_data, _IN,
            ((2, 0x1F), *_LEN12),
        ),
    ]
)

# A LUN whose backend can deallocate blocks also takes UNMAP (ANCHOR is not supported)
# and SANITIZE BLOCK ERASE (deallocation is what erases a block of a file).
_THIN_ONLY = (
    _spec(Opcode.UNMAP, "UNMAP", unmap, _OUT, (*_GROUP10, *_LEN10), **_MEDIUM),
    _sanitize_spec(sanitize.BLOCK_ERASE, "BLOCK ERASE"),
)
# Only with an atomic write journal (a StateDirectory to keep it in).
_ATOMIC_ONLY = (
    _spec(
        Opcode.WRITE_ATOMIC_16, "WRITE ATOMIC(16)", write_atomic, _OUT,
        ((1, DPO | FUA), *_LBA16, (10, 0xFF), (11, 0xFF), (12, 0xFF), (13, 0xFF), *_GROUP16),
        **_MEDIUM,
    ),
)


@functools.cache
def command_table(thin: bool, atomic: bool) -> CommandTable:
    return CommandTable([*DISK_COMMANDS.specs, *(_THIN_ONLY if thin else ()),
                         *(_ATOMIC_ONLY if atomic else ())])


THIN_DISK_COMMANDS = command_table(thin=True, atomic=False)
