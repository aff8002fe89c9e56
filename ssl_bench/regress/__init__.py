"""``ssl-bench regress``: rerun a suite of cells and compare each headline metric with its baselines.

A suite is any sweep file (``suite.py``); its baselines file (``baselines.py``) holds each cell's numbers
under the cell's readable name, the digest of its weights file, and tolerances per metric and per cell;
``verdict.py`` compares and gives the exit status; ``outputs.py`` writes text, Markdown and JUnit. ssl-bench
guards its own code the same way: ``results/regress/suite.yaml`` against ``results/regress/baselines.json``
(what ``ssl-bench regress`` runs without ``--suite``, and ``.ci/run`` after the tests).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Mapping

from ..data.shared import shared_data_dir
from .baselines import Baselines, Tolerance, read_baselines, updated, write_baselines
from .suite import METRICS, Suite, SuiteCell, SuiteRun, cell_entry, cell_name, read_suite, run_suite
from .verdict import Check, Report, compare, weights_refusal

_CHECKOUT = Path(__file__).resolve().parents[2]
PROJECT_SUITE = _CHECKOUT / "results" / "regress" / "suite.yaml"  # ssl-bench's own suite, beside its baselines


def default_baselines(suite: Path) -> Path:
    """A suite's baselines when --baselines is not given: ``baselines.json`` beside the suite file."""
    return suite.parent / "baselines.json"


def suite_environment(suite: Path) -> Mapping[str, str]:
    """The variables a suite's data roots may name: the environment; for ssl-bench's own suite,
    ``$SSL_BENCH_SHARED_DATA`` defaults to the shared data beside the checkout (as in the tests)."""
    if Path(suite).resolve() != PROJECT_SUITE or "SSL_BENCH_SHARED_DATA" in os.environ:
        return os.environ
    return {**os.environ, "SSL_BENCH_SHARED_DATA": str(shared_data_dir() or _CHECKOUT.parent / "shared" / "data")}


def check(suite_path: Path, baselines_path: Path, only: str | None = None, device: str = "cpu",
          on_cell: Callable[[str, str], None] = lambda name, status: None) -> Report:
    """Run the suite and compare it with its baselines (both files are read before anything runs)."""
    suite = read_suite(suite_path, suite_environment(suite_path))
    baselines = suite.expected or read_baselines(baselines_path)
    run = run_suite(suite, only, lambda cell: weights_refusal(baselines, cell), device, on_cell)
    _check_selection(run, only, baselines)
    return compare(baselines, run, suite_path, only)


def update(suite_path: Path, baselines_path: Path, only: str | None = None, device: str = "cpu",
           on_cell: Callable[[str, str], None] = lambda name, status: None) -> tuple[Report, Baselines]:
    """Run the suite and rewrite its baselines with what it measured; the report says what changed (against
    the old baselines). Nothing is written when a cell could not run (exit status 2 then)."""
    baselines = read_baselines(baselines_path, missing_ok=True)
    suite = read_suite(suite_path, suite_environment(suite_path))
    run = run_suite(suite, only, device=device, on_cell=on_cell)
    _check_selection(run, only, baselines)
    report = compare(baselines, run, suite_path, only)
    new = updated(baselines, run, report.gone())
    if report.exit_status != 2:
        write_baselines(new)
    return report, new


def _check_selection(run: SuiteRun, only: str | None, baselines: Baselines) -> None:
    from ..errors import UserError

    if run.cells:
        return
    if only is not None:
        raise UserError(f"no cell of the suite has {only!r} in its name -- see the names in {baselines.path}")
    raise UserError(f"the suite has no cell to run here ({'; '.join(g.reason for g in run.skipped) or 'no grid'})"
                    f" -- give its data, or a suite with cells")


__all__ = ["Baselines", "Check", "METRICS", "PROJECT_SUITE", "Report", "Suite", "SuiteCell", "SuiteRun", "Tolerance",
           "cell_entry", "cell_name", "check", "compare", "default_baselines", "read_baselines", "read_suite",
           "run_suite", "suite_environment", "update", "updated", "weights_refusal", "write_baselines"]
