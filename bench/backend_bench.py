#!/usr/bin/env python3
"""Backing stores side by side (issue 8): the Python target serving the same workloads from a
raw file LU, a qcow2 image LU (qemu-storage-daemon over NBD) and, with --rbd, a Ceph RBD LU
through librbd and one through qemu-storage-daemon's rbd driver (ISTGT_RBD_PATH=nbd), in one run with qemu-img bench (bench/run_bench.py's workloads), plus the C istgt on a file as
the reference and the file LU again as the A/A control.

    bench/backend_bench.py                   # full run
    bench/backend_bench.py --smoke           # seconds (CI)
    bench/backend_bench.py --workloads 4k-read-qd32,1m-write-qd8 --reps 5
    bench/backend_bench.py --rbd             # also RBD (tools/ceph_one_node.py, ~10 s more)

Every image is written in full first (a qcow2 with unallocated clusters, or a thin LUN that
reports them deallocated, would make reads look free).
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

from run_bench import (  # noqa: E402
    C_ISTGT, DEFAULT_WORKLOADS, REPO_ROOT, WORKLOADS, Target, bench, prepare,
)

sys.path.insert(0, str(REPO_ROOT / "tools"))
from ceph_one_node import Cluster  # noqa: E402


def image_target(root: Path, name: str, size: int, fmt: str, python: str,
                 location: str | None = None) -> Target:
    """A Python target whose LUN 0 is a `fmt` image (or the RBD image at `location`) holding
    the filled raw disk's bytes."""
    target = prepare(name, root, size, [python, "-m", "istgt.main"], control_socket=True)
    raw = target.directory / "disk.img"
    image = location or str(target.directory / f"disk.{fmt}")
    subprocess.run(["qemu-img", "convert", *(["-n"] if location else []), "-f", "raw", "-O",
                    fmt, str(raw), image], check=True, capture_output=True, timeout=600)
    raw.unlink()
    config = target.directory / "istgt.conf"
    config.write_text(config.read_text().replace(str(raw), image))
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="--scale 0.02 --reps 1, 64 MiB")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS))
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--rbd", action="store_true",
                        help="also an RBD LU on a one-node Ceph started for the run")
    args = parser.parse_args(argv)
    if args.smoke:
        args.scale, args.reps, args.size_mib = 0.02, 1, 64
    for tool in (C_ISTGT, "qemu-img", "qemu-storage-daemon"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed (make test installs it)")
    workload_names = args.workloads.split(",")
    unknown = [name for name in workload_names if name not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workloads {unknown}")

    root = Path(tempfile.mkdtemp(prefix="istgt-backend-bench-"))
    size = args.size_mib << 20
    cluster = None
    started: list[Target] = []
    status = 1
    try:
        targets = {
            "file": prepare("file", root, size, [args.python, "-m", "istgt.main"],
                            control_socket=True),
            "qcow2": image_target(root, "qcow2", size, "qcow2", args.python),
            "c-istgt-file": prepare("c-istgt", root, size, [C_ISTGT]),
        }
        lanes = ["file", "qcow2", "c-istgt-file", "file-again"]
        if args.rbd:
            cluster = Cluster(root / "ceph")
            cluster.start(memory_mib=max(1024, 2 * args.size_mib))
            for lane in ("rbd", "rbd-nbd"):
                cluster.rbd("create", "--size", f"{args.size_mib}M", f"rbd/{lane}")
                targets[lane] = image_target(root, lane, size, "raw", args.python,
                                             location=f"rbd:rbd/{lane}:conf={cluster.conf}")
            lanes[2:2] = ["rbd", "rbd-nbd"]
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        for name, target in targets.items():
            # rbd-nbd: the same kind of RBD LU through qemu-storage-daemon's rbd driver
            target.start(env=dict(env, ISTGT_RBD_PATH="nbd") if name == "rbd-nbd" else env)
            started.append(target)
        print(f"# reps {args.reps}, scale {args.scale}, LU {args.size_mib} MiB each; "
              + ", ".join(f"{name} {t.url}" for name, t in targets.items()), flush=True)
        sources = [(lane, targets[lane.replace("-again", "")].url) for lane in lanes]
        medians = bench(sources, workload_names, args.reps, args.scale, args.timeout)
        print("\n# ratios (ops/s) to the file LU, and the A/A control file-again/file")
        print(f"{'workload':14} {'qcow2':>7} {'rbd':>7} {'rbd-nbd':>7} {'C file':>7} {'A/A':>7}")
        for workload, ops in medians.items():
            def ratio(top: str) -> str:
                return f"{ops[top] / ops['file']:7.2f}" if top in ops and "file" in ops else \
                    "      -"
            print(f"{workload:14} {ratio('qcow2')} {ratio('rbd')} {ratio('rbd-nbd')} "
                  f"{ratio('c-istgt-file')} {ratio('file-again')}")
        status = 0 if all(len(ops) == len(lanes) for ops in medians.values()) else 1
    finally:
        for target in reversed(started):
            target.stop()
        if cluster is not None:
            cluster.stop()
        if status == 0:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"# kept {root} for the logs", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
