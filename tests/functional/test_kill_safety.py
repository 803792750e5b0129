"""Crash safety: the target is killed with SIGKILL again and again while initiators write,
then started again; every write that got GOOD must read back (issue 7). ISTGT_KILLS sets the
number of kills (CI: 10; `ISTGT_KILLS=50` for the issue's figure)."""

import os
import random
import struct
import threading
import time

from tests.functional.initiator import ConnectionClosed
from tests.functional.test_aptpl import TargetProcess

KILLS = int(os.environ.get("ISTGT_KILLS", "10"))
WRITERS = 2
BLOCKS = 512                 # each writer owns the LBAs congruent to its number
GOOD = 0x00


class Writer(threading.Thread):
    """Writes distinct 512-byte payloads at QD1 to its own LBAs until the target dies."""

    def __init__(self, target: TargetProcess, number: int, round_: int, seed: int):
        super().__init__(daemon=True)
        self.target, self.number, self.round = target, number, round_
        self.rng = random.Random(seed)
        self.acknowledged: dict[int, bytes] = {}   # lba -> payload that got GOOD
        self.in_flight: dict[int, bytes] = {}      # lba -> payload sent, no answer seen
        self.count = 0

    def run(self) -> None:
        try:
            initiator = self.target.session((f"iqn.2024-01.org.example:kill{self.number}",
                                             bytes.fromhex(f"80000000d00{self.number}")))
        except Exception:
            return              # killed before the login finished
        seq = 0
        while True:
            lba = self.rng.randrange(BLOCKS // WRITERS) * WRITERS + self.number
            seq += 1
            payload = struct.pack(">III", self.round, self.number, seq) * 42 + bytes(8)
            self.in_flight[lba] = payload
            try:
                result = initiator.write10(lba, payload)
            except (ConnectionClosed, OSError):
                return
            except Exception:       # the target died mid-answer
                return
            if result.status == GOOD:
                self.acknowledged[lba] = payload
                del self.in_flight[lba]
                self.count += 1


def test_no_acknowledged_write_is_lost_when_the_target_is_killed(tmp_path):
    target = TargetProcess(tmp_path)
    target.start()
    rng = random.Random(20261207)
    expected: dict[int, bytes] = {}                # lba -> last acknowledged payload
    maybe: dict[int, bytes] = {}                   # lba -> a later write that may have landed
    writes = 0
    try:
        for round_ in range(KILLS):
            writers = [Writer(target, n, round_, rng.randrange(1 << 30)) for n in range(WRITERS)]
            for writer in writers:
                writer.start()
            time.sleep(rng.uniform(0.1, 0.4))       # kill at any moment
            target.kill()
            for writer in writers:
                writer.join(10)
                assert not writer.is_alive()
                for lba, payload in writer.acknowledged.items():
                    expected[lba] = payload
                    maybe.pop(lba, None)
                for lba, payload in writer.in_flight.items():
                    maybe[lba] = payload
                writes += writer.count
            target.start()
            reader = target.session(("iqn.2024-01.org.example:killcheck",
                                     bytes.fromhex("80000000e001")))
            for lba, payload in expected.items():
                result = reader.read10(lba, 1)
                assert result.status == GOOD
                assert result.data in (payload, maybe.get(lba)), \
                    f"round {round_}: LBA {lba} lost its acknowledged write"
            reader.logout()
            target.initiators.remove(reader)
            reader.close()
    finally:
        target.close()
    print(f"{KILLS} kills, {writes} acknowledged writes, {len(expected)} LBAs checked after each")
    assert writes > KILLS * 10, f"only {writes} acknowledged writes over {KILLS} kills"
