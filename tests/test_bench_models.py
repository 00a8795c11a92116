"""The benchmarks' third model (``benchmarks/_kdiffusion.py``): a kernel density over grey photo patches is what its
docstring says — patches cut where it says from scikit-learn's bundled photos, in [−1, 1], deterministic, and a
denoiser equal to the closed-form posterior mean."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "_kdiffusion.py"
    spec = importlib.util.spec_from_file_location("_bench_kdiffusion_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _photo_grey(name: str) -> np.ndarray:
    """The photo through PIL's own grey conversion (ITU-R 601-2 luma, rounded to 8 bits), scaled to [−1, 1]."""
    from PIL import Image
    from sklearn import datasets

    path = Path(datasets.__file__).parent / "images" / name
    with Image.open(path) as image:
        return np.asarray(image.convert("L"), dtype=np.float64) / 255.0 * 2 - 1


def test_patches_are_crops_of_the_photos_in_range_and_deterministic(bench):
    size, n = 16, 40
    centres = bench.patch_centres(n, size)
    assert centres.shape == (n, 1, size, size) and centres.dtype == torch.float64
    assert tuple(centres.shape[1:]) == bench.noise_shape("patches")
    assert float(centres.min()) >= -1 and float(centres.max()) <= 1
    assert torch.equal(centres, bench.patch_centres(n, size))  # deterministic
    assert not torch.equal(centres, bench.patch_centres(n, size, seed=1))
    positions = bench.patch_positions(n, size)
    assert len(set(positions)) == n
    assert [p for p, _, _ in positions] == [i % 2 for i in range(n)]  # china.jpg and flower.jpg in turn
    grey = [_photo_grey(name) for name in bench.PATCH_PHOTOS]
    assert all(g.shape == (427, 640) for g in grey)
    for k, (photo, r, c) in enumerate(positions):
        assert 0 <= r <= 427 - size and 0 <= c <= 640 - size
        # PIL rounds its fixed-point luma to an integer level: within one level, 2/255 on the [−1, 1] scale (a crop one
        # pixel off is ~1 away)
        np.testing.assert_allclose(centres[k, 0].numpy(), grey[photo][r:r + size, c:c + size], atol=2 / 255)
    # not all flat: the model holds textured patches as well as sky
    assert float(centres.reshape(n, -1).std(1).max()) > 0.1


def test_patch_denoiser_is_the_closed_form_posterior_mean(bench):
    """D(x̄, σ) = x̄ − σ ε equals E[x₀ | x̄] for x₀ ~ Σᵢ N(cᵢ, h² I) / N and x̄ = x₀ + σ z: the weights
    wᵢ ∝ exp(−|x̄ − cᵢ|² / 2(h² + σ²)), each component's mean cᵢ + h² / (h² + σ²) (x̄ − cᵢ)."""
    h = 0.1
    flow = bench.patch_flow(bandwidth=h)
    centres = bench.patch_centres().reshape(200, -1).numpy()
    eps = flow.field()
    generator = torch.Generator().manual_seed(3)
    for sigma in (0.02, 0.3, 2.0, 30.0):
        idx = torch.randint(0, 200, (3,), generator=generator)
        xbar = torch.from_numpy(centres)[idx] + sigma * torch.randn(3, 256, dtype=torch.float64, generator=generator)
        xbar = xbar.reshape(3, 1, 16, 16)
        denoised = (xbar - sigma * eps(sigma, xbar)).reshape(3, -1).numpy()
        var = h * h + sigma * sigma
        for b, v in enumerate(xbar.reshape(3, -1).numpy()):
            log_w = np.array([-np.sum((v - c) ** 2) / (2 * var) for c in centres])
            w = np.exp(log_w - log_w.max())
            w /= w.sum()
            expected = sum(wi * (c + h * h / var * (v - c)) for wi, c in zip(w, centres, strict=True))
            np.testing.assert_allclose(denoised[b], expected, rtol=0, atol=1e-10)


def test_patch_arguments_are_checked(bench):
    with pytest.raises(ValueError, match="n_centers.*0"):
        bench.patch_centres(0)
    with pytest.raises(ValueError, match="size.*500"):
        bench.patch_centres(4, 500)
    with pytest.raises(ValueError, match="bandwidth"):
        bench.patch_flow(4, 8, bandwidth=0.0)
