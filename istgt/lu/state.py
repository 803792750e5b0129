"""State that must survive a restart or a crash (persistent reservations with APTPL).

Writes are atomic and durable: a temporary file in the same directory, fsync, rename over the
old one, fsync of the directory. A reader therefore sees the old state or the new one, never a
mix, whatever moment the process or the machine stops.
"""

from __future__ import annotations

import json
import os
import threading


class StateFile:
    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()     # serialises saves: the last one holds the latest state

    def load(self):
        """The saved object, or None when there is none; ValueError if it is unreadable."""
        try:
            with open(self.path, encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{self.path}: {exc}") from None

    def save(self, produce) -> None:
        """Write `produce()` (called under the save lock, so it is current) atomically; if it
        returns None, remove the file instead (deciding under the same lock, so an older
        save cannot overtake a newer removal)."""
        with self._lock:
            content = produce()
            if content is None:
                self._remove_locked()
                return
            data = json.dumps(content, sort_keys=True).encode()
            directory = os.path.dirname(self.path) or "."
            tmp = f"{self.path}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            _sync_directory(directory)

    def remove(self) -> None:
        with self._lock:
            self._remove_locked()

    def _remove_locked(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            return
        _sync_directory(os.path.dirname(self.path) or ".")


def _sync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
