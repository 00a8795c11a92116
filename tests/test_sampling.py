"""generate / encode / decode on closed-form models: orders, NFE, round trips, dtypes, bad input."""

import math

import numpy as np
import pytest
import torch

import flowdiff
import solvers
from flowdiff.engine.formulations import encode_refusal, grid_order, variables_of
from flowdiff.models.analytic import Gaussian, Mixture
from solvers import SolveError

FIXED_STEP = solvers.available()


def _gaussian():
    return Gaussian(torch.linspace(-0.5, 0.5, 4), 0.3**2)


def _counting(flow):
    """A t-convention model around a flow's exact field that counts its calls."""
    calls = []
    schedule = flow.schedule

    def model(x, t, **kw):
        calls.append(float(t[0]))
        s = float(schedule.sigma_at(float(t[0])))
        return flow.sigma_field(x * math.sqrt(1 + s * s), s)

    return flowdiff.ProbabilityFlow(model, schedule), calls


@pytest.mark.parametrize("name", FIXED_STEP)
def test_convergence_order_on_the_gaussian(name):
    """Global error at σ = 0 against the closed-form trajectory: the slope of log error against log
    step count is at least the solver's order. (The exact order of each method is fitted on a
    generic nonlinear ODE in tests/test_solvers.py; on this linear ODE some methods superconverge.)"""
    g = Gaussian(torch.linspace(-0.5, 0.5, 4), torch.tensor([0.5, 1.0, 2.0, 4.0]))
    flow = g.flow()
    noise = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    solver = solvers.get(name)
    if variables_of(solver) == "data":
        pytest.skip("log-time methods need grids refined in log σ near 0; see tests/test_lownfe.py")
    order = grid_order(solver)  # multistep start-up
    steps = {1: [8, 16, 32, 64], 2: [8, 16, 32, 64], 3: [8, 16, 32, 64], 4: [4, 8, 16, 32]}.get(order,
                                                                                              [4, 8, 16, 32])
    errs = []
    for n in steps:
        sig = np.linspace(4.0, 0.0, n + 1)
        # the whole method into σ = 0 where it would end with Euler (elsewhere final_euler=False is refused)
        final_euler = False if solver.evaluates_end else None
        res = flowdiff.generate(flow, noise, solver=name, grid=flowdiff.Grid(sigmas=sig, final_euler=final_euler))
        exact = g.solution(noise * math.sqrt(1 + sig[0] ** 2), sig[0], 0.0)
        errs.append(float((res.x - exact).abs().max()))
    slope = -np.polyfit(np.log(steps[1:]), np.log(errs[1:]), 1)[0]
    assert slope > order - 0.3, (name, slope, errs)


@pytest.mark.parametrize("name", solvers.available())
def test_stats_nfe_equals_model_calls(name):
    flow, calls = _counting(_gaussian().flow())
    noise = torch.randn(2, 4, dtype=torch.float64)
    for kwargs in (dict(steps=5), dict(nfe=15)):
        calls.clear()
        res = flowdiff.generate(flow, noise, solver=name, grid="logsnr", **kwargs)
        assert res.stats.nfe == len(calls)
        if "nfe" in kwargs:
            assert res.stats.nfe <= 15
    calls.clear()
    if encode_refusal(name) is not None:  # refused for encoding, before any evaluation
        with pytest.raises(ValueError, match=f"solver {name!r} cannot encode"):
            flowdiff.encode(flow, noise, solver=name, steps=4)
        assert not calls
        return
    enc = flowdiff.encode(flow, noise, solver=name, steps=4)
    assert enc.stats.nfe == len(calls)


def test_nfe_budget_is_exact_for_one_evaluation_solvers_and_never_exceeded():
    flow = _gaussian().flow()
    noise = torch.randn(2, 4, dtype=torch.float64)
    assert flowdiff.generate(flow, noise, solver="euler", nfe=13).stats.nfe == 13
    heun = flowdiff.generate(flow, noise, solver="heun", nfe=10)
    assert heun.stats.nfe == 9 and heun.stats.steps == 5  # 4 Heun steps + the Euler step into σ = 0
    assert flowdiff.generate(flow, noise, solver="heun", nfe=10, grid=flowdiff.Grid(final_euler=False)).stats.nfe == 10
    assert flowdiff.generate(flow, noise, solver="rk4", nfe=10).stats.nfe <= 10


def test_heun_takes_its_last_step_into_zero_as_euler():
    flow, calls = _counting(_gaussian().flow())
    flowdiff.generate(flow, torch.randn(1, 4, dtype=torch.float64), solver="heun", steps=4)
    assert len(calls) == 7 and min(calls) > 0  # never evaluated at σ = 0 (t = 0 is σ_min's timestep)


def test_encode_decode_round_trip_with_tight_adaptive_solve():
    mix = Mixture(torch.randn(6, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3)), 0.2)
    flow = mix.flow()
    images = mix.sample(3, generator=torch.Generator().manual_seed(4))
    enc = flowdiff.encode(flow, images, solver="dopri5", adaptive=flowdiff.Adaptive(rtol=1e-9, atol=1e-9))
    dec = flowdiff.generate(flow, enc.x, solver="dopri5", adaptive=flowdiff.Adaptive(rtol=1e-9, atol=1e-9))
    assert float((dec.x - images).abs().max()) < 1e-5


def test_encode_then_decode_retraces_the_grid_and_converges():
    g = _gaussian()
    flow = g.flow()
    images = g.sample(4, generator=torch.Generator().manual_seed(5))
    errs = []
    for steps in (10, 20, 40):
        enc = flowdiff.encode(flow, images, solver="heun", steps=steps, grid="karras")
        assert np.array_equal(enc.latent.sigmas, flowdiff.make_sigmas(flow.schedule, "karras", steps)[::-1])
        dec = flowdiff.decode(flow, enc.latent, grid=flowdiff.Grid(final_euler=False))
        errs.append(float((dec.x - images).abs().max()))
    assert errs[0] > errs[1] > errs[2]
    assert errs[1] / errs[2] > 3  # second order round trip


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_prediction_types_give_the_same_flow(prediction_type):
    g = _gaussian()
    schedule = g.schedule

    def model(x, t):
        s = float(schedule.sigma_at(float(t[0])))
        xbar = x * math.sqrt(1 + s * s)
        eps = g.eps(xbar, s)
        a, sd = 1 / math.sqrt(1 + s * s), s / math.sqrt(1 + s * s)
        x0 = xbar - s * eps
        return {"epsilon": eps, "v_prediction": a * eps - sd * x0, "sample": x0}[prediction_type]

    flow = flowdiff.ProbabilityFlow(model, schedule, prediction_type=prediction_type)
    ref = flowdiff.ProbabilityFlow(g, schedule)
    noise = torch.randn(2, 4, dtype=torch.float64)
    a = flowdiff.generate(flow, noise, solver="heun", steps=8)
    b = flowdiff.generate(ref, noise, solver="heun", steps=8)
    assert torch.allclose(a.x, b.x, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_dtypes(dtype):
    seen = []

    def model(x, t):
        seen.append((x.dtype, t.dtype, tuple(t.shape)))
        return torch.tanh(x)

    flow = flowdiff.ProbabilityFlow(model, flowdiff.Schedule.linear())
    noise = torch.randn(3, 2, 4, 4).to(dtype)
    res = flowdiff.generate(flow, noise, solver="heun", steps=6)
    assert res.x.dtype == dtype and torch.isfinite(res.x.float()).all()
    assert all(s[0] == dtype and s[1].is_floating_point and s[2] == (3,) for s in seen)
    if dtype in (torch.float16, torch.bfloat16):
        ref = flowdiff.generate(flow, noise.float(), solver="heun", steps=6)
        # float32 accumulation: the low-precision run stays within a few roundings of its dtype
        eps = torch.finfo(dtype).eps
        assert float((res.x.float() - ref.x).abs().max()) < 8 * eps * float(ref.x.abs().max())


@pytest.mark.parametrize("state_dtype,model_dtype", [(torch.float32, None), (torch.float64, None),
                                                      (torch.float32, torch.float16), (torch.float64, torch.float32),
                                                      (torch.float16, None), (torch.bfloat16, None)])
def test_field_feeds_the_model_exactly_alpha_times_xbar(state_dtype, model_dtype):
    # the field caches each σ's input scale (as a 0-dim tensor where that is the same float operation):
    # the model must still receive exactly x̄·α(σ) computed in the state's dtype, then cast to its own
    inputs = []

    def model(x, t):
        inputs.append(x)
        return torch.zeros_like(x)

    flow = flowdiff.ProbabilityFlow(model, flowdiff.Schedule.linear())
    f = flow.field(model_dtype=model_dtype)
    xbar = (torch.randn(2, 3, 5, 5, dtype=torch.float64) * 7).to(state_dtype)
    sigmas = [0.0, 0.0137, 1.0, 3.7, 80.0]
    for _ in range(2):  # first visits build the table, second visits read it
        for sigma in sigmas:
            f(sigma, xbar)
    want = [(xbar * flow.schedule.alpha(s)).to(model_dtype or state_dtype) for s in sigmas] * 2
    assert len(inputs) == len(want)
    for got, ref in zip(inputs, want):
        assert got.dtype == ref.dtype and torch.equal(got, ref)


def test_model_kwargs_pass_through_and_callback():
    got = {}

    def model(x, t, *, label, scale=1.0):
        got["label"], got["scale"] = label, scale
        return x * 0.1

    flow = flowdiff.ProbabilityFlow(model, flowdiff.Schedule.linear())
    seen = []
    flowdiff.generate(flow, torch.randn(2, 3), steps=4, model_kwargs={"label": 7, "scale": 2.0},
                      callback=lambda s: seen.append((s.step, s.sigma, s.x.shape)))
    assert got == {"label": 7, "scale": 2.0}
    assert [s[0] for s in seen] == [0, 1, 2, 3] and seen[-1][1] == 0.0


def _flow(fn=lambda x, t: x * 0.0):
    return flowdiff.ProbabilityFlow(fn, flowdiff.Schedule.linear())


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(steps=3, solver="nope"), ValueError, "unknown solver 'nope'"),
    (dict(steps=3, grid="nope"), ValueError, "unknown grid 'nope'"),
    (dict(steps=0), ValueError, "steps must be >= 1"),
    (dict(steps=3, nfe=3), ValueError, "not both"),
    (dict(), ValueError, "give one of steps"),
    (dict(nfe=1, solver="heun", grid=flowdiff.Grid(final_euler=False)), ValueError, "below the cost of one step"),
    (dict(steps=3, solver="euler", adaptive=flowdiff.Adaptive(rtol=1e-3)), ValueError, "drop steps"),
    (dict(solver="euler", adaptive=flowdiff.Adaptive(rtol=1e-3)), ValueError, "no error estimate"),
    (dict(steps=3, grid=[2.0, 1.0, 0.0]), ValueError, "steps=3 beside grid=explicit σ"),
])
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        flowdiff.generate(_flow(), torch.randn(2, 3), **kwargs)


def test_bad_inputs():
    with pytest.raises(ValueError, match="noise contains NaN"):
        flowdiff.generate(_flow(), torch.tensor([[math.nan, 1.0]]), steps=2)
    with pytest.raises(TypeError, match="noise must be a floating-point"):
        flowdiff.generate(_flow(), torch.ones(2, 3, dtype=torch.int64), steps=2)
    with pytest.raises(TypeError, match="noise must be a torch.Tensor"):
        flowdiff.generate(_flow(), [[1.0]], steps=2)
    with pytest.raises(TypeError, match="flow must be a flowdiff.ProbabilityFlow"):
        flowdiff.generate(lambda x, t: x, torch.ones(2, 3), steps=2)
    with pytest.raises(ValueError, match="unknown prediction_type 'score'.*v_prediction"):
        flowdiff.ProbabilityFlow(lambda x, t: x, flowdiff.Schedule.linear(), prediction_type="score")
    with pytest.raises(ValueError, match="encode takes no solver=flowdiff.Stochastic"):
        flowdiff.encode(_flow(), torch.ones(2, 3), steps=2, solver=flowdiff.Stochastic(0.5))


def test_model_failures_say_where():
    with pytest.raises(ValueError, match=r"step 0 \(σ .*model returned shape \(2, 2\) for input shape \(2, 3\)"):
        flowdiff.generate(_flow(lambda x, t: x[:, :2]), torch.ones(2, 3), steps=3)

    def nan_late(x, t):
        return x * (math.nan if float(t[0]) < 400 else 0.1)

    with pytest.raises(SolveError, match=r"step 6 \(σ [0-9.]+ -> [0-9.]+\) produced non-finite") as info:
        flowdiff.generate(_flow(nan_late), torch.ones(2, 3), steps=10, grid="leading")
    assert info.value.step == 6 and info.value.stats.nfe == 10


def test_decode_accepts_the_encodes_own_arguments_and_refuses_each_disagreement():
    flow = _gaussian().flow()
    enc = flowdiff.encode(flow, torch.randn(2, 4, dtype=torch.float64), solver="heun", steps=5, grid="karras")
    plain = flowdiff.decode(flow, enc.latent).x
    for agreeing in (dict(solver="heun"), dict(steps=5), dict(grid="karras"), dict(grid="karras", steps=5),
                     dict(solver=solvers.get("heun"), steps=5, grid="karras"),
                     dict(grid=enc.latent.sigmas), dict(grid=enc.latent.sigmas[::-1].copy())):
        assert torch.equal(flowdiff.decode(flow, enc.latent, **agreeing).x, plain), agreeing
    with pytest.raises(ValueError, match="encoded with solver 'heun'.*got solver='euler'"):
        flowdiff.decode(flow, enc.latent, solver="euler")
    with pytest.raises(ValueError, match="encoded with 5 steps; got steps=6"):
        flowdiff.decode(flow, enc.latent, steps=6)
    with pytest.raises(ValueError, match=r"grid='trailing' builds the σ grid \[.*\], not the one this latent"):
        flowdiff.decode(flow, enc.latent, grid="trailing")
    with pytest.raises(ValueError, match=r"grid='karras', steps=6 builds"):
        flowdiff.decode(flow, enc.latent, grid="karras", steps=6)
    with pytest.raises(ValueError, match=r"grid= \[.*\] differs from the grid this latent was encoded on, \["):
        flowdiff.decode(flow, enc.latent, grid=enc.latent.sigmas * 1.01)
    with pytest.raises(TypeError, match=r"solver 'heun' got unknown option\(s\) \['x'\]"):
        flowdiff.decode(flow, enc.latent, solver=solvers.get("heun", x=1))


def test_adaptive_encode_latent_keeps_the_solver_options():
    flow = _gaussian().flow()
    images = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    enc = flowdiff.encode(flow, images, solver=solvers.get("unipc", order=2),
                          adaptive=flowdiff.Adaptive(rtol=1e-6, atol=1e-6))
    assert enc.latent.solver_options == {"order": 2}
    dec = flowdiff.decode(flow, enc.latent)
    assert dec.solver == "unipc" and float((dec.x - images).abs().max()) < 1e-3
