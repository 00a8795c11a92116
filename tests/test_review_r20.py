"""R20's review of the session's merges (S7's scheduler configuration space, L4's robust fit, the lead's
fingerprint-first fits): each test failed before its fix."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from flowdiff.engine.flow import ProbabilityFlow
from flowdiff.engine.scheduler_grids import schedule_from_config
from flowdiff.models.pipelines import encode_like, sample_like, scheduler_plan
from flowdiff.tools.scheduler_suite import Case, _noise, _same_table, check_drawn, network

diffusers = pytest.importorskip("diffusers")


def _inverse_loop(inverse, model, x: torch.Tensor, steps: int) -> torch.Tensor:
    inverse.set_timesteps(steps)
    for t in inverse.timesteps:
        x = inverse.step(model(x, t), t, x, return_dict=False)[0]
    return x


def test_encode_like_reads_a_scheduler_as_from_config_does_without_the_defaults_its_class_filled_in() -> None:
    """A PNDM scheduler built without ``set_alpha_to_one`` holds PNDM's default False, listed in its config's
    ``_use_default_values``; ``DDIMInverseScheduler.from_config(pndm.config)`` (inversion pipelines' idiom) drops
    such keys and takes its own default, True. encode_like read False and started at σ_min: a different encode
    (relative difference 7e-3) with no error."""
    pndm = diffusers.PNDMScheduler.from_config({"skip_prk_steps": True, "clip_sample": False, "steps_offset": 1,
                                                "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                                                "beta_end": 0.012})
    assert "set_alpha_to_one" in pndm.config["_use_default_values"] and not pndm.config.set_alpha_to_one
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diffusers: skip_prk_steps is no DDIMInverseScheduler option
        inverse = diffusers.DDIMInverseScheduler.from_config(pndm.config)
    assert inverse.config.set_alpha_to_one  # diffusers' reading
    dtype, steps = torch.float64, 10
    model, images = network(dtype), _noise(dtype)
    schedule, prediction_type = schedule_from_config(dict(pndm.config))
    flow = ProbabilityFlow(model, schedule, prediction_type=prediction_type)
    _same_table(inverse, flow, dtype)
    ref = _inverse_loop(inverse, model, images.clone(), steps)
    res = encode_like(flow, images, pndm, steps)
    assert res.stats.nfe == steps
    torch.testing.assert_close(res.x, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("message", ["the timesteps do not fit one grid", "_sigmas_to_t failed",
                                     "use_karras_sigmas_v2 is unknown"])
def test_check_drawn_needs_an_option_named_as_a_whole_word(monkeypatch, message: str) -> None:
    """check_drawn accepted any refusal whose text contained an option's name anywhere: "steps" inside
    "timesteps", an option inside a longer word; such a refusal names no option the user could change."""
    from flowdiff.tools import scheduler_suite

    def refuse(case, dtype, **kwargs):
        raise ValueError(message)

    monkeypatch.setattr(scheduler_suite, "run_case", refuse)
    with pytest.raises(AssertionError, match="names no option"):
        scheduler_suite.check_drawn(scheduler_suite.drawn_case("EulerDiscreteScheduler", {}, 4), torch.float32)


@pytest.mark.parametrize("message", ["steps=1 is one step of zero length", "Only one of `config.use_beta_sigmas`, "
                                     "`config.use_karras_sigmas` can be used", "shift_terminal=0.1 is refused"])
def test_check_drawn_still_takes_a_refusal_that_names_an_option(monkeypatch, message: str) -> None:
    from flowdiff.tools import scheduler_suite

    def refuse(case, dtype, **kwargs):
        raise ValueError(message)

    monkeypatch.setattr(scheduler_suite, "run_case", refuse)
    case = scheduler_suite.drawn_case("FlowMatchEulerDiscreteScheduler", {}, 4)
    assert scheduler_suite.check_drawn(case, torch.float32) == "refused"


@pytest.mark.parametrize("config", [{"use_karras_sigmas": True}, {"shift_terminal": 0.1},
                                    {"shift": 3.0, "use_beta_sigmas": True}])
def test_flow_matching_grid_read_off_diffusers_refuses_a_pipelines_times_above_one(config) -> None:
    """A pipeline's own ``sigmas=`` above t = 1 on a grid read off diffusers (Karras, exponential, beta σ,
    ``shift_terminal``): diffusers steps from t = 1.2, flowdiff read that time as σ = ∞ (t ≥ 1) and returned another
    result (relative difference 0.04–0.19) with no error. The plain flow-matching route refuses such sigmas by name."""
    case = Case("times-above-one", "FlowMatchEulerDiscreteScheduler", config, steps=2, sigmas=(1.2, 0.5))
    assert check_drawn(case, torch.float64) == "refused"
    with pytest.raises(ValueError, match=r"sigmas=\[1\.2, 0\.5\] holds flow-matching times above 1"):
        scheduler_plan({"_class_name": "FlowMatchEulerDiscreteScheduler", **config}, 2, sigmas=[1.2, 0.5])


@pytest.mark.parametrize("config", [{}, {"use_karras_sigmas": True}])
def test_sample_like_refuses_a_flow_matching_scheduler_moved_by_set_shift(config) -> None:
    """``FlowMatchEulerDiscreteScheduler.set_shift(3.0)`` (public diffusers API) changes the loop but not the
    config; sample_like read the config's shift and returned another result (relative difference 0.044; Karras
    σ 0.017) with no error."""
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0, **config)
    scheduler.set_shift(3.0)
    with pytest.raises(ValueError, match=r"its shift is 3\.0 \(set by set_shift\) and its config's shift=1\.0"):
        scheduler_plan(scheduler, 8)
    dynamic = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, **config)
    dynamic.set_shift(3.0)  # shifts nothing: with dynamic shifting diffusers shifts by mu
    fresh = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, **config)
    assert np.array_equal(scheduler_plan(dynamic, 8, mu=0.8).sigmas, scheduler_plan(fresh, 8, mu=0.8).sigmas)
    unmoved = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, **config)
    assert np.array_equal(scheduler_plan(unmoved, 8).sigmas, scheduler_plan(dict(unmoved.config), 8).sigmas)


def test_a_dict_whose_use_default_values_key_was_edited_is_refused_by_name() -> None:
    """``{**ddim.config, "_class_name": "PNDMScheduler", "skip_prk_steps": True}`` (a DDIM scheduler's config read as
    PNDM's): DDIM filled ``set_alpha_to_one`` with its default True, listed in ``_use_default_values``;
    ``PNDMScheduler.from_config`` drops it and takes PNDM's False. sample_like kept True: its last step went to
    ᾱ = 1 instead of ᾱ_0, a result 3.5e-3 away, with no error. A dict may have been edited, so which is meant is
    refused by name; the live scheduler diffusers builds from it is reproduced."""
    ddim = diffusers.DDIMScheduler(clip_sample=False, steps_offset=1, beta_schedule="scaled_linear",
                                   beta_start=0.00085, beta_end=0.012)
    assert "set_alpha_to_one" in ddim.config["_use_default_values"]
    config = {**ddim.config, "_class_name": "PNDMScheduler", "skip_prk_steps": True}
    with pytest.raises(ValueError, match=r"set_alpha_to_one=True is listed in its _use_default_values .*"
                                         r"PNDMScheduler's own set_alpha_to_one=False"):
        scheduler_plan(config, 10)
    with pytest.raises(ValueError, match=r"clip_sample=False is listed in its _use_default_values"):
        scheduler_plan({**diffusers.DDIMScheduler().config, "clip_sample": False}, 10)  # from_config: clip_sample=True
    pndm = diffusers.PNDMScheduler.from_config(config)
    assert not pndm.config.set_alpha_to_one  # diffusers' reading
    dtype, steps = torch.float64, 10
    model, noise = network(dtype), _noise(dtype)
    schedule, prediction_type = schedule_from_config(dict(pndm.config))
    flow = ProbabilityFlow(model, schedule, prediction_type=prediction_type)
    res = sample_like(flow, noise, pndm, steps)
    _same_table(pndm, flow, dtype)
    pndm.set_timesteps(steps)
    x = noise * pndm.init_noise_sigma
    for t in pndm.timesteps:
        x = pndm.step(model(x, t), t, x, return_dict=False)[0]
    assert res.stats.nfe == len(pndm.timesteps)
    torch.testing.assert_close(res.x, x, rtol=1e-10, atol=1e-12)
