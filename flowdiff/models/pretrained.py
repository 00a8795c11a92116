"""Models shipped with flowdiff, loaded offline in one call, and the data they were trained on.

``pretrained("digits")`` is a class-conditional ε-network (:class:`flowdiff.models.nets.DigitsNet`)
trained by ``training/train_digits.py`` on scikit-learn's 8×8 handwritten digits (UCI
"Optical Recognition of Handwritten Digits", 1797 images, bundled with scikit-learn),
scaled to [−1, 1], on DDPM's linear schedule with T = 1000. It was trained with
classifier-free label dropout, so the same weights are

* the unconditional model: ``generate(flow, noise)`` (no ``class_labels``), and
* the conditional one: ``generate(flow, noise, model_kwargs={"class_labels": labels})``,
  which :func:`flowdiff.models.guidance.classifier_free_guidance` turns into a guided flow.

:func:`digits_data` gives the seeded train/test split used for training: the test images
were never seen by the network, for reconstruction and sample-quality measurements.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from ..engine._checks import check_device
from ..engine.flow import ProbabilityFlow
from ..engine.schedules import Schedule
from .nets import DigitsNet

MODELS = ("digits",)
SPLITS = ("train", "test", "all")

#: The held-out split: per class, a seeded permutation sends this fraction to ``test``.
TEST_FRACTION = 0.2
SPLIT_SEED = 0


class Digits(NamedTuple):
    """Digit images, float32 of shape (N, 1, 8, 8) in [−1, 1], and their labels (int64, 0–9)."""

    images: Tensor
    labels: Tensor


def _load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("the digits data ships with scikit-learn: pip install 'scikit-learn>=1.3' "
                          "(or flowdiff[train])") from None
    data = load_digits()
    return np.asarray(data.images, dtype=np.float64), np.asarray(data.target, dtype=np.int64)


def split_indices(labels: np.ndarray, test_fraction: float = TEST_FRACTION,
                  seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Stratified seeded split: for each class, the first ⌈f·n⌉ of a permutation go to test."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(np.ceil(test_fraction * idx.size))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def digits_data(split: str = "test") -> Digits:
    """The 8×8 digits scaled to [−1, 1] (pixel values 0–16 map to x/8 − 1), shape (N, 1, 8, 8).

    ``split``: ``"train"`` (the images the shipped model was trained on, 1433), ``"test"``
    (the 364 held out: ⌈20%⌉ of each class, seeded) or ``"all"`` (1797). Needs scikit-learn,
    which bundles the data (no download).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; accepted: {', '.join(SPLITS)}")
    images, labels = _load_digits_arrays()
    if split != "all":
        train, test = split_indices(labels)
        keep = train if split == "train" else test
        images, labels = images[keep], labels[keep]
    x = torch.from_numpy(images / 8.0 - 1.0).to(torch.float32).reshape(-1, 1, 8, 8)
    return Digits(x, torch.from_numpy(labels))


def _weights_dir() -> Path:
    return Path(str(resources.files("flowdiff") / "weights"))


def _folder(directory: object) -> Path:
    """The folder a model is read from: the package's weights, or ``directory`` (a retrained copy), checked."""
    if directory is None:
        return _weights_dir()
    if isinstance(directory, bool) or not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory must be a folder path (str or os.PathLike) or None, got "
                        f"{type(directory).__name__}")
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"directory {str(directory)!r}: no such folder (give the folder holding a retrained "
                                "copy's config and weights, or leave directory out for the shipped model)")
    return Path(directory)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_config(name: str, directory: str | Path | None = None) -> dict[str, Any]:
    """The JSON config shipped next to a model's weights (architecture, schedule, training record)."""
    _check_name(name)
    path = _folder(directory) / f"{name}.json"
    if not path.is_file():
        if directory is not None:  # the user's folder, not the package, lacks it
            raise FileNotFoundError(f"directory {str(directory)!r} has no {name}.json: a retrained copy is the "
                                    f"{name}.json and {name}.safetensors that training/train_{name}.py writes")
        raise FileNotFoundError(f"model config {path} is missing; the package is incomplete "
                                f"(retrain with training/train_{name}.py)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"model config {path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):  # read on with .get and [key]: a list or a number stopped with AttributeError
        raise ValueError(f"model config {path} must hold a JSON object (net, schedule, prediction_type, ...), "
                         f"got a JSON {type(config).__name__}")
    return config


def _load(name: str, directory: str | Path | None,
          device: str | torch.device | None) -> tuple[DigitsNet, dict[str, Any]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if device is not None:
        device = check_device(device)  # before the weights are read, and in words, not torch's AssertionError
    config = load_config(name, directory)
    path = _folder(directory) / f"{name}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} is missing (retrain with training/train_{name}.py)")
    expected = config.get("sha256")
    if expected is not None and _sha256(path) != expected:
        raise ValueError(f"weights file {path} is corrupt: its SHA-256 differs from the one recorded in "
                         f"{name}.json")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"weights file {path} could not be read as safetensors: {e}") from None
    try:
        net = DigitsNet(**config["net"])
        net.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"weights file {path} does not match the architecture in {name}.json: {e}") from None
    net.eval().requires_grad_(False)
    if device is not None:
        net.to(device)
    return net, config


def load_network(name: str = "digits", *, directory: str | Path | None = None,
                 device: str | torch.device | None = None) -> DigitsNet:
    """The bare network of a shipped model, weights loaded and checked, in eval mode.

    The weights file's SHA-256 is checked against its config, so a truncated or altered
    file is an error naming it rather than a silently wrong model.
    """
    return _load(name, directory, device)[0]


def pretrained(name: str = "digits", *, directory: str | Path | None = None,
               device: str | torch.device | None = None) -> ProbabilityFlow:
    """A shipped model as a :class:`ProbabilityFlow`, loaded offline.

    ``pretrained("digits")``: 8×8 digits, ε-prediction on DDPM's linear schedule (T = 1000).
    Without ``model_kwargs`` the flow is the unconditional model; with
    ``model_kwargs={"class_labels": labels}`` (int tensor of shape (batch,), or a scalar)
    it is the class-conditional one. Images are (batch, 1, 8, 8) in [−1, 1]. ``directory``
    loads a retrained copy from elsewhere.
    """
    net, config = _load(name, directory, device)
    try:
        return ProbabilityFlow(net, Schedule.from_config(**config["schedule"]),
                               prediction_type=config["prediction_type"])
    except (KeyError, TypeError, ValueError) as err:  # the file's fault: say which file
        raise ValueError(f"model config {_folder(directory) / f'{name}.json'}: {err}") from None


pretrained.digits_data = digits_data  # type: ignore[attr-defined]  # flowdiff.models.pretrained.digits_data(...)


def _check_name(name: object) -> None:
    if name not in MODELS:
        raise ValueError(f"unknown pretrained model {name!r}; available: {', '.join(MODELS)}")
