"""File and memory backends: creation rules, sizing, I/O, durability calls."""

from __future__ import annotations

import os

import pytest

from istgt.lu.backends import BackendError, FileBackend, MemoryBackend


def test_missing_file_is_created_sparse_at_full_size(tmp_path):
    path = tmp_path / "disk.img"
    backend = FileBackend.open(str(path), 64 << 20, read_only=False, block_length=512)
    try:
        info = os.stat(path)
        assert backend.size == 64 << 20 and info.st_size == 64 << 20
        assert info.st_blocks * 512 < 1 << 20  # sparse: nothing allocated
        assert (info.st_mode & 0o777) == 0o666 & ~_umask()
        assert backend.read(10 << 20, 4096) == bytes(4096)
    finally:
        backend.close()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_existing_smaller_file_is_extended_and_keeps_data(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(b"x" * 1000)
    backend = FileBackend.open(str(path), 1 << 20, read_only=False)
    try:
        assert os.path.getsize(path) == 1 << 20
        assert backend.read(0, 1000) == b"x" * 1000 and backend.read(1000, 24) == bytes(24)
    finally:
        backend.close()


def test_larger_file_exposes_only_the_configured_size(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(8192))
    backend = FileBackend.open(str(path), 4096, read_only=False)
    assert backend.size == 4096 and os.path.getsize(path) == 8192
    backend.close()


def test_auto_size_uses_current_size_rounded_down(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(4096 + 100))
    backend = FileBackend.open(str(path), None, read_only=False, block_length=512)
    assert backend.size == 4096
    backend.close()


def test_auto_size_of_empty_file_is_an_error(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(b"")
    with pytest.raises(BackendError, match="size is zero"):
        FileBackend.open(str(path), None, read_only=False)


def test_auto_size_of_missing_file_is_an_error_and_creates_nothing(tmp_path):
    path = tmp_path / "disk.img"
    with pytest.raises(BackendError, match="Auto"):
        FileBackend.open(str(path), None, read_only=False)
    assert not path.exists()


def test_read_only_never_creates(tmp_path):
    path = tmp_path / "missing.img"
    with pytest.raises(BackendError) as error:
        FileBackend.open(str(path), 1 << 20, read_only=True)
    assert not path.exists() and error.value.path == str(path)


def test_read_only_opens_without_write_access(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(b"y" * 4096)
    os.chmod(path, 0o444)
    backend = FileBackend.open(str(path), None, read_only=True)
    try:
        assert backend.read_only and backend.read(0, 4) == b"yyyy"
        with pytest.raises(OSError):
            backend.write(0, b"z")
    finally:
        backend.close()


def test_unopenable_path_is_a_clear_error(tmp_path):
    with pytest.raises(BackendError, match="cannot"):
        FileBackend.open(str(tmp_path / "no" / "such" / "dir.img"), 4096, read_only=False)


def test_directory_is_rejected(tmp_path):
    with pytest.raises(BackendError):
        FileBackend.open(str(tmp_path), None, read_only=True)


def test_write_read_flush_and_zeroes(tmp_path):
    backend = FileBackend.open(str(tmp_path / "d.img"), 1 << 20, read_only=False)
    try:
        backend.write(4096, memoryview(b"abc" * 100))
        assert backend.read(4096, 300) == b"abc" * 100
        buffer = bytearray(300)
        backend.readinto(4096, buffer)
        assert buffer == b"abc" * 100
        backend.write_durable(0, b"durable")
        backend.flush()
        assert backend.read_stable(0, 7) == b"durable"
        backend.write_zeroes(4096, 300, durable=True)
        assert backend.read(4096, 300) == bytes(300)
    finally:
        backend.close()


def test_file_flush_calls_fdatasync_only_when_dirty(tmp_path, monkeypatch):
    calls = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (calls.append(fd), real(fd)))
    backend = FileBackend.open(str(tmp_path / "d.img"), 1 << 20, read_only=False)
    try:
        backend.flush()
        assert calls == []
        backend.write(0, b"x")
        backend.flush()
        assert len(calls) == 1
        backend.write_durable(0, b"y")
        assert len(calls) == 2
    finally:
        backend.close()


def test_read_past_physical_end_of_sparse_file_is_zero(tmp_path):
    path = tmp_path / "d.img"
    path.write_bytes(b"q" * 100)
    backend = FileBackend.open(str(path), 1 << 20, read_only=True)  # not extended: read-only
    try:
        assert backend.read(50, 100) == b"q" * 50 + bytes(50)
    finally:
        backend.close()


def test_memory_backend_counts_durability():
    backend = MemoryBackend(4096)
    backend.write(0, b"ab")
    backend.write_durable(2, b"cd")
    assert backend.read(0, 4) == b"abcd" and backend.durable_writes == 1
    assert backend.flush_count == 1
    backend.write_zeroes(0, 4)
    assert backend.read(0, 4) == bytes(4)


def test_character_device_without_a_size_is_a_clear_error():
    with pytest.raises(BackendError, match="cannot size device"):
        FileBackend.open("/dev/zero", None, read_only=True)


def test_unmap_punches_a_hole_that_reads_zeros(tmp_path):
    backend = FileBackend.open(str(tmp_path / "d.img"), 1 << 20, read_only=False)
    try:
        backend.write(0, b"z" * 65536)
        assert backend.allocation(0, 1 << 20) == (True, 65536)
        backend.unmap(4096, 8192)
        assert backend.read(4096, 8192) == bytes(8192) and backend.read(0, 4096) == b"z" * 4096
        if backend.supports_unmap:  # the file system punched a real hole
            assert backend.allocation(4096, 1 << 20) == (False, 8192)
        assert backend.allocation(65536, 4096) == (False, 4096)
    finally:
        backend.close()
