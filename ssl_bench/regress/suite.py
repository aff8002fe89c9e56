"""A regression suite: grids whose cells carry readable names, read from a file, and run in a scratch store.

Any sweep file is a suite (one grid, or several under ``grids:``; see examples/sweep.yaml). Which reader
reads a file is decided by its content, in the order of ``SUITE_FORMATS``: another declarative format (a
``reproduce`` recipe: grids plus a paper's values and tolerances) plugs in as one more reader that returns
the same ``Suite`` with ``expected`` filled in, and everything after reading (naming, running, comparing,
reporting) is shared.

A cell's name is built from what the suite file says, K resolved (``reference/kmeans/synthetic:val[n=12]
K=5 seed=0``): the same cell has the same name wherever and whenever it runs, and a reviewer reads it. The
name holds the weights as written (``dino-vits16(ckpt/last.pth)``), not their digest: the digest of a
weights file is kept beside the numbers, so a baseline can hold for the path or for exactly one file.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping

from ..data.protocol import Protocol
from ..errors import UserError
from ..sweep import Cell, Grid, SkippedGrid, grids_from_mapping, make_plan, read_grid_file

if TYPE_CHECKING:
    from .baselines import Baselines

METRICS = ("miou", "acc", "f1")  # the headline metrics every cell is checked on (percent)
THREADS = 2  # torch, OpenMP, BLAS and numba: a fixed count keeps float reductions in one order run after run


@dataclass
class Suite:
    source: Path
    grids: list[Grid]
    skipped: list[SkippedGrid] = field(default_factory=list)  # optional grids whose data is absent here
    expected: Baselines | None = None  # values the file itself carries (a recipe); None: the --baselines file
    # weight files as the file writes them, by the absolute path a run loads: a cell's name keeps the written
    # form, so a baseline made in one checkout holds in another (a CI runner's)
    written: dict[str, str] = field(default_factory=dict)


# A reader: (path, parsed mapping, environment for $NAME) -> the suite, or None when the file is not its format.
SuiteReader = Callable[[Path, dict, Mapping[str, str]], "Suite | None"]


def sweep_suite(path: Path, data: dict, env: Mapping[str, str]) -> Suite:
    grids, skipped = grids_from_mapping(data, str(path), env)
    return Suite(path, grids, skipped)


SUITE_FORMATS: list[tuple[str, SuiteReader]] = [("sweep file", sweep_suite)]  # the most general format last


def read_suite(path: Path, env: Mapping[str, str] | None = None) -> Suite:
    """The suite in ``path``, read by the first of ``SUITE_FORMATS`` that recognises it."""
    import os

    resolved: list[tuple[str, str]] = []
    data = read_grid_file(path, "suite file", resolved)
    for _, reader in SUITE_FORMATS:
        suite = reader(Path(path), data, os.environ if env is None else env)
        if suite is not None:
            suite.written = {absolute: written for written, absolute in resolved}
            return suite
    raise UserError(f"{path} is none of: {', '.join(name for name, _ in SUITE_FORMATS)} -- see examples/sweep.yaml")


# ---- cell names --------------------------------------------------------------------------------------

def cell_entry(cell: Cell, written: Mapping[str, str] | None = None) -> dict:
    """A cell's configuration as its suite states it (K resolved; the dataset options the run kept; a weights
    file as ``written`` maps its absolute path back to the file's text): what its baselines are keyed by.
    Defaults the suite did not state are left out, so the entry stays short."""
    asked, config = cell.config, cell.run.config
    entry: dict = {"backbone": config["backbone"]}
    if config["random_weights"]:
        entry["weights"] = "random"
        if config["weights_seed"]:
            entry["weights_seed"] = config["weights_seed"]
    elif asked.weights:
        entry["weights"] = (written or {}).get(asked.weights, asked.weights)
    entry["task"] = config["task"]
    if asked.params:
        entry["params"] = dict(asked.params)
    entry.update(dataset=config["dataset"], split=config["split"])
    if config["dataset_options"]:
        entry["options"] = dict(sorted(config["dataset_options"].items()))
    entry.update(k=config["k"], seed=config["seed"])
    protocol = {f.name: getattr(asked.protocol, f.name) for f in dataclasses.fields(Protocol)
                if getattr(asked.protocol, f.name) != f.default}
    if protocol:
        entry["protocol"] = protocol
    return entry


def cell_name(entry: dict) -> str:
    """``backbone(weights)/task(params)/dataset:split[options] K=k seed=s [protocol]`` of a ``cell_entry``."""
    def pairs(mapping: dict | None) -> str:
        return ",".join(f"{k}={v}" for k, v in (mapping or {}).items())

    weights = entry.get("weights")
    if weights == "random":
        weights = f"random:{entry['weights_seed']}" if entry.get("weights_seed") else "random"
    backbone = f"{entry['backbone']}({weights})" if weights else entry["backbone"]
    task = f"{entry['task']}({pairs(entry.get('params'))})" if entry.get("params") else entry["task"]
    options = f"[{pairs(entry.get('options'))}]" if entry.get("options") else ""
    protocol = "".join(f" {k}={v}" for k, v in (entry.get("protocol") or {}).items())
    dataset = f"{entry['dataset']}:{entry['split']}{options}"
    return f"{backbone}/{task}/{dataset} K={entry['k']} seed={entry['seed']}{protocol}"


@dataclass
class SuiteCell:
    name: str
    entry: dict  # cell_entry
    cell: Cell
    weights_sha256: str | None  # content digest of the weights file; None: random weights or nothing to load
    weights_match: str  # "path" | "exact" (sweep.BackboneChoice)


def _weights_matches(grids: list[Grid]) -> dict[tuple, str]:
    """(backbone, weights, weights seed) as the suite asks for them -> its weights_match."""
    matches: dict[tuple, str] = {}
    for grid in grids:
        for choice in grid.backbones:
            key = (choice.name, choice.weights, choice.weights_seed)
            if matches.setdefault(key, choice.weights_match) != choice.weights_match:
                raise UserError(f"backbone {choice.name} with weights {choice.weights} has weights_match "
                                f"{matches[key]} in one grid and {choice.weights_match} in another -- choose one")
    return matches


# ---- running -----------------------------------------------------------------------------------------

@dataclass
class SuiteRun:
    """What running a suite gave: every selected cell, the metrics of those computed, and why the others were not."""

    cells: dict[str, SuiteCell]  # name -> cell, for every cell selected (computed, failed or refused)
    metrics: dict[str, dict[str, float]]  # name -> {metric: percent, rounded to 4 decimals}
    failed: dict[str, str]  # name -> one-line reason (the cell could not be computed)
    refused: dict[str, str]  # name -> why it was not computed (``refuse`` said so)
    skipped: list[SkippedGrid]
    notes: list[str]  # grid lines worth showing (backbone x task pairs that cannot run)
    seconds: float


def run_suite(suite: Suite, only: str | None = None, refuse: Callable[[SuiteCell], str | None] = lambda cell: None,
              device: str = "cpu", on_cell: Callable[[str, str], None] = lambda name, status: None) -> SuiteRun:
    """The cells of ``suite`` whose name contains ``only`` (all by default), computed in a temporary store and
    cache (never the user's), with fixed thread counts and seeds so two runs on one machine give the same
    numbers; a cell ``refuse`` gives a reason for (weights that are not the pinned file) is not computed."""
    import torch

    from ..executors import run_local
    from ..features import FeatureCache
    from ..ops import set_threads
    from ..runner import Runner
    from ..store import ResultStore
    from ..sweep import describe

    matches = _weights_matches(suite.grids)
    cells: dict[str, SuiteCell] = {}
    refused: dict[str, str] = {}

    def select(cell: Cell) -> bool:
        entry = cell_entry(cell, suite.written)
        name = cell_name(entry)
        if only is not None and only not in name:
            return False
        other = cells.get(name)
        if other is not None and other.cell.run.config_hash != cell.run.config_hash:
            raise UserError(f"two cells of {suite.source} are both named {name} (they differ only in what a "
                            f"name leaves out, e.g. the data root) -- keep one of them")
        weights = cell.run.weights
        cells[name] = SuiteCell(name, entry, cell, weights.identity if weights.path is not None else None,
                                matches[(cell.config.backbone, cell.config.weights, cell.config.weights_seed)])
        reason = refuse(cells[name])
        if reason is not None:
            refused[name] = reason
        return reason is None

    before = torch.get_num_threads()
    set_threads(THREADS)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="ssl-bench-regress-") as tmp:
            runner = Runner(ResultStore(Path(tmp) / "results.sqlite"), FeatureCache(Path(tmp) / "cache"), device)
            plan = make_plan(suite.grids, runner, select)
            planned = {cell.run.config_hash for cell in plan.cells}
            names: dict[str, list[str]] = {}  # one run may carry several names (kmeans, kmeans(iterations=50))
            for name, suite_cell in cells.items():
                if suite_cell.cell.run.config_hash in planned and name not in refused:
                    names.setdefault(suite_cell.cell.run.config_hash, []).append(name)
            failed: dict[str, str] = {}

            def report(cell: Cell, status: str) -> None:
                for name in names[cell.run.config_hash]:
                    if status.startswith("failed: "):
                        failed[name] = status.removeprefix("failed: ")
                    on_cell(name, status)

            run_local(plan, runner, on_cell=report)
            metrics = {}
            for config_hash, named in names.items():
                record = runner.store.get(config_hash)
                for name in named if record is not None else ():
                    metrics[name] = {metric: round(float(record[metric]), 4) for metric in METRICS}
    finally:
        set_threads(before)
    notes = [line for line in describe(plan) if line.startswith("skipped ")]
    planned_names = {name for named in names.values() for name in named} | set(refused)  # not a pair that cannot run
    kept = {name: cell for name, cell in cells.items() if name in planned_names}
    return SuiteRun(kept, metrics, failed, refused, suite.skipped, notes, time.perf_counter() - t0)
