"""flowdiff reproduces a diffusers scheduler's loop, or refuses it by name: an equivalence suite.

Every case builds one diffusers scheduler, runs diffusers' own loop (``set_timesteps``,
``scale_model_input``, ``step``) on a fixed random float64 network, and runs flowdiff's documented
route on the same network and noise: :func:`flowdiff.sample_like` for samplers,
``flowdiff.encode(..., solver="ddim_inverse")`` for ``DDIMInverseScheduler``. The outcome must be
the one the case names: ``equal`` (max relative difference ≤ 1e-5 in float32; ≤ 1e-10 in float64
where diffusers' step keeps the caller's dtype, DDIM, DDIMInverse and PNDM on the same ᾱ table —
Euler, Heun, LMS, DPM-Solver and flow matching compute their step in float32 whatever the sample's
dtype), with diffusers' number of network calls (less its zero-length σ_min → σ_min steps), or
``refused`` with a ``ValueError`` naming the option (or class) and why. The table of outcomes is
:data:`CASES`; ``benchmarks/bench_scheduler_suite.py`` writes it with the measured differences.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import flowdiff
import solvers
from flowdiff.engine.scheduler_grids import class_name
from flowdiff.models.pipelines import scheduler_plan
from flowdiff.tools.scheduler_suite import CASES, Case, run_case

REL = {torch.float32: 1e-5, torch.float64: 1e-10}


def _ids(case: Case) -> str:
    return case.name


@pytest.mark.parametrize("case", [c for c in CASES if c.expect == "equal"], ids=_ids)
def test_equal_to_diffusers(case: Case) -> None:
    for dtype in case.dtypes:
        got, ref, nfe, calls = run_case(case, dtype)
        assert nfe == calls - case.skipped, f"{case.name}: flowdiff evaluated the model {nfe} times, diffusers {calls}"
        rel = float((got - ref).abs().max() / ref.abs().max())
        assert rel <= REL[dtype], f"{case.name} {dtype}: relative difference {rel:.3g}"


@pytest.mark.parametrize("case", [c for c in CASES if c.expect != "equal"], ids=_ids)
def test_refused_by_name(case: Case) -> None:
    with pytest.raises(ValueError) as info:
        run_case(case, torch.float32)
    message = str(info.value)
    assert case.expect in message, f"{case.name}: the refusal does not name {case.expect!r}: {message}"
    assert any(w in message for w in ("not ", "no ", "accepted", "reproduced")), message


def test_the_suite_distinguishes_timesteps() -> None:
    """The network depends on its timestep enough that feeding t(σ) instead of the scheduler's
    integer timesteps is caught: the Karras DPM-Solver case differs by far more than the tolerance."""
    case = next(c for c in CASES if c.name == "dpm2m-karras")
    got, ref, _, _ = run_case(case, torch.float32, feed_scheduler_timesteps=False)
    assert float((got - ref).abs().max() / ref.abs().max()) > 10 * REL[torch.float32]


def test_flow_timesteps_option_is_checked() -> None:
    model = lambda x, t: x  # noqa: E731
    schedule = flowdiff.Schedule.linear()
    with pytest.raises(TypeError, match="timesteps must be a mapping"):
        flowdiff.ProbabilityFlow(model, schedule, timesteps=[1.0])
    with pytest.raises(ValueError, match="timesteps must map"):
        flowdiff.ProbabilityFlow(model, schedule, timesteps={-1.0: 3})
    flow = flowdiff.ProbabilityFlow(model, schedule)
    fed = flow.with_timesteps({float(schedule.sigmas[10]): 999.0})
    seen = []
    fed.model = lambda x, t: (seen.append(float(t[0])), x)[1]
    fed.eps(torch.ones(1, 2, dtype=torch.float64), float(schedule.sigmas[10]))
    fed.eps(torch.ones(1, 2, dtype=torch.float64), float(schedule.sigmas[20]))
    assert seen == [999.0, 20.0] and flow.timesteps == {}


@pytest.mark.parametrize("cls", ["DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler",
                                 "FlowMatchEulerDiscreteScheduler", "PNDMScheduler"])
def test_config_without_class_name_is_recognised_by_its_keys(cls):
    """A full config without ``_class_name`` (a live ``scheduler.config`` as a dict) is the class whose
    parameters are exactly its keys: SDXL's Euler config is not read as DDIM, PNDM's (with its PRK warm-up)
    is refused for PNDM's own reason, not for DDIM's clip_sample."""
    import diffusers

    config = dict(getattr(diffusers, cls)().config)
    config.pop("_class_name", None)
    # (and without the list of keys its class filled in: from_config would drop the edited clip_sample=False below)
    config.pop("_use_default_values", None)
    assert class_name(config) == cls
    if cls == "PNDMScheduler":
        with pytest.raises(ValueError, match="skip_prk_steps=False is not reproduced"):
            scheduler_plan(config, 5)
    else:
        named = scheduler_plan({**config, "_class_name": cls, "clip_sample": False}, 5)
        plan = scheduler_plan({**config, "clip_sample": False} if cls == "DDIMScheduler" else config, 5)
        assert plan.scheduler == cls and np.array_equal(plan.sigmas, named.sigmas)


def test_config_whose_keys_fit_several_schedulers_is_refused():
    config = {"beta_schedule": "scaled_linear", "set_alpha_to_one": False, "steps_offset": 1}
    assert class_name(config) is None
    with pytest.raises(ValueError, match="no _class_name.*DDIMScheduler.*add _class_name"):
        scheduler_plan(config, 5)
    with pytest.raises(ValueError, match="no _class_name"):
        flowdiff.scheduler_sigmas(config, 5)


def test_lower_order_final_is_what_makes_few_step_dpm_solver_equal():
    """Below 15 steps diffusers' DPM-Solver++(2M) to σ_min takes its last step at first order: dpmpp_2m
    without ``lower_order_final`` differs by far more than the tolerance, with it equals diffusers."""
    import diffusers

    from flowdiff.tools.scheduler_suite import network

    config = {"_class_name": "DPMSolverMultistepScheduler", "final_sigmas_type": "sigma_min"}
    model = network(torch.float32)
    noise = torch.randn(2, 6, generator=torch.Generator().manual_seed(1))
    sched = diffusers.DPMSolverMultistepScheduler.from_config(config)
    sched.set_timesteps(8)
    x = noise.clone()
    for t in sched.timesteps:
        x = sched.step(model(x, t), t, x, return_dict=False)[0]
    schedule, _ = flowdiff.models.diffusers_io.schedule_from_config(config)
    flow = flowdiff.ProbabilityFlow(model, schedule)

    def rel(**options):
        y = flowdiff.sample_like(flow, noise, config, 8, solver=solvers.get("dpmpp_2m", **options)).x
        return float((y - x).abs().max() / x.abs().max())

    assert rel(lower_order_final=True) <= REL[torch.float32]
    assert rel() > 10 * REL[torch.float32]
    with pytest.raises(TypeError, match="lower_order_final must be True or False"):
        rel(lower_order_final=1)


def test_readme_table_is_the_suites():
    """README's scheduler table is generated from :data:`CASES` (``readme_table``); it must be current."""
    from pathlib import Path

    from flowdiff.tools.scheduler_suite import readme_table

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    start, end = "<!-- scheduler-suite-start -->\n", "<!-- scheduler-suite-end -->"
    assert start in text and end in text
    committed = text.split(start, 1)[1].split(end, 1)[0]
    assert committed == readme_table(), ("README's scheduler table is stale: paste "
                                         "flowdiff.tools.scheduler_suite.readme_table() between its markers")


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_a_diffusers_flow_reads_grid_names_through_its_scheduler_config(spacing):
    """A flow that carries its scheduler config (from_diffusers) resolves ``grid="leading"``/``"trailing"``
    through it: with ``steps_offset=1`` plain ``generate`` is diffusers' DDIM loop; a plain flow's generic
    grid ignores the offset and differs. With ``set_alpha_to_one=False`` the named grid still ends at the
    image (σ = 0), one step past diffusers' σ_min, whose loop is ``sample_like``'s."""
    import diffusers

    from flowdiff.models.pipelines import DiffusersFlow
    from flowdiff.tools.scheduler_suite import network

    config = {"_class_name": "DDIMScheduler", "clip_sample": False, "beta_schedule": "scaled_linear",
              "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1, "timestep_spacing": spacing}
    model = network(torch.float64)
    schedule, _ = flowdiff.models.diffusers_io.schedule_from_config(config)
    sched = diffusers.DDIMScheduler.from_config(config)
    sched.set_timesteps(10)
    sched.alphas_cumprod = torch.tensor(schedule.alphas_cumprod)
    sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    noise = torch.randn(2, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = noise.clone()
    for t in sched.timesteps:
        x = sched.step(model(x, t), t, x).prev_sample
    flow = DiffusersFlow(model, schedule)
    flow.scheduler_config = config
    res = flowdiff.generate(flow, noise, solver="euler", steps=10, grid=spacing)
    assert res.stats.nfe == 10 and res.sigmas[-1] == 0
    assert float((res.x - x).abs().max() / x.abs().max()) <= REL[torch.float64]
    plain = flowdiff.generate(flowdiff.ProbabilityFlow(model, schedule), noise, solver="euler", steps=10, grid=spacing)
    if spacing == "leading":  # diffusers' trailing ignores steps_offset: there the generic grid is the same
        assert float((plain.x - x).abs().max() / x.abs().max()) > 1e-4
    flow.scheduler_config = {**config, "set_alpha_to_one": False}
    short = flowdiff.sample_like(flow, noise, steps=10)
    assert short.sigmas[-1] == schedule.sigma_min
    assert np.array_equal(short.sigmas[:-1], flowdiff.generate(flow, noise, steps=10, grid=spacing).sigmas[:-1])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_encode_with_ddim_inverse_is_diffusers_for_every_prediction_type(prediction_type):
    """``encode(solver="ddim_inverse")`` itself (not only ``encode_like``) reads the prediction at the
    sample's level, as DDIMInverseScheduler does: v-prediction models were 0.3 relative off."""
    import diffusers

    from flowdiff.tools.scheduler_suite import network

    config = {"clip_sample": False, "timestep_spacing": "trailing", "prediction_type": prediction_type}
    model = network(torch.float64)
    schedule, _ = flowdiff.models.diffusers_io.schedule_from_config(config)
    sched = diffusers.DDIMInverseScheduler.from_config(config)
    sched.set_timesteps(10)
    sched.alphas_cumprod = torch.tensor(schedule.alphas_cumprod)
    sched.initial_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    images = torch.randn(2, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    z = images.clone()
    for t in sched.timesteps:
        z = sched.step(model(z, t), t, z).prev_sample
    flow = flowdiff.ProbabilityFlow(model, schedule, prediction_type=prediction_type)
    enc = flowdiff.encode(flow, images, solver="ddim_inverse", steps=10, grid="trailing")
    assert enc.stats.nfe == 10 and enc.latent.solver == "ddim_inverse"
    assert float((enc.x - z).abs().max() / z.abs().max()) <= REL[torch.float64]


def test_a_stable_diffusion_1_5_folder_with_its_pndm_scheduler_is_the_pipeline(tmp_path):
    """SD 1.5's folders ship ``PNDMScheduler(skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)``:
    ``sample_like`` on such a folder is ``StableDiffusionPipeline``'s loop, guidance and prompts included."""
    from flowdiff.models import tiny_pipelines

    pipe, path = tiny_pipelines.stable_diffusion(tmp_path, scheduler="PNDMScheduler", skip_prk_steps=True,
                                                 steps_offset=1, set_alpha_to_one=False)
    flow = flowdiff.from_diffusers(path)
    prompts, negative = ["a cat", "dog"], ["bad", ""]
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = pipe(prompts, num_inference_steps=5, guidance_scale=7.5, output_type="latent", latents=noise.clone(),
                   height=16, width=16, negative_prompt=negative).images
    guided = flowdiff.classifier_free_guidance(flow, 7.5, unconditional_kwargs=flow.encode_prompt(negative))
    ours = flowdiff.sample_like(guided, noise, steps=5, model_kwargs=flow.encode_prompt(prompts))
    assert ours.solver == "pndm" and ours.stats.nfe == 6  # PNDM's first step evaluates twice
    torch.testing.assert_close(ours.x, ref, rtol=2e-5, atol=2e-5)


def test_an_sdxl_folder_with_its_prompts_and_euler_scheduler_is_the_pipeline(tmp_path):
    """An SDXL folder loads its two text encoders: ``encode_prompt`` gives the concatenated hidden states,
    the pooled embedding and the size ids, and ``sample_like`` with guidance is ``StableDiffusionXLPipeline``."""
    from flowdiff.models import tiny_pipelines

    pipe, path = tiny_pipelines.stable_diffusion_xl(tmp_path)
    flow = flowdiff.from_diffusers(path)
    assert flow.default_guidance == 5.0
    prompts, negative = ["a cat", "dog"], ["bad", "ugly"]
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = pipe(prompts, num_inference_steps=5, guidance_scale=5.0, output_type="latent", latents=noise.clone(),
                   height=16, width=16, negative_prompt=negative).images
    cond = flow.encode_prompt(prompts)
    assert set(cond) == {"encoder_hidden_states", "text_embeds", "time_ids"}
    assert cond["time_ids"].tolist() == [[16, 16, 0, 0, 16, 16]] * 2
    guided = flowdiff.classifier_free_guidance(flow, 5.0, unconditional_kwargs=flow.encode_prompt(negative))
    ours = flowdiff.sample_like(guided, noise, steps=5, model_kwargs=cond)
    assert ours.stats.nfe == 5
    torch.testing.assert_close(ours.x, ref, rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match="text_embeds and time_ids"):
        text_only = {"encoder_hidden_states": cond["encoder_hidden_states"]}
        flowdiff.sample_like(flow, noise, steps=2, model_kwargs=text_only)
