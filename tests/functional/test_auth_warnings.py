"""The server warns about weak CHAP secrets at start and on reload, and still serves."""

import logging

from tests.functional import conftest


def test_a_short_secret_is_reported_at_start_and_login_still_works(make_target, caplog,
                                                                   monkeypatch):
    monkeypatch.setattr(conftest, "CHAP_SECRET", "short")
    caplog.set_level(logging.WARNING, logger="istgt")
    target = make_target(auth="chap")
    assert any(f"[AuthGroup1] user '{conftest.CHAP_USER}': secret of 5 bytes" in r.getMessage()
               for r in caplog.records)
    initiator = target.session()       # the configuration loaded and CHAP works with it
    assert initiator.tur().status in (0, 2)


def test_a_reload_reports_them_again(make_target, caplog, monkeypatch):
    monkeypatch.setattr(conftest, "CHAP_SECRET", "short")
    target = make_target(auth="chap")
    caplog.clear()
    caplog.set_level(logging.WARNING, logger="istgt")
    target.server.reload()
    assert any("secret of 5 bytes" in r.getMessage() for r in caplog.records)
