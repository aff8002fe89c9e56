"""The ``ssl-bench`` command line. Every command is a thin shell over the library."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Optional

import typer
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from . import registry
from .errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Benchmark self-supervised backbones by unsupervised semantic segmentation.")
console = Console(stderr=True)
out = Console(soft_wrap=True)


def parse_pairs(pairs: Iterable[str], what: str) -> tuple:
    """``key=value`` strings -> sorted (key, value) pairs, values parsed as YAML (numbers, bools, lists)."""
    parsed = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"{what} '{pair}' is not key=value -- e.g. {what} tau=5")
        parsed[key.replace("-", "_")] = yaml.safe_load(value)
    return tuple(sorted(parsed.items()))


@contextmanager
def progress_bars():
    """A ``progress(iterable, desc, total)`` function drawing rich progress bars on stderr."""
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=console, transient=False) as bars:
        def progress(iterable, desc: str = "", total: int | None = None):
            task = bars.add_task(desc, total=total)
            for item in iterable:
                yield item
                bars.advance(task)
        yield progress


def _runner(store: Optional[Path], cache: Optional[Path], device: Optional[str] = None):
    from .features import FeatureCache
    from .runner import Runner
    from .store import ResultStore

    return Runner(ResultStore(store), FeatureCache(cache), device)


StoreOpt = typer.Option(None, "--store", help="results database (default .ssl-bench/results.sqlite or $SSL_BENCH_STORE)")
CacheOpt = typer.Option(None, "--cache", help="feature cache folder (default .ssl-bench/cache or $SSL_BENCH_CACHE)")


@app.command()
def run(
    backbone: str = typer.Option("reference", help="registered backbone (ssl-bench list backbones)"),
    task: str = typer.Option("kmeans", help="registered task (ssl-bench list tasks)"),
    dataset: str = typer.Option("synthetic", help="dataset (ssl-bench list datasets)"),
    data_root: Optional[str] = typer.Option(None, help="dataset folder (not needed for 'synthetic')"),
    split: Optional[str] = typer.Option(None, help="split to evaluate (default: the dataset's evaluation split)"),
    k: Optional[int] = typer.Option(None, "--k", help="number of clusters (default: number of classes)"),
    seed: int = typer.Option(0, help="seed of the method (clustering, training)"),
    weights: Optional[str] = typer.Option(None, help="checkpoint path, or 'random' for a random-weight smoke run"),
    crf: Optional[bool] = typer.Option(None, "--crf/--no-crf", help="dense CRF refinement (tasks that have it)"),
    param: list[str] = typer.Option([], "--param", "-p", help="task parameter key=value (repeatable)"),
    option: list[str] = typer.Option([], "--option", "-o", help="dataset option key=value, e.g. classes=8"),
    resize: int = typer.Option(320, help="protocol: shorter side (320; 322 for /14 backbones)"),
    crop: str = typer.Option("center", help="protocol: 'center' crop or 'none'"),
    force: bool = typer.Option(False, "--force", help="recompute even if this configuration is stored"),
    device: Optional[str] = typer.Option(None, help="torch device (default: cuda if present, else cpu)"),
    store: Optional[Path] = StoreOpt,
    cache: Optional[Path] = CacheOpt,
):
    """Run one backbone x task x dataset cell and store the result."""
    from .data.protocol import Protocol
    from .runner import RunConfig

    params = dict(parse_pairs(param, "--param"))
    if crf is not None:
        params["crf"] = crf
    cfg = RunConfig(backbone=backbone, task=task, dataset=dataset, split=split, k=k, seed=seed, weights=weights,
                    data_root=data_root, dataset_options=parse_pairs(option, "--option"),
                    params=tuple(sorted(params.items())), protocol=Protocol(resize=resize, crop=crop))
    runner = _runner(store, cache, device)
    with progress_bars() as progress:
        outcome = runner.run(cfg, force=force, progress=progress)
    rec = outcome.record
    tag = "computed" if outcome.computed else "already stored (use --force to recompute)"
    random_note = "  (RANDOM WEIGHTS: smoke run, not a result)" if rec["random_weights"] else ""
    out.print(f"{rec['backbone']} / {rec['task']} / {rec['dataset']}:{rec['split']} K={rec['k']} seed={rec['seed']}: "
              f"mIoU {rec['miou']:.2f}  Acc {rec['acc']:.2f}  F1 {rec['f1']:.2f}  ({tag}){random_note}")
    for key, m in rec["metrics"].items():
        if m.get("labelled_fraction", 1.0) < 1.0:
            lab = m["labelled"]
            out.print(f"  {key}: labelled {m['labelled_fraction'] * 100:.1f}% of pixels; on labelled pixels only: "
                      f"mIoU {lab['miou']:.2f} Acc {lab['acc']:.2f} F1 {lab['f1']:.2f}")
    out.print(f"  run {rec['config_hash']} in {runner.store.path}")


NORMALISATIONS = {(0.485, 0.456, 0.406): "ImageNet", (0.48145466, 0.4578275, 0.40821073): "CLIP",
                  (0.0, 0.0, 0.0): "none"}


SHORT_ORIGINS = {"$SSL_BENCH_WEIGHTS": "local", "timm cache": "timm", "Hugging Face cache": "hf",
                 "torch.hub cache": "torch.hub"}


def _backbone_table(wide: bool) -> Table:
    """Backbones, one row each. The default columns fit 80 characters; --wide adds the provenance."""
    from .models.weights import locate

    columns = ["name", "family", "grid", "dim", "params", "licence", "weights"]
    if wide:
        columns[2:2] = ["architecture"]
        columns[-2:-1] = ["pre-training data", "licence", "input", "norm", "source"]
    table = Table(*columns, box=None, pad_edge=False, header_style="bold underline", caption=None if wide else
                  "params in millions; grid: /patch or sN (CNN output stride).\n"
                  "--wide adds architecture, pre-training data, input size, normalisation, source")
    table.columns[0].no_wrap = True  # names are what users type: never cut
    for spec in registry.backbones().values():
        if spec.family == "reference":
            found = "non-learned"
        else:
            where = locate(spec)
            found = SHORT_ORIGINS.get(where[0], where[0]) if where else "-"
        grid = f"s{spec.patch_size}" if spec.heads == 0 and spec.family != "reference" else f"/{spec.patch_size}"
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
        table.add_row(*row)
    return table


@app.command("list")
def list_(what: str = typer.Argument(..., help="backbones | tasks | datasets"),
          wide: bool = typer.Option(False, "--wide", help="backbones: all details (needs a wide terminal)")):
    """List registered backbones, tasks or datasets."""
    if what == "backbones":
        table = _backbone_table(wide)
    elif what == "tasks":
        table = Table("name", "title", "features", "parameters")
        for spec in registry.tasks().values():
            table.add_row(spec.name, spec.title, ", ".join(spec.features),
                          ", ".join(f"{k}={v}" for k, v in spec.params.items()))
    elif what == "datasets":
        from .data import DATASETS

        table = Table("name", "title", "classes", "splits", "data root")
        for name, cls in DATASETS.items():
            table.add_row(name, cls.title, str(getattr(cls, "num_classes", "?")), ", ".join(cls.splits),
                          cls.default_root)
    else:
        raise UserError(f"cannot list '{what}' -- choose backbones, tasks or datasets")
    out.print(table)


@app.command()
def report(
    format: str = typer.Option("markdown", "--format", "-f", help="markdown | latex | csv"),
    task: Optional[str] = typer.Option(None, help="only this task"),
    k: str = typer.Option("classes", "--k", help="'classes' (K = number of classes) or a number"),
    output: Optional[Path] = typer.Option(None, "--output", help="write to this file instead of stdout"),
    store: Optional[Path] = StoreOpt,
):
    """Leaderboard of the stored runs."""
    from . import report as reports
    from .store import ResultStore

    if format not in reports.FORMATS:
        raise UserError(f"unknown format '{format}' -- choose {', '.join(reports.FORMATS)}")
    text = reports.FORMATS[format](reports.leaderboard(ResultStore(store).query(), k=k, task=task))
    if output:
        output.write_text(text)
        console.print(f"wrote {output}")
    else:
        sys.stdout.write(text)


@app.command()
def bench(
    name: Optional[str] = typer.Argument(None, help="benchmark to run (omit to list them)"),
    arg: list[str] = typer.Option([], "--arg", "-a", help="benchmark argument key=value (repeatable)"),
    output_dir: Path = typer.Option(Path("results/bench"), help="where NAME.json is written (committed figures)"),
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
            table.add_row(key, (function.__doc__ or "").strip().splitlines()[0])
        out.print(table)
        return
    result = benches.run_benchmark(name, None if no_write else output_dir, **dict(parse_pairs(arg, "--arg")))
    out.print_json(json.dumps(result))
    if not no_write:
        console.print(f"wrote {output_dir / (name + '.json')}")


def main() -> None:
    try:
        app()
    except UserError as err:
        console.print(f"[bold red]error:[/] {err}", highlight=False)
        raise SystemExit(2)
    except KeyboardInterrupt:
        console.print("interrupted: stored results and cached features are kept; run again to resume")
        raise SystemExit(130)
