"""Recipe files (``recipes/*.yaml``, one per published table): read, checked, and flattened into paper cells.

A recipe holds the paper's numbers cell by cell and says how ssl-bench measures each one. The measure
is written once for the whole table (``measure``), then refined, in this order, by a row (its backbone,
task, K ...), by a column (what the column means whatever the row, e.g. PriMaPs' supervised columns are
the linear probe of the row's features) and by a row's own exception for one column (``rows[i].columns``).
Mappings (``params``, ``options``, ``protocol``) merge, other values replace, and naming another task
drops the parameters given for the previous one.
Every paper value becomes one ``PaperCell``: the number, its tolerance and the ``Measure`` that produces
ours. Cells with equal ``Measure.run`` share one run (one sweep grid), so a table whose columns are
streams or metrics of one run computes it once.

Nothing here touches the registries of backbones and tasks: a recipe may name what is not built yet
(``needs.py`` says what can run).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import UserError
from ..registry import is_number, is_whole, read_yaml_mapping, registry_dir

MEASURE_KEYS = ("backbone", "task", "params", "dataset", "split", "options", "images", "folder", "k", "seeds",
                "stream", "view", "metric", "protocol", "not_in_ssl_bench", "not_run")
MERGED = ("params", "options", "protocol")  # mappings: a refinement adds keys, it does not replace the mapping
VIEWS = ("headline", "labelled")  # headline: unlabelled pixels count wrong; labelled: scored on labelled pixels only
TOP_KEYS = ("name", "title", "paper", "measure", "columns", "rows", "differences", "notes")
PAPER_KEYS = ("file", "document", "table", "about")
COLUMN_KEYS = ("header", "tolerance", *MEASURE_KEYS)
ROW_KEYS = ("label", "paper", "tolerance", "columns", "source", "note", *MEASURE_KEYS)
SOURCES = ("table", "prose")  # prose: a value the paper quotes in its text (its table is not in the text copy)

# Metric names a cell may compare (see ``compare.metric_value``).
_COUNT_OR_MEAN = re.compile(r"^(classes|miou_of_classes)_iou(>=|>)(\d+(?:\.\d+)?)$")
_PER_CLASS = re.compile(r"^iou\[(.+)\]$")
_STATS = re.compile(r"^stats(\.[A-Za-z0-9_@-]+)+$")
HEADLINE_METRICS = ("miou", "acc", "f1")


def check_metric(metric: str, where: str) -> None:
    if metric in HEADLINE_METRICS or _COUNT_OR_MEAN.match(metric) or _PER_CLASS.match(metric) or _STATS.match(metric):
        return
    raise UserError(f"{where}: unknown metric {metric!r} -- use miou, acc, f1, iou[CLASS], classes_iou>=20, "
                    f"miou_of_classes_iou>0 or stats.PATH (e.g. stats.segments.total)")


@dataclass(frozen=True)
class Tolerance:
    """How far ours may be from the paper's value: ``amount`` points, or ``amount`` % of the paper's value."""

    amount: float
    relative: bool = False

    def limit(self, paper: float) -> float:
        return abs(paper) * self.amount / 100 if self.relative else self.amount

    def text(self) -> str:
        return f"±{self.amount:g}%" if self.relative else f"±{self.amount:g}"

    @classmethod
    def parse(cls, value, where: str) -> "Tolerance":
        if is_number(value) and value >= 0:
            return cls(float(value))
        if isinstance(value, str) and value.strip().endswith("%"):
            try:
                amount = float(value.strip()[:-1])
            except ValueError:
                amount = -1.0
            if amount >= 0:
                return cls(amount, relative=True)
        raise UserError(f"{where}: tolerance {value!r} is not a tolerance -- give points >= 0 or a percentage "
                        f"of the paper value, e.g. 2.0 or '10%'")


def _pairs(mapping: dict) -> tuple:
    return tuple(sorted(mapping.items()))


@dataclass(frozen=True)
class Measure:
    """How one paper value is measured: one sweep cell per seed, and what to read from the stored rows."""

    backbone: str | None = None
    task: str | None = None
    params: tuple = ()  # sorted (key, value)
    dataset: str | None = None
    split: str | None = None  # None: the dataset's evaluation split
    options: tuple = ()  # dataset reader options
    images: int | None = None  # images of the split in the paper (a run on fewer is a subset, never compared)
    folder: str | None = None  # folder name under $SSL_BENCH_DATA (default: the dataset name)
    k: int | str = "C"
    seeds: tuple = (0,)
    stream: str = "final"  # prediction stream, "NAME" or "NAME@SPLIT"
    view: str = "headline"
    metric: str = "miou"
    protocol: tuple = ()  # the paper's evaluation settings (sweep ``protocol`` keys)
    not_in_ssl_bench: bool = False  # the method of this row is not one of ssl-bench's
    not_run: str | None = None  # another reason the value cannot be measured here

    @property
    def run(self) -> tuple:
        """The identity of the sweep cells behind this measure (equal: one run serves both)."""
        return (self.backbone, self.task, self.params, self.dataset, self.split, self.options, self.k, self.seeds,
                self.protocol)

    @property
    def data_folder(self) -> str:
        return self.folder or (self.dataset or "")

    @property
    def stream_split(self) -> tuple[str, str | None]:
        name, _, split = self.stream.partition("@")
        return name, split or None


@dataclass(frozen=True)
class PaperCell:
    row: str  # the paper's row label
    column: str  # column key
    header: str  # the paper's column header
    value: float
    tolerance: Tolerance
    measure: Measure
    source: str = "table"
    note: str | None = None


@dataclass
class Recipe:
    name: str
    title: str
    paper: dict
    path: Path
    headers: dict  # column key -> header, in the paper's order
    rows: list[str]  # row labels, in the paper's order
    cells: list[PaperCell]
    differences: list[str] = field(default_factory=list)  # the paper's protocol vs the one this recipe runs
    notes: list[str] = field(default_factory=list)

    @property
    def reference(self) -> str:
        p = self.paper
        return f"{p.get('document', '?')}, {p.get('table', '?')} ({p.get('file', '?')})"

    def select(self, only: str | None) -> "Recipe":
        """The rows whose label contains ``only`` (case-insensitive); all rows for None."""
        if not only:
            return self
        rows = [r for r in self.rows if only.lower() in r.lower()]
        if not rows:
            raise UserError(f"no row of recipe {self.name} matches --only {only!r} -- rows: {', '.join(self.rows)}")
        return replace(self, rows=rows, cells=[c for c in self.cells if c.row in rows])


# ---- reading ----------------------------------------------------------------------------------------------

def recipe_dir() -> Path:
    return registry_dir("recipes")


def recipe_paths() -> dict[str, Path]:
    return {p.stem: p for p in sorted(recipe_dir().glob("*.yaml"))}


def find(name_or_path: str) -> Path:
    """A recipe by registered name (``datus2-table1``) or by file path."""
    paths = recipe_paths()
    if name_or_path in paths:
        return paths[name_or_path]
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    import difflib

    close = difflib.get_close_matches(name_or_path, list(paths), n=3)
    hint = f"did you mean {', '.join(close)}?" if close else "list them with `ssl-bench reproduce`"
    raise UserError(f"unknown recipe '{name_or_path}' -- {hint}")


def load(name_or_path: str | Path) -> Recipe:
    path = find(str(name_or_path))
    data = read_yaml_mapping(path, "recipe", "the files in recipes/")
    where = str(path)
    _check_keys(data, TOP_KEYS, where)
    name = data.get("name")
    if name != path.stem:
        raise UserError(f"{where}: name {name!r} must be the file's name {path.stem!r} -- rename one of them")
    paper = data.get("paper") or {}
    if not isinstance(paper, dict) or not paper.get("table"):
        raise UserError(f"{where}: paper does not name the table -- e.g. paper: {{file: 000_....txt, document: ..., table: Table I}}")
    _check_keys(paper, PAPER_KEYS, f"{where}: paper")
    base = _measure_mapping(data.get("measure") or {}, f"{where}: measure")
    columns = data.get("columns")
    if not isinstance(columns, dict) or not columns:
        raise UserError(f"{where}: no columns -- map each column key to its spec, e.g. columns: {{miou: {{header: mIoU, tolerance: 2.0}}}}")
    column_specs = {}
    for key, spec in columns.items():
        spec = spec or {}
        if not isinstance(spec, dict):
            raise UserError(f"{where}: column {key!r} is not a mapping -- e.g. {{header: mIoU, tolerance: 2.0}}")
        _check_keys(spec, COLUMN_KEYS, f"{where}: column {key}")
        column_specs[str(key)] = spec
    rows = data.get("rows")
    if not isinstance(rows, list) or not rows:
        raise UserError(f"{where}: no rows -- list the paper's rows, each with a label and its paper values")
    cells, labels = [], []
    for i, row in enumerate(rows):
        cells += _row_cells(row, i, base, column_specs, where, labels)
    recipe = Recipe(name=name, title=str(data.get("title") or name), paper=paper, path=path,
                    headers={k: str(s.get("header", k)) for k, s in column_specs.items()}, rows=labels, cells=cells,
                    differences=_texts(data.get("differences"), f"{where}: differences"),
                    notes=_texts(data.get("notes"), f"{where}: notes"))
    if not recipe.cells:
        raise UserError(f"{where}: no row has a paper value -- transcribe the table's numbers under each row's paper:")
    return recipe


def _row_cells(row, index: int, base: dict, columns: dict, where: str, labels: list) -> list[PaperCell]:
    if not isinstance(row, dict) or not isinstance(row.get("label"), str):
        raise UserError(f"{where}: row {index + 1} has no label -- give each row label: (the paper's row name) and paper: (its values)")
    label = row["label"]
    here = f"{where}: row {label!r}"
    if label in labels:
        raise UserError(f"{here} is given twice -- row labels must be unique (add the backbone or setting)")
    labels.append(label)
    _check_keys(row, ROW_KEYS, here)
    values = row.get("paper")
    if not isinstance(values, dict):
        raise UserError(f"{here}: paper is not a mapping -- map column keys to the paper's numbers (null where the paper has none)")
    unknown = sorted(set(values) - set(columns))
    overrides = row.get("columns") or {}
    unknown += sorted(set(overrides) - set(columns))
    if unknown:
        raise UserError(f"{here}: unknown column(s) {', '.join(map(str, unknown))} -- columns: {', '.join(columns)}")
    source = row.get("source", "table")
    if source not in SOURCES:
        raise UserError(f"{here}: unknown source {source!r} -- use {' or '.join(SOURCES)}")
    tolerances = row.get("tolerance") or {}
    if not isinstance(tolerances, dict):
        raise UserError(f"{here}: tolerance is not a mapping -- map column keys to tolerances, e.g. {{miou: 3.0}}")
    row_measure = {k: v for k, v in row.items() if k in MEASURE_KEYS}
    cells = []
    for column, spec in columns.items():
        value = values.get(column)
        if value is None:
            continue  # the paper has no number there ("–")
        if not is_number(value) or not math.isfinite(value):
            raise UserError(f"{here}: paper value of {column} is {value!r}, not a number -- transcribe the number (null where the paper has none)")
        override = overrides.get(column) or {}
        if not isinstance(override, dict):
            raise UserError(f"{here}: columns.{column} is not a mapping -- give measure keys, e.g. {{task: stego, stream: linear}}")
        _check_keys(override, MEASURE_KEYS, f"{here}: columns.{column}")
        merged = base
        for layer, name in ((row_measure, "row"), ({k: v for k, v in spec.items() if k in MEASURE_KEYS},
                                                   f"column {column}"), (override, f"columns.{column}")):
            merged = _merge(merged, _measure_mapping(layer, f"{here}: {name}"))
        merged.setdefault("metric", column)
        measure = _measure(merged, f"{here}, column {column}")
        tolerance = tolerances.get(column, spec.get("tolerance"))
        if tolerance is None:
            raise UserError(f"{where}: column {column} has no tolerance -- give columns.{column}.tolerance (points, "
                            f"or a percentage such as '10%')")
        cells.append(PaperCell(label, column, str(spec.get("header", column)), float(value),
                               Tolerance.parse(tolerance, f"{here}, column {column}"), measure, source,
                               row.get("note")))
    return cells


def _measure_mapping(data, where: str) -> dict:
    if not isinstance(data, dict):
        raise UserError(f"{where} is not a mapping -- give measure keys ({', '.join(MEASURE_KEYS)})")
    _check_keys(data, MEASURE_KEYS, where)
    for key in MERGED:
        if key in data and not isinstance(data[key] or {}, dict):
            raise UserError(f"{where}: {key} is not a mapping -- e.g. {key}: {{name: value}}")
    return dict(data)


def _merge(base: dict, layer: dict) -> dict:
    out = dict(base)
    if "task" in layer and layer["task"] != out.get("task"):
        out.pop("params", None)  # parameters belong to a task: another task starts from its own defaults
    for key, value in layer.items():
        out[key] = {**(out.get(key) or {}), **(value or {})} if key in MERGED else value
    return out


def _measure(data: dict, where: str) -> Measure:
    seeds = data.get("seeds", [0])
    seeds = seeds if isinstance(seeds, list) else [seeds]
    if not seeds or not all(is_whole(s) and s >= 0 for s in seeds):
        raise UserError(f"{where}: seeds {seeds!r} are not whole numbers >= 0 -- e.g. seeds: [0, 1, 2]")
    view = data.get("view", "headline")
    if view not in VIEWS:
        raise UserError(f"{where}: unknown view {view!r} -- use {' or '.join(VIEWS)}")
    images = data.get("images")
    if images is not None and not (is_whole(images) and images > 0):
        raise UserError(f"{where}: images {images!r} is not an image count -- give the paper's (a whole number > 0)")
    metric = str(data.get("metric"))
    check_metric(metric, where)
    k = data.get("k", "C")
    if not (is_whole(k) and k > 0) and not re.fullmatch(r"\s*\d*\s*\*?\s*C\s*", str(k), re.IGNORECASE):
        raise UserError(f"{where}: k {k!r} is not a number of clusters -- give a number or C, 2C ... (multiples of the classes)")
    stream = str(data.get("stream", "final"))
    if not re.fullmatch(r"[A-Za-z0-9_-]+(@[A-Za-z0-9_-]+)?", stream):
        raise UserError(f"{where}: stream {stream!r} is not NAME or NAME@SPLIT -- e.g. initial@train")
    texts = {key: data.get(key) for key in ("backbone", "task", "dataset", "split", "folder", "not_run")}
    for key, value in texts.items():
        if value is not None and not isinstance(value, str):
            raise UserError(f"{where}: {key} {value!r} is not a text -- e.g. {key}: name")
    if not isinstance(data.get("not_in_ssl_bench", False), bool):
        raise UserError(f"{where}: not_in_ssl_bench is not true or false -- e.g. not_in_ssl_bench: true")
    runnable = not data.get("not_in_ssl_bench") and not data.get("not_run")
    if runnable and not (texts["backbone"] and texts["task"] and texts["dataset"]):
        missing = [key for key in ("backbone", "task", "dataset") if not texts[key]]
        raise UserError(f"{where}: no {', '.join(missing)} -- name them, or mark the row not_in_ssl_bench: true "
                        f"(a method ssl-bench does not have) or not_run: REASON")
    return Measure(backbone=texts["backbone"], task=texts["task"], params=_pairs(data.get("params") or {}),
                   dataset=texts["dataset"], split=texts["split"], options=_pairs(data.get("options") or {}),
                   images=images, folder=texts["folder"], k=k, seeds=tuple(dict.fromkeys(seeds)), stream=stream,
                   view=view, metric=metric, protocol=_pairs(data.get("protocol") or {}),
                   not_in_ssl_bench=bool(data.get("not_in_ssl_bench", False)), not_run=texts["not_run"])


def _texts(value, where: str) -> list[str]:
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(v, str) for v in items):
        raise UserError(f"{where} is not a list of texts -- write one sentence per item")
    return [" ".join(v.split()) for v in items]


def _check_keys(data: dict, allowed: tuple, where: str) -> None:
    unknown = sorted(set(map(str, data)) - set(allowed))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)} -- allowed: {', '.join(allowed)}")
