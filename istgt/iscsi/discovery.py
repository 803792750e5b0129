"""SendTargets (RFC 7143 appendix C): which targets and portals an initiator is told about."""

from __future__ import annotations

import socket

from istgt.config import visible, visible_portal_groups


def send_targets(server, conn, value: str) -> list[tuple[str, str]]:
    session = conn.session
    config = server.config
    if value == "All":
        if not session.discovery:
            return [("SendTargets", "Reject")]
        wanted = None
    elif value == "":
        if session.discovery:
            return []
        wanted = session.target_name.lower()
    else:
        wanted = value.lower()
    out: list[tuple[str, str]] = []
    for number in sorted(config.logical_units):
        lu = config.logical_units[number]
        if wanted is not None and lu.name.lower() != wanted:
            continue
        if server.find_target(lu.name, conn.portal_group_tag) is None:
            continue
        if not visible(config, lu, conn.portal_group_tag, session.initiator_name, conn.peer_ip):
            continue
        out.append(("TargetName", lu.name))
        for tag in visible_portal_groups(config, lu, session.initiator_name, conn.peer_ip):
            group = config.portal_groups.get(tag)
            if group is None:
                continue
            for portal in group.portals:
                address = _address(portal, conn)
                if address is not None:
                    out.append(("TargetAddress", f"{address},{tag}"))
    return out


def _address(portal, conn) -> str | None:
    """host:port as the initiator should dial it; a wildcard becomes this connection's address."""
    host = portal.host
    if portal.is_wildcard:
        local_v6 = ":" in conn.local_ip and not conn.local_ip.startswith("::ffff:")
        if (portal.family == socket.AF_INET6) != local_v6:
            return None
        host = conn.local_ip
    if ":" in host:
        return f"[{host}]:{portal.port}"
    return f"{host}:{portal.port}"
