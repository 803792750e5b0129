"""I/O statistics of one logical unit: completed commands, bytes read and written, and time
from arrival to completion, per LUN and I_T nexus (istgtcontrol stats).

Every worker thread counts into its own table, so the data path takes no lock; `snapshot`
adds the tables up (reading another thread's integers is safe under the GIL, and a count
that is a command behind is fine for statistics). Connection threads, which come and go,
share one table under a lock instead of leaving a table behind each.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

COMMANDS, READ_BYTES, WRITTEN_BYTES, LATENCY_NS = range(4)


@dataclass(frozen=True)
class Counters:
    commands: int = 0
    read_bytes: int = 0
    written_bytes: int = 0
    latency_ns: int = 0

    @property
    def average_latency_us(self) -> int:
        return self.latency_ns // self.commands // 1000 if self.commands else 0

    def __add__(self, other: Counters) -> Counters:
        return Counters(self.commands + other.commands, self.read_bytes + other.read_bytes,
                        self.written_bytes + other.written_bytes,
                        self.latency_ns + other.latency_ns)


class IoStats:
    def __init__(self) -> None:
        # thread ident -> (nexus, lun) -> [commands, read, written, latency ns]; each
        # thread writes only its own table
        self._tables: dict[int, dict[tuple[object, int], list[int]]] = {}
        self._shared: dict[tuple[object, int], list[int]] = {}    # guarded by _shared_lock
        self._shared_lock = threading.Lock()

    def record_batch(self, batch, now_ns: int, shared_thread: bool = False) -> None:
        """Count the entries of a batch (lu.queue.QueuedTask) that ran; `shared_thread`: on
        a thread that is not one of the LU's workers."""
        if shared_thread:
            with self._shared_lock:
                self._count(self._shared, batch, now_ns)
            return
        ident = threading.get_ident()
        table = self._tables.get(ident)
        if table is None:
            table = self._tables[ident] = {}
        self._count(table, batch, now_ns)

    @staticmethod
    def _count(table, batch, now_ns: int) -> None:
        for entry in batch:
            if entry.aborted:
                continue
            task = entry.task
            key = (task.nexus, task.lun)
            counts = table.get(key)
            if counts is None:
                counts = table[key] = [0, 0, 0, 0]
            counts[COMMANDS] += 1
            data_in = task.data_in
            if data_in is not None:
                counts[READ_BYTES] += min(len(data_in), task.transfer_length)
            data_out = task.data_out
            if data_out is not None:
                counts[WRITTEN_BYTES] += len(data_out)
            counts[LATENCY_NS] += now_ns - entry.queued_ns

    def snapshot(self) -> dict[tuple[int, object], Counters]:
        """(lun, nexus) -> counters, summed over the threads that ran commands."""
        total: dict[tuple[int, object], Counters] = {}
        with self._shared_lock:
            shared = {key: list(counts) for key, counts in self._shared.items()}
        for table in [*self._tables.values(), shared]:
            for (nexus, lun), counts in list(table.items()):
                key = (lun, nexus)
                total[key] = total.get(key, Counters()) + Counters(*counts)
        return total
