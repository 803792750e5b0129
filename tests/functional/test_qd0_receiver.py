"""QueueDepth 0: while a slow command holds the LU's exclusive lock on a worker, another
connection's READ must not be run (and wait) on that connection's receiver, which would then
read nothing and leave its NOP-Out unanswered (a regression seen in review)."""
import threading
import time

from tests.functional.conftest import GOOD

SLOW_S = 3.0


def test_nop_out_answered_while_a_slow_command_runs_qd0(make_target, monkeypatch):
    target = make_target(queue_depth=0)
    unit = next(iter(target.server.units.values()))
    device = unit.devices[0]
    started = threading.Event()
    real_sync = device.sync

    def slow_sync(*a, **kw):          # e.g. fsync of a lot of dirty page cache
        started.set()
        time.sleep(SLOW_S)
        return real_sync(*a, **kw)

    monkeypatch.setattr(device, "sync", slow_sync)
    a = target.session()
    b = target.session(initiator_name="iqn.2024-01.org.example:other")
    itt_sync = a.submit(bytes([0x35]) + bytes(9))          # SYNCHRONIZE CACHE(10)
    assert started.wait(5)
    itt_read = b.submit(bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]), read_length=512)
    time.sleep(0.1)                                       # the READ reaches the receiver
    t0 = time.monotonic()
    b.nop_out(b"ping")                                    # immediate NOP-Out
    took = time.monotonic() - t0
    assert b.collect(itt_read).status == GOOD
    assert a.collect(itt_sync).status == GOOD
    assert took < 1.0, f"NOP-Out answered only after {took:.2f} s (receiver blocked)"
