"""One request, one meaning; one loop for every step.

* Each request is said one way; what can still be said twice (a fixed grid beside an adaptive request, a budget
  beside a Grid holding one, ``final_euler`` in a Grid, the Inversion's options and a Latent) gives the same result
  or is refused with a message naming both.
* On a zero-terminal-SNR grid (σ_max = ∞) the step out of σ = ∞ is a step of the one loop: NFE, step indices,
  callbacks and failure locations are the loop's own, equal to those of the finite rest shifted by one.
* ``save=flowdiff.Save(...)`` returns the states the callback would have recorded.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import flowdiff
import solvers
from flowdiff import Adaptive, Grid, Inversion, Schedule, Stochastic
from flowdiff.engine.schedules import rescale_zero_terminal_snr
from flowdiff.models.analytic import Gaussian


def _gauss():
    g = torch.Generator().manual_seed(3)
    gauss = Gaussian(torch.randn(6, dtype=torch.float64, generator=g) * 0.3, 0.4)
    noise = torch.randn(4, 6, dtype=torch.float64, generator=g)
    return gauss.flow(), noise, gauss


# -- requests said twice -------------------------------------------------------------------------------------------

ADAPTIVE = Adaptive(1e-4, 1e-4)


@pytest.mark.parametrize("kwargs, names", [
    # what can still be said twice: a fixed-grid request beside an adaptive one, a budget beside a Grid holding one
    (dict(solver="dopri5", adaptive=ADAPTIVE, grid=Grid(sigmas=[5.0, 0.0])), ("grid=Grid", "adaptive=")),
    (dict(solver="dopri5", adaptive=ADAPTIVE, grid=[5.0, 0.0]), ("grid=[5.0, 0.0]", "adaptive=", "sigma_start")),
    (dict(solver="dopri5", adaptive=ADAPTIVE, grid="karras"), ("grid='karras'", "adaptive=")),
    (dict(solver="dopri5", adaptive=ADAPTIVE, steps=5), ("steps=", "adaptive=")),
    (dict(solver="dopri5", adaptive=ADAPTIVE, nfe=9), ("nfe=9", "adaptive=")),
    (dict(grid=Grid(steps=3), steps=4), ("steps=4", "grid=Grid(...)")),
    (dict(grid=Grid(timesteps=[999, 500, 0]), nfe=4), ("nfe=4", "grid=Grid(...)")),
    (dict(solver=Stochastic(0.5), adaptive=ADAPTIVE), ("Stochastic", "adaptive=")),
])
def test_generate_refuses_two_spellings_naming_both(kwargs, names):
    flow, noise, _ = _gauss()
    with pytest.raises(ValueError) as err:
        flowdiff.generate(flow, noise, **kwargs)
    for name in names:
        assert name in str(err.value)


@pytest.mark.parametrize("inside", [None, False, True])
def test_steps_beside_a_grid_that_says_final_euler_is_one_solve(inside):
    flow, noise, _ = _gauss()
    ref = flowdiff.generate(flow, noise, solver="heun", grid=Grid(steps=5, final_euler=inside))
    res = flowdiff.generate(flow, noise, solver="heun", steps=5, grid=Grid(final_euler=inside))
    assert torch.equal(res.x, ref.x) and res.stats.nfe == ref.stats.nfe == (10 if inside is False else 9)


def test_final_euler_of_a_fixed_point_encode_is_said_once():
    flow, noise, gauss = _gauss()
    images = gauss.sample(2, generator=torch.Generator().manual_seed(0))
    by_option = flowdiff.encode(flow, images,
                                solver=flowdiff.Inversion("fixed_point", {"final_euler": False}, solver="heun"),
                                steps=4)
    by_grid = flowdiff.encode(flow, images, solver=flowdiff.Inversion("fixed_point", solver="heun"),
                              grid=Grid(steps=4, final_euler=False))
    assert torch.equal(by_option.x, by_grid.x) and by_grid.latent.final_euler is False
    with pytest.raises(ValueError, match=r"Inversion\(options=\{'final_euler': True\}\).*final_euler=False"):
        flowdiff.encode(flow, images, solver=flowdiff.Inversion("fixed_point", {"final_euler": True}, solver="heun"),
                        grid=Grid(steps=4, final_euler=False))
    with pytest.raises(ValueError, match=r"Grid\(\.\.\., final_euler=False\) on a plain encode"):
        flowdiff.encode(flow, images, solver="heun", grid=Grid(steps=4, final_euler=False))
    # the latent says how its decode ends: the default follows it, a different flag is refused naming both
    plain = flowdiff.decode(flow, by_grid.latent)
    explicit = flowdiff.decode(flow, by_grid.latent, grid=flowdiff.Grid(final_euler=False))
    assert torch.equal(plain.x, explicit.x) and plain.stats.nfe == explicit.stats.nfe == 8
    with pytest.raises(ValueError,
                       match=r"final_euler=False \(Latent.final_euler\); got grid=Grid\(\.\.\., final_euler=True\)"):
        flowdiff.decode(flow, by_grid.latent, grid=flowdiff.Grid(final_euler=True))


def test_decode_takes_the_encode_grid_as_a_grid_object():
    flow, _, gauss = _gauss()
    images = gauss.sample(2, generator=torch.Generator().manual_seed(1))
    enc = flowdiff.encode(flow, images, solver="heun", grid=Grid("karras", steps=6))
    a = flowdiff.decode(flow, enc.latent)
    b = flowdiff.decode(flow, enc.latent, grid=Grid("karras", steps=6))
    assert torch.equal(a.x, b.x)
    with pytest.raises(ValueError, match="not the one this latent was encoded on"):
        flowdiff.decode(flow, enc.latent, grid=Grid("karras", steps=5))


@pytest.mark.parametrize("kwargs, names", [
    (dict(solver="dopri5", adaptive=ADAPTIVE, grid=[5.0, 0.0]), ("grid=", "adaptive=")),
    (dict(solver="dopri5", adaptive=ADAPTIVE, grid=Grid(timesteps=[0, 500, 999])), ("grid=Grid", "adaptive=")),
    (dict(solver=Inversion("fixed_point"), adaptive=ADAPTIVE), ("Inversion('fixed_point')", "adaptive=")),
    (dict(steps=3, adaptive=ADAPTIVE), ("steps=3", "adaptive=")),
])
def test_encode_refuses_two_spellings_naming_both(kwargs, names):
    flow, _, gauss = _gauss()
    images = gauss.sample(2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError) as err:
        flowdiff.encode(flow, images, **kwargs)
    for name in names:
        assert name in str(err.value)


# -- the boundary step out of σ = ∞ is a step of the loop ---------------------------------------------------------

def _zero_snr_flow(nan_at=None):
    """A smooth nonlinear v-prediction model on a zero-terminal-SNR schedule; NaN at timestep ``nan_at`` (±0.5)."""
    schedule = Schedule(rescale_zero_terminal_snr(Schedule.linear().alphas_cumprod))

    def model(x, t):
        t = t.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        out = torch.tanh(x) * (0.3 + t / 2000) + 0.1 * x
        if nan_at is not None:
            out = torch.where((t - nan_at).abs() < 0.5, torch.nan, out)
        return out

    return flowdiff.ProbabilityFlow(model, schedule, prediction_type="v_prediction")


GENERATORS = [n for n in solvers.available() if n not in ("reversible",)]


@pytest.mark.parametrize("solver", GENERATORS)
def test_the_step_out_of_infinity_is_step_0_of_the_loop(solver):
    flow = _zero_snr_flow()
    noise = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    grid = flowdiff.make_sigmas(flow.schedule, "trailing", 6)
    assert grid[0] == math.inf and np.isfinite(grid[1:]).all()
    seen, ref_seen = [], []
    ours = flowdiff.generate(flow, noise, solver=solver, grid=grid, callback=seen.append)
    # the reference: the boundary step by hand (the flow's own Euler step from pure noise), then the finite rest
    start = flow.step_from_noise(noise, float(grid[1]))
    ref = flowdiff.generate(flow, start, solver=solver, grid=grid[1:], callback=ref_seen.append)
    torch.testing.assert_close(ours.x, ref.x, rtol=1e-12, atol=1e-12)
    assert ours.stats.nfe == ref.stats.nfe + 1
    assert ours.stats.steps == ours.stats.accepted == ref.stats.accepted + 1 == len(grid) - 1
    assert [s.step for s in seen] == list(range(len(grid) - 1))
    assert [s.sigma for s in seen] == grid[1:].tolist()
    assert [s.step for s in seen[1:]] == [s.step + 1 for s in ref_seen]
    for a, b in zip(seen[1:], ref_seen):
        torch.testing.assert_close(a.xbar, b.xbar, rtol=1e-12, atol=1e-12)
    assert ours.stats.wall_time > 0 and np.array_equal(ours.sigmas, grid)


def flow_timestep(sigma):
    return _zero_snr_flow().schedule.timestep(float(sigma))


@pytest.mark.parametrize("bad_step", [1, 3])
def test_a_failure_after_the_boundary_step_is_located_by_the_loop(bad_step):
    grid = flowdiff.make_sigmas(_zero_snr_flow().schedule, "trailing", 6)
    flow = _zero_snr_flow(nan_at=flow_timestep(grid[bad_step]))
    noise = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    with pytest.raises(solvers.SolveError) as ours:
        flowdiff.generate(flow, noise, grid=grid)
    with pytest.raises(solvers.SolveError) as finite:  # the same model from the last finite level
        flowdiff.generate(flow, noise, grid=grid[1:])
    assert ours.value.step == bad_step == finite.value.step + 1
    assert f"step {bad_step} (σ {grid[bad_step]:.6g} -> {grid[bad_step + 1]:.6g})" in str(ours.value)
    assert ours.value.stats.nfe == len(grid) - 1  # the loop's count of its whole first run


def test_a_one_step_grid_from_infinity_is_one_loop_step():
    flow = _zero_snr_flow()
    noise = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    seen = []
    for solver in ("euler", "heun", "dpmpp_2m", "reversible_heun"):
        res = flowdiff.generate(flow, noise, solver=solver, grid=[math.inf, 0.0], callback=seen.append)
        torch.testing.assert_close(res.x, flow.step_from_noise(noise, 0.0), rtol=0, atol=0)
        assert res.stats.nfe == res.stats.steps == 1 and seen.pop().step == 0 and not seen


# -- saved states are the callback's records ----------------------------------------------------------------------

def _same_records(saved, recorded, flow=None):
    """Saved records are the callback's; a ``denoised`` the callback lacks is the model's x̄ − σ·ε at that state."""
    assert [(r.step, r.sigma) for r in saved] == [(r.step, r.sigma) for r in recorded]
    for a, b in zip(saved, recorded):
        assert torch.equal(a.x, b.x) and torch.equal(a.xbar, b.xbar)
        if b.denoised is not None:
            assert torch.equal(a.denoised, b.denoised)
        elif a.denoised is not None:
            assert flow is not None
            torch.testing.assert_close(a.denoised, a.xbar - a.sigma * flow.field()(a.sigma, a.xbar), rtol=1e-13,
                                       atol=1e-13)


@pytest.mark.parametrize("solver, every", [("euler", True), ("heun", True), ("dpmpp_2m", True), ("dopri5", True),
                                           ("reversible_heun", False)])
def test_saved_steps_equal_the_callback_records(solver, every):
    _, noise, gauss = _gauss()
    recorded, calls = [], []
    counting = flowdiff.ProbabilityFlow.from_sigma_field(lambda x, s: calls.append(s) or gauss.eps(x, s),
                                                         gauss.schedule)
    res = flowdiff.generate(counting, noise, solver=solver, steps=6, callback=recorded.append,  # reversible: no x̂₀
                            save=flowdiff.Save(steps=True, denoised=solver != "reversible_heun"))
    assert len(res.saved) == len(recorded) == res.stats.accepted and len(calls) == res.stats.nfe
    _same_records(res.saved, recorded, counting)
    if every:  # x̂₀ at every saved state but the end, from the evaluation the next step makes there
        assert all(r.denoised is not None for r in res.saved[:-1])
    plain = flowdiff.generate(counting, noise, solver=solver, steps=6, save=flowdiff.Save(steps=True))
    assert torch.equal(plain.x, res.x) and plain.stats.nfe == res.stats.nfe and plain.saved[-1].sigma == 0.0
    assert all(r.denoised is None for r in plain.saved)  # dropped unless asked for


def test_saved_sigmas_keep_only_those_states():
    flow, noise, _ = _gauss()
    grid = flowdiff.make_sigmas(flow.schedule, "trailing", 8)
    recorded = []
    res = flowdiff.generate(flow, noise, grid=grid, callback=recorded.append,
                            save=flowdiff.Save(sigmas=[grid[5], grid[2]]))
    _same_records(res.saved, [r for r in recorded if r.sigma in (grid[2], grid[5])])
    assert [r.step for r in res.saved] == [1, 4]
    with pytest.raises(ValueError, match=r"σ = \[1.2345\], which this solve does not step to"):
        flowdiff.generate(flow, noise, grid=grid, save=flowdiff.Save(sigmas=[1.2345]))
    calls = []  # a fixed grid is checked before the solve: no evaluation is spent on a σ it cannot save
    counting = flowdiff.ProbabilityFlow(lambda x, t: calls.append(t) or 0.1 * x, Schedule.linear())
    with pytest.raises(ValueError, match="does not step to"):
        flowdiff.generate(counting, noise, steps=4, save=flowdiff.Save(sigmas=[1.2345]))
    assert calls == []
    # the start is not a step: an encode's σ = 0 cannot be saved (its images are the input)
    with pytest.raises(ValueError, match=r"σ = \[0.0\]"):
        flowdiff.encode(flow, noise.clamp(-1, 1), steps=4, save=flowdiff.Save(sigmas=[0.0]))


def test_saved_states_of_encodes_decodes_and_other_procedures():
    flow, noise, gauss = _gauss()
    images = gauss.sample(2, generator=torch.Generator().manual_seed(0))
    for kwargs in (dict(solver="euler"), dict(solver="reversible_heun"),
                   dict(solver=Inversion("fixed_point", solver="heun")), dict(solver="ddim_inverse")):
        recorded = []
        enc = flowdiff.encode(flow, images, steps=5, callback=recorded.append, save=flowdiff.Save(steps=True),
                              **kwargs)
        assert [r.sigma for r in enc.saved] == enc.sigmas[1:].tolist()
        _same_records(enc.saved, [r._replace(denoised=None) for r in recorded])
        recorded = []
        dec = flowdiff.decode(flow, enc.latent, callback=recorded.append, save=flowdiff.Save(sigmas=[0.0]))
        _same_records(dec.saved, [r._replace(denoised=None) for r in recorded if r.sigma == 0.0])
    # an inversion's trajectory with x̂₀ at every state but the last, as editing methods use it
    traj = flowdiff.encode(flow, images, steps=5, save=flowdiff.Save(steps=True, denoised=True)).saved
    assert all(r.denoised is not None for r in traj[:-1]) and traj[-1].denoised is None
    _same_records(traj, [r._replace(denoised=None) for r in traj], flow)
    recorded = []
    sto = flowdiff.generate(flow, noise, steps=5, solver=flowdiff.Stochastic(0.5, generator=3),
                            callback=recorded.append, save=flowdiff.Save(steps=True))
    _same_records(sto.saved, [r._replace(denoised=None) for r in recorded])
    zero = _zero_snr_flow()
    res = flowdiff.generate(zero, noise, steps=4, save=flowdiff.Save(steps=True))
    assert [r.step for r in res.saved] == [0, 1, 2, 3] and res.saved[0].sigma == res.sigmas[1] < math.inf


def test_save_is_validated_once():
    flow, noise, _ = _gauss()
    with pytest.raises(ValueError, match="Save\\(\\) keeps nothing"):
        flowdiff.Save()
    with pytest.raises(ValueError, match="Save.sigmas must be"):
        flowdiff.Save(sigmas=[float("nan")])
    with pytest.raises(TypeError, match="Save.steps must be True or False"):
        flowdiff.Save(steps="yes")
    with pytest.raises(TypeError, match="save must be a flowdiff.Save"):
        flowdiff.generate(flow, noise, steps=3, save={"steps": True})
    with pytest.raises(ValueError, match=r"Save\(sigmas=\[1.0\]\) with an adaptive solve"):
        flowdiff.generate(flow, noise, solver="dopri5", adaptive=flowdiff.Adaptive(rtol=1e-3),
                          save=flowdiff.Save(sigmas=[1.0]))


# -- the variables are chosen in one place -------------------------------------------------------------------------

def test_every_solve_asks_the_one_chooser(monkeypatch):
    from flowdiff.api import adaptive, inversion, sampling, stochastic
    from flowdiff.engine import formulations

    calls = []

    def spy(solver, direction, **options):
        form = formulations.formulation_for(solver, direction, **options)
        calls.append((solver.name, direction, options.get("adaptive", False), form.name))
        return form

    for module in (adaptive, inversion, sampling, stochastic):
        monkeypatch.setattr(module, "formulation_for", spy)
    flow, noise, gauss = _gauss()
    images = gauss.sample(2, generator=torch.Generator().manual_seed(0))
    flowdiff.generate(flow, noise, solver="dopri5", adaptive=flowdiff.Adaptive(rtol=1e-3, atol=1e-3))
    flowdiff.generate(flow, noise, solver="unipc", adaptive=flowdiff.Adaptive(rtol=1e-3, atol=1e-3))
    flowdiff.encode(flow, images, solver="bosh3", adaptive=flowdiff.Adaptive(rtol=1e-3, atol=1e-3))
    flowdiff.generate(flow, noise, steps=3, solver=flowdiff.Stochastic(0.5, generator=0))
    enc = flowdiff.encode(flow, images, solver="reversible_heun", steps=3)
    flowdiff.decode(flow, enc.latent)
    assert calls == [("dopri5", "generate", True, "logsigma"), ("unipc", "generate", True, "data"),
                     ("bosh3", "encode", True, "logsigma"), ("ddim_eta", "generate", False, "sigma"),
                     ("reversible_heun", "encode", False, "vp"), ("reversible_heun", "decode", False, "vp")]


def test_the_divergence_guard_applies_to_every_kind_of_solve():
    # Checks(growth=) (formerly divergence=, silently ignored by the η process and the reversible decode
    flow, noise, gauss = _gauss()
    images = gauss.sample(2, generator=torch.Generator().manual_seed(0))
    enc = flowdiff.encode(flow, images, solver="reversible_heun", steps=4)
    solves = {"fixed grid": lambda **kw: flowdiff.generate(flow, noise, steps=4, **kw),
              "adaptive": lambda **kw: flowdiff.generate(flow, noise, solver="bosh3",
                                                         adaptive=flowdiff.Adaptive(rtol=1e-3),
                                                         **kw),
              "eta": lambda **kw: flowdiff.generate(flow, noise, steps=4, solver=flowdiff.Stochastic(0.5, generator=0),
                                                    **kw),
              "reversible decode": lambda **kw: flowdiff.decode(flow, enc.latent, **kw)}
    for name, solve in solves.items():
        assert solve(checks=flowdiff.Checks(growth=None)).x.isfinite().all(), name
        with pytest.raises(solvers.SolveError, match="diverged") as err:
            solve(checks=flowdiff.Checks(growth=1e-3))
        assert err.value.value > 1e-3, name


@pytest.mark.parametrize("solver", ["euler", "heun", "rk4", "dpmpp_2m", "reversible_heun"])
def test_an_nfe_budget_counts_the_step_out_of_infinity_as_one_evaluation(solver):
    flow = _zero_snr_flow()
    noise = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    for budget in range(4, 12):
        res = flowdiff.generate(flow, noise, solver=solver, nfe=budget)
        assert res.sigmas[0] == math.inf and res.stats.nfe <= budget
        more = flowdiff.generate(flow, noise, solver=solver, steps=res.stats.steps + 1)
        assert more.stats.nfe > budget  # the largest step count that fits


def test_the_divergence_guard_applies_to_a_fixed_point_encode():
    # the fixed-point plug-in ran its solve without the request's bound (divergence= was ignored there)
    flow, _, gauss = _gauss()
    images = gauss.sample(2, generator=torch.Generator().manual_seed(0))
    assert flowdiff.encode(flow, images, steps=4, solver=flowdiff.Inversion("fixed_point"),
                           checks=flowdiff.Checks(growth=None)).x.isfinite().all()
    with pytest.raises(solvers.SolveError, match="diverged") as err:
        flowdiff.encode(flow, images, steps=4, solver=flowdiff.Inversion("fixed_point"),
                        checks=flowdiff.Checks(growth=1e-3))
    assert err.value.value > 1e-3
