"""Persistent reservations made with APTPL survive a restart of the target (a StateDirectory
is configured), and a kill -9 right after a PR OUT was answered; without APTPL they do not;
without a StateDirectory APTPL is refused."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.functional.conftest import (
    C_TARGET, CHECK_CONDITION, DISK, GOOD, TargetOptions, asc_ascq, sense_key, write_config,
)
from tests.functional.initiator import Initiator
from tests.functional.pr_commands import (
    EXCLUSIVE_ACCESS, READ_FULL_STATUS, READ_KEYS, READ_RESERVATION, RESERVATION_CONFLICT,
    WRITE_EXCLUSIVE, Registrant, Reservation, generation, parse_full_status, parse_keys,
    parse_reservation, past_unit_attentions, pr_in, preempt, read_keys, register, release,
    reserve,
)

KEY = 0x1122334455667788
REPO = Path(__file__).resolve().parents[2]


def restart(target):
    """Stop the in-process server and start a new one on the same configuration."""
    from istgt.config import load_config
    from istgt.server import Server

    for initiator in target.initiators:
        initiator.close()
    target.server.shutdown()
    server = Server(load_config(target.config_path))
    server.open_portals()
    server.start()
    target.server = server


@pytest.mark.skipif(C_TARGET, reason="restarts the in-process Python server")
@pytest.mark.parametrize("aptpl", [True, False])
def test_registration_survives_a_restart_only_with_aptpl(make_target, tmp_path, aptpl):
    state = tmp_path / "state"
    target = make_target(iscsi={"StateDirectory": str(state)})
    initiator = target.session()
    assert register(initiator, KEY, aptpl=aptpl).status == GOOD
    assert read_keys(initiator) == [KEY]
    restart(target)
    assert read_keys(target.session()) == ([KEY] if aptpl else [])
    assert any(state.glob("*.pr.json")) == aptpl   # removed when APTPL is off


def test_aptpl_without_a_state_directory_is_refused(target):
    initiator = target.session()
    result = register(initiator, KEY, aptpl=True)
    assert result.status == CHECK_CONDITION
    assert sense_key(result.sense) == 0x05 and asc_ascq(result.sense) == (0x26, 0x00)
    assert read_keys(initiator) == []


# --- kill -9 ---------------------------------------------------------------------------------

HOLDER = ("iqn.2024-01.org.example:aptpl-holder", bytes.fromhex("80000000a001"))
OTHER = ("iqn.2024-01.org.example:aptpl-other", bytes.fromhex("80000000b002"))
OUTSIDER = ("iqn.2024-01.org.example:aptpl-outsider", bytes.fromhex("80000000c003"))
HOLDER_KEY, OTHER_KEY, NEW_KEY = KEY, 0x99AABBCCDDEEFF00, 0x0123456789ABCDEF
BLOCK = b"\x3c" * 512


def port_name(nexus: tuple[str, bytes]) -> str:
    """The initiator port as a TransportID of format 01h names it."""
    return f"{nexus[0]},i,0x{nexus[1].hex()}"


class TargetProcess:
    """`istgt -D` as a child process on a functional-test config with a StateDirectory, so
    that it can be killed with SIGKILL (no shutdown code runs) and started again."""

    def __init__(self, directory: Path):
        self.state = directory / "state"
        self.control = tempfile.mkdtemp(prefix="istgt-ctl-")   # AF_UNIX paths are short
        options = TargetOptions(iscsi={"StateDirectory": str(self.state)})
        self.config = write_config(directory, options, self.control)
        portal = next(line for line in self.config.read_text().splitlines()
                      if line.startswith("  Portal DA1"))
        self.port = int(portal.rsplit(":", 1)[1])
        self.pid_file = directory / "istgt.pid"
        self.log = directory / "istgt.stderr"     # a file: a full pipe would stall the target
        self.process: subprocess.Popen | None = None
        self.initiators: list[Initiator] = []

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "istgt.main", "-D", "-c", str(self.config)],
                env={**os.environ, "PYTHONPATH": str(REPO)},
                stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 20       # the pid file names it once its portals listen
        while not (self.pid_file.exists()
                   and self.pid_file.read_text() == f"{self.process.pid}\n"):
            if self.process.poll() is not None:
                raise AssertionError(f"istgt exited {self.process.returncode}: "
                                     f"{self.log.read_text()}")
            assert time.monotonic() < deadline, "istgt did not start"
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL with the sessions still logged in, as a crash would leave them."""
        assert self.process is not None and self.process.poll() is None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
        for initiator in self.initiators:
            initiator.close()
        self.initiators.clear()

    def session(self, nexus: tuple[str, bytes]) -> Initiator:
        initiator = Initiator("127.0.0.1", self.port, initiator_name=nexus[0], isid=nexus[1],
                              timeout=5)
        self.initiators.append(initiator)
        initiator.login(DISK)
        past_unit_attentions(initiator.tur)       # the new nexus's power-on unit attention
        return initiator

    def close(self) -> None:
        for initiator in self.initiators:
            initiator.close()
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        shutil.rmtree(self.control, ignore_errors=True)


@pytest.fixture
def target_process(tmp_path):
    target = TargetProcess(tmp_path)
    target.start()
    yield target
    target.close()


class PrState(NamedTuple):
    """Everything PR IN reports."""
    generation: int
    keys: list[int]
    reservation: Reservation | None
    registrants: list[Registrant]


def pr_state(initiator) -> PrState:
    replies = {}
    for action in (READ_KEYS, READ_RESERVATION, READ_FULL_STATUS):
        result = past_unit_attentions(lambda: pr_in(initiator, action))
        assert result.status == GOOD, f"PR IN {action}: status {result.status:#x}"
        replies[action] = result.data
    return PrState(generation(replies[READ_KEYS]), parse_keys(replies[READ_KEYS]),
                   parse_reservation(replies[READ_RESERVATION]),
                   parse_full_status(replies[READ_FULL_STATUS]))


def register_and_reserve(target: TargetProcess):
    """HOLDER and OTHER registered with APTPL=1, HOLDER holding Write Exclusive."""
    holder, other = target.session(HOLDER), target.session(OTHER)
    assert register(holder, HOLDER_KEY, aptpl=True).status == GOOD
    assert register(other, OTHER_KEY, aptpl=True).status == GOOD
    assert reserve(holder, HOLDER_KEY, WRITE_EXCLUSIVE).status == GOOD
    return holder, other


@pytest.mark.skipif(C_TARGET, reason="the C istgt has no StateDirectory")
@pytest.mark.timeout(60)
def test_reservation_survives_kill_9(target_process):
    holder, _ = register_and_reserve(target_process)
    before = pr_state(holder)

    target_process.kill()
    target_process.start()

    holder = target_process.session(HOLDER)
    other = target_process.session(OTHER)
    outsider = target_process.session(OUTSIDER)
    after = pr_state(outsider)
    assert after == before
    assert after.keys == [HOLDER_KEY, OTHER_KEY]
    assert after.reservation == Reservation(HOLDER_KEY, WRITE_EXCLUSIVE)
    assert [r for r in after.registrants if r.holder] == [
        Registrant(HOLDER_KEY, True, WRITE_EXCLUSIVE, port_name(HOLDER))]
    # the same name + ISID is the holder again; a registered non-holder and a non-registrant
    # may read but not write under Write Exclusive
    assert holder.write10(0, BLOCK).status == GOOD
    for blocked in (other, outsider):
        result = blocked.write10(0, bytes(512))
        assert (result.status, result.sense) == (RESERVATION_CONFLICT, b"")
        assert blocked.read10(0, 1).data == BLOCK


def preempt_holder(holder, other):
    assert preempt(other, OTHER_KEY, HOLDER_KEY, EXCLUSIVE_ACCESS).status == GOOD


def release_reservation(holder, other):
    assert release(holder, HOLDER_KEY, WRITE_EXCLUSIVE).status == GOOD


def change_holder_key(holder, other):
    assert register(holder, NEW_KEY, current_key=HOLDER_KEY, aptpl=True).status == GOOD


def turn_aptpl_off(holder, other):
    # APTPL comes from the last REGISTER: with 0 nothing may come back after a power loss
    assert register(other, OTHER_KEY, current_key=OTHER_KEY, aptpl=False).status == GOOD


@pytest.mark.skipif(C_TARGET, reason="the C istgt has no StateDirectory")
@pytest.mark.timeout(60)
@pytest.mark.parametrize("change", [preempt_holder, release_reservation, change_holder_key,
                                    turn_aptpl_off], ids=lambda change: change.__name__)
def test_kill_9_right_after_a_pr_out_keeps_its_change(target_process, change):
    holder, other = register_and_reserve(target_process)
    unchanged = pr_state(holder)
    change(holder, other)
    acknowledged = pr_state(other)
    target_process.kill()        # straight after GOOD: the change must already be on disk
    assert acknowledged != unchanged

    target_process.start()
    outsider = target_process.session(OUTSIDER)
    # APTPL off: a power-on state (no registrations, PRGENERATION 0)
    expected = PrState(0, [], None, []) if change is turn_aptpl_off else acknowledged
    assert pr_state(outsider) == expected
    if change is preempt_holder:
        # OTHER now holds Exclusive Access; HOLDER's registration is gone
        assert acknowledged.keys == [OTHER_KEY]
        assert acknowledged.reservation == Reservation(OTHER_KEY, EXCLUSIVE_ACCESS)
        other = target_process.session(OTHER)
        holder = target_process.session(HOLDER)
        assert other.write10(0, BLOCK).status == GOOD
        for blocked in (holder, outsider):
            assert blocked.read10(0, 1).status == RESERVATION_CONFLICT
