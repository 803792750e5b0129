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
