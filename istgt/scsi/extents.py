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
    def __init__(self) -> None:
        self._changed = threading.Condition(threading.Lock())
        self._next_token = 0                                # guarded by _changed
        # guarded by _changed: token -> (first LBA, end LBA) of each holder
        self._shared: dict[int, tuple[int, int]] = {}
        # exclusive holders and waiters; a waiter already keeps new shared holders out,
        # so a steady stream of reads cannot starve a COMPARE AND WRITE
        self._exclusive: dict[int, tuple[int, int]] = {}

    @staticmethod
    def _overlaps(ranges: dict[int, tuple[int, int]], start: int, end: int,
                  before: int | None = None) -> bool:
        return any(first < end and start < last for token, (first, last) in ranges.items()
                   if before is None or token < before)

    @contextmanager
    def shared(self, lba: int, blocks: int) -> Iterator[None]:
        start, end = lba, lba + max(blocks, 1)
        with self._changed:
            while self._exclusive and self._overlaps(self._exclusive, start, end):
                self._changed.wait()
            token = self._next_token
            self._next_token += 1
            self._shared[token] = (start, end)
        try:
            yield
        finally:
            with self._changed:
                del self._shared[token]
                if self._exclusive:
                    self._changed.notify_all()

    @contextmanager
    def exclusive(self, lba: int, blocks: int) -> Iterator[None]:
        start, end = lba, lba + max(blocks, 1)
        with self._changed:
            token = self._next_token
            self._next_token += 1
            self._exclusive[token] = (start, end)
            # Exclusive holders go in arrival order: wait only for earlier ones.
            while (self._overlaps(self._shared, start, end)
                   or self._overlaps(self._exclusive, start, end, before=token)):
                self._changed.wait()
        try:
            yield
        finally:
            with self._changed:
                del self._exclusive[token]
                self._changed.notify_all()

    def idle(self) -> bool:
        """No range is held or awaited (for tests)."""
        with self._changed:
            return not self._shared and not self._exclusive
