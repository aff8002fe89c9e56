"""Where the real sample data beside the project lives (``../shared/data``), for tests and benchmarks."""

from __future__ import annotations

import os
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parents[2]


def shared_data_dir() -> Path | None:
    """``$SSL_BENCH_SHARED_DATA``, else ``../shared/data`` beside the checkout or the working folder."""
    env = os.environ.get("SSL_BENCH_SHARED_DATA")
    candidates = [Path(env)] if env else [_CHECKOUT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    return next((p for p in candidates if p.is_dir()), None)
