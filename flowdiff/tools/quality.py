"""Sample quality on the 8×8 digits, by measures a reader can check without a pretrained feature net.

:func:`sample_quality` compares generated digits with the data through two instruments
that are fitted on the *training* split only (:func:`flowdiff.models.pretrained.digits_data`):

* a multinomial logistic-regression classifier on the 64 pixels (scikit-learn, lbfgs:
  deterministic), which reaches about 96% accuracy on the held-out split. From its class
  probabilities p(y|x): ``confidence`` = mean maxᵧ p(y|x) (recognisable digits score
  high), ``digit_score`` = exp(E_x KL(p(y|x) ‖ p(y))), the Inception Score of Salimans et
  al., "Improved Techniques for Training GANs" (2016), with this classifier in place of
  Inception: 10 for confident, evenly spread classes, 1 for a single class or none; and
  ``accuracy`` against the requested labels for conditional samples.
* nearest neighbours in pixel space: ``nn_distance`` = mean Euclidean distance from each
  sample to its nearest training image, and ``nn_ratio`` = that over the same mean for the
  held-out test images (``nn_distance_test``). A ratio near 1 means samples lie as close
  to the training set as new genuine digits do; well above 1, blurry or noisy samples;
  well below 1, copies of training images (memorisation).

Real held-out digits give the reference: ``sample_quality(digits_data("test").images)``.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..engine._checks import RANGE_SLACK

#: A set of digits in the data range [−1, 1] has some value below this: a digit's background is −1 (every held-out
#: digit has one), and samples keep it at any budget — the shipped model at NFE 2–10, every fixed-grid solver and
#: named grid, measured by ``benchmarks/bench_quality_range.py``. Images in [0, 1] have none below 0: refused.
QUALITY_BACKGROUND_MARGIN = -0.5


@functools.lru_cache(maxsize=1)
def _instruments() -> tuple[Any, np.ndarray, float]:
    from sklearn.linear_model import LogisticRegression

    from ..models.pretrained import digits_data

    train, test = digits_data("train"), digits_data("test")
    x_train = train.images.reshape(-1, 64).double().numpy()
    clf = LogisticRegression(C=1.0, max_iter=5000).fit(x_train, train.labels.numpy())
    ref = float(_nn_distances(test.images.reshape(-1, 64).double().numpy(), x_train).mean())
    return clf, x_train, ref


def _nn_distances(x: np.ndarray, bank: np.ndarray, chunk: int = 1024) -> np.ndarray:
    bank_sq = (bank * bank).sum(1)
    out = np.empty(x.shape[0])
    for i in range(0, x.shape[0], chunk):
        xi = x[i:i + chunk]
        d2 = (xi * xi).sum(1, keepdims=True) - 2 * xi @ bank.T + bank_sq
        out[i:i + chunk] = np.sqrt(np.maximum(d2.min(1), 0.0))
    return out


def sample_quality(images: Tensor, labels: Tensor | None = None) -> dict[str, float]:
    """Quality figures of 8×8 digit images in the model's data scale [−1, 1] (see the module docstring).

    ``images``: shape (N, 1, 8, 8) or (N, 64), N ≥ 2; values are clipped to [−1, 1] first (the
    data range: a sample's overshoot, however far). A set with no value below
    :data:`QUALITY_BACKGROUND_MARGIN` (−0.5) has no digit background (−1) and is refused rather than
    scored as wrong digits: images in [0, 1] (rescale: ``images * 2 - 1``) or pixels in [0, 255]
    (``images / 127.5 - 1``). The rule reads the set's scale, not each image: one image of another scale
    among digits in [−1, 1] is clipped and scored.
    ``labels`` (optional, N integers 0–9): the classes the samples were conditioned on, adding ``accuracy``.
    Returns ``n``, ``confidence``, ``digit_score``, ``nn_distance``, ``nn_distance_test``, ``nn_ratio`` (and
    ``accuracy``), all floats.
    The instruments are fitted once per process (about a second; needs scikit-learn).
    """
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim not in (2, 4) or tuple(images.shape[1:]) not in ((1, 8, 8), (64,)) or images.shape[0] < 2:
        raise ValueError(f"images must have shape (N, 1, 8, 8) or (N, 64) with N >= 2, got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"images must be floating point in the model's data scale [-1, 1], got {images.dtype} "
                        "(8-bit pixels v: v / 127.5 - 1)")
    x = images.detach().cpu().double().reshape(-1, 64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("images contain NaN or inf")
    if labels is not None:  # checked before the instruments are fitted
        y = torch.as_tensor(labels).detach().cpu()
        if y.shape != (x.shape[0],) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool \
                or bool(((y < 0) | (y > 9)).any()):
            raise ValueError(f"labels must be {x.shape[0]} integers 0 … 9 (one digit per image), got {y.dtype} of "
                             f"shape {tuple(y.shape)}" + (f" with values {y.min().item()} … {y.max().item()}"
                                                          if y.numel() and y.dtype != torch.bool else ""))
    low, high = float(x.min()), float(x.max())
    # a sample's overshoot reaches past [−1, 1] on both sides (samples at a few evaluations by hundreds) and keeps
    # the digits' background at −1; images on another scale ([0, 1], [0, 255]) have no value near it
    if low >= QUALITY_BACKGROUND_MARGIN:
        if high > 1.0 + 2.0 * RANGE_SLACK:
            raise ValueError(f"images span [{low:.4g}, {high:.4g}], far outside the digits' data range [-1, 1], "
                             "which they would be clipped to; rescale them (8-bit pixels v: v / 127.5 - 1)")
        raise ValueError(f"images span [{low:.4g}, {high:.4g}] with no value below {QUALITY_BACKGROUND_MARGIN}, "
                         "while a digit's background is -1 in the data range [-1, 1] they are scored in: images in "
                         "[0, 1] would score as faint wrong digits; rescale them (images * 2 - 1)")
    x = x.clamp(-1.0, 1.0).numpy()
    clf, x_train, ref = _instruments()
    proba = clf.predict_proba(x)
    marginal = proba.mean(0)
    kl = (proba * (np.log(np.maximum(proba, 1e-30)) - np.log(np.maximum(marginal, 1e-30)))).sum(1)
    nn = float(_nn_distances(x, x_train).mean())
    out = {"n": float(x.shape[0]), "confidence": float(proba.max(1).mean()), "digit_score": float(np.exp(kl.mean())),
           "nn_distance": nn, "nn_distance_test": ref, "nn_ratio": nn / ref}
    if labels is not None:
        out["accuracy"] = float((clf.classes_[proba.argmax(1)] == y.numpy()).mean())
    return out
