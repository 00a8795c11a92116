"""Benchmark-only helpers: k-diffusion's samplers on a flowdiff model, and the shared models.

k-diffusion (``pip install --no-deps k-diffusion``, see ``benchmarks/requirements.txt``) is
loaded by :func:`flowdiff.tools.peers.load_kdiffusion`, without its package ``__init__`` (which
imports torchvision, clip and more).

Its samplers run on the denoiser D(x̄, σ) = x̄ − σ·ε(x̄, σ), with k-diffusion's x equal to
flowdiff's x̄ = x·√(1+σ²); every call is counted (NFE).
"""

from __future__ import annotations

import hashlib
import os
import sys
import types
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

import flowdiff
from flowdiff.tools.peers import load_kdiffusion


def load_kdiffusion_sampling() -> types.ModuleType:
    """``k_diffusion.sampling`` without the package's heavy imports (:func:`flowdiff.tools.peers.load_kdiffusion`)."""
    return load_kdiffusion()


class CountingDenoiser(torch.nn.Module):
    """k-diffusion's ``model(x, sigma)`` = D(x̄, σ) from a flowdiff flow, counting calls."""

    def __init__(self, flow: flowdiff.ProbabilityFlow, model_kwargs: dict | None = None) -> None:
        super().__init__()
        self.eps = flow.field(model_kwargs)
        self.nfe = 0

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        self.nfe += 1
        s = sigma.reshape(-1)
        if not bool((s == s[0]).all()):
            raise ValueError("one σ per batch expected")
        s0 = float(s[0])
        return x - s0 * self.eps(s0, x)


def mixture_centres(n_centers: int = 200) -> Tensor:
    """The mixture's centres: the first ``n_centers`` of scikit-learn's 8×8 digit images in [−1, 1], float64."""
    from sklearn.datasets import load_digits

    images = load_digits().images[:n_centers] / 16.0 * 2 - 1
    return torch.tensor(images, dtype=torch.float64).reshape(n_centers, 1, 8, 8)


def mixture_flow(n_centers: int = 200, bandwidth: float = 0.1) -> flowdiff.ProbabilityFlow:
    """A closed-form Gaussian mixture centred on :func:`mixture_centres` (DDPM linear schedule, T = 1000): exact ε
    at every σ ≥ 0."""
    from flowdiff.models.analytic import Mixture

    return Mixture(mixture_centres(n_centers), bandwidth=bandwidth).flow()


#: the patch model's photos: scikit-learn's bundled sample images (shipped with it, no download), 427 × 640 RGB
PATCH_PHOTOS = ("china.jpg", "flower.jpg")


def patch_positions(n_centers: int = 200, size: int = 16, seed: int = 0) -> list[tuple[int, int, int]]:
    """Where :func:`patch_centres` cuts its patches: ``(photo, row, column)`` of each top-left corner, the photos of
    ``PATCH_PHOTOS`` taken in turn, each corner uniform over its photo from ``torch.Generator().manual_seed(seed)``
    (a corner drawn twice is drawn again)."""
    if isinstance(n_centers, bool) or not isinstance(n_centers, int) or n_centers < 1:
        raise ValueError(f"n_centers must be an int >= 1, got {n_centers!r}")
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= 427:
        raise ValueError(f"size must be an int in [1, 427] (the photos are 427 × 640), got {size!r}")
    generator = torch.Generator().manual_seed(seed)
    cols = 640 - size + 1
    positions: list[tuple[int, int, int]] = []
    while len(positions) < n_centers:
        corner = (len(positions) % len(PATCH_PHOTOS),
                  *divmod(int(torch.randint(0, (427 - size + 1) * cols, (1,), generator=generator)), cols))
        if corner not in positions:
            positions.append(corner)
    return positions


def patch_centres(n_centers: int = 200, size: int = 16, seed: int = 0) -> Tensor:
    """Grey-scale ``size`` × ``size`` patches of two photographs, scaled like :func:`mixture_centres` to [−1, 1]
    (grey = 0.299 R + 0.587 G + 0.114 B of 8-bit values, then grey / 255 · 2 − 1), float64, shape
    (n_centers, 1, size, size), cut at :func:`patch_positions`."""
    from sklearn.datasets import load_sample_images

    bundled = load_sample_images()
    photos = {Path(name).name: image for name, image in zip(bundled.filenames, bundled.images, strict=True)}
    luma = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)
    grey = [torch.from_numpy(photos[name].astype(np.float64)) @ luma / 255.0 * 2 - 1 for name in PATCH_PHOTOS]
    patches = [grey[photo][r:r + size, c:c + size] for photo, r, c in patch_positions(n_centers, size, seed)]
    return torch.stack(patches).reshape(n_centers, 1, size, size)


def patch_flow(n_centers: int = 200, size: int = 16, bandwidth: float = 0.1, seed: int = 0) -> flowdiff.ProbabilityFlow:
    """A closed-form kernel density over photo patches (:func:`patch_centres`; DDPM linear schedule, T = 1000): data
    unlike digits, exact ε at every σ ≥ 0.

    The bandwidth is the digit mixture's, 0.1, and on these data it makes a model that is neither a set of isolated
    points nor one blob (``benchmarks/patch_bandwidth.py``, recorded in ``benchmarks/RESULTS.md``): about half of
    the patches are nearly flat (sky, blurred background; the median patch's pixel standard deviation is 0.044),
    their nearest other patch at an RMS distance of 0.039 per pixel (median over the 200), inside the bandwidth, so
    they merge into shared modes, while textured patches (nearest other up to 0.49) stay apart. Of 2,000 samples of
    the model, 64 % have their own component's posterior weight above 0.99 at σ = 0 (a patch remembered) and 10 %
    lie nearer another patch than their own; on the digit mixture at the same bandwidth (nearest other digit
    0.17–0.51) those are 100 % and 0 %.
    """
    from flowdiff.models.analytic import Mixture

    return Mixture(patch_centres(n_centers, size, seed), bandwidth=bandwidth).flow()


def noise_shape(key: str) -> tuple[int, ...]:
    """The shape of one sample of a benchmark model by its key: the photo patches 1 × 16 × 16, the digits 1 × 8 × 8."""
    return (1, 16, 16) if key == "patches" else (1, 8, 8)


def trained_flow() -> flowdiff.ProbabilityFlow | None:
    """The shipped digits model in float64, or ``None`` when its weights are not there yet."""
    try:
        from flowdiff.models.pretrained import pretrained

        flow = pretrained("digits")
    except Exception as err:  # weights missing or the module not landed
        print(f"# trained model unavailable: {type(err).__name__}: {err}", file=sys.stderr)
        return None
    model = flow.model
    if isinstance(model, torch.nn.Module):
        model.double().eval()
    return flow


def reference(flow: flowdiff.ProbabilityFlow, noise: Tensor, tol: float = 1e-10,
              cache_key: str = "") -> tuple[Tensor, float, int]:
    """A tight float64 solve; returns the image, an estimate of its own error, and its NFE.

    σ-native flows (closed-form models): dopri8 in log(σ + c) at rtol = atol = ``tol``, its
    error estimated as the RMS distance to the same solve at 100× looser tolerance. A trained
    model's field has a kink at every trained σ (its timestep is interpolated linearly in log σ
    between integer timesteps), which an adaptive solver must resolve one by one; there the
    reference is RK4 on the grid of all trained σ's (smooth between nodes) with 2 substeps per
    interval, its error estimated against 1 substep. With ``cache_key`` the result is cached on
    disk (``$FLOWDIFF_BENCH_CACHE``, default /tmp/flowdiff_bench_cache) per key and noise.
    """
    key = hashlib.sha256(noise.detach().cpu().double().numpy().tobytes()).hexdigest()[:16]
    path = Path(os.environ.get("FLOWDIFF_BENCH_CACHE", "/tmp/flowdiff_bench_cache")) / f"{cache_key}-{key}.pt"
    if cache_key and path.exists():
        return tuple(torch.load(path))  # type: ignore[return-value]
    out = _reference(flow, noise, tol)
    if cache_key:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(list(out), path)
    return out


def _reference(flow: flowdiff.ProbabilityFlow, noise: Tensor, tol: float) -> tuple[Tensor, float, int]:
    with torch.no_grad():
        if flow.sigma_field is not None:
            tight = flowdiff.generate(flow, noise, solver="dopri8", adaptive=flowdiff.Adaptive(rtol=tol, atol=tol))
            loose = flowdiff.generate(flow, noise, solver="dopri8",
                                      adaptive=flowdiff.Adaptive(rtol=100 * tol, atol=100 * tol))
            return tight.x, rmse(loose.x, tight.x), tight.stats.nfe
        nodes = np.append(flow.schedule.sigmas[::-1], 0.0)
        fine = np.empty(2 * (len(nodes) - 1) + 1)
        fine[0::2] = nodes
        fine[1::2] = 0.5 * (nodes[:-1] + nodes[1:])
        tight = flowdiff.generate(flow, noise, solver="rk4", grid=flowdiff.Grid(sigmas=fine, final_euler=False))
        loose = flowdiff.generate(flow, noise, solver="rk4", grid=flowdiff.Grid(sigmas=nodes, final_euler=False))
        return tight.x, rmse(loose.x, tight.x), tight.stats.nfe


def rmse(x: Tensor, ref: Tensor) -> float:
    return float((x - ref).pow(2).mean().sqrt())


def per_sample_error(x: Tensor, ref: Tensor) -> Tensor:
    """Each sample's RMS error over its pixels (float64, on the host): ``rmse`` is the RMS of these."""
    return (x.double() - ref.double()).reshape(x.shape[0], -1).pow(2).mean(dim=1).sqrt().cpu()


def model_grid(flow: flowdiff.ProbabilityFlow, n: int) -> Tensor:
    """k-diffusion's DiscreteSchedule.get_sigmas(n): timesteps linspace(T−1, 0, n), then 0."""
    T = flow.schedule.num_train_timesteps
    t = torch.linspace(T - 1, 0, n, dtype=torch.float64)
    sig = torch.tensor(flow.schedule.sigma_at(t.numpy()), dtype=torch.float64)
    return torch.cat([sig, sig.new_zeros(1)])


def sigma_range(flow: flowdiff.ProbabilityFlow) -> tuple[float, float]:
    return flow.schedule.sigma_min, flow.schedule.sigma_max


def write_report(lines: list[str], out: str | None) -> None:
    """A benchmark's closing step: its report's ``lines`` joined, written to ``out`` (when given) and printed."""
    text = "\n".join(lines) + "\n"
    if out:
        with open(out, "w") as fh:
            fh.write(text)
    print(text)


__all__ = ["CountingDenoiser", "load_kdiffusion_sampling", "mixture_centres", "mixture_flow", "model_grid",
           "noise_shape", "patch_centres", "patch_flow", "patch_positions", "per_sample_error", "reference", "rmse",
           "sigma_range", "trained_flow", "write_report"]

