"""Disk image LUs (.vdi .vhd .vmdk .qcow .qcow2 .qed .vhdx, chosen by extension as istgt
does): the image is created with qemu-img when missing and served by the process's
qemu-storage-daemon (istgt/lu/qsd.py) over NBD (istgt/lu/nbd.py).

The backend answers the same interface as FileBackend. UNMAP becomes NBD WRITE_ZEROES that
may deallocate: every format reads zeros back after it (TRIM would not on most formats), and
raw and qcow2 free the space.
"""

from __future__ import annotations

import os
import subprocess

from istgt.lu import nbd
from istgt.lu.backends import BackendError
from istgt.lu.qsd import StorageDaemonError, daemon

# Extension -> qemu block driver.
FORMATS = {
    ".vdi": "vdi", ".vhd": "vpc", ".vmdk": "vmdk", ".qcow": "qcow", ".qcow2": "qcow2",
    ".qed": "qed", ".vhdx": "vhdx",
}
# Options that make the created image hold exactly the size asked for.
_CREATE_OPTIONS = {"vpc": ["-o", "force_size=on"]}
_ZEROES_CHUNK = 1 << 30            # NBD lengths are 32-bit


def image_format(path: str) -> str | None:
    """The qemu driver for an image path, or None for a plain file or device."""
    return FORMATS.get(os.path.splitext(path)[1].lower())


def create_image(path: str, fmt: str, size: int) -> None:
    command = ["qemu-img", "create", "-q", "-f", fmt, *_CREATE_OPTIONS.get(fmt, []), path,
               str(size)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise BackendError(path, "creating a disk image needs qemu-img, which is not "
                                 "installed (Debian: apt-get install qemu-utils)") from None
    if result.returncode != 0:
        raise BackendError(path, f"qemu-img create failed: {result.stderr.strip()}")


class ImageBackend:
    """A disk image exported by the storage daemon, read and written over NBD."""

    served_from_page_cache = False      # every request waits for the daemon: use workers

    def __init__(self, path: str, fmt: str, client: nbd.NbdClient, size: int,
                 read_only: bool) -> None:
        self.path = path
        self.format = fmt
        self.size = size
        self.read_only = read_only
        self._client = client
        flags = client.export.flags
        self._fua = bool(flags & nbd.FLAG_SEND_FUA)
        self.supports_unmap = bool(flags & nbd.FLAG_SEND_WRITE_ZEROES) and not read_only
        self.unmap_zeroes = True

    @classmethod
    def open(cls, path: str, size: int | None, read_only: bool,
             block_length: int = 1) -> ImageBackend:
        fmt = image_format(path)
        if fmt is None:
            raise BackendError(path, "not a disk image extension")
        if not os.path.exists(path):
            if read_only:
                raise BackendError(path, "no such image (a ReadOnly LU never creates it)")
            if size is None:
                raise BackendError(path, "no such image (Auto size needs an existing one)")
            create_image(path, fmt, size)
        try:
            name = daemon.acquire(path, fmt, read_only)
        except StorageDaemonError as exc:
            raise BackendError(path, exc.strerror or str(exc)) from None
        try:
            client = nbd.NbdClient(daemon.nbd_path, name, reconnect=daemon.wait_ready)
        except OSError as exc:
            daemon.release(path)
            raise BackendError(path, f"cannot connect to its NBD export: {exc}") from None
        holds = client.export.size
        wanted = holds if size is None else size
        if wanted > holds:
            client.close()
            daemon.release(path)
            raise BackendError(path, f"image holds {holds} bytes, less than {wanted}")
        usable = wanted - wanted % block_length
        if usable <= 0:
            client.close()
            daemon.release(path)
            raise BackendError(path, "size is zero" + (" (Auto)" if size is None else ""))
        return cls(path, fmt, client, usable, read_only)

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

    def write_durable(self, offset: int, data) -> None:
        if not self._fua:
            self.write(offset, data)
            self.flush()
            return
        self._client.request(nbd.CMD_WRITE, offset, len(data), nbd.CMD_FLAG_FUA, payload=data)

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
            done += count
        if durable and not self._fua:
            self.flush()

    def flush(self) -> None:
        if not self.read_only:
            self._client.request(nbd.CMD_FLUSH, 0, 0)

    # --- provisioning and size -----------------------------------------------------------------

    def allocation(self, offset: int, length: int) -> tuple[bool, int]:
        return self._client.block_status(offset, length)

    def preallocate(self) -> None:
        """Provisioning Full: images allocate as they are written; nothing to do now."""

    def stored_size(self) -> int:
        return self._client.export.size

    def grow(self, size: int) -> None:
        raise BackendError(self.path, "growing a disk image online is not supported "
                                      "(resize it with qemu-img while the LU is unloaded)")

    def close(self) -> None:
        if self._client is None:
            return
        client, self._client = self._client, None
        try:
            if not self.read_only:
                client.request(nbd.CMD_FLUSH, 0, 0)
        finally:
            client.close()
            daemon.release(self.path)
