"""Figures from the results store (matplotlib ``Figure`` objects, no pyplot: no display, no backend chosen,
and the style below applies to these figures only, never to a notebook that imports this module).

- ``overclustering_figure``: mIoU, pixel accuracy and mean F1 against K for each backbone and method
  on one dataset (DatUS^2 Fig. 9); mean over seeds with +- std error bars where several seeds ran.
- ``panel_figure``: image | ground truth | prediction for the samples the runner kept of one run,
  in the dataset's colours (cluster ids mapped to classes by the run's own matching).
"""

from __future__ import annotations

import functools
import io
import textwrap
from pathlib import Path

import matplotlib
import matplotlib.ticker
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ..data.base import display_palette
from ..samples import RunSamples
from .tables import DAGGER, METRICS, runs_frame, scoring_caption

IGNORE_COLOUR = np.array([224, 224, 192], dtype=np.uint8)  # VOC's void colour: ignore / unlabelled pixels
METRIC_AXES = {"miou": "mIoU (%)", "acc": "Pixel accuracy (%)", "f1": "Mean F1 (%)"}

# parse_math off: names are literal text (a folder called "m$x$" must not become a formula, or fail to parse).
STYLE = {"font.size": 11, "axes.titlesize": 12, "legend.fontsize": 10, "figure.dpi": 100, "text.parse_math": False}


def _styled(make_figure):
    """Run under ``STYLE`` (text reads it when created, ticks when drawn), leaving rcParams as they were."""
    @functools.wraps(make_figure)
    def build(*args, **kwargs):
        with matplotlib.rc_context(STYLE):
            return make_figure(*args, **kwargs)
    return build


def curve_data(records: list[dict]) -> dict[str, dict]:
    """Per dataset label: the number of classes and, per (model, method, random), a frame of
    mean / std / seeds of each metric by K. Only datasets where some series has several K."""
    frame = runs_frame(records)
    out = {}
    for column, runs in frame.groupby("column"):
        series = {}
        for key, group in runs.groupby(["model", "method", "random_weights"]):
            stats = group.groupby("k")[list(METRICS)].agg(["mean", "std", "count"])
            series[key] = stats
        if any(len(s) > 1 for s in series.values()):
            out[column] = {"classes": int(runs.num_classes.iloc[0]), "series": series, "scoring": scoring_caption(runs)}
    return out


MARKERS = "osD^vP*Xhp"


def model_colours(records: list[dict]) -> dict[str, tuple]:
    """One colour per backbone (as reports name it) for every figure of a report: the same backbone keeps
    its colour from one curve file to the next, whatever else each one shows."""
    models = sorted(set(runs_frame(records).model)) if records else []
    cmap = matplotlib.colormaps["tab10" if len(models) <= 10 else "tab20"]
    return {model: cmap(i % cmap.N) for i, model in enumerate(models)}


@_styled
def overclustering_figure(column: str, data: dict, colours: dict[str, tuple] | None = None) -> Figure:
    """One row of three panels (mIoU, accuracy, F1 against K) for one dataset. ``colours``: per backbone
    (``model_colours`` of the whole report); a method has its own marker, random weights are dashed."""
    fig = Figure(figsize=(15, 4.6), layout="constrained")
    axes = fig.subplots(1, 3)
    methods = sorted({method for _, method, _ in data["series"]})
    several_methods = len(methods) > 1
    if colours is None:
        cmap = matplotlib.colormaps["tab10"]
        colours = {m: cmap(i % 10) for i, m in enumerate(sorted({m for m, _, _ in data["series"]}))}
    handles = []
    for (model, method, random), stats in sorted(data["series"].items()):
        name = f"{model}{DAGGER}" if random else model
        label = f"{name} / {method}" if several_methods else name
        if random:
            label += " (random weights)"
        style = dict(color=colours[model], marker=MARKERS[methods.index(method) % len(MARKERS)],
                     linestyle="--" if random else "-", linewidth=2, markersize=6, capsize=4)
        ks = stats.index.to_numpy()
        for ax, metric in zip(axes, METRICS):
            std = stats[(metric, "std")].fillna(0.0).to_numpy()
            line = ax.errorbar(ks, stats[(metric, "mean")], yerr=std if std.any() else None, label=label, **style)
        handles.append(line)
    classes = data["classes"]
    all_ks = sorted({int(k) for stats in data["series"].values() for k in stats.index} | {classes})
    for ax, metric in zip(axes, METRICS):
        classes_line = ax.axvline(classes, color="0.5", linestyle=":", linewidth=1.5,
                                  label=f"K = C = {classes} (number of classes)")
        low, high = ax.get_ylim()
        ax.set_ylim(max(low, 0.0), min(high, 101.0))  # scores are percentages; error bars may not pass 100
        ax.set_xlabel("K (number of clusters)")
        ax.set_ylabel(METRIC_AXES[metric])
        ax.set_title(METRIC_AXES[metric].replace(" (%)", "") + " against K")
        ax.grid(alpha=0.3)
        if len(all_ks) <= 12:  # the K values that ran, not interpolated ticks
            ax.set_xticks(all_ks)
        else:
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    method = "" if several_methods else f", {methods[0]}"
    fig.suptitle(f"Over-clustering on {column}{method} (C = {classes} classes); error bars: ± std over seeds\n"
                 f"{data.get('scoring', '')}", fontsize=13)
    handles.append(classes_line)
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 3), frameon=False)
    return fig


def colourise(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8; ids outside the palette (ignore, unlabelled) in IGNORE_COLOUR."""
    table = np.vstack([palette, IGNORE_COLOUR[None]])
    ids = np.where((labels >= 0) & (labels < len(palette)), labels, len(palette))
    return table[ids]


@_styled
def panel_figure(samples: RunSamples, title: str) -> Figure:
    """Rows of image | ground truth | prediction, with a colour key of the classes shown."""
    n_classes = len(samples.class_names)
    palette = display_palette(samples.palette, n_classes)
    rows = len(samples.indices)
    fig = Figure(figsize=(10, 3.1 * rows + 1.2), layout="constrained")
    axes = fig.subplots(rows, 3, squeeze=False)
    for r, index in enumerate(samples.indices):
        views = [samples.images[r], colourise(samples.labels[r], palette), colourise(samples.predictions[r], palette)]
        for c, (view, name) in enumerate(zip(views, ("image", "ground truth", "prediction"))):
            ax = axes[r, c]
            ax.imshow(view, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"#{index} {name}", fontsize=10)
    shown = set()
    for arr in list(samples.labels) + list(samples.predictions):
        shown |= set(np.unique(arr).tolist())
    names = [(palette[c] / 255, samples.class_names[c]) for c in range(n_classes) if c in shown]
    if shown - set(range(n_classes)):
        names.append((IGNORE_COLOUR / 255, "ignore / unlabelled"))
    # Long class names (SUIM's "background (waterbody, plants, sea-floor)") are wrapped, and no more columns are
    # used than the figure's width holds: a legend wider than the figure was clipped at both edges.
    labels = ["\n".join(textwrap.wrap(name, LEGEND_WRAP)) for _, name in names]
    key = [Patch(facecolor=colour, edgecolor="0.6", label=label) for (colour, _), label in zip(names, labels)]
    fig.suptitle("\n".join(textwrap.wrap(title, 100)), fontsize=12)  # matplotlib's wrap=True parses maths
    fig.legend(handles=key, loc="outside lower center", ncol=legend_columns(labels, fig.get_figwidth()),
               frameon=False, fontsize=10)
    return fig


LEGEND_WRAP = 26  # characters per line of a class name in a legend


def legend_columns(labels: list[str], width_inches: float, font_points: float = 10) -> int:
    """How many legend entries fit side by side: each is its handle plus its longest line, at a generous
    0.62 em per character (DejaVu Sans averages about 0.55)."""
    longest = max((len(line) for label in labels for line in label.splitlines()), default=1)
    entry = longest * 0.62 * font_points / 72 + 0.75  # text + handle and gaps, inches
    return max(1, min(len(labels), 6, int((width_inches - 0.4) // entry)))


@_styled
def save_figure(fig: Figure, path: Path, formats: tuple[str, ...] = ("png", "pdf")) -> list[Path]:
    """``path`` without extension: each format is appended (a dot in the name, as in ``site.v1``, is kept)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        target = path.parent / f"{path.name}.{fmt}"
        fig.savefig(target, dpi=150 if fmt == "png" else None)
        written.append(target)
    return written


@_styled
def image_bytes(fig: Figure, dpi: int = 110, fmt: str = "png") -> bytes:
    """The figure encoded in memory: PNG for plots; JPEG keeps photo panels small in the HTML page."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt, dpi=dpi, **({"pil_kwargs": {"quality": 85}} if fmt == "jpeg" else {}))
    return buffer.getvalue()


# The order of the stages methods time (``ctx.timed``) in a pipeline; others follow by name.
STAGE_ORDER = ["segmenter training", "proposals", "segment", "embed", "fit", "training", "cluster probe", "cluster",
               "predict", "crf", "de-noiser training"]


def stage_rank(name: str) -> tuple[int, str]:
    """Where a part of a run's bar goes (``timing_bars``' names): features, labels, the task's own stages in
    ``STAGE_ORDER`` (others by name), the rest of the task, evaluate."""
    if name.startswith("task: "):
        stage = name[len("task: "):]
        return 2, f"{STAGE_ORDER.index(stage):03d}" if stage in STAGE_ORDER else f"~{stage}"
    return {"features": (0, ""), "labels": (1, ""), "task, other": (3, ""), "task": (3, ""),
            "evaluate": (4, "")}.get(name, (3, name))


def timing_bars(records: list[dict]) -> dict[str, dict[str, float]]:
    """Per run label (backbone / method / dataset / K; the mean over its runs, e.g. seeds, which the label then
    counts): seconds per part of the run, in pipeline order: features, labels, the task's own stages
    (``ctx.timed``; the rest of the task as "task, other"), evaluate."""
    rows = [r for r in records if r.get("timings")]
    if not rows:
        return {}
    frame = runs_frame(rows)
    parts: dict[str, list[dict[str, float]]] = {}
    for r, (_, row) in zip(rows, frame.iterrows()):
        label = f"{row.model}{DAGGER if r['random_weights'] else ''} / {row.method} / {row.column} / K={r['k']}"
        t, own = r["timings"], (r.get("stats") or {}).get("stage_seconds") or {}
        seconds = {"features": t.get("features", 0.0), "labels": t.get("labels", 0.0)}
        seconds.update({f"task: {name}": value for name, value in own.items()})
        seconds["task, other" if own else "task"] = max(t.get("task", 0.0) - sum(own.values()), 0.0)
        seconds["evaluate"] = t.get("evaluate", 0.0)
        parts.setdefault(label, []).append(seconds)
    return {label + (f" (mean of {len(runs)} runs)" if len(runs) > 1 else ""):
            {key: float(np.mean([s.get(key, 0.0) for s in runs]))
             for key in sorted({k for s in runs for k in s}, key=stage_rank)} for label, runs in parts.items()}


@_styled
def timings_figure(bars: dict[str, dict[str, float]]) -> Figure:
    """One horizontal stacked bar per run label (``timing_bars``): where its seconds went."""
    import textwrap

    # pipeline order across all bars (a stage first seen in a later bar must not land after "evaluate")
    names = sorted(dict.fromkeys(k for parts in bars.values() for k in parts), key=stage_rank)
    cmap = matplotlib.colormaps["tab20"]
    # long run labels wrapped (unwrapped, they squeeze the bars and push the axis label off the figure)
    shown = {label: textwrap.fill(label, 48) for label in bars}
    lines = sum(text.count("\n") + 1 for text in shown.values())
    fig = Figure(figsize=(12, 1.6 + 0.22 * lines + 0.2 * len(bars)), layout="constrained")
    ax = fig.subplots()
    labels = list(bars)
    left = np.zeros(len(labels))
    for i, name in enumerate(names):
        widths = np.array([bars[label].get(name, 0.0) for label in labels])
        ax.barh([shown[label] for label in labels], widths, left=left, color=cmap(i % cmap.N), label=name)
        left += widths
    ax.invert_yaxis()  # the first run on top, as in the tables
    ax.set_xlabel("seconds (mean over the runs of a row; the machine's load changes them)", loc="left")
    ax.set_title("Where each run's time goes")
    ax.grid(axis="x", alpha=0.3)
    fig.legend(loc="outside lower center", ncol=min(len(names), 5), frameon=False)
    return fig
