"""Four finds of the tenth new-user sweep (S10), each checked as a user meets it."""

import inspect
import math

import pytest
import torch

import flowdiff
import flowdiff.api.adaptive
import solvers
from flowdiff.engine.schedules import rescale_zero_terminal_snr

# -- one spelling: the adaptive callback's record is StepState, and only that ---------------------------------


def test_every_public_class_and_function_has_one_public_name():
    """The adaptive callback's record was exported a second time under an older name (the same class object as
    ``StepState``, by flowdiff and by its adaptive module). Every class and function that flowdiff or that module
    exports is exported under its own name, and under no other."""
    for module in (flowdiff, flowdiff.api.adaptive):
        values = [(name, getattr(module, name)) for name in module.__all__]
        named = [(name, value) for name, value in values if inspect.isclass(value) or inspect.isfunction(value)]
        assert [name for name, value in named if value.__name__ != name] == []
        assert len({id(value) for _, value in named}) == len(named)


# -- zero terminal SNR with an epsilon model: refused before the solve --------------------------------------------

def _zero_snr_flow(prediction_type, calls):
    schedule = flowdiff.Schedule(rescale_zero_terminal_snr(flowdiff.Schedule.linear().alphas_cumprod))

    def model(x, t):
        calls.append(t)
        return 0.1 * x

    return flowdiff.ProbabilityFlow(model, schedule, prediction_type=prediction_type)


@pytest.mark.parametrize("solver", ["euler", "heun", "dpmpp_2m", "unipc"])
def test_an_epsilon_model_from_infinity_is_refused_before_the_solve(solver):
    """It was a ``SolveError`` of step 0 from inside the loop; now a plain ``ValueError`` before the solve starts:
    no model evaluation, no callback, and the message names the prediction type, σ_max = ∞ and what is accepted."""
    calls, seen = [], []
    flow = _zero_snr_flow("epsilon", calls)
    assert flow.schedule.sigma_max == math.inf
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError) as err:
        flowdiff.generate(flow, noise, solver=solver, grid="trailing", steps=5, callback=seen.append)
    assert not isinstance(err.value, solvers.SolveError)
    assert calls == [] and seen == []
    message = str(err.value)
    for part in ("prediction_type 'epsilon'", "σ_max = ∞", "'v_prediction' or 'sample'", "grid[1:]"):
        assert part in message


def test_the_advice_of_the_refusal_runs():
    """The same grid without its first point generates with the epsilon model, and the same grid from σ = ∞ with a
    v-prediction model still takes its step out of infinity (one evaluation there, counted)."""
    calls = []
    flow = _zero_snr_flow("epsilon", calls)
    grid = flowdiff.make_sigmas(flow.schedule, "trailing", 5)
    noise = torch.randn(2, 3, generator=torch.Generator().manual_seed(1))
    res = flowdiff.generate(flow, noise, solver="euler", grid=grid[1:])
    assert res.x.isfinite().all() and res.stats.nfe == len(calls) == len(grid) - 2
    calls.clear()
    v_flow = _zero_snr_flow("v_prediction", calls)
    res = flowdiff.generate(v_flow, noise, solver="euler", grid=grid)
    assert res.x.isfinite().all() and res.stats.nfe == len(calls) == len(grid) - 1


def test_step_from_noise_gives_the_same_refusal():
    """The step itself refuses with the same message as the solve (one check, two callers)."""
    flow = _zero_snr_flow("epsilon", [])
    noise = torch.randn(2, 3)
    with pytest.raises(ValueError) as direct:
        flow.step_from_noise(noise, 2.0)
    with pytest.raises(ValueError) as solve:
        flowdiff.generate(flow, noise, grid="trailing", steps=3)
    assert str(direct.value) == str(solve.value)
