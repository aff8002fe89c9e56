"""A suite run against its baselines: one check per cell and metric, and the exit status.

Exit status: 0 every metric within its tolerance; 1 drift (a metric beyond its tolerance, a cell without a
baseline, a baseline without a cell, a pinned weights file that changed); 2 could not run (a cell failed; a
bad suite or baselines file is refused before anything runs, with the same status).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .baselines import Baselines, Tolerance
from .suite import METRICS, SuiteCell, SuiteRun

PASS, DRIFT, COULD_NOT_RUN = 0, 1, 2
FAILING = ("drift", "new", "gone", "weights")  # statuses that make a drift; "error" makes could-not-run
LABELS = {"ok": "ok", "drift": "DRIFT", "new": "NEW", "gone": "GONE", "weights": "WEIGHTS", "error": "ERROR",
          "skipped": "skipped"}


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


@dataclass
class Check:
    cell: str
    metric: str
    status: str  # ok | drift | new | gone | weights | error | skipped
    baseline: float | None = None
    now: float | None = None
    tolerance: Tolerance | None = None
    reason: str = ""  # why a cell is skipped, could not run, or was refused its weights

    @property
    def delta(self) -> float | None:
        return None if self.baseline is None or self.now is None else round(self.now - self.baseline, 4)

    def delta_text(self) -> str:
        return "-" if self.delta is None else f"{self.delta if round(self.delta, 2) else 0.0:+.2f}"  # no "-0.00"

    def message(self) -> str:
        """One line saying what happened to this metric of this cell (the JUnit failure message)."""
        if self.status in ("ok", "drift"):
            verdict = "within" if self.status == "ok" else "beyond"
            return (f"{self.metric} {_number(self.now)}, baseline {_number(self.baseline)}: {self.delta_text()} "
                    f"({verdict} tolerance {self.tolerance.text()})")
        if self.status == "new":
            return f"new cell: {self.metric} {_number(self.now)}, no baseline -- `--update` adds it"
        if self.status == "gone":
            return (f"gone: baseline {self.metric} {_number(self.baseline)}, but the suite has no such cell -- "
                    f"`--update` drops it")
        return self.reason


@dataclass
class Report:
    suite: Path
    baselines: Path
    checks: list[Check]
    notes: list[str]  # what a reader should know besides the checks (weights files changed, grids skipped)
    seconds: float

    def with_status(self, *statuses: str) -> list[Check]:
        return [check for check in self.checks if check.status in statuses]

    def cells(self, *statuses: str) -> list[str]:
        return list(dict.fromkeys(check.cell for check in self.with_status(*statuses)))

    @property
    def exit_status(self) -> int:
        if self.with_status("error"):
            return COULD_NOT_RUN
        return DRIFT if self.with_status(*FAILING) else PASS

    def verdict(self) -> str:
        """One line: what failed, or that everything passed."""
        compared = self.with_status("ok", "drift")
        parts = []
        if self.with_status("error"):
            parts.append(f"{_count(self.cells('error'), 'cell')} could not run")
        if self.with_status("drift"):
            parts.append(f"{len(self.with_status('drift'))} of {len(compared)} metrics drifted")
        for status, what in (("new", "new cell"), ("gone", "gone cell"), ("weights", "cell on other weights")):
            if self.with_status(status):
                parts.append(_count(self.cells(status), what))
        if not parts:
            parts.append(f"all {len(compared)} metrics within tolerance")
        if self.with_status("skipped"):
            parts.append(f"{_count(self.cells('skipped'), 'cell')} skipped")
        return ", ".join(parts)

    def gone(self) -> set[str]:
        return set(self.cells("gone"))


def _count(items: list, what: str) -> str:
    return f"{len(items)} {what}{'' if len(items) == 1 else 's'}"


def weights_refusal(baselines: Baselines, cell: SuiteCell) -> str | None:
    """Why a cell whose baselines hold for exactly one weights file is not computed: the file now differs."""
    pinned = baselines.sha256(cell.name)
    if cell.weights_match != "exact" or pinned is None or cell.weights_sha256 == pinned:
        return None
    return (f"weights {cell.entry.get('weights', 'found by the usual search')} now hold sha256 "
            f"{(cell.weights_sha256 or 'none')[:12]}..., the baselines were measured on exactly {pinned[:12]}... "
            f"(weights_match: exact) -- restore that file, or accept this one with --update")


def compare(baselines: Baselines, run: SuiteRun, suite: Path, only: str | None = None) -> Report:
    """Every cell run (or refused, or failed) against its baseline, then every baseline without a cell: skipped
    when an optional grid that is not run here would have it, gone otherwise (``only`` limits both)."""
    checks: list[Check] = []
    notes = [grid.reason for grid in run.skipped] + run.notes
    for name, cell in sorted(run.cells.items()):
        base = baselines.cells.get(name, {}).get("metrics", {})
        now = run.metrics.get(name, {})
        for metric in METRICS:
            tolerance = baselines.tolerance_for(name, metric)
            if name in run.refused:
                checks.append(Check(name, metric, "weights", base.get(metric), None, tolerance, run.refused[name]))
            elif name in run.failed:
                checks.append(Check(name, metric, "error", base.get(metric), None, tolerance,
                                    f"could not run: {run.failed[name]}"))
            elif metric not in base:
                checks.append(Check(name, metric, "new", None, now[metric]))
            else:
                status = "ok" if tolerance.passes(base[metric], now[metric]) else "drift"
                checks.append(Check(name, metric, status, base[metric], now[metric], tolerance))
        was = baselines.sha256(name)
        if name in run.metrics and was and cell.weights_sha256 != was:
            notes.append(f"{name}: weights {cell.entry.get('weights', '')} changed since the baselines (sha256 "
                         f"{was[:12]}... -> {(cell.weights_sha256 or 'none')[:12]}...); compared anyway "
                         f"(weights_match: {cell.weights_match})")
    for name in sorted(set(baselines.cells) - set(run.cells)):
        if only is not None and only not in name:
            continue
        config, base = baselines.cells[name]["config"], baselines.cells[name]["metrics"]
        grid = next((g for g in run.skipped if g.covers(config.get("backbone"), config.get("task"),
                                                            config.get("dataset"))), None)
        for metric in METRICS:
            if grid is not None:
                checks.append(Check(name, metric, "skipped", base.get(metric), reason=grid.reason))
            else:
                checks.append(Check(name, metric, "gone", base.get(metric)))
    return Report(suite, baselines.path, checks, notes, run.seconds)
