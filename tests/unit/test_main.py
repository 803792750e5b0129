"""istgt.main with a fake Server: flags, start-up failures, pid file, signals (foreground)."""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import syslog
import threading
import time
from pathlib import Path

import pytest

from istgt import EXTRA_VERSION, __version__, log
from istgt import main as main_module
from istgt.log import TraceFlag
from istgt.main import AlreadyRunning, Mode, Options, PidFile, main, parse_args

CONFIG = """\
[Global]
  NodeBase "iqn.2007-09.jp.ne.peach.istgt"
  PidFile {pid}
  LogFacility "local0"

[UnitControl]

[PortalGroup1]
  Portal DA1 127.0.0.1:3260

[InitiatorGroup1]
  InitiatorName "ALL"
  Netmask 127.0.0.0/8

[LogicalUnit1]
  TargetName disk1
  Mapping PortalGroup1 InitiatorGroup1
  UnitType Disk
  LUN0 Storage {disk} 64MB
"""


@pytest.fixture(autouse=True)
def quiet_syslog(monkeypatch):
    sent: list[str] = []
    monkeypatch.setattr(syslog, "syslog", lambda priority, message: sent.append(message))
    monkeypatch.setattr(syslog, "openlog", lambda *args: None)
    yield sent
    log.reset_logging()


@pytest.fixture
def config(tmp_path) -> Path:
    path = tmp_path / "istgt.conf"
    path.write_text(CONFIG.format(pid=tmp_path / "istgt.pid", disk=tmp_path / "disk1.img"))
    return path


class FakeServer:
    """Records calls; serve_forever runs ``during_serve`` then blocks until shutdown()."""

    instances: list[FakeServer] = []

    def __init__(self, config, mode, *, listen_error=None, during_serve=None, serve_error=None,
                 slow_shutdown=False):
        self.config, self.mode = config, mode
        self.shutdown_may_finish = threading.Event()
        if not slow_shutdown:
            self.shutdown_may_finish.set()
        self.listen_error, self.during_serve, self.serve_error = (
            listen_error, during_serve, serve_error)
        self.calls: list[str] = []
        self.stopped = threading.Event()
        FakeServer.instances.append(self)

    def open_portals(self):
        self.calls.append("open_portals")
        if self.listen_error:
            raise self.listen_error

    def serve_forever(self):
        self.calls.append("serve_forever")
        if self.serve_error:
            raise self.serve_error
        if self.during_serve:
            self.during_serve(self)
        assert self.stopped.wait(10), "shutdown() was never called"

    def shutdown(self):
        self.calls.append("shutdown")
        assert self.shutdown_may_finish.wait(10)
        self.stopped.set()


def fake(**behaviour):
    FakeServer.instances.clear()
    return lambda config, mode: FakeServer(config, mode, **behaviour)


def wait_for(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.01)


# --- flags ----------------------------------------------------------------------------------


def test_parse_args_reads_every_flag():
    options = parse_args(
        ["-c", "a.conf", "-p", "x.pid", "-l", "daemon", "-m", "2", "-t", "net", "-t", "SCSI",
         "-q", "-D"]
    )
    assert options == Options(
        config_path="a.conf", pid_file="x.pid", facility="daemon", mode=Mode.EXPERIMENTAL,
        trace=TraceFlag.NET | TraceFlag.SCSI, quiet=True, foreground=True,
    )


def test_parse_args_defaults(monkeypatch):
    monkeypatch.setattr(main_module, "default_config_path", lambda: "/default.conf")
    assert parse_args([]) == Options(config_path="/default.conf")


def test_trace_none_clears_earlier_flags():
    assert parse_args(["-t", "all", "-t", "none", "-t", "lu"]).trace == TraceFlag.LU


def test_default_config_falls_back_to_debian_path_only_when_upstream_is_missing():
    debian_only = {main_module.DEBIAN_CONFIG}
    assert main_module.default_config_path(debian_only.__contains__) == main_module.DEBIAN_CONFIG
    both = {main_module.DEFAULT_CONFIG, main_module.DEBIAN_CONFIG}
    assert main_module.default_config_path(both.__contains__) == main_module.DEFAULT_CONFIG
    assert main_module.default_config_path(set().__contains__) == main_module.DEFAULT_CONFIG


def test_version_prints_two_lines_and_exits_0(capsys):
    assert main(["-V"]) == 0
    assert capsys.readouterr().out == (
        f"istgt version {__version__}\nistgt extra version {EXTRA_VERSION}\n"
    )


def test_usage_exits_0_on_stdout(capsys):
    assert main(["-H"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Usage: istgt")
    for flag in ["-c", "-p", "-l", "-m", "-t", "-q", "-D", "-H", "-V"]:
        assert f" {flag} " in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-x"], "option -x not recognized"),
        (["-c"], "option -c requires argument"),
        (["-m", "3"], "unknown mode 3"),
        (["-m", "normal"], "unknown mode normal"),
        (["-t", "disk"], "unknown trace flag 'disk'"),
        (["-l", "kern"], "unknown log facility 'kern'"),
        (["stray"], "unexpected argument 'stray'"),
    ],
)
def test_bad_command_line_prints_message_and_usage_and_exits_1(capsys, argv, message):
    assert main(argv) == 1  # C istgt exits 0 on an unknown option
    captured = capsys.readouterr()
    assert message in captured.err
    assert "Usage: istgt" in captured.err
    assert captured.out == ""


# --- start-up failures ----------------------------------------------------------------------


def test_missing_config_exits_1_naming_the_file(tmp_path, capsys):
    missing = tmp_path / "nope.conf"
    assert main(["-D", "-c", str(missing)], server_factory=fake()) == 1
    assert str(missing) in capsys.readouterr().err
    assert FakeServer.instances == []


def test_bad_config_exits_1_with_file_and_line(tmp_path, capsys):
    path = tmp_path / "bad.conf"
    path.write_text("[Global]\n  Timeout many\n[UnitControl]\n")
    assert main(["-D", "-c", str(path)], server_factory=fake()) == 1
    assert f"{path}:2" in capsys.readouterr().err


def test_listen_failure_exits_1_names_the_portal_and_removes_the_pid_file(config, capsys):
    error = OSError(98, "listen error 127.0.0.1:3260: Address already in use")
    assert main(["-D", "-c", str(config)], server_factory=fake(listen_error=error)) == 1
    assert "127.0.0.1:3260" in capsys.readouterr().err
    assert not (config.parent / "istgt.pid").exists()
    assert FakeServer.instances[0].calls == ["open_portals"]


def test_already_running_exits_1_and_leaves_the_holders_file(config, capsys):
    pid_path = config.parent / "istgt.pid"
    with open(pid_path, "w") as holder:  # another istgt holds the lock
        holder.write("4242\n")
        holder.flush()
        fcntl.flock(holder, fcntl.LOCK_EX)
        assert main(["-D", "-c", str(config)], server_factory=fake()) == 1
    assert "istgt already running (pid 4242)" in capsys.readouterr().err
    assert pid_path.read_text() == "4242\n"
    assert FakeServer.instances == []


def test_unexpected_serve_error_exits_1_and_cleans_up(config):
    factory = fake(serve_error=RuntimeError("boom"))
    assert main(["-D", "-c", str(config)], server_factory=factory) == 1
    assert not (config.parent / "istgt.pid").exists()


# --- a foreground run -----------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGQUIT])
def test_stop_signal_shuts_down_gracefully_and_removes_pid_file(config, caplog, sig):
    pid_path = config.parent / "istgt.pid"
    seen = {}

    def during_serve(server):
        seen["pid"] = pid_path.read_text()
        os.kill(os.getpid(), sig)

    assert main(["-D", "-c", str(config)], server_factory=fake(during_serve=during_serve)) == 0
    server = FakeServer.instances[0]
    assert server.calls == ["open_portals", "serve_forever", "shutdown"]
    assert server.mode == Mode.NORMAL
    assert seen["pid"] == f"{os.getpid()}\n"
    assert not pid_path.exists()
    messages = [record.getMessage() for record in caplog.records]
    assert f"istgt version {__version__} ({EXTRA_VERSION})" in messages
    assert "normal mode" in messages
    assert f"{signal.Signals(sig).name} catch" in messages
    assert messages[-1] == f"istgt version {__version__} ({EXTRA_VERSION}) exiting"


def test_pid_flag_overrides_config_and_mode_reaches_server(config, tmp_path, caplog):
    override = tmp_path / "other.pid"
    seen = {}

    def during_serve(server):
        seen["override"] = override.exists()
        seen["config_pid"] = (tmp_path / "istgt.pid").exists()
        os.kill(os.getpid(), signal.SIGTERM)

    argv = ["-D", "-c", str(config), "-p", str(override), "-m", "0"]
    assert main(argv, server_factory=fake(during_serve=during_serve)) == 0
    assert seen == {"override": True, "config_pid": False}
    assert FakeServer.instances[0].mode == 0
    assert "traditional mode" in [record.getMessage() for record in caplog.records]


def test_stale_pid_file_is_replaced_with_a_notice(config, caplog):
    pid_path = config.parent / "istgt.pid"
    pid_path.write_text("999999\n")  # no lock held: the process that wrote it is gone
    seen = {}

    def during_serve(server):
        seen["pid"] = pid_path.read_text()
        os.kill(os.getpid(), signal.SIGTERM)

    assert main(["-D", "-c", str(config)], server_factory=fake(during_serve=during_serve)) == 0
    assert seen["pid"] == f"{os.getpid()}\n"
    assert any("stale pid file" in r.getMessage() and "999999" in r.getMessage()
               for r in caplog.records)


def test_second_stop_signal_during_shutdown_is_only_logged(config, caplog):
    def logged(text):
        return any(record.getMessage() == text for record in caplog.records)

    def during_serve(server):
        os.kill(os.getpid(), signal.SIGTERM)
        wait_for(lambda: "shutdown" in server.calls)
        os.kill(os.getpid(), signal.SIGINT)
        wait_for(lambda: logged("shutdown already in progress"))
        server.shutdown_may_finish.set()

    assert main(["-D", "-c", str(config)], server_factory=fake(during_serve=during_serve,
                                                               slow_shutdown=True)) == 0
    assert FakeServer.instances[0].calls.count("shutdown") == 1
    assert logged("SIGINT catch")


def test_sighup_without_reload_is_logged_and_ignored(config, caplog):
    def during_serve(server):
        os.kill(os.getpid(), signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGTERM)

    assert main(["-D", "-c", str(config)], server_factory=fake(during_serve=during_serve)) == 0
    messages = [r.getMessage() for r in caplog.records]
    assert "SIGHUP catch" in messages
    assert any("reload is not implemented" in m for m in messages)


class ReloadingServer(FakeServer):
    def __init__(self, config, mode, reload_error=None, **behaviour):
        super().__init__(config, mode, **behaviour)
        self.reload_error = reload_error
        self.reloaded = threading.Event()

    def reload(self):
        self.calls.append("reload")
        self.reloaded.set()
        if self.reload_error:
            raise self.reload_error


@pytest.mark.parametrize("error", [None, ValueError("LU1: bad size")])
def test_sighup_calls_reload_in_a_thread_and_survives_its_failure(config, caplog, error):
    def during_serve(server):
        os.kill(os.getpid(), signal.SIGHUP)
        assert server.reloaded.wait(5)
        os.kill(os.getpid(), signal.SIGTERM)

    servers = []

    def factory(config, mode):
        servers.append(ReloadingServer(config, mode, error, during_serve=during_serve))
        return servers[0]

    assert main(["-D", "-c", str(config)], server_factory=factory) == 0
    assert servers[0].calls == ["open_portals", "serve_forever", "reload", "shutdown"]
    failures = [r.getMessage() for r in caplog.records if "reload failed" in r.getMessage()]
    assert failures == ([] if error is None else [
        "reload failed, the previous configuration stays: LU1: bad size"])


def test_sigusr2_sets_and_sigusr1_clears_all_trace_flags(config):
    def during_serve(server):
        os.kill(os.getpid(), signal.SIGUSR2)
        wait_for(lambda: log.trace_flags() == TraceFlag.ALL)
        os.kill(os.getpid(), signal.SIGUSR1)
        wait_for(lambda: log.trace_flags() == TraceFlag.NONE)
        os.kill(os.getpid(), signal.SIGTERM)

    argv = ["-D", "-c", str(config), "-t", "net"]
    assert main(argv, server_factory=fake(during_serve=during_serve)) == 0


def test_signals_are_blocked_in_server_threads_and_restored_after(config):
    """Any thread may be the one the kernel picks: only the signal thread may take them."""
    seen = {}

    def in_a_server_thread():
        seen["mask"] = signal.pthread_sigmask(signal.SIG_BLOCK, [])

    def during_serve(server):
        worker = threading.Thread(target=in_a_server_thread)
        worker.start()
        worker.join()
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    assert main(["-D", "-c", str(config)], server_factory=fake(during_serve=during_serve)) == 0
    assert main_module.SignalThread.HANDLED <= seen["mask"]
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before


def test_sigpipe_is_ignored_while_serving(config):
    seen = []

    def during_serve(server):
        seen.append(signal.getsignal(signal.SIGPIPE))
        os.kill(os.getpid(), signal.SIGTERM)

    assert main(["-D", "-c", str(config)], server_factory=fake(during_serve=during_serve)) == 0
    assert seen == [signal.SIG_IGN]


# --- PidFile --------------------------------------------------------------------------------


def test_pid_file_lock_excludes_a_second_holder_and_release_removes_it(tmp_path):
    path = tmp_path / "p.pid"
    first = PidFile(str(path))
    assert first.acquire() is None
    first.write(1234)
    with pytest.raises(AlreadyRunning, match=r"pid 1234"):
        PidFile(str(path)).acquire()
    first.release()
    assert not path.exists()
    second = PidFile(str(path))
    assert second.acquire() is None
    second.release()


def test_release_leaves_a_file_that_replaced_ours(tmp_path):
    path = tmp_path / "p.pid"
    pid_file = PidFile(str(path))
    pid_file.acquire()
    path.unlink()
    path.write_text("77\n")  # someone else's file now
    pid_file.release()
    assert path.read_text() == "77\n"


def test_acquire_reports_the_pid_of_a_stale_file(tmp_path):
    path = tmp_path / "p.pid"
    path.write_text("31337\n")
    pid_file = PidFile(str(path))
    assert pid_file.acquire() == 31337
    assert path.read_text() == ""  # truncated until the real pid is written
    pid_file.release()


def test_acquire_in_a_missing_directory_is_an_oserror(tmp_path, config, capsys):
    argv = ["-D", "-c", str(config), "-p", str(tmp_path / "no" / "such" / "x.pid")]
    assert main(argv, server_factory=fake()) == 1
    assert "cannot lock pid file" in capsys.readouterr().err


# --- the caller's side of daemon start-up -----------------------------------------------------


def relay(data: bytes, capfd) -> tuple[int, str]:
    read_fd, write_fd = os.pipe()
    os.write(write_fd, data)
    os.close(write_fd)
    code = main_module._relay_startup_output(read_fd)
    return code, capfd.readouterr().err


def test_caller_prints_the_daemons_start_up_output_and_exits_0_when_ready(capfd):
    code, err = relay(b"istgt version 0.5.0\n" + main_module.READY_MARK, capfd)
    assert (code, err) == (0, "istgt version 0.5.0\n")


def test_caller_exits_1_when_the_daemon_dies_before_ready(capfd):
    code, err = relay(b"***ERROR*** listen error 127.0.0.1:3260: Address in use\n", capfd)
    assert code == 1
    assert err.startswith("***ERROR*** listen error 127.0.0.1:3260")
    assert "start-up failed" in err


def test_output_after_the_ready_mark_is_not_printed(capfd):
    code, err = relay(b"a\n" + main_module.READY_MARK + b"late\n", capfd)
    assert (code, err) == (0, "a\n")


@pytest.mark.parametrize(("argv", "facility"), [([], syslog.LOG_LOCAL0),
                                                 (["-l", "daemon"], syslog.LOG_DAEMON)])
def test_syslog_facility_comes_from_the_flag_else_the_config(config, monkeypatch, argv, facility):
    opened = []
    monkeypatch.setattr(syslog, "openlog", lambda *args: opened.append(args))

    def during_serve(server):
        os.kill(os.getpid(), signal.SIGTERM)

    argv = ["-D", "-c", str(config), *argv]
    assert main(argv, server_factory=fake(during_serve=during_serve)) == 0
    assert opened == [("istgt", syslog.LOG_PID, facility)]


def test_quiet_flag_drops_warnings(config, capsys):
    def during_serve(server):
        logging.getLogger("istgt.lu").warning("a warning nobody wants")
        logging.getLogger("istgt.lu").error("an error everybody sees")
        os.kill(os.getpid(), signal.SIGTERM)

    assert main(["-D", "-q", "-c", str(config)],
                server_factory=fake(during_serve=during_serve)) == 0
    err = capsys.readouterr().err
    assert "an error everybody sees" in err
    assert "a warning nobody wants" not in err
