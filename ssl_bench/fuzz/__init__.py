"""``ssl-bench fuzz``: random bytes, truncations and bit flips fed to every reader ssl-bench has.

Each target (``targets.py``) builds a small valid input once (images, masks of each dataset format,
checkpoints, safetensors, cache files, kept values, panel samples, sweep and registry YAML, the store),
then for each case copies it, damages one of its files and reads it back through ssl-bench's own
reader. The only acceptable outcomes are a correct result (the target says what correct is: for
verified cache files, exactly the original data) or one ``UserError`` line. Anything else, an
exception of another type, a multi-line error, a wrong result or a case that runs past its time
limit, is a finding, reported with the seed and case number that reproduce it.

Cases are drawn from ``numpy.random.default_rng([seed, crc32(target), case])``: the same seed and
case number give the same damage on any machine. The test suite runs each target for a few seconds;
``ssl-bench fuzz --seconds 600`` searches longer.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
import time
import traceback
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..errors import UserError

TEXT_TOKENS = [b"&a", b"*a", b"!!python/object/apply:os.system ['true']", b"!!binary", b"[", b"]", b"{", b"}",
               b": ", b"- ", b",", b"#", b"'", b'"', b"\n", b"\t", b"~", b"null", b"true", b"-1", b"0", b"1e309",
               b"nan", b"9223372036854775808", b"2C", b"3.5", b"\xff", b"\x00", b"<<: *a", b"? ", b"|", b">"]


@dataclass
class Case:
    """A prepared input: ``files`` it may damage, ``read`` (the reader under test, returning a result) and
    ``correct(result)``, which says whether a result read back from damaged files may be used."""

    files: list[Path]
    read: Callable[[], object]
    correct: Callable[[object], bool]
    text: bool = False  # the files are text (YAML, JSON): mutate tokens as well as bytes


@dataclass
class Target:
    name: str
    describe: str
    build: Callable[[Path], None]  # write the valid inputs into an empty folder, once
    case: Callable[[Path], Case]  # the reader over a copy of that folder


@dataclass
class Finding:
    target: str
    seed: int
    case: int
    file: str
    damage: str
    problem: str

    def line(self) -> str:
        return (f"{self.target} (seed {self.seed}, case {self.case}, {self.file}, {self.damage}): {self.problem} -- "
                f"reproduce: ssl-bench fuzz --target {self.target} --seed {self.seed} --case {self.case}")


@dataclass
class Tally:
    target: str
    cases: int = 0
    correct: int = 0
    refused: int = 0  # one UserError line
    seconds: float = 0.0
    findings: list[Finding] = field(default_factory=list)


def mutate(data: bytes, rng: np.random.Generator, text: bool) -> tuple[bytes, str]:
    """``data`` damaged one way, and the way in words."""
    n = len(data)
    op = int(rng.integers(8 if text else 6))
    if op == 0 or n == 0:
        flips = int(rng.integers(1, 9))
        out = bytearray(data or b"\x00")
        for position in rng.integers(0, len(out), flips):
            out[position] ^= 1 << int(rng.integers(8))
        return bytes(out), f"{flips} bit flip(s)"
    if op == 1:
        cut = int(rng.integers(0, n))
        return data[:cut], f"truncated to {cut} of {n} bytes"
    start = int(rng.integers(0, n))
    length = int(min(n - start, rng.integers(1, 65)))
    if op == 2:
        return data[:start] + rng.bytes(length) + data[start + length:], f"{length} random bytes at {start}"
    if op == 3:
        return data[:start] + data[start + length:], f"{length} bytes deleted at {start}"
    if op == 4:
        return data[:start] + data[start:start + length] * int(rng.integers(2, 5)) + data[start + length:], \
            f"{length} bytes repeated at {start}"
    if op == 5:
        size = int(rng.integers(0, 2 * n + 2))
        return rng.bytes(size), f"replaced by {size} random bytes"
    token = TEXT_TOKENS[int(rng.integers(len(TEXT_TOKENS)))]
    if op == 6:
        return data[:start] + token + data[start:], f"{token!r} inserted at {start}"
    return data[:start] + token + data[start + length:], f"{length} bytes replaced by {token!r} at {start}"


class CaseTimeout(Exception):
    pass


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise CaseTimeout in this (main) thread after ``seconds``: a reader that blocks is a finding too."""
    def expire(signum, frame):
        raise CaseTimeout(f"still running after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _problem(err: BaseException) -> str:
    frame = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
    where = f" at {Path(frame.filename).name}:{frame.lineno}" if frame else ""
    text = (str(err).strip().splitlines() or [""])[0][:200]
    return f"{type(err).__name__}{where}: {text}"


def run_case(target: Target, template: Path, work: Path, seed: int, index: int | None,
             case_seconds: float = 30.0) -> tuple[str, Finding | None]:
    """One damaged input through the target's reader: ("correct" | "refused" | "finding", the finding).
    ``index`` None: the input as built, undamaged (which must read correctly)."""
    rng = np.random.default_rng([seed, zlib.crc32(target.name.encode()), index or 0])
    folder = work / f"case-{index}"
    shutil.copytree(template, folder, symlinks=True)
    try:
        case = target.case(folder)
        victim = case.files[int(rng.integers(len(case.files)))]
        damaged, how = mutate(victim.read_bytes(), rng, case.text) if index is not None else (victim.read_bytes(),
                                                                                               "undamaged")
        victim.write_bytes(damaged)

        def finding(problem: str) -> tuple[str, Finding]:
            return "finding", Finding(target.name, seed, index, str(victim.relative_to(folder)), how, problem)

        try:
            with warnings.catch_warnings(), time_limit(case_seconds):
                warnings.simplefilter("ignore")  # warnings are one line each; what counts is the outcome
                result = case.read()
        except UserError as err:
            return ("refused", None) if "\n" not in str(err) else finding(f"a UserError of several lines: {err!s:.200}")
        except (Exception, CaseTimeout) as err:  # noqa: BLE001 -- anything else is what we are looking for
            return finding(_problem(err))
        return ("correct", None) if case.correct(result) else finding("a result that is not correct was returned")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def fuzz(targets: list[Target], seconds: float, seed: int = 0, max_cases: int | None = None,
         only_case: int | None = None, min_cases: int = 1,
         progress: Callable[[Tally], None] = lambda tally: None) -> list[Tally]:
    """Each target for ``seconds`` but at least ``min_cases`` cases (or ``max_cases``, or just case ``only_case``)
    from ``seed``."""
    from ..ops import set_threads

    set_threads(1)  # small inputs: threads only cost time
    tallies = []
    built: dict[Callable, Path] = {}  # targets that read the same inputs share one build
    with tempfile.TemporaryDirectory(prefix="ssl-bench-fuzz-") as tmp:
        for target in targets:
            template = Path(tmp) / target.name / "template"
            if target.build in built:
                shutil.copytree(built[target.build], template, symlinks=True)
            else:
                template.mkdir(parents=True)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    target.build(template)
                built[target.build] = template
            outcome, found = run_case(target, template, Path(tmp) / target.name, seed, None)  # also warms imports
            if outcome != "correct":
                raise RuntimeError(f"fuzz target {target.name}: its undamaged input does not read correctly "
                                   f"({found.problem if found else outcome})")
            tally, start = Tally(target.name), time.perf_counter()
            cases = [only_case] if only_case is not None else range(max_cases or 2**62)
            for index in cases:
                if only_case is None and time.perf_counter() - start > seconds and tally.cases >= min_cases:
                    break
                outcome, found = run_case(target, template, Path(tmp) / target.name, seed, index)
                tally.cases += 1
                tally.correct += outcome == "correct"
                tally.refused += outcome == "refused"
                if found:
                    tally.findings.append(found)
            tally.seconds = time.perf_counter() - start
            tallies.append(tally)
            progress(tally)
    return tallies
