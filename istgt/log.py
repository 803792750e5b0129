"""Logging set-up: stderr and syslog, istgt's severities and its trace flags.

Every module logs through ``logging.getLogger("istgt.<area>...")``. The C istgt's trace masks
(``-t NET`` ...) become DEBUG levels on one logger per area, so ``-t iscsi`` turns on the
debug output of every logger under ``istgt.iscsi``.

Syslog goes through the C library's ``syslog(3)`` (the stdlib ``syslog`` module), as istgt's
does: it is silent when no syslog daemon listens, where ``logging.handlers.SysLogHandler``
prints a "Logging error" traceback for every record.
"""

from __future__ import annotations

import enum
import logging
import sys
import syslog
from typing import ClassVar

NOTICE = 25
"""Between INFO and WARNING, for istgt's NOTICE messages (start-up, logins, reloads)."""
logging.addLevelName(NOTICE, "NOTICE")

ROOT_LOGGER = "istgt"
IDENT = "istgt"
DEFAULT_FACILITY = "local7"

# Names accepted by LogFacility and -l. The C istgt refused local0 and user (bug B3).
FACILITIES: dict[str, int] = {
    "auth": syslog.LOG_AUTH,
    "authpriv": syslog.LOG_AUTHPRIV,
    "daemon": syslog.LOG_DAEMON,
    "user": syslog.LOG_USER,
    **{f"local{n}": getattr(syslog, f"LOG_LOCAL{n}") for n in range(8)},
}

_SYSLOG_PRIORITY = {
    logging.DEBUG: syslog.LOG_DEBUG,
    logging.INFO: syslog.LOG_INFO,
    NOTICE: syslog.LOG_NOTICE,
    logging.WARNING: syslog.LOG_WARNING,
    logging.ERROR: syslog.LOG_ERR,
    logging.CRITICAL: syslog.LOG_CRIT,
}


class TraceFlag(enum.IntFlag):
    """istgt's trace masks (istgt_log.h values, so -t output means the same thing)."""

    NONE = 0
    NET = 0x0000000F
    ISCSI = 0x000000F0
    SCSI = 0x00000F00
    LU = 0x0000F000
    DEBUG = 0x80000000  # set only by ALL: debug output of every other istgt logger
    ALL = NET | ISCSI | SCSI | LU | DEBUG


TRACE_LOGGERS: dict[TraceFlag, str] = {
    TraceFlag.NET: "istgt.net",
    TraceFlag.ISCSI: "istgt.iscsi",
    TraceFlag.SCSI: "istgt.scsi",
    TraceFlag.LU: "istgt.lu",
    TraceFlag.DEBUG: ROOT_LOGGER,
}


class LogSetupError(ValueError):
    """A facility or trace flag name that istgt does not know."""


def parse_facility(name: str) -> int:
    """Return the syslog facility for a LogFacility / -l name (case-insensitive)."""
    try:
        return FACILITIES[name.strip().lower()]
    except KeyError:
        raise LogSetupError(
            f"unknown log facility {name!r} (expected one of: {', '.join(FACILITIES)})"
        ) from None


TRACE_FLAG_NAMES = ("net", "iscsi", "scsi", "lu", "all", "none")
"""What -t accepts (DEBUG is a part of ALL, not a flag of its own)."""


def parse_trace_flag(name: str, current: TraceFlag = TraceFlag.NONE) -> TraceFlag:
    """Apply one -t value to ``current``: flags are OR'ed, NONE clears them all."""
    key = name.strip().lower()
    if key not in TRACE_FLAG_NAMES:
        raise LogSetupError(
            f"unknown trace flag {name!r} (expected one of: {', '.join(TRACE_FLAG_NAMES)})"
        )
    flag = TraceFlag[key.upper()]
    if flag is TraceFlag.NONE:
        return TraceFlag.NONE
    return current | flag


class IstgtFormatter(logging.Formatter):
    """istgt's message shapes: plain NOTICE/INFO, located ***WARNING***/***ERROR***, traces."""

    _LOCATION = "%(module)s:%(lineno)d:%(funcName)s: "
    _FORMATS: ClassVar[dict[int, str]] = {
        logging.DEBUG: "%(threadName)s>" + _LOCATION + "%(message)s",
        logging.WARNING: _LOCATION + "***WARNING*** %(message)s",
        logging.ERROR: _LOCATION + "***ERROR*** %(message)s",
    }

    def __init__(self, prefix: str = "") -> None:
        super().__init__()
        self._styles = {
            level: logging.PercentStyle(prefix + fmt) for level, fmt in self._FORMATS.items()
        }
        self._plain = logging.PercentStyle(prefix + "%(message)s")
        self._uses_time = "%(asctime)" in prefix

    def formatMessage(self, record: logging.LogRecord) -> str:
        if record.levelno >= logging.ERROR:
            style = self._styles[logging.ERROR]
        elif record.levelno >= logging.WARNING:
            style = self._styles[logging.WARNING]
        elif record.levelno < logging.INFO:
            style = self._styles[logging.DEBUG]
        else:
            style = self._plain
        return style.format(record)

    def usesTime(self) -> bool:
        return self._uses_time


class SyslogHandler(logging.Handler):
    """Sends records at INFO and above to syslog(3) with istgt's ident, LOG_PID and facility."""

    def __init__(self, facility: int) -> None:
        super().__init__(level=logging.INFO)  # traces go to stderr only, as in istgt
        self.facility = facility
        syslog.openlog(IDENT, syslog.LOG_PID, facility)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            syslog.syslog(self.facility | syslog_priority(record.levelno), message)
        except Exception:
            self.handleError(record)


def syslog_priority(levelno: int) -> int:
    """The syslog priority for any logging level (custom levels round down)."""
    for level in sorted(_SYSLOG_PRIORITY, reverse=True):
        if levelno >= level:
            return _SYSLOG_PRIORITY[level]
    return syslog.LOG_DEBUG


class _DropWarnings(logging.Filter):
    """-q: istgt suppresses WARNING messages only; errors and notices still go out."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (logging.WARNING <= record.levelno < logging.ERROR)


class _State:
    """The handlers this module installed, so that set-up can be repeated and undone."""

    stderr: logging.Handler | None = None
    syslog: SyslogHandler | None = None
    trace: TraceFlag = TraceFlag.NONE


def setup_logging(
    *, facility: str = DEFAULT_FACILITY, quiet: bool = False, trace: TraceFlag = TraceFlag.NONE
) -> None:
    """Send every istgt message to stderr and syslog; raises LogSetupError on a bad facility."""
    facility_code = parse_facility(facility)
    reset_logging()
    root = logging.getLogger(ROOT_LOGGER)
    stderr_handler = logging.StreamHandler(sys.stderr)
    stderr_handler.setFormatter(IstgtFormatter(prefix="%(asctime)s "))
    syslog_handler = SyslogHandler(facility_code)
    syslog_handler.setFormatter(IstgtFormatter())
    for handler in (stderr_handler, syslog_handler):
        if quiet:
            handler.addFilter(_DropWarnings())
        root.addHandler(handler)
    _State.stderr, _State.syslog = stderr_handler, syslog_handler
    set_trace(trace)


def drop_stderr() -> None:
    """Stop writing to stderr (a detached daemon's stderr is /dev/null)."""
    if _State.stderr is not None:
        logging.getLogger(ROOT_LOGGER).removeHandler(_State.stderr)
        _State.stderr = None


def reset_logging() -> None:
    """Remove what setup_logging installed and clear the trace flags."""
    root = logging.getLogger(ROOT_LOGGER)
    for handler in (_State.stderr, _State.syslog):
        if handler is not None:
            root.removeHandler(handler)
            handler.close()
    _State.stderr = _State.syslog = None
    set_trace(TraceFlag.NONE)


def set_trace(flags: TraceFlag) -> None:
    """Turn the per-area debug output on or off. Safe to call from a signal handler."""
    for flag, name in TRACE_LOGGERS.items():
        if flag is TraceFlag.DEBUG:
            continue
        logging.getLogger(name).setLevel(logging.DEBUG if flag in flags else logging.NOTSET)
    root_level = logging.DEBUG if TraceFlag.DEBUG in flags else logging.INFO
    logging.getLogger(ROOT_LOGGER).setLevel(root_level)
    _State.trace = flags


def trace_flags() -> TraceFlag:
    """The trace flags in force."""
    return _State.trace


def set_all_traces(enabled: bool) -> None:
    """SIGUSR2 turns every trace flag on, SIGUSR1 clears them (as istgt does)."""
    set_trace(TraceFlag.ALL if enabled else TraceFlag.NONE)
