"""``ssl-bench reproduce``: the seed papers' tables as recipes, run by the ordinary sweep machinery.

recipe.py   recipe files -> paper cells (value, tolerance, how ours is measured)
needs.py    what a recipe needs (tasks, weights, data) and what is here; its sweep grids
compare.py  stored runs -> paper | ours | difference | within tolerance, and the verdict

A recipe runs as a list of sweep grids (one per distinct run) through ``sweep.make_plan`` and the same
executors as ``ssl-bench sweep``: resumable, shared feature cache, local or Ray. Nothing in this package
knows a method by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UserError
from ..registry import counted
from . import needs
from .compare import Observation, Outcome, comparison_table, outcome, verdict, verdict_text
from .recipe import Measure, PaperCell, Recipe, load, recipe_paths

__all__ = ["Outcome", "PaperCell", "Setup", "cannot_run", "check_can_run", "comparison_table", "describe", "listing",
           "load", "outcomes", "plan", "recipe_paths", "setup", "suite", "verdict", "verdict_text"]


@dataclass
class Setup:
    """A recipe as it stands here: data found, weights found, and the choices of this invocation."""

    recipe: Recipe
    data: list[needs.DataNeed]
    weights: list[needs.WeightsNeed]
    weights_choice: str | None = None  # "random" for a smoke run
    limit: int | None = None
    hashes: dict = field(default_factory=dict)  # Measure.run -> {seed: config hash}, once planned

    def _need(self, m: Measure) -> needs.DataNeed | None:
        return next((n for n in self.data if n.key == (m.dataset, m.split, m.options)), None)

    def not_run(self, m: Measure) -> str | None:
        """Why this measure does not run here (not runnable, or its data is missing); None when it runs."""
        why = needs.why_not_runnable(m)
        if why:
            return f"not run: {why}"
        for each in needs.splits_read(m):
            need = self._need(each)
            if need is None or not need.present:
                return f"not run: no {each.dataset}{':' + each.split if each.split else ''} data here"
        return None

    def excluded(self, m: Measure) -> list[str]:
        """Why numbers of this measure are not results to compare, known before running."""
        out = []
        need = self._need(m)
        if need is not None and need.subset:
            out.append(f"subset ({need.images} of the paper's {need.paper_images} images)")
        missing = needs.protocol_settings(m)[1]
        if missing:
            out.append(f"protocol differs: {'; '.join(missing)}")
        return out

    @property
    def measures(self) -> list[Measure]:
        """The distinct runnable measures, in the recipe's order."""
        seen, out = set(), []
        for cell in self.recipe.cells:
            m = cell.measure
            if self.not_run(m) is None and m not in seen:
                seen.add(m)
                out.append(m)
        return out

    @property
    def runs(self) -> list[Measure]:
        """One runnable measure per distinct run, in the order of ``grids()``."""
        first: dict[tuple, Measure] = {}
        for m in self.measures:
            first.setdefault(m.run, m)
        return list(first.values())

    def grids(self) -> list[dict]:
        roots = {n.key: n.root for n in self.data}
        return needs.grids(self.runs, roots, self.weights_choice, self.limit)


def setup(recipe: Recipe, data_roots: dict[str, str] | None = None, weights_choice: str | None = None,
          limit: int | None = None) -> Setup:
    options = {"limit": limit} if limit else {}
    return Setup(recipe, needs.data(recipe, data_roots, options), needs.weights(recipe), weights_choice, limit)


def cannot_run(s: Setup) -> str | None:
    """Why the recipe cannot run here, in one line naming every missing weight file (unless random weights)
    and dataset of the rows ssl-bench can run; None when it can."""
    name = s.recipe.name
    code_runnable = [c.measure for c in s.recipe.cells if needs.why_not_runnable(c.measure) is None]
    if not code_runnable:
        return f"nothing of recipe {name} can run in this ssl-bench ({_not_run_summary(s)})"
    problems, missing = [], []
    if s.weights_choice != "random":
        missing = [w.file for w in needs.weights(s.recipe, runnable_only=True) if w.found is None]
        if missing:
            problems.append(f"{len(missing)} weight file(s) not found: {', '.join(missing)} (put them in "
                            f"$SSL_BENCH_WEIGHTS; download links in --plan)")
    wanted = {(e.dataset, e.split, e.options) for m in code_runnable for e in needs.splits_read(m)}
    absent = [n for n in s.data if n.key in wanted and not n.present]
    if absent:
        problems.append("data not found: " + "; ".join(f"{n.label} ({n.problem})" for n in absent))
    if not problems:
        return None
    present = {n.key for n in s.data if n.present}
    fixes = []  # one per problem: both are needed when both are missing
    if absent:
        some_here = any(all((e.dataset, e.split, e.options) in present for e in needs.splits_read(m))
                        for m in code_runnable)
        fixes.append(f"give --data-root DATASET=PATH or put the folders under ${needs.DATA_ENV}"
                     + (", or run the rows whose data is here with --only ROW" if some_here else ""))
    if missing:
        fixes.append("without the weights, --weights random makes a smoke run (never compared)")
    return f"recipe {name} needs " + " and ".join(problems) + " -- " + "; ".join(fixes)


def check_can_run(s: Setup) -> None:
    why = cannot_run(s)
    if why:
        raise UserError(why)


def _not_run_summary(s: Setup) -> str:
    reasons = {}
    for cell in s.recipe.cells:
        why = s.not_run(cell.measure)
        if why:
            reasons[why] = reasons.get(why, 0) + 1
    return "; ".join(f"{why} ({n} cells)" for why, n in reasons.items())


def plan(s: Setup, runner):
    """The sweep plan of the runnable cells; fills ``s.hashes`` so the results can be found in the store."""
    from ..sweep import expand, grid_from_mapping, make_plan

    grids = [grid_from_mapping(g, f"recipe {s.recipe.name}") for g in s.grids()]
    for m, grid in zip(s.runs, grids):
        s.hashes[m.run] = {cfg.seed: runner.resolve(cfg).config_hash for cfg in expand(grid, runner)}
    return make_plan(grids, runner)


def suite(name_or_path: str, data_roots: dict[str, str] | None = None,
          weights_choice: str | None = None) -> tuple[list[dict], list[tuple[int, PaperCell]]]:
    """A recipe as a regression suite: its sweep grid mappings (the runnable cells here), and each paper cell
    with the index of the grid whose runs measure it (stream, view, metric and tolerance are on the cell)."""
    s = setup(load(name_or_path), data_roots, weights_choice)
    index = {m.run: i for i, m in enumerate(s.runs)}
    expected = [(index[c.measure.run], c) for c in s.recipe.cells if c.measure.run in index
                and s.not_run(c.measure) is None]
    return s.grids(), expected


def outcomes(s: Setup, store) -> list[Outcome]:
    """Every paper cell of the recipe against what the store holds for it."""
    out = []
    for cell in s.recipe.cells:
        m = cell.measure
        why = s.not_run(m)
        if why:
            out.append(outcome(cell, Observation(not_run=why)))
            continue
        hashes = s.hashes.get(m.run, {})
        records = [r for r in (store.get(h) for h in hashes.values()) if r is not None]
        out.append(outcome(cell, Observation(records, len(hashes) - len(records), excluded=s.excluded(m))))
    return out


# ---- what users read before running ---------------------------------------------------------------------

def describe(s: Setup) -> list[str]:
    """The recipe's plan in words: rows and what runs them, protocol differences, weights, data, work."""
    r = s.recipe
    lines = [f"{r.name}: {r.title}", f"  paper: {r.reference}"]
    runnable = sum(s.not_run(c.measure) is None for c in r.cells)
    lines.append(f"  {counted(len(r.rows), 'row')}, {counted(len(r.cells), 'paper value')}; "
                 f"{runnable} can run here")
    lines.append("rows:")
    for row in r.rows:
        cells = [c for c in r.cells if c.row == row]
        parts = sorted({_measure_text(c.measure) for c in cells if not (c.measure.not_in_ssl_bench
                                                                          or c.measure.not_run)})
        reasons = sorted({why for c in cells if (why := s.not_run(c.measure))})
        excluded = sorted({e for c in cells if not s.not_run(c.measure) for e in s.excluded(c.measure)})
        if not parts:  # a method outside ssl-bench: the reason is all there is to say
            lines.append(f"  {row}: {'; '.join(reasons)}")
            continue
        lines.append(f"  {row}: " + " | ".join(parts))
        lines += [f"      {why}" for why in reasons] + [f"      not compared: {e}" for e in excluded]
    lines += [f"protocol difference: {d}" for d in r.differences]
    lines.append("weights:" if s.weights else "weights: none needed (non-learned backbones only)")
    if s.weights and s.weights_choice == "random":
        lines[-1] = "weights: random (--weights random): no file is read; results marked, never compared"
    for w in s.weights if s.weights_choice != "random" else ():
        where = f"found ({w.found})" if w.found else "MISSING" + (f" -- download: {w.source}" if w.source else "")
        lines.append(f"  {w.backbone}: {w.file}  {where}")
    lines.append("data:")
    for n in s.data:
        paper = f", the paper used {n.paper_images}" if n.paper_images else ""
        if n.present:
            subset = " (a subset: not compared)" if n.subset else ""
            where = f"at {n.root}" if n.root else "(generated)"
            lines.append(f"  {n.label}: found {n.images} images {where}{paper}{subset}")
        else:
            lines.append(f"  {n.label} (folder '{n.folder}'): MISSING -- {n.problem}{paper}"
                         + (f"; looked in {', '.join(n.looked)}" if n.looked else ""))
    backbones, passes = needs.work(r, s.data, limit=s.limit)
    lines.append(f"work: {backbones} backbone(s), {passes:,} image passes in all (images x backbones, one "
                 f"extraction per backbone and split; methods add their own passes, e.g. DatUS^2's crops)")
    return lines


def _measure_text(m: Measure) -> str:
    params = ", ".join(f"{k}={v}" for k, v in m.params)
    task = f"{m.task} ({params})" if params else str(m.task)
    split = f":{m.split}" if m.split else ""
    seeds = f"seeds {','.join(map(str, m.seeds))}" if len(m.seeds) > 1 else f"seed {m.seeds[0]}"
    return f"{m.backbone} / {task} / {m.dataset}{split} K={m.k} {seeds}"


def listing(data_roots: dict[str, str] | None = None) -> list[dict]:
    """One summary per registered recipe (the `ssl-bench reproduce` table)."""
    out = []
    for name in recipe_paths():
        s = setup(load(name), data_roots)
        r = s.recipe
        runnable = sum(needs.why_not_runnable(c.measure) is None for c in r.cells)
        backbones, passes = needs.work(r, s.data)
        missing = [n.label for n in s.data if not n.present]
        subsets = [n.label for n in s.data if n.subset]
        data = ("missing: " + ", ".join(missing)) if missing else ("subset: " + ", ".join(subsets)) if subsets \
            else "here" if s.data else "-"
        out.append({"name": name, "values": len(r.cells),
                    "runnable": runnable, "weights": f"{sum(w.found is not None for w in s.weights)}/{len(s.weights)}",
                    "data": data, "work": f"{passes:,}" if passes else ("?" if backbones else "-")})
    return out

