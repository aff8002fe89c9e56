"""Backbone construction: registry entry + weights source -> a frozen ``Backbone``."""

from __future__ import annotations

import torch

from ..errors import UserError
from ..registry import BackboneSpec, load_entrypoint
from .base import Backbone
from .weights import WeightsSource, read_checkpoint, resolve, unwrap_state_dict


def build_backbone(spec: BackboneSpec, source: WeightsSource, seed: int = 0) -> Backbone:
    """Build ``spec`` with the weights of ``source``; random weights are drawn from ``seed``."""
    builder = load_entrypoint(spec.builder)
    if source.path is None:
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
            torch.manual_seed(seed)
            model = builder(spec, None)
    else:
        state = unwrap_state_dict(read_checkpoint(source.path), spec.checkpoint)
        try:
            model = builder(spec, state)
        except (RuntimeError, ValueError, KeyError, IndexError, TypeError) as err:  # e.g. timm's converters on
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]  # another model's weights
            raise UserError(f"checkpoint {source.path} does not fit {spec.name} ({reason}) -- is it the right file "
                            f"for this backbone?") from None
    return model.eval().requires_grad_(False)


__all__ = ["Backbone", "WeightsSource", "build_backbone", "resolve"]
