"""istgtcontrol, ours and the C istgt's (Debian `istgt`), against both targets.

* The C tool drives this target over its TCP control portal with mutual CHAP, and every
  command does what it says (the listed state changes, INFO shows the logged-in session).
* Our tool prints the same lines and exits with the same status as the C tool, for every
  command against this target, over TCP and over the Unix socket.
* Our tool drives the C istgt too, with the same output as the C tool's.
"""

from __future__ import annotations

import os
import signal
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.functional.initiator import Initiator
from tests.interop.conftest import (
    MIB, MUTUAL_SECRET, NODE_BASE, MUTUAL_USER, REPO_ROOT, TARGET_SECRET, TARGET_USER, LuSpec, free_ports,
    require_tool, start_target, stop_process, stop_target,
)

pytestmark = pytest.mark.interop

C_ISTGT = "/usr/sbin/istgt"
C_ISTGTCONTROL = "/usr/sbin/istgtcontrol"
DISK, REMOVABLE = "ctl-disk", "ctl-removable"
UNITS = (
    LuSpec(DISK, 16 * MIB, extra=("AuthMethod None",)),
    LuSpec(REMOVABLE, 16 * MIB, extra=("AuthMethod None", "LUN0 Option Removable Yes")),
)
CONTROL_AUTH = ("AuthMethod CHAP Mutual", "AuthGroup AuthGroup2")
HOLDER_NAME = "iqn.2024-01.org.example:ctl-holder"
# The C tool says this on stderr for AuthMethod values it does not know; ours does not.
C_NOISE = "unknown auth\n"


def control_conf(path: Path, host: str, port: int, secret: str = MUTUAL_SECRET) -> Path:
    path.write_text(
        "[Global]\n"
        f"  Host {host}\n"
        f"  Port {port}\n"
        "  AuthMethod CHAP Mutual\n"
        f'  Auth "{MUTUAL_USER}" "{secret}" "{TARGET_USER}" "{TARGET_SECRET}"\n')
    return path


def run_control(tool: list[str], conf: Path, args: list[str]) -> tuple[int, str, str]:
    done = subprocess.run([*tool, "-c", str(conf), *args], capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL,
                          env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    return done.returncode, done.stdout, done.stderr.replace(C_NOISE, "")


OURS = [sys.executable, "-m", "istgt.control.client"]


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    require_tool(C_ISTGTCONTROL)
    running = start_target(tmp_path_factory.mktemp("ctl"), UNITS, control_auth=CONTROL_AUTH)
    holder = Initiator("127.0.0.1", running.layout.port, initiator_name=HOLDER_NAME, timeout=5)
    holder.login(f"{UNITS[0].iqn}")
    try:
        yield running, holder
    finally:
        holder.close()
        stop_target(running)


def both(target_and_holder, tmp_path, args: list[str]) -> tuple[int, str, str]:
    """Run one command with the C tool and ours over TCP; they must agree."""
    running, _ = target_and_holder
    conf = control_conf(tmp_path / "ctl.conf", "127.0.0.1", running.layout.control_port)
    theirs = run_control([C_ISTGTCONTROL], conf, args)
    ours = run_control(OURS, conf, args)
    assert ours == theirs, f"istgtcontrol {' '.join(args)}:\nC:    {theirs}\nours: {ours}"
    return theirs


def test_version_noop_and_list(target, tmp_path):
    status, out, _ = both(target, tmp_path, ["version"])
    assert status == 0 and out.startswith("target version 0.5") and "DONE VERSION" in out
    assert both(target, tmp_path, ["noop"])[:2] == (0, "DONE NOOP command\n")
    status, out, _ = both(target, tmp_path, ["list"])
    assert out.splitlines() == [UNITS[0].iqn, UNITS[1].iqn, "DONE LIST command"]
    status, out, _ = both(target, tmp_path, ["-t", UNITS[0].iqn, "list"])
    size = 16 * MIB
    assert out.splitlines()[0] == f'lun0 storage "{target[0].layout.disk_path(UNITS[0])}" {size}'


def test_info_shows_the_logged_in_session(target, tmp_path):
    _, holder = target
    status, out, _ = both(target, tmp_path, ["info"])
    first = out.splitlines()[0]
    isid = f"{int.from_bytes(holder.isid, 'big'):x}"
    assert status == 0 and first.startswith(f"Login from {HOLDER_NAME} (127.0.0.1) on "
                                            f"{UNITS[0].iqn} LU1 (127.0.0.1:")
    assert f"ISID={isid}, TSIH=" in first and "HeaderDigest=off" in first
    status, out, _ = both(target, tmp_path, ["-t", UNITS[1].iqn, "info"])
    assert out.splitlines() == ["no login", "DONE INFO command"]


def test_unload_load_and_reset_act_on_the_unit(target, tmp_path):
    removable = ["-t", UNITS[1].iqn]
    running, _ = target
    conf = control_conf(tmp_path / "ctl.conf", "127.0.0.1", running.layout.control_port)
    status, out, _ = run_control([C_ISTGTCONTROL], conf, [*removable, "unload"])
    assert (status, out) == (0, "DONE UNLOAD command\n")
    listed = both(target, tmp_path, [*removable, "list"])[1].splitlines()[0]
    assert listed.startswith("lun0 removable absent unlock - ")
    assert both(target, tmp_path, [*removable, "load"])[:2] == (0, "DONE LOAD command\n")
    listed = both(target, tmp_path, [*removable, "list"])[1].splitlines()[0]
    assert listed.startswith("lun0 removable present unlock - ")
    assert both(target, tmp_path, [*removable, "reset"])[:2] == (0, "DONE RESET command\n")


def test_errors_are_reported_alike(target, tmp_path):
    assert both(target, tmp_path, ["-t", UNITS[0].iqn, "unload"]) == (
        1, "ABORT UNLOAD command\n", "ERROR not removable\n")
    assert both(target, tmp_path, ["-t", "iqn.2007-09.jp.ne.peach.istgt:none", "reset"]) == (
        1, "ABORT RESET command\n", "ERROR no target\n")
    status, out, err = both(target, tmp_path, ["bogus"])
    assert (status, err) == (1, "unknown command BOGUS\n")


def test_wrong_secret_fails_authentication_with_both_tools(target, tmp_path):
    running, _ = target
    conf = control_conf(tmp_path / "bad.conf", "127.0.0.1", running.layout.control_port,
                        secret="not-the-secret")
    for tool in ([C_ISTGTCONTROL], OURS):
        status, out, _ = run_control(tool, conf, ["list"])
        assert (status, out) == (1, "AUTH failed\n"), tool


def test_our_tool_over_the_unix_socket_needs_no_credentials(target, tmp_path):
    running, _ = target
    conf = tmp_path / "sock.conf"
    conf.write_text(f"[Global]\n  ControlSocket {running.layout.directory / 'ctl.sock'}\n")
    status, out, _ = run_control(OURS, conf, ["list"])
    assert (status, out.splitlines()) == (0, [UNITS[0].iqn, UNITS[1].iqn, "DONE LIST command"])
    mode = (running.layout.directory / "ctl.sock").stat().st_mode & 0o777
    assert mode == 0o600


# --- our tool against the C istgt ------------------------------------------------------------


@pytest.fixture(scope="module")
def c_istgt(tmp_path_factory):
    require_tool(C_ISTGTCONTROL)
    tmp_path = tmp_path_factory.mktemp("c-istgt")
    if not os.access(C_ISTGT, os.X_OK):
        pytest.fail(f"{C_ISTGT} is not installed: run `make test`", pytrace=False)
    port, control_port = free_ports(2)
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as backing:
        backing.truncate(16 * MIB)
    (tmp_path / "auth.conf").write_text(
        f'[AuthGroup1]\n  Auth "{MUTUAL_USER}" "{MUTUAL_SECRET}" "{TARGET_USER}" '
        f'"{TARGET_SECRET}"\n')
    template = (REPO_ROOT / "bench" / "c-istgt.conf").read_text()
    config = string.Template(template).substitute(
        pid_file=tmp_path / "istgt.pid", auth_file=tmp_path / "auth.conf", media_dir=tmp_path,
        control_port=control_port, port=port, disk=disk, size="16MB")
    config = config.replace("[UnitControl]\n  AuthMethod None\n",
                            "[UnitControl]\n  AuthMethod CHAP Mutual\n  AuthGroup AuthGroup1\n")
    (tmp_path / "istgt.conf").write_text(config)
    log = open(tmp_path / "istgt.log", "wb")
    process = subprocess.Popen([C_ISTGT, "-D", "-c", str(tmp_path / "istgt.conf")],
                               stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    conf = control_conf(tmp_path / "ctl.conf", "127.0.0.1", control_port)
    while run_control([C_ISTGTCONTROL], conf, ["noop"])[0] != 0:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the C istgt did not start: {(tmp_path / 'istgt.log').read_text()}")
        time.sleep(0.2)
    try:
        yield conf
    finally:
        stop_process(process)
        log.close()


@pytest.mark.parametrize("args", [["version"], ["noop"], ["list"], ["info"],
                                  ["-t", "iqn.2007-09.jp.ne.peach.istgt:bench", "list"],
                                  ["-t", "iqn.2007-09.jp.ne.peach.istgt:bench", "unload"],
                                  ["-A", "CHAP", "noop"]])
def test_our_tool_drives_the_c_istgt_like_its_own_tool(c_istgt, args):
    theirs = run_control([C_ISTGTCONTROL], c_istgt, args)
    ours = run_control(OURS, c_istgt, args)
    assert ours == theirs
    if args == ["version"]:
        assert ours[1].startswith("target version 0.4")


# --- reload: SIGHUP and refresh on the real daemon -------------------------------------------


def test_sighup_and_refresh_reload_the_running_daemon(tmp_path):
    require_tool("iscsi-ls")
    running = start_target(tmp_path / "target", UNITS[:1])
    try:
        layout = running.layout
        portal = f"iscsi://127.0.0.1:{layout.port}"
        original = layout.config_path.read_text()
        extra_disk = layout.directory / "extra.img"
        extra = (f"[LogicalUnit9]\n  TargetName extra\n  Mapping PortalGroup1 InitiatorGroup1\n"
                 f"  AuthMethod None\n  UnitType Disk\n  LUN0 Storage {extra_disk} 8MB\n")
        layout.config_path.write_text(original + extra)
        os.kill(running.process.pid, signal.SIGHUP)
        deadline = time.monotonic() + 15
        while f"{UNITS[0].iqn[:-len(DISK)]}extra" not in subprocess.run(
                ["iscsi-ls", portal], capture_output=True, text=True, timeout=30).stdout:
            assert time.monotonic() < deadline, "SIGHUP did not add the new LU"
            time.sleep(0.3)
        # The C tool's refresh (Debian's patch) and ours, over TCP and the socket.
        layout.config_path.write_text(original)
        conf = tmp_path / "ctl.conf"
        conf.write_text(f"[Global]\n  Host 127.0.0.1\n  Port {layout.control_port}\n")
        assert run_control([C_ISTGTCONTROL], conf, ["refresh"])[:2] == (0, "DONE REFRESH command\n")
        listed = run_control(OURS, conf, ["list"])[1].splitlines()
        assert listed == [UNITS[0].iqn, "DONE LIST command"]
        layout.config_path.write_text(original + extra)
        sock_conf = tmp_path / "sock.conf"
        sock_conf.write_text(f"[Global]\n  ControlSocket {layout.directory / 'ctl.sock'}\n")
        status, out, _ = run_control(OURS, sock_conf, ["-v", "refresh"])
        assert status == 0 and f"add {NODE_BASE}:extra" in out and "DONE REFRESH" in out
        layout.config_path.write_text("[Global]\n  Timeout soon\n")
        status, out, err = run_control(OURS, sock_conf, ["refresh"])
        assert (status, out) == (1, "ABORT REFRESH command\n") and "istgt.conf:2" in err
    finally:
        stop_target(running)
