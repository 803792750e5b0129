"""Atomic, durable state files (persistent reservations with APTPL)."""

import json

import pytest

from istgt.lu.state import StateFile


def test_save_load_round_trip_leaves_no_temporary(tmp_path):
    state = StateFile(str(tmp_path / "lu.pr.json"))
    assert state.load() is None
    state.save(lambda: {"version": 1, "keys": [1, 2]})
    assert state.load() == {"version": 1, "keys": [1, 2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lu.pr.json"]
    state.save(lambda: {"version": 1, "keys": []})
    assert json.loads((tmp_path / "lu.pr.json").read_text()) == {"keys": [], "version": 1}


def test_unreadable_file_is_an_error_not_an_empty_state(tmp_path):
    path = tmp_path / "lu.pr.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="lu.pr.json"):
        StateFile(str(path)).load()


def test_remove_is_idempotent(tmp_path):
    state = StateFile(str(tmp_path / "lu.pr.json"))
    state.save(lambda: {"a": 1})
    state.remove()
    state.remove()
    assert state.load() is None


def test_save_of_none_removes_the_file(tmp_path):
    state = StateFile(str(tmp_path / "lu.pr.json"))
    state.save(lambda: {"a": 1})
    state.save(lambda: None)
    assert state.load() is None and not any(tmp_path.iterdir())
    state.save(lambda: None)                            # nothing to remove: no error
