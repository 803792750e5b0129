"""A thin ctypes binding to libiscsi (Debian's libiscsi7): a real initiator library for data
round trips that qemu-img cannot do, such as mutual CHAP (qemu's iscsi driver sends no target
credentials). Only entry points whose signatures are part of libiscsi's public headers are
used; the one struct field read is `scsi_task.status`, the struct's first member.
"""

from __future__ import annotations

import ctypes
import ctypes.util

ISCSI_SESSION_NORMAL = 2
HEADER_DIGEST_NONE, HEADER_DIGEST_CRC32C = 0, 3
SCSI_STATUS_GOOD = 0


class LibiscsiError(Exception):
    pass


def _load() -> ctypes.CDLL:
    name = ctypes.util.find_library("iscsi") or "libiscsi.so.7"
    lib = ctypes.CDLL(name)
    vp, cp, i, u32, u64 = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint32, \
        ctypes.c_uint64
    for fn, args, res in (
        ("iscsi_create_context", [cp], vp),
        ("iscsi_destroy_context", [vp], i),
        ("iscsi_set_targetname", [vp, cp], i),
        ("iscsi_set_session_type", [vp, i], i),
        ("iscsi_set_header_digest", [vp, i], i),
        ("iscsi_set_initiator_username_pwd", [vp, cp, cp], i),
        ("iscsi_set_target_username_pwd", [vp, cp, cp], i),
        ("iscsi_full_connect_sync", [vp, cp, i], i),
        ("iscsi_logout_sync", [vp], i),
        ("iscsi_get_error", [vp], cp),
        ("scsi_cdb_read16", [u64, u32, i, i, i, i, i, i], vp),
        ("scsi_cdb_write16", [u64, u32, i, i, i, i, i, i], vp),
        ("scsi_task_add_data_in_buffer", [vp, i, ctypes.c_void_p], i),
        ("iscsi_scsi_command_sync", [vp, i, vp, vp], vp),
        ("scsi_free_scsi_task", [vp], None),
    ):
        f = getattr(lib, fn)
        f.argtypes, f.restype = args, res
    return lib


class _Data(ctypes.Structure):          # struct iscsi_data
    _fields_ = [("size", ctypes.c_size_t), ("data", ctypes.c_void_p)]


class Session:
    def __init__(self, portal: str, target: str, lun: int = 0, *, user: str = "",
                 secret: str = "", target_user: str = "", target_secret: str = "",
                 header_digest: bool = False,
                 initiator: str = "iqn.2024-01.org.example:libiscsi-client"):
        self.lib = _load()
        self.lun = lun
        ctx = self.lib.iscsi_create_context(initiator.encode())
        if not ctx:
            raise LibiscsiError("iscsi_create_context failed")
        self.ctx = ctx
        lib = self.lib
        lib.iscsi_set_targetname(ctx, target.encode())
        lib.iscsi_set_session_type(ctx, ISCSI_SESSION_NORMAL)
        lib.iscsi_set_header_digest(ctx, HEADER_DIGEST_CRC32C if header_digest
                                    else HEADER_DIGEST_NONE)
        if user:
            lib.iscsi_set_initiator_username_pwd(ctx, user.encode(), secret.encode())
        if target_user:
            lib.iscsi_set_target_username_pwd(ctx, target_user.encode(), target_secret.encode())
        if lib.iscsi_full_connect_sync(ctx, portal.encode(), lun) != 0:
            error = self.error()
            lib.iscsi_destroy_context(ctx)
            self.ctx = None
            raise LibiscsiError(f"login to {target} failed: {error}")

    def error(self) -> str:
        return (self.lib.iscsi_get_error(self.ctx) or b"").decode(errors="replace")

    def _run(self, task, data: _Data | None) -> None:
        if not task:
            raise LibiscsiError("could not build the CDB")
        try:
            done = self.lib.iscsi_scsi_command_sync(
                self.ctx, self.lun, task, ctypes.byref(data) if data is not None else None)
            if not done:
                raise LibiscsiError(f"command failed: {self.error()}")
            status = ctypes.c_int.from_address(done).value      # scsi_task.status
            if status != SCSI_STATUS_GOOD:
                raise LibiscsiError(f"SCSI status {status:#x}: {self.error()}")
        finally:
            self.lib.scsi_free_scsi_task(task)

    def write16(self, lba: int, data: bytes, block_size: int = 512, fua: bool = False) -> None:
        buf = ctypes.create_string_buffer(data, len(data))
        task = self.lib.scsi_cdb_write16(lba, len(data), block_size, 0, 0, int(fua), 0, 0)
        self._run(task, _Data(len(data), ctypes.cast(buf, ctypes.c_void_p)))

    def read16(self, lba: int, length: int, block_size: int = 512) -> bytes:
        buf = ctypes.create_string_buffer(length)
        task = self.lib.scsi_cdb_read16(lba, length, block_size, 0, 0, 0, 0, 0)
        if task and self.lib.scsi_task_add_data_in_buffer(task, length,
                                                          ctypes.cast(buf, ctypes.c_void_p)):
            self.lib.scsi_free_scsi_task(task)
            raise LibiscsiError("scsi_task_add_data_in_buffer failed")
        self._run(task, None)
        return buf.raw

    def close(self) -> None:
        if self.ctx:
            self.lib.iscsi_logout_sync(self.ctx)
            self.lib.iscsi_destroy_context(self.ctx)
            self.ctx = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
