"""ssl-bench: unsupervised semantic segmentation as a benchmark of self-supervised backbones."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``ssl_bench.evaluate`` (see ssl_bench/api.py), imported on first use: ``import ssl_bench`` stays light."""
    if name == "evaluate":
        from .api import evaluate

        return evaluate
    raise AttributeError(f"module 'ssl_bench' has no attribute {name!r}")
