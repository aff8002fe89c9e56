"""Memory bounds for size parameters: a value that cannot fit is one line saying how much it would need.

Resolutions, image counts, K and batch sizes have no natural upper bound; without one, a typo such as
``--resize 32000`` ends minutes later in a ``MemoryError`` with no reason. Each check below is a floor
(the buffers the value certainly allocates at once), so a refused value could never have run here; a
value that passes may still need more, and then fails with ``out of memory`` (cli.main words it).
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UserError


def memory_limit() -> int:
    """Bytes this process may use at most: physical memory, or a smaller container (cgroup) limit."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes")):
        try:
            text = limit.read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.0f} MiB"


def require_memory(need: float, what: str, fix: str) -> None:
    """Refuse ``what`` when its floor ``need`` (bytes) exceeds what this machine can give."""
    have = memory_limit()
    if need > have:
        raise UserError(f"{what} would need at least {gib(need)} of memory; this machine has {gib(have)} -- {fix}")


# Floors of what the extraction holds at once per pixel and per patch: the uint8 image and its float32
# normalised copy; per patch, a ViT block's tokens, queries, keys, values and 4x-wide MLP hidden in float32.
PIXEL_BYTES = 3 + 3 * 4
TOKEN_FLOATS = 8


def check_extraction(resize: int, patch: int, dim: int, batch: int = 8) -> None:
    """A batch of protocol images (at least ``resize`` x ``resize``) through a backbone of width ``dim``."""
    pixels = resize * resize
    patches = pixels // (patch * patch)
    need = batch * (pixels * PIXEL_BYTES + patches * dim * TOKEN_FLOATS * 4)
    require_memory(need, f"--resize {resize} (a batch of {batch} images of at least {resize}x{resize} pixels, "
                         f"{patches:,} patches each)", "use a smaller --resize (the protocol's is 320)")


def check_clusters(k: int, dim: int) -> None:
    """K clusters: the centroids and the distances between them (k-means, matching)."""
    require_memory(8 * k * (k + dim), f"K={k} clusters", "use fewer clusters (C, 2C, 3C ... or a number)")
