"""Backing stores for Disk LUs: a regular file or block device, and memory (tests); disk
images (istgt/lu/images.py) answer the same interface.

One small interface (`Backend`): `size` in bytes, `read`, `readinto`, `read_stable`,
`write`, `write_durable`, `write_zeroes`, `flush`, `close`, for thin provisioning
`supports_unmap`, `unmap_zeroes` (an unmapped range reads as zeros), `unmap` and
`allocation` (is a range mapped, and how far), and for sizing `stored_size`, `grow` and
`preallocate`. Offsets and lengths are bytes;
the SCSI layer checks ranges before calling. I/O errors propagate as OSError for the SCSI
layer to turn into sense data.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat
import struct
import threading
from typing import Protocol

BLKGETSIZE64 = 0x80081272  # Linux <linux/fs.h>: _IOR(0x12, 114, size_t)
BLKDISCARD = 0x1277  # _IO(0x12, 119), argument: uint64_t {start, length}
BLKDISCARDZEROES = 0x127C  # _IO(0x12, 124), returns unsigned int
_ZERO_CHUNK = 1 << 20
# <linux/falloc.h>: deallocate a range, keep the file size (the range then reads as zeros).
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


def _load_fallocate():
    """libc fallocate(2), which os does not expose with flags; None where unavailable."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        function = libc.fallocate
    except (OSError, AttributeError, TypeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    function.restype = ctypes.c_int
    return function


_fallocate = _load_fallocate()


class BackendError(Exception):
    """A backing store could not be opened or sized."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class Backend(Protocol):
    path: str
    size: int
    read_only: bool
    # True when a cached READ/WRITE costs about a memory copy (it may then run on the
    # connection's thread, and two workers suffice); False for a store behind a socket.
    served_from_page_cache: bool

    def read(self, offset: int, length: int) -> bytes | bytearray: ...

    def readinto(self, offset: int, buffer: bytearray | memoryview) -> int: ...

    def read_stable(self, offset: int, length: int) -> bytes | bytearray: ...

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    def write_durable(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    def write_zeroes(self, offset: int, length: int, durable: bool = False) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...

    supports_unmap: bool
    unmap_zeroes: bool

    def unmap(self, offset: int, length: int) -> None: ...

    def allocation(self, offset: int, length: int) -> tuple[bool, int]: ...

    def stored_size(self) -> int: ...

    def grow(self, size: int) -> None: ...

    def preallocate(self) -> None: ...


class FileBackend:
    """A regular file or a block device accessed with pread/pwrite (position-independent,
    so several workers may use one backend at once)."""

    served_from_page_cache = True

    def __init__(self, path: str, fd: int, size: int, read_only: bool) -> None:
        self.path = path
        self.size = size
        self.read_only = read_only
        self._fd = fd
        mode = os.fstat(fd).st_mode
        self.block_device = stat.S_ISBLK(mode)
        if self.block_device:
            # BLKDISCARD; what discarded blocks read as is the device's business.
            self.supports_unmap = _device_discards(fd)
            self.unmap_zeroes = self.supports_unmap and _device_discard_zeroes(fd)
        else:
            # A punched hole reads as zeros; a file system that refuses it only at the
            # first UNMAP (probe inconclusive) gets zeros written instead.
            self.supports_unmap = stat.S_ISREG(mode) and _can_punch_holes(fd)
            self.unmap_zeroes = True
        self._dirty_lock = threading.Lock()
        self._dirty = False  # guarded by _dirty_lock: written since the last flush

    @classmethod
    def open(
        cls, path: str, size: int | None, read_only: bool, block_length: int = 1
    ) -> FileBackend:
        """Open (or create) the backing store the way istgt does.

        Open O_RDWR (O_RDONLY when read-only); if that fails and the LU is writable, create
        the file (O_CREAT|O_EXCL, mode 0666). `size=None` (Auto) takes the current size. A
        writable regular file smaller than `size` is extended sparsely. The exposed size is
        rounded down to a multiple of `block_length`; zero is an error.
        """
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            if read_only:
                raise BackendError(path, "no such file (a ReadOnly LU never creates it)") from None
            if size is None:
                raise BackendError(path, "no such file (Auto size needs an existing one)") from None
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            except OSError as exc:
                raise BackendError(path, f"cannot create: {exc.strerror}") from None
        except OSError as exc:
            raise BackendError(path, f"cannot open: {exc.strerror}") from None
        try:
            actual = _current_size(path, fd)
            is_regular = stat.S_ISREG(os.fstat(fd).st_mode)
            wanted = actual if size is None else size
            if size is not None and is_regular and actual < size and not read_only:
                try:
                    os.ftruncate(fd, size)  # sparse: no blocks allocated
                except OSError as exc:
                    raise BackendError(path, f"cannot extend to {size} bytes: {exc.strerror}")
            elif size is not None and not is_regular and actual < size:
                raise BackendError(path, f"device holds {actual} bytes, less than {size}")
            usable = wanted - wanted % block_length
            if usable <= 0:
                raise BackendError(path, "size is zero" + (" (Auto)" if size is None else ""))
            return cls(path, fd, usable, read_only)
        except BaseException:
            os.close(fd)
            raise

    def stored_size(self) -> int:
        """What the file or device holds now (it may have grown since it was opened)."""
        return _current_size(self.path, self._fd)

    def grow(self, size: int) -> None:
        """Expose `size` bytes, more than now: a regular file is extended sparsely, a block
        device must hold them already. BackendError when it cannot."""
        if size <= self.size:
            raise BackendError(self.path, f"{size} bytes is not larger than {self.size}")
        actual = self.stored_size()
        if actual < size:
            if self.block_device or self.read_only:
                raise BackendError(self.path, f"holds {actual} bytes, less than {size}")
            try:
                os.ftruncate(self._fd, size)     # sparse: no blocks allocated
            except OSError as exc:
                raise BackendError(self.path, f"cannot extend to {size} bytes: "
                                              f"{exc.strerror}") from None
        self.size = size

    def _mark_dirty(self) -> None:
        if not self._dirty:             # only the first write after a flush takes the lock
            with self._dirty_lock:
                self._dirty = True

    def read(self, offset: int, length: int) -> bytes | bytearray:
        data = os.pread(self._fd, length, offset)
        if len(data) == length:
            return data
        # Short read: past the physical end of a file, or a partial read; loop, then zeros.
        buffer = bytearray(length)
        self.readinto(offset, buffer)
        return buffer

    def readinto(self, offset: int, buffer: bytearray | memoryview) -> int:
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view):
            count = os.preadv(self._fd, [view[done:]], offset + done)
            if count == 0:
                view[done:] = bytes(len(view) - done)  # beyond EOF of a sparse file
                break
            done += count
        return len(view)

    def read_stable(self, offset: int, length: int) -> bytes | bytearray:
        """Read what stable storage holds: flush dirty data, drop the cached pages, read."""
        self.flush()
        try:
            os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass  # advisory only
        return self.read(offset, length)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            count = os.pwrite(self._fd, view[done:], offset + done)
            if count <= 0:
                raise OSError(errno.EIO, "short write")
            done += count
        self._mark_dirty()

    def write_durable(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.write(offset, data)
        self.flush()

    def write_zeroes(self, offset: int, length: int, durable: bool = False) -> None:
        chunk = bytes(min(length, _ZERO_CHUNK))
        done = 0
        while done < length:
            count = min(len(chunk), length - done)
            self.write(offset + done, memoryview(chunk)[:count])
            done += count
        if durable:
            self.flush()

    def unmap(self, offset: int, length: int) -> None:
        """Deallocate the range (it then reads as zeros when `unmap_zeroes`)."""
        if length <= 0:
            return
        if self.block_device:
            self._discard(offset, length)
            return
        if self.supports_unmap and _fallocate is not None:
            mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
            if _fallocate(self._fd, mode, offset, length) == 0:
                self._mark_dirty()
                return
            error = ctypes.get_errno()
            if error not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise OSError(error, os.strerror(error))
            self.supports_unmap = False
        self.write_zeroes(offset, length)

    def _discard(self, offset: int, length: int) -> None:
        if self.supports_unmap:
            try:
                fcntl.ioctl(self._fd, BLKDISCARD, struct.pack("QQ", offset, length))
                self._mark_dirty()
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                    raise
                self.supports_unmap = False
        if self.unmap_zeroes:  # promised zeros: keep the promise without discard
            self.write_zeroes(offset, length)

    def preallocate(self) -> None:
        """Allocate every block of a regular file now (full provisioning), so later
        writes cannot run out of space. A file system without fallocate is left as is."""
        if self.block_device or self.read_only or _fallocate is None:
            return
        # Ask first: a fallocate that fails half-way keeps what it allocated (ext4).
        info, space = os.fstat(self._fd), os.fstatvfs(self._fd)
        needed = self.size - min(self.size, info.st_blocks * 512)
        free = space.f_bavail * space.f_frsize
        if needed > free:
            raise BackendError(self.path, f"cannot allocate {self.size} bytes: {needed} more "
                                          f"needed, {free} free")
        if _fallocate(self._fd, 0, 0, self.size) != 0:
            error = ctypes.get_errno()
            if error in (errno.EOPNOTSUPP, errno.ENOSYS):
                return
            raise BackendError(self.path, f"cannot allocate {self.size} bytes: "
                                          f"{os.strerror(error)}")

    def allocation(self, offset: int, length: int) -> tuple[bool, int]:
        """(mapped, bytes): whether `offset` is backed by storage, and how far that state
        runs (at most `length`). A block device does not say: everything is mapped."""
        if self.block_device:
            return True, length
        end = offset + length
        try:
            data = os.lseek(self._fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data at or after offset
                return False, length
            return True, length  # SEEK_DATA unsupported: everything counts as mapped
        if data > offset:
            return False, min(data, end) - offset
        hole = os.lseek(self._fd, offset, os.SEEK_HOLE)
        return True, min(hole, end) - offset

    def flush(self) -> None:
        with self._dirty_lock:
            if not self._dirty:
                return
            self._dirty = False
        try:
            os.fdatasync(self._fd)
        except OSError:
            self._mark_dirty()  # still not known to be stable
            raise

    def close(self) -> None:
        if self._fd >= 0:
            try:
                if not self.read_only:
                    self.flush()
            finally:
                os.close(self._fd)
                self._fd = -1


def _current_size(path: str, fd: int) -> int:
    info = os.fstat(fd)
    if stat.S_ISREG(info.st_mode):
        return info.st_size
    if stat.S_ISBLK(info.st_mode) or stat.S_ISCHR(info.st_mode):
        try:
            raw = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
        except OSError as exc:
            raise BackendError(path, f"cannot size device: {exc.strerror}") from None
        return int(struct.unpack("Q", raw)[0])
    raise BackendError(path, "not a regular file or device")


def _can_punch_holes(fd: int) -> bool:
    """Whether the file system punches holes: try it past the end of the file (not of the
    LU, which may be shorter), where nothing can be lost. A read-only descriptor cannot
    tell; then trust that fallocate exists."""
    if _fallocate is None:
        return False
    end = os.fstat(fd).st_size
    probe_at = end + (-end % 4096)
    if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, probe_at, 4096) == 0:
        return True
    return ctypes.get_errno() == errno.EBADF


def _queue_setting(fd: int, name: str) -> str | None:
    """/sys/dev/block/MAJ:MIN/queue/<name> (a partition's queue is its disk's)."""
    rdev = os.fstat(fd).st_rdev
    base = f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}"
    for queue in (f"{base}/queue", f"{base}/../queue"):
        try:
            with open(f"{queue}/{name}") as f:
                return f.read().strip()
        except OSError:
            continue
    return None


def _device_discards(fd: int) -> bool:
    value = _queue_setting(fd, "discard_max_bytes")
    return value is not None and value.isdigit() and int(value) > 0


def _device_discard_zeroes(fd: int) -> bool:
    """Whether the kernel promises that discarded blocks read as zeros (current kernels
    never do: both sources then say no)."""
    try:
        raw = fcntl.ioctl(fd, BLKDISCARDZEROES, b"\0" * 4)
        if struct.unpack("I", raw)[0]:
            return True
    except OSError:
        pass
    return _queue_setting(fd, "discard_zeroes_data") == "1"


class MemoryBackend:
    """A RAM disk for tests; counts flushes so tests can see durability requests."""

    served_from_page_cache = True

    def __init__(self, size: int, read_only: bool = False, supports_unmap: bool = True) -> None:
        self.size = size
        self.read_only = read_only
        self._data = bytearray(size)
        self._lock = threading.Lock()
        self.flush_count = 0
        self.durable_writes = 0
        self.closed = False
        self.supports_unmap = supports_unmap
        self.unmap_zeroes = True
        self.unmapped: list[tuple[int, int]] = []  # (offset, length) of each unmap call

    def read(self, offset: int, length: int) -> bytes | bytearray:
        with self._lock:
            return bytes(self._data[offset : offset + length])

    def readinto(self, offset: int, buffer: bytearray | memoryview) -> int:
        view = memoryview(buffer).cast("B")
        with self._lock:
            view[:] = self._data[offset : offset + len(view)]
        return len(view)

    def read_stable(self, offset: int, length: int) -> bytes | bytearray:
        self.flush()
        return self.read(offset, length)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        with self._lock:
            self._data[offset : offset + len(view)] = view

    def write_durable(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.write(offset, data)
        self.durable_writes += 1
        self.flush()

    def write_zeroes(self, offset: int, length: int, durable: bool = False) -> None:
        with self._lock:
            self._data[offset : offset + length] = bytes(length)
        if durable:
            self.flush()

    def unmap(self, offset: int, length: int) -> None:
        self.write_zeroes(offset, length)
        self.unmapped.append((offset, length))

    def allocation(self, offset: int, length: int) -> tuple[bool, int]:
        return True, length  # RAM is always mapped

    def stored_size(self) -> int:
        with self._lock:
            return len(self._data)

    def grow(self, size: int) -> None:
        with self._lock:
            if size > len(self._data):
                self._data.extend(bytes(size - len(self._data)))
        self.size = size

    def flush(self) -> None:
        self.flush_count += 1

    def close(self) -> None:
        self.closed = True
