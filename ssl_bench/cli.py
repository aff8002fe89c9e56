"""The ``ssl-bench`` command line. Every command is a thin shell over the library."""

from __future__ import annotations

import functools
import inspect
import re
import shlex
import signal
import sys
import traceback
import warnings
from pathlib import Path
from typing import Iterable, Optional

import typer
import yaml
from rich.markup import escape
from rich.table import Table

from . import __version__, registry
from .errors import UserError
from .terminal import NORMAL, QUIET, VERBOSE, Display


def _as_typed(params: list, ctx) -> list:
    """Help that shows a switch as a switch: ``--force``, not ``--force <bool>`` (it takes no value), and a
    repeatable option as ``<str> ...``, not ``<list[str]>``."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
        elif getattr(param, "multiple", False) and param.metavar is None:
            shown = param.display_type(ctx)  # <list[str]>
            param.metavar = f"<{shown[6:-2]}> ..." if shown.startswith("<list[") else shown
    return params


class _Command(typer.core.TyperCommand):
    def get_params(self, ctx):
        return _as_typed(super().get_params(ctx), ctx)


class _Group(typer.core.TyperGroup):
    def get_params(self, ctx):
        return _as_typed(super().get_params(ctx), ctx)


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, cls=_Group,
                  help="Benchmark self-supervised backbones by unsupervised semantic segmentation.")
command = functools.partial(app.command, cls=_Command)
display = Display()  # this process's outputs: -q / -v / --log-file set them
console, out = display.err, display.out


EXAMPLE_PAIRS = {"--param": "tau=5", "--option": "limit=25", "--arg": "image_counts=25,50"}


def parse_pairs(pairs: Iterable[str], what: str) -> tuple:
    """``key=value`` strings -> sorted (key, value) pairs, values parsed as YAML (numbers, bools, lists)."""
    parsed = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            example = f"{key}=VALUE" if key and not sep else EXAMPLE_PAIRS.get(what, "key=1")
            raise UserError(f"{what} '{pair}' is not key=value -- e.g. {what} {example}")
        try:
            parsed[key.replace("-", "_")] = registry.parse_yaml_value(value)
        except yaml.YAMLError as err:
            raise UserError(f"{what} {registry.brief(pair)}: the value is not valid YAML ({str(err).splitlines()[0]}) -- e.g. "
                            f"{what} {key}=5, {key}=true, {key}=[1, 2] or {key}='{{a: 1}}'") from None
    return tuple(sorted(parsed.items()))


def _version(value: bool) -> None:
    if value:
        out.print(f"ssl-bench {__version__}")
        raise typer.Exit()


@app.callback()
def options(
    quiet: bool = typer.Option(False, "--quiet", "-q", help="results, warnings and errors only: no progress bars, "
                               "plan or per-cell lines"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="also details, e.g. the traceback of a failed cell"),
    log_file: Optional[Path] = typer.Option(None, "--log-file", help="also append everything printed (no progress "
                                            "bars, no colours) and the details of -v to this file"),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="print the version and exit"),
):
    """Benchmark self-supervised backbones by unsupervised semantic segmentation."""
    if quiet and verbose:
        raise UserError("-q and -v contradict each other -- give one of them")
    if log_file is not None and log_file.is_dir():
        raise UserError(f"--log-file {log_file} is a folder -- give a file, e.g. {log_file / 'ssl-bench.log'}")
    display.configure(QUIET if quiet else VERBOSE if verbose else NORMAL, log_file)


def _precision_text(config: dict) -> str:
    """`` [bf16]`` for a run whose forward pass was autocast; nothing for fp32 (the default)."""
    precision = (config.get("protocol") or {}).get("precision", "fp32")
    return "" if precision == "fp32" else f" [{precision}]"


def _runner(store: Optional[Path], cache: Optional[Path], device: Optional[str] = None,
            save_predictions: Optional[Path] = None):
    from .features import FeatureCache
    from .runner import Runner
    from .store import ResultStore

    return Runner(ResultStore(store), FeatureCache(cache), device, save_predictions)


StoreOpt = typer.Option(None, "--store", help="results database (default .ssl-bench/results.sqlite or $SSL_BENCH_STORE)")
SavePredictionsOpt = typer.Option(None, "--save-predictions", help="also write each image's prediction here: an "
                                  "indexed PNG of class ids (cluster ids without ground truth) and a colour overlay")
RegistryOpt = typer.Option([], "--registry", help="a folder of your own backbone / task / stage YAML files "
                           "(repeatable; added to $SSL_BENCH_REGISTRY)")
CacheOpt = typer.Option(None, "--cache", help="feature cache folder (default .ssl-bench/cache or $SSL_BENCH_CACHE)")


@command()
def run(
    backbone: str = typer.Option("reference", "--backbone", "-b", help="registered backbone (ssl-bench list backbones)"),
    task: str = typer.Option("kmeans", "--task", "-t", help="registered task (ssl-bench list tasks)"),
    dataset: str = typer.Option("synthetic", "--dataset", "-d", help="dataset (ssl-bench list datasets)"),
    data_root: Optional[str] = typer.Option(None, help="dataset folder (not needed for 'synthetic')"),
    split: Optional[str] = typer.Option(None, help="split to evaluate (default: the dataset's evaluation split)"),
    k: Optional[str] = typer.Option(None, "--k", help="number of clusters: a number or C, 2C, 3C ... "
                                   "(default: C, the number of classes)"),
    seed: int = typer.Option(0, help="seed of the method (clustering, training)"),
    weights: Optional[str] = typer.Option(None, help="checkpoint path, or 'random' for a random-weight smoke run"),
    crf: Optional[bool] = typer.Option(None, "--crf/--no-crf", help="dense CRF refinement (tasks that have it)"),
    param: list[str] = typer.Option([], "--param", "-p", help="task parameter key=value (repeatable)"),
    option: list[str] = typer.Option([], "--option", "-o", help="dataset option key=value, e.g. classes=8"),
    resize: int = typer.Option(320, help="protocol: shorter side (320; 322 for /14 backbones)"),
    crop: str = typer.Option("center", help="protocol: 'center' crop or 'none'"),
    overclustering: str = typer.Option("majority", help="protocol, K > C: majority | hungarian (DatUS^2) | "
                                       "hungarian-majority (PriMaPs) | stego-drop (STEGO's code: ignores pixels of "
                                       "clusters >= C)"),
    absent_classes: str = typer.Option("zero-if-predicted", help="protocol, a class absent from the ground truth: "
                                       "zero-if-predicted (IoU 0 when predicted) | ignore (always left out)"),
    precision: str = typer.Option("fp32", help="protocol: the backbone's forward pass in fp32, or autocast to "
                                  "bf16 / fp16 (features cached apart; recorded with the result)"),
    force: bool = typer.Option(False, "--force", help="recompute even if this configuration is stored"),
    device: Optional[str] = typer.Option(None, help="torch device (default: cuda if present, else cpu)"),
    save_predictions: Optional[Path] = SavePredictionsOpt,
    registries: list[Path] = RegistryOpt,
    store: Optional[Path] = StoreOpt,
    cache: Optional[Path] = CacheOpt,
):
    """Run one backbone x task x dataset cell and store the result."""
    from .data.protocol import Protocol
    from .housekeeping import headline_text
    from .report.tables import model_label, uses_labels
    from .runner import RunConfig, before_scoring_rules_hashes, earlier_version_hashes
    from .sweep import resolve_k

    registry.use_registries(registries)

    params = dict(parse_pairs(param, "--param"))
    if crf is not None:
        if "crf" in params and params["crf"] != crf:
            raise UserError(f"--{'' if crf else 'no-'}crf and -p crf={str(params['crf']).lower()} disagree -- give one")
        params["crf"] = crf
    options = parse_pairs(option, "--option")
    runner = _runner(store, cache, device, save_predictions)
    if k is not None:  # 2C as in sweeps: the classes are the dataset's
        k = resolve_k(k, 1) if k.strip().isdigit() else \
            resolve_k(k, runner.open_dataset(dataset, data_root, split, dict(options)).num_classes)
    protocol = Protocol(resize=resize, crop=crop, overclustering=overclustering, absent_classes=absent_classes,
                        precision=precision)
    cfg = RunConfig(backbone=backbone, task=task, dataset=dataset, split=split, k=k, seed=seed, weights=weights,
                    data_root=data_root, dataset_options=options, params=tuple(sorted(params.items())),
                    protocol=protocol)
    with display.bars() as bars:
        outcome = runner.run(cfg, force=force, progress=bars.progress)
    rec = outcome.record
    tag = "computed" if outcome.computed else "already stored; --force recomputes"
    random_note = "  (RANDOM WEIGHTS: smoke run, not a result)" if rec["random_weights"] else ""
    if uses_labels(rec):
        random_note += "  (USES GROUND-TRUTH LABELS: an upper bound, not an unsupervised result)"
    from .data import subset_text

    out.print(f"{model_label(rec)} / {rec['task']} / {rec['dataset']}:{rec['split']}{subset_text(rec['config'])} "
              f"K={rec['k']} seed={rec['seed']}: "
              f"{headline_text(rec)}  ({tag}){random_note}")
    for key, m in rec["metrics"].items():
        if m.get("labelled_fraction", 1.0) < 1.0:
            lab = m["labelled"]
            out.print(f"  {key}: labelled {m['labelled_fraction'] * 100:.1f}% of pixels; on labelled pixels only: "
                      f"mIoU {lab['miou']:.2f} Acc {lab['acc']:.2f} F1 {lab['f1']:.2f}")
    out.print(f"  run {rec['config_hash']} in {runner.store.path} (ssl-bench show {rec['config_hash'][:12]}: its whole "
              f"configuration)")
    if runner.save_predictions is not None:
        out.print(f"  predictions in {runner.predictions_folder(runner.resolve(cfg))}")
    if outcome.computed:
        order = ["features", "labels", "task", "evaluate"]  # the pipeline's order (the store keeps them sorted)
        stages = sorted(rec["timings"].items(), key=lambda item: order.index(item[0]) if item[0] in order else 9)
        display.info("  seconds per stage: " + ", ".join(f"{stage} {t:.1f}" for stage, t in stages))
        if kept := (rec.get("stats") or {}).get("kept_seconds"):
            display.info("  read from earlier cells (seconds they took there, not in these): "
                         + ", ".join(f"{name} {t:.1f}" for name, t in kept.items()))
    if outcome.computed and any(runner.store.has(h) for h in earlier_version_hashes(rec["config"])):
        out.print(f"  note: an earlier version of {rec['task']} stored this cell too; its row is kept, and reports "
                  f"label it [vN, not current]")
    if outcome.computed and any(runner.store.has(h) for h in before_scoring_rules_hashes(rec["config"])):
        out.print("  note: this cell was stored before the protocol named its scoring rules; that row is kept, and "
                  "reports show it under absent_classes=ignore")


@command()
def sweep(
    file: Optional[Path] = typer.Argument(None, help="grid file (YAML, see examples/sweep.yaml); flags below replace its axes"),
    backbone: list[str] = typer.Option([], "--backbone", "-b", help="backbone (repeatable)"),
    task: list[str] = typer.Option([], "--task", "-t", help="task (repeatable)"),
    dataset: list[str] = typer.Option([], "--dataset", "-d", help="dataset (repeatable)"),
    data_root: list[str] = typer.Option([], help="data root for every --dataset, or DATASET=PATH (repeatable)"),
    split: Optional[str] = typer.Option(None, help="split of every --dataset (default: each one's evaluation split)"),
    option: list[str] = typer.Option([], "--option", "-o", help="dataset option key=value or DATASET:key=value"),
    k: list[str] = typer.Option([], "--k", help="K: a number or C, 2C, 3C ... (C = classes; repeatable)"),
    seed: list[int] = typer.Option([], "--seed", help="method seed (repeatable)"),
    weights: Optional[str] = typer.Option(None, help="weights of every learned backbone: path or 'random'"),
    param: list[str] = typer.Option([], "--param", "-p", help="parameter of every --task, key=value (repeatable)"),
    resize: Optional[int] = typer.Option(None, help="protocol: shorter side (default 320)"),
    crop: Optional[str] = typer.Option(None, help="protocol: 'center' or 'none'"),
    overclustering: Optional[str] = typer.Option(None, help="protocol, K > C: majority (default) | hungarian | "
                                                 "hungarian-majority | stego-drop"),
    absent_classes: Optional[str] = typer.Option(None, help="protocol: zero-if-predicted (default) | ignore"),
    precision: Optional[str] = typer.Option(None, help="protocol: fp32 (default) | bf16 | fp16 (autocast extraction)"),
    executor: str = typer.Option("local", help="local (in-process) | ray"),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (default: start a local instance)"),
    cpus_per_task: Optional[int] = typer.Option(None, help="Ray: CPUs (= torch/OpenMP/BLAS/numba threads) per task "
                                                "(default: this machine's torch threads)"),
    max_in_flight: Optional[int] = typer.Option(None, help="Ray: most tasks submitted at once (default: twice the "
                                                "task slots of the cluster's live nodes)"),
    plan_only: bool = typer.Option(False, "--plan", help="print the plan and stop"),
    device: Optional[str] = typer.Option(None, help="torch device (default: cuda if present, else cpu)"),
    save_predictions: Optional[Path] = SavePredictionsOpt,
    registries: list[Path] = RegistryOpt,
    store: Optional[Path] = StoreOpt,
    cache: Optional[Path] = CacheOpt,
):
    """Run a grid of cells: shared feature extraction, resumable, local or on Ray."""
    from . import sweep as sweeps

    registry.use_registries(registries)

    _check_executor(executor, address, cpus_per_task, max_in_flight)
    resolved: list[tuple[str, str]] = []
    data = sweeps.read_grid_file(file, resolved=resolved) if file else {}
    flags = backbone or weights or task or param or dataset or data_root or option or split or k or seed
    protocol_flags = {"resize": resize, "crop": crop, "overclustering": overclustering, "absent_classes": absent_classes,
                      "precision": precision}
    protocol_flags = {key: value for key, value in protocol_flags.items() if value is not None}
    if "grids" in data and (flags or protocol_flags):
        raise UserError(f"{file} holds several grids, and grid flags replace the axes of one grid -- edit the "
                        f"file, or give the flags without it")
    if backbone:
        data["backbones"] = backbone
    if weights:
        data["weights"] = weights  # the default of every backbone without its own (non-learned ones ignore it)
    if task:
        data["tasks"] = [{"name": t, "params": dict(parse_pairs(param, "--param"))} for t in task]
    elif param:
        raise UserError("--param needs --task (give the tasks it applies to)")
    if dataset:
        _check_prefixes(dataset, data_root, option)
        data["datasets"] = [_dataset_entry(name, data_root, split, option) for name in dataset]
    elif data_root or option or split:
        raise UserError("--data-root/--option/--split need --dataset (give the datasets they apply to)")
    if k:
        data["k"] = list(k)  # "5", "C", "2C": sweep.resolve_k reads them all
    if seed:
        data["seeds"] = list(seed)
    if protocol_flags:  # replace the file's protocol keys they name, keep the others
        data["protocol"] = {**(data.get("protocol") or {}), **protocol_flags}
    if not file and (task or dataset) and not backbone:
        raise UserError("--backbone missing -- give the backbones to sweep, e.g. --backbone reference")
    for flag, given, example in (("--task", task, "kmeans"), ("--dataset", dataset, "synthetic")):
        if not file and backbone and not given:
            raise UserError(f"{flag} missing -- give the {flag[2:]}s to sweep, e.g. {flag} {example}")
    if not file and not backbone:
        raise UserError("give a sweep file or grid flags -- e.g. ssl-bench sweep --backbone reference --task kmeans "
                        "--dataset synthetic --k C --k 2C --seed 0 --seed 1")
    for written, path in resolved:
        display.info(f"{file}: {written} is read from the file's folder: {path}")
    grids, skipped = sweeps.grids_from_mapping(data, str(file) if file else "command line")
    runner = _runner(store, cache, device, save_predictions)
    plan = sweeps.make_plan(grids, runner)
    for grid in skipped:
        display.info(grid.reason)
    _describe(plan, runner)
    if plan_only or not plan.todo:
        return

    summary = _execute(plan, runner, executor, address, device, cpus_per_task, max_in_flight)
    out.print(f"results in {runner.store.path} (ssl-bench report --store {runner.store.path})", highlight=False)
    if runner.save_predictions is not None:
        out.print(f"predictions in {runner.save_predictions} (one folder per cell)", highlight=False)
    if summary.failed:
        raise SystemExit(1)


def _describe(plan, runner) -> None:
    """The plan's lines and, where something was measured before, how long it will take here."""
    from .estimate import estimate
    from .sweep import describe

    for line in describe(plan):
        if line.startswith("warning:"):  # shown with -q too: it is about the hours ahead
            console.print(escape(line))
        else:
            display.info(line)
    if plan.todo:
        display.info(estimate(plan, runner.store.query(), runner.cache.root).text())


def _check_executor(executor: str, address: Optional[str], cpus_per_task: Optional[int],
                    max_in_flight: Optional[int] = None) -> None:
    from .executors import EXECUTORS

    if executor not in EXECUTORS:
        raise UserError(f"unknown executor '{executor}' -- choose {' or '.join(EXECUTORS)}")
    ray_flags = {"--address": address, "--cpus-per-task": cpus_per_task, "--max-in-flight": max_in_flight}
    for flag, value in ray_flags.items():
        if executor != "ray" and value is not None:
            raise UserError(f"{flag} is for Ray -- add --executor ray (or drop {flag} to run here)")
    for flag, value in (("--cpus-per-task", cpus_per_task), ("--max-in-flight", max_in_flight)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value} -- e.g. {flag} 4")


def _execute(plan, runner, executor: str, address: Optional[str], device: Optional[str],
             cpus_per_task: Optional[int], max_in_flight: Optional[int] = None):
    """Run a sweep plan (``sweep`` and ``reproduce``): a line per cell, the summary at the end."""
    from .executors import run_local
    from .housekeeping import headline_text

    with display.bars() as bars:
        advance = bars.overall(len(plan.todo), "sweep")  # one bar for the whole plan: cells done of all, time left

        def report_cell(cell, status: str) -> None:
            rec = f"{status}  {cell.label}"
            if status == "computed":
                rec += f": {headline_text(runner.store.get(cell.run.config_hash))}"
            display.info(rec)  # failures are listed again at the end, -q or not
            advance()

        if executor == "ray":
            from .ray_executor import run_ray

            summary = run_ray(plan, runner, address, device, on_cell=report_cell, cpus_per_task=cpus_per_task,
                              max_in_flight=max_in_flight)
        else:
            summary = run_local(plan, runner, bars.progress, on_cell=report_cell)
    for line in summary.lines():
        out.print(line, highlight=False)
    return summary


def _split_prefix(value: str, mark: str) -> tuple[str | None, str]:
    """``camvid=PATH`` (--data-root, mark ``=``) or ``camvid:limit=5`` (--option, mark ``:``) -> (dataset,
    rest); (None, value) when unprefixed (an option's ``:`` after its ``=`` belongs to the value)."""
    prefix, sep, rest = value.partition(mark)
    if not sep or (mark == ":" and "=" in prefix):
        return None, value
    return prefix, rest


def _check_prefixes(datasets: list[str], roots: list[str], options: list[str]) -> None:
    """``--data-root NAME=PATH`` and ``-o NAME:key=value`` must name a --dataset (a typo is not dropped)."""
    for flag, values, mark in (("--data-root", roots, "="), ("--option", options, ":")):
        prefix = next((p for p, _ in (_split_prefix(v, mark) for v in values) if p not in (None, *datasets)), None)
        if prefix is not None:
            raise UserError(f"{flag} prefix '{prefix}' names no --dataset of this sweep -- use one of: "
                            f"{', '.join(datasets)}")


def _dataset_entry(name: str, roots: list[str], split: Optional[str], options: list[str]) -> dict:
    """One --dataset of the command line with the --data-root / --option values that apply to it."""
    roots = [_split_prefix(v, "=") for v in roots]
    named = [path for prefix, path in roots if prefix == name]
    plain = [path for prefix, path in roots if prefix is None]
    if len(named) > 1 or (not named and len(plain) > 1):
        raise UserError(f"several --data-root values for {name} -- give one per dataset, as NAME=PATH when "
                        f"there are several datasets (e.g. --data-root camvid=../data/camvid)")
    root = named[0] if named else (plain[0] if plain else None)
    mine = [pair for prefix, pair in (_split_prefix(v, ":") for v in options) if prefix in (None, name)]
    return {"name": name, "data_root": root, "split": split, "options": dict(parse_pairs(mine, "--option"))}


@command()
def reproduce(
    name: Optional[str] = typer.Argument(None, help="recipe (omit to list them; see recipes/) or a recipe file"),
    plan_only: bool = typer.Option(False, "--plan", help="print what the recipe needs and runs, and stop"),
    weights: Optional[str] = typer.Option(None, help="'random' for a smoke run of every learned backbone "
                                          "(marked, never compared); default: the weights found here"),
    data_root: list[str] = typer.Option([], help="DATASET=PATH (repeatable; default $SSL_BENCH_DATA/FOLDER)"),
    limit: Optional[int] = typer.Option(None, help="the first N images of each dataset (a subset: never compared)"),
    only: Optional[str] = typer.Option(None, help="only the rows whose label contains this text"),
    format: str = typer.Option("markdown", "--format", "-f", help="printed table: markdown | latex | csv"),
    out_dir: Optional[Path] = typer.Option(None, help="where NAME.md/.tex/.csv are written (default: reproduce/ "
                                           "beside the results store)"),
    executor: str = typer.Option("local", help="local (in-process) | ray"),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (default: start a local instance)"),
    cpus_per_task: Optional[int] = typer.Option(None, help="Ray: CPUs (and threads) per task"),
    device: Optional[str] = typer.Option(None, help="torch device (default: cuda if present, else cpu)"),
    store: Optional[Path] = StoreOpt,
    cache: Optional[Path] = CacheOpt,
):
    """Reproduce a published table: the paper's value beside ours (exit 1 when a cell is out of tolerance)."""
    from . import reproduce as rep
    from .report import FORMATS

    roots = {}
    for value in data_root:
        prefix, path = _split_prefix(value, "=")
        if prefix is None:
            raise UserError(f"--data-root {value!r} must name its dataset -- e.g. --data-root suim=~/data/SUIM")
        roots[prefix] = path
    if weights not in (None, "random"):
        raise UserError(f"--weights {weights!r}: a recipe runs many backbones -- put their files in "
                        f"$SSL_BENCH_WEIGHTS, or use --weights random for a smoke run")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit} -- e.g. --limit 8")
    if format not in ("markdown", "latex", "csv"):
        raise UserError(f"unknown format '{format}' -- choose markdown, latex or csv")
    if name is None:
        _recipe_listing(rep.listing(roots))
        return
    _check_executor(executor, address, cpus_per_task)
    setup = rep.setup(rep.load(name).select(only), roots, weights, limit)
    if plan_only:
        for line in rep.describe(setup):
            out.print(line, highlight=False)
        why = rep.cannot_run(setup)
        if why:
            out.print(f"cannot run here: {why}", highlight=False)
            return
    rep.check_can_run(setup)  # one line naming the missing weight files and folders
    runner = _runner(store, cache, device)
    plan = rep.plan(setup, runner)
    _describe(plan, runner)
    if plan_only:
        return
    failed = _execute(plan, runner, executor, address, device, cpus_per_task).failed if plan.todo else []
    outcomes = rep.outcomes(setup, runner.store)
    table = rep.comparison_table(setup.recipe, outcomes)
    target = out_dir or Path(runner.store.path).parent / "reproduce"
    target.mkdir(parents=True, exist_ok=True)
    for fmt, ext in (("markdown", "md"), ("latex", "tex"), ("csv", "csv")):
        (target / f"{setup.recipe.name}.{ext}").write_text(FORMATS[fmt](table))
    sys.stdout.write(FORMATS[format](table))
    console.print(f"wrote {target / setup.recipe.name}.md, .tex, .csv")
    _, outside, _ = rep.verdict(outcomes)
    console.print(rep.verdict_text(outcomes), highlight=False)
    if outside or failed:
        raise SystemExit(1)


def _recipe_listing(rows: list[dict]) -> None:
    table = Table("recipe", "values", "runnable", "weights", "image passes", "data",
                  box=None, pad_edge=False, header_style="bold underline",
                  caption="values: paper values transcribed; runnable: those ssl-bench can measure now; weights: files "
                          "found / needed; image passes: images x backbones to extract.\n"
                          "ssl-bench reproduce NAME --plan: what it needs; ssl-bench reproduce NAME: run and compare")
    table.columns[0].no_wrap = True
    for r in rows:
        table.add_row(r["name"], str(r["values"]), str(r["runnable"]), r["weights"], r["work"], r["data"])
    out.print(table)


@command()
def regress(
    suite: Optional[Path] = typer.Option(None, "--suite", help="suite file: any sweep file (default: ssl-bench's own "
                                         "suite, results/regress/suite.yaml of the checkout whose code runs)"),
    baselines: Optional[Path] = typer.Option(None, help="baselines file (default: baselines.json beside the suite "
                                             "file: code, suite and baselines go together)"),
    update: bool = typer.Option(False, "--update", help="rewrite the baselines with the numbers of this run"),
    only: Optional[str] = typer.Option(None, help="only the cells whose name contains this text"),
    junit: Optional[Path] = typer.Option(None, "--junit", help="also write a JUnit XML report here (one test case "
                                         "per cell and metric)"),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="also write a Markdown summary here (for a "
                                            "pull-request comment or a CI job summary)"),
    device: str = typer.Option("cpu", help="torch device (cpu by default: the baselines' numbers are CPU numbers)"),
):
    """Rerun a suite of cells and compare each metric with its baselines.

    Exit status: 0 every metric within its tolerance; 1 drift (a metric beyond its tolerance, a cell without
    a baseline, a baseline without a cell, a pinned weights file that changed); 2 could not run (a bad suite
    or baselines file, data that is not there, a cell that failed)."""
    from . import regress as reg
    from .regress import outputs

    suite_path = suite or reg.PROJECT_SUITE
    baselines_path = baselines or reg.default_baselines(suite_path)
    if update and (junit or markdown):
        raise UserError("--update rewrites the baselines; --junit/--markdown report a comparison -- run them "
                        "separately")
    for target, flag in ((junit, "--junit"), (markdown, "--markdown")):
        if target is not None and target.is_dir():
            raise UserError(f"{flag} {target} is a folder -- give a file name, e.g. {target / 'regress'}")
    again = " ".join(["ssl-bench regress", *(["--suite", shlex.quote(str(suite))] if suite else []),
                      *(["--baselines", shlex.quote(str(baselines))] if baselines else []),
                      *(["--only", shlex.quote(only)] if only else []), "--update"])

    def on_cell(name: str, status: str) -> None:
        console.print(f"{status}  {name}", markup=False, highlight=False, soft_wrap=True)

    def write(target: Optional[Path], content: str) -> None:
        if target is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content)

    if update:
        report, written = reg.update(suite_path, baselines_path, only, device, on_cell)
        out.print(outputs.text(report), highlight=False)
        if report.exit_status == 2:
            out.print("baselines not written: fix the cells that could not run, then run again", highlight=False)
            raise SystemExit(2)
        measured = len(report.cells("ok", "drift", "new", "weights"))
        kept = len(written.cells) - measured
        out.print(f"wrote {registry.counted(measured, 'cell')} to {baselines_path} ({len(report.cells('drift'))} moved beyond tolerance, "
                  f"{len(report.cells('new'))} new, {len(report.cells('gone'))} gone and dropped, {kept} kept without "
                  f"running); review and commit it", highlight=False)
        return
    try:
        report = reg.check(suite_path, baselines_path, only, device, on_cell)
    except UserError as err:  # the CI page says why, where it expects the report
        write(junit, outputs.error_junit(str(err)))
        write(markdown, outputs.error_markdown(str(err)))
        raise
    write(junit, outputs.junit(report))
    write(markdown, outputs.markdown(report, again))
    out.print(outputs.text(report), highlight=False)
    if report.exit_status == 1:
        out.print(f"if the change is intended: {again}, then commit the baselines", highlight=False)
    raise SystemExit(report.exit_status)


def _existing_store(store: Optional[Path], read_only: bool = True):
    """The results store at ``store`` (or the default); a path where none is is one line, not a new empty store.
    Read-only unless asked: reading writes nothing beside the store."""
    from .store import ResultStore, default_store_path

    path = store or default_store_path()
    if not path.exists():  # opening would create an empty store and report "no runs" for a mistyped path
        raise UserError(f"no results store at {path} -- run ssl-bench run or ssl-bench sweep first, "
                        f"or pass --store with the file they wrote")
    return ResultStore(path, read_only=read_only)


def _print_wide(table: Table) -> None:
    """A listing at its natural width, also into a file or pipe (rich would squeeze it to 80 columns)."""
    from rich.measure import Measurement

    natural = Measurement.get(out, out.options.update(max_width=10_000), table).maximum
    width = out.width
    out.width = max(width, natural)  # print(width=...) cannot exceed the console's own
    try:
        out.print(table)
    finally:
        out.width = width


@command()
def show(
    run_hash: str = typer.Argument(..., help="a stored run's hash, or its first characters (see ssl-bench runs)"),
    store: Optional[Path] = StoreOpt,
):
    """Print one stored run: its whole configuration (weights file included), scores, timings, environment."""
    from .housekeeping import find_run, run_text

    out.print(run_text(find_run(_existing_store(store), run_hash)), end="")


@command()
def runs(
    backbone: Optional[str] = typer.Option(None, "--backbone", "-b", help="only runs of this backbone"),
    task: Optional[str] = typer.Option(None, "--task", "-t", help="only runs of this task"),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="only runs on this dataset"),
    k: Optional[str] = typer.Option(None, "--k", help="only runs with this K: a number, or C, 2C ..."),
    seed: Optional[int] = typer.Option(None, help="only runs with this method seed"),
    random: Optional[bool] = typer.Option(None, "--random/--no-random", help="only / no random-weight runs"),
    superseded: bool = typer.Option(False, "--superseded", help="only runs of an earlier version of their task"),
    hash_prefix: list[str] = typer.Option([], "--hash", help="only runs whose hash starts with this (repeatable)"),
    delete: bool = typer.Option(False, "--delete", help="delete the runs listed (rows and panel samples)"),
    yes: bool = typer.Option(False, "--yes", "-y", help="with --delete: do not ask"),
    store: Optional[Path] = StoreOpt,
):
    """List stored runs (filtered by the options), or delete them with --delete."""
    from .data import subset_text
    from .housekeeping import RunFilter, delete_runs, select_runs
    from .report.tables import model_label, task_label

    wanted = RunFilter(backbone, task, dataset, k, seed, random, superseded, list(hash_prefix))
    filtered = wanted != RunFilter()
    if delete and not filtered:  # before listing every run
        raise UserError("--delete without a filter would delete every run -- name what to delete (e.g. --task, "
                        "--backbone, --hash), or delete the store file itself")
    results = _existing_store(store, read_only=not delete)
    found = select_runs(results, wanted)
    table = Table("run", "stored", "backbone", "task", "dataset", "K", "seed", "mIoU", "Acc", "F1", "seconds",
                  box=None, pad_edge=False, header_style="bold underline")
    table.columns[0].no_wrap = True
    for r in found:
        table.add_row(r["config_hash"][:12], str(r.get("created_at", ""))[:16], model_label(r)
                      + (" (random)" if r["random_weights"] else ""), task_label(r["config"]),
                      f"{r['dataset']}:{r['split']}{subset_text(r['config'])}{_precision_text(r['config'])}",
                      str(r["k"]), str(r["seed"]),
                      *("-" if r[m] is None else f"{r[m]:.2f}" for m in ("miou", "acc", "f1")), f"{sum(r['timings'].values()):.1f}")
    if found:
        _print_wide(table)
    console.print(f"{len(found)} run(s){' matching' if filtered else ''} in {results.path}"
                  + ("" if delete else "; ssl-bench show HASH prints one, --delete removes those listed"))
    if not delete or not found:
        return
    if not yes:
        if not sys.stdin.isatty():
            raise UserError(f"--delete would remove {len(found)} run(s) and nobody is here to confirm -- add --yes")
        typer.confirm(f"delete these {len(found)} run(s) from {results.path}?", abort=True)
    console.print(f"deleted {delete_runs(results, found)} run(s) from {results.path}")


@command()
def cache(
    prune: bool = typer.Option(False, "--prune", help="delete the entries no run in the store needs, and temporary "
                               "files a killed process left"),
    cache_dir: Optional[Path] = typer.Option(None, "--cache", help="feature cache folder (default .ssl-bench/cache "
                                             "or $SSL_BENCH_CACHE)"),
    store: Optional[Path] = StoreOpt,
):
    """Sizes of the feature cache's entries and whether a stored run needs each; --prune deletes the others."""
    from .features import default_cache_dir
    from .housekeeping import cache_entries, count_needs, human_size, stale_temporaries
    from .housekeeping import prune as prune_entries
    from .store import ResultStore, default_store_path

    root = cache_dir or default_cache_dir()
    if not root.is_dir():
        raise UserError(f"no feature cache at {root} -- it is made by ssl-bench run / sweep; pass --cache with "
                        f"the folder they used")
    store_path = store or default_store_path()
    records = ResultStore(store_path).query() if store_path.exists() else []
    entries = cache_entries(root)
    count_needs(entries, records)
    table = Table("size", "backbone", "dataset", "images", "kinds", "weights", "needed by", "entry",
                  box=None, pad_edge=False, header_style="bold underline")
    for e in sorted(entries, key=lambda e: -e.size):
        key = e.key
        labels = f"(labels, patch multiple {str(key.get('weights', '?')).removeprefix('multiple=')})"
        table.add_row(human_size(e.size), key.get("backbone", "?") if e.kind == "features" else labels,
                      f"{key.get('dataset', '?')}:{key.get('split', '?')}", _entry_images(e), ", ".join(e.kinds),
                      str(key.get("weights", ""))[:14] if e.kind == "features" else "",
                      f"{e.needed_by} run(s)" if e.needed_by else "-", str(e.path.relative_to(root)))
    if entries:
        _print_wide(table)
    temporaries = stale_temporaries(root)
    unneeded = [e for e in entries if not e.needed_by]
    total = sum(e.size for e in entries)
    console.print(f"{len(entries)} entries, {human_size(total)} in {root}; {len(unneeded)} needed by no run in "
                  f"{store_path} ({human_size(sum(e.size for e in unneeded))})"
                  + (f"; {len(temporaries)} stale temporary file(s)" if temporaries else "")
                  + ("" if prune else "; --prune deletes those"))
    if not prune:
        return
    removed, busy = prune_entries(entries)
    for path in temporaries:
        path.unlink(missing_ok=True)
    console.print(f"deleted {len(removed)} entr{'y' if len(removed) == 1 else 'ies'} ({human_size(sum(e.size for e in removed))})"
                  + (f" and {len(temporaries)} temporary file(s)" if temporaries else "")
                  + (f"; kept {len(busy)} being extracted right now" if busy else ""))


def _entry_images(entry) -> str:
    """Images of a cache entry, saying when they are views (five crops of each image: a head's training views)."""
    crops = dict(entry.key.get("options", [])).get("crops")
    return f"{entry.images} ({crops} crops)" if crops and crops != "none" else str(entry.images)


NORMALISATIONS = {(0.485, 0.456, 0.406): "ImageNet", (0.48145466, 0.4578275, 0.40821073): "CLIP",
                  (0.0, 0.0, 0.0): "none"}


SHORT_ORIGINS = {"$SSL_BENCH_WEIGHTS": "local", "timm cache": "timm", "Hugging Face cache": "hf",
                 "torch.hub cache": "torch.hub"}


def _backbone_table(wide: bool) -> Table:
    """Backbones, one row each. The default columns fit 80 characters; --wide adds the provenance."""
    from .models.weights import is_non_learned, locate

    columns = ["name", "family", "grid", "dim", "params", "licence", "weights"]
    if wide:
        columns[2:2] = ["architecture"]
        columns[-2:-1] = ["pre-training data", "licence", "input", "norm", "source"]
    table = Table(*columns, box=None, pad_edge=False, header_style="bold underline", caption=None if wide else
                  "params in millions; grid: /patch or sN (CNN output stride).\n"
                  "--wide adds architecture, pre-training data, input size, normalisation, source")
    table.columns[0].no_wrap = True  # names are what users type: never cut
    specs = list(registry.backbones().values())
    if any(_user_source(spec) for spec in specs):
        table.add_column("source (your registries)", overflow="fold")
    for spec in specs:
        if is_non_learned(spec):
            found = "non-learned"
        else:
            where = locate(spec)
            found = SHORT_ORIGINS.get(where[0], where[0]) if where else "not found"
        grid = f"s{spec.patch_size}" if not spec.has_attention and not is_non_learned(spec) else f"/{spec.patch_size}"
        row = [spec.name, spec.family, grid, str(spec.embed_dim), f"{spec.params_m:.1f}",
               spec.licence if wide else spec.licence.split(" (")[0].replace(" License", ""), found]
        if wide:
            norm = NORMALISATIONS.get(tuple(round(m, 8) for m in spec.mean), f"mean {spec.mean} std {spec.std}")
            sources = [f"timm: {spec.timm}" if spec.timm else "", f"hf: {spec.hf}" if spec.hf else "",
                       spec.url or (f"file: {spec.file}" if spec.file else ""),
                       f"sha256: {spec.sha256[:16]}..." if spec.sha256 else ""]
            row[2:2] = [spec.arch + (f" {spec.options}" if spec.options else "")]
            row[-2:-1] = [spec.pretraining_data, spec.licence, str(spec.input_size), norm,
                          "\n".join(s for s in sources if s) or "-"]
        table.add_row(*row, *([_user_source(spec) or "built-in"] if len(table.columns) > len(row) else []))
    return table


def _user_source(spec) -> str:
    """Where an entry of the user's own registries (a folder or an installed package) was made; "" if built in."""
    source = str(getattr(spec, "source", ""))
    builtin = {str(registry.registry_dir(kind)) for kind in ("backbones", "tasks", "stages")}
    if not source or any(source.startswith(folder) for folder in builtin):
        return ""
    try:
        return str(Path(source).resolve().relative_to(Path.cwd()))
    except ValueError:
        return source


@command("list")
def list_(what: str = typer.Argument(..., help="backbones | tasks | stages (or one kind: segmenters, filters, "
                                     "embeddings, clusterers) | datasets"),
          wide: bool = typer.Option(False, "--wide", help="backbones: all details (needs a wide terminal)"),
          registries: list[Path] = RegistryOpt):
    """List registered backbones, tasks or datasets (entries of your own registries with the file that made them)."""
    registry.use_registries(registries)
    if what == "backbones":
        table = _backbone_table(wide)
    elif what == "tasks":
        table = Table("name", "version", "title", "features", "parameters")
        specs = list(registry.tasks().values())
        own = any(_user_source(spec) for spec in specs)
        if own:
            table.add_column("source (your registries)", overflow="fold")
        bases: dict[tuple, registry.TaskSpec] = {}  # per entrypoint and file, the task its variants change
        for spec in specs:  # (a user's file naming a built-in entrypoint is its own task, not a variant)
            base = bases.setdefault((spec.name,) if spec.stages else (spec.entrypoint, spec.source), spec)
            changed = {k: v for k, v in spec.params.items() if base.params.get(k) != v}
            params = ", ".join(f"{k}={v}" for k, v in (spec.params if base is spec else changed).items())
            features = spec.features_for(spec.resolve_params({})) if spec.stages else spec.features
            table.add_row(spec.name, str(spec.version), spec.title, ", ".join(features),
                          params if base is spec else f"as {base.name}, with {params or 'the same parameters'}",
                          *([_user_source(spec) or "built-in"] if own else []))
    elif what == "stages" or what in registry.STAGE_KINDS.values():
        table = Table("kind", "name", "title", "features", "parameters (-p SLOT.NAME=VALUE)")
        kinds = [kind for kind, plural in registry.STAGE_KINDS.items() if what in ("stages", plural)]
        specs = [spec for kind in kinds for spec in registry.stages(kind).values()]
        own = any(_user_source(spec) for spec in specs)
        if own:
            table.add_column("source (your registries)", overflow="fold")
        for spec in specs:
            table.add_row(spec.kind, spec.name, spec.title, ", ".join(spec.features_for(spec.params)) or "-",
                          ", ".join(f"{k}={v}" for k, v in spec.params.items()),
                          *([_user_source(spec) or "built-in"] if own else []))
    elif what == "datasets":
        from .data import DATASETS

        table = Table("name", "title", "classes", "splits", "data root")
        for name, cls in DATASETS.items():
            table.add_row(name, cls.title, str(cls.num_classes or "classes.txt"), ", ".join(cls.splits),
                          cls.default_root)
    else:
        raise UserError(f"cannot list '{what}' -- choose backbones, tasks, stages (or one kind: "
                        f"{', '.join(registry.STAGE_KINDS.values())}) or datasets")
    for column in table.columns[1:]:
        column.overflow = "fold"  # wrapped whole, never cut to "No…" (parameters are what users copy)
    if out.is_terminal:
        out.print(table)
    else:  # a file or pipe: whole lines (grep finds a parameter, not half of it)
        _print_wide(table)


@command()
def report(
    format: Optional[str] = typer.Option(None, "--format", "-f", help="markdown | latex | csv | html (tables only; "
                                         "default markdown)"),
    table: Optional[str] = typer.Option(None, "--table", help="leaderboard | segments | streams | classes (per-class "
                                        "IoU) | timings | predictions (runs without ground truth) | discovered (COMUS Table 3) | all "
                                        "(default: all; leaderboard for csv)"),
    task: Optional[str] = typer.Option(None, help="only this task"),
    k: str = typer.Option("classes", "--k", help="leaderboard K: 'classes' (K = number of classes), 2C, 3C ... "
                          "or a number"),
    output: Optional[Path] = typer.Option(None, "--output", help="write the tables to this file instead of stdout"),
    html: Optional[Path] = typer.Option(None, "--html", help="also write one self-contained HTML page here"),
    out_dir: Optional[Path] = typer.Option(None, "--out-dir", help="also write every table (md, tex, csv, html), "
                                           "the over-clustering curves (PNG, PDF) and the panels (PNG) here"),
    max_panels: int = typer.Option(24, help="at most this many qualitative panels in the HTML page"),
    subsets: str = typer.Option("largest", help="largest: per dataset the column of the most images (the full "
                                "split where it ran); all: also every limit=/n= subset as its own column"),
    layout: str = typer.Option("auto", help="leaderboard: wide (datasets as column groups), long (a row per "
                               "dataset) or auto (long beyond 4 datasets)"),
    rows: Optional[Path] = typer.Option(None, "--rows", help="only the table laid out by this sweep file's table "
                                        "section (a paper's rows and columns over its cells)"),
    weights: Optional[str] = typer.Option(None, help="with --rows: the --weights the sweep ran with (e.g. random)"),
    store: Optional[Path] = StoreOpt,
):
    """Tables, figures and an HTML page from the stored runs (random-weight runs are marked)."""
    from . import report as reports

    if weights is not None and rows is None:
        raise UserError("--weights chooses a --rows table's cells -- add --rows SWEEP.yaml, or leave --weights out "
                        "(the other tables show every stored run, random-weight ones marked)")
    if rows is not None:
        from .report.rows import rows_table
        from .report.tables import to_csv, to_latex, to_markdown

        render = {"markdown": to_markdown, "latex": to_latex, "csv": to_csv}.get(format or "markdown")
        if render is None:
            raise UserError(f"--rows prints markdown, latex or csv, not {format} -- pick one with --format")
        text = render(rows_table(rows, _runner(store, None), weights))
        if output:
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(text)
            console.print(f"wrote {output}")
        else:
            out.file.write(text)
        return
    results = _existing_store(store)
    records = results.query()
    unscored = sum(r["miou"] is None for r in records)
    if unscored:
        console.print(f"note: {unscored} run(s) on images without ground truth have no metrics: they are in the "
                      f"predictions table, the panels and timings (and segment statistics where their method has "
                      f"them), not in the leaderboard; ssl-bench show HASH lists each cluster", highlight=False)
    if task and task not in {r["task"] for r in records}:
        raise UserError(f"no stored run of task '{task}' -- stored tasks: "
                        f"{', '.join(sorted({r['task'] for r in records})) or 'none (run ssl-bench run first)'}")
    if max_panels < 0:
        raise UserError(f"--max-panels must be 0 or more, got {max_panels}")
    for target, kind, example in ((output, "--output", "report.md"), (html, "--html", "report.html")):
        if target is not None and target.is_dir():
            raise UserError(f"{kind} {target} is a folder -- give a file name, e.g. {target / example}")
    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out-dir {out_dir} is a file -- give a folder")
    fmt = format or "markdown"
    text = reports.text_report(records, fmt, table or ("leaderboard" if fmt == "csv" else "all"), k, task, subsets,
                               layout)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text)
        console.print(f"wrote {output}")
    elif not (html or out_dir) or format or table:  # with --html/--out-dir only on request
        out.file.write(text)  # as rendered: no console markup or wrapping (and into the log file)
        if not text:  # an empty CSV table: say so rather than print nothing
            console.print(f"no stored run has rows for the {table or 'leaderboard'} table")
    if out_dir:
        written = reports.write_all(records, results.path, out_dir, k, task, subsets, layout)
        console.print(f"wrote {len(written)} files to {out_dir}")
    if html:
        html.parent.mkdir(parents=True, exist_ok=True)
        html.write_text(reports.html_report(records, results.path, k, task, max_panels, subsets, layout))
        console.print(f"wrote {html}")


@command()
def bench(
    name: Optional[str] = typer.Argument(None, help="benchmark to run (omit to list them)"),
    arg: list[str] = typer.Option([], "--arg", "-a", help="benchmark argument key=value (repeatable)"),
    output_dir: Path = typer.Option(Path("results/bench"), help="where NAME.json is written (committed figures)"),
    tag: Optional[str] = typer.Option(None, help="write NAME-TAG.json (e.g. the same benchmark on another backbone)"),
    no_write: bool = typer.Option(False, "--no-write", help="print only, write no file"),
):
    """Run a committed performance benchmark and write results/bench/NAME.json."""
    import json

    from . import bench as benches

    available = benches.available_benchmarks()
    if name is None:
        table = Table("benchmark", "measures")
        for key, function in available.items():
            function = registry.load_entrypoint(function) if isinstance(function, str) else function
            table.add_row(key, _first_sentence(function.__doc__ or "", inspect.signature(function).parameters))
        out.print(table)
        return
    result = benches.run_benchmark(name, None if no_write else output_dir, tag=tag, **dict(parse_pairs(arg, "--arg")))
    out.print_json(json.dumps(result))
    if not no_write:
        console.print(f"wrote {output_dir / benches.result_file(name, tag)}")


@command()
def fuzz(
    seconds: float = typer.Option(60.0, help="time per target (the test suite runs each for a few seconds)"),
    target: list[str] = typer.Option([], "--target", help="only these targets (repeatable; default: all)"),
    seed: int = typer.Option(0, help="seed of the damage: the same seed and case give the same input"),
    case: Optional[int] = typer.Option(None, help="run this one case only (to reproduce a finding)"),
):
    """Feed random bytes, truncations and bit flips to every reader; list what is not one UserError line."""
    from .fuzz import fuzz as run_fuzz
    from .fuzz.targets import TARGETS

    unknown = sorted(set(target) - set(TARGETS))
    if unknown:
        raise UserError(f"unknown fuzz target(s) {', '.join(unknown)} -- choose from: {', '.join(TARGETS)}")
    if seconds <= 0:
        raise UserError(f"--seconds must be more than 0, got {seconds}")

    def report(tally) -> None:
        out.print(f"{tally.target:<22} {tally.cases:>6} cases in {tally.seconds:6.1f} s: {tally.correct} correct, "
                  f"{tally.refused} refused in one line, {len(tally.findings)} finding(s)", highlight=False)
        for finding in tally.findings:
            out.print(f"  FINDING {finding.line()}", highlight=False)

    tallies = run_fuzz([TARGETS[t] for t in target or TARGETS], seconds, seed, only_case=case, progress=report)
    if any(t.findings for t in tallies):
        raise SystemExit(1)


def _first_sentence(doc: str, parameters: Iterable[str] = ()) -> str:
    """The first sentence of a docstring's first paragraph, however its lines wrap; a ``name`` of ``parameters``
    shown as <name> (a value the user sets: "on <images> VOC samples"), other reST quoting dropped."""
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    paragraph = re.sub(r"``(\w+)``", lambda m: f"<{m[1]}>" if m[1] in parameters else m[1], paragraph)
    paragraph = paragraph.replace("``", "")
    return paragraph.split(". ")[0].rstrip(".") + "."


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as users read it: the message, not the source file and line that raised it (and in the log)."""
    console.print(f"warning: {escape(str(message))}", soft_wrap=True)


def _out_of_memory(err: RuntimeError) -> bool:
    """torch's allocators raise RuntimeError (CUDA: its subclass OutOfMemoryError), not MemoryError."""
    text = str(err).lower()
    return "out of memory" in text or "not enough memory" in text


# Import names of the optional packages, and the extra that installs each (pyproject.toml).
OPTIONAL_PACKAGES = {"transformers": "hub", "open_clip": "hub", "ray": "ray"}
# Import names of ssl-bench's requirements (pyproject.toml), and the distribution pip installs each from: one
# missing is a broken environment (an install with --no-deps, a machine's own image), said in one line.
REQUIRED_PACKAGES = {"torch": "torch", "torchvision": "torchvision", "timm": "timm", "safetensors": "safetensors",
                     "numpy": "numpy", "numba": "numba", "scipy": "scipy", "sklearn": "scikit-learn",
                     "threadpoolctl": "threadpoolctl", "faiss": "faiss-cpu", "community": "python-louvain",
                     "networkx": "networkx", "igraph": "igraph", "sknetwork": "scikit-network", "pyamg": "pyamg",
                     "pymatting": "pymatting", "pydensecrf": "pydensecrf2", "pandas": "pandas",
                     "matplotlib": "matplotlib", "PIL": "pillow", "yaml": "pyyaml", "typer": "typer", "rich": "rich",
                     "tabulate": "tabulate"}


def missing_package_line(err: ModuleNotFoundError) -> str | None:
    """The one line for a missing package ssl-bench knows (an extra's, a requirement's), else None (a bug)."""
    module = (err.name or "").split(".")[0]
    if module in OPTIONAL_PACKAGES:
        return f"this needs the package {err.name} -- pip install ssl-bench[{OPTIONAL_PACKAGES[module]}]"
    if module in REQUIRED_PACKAGES:
        return (f"ssl-bench needs the package {REQUIRED_PACKAGES[module]} (module {module}), which is not installed "
                f"-- pip install {REQUIRED_PACKAGES[module]} (one of ssl-bench's requirements)")
    return None


def main() -> None:
    interrupted = []

    def on_interrupt(signum, frame):  # click turns Ctrl-C into a bare exit: remember it was one
        interrupted.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_interrupt)
    warnings.showwarning = _one_line_warning
    try:
        app()
    except UserError as err:
        console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)  # one line, never wrapped
        raise SystemExit(2)
    except (MemoryError, RuntimeError) as err:  # past the checks of resources.py: still one line, and what to change
        if isinstance(err, RuntimeError) and not _out_of_memory(err):
            raise
        console.print("[bold red]error:[/] out of memory -- a size (--resize, K, an image count, a batch or size "
                      "parameter of the task) needs more memory than this machine has; use a smaller one",
                      highlight=False, soft_wrap=True)
        raise SystemExit(2)
    except ModuleNotFoundError as err:  # an optional package a backbone, task or executor needs, or a requirement
        line = missing_package_line(err)
        if line is None:
            raise
        console.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
        raise SystemExit(2)
    except (KeyboardInterrupt, SystemExit) as stop:
        if not interrupted and not isinstance(stop, KeyboardInterrupt):
            raise
        console.print("interrupted: stored results and cached features are kept; run again to resume")
        raise SystemExit(130)
    except Exception:  # a bug: its traceback goes to the log file too, where a user will look for it
        if display.log_file is not None:
            display.log_file.write(traceback.format_exc())
        raise
