"""The UnitControl commands of one control connection (istgt_lu_ctl.c's table), as pure
logic over the running server: a request line in, the reply lines out.

`ControlSession(server, peer, auth).handle(line) -> (lines, close)`. `server` is the
istgt.server.Server (units, sessions, the config); `auth` is a control.auth.ServerChap when
the connection must authenticate, or None when it need not (the Unix socket, whose file mode
is the access check, or AuthMethod None).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from istgt import EXTRA_VERSION, __version__
from istgt.config import parse_size
from istgt.control.auth import ControlAuthError, ServerChap
from istgt.control.protocol import parse_request
from istgt.lu.stats import Counters
from istgt.lu.unit import TaskStillRunning

log = logging.getLogger("istgt.ctl")

MAX_LUN = 16383


class CommandError(Exception):
    """The message of the `ERR` line that ends a command."""


def banner(local: str, peer: str) -> str:
    return f"iSCSI Target Controller version {__version__} ({EXTRA_VERSION}) on {local} from {peer}"


def _lun_argument(args: list[str], index: int) -> int:
    if len(args) <= index:
        return 0
    try:
        lun = int(args[index], 0)
    except ValueError:
        raise CommandError("invalid parameters") from None
    if not 0 <= lun <= MAX_LUN:
        raise CommandError("invalid parameters")
    return lun


class ControlSession:
    def __init__(self, server: Any, peer: str, auth: ServerChap | None,
                 auth_optional: bool = False) -> None:
        self.server = server
        self.peer = peer
        self.auth = auth
        # AuthMethod Auto: AUTH may be used but is not required
        self.auth_optional = auth_optional
        self._commands: dict[str, Callable[[list[str]], list[str]]] = {
            "QUIT": self._quit, "NOOP": self._noop, "VERSION": self._version,
            "LIST": self._list, "INFO": self._info, "RESET": self._reset,
            "LOAD": self._load, "UNLOAD": self._unload, "CHANGE": self._change,
            "RESIZE": self._resize, "REFRESH": self._refresh, "STATS": self._stats,
        }

    def handle(self, line: str) -> tuple[list[str], bool]:
        """Reply lines for one request line, and whether to close the connection after."""
        command, args = parse_request(line)
        if not command:
            return [], False
        if command == "AUTH":
            return self._auth(args), False
        if self.auth is not None and not self.auth.authenticated and not self.auth_optional \
                and command != "QUIT":
            return ["ERR auth required"], False
        handler = self._commands.get(command)
        if handler is None:
            return ["ERR unknown command"], False
        try:
            lines = handler(args)
        except CommandError as error:
            return [f"ERR {error}"], False
        return [*lines, f"OK {command}"], command == "QUIT"

    # --- commands -------------------------------------------------------------------------

    def _auth(self, args: list[str]) -> list[str]:
        if self.auth is None:
            return ["ERR auth not required"]
        try:
            lines = self.auth.step(args)
        except ControlAuthError as error:
            log.warning("UCTL auth failed from %s: %s", self.peer, error)
            return [f"ERR {error}"]
        return [*lines, "OK AUTH"] if self.auth.authenticated else lines

    def _quit(self, args: list[str]) -> list[str]:
        return []

    def _noop(self, args: list[str]) -> list[str]:
        return []

    def _version(self, args: list[str]) -> list[str]:
        return [f"VERSION {__version__} ({EXTRA_VERSION})"]

    def _units(self) -> list[Any]:
        return [unit for _, unit in sorted(self.server.units.items())]

    def _unit_named(self, name: str) -> Any:
        for unit in self._units():
            if unit.name.lower() == name.lower():
                return unit
        raise CommandError("no target")

    def _list(self, args: list[str]) -> list[str]:
        if len(args) > 2:
            raise CommandError("invalid parameters")
        if not args:
            return [f"LIST {unit.name}" for unit in self._units()]
        unit = self._unit_named(args[0])
        lun = _lun_argument(args, 1)
        config = unit.config.luns.get(lun)
        if config is None or lun not in unit.devices:
            raise CommandError("no target")
        return [f"LIST {lun_description(config, unit.devices[lun])}"]

    def _info(self, args: list[str]) -> list[str]:
        if len(args) > 1:
            raise CommandError("invalid parameters")
        wanted = args[0].lower() if args else None
        lines = [f"INFO {text}" for text in login_lines(self.server, wanted)]
        return lines or ["INFO no login"]

    def _target_and_lun(self, args: list[str], required: int = 1) -> tuple[Any, int]:
        if len(args) < required:
            raise CommandError("invalid parameters")
        unit = self._unit_named(args[0])
        lun = _lun_argument(args, 1)
        if lun not in unit.devices:
            raise CommandError("no LUN")
        return unit, lun

    def _reset(self, args: list[str]) -> list[str]:
        unit, lun = self._target_and_lun(args)
        log.warning("Unit Reset %s lun%d from %s", unit.name, lun, self.peer)
        try:
            unit.lun_reset(lun)
        except TaskStillRunning as exc:
            raise CommandError(f"reset done, but {exc}") from exc
        return []

    def _removable(self, args: list[str]) -> tuple[Any, int, Any]:
        unit, lun = self._target_and_lun(args)
        device = unit.devices[lun]
        medium = getattr(device, "medium", None)
        if medium is None or not medium.removable:
            raise CommandError("not removable")
        return unit, lun, device

    def _load(self, args: list[str]) -> list[str]:
        unit, lun, device = self._removable(args)
        log.warning("Media Load %s lun%d from %s", unit.name, lun, self.peer)
        if not device.operator_load():
            raise CommandError("load")
        return []

    def _unload(self, args: list[str]) -> list[str]:
        unit, lun, device = self._removable(args)
        log.warning("Media Unload %s lun%d from %s", unit.name, lun, self.peer)
        if not device.operator_unload():
            raise CommandError("unload")
        return []

    def _change(self, args: list[str]) -> list[str]:
        """CHANGE <iqn> <lun> <type> <flags> <file> <size>: put another disc in a DVD drive
        (`/dev/null` empties it). The file must lie within MediaDirectory."""
        if len(args) < 6:
            raise CommandError("invalid parameters")
        unit, lun, device = self._removable(args[:2])
        if not hasattr(device, "change_medium"):
            raise CommandError("change")    # a disk's medium is its backing store
        _type, flags, file, size_text = args[2:6]
        path = media_path(file, self.server.config.global_.media_directory)
        log.warning('Media Change "%s %s %s %s" on %s lun%d from %s', _type, flags, file,
                    size_text, unit.name, lun, self.peer)
        backend = None
        if path != "/dev/null":
            try:
                size = None if size_text.lower() == "auto" else parse_size(size_text)
                backend = self.server.open_media(unit, path, size,
                                                 tuple(f for f in flags.lower().split(",") if f))
            except Exception as error:      # unreadable, too small, a bad size
                raise CommandError(f"change: {error}") from None
        if not device.change_medium(backend, path):
            if backend is not None:
                backend.close()
            raise CommandError("change: medium removal prevented")
        return []


    def _stats(self, args: list[str]) -> list[str]:
        """STATS [<iqn>]: I/O counters per LUN since start, then per logged-in session."""
        if len(args) > 1:
            raise CommandError("invalid parameters")
        units = [self._unit_named(args[0])] if args else self._units()
        return [f"STATS {line}" for line in stats_lines(self.server, units)]

    def _refresh(self, args: list[str]) -> list[str]:
        """REFRESH [VERBOSE]: reload the configuration now (as SIGHUP). Plain, it answers
        only OK or ERR, as the C tool expects; VERBOSE also lists what changed."""
        if len(args) > 1 or (args and args[0].upper() != "VERBOSE"):
            raise CommandError("invalid parameters")
        log.warning("Refresh from %s", self.peer)
        try:
            report = self.server.reload()
        except Exception as error:       # ConfigError (FILE:LINE: ...), StartupError, OSError
            log.error("reload failed, the previous configuration stays: %s", error)
            raise CommandError(f"refresh: {error}") from None
        return [f"REFRESH {line}" for line in report.lines()] if args else []

    def _resize(self, args: list[str]) -> list[str]:
        """RESIZE <iqn> <lun> [<size>|auto]: grow a disk LUN online (new)."""
        if len(args) < 2 or len(args) > 3:
            raise CommandError("invalid parameters")
        unit, lun = self._target_and_lun(args)
        device = unit.devices[lun]
        if not hasattr(device, "resize"):
            raise CommandError("not resizable")
        wanted = args[2] if len(args) == 3 else "auto"
        try:
            size = None if wanted.lower() == "auto" else parse_size(wanted)
        except ValueError:
            raise CommandError("invalid parameters") from None
        try:
            blocks = device.resize(size)
        except Exception as error:   # a shrink (ValueError) or the store refused to grow
            raise CommandError(f"resize: {error}") from None
        log.warning("Resize %s lun%d to %d bytes from %s", unit.name, lun,
                    blocks * device.block_length, self.peer)
        return [f"RESIZE lun{lun} {blocks * device.block_length}"]


def media_path(file: str, media_directory: str) -> str:
    """istgt's CHANGE path rules: a relative name is taken in MediaDirectory, links are
    resolved, and the result must lie within MediaDirectory (`/dev/null`: no disc)."""
    if file == "/dev/null":
        return file
    base = os.path.realpath(media_directory)
    path = os.path.realpath(os.path.join(base, file))
    if os.path.commonpath([base, path]) != base:
        raise CommandError(f"change: {file} is not within MediaDirectory {media_directory}")
    return path


def _counters_text(counters: Any) -> str:
    return (f"commands={counters.commands} read_bytes={counters.read_bytes} "
            f"written_bytes={counters.written_bytes} "
            f"avg_latency_us={counters.average_latency_us}")


def stats_lines(server: Any, units: list[Any]) -> list[str]:
    """`LU<n> <iqn> lun<l> ...` for every LUN of `units`, then `session TSIH=<t> <initiator
    port> on <iqn> ...` for every normal session of them (counts from arrival to answer)."""
    lines = []
    by_unit = {unit: unit.stats.snapshot() for unit in units}
    for unit, snapshot in by_unit.items():
        for lun in sorted(unit.devices):
            total = Counters()
            for (counted_lun, _nexus), counters in snapshot.items():
                if counted_lun == lun:
                    total = total + counters
            lines.append(f"LU{unit.number} {unit.name} lun{lun} {_counters_text(total)}")
    for session in sorted(server.sessions.all(), key=lambda s: s.tsih):
        snapshot = by_unit.get(session.target)
        if session.discovery or snapshot is None:
            continue
        total = Counters()
        for (_lun, nexus), counters in snapshot.items():
            if nexus == session.nexus:
                total = total + counters
        lines.append(f"session TSIH={session.tsih} {session.initiator_port} on "
                     f"{session.target_name} {_counters_text(total)}")
    return lines


def lun_description(config: Any, device: Any) -> str:
    """One LUN as `LIST <iqn> <lun>` describes it."""
    path = config.path
    if config.kind == "device":
        return f'lun{config.number} device "{path}"'
    if config.kind == "removable" or getattr(config, "removable_disk", False):
        medium = getattr(device, "medium", None)
        present = "present" if medium is None or medium.loaded else "absent"
        locked = "lock" if medium is not None and medium.prevented else "unlock"
        flags = ",".join(config.flags) or ("ro" if getattr(device, "read_only", False) else "rw")
        if hasattr(device, "media_path"):        # a drive: what is in it now
            path = device.media_path or "/dev/null"
            size = str(device.block_count * device.block_length) if device.media_path \
                else "0"
        else:
            size = "auto" if config.size is None else str(config.size)
        return f'lun{config.number} removable {present} {locked} - {flags} "{path}" {size}'
    size = device.block_count * device.block_length
    return f'lun{config.number} storage "{path}" {size}'


def login_lines(server: Any, target_name: str | None) -> list[str]:
    """`Login from ...` for every connection of every normal session (of one target)."""
    lines = []
    for session in sorted(server.sessions.all(), key=lambda s: (s.target_name, s.tsih)):
        if session.discovery or session.target is None:
            continue
        if target_name is not None and session.target_name.lower() != target_name:
            continue
        for conn in sorted(session.members(), key=lambda c: c.cid):
            values = conn.values
            if values is None:
                continue
            lines.append(
                f"Login from {session.initiator_name} ({conn.peer_ip}) on "
                f"{session.target_name} LU{session.target.number} "
                f"({conn.local_ip}:{conn.local_port},{conn.portal_group_tag}), "
                f"ISID={int.from_bytes(session.isid, 'big'):x}, TSIH={session.tsih}, "
                f"CID={conn.cid}, HeaderDigest={'on' if values.header_digest else 'off'}, "
                f"DataDigest={'on' if values.data_digest else 'off'}, "
                f"MaxConnections={values.max_connections}, "
                f"FirstBurstLength={values.first_burst_length}, "
                f"MaxBurstLength={values.max_burst_length}, "
                f"MaxRecvDataSegmentLength={values.max_recv_data_segment_length_target}, "
                f"InitialR2T={'Yes' if values.initial_r2t else 'No'}, "
                f"ImmediateData={'Yes' if values.immediate_data else 'No'}")
    return lines
