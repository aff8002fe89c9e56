"""PriMaPs' principal mask proposals as a segmenter: each proposal of an image is one segment.

The proposals are ``methods.primaps.principal_mask_proposals`` on the patch grid (psi, coverage, nearest-
neighbour anchoring and iterative principal directions as PriMaPs-EM uses them, see tasks/primaps-em.yaml);
patches left unassigned by the coverage rule stay noise. Segments are not split into connected parts: a
proposal is one region however many pieces it has, as PriMaPs' EM step treats it.
"""

from __future__ import annotations

import numpy as np

from ...errors import UserError
from ..regions import split_into_segments


class PrincipalMaskProposals:
    """The segmenter stage ``primaps``."""

    marks_background = False
    uses_image = False

    def __init__(self, psi: float = 0.4, coverage: float = 0.95, nn_anchor: bool = True, iterative: bool = True,
                 max_masks: int | None = None, anchor: str = "signed"):
        self.options = dict(psi=psi, coverage=coverage, nn_anchor=nn_anchor, iterative=iterative,
                            max_masks=max_masks, anchor=anchor)

    def segment(self, features: dict, image=None) -> tuple[np.ndarray, dict]:
        from ...methods.primaps import principal_mask_proposals

        proposals = principal_mask_proposals(features["patch"], **self.options)
        return split_into_segments(proposals, tau=0, connected=False)


def check_params(p: dict) -> None:
    if not 0 < p["psi"] < 1 or not 0 < p["coverage"] <= 1:
        raise UserError(f"psi={p['psi']}, coverage={p['coverage']} -- use 0 < psi < 1 and 0 < coverage <= 1 "
                        f"(-p segmenter.psi=0.4 -p segmenter.coverage=0.95)")
    if p["max_masks"] is not None and (not isinstance(p["max_masks"], int) or p["max_masks"] < 1):
        raise UserError(f"max_masks={p['max_masks']!r} -- use null or a whole number >= 1")
    if p["anchor"] not in ("signed", "abs"):
        raise UserError(f"anchor={p['anchor']!r} -- use signed (the paper's) or abs (-p segmenter.anchor=signed)")
