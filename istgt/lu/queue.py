"""The task set of one logical unit: SAM-5 task attributes and the QueueDepth limit.

HEAD OF QUEUE tasks start first; an ORDERED task starts only when every older task has
finished, and no younger SIMPLE task starts while it waits or runs, nor while a HEAD OF
QUEUE task runs (an older one, SAM-5 8.6): tasks are numbered in arrival order for that.

Idle workers park on a lock of their own and are woken last-in first-out: waking the worker
that went idle most recently costs far less than a shared condition variable (measured: a
submit/complete round trip went from 130 us to well under half of that).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable

SIMPLE, ORDERED, HEAD_OF_QUEUE, ACA = 1, 2, 3, 4   # iSCSI ATTR field values (0 untagged = SIMPLE)
# Tasks one worker takes at once when several are waiting, for page-cache-backed units:
# their completions are reported together, so the transport can answer them with one write
# (fewer system calls and GIL hand-offs at queue depth > 1); small enough that no answer
# waits long for the others. Pass-through units take 1 (TaskQueue.batch): their commands
# wait on a device for milliseconds and must overlap.
BATCH_HINT = 16


class QueuedTask:
    __slots__ = ("task", "done", "attr", "aborted", "_finished", "queued_ns", "seq")

    def __init__(self, task, done: Callable, attr: int, queued_ns: int = 0):
        self.task = task
        self.queued_ns = queued_ns        # perf_counter_ns() at arrival, for statistics
        self.done = done
        self.attr = ORDERED if attr == ORDERED else HEAD_OF_QUEUE if attr == HEAD_OF_QUEUE else SIMPLE
        self.aborted = False
        self._finished = None     # an Event, created only when someone waits (aborts)
        self.seq = 0              # arrival order, given by the queue

    @property
    def finished(self) -> threading.Event:
        if self._finished is None:
            self._finished = threading.Event()
        return self._finished

    def watch(self) -> None:
        """Make sure finish() will signal `finished` (called under the queue's lock)."""
        if self._finished is None:
            self._finished = threading.Event()


class TaskQueue:
    def __init__(self, limit: int, batch: int = BATCH_HINT):
        self.limit = limit            # tasks waiting beyond this get TASK SET FULL
        self.batch = batch            # tasks a worker takes at once
        # LUNs of sequential devices (tape, changer): one task at a time each, in task-set
        # order, so an aborted task still waiting never reaches the device; other LUNs'
        # tasks may pass one that waits for its LUN
        self.sequential_luns: frozenset[int] = frozenset()
        self._lock = threading.Lock()
        self._waiting: deque[QueuedTask] = deque()   # guarded by _lock
        self._running: list[QueuedTask] = []         # guarded by _lock
        # arrival numbers of the ORDERED / HEAD OF QUEUE tasks in _running; guarded by _lock
        self._barriers: list[int] = []
        self._next_seq = 0                           # guarded by _lock
        self._idle: list[threading.Lock] = []        # parked workers, most recent last; _lock
        self._closed = False                         # guarded by _lock

    def put(self, entry: QueuedTask) -> bool:
        return not self.put_many([entry])

    def put_many(self, entries: list[QueuedTask]) -> list[QueuedTask]:
        """Queue `entries` in order under one lock; returns those refused (the task set is
        full or closed). Wakes one parked worker per `batch` tasks."""
        with self._lock:
            refused = []
            queued = 0
            for entry in entries:
                if self._closed or len(self._waiting) + len(self._running) >= self.limit:
                    refused.append(entry)
                    continue
                entry.seq = self._next_seq
                self._next_seq += 1
                if entry.attr == HEAD_OF_QUEUE:
                    self._waiting.appendleft(entry)
                else:
                    self._waiting.append(entry)
                queued += 1
            wake = min(len(self._idle), (queued + self.batch - 1) // self.batch)
            for _ in range(wake):
                self._idle.pop().release()
            return refused

    def start_now(self, entries: list[QueuedTask]) -> int:
        """Mark as running, for the calling thread to execute, the leading SIMPLE `entries`
        that may start at once (nothing waiting ahead of them, no ORDERED or HEAD OF QUEUE
        task running, room in the task set); returns how many. They are finished with
        finish() as usual."""
        with self._lock:
            if self._closed or self._waiting or self._barriers or self.sequential_luns:
                return 0
            room = self.limit - len(self._running)
            started = 0
            for entry in entries:
                if started >= room or entry.attr != SIMPLE:
                    break
                entry.seq = self._next_seq
                self._next_seq += 1
                self._running.append(entry)
                started += 1
            return started

    def _may_start(self, e: QueuedTask) -> bool:
        """Whether the task at the head of the waiting line may start now."""
        if e.attr == HEAD_OF_QUEUE:
            return True
        if e.attr == ORDERED:
            return not self._running                  # every older task has finished
        return not self._barriers or e.seq < min(self._barriers)

    def _pick(self) -> QueuedTask | None:
        waiting = self._waiting
        if not waiting:
            return None
        if self.sequential_luns:
            return self._pick_sequential()
        if not self._may_start(waiting[0]):
            return None
        return self._start(waiting.popleft())

    def _start(self, e: QueuedTask) -> QueuedTask:
        self._running.append(e)
        if e.attr != SIMPLE:
            self._barriers.append(e.seq)
        return e

    def _pick_sequential(self) -> QueuedTask | None:
        """The first waiting task that may start, where a task of a sequential LUN waits
        while its LUN runs one; tasks behind it of other LUNs may pass it, never one of
        its own LUN, nor anything behind an ORDERED or HEAD OF QUEUE task."""
        busy = {e.task.lun for e in self._running if e.task.lun in self.sequential_luns}
        passed: set[int] = set()
        for index, e in enumerate(self._waiting):
            lun = e.task.lun
            if lun not in passed and lun not in busy and self._may_start(e):
                del self._waiting[index]
                return self._start(e)
            if e.attr != SIMPLE:
                return None
            passed.add(lun)
        return None

    def take(self, parker: threading.Lock, limit: int = 1) -> list[QueuedTask] | None:
        """Block until a task may start; returns it with up to `limit` - 1 further SIMPLE
        tasks that may run right after it, or None once the queue is closed and drained.

        `parker` is the calling worker's own lock, held by it between calls."""
        while True:
            with self._lock:
                e = self._pick()
                if e is not None:
                    batch = [e]
                    waiting = self._waiting
                    while (len(batch) < limit and e.attr == SIMPLE and waiting
                           and waiting[0].attr == SIMPLE and self._may_start(waiting[0])):
                        e = waiting.popleft()
                        self._running.append(e)
                        batch.append(e)
                    if waiting and self._idle:
                        self._idle.pop().release()     # more runnable work: wake a peer
                    return batch
                if self._closed and not self._waiting:
                    return None
                self._idle.append(parker)
            parker.acquire()

    def finish(self, entry: QueuedTask) -> None:
        with self._lock:
            self._running.remove(entry)
            if entry.attr != SIMPLE:
                self._barriers.remove(entry.seq)
            if self._waiting and self._idle:
                self._idle.pop().release()
            finished = entry._finished
        if finished is not None:
            finished.set()

    def abort(self, match: Callable[[QueuedTask], bool]) -> tuple[list, list]:
        """Remove matching waiting tasks and mark matching running ones aborted.

        Returns (removed, running); callers wait on `entry.finished` for running ones."""
        with self._lock:
            hit = [e for e in self._waiting if match(e)]
            for e in hit:
                self._waiting.remove(e)
                e.aborted = True
            running = [e for e in self._running if match(e)]
            for e in running:
                e.aborted = True
                e.watch()
        return hit, running

    def wait_idle(self, timeout: float) -> bool:
        """Wait (bounded) until no task runs, wherever it runs; True if none does."""
        with self._lock:
            running = list(self._running)
            for entry in running:
                entry.watch()
        deadline = time.monotonic() + timeout
        for entry in running:
            if not entry.finished.wait(max(0.0, deadline - time.monotonic())):
                return False
        return True

    def close(self) -> None:
        with self._lock:
            self._closed = True
            while self._idle:
                self._idle.pop().release()

    def __len__(self) -> int:
        with self._lock:
            return len(self._waiting) + len(self._running)
