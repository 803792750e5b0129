"""Real initiators (libiscsi's tools, qemu-img) against the Python target run as a subprocess.

The target is started exactly as a user starts it (`python -m istgt.main -D -c FILE`), bound to
loopback only, and must exit 0 within 10 s of SIGTERM.  The initiator tools are required: CI
installs them (make test), so a missing tool is a failure, never a skip.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
NODE_BASE = "iqn.2007-09.jp.ne.peach.istgt"
STARTUP_TIMEOUT_S = 20.0
SHUTDOWN_TIMEOUT_S = 10.0
MIB = 1 << 20

# Credentials of the CHAP LUs (auth.conf AuthGroup1 and AuthGroup2).
CHAP_USER, CHAP_SECRET = "chapuser", "chapsecret1234"
MUTUAL_USER, MUTUAL_SECRET = "mutualuser", "mutualsecret12"
TARGET_USER, TARGET_SECRET = "targetuser", "targetsecret12"


def require_tool(name: str) -> str:
    """The path of an initiator tool; fails the test (never skips) when it is not installed."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"required tool {name!r} is not installed: run `make test` (it installs Debian's "
            "libiscsi-bin, qemu-utils and qemu-block-extra) or apt-get install them",
            pytrace=False,
        )
    return path


def run_tool(args: list[str], *, timeout: float = 60.0, env: dict[str, str] | None = None,
             ) -> subprocess.CompletedProcess[str]:
    """Run one initiator command with a hard time limit; the output is kept for assertions."""
    require_tool(args[0])
    full_env = dict(os.environ)
    # A stray CHAP setting in the caller's environment must not change what a test means.
    for key in ("LIBISCSI_CHAP_USERNAME", "LIBISCSI_CHAP_PASSWORD",
                "LIBISCSI_CHAP_TARGET_USERNAME", "LIBISCSI_CHAP_TARGET_PASSWORD"):
        full_env.pop(key, None)
    full_env.update(env or {})
    try:
        return subprocess.run(args, capture_output=True, text=True, errors="replace",
                              timeout=timeout, env=full_env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(args)} did not finish within {timeout} s; output so far:\n"
                    f"{exc.stdout!r}\n{exc.stderr!r}", pytrace=False)


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports, each free on both 127.0.0.1 and ::1 at the time of asking."""
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        for _attempt in range(50 * count):
            if len(ports) == count:
                break
            v4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(v4)  # kept bound until all are chosen, so no port is picked twice
            v4.bind(("127.0.0.1", 0))
            port = v4.getsockname()[1]
            try:
                with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as v6:
                    v6.bind(("::1", port))
            except OSError:
                continue
            ports.append(port)
    finally:
        for sock in held:
            sock.close()
    if len(ports) < count:
        raise RuntimeError(f"found only {len(ports)} of {count} free TCP ports")
    return ports


def stop_process(process: subprocess.Popen, timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` (the C istgt's and
    other daemons' children of a test)."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def free_port() -> int:
    """One TCP port free on both 127.0.0.1 and ::1 at the time of asking."""
    return free_ports(1)[0]


@dataclass(frozen=True)
class LuSpec:
    """One [LogicalUnitN] of a generated config; `extra` holds further `Key value` lines."""
    name: str
    size_bytes: int
    portal_group: int = 1
    extra: tuple[str, ...] = ()
    # further portal groups mapping the same LU (multipath: one more target port each)
    also_through: tuple[int, ...] = ()
    # a disk image the target creates instead of a sparse .img: a file name in the target's
    # directory (e.g. "disk.qcow2") or an rbd: location
    image: str | None = None

    @property
    def iqn(self) -> str:
        return f"{NODE_BASE}:{self.name}"


@dataclass(frozen=True)
class TargetLayout:
    """Ports and logical units of one generated istgt.conf."""
    directory: Path
    port: int
    chap_port: int
    control_port: int
    units: tuple[LuSpec, ...]
    # the [UnitControl] authentication lines (its TCP portal; the Unix socket needs none)
    control_auth: tuple[str, ...] = ("AuthMethod None",)

    @property
    def config_path(self) -> Path:
        return self.directory / "istgt.conf"

    @property
    def log_path(self) -> Path:
        return self.directory / "target.log"

    def disk_path(self, unit: LuSpec) -> Path:
        return self.directory / (unit.image or f"{unit.name}.img")


AUTH_CONF = f"""\
[AuthGroup1]
  Comment "one-way CHAP"
  Auth "{CHAP_USER}" "{CHAP_SECRET}"
[AuthGroup2]
  Comment "mutual CHAP: initiator user/secret, then the target's user/secret"
  Auth "{MUTUAL_USER}" "{MUTUAL_SECRET}" "{TARGET_USER}" "{TARGET_SECRET}"
"""


def write_config(layout: TargetLayout) -> None:
    """Write istgt.conf, auth.conf and one sparse backing file per LU into layout.directory.

    Portal group 1 (127.0.0.1 and [::1] on `port`) holds the LUs any initiator may log in to;
    portal group 2 (127.0.0.1 on `chap_port`) holds the ones that refuse some logins, so that
    `iscsi-ls -s` on portal group 1 can log in to every target it discovers; portal group 3
    ([::1] on `chap_port`) is a second target port for LUs reached by two paths.
    """
    directory = layout.directory
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "auth.conf").write_text(AUTH_CONF)
    lines = [
        "[Global]",
        f'  NodeBase "{NODE_BASE}"',
        f'  PidFile "{directory / "istgt.pid"}"',
        f'  AuthFile "{directory / "auth.conf"}"',
        f'  MediaDirectory "{directory}"',
        f'  StateDirectory "{directory / "state"}"',
        "  Timeout 30",
        "  NopInInterval 20",
        "  DiscoveryAuthMethod None",
        "  MaxSessions 16",
        "  MaxConnections 4",
        "  MaxR2T 32",
        "  MaxOutstandingR2T 16",
        "  FirstBurstLength 262144",
        "  MaxBurstLength 1048576",
        "  MaxRecvDataSegmentLength 262144",
        "[UnitControl]",
        f"  ControlSocket {directory / 'ctl.sock'}",
        *(f"  {line}" for line in layout.control_auth),
        f"  Portal UC1 127.0.0.1:{layout.control_port}",
        "  Netmask 127.0.0.1",
        "[PortalGroup1]",
        f"  Portal DA1 127.0.0.1:{layout.port}",
        f"  Portal DA2 [::1]:{layout.port}",
        "[PortalGroup2]",
        f"  Portal DA1 127.0.0.1:{layout.chap_port}",
        "[PortalGroup3]",
        f"  Portal MP1 [::1]:{layout.chap_port}",
        "[InitiatorGroup1]",
        '  InitiatorName "ALL"',
        "  Netmask 127.0.0.0/8",
        "  Netmask [::1]/128",
    ]
    for number, unit in enumerate(layout.units, start=1):
        disk = unit.image if (unit.image or "").startswith("rbd:") else layout.disk_path(unit)
        if unit.image is None:
            with open(disk, "wb") as backing:
                backing.truncate(unit.size_bytes)
        lines += [
            f"[LogicalUnit{number}]",
            f"  TargetName {unit.name}",
            f'  TargetAlias "interop {unit.name}"',
            *(f"  Mapping PortalGroup{tag} InitiatorGroup1"
              for tag in (unit.portal_group, *unit.also_through)),
            "  UnitType Disk",
            "  QueueDepth 32",
            *(f"  {line}" for line in unit.extra),
            f'  LUN0 Storage "{disk}" {unit.size_bytes // MIB}MB',
        ]
    layout.config_path.write_text("\n".join(lines) + "\n")


def _port_accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class PythonTarget:
    """The Python target as a child process: start, wait for its portals, stop with SIGTERM."""

    def __init__(self, layout: TargetLayout):
        self.layout = layout
        self.process: subprocess.Popen[bytes] | None = None

    def log_text(self) -> str:
        try:
            return self.layout.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), PYTHONUNBUFFERED="1")
        with open(self.layout.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "istgt.main", "-D", "-c", str(self.layout.config_path)],
                cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        endpoints = [("127.0.0.1", self.layout.port), ("::1", self.layout.port),
                     ("127.0.0.1", self.layout.chap_port)]
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the target exited with {self.process.returncode} at start-up; "
                            f"log:\n{self.log_text()}", pytrace=False)
            if all(_port_accepts(host, port) for host, port in endpoints):
                return
            time.sleep(0.1)
        self.kill()
        pytest.fail(f"the target did not accept connections on {endpoints} within "
                    f"{STARTUP_TIMEOUT_S} s; log:\n{self.log_text()}", pytrace=False)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=SHUTDOWN_TIMEOUT_S)

    def stop(self) -> int:
        """SIGTERM; returns the exit status, or fails when it takes longer than 10 s."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=SHUTDOWN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the target did not exit within {SHUTDOWN_TIMEOUT_S} s of SIGTERM; "
                        f"log:\n{self.log_text()}", pytrace=False)


def start_target(directory: Path, units: tuple[LuSpec, ...],
                 control_auth: tuple[str, ...] = ("AuthMethod None",)) -> PythonTarget:
    port, chap_port, control_port = free_ports(3)
    layout = TargetLayout(directory=directory, port=port, chap_port=chap_port,
                          control_port=control_port, units=units, control_auth=control_auth)
    write_config(layout)
    target = PythonTarget(layout)
    target.start()
    return target


def stop_target(target: PythonTarget) -> None:
    status = target.stop()
    assert status == 0, (f"the target exited with status {status} after SIGTERM; log:\n"
                         f"{target.log_text()[-4000:]}")


@dataclass(frozen=True)
class InteropTarget:
    """What the tests need to reach the session's target."""
    target: PythonTarget
    units: dict[str, LuSpec] = field(default_factory=dict)

    @property
    def port(self) -> int:
        return self.target.layout.port

    @property
    def chap_port(self) -> int:
        return self.target.layout.chap_port

    def portal_url(self, host: str = "127.0.0.1", *, chap_portal: bool = False) -> str:
        port = self.chap_port if chap_portal else self.port
        return f"iscsi://{host}:{port}"

    def lun_url(self, name: str, *, host: str = "127.0.0.1", credentials: str = "",
                query: str = "") -> str:
        unit = self.units[name]
        port = self.port if unit.portal_group == 1 else self.chap_port
        userinfo = f"{credentials}@" if credentials else ""
        suffix = f"?{query}" if query else ""
        return f"iscsi://{userinfo}{host}:{port}/{unit.iqn}/0{suffix}"

    def log_text(self) -> str:
        return self.target.log_text()


# The LUs of the session's target. DATA_DIGEST needs a CRC32C data digest, which no initiator
# installed here can do (Debian's libiscsi 1.19 always offers DataDigest=None): its test checks
# that such logins are refused.
INTEROP_UNITS = (
    LuSpec("disk", 256 * MIB, extra=("AuthMethod None",)),
    LuSpec("hdigest", 256 * MIB, extra=("AuthMethod None", "UseDigest Header")),
    LuSpec("chap", 256 * MIB, portal_group=2,
           extra=("AuthMethod CHAP", "AuthGroup AuthGroup1")),
    LuSpec("mutual", 64 * MIB, portal_group=2,
           extra=("AuthMethod CHAP Mutual", "AuthGroup AuthGroup2")),
    LuSpec("digest", 64 * MIB, portal_group=2,
           extra=("AuthMethod None", "UseDigest Header Data")),
)


@pytest.fixture(scope="session")
def interop_target(tmp_path_factory: pytest.TempPathFactory):
    for tool in ("iscsi-ls", "iscsi-inq", "iscsi-readcapacity16", "qemu-img"):
        require_tool(tool)
    target = start_target(tmp_path_factory.mktemp("interop-target"), INTEROP_UNITS)
    try:
        yield InteropTarget(target, {unit.name: unit for unit in INTEROP_UNITS})
    finally:
        stop_target(target)
