"""The DDIM paper's generalized process (η, σ̂): Euler at η = 0, diffusers' DDIM/DDPM for η > 0, reproducible noise."""

import math
from decimal import Decimal, localcontext

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from hypothesis import given
from hypothesis import strategies as st

import flowdiff
from flowdiff import Schedule
from flowdiff.api.stochastic import SIGMA_HAT, noise_levels
from flowdiff.models.analytic import Gaussian, Mixture

SHAPE = (3, 2, 4)


class TanhModel:
    """A fixed random nonlinear ε-model in the user convention model(x_t, t), float64; counts its calls."""

    def __init__(self, dim: int = 8, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(dim, dim, generator=g, dtype=torch.float64) / math.sqrt(dim)
        self.b = torch.randn(dim, generator=g, dtype=torch.float64)
        self.calls = 0

    def __call__(self, x_t, t):
        self.calls += 1
        flat = x_t.reshape(x_t.shape[0], -1).double()
        out = torch.tanh(flat @ self.w + (t.double()[:, None] / 1000.0) * self.b) + 0.3 * flat
        return out.reshape(x_t.shape).to(x_t.dtype)


def _noise(seed=0, dtype=torch.float64):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _draws(seed, n, like):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(like.shape, generator=g, dtype=like.dtype) for _ in range(n)]


def _ddim_scheduler(spacing, T=1000):
    s = DDIMScheduler(num_train_timesteps=T, beta_schedule="linear", clip_sample=False, set_alpha_to_one=True,
                      timestep_spacing=spacing)
    s.alphas_cumprod = s.alphas_cumprod.double()
    return s


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


# -- η = 0 is the Euler solve --------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", flowdiff.GRIDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_eta_zero_is_the_euler_solve_bit_for_bit(grid, dtype):
    flow = flowdiff.ProbabilityFlow(TanhModel(), Schedule.linear())
    noise = _noise(dtype=dtype)
    ode = flowdiff.generate(flow, noise, solver="euler", steps=10, grid=grid)
    for spec in (flowdiff.Stochastic(0.0), flowdiff.Stochastic(0), flowdiff.Stochastic(0.0, generator=3),
                 flowdiff.Stochastic(generator=torch.Generator())):
        out = flowdiff.generate(flow, noise, steps=10, grid=grid, solver=spec)
        assert torch.equal(out.x, ode.x), spec
        assert out.stats.nfe == ode.stats.nfe == 10
        assert out.stats.extra["noise_draws"] == 0
        np.testing.assert_array_equal(out.sigmas, ode.sigmas)


def test_eta_zero_on_a_sigma_native_flow_is_euler():
    mix = Mixture(torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64), 0.2)
    noise = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    a = flowdiff.generate(mix.flow(), noise, steps=12, grid="karras")
    b = flowdiff.generate(mix.flow(), noise, steps=12, grid="karras",
                          solver=flowdiff.Stochastic(0.0, step_noise=torch.ones(12, 6, 3)))
    assert torch.equal(a.x, b.x)


def test_small_eta_approaches_the_ode():
    flow = flowdiff.ProbabilityFlow(TanhModel(), Schedule.linear())
    noise = _noise()
    zs = _draws(7, 20, noise)
    ode = flowdiff.generate(flow, noise, steps=20).x
    dist = [float((flowdiff.generate(flow, noise, steps=20, solver=flowdiff.Stochastic(e, step_noise=zs)).x
                   - ode).norm()) for e in (0.4, 0.1, 0.025)]
    assert dist[0] > dist[1] > dist[2] > 0


# -- the noise levels are the paper's σ_t(η) --------------------------------------------------------------------


def _ddim_reference(sigma, sigma_next, eta):
    """DDIM's quantities from ᾱ (eq. 12 and 16), in 60-digit decimal so that 1 − ᾱ does not cancel."""
    with localcontext() as ctx:
        ctx.prec = 60
        s_t, s_s, e = Decimal(sigma), Decimal(sigma_next), Decimal(eta)
        a_t, a_s = 1 / (1 + s_t * s_t), 1 / (1 + s_s * s_s)
        var = (1 - a_s) / (1 - a_t) * (1 - a_t / a_s)  # DDIM eq. 16 at η = 1: DDPM's β̃
        c2 = e * e * var
        direction = ((1 - a_s - c2) / a_s).sqrt()  # eq. 12's √(1 − ᾱ_s − c²), seen in x̄ = x/√ᾱ_s
        up = (c2 / a_s).sqrt()  # c·z in x is c/√ᾱ_s·z in x̄
        up_hat = ((1 - a_t / a_s) / a_s).sqrt()  # DDPM's β in place of c²
        return float(direction), float(up), float(up_hat)


@given(st.floats(1e-3, 200.0), st.one_of(st.just(0.0), st.floats(1e-6, 0.999)), st.floats(0.0, 1.0))
def test_noise_levels_are_ddim_eq12_and_eq16_in_the_xbar_frame(sigma, frac, eta):
    sigma_next = sigma * frac
    down, up = noise_levels(sigma, sigma_next, eta)
    ref_down, ref_up, _ = _ddim_reference(sigma, sigma_next, eta)
    assert math.isclose(down, ref_down, rel_tol=1e-12, abs_tol=1e-300)
    assert math.isclose(up, ref_up, rel_tol=1e-12, abs_tol=1e-300)
    if eta == 0:
        assert (down, up) == (sigma_next, 0.0)


@given(st.floats(1e-3, 200.0), st.floats(1e-6, 0.999))
def test_sigma_hat_is_ddpm_large_variance_around_the_posterior_mean(sigma, frac):
    sigma_next = sigma * frac
    down_hat, up_hat = noise_levels(sigma, sigma_next, SIGMA_HAT)
    down_1, up_1 = noise_levels(sigma, sigma_next, 1.0)
    assert math.isclose(up_hat, _ddim_reference(sigma, sigma_next, 1.0)[2], rel_tol=1e-12)
    assert down_hat == down_1  # the η = 1 (DDPM posterior) mean
    assert math.isclose(down_1, sigma_next**2 / sigma, rel_tol=1e-12)
    assert up_hat >= up_1  # β ≥ β̃


def test_no_noise_into_sigma_zero():
    for eta in (0.0, 0.5, 1.0, SIGMA_HAT):
        assert noise_levels(3.0, 0.0, eta) == (0.0, 0.0)


# -- equivalence with diffusers -------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("steps", [10, 50])
@pytest.mark.parametrize("eta", [0.2, 0.5, 1.0])
def test_matches_diffusers_ddim_with_variance_noise(spacing, steps, eta):
    sched = _ddim_scheduler(spacing)
    model = TanhModel()
    flow = flowdiff.ProbabilityFlow(model, Schedule.from_alphas_cumprod(sched.alphas_cumprod))
    noise = _noise()
    zs = torch.stack(_draws(11, steps, noise))
    sched.set_timesteps(steps)
    x = noise.clone()
    for i, t in enumerate(sched.timesteps):
        eps = model(x, torch.full((x.shape[0],), float(t), dtype=torch.float64))
        x = sched.step(eps, t, x, eta=eta, variance_noise=zs[i]).prev_sample
    model.calls = 0
    out = flowdiff.generate(flow, noise, steps=steps, grid=spacing, solver=flowdiff.Stochastic(eta, step_noise=zs))
    assert _rel(out.x, x) < 1e-13
    assert out.stats.nfe == model.calls == steps
    assert out.stats.extra["noise_draws"] == steps - 1


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_generator_draws_what_diffusers_ddim_draws(spacing):
    sched = _ddim_scheduler(spacing)
    model = TanhModel(seed=3)
    flow = flowdiff.ProbabilityFlow(model, Schedule.from_alphas_cumprod(sched.alphas_cumprod))
    noise = _noise(1)
    sched.set_timesteps(20)
    gen = torch.Generator().manual_seed(42)
    x = noise.clone()
    for t in sched.timesteps:
        eps = model(x, torch.full((x.shape[0],), float(t), dtype=torch.float64))
        x = sched.step(eps, t, x, eta=0.7, generator=gen).prev_sample
    out = flowdiff.generate(flow, noise, steps=20, grid=spacing,
                            solver=flowdiff.Stochastic(0.7, generator=torch.Generator().manual_seed(42)))
    assert _rel(out.x, x) < 1e-13


@pytest.mark.parametrize(("variance_type", "eta"), [("fixed_large", SIGMA_HAT), ("fixed_small", 1.0)])
def test_sigma_hat_and_eta_one_match_diffusers_ddpm(variance_type, eta):
    """σ̂ is DDPM with β variance, η = 1 DDPM with β̃, on a grid ending at timestep 0 (see the module note)."""
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
                          variance_type=variance_type, timestep_spacing="leading")
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    model = TanhModel(seed=5)
    flow = flowdiff.ProbabilityFlow(model, Schedule.from_alphas_cumprod(sched.alphas_cumprod))
    noise = _noise(2)
    sched.set_timesteps(25)
    assert int(sched.timesteps[-1]) == 0
    gen = torch.Generator().manual_seed(9)
    x = noise.clone()
    for t in sched.timesteps:
        eps = model(x, torch.full((x.shape[0],), float(t), dtype=torch.float64))
        x = sched.step(eps, t, x, generator=gen).prev_sample
    out = flowdiff.generate(flow, noise, steps=25, grid="leading",
                            solver=flowdiff.Stochastic(eta, generator=torch.Generator().manual_seed(9)))
    assert _rel(out.x, x) < 1e-13


# -- reproducible randomness ----------------------------------------------------------------------------------


@pytest.mark.parametrize("eta", [0.5, SIGMA_HAT])
def test_same_generator_same_images_and_seed_forms_agree(eta):
    flow = flowdiff.ProbabilityFlow(TanhModel(), Schedule.linear())
    noise = _noise()
    a = flowdiff.generate(flow, noise, steps=15,
                          solver=flowdiff.Stochastic(eta, generator=torch.Generator().manual_seed(4)))
    b = flowdiff.generate(flow, noise, steps=15, solver=flowdiff.Stochastic(eta, generator=4))
    c = flowdiff.generate(flow, noise, steps=15, solver=flowdiff.Stochastic(eta, step_noise=_draws(4, 15, noise)))
    d = flowdiff.generate(flow, noise, steps=15,
                          solver=flowdiff.Stochastic(eta, step_noise=torch.stack(_draws(4, 15, noise))))
    e = flowdiff.generate(flow, noise, steps=15, solver=flowdiff.Stochastic(eta, generator=5))
    assert torch.equal(a.x, b.x) and torch.equal(a.x, c.x) and torch.equal(a.x, d.x)
    assert not torch.allclose(a.x, e.x)
    torch.manual_seed(123)
    f = flowdiff.generate(flow, noise, steps=15, solver=flowdiff.Stochastic(eta))
    torch.manual_seed(123)
    g = flowdiff.generate(flow, noise, steps=15, solver=flowdiff.Stochastic(eta))
    assert torch.equal(f.x, g.x)


def test_every_eta_sees_the_same_noise():
    """A zero model makes each step x̄ += σ_up·z, so the z of each step can be read back."""
    flow = flowdiff.ProbabilityFlow.from_sigma_field(lambda xbar, sigma: torch.zeros_like(xbar), Schedule.linear())
    noise = _noise()
    seen = {}
    for eta in (0.3, 1.0, SIGMA_HAT):
        states = []
        out = flowdiff.generate(flow, noise, steps=8, solver=flowdiff.Stochastic(eta, generator=17),
                                callback=states.append)
        xbars = [noise * math.sqrt(1 + out.sigmas[0] ** 2)] + [s.xbar for s in states]
        zs = [(xbars[i + 1] - xbars[i]) / noise_levels(out.sigmas[i], out.sigmas[i + 1], eta)[1] for i in range(7)]
        seen[eta] = torch.stack(zs)
    ref = torch.stack(_draws(17, 7, noise))
    for zs in seen.values():
        assert torch.allclose(zs, ref, rtol=1e-9, atol=1e-9)


# -- every grid, NFE, dtypes, callback --------------------------------------------------------------------------


@pytest.mark.parametrize("grid", flowdiff.GRIDS)
@pytest.mark.parametrize("eta", [0.5, 1.0, SIGMA_HAT])
def test_every_grid_one_evaluation_per_step(grid, eta):
    model = TanhModel()
    flow = flowdiff.ProbabilityFlow(model, Schedule.linear())
    out = flowdiff.generate(flow, _noise(), steps=12, grid=grid, solver=flowdiff.Stochastic(eta, generator=0))
    assert out.stats.nfe == model.calls == out.stats.steps == 12
    assert out.stats.extra == {"eta": eta, "noise_draws": 11}
    assert bool(torch.isfinite(out.x).all())
    model.calls = 0
    budget = flowdiff.generate(flow, _noise(), nfe=7, grid=grid, solver=flowdiff.Stochastic(eta, generator=0))
    assert budget.stats.nfe == model.calls == 7 and len(budget.sigmas) == 8


def test_callback_and_dtypes():
    flow = flowdiff.ProbabilityFlow(TanhModel(), Schedule.linear())
    states = []
    out = flowdiff.generate(flow, _noise(dtype=torch.float32), steps=6, solver=flowdiff.Stochastic(0.5, generator=1),
                            callback=states.append)
    assert out.x.dtype == torch.float32 and [s.step for s in states] == list(range(6))
    assert [s.sigma for s in states] == out.sigmas[1:].tolist()
    assert torch.equal(states[-1].xbar, out.x)
    for s in states:
        assert torch.allclose(s.x, s.xbar / math.sqrt(1 + s.sigma**2))
    half = flowdiff.generate(flow, _noise(dtype=torch.float16), steps=6, solver=flowdiff.Stochastic(0.5, generator=1))
    assert half.x.dtype == torch.float16 and bool(torch.isfinite(half.x).all())


# -- the process samples the data distribution -----------------------------------------------------------------


def _chain_moments(sigmas, mean, var, eta):
    """Exact mean and variance of the discrete chain for N(mean, var) data, run in DDIM's own x frame.

    Written from the paper's formulas in ᾱ (eq. 12 with c(η) of eq. 16; for σ̂, DDPM's posterior
    mean with variance β), independently of the x̄/σ form under test: with exact ε every step is
    affine in x_t plus independent noise, so x_t's mean and variance propagate exactly.
    """
    a = [1 / (1 + s * s) for s in sigmas]
    m, v = 0.0 * mean, 1.0 + 0.0 * var  # x_T ~ N(0, I)
    for a_t, a_s in zip(a[:-1], a[1:]):
        # exact ε(x_t) = k·(x_t − √ᾱ_t·μ) with k = √(1−ᾱ_t)/(ᾱ_t·var + 1 − ᾱ_t)
        k = math.sqrt(1 - a_t) / (a_t * var + 1 - a_t)
        beta = 1 - a_t / a_s
        if eta == SIGMA_HAT:  # x_s = (√ᾱ_s·β·x̂₀ + √(1−β)·(1−ᾱ_s)·x_t)/(1−ᾱ_t) + √β·z (β = 0 into ᾱ_s = 1)
            c_x0, c_x, c_eps = math.sqrt(a_s) * beta / (1 - a_t), math.sqrt(1 - beta) * (1 - a_s) / (1 - a_t), 0.0
            std = math.sqrt(beta) if a_s < 1 else 0.0
        else:
            std = eta * math.sqrt((1 - a_s) / (1 - a_t) * beta)
            c_x0, c_x, c_eps = math.sqrt(a_s), 0.0, math.sqrt(max(1 - a_s - std * std, 0.0))
        # x̂₀ = (x_t − √(1−ᾱ_t)·ε)/√ᾱ_t; collect x_s = A·x_t + B·μ + std·z
        A = c_x0 * (1 - math.sqrt(1 - a_t) * k) / math.sqrt(a_t) + c_x + c_eps * k
        B = c_x0 * math.sqrt(1 - a_t) * k + (-c_eps * k * math.sqrt(a_t))
        m, v = A * m + B * mean, A * A * v + std * std
    return m, v


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0, SIGMA_HAT])
def test_gaussian_data_samples_have_the_moments_of_the_ddim_chain(eta):
    """Exact ε of N(μ, diag v) data: the samples' mean and variance are the discrete chain's, to sampling error."""
    mean, var = torch.tensor([1.0, -2.0], dtype=torch.float64), torch.tensor([0.25, 2.0], dtype=torch.float64)
    model = Gaussian(mean, var)
    n = 40000
    noise = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = flowdiff.generate(model.flow(), noise, steps=40, grid="trailing",
                            solver=flowdiff.Stochastic(eta, generator=1))
    m, v = _chain_moments(out.sigmas.tolist(), mean, var, eta)
    assert bool(((out.x.mean(0) - m).abs() < 5 * (v / n).sqrt()).all())
    assert bool(((out.x.var(0) - v).abs() < 5 * v * math.sqrt(2 / n)).all())


# -- errors -----------------------------------------------------------------------------------------------------


def test_bad_arguments_are_named():
    flow = flowdiff.ProbabilityFlow(TanhModel(), Schedule.linear())
    noise = _noise()
    with pytest.raises(ValueError, match=r"eta must lie in \[0, 1\]"):
        flowdiff.generate(flow, noise, steps=5, solver=flowdiff.Stochastic(1.5))
    with pytest.raises(ValueError, match="eta must lie"):
        flowdiff.generate(flow, noise, steps=5, solver=flowdiff.Stochastic(float("nan")))
    with pytest.raises(ValueError, match="unknown eta 'ddpm'"):
        flowdiff.generate(flow, noise, steps=5, solver=flowdiff.Stochastic("ddpm"))
    with pytest.raises(TypeError, match="eta must be a number"):
        flowdiff.generate(flow, noise, steps=5, solver=flowdiff.Stochastic(True))
    with pytest.raises(ValueError, match="generator= or step_noise=, not both"):
        flowdiff.generate(flow, noise, steps=5,
                          solver=flowdiff.Stochastic(0.5, generator=1, step_noise=torch.zeros(5, *SHAPE)))
    with pytest.raises(ValueError, match="one noise per step, 5"):
        flowdiff.generate(flow, noise, steps=5, solver=flowdiff.Stochastic(0.5, step_noise=torch.zeros(4, *SHAPE)))
    with pytest.raises(ValueError, match="step_noise\\[1\\] has shape"):
        flowdiff.generate(flow, noise, steps=2,
                          solver=flowdiff.Stochastic(0.5, step_noise=[torch.zeros(SHAPE), torch.zeros(2)]))
    with pytest.raises(ValueError, match="NaN or inf"):
        flowdiff.generate(flow, noise, steps=2,
                          solver=flowdiff.Stochastic(0.5, step_noise=torch.full((2, *SHAPE), float("nan"))))
    with pytest.raises(TypeError, match="generator must be a torch.Generator or an int seed"):
        flowdiff.generate(flow, noise, steps=5, solver=flowdiff.Stochastic(0.5, generator="seed"))
    with pytest.raises(ValueError, match="takes a fixed grid, not adaptive="):
        flowdiff.generate(flow, noise, solver=flowdiff.Stochastic(0.5), adaptive=flowdiff.Adaptive(rtol=1e-3))
    with pytest.raises(ValueError, match="give one of steps="):
        flowdiff.generate(flow, noise, solver=flowdiff.Stochastic(0.5))


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0, SIGMA_HAT])
def test_encode_refuses_the_stochastic_process(eta):
    """The η process has no inverse; at η = 0 it is the ODE, which encode says as solver='euler'."""
    flow = flowdiff.ProbabilityFlow(TanhModel(), Schedule.linear())
    with pytest.raises(ValueError, match=r"no inverse.*solver='euler'"):
        flowdiff.encode(flow, _noise(), steps=5, solver=flowdiff.Stochastic(eta))
