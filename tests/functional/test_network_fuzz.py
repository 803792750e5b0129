"""The network fuzzer (tests/functional/netfuzz.py) against the running server, bounded for
CI: mutated login and full-feature PDU streams, a liveness check (login, INQUIRY, READ)
after every batch; no crash, no hang, threads and connections back afterwards. Long runs:
bench/fuzz_network.py."""

import threading
import time

from tests.functional import netfuzz
from tests.functional.conftest import DISK

INPUTS = 2000
TIME_LIMIT_S = 60


def test_mutated_sessions_never_stop_the_target(target):
    assert netfuzz.alive(target.host, target.port, DISK) is None
    report = netfuzz.run(target.host, target.port, DISK, INPUTS, seed=20261207,
                         time_limit_s=TIME_LIMIT_S, linger_s=0.005)
    assert report.failures == []
    assert report.inputs >= 500, f"only {report.inputs} inputs in {TIME_LIMIT_S} s"
    deadline = time.monotonic() + 30               # the last fuzzed connections end
    while (target.server.connections() or connection_threads()) \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    left = target.server.connections()
    assert left == [], f"{len(left)} connections still open after {report.inputs} inputs"
    assert connection_threads() == []


def connection_threads():
    return [t.name for t in threading.enumerate() if t.name.startswith(("conn-rx-", "conn-tx-"))]


def test_the_mutator_cuts_pdus_and_varies_its_inputs():
    import random
    pdu = bytes(7) + bytes([4]) + bytes(40) + b"abcd"     # a 4-byte data segment
    assert netfuzz.split_pdus(pdu * 3) == [pdu] * 3
    rng = random.Random(1)
    outputs = [netfuzz.mutate(pdu * 3, rng) for _ in range(200)]
    assert sum(out != pdu * 3 for out in outputs) > 150     # nearly every input differs
    assert len(set(outputs)) > 100                          # and they differ from each other
