"""Dense CRF refinement with the parameters shared by STEGO, HP and PriMaPs."""

from __future__ import annotations

import numpy as np

from .errors import UserError


def dense_crf(image: np.ndarray, probs: np.ndarray, iterations: int = 10, gauss_sxy: float = 1,
              gauss_compat: float = 3, bilateral_sxy: float = 67, bilateral_srgb: float = 3,
              bilateral_compat: float = 4) -> np.ndarray:
    """Refine class probabilities (C, H, W) on an RGB image (H, W, 3) uint8; returns (C, H, W) float32.
    The defaults are the Gaussian (smoothness) and bilateral (appearance) kernels of STEGO, HP and PriMaPs."""
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError as err:
        raise UserError("dense CRF needs pydensecrf -- `pip install pydensecrf2`, or run with --no-crf") from err
    c, h, w = probs.shape
    if image.shape[:2] != (h, w):
        raise ValueError(f"CRF image {image.shape[:2]} and probabilities {(h, w)} differ in size")
    probs = np.clip(probs.astype(np.float32), 1e-8, 1.0)
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    crf.addPairwiseGaussian(sxy=gauss_sxy, compat=gauss_compat)
    crf.addPairwiseBilateral(sxy=bilateral_sxy, srgb=bilateral_srgb, compat=bilateral_compat,
                             rgbim=np.array(image, dtype=np.uint8, order="C"))  # a writable copy: pydensecrf rejects read-only buffers
    q = crf.inference(iterations)
    return np.asarray(q, dtype=np.float32).reshape(c, h, w)


# Deep Spectral Methods' CRF of hard label maps (SimpleCRF's densecrf with the authors' parameters: bilateral
# weight 10, spatial std 80, colour std 13; Gaussian weight 3, std 3; 5 iterations)
LABEL_CRF = dict(iterations=5, gauss_sxy=3, gauss_compat=3, bilateral_sxy=80, bilateral_srgb=13, bilateral_compat=10)


def label_crf(image: np.ndarray, labels: np.ndarray, n_labels: int) -> np.ndarray:
    """A label map (H, W) (-1 = unlabelled) refined on its image: one-hot probabilities clamped to [0.01, 0.99]
    as SimpleCRF does (unlabelled pixels uniform), the dense CRF with ``LABEL_CRF``; returns int64 (H, W)."""
    probs = np.full((n_labels, *labels.shape), 1.0 / n_labels, dtype=np.float32)
    labelled = labels >= 0
    probs[:, labelled] = 0.0
    rows, cols = np.nonzero(labelled)
    probs[labels[labelled], rows, cols] = 1.0
    refined = dense_crf(image, np.clip(probs, 0.01, 0.99), **LABEL_CRF)
    return refined.argmax(0).astype(np.int64)
