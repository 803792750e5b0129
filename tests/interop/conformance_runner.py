"""Run libiscsi's iscsi-test-cu one test per process, so that a crash or hang costs one test.

Used by test_conformance.py; also runs by hand against any target:

    python -m tests.interop.conformance_runner iscsi://127.0.0.1:3260/iqn.../0 [URL2 ...]

Several URLs (distinct LUs, best on distinct target processes) spread the tests over that many
parallel workers.  Prints one line per test and a closing 'N passed, N failed' line.
"""
from __future__ import annotations

import argparse
import enum
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from queue import Empty, SimpleQueue

DEFAULT_TIMEOUT_S = 30
KILL_GRACE_S = 5
# iscsi-test-cu probes the LU (REPORT SUPPORTED OPCODES ...) before printing the CUnit banner;
# only what follows the banner belongs to the test.
CUNIT_BANNER = "cunit.sourceforge.net"
SUMMARY = re.compile(r"tests\s+(\d+)\s+(\d+)\s+(\S+)\s+(\d+)\s+(\d+)")
REASON = re.compile(r"\[(FAILED|SKIPPED)\]\s*(.*)")
FAILED_ASSERT = re.compile(r"had failures:\s*\n\s*1\.\s*(.*)")


class Result(str, enum.Enum):
    PASS = "PASS"
    FAIL = "FAIL"
    SKIP = "SKIP"
    CRASH = "CRASH"
    TIMEOUT = "TIMEOUT"


@dataclass(frozen=True)
class Outcome:
    test: str
    result: Result
    reason: str
    seconds: float


def list_tests() -> list[str]:
    """Every test once: the ALL family holds them all (SCSI, iSCSI, LINUX regroup the same)."""
    listing = subprocess.run(["iscsi-test-cu", "--list"], capture_output=True, text=True,
                             timeout=60, check=True).stdout
    names = (line.strip() for line in listing.splitlines())
    return [name for name in names if name.startswith("ALL.") and name.count(".") == 2]


def classify(returncode: int, output: str) -> tuple[Result, str]:
    """Result and reason of one iscsi-test-cu run from its exit status and output."""
    if returncode in (124, 137):  # timeout(1) expired, or had to KILL
        return Result.TIMEOUT, ""
    test_output = output.split(CUNIT_BANNER, 1)[-1]
    if returncode < 0 or returncode >= 128 or "Segmentation fault" in test_output:
        return Result.CRASH, f"exit status {returncode}"
    summary = SUMMARY.search(test_output)
    if summary is None:
        return Result.CRASH, f"no CUnit summary (exit status {returncode})"
    ran, failed = int(summary.group(2)), int(summary.group(4))
    reason_match = REASON.search(test_output)
    if reason_match is None:
        reason_match = FAILED_ASSERT.search(test_output)
    reason = reason_match.group(reason_match.lastindex).strip()[:160] if reason_match else ""
    if failed > 0 or "[FAILED]" in test_output:
        return Result.FAIL, reason
    if ran == 0 or "[SKIPPED]" in test_output:
        return Result.SKIP, reason
    return Result.PASS, ""


def run_one(test: str, url: str, *, mpath_url: str | None = None,
            timeout_s: int = DEFAULT_TIMEOUT_S) -> Outcome:
    # The LU is a scratch disk: allow the destructive and the SANITIZE tests.
    command = ["timeout", "-k", str(KILL_GRACE_S), str(timeout_s), "iscsi-test-cu",
               "--dataloss", "--allow-sanitize", "--normal", "--test", test, url]
    if mpath_url:
        command.append(mpath_url)
    started = time.monotonic()
    try:
        completed = subprocess.run(command, capture_output=True, text=True, errors="replace",
                                   stdin=subprocess.DEVNULL,
                                   timeout=timeout_s + KILL_GRACE_S + 10)
        result, reason = classify(completed.returncode, completed.stdout + completed.stderr)
    except subprocess.TimeoutExpired:
        result, reason = Result.TIMEOUT, "timeout(1) itself did not return"
    return Outcome(test, result, reason, time.monotonic() - started)


@dataclass(frozen=True)
class Lane:
    """One worker's LU: the URL, and the same LU through a second portal (multipath tests)."""
    url: str
    mpath_url: str | None = None


def run_suite(tests: list[str], lanes: list[Lane], *, timeout_s: int = DEFAULT_TIMEOUT_S,
              on_outcome=None) -> list[Outcome]:
    """Run every test once, spread over the lanes (one test at a time per lane)."""
    pending: SimpleQueue[str] = SimpleQueue()
    for test in tests:
        pending.put(test)
    outcomes: list[Outcome] = []
    lock = threading.Lock()  # guards outcomes and the on_outcome callback

    def drain(lane: Lane) -> None:
        while True:
            try:
                test = pending.get_nowait()
            except Empty:
                return
            outcome = run_one(test, lane.url, mpath_url=lane.mpath_url, timeout_s=timeout_s)
            with lock:
                outcomes.append(outcome)
                if on_outcome is not None:
                    on_outcome(outcome)

    with ThreadPoolExecutor(max_workers=len(lanes)) as pool:
        for future in [pool.submit(drain, lane) for lane in lanes]:
            future.result()
    order = {test: index for index, test in enumerate(tests)}
    return sorted(outcomes, key=lambda outcome: order[outcome.test])


def read_expected(path: Path) -> dict[str, Result]:
    """The expected-results file: `test<TAB>RESULT[<TAB>reason]` lines; # starts a comment."""
    expected: dict[str, Result] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        try:
            expected[fields[0]] = Result(fields[1])
        except (IndexError, ValueError):
            raise ValueError(f"{path}:{number}: expected 'test<TAB>RESULT', got {line!r}")
    return expected


def write_expected(path: Path, outcomes: list[Outcome], header: str) -> None:
    lines = [f"# {line}" for line in header.splitlines()]
    lines += [f"{o.test}\t{o.result.value}\t{o.reason}".rstrip("\t") for o in outcomes]
    path.write_text("\n".join(lines) + "\n")


def summary_line(outcomes: list[Outcome]) -> str:
    counts = Counter(outcome.result for outcome in outcomes)
    failed = counts[Result.FAIL] + counts[Result.CRASH] + counts[Result.TIMEOUT]
    return f"{counts[Result.PASS]} passed, {failed} failed, {counts[Result.SKIP]} skipped"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("urls", nargs="+", help="iscsi://host:port/iqn/lun, one per worker")
    parser.add_argument("--only", help="run only the tests matching this regular expression")
    parser.add_argument("--timeout", type=int, default=DEFAULT_TIMEOUT_S)
    parser.add_argument("--out", type=Path, help="write the results as an expected-results file")
    args = parser.parse_args(argv)
    tests = list_tests()
    if args.only:
        tests = [test for test in tests if re.search(args.only, test)]
    started = time.monotonic()
    outcomes = run_suite(
        tests, [Lane(url) for url in args.urls], timeout_s=args.timeout,
        on_outcome=lambda o: print(f"{o.result.value:8} {o.test} ({o.seconds:.1f}s) {o.reason}",
                                   flush=True))
    if args.out:
        write_expected(args.out, outcomes, f"iscsi-test-cu results for {args.urls[0]}")
    print(f"# {len(outcomes)} tests in {time.monotonic() - started:.0f} s")
    print(summary_line(outcomes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
