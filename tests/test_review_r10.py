"""Review of the new-user sweep (Y) and the joint learned fit (V): refusals that turned away legitimate uses, and
the likelihood command's progress bar in logs."""

import re
import sys
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest
import torch
from _cli_runs import run_in as run
from _cli_runs import write_digits

import flowdiff
from flowdiff.engine.scheduler_grids import schedule_from_config
from flowdiff.models.analytic import Gaussian

# -- schedulers flowdiff reads betas from, whose class diffusers cannot import here ------------------------------

#: A DPMSolverSDEScheduler config as Stable Diffusion pipelines ship it ("DPM++ SDE Karras"): a betas scheduler.
#: Without torchsde, diffusers.DPMSolverSDEScheduler is a placeholder whose __init__ takes (*args, **kwargs).
_SDE = {"_class_name": "DPMSolverSDEScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
        "beta_end": 0.012, "beta_schedule": "scaled_linear", "trained_betas": None, "prediction_type": "epsilon",
        "use_karras_sigmas": True, "noise_sampler_seed": None, "timestep_spacing": "linspace", "steps_offset": 1}


def test_a_betas_scheduler_whose_class_is_a_placeholder_here_still_gives_its_schedule():
    """The sweep's "no betas" refusal read the class's __init__ parameters; a placeholder's are (*args, **kwargs),
    so an SD pipeline with DPMSolverSDEScheduler was refused as "defines no betas (σ_min = None, σ_max = None)"."""
    schedule, prediction_type = schedule_from_config(_SDE, "scheduler_config.json")
    ddim = {**_SDE, "_class_name": "DDIMScheduler"}
    del ddim["use_karras_sigmas"], ddim["noise_sampler_seed"]
    same, _ = schedule_from_config(ddim)
    assert prediction_type == "epsilon"
    assert (schedule.alphas_cumprod == same.alphas_cumprod).all()


@pytest.mark.parametrize("config", [
    # an EDM-type scheduler that is a placeholder without torchsde: its σ range and no betas say what it is
    {"_class_name": "CosineDPMSolverMultistepScheduler", "sigma_min": 0.3, "sigma_max": 500.0, "sigma_data": 1.0,
     "num_train_timesteps": 1000, "prediction_type": "v_prediction"},
    {"_class_name": "EDMEulerScheduler", "sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5},
])
def test_a_scheduler_without_betas_is_still_refused_with_its_sigma_range(config):
    with pytest.raises(ValueError, match=rf"{config['_class_name']} config defines no betas .*σ_max = "
                                         rf"{config['sigma_max']}"):
        schedule_from_config(config, "scheduler_config.json")


def test_the_no_betas_refusal_says_no_sigma_range_the_config_does_not_have():
    """Wuerstchen's scheduler has neither betas nor σ_min/σ_max: the message said "σ_min = None, σ_max = None"."""
    with pytest.raises(ValueError, match="DDPMWuerstchenScheduler config defines no betas") as err:
        schedule_from_config({"_class_name": "DDPMWuerstchenScheduler", "scaler": 1.0, "s": 0.008})
    assert "None" not in str(err.value)


# -- sample_quality of samples that overshoot ---------------------------------------------------------------------

def test_sample_quality_scores_samples_that_overshoot_far_on_both_sides():
    """The pixel-scale refusal (beyond [-3, 3]) also refused real samples: at NFE 2–6 many solvers overshoot the
    digits model's range by hundreds (abm at NFE 2 on a logsnr grid reaches ~1000), and compare-style scoring of
    every solver and budget stopped at the first. Such samples are clipped and scored, as before; images with no
    value below 0 past the range are the pixel scale."""
    digits = flowdiff.digits_data("test").images[:8]
    far = digits * 50.0  # the background at -50, the strokes at +50
    assert float(far.min()) < -3 and float(far.max()) > 3
    assert flowdiff.sample_quality(far) == flowdiff.sample_quality(digits.sign())
    with pytest.raises(ValueError, match=r"images span \[0, 255\]"):
        flowdiff.sample_quality(digits * 127.5 + 127.5)


# -- the likelihood command's progress bar in a log ---------------------------------------------------------------

def test_likelihood_draws_its_progress_bar_on_a_terminal_only(tmp_path, capsys, monkeypatch):
    """In a log or a pipe (stderr no terminal) the bar wrote a carriage-return update every 0.1 s: 130 kB of them
    into `2> file` for a two-minute `--steps 20000` run. Folder runs already draw theirs on a terminal only."""
    (png,) = write_digits(tmp_path, 1)
    argv = ["likelihood", png, "--model", "analytic-mixture", "--solver", "rk4", "--steps", "16"]
    code, out, err = run(capsys, argv, tmp_path)
    assert code == 0 and err == "", err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    code, shown, err = run(capsys, argv, tmp_path)
    assert code == 0 and "likelihood solve" in err and "check solve" in err, err
    def figures(text):  # the wall time left out (notes may follow its line)
        return re.sub(r"; [0-9.]+ s\b", "", text)

    assert figures(shown) == figures(out)
    code, _, err = run(capsys, [*argv, "--no-progress"], tmp_path)
    assert code == 0 and err == "", err


# -- the learned fit's solves: none repeated ------------------------------------------------------------------------

@pytest.mark.parametrize("learn", [("directions",), ("scales",), ("scales", "directions")])
def test_a_fit_with_nothing_to_fit_solves_each_half_once(learn):
    """With iterations=0 nothing moves from the method itself: one solve of each half decides. The fit solved each
    twice (the held-out half as the 'neither' candidate and again as the base; the fitted half for the loss and again
    for the calibration error), and fitting_nfe counted the repeats."""
    from _closed_form import mixture, noise

    from flowdiff.tools.learned import learn_solver

    flow, calibration = mixture(), noise(1, n=8)
    learned = learn_solver(flow, calibration, solver="unipc", nfe=4, learn=learn, iterations=0)
    one = flowdiff.generate(flow, calibration[0::2], solver=learned.as_solver(), grid=learned.sigmas).stats.nfe
    assert learned.solves == 2
    assert learned.fitting_nfe == learned.reference_nfe + 2 * one
    assert learned.validation_error == learned.base_validation_error and not learned.kept


def test_the_joint_fit_solves_no_candidate_twice(monkeypatch):
    """Every solve the fit pays for is of a new (parameters, half) pair: the calibration error of the chosen fit and
    the base's held-out error are the ones already solved."""
    from _closed_form import mixture, noise

    from flowdiff.tools import learned as learned_module

    seen, repeats = set(), []
    generate, model = learned_module.generate, mixture()

    def recorded(flow, part, *, solver, grid, **kwargs):
        result = generate(flow, part, solver=solver, grid=grid, **kwargs)
        if flow is model:  # not the dry runs of a zero field that lay out the steps
            key = (part.data_ptr(), result.x.double().numpy().tobytes())
            if key in seen:
                repeats.append(key)
            seen.add(key)
        return result

    monkeypatch.setattr(learned_module, "generate", recorded)
    fit = learned_module.learn_solver(model, noise(1, n=8), solver="unipc", nfe=4, learn=("scales", "directions"),
                                      iterations=2)
    assert fit.solves == len(seen) + len(repeats) and repeats == []


# -- σ values in a list: each item a real number ---------------------------------------------------------------------

@pytest.mark.parametrize("values", [[True, 0.0], [2.0, False, 0.0], [np.bool_(True), 0.0], [2.0, torch.tensor(True)],
                                    [2.0, 1 + 0j], [2.0, None]])
def test_a_list_with_one_bool_or_non_number_is_refused_naming_the_item(values):
    """The sweep refused bools and complex numbers by the array's dtype, but NumPy makes [True, 0.0] a float64 array:
    it ran a grid from σ = 1 without a word."""
    flow = Gaussian(torch.zeros(4, dtype=torch.float64), 0.5).flow()
    with pytest.raises(TypeError, match=r"sigmas must be real numbers .*got \[.*of dtype \w+ \(item \d\)"):
        flowdiff.generate(flow, torch.randn(2, 4, dtype=torch.float64), solver="euler", grid=values)


@pytest.mark.parametrize("exact", [[Fraction(2), Fraction(1, 2), 0], [Decimal("2"), Decimal("0.5"), 0],
                                   [np.float32(2), torch.tensor(0.5, dtype=torch.float64), np.int64(0)]])
def test_real_numbers_of_any_kind_make_the_grid_their_floats_make(exact):
    """Fractions and Decimals are real numbers: the sweep refused them as 'dtype object'."""
    flow = Gaussian(torch.zeros(4, dtype=torch.float64), 0.5).flow()
    noise = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ran = flowdiff.generate(flow, noise, solver="euler", grid=exact).x
    assert torch.equal(ran, flowdiff.generate(flow, noise, solver="euler", grid=[float(v) for v in exact]).x)


# -- compare --calibration-seed where no grid is tuned -------------------------------------------------------------

def test_compare_refuses_a_calibration_seed_when_its_default_grids_tune_nothing(tmp_path, capsys):
    """The sweep refused `--calibration-seed` beside a --grid list without tuned, but not beside the default grids of
    a model for which flowdiff ships no tuned grid (they are trailing, karras, logsnr alone): it was taken and did
    nothing."""
    from _cli_runs import one_line

    code, out, err = run(capsys, ["compare", "--model", "analytic-mixture", "--solver", "euler", "--nfe", "4",
                                  "--batch", "2", "--no-progress", "--out", "c", "--calibration-seed", "2"], tmp_path)
    assert code == 2 and out == ""
    line = one_line(err)
    assert "--calibration-seed 2" in line and "the default grids (trailing" in line and "tuned" in line
    assert not (tmp_path / "c").exists()
