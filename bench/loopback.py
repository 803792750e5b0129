#!/usr/bin/env python3
"""Bandwidth of one TCP connection over loopback on this machine: the ceiling for one iSCSI
session's large reads. A sender thread writes 1 MiB buffers, the receiver reads into a
reused 1 MiB buffer; with buffers that large the time is the kernel's copying, not Python's.

    bench/loopback.py        # prints MiB/s (median of 3 runs of 2 s)
"""
from __future__ import annotations

import socket
import statistics
import threading
import time

CHUNK = 1 << 20


def _one_run(seconds: float) -> float:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    sender = socket.create_connection(listener.getsockname())
    receiver, _ = listener.accept()
    listener.close()
    stop = threading.Event()

    def send() -> None:
        data = bytes(CHUNK)
        try:
            while not stop.is_set():
                sender.sendall(data)
        except OSError:
            pass
        finally:
            sender.close()

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    buf = memoryview(bytearray(CHUNK))
    received = 0
    started = time.perf_counter()
    deadline = started + seconds
    while time.perf_counter() < deadline:
        n = receiver.recv_into(buf)
        if n == 0:
            break
        received += n
    elapsed = time.perf_counter() - started
    stop.set()
    receiver.close()
    thread.join(5)
    return received / elapsed / (1 << 20)


def loopback_mib_s(seconds: float = 2.0, runs: int = 3) -> float:
    return statistics.median(_one_run(seconds) for _ in range(runs))


if __name__ == "__main__":
    print(f"loopback TCP, one connection: {loopback_mib_s():.0f} MiB/s")
