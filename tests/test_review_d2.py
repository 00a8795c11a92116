"""Review D2: diffusers' samplers off their default configurations are reproduced or refused by name.

A hostile reviewer's property: for every scheduler class that :func:`flowdiff.sample_like` or
:func:`flowdiff.encode_like` claims (``PLANNED_SCHEDULERS``: DDIM, PNDM, Euler, Heun, LMS, DPM-Solver
multistep, flow matching; ``DDIMInverseScheduler``, and DDIM and PNDM configs read as one), and for
configurations drawn across the fields users report trouble with (``timestep_spacing`` ×
``steps_offset`` × ``set_alpha_to_one`` × ``rescale_betas_zero_snr`` × ``prediction_type`` ×
``clip_sample``/``thresholding``, Karras/exponential/beta/λ σ, ``final_sigmas_type``,
``lower_order_final``/``euler_at_final``, ``trained_betas``, flow matching's shift, ``mu`` and a
pipeline's own ``sigmas=``, step counts up to and past ``num_train_timesteps``), flowdiff either gives
diffusers' own loop result — run in the test on the suite's random network and noise, to the suite's
float32 tolerance, with diffusers' number of network calls less its zero-length steps — or raises a
``ValueError`` naming the field and its value (or the class, or ``steps``, or passing diffusers' own
refusal of the config through). Never a silent mismatch. Where diffusers' own loop fails or gives
non-finite latents, flowdiff must refuse too. The schedulers flowdiff does not reproduce (UniPC, DEIS,
DPM-Solver singlestep, …) are refused by class for any drawn config. Each counter-example the property
found is kept below, minimised, as a regression test. More examples: ``pytest --slow`` (300 a class).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st

from flowdiff import Checks
from flowdiff.models.pipelines import PLANNED_SCHEDULERS
from flowdiff.tools.scheduler_suite import Case, _noise, network, run_case

REL = 1e-5  # the equivalence suite's float32 tolerance (tests/test_scheduler_equivalence.py) relative to the result
#: ... or a few float32 rounding units of the loop's initial latents, whichever is larger: a loop that starts at
#: σ_max ≈ 2e4 (cosine betas, 'trailing') and lands near the data cancels 2e4-sized terms in float32 in diffusers'
#: own step, so its result is that much less precise than the result's own size (measured: 8e-4 relative, 0.3 units).
#: A float32 difference beyond that is looked at again in float64, diffusers' σ tables made float64 too (LMS with
#: v_prediction on a 97-step Karras grid of a 100-step schedule: 6.8e-5 apart in float32, 8e-5 on float64 samples with
#: diffusers' float32 σ — its σ²+1 rounded, divided by σ_min = 0.01 — and 1.3e-13 with its σ in float64)
ULPS, EPS32 = 4, float(torch.finfo(torch.float32).eps)
DTYPE = torch.float32
#: the schedulers whose float64 run in the suite (run_case) already uses flowdiff's float64 ᾱ table
SAME_TABLE = ("DDIMScheduler", "PNDMScheduler", "DDIMInverseScheduler")
SIGMA_KINDS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
#: the divergence guard off: the random network is no denoiser, so one step from σ_max ≈ 2e4 (cosine betas) lands
#: far from the data in both libraries; the property is about reproducing diffusers' loop, whatever it gives
NO_GUARD = Checks(growth=None)
SD_BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}

#: 40 draws per class by default (about 30 s for the file on one core), the long profile's count with --slow
common = settings(max_examples=max(40, settings.default.max_examples), deadline=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- strategies -----------------------------------------------------------------------------------------------------

@st.composite
def _training(draw: Any, predictions: tuple[str, ...] = ("epsilon", "v_prediction", "sample")) -> dict[str, Any]:
    """The training fields every VP scheduler shares: T, betas, zero SNR, prediction type (from ``predictions``)."""
    config: dict[str, Any] = {"num_train_timesteps": draw(st.sampled_from([1000, 100]))}
    betas = draw(st.sampled_from(["linear", "sd", "squaredcos_cap_v2", "trained"]))
    if betas == "trained":  # a table of the config's own, linear in sqrt(β) and rounded as JSON keeps it
        T = config["num_train_timesteps"]
        config["trained_betas"] = [round((0.03 + 0.11 * i / (T - 1)) ** 2, 8) for i in range(T)]
    else:
        config.update(SD_BETAS if betas == "sd" else {"beta_schedule": betas})
    config["rescale_betas_zero_snr"] = draw(st.booleans())
    config["prediction_type"] = draw(st.sampled_from(predictions))
    return config


@st.composite
def _spacing(draw: Any, spacings: tuple[str, ...] = ("leading", "trailing", "linspace")) -> dict[str, Any]:
    spacing = draw(st.sampled_from([*spacings] * 3 + ["uniform"]))  # 'uniform': a misspelt spacing, refused
    return {"timestep_spacing": spacing, "steps_offset": draw(st.sampled_from([0, 1, 2]))}


def _steps(draw: Any, config: dict[str, Any]) -> int:
    """A step count: few, or (on a 100-step training schedule) up to num_train_timesteps and one past it."""
    T = config["num_train_timesteps"]
    return draw(st.integers(1, 12) | st.integers(T - 3, T + 1)) if T <= 100 else draw(st.integers(1, 12))


#: an option that leaves what flowdiff reproduces, drawn one time in four so that most draws stay comparable
RARELY = st.sampled_from([False, False, False, True])
#: one time in eight: DPM-Solver has six such options, and most draws should still reach diffusers' loop
SELDOM = st.sampled_from([False] * 7 + [True])


def _sigma_kind(draw: Any) -> dict[str, Any]:
    """Mostly none or one of Karras/exponential/beta σ; rarely two, which diffusers itself refuses."""
    kinds = draw(st.sampled_from([(), (), (), *((k,) for k in SIGMA_KINDS), SIGMA_KINDS[:2]]))
    return {k: True for k in kinds}


@st.composite
def ddim_cases(draw: Any, cls: str = "DDIMScheduler") -> Case:
    config = {**draw(_training()), **draw(_spacing()), "set_alpha_to_one": draw(st.booleans()),
              "clip_sample": draw(RARELY)}
    if cls == "DDIMScheduler":
        config["thresholding"] = draw(RARELY)
    return Case("drawn", cls, config, steps=_steps(draw, config))


@st.composite
def pndm_cases(draw: Any) -> Case:
    # PNDM refuses v and x̂₀ predictions (its ε conversion is not the ODE's): drawn one time in four
    config = {**draw(_training(("epsilon", "epsilon", "epsilon", "v_prediction"))), **draw(_spacing()),
              "set_alpha_to_one": draw(st.booleans()), "skip_prk_steps": not draw(RARELY)}
    return Case("drawn", "PNDMScheduler", config, steps=_steps(draw, config))


@st.composite
def euler_cases(draw: Any) -> Case:
    config = {**draw(_training()), **draw(_spacing()), **_sigma_kind(draw),
              "interpolation_type": draw(st.sampled_from(["linear", "log_linear"])),
              "final_sigmas_type": draw(st.sampled_from(["zero", "sigma_min"])),
              "timestep_type": draw(st.sampled_from(["discrete", "continuous"]))}
    if any(config.get(k) for k in SIGMA_KINDS):  # their range, from the config instead of the training schedule
        config["sigma_min"], config["sigma_max"] = draw(st.sampled_from([(None, None), (0.1, 10.0), (0.05, None)]))
    return Case("drawn", "EulerDiscreteScheduler", config, steps=_steps(draw, config))


@st.composite
def heun_cases(draw: Any) -> Case:
    config = {**draw(_training()), **draw(_spacing()), **_sigma_kind(draw), "clip_sample": draw(RARELY)}
    config.pop("rescale_betas_zero_snr")  # not a Heun field
    return Case("drawn", "HeunDiscreteScheduler", config, steps=_steps(draw, config))


@st.composite
def lms_cases(draw: Any) -> Case:
    config = {**draw(_training()), **draw(_spacing()), **_sigma_kind(draw)}
    config.pop("rescale_betas_zero_snr")  # not an LMS field
    return Case("drawn", "LMSDiscreteScheduler", config, steps=_steps(draw, config))


@st.composite
def dpm_cases(draw: Any) -> Case:
    config = {**draw(_training()), **draw(_spacing()), **_sigma_kind(draw),
              "solver_order": draw(st.sampled_from([1, 1, 1, 2, 2, 2, 2, 3])),
              "algorithm_type": draw(st.sampled_from(["dpmsolver++"] * 14 + ["dpmsolver", "sde-dpmsolver++"])),
              "solver_type": draw(st.sampled_from(["midpoint"] * 7 + ["heun"])),
              "lower_order_final": draw(st.booleans()), "euler_at_final": draw(st.booleans()),
              "use_lu_lambdas": draw(st.booleans()),
              "final_sigmas_type": draw(st.sampled_from(["zero", "sigma_min"])),
              "thresholding": draw(SELDOM),
              "lambda_min_clipped": draw(st.sampled_from([-math.inf, -5.1])),
              "variance_type": draw(st.sampled_from([None] * 7 + ["learned_range"])),
              "use_flow_sigmas": draw(st.sampled_from([False] * 8 + [True]))}
    return Case("drawn", "DPMSolverMultistepScheduler", config, steps=_steps(draw, config))


@st.composite
def flow_matching_cases(draw: Any) -> Case:
    """FlowMatchEuler: static or dynamic shift (``mu``), its refused options, a pipeline's own ``sigmas``."""
    config: dict[str, Any] = {"num_train_timesteps": draw(st.sampled_from([1000, 100])),
                              "shift": draw(st.sampled_from([1.0, 3.0, 0.5])),
                              "use_dynamic_shifting": draw(st.booleans()),
                              "time_shift_type": draw(st.sampled_from(["exponential", "linear"]))}
    for key in ("invert_sigmas", "stochastic_sampling", *SIGMA_KINDS):
        if draw(st.sampled_from([False] * 8 + [True])):
            config[key] = True
    if draw(st.sampled_from([False] * 8 + [True])):
        config["shift_terminal"] = 0.1
    steps = _steps(draw, config)
    mu = draw(st.floats(0.3, 1.5)) if config["use_dynamic_shifting"] else None
    sigmas = None
    if draw(st.booleans()):  # a pipeline's own unshifted times: Flux's linspace(1, 1/steps, steps), or drawn ones
        drawn = draw(st.lists(st.floats(0.01, 1.0), min_size=steps, max_size=steps, unique=True))
        sigmas = tuple(sorted(drawn, reverse=True)) if draw(st.booleans()) else \
            tuple(np.linspace(1.0, 1 / steps, steps).tolist())
    return Case("drawn", "FlowMatchEulerDiscreteScheduler", config, steps=steps, mu=mu, sigmas=sigmas)


@st.composite
def flow_matching_heun_cases(draw: Any) -> Case:
    """FlowMatchHeun: its two fields (``shift``, ``num_train_timesteps``), now and then FlowMatchEuler's keys that
    Heun does not have (``use_dynamic_shifting``, karras σ, ...: diffusers' ``from_config`` ignores them; a Heun
    config with ``use_dynamic_shifting`` had no way through flowdiff, and its shift was read as 1), and a pipeline's
    own ``sigmas``/``mu``, which its ``set_timesteps`` does not take (diffusers raises; flowdiff must refuse)."""
    config: dict[str, Any] = {"num_train_timesteps": draw(st.sampled_from([1000, 100])),
                              "shift": draw(st.sampled_from([1.0, 3.0, 0.5]))}
    others = {"use_dynamic_shifting": st.booleans(), "base_shift": st.sampled_from([0.5, 0.3]),
              "max_shift": st.sampled_from([1.15, 2.0]), "time_shift_type": st.sampled_from(["exponential", "linear"]),
              "shift_terminal": st.sampled_from([None, 0.1]), "invert_sigmas": st.booleans(),
              "stochastic_sampling": st.booleans(), **{kind: st.booleans() for kind in SIGMA_KINDS}}
    for key in draw(st.lists(st.sampled_from(sorted(others)), max_size=3, unique=True)):
        config[key] = draw(others[key])
    steps = _steps(draw, config)
    extra = draw(st.sampled_from([None] * 6 + ["mu", "sigmas"]))
    mu = 0.8 if extra == "mu" else None
    sigmas = tuple(np.linspace(1.0, 1 / steps, steps).tolist()) if extra == "sigmas" else None
    return Case("drawn", "FlowMatchHeunDiscreteScheduler", config, steps=steps, mu=mu, sigmas=sigmas)


STRATEGIES = {
    "DDIMScheduler": ddim_cases(),
    "DDIMInverseScheduler": ddim_cases("DDIMInverseScheduler"),
    "PNDMScheduler": pndm_cases(),
    "EulerDiscreteScheduler": euler_cases(),
    "HeunDiscreteScheduler": heun_cases(),
    "LMSDiscreteScheduler": lms_cases(),
    "DPMSolverMultistepScheduler": dpm_cases(),
    "FlowMatchEulerDiscreteScheduler": flow_matching_cases(),
    "FlowMatchHeunDiscreteScheduler": flow_matching_heun_cases(),
}


# -- the property ---------------------------------------------------------------------------------------------------

def _flowdiff_route(case: Case) -> Any:
    """flowdiff's documented route for ``case`` alone: ``encode_like`` for DDIMInverse, else ``sample_like``."""
    from flowdiff import ProbabilityFlow, encode_like, sample_like
    from flowdiff.engine.scheduler_grids import schedule_from_config

    config = {"_class_name": case.cls, **case.config}
    schedule, prediction_type = schedule_from_config(config)
    flow = ProbabilityFlow(network(DTYPE, int(config.get("num_train_timesteps", 1000))), schedule,
                           prediction_type=prediction_type)
    if case.cls == "DDIMInverseScheduler":
        return encode_like(flow, _noise(DTYPE), config, case.steps, checks=NO_GUARD)
    return sample_like(flow, _noise(DTYPE), config, case.steps, mu=case.mu, sigmas=case.sigmas, checks=NO_GUARD)


def _set_timesteps_arguments(case: Case) -> dict[str, Any]:
    return {k: v for k, v in (("mu", case.mu), ("sigmas", case.sigmas)) if v is not None}


def _diffusers_loop(case: Case) -> tuple[Any, Exception | None]:
    """diffusers' scheduler after ``set_timesteps`` and its loop's latents, or the error its loop raised."""
    import diffusers

    config = dict(case.config)
    model = network(DTYPE, int(config.get("num_train_timesteps", 1000)))
    try:
        sched = getattr(diffusers, case.cls).from_config(config)
        sched.set_timesteps(case.steps, **_set_timesteps_arguments(case))
        x = _noise(DTYPE) * getattr(sched, "init_noise_sigma", 1.0)
        for t in sched.timesteps:
            inp = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
            x = sched.step(model(inp, t), t, x, return_dict=False)[0]
    except Exception as e:  # noqa: BLE001 - any failure of diffusers' own loop is what flowdiff must refuse
        return None, e
    return sched, None if torch.isfinite(x).all() else FloatingPointError("non-finite latents")


def _diffusers_float64(case: Case) -> torch.Tensor:
    """diffusers' loop on float64 samples with its float tables (σ, ᾱ, λ, …) made float64 after
    ``set_timesteps``: its own arithmetic without float32 rounding (Euler and DPM-Solver still step in float32)."""
    import diffusers

    sched = getattr(diffusers, case.cls).from_config(dict(case.config))
    sched.set_timesteps(case.steps, **_set_timesteps_arguments(case))
    for name, value in list(vars(sched).items()):
        if name != "timesteps" and isinstance(value, torch.Tensor) and value.is_floating_point():
            setattr(sched, name, value.double())
    model = network(torch.float64, int(case.config.get("num_train_timesteps", 1000)))
    x = _noise(torch.float64) * float(getattr(sched, "init_noise_sigma", 1.0))
    for t in sched.timesteps:
        inp = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
        x = sched.step(model(inp, t), t, x, return_dict=False)[0]
    return x


def _zero_length_steps(sched: Any, case: Case) -> int:
    """diffusers' loop steps that go from a level to the same level (one model call, sample unchanged)."""
    if hasattr(sched, "sigmas") and case.cls not in ("DDIMScheduler", "PNDMScheduler", "DDIMInverseScheduler"):
        sig = sched.sigmas.double().numpy()
        if case.cls in ("HeunDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"):
            # its levels; a step costs two calls, the last (into 0) one
            sig = np.append(sig[0::2], sig[-1])[: len(sched.timesteps) // 2 + 2]
            return int(sum(2 if end > 0 else 1 for start, end in zip(sig[:-1], sig[1:]) if start == end))
        sig = sig[: len(sched.timesteps) + 1]
        return int(np.sum(np.diff(sig) == 0))
    acp = sched.alphas_cumprod.double().numpy()
    ts = sched.timesteps.numpy().astype(np.int64)
    ratio = case.config.get("num_train_timesteps", 1000) // case.steps
    if case.cls == "DDIMInverseScheduler":
        start = ts[0] - ratio
        return int(start < 0 and not sched.config.set_alpha_to_one and ts[0] == 0)
    last = ts[-1] - ratio
    end = acp[last] if last >= 0 else (1.0 if sched.config.set_alpha_to_one else acp[0])
    return int(end == acp[ts[-1]])


def _names_what_it_refuses(message: str, case: Case, failure: Exception | None) -> bool:
    """The refusal names a field with its value, or the class, or the step count; or it is diffusers' own
    refusal of the config (``from_config``/``set_timesteps`` raising), passed through."""
    if failure is not None and str(failure) == message:
        return True
    if case.cls in message or f"steps={case.steps}" in message:
        return True
    for key, value in (*case.config.items(), *_set_timesteps_arguments(case).items()):
        if not key.startswith("_") and key in message and (repr(value) in message or str(value) in message):
            return True
    return False


def _difference(got: torch.Tensor, ref: torch.Tensor, sched: Any) -> tuple[float, float]:
    """The largest difference of the two results, and the float rounding allowed for it."""
    start = float(_noise(DTYPE).abs().max()) * float(getattr(sched, "init_noise_sigma", 1.0))
    return float((got - ref).abs().max()), max(REL * float(ref.abs().max()), ULPS * EPS32 * start)


def _event(text: str) -> None:
    """An outcome for ``--hypothesis-show-statistics`` (how many draws were compared, how many refused and why)."""
    if currently_in_test_context():
        event(text)


def check_reproduced_or_refused(case: Case) -> None:
    """The property: diffusers' result to float rounding with its NFE, or a ValueError naming the field and value."""
    sched, failure = _diffusers_loop(case)
    try:
        if failure is not None:  # no reference to compare with: flowdiff must refuse, and by name
            _flowdiff_route(case)
            raise AssertionError(f"{case}: flowdiff returned a result where diffusers' own loop failed ({failure!r})")
        got, ref, nfe, calls = run_case(case, DTYPE, checks=NO_GUARD)
    except ValueError as e:
        assert _names_what_it_refuses(str(e), case, failure), f"{case}: the refusal names no field and value: {e}"
        _event(f"refused: {str(e)[:60]}")
        return
    _event("reproduced")
    assert torch.isfinite(got).all(), f"{case}: flowdiff returned non-finite latents"
    diff, allowed = _difference(got, ref, sched)
    if diff > allowed:  # diffusers' float32 σ arithmetic may lose more than flowdiff's: both again in float64
        got64, ref64, _, _ = run_case(case, torch.float64, checks=NO_GUARD)
        if case.cls not in SAME_TABLE:
            ref64 = _diffusers_float64(case)
        diff64, allowed64 = _difference(got64, ref64, sched)
        assert diff64 <= allowed64, (f"{case}: silent mismatch, max difference {diff:.3g} in float32 "
                                     f"(> {allowed:.3g}), {diff64:.3g} in float64 (> {allowed64:.3g})")
    skipped = _zero_length_steps(sched, case)
    assert nfe == calls - skipped, f"{case}: flowdiff {nfe} network calls, diffusers {calls} ({skipped} zero-length)"


@pytest.mark.parametrize("cls", list(STRATEGIES))
@common
@given(data=st.data())
def test_reproduced_or_refused_by_name(cls: str, data: Any) -> None:
    check_reproduced_or_refused(data.draw(STRATEGIES[cls], label="case"))


@common
@given(case=ddim_cases())
def test_a_ddim_config_given_to_encode_like_is_ddim_inverse_or_refused(case: Case) -> None:
    """encode_like also takes a DDIMScheduler config (a pipeline's own), read as diffusers'
    ``DDIMInverseScheduler.from_config(config)`` reads it: that loop, or a refusal by name."""
    config = {**case.config, "_class_name": "DDIMScheduler"}  # run_case gives this name to flowdiff
    check_reproduced_or_refused(dataclasses.replace(case, cls="DDIMInverseScheduler", config=config))


@common
@given(case=pndm_cases(), clip_sample=RARELY)
def test_a_pndm_config_given_to_encode_like_is_ddim_inverse_or_refused(case: Case, clip_sample: bool) -> None:
    """A PNDMScheduler config (Stable Diffusion 1.x's own, a flow's default ``scheduler_config``) given to
    encode_like is read as ``DDIMInverseScheduler.from_config(config)`` reads it, inversion pipelines' way: that
    loop, or a refusal by name. encode_like refused every PNDM config though its docstring accepted them."""
    config = {**case.config, "clip_sample": clip_sample, "_class_name": "PNDMScheduler"}
    check_reproduced_or_refused(dataclasses.replace(case, cls="DDIMInverseScheduler", config=config))


def test_stable_diffusion_15s_pndm_config_inverts_as_diffusers_inverse_scheduler_from_it() -> None:
    """SD 1.5's scheduler_config.json (PNDM, with its stray ``clip_sample: false``) given to encode_like is
    ``DDIMInverseScheduler.from_config`` of it, in both dtypes; without ``clip_sample`` diffusers' inverse clips
    x̂₀ (its default ``clip_sample=True``) and encode_like refuses it, naming the option; a hand-written PNDM
    config without ``set_alpha_to_one`` is read with DDIMInverse's default (True: from σ = 0), not PNDM's."""
    sd15 = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False,
            "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
    case = Case("sd15-pndm-inverse", "DDIMInverseScheduler", sd15, steps=10)
    for dtype in (torch.float32, torch.float64):
        got, ref, nfe, calls = run_case(case, dtype)
        assert nfe == calls and float((got - ref).abs().max() / ref.abs().max()) <= (REL if dtype == DTYPE else 1e-10)
    no_clip_key = {k: v for k, v in sd15.items() if k != "clip_sample"}
    with pytest.raises(ValueError, match="clip_sample=True"):
        run_case(dataclasses.replace(case, config=no_clip_key), DTYPE)
    from flowdiff.engine.scheduler_grids import ddim_inverse_sigmas

    hand = {"_class_name": "PNDMScheduler", "clip_sample": False, "steps_offset": 1}
    assert ddim_inverse_sigmas(hand, 10)[0][0] == 0.0
    check_reproduced_or_refused(dataclasses.replace(case, config=hand))


REFUSED_CLASSES = ("UniPCMultistepScheduler", "DEISMultistepScheduler", "DPMSolverSinglestepScheduler",
                   "DPMSolverMultistepInverseScheduler", "EulerAncestralDiscreteScheduler", "DDPMScheduler",
                   "KDPM2DiscreteScheduler", "LCMScheduler")


@common
@given(cls=st.sampled_from(REFUSED_CLASSES), training=_training(), spacing=_spacing(), steps=st.integers(1, 12))
def test_the_other_schedulers_are_refused_by_class_whatever_their_config(cls: str, training: dict[str, Any],
                                                                         spacing: dict[str, Any], steps: int) -> None:
    """The schedulers flowdiff does not reproduce (UniPC, DEIS, DPM-Solver singlestep, the ancestral ones, …) are
    refused naming the class for any config (not only their defaults), before any config field is read."""
    case = Case("drawn", cls, {**training, **spacing}, steps=steps)
    with pytest.raises(ValueError, match=cls):
        _flowdiff_route(case)


def test_the_drawn_classes_are_every_class_flowdiff_claims() -> None:
    """Every scheduler sample_like reproduces, and DDIMInverse (encode_like)."""
    assert set(STRATEGIES) == set(PLANNED_SCHEDULERS) | {"DDIMInverseScheduler"}


# -- the counter-examples the property found, minimised, as regression tests ---------------------------------------

def test_heun_clip_sample_is_refused_by_name() -> None:
    """HeunDiscreteScheduler(clip_sample=True) clips x̂₀ at every step: sample_like ran the plain ODE and differed
    from diffusers by 0.54 relative, silently (1 step, default betas); now refused, naming the option."""
    case = Case("heun-clip", "HeunDiscreteScheduler", {"clip_sample": True}, steps=1)
    with pytest.raises(ValueError, match=r"clip_sample=True is not reproduced"):
        run_case(case, DTYPE)
    check_reproduced_or_refused(case)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_inverse_zero_length_first_step_is_left_out(spacing: str) -> None:
    """DDIMInverseScheduler(set_alpha_to_one=False, steps_offset=0) starts with a step from ᾱ_0 to timestep 0:
    zero length. encode_like failed with 'sigmas must be strictly decreasing' (no field named); it now leaves
    that step out (diffusers spends one call on it and returns its sample unchanged) and equals diffusers."""
    steps = 10 if spacing == "leading" else 100
    config = {"clip_sample": False, "set_alpha_to_one": False, "steps_offset": 0, "timestep_spacing": spacing,
              "num_train_timesteps": 100 if spacing == "trailing" else 1000}
    case = Case("inverse-zero-length", "DDIMInverseScheduler", config, steps=steps)
    for dtype in (torch.float32, torch.float64):
        got, ref, nfe, calls = run_case(case, dtype)
        assert nfe == calls - 1
        assert float((got - ref).abs().max() / ref.abs().max()) <= (REL if dtype == DTYPE else 1e-10)
    if spacing == "leading":  # one step, of zero length: nothing left to run
        with pytest.raises(ValueError, match=r"steps=1 with set_alpha_to_one=False, whose one timestep is 0 "
                                             r"\(timestep_spacing='leading', steps_offset=0\)"):
            run_case(dataclasses.replace(case, steps=1), DTYPE)


def test_ddim_inverse_into_zero_terminal_snr_is_refused_by_name() -> None:
    """A zero-SNR DDIMInverse with 'trailing' spacing ends at ᾱ = 0, where its last step returns ε̂ alone:
    encode refused it with a message naming no option; now the refusal names rescale_betas_zero_snr."""
    case = Case("inverse-zero-snr", "DDIMInverseScheduler", {"clip_sample": False, "rescale_betas_zero_snr": True,
                                                              "timestep_spacing": "trailing"}, steps=1)
    with pytest.raises(ValueError, match=r"rescale_betas_zero_snr=True with timestep_spacing='trailing'"):
        run_case(case, DTYPE)
    check_reproduced_or_refused(case)


def test_a_repeated_first_timestep_is_refused_where_diffusers_loop_crashes() -> None:
    """DPMSolverMultistep(use_lu_lambdas=True) on a zero-SNR 100-step table gives timesteps 99, 99, …: diffusers'
    step finds its first place by timestep, takes the repeat and runs past its σ table (IndexError); sample_like
    returned a result for that loop. Now refused, naming the class and the repeated timestep."""
    config = {"num_train_timesteps": 100, "rescale_betas_zero_snr": True, "use_lu_lambdas": True,
              "solver_order": 1}
    case = Case("dpm-lu-zero-snr", "DPMSolverMultistepScheduler", config, steps=8)
    _, failure = _diffusers_loop(case)
    assert isinstance(failure, IndexError)
    with pytest.raises(ValueError, match=r"DPMSolverMultistepScheduler: its timesteps .* repeat the first one, 99"):
        _flowdiff_route(case)


@pytest.mark.parametrize("cls, skipped", [("EulerDiscreteScheduler", 1), ("HeunDiscreteScheduler", 2)])
def test_euler_and_heun_zero_length_steps_are_left_out(cls: str, skipped: int) -> None:
    """'leading' with steps_offset=1 and steps = T puts the first timestep at T (past the table): diffusers reads
    its σ at the table's last level, so its first step has zero length (one call for Euler, two for Heun, the
    sample unchanged). sample_like refused it ('σ grid is not strictly decreasing'); it now leaves the step out."""
    case = Case("zero-length", cls, {"num_train_timesteps": 100, "steps_offset": 1, "timestep_spacing": "leading"},
                steps=100)
    got, ref, nfe, calls = run_case(case, DTYPE)
    assert nfe == calls - skipped and float((got - ref).abs().max() / ref.abs().max()) <= REL
    check_reproduced_or_refused(case)


def test_a_heun_zero_length_step_between_two_timesteps_stays_refused() -> None:
    """'trailing' with 97 steps of a 100-step table ends with timesteps 1, 0, −1 (σ(−1) read as σ(0)): Heun's
    step into σ(0) evaluates there at timestep 0 and its last step at −1, which one σ → timestep map cannot feed
    (leaving the zero-length step out was 7.8e-5 off in float32 and in float64, caught by the property); refused."""
    case = Case("heun-trailing-97", "HeunDiscreteScheduler", {"num_train_timesteps": 100,
                                                              "timestep_spacing": "trailing"}, steps=97)
    with pytest.raises(ValueError, match="HeunDiscreteScheduler: its σ grid .* is not strictly decreasing"):
        run_case(case, DTYPE)
    check_reproduced_or_refused(case)
    got, ref, nfe, calls = run_case(dataclasses.replace(case, cls="EulerDiscreteScheduler"), DTYPE)  # Euler: exact
    assert nfe == calls - 1 and float((got - ref).abs().max() / ref.abs().max()) <= REL


@pytest.mark.parametrize("cls, custom", [("EulerDiscreteScheduler", {"timesteps": [999, 700, 400, 100]}),
                                         ("EulerDiscreteScheduler", {"sigmas": [14.0, 5.0, 1.0, 0.2, 0.0]}),
                                         ("DPMSolverMultistepScheduler", {"timesteps": [999, 700, 400, 100]}),
                                         ("FlowMatchEulerDiscreteScheduler", {"sigmas": [1.0, 0.6, 0.3, 0.1]})])
def test_a_live_scheduler_set_to_custom_timesteps_is_refused(cls: str, custom: dict[str, Any]) -> None:
    """A pipeline called with ``timesteps=``/``sigmas=`` leaves its scheduler holding them; sample_like given that
    scheduler ran its config's ``set_timesteps(steps)`` loop instead, silently (measured on the suite's network:
    2.5e-2 relative off diffusers' loop for Euler's timesteps [999, 700, 400, 100], 5e-2 for DPM-Solver's, 2.6e-2
    for flow matching's sigmas). Now refused naming them; the same scheduler set to ``set_timesteps(steps)``, as a
    pipeline without them leaves it, is still diffusers' loop."""
    import diffusers

    from flowdiff import ProbabilityFlow, sample_like
    from flowdiff.engine.scheduler_grids import schedule_from_config

    sched = getattr(diffusers, cls)()
    schedule, prediction_type = schedule_from_config({"_class_name": cls, **sched.config})
    flow = ProbabilityFlow(network(DTYPE), schedule, prediction_type=prediction_type)
    sched.set_timesteps(**custom)
    with pytest.raises(ValueError, match=f"{cls} holds (timesteps|sigmas) .* not reproduced"):
        sample_like(flow, _noise(DTYPE), sched, 4)
    sched.set_timesteps(4)
    got = sample_like(flow, _noise(DTYPE), sched, 4).x
    case = Case("live", cls, {k: v for k, v in sched.config.items() if not k.startswith("_")}, steps=4)
    _, ref, _, _ = run_case(case, DTYPE)
    assert float((got - ref).abs().max() / ref.abs().max()) <= REL
