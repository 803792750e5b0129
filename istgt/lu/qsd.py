"""One supervised qemu-storage-daemon per target process, exporting disk images over NBD.

The daemon is started with the first image LU and stopped after the last one closes. Images
are added and removed over its QMP socket (blockdev-add, block-export-add), so a reload adds
or drops exports without touching the others. If the daemon dies, it is started again with
every export it had, and the NBD clients reconnect and send their unanswered requests again.

A write the daemon acknowledged without FUA or FLUSH sits in its caches (qcow2 metadata) and
may be lost if it is killed, exactly as with a power loss: the LU reports a write-back cache
(WCE=1), and SYNCHRONIZE CACHE and FUA map to NBD FLUSH and FUA.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from istgt.listen import connect_unix

log = logging.getLogger("istgt.qsd")

BINARY = "qemu-storage-daemon"
START_TIMEOUT_S = 10.0
QMP_TIMEOUT_S = 30.0
RESTART_WAIT_S = 30.0


# The target blocks SIGTERM and friends in every thread for its signal thread, and a
# child inherits the mask across exec: the daemon would never see SIGTERM. This resets it.
_UNBLOCK_SIGNALS = [sys.executable, "-I", "-S", "-c",
                    "import os, signal, sys; signal.pthread_sigmask(signal.SIG_SETMASK, ()); "
                    "os.execvp(sys.argv[1], sys.argv[1:])"]


class StorageDaemonError(OSError):
    """The daemon cannot be started, or refused to add an image (the message says why)."""


class _Qmp:
    """A QMP connection: one command at a time, events skipped."""

    def __init__(self, path: str) -> None:
        self._file = None
        self._sock = connect_unix(path, QMP_TIMEOUT_S)
        try:
            self._file = self._sock.makefile("rb")
            self._lock = threading.Lock()
            self._read()                                   # the greeting
            self.execute("qmp_capabilities")
        except BaseException:
            self.close()
            raise

    def _read(self) -> dict:
        line = self._file.readline()
        if not line:
            raise ConnectionError("qemu-storage-daemon closed its QMP socket")
        return json.loads(line)

    def execute(self, command: str, **arguments) -> dict:
        message = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        with self._lock:
            self._sock.sendall(json.dumps(message).encode() + b"\n")
            while True:
                answer = self._read()
                if "return" in answer:
                    return answer["return"]
                if "error" in answer:
                    raise StorageDaemonError(0, answer["error"].get("desc", str(answer)))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._sock.close()


class _Export:
    """One exported image: the blockdev nodes that open it (protocol first, the exported
    node last; each a blockdev-add argument dict without its node name)."""
    __slots__ = ("name", "key", "nodes", "read_only", "users")

    def __init__(self, name: str, key: str, nodes: list[dict], read_only: bool) -> None:
        self.name, self.key, self.nodes, self.read_only = name, key, nodes, read_only
        self.users = 0

    def node_name(self, index: int) -> str:
        return f"{self.name}-n{index}"


class StorageDaemon:
    """The running daemon and its exports, one per image (shared by every LU that opens the
    same image, as a reload does while the old LU still serves)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._exports: dict[str, _Export] = {}
        self._numbers = iter(range(1, 1 << 62))
        self._process: subprocess.Popen | None = None
        self._qmp: _Qmp | None = None
        self._directory: str | None = None
        self._ready = threading.Event()
        self._stopping = False
        self._restart_listeners: list = []
        self.restarts = 0

    @property
    def nbd_path(self) -> str:
        return os.path.join(self._directory, "nbd.sock")

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    # --- exports -----------------------------------------------------------------------------

    def acquire(self, key: str, nodes: list[dict], read_only: bool, describe: str) -> str:
        """The NBD export name of the image `key` (a real path, or an rbd: location), added
        with `nodes` if it is not exported yet; `describe` names it in errors."""
        with self._lock:
            export = self._exports.get(key)
            if export is None:
                if self._process is None:
                    try:
                        self._start()
                    except (OSError, ValueError) as exc:
                        if isinstance(exc, StorageDaemonError):
                            raise
                        raise StorageDaemonError(0, f"{BINARY}: {exc}") from None
                export = _Export(f"lun{next(self._numbers)}", key, nodes, read_only)
                try:
                    self._add(export, describe)
                except (OSError, ValueError) as exc:
                    if not self._exports:
                        self._stop()          # started for this image alone
                    if isinstance(exc, StorageDaemonError):
                        raise
                    raise StorageDaemonError(0, f"{describe}: {BINARY}: {exc}") from None
                self._exports[key] = export
            elif export.read_only and not read_only:
                raise StorageDaemonError(0, f"{describe}: already exported read-only")
            export.users += 1
            return export.name

    def release(self, key: str) -> None:
        with self._lock:
            export = self._exports.get(key)
            if export is None:
                return
            export.users -= 1
            if export.users > 0:
                return
            del self._exports[key]
            try:
                self._remove(export)
            except (OSError, ValueError) as exc:
                log.warning("%s: removing its export: %s", export.key, exc)
            if not self._exports:
                self._stop()

    def resize(self, key: str, size: int, describe: str) -> None:
        """Grow an exported image to `size` bytes. An NBD export never changes size, so it
        is removed, the image grown and the export added again; its clients reconnect."""
        with self._lock:
            export = self._exports[key]
            self._qmp.execute("block-export-del", id=export.name, mode="hard")
            self._wait_export_gone(export)
            try:
                self._qmp.execute("block_resize", **{"node-name": export.node_name(
                    len(export.nodes) - 1)}, size=size)
            finally:
                self._qmp.execute("block-export-add", type="nbd", id=export.name,
                                  **{"node-name": export.node_name(len(export.nodes) - 1)},
                                  name=export.name, writable=not export.read_only)

    def _wait_export_gone(self, export: _Export) -> None:
        deadline = time.monotonic() + 5
        while any(e.get("id") == export.name for e in self._qmp.execute("query-block-exports")):
            if time.monotonic() > deadline:
                raise StorageDaemonError(0, f"export {export.name} did not go away")
            time.sleep(0.02)

    def _add(self, export: _Export, describe: str) -> None:
        qmp = self._qmp
        added: list[str] = []
        try:
            for index, node in enumerate(export.nodes):
                arguments = dict(node, **{"node-name": export.node_name(index)})
                if index:
                    arguments["file"] = export.node_name(index - 1)
                qmp.execute("blockdev-add", **arguments)
                added.append(export.node_name(index))
            qmp.execute("block-export-add", type="nbd", id=export.name,
                        **{"node-name": added[-1]}, name=export.name,
                        writable=not export.read_only)
        except StorageDaemonError as exc:
            for node in reversed(added):
                try:
                    qmp.execute("blockdev-del", **{"node-name": node})
                except StorageDaemonError:
                    pass
            raise StorageDaemonError(0, _explain(describe, str(exc))) from None

    def _remove(self, export: _Export) -> None:
        qmp = self._qmp
        if qmp is None:
            return
        qmp.execute("block-export-del", id=export.name, mode="hard")
        # The export goes away asynchronously; its nodes can be deleted once it has.
        for index in reversed(range(len(export.nodes))):
            deadline = time.monotonic() + 5
            while True:
                try:
                    qmp.execute("blockdev-del", **{"node-name": export.node_name(index)})
                    break
                except StorageDaemonError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)

    # --- the process -------------------------------------------------------------------------

    def _start(self) -> None:
        if shutil.which(BINARY) is None:
            raise StorageDaemonError(0, f"disk image LUs need {BINARY}, which is not installed "
                                        "(Debian: apt-get install qemu-system-common)")
        self._directory = tempfile.mkdtemp(prefix="istgt-qsd-")
        self._stopping = False
        outcome: queue.Queue = queue.Queue()
        threading.Thread(target=self._supervise, args=(outcome,), name="qsd-supervisor",
                         daemon=True).start()
        error = outcome.get()
        if error is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            raise error
        self._ready.set()

    def _spawn(self) -> None:
        directory = self._directory
        qmp_path = os.path.join(directory, "qmp.sock")
        for stale in (qmp_path, self.nbd_path):
            if os.path.exists(stale):
                os.unlink(stale)
        command = [
            "setpriv", "--pdeathsig", "TERM", "--",     # util-linux: dies with its parent
            *_UNBLOCK_SIGNALS,
            BINARY,
            "--chardev", f"socket,id=qmp0,path={qmp_path},server=on,wait=off",
            "--monitor", "chardev=qmp0",
            "--nbd-server", f"addr.type=unix,addr.path={self.nbd_path}",
            "--pidfile", os.path.join(directory, "qsd.pid"),
        ]
        with open(self._stderr_path, "ab") as stderr:     # a file: a pipe could fill up
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=stderr,
                                       start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                self._qmp = _Qmp(qmp_path)
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    process.kill()
                    process.wait()
                    error = self._last_error()
                    raise StorageDaemonError(0, f"{BINARY} did not start: {error or 'timeout'}")
                time.sleep(0.01)
        self._process = process
        log.info("%s started (pid %d)", BINARY, process.pid)

    @property
    def _stderr_path(self) -> str:
        return os.path.join(self._directory, "stderr.log")

    def _last_error(self) -> str:
        try:
            with open(self._stderr_path, "rb") as f:
                lines = f.read().decode(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return lines[-1] if lines else ""

    def _supervise(self, outcome: queue.Queue) -> None:
        """Start the daemon, then start it again whenever it dies while exports remain.
        This thread lives as long as the daemon and is the one that spawns it: the daemon
        gets SIGTERM when its spawning thread ends (PR_SET_PDEATHSIG), so it never outlives
        a target that was killed."""
        try:
            self._spawn()
        except StorageDaemonError as exc:
            outcome.put(exc)
            return
        outcome.put(None)
        process = self._process
        while process is not None:
            status = process.wait()
            with self._lock:
                if self._stopping or self._process is not process:
                    return
                self._ready.clear()
                error = self._last_error()
                log.error("%s (pid %d) exited with status %d%s; starting it again", BINARY,
                          process.pid, status, f": {error}" if error else "")
                self.restarts += 1
                for callback in list(self._restart_listeners):
                    callback()             # what the dead daemon held in memory is gone
            process = self._restart(process)

    def _restart(self, dead: subprocess.Popen) -> subprocess.Popen | None:
        """Start the daemon again with every export, retrying each second until it works
        or the daemon is stopped; the running process, or None when stopped."""
        while True:
            with self._lock:
                if self._stopping:
                    return None
                try:
                    if self._qmp is not None:
                        self._qmp.close()
                        self._qmp = None
                    self._spawn()
                    for export in self._exports.values():
                        self._add(export, export.key)
                    self._ready.set()
                    return self._process
                except (OSError, ValueError) as exc:
                    log.error("%s could not be started again: %s", BINARY, exc)
                    if self._process is not dead and self._process is not None:
                        self._process.kill()         # half set up: start over
                        self._process.wait()
                    self._process = dead
            time.sleep(1)

    def add_restart_listener(self, callback) -> None:
        """`callback()` runs (under the daemon's lock) each time the daemon died."""
        with self._lock:
            self._restart_listeners.append(callback)

    def remove_restart_listener(self, callback) -> None:
        with self._lock:
            if callback in self._restart_listeners:
                self._restart_listeners.remove(callback)

    def wait_ready(self) -> None:
        """For NBD clients whose connection broke: return once the exports are back."""
        if not self._ready.wait(RESTART_WAIT_S):
            raise StorageDaemonError(0, f"{BINARY} is not back after {RESTART_WAIT_S:.0f} s")

    def _stop(self) -> None:
        self._stopping = True
        self._ready.clear()
        process, self._process = self._process, None
        if process is None:
            return
        try:
            self._qmp.execute("quit")
        except (OSError, ValueError):
            process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        self._qmp.close()
        self._qmp = None
        shutil.rmtree(self._directory, ignore_errors=True)
        log.info("%s stopped", BINARY)


def _explain(describe: str, message: str) -> str:
    if "lock" in message.lower():
        return (f"{describe}: the image is locked by another process (in use by another "
                f"qemu or target?): {message}")
    return f"{describe}: {message}"


# One per process: every image LU of this target shares it.
daemon = StorageDaemon()
