"""SANITIZE (SBC-4 5.30, 4.11): OVERWRITE, BLOCK ERASE, CRYPTOGRAPHIC ERASE and EXIT
FAILURE MODE on a file or block device, and the restrictions around them.

A backing file has no encryption key to throw away and no erase blocks: BLOCK ERASE
deallocates every block (offered only on thin LUNs, whose deallocated blocks read as zeros),
and CRYPTOGRAPHIC ERASE deallocates them too, or overwrites them with zeros on a fully
provisioned LUN. Either way the old data is gone from the store, and flushed, before the
operation counts as done.

The operation runs on a thread of its own, so neither task management nor the end of the
session stops it (SBC-4: a sanitize operation survives resets). While it runs, every command
but INQUIRY, REPORT LUNS and REQUEST SENSE ends in NOT READY, SANITIZE IN PROGRESS with the
progress indication; after it failed, medium access ends in MEDIUM ERROR, SANITIZE COMMAND
FAILED until a sanitize succeeds or EXIT FAILURE MODE (allowed when the failed command had
AUSE set) ends the failure mode.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from istgt.scsi.command import ScsiTask, u16
from istgt.scsi.constants import Asc, Opcode, SenseKey
from istgt.scsi.sense import CheckCondition, invalid_field_in_cdb, invalid_field_in_parameter_list

log = logging.getLogger(__name__)

OVERWRITE = 0x01
BLOCK_ERASE = 0x02
CRYPTOGRAPHIC_ERASE = 0x03
EXIT_FAILURE_MODE = 0x1F

IMMED = 0x80
AUSE = 0x20
OVERWRITE_HEADER = 4
CHUNK_BYTES = 1024 * 1024
PROGRESS_SCALE = 0x10000

# Commands served while a sanitize operation runs (SBC-4 4.11.3).
ALLOWED_DURING = frozenset({Opcode.INQUIRY, Opcode.REPORT_LUNS, Opcode.REQUEST_SENSE})


class SanitizeState:
    """Whether a sanitize operation runs on this LUN, how far it got, and whether the last
    one failed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None   # guarded by _lock
        self._done_blocks = 0                          # guarded by _lock
        self._total_blocks = 1                         # guarded by _lock
        self._failed = False                           # guarded by _lock
        self._failed_with_ause = False                 # guarded by _lock

    @property
    def running(self) -> bool:
        with self._lock:
            return self._thread is not None

    def progress(self) -> int:
        with self._lock:
            return min(PROGRESS_SCALE - 1, self._done_blocks * PROGRESS_SCALE // self._total_blocks)

    def refusal(self, opcode: int, medium_access: bool) -> CheckCondition | None:
        """The CHECK CONDITION a command gets now, or None when it may run."""
        # Read without the lock (every command asks): a command racing the start of a
        # sanitize is let through, and the operation's extent lock then waits for it.
        running, failed = self._thread is not None, self._failed
        if running and opcode not in ALLOWED_DURING:
            return self.in_progress()
        if failed and medium_access and opcode != Opcode.SANITIZE:
            return CheckCondition(SenseKey.MEDIUM_ERROR, Asc.SANITIZE_COMMAND_FAILED)
        return None

    def in_progress(self) -> CheckCondition:
        return CheckCondition(SenseKey.NOT_READY, Asc.LOGICAL_UNIT_NOT_READY_SANITIZE_IN_PROGRESS,
                              progress=self.progress())

    def exit_failure_mode(self) -> None:
        with self._lock:
            if self._failed and not self._failed_with_ause:
                raise invalid_field_in_cdb(1, 4)
            self._failed = False

    def start(self, operation: Any, total_blocks: int, allow_unrestricted_exit: bool) -> threading.Thread:
        """Run `operation(report)` on its own thread; `report(blocks_done)` updates progress."""
        with self._lock:
            if self._thread is not None:
                raise self.in_progress()
            self._done_blocks, self._total_blocks = 0, max(total_blocks, 1)
            thread = threading.Thread(target=self._run, name="sanitize", daemon=True,
                                      args=(operation, allow_unrestricted_exit))
            self._thread = thread
            thread.start()     # under the lock: wait() never sees a thread not yet started
        return thread

    def _report(self, blocks_done: int) -> None:
        with self._lock:
            self._done_blocks = blocks_done

    def _run(self, operation: Any, allow_unrestricted_exit: bool) -> None:
        failed = False
        try:
            operation(self._report)
        except Exception:
            log.exception("sanitize operation failed")
            failed = True
        with self._lock:
            self._failed = failed
            self._failed_with_ause = failed and allow_unrestricted_exit
            self._thread = None

    def outcome(self) -> None:
        """After the operation's thread ended: CHECK CONDITION when it failed."""
        with self._lock:
            failed = self._failed
        if failed:
            raise CheckCondition(SenseKey.MEDIUM_ERROR, Asc.SANITIZE_COMMAND_FAILED)

    def wait(self) -> None:
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join()


def _overwrite_pattern(parameters: memoryview | bytes, block_length: int) -> tuple[bytes, int, bool]:
    """(one block of pattern, pass count, invert between passes) from the parameter list."""
    flags = parameters[0]
    invert, test, passes = bool(flags & 0x80), (flags >> 4) & 0x03, flags & 0x0F
    if flags & 0x40 or parameters[1]:
        raise invalid_field_in_parameter_list(0 if flags & 0x40 else 1)
    if test:  # the TEST field is for vendor tests of the sanitize machinery
        raise invalid_field_in_parameter_list(0, 5)
    if passes == 0:
        raise invalid_field_in_parameter_list(0, 3)
    pattern_length = u16(parameters, 2)
    if pattern_length == 0 or pattern_length > block_length \
            or pattern_length > len(parameters) - OVERWRITE_HEADER:
        raise invalid_field_in_parameter_list(2)
    pattern = bytes(parameters[OVERWRITE_HEADER:OVERWRITE_HEADER + pattern_length])
    block = (pattern * (block_length // pattern_length + 1))[:block_length]
    return block, passes, invert


def sanitize(device: Any, task: ScsiTask) -> None:
    cdb = task.cdb
    action = cdb[1] & 0x1F
    immediate = bool(cdb[1] & IMMED)
    length = u16(cdb, 7)
    task.data_out_length = length
    if action == OVERWRITE:
        if not OVERWRITE_HEADER < length <= device.block_length + OVERWRITE_HEADER:
            raise invalid_field_in_cdb(7)
    elif length:
        raise invalid_field_in_cdb(7)  # the other service actions take no parameter list
    device.check_writable()
    if action == EXIT_FAILURE_MODE:
        device.sanitizing.exit_failure_mode()
        return
    if action == OVERWRITE:
        if task.data_out is None or len(task.data_out) < length:
            raise CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.PARAMETER_LIST_LENGTH_ERROR)
        pattern, passes, invert = _overwrite_pattern(task.data_out[:length], device.block_length)
        operation = _overwrite(device, pattern, passes, invert)
    else:
        operation = _erase(device)
    thread = device.sanitizing.start(operation, device.block_count,
                                     allow_unrestricted_exit=bool(cdb[1] & AUSE))
    if immediate:
        return
    thread.join()
    device.sanitizing.outcome()


def _overwrite(device: Any, pattern: bytes, passes: int, invert: bool) -> Any:
    inverted = bytes(b ^ 0xFF for b in pattern)

    def run(report: Any) -> None:
        bl = device.block_length
        per_chunk = max(1, CHUNK_BYTES // bl)
        total = device.block_count
        with device.extents.exclusive(0, total):
            for number in range(passes):
                block = inverted if invert and number % 2 else pattern
                chunk = block * min(per_chunk, total)
                lba = 0
                while lba < total:
                    count = min(per_chunk, total - lba)
                    device.backend.write(lba * bl, memoryview(chunk)[:count * bl])
                    lba += count
                    report((number * total + lba) // passes)
            device.backend.flush()

    return run


def _erase(device: Any) -> Any:
    def run(report: Any) -> None:
        bl = device.block_length
        total = device.block_count
        with device.extents.exclusive(0, total):
            if device.thin:
                device.backend.unmap(0, total * bl)
            else:
                device.backend.write_zeroes(0, total * bl)
            device.backend.flush()
        report(total)

    return run
