#!/usr/bin/env python3
"""Soak: the Python target over a long run of the six qemu-img bench workloads, over and over
for a set time, one session at a time, then 16 sessions at once (every run is a new
session, so connections churn all along), with VmRSS read after every workload and threads
and open fds after every round; errors are counted. Flat means the last rounds end no
higher than the first ones, and threads and fds come back to their idle level.

    bench/memory_run.py --minutes 10
    bench/memory_run.py --smoke          # one short round
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import run_bench  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--scale", type=float, default=0.25, help="requests per workload run")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.minutes, args.scale = 0.0, 0.01
    failures = 0
    with run_bench.lone_python_target("istgt-memory-", 1 << 30) as target:
        rss, threads, fds = target.figures()
        print(f"# start: RSS {rss} KiB, threads {threads}, fds {fds}", flush=True)
        deadline = time.monotonic() + args.minutes * 60
        rounds = []
        while True:
            sizes = []
            for name, workload in run_bench.WORKLOADS.items():
                if name not in run_bench.DEFAULT_WORKLOADS:
                    continue
                requests = max(1, int(workload.requests * args.scale))
                sessions = 16 if len(rounds) % 2 else 1      # every other round: 16 at once
                seconds, error = run_bench.run_workload(target.url, workload, requests, 120,
                                                        sessions)
                if seconds is None:
                    failures += 1
                    print(f"# {name}: FAILED: {error}", flush=True)
                sizes.append(target.resident_kib())
            rounds.append(sizes)
            _, threads, fds = target.figures()
            print(f"round {len(rounds):3} ({'16 sessions' if (len(rounds) - 1) % 2 else '1 session '}) "
                  f"RSS KiB after each workload: {' '.join(map(str, sizes))}; then "
                  f"threads {threads}, fds {fds}", flush=True)
            if time.monotonic() >= deadline:
                break
        first = max(max(r) for r in rounds[:2])
        last = max(max(r) for r in rounds[-2:])
        time.sleep(6)             # the last connections end; a malloc_trim runs
        rss, threads, fds = target.figures()
        print(f"# rounds {len(rounds)}, peak of the first two {first} KiB, of the last two "
              f"{last} KiB, failures {failures}; 6 s later: RSS {rss} KiB, threads {threads}, "
              f"fds {fds}", flush=True)
    return 1 if failures else 0

if __name__ == "__main__":
    sys.exit(main())
