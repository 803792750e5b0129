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


class ExtentLocks:
    """First come, first served among overlapping requests: a request waits only for
    earlier ones it conflicts with, so neither a stream of reads and writes nor a stream
    of COMPARE AND WRITEs (VMware's ATS heartbeat) can starve the other."""

    def __init__(self) -> None:
        self._changed = threading.Condition(threading.Lock())
        self._next_token = 0                                # guarded by _changed
        # guarded by _changed: token -> (first LBA, end LBA) of every request, granted or
        # waiting, in arrival order (tokens grow)
        self._shared: dict[int, tuple[int, int]] = {}
        self._exclusive: dict[int, tuple[int, int]] = {}

    @staticmethod
    def _earlier_overlap(ranges: dict[int, tuple[int, int]], token: int, start: int,
                         end: int) -> bool:
        return any(other < token and first < end and start < last
                   for other, (first, last) in ranges.items())

    def _enter(self, exclusive: bool, lba: int, blocks: int) -> int:
        start, end = lba, lba + max(blocks, 1)
        with self._changed:
            token = self._next_token
            self._next_token += 1
            (self._exclusive if exclusive else self._shared)[token] = (start, end)
            while (self._earlier_overlap(self._exclusive, token, start, end)
                   or exclusive and self._earlier_overlap(self._shared, token, start, end)):
                self._changed.wait()
        return token

    def _leave(self, exclusive: bool, token: int) -> None:
        with self._changed:
            del (self._exclusive if exclusive else self._shared)[token]
            # Shared requests wait only on exclusive ones; exclusive ones wait on any.
            if exclusive or self._exclusive:
                self._changed.notify_all()

    @contextmanager
    def shared(self, lba: int, blocks: int) -> Iterator[None]:
        token = self._enter(False, lba, blocks)
        try:
            yield
        finally:
            self._leave(False, token)

    @contextmanager
    def exclusive(self, lba: int, blocks: int) -> Iterator[None]:
        token = self._enter(True, lba, blocks)
        try:
            yield
        finally:
            self._leave(True, token)

    def idle(self) -> bool:
        """No range is held or awaited (for tests)."""
        with self._changed:
            return not self._shared and not self._exclusive
