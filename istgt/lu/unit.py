"""One logical unit ([LogicalUnitN]): its LUNs, task set, workers and reset entry points."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time

from istgt.scsi import spc
from istgt.lu.queue import BATCH_HINT, QueuedTask, TaskQueue
from istgt.lu.stats import IoStats
from istgt.lu.worker import WorkerPool

log = logging.getLogger("istgt.lu")

TASK_SET_FULL = 0x28
REPORT_LUNS = 0xA0
# More workers than cores only add GIL hand-offs for a page-cache-backed file (measured).
MAX_WORKERS = max(2, os.cpu_count() or 2)
# A store behind a socket (NBD, RBD) keeps its requests in flight only with a thread each.
MAX_REMOTE_WORKERS = 64
# Quick commands run on the submitting connection's thread (no hand-off to a worker) unless
# one of them took longer than INLINE_SLOW_NS; then, for INLINE_PAUSE_NS, all go to workers,
# so a slow backing store never keeps a connection from reading its next PDUs for long.
INLINE_SLOW_NS = 2_000_000
INLINE_PAUSE_NS = 1_000_000_000
INLINE_BATCH_BYTES = 1024 * 1024
INLINE_MAX_BYTES = 128 * 1024   # larger transfers gain more from a worker's overlap (measured)
ABORT_WAIT_S = 60.0
# a real device (pass-through) holding an aborted command this long is reset: SG_IO cannot
# abort one command, and FUNCTION COMPLETE must mean the command has no further effect
DEVICE_ABORT_GRACE_S = 5.0


def _never_quick(cdb) -> bool:
    return False


def _all_page_cache(devices: dict) -> bool:
    return all(_served_from_page_cache(d) for d in devices.values())


def _sequential_luns(devices: dict) -> frozenset[int]:
    """LUNs of tapes and changers passed through: one command at a time each, in order."""
    return frozenset(lun for lun, d in devices.items() if getattr(d, "sequential", False))


def _served_from_page_cache(device) -> bool:
    own = getattr(device, "served_from_page_cache", None)        # a pass-through device
    if own is not None:
        return own
    return getattr(getattr(device, "backend", None), "served_from_page_cache", True)


class TaskStillRunning(Exception):
    """An aborted task did not end: ABORT TASK answers FUNCTION REJECTED."""


class LogicalUnit:
    def __init__(self, config, devices: dict, max_sessions: int = 32,
                 completion_batch=contextlib.nullcontext):
        self.config = config
        self.number = config.number
        self.name = config.name
        # lun number -> device; changed only by replace_luns (reload), entry by entry
        self.devices = devices
        self.queue_depth = config.queue_depth
        # QueueDepth 0: one task at a time for the whole LU (istgt's exclusive mode)
        self.exclusive = threading.Lock()
        limit = max(1, self.queue_depth) * max(1, max_sessions)
        # a real device holds each command for milliseconds: one per worker, so they overlap
        # (remote stores answer in microseconds and gain from batches: measured, qcow2 4k
        # QD32 0.53x with one per worker)
        one_each = any(getattr(d, "one_task_per_worker", False) for d in devices.values())
        self._queue = TaskQueue(limit, 1 if one_each else BATCH_HINT)
        self._queue.sequential_luns = _sequential_luns(devices)
        most = MAX_WORKERS if _all_page_cache(devices) else MAX_REMOTE_WORKERS
        workers = 1 if self.queue_depth == 0 else min(most, self.queue_depth)
        self.stats = IoStats()
        self._inline_paused_until = 0       # perf_counter_ns(); a benign race between threads
        self._pool = WorkerPool(f"LU{self.number}", self._queue, self._execute, workers,
                                completion_batch, executed=self._count)
        for device in devices.values():
            self._hook(device)
        self._pool.start()

    # ---- execution
    def submit(self, task, done) -> None:
        """Queue `task`; `done(task, aborted)` runs once, on a worker thread, when it has a
        status, or on the aborting thread when it was aborted before it started."""
        self.submit_many([(task, done)])

    def submit_many(self, items, run_here: bool = False) -> None:
        """Queue several (task, done) pairs in order, with one lock and few wake-ups.

        `run_here`: the caller's thread may execute the leading quick ones itself (a
        connection's receiver, between reading PDUs), which saves a thread hand-off each;
        the rest go to the workers first, so they start meanwhile."""
        now = time.perf_counter_ns()
        entries = [QueuedTask(t, d, t.attr, now) for t, d in items]
        here = []
        # QueueDepth 0 is excluded: there a quick command could wait on a receiver for the
        # exclusive lock behind a long command on a worker, and its connection read nothing
        if run_here and self.queue_depth and now >= self._inline_paused_until:
            quick = 0
            for entry in entries:
                task = entry.task
                device = self.devices.get(task.lun)
                if device is None or task.transfer_length > INLINE_MAX_BYTES or \
                        not getattr(device, "quick", _never_quick)(task.cdb):
                    break
                quick += 1
            if quick:
                started = self._queue.start_now(entries[:quick])
                here, entries = entries[:started], entries[started:]
        if entries:
            self._queue_entries(entries)
        if here:
            self._run_here(here, now)

    def _run_here(self, entries, since_ns: int) -> None:
        """Execute started entries on this thread, answered in batches like a worker's (a
        batch is also cut at INLINE_BATCH_BYTES so large reads are not all held at once)."""
        batch, size = [], 0
        for entry in entries:
            batch.append(entry)
            size += entry.task.transfer_length
            if len(batch) >= BATCH_HINT or size >= INLINE_BATCH_BYTES:
                self._pool.run_batch(batch, shared_thread=True)
                batch, size = [], 0
        if batch:
            self._pool.run_batch(batch, shared_thread=True)
        took = time.perf_counter_ns() - since_ns
        if took > INLINE_SLOW_NS * len(entries):
            self._inline_paused_until = since_ns + took + INLINE_PAUSE_NS

    def _queue_entries(self, entries) -> None:
        refused = self._queue.put_many(entries)
        for entry in refused:
            task = entry.task
            task.status = TASK_SET_FULL
            task.sense = b""
            task.data_in = None
            entry.done(task, False)

    def _count(self, batch, shared_thread: bool) -> None:
        # one clock reading per batch: its tasks are answered together
        self.stats.record_batch(batch, time.perf_counter_ns(), shared_thread)

    def _execute(self, task) -> None:
        if self.queue_depth == 0:
            with self.exclusive:
                self._dispatch(task)
        else:
            self._dispatch(task)

    def _dispatch(self, task) -> None:
        device = self.devices.get(task.lun)
        if device is None:
            if task.cdb[0] == REPORT_LUNS:   # REPORT LUNS works through any LUN number
                spc.execute_report_luns(task, sorted(self.devices))
            else:
                spc.no_such_lun(task)
        else:
            device.execute(task)

    # ---- task management (SAM-5 / RFC 7143 11.5)
    def abort(self, match) -> list[QueuedTask]:
        return self._abort(match)[0]

    def _abort(self, match) -> tuple[list[QueuedTask], list[QueuedTask]]:
        """(the aborted tasks, those of them still running after every wait)."""
        removed, running = self._queue.abort(lambda e: match(e.task))
        for e in removed:                # never started: nobody else will call done
            e.done(e.task, True)
        # their workers call done(task, True) when they end
        return removed + running, self._wait_aborted(running)

    def _wait_aborted(self, running: list[QueuedTask]) -> list[QueuedTask]:
        held = [e for e in running
                if getattr(self.devices.get(e.task.lun), "reset_unblocks_tasks", False)]
        for lun in {e.task.lun for e in held}:
            cancel = getattr(self.devices.get(lun), "cancel_unsent", None)
            if cancel is not None:       # not yet sent to the device: never will be
                cancel([e.task for e in held if e.task.lun == lun])
        if held:
            deadline = time.monotonic() + DEVICE_ABORT_GRACE_S
            held = [e for e in held
                    if not e.finished.wait(max(0.0, deadline - time.monotonic()))]
            for lun in sorted({e.task.lun for e in held}):
                device = self.devices.get(lun)
                if device is None:
                    continue
                log.warning("LU%d LUN%d: the device still holds an aborted command after "
                            "%.0f s: resetting it", self.number, lun, DEVICE_ABORT_GRACE_S)
                end_held = getattr(device, "end_held_commands", None)
                if end_held is not None:
                    end_held()
                else:
                    device.reset("lun")
        deadline = time.monotonic() + ABORT_WAIT_S
        unfinished = []
        for e in running:
            if not e.finished.wait(max(0.0, deadline - time.monotonic())):
                log.error("LU%d LUN%d: an aborted command is still running after %d s",
                          self.number, e.task.lun, ABORT_WAIT_S)
                unfinished.append(e)
        return unfinished

    def abort_now(self, match) -> None:
        """Abort matching tasks without waiting: running ones just lose their answer, and
        one started but not yet executed (a receiver's batch) never runs."""
        removed, _running = self._queue.abort(lambda e: match(e.task))
        for e in removed:
            e.done(e.task, True)

    def _hook(self, device) -> None:
        """Let a device abort this LU's tasks: PREEMPT AND ABORT, and a LOGICAL UNIT RESET
        another gateway of a shared image received."""
        if hasattr(device, "abort_nexuses"):
            device.abort_nexuses = self._abort_preempted
            device.abort_lun_tasks = self._abort_lun

    def _abort_lun(self, lun: int) -> None:
        self.abort_now(lambda t: t.lun == lun)

    def _abort_preempted(self, lun: int, patterns) -> None:
        """PREEMPT AND ABORT: drop the preempted nexuses' tasks on `lun` without waiting
        (it runs on the worker executing the PR OUT)."""
        from istgt.scsi.pr import nexus_matches

        self.abort_now(lambda t: t.lun == lun and any(nexus_matches(p, t.nexus)
                                                       for p in patterns))

    def abort_task(self, nexus, tag: int) -> bool:
        """Whether the task existed (it is gone now); TaskStillRunning when it did not end
        (a device that takes no reset), so the initiator is not told it is gone."""
        return bool(self._abort_all_or_raise(lambda t: t.nexus == nexus and t.tag == tag))

    def _abort_all_or_raise(self, match) -> list[QueuedTask]:
        """For a task management function: TaskStillRunning when an aborted task did not
        end, so it is not answered FUNCTION COMPLETE."""
        aborted, unfinished = self._abort(match)
        if unfinished:
            raise TaskStillRunning(f"LU{self.number}: {len(unfinished)} aborted task(s) "
                                   "still running")
        return aborted

    def abort_task_set(self, nexus, lun: int) -> None:
        self._abort_all_or_raise(lambda t: t.nexus == nexus and t.lun == lun)

    def clear_task_set(self, lun: int, by_nexus) -> None:
        aborted = self._abort_all_or_raise(lambda t: t.lun == lun)
        device = self.devices.get(lun)
        cleared = getattr(device, "tasks_cleared", None)
        if cleared is not None and any(e.task.nexus != by_nexus for e in aborted):
            cleared(by_nexus)

    def lun_reset(self, lun: int) -> None:
        device = self.devices.get(lun)
        if getattr(device, "reset_unblocks_tasks", False):
            # a real device (pass-through): its reset is what ends the commands it holds,
            # so it comes before waiting for them
            device.reset("lun")
            self._abort_all_or_raise(lambda t: t.lun == lun)
            return
        try:
            self._abort_all_or_raise(lambda t: t.lun == lun)
        finally:
            if device is not None:
                device.reset("lun")

    def target_reset(self, kind: str) -> None:
        try:
            self._abort_all_or_raise(lambda t: True)
        finally:
            for device in self.devices.values():
                device.reset(kind)

    def nexus_lost(self, nexus) -> None:
        self.abort(lambda t: t.nexus == nexus)
        for device in self.devices.values():
            device.nexus_lost(nexus)

    def replace_luns(self, config, built: dict, removed: set[int]) -> list:
        """Apply a reloaded [LogicalUnitN] in place: `built` holds new or replacing devices
        by LUN, `removed` the LUNs that go. Their tasks are aborted first (running ones
        waited for). Returns the devices taken out, for the caller to close. When the set
        of LUNs changes, every remaining LUN tells every nexus REPORTED LUNS DATA HAS
        CHANGED; a replaced LUN is a new device, whose nexuses start with a power-on."""
        before = set(self.devices)
        taken = []
        for lun in sorted(removed | set(built)):
            if lun in self.devices:
                self.abort(lambda t, lun=lun: t.lun == lun)
                taken.append(self.devices.pop(lun))
        for lun, device in sorted(built.items()):
            self._hook(device)
            self.devices[lun] = device
        self._queue.sequential_luns = _sequential_luns(self.devices)
        self.config = config
        self.number = config.number
        numbers = sorted(self.devices)
        for device in self.devices.values():
            if hasattr(device, "set_lun_numbers"):
                device.set_lun_numbers(numbers)
            if set(numbers) != before and hasattr(device, "luns_changed"):
                device.luns_changed()
        return taken

    def shutdown(self) -> None:
        self._queue.close()
        self._pool.join(30)
        # commands a connection's receiver runs are not the pool's: wait for them too, or
        # one could write after the final flush, or to a closed descriptor
        if not self._queue.wait_idle(30):
            log.error("LU%d: commands still running after 30 s; closing anyway", self.number)
        for device in self.devices.values():
            try:
                device.flush()
            finally:
                device.close()
