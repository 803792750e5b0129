"""A pool of worker threads executing one logical unit's tasks."""

from __future__ import annotations

import logging
import threading

from istgt.lu.queue import TaskQueue

log = logging.getLogger("istgt.lu")


class WorkerPool:
    def __init__(self, name: str, queue: TaskQueue, execute, size: int):
        self._queue = queue
        self._execute = execute
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
            entry = queue.take(parker)
            if entry is None:
                return
            try:
                if not entry.aborted:
                    self._execute(entry.task)
            except Exception:  # the device should never raise; keep the worker alive anyway
                log.exception("task execution failed")
            finally:
                queue.finish(entry)
            try:
                entry.done(entry.task, entry.aborted)
            except Exception:
                log.exception("task completion failed")

    def join(self, timeout: float | None = None) -> None:
        for t in self._threads:
            t.join(timeout)
