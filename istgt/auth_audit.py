"""Warnings about CHAP secrets that are easy to steal or to guess (RFC 7143 9.2.1 wants at
least 96 bits of secret when IPsec does not protect the exchange). They never stop a
configuration from loading: existing set-ups keep working and the log says what to fix."""

from __future__ import annotations

import ipaddress
import os
import stat

from istgt.config import AuthFile, Config, ConfigError, UnitControlConfig, load_auth

MIN_SECRET_BYTES = 12       # 96 bits


def audit_config(config: Config) -> list[str]:
    """Every warning for a configuration about to be served (start-up and reload)."""
    return (audit_auth_file(config.global_.auth_file)
            + audit_control_portals(config.unit_control))


def audit_auth_file(path: str) -> list[str]:
    """What is wrong with auth.conf at `path`, one message per problem (file, AuthGroup and
    user named, never the secret); nothing when it is missing or unreadable (login reports
    that)."""
    try:
        mode = os.stat(path).st_mode
        auth = load_auth(path)
    except (OSError, ConfigError):
        return []
    problems = []
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        problems.append(f"{path}: readable or writable by every user (mode "
                        f"{stat.S_IMODE(mode):04o}): CHAP secrets should be 0600 or 0640")
    problems += _short_secrets(auth)
    return problems


def _short_secrets(auth: AuthFile) -> list[str]:
    problems = []
    for group, entries in sorted(auth.groups.items()):
        for entry in entries:
            for role, user, secret in (("secret", entry.user, entry.secret),
                                       ("mutual secret", entry.mutual_user,
                                        entry.mutual_secret)):
                size = len(secret.encode()) if secret is not None else None
                if size is not None and size < MIN_SECRET_BYTES:
                    problems.append(
                        f"{auth.path}: [AuthGroup{group}] user {user!r}: {role} of "
                        f"{size} bytes, shorter than {MIN_SECRET_BYTES} "
                        f"(RFC 7143 asks for 96 bits without IPsec)")
    return problems


def audit_control_portals(unit_control: UnitControlConfig) -> list[str]:
    """A TCP control portal reachable from other machines without CHAP: anyone the Netmask
    lets in may unload media or reset LUs (kept working, as istgt, but said out loud)."""
    if unit_control.auth.method == "chap":
        return []
    problems = []
    for portal in unit_control.portals:
        try:
            loopback = ipaddress.ip_address(portal.host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            problems.append(f"[UnitControl] Portal {portal.label} {portal.display}: reachable "
                            f"from the network without CHAP (AuthMethod "
                            f"{unit_control.auth.method}); use AuthMethod CHAP with an "
                            f"AuthGroup, or a loopback address")
    return problems
