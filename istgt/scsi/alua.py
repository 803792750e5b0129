"""Implicit ALUA (SPC-4 5.16): the target port groups of a logical unit and REPORT TARGET
PORT GROUPS.

Mapping (doc/scsi.md "Target ports and ALUA"): an iSCSI target port is the target name plus
a portal group tag. Each portal group an LU is mapped to is one target port, and forms its
own target port group: relative target port identifier = target port group = portal group
tag (1..65535, never 0). Every group is active/optimized all the time; the states never
change, so the asymmetry is implicit only (TPGS 01b) and no transition is ever reported.
The exception is an LU several gateways export from one shared image (GatewayPortGroups):
there the lowest live gateway's group is active/optimized and the others active/non-optimized,
and the states follow the gateways that answer (implicit transitions, not reported by UA).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from istgt.scsi import spc
from istgt.scsi.command import CommandSpec, ITNexus, ScsiTask, u32, usage_mask
from istgt.scsi.constants import DataDirection, Opcode
from istgt.scsi.sense import invalid_field_in_cdb

TPGS_IMPLICIT = 0b01
REPORT_TARGET_PORT_GROUPS = 0x0A

STATE_ACTIVE_OPTIMIZED = 0x0
STATE_ACTIVE_NON_OPTIMIZED = 0x1
SUPPORTS_ACTIVE_OPTIMIZED = 0x01      # AO_SUP
SUPPORTS_ACTIVE_NON_OPTIMIZED = 0x02  # AN_SUP (gateways of a shared image)
STATUS_NO_STATUS = 0x00

FORMAT_LENGTH_ONLY = 0b000
FORMAT_EXTENDED = 0b001
# No transition ever happens; 0 = "not specified" (SPC-4 6.36).
IMPLICIT_TRANSITION_SECONDS = 0


def target_port_name(target_name: str, portal_group_tag: int) -> str:
    """The iSCSI target port name: `<target name>,t,0x<tpgt>` (as in the I_T nexus)."""
    return f"{target_name},t,0x{portal_group_tag:04x}"


@dataclass(frozen=True)
class TargetPortGroups:
    """The target ports of one LU: the portal group tags it is mapped to, sorted."""

    target_name: str
    tags: tuple[int, ...]

    tpgs = TPGS_IMPLICIT

    @classmethod
    def of_unit(cls, lu: Any) -> TargetPortGroups:
        """From a LogicalUnitConfig: one port per distinct portal group of its Mapping lines."""
        mappings = getattr(lu, "mappings", None) or ()
        return cls(str(lu.name), tuple(sorted({pg for pg, _ in mappings})))

    def group_of(self, nexus: ITNexus) -> int:
        """The target port group of the port a command arrived on."""
        return nexus.relative_port_id

    def target_ports(self) -> dict[int, str]:
        """Relative target port identifier -> target port name (for REGISTER AND MOVE)."""
        return {tag: target_port_name(self.target_name, tag) for tag in self.tags}

    def groups_seen_from(self, nexus: ITNexus) -> tuple[int, ...]:
        """The groups to report: the mapped ones, and always the one the command came in on."""
        return tuple(sorted({*self.tags, self.group_of(nexus)}))

    def states_seen_from(self, nexus: ITNexus) -> list[tuple[int, int, int]]:
        """(group, asymmetric access state, supported states) of each group to report."""
        return [(group, STATE_ACTIVE_OPTIMIZED, SUPPORTS_ACTIVE_OPTIMIZED)
                for group in self.groups_seen_from(nexus)]


@dataclass(frozen=True)
class GatewayPortGroups(TargetPortGroups):
    """The target ports of an LU several gateways (target processes) export from one shared
    image: every live gateway's groups, as `live_groups()` finds them in the cluster. The
    lowest live group is active/optimized, the others active/non-optimized, so multipath
    initiators use one gateway and fail over to the next when it stops answering."""

    live_groups: Callable[[], Iterable[int]] = field(default=lambda: (), compare=False)

    def groups_seen_from(self, nexus: ITNexus) -> tuple[int, ...]:
        return tuple(sorted({*self.tags, self.group_of(nexus), *self.live_groups()}))

    def states_seen_from(self, nexus: ITNexus) -> list[tuple[int, int, int]]:
        live = set(self.live_groups()) or set(self.tags)
        optimized = min(live)
        supported = SUPPORTS_ACTIVE_OPTIMIZED | SUPPORTS_ACTIVE_NON_OPTIMIZED
        return [(group, STATE_ACTIVE_OPTIMIZED if group == optimized
                 else STATE_ACTIVE_NON_OPTIMIZED, supported)
                for group in self.groups_seen_from(nexus)]


def port_group_descriptor(group: int, relative_port_ids: Iterable[int],
                          state: int = STATE_ACTIVE_OPTIMIZED,
                          supported: int = SUPPORTS_ACTIVE_OPTIMIZED) -> bytes:
    ports = tuple(relative_port_ids)
    header = struct.pack(
        ">BBHxBxB",
        state,  # PREF=0
        supported,
        group,
        STATUS_NO_STATUS,
        len(ports),
    )
    return header + b"".join(struct.pack(">xxH", port) for port in ports)


def report_data(groups: Iterable[int | tuple[int, int, int]], extended: bool) -> bytes:
    """REPORT TARGET PORT GROUPS parameter data: one group per port, the port's id = group;
    a group is its number (active/optimized) or (group, state, supported states)."""
    body = b""
    for item in groups:
        group, state, supported = item if isinstance(item, tuple) else (
            item, STATE_ACTIVE_OPTIMIZED, SUPPORTS_ACTIVE_OPTIMIZED)
        body += port_group_descriptor(group, (group,), state, supported)
    if extended:
        body = struct.pack(">BBxx", FORMAT_EXTENDED << 4, IMPLICIT_TRANSITION_SECONDS) + body
    # RETURN DATA LENGTH counts every byte after itself (the extended header too).
    return struct.pack(">I", len(body)) + body


def report_target_port_groups(device: Any, task: ScsiTask) -> None:
    cdb = task.cdb
    parameter_format = cdb[1] >> 5
    if parameter_format not in (FORMAT_LENGTH_ONLY, FORMAT_EXTENDED):
        raise invalid_field_in_cdb(1, 7)
    groups = device.port_groups.states_seen_from(task.nexus)
    data = report_data(groups, extended=parameter_format == FORMAT_EXTENDED)
    spc.respond(task, data, u32(cdb, 6))


# MAINTENANCE IN / REPORT TARGET PORT GROUPS: PARAMETER DATA FORMAT (byte 1 bits 7-5),
# ALLOCATION LENGTH (bytes 6-9). Allowed on an offline LU: path checkers must still see
# which ports lead to it.
COMMANDS = (
    CommandSpec(
        opcode=Opcode.MAINTENANCE_IN,
        service_action=REPORT_TARGET_PORT_GROUPS,
        name="REPORT TARGET PORT GROUPS",
        handler=report_target_port_groups,
        direction=DataDirection.IN,
        usage=usage_mask(
            Opcode.MAINTENANCE_IN,
            (1, 0xE0 | REPORT_TARGET_PORT_GROUPS),
            *((index, 0xFF) for index in range(6, 10)),
        ),
        allowed_offline=True,
    ),
)
