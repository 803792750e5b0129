"""The target: portals and their acceptor threads, logical units, sessions, shutdown."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import Counter

from istgt import allocator
from istgt.auth_audit import audit_config
from istgt.iscsi.connection import Connection, corked
from istgt.iscsi.session import SessionRegistry
from istgt.lu.backends import BackendError, FileBackend
from istgt.lu.images import ImageBackend, image_location
from istgt.lu.rbd import RbdAtomicWrites, RbdBackend
from istgt.lu.shared_reservations import SharedReservations
from istgt.scsi.alua import GatewayPortGroups
from istgt.lu.copy_targets import CopyTargets
from istgt.control.server import ControlServer
from istgt.listen import listen_tcp
from istgt.lu.atomic_journal import AtomicWriteJournal
from istgt.lu.state import StateFile
from istgt.lu.unit import LogicalUnit

log = logging.getLogger("istgt")
net_log = logging.getLogger("istgt.net")

LISTEN_BACKLOG = 128
SHUTDOWN_WAIT = 10.0
SPARE_CONNECTIONS = 64    # connections beyond MaxSessions x MaxConnections (logins, discovery)
# Connections still logging in, at once: per peer address and per portal. Beyond them a new
# connection is closed at accept, so idle half-open connections from one host (or a flood
# on one portal) cannot use up the rest; each is also closed after Timeout without a PDU.
MAX_LOGINS_PER_ADDRESS = 256     # a login storm of 256 sessions from one host still fits
MAX_LOGINS_PER_PORTAL = 1024
KEEPALIVE_TICK = 0.25     # NOP-In timing granularity (seconds)
GROWTH_CHECK_S = 2.0      # how often Auto-sized LUNs look at their backing store's size


class StartupError(Exception):
    """A logical unit or portal could not be set up; the message says which and why."""


def build_logical_unit(lu_config, max_sessions: int, state_directory: str | None = None
                       ) -> LogicalUnit:
    if lu_config.unit_type not in ("disk", "dvd", "tape", "pass"):
        raise StartupError(f"LU{lu_config.number} ({lu_config.name}): UnitType "
                           f"{lu_config.unit_type} is not supported yet")
    devices = {}
    try:
        for number, lun in sorted(lu_config.luns.items()):
            devices[number] = build_device(lu_config, lun, state_directory)
    except StartupError:
        for d in devices.values():
            d.close()
        raise
    for d in devices.values():
        if hasattr(d, "set_lun_numbers"):
            d.set_lun_numbers(sorted(devices))
    # EXTENDED COPY may name any LUN of this target (and no other target's) as a copy target.
    copy_targets = CopyTargets(devices.values())
    for d in devices.values():
        d.copy_targets = copy_targets
    for number, d in sorted(devices.items()):
        lun = lu_config.luns[number]
        size = d.backend.size if hasattr(d, "backend") else 0
        provisioning = getattr(d, "provisioning", None)
        kind = "" if provisioning is None else " thin" if provisioning.thin else " full"
        log.info("LU%d: LUN%d file=%s, size=%d, %d bytes/block%s%s%s, queue depth %d",
                 lu_config.number, number, lun.path, size, lu_config.block_length, kind,
                 " removable" if getattr(d, "removable", False) else "",
                 " readonly" if lu_config.read_only else "", lu_config.queue_depth)
    return LogicalUnit(lu_config, devices, max_sessions, completion_batch=corked)


def _build_disk(lu_config, lun, state_directory: str | None):
    from istgt.scsi.provisioning import ProvisioningError
    from istgt.scsi.sbc import DiskDevice
    where = f"LU{lu_config.number} ({lu_config.name}) LUN{lun.number}"
    try:
        store = ImageBackend if image_location(lun.path) else FileBackend
        backend = store.open(lun.path, lun.size, lu_config.read_only, lu_config.block_length)
    except BackendError as e:
        raise StartupError(f"LU{lu_config.number} ({lu_config.name}): {e}") from None
    state = journal = None
    if isinstance(backend, RbdBackend) and not backend.location.snapshot:
        try:       # gateways of one image share its reservations through the cluster
            state = SharedReservations(backend)
        except OSError as e:
            backend.close()
            raise StartupError(f"{where}: reservations in the cluster: {e}") from None
        if not lu_config.read_only:
            journal = RbdAtomicWrites(backend)
    if state_directory is not None:
        prefix = os.path.join(state_directory, f"{lu_config.name}.lun{lun.number}")
        state = state or StateFile(f"{prefix}.pr.json")
        # WRITE ATOMIC's journal is a local file: not for an image other gateways write too
        # (RBD LUs have RbdAtomicWrites)
        if not lu_config.read_only and not isinstance(backend, RbdBackend):
            try:
                journal = AtomicWriteJournal(f"{prefix}.atomic")
            except OSError as e:
                _close_stores(backend, None, state)
                raise StartupError(f"{where}: atomic write journal {prefix}.atomic: "
                                   f"{e.strerror}") from None
    try:
        if getattr(lun, "provisioning", None) == "full":
            backend.preallocate()
        device = DiskDevice(lu_config, lun, backend, state, journal)
        if isinstance(state, SharedReservations):
            state.attach(device)
            device.port_groups = GatewayPortGroups(
                device.port_groups.target_name, device.port_groups.tags, state.live_groups)
        return device
    except BackendError as e:
        _close_stores(backend, journal, state)
        raise StartupError(f"{where}: Provisioning Full: {e}") from None
    except ProvisioningError as e:
        _close_stores(backend, journal, state)
        raise StartupError(f"{where}: {e}") from None
    except ValueError as e:
        _close_stores(backend, journal, state)
        raise StartupError(f"{where}: saved reservations unreadable: {e}") from None
    except OSError as e:
        _close_stores(backend, journal, state)
        what = "reservations in the cluster" if isinstance(state, SharedReservations) else \
            "replaying the atomic write journal"
        raise StartupError(f"{where}: {what}: {e}") from None


def build_device(lu_config, lun, state_directory: str | None):
    """The device of one LUN, by the LU's UnitType (StartupError when it cannot be)."""
    if lu_config.unit_type == "dvd":
        return _build_dvd(lu_config, lun)
    if lu_config.unit_type == "tape":
        return _build_tape(lu_config, lun)
    if lu_config.unit_type == "pass":
        return _build_pass(lu_config, lun)
    return _build_disk(lu_config, lun, state_directory)


def _build_pass(lu_config, lun):
    """A real SCSI device passed through with SG_IO (`LUNn Device <path>`)."""
    from istgt.scsi.passthrough import PassThroughDevice, SgDevice
    try:
        return PassThroughDevice(lu_config, lun, SgDevice(lun.path))
    except OSError as e:
        raise StartupError(f"LU{lu_config.number} ({lu_config.name}) LUN{lun.number}: "
                           f"{lun.path}: {e.strerror or e}") from None


def _build_tape(lu_config, lun):
    """A tape drive with its cartridge (a .vt file, created when missing and writable), or
    empty (`/dev/null`, or a file that is not a virtual tape: logged)."""
    from istgt.scsi.ssc import TapeDevice
    tape = None
    if lun.path != "/dev/null":
        try:
            tape = open_tape(lun.path, lun.size, lun.flags, lu_config.read_only)
        except (OSError, ValueError) as e:
            log.error("LU%d (%s) LUN%d: %s; the drive starts empty", lu_config.number,
                      lu_config.name, lun.number, e)
    return TapeDevice(lu_config, lun, tape)


def open_tape(path: str, size: int | None, flags, read_only: bool = False):
    """A virtual tape cartridge; `flags` as in `LUNn Removable` (ro, rw, extend, dynamic)."""
    from istgt.lu.vtape import VirtualTape
    return VirtualTape.open(path, size, read_only or ("ro" in flags and "rw" not in flags),
                            growable=bool({"extend", "dynamic"} & set(flags)))


def _build_dvd(lu_config, lun):
    """A DVD drive with its disc loaded, or empty (`/dev/null`, or an image that is not
    there: the operator can load one later with istgtcontrol change)."""
    from istgt.scsi.mmc import DvdDevice
    backend = None
    if lun.path != "/dev/null":
        try:
            backend = open_dvd_image(lun.path, lun.size)
        except BackendError as e:
            log.warning("LU%d (%s) LUN%d: %s; the drive starts empty", lu_config.number,
                        lu_config.name, lun.number, e)
    return DvdDevice(lu_config, lun, backend)


def open_dvd_image(path: str, size: int | None):
    """A disc image, read-only, in whole 2048-byte blocks."""
    from istgt.scsi.mmc import DVD_BLOCK
    return FileBackend.open(path, size, True, DVD_BLOCK)


def _close_stores(backend, journal, state=None) -> None:
    if hasattr(state, "stop"):
        state.stop()               # a cluster watch goes before its image's handles
    backend.close()
    if journal is not None:
        journal.close()


class Server:
    def __init__(self, config, mode: int = 1):
        self.config = config
        self.mode = mode
        g = config.global_
        self.sessions = SessionRegistry(g.max_sessions)
        # Every connection costs two threads: bound them (logged-in ones plus room for logins)
        self.max_connections = g.max_sessions * g.iscsi.max_connections + SPARE_CONNECTIONS
        self.units: dict[int, LogicalUnit] = {}
        self._by_name: dict[str, LogicalUnit] = {}
        # (socket, portal group tag, portal): replaced as a whole by reload
        self._listeners: list[tuple[socket.socket, int, object]] = []
        self.portal_addresses: list[tuple[str, int]] = []
        self._lock = threading.Lock()
        self._connections: set[Connection] = set()     # guarded by _lock
        # connections not yet in full feature phase, by peer address and by local portal
        self._logging_in: dict[Connection, tuple[str, tuple]] = {}   # guarded by _lock
        self._logins_by_address: Counter[str] = Counter()            # guarded by _lock
        self._logins_by_portal: Counter[tuple] = Counter()           # guarded by _lock
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._reload_lock = threading.Lock()       # one reload at a time
        self.generation = 0                        # reloads applied
        self._threads: list[threading.Thread] = []
        self.control = ControlServer(self, config.unit_control, g.auth_file)
        for problem in audit_config(config):
            log.warning("%s", problem)
        try:
            state_directory = g.state_directory
            if state_directory is not None:
                try:
                    os.makedirs(state_directory, mode=0o700, exist_ok=True)
                except OSError as e:
                    raise StartupError(f"StateDirectory {state_directory}: {e.strerror}") from None
            for number, lu_config in sorted(config.logical_units.items()):
                unit = build_logical_unit(lu_config, g.max_sessions, state_directory)
                self.units[number] = unit
                self._by_name[lu_config.name.lower()] = unit
        except StartupError:
            self._close_units()
            raise

    def set_units(self, units) -> None:
        """Replace the LU registry (reload): by number for istgtcontrol, by name for
        logins. Each map is swapped whole, so readers never see a half-built one."""
        self.units = {unit.number: unit for unit in sorted(units, key=lambda u: u.number)}
        self._by_name = {unit.name.lower(): unit for unit in self.units.values()}

    # ---- lookups used by login and discovery
    def find_target(self, name: str, portal_group_tag: int) -> LogicalUnit | None:
        unit = self._by_name.get(name.lower())
        if unit is None:
            return None
        if not any(pg == portal_group_tag for pg, _ in unit.config.mappings):
            return None
        return unit

    # ---- portals
    def open_portals(self) -> None:
        """The iSCSI portals and the control socket and portals; OSError names the one
        that failed (and nothing stays open)."""
        try:
            for tag, group in sorted(self.config.portal_groups.items()):
                for portal in group.portals:
                    self._listeners.append((self.listen(portal), tag, portal))
            self.control.open()
        except OSError:
            self._close_listeners()
            raise

    def listen(self, portal) -> socket.socket:
        sock = listen_tcp(portal, "listen error", LISTEN_BACKLOG)
        host, port = sock.getsockname()[:2]
        self.portal_addresses.append((host, port))
        net_log.info("listening on %s (portal group %s)", portal.display, portal.label)
        return sock

    def listening_fds(self) -> list[int]:
        return [s.fileno() for s, _, _ in self._listeners]

    # ---- running
    def serve_forever(self) -> None:
        for sock, tag, _ in self._listeners:
            self.start_acceptor(sock, tag)
        keepalive = threading.Thread(target=self._keepalive_loop, daemon=True, name="keepalive")
        keepalive.start()
        self.control.start()
        self._stopped.wait()

    def start_acceptor(self, sock: socket.socket, tag: int) -> None:
        try:
            port = sock.getsockname()[1]
        except OSError:
            return          # closed already: a shutdown overtook the start
        t = threading.Thread(target=self._accept_loop, args=(sock, tag), daemon=True,
                             name=f"acceptor-{port}")
        t.start()
        self._threads.append(t)

    def start(self) -> threading.Thread:
        t = threading.Thread(target=self.serve_forever, daemon=True, name="server")
        t.start()
        return t

    def _accept_loop(self, listener: socket.socket, tag: int) -> None:
        while not self._stopping.is_set():
            try:
                sock, peer = listener.accept()
            except OSError:
                if self._stopping.is_set() or listener.fileno() < 0:
                    return           # shut down, or the portal was closed by a reload
                time.sleep(0.05)     # e.g. EMFILE: do not spin
                continue
            if not self._admit(sock, peer, tag):
                return
            sock = None        # the acceptor must not keep the last connection alive

    def _admit(self, sock: socket.socket, peer, tag: int) -> bool:
        """Start a connection on an accepted socket; False once the server is stopping."""
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            local = sock.getsockname()
            conn = Connection(self, sock, peer, local, tag)
        except OSError as e:
            net_log.warning("accept from %s failed: %s", peer, e)
            sock.close()
            return True
        net_log.debug("connection from %s to %s", peer, local)
        with self._lock:
            if self._stopping.is_set():
                sock.close()
                return False
            address, portal = conn.peer_ip, (conn.local_ip, conn.local_port)
            full = len(self._connections) >= self.max_connections
            crowded = (self._logins_by_address[address] >= MAX_LOGINS_PER_ADDRESS
                       or self._logins_by_portal[portal] >= MAX_LOGINS_PER_PORTAL)
            if not full and not crowded:
                self._connections.add(conn)
                self._logging_in[conn] = (address, portal)
                self._logins_by_address[address] += 1
                self._logins_by_portal[portal] += 1
        if full or crowded:
            if full:
                net_log.warning("connection from %s refused: %d connections already",
                                peer, self.max_connections)
            else:
                net_log.warning("connection from %s refused: too many connections still "
                                "logging in from it or on this portal", peer)
            sock.close()
            return True
        try:
            conn.start()
        except Exception as e:        # e.g. no more threads: keep accepting anyway
            net_log.error("connection from %s dropped: %s", peer, e)
            self.connection_closed(conn)
            sock.close()
        return True

    def _keepalive_loop(self) -> None:
        g = self.config.global_
        next_growth_check = time.monotonic() + GROWTH_CHECK_S
        next_trim = time.monotonic() + allocator.TRIM_INTERVAL_S
        while not self._stopping.wait(KEEPALIVE_TICK):
            now = time.monotonic()
            self._tick_connections(now, g)
            if now >= next_growth_check:
                next_growth_check = now + GROWTH_CHECK_S
                self._notice_growth()
            if now >= next_trim:
                next_trim = now + allocator.TRIM_INTERVAL_S
                allocator.trim()

    def _tick_connections(self, now: float, g) -> None:
        # a method of its own: its loop variable must not outlive the loop (an ended
        # connection would stay alive in the keep-alive thread's frame)
        for conn in self.connections():
            conn.tick(now, g.nop_in_interval, g.timeout)

    def _notice_growth(self) -> None:
        for unit in list(self.units.values()):
            for device in list(unit.devices.values()):
                try:
                    device.notice_growth()
                except Exception:     # never let one LUN stop the keep-alive thread
                    log.exception("LU%d: size check failed", unit.number)

    def connections(self) -> list[Connection]:
        with self._lock:
            return list(self._connections)

    def connection_closed(self, conn: Connection) -> None:
        with self._lock:
            self._connections.discard(conn)
            self._login_over(conn)

    def login_finished(self, conn: Connection) -> None:
        """`conn` reached full feature phase: it no longer counts as logging in."""
        with self._lock:
            self._login_over(conn)

    def _login_over(self, conn: Connection) -> None:
        # call with _lock held
        entry = self._logging_in.pop(conn, None)
        if entry is None:
            return
        address, portal = entry
        for counts, key in ((self._logins_by_address, address), (self._logins_by_portal, portal)):
            counts[key] -= 1
            if not counts[key]:
                del counts[key]          # no entry left behind per address ever seen

    # ---- cross-connection actions (task management)
    def abort_writes_everywhere(self, unit: LogicalUnit, match) -> None:
        """Abort matching commands that still gather Data-Out on any connection to `unit`
        (they are not in the LU's task set yet, so the LU's own abort cannot see them)."""
        for s in self.sessions.all():
            if s.target is unit:
                for conn in s.members():
                    conn.abort_writes(match)

    def close_target_sessions(self, unit: LogicalUnit, reason: str) -> None:
        for s in self.sessions.all():
            if s.target is unit:
                s.close_all(reason)

    # ---- shutdown
    def shutdown(self) -> None:
        if self._stopping.is_set():
            self._stopped.wait(SHUTDOWN_WAIT * 3)
            return
        self._stopping.set()
        self._close_listeners()
        self.control.close()
        conns = self.connections()
        for conn in conns:
            conn.close_async("target shutting down", drain=True)
        deadline = time.monotonic() + SHUTDOWN_WAIT
        for conn in conns:
            conn.finished.wait(max(0.0, deadline - time.monotonic()))
        self._close_units()
        log.info("target stopped")
        self._stopped.set()

    def _close_listeners(self) -> None:
        close_listeners([sock for sock, _, _ in self._listeners])
        self._listeners = []

    # ---- media (istgtcontrol change)
    def open_media(self, unit: LogicalUnit, path: str, size: int | None, flags=("ro",)):
        """The disc image or tape cartridge for a drive of `unit`; an exception says why
        not (BackendError, OSError, ValueError)."""
        if unit.config.unit_type == "tape":
            return open_tape(path, size, flags, unit.config.read_only)
        return open_dvd_image(path, size)

    # ---- reload (SIGHUP, istgtcontrol refresh)
    def reload(self):
        """Re-read the configuration file and apply it (istgt/reload.py); returns what
        changed. ConfigError or StartupError: nothing changed."""
        from istgt.reload import apply_reload
        with self._reload_lock:
            return apply_reload(self)

    def _close_units(self) -> None:
        for unit in self.units.values():
            try:
                unit.shutdown()
            except Exception:
                log.exception("LU%d: shutdown failed", unit.number)


def close_listeners(sockets) -> None:
    for sock in sockets:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
