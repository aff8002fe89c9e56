"""Housekeeping of the results store and the feature cache: ``ssl-bench runs``, ``show`` and ``cache``.

Runs are selected by what a user remembers of them (backbone, task, dataset, K, seed, random weights,
an older task version, a hash prefix); deleting one removes its row and its panel samples. A cache entry
is *needed* when some stored run read it: a run records the entries it opened (training views included);
for runs stored before that record: its own split's features (same backbone, weights, dataset, image list,
protocol and image options), or another split's that one of its parameters names (a ``fit_split``). Pruning removes the other entries, and temporary files a killed process left behind.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import registry, samples, versions
from .errors import UserError
from .store import ResultStore, file_lock

STALE_TEMPORARY_SECONDS = 3600  # a temporary file this old belongs to no live writer


# ---- runs ---------------------------------------------------------------------------------------------

def find_run(store: ResultStore, prefix: str) -> dict:
    """The stored run whose hash starts with ``prefix`` (one clear line when none or several do)."""
    prefix = prefix.strip().lower()
    if not prefix or any(c not in "0123456789abcdef" for c in prefix):
        raise UserError(f"{prefix!r} is not a run hash -- copy one from ssl-bench runs (its first column: 12 hex digits)")
    found = [r for r in store.query("config_hash LIKE ?", (prefix + "%",))]
    if not found:
        raise UserError(f"no stored run has a hash starting with {prefix} in {store.path} -- see ssl-bench runs")
    if len(found) > 1:
        some = ", ".join(r["config_hash"] for r in found[:4]) + (" ..." if len(found) > 4 else "")
        raise UserError(f"{len(found)} stored runs start with {prefix} ({some}) -- give more characters of the hash")
    return found[0]


class _Dumper(yaml.SafeDumper):
    """Block style for mappings, one line for lists of numbers (per-class IoU, matchings)."""


def _short_list(dumper: yaml.SafeDumper, items: list):
    flow = all(isinstance(i, (int, float, str)) or i is None for i in items)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", items, flow_style=flow)


_Dumper.add_representer(list, _short_list)
_Dumper.add_representer(tuple, _short_list)


def headline_text(record: dict) -> str:
    """mIoU / Acc / F1 of a stored run, or why it has none (images without ground truth)."""
    if record["miou"] is None:
        return "no ground truth, so no metrics (predictions and their statistics stored)"
    return f"mIoU {record['miou']:.2f}  Acc {record['acc']:.2f}  F1 {record['f1']:.2f}"


def run_text(record: dict) -> str:
    """A stored run as YAML: the whole configuration (weights file included), scores of every stream,
    the method's statistics, the seconds per stage and the environment it ran in."""
    config = record["config"]
    file = config.get("weights_file", "a file (stored before file names were kept)")
    weights = (f"random (seed {config.get('weights_seed', 0)}): RANDOM WEIGHTS, a smoke run, not a result"
               if record["random_weights"] else
               "not learned" if record["weights"] == "none" else
               f"{file}, sha256 {record['weights']}"
               + (" -- the user's own checkpoint, not the registry's" if config.get("own_weights") else ""))
    document = {"run": record["config_hash"], "stored": record.get("created_at"), "headline": headline_text(record),
                "weights": weights,
                "config": config, "scores": record["metrics"], "stats": record["stats"],
                "timings (s)": {k: round(v, 3) for k, v in record["timings"].items()},
                "environment": record["environment"]}
    return yaml.dump(document, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=110)


@dataclass
class RunFilter:
    """What selects stored runs; None (or empty) matches every run."""

    backbone: str | None = None
    task: str | None = None
    dataset: str | None = None
    k: str | None = None  # a number, or C, 2C ... (each run's classes)
    seed: int | None = None
    random: bool | None = None  # True: random-weight runs only; False: none of them
    superseded: bool = False  # only runs of another version of their task than the registered one
    hashes: list[str] = field(default_factory=list)  # hash prefixes

    def matches(self, record: dict) -> bool:
        from .sweep import resolve_k

        config = record["config"]
        checks = [self.backbone in (None, record["backbone"]), self.task in (None, record["task"]),
                  self.dataset in (None, record["dataset"]), self.seed in (None, record["seed"]),
                  self.random in (None, record["random_weights"]),
                  not self.superseded or not versions.is_current_version(config),
                  not self.hashes or any(record["config_hash"].startswith(h.lower()) for h in self.hashes)]
        if self.k is not None:
            checks.append(record["k"] == resolve_k(self.k, int(config.get("num_classes") or 1)))
        return all(checks)


def select_runs(store: ResultStore, wanted: RunFilter) -> list[dict]:
    if wanted.k is not None:
        from .sweep import resolve_k

        resolve_k(wanted.k, 1)  # a bad K is one line before any row is read
    return [r for r in store.query() if wanted.matches(r)]


def delete_runs(store: ResultStore, records: list[dict]) -> int:
    """Delete the rows and their panel samples (the images they showed stay: other runs share them)."""
    hashes = [r["config_hash"] for r in records]
    deleted = store.delete(hashes)
    for h in hashes:
        (samples.samples_dir(store.path) / f"{h}.npz").unlink(missing_ok=True)
    return deleted


# ---- the feature cache --------------------------------------------------------------------------------

@dataclass
class CacheEntry:
    path: Path
    kind: str  # "features" | "labels"
    key: dict  # the entry's CacheKey as written in its meta file ({} when it has none)
    size: int  # bytes
    images: int
    kinds: list[str]
    needed_by: int = 0  # stored runs that read it


def _folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _read_json(path: Path) -> dict:
    """A cache entry's checked metadata ({} where absent or damaged: the entry is then listed as unknown)."""
    from .integrity import Damaged, read_checked_json

    try:
        data = read_checked_json(path)
    except (OSError, ValueError, Damaged):
        return {}
    return data if isinstance(data, dict) else {}


def cache_entries(root: Path) -> list[CacheEntry]:
    """Every features entry (``BACKBONE/DATASET-SPLIT/DIGEST``) and label entry (``_labels/...``) under ``root``."""
    entries = []
    for folder in sorted(p for p in root.glob("*/*/*") if p.is_dir()):
        labels = folder.parts[-3] == "_labels"
        meta = _read_json(folder / ("labels.json" if labels else "meta.json"))
        progress = folder.glob("*.progress.json")
        kinds = ["labels"] if labels else sorted(p.name[:-len(".progress.json")] for p in progress)
        count = len(meta.get("ids", []))
        entries.append(CacheEntry(folder, "labels" if labels else "features", meta.get("key", {}),
                                  _folder_size(folder), count, kinds))
    return entries


def _image_options(config: dict) -> dict:
    """The reader options of a run as the cache keys them (its given options over the reader's defaults)."""
    from .data import DATASETS, dataset_options

    cls = DATASETS.get(config["dataset"])
    defaults = dataset_options(cls) if cls else {}
    return {**defaults, **(config.get("dataset_options") or {}), **(config.get("dataset_identity") or {})}


def reads(config: dict, entry: CacheEntry, opened: list | None = None) -> bool:
    """Whether a run with this config reads this cache entry: one of the entries it recorded opening
    (``opened``, the run's ``stats["cache_entries"]``: views a method trains on included), or, for runs stored
    before that record, one the module docstring's rule names."""
    if opened and any(entry.path.as_posix().endswith("/" + folder) for folder in opened):
        return True
    key = entry.key
    if not key:
        return False
    from .data.protocol import SCORING_FIELDS

    inputs = {k: v for k, v in config["protocol"].items() if k not in SCORING_FIELDS}  # the scoring rules are
    # not in cache keys: they apply after the cached features and labels
    same_data = key.get("dataset") == config["dataset"] and dict(key.get("protocol", [])) == inputs
    options = _image_options(config)
    same_data &= all(options.get(name) == value for name, value in key.get("options", [])
                     if name != "label_files")  # the label files' stamp is checked when read
    own_split = key.get("split") == config["split"] and key.get("ids_sha") == config["ids_sha"]
    fit_split = key.get("split") in {v for v in (config.get("params") or {}).values() if isinstance(v, str)}
    if entry.kind == "labels":  # decoded at the patch multiple of the run's backbone
        spec = registry.backbones().get(config["backbone"])
        multiple = key.get("weights") == f"multiple={spec.patch_size}" if spec else True
        return same_data and multiple and (own_split or fit_split)
    return (same_data and key.get("backbone") == config["backbone"] and key.get("weights") == config["weights"]
            and (own_split or fit_split))


def count_needs(entries: list[CacheEntry], records: list[dict]) -> None:
    for entry in entries:
        entry.needed_by = sum(reads(r["config"], entry, (r.get("stats") or {}).get("cache_entries")) for r in records)


def stale_temporaries(root: Path, now: float | None = None) -> list[Path]:
    """Temporary files a killed writer left (``*.tmp*``), untouched for an hour."""
    now = time.time() if now is None else now
    return [p for p in root.rglob("*.tmp*") if p.is_file() and now - p.stat().st_mtime > STALE_TEMPORARY_SECONDS]


def prune(entries: list[CacheEntry]) -> tuple[list[CacheEntry], list[CacheEntry]]:
    """Remove the entries no stored run needs; one being extracted (its lock held) is kept.
    Returns (removed, kept because in use)."""
    removed, busy = [], []
    for entry in entries:
        if entry.needed_by:
            continue
        lock = entry.path / ".lock"
        if lock.exists():
            with file_lock(lock, wait=False) as free:
                if not free:
                    busy.append(entry)
                    continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(entry)
    return removed, busy


def human_size(size: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"
