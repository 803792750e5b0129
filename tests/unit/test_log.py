"""istgt.log: facilities, trace flags, -q, and what reaches stderr and syslog."""

from __future__ import annotations

import logging
import syslog

import pytest

from istgt import log
from istgt.log import TraceFlag


@pytest.fixture(autouse=True)
def clean_logging(monkeypatch):
    sent: list[tuple[int, str]] = []
    monkeypatch.setattr(syslog, "syslog", lambda priority, message: sent.append((priority, message)))
    monkeypatch.setattr(syslog, "openlog", lambda *args: sent.append(("openlog", args)))
    yield sent
    log.reset_logging()


class _Stderr:
    """What the test wrote to stderr so far (pytest swaps sys.stderr per phase: use capsys)."""

    def __init__(self, capsys):
        self._capsys = capsys
        self._text = ""

    def getvalue(self) -> str:
        self._text += self._capsys.readouterr().err
        return self._text


@pytest.fixture
def stderr(capsys):
    return _Stderr(capsys)


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("daemon", syslog.LOG_DAEMON),
        ("auth", syslog.LOG_AUTH),
        ("authpriv", syslog.LOG_AUTHPRIV),
        ("local0", syslog.LOG_LOCAL0),  # refused by C istgt (B3)
        ("user", syslog.LOG_USER),  # refused by C istgt (B3)
        ("LOCAL7", syslog.LOG_LOCAL7),
    ],
)
def test_parse_facility_accepts_every_syslog_name(name, code):
    assert log.parse_facility(name) == code


@pytest.mark.parametrize("name", ["kern", "local8", "", "mail"])
def test_parse_facility_rejects_unknown_names_clearly(name):
    with pytest.raises(log.LogSetupError, match="unknown log facility") as info:
        log.parse_facility(name)
    assert "local0" in str(info.value)  # the message lists what is accepted


def test_trace_flags_are_case_insensitive_ored_and_cleared_by_none():
    flags = log.parse_trace_flag("net")
    flags = log.parse_trace_flag("ISCSI", flags)
    assert flags == TraceFlag.NET | TraceFlag.ISCSI
    assert log.parse_trace_flag("None", flags) == TraceFlag.NONE
    assert log.parse_trace_flag("lu", TraceFlag.NONE) == TraceFlag.LU
    assert log.parse_trace_flag("all") == TraceFlag.ALL


def test_trace_flag_values_match_istgt_masks():
    assert (TraceFlag.NET, TraceFlag.ISCSI, TraceFlag.SCSI, TraceFlag.LU) == (
        0x0000000F, 0x000000F0, 0x00000F00, 0x0000F000
    )
    assert TraceFlag.ALL == 0x8000FFFF


@pytest.mark.parametrize("name", ["bogus", "debug", "debug2", ""])
def test_unknown_trace_flag_raises_listing_the_accepted_names(name):
    with pytest.raises(log.LogSetupError, match="unknown trace flag") as info:
        log.parse_trace_flag(name)
    assert "net, iscsi, scsi, lu, all, none" in str(info.value)


def test_setup_rejects_an_unknown_facility():
    with pytest.raises(log.LogSetupError):
        log.setup_logging(facility="nonsense")


def test_messages_go_to_stderr_and_syslog_with_facility_and_priority(clean_logging, stderr):
    log.setup_logging(facility="local0")
    assert ("openlog", ("istgt", syslog.LOG_PID, syslog.LOG_LOCAL0)) in clean_logging
    logger = logging.getLogger("istgt.iscsi.login")
    logger.log(log.NOTICE, "Login from %s", "iqn.x")
    logger.error("broken %d", 7)
    sent = [entry for entry in clean_logging if entry[0] != "openlog"]
    assert sent[0] == (syslog.LOG_LOCAL0 | syslog.LOG_NOTICE, "Login from iqn.x")
    priority, message = sent[1]
    assert priority == syslog.LOG_LOCAL0 | syslog.LOG_ERR
    assert message.endswith("***ERROR*** broken 7")
    assert "test_log:" in message  # module:line:function, as istgt's ERRLOG
    lines = stderr.getvalue().splitlines()
    assert lines[0].endswith(" Login from iqn.x")
    assert lines[1].endswith("***ERROR*** broken 7")


def test_quiet_drops_warnings_but_not_errors_or_notices(clean_logging, stderr):
    log.setup_logging(quiet=True)
    logger = logging.getLogger("istgt.lu")
    logger.warning("dropped")
    logger.error("kept error")
    logger.log(log.NOTICE, "kept notice")
    text = stderr.getvalue()
    assert "dropped" not in text
    assert "kept error" in text and "kept notice" in text
    assert not any("dropped" in str(entry) for entry in clean_logging)


def test_warnings_shown_without_quiet(stderr):
    log.setup_logging()
    logging.getLogger("istgt.lu").warning("careful")
    assert "***WARNING*** careful" in stderr.getvalue()


def test_trace_maps_to_debug_on_its_area_only(clean_logging, stderr):
    log.setup_logging(trace=TraceFlag.ISCSI)
    logging.getLogger("istgt.iscsi.connection").debug("pdu in")
    logging.getLogger("istgt.scsi.sbc").debug("read 10")
    text = stderr.getvalue()
    assert "pdu in" in text
    assert "read 10" not in text
    # traces go to stderr only, as in istgt
    assert not any("pdu in" in str(entry) for entry in clean_logging)


def test_all_turns_on_every_istgt_logger_and_none_turns_them_off(stderr):
    log.setup_logging(trace=TraceFlag.ALL)
    logging.getLogger("istgt.control.server").debug("ctl trace")
    log.set_all_traces(False)
    assert log.trace_flags() == TraceFlag.NONE
    logging.getLogger("istgt.net").debug("after clear")
    log.set_all_traces(True)
    assert log.trace_flags() == TraceFlag.ALL
    logging.getLogger("istgt.net").debug("after set")
    text = stderr.getvalue()
    assert "ctl trace" in text
    assert "after clear" not in text
    assert "after set" in text


def test_info_is_logged_without_trace_but_debug_is_not(stderr):
    log.setup_logging()
    logging.getLogger("istgt.scsi").info("info line")
    logging.getLogger("istgt.scsi").debug("debug line")
    assert "info line" in stderr.getvalue()
    assert "debug line" not in stderr.getvalue()


def test_drop_stderr_keeps_syslog(clean_logging, stderr):
    log.setup_logging()
    log.drop_stderr()
    logging.getLogger("istgt.main").error("after detach")
    assert "after detach" not in stderr.getvalue()
    assert any("after detach" in str(entry) for entry in clean_logging)


def test_setup_twice_does_not_duplicate_output(stderr):
    log.setup_logging()
    log.setup_logging()
    logging.getLogger("istgt").log(log.NOTICE, "once")
    assert stderr.getvalue().count("once") == 1


def test_custom_levels_map_to_the_nearest_syslog_priority_below():
    assert log.syslog_priority(5) == syslog.LOG_DEBUG
    assert log.syslog_priority(log.NOTICE + 1) == syslog.LOG_NOTICE
    assert log.syslog_priority(logging.CRITICAL + 10) == syslog.LOG_CRIT
