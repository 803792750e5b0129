"""Disk image LUs (.vdi .vhd .vmdk .qcow .qcow2 .qed .vhdx, chosen by extension as istgt
does) and Ceph RBD images (rbd:pool/image, QEMU's form): the image is created with qemu-img
when missing and served by the process's qemu-storage-daemon (istgt/lu/qsd.py) over NBD
(istgt/lu/nbd.py).

The backend answers the same interface as FileBackend. UNMAP becomes NBD WRITE_ZEROES that
may deallocate: every format reads zeros back after it (TRIM would not on most formats), and
raw and qcow2 free the space.
"""

from __future__ import annotations

import os
import subprocess
import threading

from istgt.lu import nbd
from istgt.lu.backends import BackendError
from istgt.lu.qsd import StorageDaemonError, daemon
from istgt.lu.rbd import RbdBackend

# Extension -> qemu block driver.
FORMATS = {
    ".vdi": "vdi", ".vhd": "vpc", ".vmdk": "vmdk", ".qcow": "qcow", ".qcow2": "qcow2",
    ".qed": "qed", ".vhdx": "vhdx",
}
# Options that make the created image hold exactly the size asked for.
_CREATE_OPTIONS = {"vpc": ["-o", "force_size=on"]}
_ZEROES_CHUNK = 1 << 30            # NBD lengths are 32-bit
_RBD_OPTIONS = {"id": "user", "conf": "conf"}     # rbd: options -> blockdev rbd keys
# RBD LUs go through librbd (measured faster, doc/BACKENDS.md); =nbd sends them through
# qemu-storage-daemon's rbd driver instead (the benchmark's comparison, or a fallback).
RBD_PATH_VARIABLE = "ISTGT_RBD_PATH"


def image_format(path: str) -> str | None:
    """The qemu driver for an image path, or None for a plain file or device."""
    return FORMATS.get(os.path.splitext(path)[1].lower())


def image_location(path: str) -> FileImage | RbdImage | None:
    """What a `LUNn Storage` path names when it is not a plain file or device."""
    if path.startswith("rbd:"):
        return RbdImage.parse(path)
    fmt = image_format(path)
    return FileImage(path, fmt) if fmt else None


def _qemu_img(args: list[str], what: str, timeout: float = 120) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["qemu-img", *args], capture_output=True, text=True,
                              timeout=timeout)
    except FileNotFoundError:
        raise BackendError(what, "disk images need qemu-img, which is not installed "
                                 "(Debian: apt-get install qemu-utils)") from None
    except subprocess.TimeoutExpired:
        raise BackendError(what, f"qemu-img {args[0]} did not answer in {timeout:.0f} s")


class FileImage:
    """An image file in one of FORMATS."""

    def __init__(self, path: str, fmt: str) -> None:
        self.path, self.format = path, fmt
        self.key = os.path.realpath(path)
        self.forced_read_only = False

    def nodes(self, read_only: bool) -> list[dict]:
        return [{"driver": "file", "filename": self.key, "aio": "threads",
                 "cache": {"direct": False}, "discard": "unmap", "read-only": read_only},
                {"driver": self.format, "discard": "unmap", "read-only": read_only}]

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def create(self, size: int) -> None:
        result = _qemu_img(["create", "-q", "-f", self.format,
                            *_CREATE_OPTIONS.get(self.format, []), self.path, str(size)],
                           self.path)
        if result.returncode != 0:
            raise BackendError(self.path, f"qemu-img create failed: {result.stderr.strip()}")


class RbdImage:
    """A Ceph RBD image in QEMU's form: rbd:pool/[namespace/]image[@snap][:id=..][:conf=..]
    (a snapshot is served read-only)."""

    def __init__(self, path: str, pool: str, namespace: str, image: str, snapshot: str | None,
                 options: dict[str, str]) -> None:
        self.path, self.pool, self.namespace, self.image = path, pool, namespace, image
        self.snapshot, self.options = snapshot, options
        self.format = "rbd"
        self.key = path
        self.forced_read_only = snapshot is not None

    @classmethod
    def parse(cls, path: str) -> RbdImage:
        fields = _split_unescaped(path[len("rbd:"):], ":")
        name, options = fields[0], {}
        for field in fields[1:]:
            key, equals, value = field.partition("=")
            if not equals or key not in _RBD_OPTIONS:
                raise BackendError(path, f"unknown rbd option {field!r} (id= and conf= are "
                                         "understood; put other settings in the ceph.conf)")
            options[_RBD_OPTIONS[key]] = value
        name, _, snapshot = name.partition("@")
        parts = name.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise BackendError(path, "expected rbd:pool/[namespace/]image[@snapshot]")
        pool, image = parts[0], parts[-1]
        namespace = parts[1] if len(parts) == 3 else ""
        return cls(path, pool, namespace, image, snapshot or None, options)

    def nodes(self, read_only: bool) -> list[dict]:
        node = {"driver": "rbd", "pool": self.pool, "image": self.image,
                "cache": {"direct": True}, "discard": "unmap",
                "read-only": read_only or self.forced_read_only, **self.options}
        if self.namespace:
            node["namespace"] = self.namespace
        if self.snapshot:
            node["snapshot"] = self.snapshot
        return [node]

    def exists(self) -> bool:
        result = _qemu_img(["info", self.path], self.path, timeout=60)
        if result.returncode == 0:
            return True
        if "No such file or directory" in result.stderr:
            return False
        raise BackendError(self.path, f"cannot reach the image: {result.stderr.strip()}")

    def create(self, size: int) -> None:
        if self.snapshot:
            raise BackendError(self.path, "no such snapshot (snapshots are never created)")
        result = _qemu_img(["create", "-q", "-f", "raw", self.path, str(size)], self.path)
        if result.returncode != 0:
            raise BackendError(self.path, f"creating the RBD image failed: "
                                          f"{result.stderr.strip()}")


def _split_unescaped(text: str, separator: str) -> list[str]:
    """Split on `separator` except where a backslash escapes it (QEMU's rbd: syntax)."""
    fields, current, escaped = [], [], False
    for char in text:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == separator:
            fields.append("".join(current))
            current = []
        else:
            current.append(char)
    fields.append("".join(current))
    return fields


class ImageBackend:
    """A disk image exported by the storage daemon, read and written over NBD."""

    served_from_page_cache = False      # every request waits for the daemon: use workers

    def __init__(self, path: str, location, client: nbd.NbdClient, size: int,
                 read_only: bool) -> None:
        self.path = path
        self.location = location
        self.size = size
        self.read_only = read_only
        self._client = client
        # Written since the last FLUSH: what a daemon that dies takes with it (qcow2
        # metadata). Its death then reaches the LU's nexuses as a power-on attention.
        self._count_lock = threading.Lock()
        self._completed_writes = 0        # guarded by _count_lock
        self._flushed_writes = 0          # completed before a FLUSH that succeeded
        self.on_cache_lost = None         # set by the device: () -> None
        daemon.add_restart_listener(self._daemon_died)
        flags = client.export.flags
        self._fua = bool(flags & nbd.FLAG_SEND_FUA)
        self.supports_unmap = bool(flags & nbd.FLAG_SEND_WRITE_ZEROES) and not read_only
        self.unmap_zeroes = True

    @classmethod
    def open(cls, path: str, size: int | None, read_only: bool,
             block_length: int = 1) -> ImageBackend | RbdBackend:
        """The store for an image path: files through qemu-storage-daemon, RBD images
        through librbd."""
        location = image_location(path)
        if location is None:
            raise BackendError(path, "not a disk image extension or rbd: location")
        read_only = read_only or location.forced_read_only
        if not location.exists():
            if read_only:
                raise BackendError(path, "no such image (a ReadOnly LU never creates it)")
            if size is None:
                raise BackendError(path, "no such image (Auto size needs an existing one)")
            location.create(size)
        if isinstance(location, RbdImage) and os.environ.get(RBD_PATH_VARIABLE) != "nbd":
            return RbdBackend.open(path, location, size, read_only, block_length)
        try:
            name = daemon.acquire(location.key, location.nodes(read_only), read_only, path)
        except StorageDaemonError as exc:
            raise BackendError(path, exc.strerror or str(exc)) from None
        try:
            client = nbd.NbdClient(daemon.nbd_path, name, reconnect=daemon.wait_ready)
        except OSError as exc:
            daemon.release(location.key)
            raise BackendError(path, f"cannot connect to its NBD export: {exc}") from None
        holds = client.export.size
        wanted = holds if size is None else size
        problem = None
        if wanted > holds:
            problem = f"image holds {holds} bytes, less than {wanted}"
        elif wanted - wanted % block_length <= 0:
            problem = "size is zero" + (" (Auto)" if size is None else "")
        if problem:
            client.close()
            daemon.release(location.key)
            raise BackendError(path, problem)
        return cls(path, location, client, wanted - wanted % block_length, read_only)

    # --- reads ---------------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytearray:
        buffer = bytearray(length)
        self.readinto(offset, buffer)
        return buffer

    def readinto(self, offset: int, buffer: bytearray | memoryview) -> int:
        view = memoryview(buffer).cast("B")
        if view:
            self._client.request(nbd.CMD_READ, offset, len(view), into=view)
        return len(view)

    def read_stable(self, offset: int, length: int) -> bytearray:
        """FUA read: what the image holds once everything written before is stable."""
        self.flush()
        return self.read(offset, length)

    # --- writes --------------------------------------------------------------------------------

    def write(self, offset: int, data) -> None:
        if len(data):
            self._client.request(nbd.CMD_WRITE, offset, len(data), payload=data)
            self._completed()

    def write_durable(self, offset: int, data) -> None:
        if not self._fua:
            self.write(offset, data)
            self.flush()
            return
        self._client.request(nbd.CMD_WRITE, offset, len(data), nbd.CMD_FLAG_FUA, payload=data)

    def _completed(self) -> None:
        with self._count_lock:
            self._completed_writes += 1

    def _daemon_died(self) -> None:
        with self._count_lock:
            lost = self._completed_writes > self._flushed_writes
        if lost and self.on_cache_lost is not None:
            self.on_cache_lost()

    def write_zeroes(self, offset: int, length: int, durable: bool = False) -> None:
        self._zeroes(offset, length, nbd.CMD_FLAG_NO_HOLE, durable)

    def unmap(self, offset: int, length: int) -> None:
        self._zeroes(offset, length, 0, False)     # may deallocate, always reads zeros

    def _zeroes(self, offset: int, length: int, flags: int, durable: bool) -> None:
        if durable and self._fua:
            flags |= nbd.CMD_FLAG_FUA
        done = 0
        while done < length:
            count = min(_ZEROES_CHUNK, length - done)
            self._client.request(nbd.CMD_WRITE_ZEROES, offset + done, count, flags)
            if not flags & nbd.CMD_FLAG_FUA:
                self._completed()
            done += count
        if durable and not self._fua:
            self.flush()

    def flush(self) -> None:
        if not self.read_only:
            with self._count_lock:
                covered = self._completed_writes   # a FLUSH covers what completed before it
            self._client.request(nbd.CMD_FLUSH, 0, 0)
            with self._count_lock:
                self._flushed_writes = max(self._flushed_writes, covered)

    # --- provisioning and size -----------------------------------------------------------------

    def allocation(self, offset: int, length: int) -> tuple[bool, int]:
        return self._client.block_status(offset, length)

    def preallocate(self) -> None:
        """Provisioning Full: images allocate as they are written; nothing to do now."""

    def stored_size(self) -> int:
        return self._client.export.size

    def grow(self, size: int) -> None:
        """Expose `size` bytes: the image is grown first when it holds fewer (qemu's resize
        of the format node: qcow2, raw, vdi, vhdx ... each as the format allows)."""
        if size <= self.size:
            raise BackendError(self.path, f"{size} bytes is not larger than {self.size}")
        if self.read_only:
            raise BackendError(self.path, "read-only: cannot grow")
        if self._client.export.size < size:
            try:
                daemon.resize(self.location.key, size, self.path)
                self._client.reconnect_now()
            except OSError as exc:
                raise BackendError(self.path, f"cannot grow to {size} bytes: {exc}") from None
        if self._client.export.size < size:
            raise BackendError(self.path, f"holds {self._client.export.size} bytes, "
                                          f"less than {size}")
        self.size = size

    def close(self) -> None:
        if self._client is None:
            return
        client, self._client = self._client, None
        try:
            if not self.read_only:
                client.request(nbd.CMD_FLUSH, 0, 0)
        finally:
            daemon.remove_restart_listener(self._daemon_died)
            client.close()
            daemon.release(self.location.key)
