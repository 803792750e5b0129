"""Typed, validated, immutable configuration: istgt.conf, auth.conf, istgtcontrol.conf.

conf.py turns the text into sections of (key, values, line); this module gives them
meaning.  Defaults and ranges follow C istgt (doc/config.md lists every key).  Where
C silently accepts nonsense (bad TargetName, unknown Yes/No words, a Netmask that
can never match) this module raises ConfigError naming file, line, section and key.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from istgt.conf import ConfFile, ConfigError, Item, Section, SectionKind, read_conf

__all__ = [
    "AuthEntry",
    "AuthFile",
    "AuthSpec",
    "Config",
    "ConfigError",
    "ControlClientConfig",
    "GlobalConfig",
    "InitiatorGroup",
    "InquiryConfig",
    "IscsiParams",
    "LogicalUnitConfig",
    "LunConfig",
    "Netmask",
    "Portal",
    "PortalGroup",
    "UnitControlConfig",
    "access_allowed",
    "load_auth",
    "load_config",
    "load_control_config",
    "parse_size",
    "visible",
    "visible_portal_groups",
]

log = logging.getLogger("istgt.config")

DEFAULT_NODE_BASE = "iqn.2007-09.jp.ne.peach.istgt"
DEFAULT_PID_FILE = "/var/run/istgt.pid"
DEFAULT_MEDIA_DIRECTORY = "/var/istgt"
DEFAULT_LOG_FACILITY = "local7"
DEFAULT_CONTROL_SOCKET = "/var/run/istgt/istgt.sock"
DEFAULT_PORT = 3260
DEFAULT_CONTROL_PORT = 3261

# C accepts daemon, auth, authpriv and local1..local7; local0 and user are refused
# only by a bug (B3), so they are accepted here.
LOG_FACILITIES = frozenset(
    ["daemon", "auth", "authpriv", "user"] + [f"local{n}" for n in range(8)]
)

MAX_LOGICAL_UNIT = 4095
MAX_GROUP_TAG = 65535  # portal group tags are 16 bits on the wire (C never checks, B29)
MAX_LUN = 63
MAX_PORTALS = 1024
MAX_CONTROL_PORTALS = 16
MAX_INITIATORS = 256
MAX_NETMASKS = 256
MAX_MAPPINGS = 256
MAX_QUEUE_DEPTH = 255
MAX_R2T = 256
MAX_SECONDS = 2**31 - 1     # a C int in istgt; far larger would overflow the thread timeouts
MAX_TARGET_NAME = 223  # bytes, RFC 7143 section 6.1
MIN_REMOVABLE_SIZE = 1 << 20
UINT64_MAX = (1 << 64) - 1

AuthMethod = Literal["none", "chap", "auto"]
DigestPolicy = Literal["auto", "required"]
UnitType = Literal["disk", "dvd", "tape", "pass"]
LunKind = Literal["storage", "removable", "device"]


# ---------------------------------------------------------------------------
# Objects


@dataclass(frozen=True)
class IscsiParams:
    """Operational values the target proposes (Global, or Global merged with an LU)."""

    max_outstanding_r2t: int = 16
    default_time2wait: int = 2
    default_time2retain: int = 20
    first_burst_length: int = 65536
    max_burst_length: int = 262144
    max_recv_data_segment_length: int = 8192
    initial_r2t: bool = True
    immediate_data: bool = True
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    error_recovery_level: int = 0
    max_connections: int = 4


@dataclass(frozen=True)
class AuthSpec:
    method: AuthMethod = "auto"
    mutual: bool = False
    group: int | None = None  # AuthGroupN in auth.conf; None = no group


@dataclass(frozen=True)
class GlobalConfig:
    node_base: str = DEFAULT_NODE_BASE
    pid_file: str = DEFAULT_PID_FILE
    auth_file: str = "auth.conf"
    media_directory: str = DEFAULT_MEDIA_DIRECTORY
    state_directory: str | None = None  # persistent-reservation state (APTPL); None = no APTPL
    log_facility: str = DEFAULT_LOG_FACILITY
    timeout: int = 60
    nop_in_interval: int = 20
    max_r2t: int = 16
    discovery_auth: AuthSpec = AuthSpec()
    max_sessions: int = 32
    iscsi: IscsiParams = IscsiParams()


@dataclass(frozen=True)
class Portal:
    label: str
    host: str  # numeric, without brackets; "0.0.0.0" / "::" for wildcards
    port: int

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    @property
    def display(self) -> str:
        """``host:port`` with IPv6 in brackets, as SendTargets prints it."""
        if self.family == socket.AF_INET6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @property
    def is_wildcard(self) -> bool:
        return self.host in ("0.0.0.0", "::")


@dataclass(frozen=True)
class Netmask:
    text: str  # as written, for logs
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None  # None = ALL

    def matches(self, ip: str) -> bool:
        """Does peer address ``ip`` fall in this mask?

        ALL and any /0 match every address (C's /0 matched nothing, bug B4).  An
        IPv4 client seen on an IPv6 socket (``::ffff:a.b.c.d``) matches IPv4 masks.
        """
        if self.network is None or self.network.prefixlen == 0:
            return True
        address = _peer_address(ip)
        if address is None:
            return False
        if address.version != self.network.version:
            return False
        return address in self.network


@dataclass(frozen=True)
class UnitControlConfig:
    portals: tuple[Portal, ...] = ()
    netmasks: tuple[Netmask, ...] = ()  # empty = any address
    auth: AuthSpec = AuthSpec()
    socket_path: str = DEFAULT_CONTROL_SOCKET
    socket_configured: bool = False   # ControlSocket written in the file (else the default)


@dataclass(frozen=True)
class PortalGroup:
    tag: int
    portals: tuple[Portal, ...]


@dataclass(frozen=True)
class InitiatorGroup:
    tag: int
    names: tuple[str, ...]  # as written: "ALL", "!ALL", "name", "!name"
    netmasks: tuple[Netmask, ...]  # empty = any address

    def name_verdict(self, initiator_name: str) -> bool | None:
        """The first InitiatorName entry that matches decides; None if none does.

        False means an explicit deny (``!name`` / ``!ALL``); True an allow.
        """
        folded = initiator_name.casefold()
        for entry in self.names:
            deny = entry.startswith("!")
            pattern = entry[1:] if deny else entry
            if pattern.casefold() == "all" or pattern.casefold() == folded:
                return not deny
        return None

    def address_allowed(self, peer_ip: str) -> bool:
        return not self.netmasks or any(mask.matches(peer_ip) for mask in self.netmasks)


@dataclass(frozen=True)
class InquiryConfig:
    vendor: str
    product: str
    revision: str
    serial: str


@dataclass(frozen=True)
class LunConfig:
    number: int
    kind: LunKind
    path: str
    size: int | None  # bytes; None = Auto (size of the file or device)
    serial: str
    rpm: int = 7200  # 0 = not reported, 1 = non-rotating
    form_factor: int = 2  # 3.5"
    read_cache: bool = True
    write_cache: bool = True
    flags: tuple[str, ...] = ()  # removable media: ro, rw, extend, dynamic
    provisioning: str | None = None  # Disk: "thin" or "full"; None = thin if the store can deallocate
    physical_block_size: int | None = None  # Disk: bytes; None = the LU's BlockLength
    removable_disk: bool = False  # Disk: RMB, PREVENT ALLOW MEDIUM REMOVAL, eject/load

    @property
    def read_only_media(self) -> bool:
        return "ro" in self.flags and "rw" not in self.flags

    @property
    def no_media(self) -> bool:
        return self.kind == "removable" and self.path == "/dev/null"


@dataclass(frozen=True)
class LogicalUnitConfig:
    number: int
    name: str  # full target name
    alias: str | None
    mappings: tuple[tuple[int, int], ...]  # (portal group tag, initiator group tag)
    auth: AuthSpec
    header_digest: DigestPolicy
    data_digest: DigestPolicy
    read_only: bool
    unit_type: UnitType
    online: bool
    inquiry: InquiryConfig
    block_length: int
    queue_depth: int
    luns: dict[int, LunConfig]
    iscsi: IscsiParams


@dataclass(frozen=True)
class Config:
    path: str
    global_: GlobalConfig
    unit_control: UnitControlConfig
    portal_groups: dict[int, PortalGroup]
    initiator_groups: dict[int, InitiatorGroup]
    logical_units: dict[int, LogicalUnitConfig]

    def find_target(self, name: str) -> LogicalUnitConfig | None:
        """The LU with this target name (case-insensitive), if any."""
        folded = name.casefold()
        for lu in self.logical_units.values():
            if lu.name.casefold() == folded:
                return lu
        return None


@dataclass(frozen=True)
class AuthEntry:
    user: str
    secret: str
    mutual_user: str | None = None
    mutual_secret: str | None = None


@dataclass(frozen=True)
class AuthFile:
    path: str
    groups: dict[int, tuple[AuthEntry, ...]] = field(default_factory=dict)

    def lookup(self, group: int, user: str) -> AuthEntry | None:
        """First entry of ``group`` whose user equals ``user`` case-insensitively."""
        folded = user.casefold()
        for entry in self.groups.get(group, ()):
            if entry.user.casefold() == folded:
                return entry
        return None


@dataclass(frozen=True)
class ControlClientConfig:
    """istgtcontrol.conf ([Global] only): defaults for the istgtcontrol client."""

    host: str = "localhost"
    port: int = DEFAULT_CONTROL_PORT
    socket_path: str = DEFAULT_CONTROL_SOCKET
    target_name: str | None = None
    lun: int = 0
    flags: str = "ro"
    size: str = "auto"
    timeout: int = 60
    auth: AuthSpec = AuthSpec(method="none")
    auth_entry: AuthEntry | None = None
    # TCP unless a ControlSocket is named: a file written for the C istgtcontrol has only
    # Host and Port
    tcp: bool = False


# ---------------------------------------------------------------------------
# ACL (istgt-core.md 4.8)


def access_allowed(
    config: Config, lu: LogicalUnitConfig, pg_tag: int, initiator_name: str, peer_ip: str
) -> bool:
    """May ``initiator_name`` at ``peer_ip``, on a portal of group ``pg_tag``, log in?

    Only Mapping lines for ``pg_tag`` count.  In each mapped initiator group, in
    Mapping order, the InitiatorName entries are walked in order: a matching deny
    entry denies at once; a matching allow entry allows if the group has no Netmask
    or one matches the peer, otherwise the walk goes on.  Nothing allowed is a deny.
    """
    folded = initiator_name.casefold()
    for mapped_pg, ig_tag in lu.mappings:
        if mapped_pg != pg_tag:
            continue
        group = config.initiator_groups.get(ig_tag)
        if group is None:
            continue
        for entry in group.names:
            deny = entry.startswith("!")
            pattern = (entry[1:] if deny else entry).casefold()
            if pattern != "all" and pattern != folded:
                continue
            if deny:
                return False
            if group.address_allowed(peer_ip):
                return True
    return False


def visible(
    config: Config, lu: LogicalUnitConfig, pg_tag: int, initiator_name: str, peer_ip: str
) -> bool:
    """Should SendTargets on a ``pg_tag`` portal list ``lu`` to this initiator?

    Exactly the login decision: C lists a target by initiator name only and over
    every mapped group (bug B31), revealing targets the initiator cannot log in to.
    """
    return access_allowed(config, lu, pg_tag, initiator_name, peer_ip)


def visible_portal_groups(
    config: Config, lu: LogicalUnitConfig, initiator_name: str, peer_ip: str
) -> tuple[int, ...]:
    """Portal group tags of ``lu`` whose addresses SendTargets lists, in Mapping order."""
    tags: list[int] = []
    for pg_tag, _ in lu.mappings:
        if pg_tag not in tags and access_allowed(config, lu, pg_tag, initiator_name, peer_ip):
            tags.append(pg_tag)
    return tuple(tags)


# ---------------------------------------------------------------------------
# Values


_SIZE_TERM = re.compile(r"\s*(\d+)\s*([kmgtpez]?)b?\s*", re.IGNORECASE)
_UNIT_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60, "z": 70}


def parse_size(text: str) -> int:
    """Parse an istgt size expression: ``10GB``, ``512m``, ``20GB-1MB``, ``8EB-1``.

    ``<uint>[KMGTPEZ][B] [(+|-) <uint>[KMGTPEZ][B]]``, units are powers of 1024 and
    case-insensitive.  As in C, underflow gives 0 and overflow UINT64_MAX.  Raises
    ValueError for anything else (C reads ``1.5GB`` as 1; that is refused here).
    """

    def term(part: str) -> int:
        match = _SIZE_TERM.fullmatch(part)
        if match is None:
            raise ValueError(f"invalid size {text!r}")
        return int(match.group(1)) << _UNIT_SHIFT[match.group(2).lower()]

    operator = None
    for position, char in enumerate(text):
        if char in "+-":
            operator = position
            break
    if operator is None:
        total = term(text)
    else:
        left = term(text[:operator])
        right = term(text[operator + 1 :])
        total = left + right if text[operator] == "+" else max(left - right, 0)
    return min(total, UINT64_MAX)


def _peer_address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = ip.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    text = text.split("%", 1)[0]  # zone index of a link-local peer
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


_IQN_DATE = re.compile(r"iqn\.\d{4}-\d{2}\.", re.IGNORECASE)
_EUI = re.compile(r"eui\.[0-9a-f]{16}", re.IGNORECASE)
_NAA = re.compile(r"naa\.(?:[0-9a-f]{16}|[0-9a-f]{32})", re.IGNORECASE)


def _name_problem(name: str) -> str | None:
    """Why ``name`` is not a valid iSCSI name, or None (RFC 3720/7143 section 6.1)."""
    if not name:
        return "empty name"
    if len(name.encode()) > MAX_TARGET_NAME:
        return f"longer than {MAX_TARGET_NAME} bytes"
    for char in name:
        if not (char.isascii() and (char.isalnum() or char in "-.:")):
            return f"character {char!r} is not allowed (only letters, digits, '-', '.', ':')"
    lowered = name.lower()
    if lowered.startswith("iqn.") and not _IQN_DATE.match(name):
        return "an iqn. name must start with iqn.YYYY-MM."
    if lowered.startswith("eui.") and not _EUI.fullmatch(name):
        return "an eui. name is eui. followed by 16 hex digits"
    if lowered.startswith("naa.") and not _NAA.fullmatch(name):
        return "a naa. name is naa. followed by 16 or 32 hex digits"
    return None


# ---------------------------------------------------------------------------
# Reading sections


class _Reader:
    """One section's keys, with errors located at the right line and key."""

    def __init__(self, conf: ConfFile, section: Section, known: frozenset[str]) -> None:
        self.path = conf.path
        self.section = section
        self._warned: set[str] = set()  # repeated keys already reported
        for item in section.items:
            folded = item.key.casefold()
            if folded not in known and not self._dynamic_key(folded):
                log.warning(
                    "%s:%d: [%s] %s: unknown key ignored",
                    self.path, item.line, section.name, item.key,
                )

    def _dynamic_key(self, folded: str) -> bool:
        return self.section.kind is SectionKind.LOGICAL_UNIT and folded.startswith("lun")

    def error(self, message: str, item: Item | None = None, key: str | None = None) -> ConfigError:
        line = item.line if item is not None else self.section.line
        return ConfigError(
            message,
            self.path,
            line,
            self.section.name,
            item.key if item is not None else key,
        )

    def item(self, key: str) -> Item | None:
        """First ``key`` with a value; a key written without a value counts as unset."""
        found = self.section.first(key)
        if found is None or not found.values:
            return None
        repeated = [other for other in self.section.all(key) if other is not found]
        if repeated and key.casefold() not in self._warned:
            self._warned.add(key.casefold())
            log.warning(
                "%s:%d: [%s] %s: repeated key ignored (line %d is used)",
                self.path, repeated[0].line, self.section.name, key, found.line,
            )
        return found

    def string(self, key: str, default: str) -> str:
        found = self.item(key)
        return default if found is None else found.values[0]

    def integer(
        self,
        key: str,
        default: int,
        minimum: int | None = None,
        maximum: int | None = None,
        below_means_default: int | None = None,
    ) -> int:
        """An integer key.  C turns some out-of-range low values into the default."""
        found = self.item(key)
        if found is None:
            return default
        value = self.to_int(found, found.values[0])
        if below_means_default is not None and value < below_means_default:
            return default
        if minimum is not None and value < minimum or maximum is not None and value > maximum:
            raise self.error(f"{value} is out of range {minimum}..{maximum}", found)
        return value

    def to_int(self, item: Item, text: str) -> int:
        if not re.fullmatch(r"[+-]?\d+", text):
            raise self.error(f"expected an integer, got {text!r}", item)
        return int(text)

    def yes_no(self, key: str, default: bool) -> bool:
        found = self.item(key)
        if found is None:
            return default
        word = found.values[0].casefold()
        if word not in ("yes", "no"):
            raise self.error(f"expected Yes or No, got {found.values[0]!r}", found)
        return word == "yes"

    def only_yes(self, key: str) -> bool:
        """Keys C supports only with the value Yes."""
        found = self.item(key)
        if found is not None and not self.yes_no(key, True):
            raise self.error("only Yes is supported", found)
        return True

    def auth_method(self, key: str, default: AuthMethod) -> tuple[AuthMethod, bool]:
        found = self.item(key)
        if found is None:
            return default, False
        method: AuthMethod = default
        mutual = False
        for token in found.values:  # read left to right, as C does
            word = token.casefold()
            if word == "chap":
                method = "chap"
            elif word == "auto":
                method = "auto"
            elif word == "none":
                method = "none"
            elif word == "mutual":
                mutual = True
            else:
                raise self.error(
                    f"unknown auth method {token!r} (expected CHAP, Mutual, Auto or None)", found
                )
        if mutual and method != "chap":
            raise self.error("Mutual requires CHAP (write: CHAP Mutual)", found)
        return method, mutual

    def auth_group(self, key: str) -> int | None:
        found = self.item(key)
        if found is None:
            return None
        text = found.values[0]
        if text.casefold() == "none":
            return None
        match = re.fullmatch(r"AuthGroup(\d+)", text, re.IGNORECASE)
        if match is None:
            raise self.error(f"expected AuthGroupN or None, got {text!r}", found)
        number = int(match.group(1))
        if number < 1:
            raise self.error("AuthGroup0 is invalid (N must be >= 1)", found)
        return number

    def auth_spec(self, method_key: str, group_key: str, default: AuthMethod) -> AuthSpec:
        method, mutual = self.auth_method(method_key, default)
        return AuthSpec(method=method, mutual=mutual, group=self.auth_group(group_key))


_ISCSI_KEYS = frozenset(
    key.casefold()
    for key in (
        "MaxOutstandingR2T", "DefaultTime2Wait", "DefaultTime2Retain", "FirstBurstLength",
        "MaxBurstLength", "MaxRecvDataSegmentLength", "InitialR2T", "ImmediateData",
        "DataPDUInOrder", "DataSequenceInOrder", "ErrorRecoveryLevel",
    )
)
_GLOBAL_KEYS = _ISCSI_KEYS | frozenset(
    key.casefold()
    for key in (
        "Comment", "NodeBase", "PidFile", "AuthFile", "MediaDirectory", "StateDirectory",
        "LogFacility",
        "Timeout", "NopInInterval", "MaxR2T", "DiscoveryAuthMethod", "DiscoveryAuthGroup",
        "MaxSessions", "MaxConnections",
    )
)
_UNIT_CONTROL_KEYS = frozenset(
    key.casefold()
    for key in ("Comment", "Portal", "Netmask", "AuthMethod", "AuthGroup", "ControlSocket")
)
_PORTAL_GROUP_KEYS = frozenset(["comment", "portal"])
_INITIATOR_GROUP_KEYS = frozenset(["comment", "initiatorname", "netmask"])
_LOGICAL_UNIT_KEYS = _ISCSI_KEYS | frozenset(
    key.casefold()
    for key in (
        "Comment", "TargetName", "TargetAlias", "Mapping", "AuthMethod", "AuthGroup",
        "UseDigest", "ReadOnly", "UnitType", "UnitOnline", "UnitInquiry", "BlockLength",
        "QueueDepth",
    )
)
_AUTH_GROUP_KEYS = frozenset(["comment", "auth"])
_CONTROL_CLIENT_KEYS = frozenset(
    key.casefold()
    for key in (
        "Comment", "Host", "Port", "ControlSocket", "TargetName", "Lun", "Flags", "Size",
        "Timeout", "AuthMethod", "Auth",
    )
)


def _iscsi_params(reader: _Reader, base: IscsiParams, max_connections: int) -> IscsiParams:
    """Global iSCSI keys over ``base``; the same validation serves the LU overrides."""
    max_burst = reader.integer(
        "MaxBurstLength", base.max_burst_length, 512, 16777215, below_means_default=0
    )
    params = IscsiParams(
        max_outstanding_r2t=reader.integer(
            "MaxOutstandingR2T", base.max_outstanding_r2t, 1, 65535, below_means_default=1
        ),
        default_time2wait=reader.integer(
            "DefaultTime2Wait", base.default_time2wait, 0, 3600, below_means_default=0
        ),
        default_time2retain=reader.integer(
            "DefaultTime2Retain", base.default_time2retain, 0, 3600, below_means_default=0
        ),
        first_burst_length=reader.integer(
            "FirstBurstLength", base.first_burst_length, 512, 16777215, below_means_default=0
        ),
        max_burst_length=max_burst,
        max_recv_data_segment_length=reader.integer(
            "MaxRecvDataSegmentLength",
            base.max_recv_data_segment_length,
            512,
            16777215,
            below_means_default=0,
        ),
        initial_r2t=reader.yes_no("InitialR2T", base.initial_r2t),
        immediate_data=reader.yes_no("ImmediateData", base.immediate_data),
        data_pdu_in_order=reader.only_yes("DataPDUInOrder"),
        data_sequence_in_order=reader.only_yes("DataSequenceInOrder"),
        error_recovery_level=reader.integer(
            "ErrorRecoveryLevel", base.error_recovery_level, 0, 0
        ),
        max_connections=max_connections,
    )
    if params.first_burst_length > params.max_burst_length:
        item = reader.item("FirstBurstLength") or reader.item("MaxBurstLength")
        raise reader.error(
            f"FirstBurstLength {params.first_burst_length} exceeds MaxBurstLength "
            f"{params.max_burst_length}",
            item,
            key=None if item else "FirstBurstLength",
        )
    return params


def _global(conf: ConfFile) -> GlobalConfig:
    section = conf.find("Global")
    if section is None:
        raise ConfigError("missing [Global] section", conf.path)
    reader = _Reader(conf, section, _GLOBAL_KEYS)
    facility_item = reader.item("LogFacility")
    facility = DEFAULT_LOG_FACILITY
    if facility_item is not None:
        facility = facility_item.values[0].casefold()
        if facility not in LOG_FACILITIES:
            raise reader.error(
                f"unknown syslog facility {facility_item.values[0]!r} "
                f"(one of {', '.join(sorted(LOG_FACILITIES))})",
                facility_item,
            )
    max_connections = reader.integer(
        "MaxConnections", 4, 1, 65535, below_means_default=1
    )
    return GlobalConfig(
        node_base=reader.string("NodeBase", DEFAULT_NODE_BASE),
        pid_file=reader.string("PidFile", DEFAULT_PID_FILE),
        auth_file=reader.string(
            "AuthFile", os.path.join(os.path.dirname(conf.path), "auth.conf")
        ),
        media_directory=reader.string("MediaDirectory", DEFAULT_MEDIA_DIRECTORY),
        state_directory=reader.string("StateDirectory", "") or None,
        log_facility=facility,
        timeout=reader.integer("Timeout", 60, 0, MAX_SECONDS),
        nop_in_interval=reader.integer("NopInInterval", 20, 0, MAX_SECONDS),
        max_r2t=reader.integer("MaxR2T", 16, 0, MAX_R2T),
        discovery_auth=reader.auth_spec("DiscoveryAuthMethod", "DiscoveryAuthGroup", "auto"),
        max_sessions=reader.integer("MaxSessions", 32, 1, 65535, below_means_default=1),
        iscsi=_iscsi_params(reader, IscsiParams(), max_connections),
    )


def _parse_host(reader: _Reader, item: Item, host: str, bracketed: bool) -> str:
    if host == "*":
        return "::" if bracketed else "0.0.0.0"
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        raise reader.error(
            f"host {host!r} is not a numeric IP address (host names are not supported)",
            item,
        ) from None
    if bracketed and address.version != 6:
        raise reader.error(f"[{host}]: brackets are for IPv6 addresses only", item)
    if not bracketed and address.version == 6:
        raise reader.error(f"IPv6 address {host!r} must be written in brackets: [{host}]", item)
    return host


def _portal(reader: _Reader, item: Item, default_port: int) -> Portal:
    if len(item.values) < 2:
        raise reader.error("expected: Portal <label> <address>[:<port>]", item)
    label, text = item.values[0], item.values[1]
    port_text = None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise reader.error(f"{text!r}: missing ']'", item)
        host = _parse_host(reader, item, text[1:end], bracketed=True)
        rest = text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise reader.error(f"{text!r}: expected ':port' after ']'", item)
            port_text = rest[1:]
    else:
        host_text, colon, port_part = text.partition(":")
        if colon and ":" in port_part:
            raise reader.error(f"IPv6 address {text!r} must be written in brackets", item)
        host = _parse_host(reader, item, host_text, bracketed=False)
        port_text = port_part if colon else None
    port = default_port
    if port_text is not None:
        if not port_text.isdigit():
            raise reader.error(f"{text!r}: port {port_text!r} is not a number", item)
        port = int(port_text)
        if not 1 <= port <= 65535:
            raise reader.error(f"{text!r}: port {port} is out of range 1..65535", item)
    return Portal(label=label, host=host, port=port)


def _netmask(reader: _Reader, item: Item) -> Netmask:
    text = item.values[0]
    if text.casefold() == "all":
        return Netmask(text, None)
    address_text, slash, bits_text = text.partition("/")
    bracketed = address_text.startswith("[") and address_text.endswith("]")
    if bracketed:
        address_text = address_text[1:-1]
    try:
        address = ipaddress.ip_address(address_text)
    except ValueError:
        raise reader.error(
            f"invalid netmask {text!r} (expected ALL, a.b.c.d[/bits] or [ipv6][/bits]; "
            "host names are not supported)",
            item,
        ) from None
    if bracketed and address.version != 6:
        raise reader.error(f"invalid netmask {text!r}: brackets are for IPv6 only", item)
    bits = address.max_prefixlen
    if slash:
        if not bits_text.isdigit():
            raise reader.error(f"invalid netmask {text!r}: prefix length must be a number", item)
        bits = int(bits_text)
        if bits > address.max_prefixlen:
            raise reader.error(
                f"invalid netmask {text!r}: prefix length {bits} > {address.max_prefixlen}", item
            )
    return Netmask(text, ipaddress.ip_network(f"{address}/{bits}", strict=False))


def _netmasks(reader: _Reader, limit: int) -> tuple[Netmask, ...]:
    items = reader.section.all("Netmask")
    if len(items) > limit:
        raise reader.error(f"more than {limit} Netmask lines", items[limit])
    masks = []
    for item in items:
        if not item.values:
            raise reader.error("missing value", item)
        masks.append(_netmask(reader, item))
    return tuple(masks)


def _unit_control(conf: ConfFile) -> UnitControlConfig:
    section = conf.find("UnitControl")
    if section is None:
        # C refuses to start without it; an absent section simply means no TCP portal.
        return UnitControlConfig()
    reader = _Reader(conf, section, _UNIT_CONTROL_KEYS)
    portal_items = section.all("Portal")
    if len(portal_items) > MAX_CONTROL_PORTALS:
        raise reader.error(f"more than {MAX_CONTROL_PORTALS} Portal lines", portal_items[-1])
    return UnitControlConfig(
        portals=tuple(_portal(reader, item, DEFAULT_PORT) for item in portal_items),
        netmasks=_netmasks(reader, MAX_NETMASKS),
        auth=reader.auth_spec("AuthMethod", "AuthGroup", "auto"),
        socket_path=reader.string("ControlSocket", DEFAULT_CONTROL_SOCKET),
        socket_configured=reader.item("ControlSocket") is not None,
    )


def _check_tag(reader: _Reader, maximum: int) -> int:
    number = reader.section.number
    if not 1 <= number <= maximum:
        raise ConfigError(
            f"section number {number} is out of range 1..{maximum}",
            reader.path,
            reader.section.line,
            reader.section.name,
        )
    return number


def _unique(conf: ConfFile, kind: SectionKind) -> None:
    """``[LogicalUnit1]`` and ``[LogicalUnit01]`` are different sections, same number."""
    seen: dict[int, Section] = {}
    for section in conf.of_kind(kind):
        if section.number in seen:
            raise ConfigError(
                f"duplicate {kind.value}{section.number} (also [{seen[section.number].name}] "
                f"at line {seen[section.number].line})",
                conf.path,
                section.line,
                section.name,
            )
        seen[section.number] = section


def _portal_group(conf: ConfFile, section: Section) -> PortalGroup:
    reader = _Reader(conf, section, _PORTAL_GROUP_KEYS)
    tag = _check_tag(reader, MAX_GROUP_TAG)
    items = section.all("Portal")
    if not items:
        raise reader.error("no Portal line", key="Portal")
    if len(items) > MAX_PORTALS:
        raise reader.error(f"more than {MAX_PORTALS} Portal lines", items[MAX_PORTALS])
    return PortalGroup(tag, tuple(_portal(reader, item, DEFAULT_PORT) for item in items))


def _initiator_group(conf: ConfFile, section: Section) -> InitiatorGroup:
    reader = _Reader(conf, section, _INITIATOR_GROUP_KEYS)
    tag = _check_tag(reader, MAX_GROUP_TAG)
    items = section.all("InitiatorName")
    if not items:
        raise reader.error("no InitiatorName line", key="InitiatorName")
    if len(items) > MAX_INITIATORS:
        raise reader.error(f"more than {MAX_INITIATORS} InitiatorName lines", items[-1])
    names = []
    for item in items:
        if not item.values or item.values[0] in ("", "!"):
            raise reader.error("missing initiator name", item)
        names.append(item.values[0])
    return InitiatorGroup(tag, tuple(names), _netmasks(reader, MAX_NETMASKS))


# ---------------------------------------------------------------------------
# Logical units

_DEFAULT_PRODUCT = {"disk": "iSCSI DISK", "dvd": "iSCSI DVD", "tape": "DLT8000", "pass": "iSCSI UNIT"}
_INQUIRY_LIMITS = (("vendor", 8), ("product", 16), ("revision", 4))
_LUN_KEY = re.compile(r"LUN(\d+)", re.IGNORECASE)
_REMOVABLE_FLAGS = frozenset(["ro", "rw", "extend", "dynamic"])
_ACCEPTED_KINDS: dict[str, tuple[str, ...]] = {
    "disk": ("storage",),
    "dvd": ("removable",),
    "tape": ("removable",),
    "pass": ("device",),
}


def _target_name(reader: _Reader, node_base: str) -> str:
    item = reader.item("TargetName")
    if item is None:
        raise reader.error("TargetName is required", key="TargetName")
    short = item.values[0]
    full = short
    if not short.lower().startswith(("iqn.", "eui.", "naa.")):
        full = f"{node_base}:{short}"
    problem = _name_problem(full)
    if problem is not None:
        raise reader.error(f"invalid target name {full!r}: {problem}", item)
    return full


def _mappings(
    reader: _Reader, portal_groups: dict[int, PortalGroup], initiator_groups: dict[int, InitiatorGroup]
) -> tuple[tuple[int, int], ...]:
    items = reader.section.all("Mapping")
    if not items:
        raise reader.error("at least one Mapping line is required", key="Mapping")
    if len(items) > MAX_MAPPINGS:
        raise reader.error(f"more than {MAX_MAPPINGS} Mapping lines", items[-1])
    mappings = []
    for item in items:
        if len(item.values) < 2:
            raise reader.error("expected: Mapping PortalGroupN InitiatorGroupM", item)
        pg = re.fullmatch(r"PortalGroup(\d+)", item.values[0], re.IGNORECASE)
        ig = re.fullmatch(r"InitiatorGroup(\d+)", item.values[1], re.IGNORECASE)
        if pg is None or ig is None:
            raise reader.error(
                f"expected: Mapping PortalGroupN InitiatorGroupM, got {' '.join(item.values)!r}",
                item,
            )
        pg_tag, ig_tag = int(pg.group(1)), int(ig.group(1))
        if pg_tag not in portal_groups:
            raise reader.error(f"[PortalGroup{pg_tag}] is not defined", item)
        if ig_tag not in initiator_groups:
            raise reader.error(f"[InitiatorGroup{ig_tag}] is not defined", item)
        mappings.append((pg_tag, ig_tag))
    return tuple(mappings)


def _digests(reader: _Reader) -> tuple[DigestPolicy, DigestPolicy]:
    item = reader.item("UseDigest")
    header: DigestPolicy = "auto"
    data: DigestPolicy = "auto"
    for token in item.values if item else ():
        word = token.casefold()
        if word == "header":
            header = "required"
        elif word == "data":
            data = "required"
        elif word != "auto":
            raise reader.error(f"unknown digest {token!r} (expected Header, Data or Auto)", item)
    return header, data


def _unit_type(reader: _Reader) -> UnitType:
    item = reader.item("UnitType")
    if item is None:
        raise reader.error("UnitType is required (Disk, DVD, Tape or Pass)", key="UnitType")
    word = item.values[0].casefold()
    if word not in _DEFAULT_PRODUCT:
        raise reader.error(
            f"unknown unit type {item.values[0]!r} (expected Disk, DVD, Tape or Pass)", item
        )
    return word  # type: ignore[return-value]


def _inquiry(reader: _Reader, number: int, unit_type: UnitType) -> InquiryConfig:
    defaults = {
        "vendor": "FreeBSD",
        "product": _DEFAULT_PRODUCT[unit_type],
        "revision": "C001" if unit_type == "tape" else "0001",
        "serial": ("CX" if unit_type == "tape" else "") + f"{10000000 + number:08d}",
    }
    item = reader.item("UnitInquiry")
    values = dict(defaults)
    if item is not None:
        for field_name, text in zip(("vendor", "product", "revision", "serial"), item.values):
            if text:  # empty strings fall back to the defaults, as in C
                values[field_name] = text
        for field_name, text in values.items():
            if not (text.isascii() and text.isprintable()):
                raise reader.error(f"{field_name} {text!r}: only printable ASCII is allowed", item)
        for field_name, limit in _INQUIRY_LIMITS:
            if len(values[field_name]) > limit:
                log.warning(
                    "%s:%d: [%s] UnitInquiry: %s %r truncated to %d characters",
                    reader.path, item.line, reader.section.name, field_name,
                    values[field_name], limit,
                )
                values[field_name] = values[field_name][:limit]
    return InquiryConfig(**values)


def _block_length(reader: _Reader, unit_type: UnitType) -> int:
    item = reader.item("BlockLength")
    if unit_type == "dvd":
        if item is not None and item.values[0] != "2048":
            log.warning(
                "%s:%d: [%s] BlockLength: ignored, a DVD unit always uses 2048",
                reader.path, item.line, reader.section.name,
            )
        return 2048
    if item is None:
        return 512
    value = reader.to_int(item, item.values[0])
    if not 512 <= value <= 524288 or value & (value - 1):
        raise reader.error(
            f"{value} is not a power of two in 512..524288", item
        )
    return value


def _yes_no_option(reader: _Reader, item: Item, word: str) -> bool:
    folded = word.casefold()
    if folded not in ("enable", "disable"):
        raise reader.error(f"expected Enable or Disable, got {word!r}", item)
    return folded == "enable"


def _size_value(reader: _Reader, item: Item, text: str) -> int | None:
    if text.casefold() in ("auto", "size"):
        return None
    try:
        return parse_size(text)
    except ValueError:
        raise reader.error(
            f"invalid size {text!r} (expected e.g. 10GB, 20GB-1MB, or Auto)", item
        ) from None


def _looks_like_size(text: str) -> bool:
    try:
        parse_size(text)
    except ValueError:
        return False
    return True


def _lun_line(reader: _Reader, item: Item, number: int) -> dict:
    """The fields one ``LUNn <type> ...`` line defines (not Option lines)."""
    kind_word = item.values[0].casefold()
    rest = item.values[1:]
    if kind_word == "storage":
        if len(rest) != 2:
            raise reader.error(
                f"expected: LUN{number} Storage <path> <size|Auto>, got {len(rest)} values"
                + (
                    " (the OpenEBS fork's 'Storage <size> <blocksize>' form is not supported)"
                    if len(rest) >= 1 and _looks_like_size(rest[0])
                    else ""
                ),
                item,
            )
        path, size_text = rest
        if _looks_like_size(path) and not path.startswith(("/", ".")):
            raise reader.error(
                f"path {path!r} looks like a size: expected LUN{number} Storage <path> <size|Auto> "
                "(the OpenEBS fork's 'Storage <size> <blocksize>' form is not supported)",
                item,
            )
        size = _size_value(reader, item, size_text)
        if size == 0:
            raise reader.error("size 0 is not allowed", item)
        if path.startswith("rbd:"):
            from istgt.lu.backends import BackendError
            from istgt.lu.images import RbdImage
            try:
                RbdImage.parse(path)
            except BackendError as exc:
                raise reader.error(exc.reason, item) from None
        return {"kind": "storage", "path": path, "size": size}
    if kind_word == "removable":
        if len(rest) != 3:
            raise reader.error(
                f"expected: LUN{number} Removable <flags> <path> <size|Auto>, got {len(rest)} values",
                item,
            )
        flags_text, path, size_text = rest
        flags = tuple(flag.strip().casefold() for flag in flags_text.split(",") if flag.strip())
        unknown = [flag for flag in flags if flag not in _REMOVABLE_FLAGS]
        if unknown:
            raise reader.error(
                f"unknown media flag {unknown[0]!r} (expected ro, rw, extend, dynamic)", item
            )
        size = _size_value(reader, item, size_text)
        if size is not None and size < MIN_REMOVABLE_SIZE:
            if "dynamic" not in flags:
                raise reader.error("media size below 1MB needs the 'dynamic' flag", item)
            size = MIN_REMOVABLE_SIZE
        return {"kind": "removable", "path": path, "size": size, "flags": flags}
    if kind_word == "device":
        if len(rest) != 1:
            raise reader.error(f"expected: LUN{number} Device <path>", item)
        return {"kind": "device", "path": rest[0], "size": None}
    if kind_word.startswith("slot"):
        raise reader.error("changer slots (LUNn SlotK) are not supported", item)
    if kind_word == "cloud":
        raise reader.error("the Cloud LUN type of the elastocloud fork is not supported", item)
    raise reader.error(
        f"unknown LUN type {item.values[0]!r} (expected Storage, Removable, Device or Option)",
        item,
    )


def _lun_option(reader: _Reader, item: Item, options: dict, block_length: int) -> None:
    if len(item.values) < 3:
        raise reader.error("expected: LUNn Option <name> <value>", item)
    name, value = item.values[1], item.values[2]
    folded = name.casefold()
    if folded == "serial":
        if not (value.isascii() and value.isprintable()) or not value:
            raise reader.error(f"serial {value!r}: only printable ASCII is allowed", item)
        options["serial"] = value
    elif folded == "rpm":
        options["rpm"] = min(max(reader.to_int(item, value), 0), 0xFFFE)
    elif folded == "formfactor":
        options["form_factor"] = min(max(reader.to_int(item, value), 0), 15)
    elif folded == "readcache":
        options["read_cache"] = _yes_no_option(reader, item, value)
    elif folded == "writecache":
        options["write_cache"] = _yes_no_option(reader, item, value)
    elif folded == "provisioning":
        if value.casefold() not in ("thin", "full"):
            raise reader.error(f"expected Thin or Full, got {value!r}", item)
        options["provisioning"] = value.casefold()
    elif folded == "physicalblocksize":
        options["physical_block_size"] = _physical_block_size(reader, item, value, block_length)
    elif folded == "removable":
        word = value.casefold()
        if word not in ("yes", "no"):
            raise reader.error(f"expected Yes or No, got {value!r}", item)
        options["removable_disk"] = word == "yes"
    else:
        log.warning(
            "%s:%d: [%s] %s: unknown option %r ignored",
            reader.path, item.line, reader.section.name, item.key, name,
        )


def _physical_block_size(reader: _Reader, item: Item, text: str, block_length: int) -> int:
    size = reader.to_int(item, text)
    ratio = size // block_length if size >= block_length else 0
    # READ CAPACITY(16) carries it as a 4-bit exponent of blocks per physical block.
    if size % block_length or ratio & (ratio - 1) or not 1 <= ratio <= 1 << 15:
        raise reader.error(
            f"{text} is not a power-of-two multiple of the BlockLength {block_length} "
            f"(at most {block_length << 15})", item)
    return size


def _luns(
    reader: _Reader, unit_type: UnitType, lu_serial: str, read_only: bool, block_length: int
) -> dict[int, LunConfig]:
    definitions: dict[int, tuple[Item, dict]] = {}
    options: dict[int, dict] = {}
    option_lines: dict[int, Item] = {}
    for item in reader.section.items:
        match = _LUN_KEY.fullmatch(item.key)
        if not item.key.casefold().startswith("lun"):
            continue
        if match is None:
            raise reader.error("unknown key (LUN keys are LUN0..LUN63)", item)
        number = int(match.group(1))
        if number > MAX_LUN:
            raise reader.error(f"LUN {number} is out of range 0..{MAX_LUN}", item)
        if not item.values:
            raise reader.error("missing LUN type (Storage, Removable, Device or Option)", item)
        if item.values[0].casefold().startswith("option"):
            _lun_option(reader, item, options.setdefault(number, {}), block_length)
            option_lines.setdefault(number, item)
            continue
        if number in definitions:
            raise reader.error(
                f"duplicate LUN{number} (already defined at line {definitions[number][0].line})",
                item,
            )
        fields = _lun_line(reader, item, number)
        if fields["kind"] not in _ACCEPTED_KINDS[unit_type]:
            if fields["kind"] == "storage" and unit_type in ("dvd", "tape"):
                # FreeNAS writes Storage for every unit type; C refuses it for DVD and
                # Tape.  It means media that is always loaded, read-only for a DVD.
                writable = unit_type == "tape" and not read_only
                fields = {**fields, "kind": "removable", "flags": ("rw",) if writable else ("ro",)}
            else:
                raise reader.error(
                    f"a {unit_type.upper() if unit_type == 'dvd' else unit_type.capitalize()} "
                    f"unit does not take {item.values[0]} LUNs "
                    f"(expected {', '.join(k.capitalize() for k in _ACCEPTED_KINDS[unit_type])})",
                    item,
                )
        definitions[number] = (item, fields)
    for number, item in option_lines.items():
        if number not in definitions:
            raise reader.error(f"LUN{number} has options but no Storage/Removable/Device line", item)
    if 0 not in definitions:
        raise reader.error("LUN0 is required", key="LUN0")
    luns = {}
    for number in sorted(definitions):
        fields = {**definitions[number][1], **options.get(number, {})}
        fields.setdefault("serial", lu_serial if number == 0 else f"{lu_serial}L{number}")
        luns[number] = LunConfig(number=number, **fields)
    return luns


def _logical_unit(
    conf: ConfFile,
    section: Section,
    global_: GlobalConfig,
    portal_groups: dict[int, PortalGroup],
    initiator_groups: dict[int, InitiatorGroup],
) -> LogicalUnitConfig:
    reader = _Reader(conf, section, _LOGICAL_UNIT_KEYS)
    number = _check_tag(reader, MAX_LOGICAL_UNIT)
    name = _target_name(reader, global_.node_base)
    alias_item = reader.item("TargetAlias")
    mappings = _mappings(reader, portal_groups, initiator_groups)
    auth = reader.auth_spec("AuthMethod", "AuthGroup", "auto")
    header_digest, data_digest = _digests(reader)
    read_only = reader.yes_no("ReadOnly", False)
    unit_type = _unit_type(reader)
    online = reader.yes_no("UnitOnline", True)
    inquiry = _inquiry(reader, number, unit_type)
    block_length = _block_length(reader, unit_type)
    queue_depth = reader.integer(
        "QueueDepth", 32 if unit_type == "disk" else 0, 0, MAX_QUEUE_DEPTH
    )
    if unit_type in ("dvd", "tape"):
        queue_depth = 0  # the emulated drives run one command at a time, as istgt's
    # Pass: as given (none by default, as istgt); a tape or changer LUN still takes one
    # command at a time (LogicalUnit: TaskQueue.sequential_luns)
    luns = _luns(reader, unit_type, inquiry.serial, read_only, block_length)
    return LogicalUnitConfig(
        number=number,
        name=name,
        alias=alias_item.values[0] if alias_item else None,
        mappings=mappings,
        auth=auth,
        header_digest=header_digest,
        data_digest=data_digest,
        read_only=read_only,
        unit_type=unit_type,
        online=online,
        inquiry=inquiry,
        block_length=block_length,
        queue_depth=queue_depth,
        luns=luns,
        iscsi=_iscsi_params(reader, global_.iscsi, global_.iscsi.max_connections),
    )


def _warn_unknown_sections(conf: ConfFile, expected: frozenset[SectionKind]) -> None:
    for section in conf.sections:
        if section.kind not in expected:
            log.warning("%s:%d: [%s]: unknown section ignored", conf.path, section.line, section.name)


# ---------------------------------------------------------------------------
# Entry points


def load_config(path: str | Path) -> Config:
    """Read and validate istgt.conf.  Raises ConfigError."""
    conf = read_conf(path)
    _warn_unknown_sections(
        conf,
        frozenset(
            [
                SectionKind.GLOBAL,
                SectionKind.UNIT_CONTROL,
                SectionKind.PORTAL_GROUP,
                SectionKind.INITIATOR_GROUP,
                SectionKind.LOGICAL_UNIT,
            ]
        ),
    )
    global_ = _global(conf)
    unit_control = _unit_control(conf)
    for kind in (SectionKind.PORTAL_GROUP, SectionKind.INITIATOR_GROUP, SectionKind.LOGICAL_UNIT):
        _unique(conf, kind)
    portal_groups = {
        group.tag: group
        for group in (_portal_group(conf, s) for s in conf.of_kind(SectionKind.PORTAL_GROUP))
    }
    initiator_groups = {
        group.tag: group
        for group in (_initiator_group(conf, s) for s in conf.of_kind(SectionKind.INITIATOR_GROUP))
    }
    logical_units: dict[int, LogicalUnitConfig] = {}
    names: dict[str, LogicalUnitConfig] = {}
    for section in conf.of_kind(SectionKind.LOGICAL_UNIT):
        lu = _logical_unit(conf, section, global_, portal_groups, initiator_groups)
        other = names.get(lu.name.casefold())
        if other is not None:
            item = section.first("TargetName")
            raise ConfigError(
                f"target name {lu.name!r} is already used by [LogicalUnit{other.number}]",
                conf.path,
                item.line if item else section.line,
                section.name,
                "TargetName",
            )
        names[lu.name.casefold()] = lu
        logical_units[lu.number] = lu
    return Config(
        path=str(path),
        global_=global_,
        unit_control=unit_control,
        portal_groups=dict(sorted(portal_groups.items())),
        initiator_groups=dict(sorted(initiator_groups.items())),
        logical_units=dict(sorted(logical_units.items())),
    )


def _auth_entry(reader: _Reader, item: Item) -> AuthEntry:
    values = item.values
    if len(values) not in (2, 4):
        raise reader.error(
            f'expected: Auth "user" "secret" ["muser" "msecret"], got {len(values)} values', item
        )
    if not values[0]:
        raise reader.error("empty user name", item)
    mutual_user = values[2] if len(values) == 4 and values[2] else None
    mutual_secret = values[3] if len(values) == 4 and values[3] else None
    return AuthEntry(values[0], values[1], mutual_user, mutual_secret)


def load_auth(path: str | Path) -> AuthFile:
    """Read auth.conf: ``[AuthGroupN]`` sections of ``Auth`` lines.  Raises ConfigError."""
    conf = read_conf(path)
    _warn_unknown_sections(conf, frozenset([SectionKind.AUTH_GROUP]))
    _unique(conf, SectionKind.AUTH_GROUP)
    groups: dict[int, tuple[AuthEntry, ...]] = {}
    for section in conf.of_kind(SectionKind.AUTH_GROUP):
        reader = _Reader(conf, section, _AUTH_GROUP_KEYS)
        tag = _check_tag(reader, 2**31 - 1)
        groups[tag] = tuple(_auth_entry(reader, item) for item in section.all("Auth"))
    return AuthFile(path=str(path), groups=groups)


def load_control_config(path: str | Path) -> ControlClientConfig:
    """Read istgtcontrol.conf (``[Global]`` only; a missing section gives defaults)."""
    conf = read_conf(path)
    section = conf.find("Global")
    if section is None:
        return ControlClientConfig()
    reader = _Reader(conf, section, _CONTROL_CLIENT_KEYS)
    method, mutual = reader.auth_method("AuthMethod", "none")
    auth_item = reader.item("Auth")
    target = reader.item("TargetName")
    return ControlClientConfig(
        host=reader.string("Host", "localhost"),
        port=reader.integer("Port", DEFAULT_CONTROL_PORT, 1, 65535),
        socket_path=reader.string("ControlSocket", DEFAULT_CONTROL_SOCKET),
        target_name=target.values[0] if target else None,
        lun=reader.integer("Lun", 0, 0, MAX_LUN),
        flags=reader.string("Flags", "ro"),
        size=reader.string("Size", "auto"),
        timeout=reader.integer("Timeout", 60, 0, MAX_SECONDS),
        auth=AuthSpec(method=method, mutual=mutual),
        auth_entry=_auth_entry(reader, auth_item) if auth_item else None,
        tcp=reader.item("ControlSocket") is None
        and (reader.item("Host") is not None or reader.item("Port") is not None),
    )
