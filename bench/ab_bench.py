#!/usr/bin/env python3
"""A/B: the Python target at an earlier commit against the working tree, in one run, with an
A/A control (the earlier one again), through qemu-img bench on a file LU.

    bench/ab_bench.py df5d738^                       # before the image work, against now
    bench/ab_bench.py HEAD~3 --workloads 4k-read-qd32 --reps 5
    bench/ab_bench.py HEAD~1 --image qcow2             # both serve a qcow2 image LU

The earlier commit is checked out in a temporary git worktree (removed afterwards).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_bench import REPO_ROOT, WORKLOADS, bench, prepare  # noqa: E402

DEFAULT = "4k-read-qd1,4k-read-qd32,4k-write-qd32,1m-read-qd8"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", help="a git revision of this repository")
    parser.add_argument("--workloads", default=DEFAULT)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--scale", type=float, default=0.3)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--image", metavar="FORMAT",
                        help="serve a disk image of this format (qcow2, vmdk...), which the "
                             "target creates, instead of the raw file")
    args = parser.parse_args(argv)
    names = args.workloads.split(",")
    if any(name not in WORKLOADS for name in names):
        parser.error(f"workloads are {', '.join(WORKLOADS)}")
    root = Path(tempfile.mkdtemp(prefix="istgt-ab-"))
    tree = root / "tree"
    subprocess.run(["git", "-C", str(REPO_ROOT), "worktree", "add", "--detach", str(tree),
                    args.before], check=True, capture_output=True)
    size = args.size_mib << 20
    # istgt.py's own directory comes first on sys.path: each lane runs its own tree
    before = prepare("before", root, size, [sys.executable, str(tree / "istgt.py")])
    now = prepare("now", root, size, [sys.executable, str(REPO_ROOT / "istgt.py")])
    if args.image:
        for target in (before, now):
            conf = target.directory / "istgt.conf"
            raw = str(target.directory / "disk.img")
            conf.write_text(conf.read_text().replace(
                raw, str(target.directory / f"disk.{args.image}")))
    started = []
    try:
        for target in (before, now):
            target.start(env=dict(os.environ))
            started.append(target)
        lanes = [("before", before.url), ("now", now.url), ("before-again", before.url)]
        medians = bench(lanes, names, args.reps, args.scale, 120.0)
        print(f"\n# now/before and the A/A control before-again/before ({args.before})")
        for workload, ops in medians.items():
            print(f"{workload:14} {ops['now'] / ops['before']:5.2f}  A/A "
                  f"{ops['before-again'] / ops['before']:5.2f}")
    finally:
        for target in started:
            target.stop()
        subprocess.run(["git", "-C", str(REPO_ROOT), "worktree", "remove", "--force",
                        str(tree)], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
