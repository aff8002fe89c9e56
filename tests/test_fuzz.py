"""Damaged input to every reader: a correct result or one UserError line, nothing else (bounded here; the
deeper search is ``ssl-bench fuzz --seconds 600``)."""

import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from ssl_bench.errors import UserError
from ssl_bench.fuzz import Case, Target, fuzz, mutate, run_case
from ssl_bench.fuzz.targets import TARGETS

SECONDS_PER_TARGET = 1.5
MIN_CASES = 5  # slow readers (all the registry files at once) get their cases even past the time


@pytest.fixture(scope="module")
def tallies():
    return {t.target: t for t in fuzz(list(TARGETS.values()), SECONDS_PER_TARGET, seed=0, min_cases=MIN_CASES)}


@pytest.mark.parametrize("name", list(TARGETS))
def test_damaged_input_is_read_correctly_or_refused_in_one_line(tallies, name):
    tally = tallies[name]
    assert tally.cases >= MIN_CASES
    assert not tally.findings, "\n".join(f.line() for f in tally.findings)


# What the harness found (by ssl-bench fuzz), each fixed: the same damage again, case by case.
FOUND = [("masks-potsdam3-mat", 0, 98),  # scipy.io.loadmat: SIGSEGV (the whole process) on a damaged .mat
         ("cache", 0, 10),  # numpy's .npy header parser: tokenize.TokenError, not ValueError
         ("store", 0, 187), ("store", 0, 343),  # a multi-line SQLite message; text that is not UTF-8
         ("masks-camvid", 0, 10),  # a split list naming a missing label: FileNotFoundError in the label stamp
         ("images-folder", 1, 2469), ("masks-camvid", 1, 510),  # PIL: SyntaxError / ValueError, not OSError
         ("masks-voc2012", 1, 667),  # a NUL byte in a split list: ValueError from pathlib
         ("store", 1, 184),  # a row whose configuration lost a key: KeyError in the report
         ("registry-yaml", 0, 50)]  # a backbone's mean of four numbers, accepted


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """``built(target)``: a folder holding the target's inputs, built once for the module."""
    folders = {}

    def get(target: Target) -> Path:
        if target.build not in folders:
            folders[target.build] = tmp_path_factory.mktemp("fuzz-template")
            target.build(folders[target.build])
        return folders[target.build]

    return get


@pytest.mark.parametrize("name, seed, case", FOUND)
def test_what_the_fuzzer_found_stays_fixed(built, tmp_path, name, seed, case):
    outcome, found = run_case(TARGETS[name], built(TARGETS[name]), tmp_path, seed, case)
    assert outcome in ("correct", "refused"), found.line()


def _target(read, correct=lambda result: result == "ok", files=("input.bin",)) -> Target:
    def build(root):
        for name in files:
            (root / name).write_bytes(bytes(range(64)))

    return Target("probe", "a reader under test of the harness itself", build,
                  lambda root: Case([root / f for f in files], read, correct))


def _outcome(target: Target, tmp_path, case_seconds: float = 30.0):
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    (work / "template").mkdir()
    target.build(work / "template")
    return run_case(target, work / "template", work, seed=0, index=0, case_seconds=case_seconds)


def test_the_harness_reports_what_is_not_a_correct_result_or_one_line(tmp_path):
    def raise_(err):
        raise err

    assert _outcome(_target(lambda: "ok"), tmp_path)[0] == "correct"
    assert _outcome(_target(lambda: raise_(UserError("bad input -- fix"))), tmp_path)[0] == "refused"
    outcome, found = _outcome(_target(lambda: raise_(KeyError("meta"))), tmp_path)
    assert outcome == "finding" and found.problem.startswith("KeyError at test_fuzz.py")
    assert "ssl-bench fuzz --target probe --seed 0 --case 0" in found.line()
    assert _outcome(_target(lambda: "a wrong number"), tmp_path)[1].problem == "a result that is not correct was returned"
    started = time.perf_counter()
    outcome, found = _outcome(_target(lambda: time.sleep(30)), tmp_path, case_seconds=0.5)  # a hang
    assert outcome == "finding" and "still running after" in found.problem and time.perf_counter() - started < 10


def test_damage_is_the_same_for_the_same_seed_and_case():
    data = bytes(range(256)) * 4
    draws = [mutate(data, np.random.default_rng([s, 7, c]), text=True) for s, c in ((0, 1), (0, 1), (0, 2), (1, 1))]
    assert draws[0] == draws[1] and draws[0] != draws[2] and draws[0] != draws[3]
    kinds = {mutate(data, np.random.default_rng([0, 7, c]), text=True)[1].split()[-1] for c in range(200)}
    assert len(kinds) >= 5  # flips, truncations, random runs, deletions, repeats, tokens ...
