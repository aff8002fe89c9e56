"""``ssl-bench report``: tables, figures and one HTML page from the results store.

tables.py   leaderboard (DatUS^2 Table I), segment statistics (Table II), prediction streams (Table IV),
            discovered categories (COMUS Table 3)
details.py  per-class IoU, seconds per stage
figures.py  over-clustering curves (Fig. 9), qualitative panels
html.py     the self-contained page

Rows, series and panels from random weights are marked in every output.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from .. import samples
from ..errors import UserError
from . import figures, html
from .details import class_tables, predictions_table, timings_table
from .tables import (DAGGER, FORMATS, RANDOM_NOTE, Table, discovered_table, leaderboard, model_label, runs_frame,
                     segment_table, streams_table, task_label, to_csv, to_html, to_latex, to_markdown)

TABLES = {"leaderboard": leaderboard, "segments": segment_table, "streams": streams_table, "classes": class_tables,
          "timings": timings_table, "predictions": predictions_table, "discovered": discovered_table}
EXTENSIONS = {"markdown": "md", "latex": "tex", "csv": "csv", "html": "html"}

__all__ = ["FORMATS", "TABLES", "Table", "discovered_table", "leaderboard", "runs_frame", "segment_table",
           "streams_table", "to_csv", "to_html", "to_latex", "to_markdown", "text_report", "write_all", "html_report"]


def build_tables(records: list[dict], which: str = "all", k: str | int = "classes", task: str | None = None,
                 subsets: str = "largest", layout: str = "auto") -> dict[str, Table]:
    """The named table, or for ``"all"`` the leaderboard plus every other table that has rows (per-class IoU:
    one table per dataset, named ``classes_DATASET``)."""
    if which != "all" and which not in TABLES:
        raise UserError(f"unknown table '{which}' -- choose {', '.join(TABLES)} or all")
    scored = [r for r in records if r["miou"] is not None]  # runs on images without ground truth have no metrics
    built: dict[str, Table] = {}
    for name in list(TABLES) if which == "all" else [which]:
        if name == "leaderboard":
            built[name] = leaderboard(scored, k, task, subsets, layout)
        elif name == "classes":
            taken: set[str] = set()
            for column, table in class_tables(scored, k, task, subsets).items():
                built[_unique_name(f"classes_{_slug(column)}", column, taken)] = table
        elif name in ("timings", "predictions"):  # every run: those without ground truth have no metrics
            built[name] = TABLES[name](records, task)
        else:
            built[name] = TABLES[name](_task_filter(records if name == "segments" else scored, task))
    return {n: t for n, t in built.items() if n == "leaderboard" or which != "all" or not t.empty}


def text_report(records: list[dict], fmt: str, which: str = "all", k: str | int = "classes",
                task: str | None = None, subsets: str = "largest", layout: str = "auto") -> str:
    if fmt not in FORMATS:
        raise UserError(f"unknown format '{fmt}' -- choose {', '.join(FORMATS)}")
    tables = build_tables(records, which, k, task, subsets, layout)
    if fmt == "csv" and len(tables) > 1:
        raise UserError(f"a CSV file holds one table, and this makes {len(tables)} ({', '.join(tables)}) -- pass "
                        f"--table leaderboard (or {', '.join(t for t in TABLES if t != 'leaderboard')}), or "
                        f"--out-dir DIR to write every table")
    return "\n".join(FORMATS[fmt](table) for table in tables.values())


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def _task_filter(records: list[dict], task: str | None) -> list[dict]:
    return [r for r in records if r["task"] == task] if task else records


def panel_title(record: dict, dataset: str | None = None) -> str:
    """``dataset``: the run's leaderboard column (which folder, which options); default name:split."""
    rand = f"{DAGGER} RANDOM WEIGHTS (smoke run, not a result) | " if record["random_weights"] else ""
    method = task_label(record["config"])
    dataset = dataset or f"{record['dataset']}:{record['split']}"
    scores = ("no ground truth" if record["miou"] is None else
              f"mIoU {record['miou']:.1f}  Acc {record['acc']:.1f}  F1 {record['f1']:.1f}")
    return (f"{rand}{model_label(record)} | {method} | {dataset} | "
            f"K={record['k']} seed={record['seed']} | {scores}  (run {record['config_hash']})")


def _panel_order(records: list[dict]) -> list[dict]:
    """K = C runs first (the leaderboard's), random weights after the others, then by dataset, backbone,
    task, K, seed."""
    return sorted(records, key=lambda r: (r["k"] != r["config"].get("num_classes"), r["random_weights"],
                                          r["dataset"], r["backbone"], r["task"], r["k"], r["seed"]))


def write_all(records: list[dict], store_path: Path, out_dir: Path, k: str | int = "classes",
              task: str | None = None, subsets: str = "largest", layout: str = "auto") -> list[Path]:
    """Every table in every format, the curves as PNG + PDF and a panel PNG per run with samples."""
    written = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, table in build_tables(records, "all", k, task, subsets, layout).items():
        for fmt, ext in EXTENSIONS.items():
            path = out_dir / f"{name}.{ext}"
            path.write_text(FORMATS[fmt](table))
            written.append(path)
    shown = _task_filter(records, task)
    names: set[str] = set()
    scored = [r for r in shown if r["miou"] is not None]
    colours = figures.model_colours(scored)  # one colour per backbone in every curve file
    for column, data in figures.curve_data(scored).items():
        fig = figures.overclustering_figure(column, data, colours)
        written += figures.save_figure(fig, out_dir / "curves" / _unique_name(f"overclustering_{_slug(column)}",
                                                                              column, names))
    bars = figures.timing_bars(shown)
    if bars:
        written += figures.save_figure(figures.timings_figure(bars), out_dir / "timings")
    for record, title in _panels(shown):
        found = samples.load(store_path, record["config_hash"])
        if found is not None:
            fig = figures.panel_figure(found, title)
            name = _slug(f"{record['backbone']}_{record['task']}_{record['dataset']}_K{record['k']}_seed{record['seed']}")
            written += figures.save_figure(fig, out_dir / "panels" / f"{name}_{record['config_hash']}", ("png",))
    return written


def _unique_name(name: str, text: str, taken: set[str]) -> str:
    """``name``, or where another text slugged to it already (``a&b``, ``a#b``), with a hash of ``text``."""
    if name in taken:
        name += "_" + hashlib.sha256(text.encode()).hexdigest()[:8]
    taken.add(name)
    return name


def _panels(records: list[dict]):
    """(record, its panel title), in panel order."""
    columns = dict(zip(*(runs_frame(records)[c] for c in ("config_hash", "column")))) if records else {}
    for record in _panel_order(records):
        yield record, panel_title(record, columns.get(record["config_hash"]))


def html_report(records: list[dict], store_path: Path, k: str | int = "classes", task: str | None = None,
                max_panels: int = 24, subsets: str = "largest", layout: str = "auto") -> str:
    """The whole report as one self-contained HTML page."""
    sections = []
    shown = _task_filter(records, task)
    tables = build_tables(records, "all", k, task, subsets, layout)
    sections.append(("Leaderboard", f"<div class='scroll'>{to_html(tables['leaderboard'])}</div>"))
    scored = [r for r in shown if r["miou"] is not None]
    curves = figures.curve_data(scored)
    colours = figures.model_colours(scored)  # one colour per backbone in every figure of the page
    body = "".join(html.figure(figures.image_bytes(figures.overclustering_figure(column, data, colours)),
                               f"Over-clustering on {column}: each metric against K, per backbone and method.")
                   for column, data in curves.items())
    sections.append(("Over-clustering curves", body or "<p><em>No backbone and method ran with several K.</em></p>"))
    seg = tables.get("segments")
    sections.append(("Segment statistics", to_html(seg) if seg else
                     "<p><em>No stored run reports segment statistics (tasks that produce segments do).</em></p>"))
    streams = tables.get("streams")
    sections.append(("Prediction streams", f"<div class='scroll'>{to_html(streams)}</div>" if streams else
                     "<p><em>No stored run reports streams besides its headline.</em></p>"))
    per_class = [t for name, t in tables.items() if name.startswith("classes_")]
    sections.append(("Per-class IoU", "".join(f"<div class='scroll'>{to_html(t)}</div>" for t in per_class) or
                     "<p><em>No stored run at this K has per-class scores.</em></p>"))
    timings = tables.get("timings")
    bars = figures.timing_bars(shown)
    chart = html.figure(figures.image_bytes(figures.timings_figure(bars)),
                        "Where each run's time goes: the task split into its own stages where it times them.") \
        if bars else ""
    sections.append(("Stage timings", f"<div class='scroll'>{to_html(timings)}</div>{chart}" if timings else
                     "<p><em>No stored run has timings.</em></p>"))
    discovered = tables.get("discovered")
    sections.append(("Discovered categories", f"<div class='scroll'>{to_html(discovered)}</div>" if discovered else
                     "<p><em>No stored run counts its discovered categories (runs stored before the count "
                     "have none).</em></p>"))
    panels, missing, more = [], 0, 0
    for record, title in _panels(shown):
        if len(panels) >= max_panels:  # counted, not read or drawn
            has = samples.stored(store_path, record["config_hash"])
            more, missing = more + has, missing + (not has)
            continue
        found = samples.load(store_path, record["config_hash"])
        if found is None:
            missing += 1
        else:
            jpeg = figures.image_bytes(figures.panel_figure(found, title), dpi=80, fmt="jpeg")
            panels.append(html.figure(jpeg, title, "image/jpeg"))
    note = ""
    if missing:
        note += (f"<p class='note'>{missing} run(s) have no stored samples (computed before samples were kept, "
                 f"or writing them failed): rerun with --force to get their panels.</p>")
    if more:
        note += (f"<p class='note'>Showing the first {max_panels} of {max_panels + more} panels "
                 f"(--max-panels to change).</p>")
    sections.append(("Qualitative results", note + f"<div class='panels'>{''.join(panels)}</div>" if panels
                     else note + "<p><em>No stored samples.</em></p>"))
    warning = (f"Some runs use random weights ({sum(r['random_weights'] for r in shown)} of {len(shown)}): "
               f"{RANDOM_NOTE}" if any(r["random_weights"] for r in shown) else "")
    meta = f"{len(shown)} stored run(s) from {store_path}" + (f", task {task}" if task else "")
    return html.page("ssl-bench report", meta, sections, warning)
