"""flowdiff.log_likelihood against closed-form densities: exact values, convergence, error bars, NFE, bad input."""

import math

import numpy as np
import pytest
import torch

import flowdiff
import solvers
from flowdiff import Adaptive, Checks, Trace
from flowdiff.models.analytic import Gaussian, Mixture
from flowdiff.tools.likelihood import Likelihood, log_likelihood


def gaussian() -> Gaussian:
    return Gaussian(torch.tensor([0.3, -0.2, 0.1, 0.0]), torch.tensor([0.5, 1.0, 0.05, 0.2]))


def gaussian_prior(g: Gaussian) -> dict:
    return {"data_mean": g.mean, "data_var": g.evals}


def mixture(dim: int = 16, n: int = 12, bandwidth: float = 0.3) -> Mixture:
    centers = torch.randn(n, 1, dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.8
    return Mixture(centers, bandwidth=bandwidth)


def mixture_prior(m: Mixture) -> dict:
    """The moment-matched prior N(mean, (var + σ_max²)I) of the mixture, per pixel."""
    var = m.centers.var(0, unbiased=False) + m.bandwidth**2
    return {"data_mean": m.centers.mean(0).reshape(m.shape), "data_var": var.reshape(m.shape)}


def slope(x, y) -> float:
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


# -- exact densities --------------------------------------------------------------------------------

def test_gaussian_log_prob_is_exact_and_error_shrinks_with_tolerance(device):
    g = gaussian()
    x = g.sample(6, torch.Generator().manual_seed(0))
    exact = g.log_prob(x, 0.0).to(device)
    x = x.to(device)
    tols = [1e-5, 1e-6, 1e-7]
    errors = []
    for tol in tols:
        r = log_likelihood(g.flow(), x, adaptive=Adaptive(rtol=tol, atol=tol), **gaussian_prior(g))
        assert isinstance(r, Likelihood) and r.log_prob.dtype == torch.float64 and r.log_prob.shape == (6,)
        assert r.log_prob.device == r.latent.device == x.device
        errors.append(float((r.log_prob - exact).abs().max()))
    assert errors[-1] < 1e-5, errors
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert 0.6 < slope(tols, errors) < 1.6, errors   # a tolerance buys about itself
    # the latent is the exact ODE solution at σ_max, in DDIM's scale
    s_max = g.schedule.sigma_max
    latent = g.solution(x, 0.0, s_max) / math.sqrt(1 + s_max**2)
    assert latent.device == x.device
    torch.testing.assert_close(r.latent, latent, atol=1e-5, rtol=0)
    torch.testing.assert_close(r.log_prob, r.prior + r.delta)


def test_gaussian_full_covariance_fixed_grid_converges_at_the_solvers_order():
    a = torch.randn(3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g = Gaussian(torch.tensor([0.2, -0.1, 0.4]), a @ a.T * 0.3 + 0.05 * torch.eye(3))
    x = g.sample(4, torch.Generator().manual_seed(2))
    exact = g.log_prob(x, 0.0)
    steps = [16, 32, 64]
    errors = []
    for n in steps:
        r = log_likelihood(g.flow(), x, solver="rk4", steps=n, data_mean=g.mean, data_var=float(g.evals.mean()))
        errors.append(float((r.log_prob - exact).abs().max()))
        # the loop's own count of field evaluations; the D = 3 products each, and the check solve, apart
        assert r.stats.nfe == 4 * n and r.stats.extra["vjps"] == 3 * 4 * n
        assert r.stats.extra["check"].nfe == 4 * (n // 2)
    assert -slope(steps, errors) > 3.3, errors


def test_mixture_exact_divergence_matches_the_kernel_density_at_default_settings():
    m = mixture()
    x = m.sample(6, torch.Generator().manual_seed(4))
    r = log_likelihood(m.flow(), x, **mixture_prior(m))
    err = (r.log_prob - m.log_prob(x, 0.0)).abs()
    assert r.divergence == "exact"   # "auto" at D = 16
    assert float(err.max()) < 0.02, err
    assert r.std_error is None and r.per_probe is None
    # the error bar is the solve's (a check solve at 10× the tolerances), and it covers the error
    torch.testing.assert_close(r.error, r.solve_error)
    assert bool((err <= r.error).all()), (err, r.error)
    # the prior term is exactly the Gaussian's log-density at the latent
    s2 = m.schedule.sigma_max**2
    xbar = r.latent.reshape(6, -1) * math.sqrt(1 + s2)
    p = mixture_prior(m)
    var = p["data_var"].reshape(-1) + s2
    prior = -0.5 * (((xbar - p["data_mean"].reshape(-1)) ** 2 / var).sum(1) + torch.log(2 * math.pi * var).sum())
    torch.testing.assert_close(r.prior, prior, atol=1e-6, rtol=1e-9)


@pytest.mark.parametrize("divergence,options", [("hutchinson", {"probes": 16}),
                                                ("hutchinson", {"probes": 16, "probes_from": "gaussian"}),
                                                ("hutch++", {"probes": 8, "sketch": 4})])
def test_stochastic_estimates_lie_within_three_standard_errors(divergence, options):
    m = mixture()
    x = m.sample(8, torch.Generator().manual_seed(5))
    exact = m.log_prob(x, 0.0)
    r = log_likelihood(m.flow(), x, estimator=Trace(divergence, **options), generator=torch.Generator().manual_seed(6),
                       adaptive=Adaptive(rtol=1e-4, atol=1e-4), **mixture_prior(m))
    assert r.std_error is not None and r.per_probe.shape == (8, options["probes"])
    assert bool((r.std_error > 0).all())
    z = (r.log_prob - exact) / r.std_error
    assert float(z.abs().max()) < 3, z
    assert 0.1 < float(z.pow(2).mean()) < 3, z        # the error bar is neither far too wide nor too narrow
    torch.testing.assert_close(r.std_error, r.per_probe.std(1) / math.sqrt(options["probes"]))


def test_hutch_plus_plus_has_smaller_error_bars_than_hutchinson_at_equal_cost():
    m = mixture(dim=32, n=4, bandwidth=0.2)   # ∂ε/∂x̄ = α(I − low-rank posterior covariance)
    x = m.sample(6, torch.Generator().manual_seed(7))
    kw = dict(adaptive=Adaptive(rtol=1e-4, atol=1e-4), **mixture_prior(m))
    hutch = log_likelihood(m.flow(), x, estimator=Trace("hutchinson", probes=12),
                           generator=torch.Generator().manual_seed(8), **kw)
    hpp = log_likelihood(m.flow(), x, estimator=Trace("hutch++", probes=4, sketch=4),
                         generator=torch.Generator().manual_seed(8), **kw)
    for r in (hpp, hutch):   # 2·4 + 4 = 12 products per field evaluation for both
        assert r.stats.extra["vjps"] == 12 * r.stats.nfe
    assert float(hpp.std_error.mean()) < 0.5 * float(hutch.std_error.mean()), (hpp.std_error, hutch.std_error)
    z = (hpp.log_prob - m.log_prob(x, 0.0)) / hpp.std_error
    assert float(z.abs().max()) < 3, z


def test_one_probe_gives_no_standard_error_and_rademacher_is_exact_on_a_diagonal_jacobian():
    g = gaussian()   # diagonal covariance: ∂ε/∂x̄ is diagonal, and vᵀJv = tr J for v ∈ {±1}^D
    x = g.sample(3, torch.Generator().manual_seed(0))
    exact = log_likelihood(g.flow(), x, **gaussian_prior(g))
    one = log_likelihood(g.flow(), x, estimator=Trace("hutchinson", probes=1),
                         generator=torch.Generator().manual_seed(0), **gaussian_prior(g))
    assert one.std_error is None and one.bits_per_dim_std_error is None
    torch.testing.assert_close(one.error, one.solve_error)
    torch.testing.assert_close(one.log_prob, exact.log_prob, atol=1e-9, rtol=0)


# -- counting, chunking, precision -----------------------------------------------------------------

class CountingEps:
    """A σ-native ε that counts its forward calls."""

    def __init__(self, eps):
        self.eps, self.calls = eps, 0

    def __call__(self, xbar, sigma):
        self.calls += 1
        return self.eps(xbar, sigma)


@pytest.mark.parametrize("divergence,options,cost", [("exact", {}, 16), ("hutchinson", {"probes": 3}, 3),
                                                     ("hutch++", {"probes": 3, "sketch": 2}, 7)])
def test_nfe_counts_every_vector_jacobian_product(divergence, options, cost):
    m = mixture()
    counter = CountingEps(m.eps)
    flow = flowdiff.ProbabilityFlow.from_sigma_field(counter, m.schedule)
    x = m.sample(5, torch.Generator().manual_seed(9))
    # rk4: 4 field evaluations a step; each is one forward pass and `cost` VJPs on the batch
    run = dict(solver="rk4", steps=3)
    seed = {} if divergence == "exact" else {"generator": 1}   # the exact trace draws nothing: no generator
    r = log_likelihood(flow, x, estimator=Trace(divergence, chunk=5, **options), solve_check=False, **seed, **run)
    assert counter.calls == r.stats.extra["model_calls"] == r.stats.nfe == 12
    assert r.stats.extra["vjps"] == cost * 12 and "check" not in r.stats.extra and r.solve_error is None
    # larger chunks: the same numbers and counts
    big = log_likelihood(flow, x, estimator=Trace(divergence, chunk=4096, **options), solve_check=False, **seed, **run)
    assert big.stats.extra["vjps"] == r.stats.extra["vjps"]
    torch.testing.assert_close(big.log_prob, r.log_prob, atol=1e-9, rtol=0)
    # adaptive, with the check solve: each solve's evaluations (first-step estimate included) are its own
    counter.calls = 0
    a = log_likelihood(flow, x, estimator=Trace(divergence, **options), adaptive=Adaptive(rtol=1e-2, atol=1e-2),
                       **seed)
    check, coarse = a.stats.extra["check"], a.stats.extra["check_coarse"]
    for st in (a.stats, check, coarse):
        assert st.extra["vjps"] == cost * st.nfe and st.extra["model_calls"] == st.nfe
    assert counter.calls == a.stats.nfe + check.nfe + coarse.nfe


def test_batch_larger_than_chunk_is_split_with_the_same_result():
    m = mixture()
    x = m.sample(7, torch.Generator().manual_seed(10))
    run = dict(solver="rk4", steps=4)
    a = log_likelihood(m.flow(), x, estimator=Trace("hutchinson", probes=2), generator=torch.Generator().manual_seed(0),
                       **run)
    b = log_likelihood(m.flow(), x, estimator=Trace("hutchinson", probes=2, chunk=3),
                       generator=torch.Generator().manual_seed(0), **run)
    torch.testing.assert_close(a.log_prob, b.log_prob, atol=1e-9, rtol=0)
    # 7 samples in pieces of 3, 3 and 1: three forward passes per field evaluation
    assert a.stats.extra["vjps"] == b.stats.extra["vjps"] == 2 * 16 and b.stats.extra["model_calls"] == 3 * 16


def test_float32_agrees_with_float64_and_a_network_runs_through_jvp():
    m = mixture()
    x = m.sample(4, torch.Generator().manual_seed(11))
    r64 = log_likelihood(m.flow(), x, adaptive=Adaptive(rtol=1e-4, atol=1e-4))
    r32 = log_likelihood(m.flow(), x.float(), adaptive=Adaptive(rtol=1e-4, atol=1e-4))
    assert r32.log_prob.dtype == torch.float64 and r32.latent.dtype == torch.float32
    torch.testing.assert_close(r32.log_prob, r64.log_prob, atol=0.05, rtol=0)

    from flowdiff.models.nets import DigitsNet

    torch.manual_seed(0)
    net = DigitsNet(channels=(8, 16)).eval()
    for p in net.parameters():   # a random network: make the field non-trivial
        torch.nn.init.normal_(p, std=0.05)
    flow = flowdiff.ProbabilityFlow(net, flowdiff.Schedule.linear())
    images = flowdiff.digits_data("test").images[:3]
    exact32 = log_likelihood(flow, images, solver="heun", steps=6)
    net64 = flowdiff.ProbabilityFlow(DigitsNet(channels=(8, 16)).eval(), flowdiff.Schedule.linear())
    net64.model.load_state_dict(net.state_dict())
    net64.model.double()
    exact64 = log_likelihood(net64, images.double(), solver="heun", steps=6)
    torch.testing.assert_close(exact32.log_prob, exact64.log_prob, atol=0.05, rtol=1e-5)
    hutch = log_likelihood(net64, images.double(), solver="heun", steps=6, estimator=Trace("hutchinson", probes=32),
                           generator=torch.Generator().manual_seed(0))
    assert float(((hutch.log_prob - exact64.log_prob) / hutch.std_error).abs().max()) < 4


def test_bits_per_dim_and_dequantization_offset():
    m = mixture(dim=16)
    levels = 17
    k = torch.randint(0, levels, (3, 1, 16), generator=torch.Generator().manual_seed(0))
    images = (k.double() / (levels - 1)) * 2 - 1
    r = log_likelihood(m.flow(), images, adaptive=Adaptive(rtol=1e-3, atol=1e-3), dequantize=levels,
                       generator=torch.Generator().manual_seed(1))
    assert r.offset_bits == pytest.approx(math.log2(8))
    torch.testing.assert_close(r.bits_per_dim, -r.log_prob / (16 * math.log(2)) + 3.0)
    plain = log_likelihood(m.flow(), images, adaptive=Adaptive(rtol=1e-3, atol=1e-3))
    assert plain.offset_bits == 0.0
    torch.testing.assert_close(plain.bits_per_dim, -plain.log_prob / (16 * math.log(2)))
    # the dequantized images are the lattice points moved by Δ(u − ½) drawn from the generator
    u = torch.rand(images.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    moved = log_likelihood(m.flow(), images + (2 / (levels - 1)) * (u - 0.5), adaptive=Adaptive(rtol=1e-3, atol=1e-3))
    torch.testing.assert_close(moved.log_prob, r.log_prob)
    mean, err = r.mean_bits_per_dim()
    assert mean == pytest.approx(float(r.bits_per_dim.mean())) and err > 0
    assert math.log2(127.5) == pytest.approx(6.994, abs=1e-3)


def test_max_nfe_stops_the_solve_with_partial_statistics():
    m = mixture()
    x = m.sample(2, torch.Generator().manual_seed(0))
    with pytest.raises(solvers.SolveError, match="max_nfe") as info:
        # max_nfe counts field evaluations, as the solver counts them
        log_likelihood(m.flow(), x, adaptive=Adaptive(rtol=1e-5, atol=1e-5, max_nfe=20))
    assert 0 < info.value.stats.nfe <= 20 + 7
    assert info.value.stats.extra["vjps"] == 16 * info.value.stats.nfe


# -- bad input ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,exc,match", [
    ({"estimator": "hutchinson"}, TypeError, "estimator must be a flowdiff.Trace or None, got str"),
    ({"dequantization": "truncated_normal"}, ValueError, "dequantization='truncated_normal'.*give dequantize=K"),
    ({"dequantize": 256, "dequantization": "gamma"}, ValueError, "dequantization 'gamma'.*uniform, truncated_normal"),
    ({"solve_check": 1}, TypeError, "solve_check must be a bool, got int"),
    ({"estimator": Trace(probes=4)}, ValueError, "Trace.probes and Trace.sketch apply to the stochastic.*'auto'"),
    ({"estimator": Trace("hutch++", sketch=99)}, ValueError, "Trace.sketch must be <= the dimension D=16"),
    ({"adaptive": Adaptive(rtol=1e-3, atol=0.0)}, ValueError, "Adaptive.atol must be > 0 here: it is also the "),
    ({"adaptive": Adaptive(first_step=0.1, sigma_end=0.5)}, ValueError, "first_step=0.1, sigma_end=0.5"),
    ({"adaptive": {"rtol": 1e-3}}, TypeError, "adaptive must be a flowdiff.Adaptive or None, got dict"),
    ({"steps": 10, "solver": "rk4", "adaptive": Adaptive()}, ValueError, "adaptive=Adaptive.*steps=10.*give one"),
    ({"checks": Checks(growth=10.0)}, ValueError, "Checks\\(growth=10.0\\).*Checks\\(finite=...\\) only"),
    ({"checks": Checks(model=False)}, ValueError, "Checks\\(model=False\\)"),
    ({"checks": True}, TypeError, "checks must be a flowdiff.Checks or None, got bool"),
    ({"steps": 0, "solver": "rk4"}, ValueError, "steps must be an int >= 1, got 0"),
    ({"solver": "rk4"}, ValueError, "'rk4' has no error estimate: give steps=N"),
    ({"solver": "dpmpp_2m", "steps": 10}, ValueError, "'dpmpp_2m' runs in the flow's 'data' variables"),
    ({"solver": "nope"}, ValueError, "nope"),
    ({"dequantize": 1}, ValueError, "dequantize must be None or the number of quantization levels"),
    ({"dequantize": 256}, ValueError, "not on the 256-level lattice"),
    ({"data_var": -1.0}, ValueError, "data_var must be finite and >= 0"),
    ({"data_mean": torch.zeros(5)}, ValueError, "data_mean must be a number or a tensor broadcastable"),
    ({"generator": "3"}, TypeError, "generator must be a CPU torch.Generator, an int seed or None"),
    ({"adaptive": Adaptive(sigma_c=1e9)}, ValueError, "Adaptive.sigma_c must be a number in"),
])
def test_bad_arguments_name_themselves(kwargs, exc, match):
    m = mixture()
    x = m.sample(2, torch.Generator().manual_seed(0))
    with pytest.raises(exc, match=match):
        log_likelihood(m.flow(), x, **kwargs)


def test_bad_images_and_models_are_reported():
    m = mixture()
    x = m.sample(3, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"images must have shape \(batch, ...\).*got \(16,\)"):
        log_likelihood(m.flow(), x[0, 0])
    bad = x.clone()
    bad[1, 0, 3] = float("nan")
    with pytest.raises(ValueError, match=r"images must be finite; sample\(s\) \[1\]"):
        log_likelihood(m.flow(), bad)
    with pytest.raises(TypeError, match="images must be a torch.Tensor"):
        log_likelihood(m.flow(), x.numpy())
    with pytest.raises(TypeError, match="images must be a floating-point tensor"):
        log_likelihood(m.flow(), x.long())
    with pytest.raises(TypeError, match="flow must be a flowdiff.ProbabilityFlow"):
        log_likelihood(m.eps, x)
    with pytest.raises(ValueError, match="xbar must have shape"):   # images of the wrong size for the model
        log_likelihood(m.flow(), torch.zeros(2, 1, 9, dtype=torch.float64))

    def nan_after(xbar, sigma):
        return m.eps(xbar, sigma) * (float("nan") if sigma > 1.0 else 1.0)

    with pytest.raises(solvers.SolveError, match=r"step \d+ \(log\(σ\+c\)"):
        log_likelihood(flowdiff.ProbabilityFlow.from_sigma_field(nan_after, m.schedule), x)


# -- the error bar, the default estimator, dequantization ---------------------------------------------

def test_error_bar_covers_the_exact_value_at_about_its_stated_rate():
    """Over 8 seeds × 6 points, log_prob at the default tolerances with 16 Hutchinson probes lies within 2 error
    bars (probes' standard error and the check solve's difference together) about 95% of the time (t with 15
    degrees of freedom: 94%), and the bar is not so wide that it always holds within one."""
    m = mixture(dim=32, n=6, bandwidth=0.2)
    z = []
    for seed in range(8):
        x = m.sample(6, torch.Generator().manual_seed(100 + seed))
        r = log_likelihood(m.flow(), x, estimator=Trace("hutchinson", probes=16),
                           generator=torch.Generator().manual_seed(seed), **mixture_prior(m))
        torch.testing.assert_close(r.error, (r.std_error**2 + r.solve_error**2).sqrt())
        z.append((r.log_prob - m.log_prob(x, 0.0)) / r.error)
    z = torch.cat(z).abs()
    within2, within1 = float((z <= 2).double().mean()), float((z <= 1).double().mean())
    assert 0.85 <= within2 and within1 < 0.9, (within1, within2, z)


def test_auto_takes_hutch_plus_plus_beyond_256_dimensions_at_a_cost_that_does_not_grow():
    m = mixture(dim=300, n=4, bandwidth=0.3)
    x = m.sample(3, torch.Generator().manual_seed(1))
    r = log_likelihood(m.flow(), x, generator=torch.Generator().manual_seed(0), **mixture_prior(m))
    assert r.divergence == "hutch++" and r.per_probe.shape == (3, 16)
    assert r.stats.extra["vjps"] == (2 * 32 + 16) * r.stats.nfe   # not D = 300 per evaluation
    err = (r.log_prob - m.log_prob(x, 0.0)).abs()
    assert bool((err <= 3 * r.error).all()) and float(err.max()) < 0.1, (err, r.error)


@pytest.mark.parametrize("dequantization", ["uniform", "truncated_normal"])
def test_dequantized_bits_per_dim_bound_the_discrete_datas_on_integer_images(dequantization):
    """A diagonal Gaussian quantized to 17 levels: the discrete probability of each lattice point is a product of
    normal-CDF differences. The dequantized bits/dim, averaged over the dequantization noise, is an upper bound on
    the discrete data's (by Jensen); with uniform noise close to it (the density is nearly flat across a cell),
    with the truncated normal of σ_min = 0.01 (0.08 lattice spacings) looser."""
    from scipy.stats import norm, truncnorm

    g = gaussian()
    levels, reps = 17, 48
    delta = 2 / (levels - 1)
    k = torch.tensor([[9, 7, 8, 8], [10, 6, 8, 7]])
    images = (k.double() * delta - 1).repeat_interleave(reps, 0)
    r = log_likelihood(g.flow(), images, dequantize=levels, dequantization=dequantization,
                       generator=torch.Generator().manual_seed(0), **gaussian_prior(g))
    assert r.dequantization == dequantization and r.offset_bits == pytest.approx(-math.log2(delta))
    torch.testing.assert_close(r.bits_per_dim, -(r.log_prob - r.log_q) / (4 * math.log(2)) + r.offset_bits)
    # the noise and its log-density, against scipy's truncated normal (or uniform: log q = 0)
    u = torch.rand(images.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    if dequantization == "uniform":
        centred = u - 0.5
        assert bool((r.log_q == 0).all())
    else:
        s = g.schedule.sigma_min / delta
        centred = torch.tensor(truncnorm.ppf(u.numpy(), -0.5 / s, 0.5 / s, scale=s))
        log_q = torch.tensor(truncnorm.logpdf(centred.numpy(), -0.5 / s, 0.5 / s, scale=s)).sum(1)
        torch.testing.assert_close(r.log_q, log_q, atol=1e-6, rtol=0)
    moved = log_likelihood(g.flow(), images + delta * centred, **gaussian_prior(g))
    torch.testing.assert_close(moved.log_prob, r.log_prob, atol=1e-6, rtol=0)
    # the bound, image by image
    sd = g.evals.sqrt()
    for i in range(2):
        y = images[i * reps]
        cell = norm.cdf(((y + delta / 2 - g.mean) / sd).numpy()) - norm.cdf(((y - delta / 2 - g.mean) / sd).numpy())
        discrete = float(-torch.tensor(cell).log2().sum() / 4)
        est = r.bits_per_dim[i * reps:(i + 1) * reps]
        mean, se = float(est.mean()), float(est.std() / math.sqrt(reps))
        assert discrete - 3 * se <= mean, (dequantization, mean, se, discrete)
        if dequantization == "uniform":
            assert mean <= discrete + 0.05, (mean, discrete)
