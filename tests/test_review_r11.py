"""Review of the refusals of unused knobs (Adaptive's sigma_c/sigma_end, tune(method='dp')'s search options)."""

import math
import warnings

import pytest
import torch
from _closed_form import QUICK
from _closed_form import mixture as _mixture
from _closed_form import noise as _noise

import flowdiff
from flowdiff.engine.adjoint import NO_RECORD_GRADIENT
from flowdiff.models.analytic import Gaussian

DP_QUICK = {k: v for k, v in QUICK.items() if k not in ("max_evals", "restarts")}


def _gaussian():
    g = torch.Generator().manual_seed(0)
    gauss = Gaussian(torch.randn(16, dtype=torch.float64, generator=g) * 0.5,
                     torch.rand(16, dtype=torch.float64, generator=g) * 0.3 + 0.02)
    return gauss, torch.randn(2, 16, dtype=torch.float64, generator=g)


def test_an_unset_sigma_c_does_not_refuse_a_solve_started_below_sigma_min():
    """The default c (σ_min) is the user's choice of nothing: a dopri5 solve (and reference_solution, which
    cannot set sigma_c at all) started below σ_min was refused as 'sigma_c must lie in (0, σ_start)'."""
    gauss, noise = _gaussian()
    flow = gauss.flow()
    s0 = flow.schedule.sigma_min / 2
    exact = gauss.solution(noise * math.sqrt(1 + s0**2), s0, 0.0)
    tol = 1e-7
    r = flowdiff.generate(flow, noise, solver="dopri5", adaptive=flowdiff.Adaptive(rtol=tol, atol=tol, sigma_start=s0))
    assert r.sigmas[0] == s0 and r.sigmas[-1] == 0.0
    assert float((r.x - exact).pow(2).mean().sqrt()) < 100 * tol
    ref = flowdiff.reference_solution(flow, noise, sigma_start=s0, sigma_end=0.0, rtol=tol, atol=tol)
    assert float((ref.x - exact).pow(2).mean().sqrt()) < 100 * tol


def test_a_sigma_c_the_user_sets_is_still_range_checked():
    gauss, noise = _gaussian()
    flow = gauss.flow()
    s0 = flow.schedule.sigma_min / 2
    with pytest.raises(ValueError, match=r"sigma_c must lie in \(0, σ_start=.*got 0\.5"):
        flowdiff.generate(flow, noise, solver="dopri5", adaptive=flowdiff.Adaptive(sigma_start=s0, sigma_c=0.5))


def test_dp_refuses_free_start_which_only_the_search_uses():
    """free_start lets the search move the first σ; method='dp' runs none and returned the same grid with it."""
    flow = _mixture()
    with pytest.raises(ValueError, match=r"free_start=True .*method='dp' does not run.*dp\+search"):
        flowdiff.tune(flow, _noise(1), solver="euler", nfe=4, method="dp", free_start=True, **DP_QUICK)
    with pytest.raises(TypeError, match="free_start must be a bool, got str"):
        flowdiff.tune(flow, _noise(1), solver="euler", nfe=4, method="dp", free_start="yes", **DP_QUICK)
    tuned = flowdiff.tune(flow, _noise(1), solver="euler", nfe=4, method="dp", free_start=False, **DP_QUICK)
    assert tuned.sigmas[0] == flow.schedule.sigma_max


class _Net(torch.nn.Module):
    """A field with parameters that require a gradient (as an unfrozen network's do in a script)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 4, dtype=torch.float64)

    def forward(self, x, t):
        return torch.tanh(self.lin(x)) * (1.0 + t.to(x.dtype)[:, None] / 1000.0)


def test_the_record_warning_is_silent_under_inference_mode_and_once_per_solve():
    """Under torch.inference_mode nothing is differentiated (no warning); a differentiated solve with a callback
    warns once, not once per step, from the caller's line (Save's states carry gradients: no warning for them)."""
    flow = flowdiff.ProbabilityFlow(_Net(), flowdiff.Schedule.linear())
    x = torch.randn(2, 4, dtype=torch.float64)
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.inference_mode():
            flowdiff.generate(flow, x, solver="heun", steps=4, adjoint="checkpoint", callback=seen.append)
        res = flowdiff.generate(flow, x, solver="heun", steps=4, adjoint="checkpoint", save=flowdiff.Save(steps=True))
    assert all(s.x.requires_grad for s in res.saved)  # differentiated through the parameters, no warning
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        res = flowdiff.generate(flow, x, solver="heun", steps=4, adjoint="checkpoint", callback=seen.append)
    assert [r.filename for r in w if NO_RECORD_GRADIENT in str(r.message)] == [__file__]
    assert res.x.requires_grad and len(seen) == 8  # differentiated through the parameters, every step called back
