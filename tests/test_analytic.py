"""Closed-form models: ε = −σ∇log p_σ, the Gaussian's exact trajectory, the timestep convention, bad input."""

import math

import pytest
import torch
from torchdiffeq import odeint

import flowdiff
from flowdiff.models.analytic import Gaussian, Mixture

D = 5



def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _gaussians():
    g = _gen(0)
    mean = torch.randn(D, dtype=torch.float64, generator=g)
    a = torch.randn(D, D, dtype=torch.float64, generator=g)
    return {
        "isotropic": Gaussian(mean, 0.3),
        "diagonal": Gaussian(mean, torch.rand(D, dtype=torch.float64, generator=g) + 0.05),
        "full": Gaussian(mean, a @ a.T / D + 0.02 * torch.eye(D, dtype=torch.float64)),
    }


def _mixture(bandwidth=0.2, n=9, weights=True):
    g = _gen(1)
    centers = 2 * torch.randn(n, 1, D, dtype=torch.float64, generator=g)
    w = torch.rand(n, dtype=torch.float64, generator=g) + 0.1 if weights else None
    return Mixture(centers, bandwidth, weights=w)


def _score_eps(model, x, sigma):
    """−σ ∇ log p_σ(x̄) by autograd."""
    x = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model.log_prob(x, sigma).sum(), x)
    return -sigma * grad


@pytest.mark.parametrize("kind", ["isotropic", "diagonal", "full"])
@pytest.mark.parametrize("sigma", [0.0, 1e-3, 0.4, 7.0, 150.0])
def test_gaussian_eps_is_minus_sigma_score(kind, sigma):
    model = _gaussians()[kind]
    x = torch.randn(6, D, dtype=torch.float64, generator=_gen(2)) * math.sqrt(1 + sigma**2)
    torch.testing.assert_close(model.eps(x, sigma), _score_eps(model, x, sigma), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["isotropic", "diagonal", "full"])
@pytest.mark.parametrize("sigma0, sigma1", [(80.0, 0.0), (0.0, 80.0), (3.0, 0.1), (0.02, 1.5)])
def test_gaussian_solution_matches_a_tight_numerical_solve(kind, sigma0, sigma1):
    model = _gaussians()[kind]
    x0 = model.sample(4, _gen(3)) + sigma0 * torch.randn(4, D, dtype=torch.float64, generator=_gen(4))
    ts = torch.tensor([sigma0, sigma1], dtype=torch.float64)
    ref = odeint(lambda s, y: model.eps(y, float(s)), x0, ts, method="dopri5", rtol=1e-12, atol=1e-12)[-1]
    torch.testing.assert_close(model.solution(x0, sigma0, sigma1), ref, rtol=1e-9, atol=1e-9)


def test_gaussian_solution_composes_and_inverts():
    model = _gaussians()["full"]
    x = torch.randn(3, D, dtype=torch.float64, generator=_gen(5))
    via = model.solution(model.solution(x, 9.0, 0.7), 0.7, 0.0)
    torch.testing.assert_close(via, model.solution(x, 9.0, 0.0), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(model.solution(model.solution(x, 0.0, 50.0), 50.0, 0.0), x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sigma", [0.0, 1e-4, 0.05, 0.5, 4.0, 120.0])
@pytest.mark.parametrize("bandwidth", [0.2, 1e-3])
def test_mixture_eps_is_minus_sigma_score(sigma, bandwidth):
    model = _mixture(bandwidth)
    x = model.sample(7, _gen(6)).reshape(7, 1, D) + sigma * torch.randn(7, 1, D, dtype=torch.float64,
                                                                       generator=_gen(7))
    x = x + 0.3 * torch.randn(x.shape, dtype=torch.float64, generator=_gen(8))  # off the components too
    eps = model.eps(x, sigma)
    assert bool(torch.isfinite(eps).all())
    torch.testing.assert_close(eps, _score_eps(model, x, sigma), rtol=1e-8, atol=1e-9)


def test_mixture_is_stable_far_from_data_at_sigma_zero():
    """Posterior weights by log-sum-exp: no underflow to 0/0 where every component is e^{−10⁶} away."""
    model = _mixture(bandwidth=1e-3)
    x = torch.full((2, 1, D), 40.0, dtype=torch.float64)
    for sigma in (0.0, 1e-6):
        eps = model.eps(x, sigma)
        assert bool(torch.isfinite(eps).all())
    sigma = 1e-3  # logits −d²/(2(s²+σ²)) of order −10⁹: the posterior sits on the nearest center
    var = 1e-6 + sigma**2
    posterior_mean = x - model.eps(x, sigma) * (var / sigma)
    nearest = model.centers[((model.centers - x[0].reshape(1, D)) ** 2).sum(1).argmin()]
    torch.testing.assert_close(posterior_mean[0].reshape(D), nearest, rtol=1e-9, atol=1e-9)


def test_one_component_mixture_is_an_isotropic_gaussian():
    center = torch.randn(1, D, dtype=torch.float64, generator=_gen(9))
    mix, gauss = Mixture(center, 0.4), Gaussian(center[0], 0.16)
    x = torch.randn(4, D, dtype=torch.float64, generator=_gen(10)) * 3
    for sigma in (0.0, 0.3, 20.0):
        torch.testing.assert_close(mix.eps(x, sigma), gauss.eps(x, sigma), rtol=1e-12, atol=1e-12)


def test_mixture_chunks_and_dtypes():
    model = _mixture()
    x = torch.randn(11, 1, D, dtype=torch.float64, generator=_gen(11))
    chunked = Mixture(model.centers.reshape(-1, 1, D), 0.2, weights=model.log_weights.exp(), chunk=3)
    torch.testing.assert_close(chunked.eps(x, 0.7), model.eps(x, 0.7), rtol=1e-14, atol=1e-14)
    out32 = model.eps(x.float(), 0.7)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), model.eps(x, 0.7), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model", [_gaussians()["full"], _mixture()], ids=["gaussian", "mixture"])
def test_timestep_convention(model):
    """model(x_t, t) is ε at σ(t) with x̄ = x_t·√(1+σ²), for integer, fractional and per-row t."""
    shape = (3, *model.shape) if isinstance(model, Mixture) else (3, D)
    x_t = torch.randn(shape, dtype=torch.float64, generator=_gen(12))
    t = torch.tensor([10.0, 500.5, 999.0], dtype=torch.float64)
    out = model(x_t, t)
    for i, ti in enumerate(t.tolist()):
        s = float(model.schedule.sigma_at(ti))
        torch.testing.assert_close(out[i:i + 1], model.eps(x_t[i:i + 1] * math.sqrt(1 + s * s), s),
                                   rtol=1e-13, atol=1e-13)
    same = model(x_t, torch.full((3,), 250.0, dtype=torch.float64))
    s = float(model.schedule.sigma_at(250.0))
    torch.testing.assert_close(same, model.eps(x_t * math.sqrt(1 + s * s), s), rtol=1e-13, atol=1e-13)


def test_exact_flow_generates_the_exact_solution():
    model = _gaussians()["diagonal"]
    noise = torch.randn(4, D, dtype=torch.float64, generator=_gen(13))
    res = flowdiff.generate(model.flow(), noise, solver="dopri5", adaptive=flowdiff.Adaptive(rtol=1e-10, atol=1e-10))
    s_max = res.sigmas[0]
    exact = model.solution(noise * math.sqrt(1 + s_max**2), s_max, 0.0)
    torch.testing.assert_close(res.x, exact, rtol=1e-7, atol=1e-7)


def test_bad_input_raises_naming_the_argument():
    mean = torch.zeros(D, dtype=torch.float64)
    g = Gaussian(mean, 1.0)
    with pytest.raises(ValueError, match="xbar must have shape"):
        g.eps(torch.zeros(2, D + 1, dtype=torch.float64), 1.0)
    with pytest.raises(ValueError, match="xbar0 must have shape"):
        g.solution(torch.zeros(D, dtype=torch.float64), 1.0, 0.0)
    with pytest.raises(ValueError, match="cov as variances"):
        Gaussian(mean, torch.ones(D + 1))
    with pytest.raises(ValueError, match="cov as variances"):
        Gaussian(mean, -1.0)
    with pytest.raises(ValueError, match="cov as a matrix"):
        Gaussian(mean, torch.ones(D, D + 1))
    with pytest.raises(ValueError, match="positive definite"):
        Gaussian(mean, -torch.eye(D))
    with pytest.raises(ValueError, match="cov must be finite"):
        Gaussian(mean, float("nan"))
    with pytest.raises(ValueError, match="mean must be"):
        Gaussian(torch.tensor(1.0), 1.0)
    with pytest.raises(ValueError, match="cov must be a scalar"):
        Gaussian(mean, torch.ones(D, D, D))
    centers = torch.zeros(3, D)
    with pytest.raises(ValueError, match="centers must have shape"):
        Mixture(torch.zeros(D), 0.1)
    with pytest.raises(ValueError, match="centers must be finite"):
        Mixture(torch.full((3, D), float("inf")), 0.1)
    for bad in (0.0, -1.0, float("nan"), float("inf"), "0.1", True):
        with pytest.raises(ValueError, match="bandwidth"):
            Mixture(centers, bad)
    with pytest.raises(ValueError, match="weights must be 3 positive"):
        Mixture(centers, 0.1, weights=torch.ones(2))
    with pytest.raises(ValueError, match="weights must be 3 positive"):
        Mixture(centers, 0.1, weights=torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="chunk"):
        Mixture(centers, 0.1, chunk=0)
    with pytest.raises(ValueError, match="xbar must have shape"):
        Mixture(centers, 0.1).eps(torch.zeros(2, 3), 0.5)


@pytest.mark.parametrize("name", ["isotropic", "full", "mixture"])
def test_closed_forms_on_a_device_agree_with_the_cpu_without_host_syncs(name, device):
    """ε, the exact solution and log p on ``device`` are the CPU's values; the model's constants are copied to the
    device once, so an evaluation makes no host sync (counted on CUDA)."""
    from flowdiff.tools.syncs import count_host_syncs

    model = _mixture() if name == "mixture" else _gaussians()[name]
    x = model.sample(4, _gen(3))
    xd = x.to(device)
    for sigma in (0.0, 0.7, 20.0):
        torch.testing.assert_close(model.eps(xd, sigma).cpu(), model.eps(x, sigma), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(model.log_prob(xd, sigma).cpu(), model.log_prob(x, sigma), rtol=1e-12, atol=1e-9)
    if name != "mixture":
        torch.testing.assert_close(model.solution(xd, 0.0, 3.0).cpu(), model.solution(x, 0.0, 3.0),
                                   rtol=1e-12, atol=1e-12)
    out, count = count_host_syncs(lambda: model.eps(xd, 0.3), device)
    assert out.device == xd.device
    assert count.syncs in (None, 0), count
