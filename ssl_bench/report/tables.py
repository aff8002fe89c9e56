"""Tables from the results store, each rendered to Markdown, LaTeX (booktabs), CSV and HTML.

- ``leaderboard``: one row per backbone (+ method when several), with family, parameters and
  pre-training data from the backbone registry; mIoU / pixel accuracy / mean F1 per dataset
  (DatUS^2 Table I); mean +- std over seeds where more than one seed ran.
- ``segment_table``: segment statistics of tasks that produce segments (DatUS^2 Table II).
- ``streams_table``: every prediction stream / split of a run, with the labelled-pixels-only scores
  where a method leaves pixels unlabelled (DatUS^2 Table IV).
- ``discovered_table``: how many classes each stream of the evaluated split discovers (IoU above 20%, 2%,
  0%) and their mIoU (COMUS Table 3).

Rows from random weights carry a dagger and a footnote in every format (a ``random_weights`` column
in CSV). Best values are computed over the other rows: a smoke run is never "best".
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .. import registry, versions
from ..registry import overrides_text
from ..versions import task_label
from ..data import DATASETS, SUBSET_OPTIONS, dataset_options, subset_options
from ..data.protocol import SCORING_FIELDS, Protocol, stored_protocol
from ..errors import UserError

METRICS = {"miou": "mIoU", "acc": "Acc", "f1": "F1"}
DAGGER = "†"
RANDOM_NOTE = f"{DAGGER} random weights: smoke run, not a result."
DOUBLE_DAGGER = "‡"
LABELLED_NOTE = (f"{DOUBLE_DAGGER} uses ground-truth labels (a supervised probe, an oracle or a labelled retrieval): "
                 f"an upper bound, not an unsupervised result; never bold.")
SEEDS_NOTE = "mean ± std (sample standard deviation) over seeds where more than one seed ran."


# ---- a small table model, rendered by every format ----------------------------------------------------

@dataclass
class Cell:
    """A number (mean, optional std over ``n`` runs) or a text; ``best`` is drawn bold."""

    value: float | str | None
    std: float | None = None
    n: int = 1
    best: bool = False
    digits: int = 1
    shown: str | None = None  # the text drawn instead of the value (the CSV keeps the value)

    def text(self) -> str:
        if self.shown is not None:
            return self.shown
        if self.value is None or (isinstance(self.value, float) and math.isnan(self.value)):
            return "–"
        if isinstance(self.value, str):
            return self.value
        if isinstance(self.value, (int, np.integer)):  # counts: seeds, runs, images
            return str(int(self.value))
        text = f"{self.value:.{self.digits}f}"
        return text + (f" ± {self.std:.{self.digits}f}" if self.std is not None and not math.isnan(self.std) else "")


@dataclass
class Column:
    header: str  # e.g. "mIoU"
    group: str = ""  # e.g. the dataset; drawn as a spanning header above its columns
    numeric: bool = True
    flat: str = ""  # header where groups cannot span (Markdown, CSV); default "group header"
    count: bool = False  # a whole number (e.g. seeds): never bold, one integer column in CSV

    @property
    def key(self) -> str:
        return self.flat or f"{self.group} {self.header}".strip()


@dataclass
class Table:
    title: str
    columns: list[Column]
    rows: list[list[Cell]] = field(default_factory=list)
    random: list[bool] = field(default_factory=list)  # per row: random weights
    superseded: set[int] = field(default_factory=set)  # rows stored by another version of their task
    labelled: set[int] = field(default_factory=set)  # rows whose method predicts from the ground truth
    notes: list[str] = field(default_factory=list)
    scoring: list[dict] = field(default_factory=list)  # per row: its scoring rules (CSV columns), when they apply
    groups: list = field(default_factory=list)  # per row: rows compared for "best" (one dataset); empty: all rows

    @property
    def empty(self) -> bool:
        return not self.rows

    def add(self, cells: list[Cell], random: bool = False, superseded: bool = False, scoring: dict | None = None,
            group=None, labelled: bool = False) -> None:
        if superseded:
            self.superseded.add(len(self.rows))
        if labelled:
            self.labelled.add(len(self.rows))
        self.rows.append(cells)
        self.random.append(bool(random))
        self.scoring.append(scoring or {})
        if group is not None:
            self.groups.append(group)

    def finish(self, extra_notes: list[str] = ()) -> "Table":
        if any(self.random):
            self.notes.append(RANDOM_NOTE)
        if self.labelled:
            self.notes.append(LABELLED_NOTE)
        self.notes.extend(extra_notes)
        return self

    def _row_texts(self, row: int) -> list[str]:
        texts = [cell.text() for cell in self.rows[row]]
        if self.random[row]:
            texts[0] += DAGGER
        if row in self.labelled:
            texts[0] += DOUBLE_DAGGER
        return texts


def mark_best(table: Table) -> None:
    """Bold the highest mean of each numeric column among the rows neither from random weights, stored by
    another version of their task, nor predicting from the ground truth (none when there are no such rows: a
    smoke run or a supervised probe is never "best")."""
    candidates = [i for i, r in enumerate(table.random) if not r and i not in table.superseded | table.labelled]
    groups = table.groups or [None] * len(table.rows)
    for group in dict.fromkeys(groups):
        rows = [i for i in candidates if groups[i] == group]
        for c, column in enumerate(table.columns):
            if not column.numeric:
                continue
            values = {i: table.rows[i][c].value for i in rows}
            values = {i: v for i, v in values.items() if isinstance(v, float) and not math.isnan(v)}
            if not values:
                continue
            top = max(values.values())
            for i, v in values.items():
                table.rows[i][c].best = bool(np.isclose(v, top))


def _groups(columns: list[Column]) -> list[tuple[str, int]]:
    """Consecutive runs of the same group: [(group, span), ...]."""
    spans: list[tuple[str, int]] = []
    for col in columns:
        if spans and spans[-1][0] == col.group:
            spans[-1] = (col.group, spans[-1][1] + 1)
        else:
            spans.append((col.group, 1))
    return spans


def markdown_escape(text: str) -> str:
    """A name as literal Markdown text: a ``|`` would split the table cell, ``*``/``_`` start emphasis and
    ``$`` starts maths on GitHub."""
    return "".join("\\" + ch if ch in "\\|*_`$<>" else ch for ch in text)


def to_markdown(table: Table) -> str:
    if table.empty:
        return f"_{table.title}: no stored runs match._\n"
    lines = [f"**{table.title}**", "", "| " + " | ".join(markdown_escape(c.key) for c in table.columns) + " |",
             "|" + "|".join("---:" if c.numeric else "---" for c in table.columns) + "|"]
    for i, row in enumerate(table.rows):
        texts = [markdown_escape(t) for t in table._row_texts(i)]
        lines.append("| " + " | ".join(f"**{t}**" if cell.best else t for t, cell in zip(texts, row)) + " |")
    return "\n".join(lines + [""] + [f"_{n}_  " for n in table.notes]) + "\n"


def latex_escape(text: str) -> str:
    out = []
    for ch in text:
        out.append({"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                    "|": r"\textbar{}", "<": r"\textless{}", ">": r"\textgreater{}",
                    "±": r"$\pm$", "–": "--", DAGGER: r"$^\dagger$", DOUBLE_DAGGER: r"$^\ddagger$"}.get(ch, ch))
    return "".join(out)


def to_latex(table: Table) -> str:
    """A booktabs tabular (needs ``\\usepackage{booktabs}``); the title goes in a comment."""
    if table.empty:
        return f"% {table.title}: no stored runs match.\n"
    align = "".join("r" if c.numeric else "l" for c in table.columns)
    lines = [f"% {table.title}", r"\begin{tabular}{" + align + "}", r"\toprule"]
    spans = _groups(table.columns)
    if any(group for group, _ in spans):
        heads, rules, start = [], [], 1
        for group, span in spans:
            if group and span > 1:
                heads.append(rf"\multicolumn{{{span}}}{{c}}{{{latex_escape(group)}}}")
            else:
                heads += [latex_escape(group)] * span
            if group:
                rules.append(rf"\cmidrule(lr){{{start}-{start + span - 1}}}")
            start += span
        lines += [" & ".join(heads) + r" \\", " ".join(rules)]
    lines.append(" & ".join(latex_escape(c.header) for c in table.columns) + r" \\")
    lines.append(r"\midrule")
    for i, row in enumerate(table.rows):
        texts = [latex_escape(t) for t in table._row_texts(i)]
        lines.append(" & ".join(rf"\textbf{{{t}}}" if cell.best else t for t, cell in zip(texts, row)) + r" \\")
    lines.append(r"\bottomrule")
    width = len(table.columns)
    lines += [rf"\multicolumn{{{width}}}{{l}}{{\footnotesize {latex_escape(n)}}} \\" for n in table.notes]
    lines.append(r"\end{tabular}")
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    """CSV for scripts: numbers unrounded, a ``std`` and ``n`` column beside each numeric column (always, so
    the columns do not depend on how many seeds ran; empty where one did), missing values empty, a
    ``random_weights`` and a ``current_task_version`` column, and a ``note`` column saying what a random-weight
    or superseded row is; tables of scores also have the ``overclustering`` and ``absent_classes`` rules of each
    row (``a / b`` when its runs differ, in column order)."""
    if table.empty:
        return ""
    records = []
    for i, row in enumerate(table.rows):
        rec: dict = {}
        for column, cell in zip(table.columns, row):
            if column.count:
                rec[column.key] = int(cell.value) if isinstance(cell.value, (int, np.integer)) else None
            elif column.numeric:
                number = cell.value if isinstance(cell.value, float) and not math.isnan(cell.value) else None
                rec[column.key] = number
                rec[f"{column.key} std"] = cell.std
                rec[f"{column.key} n"] = cell.n if number is not None else None
            else:
                rec[column.key] = "" if cell.value is None else cell.text()  # the tables' dash for "none": empty
        rec.update(table.scoring[i])
        rec["random_weights"] = table.random[i]
        rec["current_task_version"] = i not in table.superseded
        rec["uses_labels"] = i in table.labelled
        notes = [RANDOM_NOTE.lstrip(DAGGER + " ")] if table.random[i] else []
        notes += [LABELLED_NOTE.lstrip(DOUBLE_DAGGER + " ").split(";")[0]] if i in table.labelled else []
        notes += ["stored by another version of the task"] if i in table.superseded else []
        rec["note"] = "; ".join(notes)
        records.append(rec)
    frame = pd.DataFrame(records)
    counts = {c.key for c in table.columns if c.count}
    for column in frame.columns:
        if column.endswith(" n") or column in counts:
            frame[column] = frame[column].astype("Int64")  # counts, not 2.0 (a gap stays empty)
    return frame.to_csv(index=False)


def to_html(table: Table) -> str:
    if table.empty:
        return f"<p><em>{html.escape(table.title)}: no stored runs match.</em></p>\n"
    esc = html.escape
    spans = _groups(table.columns)
    head = ""
    if any(group for group, _ in spans):
        head += "<tr>" + "".join(f'<th colspan="{s}" class="group">{esc(g)}</th>' for g, s in spans) + "</tr>"
    head += "<tr>" + "".join(f'<th class="{"num" if c.numeric else "txt"}">{esc(c.header)}</th>'
                             for c in table.columns) + "</tr>"
    body = []
    for i, row in enumerate(table.rows):
        texts = table._row_texts(i)
        cells = "".join(
            f'<td class="{"num" if col.numeric else "txt"}">{"<b>" + esc(t) + "</b>" if cell.best else esc(t)}</td>'
            for t, cell, col in zip(texts, row, table.columns))
        body.append(f'<tr class="{"random" if table.random[i] else ""}">{cells}</tr>')
    notes = "".join(f"<p class='note'>{esc(n)}</p>" for n in table.notes)
    return (f"<table><caption>{esc(table.title)}</caption><thead>{head}</thead><tbody>{''.join(body)}</tbody>"
            f"</table>{notes}\n")


FORMATS = {"markdown": to_markdown, "latex": to_latex, "csv": to_csv, "html": to_html}


# ---- from stored runs to labelled rows ------------------------------------------------------------------

def dataset_label(config: dict, subsets: bool = True) -> str:
    """Dataset name, plus the split, options and protocol where they differ from the defaults; ``subsets``
    False: without the options that only choose how many / which images (``limit``, synthetic ``n``)."""
    name = config["dataset"]
    cls = DATASETS.get(name)
    root = (config.get("dataset_identity") or {}).get("root")
    parts = [f"{name}:{Path(root).name}" if root else name]  # a generic folder: columns apart per folder
    if cls is not None and config.get("split") != cls.default_split:
        parts[0] += f":{config.get('split')}"
    options = config.get("dataset_options") or {}
    if not subsets:
        options = {k: v for k, v in options.items() if k not in (subset_options(cls) if cls else SUBSET_OPTIONS)}
    extra = [overrides_text(options, dataset_options(cls) if cls else {})]
    spec = registry.known_backbone(config["backbone"])
    if spec is not None and config.get("protocol"):
        extra.append(overrides_text(stored_protocol(config["protocol"]),
                                    Protocol().for_patch_size(spec.patch_size).as_dict()))
    extra = ", ".join(e for e in extra if e)
    return f"{parts[0]} ({extra})" if extra else parts[0]


def _distinct_columns(labels, roots: list[str | None]) -> list[str]:
    """Dataset labels made unique per folder: two folders of the same name (``a/site``, ``b/site``) get
    as much of their paths as tells them apart, instead of sharing (and averaging into) one column."""
    labels = list(labels)
    by_label: dict[str, set] = {}
    for label, root in zip(labels, roots):
        by_label.setdefault(label, set()).add(root)
    out = []
    for label, root in zip(labels, roots):
        others = sorted(r for r in by_label[label] if r)
        if root and len(others) > 1:
            parts = {r: Path(r).parts for r in others}
            depth = next((d for d in range(2, 64) if len({p[-d:] for p in parts.values()}) == len(parts)), 64)
            label = f"{label} [{'/'.join(parts[root][-depth:])}]"
        out.append(label)
    return out


def uses_labels(record: dict, tasks: dict | None = None) -> bool:
    """Whether a run predicted from the ground truth: its task's ``uses_labels`` values (``tasks``: the registry's,
    read once by the caller of many records), or its own stats."""
    spec = (registry.tasks() if tasks is None else tasks).get(record["task"])
    params = record["config"].get("params") or {}
    return bool((spec is not None and spec.reads_ground_truth(params))
                or (record.get("stats") or {}).get("labelled_probe"))


def runs_frame(records: list[dict]) -> pd.DataFrame:
    """Flat table of runs, one row per stored run, with the labels reports group on."""
    rows = []
    for r in records:
        cfg = r["config"]
        rows.append({"backbone": r["backbone"], "weights": r["weights"], "random_weights": bool(r["random_weights"]),
                     "task": r["task"], "method": task_label(cfg),
                     "current_version": versions.is_current_version(cfg),
                     "dataset": r["dataset"], "column": dataset_label(cfg), "split": r["split"], "k": r["k"],
                     "num_classes": cfg.get("num_classes"), "seed": r["seed"], "miou": r["miou"],
                     "acc": r["acc"], "f1": r["f1"], "config_hash": r["config_hash"],
                     "images": cfg.get("images") or 0, "full_column": dataset_label(cfg, subsets=False),
                     **{key: stored_protocol(cfg.get("protocol"))[key] for key in SCORING_FIELDS}})
    columns = ["backbone", "weights", "random_weights", "task", "method", "current_version", "dataset", "column",
               "split", "k", "num_classes", "seed", "miou", "acc", "f1", "config_hash", "images", "full_column",
               *SCORING_FIELDS]
    frame = pd.DataFrame(rows, columns=columns)
    roots = [(r["config"].get("dataset_identity") or {}).get("root") for r in records]
    frame["column"] = _distinct_columns(frame.column, roots)
    frame["full_column"] = _distinct_columns(frame.full_column, roots)
    frame["own_weights"] = [bool(r["config"].get("own_weights")) for r in records]
    tasks = registry.tasks()
    frame["uses_labels"] = [uses_labels(r, tasks) for r in records]
    frame["in_memory"] = [r["config"].get("model") for r in records]  # ssl_bench.evaluate's {name, step, ...}
    frame["model"] = [model_label(r, several) for r, several in zip(records, _several_checkpoints(frame))]
    return frame


def scoring_caption(frame: pd.DataFrame) -> str:
    """The scoring rules of a table's runs, for its caption (a column of other rules names them in its label)."""
    rules = set(zip(*(frame[key] for key in SCORING_FIELDS)))
    if len(rules) == 1:
        return "scoring: " + ", ".join(f"{key}={value}" for key, value in zip(SCORING_FIELDS, rules.pop()))
    default = Protocol()
    return ("scoring: " + ", ".join(f"{key}={getattr(default, key)}" for key in SCORING_FIELDS)
            + " unless its column names another rule")


STEGO_DROP_NOTE = ("overclustering=stego-drop (STEGO's code): pixels predicted as a cluster id >= C are not scored, so "
                   "these numbers compare only with STEGO's own tables.")


def scoring_notes(frame: pd.DataFrame) -> list[str]:
    return [STEGO_DROP_NOTE] if (frame.overclustering == "stego-drop").any() else []


def row_scoring(runs: pd.DataFrame, columns: list[str]) -> dict:
    """The scoring rules of one row's runs (CSV columns): ``a / b`` where they differ, in column order."""
    order = {column: i for i, column in enumerate(columns)}
    runs = runs.sort_values("column", key=lambda c: c.map(order))
    return {key: " / ".join(dict.fromkeys(runs[key])) for key in SCORING_FIELDS}
def _several_checkpoints(frame: pd.DataFrame) -> list[bool]:
    """Per run: whether its backbone is stored with several weight files (their hashes then tell rows apart)."""
    several = frame.groupby(["backbone", "random_weights"])["weights"].nunique()
    return [several.get((b, r), 1) > 1 for b, r in zip(frame.backbone, frame.random_weights)]


def model_label(record: dict, several_checkpoints: bool = False) -> str:
    """A run's backbone as reports name it: a user's own checkpoint by its file name and hash
    (``dino-vits16 [my.pth 26ddf28b]``), never as the registry's model; a backbone stored with several
    registry checkpoints by their hashes."""
    config, weights = record["config"], record["weights"]
    if config.get("own_weights"):
        return f"{record['backbone']} [{Path(config['weights_file']).name} {weights[:8]}]"
    return f"{record['backbone']} [{weights[:12]}]" if several_checkpoints else record["backbone"]


def select_k(frame: pd.DataFrame, k: str | int) -> tuple[pd.DataFrame, str]:
    """The runs of one leaderboard K and its title: ``"classes"`` or ``C`` (K = number of classes), ``2C``,
    ``3C`` ... (a multiple of each dataset's classes), or a number (that K everywhere)."""
    text = "C" if str(k).strip() in ("classes", "C", "c") else str(k).strip()
    if text == "C":
        return frame[frame.k == frame.num_classes], "K = C (number of classes)"
    if text.isdigit():
        if int(text) < 1:
            raise UserError(f"--k must be at least 1, got {text} -- e.g. --k C, --k 2C or --k 22")
        return frame[frame.k == int(text)], f"K = {int(text)}"
    from ..sweep import resolve_k  # the grid's reading of 2C, 3*C (imported here: it brings in torch)

    try:
        multiple = resolve_k(text, 1)
    except UserError:
        raise UserError(f"--k must be 'classes' (K = number of classes), a multiple such as 2C, or a number, "
                        f"got '{k}'") from None
    wanted = [resolve_k(text, int(c)) if c == c else -1 for c in frame.num_classes]  # c != c: NaN, unknown
    return frame[frame.k == wanted], f"K = {multiple}C ({multiple} x number of classes)"


OWN_WEIGHTS = "own checkpoint"  # the pre-training data of a user's file: the registry cannot know it


def backbone_info(name: str, own_weights: bool = False, in_memory: dict | None = None) -> dict:
    if isinstance(in_memory, dict):  # ssl_bench.evaluate: a model a training loop held, not a registry entry
        params = in_memory.get("params_m")
        return {"family": f"in memory ({in_memory.get('class', '?')})",
                "params": f"{params:.1f}" if isinstance(params, (int, float)) else "?", "data": "your training run"}
    spec = registry.known_backbone(name)
    if spec is None:
        return {"family": "?", "params": "?", "data": "?"}
    params = None if spec.params_m == 0 else f"{spec.params_m:.1f}"  # not learned: drawn as a dash, empty in CSV
    if own_weights:  # the registry's architecture, trained by someone else on data it cannot name
        return {"family": f"{spec.family} architecture", "params": params, "data": OWN_WEIGHTS}
    return {"family": spec.family, "params": params, "data": spec.pretraining_data}


def _mean_std(values) -> tuple[float, float | None, int]:
    values = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not values:
        return float("nan"), None, 0
    std = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return float(np.mean(values)), std, len(values)


SUBSETS = ("largest", "all")  # leaderboard columns: per dataset and row the most images run, or every subset
LAYOUTS = ("auto", "wide", "long")
WIDE_DATASETS = 4  # more dataset columns than this: one row per (backbone, method, dataset) instead


def _largest_subsets(frame: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Per dataset (split, options, protocol), every row's runs in the column of the most images it ran on (the
    full split where it ran): a subset run of a backbone and method shown on more images is a smoke run of it,
    left out, while a row that ran on a subset only keeps it. Returns the runs kept and, per column with runs
    left out, its label and how many."""
    keep, hidden = [], []
    for _, runs in frame.groupby("full_column"):
        sizes = runs.groupby("column").images.max()
        covered: set = set()  # rows shown in a larger column
        for column in sorted(sizes.index, key=lambda c: (-sizes[c], c != runs.full_column.iloc[0], c)):
            in_column = runs[runs.column == column]
            rows = list(zip(in_column.model, in_column.method, in_column.random_weights))
            shown = [row not in covered for row in rows]
            keep += list(in_column.index[shown])
            if not all(shown):
                hidden.append(f"{column} ({registry.counted(len(shown) - sum(shown), 'run')})")
            covered |= set(rows)
    return frame.loc[keep], sorted(hidden)


def leaderboard(records: list[dict], k: str | int = "classes", task: str | None = None, subsets: str = "largest",
                layout: str = "auto") -> Table:
    """DatUS^2 Table I: one row per backbone (and method, when several), metrics per dataset (``layout`` long:
    one row per backbone, method and dataset, as ``auto`` does beyond ``WIDE_DATASETS`` datasets). ``subsets``
    largest: per dataset and row only the column of the most images it ran on (``_largest_subsets``); all:
    every column."""
    if subsets not in SUBSETS:
        raise UserError(f"unknown --subsets '{subsets}' -- choose {' or '.join(SUBSETS)}")
    if layout not in LAYOUTS:
        raise UserError(f"unknown --layout '{layout}' -- choose {', '.join(LAYOUTS)}")
    frame = runs_frame(records)
    if task:
        frame = frame[frame.task == task]
    frame, k_text = select_k(frame, k)
    hidden: list[str] = []
    if subsets == "largest":
        frame, hidden = _largest_subsets(frame)
    several_methods = frame.method.nunique() > 1
    datasets = sorted(frame.column.unique())
    long = layout == "long" or (layout == "auto" and len(datasets) > WIDE_DATASETS)
    columns = [Column("Backbone", numeric=False)] + ([Column("Method", numeric=False)] if several_methods else [])
    columns += [Column("Family", numeric=False), Column("Params (M)", numeric=False),
                Column("Pre-training data", numeric=False)]
    columns += [Column("Dataset", numeric=False)] if long else []
    columns += [Column("Seeds", numeric=False, count=True)]
    columns += ([Column(label) for label in METRICS.values()] if long else
                [Column(label, group=d) for d in datasets for label in METRICS.values()])
    # One method: no Method column, so the title names it (with its non-default parameters).
    method_text = f", {frame.method.iloc[0]}" if len(frame) and not several_methods else ""
    table = Table(f"Leaderboard{method_text}, {k_text}" + (f"; {scoring_caption(frame)}" if len(frame) else ""),
                  columns)
    multi_seed = uneven_seeds = False
    # Random-weight rows last: they are smoke runs, listed for completeness.
    keys = ["random_weights", "model", "backbone", "method"]
    for key, runs in frame.groupby(["column", *keys] if long else keys, sort=True):
        dataset, (random, model, backbone, method) = (key[0], key[1:]) if long else (None, key)
        info = backbone_info(backbone, runs.own_weights.iloc[0], runs.in_memory.iloc[0])
        cells = [Cell(model)] + ([Cell(method)] if several_methods else [])
        cells += [Cell(info["family"]), Cell(info["params"]), Cell(info["data"])]
        cells += [Cell(dataset)] if long else []
        seeds, numbers = [], []
        for d in [dataset] if long else datasets:
            in_column = runs[runs.column == d]
            seeds.append(in_column.seed.nunique())  # 0: no run of this row on that dataset
            for metric in METRICS:
                mean, std, n = _mean_std(in_column[metric])
                numbers.append(Cell(mean, std, n))
        multi_seed |= any(s > 1 for s in seeds)
        ran = [s for s in seeds if s]
        uneven = len(set(ran)) > 1  # datasets of one row with different seed counts: fewest-most
        uneven_seeds |= uneven
        cells.append(Cell(max(ran), shown=f"{min(ran)}–{max(ran)}" if uneven else str(max(ran))))
        # the method label carries the version, so a row's runs share it
        table.add(cells + numbers, random=bool(random), superseded=not runs.current_version.iloc[0],
                  scoring=row_scoring(runs, [dataset] if long else datasets), group=dataset,
                  labelled=bool(runs.uses_labels.any()))
    mark_best(table)
    if all(table.random):
        notes = ["No value is bold: every row is a random-weight smoke run."]
    elif all(random or i in table.superseded | table.labelled for i, random in enumerate(table.random)):
        notes = ["No value is bold: every row is a random-weight smoke run, from another task version or uses "
                 "ground-truth labels."]
    else:
        marks = DAGGER * any(table.random) + DOUBLE_DAGGER * bool(table.labelled)
        rows = [what for what, present in ((f"not marked {'/'.join(marks)}", marks),
                                           ("of the current task versions", table.superseded)) if present]
        per = " of each dataset" if long else ""
        notes = [f"Bold: best per column{per}" + (f" among rows {' and '.join(rows)}." if rows else ".")]
    if table.superseded:
        current = ", ".join(sorted(f"{t} v{registry.tasks()[t].version}" for t in frame.task.unique()
                                   if t in registry.tasks()))
        notes.append(f"[vN, {versions.NOT_CURRENT}]: stored by another version of the task ([STAGE vN ...] of a "
                     f"stage, [PARAMETER vN ...] of a value), whose numbers may differ; run or sweep again for the "
                     f"current one ({current}).")
    notes += scoring_notes(frame)
    notes += [SEEDS_NOTE] if multi_seed else []
    notes += ["Seeds a–b: the fewest and most seeds over the row's datasets (per dataset: the n columns of the "
              "CSV)."] if uneven_seeds else []
    if hidden:
        notes.append(f"Not shown: {', '.join(hidden)}: runs of these rows on fewer images than a column shown "
                     f"(ssl-bench report --subsets all shows them).")
    return table.finish(notes)


SEGMENT_FIELDS = {"images": ("Images", 0), "total": ("Total segments", 0), "valid_percent": ("Valid segments (%)", 1),
                  "per_image": ("Segments / image", 2), "valid_per_image": ("Valid segments / image", 2),
                  "valid_per_image_std": ("Spread over images (std)", 2),
                  "patches_per_segment": ("Patches / valid segment", 2)}


def segment_table(records: list[dict]) -> Table:
    """DatUS^2 Table II, from ``stats["segments"]`` of the runs that have it (the fields of ``SEGMENT_FIELDS``)."""
    rows = [r for r in records if isinstance((r.get("stats") or {}).get("segments"), dict)]
    columns = [Column("Backbone", numeric=False), Column("Method", numeric=False), Column("Dataset", numeric=False),
               Column("Runs", numeric=False)] + [Column(h) for h, _ in SEGMENT_FIELDS.values()]
    table = Table("Segment statistics", columns)
    if not rows:
        return table
    frame = runs_frame(rows)
    frame["segments"] = [r["stats"]["segments"] for r in rows]
    for (model, method, column, random), runs in frame.groupby(["model", "method", "column", "random_weights"]):
        # One sample per seed and statistics: the K cells of one seed share their segments (DatUS^2 finds
        # them before clustering), and counting each K again would shrink the std.
        samples = {(seed, json.dumps(s, sort_keys=True)): s for seed, s in zip(runs.seed, runs.segments)}
        cells = [Cell(model), Cell(method), Cell(column), Cell(f"{len(runs)} ({len(samples)} distinct)"
                                                                if len(samples) < len(runs) else str(len(runs)))]
        for key, (_, digits) in SEGMENT_FIELDS.items():
            mean, std, n = _mean_std(s.get(key) for s in samples.values())
            cells.append(Cell(mean, std if std and std > 1e-9 * max(abs(mean), 1) else None, n, digits=digits))
        table.add(cells, random=bool(random))
    return table.finish(["Segments are counted per image; valid segments pass the method's own validity test; the spread "
                         "is the std of valid segments per image over the images (how much the segmenter adapts). "
                         "Runs that differ only in K share their segments and count once in mean ± std."])


def _metric_groups(table: Table, rows: list[dict]):
    """(frame, its groups by backbone, method, dataset column, K and random weights) of runs whose tables read
    their stored metrics; the table's title gets the scoring rules they were scored under."""
    frame = runs_frame(rows)
    table.title += f"; {scoring_caption(frame)}"
    frame["metrics"] = [r["metrics"] for r in rows]
    return frame, frame.groupby(["model", "method", "column", "k", "random_weights"])


def streams_table(records: list[dict]) -> Table:
    """DatUS^2 Table IV: the scores of each stream / split of runs that report more than the headline,
    or that leave pixels unlabelled (then also the scores on labelled pixels only)."""
    columns = [Column("Backbone", numeric=False), Column("Method", numeric=False), Column("Dataset", numeric=False),
               Column("K", numeric=False), Column("Stream@split", numeric=False)]
    columns += [Column(label, group="all pixels") for label in METRICS.values()]
    columns += [Column("Labelled (%)", group="labelled pixels only", flat="Labelled pixels (%)")]
    columns += [Column(label, group="labelled pixels only", flat=f"{label} (labelled only)")
                for label in METRICS.values()]
    table = Table("Prediction streams", columns)  # the caption names the scoring rules once rows are known

    def interesting(r: dict) -> bool:
        return len(r["metrics"]) > 1 or any(m.get("labelled_fraction", 1.0) < 1.0 for m in r["metrics"].values())

    rows = [r for r in records if interesting(r)]
    if not rows:
        return table
    frame, groups = _metric_groups(table, rows)
    for (model, method, column, k, random), runs in groups:
        headline = f"final@{runs.split.iloc[0]}"
        keys = sorted({key for m in runs.metrics for key in m}, key=lambda s: (s != headline, s))
        for key in keys:
            present = [m[key] for m in runs.metrics if key in m]
            name = key + (" (headline)" if key == headline else "")
            cells = [Cell(model), Cell(method), Cell(column), Cell(str(k)), Cell(name)]
            cells += [Cell(*_mean_std(m.get(metric) for m in present)) for metric in METRICS]
            fraction = _mean_std(m.get("labelled_fraction", 1.0) * 100 for m in present)
            cells.append(Cell(*fraction))
            partial = [m for m in present if m.get("labelled_fraction", 1.0) < 1.0 and "labelled" in m]
            cells += [Cell(*_mean_std(m["labelled"].get(metric) for m in partial)) for metric in METRICS]
            table.add(cells, random=bool(random), scoring=row_scoring(runs, [column]))
    return table.finish(["All pixels: unlabelled pixels count as wrong (the headline). Labelled pixels only: "
                         "scores over the pixels the method labelled; – where it labels every pixel."]
                        + scoring_notes(frame))


def discovered_table(records: list[dict]) -> Table:
    """COMUS Table 3: per run and stream of its evaluated split, the classes whose IoU exceeds 20% (discovered),
    2% and 0% (has a cluster), and the mIoU over those classes, from each stream's stored ``discovered``."""
    from ..metrics import DISCOVERY_THRESHOLDS

    columns = [Column("Backbone", numeric=False), Column("Method", numeric=False), Column("Dataset", numeric=False),
               Column("K", numeric=False), Column("Stream", numeric=False), Column("mIoU all")]
    for t in DISCOVERY_THRESHOLDS:
        group = f"IoU > {t}%"
        columns += [Column("classes", group=group, flat=f"classes with IoU > {t}%"),
                    Column("mIoU", group=group, flat=f"mIoU of classes with IoU > {t}%")]
    table = Table("Discovered categories", columns)
    rows = [r for r in records if any("discovered" in m for m in (r.get("metrics") or {}).values())]
    if not rows:
        return table
    frame, groups = _metric_groups(table, rows)
    for (model, method, column, k, random), runs in groups:
        split = runs.split.iloc[0]
        keys = sorted({key for m in runs.metrics for key, v in m.items() if key.endswith("@" + split)
                       and "discovered" in v}, key=lambda s: (s != f"final@{split}", s))
        for key in keys:
            present = [m[key] for m in runs.metrics if key in m and "discovered" in m[key]]
            cells = [Cell(model), Cell(method), Cell(column), Cell(str(k)), Cell(key.split("@")[0]),
                     Cell(*_mean_std(m.get("miou") for m in present))]
            for t in DISCOVERY_THRESHOLDS:
                found = [m["discovered"][f"iou>{t:g}"] for m in present]
                classes = _mean_std(f["classes"] for f in found)
                whole = not math.isnan(classes[0]) and classes[0].is_integer() and not classes[1]  # a count: "3"
                cells += [Cell(*classes, digits=0 if whole else 1), Cell(*_mean_std(f["miou"] for f in found))]
            table.add(cells, random=bool(random), scoring=row_scoring(runs, [column]))
    return table.finish(["A class counts when its IoU (after the run's matching, unlabelled pixels counted wrong) "
                         "exceeds the threshold; its column's mIoU averages those classes only (COMUS Table 3: "
                         "discovered = IoU > 20%, has a cluster = IoU > 0%). Classes absent from the ground truth "
                         "are not counted."] + scoring_notes(frame))
