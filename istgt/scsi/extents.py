"""Shared and exclusive locks on LBA ranges of one LUN.

Plain reads and writes hold their range shared: they may overlap each other, as SAM allows
for SIMPLE tasks. COMPARE AND WRITE, ORWRITE and WRITE ATOMIC hold theirs exclusive, so no
overlapping command runs between their read and their write, and no read sees half of an
atomic write (SBC-4 4.29).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


# acquire_shared's token for a range held on the unlocked fast path
FAST_PATH = -1


class ExtentLocks:
    """First come, first served among overlapping requests: a request waits only for
    earlier ones it conflicts with, so neither a stream of reads and writes nor a stream
    of COMPARE AND WRITEs (VMware's ATS heartbeat) can starve the other.

    Every READ and WRITE takes a shared range, so that case avoids the lock: a thread
    publishes its range in its own slot (a dict store, atomic under the GIL) and goes on if
    no exclusive request exists. An exclusive request publishes itself first and then waits
    for every overlapping slot, so of the two that race, at least one sees the other."""

    def __init__(self) -> None:
        self._changed = threading.Condition(threading.Lock())
        self._next_token = 0                                # guarded by _changed
        # guarded by _changed: token -> (first LBA, end LBA) of every request, granted or
        # waiting, in arrival order (tokens grow)
        self._shared: dict[int, tuple[int, int]] = {}
        self._exclusive: dict[int, tuple[int, int]] = {}
        # thread ident -> the range that thread holds on the fast path (no entry: none);
        # each thread writes only its own entry, exclusive requests read them under
        # _changed. Entries go on release: connection threads come and go.
        self._fast: dict[int, tuple[int, int]] = {}

    @staticmethod
    def _earlier_overlap(ranges: dict[int, tuple[int, int]], token: int, start: int,
                         end: int) -> bool:
        return any(other < token and first < end and start < last
                   for other, (first, last) in ranges.items())

    def _fast_overlap(self, start: int, end: int) -> bool:
        return any(held[0] < end and start < held[1] for held in list(self._fast.values()))

    def _wake_exclusive(self) -> None:
        if self._exclusive:
            with self._changed:
                self._changed.notify_all()

    def acquire_shared(self, lba: int, blocks: int) -> int:
        """Hold [lba, lba+blocks) shared; returns the token for release_shared."""
        start, end = lba, lba + max(blocks, 1)
        ident = threading.get_ident()
        if self._fast.get(ident) is None:
            self._fast[ident] = (start, end)
            if not self._exclusive:
                return FAST_PATH
            del self._fast[ident]        # an exclusive request exists: queue up behind it
            self._wake_exclusive()
        with self._changed:
            token = self._next_token
            self._next_token += 1
            self._shared[token] = (start, end)
            while self._earlier_overlap(self._exclusive, token, start, end):
                self._changed.wait()
        return token

    def release_shared(self, token: int) -> None:
        if token == FAST_PATH:
            del self._fast[threading.get_ident()]
            self._wake_exclusive()
            return
        with self._changed:
            del self._shared[token]
            if self._exclusive:     # only exclusive requests wait for shared ones
                self._changed.notify_all()

    @contextmanager
    def shared(self, lba: int, blocks: int) -> Iterator[None]:
        token = self.acquire_shared(lba, blocks)
        try:
            yield
        finally:
            self.release_shared(token)

    @contextmanager
    def exclusive(self, lba: int, blocks: int) -> Iterator[None]:
        start, end = lba, lba + max(blocks, 1)
        with self._changed:
            token = self._next_token
            self._next_token += 1
            self._exclusive[token] = (start, end)
            while (self._earlier_overlap(self._exclusive, token, start, end)
                   or self._earlier_overlap(self._shared, token, start, end)
                   or self._fast_overlap(start, end)):
                # the timeout only bounds the cost of a wake-up lost to a fast-path race
                self._changed.wait(0.05)
        try:
            yield
        finally:
            with self._changed:
                del self._exclusive[token]
                self._changed.notify_all()

    def idle(self) -> bool:
        """No range is held or awaited (for tests)."""
        with self._changed:
            return not self._shared and not self._exclusive and not self._fast
