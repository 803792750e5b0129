"""The istgt command: flags, start-up, pid file, daemon mode and signals.

Start-up order (each failure prints a message and exits 1 in the caller's process):
read the config, set up logging, lock the pid file, detach (unless -D), build the server
and open its portals, write the pid, then serve until SIGTERM/SIGINT/SIGQUIT.

The server is built after detaching because fork() does not carry threads into the child
and the server starts its logical units' worker threads when it is built. Until start-up
completes, the daemon's stderr is a pipe to the caller's process, which prints what comes
through and exits 1 unless the daemon reports ready: a listen failure after the fork still
reaches the caller's exit status (C istgt bug B28).
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

from istgt import EXTRA_VERSION, __version__, allocator, log
from istgt.config import ConfigError, load_config
from istgt.server import Server, StartupError

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


class ServerLike(Protocol):
    """What main needs of istgt.server.Server (tests pass a fake)."""

    def open_portals(self) -> None: ...
    def serve_forever(self) -> None: ...
    def shutdown(self) -> None: ...


ServerFactory = Callable[[Any, int], ServerLike]


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

READY_MARK = b"\0"
"""Written by the daemon on its start-up stderr when it serves; text never contains NUL."""


class StartupReport:
    """Tells whoever started istgt that start-up is complete (nobody, in the foreground)."""

    def ready(self) -> None:
        """Start-up is complete."""


class _DaemonReport(StartupReport):
    """The daemon's stderr is a pipe to the caller's process until start-up completes."""

    def ready(self) -> None:
        log.drop_stderr()
        sys.stderr.flush()
        try:
            os.write(2, READY_MARK)
        except OSError:
            pass  # the caller is gone: nobody is left to tell
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)


def detach(keep_fds: set[int]) -> StartupReport:
    """Become a daemon with python-daemon; returns only in the daemon.

    The caller's process copies the daemon's start-up output to its own stderr and exits 0
    when the daemon reports ready, 1 when it exits before that: a listen or disk error after
    the fork still reaches the caller's exit status (C istgt bug B28).
    """
    import daemon  # foreground runs never need python-daemon

    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child:
        os.close(write_fd)
        code = _relay_startup_output(read_fd)
        os.waitpid(child, 0)
        os._exit(code)  # the daemon owns the pid file, sockets and disks now
    os.close(read_fd)
    startup_stderr = os.fdopen(write_fd, "wb", buffering=0)
    context = daemon.DaemonContext(
        working_directory=os.getcwd(),  # relative paths in the config keep working
        umask=0o022,
        detach_process=True,
        files_preserve=sorted(keep_fds),
        stderr=startup_stderr,  # becomes fd 2 until _DaemonReport.ready()
        signal_map={},  # run() installs istgt's own handlers
    )
    try:
        context.open()
    except Exception as exc:
        os.write(write_fd, f"istgt: cannot become a daemon: {exc}\n".encode())
        os._exit(1)
    startup_stderr.close()  # fd 2 is the only copy the daemon needs
    return _DaemonReport()


def _relay_startup_output(read_fd: int) -> int:
    ready = False
    while chunk := os.read(read_fd, 4096):
        text, mark, _ = chunk.partition(READY_MARK)
        if text and not ready:
            sys.stderr.buffer.write(text)
            sys.stderr.flush()
        ready = ready or bool(mark)
    os.close(read_fd)
    if not ready:
        print("istgt: start-up failed; the daemon exited", file=sys.stderr)
    return 0 if ready else 1


def open_fds() -> set[int]:
    """The descriptors this process has open (Linux /proc, BSD /dev/fd)."""
    directory = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"
    # The listing held a descriptor of its own, closed by now: keep only those still open.
    return {int(name) for name in os.listdir(directory) if _is_open(int(name))}


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


# --- signals --------------------------------------------------------------------------------


class SignalThread:
    """istgt's signal thread, as in C istgt: every thread blocks istgt's signals and this one
    takes them with sigwait().

    Python runs signal handlers only in the main thread, and only when the signal is
    delivered to it; a signal the kernel hands to any other thread would leave the main
    thread asleep in serve_forever(). Shutdown and reload run in threads of their own so that
    the signal thread stays responsive (a second SIGTERM, SIGUSR1 during a reload).
    """

    STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT)
    HANDLED = frozenset({*STOP_SIGNALS, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2})

    def __init__(self, server: ServerLike) -> None:
        self._server = server
        self._exiting = False  # written by stop() before it wakes the thread
        self._stopping = False  # signal thread only
        self._reloading = threading.Lock()
        self._workers: list[threading.Thread] = []  # signal thread only, until joined
        self._thread = threading.Thread(target=self._run, name="signals", daemon=True)

    def start(self) -> None:
        """Start taking signals; the caller must have blocked HANDLED (threads inherit it)."""
        self._thread.start()

    def stop(self, timeout: float = 30) -> None:
        """Stop taking signals and wait for a shutdown or reload still running."""
        self._exiting = True
        if self._thread.ident is not None:
            signal.pthread_kill(self._thread.ident, signal.SIGUSR1)
            self._thread.join()
        for worker in self._workers:
            worker.join(timeout)

    def _run(self) -> None:
        while not self._exiting:
            signum = signal.sigwait(self.HANDLED)
            if not self._exiting:
                self.handle(signal.Signals(signum))
        while signal.sigtimedwait(self.HANDLED, 0) is not None:
            pass  # signals that came with the exit have nothing left to act on

    def handle(self, signum: signal.Signals) -> None:
        if signum in self.STOP_SIGNALS:
            self._on_stop(signum)
        elif signum == signal.SIGHUP:
            self._on_reload()
        else:
            self._on_trace(enabled=signum == signal.SIGUSR2)

    def _on_stop(self, signum: signal.Signals) -> None:
        logger.log(log.NOTICE, "%s catch", signum.name)
        if self._stopping:
            logger.log(log.NOTICE, "shutdown already in progress")
            return
        self._stopping = True
        self._start("shutdown", self._server.shutdown)

    def _on_reload(self) -> None:
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

    def _on_trace(self, enabled: bool) -> None:
        log.set_all_traces(enabled)
        logger.log(log.NOTICE, "trace flags %s", "all on" if enabled else "cleared")

    def _start(self, name: str, target: Callable[..., object], *args: object) -> None:
        worker = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._workers.append(worker)
        worker.start()


# --- start-up -------------------------------------------------------------------------------


def _print_error(message: str) -> None:
    print(f"istgt: {message}", file=sys.stderr)


def run(options: Options, server_factory: ServerFactory | None = None) -> int:
    """Start istgt with parsed options; returns the exit code."""
    allocator.tune()
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
    # Blocked from here on in every thread (threads inherit the mask): the signal thread
    # takes them. A SIGTERM during start-up waits until the server can act on it.
    saved_mask = signal.pthread_sigmask(signal.SIG_BLOCK, SignalThread.HANDLED)
    saved_sigpipe = signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    try:
        report = StartupReport()
        if not options.foreground:
            # Keep what start-up opened (pid file, syslog); close what the shell passed in.
            try:
                report = detach(open_fds() - inherited_fds - {0, 1, 2})
            except OSError as exc:
                logger.error("cannot become a daemon: %s", exc)
                return 1
        return _serve(options, config, pid_file, report, server_factory or Server)
    finally:
        pid_file.release()
        signal.signal(signal.SIGPIPE, saved_sigpipe)
        signal.pthread_sigmask(signal.SIG_SETMASK, saved_mask)


def _describe(exc: Exception) -> str:
    """The server's OSErrors carry their whole message (host:port included) as strerror."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is None:
        return exc.strerror
    return str(exc)


def _pid_error(path: str, exc: Exception) -> str:
    if isinstance(exc, AlreadyRunning):
        return str(exc)
    return f"cannot lock pid file {path}: {exc}"


def _serve(
    options: Options,
    config: Any,
    pid_file: PidFile,
    report: StartupReport,
    server_factory: ServerFactory,
) -> int:
    """Build the server after detaching (fork keeps no threads), serve, shut down."""
    try:
        server = server_factory(config, int(options.mode))
        server.open_portals()
    except (OSError, StartupError) as exc:
        logger.error("%s", _describe(exc))
        return 1
    try:
        pid_file.write(os.getpid())
    except OSError as exc:
        logger.error("cannot write pid file %s: %s", pid_file.path, exc)
        return 1

    signals = SignalThread(server)
    signals.start()
    try:
        report.ready()
        server.serve_forever()
    except Exception:
        logger.exception("the server stopped on an unexpected error")
        return 1
    finally:
        signals.stop()
    logger.log(log.NOTICE, "istgt version %s (%s) exiting", __version__, EXTRA_VERSION)
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
