"""Configuration reload (SIGHUP, istgtcontrol refresh): every section, all or nothing.

Prepare, touching nothing that runs: read the file, build the logical units and LUNs that
are new or changed, open the portals that are new. Any failure closes what was prepared and
the running configuration stays, whole.

Commit: swap the configuration (new logins see the new [Global], ACLs, auth and digests);
register new LUs; apply LUN changes in place (REPORTED LUNS DATA HAS CHANGED when LUNs come
or go, a grown size becomes an online resize); close the portals that went; end the sessions
that lost access, and those of LUs that went or had to be rebuilt; shut those LUs down.
Sessions of untouched LUs never notice.

What changes in place and what rebuilds an LU (its sessions end, initiators log in again):
mappings, AuthMethod/AuthGroup, digests, iSCSI parameters, alias and the LU number change
in place; UnitType, ReadOnly, UnitOnline, UnitInquiry, BlockLength and QueueDepth rebuild.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from istgt.auth_audit import audit_config
from istgt.config import access_allowed, load_config
from istgt.lu.copy_targets import CopyTargets

log = logging.getLogger("istgt")

# LogicalUnitConfig fields read only at login or for display: changed on the running LU
IN_PLACE_FIELDS = ("number", "alias", "mappings", "auth", "header_digest", "data_digest",
                   "iscsi", "luns")
SESSION_END_WAIT_S = 10.0


@dataclass
class ReloadReport:
    generation: int
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    rebuilt: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    portals_opened: list[str] = field(default_factory=list)
    portals_closed: list[str] = field(default_factory=list)
    sessions_ended: int = 0
    errors: list[str] = field(default_factory=list)     # steps of the commit that failed

    def lines(self) -> list[str]:
        """What changed, one line each (logged, and printed by istgtcontrol refresh)."""
        out = [f"reload configuration #{self.generation}"]
        for what, names in (("add", self.added), ("delete", self.removed),
                            ("rebuild", self.rebuilt), ("update", self.updated),
                            ("open portal", self.portals_opened),
                            ("close portal", self.portals_closed)):
            out += [f"{what} {name}" for name in names]
        if self.sessions_ended:
            out.append(f"ended {self.sessions_ended} session(s)")
        out += [f"error {error}" for error in self.errors]
        return out


@dataclass
class _LunChange:
    config: Any                              # the new LogicalUnitConfig
    built: dict[int, Any]                    # new or replacing devices by LUN
    removed: set[int]
    grown: dict[int, int | None]             # LUN -> new size (None: Auto) to resize to


@dataclass
class _Plan:
    config: Any
    added: dict[str, Any] = field(default_factory=dict)       # name -> new LogicalUnit
    rebuilt: dict[str, Any] = field(default_factory=dict)     # name -> new LogicalUnit
    changed: dict[str, _LunChange] = field(default_factory=dict)
    updated: dict[str, Any] = field(default_factory=dict)     # name -> new LU config
    # tape LUs to build only once the old one has stopped (its cartridge index must see
    # every record it wrote): name -> new LU config
    deferred: dict[str, Any] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)
    new_listeners: list[tuple[Any, int, Any]] = field(default_factory=list)
    gone_listeners: list[tuple[Any, int, Any]] = field(default_factory=list)

    def discard(self) -> None:
        """Undo the prepare step: close every unit, device and socket it made."""
        from istgt.server import close_listeners
        for unit in [*self.added.values(), *self.rebuilt.values()]:
            unit.shutdown()
        for change in self.changed.values():
            for device in change.built.values():
                device.close()
        close_listeners([sock for sock, _, _ in self.new_listeners])


def apply_reload(server: Any) -> ReloadReport:
    """Reload `server`'s configuration file. ConfigError, StartupError or OSError: nothing
    changed."""
    new = load_config(server.config.path)
    plan = _prepare(server, new)
    return _commit(server, plan)


def _needs_rebuild(old: Any, new: Any) -> bool:
    keep = {name: getattr(old, name) for name in IN_PLACE_FIELDS}
    return dataclasses.replace(new, **keep) != old


def _portal_key(tag: int, portal: Any) -> tuple[int, str, int]:
    return tag, portal.host, portal.port


def _prepare(server: Any, new: Any) -> _Plan:
    from istgt.server import StartupError, build_device, build_logical_unit
    plan = _Plan(new)
    state_directory = new.global_.state_directory
    running = {unit.name.lower(): unit for unit in server.units.values()}
    wanted = {lu.name.lower(): lu for lu in new.logical_units.values()}
    try:
        for name, lu in sorted(wanted.items()):
            unit = running.get(name)
            if unit is None:
                plan.added[name] = build_logical_unit(lu, new.global_.max_sessions,
                                                      state_directory)
            elif unit.config == lu:
                continue
            elif "tape" in (unit.config.unit_type, lu.unit_type) and (
                    _needs_rebuild(unit.config, lu) or unit.config.luns != lu.luns):
                build_logical_unit(lu, new.global_.max_sessions, state_directory).shutdown()
                plan.deferred[name] = lu           # it can be built: build it at commit
            elif _needs_rebuild(unit.config, lu):
                plan.rebuilt[name] = build_logical_unit(lu, new.global_.max_sessions,
                                                        state_directory)
            elif unit.config.luns != lu.luns:
                plan.changed[name] = _plan_luns(unit, lu, state_directory, build_device)
            else:
                plan.updated[name] = lu
        plan.removed = sorted(set(running) - set(wanted))
        old_keys = {_portal_key(tag, portal): (sock, tag, portal)
                    for sock, tag, portal in server._listeners}
        new_keys = {_portal_key(tag, portal): (tag, portal)
                    for tag, group in new.portal_groups.items() for portal in group.portals}
        for key, (tag, portal) in sorted(new_keys.items()):
            if key not in old_keys:
                plan.new_listeners.append((server.listen(portal), tag, portal))
        plan.gone_listeners = [entry for key, entry in old_keys.items() if key not in new_keys]
    except (StartupError, OSError, ValueError):
        plan.discard()
        raise
    return plan


def _plan_luns(unit: Any, lu: Any, state_directory: str | None, build: Any) -> _LunChange:
    change = _LunChange(lu, {}, set(unit.config.luns) - set(lu.luns), {})
    for number, lun in sorted(lu.luns.items()):
        old = unit.config.luns.get(number)
        if old == lun:
            continue
        if old is not None and dataclasses.replace(old, size=lun.size) == lun \
                and unit.config.unit_type == "disk":
            device = unit.devices[number]
            if lun.size is not None and lun.size // device.block_length < device.block_count:
                raise ValueError(f"{lu.name} LUN{number}: {lun.size} bytes is smaller than "
                                 "the LUN's current size (a LUN never shrinks online)")
            change.grown[number] = lun.size
            continue
        change.built[number] = build(lu, lun, state_directory)
    return change


def _commit(server: Any, plan: _Plan) -> ReloadReport:
    from istgt.server import close_listeners
    new = plan.config
    server.generation += 1
    report = ReloadReport(server.generation)
    g = new.global_
    running = {unit.name.lower(): unit for unit in server.units.values()}
    retired = [running[name] for name in [*plan.removed, *plan.rebuilt, *plan.deferred]]

    def attempt(what: str, step: Any, *args: Any) -> Any:
        # One step failing (a store that cannot grow, a control socket that cannot be
        # re-opened) must not leave the rest of the new configuration unapplied.
        try:
            return step(*args)
        except Exception as error:
            log.error("reload: %s failed: %s", what, error)
            report.errors.append(f"{what}: {error}")
            return None

    for name, lu in plan.updated.items():
        running[name].config = lu
        running[name].number = lu.number
    for name, change in plan.changed.items():
        unit = running[name]
        for device in unit.replace_luns(change.config, change.built, change.removed):
            device.close()
        for number, size in change.grown.items():
            attempt(f"resize {unit.name} LUN{number}", unit.devices[number].resize, size)
        copy_targets = CopyTargets(unit.devices.values())   # EXTENDED COPY's LUN registry
        for device in unit.devices.values():
            device.copy_targets = copy_targets
    survivors = [unit for unit in running.values() if unit not in retired]
    server.config = new
    server.sessions.max_sessions = g.max_sessions
    server.set_units([*survivors, *plan.added.values(), *plan.rebuilt.values()])

    # portals
    kept = [entry for entry in server._listeners if entry not in plan.gone_listeners]
    server._listeners = kept + plan.new_listeners
    close_listeners([sock for sock, _, _ in plan.gone_listeners])
    for sock, tag, _ in plan.new_listeners:
        server.start_acceptor(sock, tag)
    attempt("control channel", server.control.reconfigure, new.unit_control, g.auth_file)
    for problem in audit_config(new):
        log.warning("%s", problem)

    # sessions
    ending = [s for s in server.sessions.all()
              if not s.discovery and s.target is not None and
              (s.target in retired or not _still_allowed(new, s))]
    for session in ending:
        session.close_all("configuration reload")
    report.sessions_ended = len(ending)
    _wait_for_connections(ending)
    for unit in retired:
        attempt(f"shut down {unit.name}", unit.shutdown)
    from istgt.server import build_logical_unit
    for _name, lu in sorted(plan.deferred.items()):
        unit = attempt(f"rebuild {lu.name}", build_logical_unit, lu, g.max_sessions,
                       g.state_directory)
        if unit is not None:
            server.set_units([*server.units.values(), unit])
            report.rebuilt.append(unit.name)

    report.added = sorted(unit.name for unit in plan.added.values())
    report.removed = sorted(running[name].name for name in plan.removed)
    report.rebuilt = sorted([*report.rebuilt, *(unit.name for unit in plan.rebuilt.values())])
    report.updated = sorted([*(lu.name for lu in plan.updated.values()),
                             *(c.config.name for c in plan.changed.values())])
    report.portals_opened = [portal.display for _, _, portal in plan.new_listeners]
    report.portals_closed = [portal.display for _, _, portal in plan.gone_listeners]
    for line in report.lines():
        log.warning("%s", line)
    return report


def _still_allowed(config: Any, session: Any) -> bool:
    lu = session.target.config
    return all(access_allowed(config, lu, session.portal_group_tag, session.initiator_name,
                              conn.peer_ip) for conn in session.members())


def _wait_for_connections(sessions: list[Any]) -> None:
    deadline = time.monotonic() + SESSION_END_WAIT_S
    for session in sessions:
        for conn in session.members():
            conn.finished.wait(max(0.0, deadline - time.monotonic()))
