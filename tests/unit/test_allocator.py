"""glibc malloc tuning at start-up (istgt/allocator.py)."""

import ctypes

from istgt import allocator


def test_settings_apply_unless_the_environment_gives_them(monkeypatch):
    calls = []

    class FakeMallopt:
        argtypes = None

        def __call__(self, option, value):
            calls.append((option, value))
            return 1

    class FakeLibc:
        mallopt = FakeMallopt()
    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibc())
    applied = allocator.tune({"MALLOC_ARENA_MAX": "4"})
    assert applied == ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"]
    assert calls == [(allocator.M_MMAP_THRESHOLD, allocator.MMAP_THRESHOLD),
                     (allocator.M_TRIM_THRESHOLD, allocator.TRIM_THRESHOLD)]


def test_without_glibc_nothing_happens(monkeypatch):
    def no_libc(name):
        raise OSError("no libc")
    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    assert allocator.tune({}) == []


def test_real_glibc_accepts_them():
    # this machine runs glibc: every setting is accepted (the process keeps them, harmlessly)
    assert allocator.tune({}) == ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                                  "MALLOC_ARENA_MAX"]


def test_trim_asks_glibc_to_give_free_heap_back(monkeypatch):
    calls = []

    class FakeLibc:
        def malloc_trim(self, pad):
            calls.append(pad)
            return 1
    monkeypatch.setattr(allocator, "_libc", FakeLibc())
    assert allocator.trim() and calls == [0]
    monkeypatch.setattr(allocator, "_libc", None)
    assert not allocator.trim()                   # without glibc: nothing to call
    allocator.tune({})
    assert allocator.trim()                       # the real one is there on this machine
