"""``ssl-bench regress``: rerun a small fixed suite and compare every metric with committed baselines.

The suite is a handful of sweep grids (``SUITE``): the synthetic dataset with the non-learned
``reference`` backbone and a seeded random-weight ViT, plus a CamVid subset from ../shared/data when it
is there. It runs in a throw-away store and cache (never the user's), with fixed thread counts and
seeds, so two runs on one machine give identical numbers; the tolerances absorb the last-digit
differences between BLAS builds. Baselines live in ``results/regress/baselines.json`` and change only
through ``ssl-bench regress --update``.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .data.shared import shared_data_dir
from .errors import UserError
from .registry import is_number
from .ops import set_threads

BASELINES = Path(__file__).resolve().parent.parent / "results" / "regress" / "baselines.json"
METRICS = ("miou", "acc", "f1")
TOLERANCE = {"miou": 0.5, "acc": 0.5, "f1": 0.5}  # absolute, in percentage points
THREADS = 2  # torch, OpenMP, BLAS and numba: a fixed count keeps float reductions in one order run after run

SYNTHETIC = {"name": "synthetic", "options": {"n": 12}}
RANDOM_VIT = {"name": "dino-vits16", "weights": "random", "weights_seed": 0}
SUITE = [  # sweep grids (see ssl_bench/sweep.py); the CamVid one needs ../shared/data/camvid
    {"backbones": ["reference", RANDOM_VIT], "tasks": ["kmeans"], "datasets": [SYNTHETIC], "k": ["C", "2C"], "seeds": [0]},
    # the methods' own pipelines: DatUS^2 segments (keys of the random ViT), PriMaPs proposals + EM
    {"backbones": [RANDOM_VIT], "tasks": ["datus2-initial"], "datasets": [SYNTHETIC], "k": ["C"], "seeds": [0]},
    {"backbones": ["reference"], "tasks": [{"name": "primaps-em-fast", "params": {"epochs": 2}}],
     "datasets": [SYNTHETIC], "k": ["C"], "seeds": [0]},
    {"backbones": ["reference", RANDOM_VIT], "tasks": ["kmeans"], "k": ["C"], "seeds": [0],
     "datasets": [{"name": "camvid", "data_root": "{shared}/camvid", "split": "val", "options": {"limit": 8}}]},
]


@dataclass
class Row:
    case: str
    metric: str
    baseline: float | None
    now: float | None
    tolerance: float

    @property
    def delta(self) -> float | None:
        return None if self.baseline is None or self.now is None else self.now - self.baseline

    @property
    def ok(self) -> bool:
        return self.delta is not None and abs(self.delta) <= self.tolerance


def case_name(config: dict) -> str:
    """A stable, readable key of one suite cell, from its resolved configuration."""
    options = ",".join(f"{k}={v}" for k, v in sorted(config["dataset_options"].items()))
    random = "(random)" if config["random_weights"] else ""
    return (f"{config['backbone']}{random}/{config['task']}/{config['dataset']}:{config['split']}"
            f"[{options}] K={config['k']} seed={config['seed']}")


def suite_grids() -> tuple[list[dict], list[str]]:
    """The suite's grids that can run here, and the reason for each one skipped."""
    shared = shared_data_dir()
    grids, skipped = [], []
    for grid in SUITE:
        roots = [d.get("data_root") for d in grid["datasets"] if d.get("data_root")]
        if any("{shared}" in r for r in roots):
            missing = [r for r in roots if shared is None or not Path(r.format(shared=shared)).is_dir()]
            if missing:
                skipped.append(f"skipped {', '.join(d['name'] for d in grid['datasets'])}: "
                               f"{missing[0].format(shared=shared or '../shared/data')} absent "
                               f"(set SSL_BENCH_SHARED_DATA to the shared data folder)")
                continue
            grid = {**grid, "datasets": [{**d, "data_root": d["data_root"].format(shared=shared)}
                                         if d.get("data_root") else d for d in grid["datasets"]]}
        grids.append(grid)
    return grids, skipped


def run_suite(grids: list[dict], only: str | None = None) -> dict[str, dict[str, float]]:
    """Every cell of ``grids`` computed in a temporary store and cache: {case: {metric: value}}."""
    import torch

    from .executors import run_local
    from .features import FeatureCache
    from .runner import Runner
    from .store import ResultStore
    from .sweep import grid_from_mapping, make_plan

    set_threads(THREADS)
    torch.manual_seed(0)
    results = {}
    with tempfile.TemporaryDirectory(prefix="ssl-bench-regress-") as tmp:
        runner = Runner(ResultStore(Path(tmp) / "results.sqlite"), FeatureCache(Path(tmp) / "cache"), "cpu")
        for grid in grids:
            plan = make_plan(grid_from_mapping(grid, "regression suite"), runner,
                             select=lambda cell: only is None or only in case_name(cell.run.config))
            summary = run_local(plan, runner)
            if summary.failed:
                raise RuntimeError(f"regression case failed: {summary.failed[0][0]}: {summary.failed[0][1]}")
        for record in runner.store.query():
            results[case_name(record["config"])] = {m: round(float(record[m]), 4) for m in METRICS}
    return results


def read_baselines(path: Path = BASELINES, missing_ok: bool = False) -> dict:
    """The baselines file, checked before the suite runs (a broken file must not cost a whole suite)."""
    if not path.exists():
        if missing_ok:
            return {}
        raise UserError(f"no regression baselines at {path} -- create them with `ssl-bench regress --update`")
    if not path.is_file():
        raise UserError(f"--baselines {path} is not a file -- give the JSON file, e.g. {BASELINES}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}) -- restore it from git or rewrite it with "
                        f"`ssl-bench regress --update`") from None
    cases, tolerance = (data.get("cases"), data.get("tolerance", {})) if isinstance(data, dict) else (None, None)
    numbers = isinstance(cases, dict) and all(isinstance(m, dict) and all(is_number(v) for v in m.values())
                                              for m in cases.values())
    if not numbers or not isinstance(tolerance, dict) or not all(is_number(v) for v in tolerance.values()):
        raise UserError(f"{path} is not an ssl-bench baselines file (expected {{\"cases\": {{NAME: {{metric: "
                        f"number}}}}, \"tolerance\": {{metric: number}}}}) -- restore it from git or rewrite it "
                        f"with `ssl-bench regress --update`")
    return data


def compare(baselines: dict, results: dict[str, dict[str, float]]) -> list[Row]:
    """One row per (case, metric) run now; a case without a baseline is a drift (baseline None)."""
    tolerance = {**TOLERANCE, **baselines.get("tolerance", {})}
    cases = baselines.get("cases", {})
    rows = []
    for case, metrics in sorted(results.items()):
        for metric in METRICS:
            base = cases.get(case, {}).get(metric)
            rows.append(Row(case, metric, base, metrics.get(metric), tolerance[metric]))
    return rows


def update(results: dict[str, dict[str, float]], path: Path = BASELINES) -> dict:
    """Write the baselines; cases not run here (e.g. CamVid absent) keep their committed values."""
    old = read_baselines(path, missing_ok=True)
    cases = {**old.get("cases", {}), **results}
    data = {"about": "ssl-bench regress baselines: headline metrics (percent) of the fixed suite in "
                     "ssl_bench/regress.py; rewrite only with `ssl-bench regress --update`",
            "tolerance": {**TOLERANCE, **old.get("tolerance", {})}, "cases": dict(sorted(cases.items()))}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return data


def table(rows: list[Row]) -> str:
    """Plain-text table (no wrapping: CI logs are read as text) of metric, baseline, now, delta, tolerance."""
    from tabulate import tabulate

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    def delta(value: float | None) -> str:
        return "no baseline" if value is None else f"{value if round(value, 2) else 0.0:+.2f}"  # no "-0.00"

    body = [(r.case, r.metric, fmt(r.baseline), fmt(r.now), delta(r.delta), f"+-{r.tolerance:g}",
             "ok" if r.ok else "DRIFT") for r in rows]
    return tabulate(body, headers=["case", "metric", "baseline", "now", "delta", "tolerance", "verdict"],
                    tablefmt="simple", disable_numparse=True)
