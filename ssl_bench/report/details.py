"""The report's detail tables: per-class IoU (the papers print them) and the seconds each stage took.

- ``class_tables``: one table per dataset column of the leaderboard (same K, same columns shown), one
  row per backbone and method, the IoU of each class of the headline stream (mean ± std over seeds).
- ``timings_table``: seconds per stage (features, labels, task, evaluate) of the stored runs, one row per
  backbone, method, dataset and K (mean over seeds).
- ``predictions_table``: what the predictions of runs on images without ground truth look like (they have no
  metrics, so no leaderboard row): clusters used, clusters per image, unlabelled pixels, the largest cluster.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data import DATASETS
from .tables import Cell, Column, Table, _largest_subsets, _mean_std, mark_best, runs_frame, select_k

STAGES = {"features": "Features", "labels": "Labels", "task": "Task", "evaluate": "Evaluate"}


def class_names(config: dict) -> list[str]:
    """The class names of a run's dataset: the reader's, a folder's classes.txt, else class numbers."""
    classes = int(config.get("num_classes") or 0)
    names = list(getattr(DATASETS.get(config["dataset"]), "class_names", None) or [])
    root = (config.get("dataset_identity") or {}).get("root")
    if root and (Path(root) / "classes.txt").is_file():
        names = [line.strip() for line in (Path(root) / "classes.txt").read_text().splitlines() if line.strip()]
    return names if len(names) == classes else [f"class {i}" for i in range(classes)]


def _headline(record: dict) -> dict:
    return record["metrics"].get(f"final@{record['split']}", {})


def class_tables(records: list[dict], k: str | int = "classes", task: str | None = None,
                 subsets: str = "largest") -> dict[str, Table]:
    """Per dataset column: IoU (%) of each class, rows as the leaderboard's."""
    frame = runs_frame(records)
    frame["per_class"] = [_headline(r).get("per_class_iou") for r in records]
    frame["names"] = [class_names(r["config"]) for r in records]
    if task:
        frame = frame[frame.task == task]
    frame, k_text = select_k(frame, k)
    if subsets == "largest":
        frame, _ = _largest_subsets(frame)
    frame = frame[frame.per_class.notna()]
    tables = {}
    for column, runs in frame.groupby("column", sort=True):
        names = runs.names.iloc[0]
        several_methods = runs.method.nunique() > 1
        columns = [Column("Backbone", numeric=False)] + ([Column("Method", numeric=False)] if several_methods else [])
        columns += [Column("Seeds", numeric=False, count=True)] + [Column(name) for name in names]
        columns += [Column("mIoU")]
        table = Table(f"Per-class IoU (%), {column}, {k_text}", columns)
        for (random, model, method), group in runs.groupby(["random_weights", "model", "method"], sort=True):
            cells = [Cell(model)] + ([Cell(method)] if several_methods else [])
            cells.append(Cell(int(group.seed.nunique())))
            for c in range(len(names)):
                cells.append(Cell(*_mean_std(ious[c] if c < len(ious) else None for ious in group.per_class)))
            cells.append(Cell(*_mean_std(group.miou)))
            table.add(cells, random=bool(random), superseded=not group.current_version.iloc[0],
                      labelled=bool(group.uses_labels.any()))
        mark_best(table)
        tables[column] = table.finish(["Classes absent from the images (and never predicted) read –; "
                                       "bold: best per class."])
    return tables


def timings_table(records: list[dict], task: str | None = None) -> Table:
    """Seconds per stage, one row per backbone, method, dataset and K (mean over its runs)."""
    columns = [Column("Backbone", numeric=False), Column("Method", numeric=False), Column("Dataset", numeric=False),
               Column("K", numeric=False), Column("Runs", numeric=False, count=True), Column("Images", numeric=False,
                                                                                          count=True)]
    columns += [Column(name, group="seconds per stage", flat=f"{name} (s)") for name in STAGES.values()]
    columns += [Column("Total", group="seconds per stage", flat="Total (s)"),
                Column("Per image", group="seconds per stage", flat="Per image (s)"),
                Column("Task's own stages (s)", numeric=False),
                Column("Kept values read (s)", numeric=False)]
    table = Table("Stage timings (seconds; mean over the runs of a row)", columns)
    rows = [r for r in records if r.get("timings") and (not task or r["task"] == task)]
    if not rows:
        return table
    frame = runs_frame(rows)
    for stage in STAGES:
        frame[stage] = [r["timings"].get(stage) for r in rows]
    frame["total"] = [sum(r["timings"].values()) for r in rows]
    for (random, model, method, column, k), runs in frame.groupby(["random_weights", "model", "method", "column",
                                                                    "k"]):  # random-weight rows last
        images = int(runs.images.max())
        cells = [Cell(model), Cell(method), Cell(column), Cell(str(k)), Cell(len(runs)), Cell(images)]
        cells += [Cell(_mean_std(runs[stage])[0], digits=1) for stage in STAGES]  # means: a std of timings is noise
        total = _mean_std(runs.total)[0]
        cells += [Cell(total, digits=1), Cell(total / images if images else float("nan"), digits=3),
                  Cell(_own_stages([rows[i] for i in runs.index])),
                  Cell(_named_seconds([rows[i] for i in runs.index], "kept_seconds"))]
        table.add(cells, random=bool(random))
    return table.finish(["Features: the feature extraction where ssl-bench run made it, else opening the cache (a "
                         "sweep extracts before its cells; sweep --plan prices extractions from the cache). The "
                         "machine's load changes these figures. Kept values read: intermediates an earlier cell "
                         "computed and kept (e.g. segments shared by every K), with the seconds they took there, "
                         "which the row's own stages do not contain."])


def _own_stages(runs: list[dict]) -> str:
    """The task's own stages (``ctx.timed``: fit, training, crf, ...) in pipeline order, mean seconds over the
    runs: the part of "task" a method times itself, e.g. ``fit 0.8, crf 4.0``."""
    from .figures import stage_rank

    return _named_seconds(runs, "stage_seconds", key=lambda name: stage_rank(f"task: {name}"))


def _named_seconds(runs: list[dict], stat: str, key=None) -> str:
    """``stats[stat]`` ({name: seconds}) of the runs as ``name mean, ...`` (sorted by ``key``, else by name)."""
    named = [(r.get("stats") or {}).get(stat) or {} for r in runs]
    names = sorted({name for seconds in named for name in seconds}, key=key)
    return ", ".join(f"{name} {np.mean([seconds.get(name, 0.0) for seconds in named]):.1f}" for name in names) or "-"


def predictions_table(records: list[dict], task: str | None = None) -> Table:
    """Runs without ground truth (``stats["predictions"]``): one row per backbone, method, dataset and K."""
    columns = [Column("Backbone", numeric=False), Column("Method", numeric=False), Column("Dataset", numeric=False),
               Column("K", numeric=False), Column("Runs", numeric=False, count=True),
               Column("Images", numeric=False, count=True), Column("Clusters used"), Column("Clusters per image"),
               Column("Unlabelled (%)"), Column("Largest cluster (% pixels)")]
    table = Table("Predictions of runs without ground truth (no metrics: what the clusters look like)", columns)
    rows = [r for r in records if isinstance((r.get("stats") or {}).get("predictions"), dict)
            and (not task or r["task"] == task)]
    if not rows:
        return table
    frame = runs_frame(rows)
    frame["predictions"] = [r["stats"]["predictions"] for r in rows]
    for (random, model, method, column, k), runs in frame.groupby(["random_weights", "model", "method", "column",
                                                                    "k"]):
        counts = list(runs.predictions)
        cells = [Cell(model), Cell(method), Cell(column), Cell(str(k)), Cell(len(runs)),
                 Cell(int(max(c["images"] for c in counts)))]
        cells += [Cell(*_mean_std(c["clusters_used"] for c in counts), digits=1),
                  Cell(*_mean_std(c["clusters_per_image"] for c in counts), digits=1),
                  Cell(*_mean_std(c["unlabelled_percent"] for c in counts)),
                  Cell(*_mean_std(max(c["pixel_percent"], default=0.0) for c in counts))]
        table.add(cells, random=bool(random))
    return table.finish(["Mean ± std over the runs of a row; ssl-bench show HASH lists each cluster's share of "
                         "the pixels and of the images."])
