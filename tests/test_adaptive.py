"""Adaptive solves in the image's scale, on the Gaussian model whose flow is known exactly."""

import math

import numpy as np
import pytest
import torch

import flowdiff
import solvers
from flowdiff.models.analytic import Gaussian
from solvers import FixedGrid, SolveError, integrate

TOLS = [1e-2, 1e-3, 1e-4, 1e-5]
#: The stated factor: the RMS error of the image is within [tol/LOW, HIGH·tol] over a tolerance
#: range. High-order pairs are tested where their step cap (1 in log(σ + c)) does not bind: at
#: looser tolerances they are more accurate than asked.
HIGH = {"unipc": 4.0, "abm": 5.0, "dopri5": 3.0, "dopri8": 3.0, "adaptive_heun": 3.0, "bosh3": 20.0}
METHOD_TOLS = {"dopri5": [1e-4, 1e-5, 1e-6, 1e-7], "dopri8": [1e-5, 1e-6, 1e-7, 1e-8]}
LOW = 100.0


def _setup():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(32, dtype=torch.float64, generator=g) * 0.5
    var = torch.rand(32, dtype=torch.float64, generator=g) * 0.3 + 0.02
    gauss = Gaussian(mean, var)
    noise = torch.randn(4, 32, dtype=torch.float64, generator=g)
    images = gauss.sample(4, generator=g)
    return gauss, noise, images


def _rms(a, b):
    return float((a - b).pow(2).mean().sqrt())


def _adaptive_names():
    names = []
    for name in solvers.available(adaptive=True):
        marks = []
        if name == "fehlberg2":  # its embedded estimate is ~500× below its actual error here
            marks = [pytest.mark.xfail(strict=True, reason="Fehlberg 1(2)'s estimate underestimates its error")]
        elif name not in HIGH:
            marks = [pytest.mark.skip(reason=f"no stated factor for {name!r} (added after this test)")]
        names.append(pytest.param(name, marks=marks))
    return names


@pytest.mark.parametrize("name", _adaptive_names())
def test_generate_error_tracks_tolerance(name):
    gauss, noise, _ = _setup()
    flow = gauss.flow()
    s_max = flow.schedule.sigma_max
    exact = gauss.solution(noise * math.sqrt(1 + s_max**2), s_max, 0.0)
    errs = []
    tols = METHOD_TOLS.get(name, TOLS)
    for tol in tols:
        r = flowdiff.generate(flow, noise, solver=name, adaptive=flowdiff.Adaptive(rtol=tol, atol=tol))
        errs.append(_rms(r.x, exact))
    high = HIGH.get(name, 20.0)
    for tol, err in zip(tols, errs):
        assert tol / LOW < err < high * tol, (name, tol, err)
    slope = np.polyfit(np.log(tols), np.log(errs), 1)[0]
    assert slope > 0.5, (name, slope, errs)


@pytest.mark.parametrize("name", ["unipc", "dopri5", "abm"])
def test_encode_error_tracks_tolerance_in_the_image_it_decodes_to(name):
    gauss, _, images = _setup()
    flow = gauss.flow()
    s_max = flow.schedule.sigma_max
    exact_latent = gauss.solution(images, 0.0, s_max) / math.sqrt(1 + s_max**2)
    errs = []
    tols = METHOD_TOLS.get(name, TOLS)
    for tol in tols:
        r = flowdiff.encode(flow, images, solver=name, adaptive=flowdiff.Adaptive(rtol=tol, atol=tol))
        decoded = gauss.solution(r.x * math.sqrt(1 + s_max**2), s_max, 0.0)  # the exact decode
        err = _rms(decoded, images)
        errs.append(err)
        assert tol / LOW < err < 6.0 * tol, (name, tol, err)
        # The latent itself: within the conditioning factor 1/std of the narrowest direction.
        amplification = float(1 / gauss.evals.min().sqrt())
        assert _rms(r.x, exact_latent) < 6.0 * amplification * tol
        assert r.latent is not None and r.sigmas[0] == 0.0 and r.sigmas[-1] == s_max
    assert np.polyfit(np.log(tols), np.log(errs), 1)[0] > 0.5


@pytest.mark.parametrize("name", ["unipc", "dopri5", "bosh3"])
@pytest.mark.parametrize("direction", ["generate", "encode"])
def test_stats_add_up_and_count_every_evaluation(name, direction):
    gauss, noise, images = _setup()
    calls = []

    def eps(xbar, sigma):
        calls.append(sigma)
        return gauss.eps(xbar, sigma)

    flow = flowdiff.ProbabilityFlow.from_sigma_field(eps, gauss.schedule)
    run = flowdiff.generate if direction == "generate" else flowdiff.encode
    r = run(flow, noise if direction == "generate" else images, solver=name,
            adaptive=flowdiff.Adaptive(rtol=1e-4, atol=1e-4))
    assert r.stats.nfe == len(calls)
    assert r.stats.steps == r.stats.accepted + r.stats.rejected
    assert r.stats.accepted == len(r.sigmas) - 1
    assert r.stats.wall_time > 0
    grid = r.sigmas if direction == "encode" else r.sigmas[::-1]
    assert np.all(np.diff(grid) > 0) and grid[0] == 0.0


@pytest.mark.parametrize("name", ["unipc", "dopri5"])
def test_max_nfe_guard_fails_with_its_message_and_partial_stats(name):
    gauss, noise, _ = _setup()
    with pytest.raises(SolveError, match="max_nfe=12 reached") as info:
        flowdiff.generate(gauss.flow(), noise, solver=name,
                          adaptive=flowdiff.Adaptive(rtol=1e-8, atol=1e-8, max_nfe=12))
    stats = info.value.stats
    assert isinstance(stats, solvers.Stats)
    assert 0 < stats.nfe and stats.steps == stats.accepted + stats.rejected and stats.accepted > 0
    # A hard bound: the step whose evaluations would pass it is not taken.
    assert stats.nfe <= 12


def test_callback_sees_step_sigma_x_and_denoised():
    gauss, noise, _ = _setup()
    seen = []
    r = flowdiff.generate(gauss.flow(), noise, solver="unipc", adaptive=flowdiff.Adaptive(rtol=1e-3, atol=1e-3),
                          callback=seen.append)
    assert all(isinstance(s, flowdiff.StepState) for s in seen)
    assert [s.step for s in seen] == list(range(len(seen))) and len(seen) == r.stats.accepted
    sigmas = [s.sigma for s in seen]
    assert all(a > b for a, b in zip(sigmas, sigmas[1:])) and sigmas[-1] == 0.0
    for s in seen:
        assert torch.allclose(s.x, s.xbar / math.sqrt(1 + s.sigma**2))
    # unipc evaluates the model at the end of each step: the denoised image comes free.
    assert all(s.denoised is not None for s in seen)
    middle = seen[len(seen) // 2]
    assert _rms(middle.denoised, gauss.denoised(middle.xbar, middle.sigma)) < 1e-2
    assert torch.equal(seen[-1].xbar, r.x)
    # dopri5 is FSAL: f(t₁, y₁) is known after every step, and gives the denoised image.
    seen.clear()
    flowdiff.generate(gauss.flow(), noise, solver="dopri5", adaptive=flowdiff.Adaptive(rtol=1e-3, atol=1e-3),
                      callback=seen.append)
    s = seen[len(seen) // 2]
    assert torch.allclose(s.denoised, gauss.denoised(s.xbar, s.sigma), rtol=1e-10, atol=1e-12)


def test_adaptive_options_reach_the_controller():
    gauss, noise, _ = _setup()
    flow = gauss.flow()
    free = flowdiff.generate(flow, noise, solver="dopri5", adaptive=flowdiff.Adaptive(rtol=1e-3, atol=1e-3))
    capped = flowdiff.generate(flow, noise, solver="dopri5",
                               adaptive=flowdiff.Adaptive(rtol=1e-3, atol=1e-3,
                                                          controller=solvers.StepController(max_step=0.25)))
    # log(σ_max + c) − log(c) ≈ 9.7 in steps of at most 0.25: at least 39 steps.
    assert capped.stats.accepted >= 39 > free.stats.accepted
    with pytest.raises(TypeError, match="unexpected keyword argument 'safety'"):
        flowdiff.generate(flow, noise, solver="dopri5", adaptive=flowdiff.Adaptive(rtol=1e-3, safety=0.5))
    with pytest.raises(TypeError, match="StepController"):
        flowdiff.generate(flow, noise, solver="dopri5", adaptive=flowdiff.Adaptive(rtol=1e-3, controller=0.5))
    with pytest.raises(ValueError, match="steps=4 beside adaptive="):
        flowdiff.generate(flow, noise, solver="dopri5", steps=4, adaptive=flowdiff.Adaptive(sigma_c=0.1))


def test_adaptive_tolerance_on_a_fixed_step_solver_is_an_error_naming_it():
    gauss, noise, _ = _setup()
    for name in ("euler", "lms", "dpmpp_2m"):
        with pytest.raises(ValueError, match=f"{name!r} has no error estimate.*Adaptive solvers: .*unipc"):
            flowdiff.generate(gauss.flow(), noise, solver=name, adaptive=flowdiff.Adaptive(rtol=1e-3))


def test_bad_tolerances_and_intervals_are_rejected():
    gauss, noise, _ = _setup()
    flow = gauss.flow()
    with pytest.raises(ValueError, match="rtol must be a finite number"):
        flowdiff.generate(flow, noise, solver="unipc", adaptive=flowdiff.Adaptive(rtol=-1.0))
    with pytest.raises(ValueError, match="cannot both be 0"):
        flowdiff.generate(flow, noise, solver="unipc", adaptive=flowdiff.Adaptive(rtol=0.0, atol=0.0))
    with pytest.raises(ValueError, match="sigma_start must lie in"):
        flowdiff.generate(flow, noise, solver="unipc", adaptive=flowdiff.Adaptive(rtol=1e-3, sigma_start=-1.0))
    with pytest.raises(ValueError, match="sigma_end must lie in"):
        flowdiff.generate(flow, noise, solver="unipc", adaptive=flowdiff.Adaptive(rtol=1e-3, sigma_end=0.0))


def test_sigma_start_and_float32():
    gauss, noise, _ = _setup()
    flow = gauss.flow()
    exact = gauss.solution(noise * math.sqrt(1 + 10.0**2), 10.0, 0.0)
    r = flowdiff.generate(flow, noise, solver="unipc",
                          adaptive=flowdiff.Adaptive(rtol=1e-4, atol=1e-4, sigma_start=10.0))
    assert _rms(r.x, exact) < 4e-4 and r.sigmas[0] == 10.0 and r.sigmas[-1] == 0.0
    r32 = flowdiff.generate(flow, noise.float(), solver="dopri5", adaptive=flowdiff.Adaptive(rtol=1e-3, atol=1e-3))
    assert r32.x.dtype == torch.float32
    s_max = flow.schedule.sigma_max
    assert _rms(r32.x.double(), gauss.solution(noise * math.sqrt(1 + s_max**2), s_max, 0.0)) < 3e-3


def test_limit_in_sigma_squared_is_exact_for_polynomials_in_sigma_squared():
    """Through two denoised values the limit is exact for a + b·σ², through three for a + b·σ² + c·σ⁴."""
    from flowdiff.api.adaptive import limit_in_sigma_squared

    g = torch.Generator().manual_seed(3)
    a, b, c = (torch.randn(2, 5, dtype=torch.float64, generator=g) for _ in range(3))
    rhos = [4.0, 2.5, 1.1]

    def pairs(f):
        return [(rho, f(1.0 / rho**2)) for rho in rhos]

    assert torch.allclose(limit_in_sigma_squared(pairs(lambda s2: a + b * s2)[:2]), a, atol=1e-12)
    assert torch.allclose(limit_in_sigma_squared(pairs(lambda s2: a + b * s2 + c * s2**2)), a, atol=1e-12)
    assert not torch.allclose(limit_in_sigma_squared(pairs(lambda s2: a + b * s2 + c * s2**2)[:2]), a, atol=1e-6)


def test_limit_is_known_asks_for_three_values_below_the_gate_that_agree():
    from flowdiff.api.adaptive import limit_is_known
    from solvers import History

    a, b = torch.zeros(2, 4, dtype=torch.float64), torch.ones(2, 4, dtype=torch.float64)
    rhos = [200.0, 100.0, 50.0]
    smooth = History.of(rhos[0], a + b / rhos[0] ** 2, tuple((r, a + b / r**2) for r in rhos[1:]))
    stop = limit_is_known(1e-3, 1e-3, rho_from=100.0)
    assert stop(rhos[0], None, smooth)
    assert not limit_is_known(1e-3, 1e-3, rho_from=300.0)(rhos[0], None, smooth)  # above the gate's σ
    assert not stop(rhos[0], None, History.of(rhos[0], smooth.k, smooth.past[:1]))  # two values only
    bent = History.of(rhos[0], a + b / rhos[0] ** 2 + 1e7 * b / rhos[0] ** 4,
                      tuple((r, a + b / r**2 + 1e7 * b / r**4) for r in rhos[1:]))
    assert not stop(rhos[0], None, bent)  # the σ⁴ term moves the two-point limit by more than the tolerance


def test_the_limit_step_needs_three_denoised_values_ending_where_it_starts():
    from flowdiff.api.adaptive import LimitFromHistory
    from solvers import History

    k = torch.zeros(1, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="needs the last three denoised values, newest at ρ = 50.0"):
        LimitFromHistory().step(None, 50.0, math.inf, k, History.of(50.0, k, ((25.0, k),)))
    with pytest.raises(ValueError, match=r"the state holds \[40.0, 25.0, 10.0\]"):
        LimitFromHistory().step(None, 50.0, math.inf, k, History.of(40.0, k, ((25.0, k), (10.0, k))))


@pytest.mark.parametrize("tol", [1e-3, 1e-5])
def test_generate_finishes_below_sigma_min_within_its_tolerance(tol):
    """A data-variables generate ends its steps between the schedule's smallest σ and sigma_end once the
    limit is known, and its image stays within the tolerance's stated factor of the exact flow."""
    gauss, noise, _ = _setup()
    flow = gauss.flow()
    s_max, s_min = flow.schedule.sigma_max, flow.schedule.sigma_min
    exact = gauss.solution(noise * math.sqrt(1 + s_max**2), s_max, 0.0)
    r = flowdiff.generate(flow, noise, solver="unipc", adaptive=flowdiff.Adaptive(rtol=tol, atol=tol))
    assert r.sigmas[-1] == 0.0 and s_min / 10 < r.sigmas[-2] <= s_min
    assert tol / LOW < _rms(r.x, exact) < HIGH["unipc"] * tol
    late = flowdiff.generate(flow, noise, solver="unipc", adaptive=flowdiff.Adaptive(rtol=tol, atol=tol,
                                                                                   sigma_end=s_min))
    assert late.sigmas[-2] == pytest.approx(s_min)  # a sigma_end at the gate: nothing left to save


def _linear_in_signal_scale(t, y):
    """dy/dt = 1 + 3·u(t) with u = t/√(1+t²): the derivative is linear in the tail's variable."""
    return torch.full_like(y, 1.0) + 3.0 * t / math.sqrt(1.0 + t * t)


def _exact(t0, t1, y0):
    return y0 + (t1 - t0) + 3.0 * (math.sqrt(1.0 + t1 * t1) - math.sqrt(1.0 + t0 * t0))


def test_adams_weights_in_a_warp_are_exact_for_polynomials_in_it():
    from flowdiff.api.adaptive import signal_scale
    from solvers import adams_weights

    nodes, t0, t1 = [2.0, 1.5, 1.1], 2.0, 5.0
    u = signal_scale(np.asarray(nodes))
    ts = np.linspace(t0, t1, 200001)
    for coeffs in ([1.0, 0.0, 0.0], [0.5, -2.0, 0.0], [0.3, 1.0, -4.0]):  # degree ≤ 2 in u through 3 nodes
        def f(t, c=coeffs):
            v = signal_scale(np.asarray(t, dtype=np.float64))
            return c[0] + c[1] * v + c[2] * v * v

        exact = np.trapezoid(f(ts), ts)
        got = np.dot(adams_weights(nodes, t0, t1, warp=signal_scale), f(np.asarray(nodes)))
        assert got == pytest.approx(exact, rel=1e-9, abs=1e-9)
    log_weights = adams_weights(nodes, t0, t1, log_time=True)  # a polynomial in log t does not fit it
    assert abs(np.dot(log_weights, u * u) - np.trapezoid(signal_scale(ts) ** 2, ts)) > 1e-6


@pytest.mark.parametrize("t_from, exact", [(1.0, True), (10.0, False)])
def test_warped_unipc_is_exact_where_its_warp_applies(t_from, exact):
    """unipc warped to u = t/√(1+t²) integrates a derivative linear in u exactly, on any grid, on the steps
    at t ≥ t_from; below t_from it is the log-time method, which does not."""
    from flowdiff.api.adaptive import signal_scale
    from solvers import FixedGrid, integrate

    y0 = torch.zeros(2, dtype=torch.float64)
    grid = [2.0, 2.7, 4.0, 7.5, 12.0, 30.0]
    warped = solvers.get("unipc", order=3).warped(signal_scale, t_from)
    err = abs(float(integrate(_linear_in_signal_scale, y0, warped, FixedGrid(grid)).y[0]) - _exact(2.0, 30.0, 0.0))
    plain = integrate(_linear_in_signal_scale, y0, solvers.get("unipc", order=3), FixedGrid(grid))
    plain_err = abs(float(plain.y[0]) - _exact(2.0, 30.0, 0.0))
    assert plain_err > 1e-6
    assert (err < 1e-10) if exact else (err > 1e-8)


def test_warped_refuses_bad_arguments_and_corrected_adams_refuses_a_warped_base():
    from flowdiff.api.adaptive import signal_scale
    from solvers import CorrectedAdams

    unipc = solvers.get("unipc", order=3)
    with pytest.raises(TypeError, match="warp must be a function of t, got float"):
        unipc.warped(1.0, 1.0)
    with pytest.raises(ValueError, match="t_from must be a finite number > 0, got -1.0"):
        unipc.warped(signal_scale, -1.0)
    with pytest.raises(ValueError, match="base 'unipc' is warped"):
        CorrectedAdams(unipc.warped(signal_scale, 1.0), {(1.0, 2.0): [0.5]})
    assert unipc.warp is None  # warped() returns a copy


def test_corrector_share_weights_only_the_tail():
    from flowdiff.api.adaptive import corrector_share

    share = corrector_share(rho_from=1.0)
    assert share(0.5, 0.9) == 1.0  # σ > 1: the estimate as it is
    assert share(2.0, 8.0) == pytest.approx(math.sqrt(0.75))
    assert 0 < share(50.0, 50.5) < share(50.0, 60.0) < 1.0
    with pytest.raises(ValueError, match=r"run to larger ρ = 1/σ; got the step rho0=4.0 -> rho1=2.0"):
        share(4.0, 2.0)  # an encode's step (ρ falling) in the tail: refused, not a math domain error
    with pytest.raises(ValueError, match=r"rho0=4.0 -> rho1=4.0"):
        share(4.0, 4.0)
    assert share(0.5, 0.25) == 1.0  # above the tail the direction is not the weight's business


def test_adaptive_generate_keeps_a_callers_own_warp():
    """A unipc the caller warped (Adams.warped) is solved with that warp, not silently re-warped to the tail's."""
    from flowdiff.api.adaptive import signal_scale

    gauss, noise, _ = _setup()
    asked = []

    def warp(rho):
        asked.append(float(np.min(rho)))
        return signal_scale(rho)

    adaptive = flowdiff.Adaptive(rtol=1e-3, atol=1e-3)
    own = flowdiff.generate(gauss.flow(), noise, solver=solvers.get("unipc").warped(warp, 1.0), adaptive=adaptive)
    assert asked and min(asked) >= 1.0  # asked only on the steps at ρ ≥ t_from
    default = flowdiff.generate(gauss.flow(), noise, solver="unipc", adaptive=adaptive)
    assert torch.equal(own.x, default.x)  # the same warp and t_from as the tail's: the same solve


def test_dpmpp_2m_refuses_a_warp_it_would_ignore():
    """dpmpp_2m's step is the midpoint formula, not Adams weights: a warp would leave it unchanged."""
    from flowdiff.api.adaptive import signal_scale

    with pytest.raises(TypeError, match="solver 'dpmpp_2m' takes DPM-Solver\\+\\+\\(2M\\)'s midpoint step"):
        solvers.DPMSolverPP2M().warped(signal_scale, 1.0)
    y0 = torch.zeros(2, dtype=torch.float64)
    grid = FixedGrid([2.0, 2.7, 4.0, 7.5])
    adams = solvers.Adams("dpmpp_2m", 2, log_time=True)  # the Adams form it names takes the warp
    assert not torch.equal(integrate(_linear_in_signal_scale, y0, adams.warped(signal_scale, 1.0), grid).y,
                           integrate(_linear_in_signal_scale, y0, adams, grid).y)
