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


def _record_durability_calls(monkeypatch, tmp_path, fail_at=None):
    """Record open/fsync/replace in order; raise at the `fail_at`-th of them (a crash there)."""
    import os
    calls = []
    real = {name: getattr(os, name) for name in ("open", "fsync", "replace")}

    def wrap(name):
        def call(*args, **kwargs):
            if name == "open":
                what = os.path.basename(args[0]) or "?"
            elif name == "fsync":
                what = os.path.basename(os.readlink(f"/proc/self/fd/{args[0]}"))
            else:
                what = f"{os.path.basename(args[0])}->{os.path.basename(args[1])}"
            calls.append((name, what))
            if fail_at is not None and len(calls) == fail_at:
                raise OSError("simulated crash")
            return real[name](*args, **kwargs)
        return call

    for name in real:
        monkeypatch.setattr(os, name, wrap(name))
    return calls


def test_save_fsyncs_the_data_before_the_rename_and_the_directory_after(monkeypatch, tmp_path):
    state = StateFile(str(tmp_path / "lu.pr.json"))
    calls = _record_durability_calls(monkeypatch, tmp_path)
    state.save(lambda: {"a": 1})
    assert calls == [
        ("open", "lu.pr.json.tmp"),
        ("fsync", "lu.pr.json.tmp"),
        ("replace", "lu.pr.json.tmp->lu.pr.json"),
        ("open", tmp_path.name),
        ("fsync", tmp_path.name),
    ]


@pytest.mark.parametrize("fail_at", [1, 2, 3, 4, 5])
def test_a_save_stopped_at_any_step_leaves_the_old_state_or_the_new(monkeypatch, tmp_path, fail_at):
    state = StateFile(str(tmp_path / "lu.pr.json"))
    state.save(lambda: {"generation": 1})
    with monkeypatch.context() as patch:
        _record_durability_calls(patch, tmp_path, fail_at=fail_at)
        with pytest.raises(OSError, match="simulated crash"):
            state.save(lambda: {"generation": 2})
    assert StateFile(str(tmp_path / "lu.pr.json")).load() in ({"generation": 1}, {"generation": 2})
    state.save(lambda: {"generation": 3})               # a later save still works
    assert state.load() == {"generation": 3}
