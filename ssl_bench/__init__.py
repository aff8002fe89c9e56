"""ssl-bench: unsupervised semantic segmentation as a benchmark of self-supervised backbones."""

__version__ = "0.1.0"
