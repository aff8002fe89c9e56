"""Where a method's input features come from: the backbone's cached features, or a trained head's projection.

A task whose file names a ``projection`` hook (STEGO, HP: their segmentation heads) offers its trained
projection to other tasks; a task with a ``features_from: TASK`` parameter (PriMaPs-EM: "STEGO + PriMaPs-EM",
"HP + PriMaPs-EM") reads every feature map through that head instead of the raw features. The head is the
one a run of TASK (any registered task or variant with the hook) trains on the same fit split, kept by
``ctx.reuse`` under TASK's own key, so the TASK cell and the composed cell of a sweep train it once.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .. import registry
from ..errors import UserError


def parse_features_from(value, method: str) -> tuple[str, dict] | None:
    """``features_from`` -> (task, parameter overrides), or None for the backbone's features. The value is a task
    name (``stego``, ``hp-potsdam``) or ``{task: NAME, params: {...}}`` (``-p features_from='{task: stego,
    params: {cpu_steps: 50}}'``); the task must train a projection, and its parameters are checked now."""
    if value is None:
        return None
    heads = sorted(name for name, spec in registry.tasks().items() if spec.projection)
    example = f"one of {', '.join(heads)}, {{task: {heads[0] if heads else 'NAME'}, params: {{...}}}}, or null"
    if isinstance(value, dict) and set(value) <= {"task", "params"} and isinstance(value.get("params", {}), dict):
        name, overrides = value.get("task"), dict(value.get("params") or {})
    elif isinstance(value, str):
        name, overrides = value, {}
    else:
        raise UserError(f"{method}: features_from={value!r} must name a task that trains a head -- {example}")
    if not isinstance(name, str):
        raise UserError(f"{method}: features_from={value!r} names no task -- {example}")
    spec = registry.task(name)
    if not spec.projection:
        raise UserError(f"{method}: features_from={name} trains no feature projection -- {example}")
    if "fit_split" in overrides:
        raise UserError(f"{method}: features_from sets no fit_split -- the head is trained on this run's fit_split")
    spec.resolve_params(overrides)  # its own one-line errors
    return name, overrides


def trained_projection(ctx, value, fit_split: str | None):
    """The trained head (``heads.TrainedHead``: ``project`` and the cluster-probe centres ``clusters``) that a
    run of the task ``value`` names, with its parameters, trains on ``fit_split`` of this run's backbone and
    dataset (None: no ``features_from``)."""
    parsed = parse_features_from(value, "features_from")
    if parsed is None:
        return None
    spec = registry.task(parsed[0])
    params = {**spec.resolve_params(parsed[1]), "fit_split": fit_split}
    return registry.load_entrypoint(spec.projection)(ctx, spec, params)


class ProjectedFeatures:
    """A feature store read through a projection: ``fs[i]`` is ``project(store[i])`` (h, w, dim)."""

    def __init__(self, store: Sequence, project):
        self.store, self.project = store, project

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.project(self.store[i])

    def grid(self, i: int) -> tuple[int, int]:
        return self.store.grid(i)
