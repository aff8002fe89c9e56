"""What bounds K: a task declares what its K clusters are made of, and every run is checked before any work.

A task file says what it clusters (``k_bound`` in ``tasks/*.yaml``), or, in a composed task, the stage
that makes the items does (``stages/segmenters/*.yaml``; a later stage's declaration wins: a clusterer that
names the classes)::

    k_bound: patches                                  # K clusters of the fit split's patches
    k_bound: {items: segments, larger_than: tau}      # of segments of more than ``tau`` patches each
    k_bound: {items: proposals, per_image: max_masks} # at most ``max_masks`` per image (null: no cap)
    k_bound: {items: proposals, per_image: 1, reserved: 1}  # one per image; one cluster (background) needs none
    k_bound: {items: segments, per_image: segments, unless: adaptive}  # a cap that a true ``adaptive`` lifts
    k_bound: classes                                  # a clusterer naming the dataset's classes: K is C, unbounded

``items`` names the things clustered (shown in the error), ``larger_than`` a parameter (or a number) of
patches an item must exceed, ``per_image`` a parameter (or a number) capping the items of one image,
``reserved`` the clusters that need no item (a background cluster), ``unless`` a true/false parameter that
lifts the ``per_image`` cap while true, ``split`` the parameter naming the split
they come from (default ``fit_split`` where the task has one;
null there means the evaluated split). The patch grid of every
image follows from the protocol and the image headers, so a K above the most items the split can hold
is refused in one line at resolve time (a sweep's plan included), never after an extraction or an
hour of training. A method may still refuse later, with the exact count (e.g. DatUS^2's valid segments).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .errors import UserError


class KIsClasses(UserError):
    """A K other than C for a task whose clusters are the dataset's classes: a run refuses it; a sweep skips
    that task x K pair of its grid, as it skips a backbone x task pair that cannot run."""


@dataclass(frozen=True)
class KBound:
    items: str = "patches"  # what the K clusters are made of (in messages)
    larger_than: str | int = 0  # an item has more than this many patches: a number or a parameter name
    split: str | None = None  # parameter naming the split the items come from (None: the evaluated split)
    per_image: str | int | None = None  # the most items one image gives: a number or a parameter name (None: no cap)
    reserved: int = 0  # clusters that take no item (the background cluster of a segmenter that marks background)
    unless: str | None = None  # a true/false parameter that lifts the per_image cap while true

    @classmethod
    def parse(cls, value, params: dict, where: str) -> "KBound":
        """The ``k_bound`` of a task file; absent: the task clusters patches."""
        example = "k_bound: patches, or k_bound: {items: segments, larger_than: tau}"
        if value is None or isinstance(value, str):
            value = {"items": value or "patches"}
        if not isinstance(value, dict) or set(value) - {"items", "larger_than", "split", "per_image", "reserved",
                                                        "unless"}:
            raise UserError(f"{where}: k_bound must be a word or a mapping of items, larger_than, per_image, "
                            f"reserved, unless, split "
                            f"-- e.g. {example}")
        bound = cls(**{"split": "fit_split" if "fit_split" in params else None, **value})
        for key, value, lowest in (("larger_than", bound.larger_than, 0), ("per_image", bound.per_image, 1)):
            number = isinstance(value, int) and not isinstance(value, bool) and value >= lowest
            if not (number or value in params or (key == "per_image" and value is None)):
                raise UserError(f"{where}: k_bound {key}={value!r} must be a whole number >= {lowest} or one of the "
                                f"parameters -- e.g. {example}")
        if not isinstance(bound.reserved, int) or isinstance(bound.reserved, bool) or bound.reserved < 0:
            raise UserError(f"{where}: k_bound reserved={bound.reserved!r} must be a whole number >= 0 (clusters that "
                            f"need no item, e.g. 1 for a background cluster)")
        if bound.unless is not None and bound.unless not in params:
            raise UserError(f"{where}: k_bound unless={bound.unless!r} is not a parameter of the task -- "
                            f"known: {sorted(params)}")
        if bound.split is not None and bound.split not in params:
            raise UserError(f"{where}: k_bound split={bound.split!r} is not a parameter of the task -- "
                            f"known: {sorted(params)}")
        return bound

    def in_slot(self, slot: str, split: str | None) -> "KBound":
        """A stage's bound inside a composed task: its parameters are named ``slot.name`` there."""
        named = lambda value: f"{slot}.{value}" if isinstance(value, str) else value  # noqa: E731
        return KBound(self.items, named(self.larger_than), split, named(self.per_image), self.reserved,
                      named(self.unless))

    def minimum_size(self, params: dict) -> int:
        """Patches an item must exceed (the parameter's value when it names one)."""
        value = params[self.larger_than] if isinstance(self.larger_than, str) else self.larger_than
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0

    def cap(self, params: dict) -> int | None:
        """The most items one image gives (None: no cap)."""
        if self.unless is not None and params.get(self.unless) is True:
            return None
        value = params.get(self.per_image) if isinstance(self.per_image, str) else self.per_image
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None

    def check(self, k: int, params: dict, evaluated_split: str, open_split: Callable[[str], object],
              grid_of: Callable[[object], list[int]], least_per_image: int) -> None:
        """Refuse ``k`` above the most items the split can hold. ``open_split(name)`` gives a dataset,
        ``grid_of(dataset)`` its patches per image (header reads); ``least_per_image``: the fewest patches
        the protocol gives any image, so most K values pass without reading a header."""
        if self.items == "classes":  # the clusters are the dataset's classes, whatever the regions: K is C
            classes = getattr(open_split(evaluated_split), "num_classes", 0)
            if classes and k != classes:
                raise KIsClasses(f"this task's clusters are the dataset's {classes} classes (a clusterer that names "
                                 f"them): K must be {classes}, got {k} -- drop --k (K = C)")
            return
        split = (params.get(self.split) if self.split else None) or evaluated_split
        dataset = open_split(split)
        size, cap = self.minimum_size(params), self.cap(params)
        per_image = lambda patches: min(patches // (size + 1), cap or patches)  # noqa: E731
        needed = k - self.reserved  # clusters that must each get an item
        if needed <= len(dataset) * per_image(least_per_image):
            return
        most = sum(per_image(patches) for patches in grid_of(dataset))
        if needed <= most:
            return
        what = self.items + (f" of more than {size} patches ({self.larger_than}={size})"
                             if isinstance(self.larger_than, str) else f" of more than {size} patches" if size else "")
        what += f", at most {cap} per image ({self.per_image}={cap})" if cap and isinstance(self.per_image, str) else ""
        fixes = ["lower --k", "use more images (a larger -o limit, or the whole split)"]
        fixes += [f"lower -p {self.larger_than}"] if isinstance(self.larger_than, str) else []
        fixes += [f"raise -p {self.per_image}"] if cap and isinstance(self.per_image, str) else []
        spare = f" (besides {self.reserved} that need{'s' if self.reserved == 1 else ''} none)" if self.reserved else ""
        raise UserError(f"K={k} clusters need at least {needed} {what}{spare}, but split {split!r} ({len(dataset)} images) "
                        f"holds at most {most:,} -- {', '.join(fixes[:-1])} or {fixes[-1]}")
