"""Pass-through LUs (UnitType Pass, `LUNn Device <path>`): a real SCSI disk, tape, CD/DVD
drive or medium changer exported as it is, through Linux SG_IO.

The CDB, the data, the status, the sense and the residual go through as the device gives
them. What belongs to the target stays the target's (istgt's CAM pass-through sent even
these to the device, which sees one host for every initiator):

- unit attentions of each I_T nexus (power-on for a new nexus, resets, reservation events);
- persistent reservations and RESERVE/RELEASE, emulated per I_T nexus and enforced before a
  command reaches the device;
- INQUIRY VPD page 83h gets the target port designators (relative target port, target port
  group, target port name) after the device's own;
- Block Limits (VPD B0h) says no more than the device's maximum transfer; longer READ and
  WRITE commands on a disk are split (SBC lets a disk do them in pieces);
- LOGICAL UNIT RESET reaches the device as SG_SCSI_RESET; a device that is gone answers
  NOT READY, and the daemon and the other LUs carry on.

REPORT LUNS is answered by the LogicalUnit for every unit type.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import struct
import threading
import time
from typing import Any

from istgt.scsi import alua, pr, spc
from istgt.scsi.attentions import NexusAttentions
from istgt.scsi.command import ITNexus, ScsiTask, u16, u32
from istgt.scsi.constants import Asc, Opcode, ScsiStatus, SenseKey
from istgt.scsi.sense import CheckCondition, encode_sense

log = logging.getLogger(__name__)

SG_IO = 0x2285
SG_SCSI_RESET = 0x2284
SG_SCSI_RESET_DEVICE = 1
SG_SCSI_RESET_NO_ESCALATE = 0x100   # never a target, bus or host reset: other devices
SG_MAX_QUEUE = 16                   # requests the sg driver takes per open file (else EDOM)
SLOT_POLL_S = 0.05                  # how often a command waiting for a slot checks its abort
SG_DXFER_NONE, SG_DXFER_TO_DEV, SG_DXFER_FROM_DEV = -1, -2, -3
SENSE_MAX = 252
DID_OK = 0
DID_NO_CONNECT, DID_BAD_TARGET = 0x01, 0x04          # the device is not there
GONE_ERRNOS = frozenset({errno.ENODEV, errno.ENXIO})
MAX_BUFFER = 16 << 20        # a Data-In/Out buffer larger than this is refused, not allocated
REOPEN_INTERVAL_S = 1.0     # a gone device's path is tried again at most this often
DRAIN_TRIES = 8              # unit attentions a device may stack after a reset
PIECE_MAX = 1 << 20          # split pieces: what sg's indirect buffers take on any host
# ms per command class; tape motion and formatting take long
TIMEOUT_DEFAULT_MS = 60_000
TIMEOUT_LONG_MS = 4 * 3600_000
LONG_COMMANDS = frozenset({0x01, 0x04, 0x10, 0x11, 0x19, 0x1B, 0x2B, 0x35, 0x41, 0x42, 0x48,
                           0x91, 0x92, 0x93, 0x2F, 0x8F, 0x9F})
EMULATED = frozenset({Opcode.PERSISTENT_RESERVE_IN, Opcode.PERSISTENT_RESERVE_OUT, 0x16, 0x17,
                      0x56, 0x57})
READS = {0x08: 6, 0x28: 10, 0xA8: 12, 0x88: 16}
WRITES = {0x0A: 6, 0x2A: 10, 0xAA: 12, 0x8A: 16}
DISK, TAPE, CD_DVD, CHANGER = 0x00, 0x01, 0x05, 0x08
NACA, LINK = 0x04, 0x01             # control byte bits the target does not pass on
NORMACA = 0x20                      # standard INQUIRY byte 3
ASC_RESET_CLASS = 0x29              # POWER ON, RESET, OR BUS DEVICE RESET OCCURRED and kin


class SgIoHdr(ctypes.Structure):
    """struct sg_io_hdr (<scsi/sg.h>), 64-bit layout."""
    _fields_ = [
        ("interface_id", ctypes.c_int), ("dxfer_direction", ctypes.c_int),
        ("cmd_len", ctypes.c_ubyte), ("mx_sb_len", ctypes.c_ubyte),
        ("iovec_count", ctypes.c_ushort), ("dxfer_len", ctypes.c_uint),
        ("dxferp", ctypes.c_void_p), ("cmdp", ctypes.c_void_p), ("sbp", ctypes.c_void_p),
        ("timeout", ctypes.c_uint), ("flags", ctypes.c_uint), ("pack_id", ctypes.c_int),
        ("usr_ptr", ctypes.c_void_p), ("status", ctypes.c_ubyte),
        ("masked_status", ctypes.c_ubyte), ("msg_status", ctypes.c_ubyte),
        ("sb_len_wr", ctypes.c_ubyte), ("host_status", ctypes.c_ushort),
        ("driver_status", ctypes.c_ushort), ("resid", ctypes.c_int),
        ("duration", ctypes.c_uint), ("info", ctypes.c_uint),
    ]


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int


class DeviceGone(OSError):
    """The device is not there any more (removed, or no longer reachable)."""

    def __init__(self, error: int, message: str, device: "SgDevice | None" = None,
                 sent: bool = True) -> None:
        super().__init__(error, message)
        self.device = device            # the opened node that found it gone
        self.sent = sent                # the command may have reached the device


class NotSent(Exception):
    """An aborted command ended while it waited for a request slot: the device never saw it."""


class TransportTrouble(OSError):
    """SG_IO or the host adapter failed this command; the device may be fine."""

    def __init__(self, error: int, message: str, busy: bool) -> None:
        super().__init__(error, message)
        self.busy = busy            # worth retrying as it is (BUSY), else ABORTED COMMAND


def cdb_length(cdb: bytes) -> int:
    """The CDB's own length from its group code (the BHS always carries 16 bytes)."""
    if cdb[0] == 0x7F and len(cdb) > 7:
        return min(len(cdb), 8 + cdb[7])
    if len(cdb) > 16:
        return len(cdb)                     # an extended CDB from an AHS
    return min({0: 6, 1: 10, 2: 10, 4: 16, 5: 12}.get(cdb[0] >> 5, 16), len(cdb))


class SgDevice:
    """An open /dev/sgN (the sd/sr/st/sch node names are mapped to it through sysfs)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sg_name = sg_name_of(path)
        self.fd = os.open(f"/dev/{self.sg_name}", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self._init_requests()
        base = f"/sys/class/scsi_generic/{self.sg_name}/device"
        self.peripheral_type = int(_read_sysfs(f"{base}/type") or "0")
        self.max_transfer = max_transfer_bytes(base)
        self.logical_block_size = logical_block_size(base)
        self.identity = device_identity(base)

    def _init_requests(self) -> None:
        # the fd is closed only when no ioctl uses it: a number freed under a running ioctl
        # could be reused by another open, and the next ioctl would reach another file
        self._fd_lock = threading.Lock()
        self._in_flight = 0
        self._closing = False
        # initiators' commands take at most SG_MAX_QUEUE - 1 requests; the last is kept
        # for the target's own TEST UNIT READY after a reset (made under a lock)
        self._queue_slots = threading.BoundedSemaphore(SG_MAX_QUEUE - 1)

    def command(self, cdb: bytes, direction: int, buffer: bytearray | memoryview | None,
                timeout_ms: int, cancelled: Any = None,
                own: bool = False) -> tuple[int, bytes, int]:
        """(SCSI status, sense, residual); DeviceGone when the device did not answer.
        `cancelled()` is asked while the command waits for a request slot (NotSent when it
        says so); `own`: the target's command, in the slot kept for it."""
        if len(cdb) > SENSE_MAX:
            raise TransportTrouble(errno.EINVAL, f"{self.path}: a {len(cdb)}-byte CDB",
                                   busy=False)
        cdb_buffer = ctypes.create_string_buffer(bytes(cdb), len(cdb))
        sense = ctypes.create_string_buffer(SENSE_MAX)
        length = len(buffer) if buffer is not None else 0
        data = (ctypes.c_char * length).from_buffer(buffer) if length else None
        header = SgIoHdr(interface_id=ord("S"), dxfer_direction=direction if length else
                         SG_DXFER_NONE, cmd_len=len(cdb), mx_sb_len=SENSE_MAX,
                         dxfer_len=length, dxferp=ctypes.addressof(data) if data else None,
                         cmdp=ctypes.addressof(cdb_buffer), sbp=ctypes.addressof(sense),
                         timeout=timeout_ms)
        if not own:
            while not self._queue_slots.acquire(timeout=SLOT_POLL_S):
                if cancelled is not None and cancelled():
                    raise NotSent(f"{self.path}: aborted before it was sent")
        try:
            fd = self._enter()
            try:
                result = _libc.ioctl(fd, SG_IO, ctypes.byref(header))   # GIL released
            finally:
                self._leave()
        finally:
            if not own:
                self._queue_slots.release()
        del data
        if result < 0:
            error = ctypes.get_errno()
            message = f"{self.path}: SG_IO: {os.strerror(error)}"
            if error in GONE_ERRNOS:
                raise DeviceGone(error, message, self)
            raise TransportTrouble(error, message, busy=error in (errno.EINTR, errno.ENOMEM,
                                                                  errno.EAGAIN, errno.EDOM))
        if header.host_status in (DID_NO_CONNECT, DID_BAD_TARGET):
            raise DeviceGone(errno.ENODEV, f"{self.path}: host status {header.host_status}",
                             self)
        if header.host_status != DID_OK:
            raise TransportTrouble(errno.EIO, f"{self.path}: host status {header.host_status}",
                                   busy=True)
        return header.status, sense.raw[:header.sb_len_wr], header.resid

    def reset(self) -> None:
        """A LOGICAL UNIT RESET of this device alone (never escalated by the kernel)."""
        value = ctypes.c_int(SG_SCSI_RESET_DEVICE | SG_SCSI_RESET_NO_ESCALATE)
        fd = self._enter()
        try:
            failed = _libc.ioctl(fd, SG_SCSI_RESET, ctypes.byref(value)) < 0
            error = ctypes.get_errno()
        finally:
            self._leave()
        if failed:
            raise OSError(error, f"{self.path}: SG_SCSI_RESET: {os.strerror(error)}")

    def _enter(self) -> int:
        with self._fd_lock:
            if self._closing:
                raise DeviceGone(errno.ENODEV, f"{self.path}: closed, the device was gone",
                                 self, sent=False)
            self._in_flight += 1
            return self.fd

    def _leave(self) -> None:
        with self._fd_lock:
            self._in_flight -= 1
            if self._closing and not self._in_flight:
                self._close_fd()

    def close(self) -> None:
        """Close now, or when the last ioctl in progress returns."""
        with self._fd_lock:
            self._closing = True
            if not self._in_flight:
                self._close_fd()

    def _close_fd(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _read_sysfs(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def sg_name_of(path: str) -> str:
    """`sgN` for /dev/sgN, or for the sd/sr/st/nst/sch node of the same device."""
    name = os.path.basename(os.path.realpath(path))
    if name.startswith("sg"):
        return name
    for sg in sorted(os.listdir("/sys/class/scsi_generic")):
        device = os.path.realpath(f"/sys/class/scsi_generic/{sg}/device")
        for child in ("block", "scsi_tape", "scsi_changer"):
            try:
                if any(entry.lstrip("n") == name.lstrip("n") or entry == name
                       for entry in os.listdir(f"{device}/{child}")):
                    return sg
            except OSError:
                continue
    raise OSError(errno.ENODEV, f"{path}: no SCSI generic (sg) node for it")


def device_identity(device_dir: str) -> tuple:
    """What tells one device from another: INQUIRY vendor and model, and the unit serial
    number and device identification pages the kernel read at attach."""
    parts = [_read_sysfs(f"{device_dir}/{name}") for name in ("vendor", "model", "rev")]
    for page in ("vpd_pg80", "vpd_pg83"):
        try:
            with open(f"{device_dir}/{page}", "rb") as f:
                parts.append(f.read())
        except OSError:
            parts.append(None)
    return tuple(parts)


def _identifies(identity: tuple) -> bool:
    """Whether the identity tells this device from another of its model: a serial number
    that is not blank, or a device identification page with a designator."""
    serial_page, id_page = identity[3], identity[4]
    if serial_page and len(serial_page) > 4 and serial_page[4:].strip(b" \0"):
        return True
    return bool(id_page and len(id_page) >= 8 and u16(id_page, 2) >= 4)


def max_transfer_bytes(device_dir: str) -> int:
    """The most one command may move: the block queue's current limit (max_sectors_kb) for
    disks and CD/DVD, never more than PIECE_MAX, which sg's buffers take on any host."""
    kib = _block_queue_number(device_dir, "max_sectors_kb")
    return PIECE_MAX if kib is None else min(kib * 1024, PIECE_MAX)


def logical_block_size(device_dir: str) -> int:
    """From sysfs, so no READ CAPACITY of ours takes the device's unit attentions."""
    size = _block_queue_number(device_dir, "logical_block_size")
    return 512 if size is None else size


def _block_queue_number(device_dir: str, name: str) -> int | None:
    """A number from the queue of the device's block node (disks and CD/DVD have one)."""
    for block in _listdir(f"{device_dir}/block"):
        value = _read_sysfs(f"{device_dir}/block/{block}/queue/{name}")
        if value and value.isdigit():
            return int(value)
    return None


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def timeout_for(opcode: int, peripheral_type: int) -> int:
    if opcode in LONG_COMMANDS or peripheral_type in (TAPE, CHANGER) and opcode not in READS:
        return TIMEOUT_LONG_MS
    return TIMEOUT_DEFAULT_MS


class PassThroughDevice(NexusAttentions):
    """One `LUNn Device` of a Pass unit."""

    UA_EXEMPT = frozenset({Opcode.INQUIRY, Opcode.REPORT_LUNS, Opcode.REQUEST_SENSE})
    reset_unblocks_tasks = True         # LU reset: reset the device, then wait for its tasks
    served_from_page_cache = False      # commands wait on the device: workers up to QueueDepth
    one_task_per_worker = True          # ... each on its own worker, so they overlap

    def __init__(self, lu: Any, lun: Any, sg: SgDevice, open_device: Any = SgDevice) -> None:
        self.lun_number = lun.number
        self.sg = sg
        self._open_device = open_device
        self._next_reopen = 0.0
        self.path = lun.path
        self.peripheral_type = sg.peripheral_type
        self.block_length = sg.logical_block_size
        self.block_count = 0
        self.port_groups = alua.TargetPortGroups.of_unit(lu)
        self.reservations = pr.ReservationState(
            raise_ua=self._reservation_unit_attention, aptpl_supported=False,
            target_ports=self.port_groups.target_ports)
        self.abort_nexuses: Any = None
        self.abort_lun_tasks: Any = None
        self._init_attentions()
        self._swap_lock = threading.Lock()
        # a 29h attention met while the target resets the device is the target's own
        # reset, which every nexus hears of from the target: not relayed (benign races)
        self._resets_in_progress = 0
        self._reset_epoch = 0
        self._closed = False
        self._cancel_lock = threading.Lock()
        # id() of the tasks in execute(), and of those of them aborted; _cancel_lock
        self._executing: set[int] = set()
        self._cancelled: set[int] = set()
        self._drain_device_attentions()
        self._gone = False
        self._all_luns: list[int] = [lun.number]
        # a disk queues commands (the unit's QueueDepth); a tape, changer or optical drive
        # is a sequential machine: its LU's task set hands out one command at a time, in
        # task-set order (an aborted one still waiting never reaches the device)
        self.sequential = self.peripheral_type != DISK

    # --- the LogicalUnit's interface ---------------------------------------------------------

    def execute(self, task: ScsiTask) -> None:
        with self._cancel_lock:
            self._executing.add(id(task))
        try:
            self._execute(task)
        finally:
            with self._cancel_lock:
                self._executing.discard(id(task))
                self._cancelled.discard(id(task))

    def _execute(self, task: ScsiTask) -> None:
        task.status, task.sense, task.data_in = ScsiStatus.GOOD, b"", None
        try:
            self._dispatch(task)
        except NotSent:                 # aborted: nobody reads this answer
            self._answer(task, SenseKey.ABORTED_COMMAND, Asc.INTERNAL_TARGET_FAILURE)
        except CheckCondition as condition:
            task.status = ScsiStatus.CHECK_CONDITION
            task.sense = condition.encode(False)
            task.data_in = condition.data_in
        except DeviceGone as exc:
            try:
                back = self._device_gone(exc, task.nexus)
            except Exception:
                log.exception("LUN%d: reopening %s", self.lun_number, self.path)
                back = False
            if back and not exc.sent:   # it never reached a device: again (meets the power-on)
                self._execute(task)
                return
            # gone, or it may have run on the old node: the initiator decides what to redo
            self._answer(task, SenseKey.NOT_READY, Asc.LOGICAL_UNIT_NOT_READY)
        except TransportTrouble as exc:
            log.warning("LUN%d: %s", self.lun_number, exc)
            if exc.busy:
                task.status, task.sense, task.data_in = ScsiStatus.BUSY, b"", None
            else:
                self._answer(task, SenseKey.ABORTED_COMMAND, Asc.INTERNAL_TARGET_FAILURE)
        except Exception:        # a target answers every command, even when this code is wrong
            log.exception("LUN%d: internal error passing CDB %s through", self.lun_number,
                          task.cdb.hex())
            self._answer(task, SenseKey.HARDWARE_ERROR, Asc.INTERNAL_TARGET_FAILURE)

    def _device_gone(self, exc: DeviceGone, nexus: ITNexus) -> bool:
        """A command of `nexus` found the device gone: whether it is back (then the command
        runs again). The same device (by its identity) found under the path is opened
        again, and every nexus gets a power-on attention; another one found there is not
        served."""
        failed = exc.device or self.sg
        with self._swap_lock:
            if self._closed:
                return False
            if self.sg is not failed:
                return True                     # another command opened it again meanwhile
            now = time.monotonic()
            if not self._gone:
                log.error("LUN%d: %s: the device is gone", self.lun_number, exc)
                self._gone = True
                self._next_reopen = now + REOPEN_INTERVAL_S
                # the kernel frees an sg node's number only at its last close: a device
                # that comes back then gets its old node again
                failed.close()
            if now < self._next_reopen:
                return False
            self._next_reopen = now + REOPEN_INTERVAL_S
            if not _identifies(failed.identity):
                if self._next_reopen != float("inf"):
                    log.error("LUN%d: %s has no serial number or identification page: a "
                              "device back under its path could be another of its model; "
                              "reload the LU to serve it again", self.lun_number, self.path)
                self._next_reopen = float("inf")
                return False
            try:
                fresh = self._open_device(self.path)
            except OSError:
                return False
            if fresh.identity != failed.identity:
                log.error("LUN%d: %s now leads to another device (%s %s): not served; "
                          "reload the LU to export it", self.lun_number, self.path,
                          fresh.identity[0], fresh.identity[1])
                fresh.close()
                return False
            self.sg = fresh
            self._gone = False
            self._take_unit_attention(nexus, consume=False)       # known, so it hears too
            self._resets_in_progress += 1         # its power-on is the target's to tell
            self._reset_epoch += 1
            try:
                self._reset_unit_attentions(Asc.POWER_ON_RESET_OR_BUS_DEVICE_RESET)
                self._drain_device_attentions()
            finally:
                self._resets_in_progress -= 1
        log.warning("LUN%d: %s is back (%s)", self.lun_number, self.path, fresh.sg_name)
        return True

    @staticmethod
    def _answer(task: ScsiTask, key: int, asc: int) -> None:
        task.status = ScsiStatus.CHECK_CONDITION
        task.sense = encode_sense(key, asc)
        task.data_in = None

    def reset(self, kind: Any = "lun", from_peer: bool = False) -> None:
        """A LOGICAL UNIT RESET (or target reset): the reservations go, the device is
        reset, every nexus gets 29/03 (the target's reset happened even if the device's
        failed)."""
        self.reservations.reset()
        self._reset_device(announce_failure=True)

    def cancel_unsent(self, tasks: list[ScsiTask]) -> None:
        """Aborted tasks: those still waiting for a request slot end without reaching the
        device (NotSent), so only commands the device really holds count as held."""
        with self._cancel_lock:       # only those executing: an id() is reused once freed
            self._cancelled.update(id(task) for task in tasks if id(task) in self._executing)

    def end_held_commands(self) -> bool:
        """An aborted command the device still holds: SG_IO cannot abort one command, so
        the device is reset, which ends what it holds. The target's reservations are not
        the device's and stay. Whether the device took the reset."""
        return self._reset_device(announce_failure=False)

    def _reset_device(self, announce_failure: bool) -> bool:
        with self._swap_lock:            # not while a gone device's node is being closed
            self._resets_in_progress += 1
            self._reset_epoch += 1
            try:
                with self._state_lock:
                    before = {n: list(p) for n, p in self._unit_attentions.items()}
                self._reset_unit_attentions(Asc.BUS_DEVICE_RESET_FUNCTION_OCCURRED)
                try:
                    self.sg.reset()
                except OSError as exc:
                    log.warning("LUN%d: device reset failed: %s", self.lun_number, exc)
                    if not announce_failure:      # nothing was reset: as it was
                        with self._state_lock:
                            for nexus, pending in before.items():
                                if nexus in self._unit_attentions:
                                    self._unit_attentions[nexus][:] = pending
                    return False
                self._drain_device_attentions()
                return True
            finally:
                self._resets_in_progress -= 1

    def _drain_device_attentions(self) -> None:
        """Take the attentions the device holds for the target itself: those of its reset
        or power-on (every nexus hears of that from the target, once), and any other one
        (medium or capacity changed...), which is kept for every nexus."""
        for _ in range(DRAIN_TRIES):
            try:
                status, sense, _ = self.sg.command(bytes(6), SG_DXFER_NONE, None,
                                                   TIMEOUT_DEFAULT_MS, own=True)
            except OSError as exc:
                log.warning("LUN%d: TEST UNIT READY after the reset: %s", self.lun_number, exc)
                return
            if status != ScsiStatus.CHECK_CONDITION or \
                    _sense_key(sense) != SenseKey.UNIT_ATTENTION:
                return
            if _asc(sense) != ASC_RESET_CLASS:
                self._queue_unit_attention(bytes(sense))

    def nexus_lost(self, nexus: ITNexus) -> None:
        self._forget_nexus(nexus)
        self.reservations.nexus_lost(nexus)

    def set_lun_numbers(self, numbers) -> None:
        self._all_luns = list(numbers)

    def lun_numbers(self):
        return self._all_luns

    def flush(self) -> None:
        """Nothing is cached here: the device keeps its own write cache."""

    def notice_growth(self) -> None:
        """The device reports its own capacity: nothing to follow here."""

    def close(self) -> None:
        with self._swap_lock:
            self._closed = True          # a straggler's DeviceGone opens nothing more
            self.sg.close()

    # --- dispatch ------------------------------------------------------------------------------

    def _dispatch(self, task: ScsiTask) -> None:
        cdb = task.cdb
        if not cdb:
            raise CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_COMMAND_OPERATION_CODE)
        opcode = cdb[0]
        attention = self._take_unit_attention(task.nexus, consume=opcode not in self.UA_EXEMPT)
        if isinstance(attention, bytes):          # the device's own, relayed to this nexus
            task.status, task.sense = ScsiStatus.CHECK_CONDITION, attention
            return
        if attention is not None:
            raise CheckCondition(SenseKey.UNIT_ATTENTION, attention)
        if self.reservations.conflicts(task):
            task.status = ScsiStatus.RESERVATION_CONFLICT
            return
        if opcode in EMULATED:
            self._reservation_command(task)
            return
        if opcode == Opcode.REPORT_LUNS:            # the target's LUN map, not the host's
            spc.execute_report_luns(task, self._all_luns)
            return
        disk_io = self.peripheral_type == DISK and (opcode in READS or opcode in WRITES)
        if task.transfer_length > MAX_BUFFER and not disk_io:
            raise CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB)
        task.data_out_length = None       # the device decides; residuals are its own
        cdb = cdb[:cdb_length(cdb)]
        control = 1 if opcode == 0x7F else len(cdb) - 1
        if len(cdb) > control and cdb[control] & (NACA | LINK):
            # ACA would stop the device for every initiator (it sees only the target), and
            # CLEAR ACA is not offered; linked commands are obsolete (SAM-5)
            raise CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB,
                                 field_pointer=control,
                                 bit_pointer=2 if cdb[control] & NACA else 0)
        if disk_io:
            self._read_write(task, cdb)
            return
        self._pass(task, cdb, task.transfer_length)
        if opcode == Opcode.INQUIRY and task.status == ScsiStatus.GOOD and task.data_in:
            task.data_in = self._inquiry_answer(task, cdb, bytes(task.data_in))

    def _pass(self, task: ScsiTask, cdb: bytes, length: int, offset: int = 0) -> None:
        """One SG_IO with the task's data (Data-Out, or a Data-In buffer of `length`)."""
        if task.data_out is not None:
            direction = SG_DXFER_TO_DEV
            buffer = bytearray(task.data_out[offset:offset + length])
        else:
            direction = SG_DXFER_FROM_DEV
            buffer = bytearray(length)
        epoch, resetting = self._reset_epoch, self._resets_in_progress
        status, sense, residual = self.sg.command(
            cdb, direction, buffer if length else None,
            timeout_for(cdb[0], self.peripheral_type),
            cancelled=lambda: id(task) in self._cancelled)
        task.status = status
        task.sense = sense
        if status == ScsiStatus.CHECK_CONDITION and _sense_key(sense) == SenseKey.UNIT_ATTENTION:
            ours = _asc(sense) == ASC_RESET_CLASS and (
                resetting or self._resets_in_progress or self._reset_epoch != epoch)
            if not ours:
                # the device sees one initiator, the target: what it reports (medium
                # changed, capacity or mode parameters changed...) concerns every nexus
                self._queue_unit_attention(bytes(sense), except_nexus=task.nexus)
        if direction == SG_DXFER_FROM_DEV:
            task.data_in = buffer[:max(0, length - residual)]

    # --- READ and WRITE on a disk: split at the device's limit ---------------------------------

    def _read_write(self, task: ScsiTask, cdb: bytes) -> None:
        """READ/WRITE on a disk: a buffer the size the CDB asks for (the transport reports
        any difference with EDTL as a residual), split into pieces the host takes."""
        lba, blocks = _lba_and_blocks(cdb)
        block = self.sg.logical_block_size
        total = blocks * block
        writing = task.data_out is not None
        if writing:
            task.data_out_length = total
            if len(task.data_out) < total:
                # less data than the CDB writes: the device would be sent garbage
                raise CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB)
        if total > MAX_BUFFER * 16:
            raise CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB)
        if total <= self.sg.max_transfer or cdb[0] in (0x08, 0x0A):
            self._pass(task, cdb, total)
            return
        per = max(1, self.sg.max_transfer // block)
        pieces = []
        recovered = b""
        done = 0
        while done < blocks:
            count = min(per, blocks - done)
            piece = _with_lba_and_blocks(cdb, lba + done, count)
            try:
                self._pass(task, piece, count * block, offset=done * block)
            except DeviceGone as exc:
                exc.sent = exc.sent or done > 0      # earlier pieces ran: never again
                raise
            if task.status != ScsiStatus.GOOD:
                if task.status == ScsiStatus.CHECK_CONDITION and \
                        _sense_key(task.sense) == SenseKey.RECOVERED_ERROR:
                    recovered = recovered or task.sense    # done, with a note: go on
                else:
                    task.data_in = None
                    return
            if task.data_in is not None:
                pieces.append(bytes(task.data_in))
            done += count
        task.data_in = b"".join(pieces) if not writing else None
        if recovered:
            task.status, task.sense = ScsiStatus.CHECK_CONDITION, recovered
        else:
            task.status, task.sense = ScsiStatus.GOOD, b""

    # --- what the target owns ------------------------------------------------------------------

    def _inquiry_answer(self, task: ScsiTask, cdb: bytes, data: bytes) -> bytes:
        allocation = u16(cdb, 3)
        if not cdb[1] & 0x01:
            # what the data says it holds, not a device's padding up to the allocation
            # length (QEMU's scsi-hd pads, and the sg residual then says 0)
            data = data[:data[4] + 5] if len(data) > 4 else data
            if len(data) > 3 and data[3] & NORMACA:
                data = data[:3] + bytes([data[3] & ~NORMACA]) + data[4:]   # NACA is refused
            return data
        if cdb[2] == 0x83 and len(data) >= 4 and u16(data, 2) + 4 > len(data):
            # cut short by the allocation length: ask for the whole page, then add ours
            whole = bytearray(u16(data, 2) + 4)
            status, _, residual = self.sg.command(bytes([0x12, 0x01, 0x83]) +
                                                  struct.pack(">H", len(whole)) + b"\0",
                                                  SG_DXFER_FROM_DEV, whole, TIMEOUT_DEFAULT_MS)
            if status == ScsiStatus.GOOD:
                data = bytes(whole[:len(whole) - residual])
        if cdb[2] == 0x83 and len(data) >= 4:
            # the device's own designators, then the target port's (SPC-4 7.8.6)
            group = self.port_groups.group_of(task.nexus)
            body = data[4:4 + u16(data, 2)] + spc.target_port_designators(task.nexus, group)
            page = data[:2] + struct.pack(">H", len(body)) + body
            return page[:allocation]
        if len(data) >= 4:
            data = data[:u16(data, 2) + 4]
        if cdb[2] == 0xB0 and len(data) >= 12 and self.peripheral_type == DISK:
            page = bytearray(data)
            most = self.sg.max_transfer // self.sg.logical_block_size
            for offset in (8, 12):          # MAXIMUM and OPTIMAL TRANSFER LENGTH
                if not u32(page, offset) or u32(page, offset) > most:
                    struct.pack_into(">I", page, offset, most)
            return bytes(page)
        return data

    def _reservation_command(self, task: ScsiTask) -> None:
        opcode = task.cdb[0]
        if opcode == Opcode.PERSISTENT_RESERVE_IN:
            self.reservations.persistent_reserve_in(task)
        elif opcode == Opcode.PERSISTENT_RESERVE_OUT:
            self.reservations.persistent_reserve_out(task)
        elif opcode in (0x16, 0x56):
            (self.reservations.reserve6 if opcode == 0x16 else self.reservations.reserve10)(task)
        else:
            (self.reservations.release6 if opcode == 0x17 else self.reservations.release10)(task)


def _asc(sense: bytes) -> int:
    """The ADDITIONAL SENSE CODE (fixed or descriptor format), or -1."""
    index = 2 if sense[:1] and sense[0] & 0x7F >= 0x72 else 12
    return sense[index] if len(sense) > index else -1


def _sense_key(sense: bytes) -> int:
    if len(sense) < 3:
        return 0
    return (sense[1] if sense[0] & 0x7F >= 0x72 else sense[2]) & 0x0F


def _lba_and_blocks(cdb: bytes) -> tuple[int, int]:
    size = READS.get(cdb[0]) or WRITES.get(cdb[0])
    if size == 6:
        return int.from_bytes(cdb[1:4], "big") & 0x1FFFFF, cdb[4] or 256
    if size == 10:
        return u32(cdb, 2), u16(cdb, 7)
    if size == 12:
        return u32(cdb, 2), u32(cdb, 6)
    return int.from_bytes(cdb[2:10], "big"), u32(cdb, 10)


def _with_lba_and_blocks(cdb: bytes, lba: int, blocks: int) -> bytes:
    """The same READ/WRITE (10/12/16) for another LBA range, every other bit kept."""
    piece = bytearray(cdb)
    size = READS.get(cdb[0]) or WRITES.get(cdb[0])
    if size == 10:
        struct.pack_into(">I", piece, 2, lba)
        struct.pack_into(">H", piece, 7, blocks)       # byte 6, the group number, stays
    elif size == 12:
        struct.pack_into(">II", piece, 2, lba, blocks)
    else:
        struct.pack_into(">QI", piece, 2, lba, blocks)
    return bytes(piece)
