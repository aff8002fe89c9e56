"""What a recipe needs, what of it is here, and the sweep grids that run it.

- ``why_not_runnable``: a measure names a method outside ssl-bench, or a task / parameter / backbone /
  dataset not registered (yet): one line saying so, never an error.
- ``protocol_settings``: the paper's evaluation settings split into those this ssl-bench can run and those
  it cannot yet (each a difference recorded with the numbers it concerns).
- ``weights`` / ``data``: weight files and dataset folders, where they were looked for and what was found;
  ``work``: images x backbones to extract.
- ``grids``: one sweep grid per distinct run of the runnable cells (``sweep.grid_from_mapping`` reads them).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from .. import registry
from ..data import DATASETS, open_dataset
from ..data.protocol import Protocol
from ..data.shared import shared_data_dir
from ..errors import UserError
from .recipe import Measure, Recipe

# What ssl-bench does where a recipe names a protocol setting this version does not have: a paper setting
# equal to it is no difference (e.g. COMUS's majority vote at K > C is what metrics.py does).
IMPLIED_PROTOCOL = {"overclustering": "majority", "absent_classes": "ignore"}
DATA_ENV = "SSL_BENCH_DATA"


def why_not_runnable(m: Measure) -> str | None:
    """None when ssl-bench can measure ``m`` now; else why not, in one line."""
    if m.not_in_ssl_bench:
        return "method not in ssl-bench"
    if m.not_run:
        return m.not_run
    if m.task not in registry.tasks():
        return f"task '{m.task}' is not registered yet"
    spec = registry.tasks()[m.task]
    params = dict(m.params)
    known = set(spec.own_params())
    for slot, kind in spec.stages.items():  # a composed task: each slot's stage, and that stage's parameters
        stage = registry.stages(kind).get(params.get(slot, spec.params[slot]))
        if stage is None:
            return f"{kind} '{params[slot]}' is not registered yet"
        known |= {f"{slot}.{key}" for key in stage.params}
    unknown = sorted(set(params) - known)
    if unknown:
        return f"parameter {', '.join(unknown)} of task '{m.task}' is not registered yet"
    try:
        spec.resolve_params(dict(m.params))
    except UserError as err:
        return f"task '{m.task}' refuses its parameters ({err})"
    for name in (m.backbone, *backbones_in_params(m)):
        if name not in registry.backbones():
            return f"backbone '{name}' is not registered"
    if m.dataset not in DATASETS:
        return f"dataset '{m.dataset}' has no reader in ssl-bench"
    return None


def backbones_in_params(m: Measure) -> list[str]:
    """Backbones a task parameter names (DatUS^2's ``embed.backbone``): their weights are needed too."""
    names = [v for _, v in m.params if isinstance(v, str) and v in registry.backbones()]
    return [n for n in names if n != m.backbone]


def protocol_settings(m: Measure) -> tuple[dict, list[str]]:
    """(settings this ssl-bench runs, the paper's settings it cannot run yet -- one text each)."""
    known = {f.name for f in dataclasses.fields(Protocol)}
    runnable, missing = {}, []
    for key, value in m.protocol:
        if key not in known:
            if IMPLIED_PROTOCOL.get(key) != value:
                missing.append(f"{key}={value} (no such protocol setting in this ssl-bench yet)")
            continue
        try:
            Protocol(**{key: value})
        except (UserError, TypeError) as err:
            missing.append(f"{key}={value} ({err})")
            continue
        runnable[key] = value
    return runnable, missing


# ---- weights ------------------------------------------------------------------------------------------

@dataclass
class WeightsNeed:
    backbone: str
    file: str
    source: str  # where to download it (URL, hub name), or ""
    found: str | None  # where it was found (origin), None when missing
    rows: int  # rows of the recipe that read it


def weights(recipe: Recipe, runnable_only: bool = False) -> list[WeightsNeed]:
    """The weight files the recipe's rows need (non-learned backbones need none), and which are here: the
    backbones, those the parameters name, and what the task's code and its stages declare (``declared_weights``)."""
    from ..models.weights import expected_file, is_non_learned, locate

    rows: dict[str, set] = {}
    specs: dict[str, registry.BackboneSpec] = {}
    for cell in recipe.cells:
        m = cell.measure
        if runnable_only and why_not_runnable(m):
            continue
        for need in (m.backbone, *backbones_in_params(m), *declared_weights(m)):
            if isinstance(need, registry.BackboneSpec):
                specs[need.name], need = need, need.name
            if need:
                rows.setdefault(need, set()).add(cell.row)
    out = []
    for name, row_labels in rows.items():
        spec = specs.get(name) or registry.backbones().get(name)
        if spec is None or is_non_learned(spec):
            continue
        where = locate(spec)
        source = spec.url or (f"Hugging Face {spec.hf}" if spec.hf else (f"timm {spec.timm}" if spec.timm else ""))
        out.append(WeightsNeed(name, expected_file(spec), source, where[0] if where else None, len(row_labels)))
    return out


def declared_weights(m: Measure) -> list:
    """Weights a run needs beyond its backbone, as the code declares them: an optional
    ``weights_needed(params)`` next to the task's entry point (e.g. the composed engine's de-noiser encoder) and
    on each stage's class (e.g. COMUS's BASNet), returning registered backbone names or ``BackboneSpec``s."""
    if why_not_runnable(m):
        return []
    spec = registry.tasks()[m.task]
    params = spec.resolve_params(dict(m.params))
    found: list = []
    hook = _optional_attribute(spec.entrypoint, "weights_needed")
    if hook is not None:
        found += hook(params)
    for slot, kind in spec.stages.items():
        stage = registry.stages(kind)[params[slot]]
        hook = getattr(registry.load_entrypoint(stage.entrypoint), "weights_needed", None)
        if hook is not None:
            found += hook(**registry.slot_params(params, slot))
    return found


def _optional_attribute(entrypoint: str, name: str):
    import importlib

    return getattr(importlib.import_module(entrypoint.split(":", 1)[0]), name, None)


# ---- data ---------------------------------------------------------------------------------------------

@dataclass
class DataNeed:
    dataset: str
    split: str | None  # as the recipe asks (None: the dataset's evaluation split)
    options: tuple
    folder: str
    paper_images: int | None
    root: str | None = None  # the folder that opened
    images: int | None = None  # images found there (None: not found)
    opened_split: str | None = None
    problem: str | None = None  # why it did not open
    looked: list[str] = field(default_factory=list)

    @property
    def key(self) -> tuple:
        return (self.dataset, self.split, self.options)

    @property
    def present(self) -> bool:
        return self.images is not None

    @property
    def subset(self) -> bool:
        return self.present and self.paper_images is not None and self.images != self.paper_images

    @property
    def label(self) -> str:
        split = self.opened_split or self.split
        return f"{self.dataset}:{split}" if split else self.dataset


def candidate_roots(dataset: str, folder: str, data_roots: dict[str, str]) -> list[tuple[str, str | None]]:
    """(where, root) to try in order: --data-root NAME=PATH; else no folder (generated datasets),
    $SSL_BENCH_DATA/FOLDER, then the shared samples beside the checkout (../shared/data/FOLDER)."""
    if dataset in data_roots:
        return [("--data-root", data_roots[dataset])]
    out = [("generated", None)]
    if os.environ.get(DATA_ENV):
        out.append((f"${DATA_ENV}", str(Path(os.environ[DATA_ENV]) / folder)))
    shared = shared_data_dir()
    if shared is not None:
        out.append(("shared samples", str(shared / folder)))
    return out


def data(recipe: Recipe, data_roots: dict[str, str] | None = None, options: dict | None = None,
         runnable_only: bool = False) -> list[DataNeed]:
    """Each (dataset, split, reader options) the recipe evaluates, and whether it opens here."""
    needs: dict[tuple, DataNeed] = {}
    for cell in recipe.cells:
        m = cell.measure
        if m.dataset is None or (runnable_only and why_not_runnable(m)):
            continue
        for each in splits_read(m):
            key = (each.dataset, each.split, each.options)
            if key not in needs:
                needs[key] = _locate(each, data_roots or {}, options or {})
    return list(needs.values())


def splits_read(m: Measure) -> list[Measure]:
    """The measure, and the split its method fits on when that is another one (tasks' ``fit_split`` convention,
    e.g. PriMaPs fitted on train): both must be here."""
    fit = dict(m.params).get("fit_split")
    return [m] + ([replace(m, split=fit, images=None)] if isinstance(fit, str) and fit != m.split else [])


def _locate(m: Measure, data_roots: dict[str, str], options: dict) -> DataNeed:
    need = DataNeed(m.dataset, m.split, m.options, m.data_folder, m.images)
    if m.dataset not in DATASETS:
        need.problem = "no reader in ssl-bench"
        return need
    need.problem = f"not found (give --data-root {m.dataset}=PATH or set ${DATA_ENV})"
    for where, root in candidate_roots(m.dataset, m.data_folder, data_roots):
        if root is not None:
            need.looked.append(f"{where} {root}")
            if not Path(root).is_dir():
                need.problem = f"no folder {root}"
                continue
        try:
            dataset = open_dataset(m.dataset, root, m.split, **{**dict(m.options), **options})
        except UserError as err:
            if root is not None:  # a real dataset refuses "no folder" at once: not worth a line
                need.problem = str(err).split(" -- ")[0]
            continue
        need.root, need.images, need.opened_split, need.problem = root, len(dataset), dataset.split, None
        break
    return need


def work(recipe: Recipe, needs: list[DataNeed], runnable_only: bool = False, limit: int | None = None) -> tuple[int, int]:
    """(backbones, image passes in all): one extraction pass per (backbone, dataset split), of the paper's image
    count where the recipe gives it (else of the images found here); with ``limit`` (--limit): of the images
    found here, which the limit already cut (absent data: the limit, or the paper's count if fewer)."""
    found = {n.key: n for n in needs}
    passes, backbones = {}, set()
    for cell in recipe.cells:
        m = cell.measure
        if m.backbone is None or m.dataset is None or (runnable_only and why_not_runnable(m)):
            continue
        need = found.get((m.dataset, m.split, m.options))
        found_here = need.images if need and need.present else None
        if limit is not None:  # this run's work
            images = found_here if found_here is not None else min(limit, m.images or limit)
        else:  # the paper's work
            images = m.images or found_here or 0
        passes[(m.backbone, m.dataset, m.split, m.options)] = images
        backbones.add(m.backbone)
    return len(backbones), sum(passes.values())


# ---- grids ----------------------------------------------------------------------------------------------

def grids(measures: list[Measure], roots: dict[tuple, str | None], weights_choice: str | None = None,
          limit: int | None = None) -> list[dict]:
    """One sweep grid mapping (``examples/sweep.yaml`` keys) per distinct run of ``measures``; ``roots`` maps
    (dataset, split, options) to the folder that opened. Stream, view and metric are read back from the store."""
    out, seen = [], set()
    for m in measures:
        if m.run in seen:
            continue
        seen.add(m.run)
        options = {**dict(m.options), **({"limit": limit} if limit else {})}
        grid = {"backbones": [m.backbone], "tasks": [{"name": m.task, "params": dict(m.params)}],
                "datasets": [{"name": m.dataset, "data_root": roots.get((m.dataset, m.split, m.options)),
                              "split": m.split, "options": options}],
                "k": [m.k], "seeds": list(m.seeds), "protocol": protocol_settings(m)[0]}
        if weights_choice:
            grid["weights"] = weights_choice
        out.append(grid)
    return out
