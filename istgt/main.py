"""The istgt command: flags, start-up, pid file, daemon mode and signals.

Start-up order (each failure prints a message and exits 1 in the caller's process):
read the config, set up logging, lock the pid file, build the server and open its portals,
detach (unless -D), write the pid, then serve until SIGTERM/SIGINT/SIGQUIT.

In daemon mode the caller's process waits on a pipe until the daemon reports "ready" or an
error, so a failure after the fork still reaches the caller's exit status (C istgt bug B28).
"""

from __future__ import annotations

import dataclasses
import enum
import fcntl
import getopt
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any, Protocol

from istgt import EXTRA_VERSION, __version__, log
from istgt.config import ConfigError, load_config

logger = logging.getLogger("istgt.main")

DEFAULT_CONFIG = "/usr/local/etc/istgt/istgt.conf"
DEBIAN_CONFIG = "/etc/istgt/istgt.conf"
DEFAULT_PID_FILE = "/var/run/istgt.pid"
OPTIONS = "c:p:l:m:t:qDHV"


class Mode(enum.IntEnum):
    """-m: how connections send their responses (istgt-core.md 5.6)."""

    TRADITIONAL = 0
    NORMAL = 1
    EXPERIMENTAL = 2

    @property
    def label(self) -> str:
        return f"{self.name.lower()} mode"


def default_config_path(exists: Callable[[str], bool] = os.path.exists) -> str:
    """Upstream's default, or Debian's when only that one is installed."""
    if not exists(DEFAULT_CONFIG) and exists(DEBIAN_CONFIG):
        return DEBIAN_CONFIG
    return DEFAULT_CONFIG


def usage() -> str:
    return (
        "Usage: istgt [options]\n"
        "options:\n"
        f" -c config  config file (default {default_config_path()})\n"
        " -p pidfile use specific file (overrides PidFile)\n"
        " -l facility use specific syslog facility (overrides LogFacility)\n"
        " -m mode    operational mode (default 1, 0=traditional, 1=normal, 2=experimental)\n"
        " -t flag    trace flag (all, net, iscsi, scsi, lu, none)\n"
        " -q         quiet warnings\n"
        " -D         don't detach from tty\n"
        " -H         show this usage\n"
        " -V         show version\n"
    )


def version_text() -> str:
    return f"istgt version {__version__}\nistgt extra version {EXTRA_VERSION}\n"


@dataclasses.dataclass(frozen=True)
class Options:
    config_path: str
    pid_file: str | None = None
    facility: str | None = None
    mode: Mode = Mode.NORMAL
    trace: log.TraceFlag = log.TraceFlag.NONE
    quiet: bool = False
    foreground: bool = False


class UsageError(Exception):
    """A bad command line: the message, then the usage text, exit 1."""


class EarlyExit(Exception):
    """-H or -V: print ``text`` on stdout and exit 0."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


def parse_args(argv: list[str]) -> Options:
    """Parse istgt's flags; raises UsageError or EarlyExit (for -H and -V)."""
    try:
        pairs, rest = getopt.getopt(argv, OPTIONS)
    except getopt.GetoptError as exc:
        raise UsageError(str(exc)) from None
    if rest:
        raise UsageError(f"unexpected argument {rest[0]!r}")
    values: dict[str, Any] = {}
    trace = log.TraceFlag.NONE
    for flag, value in pairs:
        if flag == "-H":
            raise EarlyExit(usage())
        if flag == "-V":
            raise EarlyExit(version_text())
        if flag == "-c":
            values["config_path"] = value
        elif flag == "-p":
            values["pid_file"] = value
        elif flag == "-l":
            try:
                log.parse_facility(value)
            except log.LogSetupError as exc:
                raise UsageError(str(exc)) from None
            values["facility"] = value
        elif flag == "-m":
            values["mode"] = _parse_mode(value)
        elif flag == "-t":
            try:
                trace = log.parse_trace_flag(value, trace)
            except log.LogSetupError as exc:
                raise UsageError(str(exc)) from None
        elif flag == "-q":
            values["quiet"] = True
        elif flag == "-D":
            values["foreground"] = True
    values.setdefault("config_path", default_config_path())
    return Options(trace=trace, **values)


def _parse_mode(text: str) -> Mode:
    try:
        return Mode(int(text))
    except ValueError:
        raise UsageError(f"unknown mode {text}") from None


# --- pid file -------------------------------------------------------------------------------


class AlreadyRunning(Exception):
    def __init__(self, path: str, pid: int | None) -> None:
        holder = f"pid {pid}" if pid is not None else f"{path} is locked"
        super().__init__(f"istgt already running ({holder})")
        self.pid = pid


class PidFile:
    """A pid file locked with flock(2) for the life of the process.

    The lock belongs to the open file description, so it survives fork(): taking it before
    detaching makes "already running" a plain error in the caller. A file that nobody holds
    locked is stale and is taken over.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> int | None:
        """Lock the file; returns the pid a stale file named (None if it named none)."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                raise AlreadyRunning(self.path, holder) from None
            except BaseException:
                os.close(fd)
                raise
            if self._is_current(fd):
                break
            os.close(fd)  # the previous holder removed it while we waited: lock the new one
        self._fd = fd
        stale = _read_pid(fd)
        os.ftruncate(fd, 0)
        return stale

    def write(self, pid: int) -> None:
        fd = self.fileno()
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{pid}\n".encode(), 0)

    def fileno(self) -> int:
        if self._fd is None:
            raise RuntimeError(f"pid file {self.path} is not locked")
        return self._fd

    def release(self) -> None:
        """Remove the file (while still holding the lock), then unlock it."""
        if self._fd is None:
            return
        try:
            if self._is_current(self._fd):
                os.unlink(self.path)
        except OSError as exc:
            logger.warning("cannot remove pid file %s: %s", self.path, exc)
        finally:
            os.close(self._fd)
            self._fd = None

    def _is_current(self, fd: int) -> bool:
        try:
            on_disk = os.stat(self.path)
        except FileNotFoundError:
            return False
        held = os.fstat(fd)
        return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None


# --- daemon mode ----------------------------------------------------------------------------


class StartupReport:
    """How the process that serves tells the one that started it how start-up ended.

    In the foreground they are the same process and there is nothing to tell.
    """

    def ready(self) -> None:
        """Start-up is complete."""

    def fail(self, message: str) -> None:
        """Start-up failed with ``message``."""


class _PipeReport(StartupReport):
    """The daemon's end of the pipe the caller's process waits on."""

    def __init__(self, write_fd: int) -> None:
        self._fd: int | None = write_fd

    def ready(self) -> None:
        self._send(b"ready\n")

    def fail(self, message: str) -> None:
        self._send(f"error {message}\n".encode())

    def _send(self, data: bytes) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, data)
        except OSError:
            pass  # the caller is gone: nobody is left to tell
        finally:
            os.close(self._fd)
            self._fd = None


def detach(keep_fds: set[int]) -> StartupReport:
    """Become a daemon; returns only in the daemon.

    The caller's process forks, then waits for the daemon's report and exits 0 on "ready",
    1 on an error (printed) or when the daemon dies without a word.
    """
    import daemon  # python-daemon: imported here, foreground runs never need it

    read_fd, write_fd = os.pipe()
    child = os.fork()
    if child:
        os.close(write_fd)
        code = _await_report(read_fd)
        os.waitpid(child, 0)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # the daemon owns the pid file, sockets and disks now
    os.close(read_fd)
    context = daemon.DaemonContext(
        working_directory=os.getcwd(),  # relative paths in the config keep working
        umask=0o022,
        detach_process=True,
        files_preserve=sorted(keep_fds | {write_fd}),
        signal_map={},  # run() installs istgt's own handlers
    )
    try:
        context.open()
    except Exception as exc:
        _PipeReport(write_fd).fail(f"cannot become a daemon: {exc}")
        os._exit(1)
    return _PipeReport(write_fd)


def _await_report(read_fd: int) -> int:
    chunks = []
    while chunk := os.read(read_fd, 4096):
        chunks.append(chunk)
    os.close(read_fd)
    report = b"".join(chunks).decode(errors="replace")
    if report.startswith("ready"):
        return 0
    if report.startswith("error "):
        print(f"istgt: {report[len('error '):].rstrip()}", file=sys.stderr)
    else:
        print("istgt: the daemon exited during start-up (see syslog)", file=sys.stderr)
    return 1


def open_fds() -> set[int]:
    """The descriptors this process has open (Linux /proc, BSD /dev/fd)."""
    directory = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"
    return {int(name) for name in os.listdir(directory)}


# --- signals --------------------------------------------------------------------------------


class ServerLike(Protocol):
    def open_portals(self) -> None: ...
    def serve_forever(self) -> None: ...
    def shutdown(self) -> None: ...


ServerFactory = Callable[[Any, int], ServerLike]


class SignalHandlers:
    """istgt's signals. Handlers only start threads: shutdown and reload block, and a handler
    runs in the main thread, which is inside serve_forever()."""

    STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT)

    def __init__(self, server: ServerLike) -> None:
        self._server = server
        self._previous: dict[int, Any] = {}
        self._stopping = threading.Event()
        self._reloading = threading.Lock()
        self._workers: list[threading.Thread] = []

    def install(self) -> None:
        table = {sig: self._on_stop for sig in self.STOP_SIGNALS}
        table[signal.SIGHUP] = self._on_reload
        table[signal.SIGUSR1] = self._on_trace
        table[signal.SIGUSR2] = self._on_trace
        table[signal.SIGPIPE] = signal.SIG_IGN
        for sig, handler in table.items():
            self._previous[sig] = signal.signal(sig, handler)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def join(self, timeout: float | None = None) -> None:
        for worker in self._workers:
            worker.join(timeout)

    def _on_stop(self, signum: int, _frame: object) -> None:
        logger.log(log.NOTICE, "%s catch", signal.Signals(signum).name)
        if self._stopping.is_set():
            logger.log(log.NOTICE, "shutdown already in progress")
            return
        self._stopping.set()
        self._start("shutdown", self._server.shutdown)

    def _on_reload(self, _signum: int, _frame: object) -> None:
        logger.log(log.NOTICE, "SIGHUP catch")
        reload = getattr(self._server, "reload", None)
        if reload is None:
            logger.log(log.NOTICE, "configuration reload is not implemented yet; ignored")
            return
        if not self._reloading.acquire(blocking=False):
            logger.warning("a reload is already running; SIGHUP ignored")
            return
        self._start("reload", self._reload, reload)

    def _reload(self, reload: Callable[[], object]) -> None:
        try:
            reload()
        except Exception as exc:
            logger.error("reload failed, the previous configuration stays: %s", exc)
        finally:
            self._reloading.release()

    def _on_trace(self, signum: int, _frame: object) -> None:
        enabled = signum == signal.SIGUSR2
        log.set_all_traces(enabled)
        logger.log(log.NOTICE, "trace flags %s", "all on" if enabled else "cleared")

    def _start(self, name: str, target: Callable[..., object], *args: object) -> None:
        worker = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._workers.append(worker)
        worker.start()


# --- start-up -------------------------------------------------------------------------------


def _default_server_factory(config: Any, mode: int) -> ServerLike:
    from istgt.server import Server

    return Server(config, mode)


def _print_error(message: str) -> None:
    print(f"istgt: {message}", file=sys.stderr)


def run(options: Options, server_factory: ServerFactory | None = None) -> int:
    """Start istgt with parsed options; returns the exit code."""
    inherited_fds = open_fds()
    try:
        config = load_config(options.config_path)
    except (ConfigError, OSError) as exc:
        _print_error(f"config error: {exc}")
        return 1
    global_config = config.global_
    try:
        log.setup_logging(
            facility=options.facility or global_config.log_facility or log.DEFAULT_FACILITY,
            quiet=options.quiet,
            trace=options.trace,
        )
    except log.LogSetupError as exc:
        _print_error(f"{options.config_path}: [Global] LogFacility: {exc}")
        return 1
    logger.log(log.NOTICE, "istgt version %s (%s)", __version__, EXTRA_VERSION)
    logger.log(log.NOTICE, "%s", options.mode.label)

    pid_file = PidFile(options.pid_file or global_config.pid_file or DEFAULT_PID_FILE)
    try:
        stale_pid = pid_file.acquire()
    except (AlreadyRunning, OSError) as exc:
        logger.error("%s", _pid_error(pid_file.path, exc))
        return 1
    if stale_pid is not None:
        logger.log(log.NOTICE, "replacing stale pid file %s (pid %d)", pid_file.path, stale_pid)
    try:
        return _serve(options, config, pid_file, inherited_fds, server_factory)
    finally:
        pid_file.release()
        logger.log(log.NOTICE, "istgt version %s (%s) exiting", __version__, EXTRA_VERSION)


def _pid_error(path: str, exc: Exception) -> str:
    if isinstance(exc, AlreadyRunning):
        return str(exc)
    return f"cannot lock pid file {path}: {exc}"


def _serve(
    options: Options,
    config: Any,
    pid_file: PidFile,
    inherited_fds: set[int],
    server_factory: ServerFactory | None,
) -> int:
    factory = server_factory or _default_server_factory
    try:
        server = factory(config, int(options.mode))
        server.open_portals()
    except OSError as exc:
        logger.error("%s", exc)
        return 1

    report = StartupReport()
    if not options.foreground:
        # Keep what start-up opened (portals, disks, the pid file, syslog); close what the
        # shell passed in.
        report = detach(open_fds() - inherited_fds - {0, 1, 2})
        log.drop_stderr()
    try:
        pid_file.write(os.getpid())
    except OSError as exc:
        message = f"cannot write pid file {pid_file.path}: {exc}"
        logger.error("%s", message)
        report.fail(message)
        return 1

    signals = SignalHandlers(server)
    signals.install()
    try:
        report.ready()
        server.serve_forever()
    except Exception:
        logger.exception("the server stopped on an unexpected error")
        return 1
    finally:
        signals.restore()
        signals.join(timeout=30)
    return 0


def main(argv: list[str] | None = None, *, server_factory: ServerFactory | None = None) -> int:
    """The istgt command. ``server_factory(config, mode)`` replaces Server in tests."""
    try:
        options = parse_args(sys.argv[1:] if argv is None else argv)
    except EarlyExit as exit_:
        sys.stdout.write(exit_.text)
        return 0
    except UsageError as exc:
        _print_error(str(exc))
        sys.stderr.write(usage())
        return 1
    return run(options, server_factory)


if __name__ == "__main__":
    raise SystemExit(main())
