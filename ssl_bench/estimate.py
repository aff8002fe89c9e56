"""How long a sweep plan will take here, from what was measured before.

A cell is priced at the seconds per image its closest stored runs took (labels, task and evaluation:
the same task, backbone and K first, then the same task and backbone, then the same task), times its
images; an extraction at the seconds per image of the last extraction pass of the same backbone in the
feature cache (each entry records it), times the images still to extract. Nothing measured: no guess.
The figure is as good as the machine's load is steady (a shared machine's is not).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field

from .features import TIMING_FILE
from .integrity import Damaged, read_checked_json
from .registry import counted
from .sweep import Plan

CELL_STAGES = ("labels", "task", "evaluate")  # an extraction is priced on its own, once per cache entry


@dataclass
class Estimate:
    seconds: float = 0.0
    cells_priced: int = 0
    cells_unpriced: int = 0
    extractions_priced: int = 0
    extractions_unpriced: int = 0
    unpriced_tasks: set[str] = field(default_factory=set)

    def text(self) -> str:
        if not (self.cells_priced or self.extractions_priced):
            return ("estimated time: unknown (no stored run or cached extraction of these tasks and backbones to "
                    "go by yet)")
        parts = [f"{counted(self.cells_priced, 'cell')} from stored runs",
                 f"{counted(self.extractions_priced, 'extraction')} from cached timings"]
        missing = [counted(n, what) for n, what in ((self.cells_unpriced, "cell"),
                                                    (self.extractions_unpriced, "extraction")) if n]
        tail = f"; not counted: {', '.join(missing)} with nothing measured to go by" if missing else ""
        return f"estimated time: {_about(self.seconds)} ({', '.join(parts)}{tail})"


def _about(seconds: float) -> str:
    return duration(seconds) if seconds < 1 else f"about {duration(seconds)}"


def duration(seconds: float) -> str:
    if seconds < 1:
        return "under a second"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _per_image(record: dict, stages) -> float | None:
    images = record["config"].get("images") or 0
    seconds = sum(record["timings"].get(stage, 0.0) for stage in stages)
    return seconds / images if images else None


def _cell_rates(records: list[dict]) -> dict[tuple, list[float]]:
    """Seconds per image of stored runs, under three keys per run, most specific first."""
    rates: dict[tuple, list[float]] = {}
    for r in records:
        rate = _per_image(r, CELL_STAGES)
        if rate is None:
            continue
        params = json.dumps(r["config"].get("params"), sort_keys=True)
        for key in (("task+backbone+k", r["task"], params, r["backbone"], r["k"]),
                    ("task+backbone", r["task"], params, r["backbone"]), ("task", r["task"], params)):
            rates.setdefault(key, []).append(rate)
    return rates


def _extraction_rates(cache_root) -> dict[str, list[float]]:
    """Seconds per image of the last extraction pass of every cache entry, per backbone."""
    rates: dict[str, list[float]] = {}
    for path in cache_root.glob(f"*/*/*/{TIMING_FILE}"):
        try:
            timing = read_checked_json(path)
            rates.setdefault(path.parts[-4], []).append(timing["seconds"] / timing["images"])
        except (OSError, ValueError, KeyError, ZeroDivisionError, TypeError, Damaged):
            continue
    return rates


def estimate(plan: Plan, records: list[dict], cache_root) -> Estimate:
    found = Estimate()
    rates = _cell_rates(records)
    for cell in plan.todo:
        c = cell.run.config
        params = json.dumps(c.get("params"), sort_keys=True)
        keys = (("task+backbone+k", c["task"], params, c["backbone"], c["k"]),
                ("task+backbone", c["task"], params, c["backbone"]), ("task", c["task"], params))
        rate = next((statistics.median(rates[key]) for key in keys if key in rates), None)
        if rate is None:
            found.cells_unpriced += 1
            found.unpriced_tasks.add(c["task"])
        else:
            found.cells_priced += 1
            found.seconds += rate * c["images"]
    extraction = _extraction_rates(cache_root)
    for entry in plan.extractions_needed:
        rate = extraction.get(entry.run.spec.name)
        if rate is None:
            found.extractions_unpriced += 1
        else:
            found.extractions_priced += 1
            found.seconds += statistics.median(rate) * (len(entry.run.dataset) - entry.done)
    return found
