"""Dataset readers and the evaluation input protocol.

``open_dataset(name, root, split, **options)`` is the only entry point the rest of ssl-bench needs;
``DATASETS`` maps registered names to reader classes (their class attributes document each one).
"""

from __future__ import annotations

import difflib
import inspect
from pathlib import Path

import numpy as np

from ssl_bench.data.base import IGNORE, SegDataset
from ssl_bench.data.camvid import CamVid
from ssl_bench.data.cityscapes import Cityscapes27
from ssl_bench.data.cocostuff import CocoStuff27
from ssl_bench.data.crops import FiveCrops, with_crops
from ssl_bench.data.folder import FolderDataset
from ssl_bench.data.images import ImageFolder
from ssl_bench.data.potsdam import Potsdam3
from ssl_bench.data.protocol import Protocol
from ssl_bench.data.suim import SUIM, SUIM8
from ssl_bench.data.synthetic import SyntheticDataset
from ssl_bench.data.voc2012 import VOC2012
from ssl_bench.errors import UserError
from ssl_bench.registry import brief, check_like_default, is_scalar

DATASETS: dict[str, type[SegDataset]] = {
    "camvid": CamVid,
    "suim": SUIM,  # DatUS^2 6-class form (BW, PF, SR merged)
    "suim8": SUIM8,
    "voc2012": VOC2012,
    "cityscapes27": Cityscapes27,
    "cocostuff27": CocoStuff27,
    "potsdam3": Potsdam3,
    "folder": FolderDataset,
    "images": ImageFolder,  # images without ground truth: predictions, no metrics
    "synthetic": SyntheticDataset,
}


def dataset_options(cls: type[SegDataset]) -> dict[str, object]:
    """Reader-specific options (constructor keywords beyond root and split) with their defaults."""
    params = inspect.signature(cls.__init__).parameters
    return {n: p.default for n, p in params.items() if n not in ("self", "root", "split")}


SUBSETS = ("first", "stride", "random")  # which N images ``limit=N`` keeps
SUBSET_OPTIONS = ("limit", "subset", "subset_seed")  # options of every reader that choose a subset of its images


def subset_options(cls: type[SegDataset]) -> tuple[str, ...]:
    """The options of a reader that only choose how many / which images (reports treat them as subsets)."""
    return SUBSET_OPTIONS + tuple(getattr(cls, "count_options", ()))


def subset_text(config: dict) -> str:
    """`` [limit=4]``: the options of a stored run's config that chose fewer images than its split's (none: "");
    a line naming a run says so, so that a smoke run never reads like a whole split's result."""
    cls = DATASETS.get(config.get("dataset"))
    defaults = {"subset": "first", "subset_seed": 0, **(dataset_options(cls) if cls else {})}
    names = subset_options(cls) if cls else SUBSET_OPTIONS
    chosen = {k: v for k, v in (config.get("dataset_options") or {}).items()
              if k in names and (k not in defaults or defaults[k] != v)}
    return f" [{', '.join(f'{k}={v}' for k, v in chosen.items())}]" if chosen else ""


def open_dataset(name: str, root: str | Path | None, split: str | None, **options) -> SegDataset:
    """Open split ``split`` (None: the dataset's evaluation split) of dataset ``name`` at ``root``;
    every failure is one clear UserError. The option ``limit=N`` (any reader) keeps N images, for small
    sweeps and regression suites: the first N (``subset=first``, the default), N spread evenly over the
    split (``subset=stride``: the first N CamVid images are consecutive frames of one video), or N drawn at
    random (``subset=random``, seeded by ``subset_seed``). The image list is hashed: another list is
    another run. ``crops=five`` (``crop_ratio=0.5``) replaces each image by its four corner crops and its
    centre crop (``data/crops.py``: five-crop training views), after the limit."""
    cls = DATASETS.get(name) if isinstance(name, str) else None
    if cls is None:
        close = difflib.get_close_matches(str(name), list(DATASETS), n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"choose one of: {', '.join(DATASETS)}"
        raise UserError(f"unknown dataset {brief(name)} -- {hint}")
    check_option_values(name, options)
    limit = options.pop("limit", None)
    subset, subset_seed = options.pop("subset", "first"), options.pop("subset_seed", 0)
    crops, crop_ratio = options.pop("crops", "none"), options.pop("crop_ratio", None)
    known = dataset_options(cls)
    unknown = sorted(set(options) - set(known))
    if unknown:
        valid = ", ".join([*(f"{k}={v!r}" for k, v in known.items()), "limit=N (N images)",
                           f"subset={'|'.join(SUBSETS)} (which N)", "subset_seed=0",
                           "crops=five (five crops per image)", "crop_ratio=0.5"])
        raise UserError(f"unknown option(s) {', '.join(unknown)} for dataset {name!r} -- valid options "
                        f"(with their defaults): {valid}")
    for key, value in options.items():
        check_like_default(f"dataset {name!r} option", key, value, known[key], "-o")
    dataset = cls(root, split or cls.default_split, **options)
    dataset._options = {**known, **options}  # cache keys: seed=0 given or defaulted is the same data
    if subset not in SUBSETS:
        raise UserError(f"dataset option subset={subset!r} -- choose {', '.join(SUBSETS)} (with limit=N)")
    if not (isinstance(subset_seed, int) and not isinstance(subset_seed, bool) and subset_seed >= 0):
        raise UserError(f"dataset option subset_seed={subset_seed!r} must be a whole number >= 0 -- e.g. -o subset_seed=1")
    if limit is None and (subset != "first" or subset_seed):
        raise UserError(f"dataset option subset={subset} chooses which images limit=N keeps -- add -o limit=N")
    dataset = dataset if limit is None else _subset(dataset, limit, subset, subset_seed)
    if hasattr(dataset, "samples"):  # file-backed: every image used has its label, before any work
        dataset.check_files()
    return with_crops(dataset, crops, crop_ratio)


def check_option_values(name: str, options: dict) -> None:
    """Every dataset option is one value (text, number, true/false): a list or a mapping is one clear line."""
    for key, value in options.items():
        if not is_scalar(value):
            raise UserError(f"dataset {name!r} option {key}={brief(value)} must be a single value, not a "
                            f"{'list' if isinstance(value, (list, tuple)) else type(value).__name__} -- e.g. -o {key}=25")


def _subset(dataset: SegDataset, limit, subset: str, seed: int) -> SegDataset:
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise UserError(f"dataset option limit must be a positive integer, got {brief(limit)} -- e.g. -o limit=25")
    size = len(dataset)
    if subset == "first" or limit >= size:
        kept = list(range(min(limit, size)))
    elif subset == "stride":  # evenly spread, first and last included
        kept = sorted({int(i) for i in np.linspace(0, size - 1, limit).round()})
    else:
        kept = sorted(np.random.default_rng(seed).choice(size, limit, replace=False).tolist())
    if hasattr(dataset, "samples"):  # file-backed readers
        dataset.samples = [dataset.samples[i] for i in kept]
    elif subset == "first":  # generated datasets (synthetic) size themselves with n
        dataset.n = len(kept)
    else:
        raise UserError(f"{dataset.title} is generated: limit=N makes its first N images; subset={subset} is for "
                        f"datasets of files -- use -o n=N")
    dataset.limit_cuts = limit < size  # False: the same images as without the limit, so the same run
    return dataset


__all__ = ["DATASETS", "FiveCrops", "IGNORE", "SUBSET_OPTIONS", "Protocol", "SegDataset", "check_option_values", "dataset_options",
           "open_dataset", "subset_options"]
