"""The third new-user sweep: what the first two left, then the README's promises tried with unusual inputs.

Each bug's test failed before its fix (its docstring says what a user saw); a few beside them pin what the fix
keeps working.
"""

import dataclasses
import re
import runpy
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from _cli_runs import one_line, write_digits
from _cli_runs import run_in as run

import flowdiff
from flowdiff.models.analytic import Gaussian

# -- --solver heun --nfe 1: sample runs it, encode and roundtrip refuse it -----------------------------------

@pytest.mark.parametrize("command", ["encode", "roundtrip"])
def test_an_encode_budget_below_one_step_names_the_budgets_it_accepts(tmp_path, capsys, command):
    """`sample --solver heun --nfe 1` runs (its one step, into σ = 0, is Euler) and `roundtrip` refused "below the
    cost of one step (2 evaluations)" without saying why sample differs or which --nfe it takes."""
    (png,) = write_digits(tmp_path, 1)
    code, out, err = run(capsys, [command, png, "--solver", "heun", "--nfe", "1"], tmp_path)
    assert code != 0 and out == ""
    line = one_line(err)
    assert "--nfe 1 " in line and "an encode's first step" in line and "--nfe 2 or more" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d0.png"]


def test_heun_at_nfe_1_generates_one_euler_step_in_the_api_and_the_cli(tmp_path, capsys):
    """The engine's nfe → steps: the most steps whose counted NFE fits, the step into σ = 0 Euler by default."""
    flow = Gaussian(torch.zeros(4, dtype=torch.float64), 0.5).flow()
    noise = torch.randn(3, 4, dtype=torch.float64)
    one = flowdiff.generate(flow, noise, solver="heun", nfe=1)
    assert (one.stats.nfe, one.stats.steps) == (1, 1)
    assert torch.equal(one.x, flowdiff.generate(flow, noise, solver="euler", steps=1).x)
    code, out, err = run(capsys, ["sample", "--solver", "heun", "--nfe", "1", "--num", "1", "--out", "s.png"],
                         tmp_path)
    assert code == 0 and "1 NFE, 1 steps" in out, err


@pytest.mark.parametrize("call", ["encode", "generate"])
def test_the_api_names_the_nfe_a_solver_accepts(call):
    flow = Gaussian(torch.zeros(4), 0.5).flow()
    x = 0.5 * torch.randn(2, 4)
    if call == "encode":
        with pytest.raises(ValueError, match=r"nfe=1 .*'heun'.*encode's first step.*encode with 'heun' give nfe >= 2"):
            flowdiff.encode(flow, x, solver="heun", nfe=1)
    else:
        with pytest.raises(ValueError, match=r"nfe=2 .*final_euler=False.*'rk4' takes nfe >= 4"):
            flowdiff.generate(flow, x, solver="rk4", grid=flowdiff.Grid(nfe=2, final_euler=False))
    assert flowdiff.encode(flow, x, solver="heun", nfe=2).stats.nfe == 2


# -- tune on a batch of one sample ---------------------------------------------------------------------------

def test_tune_on_one_sample_says_it_is_not_validated():
    """`flowdiff.tune` on a batch of 1 silently fitted the whole batch: the held-out half it promises was empty."""
    flow = Gaussian(torch.zeros(4, dtype=torch.float64), 0.5).flow()
    noise = torch.randn(1, 4, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"no held-out validation: noise holds 1 sample.*at least 2.*validate=False"):
        tuned = flowdiff.tune(flow, noise, solver="euler", nfe=3, max_evals=6, progress=False)
    assert tuned.options["validate"] is False and tuned.options["calibration_batch"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = flowdiff.tune(flow, noise, solver="euler", nfe=3, max_evals=6, progress=False, validate=False)
        flowdiff.tune(flow, torch.randn(2, 4, dtype=torch.float64), solver="euler", nfe=3, max_evals=6,
                      progress=False)
    np.testing.assert_array_equal(quiet.sigmas, tuned.sigmas)


def test_compare_tuned_on_batch_1_warns_in_the_flags_words(tmp_path, capsys):
    code, out, err = run(capsys, ["compare", "--model", "analytic-mixture", "--grid", "tuned", "--batch", "1",
                                  "--nfe", "2", "--solver", "euler", "--calibration-seed", "1", "--no-progress",
                                  "--out", "c"], tmp_path)
    assert code == 0, err
    assert "tuned grid of euler at NFE 2: tuning cost" in out and "no held-out validation" in out
    line = one_line(err)
    assert line.startswith("flowdiff compare: warning: --batch 1") and "--batch 2 or more" in line
    assert "validate=" not in line


# -- likelihood --steps 1000000: minutes with nothing said -------------------------------------------------------

def test_likelihood_shows_each_solves_progress_unless_told_not_to(tmp_path, capsys, monkeypatch):
    """`flowdiff likelihood --steps 1000000` ran for hours without a word; compare shows its reference's progress."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)  # a terminal: the bar is drawn
    (png,) = write_digits(tmp_path, 1)
    argv = ["likelihood", png, "--model", "analytic-mixture", "--solver", "rk4", "--steps", "16"]
    code, out, err = run(capsys, argv, tmp_path)
    assert code == 0, err
    assert "likelihood solve" in err and "check solve" in err and "of 16" in err and "of 8" in err, err
    code, quiet, err = run(capsys, [*argv, "--no-progress"], tmp_path)
    assert code == 0 and err == "", err
    untimed = [re.sub(r"; [\d.]+ s$", "", line) for line in quiet.splitlines()]
    assert untimed == [re.sub(r"; [\d.]+ s$", "", line) for line in out.splitlines()]  # the same figures; not the time


def test_log_likelihood_progress_is_a_bool():
    flow = Gaussian(torch.zeros(4, dtype=torch.float64), 0.5).flow()
    with pytest.raises(TypeError, match="progress must be a bool, got str"):
        flowdiff.log_likelihood(flow, torch.zeros(1, 4, dtype=torch.float64), steps=2, progress="yes")


# -- σ values and timesteps that are no numbers ------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda: dict(grid=["2", "0"]),
    lambda: dict(grid=np.array([True, False])),
    lambda: dict(grid=flowdiff.Grid(sigmas=np.array([2 + 0j, 0]))),
    lambda: dict(grid=flowdiff.Grid(timesteps=["500", "10"])),
    lambda: dict(grid=torch.tensor([True, False])),
])
def test_grid_values_that_are_no_real_numbers_are_refused(make):
    """`grid=["2", "0"]` ran a grid from σ = 2, `[True, False]` one from σ = 1, and complex σ lost their imaginary
    part with a NumPy ComplexWarning."""
    flow = Gaussian(torch.zeros(4, dtype=torch.float64), 0.5).flow()
    with pytest.raises(TypeError, match=r"(sigmas|timesteps) must be real numbers .*got \[.*of dtype"):
        flowdiff.generate(flow, torch.randn(2, 4, dtype=torch.float64), solver="euler", **make())


def test_integer_and_float_grid_values_still_run_alike():
    flow = Gaussian(torch.zeros(4, dtype=torch.float64), 0.5).flow()
    noise = torch.randn(2, 4, dtype=torch.float64)
    runs = [flowdiff.generate(flow, noise, solver="euler", grid=g).x
            for g in ([2, 1, 0], [2.0, 1.0, 0.0], torch.tensor([2, 1, 0]), np.array([2, 1, 0], dtype=np.uint8))]
    assert all(torch.equal(runs[0], x) for x in runs[1:])


@pytest.mark.parametrize("explicit", [dict(sigmas=[2.0, 1.0, 0.0]), dict(timesteps=[900, 100])])
def test_a_grid_name_beside_explicit_values_is_refused(explicit):
    """`Grid("karras", sigmas=[...])` ran the explicit σ and dropped the name without a word."""
    (key,) = explicit
    with pytest.raises(ValueError, match=rf"Grid\('karras', {key}=...\).*name 'karras' would go unused"):
        flowdiff.Grid("karras", **explicit)
    flow = Gaussian(torch.zeros(4, dtype=torch.float64), 0.5).flow()
    noise = torch.randn(2, 4, dtype=torch.float64)
    assert flowdiff.generate(flow, noise, solver="euler", grid=flowdiff.Grid(**explicit)).stats.nfe == 2


# -- guidance without a condition ---------------------------------------------------------------------------

def test_guidance_without_any_condition_is_refused():
    """`generate(classifier_free_guidance(flow, 2.0), noise)` without model_kwargs ran both branches with no
    keywords: the unconditional samples, at two network calls per evaluation, w silently without effect."""
    flow = flowdiff.pretrained("digits")
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    guided = flowdiff.classifier_free_guidance(flow, 2.0)
    with pytest.raises(ValueError, match=r"step 0 .*guidance \(w = 2\) got no model_kwargs.*model_kwargs"):
        flowdiff.generate(guided, noise, solver="euler", steps=2)
    labels = {"class_labels": torch.tensor([3, 7])}
    unguided = flowdiff.generate(flow, noise, solver="euler", steps=2, model_kwargs=labels).x
    at_one = flowdiff.generate(flowdiff.classifier_free_guidance(flow, 1.0), noise, solver="euler", steps=2,
                               model_kwargs=labels).x
    assert torch.equal(at_one, unguided)


# -- a device that does not exist here ------------------------------------------------------------------------

@pytest.mark.parametrize("where, says", [("cuda:99", r"device 'cuda:99': (CUDA is not available|this machine has)"),
                                          ("gpu", r"device 'gpu' is not a torch device")])
@pytest.mark.parametrize("load", ["pretrained", "from_diffusers"])
def test_loading_onto_a_device_that_is_not_here_names_it(tmp_path, where, says, load):
    """`pretrained("digits", device="cuda:7")` on a CPU machine ended in torch's "AssertionError: Torch not compiled
    with CUDA enabled" (after reading the weights), `device="gpu"` in a RuntimeError listing torch's device types."""
    call = {"pretrained": lambda: flowdiff.pretrained("digits", device=where),
            "from_diffusers": lambda: flowdiff.from_diffusers(tmp_path, device=where)}[load]
    with pytest.raises(ValueError, match=says):
        call()


# -- model_kwargs that are no mapping, given to the tools ---------------------------------------------------------

@pytest.mark.parametrize("bad", [3, "class_labels", [("class_labels", 1)]])
@pytest.mark.parametrize("tool", ["compare", "reference_solution", "log_likelihood", "tune", "flow_fingerprint"])
def test_the_tools_name_model_kwargs_that_are_no_mapping(tool, bad):
    """generate named it; compare and reference_solution said "'int' object is not iterable", the fingerprint took a
    list of pairs as a dict, and a string gave "dictionary update sequence element #0 has length 1"."""
    flow = Gaussian(torch.zeros(4, dtype=torch.float64), 0.5).flow()
    noise = torch.randn(3, 4, dtype=torch.float64)
    calls = {"compare": lambda: flowdiff.compare(flow, noise, solvers=["euler"], grids=["logsnr"], nfe=[4],
                                                 model_kwargs=bad),
             "reference_solution": lambda: flowdiff.reference_solution(flow, noise, model_kwargs=bad),
             "log_likelihood": lambda: flowdiff.log_likelihood(flow, noise, steps=2, model_kwargs=bad),
             "tune": lambda: flowdiff.tune(flow, noise, solver="euler", nfe=3, max_evals=3, progress=False,
                                           model_kwargs=bad),
             "flow_fingerprint": lambda: flowdiff.flow_fingerprint(flow, bad)}
    with pytest.raises(TypeError, match=rf"model_kwargs must be a mapping .*got {type(bad).__name__}"):
        calls[tool]()


# -- --seed on the commands that draw no noise -------------------------------------------------------------------

@pytest.mark.parametrize("command", ["encode", "roundtrip", "decode"])
def test_seed_is_refused_where_no_noise_is_drawn(tmp_path, capsys, command):
    """`flowdiff roundtrip x.png --seed 3` was taken and did nothing: encode, decode and roundtrip draw no noise (a
    folder run even left the seed out of what defines it)."""
    (png,) = write_digits(tmp_path, 1)
    argv = [command, "l.safetensors" if command == "decode" else png, "--seed", "3"]
    code, out, err = run(capsys, argv, tmp_path)
    assert code == 2 and out == ""
    assert "unrecognized arguments: --seed 3" in one_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d0.png"]


# -- the examples' counts ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("script, argv, says", [
    ("noise_optimisation.py", ["--iterations", "0"], "--iterations must be at least 1, got 0"),
    ("noise_optimisation.py", ["--batch", "1000"], "--batch must be between 1 and 364"),
    ("noise_optimisation.py", ["--lr", "nan"], "--lr must be a number > 0, got nan"),
    ("likelihood.py", ["--batch", "0"], "--batch must be between 1 and 364"),
    ("likelihood.py", ["--batch", "400"], "--batch must be between 1 and 364"),
    ("likelihood.py", ["--seed", "-5"], "--seed must be at least 0, got -5"),
    ("compare_solvers.py", ["--batch", "-2"], "--batch must be at least 1"),
    ("compare_solvers.py", ["--nfe", "10,x"], "--nfe must be comma-separated whole numbers, got '10,x'"),
    ("diffusers_pipeline.py", ["--steps", "0"], "--steps must be at least 1, got 0"),
    ("property_test_model.py", ["--examples", "0"], "--examples must be at least 1, got 0"),
    ("reconstruction.py", ["--steps", "0"], "--steps must be at least 1, got 0"),
    ("reconstruction.py", ["--model", "nodir"], "--model 'nodir': no such folder"),
    ("compare_solvers.py", ["--model", "nodir"], "--model 'nodir': no such folder"),
    ("diffusers_pipeline.py", ["--pipeline", "nodir"], "--pipeline 'nodir': no such folder"),
])
def test_examples_refuse_counts_they_cannot_run_in_one_line(tmp_path, capsys, script, argv, says):
    """`noise_optimisation.py --iterations 0` ended in an UnboundLocalError, `likelihood.py --batch 400` headed its
    table "400 images a set" over 364 held-out digits, `--batch 0` or `--steps 0` in a torch or diffusers
    traceback (a ZeroDivisionError in diffusers' DDIMScheduler), a negative --seed was silently wrapped."""
    example = runpy.run_path(str(Path(__file__).parents[1] / "examples" / script))
    with pytest.raises(SystemExit) as exit_:
        example["main"]([*argv, "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


# -- likelihood --probes-from beside the exact trace ------------------------------------------------------------

def test_probes_from_beside_the_exact_trace_is_refused(tmp_path, capsys):
    """`flowdiff likelihood x.png --probes-from gaussian` (the exact trace at D = 64) ran and drew no probe at all,
    where --probes and --sketch beside it were refused; Trace("exact", probes_from="gaussian") the same."""
    (png,) = write_digits(tmp_path, 1)
    code, out, err = run(capsys, ["likelihood", png, "--model", "analytic-mixture", "--steps", "2", "--probes-from",
                                  "gaussian"], tmp_path)
    assert code != 0 and out == ""
    assert "as does --probes-from, not 'exact' (which --divergence auto takes at D=64 <= 256)" in one_line(err)
    with pytest.raises(ValueError, match=r"as does Trace.probes_from, not method='exact'.*probes_from='gaussian'"):
        flowdiff.Trace("exact", probes_from="gaussian")
    flow = Gaussian(torch.zeros(4, dtype=torch.float64), 0.5).flow()
    x = 0.5 * torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"not 'exact' \(which method='auto' takes at D=4.*probes_from='gaussian'"):
        flowdiff.log_likelihood(flow, x, steps=2, estimator=flowdiff.Trace(probes_from="gaussian"))
    gen = torch.Generator().manual_seed(0)  # unsaid, the probes are Rademacher's, as before
    plain = flowdiff.log_likelihood(flow, x, steps=2, estimator=flowdiff.Trace("hutchinson", probes=3), generator=gen)
    gen = torch.Generator().manual_seed(0)
    said = flowdiff.log_likelihood(flow, x, steps=2, generator=gen,
                                   estimator=flowdiff.Trace("hutchinson", probes=3, probes_from="rademacher"))
    assert torch.equal(plain.log_prob, said.log_prob)


# -- compare flags that change nothing in the run asked for --------------------------------------------------------

@pytest.mark.parametrize("argv, says", [
    (["--task", "roundtrip", "--seed", "3"], "--seed applies to --task generate"),
    (["--task", "roundtrip", "--rtol", "1e-4", "--fresh-reference"], "--rtol, --fresh-reference apply to --task"),
    (["--task", "roundtrip", "--calibration-seed", "2"], "--calibration-seed applies to --task generate"),
    (["--grid", "logsnr", "--calibration-seed", "2"], "--calibration-seed 2 seeds the noise --grid tuned is tuned on"),
])
def test_compare_refuses_flags_its_run_would_not_use(tmp_path, capsys, argv, says):
    """`compare --task roundtrip --seed 3` (or --rtol, --fresh-reference, --calibration-seed) ran the same round
    trips as without; `--grid logsnr --calibration-seed 2` tuned nothing. Each flag was taken without a word."""
    code, out, err = run(capsys, ["compare", "--model", "analytic-mixture", "--solver", "euler", "--nfe", "4",
                                  "--batch", "2", "--no-progress", "--out", "c", *argv], tmp_path)
    assert code == 2 and out == ""
    assert says in one_line(err)
    assert not (tmp_path / "c").exists()


# -- a diffusers folder whose scheduler has no betas ---------------------------------------------------------------

@pytest.mark.parametrize("scheduler", ["EDMEulerScheduler", "ScoreSdeVeScheduler", "CMStochasticIterativeScheduler"])
def test_a_scheduler_without_betas_is_refused_by_name(scheduler):
    """`from_diffusers(unet_dir, scheduler=EDMEulerScheduler())` (or such a scheduler_config.json) loaded as DDPM's
    linear betas (σ_max 157.4, not the config's 80): a silently wrong ODE for an EDM or variance-exploding model."""
    diffusers = pytest.importorskip("diffusers")
    config = dict(getattr(diffusers, scheduler)().config)
    with pytest.raises(ValueError, match=rf"the {scheduler} config defines no betas .*σ_max = "):
        flowdiff.models.diffusers_io.schedule_from_config({**config, "_class_name": scheduler})
    for name in ("DDIMScheduler", "LCMScheduler", "DEISMultistepScheduler"):  # betas schedulers still load
        schedule, _ = flowdiff.models.diffusers_io.schedule_from_config(dict(getattr(diffusers, name)().config))
        assert schedule.num_train_timesteps == 1000


# -- sample_like / encode_like with a scheduler of another prediction type --------------------------------------

@pytest.mark.parametrize("function", ["sample_like", "encode_like"])
def test_like_refuses_a_scheduler_of_another_prediction_type(function):
    """`sample_like(flow, noise, DDIMScheduler(prediction_type="v_prediction"), 8)` on an ε flow ran and returned
    something 200 away from diffusers' loop with that scheduler, without a word."""
    diffusers = pytest.importorskip("diffusers")
    w = torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.4
    flow = flowdiff.ProbabilityFlow(lambda x, t: torch.tanh(x @ w), flowdiff.Schedule.linear())
    x = 0.5 * torch.randn(2, 6, dtype=torch.float64)
    kind = diffusers.DDIMScheduler if function == "sample_like" else diffusers.DDIMInverseScheduler
    call = getattr(flowdiff, function)
    with pytest.raises(ValueError, match=rf"{function}: .*reads the model's output as 'v_prediction', the flow as "
                                         r"'epsilon'"):
        call(flow, x, kind(clip_sample=False, prediction_type="v_prediction"), 8)
    assert call(flow, x, kind(clip_sample=False), 8).stats.nfe == 8  # the same prediction type runs


# -- sample_quality of 8-bit pixel values; reconstruction's stats ------------------------------------------------

def test_sample_quality_refuses_images_on_the_pixel_scale():
    """`sample_quality(images * 127.5 + 127.5)` clipped every pixel to 1 and scored the blanks (confidence 0.74,
    nn_ratio 3.4) as if they were the samples."""
    digits = flowdiff.digits_data("test").images[:8]
    with pytest.raises(ValueError, match=r"images span \[0, 255\], far outside .*\[-1, 1\].*v / 127.5 - 1"):
        flowdiff.sample_quality(digits * 127.5 + 127.5)
    overshoot = flowdiff.sample_quality(digits * 1.2)  # a sample's overshoot is still clipped and scored
    assert overshoot["n"] == 8


def test_reconstruction_names_stats_of_the_wrong_type():
    x = flowdiff.digits_data("test").images[:2]
    with pytest.raises(TypeError, match="decode_stats must be a solvers.Stats .*got Result"):
        flowdiff.reconstruction(x, x, decode_stats=flowdiff.generate(Gaussian(torch.zeros(64), 0.5).flow(),
                                                                     torch.randn(2, 64), steps=1))


# -- tune(seed=-1) ----------------------------------------------------------------------------------------------

def test_tune_names_a_negative_seed():
    """`flowdiff.tune(..., seed=-1)` ended in NumPy's "expected non-negative integer", naming no argument."""
    flow = Gaussian(torch.zeros(4, dtype=torch.float64), 0.5).flow()
    noise = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"seed must be an int seed in \[0, 2\*\*64 - 1\], got -1"):
        flowdiff.tune(flow, noise, solver="euler", nfe=3, max_evals=4, progress=False, seed=-1)


@pytest.mark.parametrize("make", [lambda: flowdiff.ProbabilityFlow(lambda x, t: x, ["0.9", "0.5", "0.1"]),
                                  lambda: flowdiff.Schedule.from_betas(np.array([True, True])),
                                  lambda: flowdiff.Schedule.from_betas(["0.1", "0.2"])])
def test_schedules_of_values_that_are_no_numbers_are_refused(make):
    """`ProbabilityFlow(model, ["0.9", "0.5", "0.1"])` (ᾱ read from a text file) built a schedule from the strings."""
    with pytest.raises(TypeError, match=r"(alphas_cumprod|betas) must be real numbers .*of dtype"):
        make()


def test_compare_roundtrip_says_why_a_run_is_missing(tmp_path, capsys):
    """`compare --task roundtrip --solver heun --nfe 1,2` printed "—" for heun at NFE 1 and no reason (the generate
    task prints its skipped runs); the reason now also names the budgets heun encodes with."""
    code, out, err = run(capsys, ["compare", "--model", "analytic-mixture", "--task", "roundtrip", "--solver", "heun",
                                  "--grid", "logsnr", "--nfe", "1,2", "--batch", "2", "--no-progress", "--out", "c"],
                         tmp_path)
    assert code == 0, err
    assert "skipped heun on logsnr at NFE 1: heun encodes from NFE 2" in out, out


# -- pretrained(directory=) -------------------------------------------------------------------------------------

def test_pretrained_directory_errors_name_the_users_folder(tmp_path):
    """`pretrained("digits", directory="nope")` said "the package is incomplete"; directory=3 was torch's bare
    TypeError; a retrained copy's config with a bad prediction_type named no file."""
    with pytest.raises(FileNotFoundError, match=r"directory '.*nope': no such folder"):
        flowdiff.pretrained("digits", directory=tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"directory '.*' has no digits.json"):
        flowdiff.pretrained("digits", directory=tmp_path)
    with pytest.raises(TypeError, match="directory must be a folder path .*got int"):
        flowdiff.pretrained("digits", directory=3)
    import json
    import shutil
    weights = Path(flowdiff.__file__).parent / "weights"
    shutil.copy(weights / "digits.safetensors", tmp_path)
    config = json.loads((weights / "digits.json").read_text())
    (tmp_path / "digits.json").write_text(json.dumps({**config, "prediction_type": "eps"}))
    with pytest.raises(ValueError, match=r"model config .*digits.json: unknown prediction_type 'eps'"):
        flowdiff.pretrained("digits", directory=tmp_path)
    (tmp_path / "digits.json").write_text(json.dumps(config))
    assert flowdiff.pretrained("digits", directory=tmp_path).prediction_type == "epsilon"


# -- likelihood errors in the flags' words ------------------------------------------------------------------------

@pytest.mark.parametrize("argv, said", [
    (["--divergence", "hutchinson", "--sketch", "4", "--steps", "2"], "--sketch applies to --divergence hutch++ only"),
    (["--divergence", "hutch++", "--sketch", "100", "--steps", "2"], "--sketch must be <= the dimension D=64"),
    (["--solver", "rk4", "--rtol", "1e-3"], "--solver rk4 has no error estimate"),
])
def test_likelihood_errors_name_the_flags(tmp_path, capsys, argv, said):
    """`likelihood --divergence hutchinson --sketch 4` said "Trace.sketch applies to method='hutch++' only, got
    sketch=4" (a traceback-free line, but in the Python call's words), `--solver rk4 --rtol 1e-3` "solver 'rk4'"."""
    (png,) = write_digits(tmp_path, 1)
    code, out, err = run(capsys, ["likelihood", png, "--model", "analytic-mixture", "--no-progress", *argv], tmp_path)
    assert code != 0 and out == ""
    line = one_line(err)
    assert said in line and "Trace." not in line and "method=" not in line, line


# -- Adaptive(sigma_c=, sigma_end=): each applies to the solvers whose variables use it, and is refused elsewhere --

def _gaussian_flow_and_noise():
    flow = Gaussian(torch.linspace(-1.0, 1.0, 6, dtype=torch.float64), 0.5).flow()
    return flow, torch.randn(3, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("solver", ["dopri5", "bosh3", "abm"])
@pytest.mark.parametrize("call", ["generate", "encode"])
def test_sigma_end_is_refused_by_a_solve_in_log_sigma(solver, call):
    """`Adaptive(sigma_end=...)` with dopri5 (or any solver running in log(σ + c)) ran to σ = 0 as if it were unset."""
    flow, noise = _gaussian_flow_and_noise()
    with pytest.raises(ValueError, match=rf"Adaptive\(sigma_end=0\.005\) does not apply to solver '{solver}'.*"
                                         r"reaches σ = 0 exactly.*unipc.*sigma_c="):
        getattr(flowdiff, call)(flow, noise, solver=solver, adaptive=flowdiff.Adaptive(rtol=1e-3, sigma_end=0.005))


@pytest.mark.parametrize("call", ["generate", "encode"])
def test_sigma_c_is_refused_by_a_data_variables_solve(call):
    """`Adaptive(sigma_c=...)` with unipc (which runs in ρ = 1/σ) gave the same result as without it."""
    flow, noise = _gaussian_flow_and_noise()
    with pytest.raises(ValueError, match=r"Adaptive\(sigma_c=0\.05\) does not apply to solver 'unipc'.*ρ = 1/σ.*"
                                         r"dopri5.*sigma_end="):
        getattr(flowdiff, call)(flow, noise, solver="unipc", adaptive=flowdiff.Adaptive(rtol=1e-3, sigma_c=0.05))


def test_each_knob_changes_the_solve_that_uses_it():
    """What the refusals keep: sigma_c moves dopri5's steps, sigma_end moves unipc's hand-over point."""
    flow, noise = _gaussian_flow_and_noise()
    s_min = float(flow.schedule.sigma_min)
    plain = flowdiff.generate(flow, noise, solver="dopri5", adaptive=flowdiff.Adaptive(rtol=1e-3))
    other_c = flowdiff.generate(flow, noise, solver="dopri5", adaptive=flowdiff.Adaptive(rtol=1e-3, sigma_c=10 * s_min))
    assert not np.array_equal(plain.sigmas, other_c.sigmas)
    assert torch.allclose(plain.x, other_c.x, atol=2e-2)  # both solve the same flow to σ = 0
    tight = flowdiff.Adaptive(rtol=1e-6, atol=1e-6)
    late = flowdiff.generate(flow, noise, solver="unipc", adaptive=dataclasses.replace(tight, sigma_end=s_min))
    assert late.sigmas[-2] >= s_min > flowdiff.generate(flow, noise, solver="unipc", adaptive=tight).sigmas[-2]


def test_an_unused_default_is_not_range_checked():
    """A unipc solve started below the schedule's smallest σ was refused for `sigma_c` (the default c = σ_min, which
    unipc never uses) must lie in (0, σ_start) although the user had not set it."""
    flow, noise = _gaussian_flow_and_noise()
    start = float(flow.schedule.sigma_min) / 2
    out = flowdiff.generate(flow, noise, solver="unipc", adaptive=flowdiff.Adaptive(rtol=1e-4, atol=1e-4,
                                                                                      sigma_start=start))
    assert out.sigmas[0] == start and out.sigmas[-1] == 0 and torch.isfinite(out.x).all()
    # dopri5 uses c, and its default (σ_min) suits any start (log(σ + c) is defined for every c > 0; review R11);
    # a c the user sets is still range-checked
    out = flowdiff.generate(flow, noise, solver="dopri5", adaptive=flowdiff.Adaptive(rtol=1e-4, sigma_start=start))
    assert out.sigmas[0] == start and out.sigmas[-1] == 0 and torch.isfinite(out.x).all()
    with pytest.raises(ValueError, match="sigma_c must lie in"):
        flowdiff.generate(flow, noise, solver="dopri5",
                          adaptive=flowdiff.Adaptive(rtol=1e-4, sigma_start=start, sigma_c=2 * start))


# -- tune(method="dp"): the search's options are refused, not ignored ----------------------------------------------

@pytest.mark.parametrize("given,shown", [({"max_evals": 500}, "max_evals=500"), ({"restarts": 3}, "restarts=3"),
                                         ({"init": "karras"}, "init='karras'"), ({"seed": 7}, "seed=7"),
                                         ({"max_evals": 9, "restarts": 0}, "max_evals=9, restarts=0")])
def test_tune_dp_refuses_the_search_options(given, shown):
    """`tune(method="dp", max_evals=500)` (or restarts=, init=, seed=) returned the same grid as without them."""
    flow, noise = _gaussian_flow_and_noise()
    with pytest.raises(ValueError, match=rf"^{shown} configure the search .* method='dp' does not run.*"
                                         r"method='dp\+search'.*candidates=.*dp_orders="):
        flowdiff.tune(flow, noise, solver="euler", nfe=4, method="dp", progress=False, **given)


def test_tune_dp_takes_the_search_options_at_their_defaults():
    """A caller that spells the defaults out (one options dict for several methods) is not refused, and gets the
    grid of the call without them."""
    flow, noise = _gaussian_flow_and_noise()
    plain = flowdiff.tune(flow, noise, solver="euler", nfe=4, method="dp", progress=False, reference_tol=1e-6)
    spelt = flowdiff.tune(flow, noise, solver="euler", nfe=4, method="dp", progress=False, reference_tol=1e-6,
                          max_evals=None, restarts=1, seed=0, init=list(flowdiff.tools.tuning.DEFAULT_INIT))
    assert np.array_equal(plain.sigmas, spelt.sigmas)
