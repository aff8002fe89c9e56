"""Sweeps: a declarative grid (backbones x tasks x datasets x K x seeds) expanded into runner cells.

A grid comes from a YAML file (see examples/sweep.yaml) or from repeated command-line flags; a file may
also hold several grids under ``grids:`` (their cells are planned together, so they share extractions),
and a grid marked ``optional`` is skipped, with the reason, where its data is absent. The plan resolves
every cell to its configuration hash, drops the cells already in the store and groups the remaining ones
by feature-cache entry (backbone, weights, dataset, split, protocol), so each entry is extracted once,
with the union of the feature kinds its cells' tasks read, before any cell runs.

Resuming is the store's job: a cell is stored in one SQLite transaction when it is complete, so a
sweep killed at any moment and started again computes exactly the cells that are not stored yet.
Executors (local in-process, Ray) live in ``executors.py``; they share ``Plan`` and ``SweepSummary``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from . import registry, versions
from .registry import brief, counted
from .data.protocol import Protocol
from .errors import UserError
from .kbounds import KIsClasses
from .features import CacheKey
from .models.weights import is_non_learned
from .runner import ResolvedRun, RunConfig, Runner, before_scoring_rules_hashes, earlier_version_hashes
from .store import MAX_INTEGER

GRID_KEYS = ("backbones", "tasks", "datasets", "k", "seeds", "weights", "weights_seed", "protocol",
             "table")  # table: the layout of `ssl-bench report --rows FILE` (report/rows.py); no cells
BACKBONE_KEYS = ("name", "weights", "weights_seed", "weights_match")
WEIGHTS_MATCH = ("path", "exact")  # what a regression baseline of a weights file holds to: see BackboneChoice
_K_EXPRESSION = re.compile(r"^\s*(\d*)\s*\*?\s*C\s*$", re.IGNORECASE)
_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


# ---- the grid -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BackboneChoice:
    name: str
    weights: str | None = None  # path, "random", or None (the usual search)
    weights_seed: int = 0
    # read by ``ssl-bench regress`` only: a baseline holds for whatever the weights file now holds ("path": a
    # checkpoint overwritten by each training run), or for exactly the file it was measured on ("exact")
    weights_match: str = "path"


@dataclass(frozen=True)
class TaskChoice:
    name: str
    params: tuple = ()  # sorted (key, value) overrides


@dataclass(frozen=True)
class DatasetChoice:
    name: str
    data_root: str | None = None
    split: str | None = None
    options: tuple = ()  # sorted (key, value) reader options, e.g. (("limit", 25),)


@dataclass
class Grid:
    backbones: list[BackboneChoice]
    tasks: list[TaskChoice]
    datasets: list[DatasetChoice]
    ks: list[int | str] = field(default_factory=lambda: ["C"])  # numbers or multiples of C (classes)
    seeds: list[int] = field(default_factory=lambda: [0])
    protocol: Protocol = Protocol()

    def __post_init__(self):
        for axis, key in (("backbones", "backbones"), ("tasks", "tasks"), ("datasets", "datasets"), ("ks", "k"),
                          ("seeds", "seeds")):
            if not getattr(self, axis):
                raise UserError(f"the sweep grid has an empty '{key}' list -- give at least one value")
        for choice in self.backbones:
            registry.backbone(choice.name)  # unknown names fail now, with a suggestion, not mid-sweep
        for choice in self.tasks:
            registry.task(choice.name).resolve_params(dict(choice.params))


def resolve_k(k: int | str, num_classes: int) -> int:
    """A K value of the grid: a number, or ``C``, ``2C``, ``3*C`` ... relative to the class count."""
    if isinstance(k, bool):
        raise UserError(f"K value {brief(k)} is not a number or a multiple of C -- use C, 2C, 3C ... or a number (--k 2C)")
    if isinstance(k, int):
        if k < 1:
            raise UserError(f"K must be at least 1, got {k} -- use C, 2C, 3C ... or a number of 1 or more (--k C)")
        return k
    match = _K_EXPRESSION.match(str(k))
    if match is None:
        if str(k).strip().isdigit():
            return resolve_k(int(k), num_classes)
        if str(k).strip().lstrip("-").isdigit():  # a negative number: say what is wrong with it
            return resolve_k(int(k), num_classes)
        raise UserError(f"K value {brief(k)} is not a number or a multiple of C -- use C, 2C, 3C ... or a number (--k 2C)")
    multiple = int(match.group(1) or 1)
    if multiple < 1:
        raise UserError(f"K value {brief(k)} gives K = 0 -- use C, 2C, 3C ...")
    if num_classes < 1:
        raise UserError(f"K value {brief(k)} counts classes, and a dataset without ground truth has none -- give K as "
                        f"a number, e.g. --k 8")
    return multiple * num_classes


def _pairs(mapping: Any, what: str) -> tuple:
    if mapping is None:
        return ()
    if not isinstance(mapping, dict):
        raise UserError(f"{what} must be a mapping of key: value, got {brief(mapping)}")
    return tuple(sorted((str(k).replace("-", "_"), v) for k, v in mapping.items()))


def expand_params(task: str, pairs: tuple) -> list[tuple]:
    """A task's parameter pairs with every list value (for a parameter whose default is not a list) expanded
    into one choice per value: ``{segmenter: [louvain, dsm], clusterer: [kmeans, sinkhorn]}`` is four cells,
    each its own leaderboard row."""
    import itertools

    spec = registry.task(task)

    def takes_lists(key: str) -> bool:
        slot, _, name = key.partition(".")
        if not name:
            return isinstance(spec.params.get(key), list)
        kind = spec.stages.get(slot)
        return bool(kind) and any(isinstance(stage.params.get(name), list) for stage in registry.stages(kind).values())

    axes = [[(key, v) for v in value] if isinstance(value, list) and not takes_lists(key) else [(key, value)]
            for key, value in pairs]
    empty = [key for (key, _), axis in zip(pairs, axes) if not axis]
    if empty:
        raise UserError(f"task {task}: an empty list of values for '{empty[0]}' -- give at least one value")
    return [tuple(choice) for choice in itertools.product(*axes)]


def _entries(data: dict, key: str, source: str) -> list[dict]:
    """A grid axis as a list of mappings; a bare string is ``{name: string}``."""
    value = data.get(key)
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if isinstance(item, str):
            out.append({"name": item})
        elif isinstance(item, dict) and isinstance(item.get("name"), str):
            out.append(item)
        else:
            raise UserError(f"{source}: each entry of '{key}' is a name or a mapping with a 'name' text, "
                            f"got {brief(item)}")
    return out


def _absolute(root) -> str | None:
    """Data roots as absolute paths: Ray workers do not run in the driver's working folder."""
    return str(Path(str(root)).expanduser().resolve()) if root else None


def _expand(text: str, env: Mapping[str, str]) -> tuple[str, str | None]:
    """``text`` with ``$NAME`` / ``${NAME}`` replaced from ``env``; the first name ``env`` lacks, if any."""
    unset = [m.group(1) or m.group(2) for m in _VARIABLE.finditer(text) if (m.group(1) or m.group(2)) not in env]
    return _VARIABLE.sub(lambda m: env.get(m.group(1) or m.group(2), m.group(0)), text), (unset or [None])[0]


def _data_root(root: str, env: Mapping[str, str], where: str) -> str:
    expanded, unset = _expand(root, env)
    if unset:
        raise UserError(f"{where}: data_root {root} names ${unset}, which is not set -- set it, or write the folder")
    return _absolute(expanded)


def _check_keys(entry: dict, allowed: tuple, where: str) -> None:
    unknown = sorted(set(entry) - set(allowed))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)} -- allowed: {', '.join(allowed)}")


def _weights(value, where: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise UserError(f"{where}: weights must be 'random', a file or a hub name, got {brief(value)}")
    return value


def _seed(value, where: str) -> int:
    if not registry.is_whole(value) or not 0 <= value <= MAX_INTEGER:
        raise UserError(f"{where} must be a whole number from 0 to 2^63-1, got {brief(value)}")
    return value


def task_entry_choices(data: dict, source: str) -> list[list[TaskChoice]]:
    """Per entry of a grid file's ``tasks``, in order, the task choices its parameter lists expand to (the grid's
    tasks are these, concatenated; ``report --rows`` reads a cell by entry)."""
    out = []
    for e in _entries(data, "tasks", source):
        _check_keys(e, ("name", "params"), f"{source}: task {e['name']}")
        pairs = _pairs(e.get("params"), f"{source}: params of task {e['name']}")
        out.append([TaskChoice(e["name"], choice) for choice in expand_params(e["name"], pairs)])
    return out


def grid_from_mapping(data: dict, source: str = "grid", env: Mapping[str, str] | None = None) -> Grid:
    """The grid of a parsed YAML file (see examples/sweep.yaml for every key); ``$NAME`` in a data root is
    read from ``env`` (default: the environment)."""
    env = os.environ if env is None else env
    if not isinstance(data, dict):
        raise UserError(f"{source} must be a YAML mapping with keys {', '.join(GRID_KEYS)}")
    _check_keys(data, GRID_KEYS, source)
    default_weights = _weights(data.get("weights"), source)
    default_wseed = _seed(data.get("weights_seed", 0), f"{source}: weights_seed")
    backbones = []
    entries = _entries(data, "backbones", source)
    if default_weights and entries and all(is_non_learned(registry.backbone(e["name"])) for e in entries):
        warnings.warn(f"{source}: weights {default_weights} apply to learned backbones only, and "
                      f"{', '.join(e['name'] for e in entries)} {'is' if len(entries) == 1 else 'are'} not learned: "
                      f"ignored", stacklevel=2)
    for e in entries:
        where = f"{source}: backbone {e['name']}"
        _check_keys(e, BACKBONE_KEYS, where)
        default = None if is_non_learned(registry.backbone(e["name"])) else default_weights  # nothing to load
        match = e.get("weights_match", "path")
        if match not in WEIGHTS_MATCH:
            raise UserError(f"{where}: weights_match must be path (whatever the file now holds) or exact (exactly "
                            f"the file the baselines were measured on), got {brief(match)}")
        backbones.append(BackboneChoice(e["name"], _weights(e.get("weights", default), where),
                                        _seed(e.get("weights_seed", default_wseed), f"{where}: weights_seed"), match))
    tasks = [choice for choices in task_entry_choices(data, source) for choice in choices]
    datasets = []
    for e in _entries(data, "datasets", source):
        _check_keys(e, ("name", "data_root", "split", "options"), f"{source}: dataset {e['name']}")
        root = e.get("data_root")
        if root is not None and not isinstance(root, str):
            raise UserError(f"{source}: dataset {e['name']}: data_root must be one folder, got {brief(root)}")
        root = _data_root(root, env, f"{source}: dataset {e['name']}") if root else None
        datasets.append(DatasetChoice(e["name"], root, e.get("split"),
                                      _pairs(e.get("options"), f"{source}: options of dataset {e['name']}")))
    ks = data.get("k", ["C"])
    seeds = data.get("seeds", [0])
    protocol = data.get("protocol") or {}
    if not isinstance(protocol, dict):
        raise UserError(f"{source}: protocol must be a mapping, e.g. protocol: {{resize: 320, crop: center}}")
    try:
        protocol = Protocol(**protocol)
    except TypeError:
        known = [f.name for f in dataclasses.fields(Protocol)]
        raise UserError(f"{source}: unknown protocol key(s) {', '.join(sorted(map(str, set(protocol) - set(known))))} -- "
                        f"keys: {', '.join(known)}") from None
    seeds = seeds if isinstance(seeds, list) else [seeds]
    if not all(registry.is_whole(s) and 0 <= s <= MAX_INTEGER for s in seeds):
        raise UserError(f"{source}: seeds must be whole numbers from 0 to 2^63-1, got {brief(seeds)}")
    ks = ks if isinstance(ks, list) else [ks]
    for k in ks:
        try:
            resolve_k(k, 1)
        except UserError as err:
            raise UserError(f"{source}: k: {err}") from None
    return Grid(backbones, tasks, datasets, ks, seeds, protocol)


@dataclass(frozen=True)
class SkippedGrid:
    """An ``optional`` grid of a file, not run here because its data is absent."""

    reason: str
    backbones: frozenset[str]
    tasks: frozenset[str]
    datasets: frozenset[str]

    def covers(self, backbone: str, task: str, dataset: str) -> bool:
        """Whether a cell of these names would be one of this grid's."""
        return backbone in self.backbones and task in self.tasks and dataset in self.datasets


def grids_from_mapping(data: dict, source: str = "grid",
                       env: Mapping[str, str] | None = None) -> tuple[list[Grid], list[SkippedGrid]]:
    """The grids of a sweep file: the file itself, or each entry of its ``grids:`` list. An entry with
    ``optional: true`` is skipped, with the reason, where one of its data roots is absent (or names an unset
    variable); any other problem of any grid fails the whole file now, before anything runs."""
    env = os.environ if env is None else env
    if not isinstance(data, dict) or "grids" not in data:
        return [grid_from_mapping(data, source, env)], []
    if set(data) != {"grids"}:
        extra = ", ".join(sorted(set(data) - {"grids"}))
        raise UserError(f"{source}: a file with 'grids' holds nothing else, found {extra} -- move those keys into "
                        f"each grid")
    entries = data["grids"]
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{source}: 'grids' must be a list of sweep grids (mappings with keys {', '.join(GRID_KEYS)})")
    grids, skipped = [], []
    for number, entry in enumerate(entries, 1):
        where = f"{source}: grid {number}"
        if not isinstance(entry, dict):
            raise UserError(f"{where} must be a mapping with keys {', '.join(GRID_KEYS)}, optional")
        optional = entry.get("optional", False)
        if not isinstance(optional, bool):
            raise UserError(f"{where}: optional must be true or false, got {brief(optional)}")
        body = {key: value for key, value in entry.items() if key != "optional"}
        absent = _absent_data(body, where, env) if optional else None
        if absent:  # checked all the same: a typo must not hide behind data that is absent on this machine
            grid_from_mapping({**body, "datasets": [{k: v for k, v in e.items() if k != "data_root"}
                                                     for e in _entries(body, "datasets", where)]}, where, env)
            names = {key: frozenset(e["name"] for e in _entries(body, key, where)) for key in ("backbones", "tasks")}
            datasets = frozenset(e["name"] for e in _entries(body, "datasets", where))
            skipped.append(SkippedGrid(f"{where} ({', '.join(sorted(datasets))}) skipped: {absent}",
                                       names["backbones"], names["tasks"], datasets))
            continue
        grids.append(grid_from_mapping(body, where, env))
    return grids, skipped


def _absent_data(grid: dict, where: str, env: Mapping[str, str]) -> str | None:
    """Why a grid's data is not here (a data root that is not a folder, or names an unset variable), if so."""
    for entry in _entries(grid, "datasets", where):
        root = entry.get("data_root")
        if not isinstance(root, str):
            continue
        expanded, unset = _expand(root, env)
        if unset:
            return f"{root}: ${unset} is not set"
        if not Path(expanded).expanduser().is_dir():
            return f"{expanded} absent"
    return None


def read_grid_file(path: str | Path, what: str = "sweep file", resolved: list | None = None) -> dict:
    """The mapping in a sweep file (the command line may replace some of its axes before the grid is made).
    Its relative paths (data roots, weight files) are made absolute against the file's own folder, so a file
    means the same wherever it is run from; ``resolved`` (when given) collects (as written, absolute) pairs."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a {what} -- give a YAML file such as examples/sweep.yaml")
    if not path.is_file():
        raise UserError(f"{what} {path} not found -- see examples/sweep.yaml for the format")
    data = registry.read_yaml_mapping(path, what, f"examples/sweep.yaml (keys: {', '.join(GRID_KEYS)})")
    done = _resolve_relative_paths(data, path.resolve().parent)
    if resolved is not None:
        resolved += done
    return data


def _resolve_relative_paths(data: dict, folder: Path) -> list[tuple[str, str]]:
    """Data roots and weight files of a file's grid (or of each of its ``grids``) as absolute paths against
    ``folder``; a path naming a variable ($DATA) is read later, from the environment, as it is."""
    done: list[tuple[str, str]] = []

    def absolute(value, weights: bool = False):
        if (not isinstance(value, str) or "$" in value or (weights and value == "random")
                or Path(value).expanduser().is_absolute() or value.startswith("~")):
            return value
        if weights and not (value.startswith(".") or "/" in value or (folder / value).exists()):
            return value  # a bare word that names no file here (a hub name) is left to the weights lookup
        path = str((folder / value).resolve())
        done.append((value, path))
        return path

    grids = data.get("grids") if isinstance(data.get("grids"), list) else [data]
    for grid in (g for g in grids if isinstance(g, dict)):
        if "weights" in grid:
            grid["weights"] = absolute(grid["weights"], weights=True)
        for key, field_name, weights in (("backbones", "weights", True), ("datasets", "data_root", False)):
            entries = grid.get(key)
            for entry in entries if isinstance(entries, list) else [entries]:
                if isinstance(entry, dict) and field_name in entry:
                    entry[field_name] = absolute(entry[field_name], weights)
    return done


def load_grid(path: str | Path) -> Grid:
    return grid_from_mapping(read_grid_file(path), str(path))


# ---- the plan -----------------------------------------------------------------------------------------

def _backbone_label(config: dict) -> str:
    if not config["random_weights"]:
        return config["backbone"]
    seed = f", seed {config['weights_seed']}" if config.get("weights_seed") else ""
    return f"{config['backbone']} (random weights{seed})"


@dataclass
class Cell:
    config: RunConfig
    run: ResolvedRun
    stored: bool
    earlier_version_stored: bool = False  # not stored, but stored by an earlier version of its task
    stored_before_scoring_rules: bool = False  # not stored, but stored before the protocol named its scoring rules

    @property
    def label(self) -> str:
        c = self.run.config
        task = versions.task_label(c)  # two parameter sets of one task are two cells
        from .data import subset_text

        return (f"{_backbone_label(c)} / {task} / {c['dataset']}:{c['split']}{subset_text(c)} K={c['k']} "
                f"seed={c['seed']}")


@dataclass
class Extraction:
    """One feature-cache entry shared by the cells in ``cells``; ``missing`` = kinds still to extract."""

    key: CacheKey
    config: RunConfig  # of one of its cells: enough to rebuild backbone, dataset and protocol
    run: ResolvedRun
    kinds: list[str]
    missing: list[str]
    cells: list[Cell] = field(default_factory=list)
    done: int = 0  # images already extracted for every missing kind (an interrupted extraction resumes there)

    @property
    def label(self) -> str:
        c = self.run.config
        options = "".join(f", {k}={v}" for k, v in sorted((c.get("dataset_options") or {}).items()))
        return (f"{_backbone_label(c)} on {c['dataset']}:{c['split']} ({c['images']} images{options}; "
                f"{', '.join(self.kinds)})")


@dataclass
class Plan:
    cells: list[Cell]  # every distinct cell of the grid that can run
    extractions: list[Extraction]  # one per cache entry that cells still to compute read
    skipped: dict[str, int] = field(default_factory=dict)  # why a backbone x task pair cannot run -> its cells
    cpu_notes: dict[str, int] = field(default_factory=dict)  # a task's warning for this machine -> cells to compute

    @property
    def todo(self) -> list[Cell]:
        return [c for c in self.cells if not c.stored]

    @property
    def stored(self) -> list[Cell]:
        return [c for c in self.cells if c.stored]

    @property
    def extractions_needed(self) -> list[Extraction]:
        return [e for e in self.extractions if e.missing]


def expand(grid: Grid, runner: Runner) -> list[RunConfig]:
    """Every cell of the grid as a RunConfig (K expressions resolved against each dataset's classes; the
    runner opens each dataset once for the whole plan)."""
    configs = []
    for ds in grid.datasets:
        classes = runner.open_dataset(ds.name, ds.data_root, ds.split, dict(ds.options)).num_classes
        ks = list(dict.fromkeys(resolve_k(k, classes) for k in grid.ks))  # C and 5 may coincide
        for bb in grid.backbones:
            for task in grid.tasks:
                for k in ks:
                    for seed in grid.seeds:
                        configs.append(RunConfig(
                            backbone=bb.name, task=task.name, dataset=ds.name, split=ds.split, k=k, seed=seed,
                            weights=bb.weights, weights_seed=bb.weights_seed, data_root=ds.data_root,
                            dataset_options=ds.options, params=task.params, protocol=grid.protocol))
    return configs


def cache_key(runner: Runner, run: ResolvedRun) -> CacheKey:
    """The feature-cache entry a resolved cell reads (the same key the cache itself computes)."""
    return runner.cache.key(run.spec.name, run.weights.identity, run.dataset, run.protocol)


def make_plan(grid: Grid | Sequence[Grid], runner: Runner, select: Callable[[Cell], bool] = lambda cell: True) -> Plan:
    """The distinct cells of one grid or of several (a ``reproduce`` recipe is one grid per table row; a cell
    two grids share runs once), which are stored, and the extractions needed (shared across the grids)."""
    stored = runner.store.stored_hashes()
    cells: dict[str, Cell] = {}
    skipped: dict[str, int] = {}
    grids = [grid] if isinstance(grid, Grid) else list(grid)
    for cfg in (cfg for g in grids for cfg in expand(g, runner)):
        try:
            run = runner.resolve(cfg)
        except KIsClasses:  # a grid crosses every task with every K: this task takes K = C only
            why = f"{cfg.task} names the dataset's classes: K = C only"
            skipped[why] = skipped.get(why, 0) + 1
            continue
        cell = Cell(cfg, run, run.config_hash in stored and not runner.predictions_missing(run))
        cell.earlier_version_stored = not cell.stored and any(h in stored for h in earlier_version_hashes(run.config))
        cell.stored_before_scoring_rules = not cell.stored and any(
            h in stored for h in before_scoring_rules_hashes(run.config))
        if not select(cell) or run.config_hash in cells:  # ``select`` sees every cell, a repeated one too
            continue
        why = _cannot_run(run)
        if why:  # one such pair must not fail the extraction, and so every cell, of that backbone
            skipped[why] = skipped.get(why, 0) + 1
            continue
        cells[run.config_hash] = cell
    extractions: dict[CacheKey, Extraction] = {}
    for cell in cells.values():
        if cell.stored or not cell.run.features:
            continue
        key = cache_key(runner, cell.run)
        if key not in extractions:
            extractions[key] = Extraction(key, cell.config, cell.run, [], [])
        entry = extractions[key]
        entry.kinds = sorted(set(entry.kinds) | set(cell.run.features))
        entry.cells.append(cell)
    for entry in extractions.values():
        entry.missing = runner.cache.missing_kinds(entry.key, entry.kinds, len(entry.run.dataset))
        entry.done = runner.cache.images_done(entry.key, entry.missing) if entry.missing else 0
    cpu_notes: dict[str, int] = {}
    if runner.device.type == "cpu":  # before the work starts: a method that takes hours here says so
        for cell in cells.values():
            if not cell.stored and (note := cell.run.task.cpu_note(cell.run.config["params"])):
                cpu_notes[note] = cpu_notes.get(note, 0) + 1
    return Plan(list(cells.values()), list(extractions.values()), skipped, cpu_notes)


def _cannot_run(run: ResolvedRun) -> str | None:
    """Why a grid's backbone x task pair cannot run, known without building the model (a grid crosses
    every backbone with every task, so some pairs may not fit)."""
    from .models.base import ATTENTION_KINDS

    wanted = sorted(set(run.features) & set(ATTENTION_KINDS))
    if wanted and not run.spec.has_attention:
        return f"{run.task.name} reads {', '.join(wanted)} of the attention, which {run.spec.name} does not have"
    return None


def describe(plan: Plan) -> list[str]:
    """The plan as lines for the user: counts first, then each extraction still needed."""
    needed = plan.extractions_needed
    lines = [f"cells: {len(plan.cells)} in the grid, {len(plan.stored)} already stored, {len(plan.todo)} to compute"]
    older = [c for c in plan.todo if c.earlier_version_stored]
    if older:
        tasks = ", ".join(sorted({f"{c.run.task.name} v{c.run.task.version}" for c in older}))
        lines.append(f"  {len(older)} of them stored by an earlier version of their task, whose numbers may differ "
                     f"(now {tasks}): computed again, the earlier rows kept")
    unscored = [c for c in plan.todo if c.stored_before_scoring_rules]
    if unscored:
        lines.append(f"  {len(unscored)} of them stored before the protocol named its scoring rules (absent classes then "
                     f"left out: absent_classes=ignore), whose numbers may differ: computed again, the earlier rows kept")
    lines += [f"feature extractions: {len(needed)} needed, {len(plan.extractions) - len(needed)} already cached"]
    lines += [f"  extract {e.label}" + (f" [missing: {', '.join(e.missing)}]" if e.missing != e.kinds else "")
              + (f" [resumes after {e.done} of {len(e.run.dataset)} images]" if e.done else "") for e in needed]
    lines += [f"skipped {n} cell(s): {why}" for why, n in plan.skipped.items()]
    lines += [f"warning: {n} cell(s) run {note}" for note, n in plan.cpu_notes.items()]
    if any(c.run.config["random_weights"] for c in plan.cells):
        lines.append("note: cells marked (random weights) are smoke runs, not results")
    return lines


# ---- outcome ------------------------------------------------------------------------------------------

@dataclass
class SweepSummary:
    computed: int = 0
    already_stored: int = 0  # stored by another sweep after the plan was made
    extractions: int = 0  # extraction passes this sweep performed
    failed: list[tuple[str, str]] = field(default_factory=list)  # (cell label, one-line reason)
    task_seconds: float = 0.0  # Ray: seconds spent inside the tasks, as the workers timed them

    def lines(self) -> list[str]:
        out = [f"computed {counted(self.computed, 'cell')}, {counted(self.extractions, 'feature extraction')}"
               + (f"; {counted(self.already_stored, 'cell')} stored meanwhile by another sweep"
                  if self.already_stored else "")]
        out += [f"FAILED {label}: {reason}" for label, reason in self.failed]
        return out


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    if isinstance(err, MemoryError) and not text:  # numpy and Python say nothing more
        text = ["out of memory (a size, K or batch parameter too large for this machine)"]
    if isinstance(err, UserError):  # already one line naming the problem and the fix
        return text[-1] if text else ""
    return f"{type(err).__name__}: {text[-1] if text else ''}"


CellCallback = Callable[[Cell, str], None]  # (cell, "computed" | "stored meanwhile" | "failed: ...")
