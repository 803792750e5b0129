"""A connection that ended is freed at once by reference counting: nothing of it (threads,
its receive buffer) waits for the cyclic garbage collector."""

import gc
import time
import weakref


def test_an_ended_connection_is_freed_without_the_cycle_collector(target):
    initiator = target.session()
    initiator.read10(0, 8)
    conn = next(iter(target.server.connections()))
    ref = weakref.ref(conn)
    reader_buffer = weakref.ref(conn.reader)
    del conn
    gc.disable()
    try:
        initiator.logout()
        initiator.close()
        deadline = time.monotonic() + 5
        while ref() is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ref() is None and reader_buffer() is None
    finally:
        gc.enable()
