#!/usr/bin/env python3
"""1 MiB reads and writes at queue depth 8 with and without CRC32C header + data digests,
against the Python target and the C istgt, driven by the project's own initiator.

libiscsi (and so QEMU) never offers DataDigest, so this uses tests/functional/initiator.py,
which negotiates both digests and checks every one it receives. The initiator is Python too
and pays for its own CRCs and copies, so its figures are a floor for what a target can do
and its digest-on/off ratio is a conservative one for the target's cost; the target's own
CPU time per GiB moved (from /proc) shows that cost directly. Also reports the bandwidth of
one loopback TCP connection on this machine.

    bench/digest_bench.py                 # 3 reps, 512 MiB per run and direction
    bench/digest_bench.py --smoke         # seconds: proves it runs
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent))

import run_bench  # noqa: E402
from loopback import loopback_mib_s  # noqa: E402
from tests.functional.initiator import ConnectionClosed, Initiator  # noqa: E402

MIB = 1 << 20
BLOCK = 512
DEPTH = 8
TARGET = f"{run_bench.NODE_BASE}:{run_bench.TARGET_NAME}"


def read16(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQIBB", 0x88, 0, lba, blocks, 0, 0)


def write16(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQIBB", 0x8A, 0, lba, blocks, 0, 0)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_once(target, digest: str, write: bool, total_mib: int, lu_mib: int,
             ) -> tuple[float, float]:
    """MiB/s of `total_mib` sequential 1 MiB commands kept DEPTH deep (login not counted),
    and the target's CPU seconds per GiB."""
    initiator = Initiator("127.0.0.1", target.port, timeout=60)
    # the C istgt sends Data-In bursts longer than the default MaxBurstLength the initiator
    # did not negotiate: count that, do not stop on it (the Python target is held to it)
    initiator.strict = target.name == "python"
    try:
        initiator.login(TARGET, header_digest=digest, data_digest=digest,
                        max_recv_data_segment_length=262144)
        if digest != "None" and not (initiator.header_digest and initiator.data_digest):
            raise RuntimeError("the target did not accept CRC32C digests")
        for _ in range(3):                  # the new nexus' power-on unit attention
            if initiator.tur().status == 0:
                break
        blocks = MIB // BLOCK
        payload = bytes([0x5A]) * MIB
        in_flight = []
        cpu_before = cpu_seconds(target.process.pid)
        started = time.perf_counter()
        for i in range(total_mib):
            lba = (i % lu_mib) * blocks
            if write:
                in_flight.append(initiator.submit(write16(lba, blocks), data_out=payload))
            else:
                in_flight.append(initiator.submit(read16(lba, blocks), read_length=MIB))
            if len(in_flight) >= DEPTH:
                _check(initiator.collect(in_flight.pop(0)))
        for itt in in_flight:
            _check(initiator.collect(itt))
        seconds = time.perf_counter() - started
        cpu = cpu_seconds(target.process.pid) - cpu_before
        try:
            initiator.logout()
        except ConnectionClosed:
            print(f"# {target.name} closed the connection instead of answering Logout",
                  flush=True)
        if initiator.violations:
            print(f"# {target.name}: {len(initiator.violations)} protocol violations, first: "
                  f"{initiator.violations[0]}", flush=True)
        return total_mib / seconds, cpu / (total_mib / 1024)
    finally:
        initiator.close()


def _check(result) -> None:
    if result.status != 0:
        raise RuntimeError(f"command failed with status 0x{result.status:02x}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--mib", type=int, default=512, help="MiB moved per run")
    parser.add_argument("--smoke", action="store_true", help="--reps 1 --mib 16")
    args = parser.parse_args(argv)
    if args.smoke:
        args.reps, args.mib = 1, 16
    lu_mib = 256
    root = Path(tempfile.mkdtemp(prefix="istgt-digest-bench-"))
    targets = [run_bench.prepare("python", root, lu_mib * MIB,
                                 [sys.executable, str(run_bench.REPO_ROOT / "istgt.py")]),
               run_bench.prepare("c-istgt", root, lu_mib * MIB, [run_bench.C_ISTGT])]
    started = []
    try:
        for target in targets:
            target.start()
            started.append(target)
        print(f"# loopback TCP, one connection: {loopback_mib_s():.0f} MiB/s", flush=True)
        print(f"# {args.reps} reps of {args.mib} MiB per lane, 1 MiB commands at QD{DEPTH}, "
              "initiator tests/functional/initiator.py", flush=True)
        for write in (False, True):
            kind = "1m-write-qd8" if write else "1m-read-qd8"
            results: dict[tuple[str, str], float] = {}
            cpu: dict[tuple[str, str], float] = {}
            for target in targets:
                for digest in ("None", "CRC32C"):
                    runs = [run_once(target, digest, write, args.mib, lu_mib)
                            for _ in range(args.reps)]
                    speeds = [speed for speed, _ in runs]
                    results[target.name, digest] = statistics.median(speeds)
                    cpu[target.name, digest] = statistics.median(c for _, c in runs)
                    print(f"{kind:13} {target.name:8} digests {digest:6} "
                          f"{results[target.name, digest]:7.0f} MiB/s "
                          f"[{min(speeds):.0f}-{max(speeds):.0f}]  target CPU "
                          f"{cpu[target.name, digest]:.2f} s/GiB", flush=True)
            for target in targets:
                on, off = results[target.name, "CRC32C"], results[target.name, "None"]
                cpu_off = cpu[target.name, "None"]
                cpu_ratio = f"{cpu[target.name, 'CRC32C'] / cpu_off:.2f}" if cpu_off else "-"
                print(f"{kind:13} {target.name:8} digests on/off: throughput {on / off:.2f}, "
                      f"target CPU per GiB {cpu_ratio}")
        return 0
    finally:
        for target in reversed(started):
            target.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
