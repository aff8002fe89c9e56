"""Paper value beside ours: read each paper cell's metric from the stored runs, compare, and tabulate.

A cell is *compared* only when ours is a result: measured on the paper's split with all of its images,
with trained weights, under a protocol ssl-bench can run as the paper did. Everything else is listed
with the reason it is left out of the verdict (random weights, a subset, a protocol setting not
available yet, a method or task ssl-bench does not have, a value the runs did not store).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..data import DATASETS
from ..report.tables import Cell, Column, Table, _mean_std
from .recipe import PaperCell, Recipe

WITHIN, OUTSIDE = "yes", "NO"


def metric_value(record: dict, metric: str, stream: str, view: str) -> tuple[float | None, str | None]:
    """(value, None) of ``metric`` in a stored run, or (None, why it is not there)."""
    if metric.startswith("stats."):
        value = record.get("stats") or {}
        for part in metric.split(".")[1:]:
            if not isinstance(value, dict) or part not in value:
                return None, f"the run stored no {metric}"
            value = value[part]
        return (float(value), None) if isinstance(value, (int, float)) and not isinstance(value, bool) else \
            (None, f"{metric} is not a number")
    name, _, split = stream.partition("@")
    key = f"{name}@{split or record['split']}"
    scores = (record.get("metrics") or {}).get(key)
    if scores is None:
        return None, f"the run stored no stream {key}"
    if metric in ("miou", "acc", "f1"):
        value = (scores.get("labelled") or {}).get(metric) if view == "labelled" else scores.get(metric)
        return (None, f"no {view} {metric} in {key}") if value is None else (float(value), None)
    if view == "labelled":
        return None, f"{metric} has no labelled-pixels view (per-class IoU is stored for the headline only)"
    ious = scores.get("per_class_iou") or []
    per_class = re.fullmatch(r"iou\[(.+)\]", metric)
    if per_class:
        names = list(getattr(DATASETS.get(record["dataset"]), "class_names", []) or [])
        if per_class.group(1) not in names or names.index(per_class.group(1)) >= len(ious):
            return None, f"dataset {record['dataset']} has no class {per_class.group(1)!r}"
        value = ious[names.index(per_class.group(1))]
        return (None, f"class {per_class.group(1)!r} is absent from the ground truth") if value is None else \
            (float(value), None)
    kind, op, threshold = re.fullmatch(r"(classes|miou_of_classes)_iou(>=|>)(.+)", metric).groups()
    chosen = [v for v in ious if v is not None and (v >= float(threshold) if op == ">=" else v > float(threshold))]
    if kind == "classes":
        return float(len(chosen)), None
    return (float(sum(chosen) / len(chosen)), None) if chosen else (None, f"no class has IoU {op} {threshold}")


@dataclass
class Observation:
    """What was found for one paper cell: the stored runs of its seeds, or why it was not measured."""

    records: list[dict] = field(default_factory=list)
    missing_seeds: int = 0
    not_run: str | None = None  # not runnable / not selected / no data
    excluded: list[str] = field(default_factory=list)  # measured, but not a result to compare (random, subset ...)


@dataclass
class Outcome:
    cell: PaperCell
    values: list[float]
    status: str  # WITHIN, OUTSIDE, or "not compared: ..." / "not run: ..." / "not measured: ..."
    random: bool = False
    protocol: str = ""

    @property
    def mean(self) -> float | None:
        return sum(self.values) / len(self.values) if self.values else None

    @property
    def compared(self) -> bool:
        return self.status in (WITHIN, OUTSIDE)


def protocol_text(record: dict, view: str) -> str:
    """The protocol a stored number was measured under, as the table prints it."""
    p = dict(record["config"].get("protocol") or {})
    geometry = f"{p.pop('resize', '?')} px, {'centre crop' if p.pop('crop', 'center') == 'center' else 'no crop'}"
    for key in ("image_interp", "label_interp"):
        p.pop(key, None)
    matching = sorted({s.get("matching") for s in (record.get("metrics") or {}).values() if isinstance(s, dict)} - {None})
    parts = [geometry, *(f"{k} {v}" for k, v in sorted(p.items())), "/".join(matching) or "?"]
    parts.append("labelled pixels" if view == "labelled" else "all pixels")
    return "; ".join(parts)


def outcome(cell: PaperCell, seen: Observation) -> Outcome:
    if seen.not_run:
        return Outcome(cell, [], seen.not_run)
    values, reasons = [], []
    for record in seen.records:
        value, why = metric_value(record, cell.measure.metric, cell.measure.stream, cell.measure.view)
        if value is None:
            reasons.append(why)
        else:
            values.append(value)
    random = any(r["random_weights"] for r in seen.records)
    protocol = protocol_text(seen.records[0], cell.measure.view) if seen.records else ""
    if not values:
        why = reasons[0] if reasons else ("no stored run" + (f" ({seen.missing_seeds} seed(s) failed or not run)"
                                                             if seen.missing_seeds else ""))
        return Outcome(cell, [], f"not measured: {why}", random, protocol)
    if random:
        return Outcome(cell, values, "not compared: random weights", True, protocol)
    if seen.excluded:
        return Outcome(cell, values, "not compared: " + "; ".join(seen.excluded), False, protocol)
    mean = sum(values) / len(values)
    within = abs(mean - cell.value) <= cell.tolerance.limit(cell.value) + 1e-9
    return Outcome(cell, values, WITHIN if within else OUTSIDE, False, protocol)


def _digits(cell: PaperCell) -> int:
    """Decimals to print: the paper's own (as transcribed), at least one for percentages."""
    text = f"{cell.value:.6f}".rstrip("0")
    decimals = len(text.split(".")[1]) if "." in text else 0
    return decimals if cell.measure.metric.startswith("stats.") or cell.measure.metric.startswith("classes_") \
        else max(decimals, 1)


def comparison_table(recipe: Recipe, outcomes: list[Outcome], extra_notes: list[str] = ()) -> Table:
    """Paper | ours (mean ± std over seeds) | difference | tolerance | within, one line per paper cell."""
    columns = [Column("Row", numeric=False), Column("Column", numeric=False), Column("Paper"),
               Column("Ours"), Column("Difference"), Column("Tolerance", numeric=False),
               Column("Within tolerance", numeric=False), Column("Protocol (ours)", numeric=False)]
    table = Table(f"{recipe.name}: {recipe.title}", columns)
    for o in outcomes:
        digits = _digits(o.cell)
        mean, std, n = _mean_std(o.values)
        ours = Cell(mean if o.values else None, std, n, digits=digits)
        difference = Cell(mean - o.cell.value if o.values else None, digits=digits)
        label = o.cell.row + (" (value from the paper's text)" if o.cell.source == "prose" else "")
        table.add([Cell(label), Cell(o.cell.header), Cell(o.cell.value, digits=digits), ours, difference,
                   Cell(o.cell.tolerance.text()), Cell(o.status), Cell(o.protocol or "–")], random=o.random)
    notes = [f"Paper: {recipe.reference}.", "Ours: mean ± sample std over seeds; difference = ours - paper; tolerance "
             "in points (or % of the paper value); cells not compared are left out of the verdict."]
    notes += [f"Protocol difference: {d}" for d in recipe.differences]
    notes += [f"Note: {n}" for n in recipe.notes]
    return table.finish([*notes, *extra_notes, verdict_text(outcomes)])


def verdict(outcomes: list[Outcome]) -> tuple[int, int, int]:
    """(within, outside, not compared)."""
    within = sum(o.status == WITHIN for o in outcomes)
    outside = sum(o.status == OUTSIDE for o in outcomes)
    return within, outside, len(outcomes) - within - outside


def verdict_text(outcomes: list[Outcome]) -> str:
    within, outside, other = verdict(outcomes)
    if within + outside == 0:
        return f"Verdict: no cell compared ({other} not compared: see the last column)."
    word = "all within tolerance" if not outside else f"{outside} OUTSIDE tolerance"
    return f"Verdict: {within + outside} cells compared, {word} ({within} within); {other} not compared."


