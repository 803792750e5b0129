"""Ceph RBD LUs through librbd itself (Debian's librbd1/librados2, called with ctypes).

ctypes releases the GIL for the length of each call, so every LU worker has a request in
librbd at once; librbd keeps them in flight to the OSDs. This is the path RBD LUs take
(measured faster than qemu-storage-daemon's rbd driver behind NBD: doc/BACKENDS.md), and it
gives COMPARE AND WRITE that is atomic in the cluster, whichever gateway sends it.

One cluster connection (rados_t) per conf/id pair is shared by every image of the process.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading

from istgt.lu.backends import BackendError

_ZEROES_CHUNK = 1 << 30
RADOS_TIMEOUT_S = "30"


class ImageInfo(ctypes.Structure):
    """librbd's rbd_image_info_t."""
    _fields_ = [("size", ctypes.c_uint64), ("obj_size", ctypes.c_uint64),
                ("num_objs", ctypes.c_uint64), ("order", ctypes.c_int),
                ("block_name_prefix", ctypes.c_char * 24), ("parent_pool", ctypes.c_int64),
                ("parent_name", ctypes.c_char * 96)]


class _Libraries:
    """librados and librbd with the signatures used here; None when not installed."""

    def __init__(self) -> None:
        rados = ctypes.CDLL("librados.so.2", use_errno=True)
        rbd = ctypes.CDLL("librbd.so.1", use_errno=True)
        p, c, u64, i, sz = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint64, ctypes.c_int, \
            ctypes.c_size_t
        ssize = ctypes.c_ssize_t
        pp = ctypes.POINTER(ctypes.c_void_p)
        self.diff_callback = ctypes.CFUNCTYPE(i, u64, sz, i, p)
        self.watch_callback = ctypes.CFUNCTYPE(None, p, u64, u64, u64, p, sz)
        self.watch_error_callback = ctypes.CFUNCTYPE(None, p, u64, i)
        signatures = [
            (rados.rados_read, i, [p, c, p, sz, u64]),
            (rados.rados_write_full, i, [p, c, p, sz]),
            (rados.rados_append, i, [p, c, p, sz]),
            (rados.rados_lock_exclusive, i, [p, c, c, c, c, p, ctypes.c_uint8]),
            (rados.rados_unlock, i, [p, c, c, c]),
            (rados.rados_watch2, i, [p, c, ctypes.POINTER(u64), self.watch_callback,
                                     self.watch_error_callback, p]),
            (rados.rados_unwatch2, i, [p, u64]),
            (rados.rados_notify_ack, i, [p, c, u64, u64, p, i]),
            (rados.rados_notify2, i, [p, c, p, i, u64, ctypes.POINTER(ctypes.c_void_p),
                                      ctypes.POINTER(sz)]),
            (rados.rados_buffer_free, None, [p]),
            (rados.rados_create, i, [pp, c]),
            (rados.rados_conf_read_file, i, [p, c]),
            (rados.rados_conf_set, i, [p, c, c]),
            (rados.rados_connect, i, [p]),
            (rados.rados_shutdown, None, [p]),
            (rados.rados_ioctx_create, i, [p, c, pp]),
            (rados.rados_ioctx_destroy, None, [p]),
            (rados.rados_ioctx_set_namespace, None, [p, c]),
            (rbd.rbd_open, i, [p, c, pp, c]),
            (rbd.rbd_open_read_only, i, [p, c, pp, c]),
            (rbd.rbd_close, i, [p]),
            (rbd.rbd_get_size, i, [p, ctypes.POINTER(u64)]),
            (rbd.rbd_stat, i, [p, ctypes.POINTER(ImageInfo), sz]),
            (rados.rados_watch_flush, i, [p]),
            (rbd.rbd_read2, ssize, [p, u64, sz, p, i]),
            (rbd.rbd_write2, ssize, [p, u64, sz, p, i]),
            (rbd.rbd_write_zeroes, i, [p, u64, sz, i, i]),
            (rbd.rbd_flush, i, [p]),
            (rbd.rbd_compare_and_write, ssize, [p, u64, sz, p, p, ctypes.POINTER(u64), i]),
            (rbd.rbd_diff_iterate2, i, [p, c, u64, u64, ctypes.c_uint8, ctypes.c_uint8,
                                         self.diff_callback, p]),
        ]
        for function, result, arguments in signatures:
            function.restype, function.argtypes = result, arguments
        self.rados, self.rbd = rados, rbd


_libraries: _Libraries | None = None
_libraries_lock = threading.Lock()


def libraries() -> _Libraries:
    global _libraries
    with _libraries_lock:
        if _libraries is None:
            try:
                _libraries = _Libraries()
            except (OSError, AttributeError) as exc:
                raise BackendError("librbd", f"RBD LUs need librbd1 and librados2 "
                                             f"(Debian: apt-get install librbd1): {exc}")
        return _libraries


def _check(result: int, what: str) -> int:
    if result < 0:
        raise OSError(-result, f"{what}: {os.strerror(-result)}")
    return result


class _Cluster:
    """A connected rados_t, shared by the images opened through the same conf and id."""

    _open: dict[tuple[str, str], _Cluster] = {}
    _lock = threading.Lock()

    def __init__(self, conf: str, user: str) -> None:
        lib = libraries().rados
        handle = ctypes.c_void_p()
        _check(lib.rados_create(ctypes.byref(handle), user.encode() if user else None),
               "rados_create")
        self.handle, self.key, self.users = handle, (conf, user), 0
        try:
            _check(lib.rados_conf_read_file(handle, conf.encode() if conf else None),
                   f"reading {conf or 'the default ceph.conf'}")
            for option in ("rados_osd_op_timeout", "rados_mon_op_timeout",
                           "client_mount_timeout"):
                lib.rados_conf_set(handle, option.encode(), RADOS_TIMEOUT_S.encode())
            # No client-side write-back cache: a write is in the cluster when it is
            # acknowledged, so a gateway that dies loses nothing another gateway must see.
            _check(lib.rados_conf_set(handle, b"rbd_cache", b"false"), "rbd_cache")
            _check(lib.rados_connect(handle), "connecting to the cluster")
        except OSError:
            lib.rados_shutdown(handle)
            raise

    @classmethod
    def acquire(cls, conf: str, user: str) -> _Cluster:
        with cls._lock:
            cluster = cls._open.get((conf, user))
            if cluster is None:
                cluster = cls._open[(conf, user)] = cls(conf, user)
            cluster.users += 1
            return cluster

    def release(self) -> None:
        with self._lock:
            self.users -= 1
            if self.users == 0:
                del self._open[self.key]
                libraries().rados.rados_shutdown(self.handle)


class RbdBackend:
    """An RBD image read and written with librbd; the Backend interface of FileBackend."""

    served_from_page_cache = False      # each request waits for the OSDs: use workers
    supports_unmap = True
    unmap_zeroes = True
    object_size = 4 << 20               # the image's, from rbd_stat when it is opened

    def __init__(self, path: str, location, cluster: _Cluster, ioctx, image, size: int,
                 read_only: bool) -> None:
        self.path, self.location = path, location
        self._cluster, self._ioctx, self._image = cluster, ioctx, image
        self.size, self.read_only = size, read_only
        self._rbd = libraries().rbd
        if read_only:
            self.supports_unmap = False

    @classmethod
    def open(cls, path: str, location, size: int | None, read_only: bool,
             block_length: int) -> RbdBackend:
        """`location`: an images.RbdImage (created by the caller when missing)."""
        lib = libraries()
        read_only = read_only or location.forced_read_only
        try:
            cluster = _Cluster.acquire(location.options.get("conf", ""),
                                       location.options.get("user", ""))
        except OSError as exc:
            raise BackendError(path, exc.strerror or str(exc)) from None
        ioctx, image = ctypes.c_void_p(), ctypes.c_void_p()
        try:
            _check(lib.rados.rados_ioctx_create(cluster.handle, location.pool.encode(),
                                                ctypes.byref(ioctx)), f"pool {location.pool}")
            if location.namespace:
                lib.rados.rados_ioctx_set_namespace(ioctx, location.namespace.encode())
            opener = lib.rbd.rbd_open_read_only if read_only else lib.rbd.rbd_open
            snapshot = location.snapshot.encode() if location.snapshot else None
            _check(opener(ioctx, location.image.encode(), ctypes.byref(image), snapshot),
                   f"image {location.image}")
            holds = ctypes.c_uint64()
            _check(lib.rbd.rbd_get_size(image, ctypes.byref(holds)), "rbd_get_size")
        except OSError as exc:
            if image.value:
                lib.rbd.rbd_close(image)
            if ioctx.value:
                lib.rados.rados_ioctx_destroy(ioctx)
            cluster.release()
            raise BackendError(path, exc.strerror or str(exc)) from None
        backend = cls(path, location, cluster, ioctx, image, 0, read_only)
        info = ImageInfo()
        if lib.rbd.rbd_stat(image, ctypes.byref(info), ctypes.sizeof(info)) == 0:
            backend.object_size = info.obj_size
        wanted = holds.value if size is None else size
        problem = None
        if wanted > holds.value:
            problem = f"image holds {holds.value} bytes, less than {wanted}"
        elif wanted - wanted % block_length <= 0:
            problem = "size is zero" + (" (Auto)" if size is None else "")
        if problem:
            backend.close()
            raise BackendError(path, problem)
        backend.size = wanted - wanted % block_length
        return backend

    @property
    def ioctx(self):
        """The image's pool (and namespace) context, for state kept next to the image."""
        return self._ioctx

    @property
    def cluster_handle(self):
        return self._cluster.handle

    # --- reads and writes (the GIL is released inside each librbd call) ------------------------

    def readinto(self, offset: int, buffer) -> int:
        view = memoryview(buffer).cast("B")
        length = len(view)
        if length:
            target = (ctypes.c_char * length).from_buffer(view)
            done = _check(self._rbd.rbd_read2(self._image, offset, length, target, 0),
                          "rbd_read2")
            if done < length:
                view[done:] = bytes(length - done)
        return length

    def read(self, offset: int, length: int) -> bytearray:
        buffer = bytearray(length)
        self.readinto(offset, buffer)
        return buffer

    def read_stable(self, offset: int, length: int) -> bytearray:
        """librbd reads what the OSDs acknowledged; a flush first makes it stable."""
        self.flush()
        return self.read(offset, length)

    def write(self, offset: int, data) -> None:
        length = len(data)
        if length:
            _check(self._rbd.rbd_write2(self._image, offset, length, _pointer(data), 0),
                   "rbd_write2")

    def write_durable(self, offset: int, data) -> None:
        self.write(offset, data)
        self.flush()

    def write_zeroes(self, offset: int, length: int, durable: bool = False) -> None:
        done = 0
        while done < length:
            count = min(_ZEROES_CHUNK, length - done)
            _check(self._rbd.rbd_write_zeroes(self._image, offset + done, count, 0, 0),
                   "rbd_write_zeroes")
            done += count
        if durable:
            self.flush()

    def unmap(self, offset: int, length: int) -> None:
        """rbd_write_zeroes: whole objects are deallocated and parts of objects zeroed
        (rbd_discard skips parts of objects by default, so they would not read zeros)."""
        self.write_zeroes(offset, length)

    def flush(self) -> None:
        if not self.read_only:
            _check(self._rbd.rbd_flush(self._image), "rbd_flush")

    def compare_and_write(self, offset: int, expected, data) -> int | None:
        """Atomic in the cluster: None when `expected` matched and `data` is written, else
        the offset of the first differing byte (nothing written). librbd does it within one
        object only: a range across an object boundary is OSError(EINVAL)."""
        length = len(data)
        first_object = offset // self.object_size
        if (offset + length - 1) // self.object_size != first_object:
            raise OSError(errno.EINVAL, "COMPARE AND WRITE across an RBD object boundary")
        mismatch = ctypes.c_uint64()
        result = self._rbd.rbd_compare_and_write(self._image, offset, length,
                                                 _pointer(expected), _pointer(data),
                                                 ctypes.byref(mismatch), 0)
        if result == -errno.EILSEQ:
            # librbd 16 reports the object's start in the image plus the offset in the
            # buffer; make it the offset in the buffer
            found = mismatch.value - first_object * self.object_size
            return min(max(found, 0), length - 1)
        _check(result, "rbd_compare_and_write")
        return None

    # --- provisioning and size -----------------------------------------------------------------

    def allocation(self, offset: int, length: int) -> tuple[bool, int]:
        """From rbd_diff_iterate2 (whole objects are the image's allocation unit)."""
        first: list[tuple[int, int, bool]] = []

        def extent(start, size, exists, _arg):
            first.append((start, size, bool(exists)))
            return -errno.ECANCELED        # the first extent is all that is needed

        callback = libraries().diff_callback(extent)
        result = self._rbd.rbd_diff_iterate2(self._image, None, offset, length, 1, 0,
                                             callback, None)
        if result < 0 and result != -errno.ECANCELED:
            raise OSError(-result, f"rbd_diff_iterate2: {os.strerror(-result)}")
        if not first:
            return False, length
        start, size, exists = first[0]
        if start > offset:
            return False, min(start - offset, length)
        return exists, min(start + size - offset, length)

    def preallocate(self) -> None:
        """Provisioning Full: RBD allocates objects as they are written."""

    def stored_size(self) -> int:
        holds = ctypes.c_uint64()
        _check(self._rbd.rbd_get_size(self._image, ctypes.byref(holds)), "rbd_get_size")
        return holds.value

    def grow(self, size: int) -> None:
        if size <= self.size:
            raise BackendError(self.path, f"{size} bytes is not larger than {self.size}")
        if self.stored_size() < size:
            raise BackendError(self.path, f"the image holds less than {size} bytes (resize it "
                                          "with `rbd resize` first)")
        self.size = size

    def close(self) -> None:
        if self._image is None:
            return
        image, self._image = self._image, None
        lib = libraries()
        try:
            if not self.read_only:
                lib.rbd.rbd_flush(image)
        finally:
            lib.rbd.rbd_close(image)
            lib.rados.rados_ioctx_destroy(self._ioctx)
            self._cluster.release()


def _pointer(data):
    """A pointer to `data`'s bytes without a copy where the buffer allows it."""
    if isinstance(data, bytes):
        return ctypes.c_char_p(data)
    view = memoryview(data).cast("B")
    if view.readonly:
        return ctypes.c_char_p(bytes(view))
    return (ctypes.c_char * len(view)).from_buffer(view)


class RbdAtomicWrites:
    """WRITE ATOMIC on an RBD image: RADOS applies each operation on one object whole or not
    at all, whichever gateway or OSD fails, so a write that stays inside one object is
    atomic without a journal. Writes start on `alignment_bytes` and are at most that long,
    which divides the object size: they never cross an object."""

    def __init__(self, backend: RbdBackend, most: int = 1 << 20) -> None:
        self.alignment_bytes = self.max_bytes = min(most, backend.object_size)

    def write(self, store, offset: int, data) -> None:
        if offset // self.alignment_bytes != (offset + len(data) - 1) // self.alignment_bytes:
            raise OSError(errno.EINVAL, "atomic write across an RBD object")
        store.write_durable(offset, data)

    def recover(self, store) -> None:
        """Nothing to replay: no journal."""

    def close(self) -> None:
        pass

