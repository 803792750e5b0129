"""libiscsi's conformance suite (iscsi-test-cu) against a fresh target, as a regression gate.

Every test runs in its own process (conformance_runner.py), on the LU variant it applies to
(`VARIANT_OF_FAMILY`; a thin-provisioned disk otherwise), always with a second path through
another portal group (`--mpath`) and with SANITIZE allowed.  The results are compared with
conformance-expected.tsv beside this file:
  * a test expected to PASS that does not PASS fails this test (a regression);
  * any CRASH or TIMEOUT fails it, and so does any SKIP saying a command is not implemented
    (whatever the file says);
  * a test that newly passes, or that the file does not know, is printed as a note: update the
    file with `UPDATE_CONFORMANCE=1 pytest tests/interop/test_conformance.py`.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.interop import conformance_runner as runner
from tests.interop.conftest import MIB, LuSpec, require_tool, start_target, stop_target

EXPECTED_FILE = Path(__file__).with_name("conformance-expected.tsv")
UPDATE_ENV = "UPDATE_CONFORMANCE"
# About 230 tests of 0.1-3 s each (~2 min); the limit only guards against a wedged target.
SUITE_TIMEOUT_S = 1200
NOT_IMPLEMENTED = re.compile(r"not implemented", re.IGNORECASE)
# Tests whose own program may crash whatever the target does; a CRASH of these is a FAIL.
# LUNResetSimpleAsync (libiscsi 1.19) fails an assertion before its callbacks ran and
# returns, and the callbacks later write into its dead stack frame during the suite's
# clean-up: glibc then aborts on a corrupted heap in about one run in five.
CRASH_PRONE = frozenset({"ALL.iSCSITMF.LUNResetSimpleAsync"})

# Every LU is reached through portal group 1 (127.0.0.1) and portal group 3 ([::1]): two
# target ports, so each test's second session is a real second path.
CONFORMANCE_UNITS = (
    LuSpec("thin", 128 * MIB, also_through=(3,),
           extra=("AuthMethod None", "LUN0 Option Provisioning Thin")),
    # 4 KiB physical blocks for the tests that skip unless LOGICAL BLOCKS PER PHYSICAL BLOCK > 1
    # (GetLBAStatus.UnmapSingle, in turn, is only self-consistent with one block per block).
    LuSpec("thin4k", 64 * MIB, also_through=(3,),
           extra=("AuthMethod None", "LUN0 Option Provisioning Thin",
                  "LUN0 Option PhysicalBlockSize 4096")),
    LuSpec("removable", 64 * MIB, also_through=(3,),
           extra=("AuthMethod None", "LUN0 Option Removable Yes")),
    LuSpec("readonly", 64 * MIB, also_through=(3,), extra=("AuthMethod None", "ReadOnly Yes")),
)
DEFAULT_VARIANT = "thin"
VARIANT_OF_FAMILY = {
    "ALL.WriteSame10.UnmapUnaligned": "thin4k",
    "ALL.WriteSame16.UnmapUnaligned": "thin4k",
    "ALL.WriteSame10.InvalidDataOutSize": "thin4k",
    "ALL.WriteSame16.InvalidDataOutSize": "thin4k",
    "ALL.CompareAndWrite.InvalidDataOutSize": "thin4k",
    "ALL.ReadOnly.": "readonly",
    "ALL.PreventAllow.": "removable",
    "ALL.StartStopUnit.": "removable",
}


def variant_of(test: str) -> str:
    return next((variant for family, variant in VARIANT_OF_FAMILY.items()
                 if test.startswith(family)), DEFAULT_VARIANT)


def run_conformance(tmp_path: Path) -> list[runner.Outcome]:
    require_tool("iscsi-test-cu")
    require_tool("timeout")
    tests = runner.list_tests()
    assert len(tests) > 100, f"iscsi-test-cu --list gave only {len(tests)} tests"
    target = start_target(tmp_path / "target", CONFORMANCE_UNITS)
    try:
        layout = target.layout
        lanes = {
            unit.name: runner.Lane(
                url=f"iscsi://127.0.0.1:{layout.port}/{unit.iqn}/0",
                mpath_url=f"iscsi://[::1]:{layout.chap_port}/{unit.iqn}/0")
            for unit in CONFORMANCE_UNITS
        }
        groups: dict[str, list[str]] = {name: [] for name in lanes}
        for test in tests:
            groups[variant_of(test)].append(test)
        outcomes = [outcome for name, chosen in groups.items()
                    for outcome in runner.run_suite(chosen, [lanes[name]])]
    finally:
        stop_target(target)
    order = {test: index for index, test in enumerate(tests)}
    return sorted(outcomes, key=lambda outcome: order[outcome.test])


def compare(outcomes: list[runner.Outcome], expected: dict[str, runner.Result],
            ) -> tuple[list[str], list[str]]:
    """(failures, notes) of this run against the expected results."""
    failures, notes = [], []
    for outcome in outcomes:
        was = expected.get(outcome.test)
        now = outcome.result
        if now is runner.Result.CRASH and outcome.test in CRASH_PRONE:
            now = runner.Result.FAIL
        line = f"{outcome.test}: expected {was.value if was else 'nothing'}, got {now.value}"
        detail = f"{line} {outcome.reason}".rstrip()
        if now in (runner.Result.CRASH, runner.Result.TIMEOUT):
            failures.append(detail)
        elif now is runner.Result.SKIP and NOT_IMPLEMENTED.search(outcome.reason):
            failures.append(detail)
        elif was is runner.Result.PASS and now is not runner.Result.PASS:
            failures.append(detail)
        elif was is None or (now is runner.Result.PASS and was is not runner.Result.PASS):
            notes.append(detail)
    ran = {outcome.test for outcome in outcomes}
    notes += [f"{test}: in the expected file but no longer in the suite"
              for test in expected if test not in ran]
    return failures, notes


@pytest.mark.interop
@pytest.mark.slow
@pytest.mark.timeout(SUITE_TIMEOUT_S)
def test_conformance_suite_has_no_regression(tmp_path):
    outcomes = run_conformance(tmp_path)
    summary = runner.summary_line(outcomes)
    print(f"\niscsi-test-cu: {summary}")
    if os.environ.get(UPDATE_ENV) == "1":
        runner.write_expected(
            EXPECTED_FILE, outcomes,
            "iscsi-test-cu (libiscsi) results of the Python target, one test per process.\n"
            "Regenerate: UPDATE_CONFORMANCE=1 pytest tests/interop/test_conformance.py\n"
            f"Last run: {summary}")
        print(f"rewrote {EXPECTED_FILE}")
        expected = {outcome.test: outcome.result for outcome in outcomes}
    else:
        expected = runner.read_expected(EXPECTED_FILE)
    failures, notes = compare(outcomes, expected)
    for note in notes:
        print(f"NOTE (update {EXPECTED_FILE.name} with {UPDATE_ENV}=1): {note}")
    assert not failures, "conformance regressions:\n" + "\n".join(failures)


# -- the comparison rules themselves ------------------------------------------------------

def outcome(test: str, result: runner.Result, reason: str = "") -> runner.Outcome:
    return runner.Outcome(test, result, reason, 0.1)


def test_compare_flags_a_lost_pass_and_any_crash_or_timeout():
    PASS, FAIL, SKIP = runner.Result.PASS, runner.Result.FAIL, runner.Result.SKIP
    expected = {"A": PASS, "B": FAIL, "C": SKIP, "D": FAIL, "E": PASS, "gone": PASS}
    outcomes = [outcome("A", FAIL), outcome("B", runner.Result.CRASH), outcome("C", PASS),
                outcome("D", runner.Result.TIMEOUT), outcome("E", PASS), outcome("new", SKIP)]
    failures, notes = compare(outcomes, expected)
    assert [line.split(":")[0] for line in failures] == ["A", "B", "D"]
    assert [line.split(":")[0] for line in notes] == ["C", "new", "gone"]


def test_compare_counts_a_crash_of_a_crash_prone_test_as_its_failure():
    FAIL, CRASH = runner.Result.FAIL, runner.Result.CRASH
    prone = next(iter(CRASH_PRONE))
    failures, _ = compare([outcome(prone, CRASH), outcome("Other", CRASH)],
                          {prone: FAIL, "Other": FAIL})
    assert [line.split(":")[0] for line in failures] == ["Other"]
    failures, _ = compare([outcome(prone, CRASH)], {prone: runner.Result.PASS})
    assert failures, "a crash is still a regression where a PASS was expected"


def test_compare_refuses_a_skip_for_a_missing_command_even_when_expected():
    SKIP = runner.Result.SKIP
    expected = {"X": SKIP, "Y": SKIP}
    outcomes = [outcome("X", SKIP, "SANITIZE is not implemented."),
                outcome("Y", SKIP, "Logical unit is not removable. Skipping test.")]
    failures, _ = compare(outcomes, expected)
    assert [line.split(":")[0] for line in failures] == ["X"]


def test_each_family_runs_on_the_variant_it_applies_to():
    assert variant_of("ALL.ReadOnly.WriteSame10") == "readonly"
    assert variant_of("ALL.PreventAllow.Eject") == "removable"
    assert variant_of("ALL.StartStopUnit.Simple") == "removable"
    assert variant_of("ALL.Unmap.Simple") == "thin"
    assert variant_of("ALL.WriteSame16.UnmapUnaligned") == "thin4k"
    assert {unit.name for unit in CONFORMANCE_UNITS} == {"thin", "thin4k", "removable", "readonly"}


def test_classify_reads_the_cunit_summary():
    banner = "probe output FAILED\n http://cunit.sourceforge.net/\n"
    passed = banner + "tests      1      1      1      0        0\n"
    failed = banner + ("Suite X, Test Y had failures:\n    1. t.c:10  - CU_ASSERT(x)\n"
                       "tests      1      1      0      1        0\n")
    skipped = banner + "[SKIPPED] not implemented\ntests      1      1      1      0        0\n"
    assert runner.classify(0, passed) == (runner.Result.PASS, "")
    assert runner.classify(0, failed) == (runner.Result.FAIL, "t.c:10  - CU_ASSERT(x)")
    assert runner.classify(0, skipped) == (runner.Result.SKIP, "not implemented")
    assert runner.classify(124, passed)[0] is runner.Result.TIMEOUT
    assert runner.classify(-11, passed)[0] is runner.Result.CRASH
    assert runner.classify(0, banner)[0] is runner.Result.CRASH


def test_expected_file_is_well_formed():
    expected = runner.read_expected(EXPECTED_FILE)
    assert len(expected) > 100
    assert sum(result is runner.Result.PASS for result in expected.values()) > 100
