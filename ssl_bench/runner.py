"""Runs one cell (backbone x task x dataset x split x K x seed) from configuration to stored result.

The runner knows no method by name: it resolves the task's entrypoint from the registry, hands it a
``TaskContext`` (features from the cache, images, the backbone on demand) and evaluates the
``Prediction`` stream it yields with a streaming confusion matrix.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import itertools
import json
import platform
import subprocess
import time
import warnings
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from . import __version__, predictions as saved, registry, samples, versions
from .data import SUBSET_OPTIONS, check_option_values, open_dataset
from .data.base import SegDataset
from .data.protocol import SCORING_FIELDS, Protocol
from .errors import UserError
from .features import FeatureCache, FeatureStore, LabelStore
from .integrity import Damaged, load_value, save_value
from .metrics import StreamingConfusion
from .resources import check_clusters, check_extraction
from .models import Backbone, WeightsSource, build_backbone, resolve
from .store import MAX_INTEGER, ResultStore, RunRecord, config_hash, file_lock

FINAL = "final"
_END = object()  # the end of a stream (``Context.timed_stream``)


# ---- what a task receives and returns ---------------------------------------------------------------

@dataclass
class Prediction:
    index: int  # image index within ``split``
    labels: np.ndarray  # int64 at protocol (label) resolution; -1 = unlabelled
    stream: str = FINAL  # e.g. "initial", "denoised"; "final" on the run's split is the headline
    split: str | None = None  # None: the run's split


@dataclass
class TaskResult:
    predictions: Iterable[Prediction]
    stats: dict = field(default_factory=dict)  # JSON-serialisable statistics (e.g. segment statistics)


# ---- configuration ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunConfig:
    """What the user asked for; ``Runner.resolve`` turns it into a complete, hashable configuration."""

    backbone: str
    task: str
    dataset: str
    split: str | None = None
    k: int | None = None  # None: the dataset's number of classes
    seed: int = 0
    weights: str | None = None  # path, "random", or None (search the usual places)
    weights_seed: int = 0  # random initialisation; apart from ``seed`` so seeds share one extraction
    data_root: str | None = None
    dataset_options: tuple = ()  # sorted (key, value) pairs, e.g. (("classes", 6),)
    params: tuple = ()  # task parameter overrides as sorted (key, value) pairs
    protocol: Protocol = Protocol()


@dataclass
class ResolvedRun:
    config: dict  # everything that determines the numbers; hashed
    config_hash: str
    spec: registry.BackboneSpec
    task: registry.TaskSpec
    weights: WeightsSource
    dataset: SegDataset
    protocol: Protocol
    features: tuple[str, ...] = ()  # the cached kinds it reads: the task's and its stages'


WHERE_KEYS = ("data_root", "weights_file", "own_weights")  # where the data and weights were, not what they are


def run_hash(config: dict) -> str:
    """A run's key in the store: its config without the data root and weights file (the same data or weights
    elsewhere, or under another name: the same run; the weights are identified by their sha256)."""
    return config_hash({key: v for key, v in config.items() if key not in WHERE_KEYS})


def with_task_version(config: dict, version: int) -> dict:
    """``config`` as run by ``version`` of its task: a new version of a method is a new run; the key is absent
    at version 1, so the hashes stored before tasks had versions stay valid."""
    config = {key: v for key, v in config.items() if key != "task_version"}
    return config if version == 1 else {**config, "task_version": version}


def earlier_version_hashes(config: dict) -> list[str]:
    """The hashes a run's config had under the earlier versions of its task and of each of its value versions, in
    every combination (to tell a user why it recomputes)."""
    task_version, values = config.get("task_version", 1), config.get("value_versions", {})
    base = {key: v for key, v in config.items() if key != "value_versions"}
    hashes = []
    for version in range(1, task_version + 1):
        for earlier in itertools.product(*(range(1, v + 1) for v in values.values())):
            lowered = {key: v for key, v in zip(values, earlier) if v > 1}  # version 1 of a value: absent
            if version == task_version and lowered == values:
                continue  # the run itself
            hashes.append(run_hash(with_task_version({**base, **({"value_versions": lowered} if lowered else {})},
                                                     version)))
    return hashes


def before_scoring_rules_hashes(config: dict) -> list[str]:
    """The hashes a run's config had before the protocol named its scoring rules (rows of that time were scored by
    ``LEGACY_SCORING``), under this or an earlier version of its task: to tell a user why it recomputes."""
    protocol = config["protocol"]
    if not set(SCORING_FIELDS) & set(protocol):
        return []
    before = {**config, "protocol": {k: v for k, v in protocol.items() if k not in SCORING_FIELDS}}
    return [run_hash(with_task_version(before, v)) for v in range(1, config.get("task_version", 1) + 1)]


# ---- the context handed to a task ---------------------------------------------------------------------

class MissingParameter(UserError, KeyError):
    """A task's entrypoint read a parameter its task file does not give (a KeyError too, for code that asks)."""

    __str__ = Exception.__str__  # KeyError's would quote the line


class TaskParams(dict):
    """A task's resolved parameters; reading one its task file lacks (a user's task file written for an
    entrypoint that reads more) is one line naming the parameter and the file, not a KeyError traceback."""

    def __init__(self, params: dict, task: registry.TaskSpec):
        super().__init__(params)
        self._task = task

    def __missing__(self, key):
        task = self._task
        where = task.source or "its task file"
        raise MissingParameter(f"task '{task.name}' has no parameter '{key}', which its entrypoint {task.entrypoint} "
                               f"reads -- add {key}: VALUE under params: in {where}")


class TaskContext:
    """Read-only view of one run for a task adapter (see tasks/*.yaml for what each task reads)."""

    def __init__(self, runner: "Runner", run: ResolvedRun, progress: Callable, fresh: bool = False):
        self._runner, self._run = runner, run
        self.k: int = run.config["k"]
        self.seed: int = run.config["seed"]
        self.params: dict = TaskParams(run.config["params"], run.task)
        self.stages: dict[str, registry.StageSpec] = run.task.stage_specs(self.params)  # composed tasks: slot -> stage
        self.split: str = run.dataset.split
        self.dataset: SegDataset = run.dataset
        self.protocol: Protocol = run.protocol
        self.patch_size: int = run.spec.patch_size
        self.input_size: int = run.spec.input_size  # the backbone's pre-training resolution (crops etc.)
        # a stage that builds a model of its own (a CLIP) follows the run: random weights when the run's are
        self.random_weights: bool = run.weights.is_random
        self.weights_seed: int = run.config["weights_seed"]
        self.progress = progress
        self.device = runner.device
        self.fresh = fresh  # --force: recompute what ``reuse`` kept too
        self.stage_seconds: dict[str, float] = {}  # the method's own stages (``timed``), stored with the result
        self.kept_seconds: dict[str, float] = {}  # what the values ``reuse`` read took the cells that computed them
        self._computing: list[dict] = []  # per ``reuse`` computation running: the kept values inside it
        self._computed_here: set[str] = set()  # the kept values this cell computed
        self._open_stages: list[list[float]] = []  # [seconds of stages nested in it] per ``timed`` block running

    @contextlib.contextmanager
    def timed(self, stage: str):
        """Time one of the method's own stages (summed over calls): stored with the result as
        ``stats["stage_seconds"]``, and drawn as parts of the task's bar in the report's timings figure. A stage
        timed inside another counts for itself only (the parts add up to no more than the task's time)."""
        nested = [0.0]
        self._open_stages.append(nested)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - t0
            self._open_stages.pop()
            if self._open_stages:
                self._open_stages[-1][0] += elapsed
            self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + elapsed - nested[0]

    def timed_stream(self, stage: str, items: Iterable):
        """The items of a stream (e.g. ``CRFPool.map``), timing as ``stage`` only the waits for them: what the
        stage costs this process while the runner scores each item between them (stages timed inside the stream,
        e.g. the jobs it pulls, count for themselves)."""
        iterator = iter(items)
        while True:
            with self.timed(stage):
                item = next(iterator, _END)
            if item is _END:
                return
            yield item

    @property
    def backbone(self) -> Backbone:
        return self._runner.backbone(self._run.spec, self._run.weights, self._run.config["weights_seed"])

    def build_backbone(self, name: str) -> Backbone:
        """Another registered backbone (e.g. the CNN of DatUS^2's ablation): random weights when this run's
        are, else found by the same rules."""
        spec = registry.backbone(name)
        seed = self._run.config["weights_seed"]
        return self._runner.backbone(spec, self._weights_of(spec), seed)

    def backbone_identity(self, name: str | None = None) -> dict:
        """Name and weights identity of this run's backbone, or of ``build_backbone(name)``, without building
        it: what a ``reuse`` identity names when an intermediate depends on that model."""
        spec = registry.backbone(name) if name else self._run.spec
        return {"backbone": spec.name, "weights": (self._weights_of(spec) if name else self._run.weights).identity}

    def _weights_of(self, spec: registry.BackboneSpec) -> WeightsSource:
        wanted = "random" if self._run.weights.is_random else None
        return resolve(spec, wanted, self._run.config["weights_seed"])

    def reuse(self, name: str, identity: dict, compute: Callable[[], Any], split: str | None = None,
              slots: Sequence[str] | None = None, owner: tuple[registry.TaskSpec, dict] | None = None) -> Any:
        """An intermediate of this task that does not depend on K (e.g. DatUS^2's segments and crop embeddings),
        computed once per (cached features of ``split``, seed, device, ``identity``, the method's source and version)
        and kept beside those features, so the cells of a sweep that differ only in K share it (a cell that
        finds another computing it waits for it). ``identity`` names every parameter and model it depends on
        beyond the features; ``slots`` (composed tasks) the stage slots whose code and version it depends on (None:
        all), so a value the segmenter alone makes is shared by runs with other clusterers. ``--force`` computes it
        again; a damaged copy is computed again, with a warning. ``owner``: another (non-composed) registered task
        and its parameters, whose intermediate this is (a model that task trains and this one reads as its input,
        see ``TaskSpec.projection``): keyed by that task's source, version and value versions, so both tasks share it.

        The value is kept with ``integrity.save_value`` (never pickled: nothing read back from a cache can run
        code): nested dicts, lists and tuples of numbers, text, None and numeric numpy arrays or tensors."""
        dataset = self.dataset_for(split)
        entry = self._runner.cache.entry_dir(self._runner.cache.key(
            self._run.spec.name, self._run.weights.identity, dataset, self.protocol))
        task, params = owner or (self._run.task, self.params)
        stages = {} if owner is not None else {
            slot: s for slot, s in task.stage_specs(params).items() if slots is None or slot in slots}
        stage_numbers = {slot: v for slot, v in self._run.config.get("stage_versions", {}).items() if slot in stages}
        values = {key: v for key, v in versions.value_versions(task, params, self._run.config["protocol"]).items()
                  if key.split(".", 1)[0] in stages or key.split(".", 1)[0] not in task.stages}  # the task's, the slots'
        digest = config_hash({"task": task.entrypoint, "code": _module_digest(task.entrypoint, *(
                              s.entrypoint for s in stages.values())), "version": task.version,
                              "stage_versions": stage_numbers, **({"value_versions": values} if values else {}),
                              "name": name, "seed": self.seed, "device": str(self.device), "identity": identity})
        path = entry / "reuse" / f"{name}-{digest}.npz"
        with contextlib.ExitStack() as guard:
            t0 = time.perf_counter()
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                guard.enter_context(file_lock(path.with_suffix(".lock")))  # Ray starts a split's K cells at once
                waited = time.perf_counter() - t0  # for another cell computing it, e.g.
            except OSError as err:  # e.g. a shared read-only cache: this cell computes it for itself
                if not self.fresh and path.exists():  # ... or reads what another machine kept there
                    with contextlib.suppress(Damaged):
                        return self._kept(name, path)
                warnings.warn(f"cannot keep {name} in {path.parent} ({err}); computing it for this cell", stacklevel=2)
                return compute()
            if path.exists() and not self.fresh:
                try:
                    return self._kept(name, path, waited)
                except Damaged as err:  # a damaged copy costs a recomputation, nothing more
                    warnings.warn(f"{err}: computing {name} again", stacklevel=2)
            frame = {"within": {}, "computed": 0.0}  # the kept values computed or read inside this computation
            self._computing.append(frame)
            t0 = time.perf_counter()
            try:
                value = compute()
            finally:
                self._computing.pop()
            total = time.perf_counter() - t0
            record = {"seconds": total - frame["computed"], "within": frame["within"]}  # its own seconds
            self._computed_here.add(name)  # in this cell's own timings: never claimed as kept
            self.kept_seconds.pop(name, None)
            if self._computing:
                self._computing[-1]["within"].update({name: record["seconds"], **record["within"]})
                self._computing[-1]["computed"] += total
            try:
                _seconds_file(path).unlink(missing_ok=True)  # an earlier computation's (--force), never left beside
                save_value(path, value)
                _seconds_file(path).write_text(json.dumps(record))
            except OSError as err:  # a full or read-only cache costs the reuse, not the computed cell
                warnings.warn(f"could not keep {name} for other cells in {path.parent} ({err})", stacklevel=2)
        return value

    def _kept(self, name: str, path: Path, waited: float = 0.0) -> Any:
        """A value ``reuse`` kept. Its computation's seconds, and those of the kept values it was made from, go to
        ``kept_seconds`` (by name: each counted once, never one this cell computed itself), so that the cells of a
        K sweep that read it, and the next K after one refused past that work, say what they rely on beside their
        own timings; less the seconds this cell ``waited`` for it, which are in its own."""
        value = load_value(path)
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):  # kept before: unknown
            record = json.loads(_seconds_file(path).read_text())
            used = {name: float(record["seconds"]), **{k: float(v) for k, v in record["within"].items()}}
            if self._computing:  # read while computing another kept value: that one was made from it too
                self._computing[-1]["within"].update(used)
                self._computing[-1]["computed"] += waited  # the wait was this value's computation, not that one's
            for key, seconds in used.items():
                if key not in self._computed_here and key not in self.kept_seconds:
                    self.kept_seconds[key] = max(seconds - waited, 0.0)
                    waited = max(waited - seconds, 0.0)
        return value

    # A *view* of a split: ``options`` are dataset options added to the run's (``{"crops": "five"}``: five-crop
    # training views), ``resize`` another protocol resize (a method's own training resolution).
    # A view's features and labels are cached like any split's; by default a task reads the run's own view.
    def dataset_for(self, split: str | None, options: dict | None = None) -> SegDataset:
        return self._runner.dataset(self._run, split or self.split, options)

    def view_protocol(self, resize: int | None = None) -> Protocol:
        return self.protocol if resize is None else replace(self.protocol, resize=resize)

    def features(self, kind: str, split: str | None = None, options: dict | None = None,
                 resize: int | None = None) -> FeatureStore:
        return self.features_of([kind], split, options, resize)[kind]

    def features_of(self, kinds, split: str | None = None, options: dict | None = None,
                    resize: int | None = None) -> dict[str, FeatureStore]:
        """Several cached kinds of one view at once (one extraction pass for whatever is missing)."""
        extra = {} if resize is None else {"protocol": self.view_protocol(resize)}  # the run's own: the plain call
        return self._runner.features(self._run, self.dataset_for(split, options), list(kinds), self.progress, **extra)

    def label_size(self, i: int, split: str | None = None, options: dict | None = None,
                   resize: int | None = None) -> tuple[int, int]:
        """(H, W) of image ``i`` at protocol resolution, without decoding it."""
        w, h = self.dataset_for(split, options).image_size(i)
        return self.view_protocol(resize).output_size(w, h, self.patch_size)

    def image(self, i: int, split: str | None = None, options: dict | None = None,
              resize: int | None = None) -> np.ndarray:
        image = self.dataset_for(split, options).load_image(i)
        return self.view_protocol(resize).apply_image(image, self._run.spec.patch_size)

    def label(self, i: int, split: str | None = None, options: dict | None = None,
              resize: int | None = None) -> np.ndarray:
        """Ground truth (H, W) of image ``i`` at protocol resolution; the evaluated split's comes from the
        label cache (decoded once for the whole sweep), other splits' are decoded on demand."""
        if not self.dataset.has_labels:  # a mode of a method that reads ground truth (an oracle, a probe)
            raise UserError(f"task {self._run.task.name} reads ground truth with these parameters (an oracle or a "
                            f"probe), and {self.dataset.title} has none -- use a dataset with masks")
        if (split is None or split == self.split) and options is None and resize is None:
            return self.evaluated_labels[i]
        return self.view_protocol(resize).apply_label(self.dataset_for(split, options).load_label(i), self.patch_size)

    def labels(self, split: str | None = None, options: dict | None = None, resize: int | None = None) -> LabelStore:
        """Every ground truth of a view at protocol resolution, decoded once into the label cache (a trainer that
        reads the labels of its training views at every step)."""
        if not self.dataset.has_labels:  # a probe trained on ground truth
            raise UserError(f"task {self._run.task.name} reads ground truth with these parameters (an oracle or a "
                            f"probe), and {self.dataset.title} has none -- use a dataset with masks")
        if (split is None or split == self.split) and options is None and resize is None:
            return self.evaluated_labels
        return self._runner.cache.labels.ensure(self.dataset_for(split, options), self.view_protocol(resize),
                                                self.patch_size, self.progress)

    @cached_property
    def evaluated_labels(self) -> LabelStore:
        return self._runner.cache.labels.ensure(self.dataset, self.protocol, self.patch_size, self.progress)


def _seconds_file(kept: Path) -> Path:
    """Beside a value ``reuse`` kept: the seconds its computation took."""
    return kept.with_name(kept.stem + ".seconds.json")


def _module_digest(*entrypoints: str) -> str:
    """Digest of the source of a task's module (and its stages' modules): a change to the method's code retires
    what ``reuse`` kept."""
    digest = hashlib.sha256()
    for entrypoint in entrypoints:
        module = importlib.import_module(entrypoint.partition(":")[0])
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:16]


# ---- the runner ---------------------------------------------------------------------------------------

@dataclass
class Outcome:
    config_hash: str
    record: dict
    computed: bool  # False: the result was already stored


@dataclass
class Computed:
    """A cell computed but not stored yet: its row, and a few predictions for the report panels."""

    record: RunRecord
    samples: dict | None  # keyword arguments of ``samples.save``; None when none could be kept
    predictions: Path | None = None  # the folder --save-predictions filled for this cell


def _environment(device: torch.device) -> dict:
    import faiss
    import sklearn
    import timm

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    # the device computed on: a CPU cell on a GPU node (a Ray cluster's k-means cells) says cpu
    device = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"ssl_bench": __version__, "git_commit": commit, "python": platform.python_version(),
            "torch": torch.__version__, "timm": timm.__version__, "numpy": np.__version__,
            "faiss": getattr(faiss, "__version__", "?"), "sklearn": sklearn.__version__,
            "host": platform.node(), "device": device}


def usable_device(name: str | None) -> torch.device:
    """The torch device to compute on (default: cuda if present, else cpu); a device this machine lacks is
    one clear line now, not an error in the middle of an extraction."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r} -- use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device on this machine -- use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s) -- "
                        f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name}: ssl-bench computes on cpu, cuda or mps")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: no Apple GPU (MPS) on this machine -- use --device cpu")
    return device


class Runner:
    """Holds the store, the feature cache and what was already built (backbones, datasets)."""

    def __init__(self, store: ResultStore | None = None, cache: FeatureCache | None = None,
                 device: str | None = None, save_predictions: str | Path | None = None):
        self._store = store  # opened on first use: a Ray worker computes records and never opens one
        self.cache = cache or FeatureCache()
        self.device = usable_device(device)
        self.save_predictions = Path(save_predictions).expanduser().resolve() if save_predictions else None
        if self.save_predictions is not None and self.save_predictions.is_file():
            raise UserError(f"--save-predictions {save_predictions} is a file -- give a folder")
        self._backbones: dict[tuple, Backbone] = {}
        self._datasets: dict[tuple, SegDataset] = {}
        self._patch_counts: dict[tuple, list[int]] = {}
        self._live: dict[str, tuple[WeightsSource, dict]] = {}  # in-memory models by name: weights, config extras

    def adopt(self, backbone: Backbone, source: WeightsSource, config: dict | None = None) -> None:
        """Serve runs of ``backbone.spec.name`` with this in-memory model (``ssl_bench.evaluate``): its weights
        identity keys the cache, ``config`` (e.g. the training step) joins each run's configuration."""
        self._live[backbone.spec.name] = (source, dict(config or {}))
        self._backbones[(backbone.spec.name, source.identity)] = backbone

    @cached_property
    def environment(self) -> dict:
        """Library versions, git commit, host: the same for every cell, so read once (not a subprocess per cell)."""
        return _environment(self.device)

    @property
    def store(self) -> ResultStore:
        if self._store is None:
            self._store = ResultStore()
        return self._store

    # -- building blocks, memoised per runner --
    def backbone(self, spec: registry.BackboneSpec, source: WeightsSource, seed: int) -> Backbone:
        key = (spec.name, source.identity)
        if key not in self._backbones:
            self._backbones[key] = build_backbone(spec, source, seed).to(self.device)
        return self._backbones[key]

    def dataset(self, run: ResolvedRun, split: str, options: dict | None = None) -> SegDataset:
        cfg = run.config
        return self.open_dataset(cfg["dataset"], cfg["data_root"], split, {**cfg["dataset_options"], **(options or {})})

    def open_dataset(self, name: str, root: str | None, split: str | None, options: dict) -> SegDataset:
        """``data.open_dataset``, once per (name, root, split, options): a sweep resolves many cells of one
        dataset, and opening one indexes its folders."""
        check_option_values(name, options)  # a list as a value would be a TypeError in the key below
        key = (name, root, split, tuple(sorted(options.items())))
        if key not in self._datasets:  # split None: the default split, kept under its name as well
            dataset = open_dataset(name, root, split, **options)
            self._datasets[key] = self._datasets.setdefault((name, root, dataset.split, key[3]), dataset)
        return self._datasets[key]

    def patches_per_image(self, dataset: SegDataset, protocol: Protocol, patch: int) -> list[int]:
        """Patches of each image's grid at protocol resolution (image headers only), once per runner."""
        key = (id(dataset), protocol, patch)
        if key not in self._patch_counts:
            sizes = (protocol.output_size(*dataset.image_size(i), patch) for i in range(len(dataset)))
            self._patch_counts[key] = [(h // patch) * (w // patch) for h, w in sizes]
        return self._patch_counts[key]

    def features(self, run: ResolvedRun, dataset: SegDataset, kinds: list[str],
                 progress: Callable, protocol: Protocol | None = None) -> dict[str, FeatureStore]:
        seed = run.config["weights_seed"]
        # The backbone is built only when something is missing from the cache.
        lazy = _LazyBackbone(lambda: self.backbone(run.spec, run.weights, seed), run.spec)
        return self.cache.ensure(lazy, run.weights.identity, dataset, protocol or run.protocol, kinds, progress)

    # -- configuration --
    def resolve(self, cfg: RunConfig) -> ResolvedRun:
        live_source, live_config = self._live.get(cfg.backbone, (None, {}))
        spec = self._backbones[(cfg.backbone, live_source.identity)].spec if live_source else registry.backbone(cfg.backbone)
        task = registry.task(cfg.task)
        params = task.resolve_params(dict(cfg.params))
        task.check_findable(params)  # a task or stage whose module is not on the path fails before any extraction
        options = dict(cfg.dataset_options)
        probe = self.open_dataset(cfg.dataset, cfg.data_root, cfg.split, options)
        if cfg.k is None and not probe.has_labels:
            raise UserError(f"{probe.title}: no ground truth, so no class count to set K from -- give K, e.g. "
                            f"--k 8 (ssl_bench.evaluate: k=8)")
        if "limit" in options and not getattr(probe, "limit_cuts", True):
            for key in SUBSET_OPTIONS:  # limit=5000 on 101 images: the whole split, stored and reported as such
                options.pop(key, None)
        if options.get("subset") == "first":  # the default, given or not: one run
            del options["subset"]
        if options.get("subset") != "random" or options.get("subset_seed") == 0:
            options.pop("subset_seed", None)  # only a random subset has a seed
        split = probe.split
        weights_seed = cfg.weights_seed
        for name, value, example in (("seed", cfg.seed, "--seed 0"), ("weights seed", weights_seed, "weights_seed: 0")):
            if not 0 <= value <= MAX_INTEGER:  # numpy takes no negative seed, the store no integer past 64 bits:
                raise UserError(f"the {name} must be 0 to 2^63-1, got {value} -- e.g. {example}")  # fail here
        source = live_source or resolve(spec, cfg.weights, weights_seed)
        if cfg.weights == "random" and not source.is_random:  # asked for a smoke run, gets a real run: say so
            warnings.warn(f"{spec.name} is not learned (fixed statistics): --weights random does not apply to it; "
                          f"this is a run of {spec.name} itself, not a random-weight smoke run", stacklevel=2)
        if not source.is_random:  # the seed shapes random weights only: elsewhere it must not split a run in two
            weights_seed = 0
        protocol = cfg.protocol.for_patch_size(spec.patch_size)
        k = probe.num_classes if cfg.k is None else cfg.k
        if k < 1:
            raise UserError(f"--k must be at least 1, got {k}")
        check_extraction(protocol.resize, spec.patch_size, spec.embed_dim)
        task.k_bound_for(params).check(k, params, split, lambda name: self.open_dataset(cfg.dataset, cfg.data_root, name, options),
                           lambda dataset: self.patches_per_image(dataset, protocol, spec.patch_size),
                           least_per_image=(protocol.resize // spec.patch_size) ** 2)
        check_clusters(k, spec.embed_dim)  # sizes that cannot fit are refused now, saying what they would need
        config = {
            "backbone": spec.name, "weights": source.identity, "random_weights": source.is_random,
            "weights_seed": weights_seed,  # random initialisation only (0 otherwise)
            "task": task.name, "params": params, "dataset": probe.name, "dataset_options": options,
            "split": split, "images": len(probe), "ids_sha": probe.ids_sha,
            "num_classes": probe.num_classes, "k": k, "seed": cfg.seed, "protocol": protocol.as_dict(),
            "data_root": cfg.data_root,
        }
        config = with_task_version({**config, **live_config}, task.version)
        if stages := versions.stage_versions(task, params):  # absent while every stage is at version 1
            config["stage_versions"] = stages
        if values := versions.value_versions(task, params, config["protocol"]):  # absent for the untouched values
            config["value_versions"] = values
        if source.path is not None:  # for `ssl-bench show`; a user's own file is labelled by its name in reports
            config["weights_file"] = str(source.path.resolve())
            if source.own:
                config["own_weights"] = True
        if probe.identity:  # a generic folder is its location (absent otherwise: earlier hashes stay valid)
            config["dataset_identity"] = probe.identity
        return ResolvedRun(config, run_hash(config), spec, task, source, probe, protocol, task.features_for(params))

    # -- one cell --
    def predictions_missing(self, run: ResolvedRun) -> bool:
        """Whether --save-predictions asks for this cell's prediction files and they are not all written."""
        return self.save_predictions is not None and not saved.is_complete(self.predictions_folder(run))

    def predictions_folder(self, run: ResolvedRun) -> Path:
        return saved.run_folder(self.save_predictions, run.config, run.config_hash)

    def run(self, cfg: RunConfig, force: bool = False, progress: Callable = lambda it, **_: it) -> Outcome:
        run = self.resolve(cfg)
        if not force and (stored := self.store.get(run.config_hash)) and not self.predictions_missing(run):
            return Outcome(run.config_hash, stored, computed=False)
        if self.device.type == "cpu" and (note := run.task.cpu_note(run.config["params"])):
            # a backbone that cannot give the features refuses first: no warning of hours that never come
            _LazyBackbone(lambda: self.backbone(run.spec, run.weights, run.config["weights_seed"]),
                          run.spec).check_kinds(list(run.features))
            warnings.warn(note, stacklevel=2)  # before the hours it announces, not after
        self.persist(self.compute(run, progress, fresh=force), replace=force)
        return Outcome(run.config_hash, self.store.get(run.config_hash), computed=True)

    def persist(self, computed: "Computed", replace: bool = False) -> None:
        """Store a computed cell (the driver's job: Ray workers only compute), then its panel samples."""
        self.store.put(computed.record, replace=replace)
        if computed.samples is None:
            return
        try:  # best effort: the stored row is the result
            samples.save(self.store.path, **computed.samples)
        except Exception as err:  # noqa: BLE001 -- any failure here must not lose the computed run
            warnings.warn(f"run {computed.record.config_hash} is stored, but its sample predictions were not "
                          f"saved ({err})", stacklevel=2)

    def compute(self, run: ResolvedRun, progress: Callable = lambda it, **_: it, fresh: bool = False) -> "Computed":
        """One resolved cell computed without touching the store (Ray workers return it to the driver)."""
        timings: dict[str, float] = {}
        self.cache.opened.clear()  # what this cell reads, for `ssl-bench cache` (training views included)
        self.cache.labels.opened.clear()
        t0 = time.perf_counter()
        if run.features:  # one extraction pass for every kind the task (and its stages) read
            self.features(run, run.dataset, list(run.features), progress)
        timings["features"] = time.perf_counter() - t0

        ctx = TaskContext(self, run, progress, fresh)
        labelled = run.dataset.has_labels
        t0 = time.perf_counter()
        if labelled:
            ctx.evaluated_labels  # decoded into the cache before the task, whose predictions stream into evaluation
        timings["labels"] = time.perf_counter() - t0
        entry = registry.load_entrypoint(run.task.entrypoint)
        writer = saved.PredictionWriter(self.predictions_folder(run), run.dataset.ids, run.config["k"]) \
            if self.save_predictions is not None else None
        t0 = time.perf_counter()
        result: TaskResult = entry(ctx)
        kept: list[tuple[int, np.ndarray, np.ndarray]] = []  # a few headline predictions, for report panels
        metrics, eval_seconds, counts = self._evaluate(ctx, run, result.predictions, progress, kept, writer)
        timings["task"] = time.perf_counter() - t0 - eval_seconds
        timings["evaluate"] = eval_seconds
        headline = metrics.get(f"{FINAL}@{run.dataset.split}")
        if headline is None and (labelled or counts is None):
            raise RuntimeError(f"task {run.task.name} produced no '{FINAL}' predictions on {run.dataset.split}")
        stats = {**(result.stats or {}), **({"stage_seconds": ctx.stage_seconds} if ctx.stage_seconds else {}),
                 **({"kept_seconds": ctx.kept_seconds} if ctx.kept_seconds else {})}
        if not labelled:  # no metrics: what the predictions look like instead
            stats["predictions"] = counts.summary()
        stats["cache_entries"] = sorted(self.cache.opened | self.cache.labels.opened)
        # without ground truth the stored predictions (and files) keep the cluster ids
        cluster_to_class = headline["cluster_to_class"] if labelled else list(range(run.config["k"]))
        scores = {m: headline[m] if headline else None for m in ("miou", "acc", "f1")}
        record = RunRecord(
            config_hash=run.config_hash, backbone=run.spec.name, weights=run.weights.identity,
            random_weights=run.weights.is_random, task=run.task.name, dataset=run.config["dataset"],
            split=run.dataset.split, k=run.config["k"], seed=run.config["seed"], **scores,
            config=run.config, metrics=metrics, stats=stats, timings=timings,
            environment=self.environment,
        )
        if writer is not None:
            self._finish_predictions(writer, ctx, run, cluster_to_class if labelled else None)
        return Computed(record, self._panel_samples(ctx, run, kept, cluster_to_class),
                        writer.folder if writer is not None else None)

    def _finish_predictions(self, writer: saved.PredictionWriter, ctx: TaskContext, run: ResolvedRun,
                            cluster_to_class: list | None) -> None:
        try:  # best effort, as the panel samples: the computed cell is the result
            names = list(run.dataset.class_names) if cluster_to_class is not None else []
            writer.finish(run.config, run.config_hash, ctx.image, cluster_to_class,
                          getattr(run.dataset, "palette", None), names)
        except Exception as err:  # noqa: BLE001 -- a full disk costs the files, not the run
            warnings.warn(f"run {run.config_hash}: predictions not (all) written to {writer.folder} ({err}); "
                          f"--save-predictions again writes them", stacklevel=2)

    def _evaluate(self, ctx: TaskContext, run: ResolvedRun, predictions: Iterable[Prediction], progress: Callable,
                  kept: list, writer: saved.PredictionWriter | None = None) -> tuple[dict[str, Any], float, Any]:
        """Metrics per stream (none without ground truth: then the headline predictions are counted instead),
        the seconds spent here, and those counts (None with ground truth)."""
        streams: dict[str, StreamingConfusion] = {}
        labelled = run.dataset.has_labels
        counts = None if labelled else PredictionCounts(ctx.k)
        seconds = 0.0
        iterator: Iterator[Prediction] = iter(predictions)
        sample_indices = samples.spread_indices(len(ctx.dataset))  # headline predictions kept for report panels
        for pred in progress(iterator, desc=f"{run.task.name} (K={ctx.k}) predictions", total=len(ctx.dataset),
                             unit="images", step=lambda p: int(p.stream == FINAL and p.split in (None, ctx.split))):
            t0 = time.perf_counter()
            split = pred.split or ctx.split
            headline = pred.stream == FINAL and split == ctx.split
            label = ctx.label(pred.index, split) if labelled else None
            shape = label.shape if labelled else ctx.label_size(pred.index, split)
            if pred.labels.shape != tuple(shape):
                raise RuntimeError(f"task {run.task.name} predicted {pred.labels.shape} for image {pred.index}, "
                                   f"labels are {tuple(shape)}")
            if labelled:
                key = f"{pred.stream}@{split}"
                if key not in streams:
                    streams[key] = StreamingConfusion(run.config["num_classes"], ctx.k)
                streams[key].update(pred.labels, label)
            elif headline:
                counts.update(pred.labels)
            if headline and writer is not None:
                writer.add(pred.index, pred.labels)
            if headline and pred.index in sample_indices:
                shown = label if labelled else np.full(pred.labels.shape, -1)
                kept.append((pred.index, pred.labels.astype(np.int16), shown.astype(np.int16)))
                sample_indices.discard(pred.index)
            seconds += time.perf_counter() - t0
        t0 = time.perf_counter()
        metrics = {key: conf.compute(ctx.k, **run.protocol.scoring) for key, conf in streams.items()}
        return metrics, seconds + time.perf_counter() - t0, counts

    def _panel_samples(self, ctx: TaskContext, run: ResolvedRun, kept: list, cluster_to_class: list) -> dict | None:
        """Arguments of ``samples.save`` for the kept predictions (plain arrays: they travel back from Ray)."""
        try:
            indices = [i for i, _, _ in kept]
            labelled = run.dataset.has_labels  # else the panels draw cluster ids in their own colours
            return dict(config_hash=run.config_hash, config=run.config, multiple=run.spec.patch_size, indices=indices,
                        images=[ctx.image(i) for i in indices], labels=[label for *_, label in kept],
                        predictions=[pred for _, pred, _ in kept], cluster_to_class=cluster_to_class,
                        palette=getattr(run.dataset, "palette", None) if labelled else None,
                        class_names=list(run.dataset.class_names) if labelled else
                        [f"cluster {i}" for i in range(run.config["k"])])
        except Exception as err:  # noqa: BLE001 -- a panel is never worth losing the run
            warnings.warn(f"run {run.config_hash}: no sample predictions kept for panels ({err})", stacklevel=2)
            return None


class PredictionCounts:
    """What the headline predictions of a run without ground truth look like: per cluster its share of the
    pixels and of the images it appears in, and how many clusters an image holds."""

    def __init__(self, k: int):
        self.pixels = np.zeros(k + 1, dtype=np.int64)  # last: unlabelled
        self.images_with = np.zeros(k, dtype=np.int64)
        self.per_image: list[int] = []

    def update(self, labels: np.ndarray) -> None:
        k = len(self.images_with)
        ids = np.where((labels >= 0) & (labels < k), labels, k).ravel()
        found = np.bincount(ids, minlength=k + 1)
        self.pixels += found
        self.images_with += found[:k] > 0
        self.per_image.append(int((found[:k] > 0).sum()))

    def summary(self) -> dict:
        total, images = max(int(self.pixels.sum()), 1), max(len(self.per_image), 1)
        return {"images": len(self.per_image), "clusters_used": int((self.images_with > 0).sum()),
                "clusters_per_image": float(np.mean(self.per_image)) if self.per_image else 0.0,
                "unlabelled_percent": 100.0 * self.pixels[-1] / total,
                "pixel_percent": [round(100.0 * p / total, 3) for p in self.pixels[:-1]],
                "image_percent": [round(100.0 * n / images, 3) for n in self.images_with]}


class _LazyBackbone:
    """Stands in for a backbone until the cache needs a forward pass (a cache hit never builds one)."""

    def __init__(self, build: Callable[[], Backbone], spec: registry.BackboneSpec):
        self._build, self.spec = build, spec

    @cached_property
    def _model(self) -> Backbone:
        return self._build()

    @property
    def patch_size(self) -> int:
        return self.spec.patch_size

    def check_kinds(self, kinds) -> None:
        from .models.base import ATTENTION_KINDS

        if not self.spec.has_attention and set(kinds) & set(ATTENTION_KINDS):
            self._model.check_kinds(kinds)  # the real model words the refusal

    def __getattr__(self, name: str):
        if name == "_model":  # building it raised AttributeError: do not build again through this hook
            raise AttributeError("the backbone could not be built")
        return getattr(self._model, name)
