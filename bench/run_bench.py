#!/usr/bin/env python3
"""Benchmark the Python target against the C istgt and tgt on loopback with QEMU's iSCSI
initiator.

Starts the Python target and the C istgt from the same istgt.conf template
(bench/c-istgt.conf: one 1 GiB sparse Disk LU, QueueDepth 32, loopback only) and tgt (tgtd
with the same kind of sparse file as its LUN 1), runs `qemu-img bench` workloads against them
in turn (python, c-istgt, tgt, python-again: the last is the same Python target again, an A/A
control that shows how far two identical runs drift on this machine), prints each target's
median and its ratio to the C istgt and the Python target's resident memory, and stops every
target whatever happens.

    bench/run_bench.py                  # full run (several minutes)
    bench/run_bench.py --smoke          # seconds: --scale 0.02 --reps 1 (what CI runs)
    bench/run_bench.py --workloads 4k-read-qd32 --reps 5
    bench/run_bench.py --header-digest  # CRC32C header digests (libiscsi has no data digests)
    bench/run_bench.py --sessions 16    # 16 qemu-img processes (sessions) at once per lane
    bench/run_bench.py --sessions 64 --workloads 4k-read-qd8,4k-write-qd8 --scale 0.2

Needs Debian's istgt (/usr/sbin/istgt), tgt (/usr/sbin/tgtd), qemu-utils, qemu-block-extra.
"""
from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import socket
import statistics
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
CONFIG_TEMPLATE = BENCH_DIR / "c-istgt.conf"
NODE_BASE = "iqn.2007-09.jp.ne.peach.istgt"
TARGET_NAME = "bench"
C_ISTGT = "/usr/sbin/istgt"
TGTD, TGTADM = "/usr/sbin/tgtd", "/usr/sbin/tgtadm"
STARTUP_TIMEOUT_S = 20.0
SHUTDOWN_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Workload:
    block_size: str
    depth: int
    write: bool
    requests: int

    @property
    def block_bytes(self) -> int:
        return {"4k": 4096, "64k": 65536, "1M": 1 << 20}[self.block_size]


# The same workloads as shared/tools/iscsi-bench, so that numbers compare across the two.
WORKLOADS = {
    "4k-read-qd1": Workload("4k", 1, False, 8000),
    "4k-read-qd32": Workload("4k", 32, False, 40000),
    "4k-write-qd32": Workload("4k", 32, True, 40000),
    "64k-read-qd16": Workload("64k", 16, False, 8000),
    "1m-read-qd8": Workload("1M", 8, False, 1500),
    "1m-write-qd8": Workload("1M", 8, True, 1500),
}
DEFAULT_WORKLOADS = list(WORKLOADS)
# for many sessions at once (--sessions 64): each session's share of the load
WORKLOADS.update({
    "4k-read-qd8": Workload("4k", 8, False, 20000),
    "4k-write-qd8": Workload("4k", 8, True, 20000),
})


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def port_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class Target:
    """One target process serving one LU on 127.0.0.1."""
    name: str
    command: list[str]
    directory: Path
    port: int
    process: subprocess.Popen | None = field(default=None, repr=False)
    lun: int = 0
    # commands run once the portal answers, and to ask it to stop (tgtadm for tgt)
    setup: list[list[str]] = field(default_factory=list)
    teardown: list[list[str]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"iscsi://127.0.0.1:{self.port}/{NODE_BASE}:{TARGET_NAME}/{self.lun}"

    def source(self, header_digest: bool) -> str:
        """What qemu-img opens: the URL, or --image-opts asking for header digests."""
        if not header_digest:
            return self.url
        return (f"driver=iscsi,transport=tcp,portal=127.0.0.1:{self.port},"
                f"target={NODE_BASE}:{TARGET_NAME},lun={self.lun},header-digest=crc32c")

    def resident_kib(self) -> int | None:
        """VmRSS of the target process, in KiB (None if it is not running)."""
        try:
            return self.figures()[0]
        except (OSError, AttributeError):
            return None

    def figures(self) -> tuple[int, int, int]:
        """(VmRSS KiB, threads, open fds) of the target process, from /proc."""
        pid = self.process.pid
        rss = threads = 0
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("Threads:"):
                    threads = int(line.split()[1])
        return rss, threads, len(os.listdir(f"/proc/{pid}/fd"))

    @property
    def log_path(self) -> Path:
        return self.directory / "target.log"

    def start(self, env: dict[str, str] | None = None) -> None:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command, cwd=REPO_ROOT, env=env,
                                            stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode} at "
                                   f"start-up:\n{self.log_path.read_text(errors='replace')}")
            if port_accepts(self.port):
                for command in self.setup:
                    subprocess.run(command, check=True, capture_output=True, timeout=30)
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not listen on 127.0.0.1:{self.port} within "
                           f"{STARTUP_TIMEOUT_S} s")

    def stop(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        for command in self.teardown:
            subprocess.run(command, capture_output=True, timeout=30)
        if self.process.poll() is not None:
            return self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=SHUTDOWN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=SHUTDOWN_TIMEOUT_S)
            return None


def prepare(name: str, root: Path, size_bytes: int, command_prefix: list[str],
            control_socket: bool = False) -> Target:
    """A directory with a sparse backing file and an istgt.conf from the shared template."""
    directory = root / name
    directory.mkdir()
    disk = directory / "disk.img"
    write_backing_file(disk, size_bytes)
    (directory / "auth.conf").write_text("")
    port = free_port()
    config = string.Template(CONFIG_TEMPLATE.read_text()).substitute(
        pid_file=directory / "istgt.pid", auth_file=directory / "auth.conf",
        media_dir=directory, control_port=free_port(), port=port, disk=disk,
        size=f"{size_bytes >> 20}MB")
    if control_socket:      # the Python target's Unix control socket (the C istgt has none)
        config = config.replace("[UnitControl]\n",
                                f"[UnitControl]\n  ControlSocket {directory / 'ctl.sock'}\n", 1)
    (directory / "istgt.conf").write_text(config)
    return Target(name, [*command_prefix, "-D", "-c", str(directory / "istgt.conf")],
                  directory, port)


@contextmanager
def lone_python_target(prefix: str, size_bytes: int,
                       edit_config: Callable[[str], str] | None = None) -> Iterator[Target]:
    """The Python target alone in a fresh temporary directory, started (after `edit_config`
    rewrote its istgt.conf, if given); stopped and its directory removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    target = prepare("python", root, size_bytes, [sys.executable, str(REPO_ROOT / "istgt.py")])
    try:
        if edit_config is not None:
            conf = target.directory / "istgt.conf"
            conf.write_text(edit_config(conf.read_text()))
        target.start()
        yield target
    finally:
        target.stop()
        shutil.rmtree(root, ignore_errors=True)


def write_backing_file(path: Path, size_bytes: int) -> None:
    """Every block written (not sparse): QEMU's iSCSI driver skips reading blocks a thin
    LUN reports deallocated (LBPRZ), which would make a thin target's reads look free."""
    chunk = bytes([0xA5]) * (1 << 20)
    with open(path, "wb") as backing:
        for _ in range(size_bytes // len(chunk)):
            backing.write(chunk)
        backing.write(chunk[:size_bytes % len(chunk)])


def prepare_tgt(root: Path, size_bytes: int) -> Target:
    """tgtd on its own port and management socket, the same kind of sparse file as LUN 1."""
    directory = root / "tgt"
    directory.mkdir()
    disk = directory / "disk.img"
    write_backing_file(disk, size_bytes)
    port = free_port()
    control = str(random.randrange(1000, 9999))     # tgtd management socket number (< 10000)
    admin = [TGTADM, "-C", control, "--lld", "iscsi"]
    return Target("tgt", [TGTD, "-f", "-C", control, "--iscsi", f"portal=127.0.0.1:{port}"],
                  directory, port, lun=1, setup=[
                      [*admin, "--op", "new", "--mode", "target", "--tid", "1",
                       "-T", f"{NODE_BASE}:{TARGET_NAME}"],
                      [*admin, "--op", "new", "--mode", "logicalunit", "--tid", "1",
                       "--lun", "1", "-b", str(disk)],
                      [*admin, "--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL"],
                  ], teardown=[
                      # tgtd ignores SIGTERM while it has targets: remove them, then stop it
                      [*admin, "--op", "delete", "--mode", "target", "--tid", "1", "--force"],
                      [TGTADM, "-C", control, "--op", "delete", "--mode", "system"],
                  ])


def run_workload(source: str, workload: Workload, requests: int, timeout_s: float,
                 sessions: int = 1) -> tuple[float | None, str]:
    """Seconds of one `qemu-img bench` run as it reports it (logging in not counted); with
    several sessions, the wall-clock time from starting them all to the last one's end,
    logins included (their runs would not overlap otherwise); or None and why one failed."""
    command = ["qemu-img", "bench", "-c", str(requests), "-d", str(workload.depth),
               "-s", workload.block_size, "-S", workload.block_size]
    if workload.write:
        command += ["-w", "--pattern=0x5a"]
    # a URL is opened raw; --image-opts names its driver itself (and excludes -f)
    command += ["--image-opts", source] if source.startswith("driver=") else ["-f", "raw", source]
    started = time.monotonic()
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             stdin=subprocess.DEVNULL) for _ in range(sessions)]
    slowest, failure = 0.0, ""
    for run in runs:
        try:
            out, err = run.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            run.kill()
            run.communicate()
            failure = f"no result within {timeout_s:.0f} s"
            continue
        found = re.search(r"Run completed in ([\d.]+) seconds", out)
        if run.returncode != 0 or found is None:
            lines = (err or out).strip().splitlines()
            failure = lines[-1] if lines else f"exit status {run.returncode}"
            continue
        slowest = max(slowest, float(found.group(1)))
    if sessions > 1:
        slowest = time.monotonic() - started
    return (None, failure) if failure else (slowest, "")


def bench(lanes: list[tuple[str, str]], workload_names: list[str], reps: int, scale: float,
          timeout_s: float, sessions: int = 1, after_workload=None,
          ) -> dict[str, dict[str, float]]:
    """Median ops/s per workload per lane (summed over `sessions` concurrent sessions);
    lanes alternate within each repetition."""
    medians: dict[str, dict[str, float]] = {}
    for workload_name in workload_names:
        workload = WORKLOADS[workload_name]
        requests = max(1, int(workload.requests * scale))
        times: dict[str, list[float]] = {name: [] for name, _ in lanes}
        errors: dict[str, str] = {}
        for _rep in range(reps):
            for name, url in lanes:
                seconds, error = run_workload(url, workload, requests, timeout_s, sessions)
                if seconds is None:
                    errors[name] = error
                else:
                    times[name].append(seconds)
        medians[workload_name] = {}
        for name, _ in lanes:
            if not times[name]:
                print(f"{workload_name:14} {name:13} FAILED: {errors.get(name)}", flush=True)
                continue
            total = requests * sessions
            ops = total / statistics.median(times[name])
            medians[workload_name][name] = ops
            spread = f"[{total / max(times[name]):.0f}-{total / min(times[name]):.0f}]"
            mib = ops * workload.block_bytes / (1 << 20)
            print(f"{workload_name:14} {name:13} {ops:9.0f} ops/s {spread:>17} "
                  f"{mib:8.1f} MiB/s", flush=True)
        if after_workload is not None:
            after_workload(workload_name)
    return medians


def print_ratios(medians: dict[str, dict[str, float]]) -> None:
    print("\n# ratios (ops/s): python/c-istgt, tgt/c-istgt, and the A/A control "
          "python-again/python")
    print(f"{'workload':14} {'py/C':>7} {'py2/C':>7} {'tgt/C':>7} {'A/A':>7}")
    for workload_name, ops in medians.items():
        def ratio(top: str, bottom: str) -> str:
            return f"{ops[top] / ops[bottom]:7.2f}" if top in ops and bottom in ops else "      -"
        print(f"{workload_name:14} {ratio('python', 'c-istgt')} "
              f"{ratio('python-again', 'c-istgt')} {ratio('tgt', 'c-istgt')} "
              f"{ratio('python-again', 'python')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="a quick check that everything runs: --scale 0.02 --reps 1")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply request counts")
    parser.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS),
                        help=f"comma-separated, from {', '.join(WORKLOADS)}")
    parser.add_argument("--size-mib", type=int, default=1024, help="LU size of each target")
    parser.add_argument("--timeout", type=float, default=120.0, help="per qemu-img run")
    parser.add_argument("--python", default=sys.executable, help="interpreter of the target")
    parser.add_argument("--sessions", type=int, default=1,
                        help="concurrent qemu-img processes (iSCSI sessions) per lane")
    parser.add_argument("--header-digest", action="store_true",
                        help="CRC32C header digests (libiscsi offers no data digests)")
    parser.add_argument("--lanes", default="python,c-istgt,tgt,python-again",
                        help="which lanes run, in this order (python-again is the A/A control)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.scale, args.reps, args.size_mib = 0.02, 1, 64
    workload_names = args.workloads.split(",")
    unknown = [name for name in workload_names if name not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workloads {unknown}; choose from {', '.join(WORKLOADS)}")
    for tool in (C_ISTGT, TGTD, TGTADM, "qemu-img"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed (apt-get install istgt tgt qemu-utils "
                         "qemu-block-extra)")

    root = Path(tempfile.mkdtemp(prefix="istgt-bench-"))
    size = args.size_mib << 20
    python_target = prepare("python", root, size, [args.python, "-m", "istgt.main"],
                            control_socket=True)
    c_target = prepare("c-istgt", root, size, [C_ISTGT])
    tgt_target = prepare_tgt(root, size)
    started: list[Target] = []
    status = 1
    try:
        by_lane = {"python": python_target, "c-istgt": c_target, "tgt": tgt_target,
                   "python-again": python_target}
        lane_names = args.lanes.split(",")
        if any(name not in by_lane for name in lane_names):
            parser.error(f"unknown lane in {args.lanes}; choose from {', '.join(by_lane)}")
        for target in (python_target, c_target, tgt_target):
            if target in (by_lane[name] for name in lane_names):
                target.start(env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
                started.append(target)
        print(f"# python {python_target.url}\n# c-istgt {c_target.url}\n# tgt {tgt_target.url}\n"
              f"# reps {args.reps}, scale {args.scale}, LU {args.size_mib} MiB each, "
              f"{args.sessions} session(s) per lane, header digest "
              f"{'CRC32C' if args.header_digest else 'none'}", flush=True)
        digest = args.header_digest
        lanes = [(name, by_lane[name].source(digest)) for name in lane_names]
        resident = [python_target.resident_kib()]

        def note_memory(_workload: str) -> None:
            resident.append(python_target.resident_kib())

        medians = bench(lanes, workload_names, args.reps, args.scale, args.timeout,
                        args.sessions, after_workload=note_memory)
        print_ratios(medians)
        print(f"\n# python target resident memory (KiB), at start then after each workload: "
              f"{' '.join(str(kib) for kib in resident)}")
        status = 0 if all(len(ops) == len(lanes) for ops in medians.values()) else 1
    finally:
        for target in reversed(started):
            exit_status = target.stop()
            if exit_status != 0:
                print(f"# {target.name} stopped with status {exit_status}; log in "
                      f"{target.log_path}", file=sys.stderr)
        if status == 0:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"# kept {root} for the logs", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
