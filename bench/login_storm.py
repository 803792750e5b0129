#!/usr/bin/env python3
"""Login storm: N sessions log in at once (each its own connection), each does one READ,
all log out; reports logins per second and the Python target's resident size, threads and
open fds before, at the peak and after (from /proc).

The initiators are the project's own (tests/functional/initiator.py), spread over worker
processes so the client side is not one GIL; the login rate is the number of sessions over
the wall-clock time from the first connect to the last Login Response.

    bench/login_storm.py --sessions 256
    bench/login_storm.py --smoke
"""
from __future__ import annotations

import argparse
import multiprocessing
import struct
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent))

import run_bench  # noqa: E402
from istgt.allocator import TRIM_INTERVAL_S  # noqa: E402

TARGET = f"{run_bench.NODE_BASE}:{run_bench.TARGET_NAME}"


def client(port: int, count: int, index: int, start_at: float, hold: multiprocessing.Event,
           results) -> None:
    """Log `count` sessions in, READ once on each, wait for `hold`, log them all out."""
    from tests.functional.initiator import Initiator

    while time.time() < start_at:
        time.sleep(0.001)
    sessions, errors = [], []
    first = time.time()
    for n in range(count):
        try:
            initiator = Initiator("127.0.0.1", port, timeout=60,
                                  initiator_name=f"iqn.2024-01.org.example:storm{index}-{n}")
            initiator.login(TARGET)
            sessions.append(initiator)
        except Exception as exc:      # counted and reported, the storm goes on
            errors.append(f"login: {exc}")
    logged_in = time.time()
    read10 = struct.pack(">BBIBHB", 0x28, 0, 0, 0, 1, 0)
    for initiator in sessions:
        try:
            status = initiator.scsi(read10, read_length=512).status
            if status == 0x02:                       # the new nexus' unit attention
                status = initiator.scsi(read10, read_length=512).status
            if status != 0:
                errors.append(f"READ status 0x{status:02x}")
        except Exception as exc:
            errors.append(f"READ: {exc}")
    results.put(("in", index, first, logged_in, len(sessions), errors))
    hold.wait(120)
    for initiator in sessions:
        try:
            initiator.logout()
        except Exception as exc:
            errors.append(f"logout: {exc}")
        finally:
            initiator.close()
    results.put(("out", index, len(errors)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=256)
    parser.add_argument("--clients", type=int, default=8, help="initiator processes")
    parser.add_argument("--smoke", action="store_true", help="--sessions 16 --clients 2")
    args = parser.parse_args(argv)
    if args.smoke:
        args.sessions, args.clients = 16, 2
    sessions = f"MaxSessions {max(128, args.sessions * 2)}"
    with run_bench.lone_python_target("istgt-storm-", 64 << 20,
                                      lambda text: text.replace("MaxSessions 128", sessions)
                                      ) as target:
        time.sleep(1)
        idle = target.figures()
        ctx = multiprocessing.get_context("fork")
        results, hold = ctx.Queue(), ctx.Event()
        start_at = time.time() + 1.0
        share = [args.sessions // args.clients + (i < args.sessions % args.clients)
                 for i in range(args.clients)]
        procs = [ctx.Process(target=client, args=(target.port, n, i, start_at, hold, results))
                 for i, n in enumerate(share)]
        for proc in procs:
            proc.start()
        ins = [results.get(timeout=300) for _ in procs]
        peak = target.figures()
        hold.set()
        outs = [results.get(timeout=300) for _ in procs]
        for proc in procs:
            proc.join(60)
        first = min(r[2] for r in ins)
        last = max(r[3] for r in ins)
        logged = sum(r[4] for r in ins)
        errors = [e for r in ins for e in r[5]]
        failures = len(errors) + sum(r[2] for r in outs) + (args.sessions - logged)
        time.sleep(2 + TRIM_INTERVAL_S)     # teardown, then a malloc_trim
        after = target.figures()
    print(f"# {args.sessions} sessions from {args.clients} initiator processes")
    print(f"logged in {logged}/{args.sessions} in {last - first:.2f} s: "
          f"{logged / max(last - first, 1e-9):.0f} logins/s (each then one READ)")
    print(f"errors {failures}" + (f": first {errors[0]}" if errors else ""))
    for name, (rss, threads, fds) in (("idle", idle), ("all logged in", peak),
                                      ("after logout", after)):
        print(f"{name:14} RSS {rss} KiB, threads {threads}, fds {fds}")
    return 1 if failures else 0

if __name__ == "__main__":
    sys.exit(main())
