"""The baselines file: each cell's numbers, the digest of its weights file, and the tolerances.

```json
{"about": "...",
 "tolerance": {"miou": 0.5, "acc": {"relative": 0.01}, "f1": {"absolute": 1.0, "fail_on": "drop"}},
 "cells": {"NAME": {"config": {...}, "metrics": {"miou": 96.3166, ...},
                    "weights": {"sha256": "..."}, "tolerance": {"miou": {"absolute": 2.0}}}}}
```

A cell's name is ``suite.cell_name(config)``; ``weights`` is there for a weights file only; a cell's
``tolerance`` replaces the file's for the metrics it names. A tolerance is a number (points, either way),
or ``{"absolute": points}`` / ``{"relative": fraction of the baseline}`` with ``"fail_on": "change"``
(the default: a move either way beyond it fails) or ``"drop"`` (one-sided: any rise passes, a fall beyond
it fails). The file changes only through ``ssl-bench regress --update``, which keeps the tolerances.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..registry import is_number
from .suite import SuiteRun

DEFAULT_TOLERANCE = {"miou": 0.5, "acc": 0.5, "f1": 0.5}  # absolute, in percentage points, either way
FAIL_ON = ("change", "drop")
TOLERANCE_FORMS = ('0.5 (points, either way), {"absolute": 0.5}, {"relative": 0.02} (2% of the baseline), '
                   'adding "fail_on": "drop" to fail only on a fall')
ABOUT = ("ssl-bench regress baselines: headline metrics (percent) of each cell of a suite, keyed by the cell's "
         "name (its configuration); rewrite only with `ssl-bench regress --update`, which keeps the tolerances")


@dataclass(frozen=True)
class Tolerance:
    amount: float  # percentage points, or a fraction of the baseline when ``relative``
    relative: bool = False
    fail_on: str = "change"  # "change": a move either way beyond ``amount`` fails; "drop": only a fall

    def allowed(self, baseline: float) -> float:
        return self.amount * abs(baseline) if self.relative else self.amount

    def passes(self, baseline: float, now: float) -> bool:
        # the numbers carry 4 decimals: compared at that precision, a move of exactly the tolerance passes
        delta, allowed = round(now - baseline, 4), round(self.allowed(baseline), 4)
        return -delta <= allowed if self.fail_on == "drop" else abs(delta) <= allowed

    def text(self) -> str:
        amount = f"{self.amount * 100:g}%" if self.relative else f"{self.amount:g}"
        return f"drop <= {amount}" if self.fail_on == "drop" else f"+-{amount}"

    @classmethod
    def parse(cls, value, where: str) -> "Tolerance":
        if is_number(value) and value >= 0:
            return cls(float(value))
        if isinstance(value, dict):
            kinds = [key for key in ("absolute", "relative") if key in value]
            amount = value.get(kinds[0]) if len(kinds) == 1 else None
            fail_on = value.get("fail_on", "change")
            if (is_number(amount) and amount >= 0 and fail_on in FAIL_ON
                    and not set(value) - {"absolute", "relative", "fail_on"}):
                return cls(float(amount), kinds[0] == "relative", fail_on)
        raise UserError(f"{where}: {json.dumps(value)} is not a tolerance -- write {TOLERANCE_FORMS}")


@dataclass
class Baselines:
    path: Path
    tolerance: dict  # metric -> tolerance as written (kept as written on --update)
    cells: dict[str, dict]  # name -> {"config", "metrics", optional "weights", optional "tolerance"}

    def tolerance_for(self, name: str, metric: str) -> Tolerance:
        written = {**DEFAULT_TOLERANCE, **self.tolerance, **self.cells.get(name, {}).get("tolerance", {})}[metric]
        return Tolerance.parse(written, f"{self.path}: tolerance of {metric}")

    def sha256(self, name: str) -> str | None:
        return (self.cells.get(name, {}).get("weights") or {}).get("sha256")


def read_baselines(path: Path, missing_ok: bool = False) -> Baselines:
    """The baselines file, checked through before the suite runs (a broken file must not cost a whole suite)."""
    if not path.exists():
        if missing_ok:
            return Baselines(path, {}, {})
        raise UserError(f"no baselines at {path} -- create them with `ssl-bench regress --update` (same options)")
    if not path.is_file():
        raise UserError(f"--baselines {path} is not a file -- give the JSON file the baselines are in")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}) -- restore it from git or rewrite it with "
                        f"`ssl-bench regress --update`") from None
    if isinstance(data, dict) and "cases" in data and "cells" not in data:
        raise UserError(f"{path} is in the first baselines format ('cases': name -> metrics) -- put each case's "
                        f"metrics under cells[NAME]['metrics'] with its 'config', or rewrite it with "
                        f"`ssl-bench regress --update`")
    expected = ('{"tolerance": {metric: tolerance}, "cells": {NAME: {"config": {...}, "metrics": {metric: '
                'number}}}}')
    cells, tolerance = (data.get("cells"), data.get("tolerance", {})) if isinstance(data, dict) else (None, None)
    if not isinstance(cells, dict) or not isinstance(tolerance, dict):
        raise UserError(f"{path} is not an ssl-bench baselines file (expected {expected}) -- restore it from git "
                        f"or rewrite it with `ssl-bench regress --update`")
    for metric, value in tolerance.items():
        Tolerance.parse(value, f"{path}: tolerance of {metric}")
    for name, cell in cells.items():
        where = f"{path}: cell {name}"
        metrics = cell.get("metrics") if isinstance(cell, dict) else None
        if not isinstance(metrics, dict) or not all(is_number(v) for v in metrics.values()) \
                or not isinstance(cell.get("config"), dict):
            raise UserError(f"{where} is not {{\"config\": {{...}}, \"metrics\": {{metric: number}}}} -- restore "
                            f"it from git or rewrite it with `ssl-bench regress --update`")
        weights = cell.get("weights")
        if weights is not None and not (isinstance(weights, dict) and isinstance(weights.get("sha256"), str)):
            raise UserError(f"{where}: weights must be {{\"sha256\": \"...\"}} -- rewrite it with --update")
        if not isinstance(cell.get("tolerance", {}), dict):
            raise UserError(f"{where}: tolerance must map metrics to tolerances ({TOLERANCE_FORMS})")
        for metric, value in cell.get("tolerance", {}).items():
            Tolerance.parse(value, f"{where}: tolerance of {metric}")
    return Baselines(path, tolerance, cells)


def updated(baselines: Baselines, run: SuiteRun, gone: set[str]) -> Baselines:
    """The baselines with every computed cell's numbers and weights digest; cells ``gone`` from the suite
    dropped; cells not run here (an optional grid skipped, not selected by --only) kept as they are; each
    cell's own tolerances kept."""
    cells = {name: cell for name, cell in baselines.cells.items() if name not in gone}
    for name, metrics in run.metrics.items():
        suite_cell = run.cells[name]
        cell = {"config": suite_cell.entry, "metrics": metrics}
        if suite_cell.weights_sha256:
            cell["weights"] = {"sha256": suite_cell.weights_sha256}
        if "tolerance" in cells.get(name, {}):
            cell["tolerance"] = cells[name]["tolerance"]
        cells[name] = cell
    return Baselines(baselines.path, baselines.tolerance or dict(DEFAULT_TOLERANCE), dict(sorted(cells.items())))


def write_baselines(baselines: Baselines) -> None:
    """One line per cell field, so a review of an --update reads as one changed line per changed cell."""
    def compact(value) -> str:
        return json.dumps(value, separators=(", ", ": "))

    def fields(cell: dict) -> str:
        return ",\n".join(f"      {compact(key)}: {compact(value)}" for key, value in cell.items())

    cells = ",\n".join(f"    {compact(name)}: {{\n{fields(cell)}\n    }}" for name, cell in baselines.cells.items())
    text = (f'{{\n  "about": {compact(ABOUT)},\n  "tolerance": {compact(baselines.tolerance)},\n'
            f'  "cells": {{\n{cells}\n  }}\n}}\n')
    json.loads(text)  # the hand-made layout must stay JSON
    baselines.path.parent.mkdir(parents=True, exist_ok=True)
    baselines.path.write_text(text)
