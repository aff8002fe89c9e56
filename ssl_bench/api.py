"""``ssl_bench.evaluate``: benchmark the model a training loop holds, without writing it to disk first.

The run is an ordinary cell: the same runner, protocol, metrics and store as ``ssl-bench run``, labelled
``NAME@STEP`` (the configuration keeps ``model: {name, step, class, params_m}`` apart, for plots of a metric against the step),
with the model's digest (``models/live.py:model_digest``) as its weights identity. So reports, sweeps of other
runs and ``ssl-bench report`` show it beside registry backbones, and a changed model is never served the
features cached for another. The model is evaluated in eval mode under ``torch.inference_mode`` and handed back
in the mode it came in; the caller's random number generators are left as they were.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

from .data.protocol import Protocol
from .errors import UserError
from .models.live import ADAPTER_HINT, _device, live_backbone, model_digest
from .models.weights import WeightsSource

IN_MEMORY = "in-memory"


@contextmanager
def _evaluation_mode(model: torch.nn.Module, device: torch.device):
    """Eval mode and the caller's RNG state untouched for the block; the model's own mode restored after."""
    was_training = model.training
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        model.train(was_training)


def evaluate(model: torch.nn.Module, task: str = "kmeans", dataset: str = "synthetic", k: int | str | None = None, *,
             name: str = "model", step: int | None = None, data_root: str | Path | None = None,
             split: str | None = None, seed: int = 0, params: dict | None = None, options: dict | None = None,
             patch_size: int | None = None, mean=None, std=None, input_size: int | None = None,
             resize: int = 320, crop: str = "center", store: str | Path | None = None,
             cache: str | Path | None = None, keep_features: bool = False, force: bool = False,
             save_predictions: str | Path | None = None, progress: Callable | None = None,
             precision: str = "fp32") -> dict:
    """Evaluate an in-memory ``model`` on ``task`` x ``dataset`` with ``k`` clusters (None: the number of classes;
    ``"2C"`` as on the command line) and store the result like ``ssl-bench run``; returns the stored row (``miou``,
    ``acc``, ``f1``, ``metrics`` per stream, ``config``, ...).

    ``model``: a timm ViT (``dynamic_img_size=True``), or a module with ``patch_size`` and
    ``extract_features(images) -> {'patch': ..., 'cls': ..., 'key': ...}`` (see ``ssl_bench/models/live.py``).
    ``name`` and ``step`` label the run (``name@step``). ``mean`` / ``std``: the normalisation the model expects
    (default: its timm config's, else ImageNet's). ``keep_features``: keep this model's cached features (off:
    a training loop would fill the disk with features no later step can use; on: other tasks or K on the same
    weights reuse them). ``store`` / ``cache``: as ``--store`` / ``--cache`` (defaults: ``.ssl-bench/``).
    ``precision``: as ``--precision`` (fp32, or bf16 / fp16 autocast of the forward pass, recorded with the run).
    The model computes where its parameters are (move it to the GPU first to run there).
    """
    from .features import FeatureCache
    from .runner import RunConfig, Runner
    from .store import ResultStore
    from .sweep import resolve_k

    if not isinstance(model, torch.nn.Module):  # checked first: everything below reads its parameters
        raise UserError(f"ssl_bench.evaluate takes a torch.nn.Module, got {type(model).__name__} -- {ADAPTER_HINT}")
    if not isinstance(name, str) or not name or any(c in name for c in "/:@"):
        raise UserError(f"name={name!r}: give a short label without '/', ':' or '@' -- e.g. name='my-vit'")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        raise UserError(f"step={step!r} must be a whole number >= 0 (the training step or epoch) -- e.g. step=1000")
    label = name if step is None else f"{name}@{step}"
    device = _device(model)
    runner = Runner(ResultStore(store), FeatureCache(cache), str(device), save_predictions=save_predictions)
    root = str(data_root) if data_root is not None else None
    opts = tuple(sorted((options or {}).items()))
    if isinstance(k, str):  # 2C as on the command line: the classes are the dataset's
        k = resolve_k(k, runner.open_dataset(dataset, root, split, dict(opts)).num_classes)
    with _evaluation_mode(model, device):
        backbone = live_backbone(model, label, patch_size, mean, std, input_size).to(device)
        identity = f"state:{model_digest(model)}"
        described = {"name": name, "step": step, "class": backbone.spec.arch, "params_m": backbone.spec.params_m}
        runner.adopt(backbone, WeightsSource(None, identity, IN_MEMORY), {"model": described})
        cfg = RunConfig(backbone=label, task=task, dataset=dataset, split=split, k=k, seed=seed, data_root=root,
                        dataset_options=opts, params=tuple(sorted((params or {}).items())),
                        protocol=Protocol(resize=resize, crop=crop, precision=precision))
        run = runner.resolve(cfg)
        try:
            outcome = runner.run(cfg, force=force, progress=progress or (lambda it, **_: it))
        finally:
            if not keep_features:
                key = runner.cache.key(run.spec.name, identity, run.dataset, run.protocol)
                shutil.rmtree(runner.cache.entry_dir(key), ignore_errors=True)
    return outcome.record
