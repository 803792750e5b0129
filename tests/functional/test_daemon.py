"""The istgt command as a user runs it: a real process, real portals, signals and pid file."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from istgt import EXTRA_VERSION, __version__

REPO = Path(__file__).resolve().parents[2]
TARGET = "iqn.2007-09.jp.ne.peach.istgt:disk1"

CONFIG = """\
[Global]
  NodeBase "iqn.2007-09.jp.ne.peach.istgt"
  PidFile {pid_file}
  LogFacility "local0"
  Timeout 10

[UnitControl]
  ControlSocket istgt.sock

[PortalGroup1]
  Portal DA1 127.0.0.1:{port}

[InitiatorGroup1]
  InitiatorName "ALL"
  Netmask 127.0.0.0/8

[LogicalUnit1]
  TargetName disk1
  Mapping PortalGroup1 InitiatorGroup1
  UnitType Disk
  QueueDepth 8
  LUN0 Storage disk1.img 16MB
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_config(directory: Path, port: int, pid_file: str = "istgt.pid") -> Path:
    """A config with paths relative to ``directory`` (the daemon keeps its cwd)."""
    path = directory / "istgt.conf"
    path.write_text(CONFIG.format(port=port, pid_file=pid_file))
    return path


def istgt(*args: str) -> list[str]:
    return [sys.executable, "-m", "istgt.main", *args]


def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def run(*args: str, cwd: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        istgt(*args), cwd=cwd, env=environment(), capture_output=True, text=True,
        timeout=timeout,
    )


def start(*args: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        istgt(*args), cwd=cwd, env=environment(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )


def wait_serving(process: subprocess.Popen[str], pid_file: Path, port: int) -> None:
    """Wait for the pid file to name ``process`` (written once its portals listen), so that
    another program listening on a reused port number cannot fool the test."""
    deadline = time.monotonic() + 20
    while not (pid_file.exists() and pid_file.read_text() == f"{process.pid}\n"):
        if process.poll() is not None:
            raise AssertionError(f"istgt exited {process.returncode}: {process.stderr.read()}")
        assert time.monotonic() < deadline, f"istgt never wrote its pid to {pid_file}"
        time.sleep(0.05)
    assert_listening(port)


def assert_listening(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass


def is_running(pid: int) -> bool:
    """Alive and not a zombie (a daemon's parent is init, which may reap late)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def wait_gone(pid: int, pid_file: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if not is_running(pid) and not pid_file.exists():
            return
        time.sleep(0.05)
    raise AssertionError(f"pid {pid} still running or {pid_file} still present")


def is_locked(path: Path) -> bool:
    with open(path) as probe:
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(probe, fcntl.LOCK_UN)
        return False


def stop(process: subprocess.Popen[str]) -> tuple[int, str]:
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=30)
    return process.returncode, err


@pytest.fixture
def daemons():
    """Pids of detached daemons to kill if a test fails half-way."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# --- flags ----------------------------------------------------------------------------------


def test_version_usage_and_unknown_flag_exit_codes(tmp_path):
    version = run("-V", cwd=tmp_path)
    assert (version.returncode, version.stdout) == (
        0, f"istgt version {__version__}\nistgt extra version {EXTRA_VERSION}\n")
    usage = run("-H", cwd=tmp_path)
    assert usage.returncode == 0 and usage.stdout.startswith("Usage: istgt")
    unknown = run("-Z", cwd=tmp_path)
    assert unknown.returncode == 1
    assert "Usage: istgt" in unknown.stderr


def test_launcher_script_and_console_script_agree(tmp_path):
    launcher = subprocess.run([sys.executable, str(REPO / "istgt.py"), "-V"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=30)
    assert launcher.returncode == 0
    assert launcher.stdout == run("-V", cwd=tmp_path).stdout


def test_bad_config_exits_1_with_file_and_line(tmp_path):
    config = write_config(tmp_path, free_port())
    lines = config.read_text().splitlines()
    lines.insert(5, "  MaxR2T 999")  # above 256
    config.write_text("\n".join(lines) + "\n")
    result = run("-D", "-c", str(config), cwd=tmp_path)
    assert result.returncode == 1
    assert f"{config}:6" in result.stderr


# --- foreground -----------------------------------------------------------------------------


def test_foreground_serves_until_sigterm_then_removes_pid_file(tmp_path):
    port = free_port()
    config = write_config(tmp_path, port)
    pid_file = tmp_path / "istgt.pid"
    process = start("-D", "-c", str(config), cwd=tmp_path)
    try:
        wait_serving(process, pid_file, port)
        assert is_locked(pid_file)
    finally:
        code, err = stop(process)
    assert code == 0, err
    assert not pid_file.exists()
    assert "SIGTERM catch" in err
    assert f"istgt version {__version__} ({EXTRA_VERSION}) exiting" in err


@pytest.mark.parametrize("foreground", [True, False], ids=["foreground", "daemon"])
def test_port_in_use_exits_1_naming_host_and_port(tmp_path, foreground):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        config = write_config(tmp_path, port)
        result = run(*(["-D"] if foreground else []), "-c", str(config), cwd=tmp_path)
    assert result.returncode == 1
    assert f"127.0.0.1:{port}" in result.stderr
    assert not (tmp_path / "istgt.pid").exists()


def test_stale_pid_file_is_replaced(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    pid_file = tmp_path / "istgt.pid"
    pid_file.write_text(f"{dead.pid}\n")
    port = free_port()
    process = start("-D", "-c", str(write_config(tmp_path, port)), cwd=tmp_path)
    try:
        wait_serving(process, pid_file, port)
    finally:
        code, err = stop(process)
    assert code == 0, err
    assert f"stale pid file istgt.pid (pid {dead.pid})" in err


# --- daemon mode ----------------------------------------------------------------------------


def test_daemon_detaches_serves_locks_pid_file_and_stops_on_sigterm(tmp_path, daemons):
    port = free_port()
    config = write_config(tmp_path, port)
    pid_file = tmp_path / "istgt.pid"
    started = run("-c", str(config), cwd=tmp_path)
    assert started.returncode == 0, started.stderr
    pid = int(pid_file.read_text())
    daemons.append(pid)
    assert is_running(pid)
    assert is_locked(pid_file)
    assert_listening(port)

    # It serves iSCSI after detaching: its threads, disk and portals survived the fork.
    listing = subprocess.run(["iscsi-ls", "-s", f"iscsi://127.0.0.1:{port}"], capture_output=True,
                             text=True, timeout=60)
    assert listing.returncode == 0, listing.stderr
    assert TARGET in listing.stdout
    assert "Lun:0" in listing.stdout and "Size:" in listing.stdout  # SCSI went through

    second = run("-c", str(config), cwd=tmp_path)
    assert second.returncode == 1
    assert f"istgt already running (pid {pid})" in second.stderr
    assert pid_file.read_text() == f"{pid}\n"

    os.kill(pid, signal.SIGTERM)
    wait_gone(pid, pid_file)


class LineReader:
    """Collects a running process's stderr lines in a thread, so a test can wait for one."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(process.stderr,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, after: int = -1, timeout: float = 10) -> int:
        """Index of the first line after line ``after`` that contains ``text``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for index, line in enumerate(self.lines[after + 1:], start=after + 1):
                if text in line:
                    return index
            time.sleep(0.02)
        raise AssertionError(f"no line with {text!r} after line {after} in {self.lines}")

    def join(self) -> None:
        self._thread.join(10)


def discover(port: int) -> None:
    """One complete discovery session: its connection has surely been accepted and logged."""
    listing = subprocess.run(["iscsi-ls", f"iscsi://127.0.0.1:{port}"], capture_output=True,
                             text=True, timeout=60)
    assert TARGET in listing.stdout, listing.stderr


def test_trace_and_reload_signals_keep_the_target_serving(tmp_path):
    port = free_port()
    pid_file = tmp_path / "istgt.pid"
    process = start("-D", "-t", "NET", "-c", str(write_config(tmp_path, port)), cwd=tmp_path)
    lines = LineReader(process)
    accepted = "connection from"  # istgt.net DEBUG, logged when a connection is accepted
    try:
        wait_serving(process, pid_file, port)
        discover(port)
        traced = lines.wait_for(accepted)
        assert ">server:" in lines.lines[traced]  # the trace format: thread>module:line:func:
        process.send_signal(signal.SIGUSR1)
        cleared = lines.wait_for("trace flags cleared")
        discover(port)
        process.send_signal(signal.SIGUSR2)
        all_on = lines.wait_for("trace flags all on", after=cleared)
        assert not any(accepted in line for line in lines.lines[cleared:all_on])
        discover(port)
        lines.wait_for(accepted, after=all_on)
        process.send_signal(signal.SIGHUP)
        lines.wait_for("SIGHUP catch")
        discover(port)
        assert process.poll() is None
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(30)
        lines.join()
    assert code == 0
    assert not pid_file.exists()
