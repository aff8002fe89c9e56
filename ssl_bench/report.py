"""Leaderboards from the results store: Markdown, LaTeX (booktabs) and CSV.

One row per (backbone, task), with the backbone's parameters and pre-training data; columns mIoU /
pixel accuracy / mean F1 per dataset (like Table I of DatUS^2); mean +- std where several seeds ran;
the best value of each column in bold. Rows from random weights are marked in every format.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from . import registry

METRICS = {"miou": "mIoU", "acc": "Acc", "f1": "F1"}
RANDOM_MARK = " (random weights)"
RANDOM_NOTE = "Rows marked (random weights) use randomly initialised backbones: smoke runs, not results."


def runs_frame(records: list[dict]) -> pd.DataFrame:
    """Flat table of runs: one row per stored run with the columns reports group on."""
    rows = []
    for r in records:
        cfg = r["config"]
        rows.append({"backbone": r["backbone"], "task": r["task"], "dataset": r["dataset"], "split": r["split"],
                     "k": r["k"], "num_classes": cfg.get("num_classes"), "seed": r["seed"],
                     "random_weights": r["random_weights"], "miou": r["miou"], "acc": r["acc"], "f1": r["f1"],
                     "config_hash": r["config_hash"]})
    return pd.DataFrame(rows, columns=["backbone", "task", "dataset", "split", "k", "num_classes", "seed",
                                       "random_weights", "miou", "acc", "f1", "config_hash"])


def _backbone_info(name: str) -> dict:
    spec = registry.backbones().get(name)
    if spec is None:
        return {"family": "?", "params_m": float("nan"), "pretraining_data": "?"}
    return {"family": spec.family, "params_m": spec.params_m, "pretraining_data": spec.pretraining_data}


def leaderboard(records: list[dict], k: str | int = "classes", task: str | None = None) -> pd.DataFrame:
    """Aggregated leaderboard. ``k="classes"`` keeps runs with K = number of classes; an int keeps that K."""
    df = runs_frame(records)
    if task:
        df = df[df.task == task]
    df = df[df.k == df.num_classes] if k == "classes" else df[df.k == int(k)]
    if df.empty:
        return pd.DataFrame()
    grouped = df.groupby(["backbone", "random_weights", "task", "dataset"])
    agg = grouped[list(METRICS)].agg(["mean", "std", "count"])
    table = {}
    for (backbone, random_weights, task_name, dataset), row in agg.iterrows():
        key = (backbone, bool(random_weights), task_name)
        entry = table.setdefault(key, {})
        for metric in METRICS:
            entry[(dataset, metric, "mean")] = row[(metric, "mean")]
            entry[(dataset, metric, "std")] = row[(metric, "std")] if row[(metric, "count")] > 1 else float("nan")
    out = pd.DataFrame.from_dict(table, orient="index")
    out.index = pd.MultiIndex.from_tuples(out.index, names=["backbone", "random_weights", "task"])
    out.columns = pd.MultiIndex.from_tuples(out.columns, names=["dataset", "metric", "stat"])
    return out.sort_index(axis=1).sort_index()


def _cells(board: pd.DataFrame, bold: tuple[str, str]) -> tuple[list[str], list[list[str]], list[str]]:
    """Header, body and footnotes shared by all text formats; ``bold`` wraps the best of each column."""
    datasets = list(dict.fromkeys(board.columns.get_level_values("dataset")))
    header = ["Backbone", "Task", "Family", "Params (M)", "Pre-training data"]
    header += [f"{d} {METRICS[m]}" for d in datasets for m in METRICS]
    best = {(d, m): np.nanmax(board[(d, m, "mean")].to_numpy(dtype=float)) for d in datasets for m in METRICS
            if (d, m, "mean") in board}
    body = []
    for (backbone, random_weights, task), row in board.iterrows():
        info = _backbone_info(backbone)
        cells = [backbone + (RANDOM_MARK if random_weights else ""), task, info["family"],
                 f"{info['params_m']:.1f}", info["pretraining_data"]]
        for d in datasets:
            for m in METRICS:
                mean, std = row.get((d, m, "mean"), math.nan), row.get((d, m, "std"), math.nan)
                if mean is None or math.isnan(mean):
                    cells.append("–")
                    continue
                text = f"{mean:.1f}" + (f" ± {std:.1f}" if not math.isnan(std) else "")
                cells.append(f"{bold[0]}{text}{bold[1]}" if np.isclose(mean, best[(d, m)]) else text)
        body.append(cells)
    notes = [RANDOM_NOTE] if board.index.get_level_values("random_weights").any() else []
    return header, body, notes


def to_markdown(board: pd.DataFrame) -> str:
    if board.empty:
        return "_No stored runs match._\n"
    header, body, notes = _cells(board, ("**", "**"))
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines + [""] + [f"_{n}_" for n in notes]) + "\n"


def _latex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                 ("±", r"$\pm$"), ("–", "--")):
        text = text.replace(a, b)
    return text


def to_latex(board: pd.DataFrame) -> str:
    if board.empty:
        return "% No stored runs match.\n"
    header, body, notes = _cells(board, ("\x00", "\x01"))
    escape = lambda t: _latex_escape(t).replace("\x00", r"\textbf{").replace("\x01", "}")  # noqa: E731
    lines = [r"\begin{tabular}{" + "l" * 5 + "r" * (len(header) - 5) + "}", r"\toprule",
             " & ".join(escape(h) for h in header) + r" \\", r"\midrule"]
    lines += [" & ".join(escape(c) for c in row) + r" \\" for row in body]
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += [f"% {n}" for n in notes]
    return "\n".join(lines) + "\n"


def to_csv(board: pd.DataFrame) -> str:
    if board.empty:
        return ""
    header, body, notes = _cells(board, ("", ""))
    frame = pd.DataFrame(body, columns=header)
    return frame.to_csv(index=False) + "".join(f"# {n}\n" for n in notes)


FORMATS = {"markdown": to_markdown, "latex": to_latex, "csv": to_csv}
