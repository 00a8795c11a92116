"""The k-diffusion convention: D(x̄, σ) = x̄ − σ·ε both ways, and a k-diffusion-style sampler on a flow."""

import math

import pytest
import torch

import flowdiff
from flowdiff.models.analytic import Gaussian, Mixture
from flowdiff.models.kdiffusion import from_denoiser, to_denoiser


def _gaussian():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, dtype=torch.float64, generator=g)
    mean = torch.randn(6, dtype=torch.float64, generator=g)
    return Gaussian(mean, a @ a.T / 6 + 0.05 * torch.eye(6, dtype=torch.float64))


def _timestep_flow():
    """A flow in the model(x_t, t) convention (timestep rounding, σ clamped below σ_min)."""
    gauss = _gaussian()
    return flowdiff.ProbabilityFlow(gauss, gauss.schedule)


SIGMAS = [0.0, 1e-3, None, 0.37, 4.0, 80.0]  # None: the schedule's σ_min


def _xbar(n=5, seed=1):
    return torch.randn(n, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sigma", SIGMAS)
def test_flow_denoiser_flow_round_trip_is_exact(sigma):
    flow = _timestep_flow()
    sigma = flow.schedule.sigma_min if sigma is None else sigma
    back = from_denoiser(to_denoiser(flow), flow.schedule)
    x = _xbar() * math.sqrt(1 + sigma**2)
    torch.testing.assert_close(back.eps(x, sigma), flow.eps(x, sigma), rtol=1e-12, atol=1e-12)


def test_denoiser_is_posterior_mean():
    gauss = _gaussian()
    denoise = to_denoiser(gauss.flow())
    x = _xbar()
    for sigma in (0.0, 0.5, 20.0):
        torch.testing.assert_close(denoise(x, torch.full((5,), sigma, dtype=torch.float64)),
                                   gauss.denoised(x, sigma), rtol=1e-13, atol=1e-13)
    assert denoise.sigma_max == gauss.schedule.sigma_max


def test_denoiser_flow_denoiser_round_trip():
    """A denoiser given directly (the exact mixture posterior mean) survives the trip through a flow."""
    mix = Mixture(torch.randn(7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3)), 0.3)

    def denoiser(xbar, sigma):
        return mix.denoised(xbar, float(sigma[0]))

    again = to_denoiser(from_denoiser(denoiser, mix.schedule))
    x = _xbar() * 3
    for sigma in (mix.schedule.sigma_min, 0.2, 3.0):
        s = torch.full((5,), sigma, dtype=torch.float64)
        torch.testing.assert_close(again(x, s), denoiser(x, s), rtol=1e-12, atol=1e-12)


def _sample_euler(model, x, sigmas):
    """k-diffusion's deterministic Euler sampler (Karras et al. 2022, Alg. 1 without churn), written here."""
    s_in = x.new_ones(x.shape[0])
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        d = (x - model(x, s * s_in)) / s
        x = x + d * (s_next - s)
    return x


def _sample_heun(model, x, sigmas):
    """k-diffusion's Heun sampler (Karras et al. 2022, Alg. 1): Euler into σ = 0, Heun elsewhere."""
    s_in = x.new_ones(x.shape[0])
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        d = (x - model(x, s * s_in)) / s
        x_euler = x + d * (s_next - s)
        if s_next == 0:
            x = x_euler
        else:
            d2 = (x_euler - model(x_euler, s_next * s_in)) / s_next
            x = x + (d + d2) / 2 * (s_next - s)
    return x


@pytest.mark.parametrize("solver, sampler", [("euler", _sample_euler), ("heun", _sample_heun)])
def test_kdiffusion_style_sampler_on_a_flow_equals_flowdiff(solver, sampler):
    flow = _timestep_flow()
    sigmas = flowdiff.make_sigmas(flow.schedule, "karras", 12)
    z = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    theirs = sampler(to_denoiser(flow), z * sigmas[0], torch.tensor(sigmas, dtype=torch.float64))
    ours = flowdiff.generate(flow, z * sigmas[0] / math.sqrt(1 + sigmas[0] ** 2), solver=solver, grid=sigmas)
    torch.testing.assert_close(ours.x, theirs, rtol=1e-10, atol=1e-10)


def test_generation_from_a_denoiser_matches_the_flow():
    flow = _timestep_flow()
    back = from_denoiser(to_denoiser(flow), flow.schedule)
    noise = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    a = flowdiff.generate(flow, noise, solver="heun", steps=8, grid="karras")
    b = flowdiff.generate(back, noise, solver="heun", steps=8, grid="karras")
    torch.testing.assert_close(a.x, b.x, rtol=1e-10, atol=1e-10)
    assert a.stats.nfe == b.stats.nfe


def test_per_row_sigmas_and_extra_args():
    flow = _timestep_flow()
    denoise = to_denoiser(flow)
    x = _xbar(4)
    sig = torch.tensor([0.5, 2.0, 0.5, 0.0], dtype=torch.float64)
    out = denoise(x, sig)
    for i, s in enumerate(sig.tolist()):
        torch.testing.assert_close(out[i:i + 1], denoise(x[i:i + 1], s), rtol=1e-14, atol=1e-14)

    seen = {}

    def denoiser(xbar, sigma, scale=1.0):
        seen["scale"] = scale
        return xbar / (1 + sigma[:, None] ** 2) * scale

    flowdiff.generate(from_denoiser(denoiser, flow.schedule), x, steps=2, model_kwargs={"scale": 0.5})
    assert seen["scale"] == 0.5


def test_bad_input():
    flow = _timestep_flow()
    with pytest.raises(TypeError, match="flow must be"):
        to_denoiser(lambda x, s: x)
    with pytest.raises(TypeError, match="denoiser must be callable"):
        from_denoiser(3, flow.schedule)
    with pytest.raises(ValueError, match="sigma_floor"):
        from_denoiser(lambda x, s: x, flow.schedule, sigma_floor=0.0)
    with pytest.raises(ValueError, match="sigma must be a scalar or have shape"):
        to_denoiser(flow)(_xbar(4), torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="sigma must be finite and >= 0"):
        to_denoiser(flow)(_xbar(2), -1.0)
    bad = from_denoiser(lambda x, s: x[:, :3], flow.schedule)
    with pytest.raises(ValueError, match="denoiser returned"):
        bad.eps(_xbar(2), 1.0)


def _kdiffusion_sampling():
    """k-diffusion's own sampling module, through the benchmarks' loader; skip where it is not installed."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "_kdiffusion.py"
    spec = importlib.util.spec_from_file_location("_bench_kdiffusion", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        return module.load_kdiffusion_sampling()
    except (ImportError, FileNotFoundError, AttributeError) as e:
        pytest.skip(f"k-diffusion not available: {e}")


@pytest.mark.parametrize("solver, sampler", [("euler", "sample_euler"), ("heun", "sample_heun")])
def test_kdiffusion_own_samplers_on_a_flow_equal_flowdiff(solver, sampler):
    """Peer check: k-diffusion's sample_euler / sample_heun on to_denoiser(flow) are flowdiff's Euler / Heun."""
    sampling = _kdiffusion_sampling()
    flow = _timestep_flow()
    sigmas = flowdiff.make_sigmas(flow.schedule, "karras", 12)
    z = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    theirs = getattr(sampling, sampler)(to_denoiser(flow), z * sigmas[0], torch.tensor(sigmas, dtype=torch.float64),
                                        disable=True)
    ours = flowdiff.generate(flow, z * sigmas[0] / math.sqrt(1 + sigmas[0] ** 2), solver=solver, grid=sigmas)
    torch.testing.assert_close(ours.x, theirs, rtol=1e-10, atol=1e-10)
