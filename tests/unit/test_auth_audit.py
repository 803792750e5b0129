"""Warnings about auth.conf: readable by everyone, secrets under 96 bits (istgt/auth_audit.py)."""

import logging
import os

from istgt.auth_audit import audit_auth_file


def write_auth(tmp_path, text, mode=0o600):
    path = tmp_path / "auth.conf"
    path.write_text(text)
    os.chmod(path, mode)
    return str(path)


def test_a_private_file_with_long_secrets_is_fine(tmp_path):
    path = write_auth(tmp_path, '[AuthGroup1]\n  Auth "alice" "twelve-bytes" "tgt" "0123456789abcdef"\n')
    assert audit_auth_file(path) == []


def test_short_secrets_are_named_by_file_group_and_user_never_by_value(tmp_path):
    path = write_auth(tmp_path, '[AuthGroup1]\n  Auth "alice" "secret12345"\n'
                                '[AuthGroup7]\n  Auth "bob" "a-long-enough-one" "tgt" "Qz9!x"\n')
    problems = audit_auth_file(path)
    assert len(problems) == 2
    assert problems[0].startswith(f"{path}: [AuthGroup1] user 'alice': secret of 11 bytes")
    assert problems[1].startswith(f"{path}: [AuthGroup7] user 'tgt': mutual secret of 5 bytes")
    assert not any("secret12345" in p or "Qz9!x" in p for p in problems)


def test_a_world_readable_file_is_reported(tmp_path):
    path = write_auth(tmp_path, '[AuthGroup1]\n  Auth "alice" "twelve-bytes"\n', mode=0o644)
    problems = audit_auth_file(path)
    assert problems == [f"{path}: readable or writable by every user (mode 0644): CHAP secrets "
                        "should be 0600 or 0640"]
    os.chmod(path, 0o640)                          # group-readable is a deliberate choice
    assert audit_auth_file(path) == []


def test_missing_or_broken_files_are_left_to_login(tmp_path):
    assert audit_auth_file(str(tmp_path / "none.conf")) == []
    assert audit_auth_file(write_auth(tmp_path, "[AuthGroup1]\n  Auth\n")) == []


def test_a_tcp_control_portal_off_loopback_without_chap_is_reported():
    from istgt.auth_audit import audit_control_portals
    from istgt.config import AuthSpec, Portal, UnitControlConfig
    local = Portal("UC1", "127.0.0.1", 3261)
    wide = Portal("UC2", "0.0.0.0", 3261)
    assert audit_control_portals(UnitControlConfig(portals=(local,))) == []
    problems = audit_control_portals(UnitControlConfig(portals=(local, wide),
                                                       auth=AuthSpec("none")))
    assert len(problems) == 1 and problems[0].startswith("[UnitControl] Portal UC2 ")
    assert audit_control_portals(UnitControlConfig(portals=(wide,),
                                                   auth=AuthSpec("chap", False, 1))) == []
