"""Review R20's finds on the scheduler routes: a float32 precision gap against diffusers (v-prediction on the
cosine schedule, whose σ_max is 2e4), PNDM's refusal naming DDIM's step, and the ``_use_default_values`` rule of
``scheduler_plan`` missing from ``scheduler_sigmas`` and ``config_grid``."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch

from flowdiff.engine.flow import ProbabilityFlow
from flowdiff.engine.formulations import data_field
from flowdiff.engine.options import Checks
from flowdiff.engine.scheduler_grids import config_grid, schedule_from_config, scheduler_sigmas
from flowdiff.models.pipelines import scheduler_plan
from flowdiff.tools import scheduler_suite as S

COSINE_V = {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"}


@pytest.mark.parametrize(("options", "steps"), [
    ({**COSINE_V, "use_exponential_sigmas": True}, 5),  # R20's config: 4.2e-5 off float64, diffusers 1.4e-7
    ({**COSINE_V, "use_exponential_sigmas": True}, 3),
    ({**COSINE_V, "use_karras_sigmas": True}, 3),
    (COSINE_V, 8),
    ({**COSINE_V, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}, 5),  # from σ = ∞
])
def test_dpm_solver_float32_is_as_close_to_float64_as_diffusers_own(options: dict, steps: int) -> None:
    """DPM-Solver++(2M) on the cosine schedule with v-prediction: flowdiff's float32 result is within a few times
    diffusers' own float32-vs-float64 difference of its float64 result. It was 300× that: the data variables' field
    D = x̄ − σ·ε was computed from ε = σ/(1+σ²)·x̄ + α·v, and at σ = 2e4 the difference cancels (ε's float32
    rounding times σ); D is now read off v itself, x̂₀ = x̄/(1+σ²) − σ·α·v, as diffusers reads it."""
    case = S.drawn_case("DPMSolverMultistepScheduler", options, steps)
    got32, ref32, _, _ = S.run_case(case, torch.float32, checks=Checks(growth=None))
    got64, ref64, _, _ = S.run_case(case, torch.float64, checks=Checks(growth=None))
    assert S._rel(got64, ref64) < 1e-5  # the same loop (float64 is diffusers' own to its rounding)
    ours, theirs = S._rel(got32, got64), S._rel(ref32, ref64)
    assert ours <= 4 * max(theirs, 1e-7), f"flowdiff float32 vs float64 {ours:.3g}, diffusers' {theirs:.3g}"


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_the_denoised_field_is_x_bar_minus_sigma_eps(prediction_type: str) -> None:
    """The data variables' field read off the model's prediction equals x̄ − σ·ε(x̄, σ) (float64), and in float32 at
    σ_max of the cosine schedule it is nearer the float64 value than the ε route's cancelling difference."""
    config = {"_class_name": "DDIMScheduler", "beta_schedule": "squaredcos_cap_v2", "prediction_type": prediction_type}
    schedule, _ = schedule_from_config(config)
    sigma = float(schedule.sigmas[-2])  # ~ 2e3: x̄ ≈ σ·ε
    results = {}
    for dtype in (torch.float64, torch.float32):
        flow = ProbabilityFlow(S.network(dtype), schedule, prediction_type=prediction_type)
        eps = flow.field()
        xbar = S._noise(dtype) * sigma
        direct = data_field(eps)(1.0 / sigma, xbar / sigma)
        via_eps = xbar - sigma * eps(sigma, xbar)
        results[dtype] = direct, via_eps
    direct64, via64 = results[torch.float64]
    assert torch.allclose(direct64, via64, rtol=0, atol=1e-9 * float(direct64.abs().max()) * sigma)
    direct32, via32 = results[torch.float32]
    assert S._rel(direct32, direct64) <= S._rel(via32, direct64) + 1e-7
    assert S._rel(direct32, direct64) < 1e-6


def test_a_pndm_refusal_names_pndm_step() -> None:
    """A 'trailing' PNDM loop whose step does not land on its next timestep is refused naming PNDM's step."""
    config = {"_class_name": "PNDMScheduler", "skip_prk_steps": True, "timestep_spacing": "trailing"}
    with pytest.raises(ValueError, match=r"PNDM's step from timestep") as info:
        scheduler_sigmas(config, 7)
    assert "DDIM" not in str(info.value)
    with pytest.raises(ValueError, match=r"DDIM's step from timestep"):
        scheduler_sigmas({**config, "_class_name": "DDIMScheduler", "clip_sample": False}, 7)


def test_scheduler_sigmas_and_config_grid_refuse_an_edited_use_default_values_key() -> None:
    """One rule for ``scheduler_plan``, ``scheduler_sigmas`` and ``config_grid``: a DDIM config relabelled PNDM
    carries set_alpha_to_one=True in ``_use_default_values`` (PNDMScheduler.from_config reads False); each refuses it
    naming the key, and each reads the live scheduler diffusers builds from it as diffusers does."""
    ddim = diffusers.DDIMScheduler(clip_sample=False, steps_offset=1, beta_schedule="scaled_linear",
                                   beta_start=0.00085, beta_end=0.012)
    config = {**ddim.config, "_class_name": "PNDMScheduler", "skip_prk_steps": True}
    said = r"set_alpha_to_one=True is listed in its _use_default_values"
    for read in (lambda c: scheduler_plan(c, 10), lambda c: scheduler_sigmas(c, 10),
                 lambda c: config_grid(c, "leading", 10)):
        with pytest.raises(ValueError, match=said):
            read(config)
    pndm = diffusers.PNDMScheduler.from_config(config)
    grid = scheduler_sigmas(pndm, 10)
    assert np.array_equal(grid, scheduler_plan(pndm, 10).sigmas)
    assert grid[-1] > 0  # PNDM's set_alpha_to_one=False: its last step goes to ᾱ_0, σ_min
    assert np.array_equal(config_grid(pndm, "leading", 10)[:-1], grid[:-1])


@pytest.mark.parametrize(("cls", "options"), [("EulerDiscreteScheduler", {}),
                                              ("DPMSolverMultistepScheduler", COSINE_V)])
def test_check_drawn_catches_a_float32_only_error(cls: str, options: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """R20's mask.py: check_drawn's float32 allowance counted flowdiff's own float32-vs-float64 spread, so a
    float32-only error of flowdiff's (3e-4, 30× the tolerance) excused itself. The allowance is diffusers' spread."""
    case = S.drawn_case(cls, options, 8)
    assert S.check_drawn(case, torch.float32) == "equal"
    plain = S.sample_like

    def off_in_float32(flow, noise, *args, **kwargs):  # noqa: ANN001, ANN202
        res = plain(flow, noise, *args, **kwargs)
        if noise.dtype == torch.float32:
            res.x.mul_(1 + 3e-4)
        return res

    monkeypatch.setattr(S, "sample_like", off_in_float32)
    with pytest.raises(AssertionError, match="relative difference"):
        S.check_drawn(case, torch.float32)
