"""Encoding as good as generation: every registered solver encodes at its order (or is refused),
round trips converge, stay within a stated multiple of Euler's, and a divergence guard stops
unstable solves at the step where they left the plausible range."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import flowdiff
import solvers
from flowdiff.engine.formulations import encode_refusal
from flowdiff.models.analytic import Gaussian
from flowdiff.tools.testing import closed_form_models, grid_names
from solvers import SolveError

STEPS = (16, 32, 64)
EXACT = {name for name in solvers.available() if solvers.get(name).reversible}


def _gaussian():
    return Gaussian(torch.linspace(-0.5, 0.5, 4), 0.3**2)


def _karras(smax: float, n: int) -> np.ndarray:
    """σ_i = σ_max (1 − i/N)^7: every step shrinks as N grows (a generation grid; encodes reverse it)."""
    return smax * (1.0 - np.arange(n + 1) / n) ** 7


def _expected_order(name: str) -> int:
    solver = solvers.get(name)
    return getattr(solver, "fixed_grid_order", solver.order)


def _slope(errors: list[float]) -> float:
    """The order from the last two refinements (N → 2N), the asymptotic end of the fit."""
    return math.log2(errors[-2] / errors[-1])


@pytest.mark.parametrize("name", solvers.available())
def test_encode_converges_at_the_solvers_order_or_is_refused(name):
    g = _gaussian()
    flow = g.flow()
    smax = flow.schedule.sigma_max
    x = g.sample(3, generator=torch.Generator().manual_seed(0))
    if encode_refusal(name) is not None:
        with pytest.raises(ValueError, match=f"solver {name!r} cannot encode: .* use '"):
            flowdiff.encode(flow, x, solver=name, steps=4)
        return
    exact = g.solution(x, 0.0, smax) / math.sqrt(1 + smax**2)
    enc_errors, rt_errors = [], []
    for n in STEPS:
        enc = flowdiff.encode(flow, x, solver=name, grid=_karras(smax, n))
        enc_errors.append(float((enc.x - exact).abs().max()))
        rt_errors.append(float((flowdiff.decode(flow, enc.latent).x - x).abs().max()))
    order = _expected_order(name)
    slopes = np.diff(np.log(enc_errors)) / -np.log(2.0)
    assert _slope(enc_errors) > order - 0.3, (name, order, slopes, enc_errors)
    assert enc_errors[-1] < enc_errors[0], (name, enc_errors)
    if name in EXACT:  # an exact inverse: the round trip is at rounding level at every N
        assert max(rt_errors) < 1e-12, (name, rt_errors)
    else:
        assert _slope(rt_errors) > order - 0.75, (name, order, rt_errors)


def test_multistep_encodes_are_stable_where_the_sigma_variables_diverged():
    """lms in σ reached |x_T| ~ 1e3 on a 10-step trailing encode; in ρ = 1/σ it is noise-like."""
    g = Gaussian(torch.linspace(-0.5, 0.5, 16), torch.linspace(0.01, 0.5, 16))
    flow = g.flow()
    x = g.sample(4, generator=torch.Generator().manual_seed(1))
    for name in ("lms", "abm", "dpmpp_2m", "dpmpp_3m", "unipc"):
        for grid in ("trailing", "leading", "karras", "logsnr"):
            enc = flowdiff.encode(flow, x, solver=name, steps=10, grid=grid)
            assert float(enc.x.abs().max()) < 6, (name, grid, float(enc.x.abs().max()))
            euler = flowdiff.encode(flow, x, solver="euler", steps=10, grid=grid)
            rt = float((flowdiff.decode(flow, enc.latent).x - x).abs().max())
            rt_euler = float((flowdiff.decode(flow, euler.latent).x - x).abs().max())
            assert rt <= 1.5 * rt_euler, (name, grid, rt, rt_euler)


#: The stated multiple: a non-exact solver's round trip is within this factor of Euler's at
#: the same encode NFE, on closed-form models and random named grids.
EULER_MULTIPLE = 2.0
NON_EXACT = [n for n in solvers.available() if n not in EXACT and encode_refusal(n) is None]


@given(model=closed_form_models((4,)), name=st.sampled_from(NON_EXACT), grid=grid_names(),
       steps=st.integers(4, 16), seed=st.integers(0, 2**31 - 1))
def test_round_trip_is_within_a_multiple_of_eulers_at_equal_nfe(model, name, grid, steps, seed):
    flow = model.flow()
    x = model.sample(2, generator=torch.Generator().manual_seed(seed)).clamp(-1, 1)
    enc = flowdiff.encode(flow, x, solver=name, steps=steps, grid=grid)
    rt = float((flowdiff.decode(flow, enc.latent).x - x).abs().max())
    euler = flowdiff.encode(flow, x, solver="euler", nfe=enc.stats.nfe, grid=grid)
    assert euler.stats.nfe == enc.stats.nfe
    rt_euler = float((flowdiff.decode(flow, euler.latent).x - x).abs().max())
    assert rt <= EULER_MULTIPLE * rt_euler + 1e-12, (name, grid, steps, rt, rt_euler)


# -- the divergence guard -------------------------------------------------------------------

def _exploding(rate: float = 5.0) -> flowdiff.ProbabilityFlow:
    """dx̄/dσ = rate·x̄: x̄ grows like e^{rate·σ}, far past any latent's range."""
    return flowdiff.ProbabilityFlow.from_sigma_field(lambda xbar, s: rate * xbar, flowdiff.Schedule.linear())


def test_the_guard_stops_an_unstable_encode_at_the_step_that_left_the_range():
    flow = _exploding()
    x = torch.full((2, 3), 0.5, dtype=torch.float64)
    with pytest.raises(SolveError, match=r"step \d+ \(σ [0-9.e+]+ -> [0-9.e+]+\) diverged: max\|x\|") as info:
        flowdiff.encode(flow, x, steps=10, grid="trailing")
    err = info.value
    # where it should fire, computed independently: Euler on dx̄/dσ = 5x̄, bound 50·max(1, 0.5)
    sig = flowdiff.encode(flow, x, steps=10, grid="trailing", checks=flowdiff.Checks(growth=None)).sigmas
    xbar, first = 0.5, None
    for i in range(len(sig) - 1):
        xbar *= 1 + 5.0 * (sig[i + 1] - sig[i])
        if first is None and xbar / math.sqrt(1 + sig[i + 1] ** 2) > 50.0:
            first = i
    assert err.step == first and err.value > 50.0
    assert err.t1 == pytest.approx(1 / sig[first + 1]) or err.t1 == pytest.approx(sig[first + 1])
    assert err.stats.nfe == 10  # the first run's statistics


def test_the_guard_is_adjustable_and_off_with_none():
    flow = _exploding(1.0)
    x = torch.full((1, 2), 1.0, dtype=torch.float64)
    loose = flowdiff.encode(flow, x, steps=10, checks=flowdiff.Checks(growth=None))
    limit = float(loose.x.abs().max())
    assert limit > 50  # garbage, returned because the guard was off
    assert torch.equal(flowdiff.encode(flow, x, steps=10, checks=flowdiff.Checks(growth=2 * limit)).x, loose.x)
    with pytest.raises(SolveError, match="exceeds the bound"):
        flowdiff.encode(flow, x, steps=10, checks=flowdiff.Checks(growth=limit / 2))
    with pytest.raises(SolveError, match="exceeds the bound"):
        flowdiff.generate(flow, x, steps=10, checks=flowdiff.Checks(growth=1e-3))
    with pytest.raises(ValueError, match="Checks.growth must be a finite number > 0"):
        flowdiff.encode(flow, x, steps=10, checks=flowdiff.Checks(growth=-1.0))


def test_solvers_bound_locates_the_first_step_out_of_range():
    ts = np.linspace(0.0, 5.0, 11)
    sol = solvers.integrate(lambda t, y: y, torch.ones(3), "euler", solvers.FixedGrid(ts))
    with pytest.raises(SolveError, match=r"step 4 \(t 2 -> 2.5\) diverged: max\|y\| = 7.59375 exceeds the bound 7"):
        solvers.integrate(lambda t, y: y, torch.ones(3), "euler", solvers.FixedGrid(ts), bound=solvers.Bound(7.0))
    assert float(sol.y[0]) == 1.5**10  # no bound: the same solve ends normally
    with pytest.raises(ValueError, match="Bound.limit must be a positive number"):
        solvers.Bound(0.0)


# -- the harness compares encoders ----------------------------------------------------------

def test_compare_roundtrip_measures_against_the_images_with_each_halfs_nfe(tmp_path):
    g = _gaussian()
    flow = g.flow()
    x = g.sample(2, generator=torch.Generator().manual_seed(4))
    comp = flowdiff.compare(flow, task="roundtrip", images=x, grids=["trailing", "logsnr"], nfe=[6, 12],
                            solvers=["euler", "dpmpp_2m", "heun", "reversible_heun", "ddim_inverse", "ipndm"])
    rows = {(r.solver, r.grid, r.budget): r for r in comp.runs}
    for (solver, grid, budget), r in rows.items():  # each row is the round trip it claims, NFE counted apart
        enc = flowdiff.encode(flow, x, solver=solver, grid=flowdiff.Grid(grid, nfe=budget))
        dec = flowdiff.decode(flow, enc.latent)
        assert (r.encode_nfe, r.decode_nfe, r.nfe) == (enc.stats.nfe, dec.stats.nfe, enc.stats.nfe + dec.stats.nfe)
        assert r.rms_error == pytest.approx(float((dec.x - x).pow(2).mean().sqrt()), rel=1e-12)
    assert rows[("reversible_heun", "logsnr", 12)].max_error < 1e-13  # exact methods at rounding level
    assert rows[("dpmpp_2m", "logsnr", 12)].rms_error < rows[("euler", "logsnr", 12)].rms_error
    assert {s.solver for s in comp.skipped} == {"ipndm"} and "use 'lms'" in comp.skipped[0].reason
    assert comp.to_csv().splitlines()[0].endswith("encode_nfe,decode_nfe")
    assert "| dpmpp_2m | logsnr |" in comp.to_markdown()
    assert comp.plot(tmp_path / "rt.png").stat().st_size > 0
    with pytest.raises(TypeError, match="task='roundtrip' needs images="):
        flowdiff.compare(flow, task="roundtrip")
    with pytest.raises(ValueError, match="task must be 'generate' or 'roundtrip'"):
        flowdiff.compare(flow, x, task="nope")


def test_cli_compare_task_roundtrip_writes_the_table(tmp_path, capsys):
    from flowdiff.cli import main

    out = tmp_path / "rt"
    assert main(["compare", "--task", "roundtrip", "--model", "analytic-mixture", "--solver", "euler,dpmpp_2m",
                 "--grid", "logsnr", "--nfe", "6", "--batch", "2", "--layout", "wide", "--out", str(out)]) == 0
    assert "| dpmpp_2m | logsnr |" in capsys.readouterr().out
    assert (out / "compare.csv").read_text().splitlines()[0].endswith("encode_nfe,decode_nfe")


def test_divergence_guard_covers_adaptive_solves():
    """The guard bounds the end state of error-controlled solves too (generate and encode), located in σ."""
    gauss = Gaussian(torch.zeros(6, dtype=torch.float64), 0.3)
    flow = gauss.flow()
    images = gauss.sample(3, generator=torch.Generator().manual_seed(0))
    ok = flowdiff.encode(flow, images, solver="dopri5", adaptive=flowdiff.Adaptive(rtol=1e-3, atol=1e-3))
    assert float(ok.x.abs().max()) < 10
    with pytest.raises(solvers.SolveError, match=r"step \d+ \(σ .*diverged") as info:
        flowdiff.encode(flow, images, solver="dopri5", adaptive=flowdiff.Adaptive(rtol=1e-3, atol=1e-3),
                        checks=flowdiff.Checks(growth=1e-3))
    assert info.value.value > 1e-3
    noise = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with pytest.raises(solvers.SolveError, match="diverged"):
        flowdiff.generate(flow, noise, solver="unipc", adaptive=flowdiff.Adaptive(rtol=1e-3, atol=1e-3),
                          checks=flowdiff.Checks(growth=1e-3))
