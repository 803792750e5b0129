"""The task set of one logical unit: SAM-5 task attributes and the QueueDepth limit.

HEAD OF QUEUE tasks start first; an ORDERED task starts only when every older task has
finished, and no younger SIMPLE task starts while it waits or runs.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Callable

SIMPLE, ORDERED, HEAD_OF_QUEUE, ACA = 1, 2, 3, 4   # iSCSI ATTR field values (0 untagged = SIMPLE)


class QueuedTask:
    __slots__ = ("task", "done", "attr", "aborted", "finished")

    def __init__(self, task, done: Callable, attr: int):
        self.task = task
        self.done = done
        self.attr = ORDERED if attr == ORDERED else HEAD_OF_QUEUE if attr == HEAD_OF_QUEUE else SIMPLE
        self.aborted = False
        self.finished = threading.Event()


class TaskQueue:
    def __init__(self, limit: int):
        self.limit = limit            # tasks waiting beyond this get TASK SET FULL
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._waiting: deque[QueuedTask] = deque()   # guarded by _lock
        self._running: list[QueuedTask] = []         # guarded by _lock
        self._closed = False                         # guarded by _lock

    def put(self, entry: QueuedTask) -> bool:
        with self._lock:
            if self._closed or len(self._waiting) + len(self._running) >= self.limit:
                return False
            if entry.attr == HEAD_OF_QUEUE:
                self._waiting.appendleft(entry)
            else:
                self._waiting.append(entry)
            self._cond.notify()
            return True

    def _pick(self) -> QueuedTask | None:
        ordered_running = any(e.attr == ORDERED for e in self._running)
        for i, e in enumerate(self._waiting):
            if e.attr == HEAD_OF_QUEUE:
                break
            if ordered_running:
                return None
            if e.attr == ORDERED:
                if i == 0 and not self._running:
                    break
                return None
            break
        else:
            return None
        del self._waiting[i]
        self._running.append(e)
        return e

    def take(self) -> QueuedTask | None:
        """Block until a task may start; None once the queue is closed and drained."""
        with self._lock:
            while True:
                e = self._pick()
                if e is not None:
                    return e
                if self._closed and not self._waiting:
                    return None
                self._cond.wait()

    def finish(self, entry: QueuedTask) -> None:
        with self._lock:
            self._running.remove(entry)
            self._cond.notify_all()
        entry.finished.set()

    def abort(self, match: Callable[[QueuedTask], bool]) -> tuple[list, list]:
        """Remove matching waiting tasks and mark matching running ones aborted.

        Returns (removed, running); callers wait on `entry.finished` for running ones."""
        with self._lock:
            hit = [e for e in self._waiting if match(e)]
            for e in hit:
                self._waiting.remove(e)
                e.aborted = True
                e.finished.set()
            running = [e for e in self._running if match(e)]
            for e in running:
                e.aborted = True
            self._cond.notify_all()
        return hit, running

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._lock:
            return len(self._waiting) + len(self._running)
