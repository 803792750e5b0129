#!/usr/bin/env python3
"""Long runs of the network fuzzer (tests/functional/netfuzz.py) against the Python target
as a separate process: mutated login and full-feature PDU streams, a liveness check (login,
INQUIRY, READ) after every batch, and the target's RSS, threads and open fds from /proc
every 20 batches. Exits 1 on any failure, or if the target died.

    bench/fuzz_network.py --inputs 100000
    bench/fuzz_network.py --smoke
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent))

import run_bench  # noqa: E402
from tests.functional import netfuzz  # noqa: E402

TARGET = f"{run_bench.NODE_BASE}:{run_bench.TARGET_NAME}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=100000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--minutes", type=float, default=60.0, help="stop after this long")
    parser.add_argument("--smoke", action="store_true", help="--inputs 500")
    args = parser.parse_args(argv)
    if args.smoke:
        args.inputs = 500
    with run_bench.lone_python_target("istgt-fuzz-", 64 << 20) as target:
        rss, threads, fds = target.figures()
        print(f"# start: RSS {rss} KiB, threads {threads}, fds {fds}", flush=True)

        def progress(report: netfuzz.FuzzReport) -> None:
            if report.batches % 20 == 0:
                rss, threads, fds = target.figures()
                print(f"{report.inputs:7} inputs: RSS {rss} KiB, threads {threads}, fds {fds}",
                      flush=True)

        report = netfuzz.run("127.0.0.1", target.port, TARGET, args.inputs, args.seed,
                             time_limit_s=args.minutes * 60, on_batch=progress)
        died = target.process.poll() is not None
        rss, threads, fds = target.figures() if not died else (0, 0, 0)
    print(f"# {report.inputs} inputs in {report.seconds:.0f} s "
          f"({report.inputs / max(report.seconds, 1e-9):.0f}/s), {report.batches} liveness "
          f"checks, failures {len(report.failures)}, target "
          f"{'DIED' if died else 'alive'}; end: RSS {rss} KiB, threads {threads}, fds {fds}")
    for failure in report.failures[:10]:
        print(f"# {failure}")
    return 1 if report.failures or died else 0

if __name__ == "__main__":
    sys.exit(main())
