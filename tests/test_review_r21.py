"""Review R21's finds in the merges after R20's: the data variables' field read off the model's prediction
(``ProbabilityFlow.field().denoised``) and what carries it."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pytest
import torch

import flowdiff
from flowdiff.engine.flow import ProbabilityFlow
from flowdiff.engine.formulations import data_field
from flowdiff.engine.scheduler_grids import schedule_from_config
from flowdiff.engine.schedules import Schedule, rescale_zero_terminal_snr
from flowdiff.engine.terminal import field_from_infinity
from flowdiff.tools import scheduler_suite as S
from flowdiff.tools.likelihood import ErrorBarWarning

ALPHAS = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))


class _Halved(ProbabilityFlow):
    """A flow whose field is half its model's ε, its wrapper made with ``functools.wraps`` (which copies the
    wrapped function's ``__dict__``, and with it the inner field's ``denoised``)."""

    def field(self, model_kwargs: Any = None, model_dtype: Any = None) -> Any:
        inner = super().field(model_kwargs, model_dtype)

        @functools.wraps(inner)
        def halved(sigma: float, xbar: torch.Tensor) -> torch.Tensor:
            return 0.5 * inner(sigma, xbar)

        return halved


class _Forwarding:
    """A counting wrapper of a field that forwards every other attribute to it (as user wrappers do)."""

    def __init__(self, field: Any) -> None:
        self.inner, self.calls = field, 0

    def __call__(self, sigma: float, xbar: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return 0.5 * self.inner(sigma, xbar)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_a_subclass_field_made_with_functools_wraps_is_not_bypassed(prediction_type: str) -> None:
    """A ProbabilityFlow subclass whose ``field`` wraps the parent's with ``functools.wraps`` got the parent's
    ``denoised`` copied onto its wrapper, and every data-variables solver (dpmpp_2m, unipc, ...) read D off the
    parent's model prediction: the override was silently skipped (max difference 41 from the same subclass without
    ``wraps``), while the σ-variable solvers honoured it. A field's ``denoised`` now counts only on the field it
    was made for."""
    noise = S._noise(torch.float64)
    model = S.network(torch.float64)
    wrapped = _Halved(model, ALPHAS, prediction_type=prediction_type)
    for solver in ("dpmpp_2m", "heun"):
        result = flowdiff.generate(wrapped, noise, solver=solver, steps=6)
        got = result.x
        base = flowdiff.generate(ProbabilityFlow(model, ALPHAS, prediction_type=prediction_type), noise,
                                 solver=solver, steps=6).x
        eps = wrapped.field()
        assert not torch.equal(got, base), f"{solver}: the subclass's field was bypassed"
        # the data field of the wrapper is x̄ − σ·(its own ε), at every σ of the grid
        for sigma in result.sigmas[1:-1]:
            xbar = noise * float(sigma)
            d = data_field(eps)(1.0 / float(sigma), xbar / float(sigma))
            torch.testing.assert_close(d, xbar - float(sigma) * eps(float(sigma), xbar), rtol=1e-12, atol=1e-12)


def test_a_forwarding_wrapper_of_a_field_gets_its_own_denoised_field() -> None:
    """A wrapper that forwards attribute look-ups to the field it wraps (here: one that counts and halves) also
    exposed the inner ``denoised``: data_field called it instead of the wrapper, so the wrapper neither counted
    nor changed anything."""
    flow = ProbabilityFlow(S.network(torch.float64), ALPHAS, prediction_type="v_prediction")
    wrapper = _Forwarding(flow.field())
    sigma = 3.0
    xbar = S._noise(torch.float64) * sigma
    d = data_field(wrapper)(1.0 / sigma, xbar / sigma)
    assert wrapper.calls == 1
    torch.testing.assert_close(d, xbar - sigma * wrapper.inner(sigma, xbar) * 0.5, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_the_field_from_infinity_keeps_its_own_denoised_form(prediction_type: str) -> None:
    """A grid from σ = ∞ (zero terminal SNR): the field extended there reads D off the prediction at finite σ as
    the flow's own field does, bit for bit, and the D of a wrapper of the flow's field (not the flow's own) is not
    passed on."""
    flow = ProbabilityFlow(S.network(torch.float32), rescale_zero_terminal_snr(ALPHAS),
                           prediction_type=prediction_type)
    grid = np.array([np.inf, 50.0, 3.0, 0.0])
    eps = flow.field()
    sigma = 50.0
    xbar = S._noise(torch.float32) * sigma
    own = data_field(eps)(1.0 / sigma, xbar / sigma)
    extended = data_field(field_from_infinity(flow, eps, grid, None, None))(1.0 / sigma, xbar / sigma)
    assert torch.equal(extended, own)

    @functools.wraps(eps)
    def doubled(s: float, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * eps(s, x)

    through = data_field(field_from_infinity(flow, doubled, grid, None, None))(1.0 / sigma, xbar / sigma)
    torch.testing.assert_close(through, xbar - sigma * doubled(sigma, xbar))


@pytest.mark.parametrize("schedule", [Schedule.flow_matching(), Schedule.flow_matching(shift=3.0),
                                      Schedule.variance_exploding()], ids=repr)
def test_the_velocity_denoised_field_is_x_bar_minus_sigma_eps(schedule: Schedule) -> None:
    """prediction_type='velocity' (flow matching, VE): D read off v equals x̄ − σ·ε(x̄, σ) to float64 rounding at
    every σ of the schedule's range, and in float32 at σ_max it is no farther from float64 than the ε route."""
    sigmas = np.geomspace(schedule.sigma_min, schedule.sigma_max, 7)
    for sigma in map(float, sigmas):
        out = {}
        for dtype in (torch.float64, torch.float32):
            eps = ProbabilityFlow(S.network(dtype), schedule, prediction_type="velocity").field()
            y = S._noise(dtype) * (1.0 + sigma) / sigma
            xbar = y * sigma  # as data_field forms it from its state
            out[dtype] = data_field(eps)(1.0 / sigma, y), xbar - sigma * eps(sigma, xbar)
        direct64, via64 = out[torch.float64]
        scale = float(direct64.abs().max()) + float(via64.abs().max())
        torch.testing.assert_close(direct64, via64, rtol=0, atol=1e-13 * scale * (1.0 + sigma))
        direct32, via32 = out[torch.float32]
        assert S._rel(direct32, direct64) <= S._rel(via32, direct64) + 2e-7


def test_a_non_adaptive_solver_beside_adaptive_names_adaptive_not_rtol() -> None:
    """``adaptive=Adaptive()`` (every tolerance left to the entry point, G4) beside a fixed-step solver was refused
    as "rtol=/atol= need an adaptive solver": arguments the call did not give (and spellings that no longer
    exist). The refusal names what was given."""
    flow = ProbabilityFlow(S.network(torch.float64), ALPHAS)
    for call in (flowdiff.generate, flowdiff.encode):
        with pytest.raises(ValueError, match=r"^adaptive=flowdiff\.Adaptive\(\.\.\.\) needs an adaptive solver; "
                                             r"'euler' has no error estimate") as caught:
            call(flow, S._noise(torch.float64), solver="euler", adaptive=flowdiff.Adaptive())
        assert "rtol=/atol=" not in str(caught.value)


@pytest.mark.parametrize("steps", [1, 4])
def test_the_likelihood_below_16_steps_does_not_speak_of_check_solves_it_did_not_run(steps: int) -> None:
    """Below 16 steps no check solve runs (the lead's change after G4), yet the warning said "its check solves of
    N/2 and N/4 steps are too coarse" (for steps=1: solves of half and a quarter of a step). It now says that none
    is run, and the statistics agree: no check solve's counts, the NFE that of the one solve."""
    flow = ProbabilityFlow(S.network(torch.float64), ALPHAS)
    x = S._noise(torch.float64) * 0.3
    with pytest.warns(ErrorBarWarning, match=rf"steps={steps}: .* no check solve is run") as caught:
        r = flowdiff.log_likelihood(flow, x, solver="rk4", steps=steps)
    assert not any("its check solves" in str(w.message) for w in caught)
    assert "check" not in r.stats.extra and "check_quarter" not in r.stats.extra
    assert r.stats.nfe == 4 * steps and bool(torch.isinf(r.solve_error).all())


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_flow_denoised_reads_the_prediction_as_the_solvers_do(prediction_type: str) -> None:
    """``flow.denoised(x̄, σ)`` (the README's x̂₀ of a saved record) still computed x̄ − σ·ε after P5's change: on the
    cosine schedule with v-prediction its float32 value was 2.4e-5 off float64 at σ ≈ 640 where the solvers' own D
    is 1.4e-7 off, and a record's saved x̂₀ and flow.denoised of the same state differed by that. It now reads the
    prediction as the field does: equal to the data variables' D bit for bit, and to x̄ − σ·ε in float64."""
    config = {"_class_name": "DDIMScheduler", "beta_schedule": "squaredcos_cap_v2", "prediction_type": prediction_type}
    schedule, _ = schedule_from_config(config)
    sigma = float(schedule.sigmas[-2])
    got = {}
    for dtype in (torch.float64, torch.float32):
        flow = ProbabilityFlow(S.network(dtype), schedule, prediction_type=prediction_type)
        y = S._noise(dtype)
        xbar = y * sigma
        got[dtype] = flow.denoised(xbar, sigma)
        assert torch.equal(got[dtype], data_field(flow.field())(1.0 / sigma, y))
        if dtype == torch.float64:
            via_eps = xbar - sigma * flow.eps(xbar, sigma)
            torch.testing.assert_close(got[dtype], via_eps, rtol=0, atol=1e-12 * sigma * float(via_eps.abs().max()))
    assert S._rel(got[torch.float32], got[torch.float64]) < 1e-6
