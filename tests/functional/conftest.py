"""The real target in-process on loopback, configured through an istgt.conf under tmp_path.

`make_target(**options)` writes istgt.conf/auth.conf and a sparse backing file, loads them
with `istgt.config.load_config`, starts `istgt.server.Server` in a background thread and shuts
it down at teardown. `target` is the default; `variant_target` runs a test once per config
variant the issue names (CHAP, mutual CHAP, digests, QueueDepth 0/32, ReadOnly, BlockLength
4096, two LUNs).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.functional.initiator import Initiator

NODE_BASE = "iqn.2007-09.jp.ne.peach.istgt"
DISK = f"{NODE_BASE}:disk1"              # the target every variant changes
RESTRICTED = f"{NODE_BASE}:restricted"   # ACL by initiator name: only ALLOWED_INITIATOR
NETDENIED = f"{NODE_BASE}:netdenied"     # ACL by netmask: loopback is outside 192.0.2.0/24
DENIED_NAME = f"{NODE_BASE}:deniedname"  # ACL: "!DENIED_INITIATOR" then ALL
CHAPDISK = f"{NODE_BASE}:chapdisk"       # AuthMethod CHAP
MUTUALDISK = f"{NODE_BASE}:mutualdisk"   # AuthMethod CHAP Mutual

INITIATOR = "iqn.2024-01.org.example:test"
ALLOWED_INITIATOR = "iqn.2024-01.org.example:allowed"
DENIED_INITIATOR = "iqn.2024-01.org.example:denied"
CHAP_USER, CHAP_SECRET = "chapuser", "chapsecret0123"
MUTUAL_USER, MUTUAL_SECRET = "targetuser", "targetsecret01"
DISK_SIZE = 64 * 1024 * 1024
# ISTGT_FUNCTIONAL_TARGET=c runs the suite against the C istgt (Debian package) instead, to
# tell target bugs from test bugs: both must agree wherever the C target is not known buggy.
C_TARGET = os.environ.get("ISTGT_FUNCTIONAL_TARGET") == "c"


@dataclass(frozen=True)
class TargetOptions:
    auth: str = "none"                 # disk1: "none", "chap" or "mutual"
    digest: str | None = None          # disk1 UseDigest, e.g. "Header Data"
    queue_depth: int = 32
    read_only: bool = False
    block_length: int = 512
    luns: int = 1
    ipv6: bool = False
    timeout: int = 30
    nop_in_interval: int = 20
    max_sessions: int = 16
    max_connections: int = 4
    discovery_auth: str = "None"
    second_portal_group: bool = False  # disk1 also mapped through [PortalGroup2] (multipath)
    iscsi: dict = field(default_factory=dict)   # Global iSCSI keys, e.g. {"InitialR2T": "No"}
    lun0_storage: str | None = None    # disk1 LUN0 "<path> <size>" instead of a 64 MB file
    lun0_options: tuple[str, ...] = ()  # disk1 "LUN0 Option ..." values, e.g. "Removable Yes"
    control_lines: tuple[str, ...] = ()  # more [UnitControl] lines, e.g. a Portal and Netmask

    def login_kwargs(self) -> dict:
        """What an initiator must offer to log in to disk1 under these options."""
        kwargs: dict = {}
        if self.auth == "chap":
            kwargs["auth"] = (CHAP_USER, CHAP_SECRET)
        elif self.auth == "mutual":
            kwargs["auth"] = (CHAP_USER, CHAP_SECRET, MUTUAL_USER, MUTUAL_SECRET)
        if self.digest:
            words = self.digest.split()
            kwargs["header_digest"] = "CRC32C" if "Header" in words else "None"
            kwargs["data_digest"] = "CRC32C" if "Data" in words else "None"
        return kwargs


GOOD, CHECK_CONDITION, TASK_SET_FULL = 0x00, 0x02, 0x28


def sense_key(sense: bytes) -> int:
    """Sense key from fixed (70h/71h) or descriptor (72h/73h) sense data."""
    return (sense[1] if sense[0] & 0x7F >= 0x72 else sense[2]) & 0x0F


def asc_ascq(sense: bytes) -> tuple[int, int]:
    if sense[0] & 0x7F >= 0x72:
        return sense[2], sense[3]
    return sense[12], sense[13]


def free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def write_config(directory: Path, options: TargetOptions, control: str) -> Path:
    """istgt.conf + auth.conf + sparse backing files; returns the istgt.conf path.
    `control` is a short directory for the control socket (AF_UNIX paths are limited)."""
    auth = directory / "auth.conf"
    auth.write_text(
        "[AuthGroup1]\n"
        f'  Auth "{CHAP_USER}" "{CHAP_SECRET}" "{MUTUAL_USER}" "{MUTUAL_SECRET}"\n'
    )
    disks = []
    for name in ("disk1", "disk1-lun1", "other"):
        path = directory / f"{name}.img"
        with open(path, "wb") as f:
            f.truncate(DISK_SIZE)
        disks.append(path)
    # Port 0 is what the tests would like (see report): for now pick free ports ourselves.
    portals = f"  Portal DA1 127.0.0.1:{free_port('127.0.0.1')}\n"
    if options.ipv6:
        portals += f"  Portal DA2 [::1]:{free_port('::1')}\n"
    disk_auth = {"none": "None", "chap": "CHAP", "mutual": "CHAP Mutual"}[options.auth]
    iscsi = "".join(f"  {key} {value}\n" for key, value in options.iscsi.items())
    lun1 = f"  LUN1 Storage {disks[1]} 64MB\n" if options.luns > 1 else ""
    extra = ""
    if options.digest:
        extra += f"  UseDigest {options.digest}\n"
    if options.read_only:
        extra += "  ReadOnly Yes\n"
    if options.block_length != 512:
        extra += f"  BlockLength {options.block_length}\n"

    def other_lu(number: int, name: str, group: int, auth_method: str = "None") -> str:
        return (f"[LogicalUnit{number}]\n  TargetName {name}\n"
                f"  Mapping PortalGroup1 InitiatorGroup{group}\n"
                f"  AuthMethod {auth_method}\n  AuthGroup AuthGroup1\n  UnitType Disk\n"
                f"  LUN0 Storage {disks[2]} 64MB\n")

    control_portal = f"  Portal UC1 127.0.0.1:{free_port('127.0.0.1')}\n" if C_TARGET else ""
    # PortalGroup2 listens last, so its address is the last of RunningTarget.addresses.
    second_group = (f"[PortalGroup2]\n  Portal DA3 127.0.0.1:{free_port('127.0.0.1')}\n"
                    if options.second_portal_group else "")
    second_mapping = ("  Mapping PortalGroup2 InitiatorGroup1\n"
                      if options.second_portal_group else "")
    text = (
        "[Global]\n"
        f'  NodeBase "{NODE_BASE}"\n'
        f"  PidFile {directory}/istgt.pid\n"
        f"  AuthFile {auth}\n"
        f"  MediaDirectory {directory}\n"
        '  LogFacility "local7"\n'
        f"  Timeout {options.timeout}\n"
        f"  NopInInterval {options.nop_in_interval}\n"
        f"  DiscoveryAuthMethod {options.discovery_auth}\n"
        "  DiscoveryAuthGroup AuthGroup1\n"
        f"  MaxSessions {options.max_sessions}\n"
        f"  MaxConnections {options.max_connections}\n"
        "  MaxR2T 32\n"
        + iscsi +
        "[UnitControl]\n"
        + ("" if any(line.startswith("AuthMethod") for line in options.control_lines)
           else "  AuthMethod None\n") +
        f"  ControlSocket {control}/ctl.sock\n" + control_portal +
        "".join(f"  {line}\n" for line in options.control_lines) +
        "[PortalGroup1]\n" + portals + second_group +
        "[InitiatorGroup1]\n  InitiatorName ALL\n  Netmask 127.0.0.0/8\n  Netmask [::1]\n"
        f'[InitiatorGroup2]\n  InitiatorName "{ALLOWED_INITIATOR}"\n  Netmask ALL\n'
        "[InitiatorGroup3]\n  InitiatorName ALL\n  Netmask 192.0.2.0/24\n"
        f'[InitiatorGroup4]\n  InitiatorName "!{DENIED_INITIATOR}"\n  InitiatorName ALL\n'
        "  Netmask ALL\n"
        "[LogicalUnit1]\n"
        "  TargetName disk1\n"
        '  TargetAlias "Functional Disk"\n'
        "  Mapping PortalGroup1 InitiatorGroup1\n" + second_mapping +
        f"  AuthMethod {disk_auth}\n"
        "  AuthGroup AuthGroup1\n"
        "  UnitType Disk\n"
        f"  QueueDepth {options.queue_depth}\n"
        + extra +
        f"  LUN0 Storage {options.lun0_storage or f'{disks[0]} 64MB'}\n"
        + "".join(f"  LUN0 Option {option}\n" for option in options.lun0_options) + lun1
        + other_lu(2, "restricted", 2)
        + other_lu(3, "netdenied", 3)
        + other_lu(4, "deniedname", 4)
        + other_lu(5, "chapdisk", 1, "CHAP")
        + other_lu(6, "mutualdisk", 1, "CHAP Mutual")
    )
    conf = directory / "istgt.conf"
    conf.write_text(text)
    return conf


class CIstgt:
    """The C istgt as a child process, with the Server methods the fixture uses."""

    def __init__(self, config_path: Path):
        text = config_path.read_text()
        self.portal_addresses = [
            (line.split()[2].rsplit(":", 1)[0].strip("[]"), int(line.rsplit(":", 1)[1]))
            for line in text.splitlines() if line.startswith("  Portal DA")]
        self.process = subprocess.Popen(["/usr/sbin/istgt", "-D", "-c", str(config_path)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(self.portal_addresses[0], timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("C istgt did not start listening")

    def shutdown(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class RunningTarget:
    def __init__(self, directory: Path, options: TargetOptions):
        self.options = options
        self.control_directory = tempfile.mkdtemp(prefix="istgt-ctl-")
        try:
            self.config_path = write_config(directory, options, self.control_directory)
            self.server = self._start_server()
        except BaseException:
            shutil.rmtree(self.control_directory, ignore_errors=True)
            raise
        self.initiators: list[Initiator] = []
        self.addresses = list(self.server.portal_addresses)
        self.host, self.port = next((h, p) for h, p in self.addresses if ":" not in h)
        self.port6 = next((p for h, p in self.addresses if ":" in h), None)

    def _start_server(self):
        if C_TARGET:
            return CIstgt(self.config_path)
        from istgt.config import load_config
        from istgt.server import Server

        self.config = load_config(self.config_path)
        server = Server(self.config)
        server.open_portals()
        server.start()
        return server

    def connect(self, initiator_name: str = INITIATOR, isid: bytes | None = None,
                host: str | None = None, port: int | None = None) -> Initiator:
        host = host or self.host
        port = port or (self.port6 if ":" in host else self.port)
        initiator = Initiator(host, port, initiator_name=initiator_name, isid=isid, timeout=5)
        self.initiators.append(initiator)
        return initiator

    def session(self, target: str = DISK, initiator_name: str = INITIATOR,
                isid: bytes | None = None, clear_unit_attention: bool = True,
                **login_kwargs) -> Initiator:
        """A connection logged in to `target` (disk1's auth/digests applied by default),
        with the power-on unit attention of the new I_T nexus consumed."""
        initiator = self.connect(initiator_name, isid)
        kwargs = self.options.login_kwargs() if target == DISK else {}
        kwargs.update(login_kwargs)
        initiator.login(target, **kwargs)
        if clear_unit_attention:
            for lun in range(self.options.luns if target == DISK else 1):
                for _ in range(4):
                    result = initiator.tur(lun)
                    if not (result.status == CHECK_CONDITION and sense_key(result.sense) == 6):
                        break
        return initiator

    def stop(self) -> None:
        # Violations a test did not raise (StatSN order, or strict=False) still fail it.
        violations = [v for initiator in self.initiators for v in initiator.violations]
        for initiator in self.initiators:
            initiator.close()
        stopper = threading.Thread(target=self.server.shutdown, daemon=True)
        stopper.start()
        stopper.join(15)
        shutil.rmtree(self.control_directory, ignore_errors=True)
        assert not stopper.is_alive(), "Server.shutdown() did not return within 15 s"
        assert not violations, f"protocol violations seen by the initiator: {violations}"


@pytest.fixture
def make_target(tmp_path):
    running: list[RunningTarget] = []

    def start(**options) -> RunningTarget:
        directory = Path(tempfile.mkdtemp(prefix="target", dir=tmp_path))  # also after a failed start
        target = RunningTarget(directory, TargetOptions(**options))
        running.append(target)
        return target

    yield start
    for target in running:
        target.stop()


@pytest.fixture
def target(make_target) -> RunningTarget:
    return make_target()


VARIANTS = {
    "plain": {},
    "chap": {"auth": "chap"},
    "mutual-chap": {"auth": "mutual"},
    "digests": {"digest": "Header Data"},
    "queue-depth-0": {"queue_depth": 0},
    "queue-depth-32": {"queue_depth": 32},
    "read-only": {"read_only": True},
    "block-4096": {"block_length": 4096},
    "two-luns": {"luns": 2},
}


@pytest.fixture(params=list(VARIANTS), ids=list(VARIANTS))
def variant_target(request, make_target) -> RunningTarget:
    return make_target(**VARIANTS[request.param])


def pytest_collection_modifyitems(config, items):
    """60 s per test that runs the target (the issue's budget); other tests keep theirs."""
    for item in items:
        if "make_target" in getattr(item, "fixturenames", ()) \
                and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(60))
