"""A pool of worker threads executing one logical unit's tasks."""

from __future__ import annotations

import contextlib
import logging
import threading

from istgt.lu.queue import TaskQueue

log = logging.getLogger("istgt.lu")


class WorkerPool:
    def __init__(self, name: str, queue: TaskQueue, execute, size: int,
                 completion_batch=contextlib.nullcontext, executed=None):
        self._queue = queue
        self._execute = execute
        self._executed = executed     # called with each batch once it ran (statistics)
        self._completion_batch = completion_batch
        self._threads = [threading.Thread(target=self._run, name=f"{name}-worker{i}", daemon=True)
                         for i in range(size)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        queue = self._queue
        parker = threading.Lock()
        parker.acquire()
        while True:
            batch = queue.take(parker, queue.batch)
            if batch is None:
                return
            self.run_batch(batch)
            batch = None     # a parked worker must not keep its last tasks (and their connection) alive

    def run_batch(self, batch, shared_thread: bool = False) -> None:
        """Execute started tasks and answer them together; a pool worker calls it, and so
        does a connection's receiver for tasks it runs itself (`shared_thread`)."""
        for entry in batch:
            try:
                if not entry.aborted:
                    self._execute(entry.task)
            except Exception:  # the device should never raise; keep the thread alive anyway
                log.exception("task execution failed")
        if self._executed is not None:
            try:
                self._executed(batch, shared_thread)
            except Exception:  # statistics must never stop a worker
                log.exception("task accounting failed")
        with self._completion_batch():
            for entry in batch:
                try:
                    entry.done(entry.task, entry.aborted)
                except Exception:
                    log.exception("task completion failed")
        # Only now may an abort or reset that waits for these tasks answer: their
        # responses were handed to the transport first (or suppressed if aborted).
        for entry in batch:
            self._queue.finish(entry)

    def join(self, timeout: float | None = None) -> None:
        for t in self._threads:
            t.join(timeout)
