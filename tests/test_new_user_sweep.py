"""What a researcher new to flowdiff ran, varying the README's calls, and got wrong or unclear.

Each test here failed before its fix: a bare torch error from deep inside a solve, a file the command line
wrote and then refused to read, an error that named the wrong cause, an input silently accepted.
"""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from _cli_runs import GREY8, one_line, write_digits
from _cli_runs import run_in as run

import flowdiff
from flowdiff.models.analytic import Gaussian
from flowdiff.runs.imageio import ImageFormat, write_image
from flowdiff.tools.likelihood import ErrorBarWarning

MIX8 = ["--model", "analytic-mixture"]


# -- tensors on the 'meta' device ---------------------------------------------------------------------

@pytest.mark.parametrize("entry", ["generate", "encode"])
def test_meta_tensors_are_refused_by_name(entry):
    """A 'meta' tensor has a shape and no values: the NaN check's host read was a bare torch RuntimeError."""
    flow = Gaussian(torch.zeros(4), 0.5).flow()
    x = torch.zeros(2, 4, device="meta")
    call = getattr(flowdiff, entry)
    with pytest.raises(ValueError, match=r"(noise|images).*'meta'.*no values"):
        call(flow, x, solver="euler", steps=3)


@pytest.mark.parametrize("entry", ["compare", "tune", "reference_solution", "log_likelihood", "reconstruction"])
def test_meta_tensors_are_refused_by_the_tools(entry):
    """The same bare RuntimeError (or 'Cannot copy out of meta tensor') from compare, tune, the reference and
    the likelihood; reconstruction's finiteness check too."""
    flow = Gaussian(torch.zeros(4, dtype=torch.float64), 0.5).flow()
    x = torch.zeros(4, 4, dtype=torch.float64, device="meta")
    calls = {"compare": lambda: flowdiff.compare(flow, x, solvers=["euler"], grids=["logsnr"], nfe=[4]),
             "tune": lambda: flowdiff.tune(flow, x, solver="euler", nfe=4, max_evals=3, progress=False),
             "reference_solution": lambda: flowdiff.reference_solution(flow, x),
             "log_likelihood": lambda: flowdiff.log_likelihood(flow, x, steps=2),
             "reconstruction": lambda: flowdiff.reconstruction(x, x)}
    with pytest.raises(ValueError, match=r"(noise|images|original) is on the device 'meta'"):
        calls[entry]()


def test_cli_device_meta_is_a_usage_error(capsys, tmp_path):
    code, _, err = run(capsys, ["sample", "--model", "analytic-mixture", "--num", "1", "--steps", "2",
                                "--device", "meta", "--out", "x.png"], tmp_path)
    line = one_line(err)
    assert code == 2 and "--device" in line and "meta" in line, line
    assert not (tmp_path / "x.png").exists()


# -- `flowdiff encode` wrote latents that `flowdiff decode` then refused ---------------------------------

@pytest.mark.parametrize("second", ["d0.png", "./d0.png", "d0.jpg"])
def test_encode_refuses_inputs_that_decode_to_one_name(capsys, tmp_path, second):
    """`encode d0.png d0.png` wrote a latents file that `decode` then refused with status 2: two of its images
    would be written to one name. So did `d0.png d0.jpg` (a lossy input is decoded to .png)."""
    write_digits(tmp_path, 1)
    if second == "d0.jpg":
        from PIL import Image
        Image.open(tmp_path / "d0.png").save(tmp_path / "d0.jpg", quality=100)
    code, _, err = run(capsys, ["encode", "d0.png", second, *MIX8, "--steps", "2", "--out", "l.safetensors"],
                       tmp_path)
    line = one_line(err)
    assert code == 2 and "d0.png" in line and "would both" in line, line
    assert not (tmp_path / "l.safetensors").exists()


def test_encode_then_decode_of_distinct_names_still_works(capsys, tmp_path):
    write_digits(tmp_path, 2)
    code, _, err = run(capsys, ["encode", "d0.png", "d1.png", *MIX8, "--steps", "2", "--out", "l.safetensors"],
                       tmp_path)
    assert code == 0, err
    code, _, err = run(capsys, ["decode", "l.safetensors", "--model", "analytic-mixture", "--out", "dec"], tmp_path)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "dec").iterdir()) == ["d0.png", "d1.png"]


# -- decoding with another model named a class label as the cause ---------------------------------------

def test_decode_with_another_model_names_the_model_not_a_class_label(capsys, tmp_path):
    """Latents of `--model digits` decoded with `--model analytic-mixture` said they were encoded 'with no
    --class-label (guidance 1.0), not with no class label' and told the user to omit --class-label, which they
    had not given; the model is what differs."""
    write_digits(tmp_path, 1)
    code, _, err = run(capsys, ["encode", "d0.png", "--steps", "2", "--out", "l.safetensors"], tmp_path)
    assert code == 0, err
    code, _, err = run(capsys, ["decode", "l.safetensors", *MIX8, "--out", "dec"], tmp_path)
    line = one_line(err)
    assert code == 1 and "'digits'" in line and "--model 'analytic-mixture'" in line, line
    assert "class" not in line, line
    # the label check itself still speaks where the model is the same
    code, _, err = run(capsys, ["decode", "l.safetensors", "--class-label", "3", "--out", "dec"], tmp_path)
    line = one_line(err)
    assert code == 1 and "--class-label 3" in line, line


# -- sample_quality scored accuracy against labels that are no digit --------------------------------------

@pytest.mark.parametrize("labels", [torch.tensor([0, 1, 2, 11]), torch.tensor([-1, 1, 2, 3]),
                                    torch.tensor([[0, 1], [2, 3]]), torch.tensor([True, False, True, False])])
def test_sample_quality_refuses_labels_that_are_not_one_digit_per_image(labels):
    """Label 11 or −1 was scored as a wrong answer (accuracy 0.25 here), a (2, 2) array was flattened and a bool
    array read as 0/1, all silently."""
    images = flowdiff.digits_data("test").images[:4]
    with pytest.raises(ValueError, match=r"labels must be 4 integers 0 … 9"):
        flowdiff.sample_quality(images, labels=labels)


def test_sample_quality_accuracy_is_the_classifiers_agreement_with_the_labels():
    data = flowdiff.digits_data("test")
    images, labels = data.images[:20], data.labels[:20]
    right = flowdiff.sample_quality(images, labels=labels)["accuracy"]
    wrong = flowdiff.sample_quality(images, labels=(labels + 1) % 10)["accuracy"]
    assert right >= 0.8 and right + wrong <= 1.0
    assert flowdiff.sample_quality(images, labels=labels.tolist())["accuracy"] == right


# -- log_likelihood: an error bar of 0 on a one-step solve ---------------------------------------------------

def test_log_likelihood_one_step_has_no_check_solve_to_measure_it():
    """steps=1 with the default solve_check compared the solve with itself (half of one step is one step): error
    bar 0.0 for a log-density off by several nats. Below 16 steps no check solve can bound the error: the bar is inf,
    said by an ErrorBarWarning, and no check solve is spent."""
    g = Gaussian(torch.zeros(4, dtype=torch.float64), 0.5)
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.5
    for steps in (1, 2):
        with pytest.warns(ErrorBarWarning, match=rf"steps={steps}: a fixed grid of fewer than 16 steps"):
            r = flowdiff.log_likelihood(g.flow(), x, steps=steps, solver="rk4")
        assert bool(torch.isinf(r.error).all()) and "check" not in r.stats.extra and r.stats.nfe == 4 * steps
    r = flowdiff.log_likelihood(g.flow(), x, steps=1, solver="rk4", solve_check=False)  # asked for: no error bar
    assert r.error is None and r.solve_error is None


def test_cli_likelihood_one_step_says_its_bar_is_unbounded(capsys, tmp_path):
    write_digits(tmp_path, 1)
    code, out, err = run(capsys, ["likelihood", "d0.png", *MIX8, "--steps", "1", "--solver", "rk4"], tmp_path)
    assert code == 0, err
    assert "inf" in out and "fewer than 16 steps" in out + err


# -- sample_like / scheduler_plan: steps=0 for the schedulers read off diffusers ----------------------------

@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler",
                                  "DPMSolverMultistepScheduler"])
def test_scheduler_plan_checks_steps_for_every_scheduler(name):
    """steps=0 was checked on the DDIM and flow-matching routes only: Euler, LMS and DPM-Solver said 'sigmas must
    be 1-D with at least 2 values, got shape (1,)', Heun a bare "object of type 'NoneType' has no len()"."""
    diffusers = pytest.importorskip("diffusers")
    scheduler = getattr(diffusers, name)()
    with pytest.raises(ValueError, match=r"steps must be >= 1, got 0"):
        flowdiff.scheduler_plan(scheduler, 0)
    with pytest.raises(TypeError, match=r"steps must be an int, got str"):
        flowdiff.scheduler_plan(scheduler, "4")
    assert len(flowdiff.scheduler_plan(scheduler, 4).sigmas) == 5


def test_pndm_steps_of_the_wrong_type_are_named():
    diffusers = pytest.importorskip("diffusers")
    with pytest.raises(TypeError, match=r"steps must be an int, got str"):  # was: '<' not supported between ...
        flowdiff.scheduler_plan(diffusers.PNDMScheduler(skip_prk_steps=True), "4")


# -- tuned-grid files: read without a look at what they hold ---------------------------------------------------

def _tuned_file(tmp_path):
    flow = flowdiff.pretrained("digits")
    grid = flowdiff.stored_grid(flow, "unipc", 10)
    return flow, grid, Path(grid.save(tmp_path / "g.json"))


def test_tuned_grid_load_of_a_binary_file_names_the_file(tmp_path):
    """A latents file given to TunedGrid.load was a bare UnicodeDecodeError."""
    flow, _, _ = _tuned_file(tmp_path)
    (tmp_path / "x.safetensors").write_bytes(bytes([0x88, 0xFF, 0x00, 0x10]) * 8)
    with pytest.raises(ValueError, match=r"x\.safetensors.*not a readable tuned grid"):
        flowdiff.TunedGrid.load(tmp_path / "x.safetensors", flow)
    with pytest.raises(ValueError, match=r"x\.safetensors.*not a readable tuned-grids"):
        flowdiff.load_grids(tmp_path / "x.safetensors")


@pytest.mark.parametrize("edit", ["reversed", "negative", "nfe"])
def test_tuned_grid_load_refuses_a_grid_it_could_not_be(tmp_path, edit):
    """An edited file loaded silently: an increasing σ list (which generate then refused without naming the file),
    a negative σ, or nfe=3 beside a 10-step grid (a budget no solver spends on 10 steps)."""
    import json
    flow, grid, path = _tuned_file(tmp_path)
    data = json.loads(path.read_text())
    if edit == "reversed":
        data["sigmas"] = data["sigmas"][::-1]
    elif edit == "negative":
        data["sigmas"][-1] = (-0.5).hex()
    else:
        data["nfe"] = 3
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"g\.json.*(sigmas|nfe)"):
        flowdiff.TunedGrid.load(path, flow)
    flowdiff.save_grids([grid], tmp_path / "set.json")
    data = json.loads((tmp_path / "set.json").read_text())
    data["grids"][0].update({k: v for k, v in json.loads(path.read_text()).items() if k in ("sigmas", "nfe")})
    (tmp_path / "set.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"set\.json: grid 0.*(sigmas|nfe)"):
        flowdiff.load_grids(tmp_path / "set.json")


def test_stored_grid_refuses_a_misspelt_solver_or_budget():
    """stored_grid(flow, 'unpic', 10) said None, as for a solver with no shipped grid; so did nfe='10' and 0."""
    flow = flowdiff.pretrained("digits")
    assert flowdiff.stored_grid(flow, "unipc", 10) is not None
    assert flowdiff.stored_grid(flow, "rk4", 10) is None  # a real solver without a shipped grid
    with pytest.raises(ValueError, match=r"unknown solver 'unpic'"):
        flowdiff.stored_grid(flow, "unpic", 10)
    with pytest.raises(TypeError, match=r"nfe must be an int"):
        flowdiff.stored_grid(flow, "unipc", "10")
    with pytest.raises(ValueError, match=r"nfe must be >= 1"):
        flowdiff.stored_grid(flow, "unipc", 0)


# -- classifier_free_guidance: a NumPy or tensor scale ------------------------------------------------------

def test_guidance_scale_may_be_a_numpy_number_or_a_tensor_with_a_gradient():
    """np.float32(2.0) was refused as 'scale must be a finite number, got 2.0'; a 0-dim tensor too, although the
    README offers gradients 'with respect to a guidance scale given as a tensor' (docs: set guided.model.scale)."""
    import numpy as np
    flow = flowdiff.pretrained("digits")
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = {"class_labels": torch.tensor([3, 7])}
    plain = flowdiff.generate(flowdiff.classifier_free_guidance(flow, 2.0), noise, steps=3, model_kwargs=labels).x
    numpy = flowdiff.generate(flowdiff.classifier_free_guidance(flow, np.float32(2.0)), noise, steps=3,
                              model_kwargs=labels).x
    assert torch.equal(plain, numpy)

    def grad(route):
        w = torch.tensor(2.0, requires_grad=True)
        if route == "argument":
            guided = flowdiff.classifier_free_guidance(flow, w)
        else:  # the documented route (docs/gradients.md)
            guided = flowdiff.classifier_free_guidance(flow, 2.0)
            guided.model.scale = w
        x = flowdiff.generate(guided, noise, steps=3, model_kwargs=labels).x
        return x, torch.autograd.grad(x.sum(), w)[0]

    (x_a, g_a), (x_b, g_b) = grad("argument"), grad("attribute")
    assert torch.equal(x_a, plain) and torch.equal(x_a, x_b) and torch.equal(g_a, g_b) and g_a != 0
    for bad in (torch.tensor([2.0, 3.0]), torch.tensor(float("nan")), torch.tensor(2)):
        with pytest.raises(TypeError, match="scale must be"):
            flowdiff.classifier_free_guidance(flow, bad)


# -- the closed-form models: a negative σ read as |σ| -----------------------------------------------------------

@pytest.mark.parametrize("call", ["solution0", "solution1", "gaussian_log_prob", "mixture_log_prob"])
@pytest.mark.parametrize("sigma", [-1.0, float("nan"), float("inf")])
def test_closed_form_models_refuse_a_sigma_that_is_no_noise_level(call, sigma):
    """Gaussian.solution(x, -1.0, 0.0) returned the solution from σ = +1 and log_prob(x, -1.0) the density at
    σ = +1 (the formulas square σ), silently."""
    from flowdiff.models.analytic import Mixture
    g = Gaussian(torch.zeros(4, dtype=torch.float64), 0.5)
    m = Mixture(torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), 0.3)
    x = torch.zeros(2, 4, dtype=torch.float64)
    calls = {"solution0": lambda: g.solution(x, sigma, 0.0), "solution1": lambda: g.solution(x, 1.0, sigma),
             "gaussian_log_prob": lambda: g.log_prob(x, sigma), "mixture_log_prob": lambda: m.log_prob(x, sigma)}
    with pytest.raises(ValueError, match=r"sigma.* must be a finite number >= 0"):
        calls[call]()


def test_closed_form_sample_counts():
    """sample(-1) was a bare torch RuntimeError (negative dimension)."""
    from flowdiff.models.analytic import Mixture
    g = Gaussian(torch.zeros(4, dtype=torch.float64), 0.5)
    m = Mixture(torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), 0.3)
    for model in (g, m):
        assert model.sample(2).shape == (2, 4)
        with pytest.raises(ValueError, match=r"n must be an int >= 1 \(the number of samples\), got -1"):
            model.sample(-1)
        with pytest.raises(ValueError, match=r"n must be an int >= 1"):
            model.sample(2.5)


# -- a negative steps_offset wrapped around the ᾱ table -----------------------------------------------------------

@pytest.mark.parametrize("offset", [-5, 1.5, "1"])
def test_a_steps_offset_that_is_not_a_count_is_refused(offset):
    """steps_offset=-5 gave DDIM's last timestep −5, which indexed the ᾱ table from its end: scheduler_sigmas
    returned [9.17, 1.43, 151.2, 0] (not decreasing) without a word; 1.5 was truncated to 1."""
    config = {"_class_name": "DDIMScheduler", "clip_sample": False, "steps_offset": offset}
    with pytest.raises(ValueError, match=r"steps_offset must be an int >= 0"):
        flowdiff.scheduler_sigmas(config, 3)
    flow = Gaussian(torch.zeros(4, dtype=torch.float64), 0.5).flow()
    with pytest.raises(ValueError, match=r"steps_offset must be an int >= 0"):
        flowdiff.encode_like(flow, torch.zeros(2, 4, dtype=torch.float64),
                             {**config, "_class_name": "DDIMInverseScheduler"}, 3)
    grid = flowdiff.scheduler_sigmas({**config, "steps_offset": 1}, 3)
    assert np.all(np.diff(grid) < 0)


# -- a diffusers UNet given noise with other channels -------------------------------------------------------------

def test_diffusers_model_names_a_channel_mismatch():
    """Noise of 3 channels for a 1-channel UNet was torch's 'Given groups=1, weight of size [8, 1, 3, 3], expected
    input[2, 3, 8, 8] to have 1 channels', with no step or σ."""
    diffusers = pytest.importorskip("diffusers")
    from flowdiff.models.diffusers_io import DiffusersModel
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D",) * 2,
                                 up_block_types=("UpBlock2D",) * 2, norm_num_groups=4)
    flow = flowdiff.ProbabilityFlow(DiffusersModel(unet), flowdiff.Schedule.linear())
    assert flowdiff.generate(flow, torch.randn(2, 1, 8, 8), steps=2).x.shape == (2, 1, 8, 8)
    # refused before the solve, naming the argument (review Q3); the model's own check still names the channels
    with pytest.raises(ValueError, match=r"noise has shape \(2, 3, 8, 8\).*takes \(batch, 1, any, any\)"):
        flowdiff.generate(flow, torch.randn(2, 3, 8, 8), steps=2)
    with pytest.raises(ValueError, match=r"1 channel.*\(2, 3, 8, 8\)"):
        flow.eps(torch.randn(2, 3, 8, 8), 1.0)


# -- image formats that no file holds -----------------------------------------------------------------------------

@pytest.mark.parametrize("args", [("L", 12), ("CMYK", 8), ("RGB", 32, "float"), ("L", 8, "int"), ("L", True)])
def test_image_format_refuses_what_it_cannot_read_or_write(args):
    """ImageFormat('L', 12) was accepted and written as a 16-bit PNG holding 12-bit values (a dark image read back at
    4095/65535); 'CMYK' and the rest were accepted too."""
    with pytest.raises(ValueError, match=r"ImageFormat\(mode="):
        ImageFormat(*args)


def test_from_data_names_a_numpy_array():
    from flowdiff.runs.imageio import from_data
    with pytest.raises(TypeError, match=r"from_data: x must be a torch.Tensor"):  # was: AttributeError 'detach'
        from_data(np.zeros((1, 8, 8)), GREY8)
    assert from_data(torch.zeros(1, 8, 8, dtype=torch.float64), GREY8).dtype == np.uint8


# -- `flowdiff compare --task roundtrip` ----------------------------------------------------------------------------

def test_compare_roundtrip_refuses_more_images_than_the_held_out_digits(capsys, tmp_path):
    """--batch 1000 ran on the 364 held-out digits and the report said 'the first 1000 held-out digits'."""
    held_out = len(flowdiff.digits_data("test").images)
    code, _, err = run(capsys, ["compare", "--task", "roundtrip", "--solver", "euler", "--grid", "logsnr", "--nfe",
                                "3", "--batch", held_out + 1, "--out", "c"], tmp_path)
    line = one_line(err)
    assert code == 2 and f"--batch {held_out + 1}" in line and str(held_out) in line, line


def test_compare_roundtrip_report_has_no_sample_command_and_names_skipped_runs(capsys, tmp_path):
    """The round-trip report offered `flowdiff sample ...` as 'the best flowdiff row, reproduced' (a sample is no
    round trip); with only solvers that cannot encode (ipndm) the command failed with 'reconstructions must name at
    least one method'."""
    code, out, err = run(capsys, ["compare", "--task", "roundtrip", "--solver", "euler", "--grid", "logsnr", "--nfe",
                                  "3", "--batch", "2", "--out", "c"], tmp_path)
    assert code == 0, err
    report = (tmp_path / "c" / "compare.md").read_text()
    assert "flowdiff sample" not in report and "flowdiff sample" not in out
    code, _, err = run(capsys, ["compare", "--task", "roundtrip", "--solver", "ipndm", "--grid", "logsnr", "--nfe",
                                "3", "--batch", "2", "--out", "d"], tmp_path)
    line = one_line(err)
    assert code == 1 and "no run could encode: ipndm" in line and "use 'lms'" in line, line


# -- log_likelihood of images on the wrong scale ----------------------------------------------------------------

def test_log_likelihood_warns_for_images_far_outside_the_data_range():
    """encode warns for [0, 255] images (README: a UserWarning naming the values' span); log_likelihood took them
    silently and returned a bits/dim of pixels the model never saw."""
    g = Gaussian(torch.zeros(4, dtype=torch.float64), 0.5)
    x = torch.rand(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match=r"images span \[.*\], far outside the model's data range"):
        flowdiff.log_likelihood(g.flow(), x * 255, steps=2, solver="rk4", solve_check=False)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flowdiff.log_likelihood(g.flow(), x * 2 - 1, steps=2, solver="rk4", solve_check=False)


# -- write_report of a comparison whose states are not images ---------------------------------------------------

def test_write_report_of_vector_states_leaves_out_the_sample_grid(tmp_path):
    """compare(keep_images=2) on a closed-form Gaussian (states of shape (batch, 4)) then write_report: a bare
    'not enough values to unpack (expected 4, got 2)' from the sample grid."""
    from flowdiff.tools.report import sample_grid, write_report
    flow = Gaussian(torch.zeros(4, dtype=torch.float64), 0.5).flow()
    noise = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    table = flowdiff.compare(flow, noise, solvers=["euler"], grids=["logsnr"], nfe=[4], rtol=1e-4, atol=1e-4,
                             keep_images=2)
    paths = write_report(table, tmp_path / "rep", facts={"model": "a Gaussian"})
    assert "samples" not in paths and not (tmp_path / "rep" / "samples.png").exists()
    report = paths["report"].read_text()
    assert "(3, 4)" in report and "not images" in report
    with pytest.raises(ValueError, match=r"sample_grid draws images.*\(2, 4\)"):
        sample_grid(table, tmp_path / "s.png")


def test_comparison_best_names_a_budget_of_the_wrong_type():
    """table.best('10') said 'no run at budget 10; budgets run: [10]'."""
    flow = Gaussian(torch.zeros(4, dtype=torch.float64), 0.5).flow()
    noise = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    table = flowdiff.compare(flow, noise, solvers=["euler"], grids=["logsnr"], nfe=[4], rtol=1e-4, atol=1e-4)
    assert table.best(4).budget == 4
    with pytest.raises(TypeError, match=r"budget must be an int .*got str '4'"):
        table.best("4")


# -- log_likelihood under a zero-terminal-SNR schedule -----------------------------------------------------------

@pytest.mark.parametrize("how", [{"steps": 4, "solver": "rk4"}, {}])
def test_log_likelihood_names_a_zero_terminal_snr_schedule(how):
    """σ_max = ∞: the fixed grid said "a grid uniform in 'logsigma' time needs both ends at finite times; σ = 0.0
    -> inf is log(σ+c) = -4.6 -> inf", naming neither the schedule nor a way out."""
    alphas = torch.cat([torch.linspace(0.999, 0.01, 9, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    flow = flowdiff.ProbabilityFlow(lambda x, t: torch.tanh(x), alphas, prediction_type="v_prediction")
    assert flow.schedule.sigma_max == float("inf")
    with pytest.raises(ValueError, match=r"zero terminal SNR"):
        flowdiff.log_likelihood(flow, torch.zeros(2, 4, dtype=torch.float64), **how)


# -- `flowdiff likelihood a/x.png b/x.png` printed two rows named x.png ----------------------------------------------

def test_cli_likelihood_rows_name_each_image_apart(capsys, tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        write_digits(tmp_path / folder, 1)
    code, out, err = run(capsys, ["likelihood", "a/d0.png", "b/d0.png", *MIX8, "--steps", "2", "--solver", "rk4"],
                         tmp_path)
    assert code == 0, err
    rows = [line.split()[0] for line in out.splitlines()  # a bar of 2 steps is inf (below 16 steps: no bar)
            if line.endswith((*"0123456789", "± inf")) and "d0.png" in line]
    assert rows == ["a/d0.png", "b/d0.png"], out


def test_cli_likelihood_error_column_says_what_it_holds(capsys, tmp_path):
    """The header said '± error (probes and solve)' for the exact divergence (no probes) and for one probe (no
    spread to measure): the column held the solve's error alone."""
    write_digits(tmp_path, 1)
    base = ["likelihood", "d0.png", *MIX8, "--steps", "2", "--solver", "rk4"]
    for extra, header in (([], "± error (solve)"), (["--divergence", "hutchinson", "--probes", "1"], "± error (solve)"),
                          (["--divergence", "hutchinson", "--probes", "2"], "± error (probes and solve)")):
        code, out, err = run(capsys, [*base, *extra], tmp_path)
        assert code == 0, err
        assert header in out and (header == "± error (probes and solve)" or "probes" not in out.split("±")[1]), out


# -- a command that fails leaves no empty folders behind -------------------------------------------------------------

def test_a_failed_command_removes_the_empty_folders_its_plan_made(capsys, tmp_path):
    """`flowdiff decode l.safetensors --model <another> --out dec/a` failed (after the output plan had made the
    folders) and left dec/ and dec/a/ behind, empty; so did `roundtrip missing.png --out r`."""
    write_digits(tmp_path, 1)
    code, _, err = run(capsys, ["encode", "d0.png", "--steps", "2", "--out", "l.safetensors"], tmp_path)
    assert code == 0, err
    code, _, err = run(capsys, ["decode", "l.safetensors", *MIX8, "--out", "dec/a"], tmp_path)
    assert code == 1 and not (tmp_path / "dec").exists(), err
    code, _, err = run(capsys, ["roundtrip", "missing.png", "--steps", "2", "--out", "r"], tmp_path)
    assert code == 1 and not (tmp_path / "r").exists(), err
    (tmp_path / "mine").mkdir()  # a folder the user made stays, and so does one that holds files
    code, _, err = run(capsys, ["decode", "l.safetensors", *MIX8, "--out", "mine/sub"], tmp_path)
    assert code == 1 and (tmp_path / "mine").is_dir() and not (tmp_path / "mine" / "sub").exists(), err
    code, _, err = run(capsys, ["decode", "l.safetensors", "--out", "ok"], tmp_path)  # success keeps its folder
    assert code == 0 and (tmp_path / "ok" / "d0.png").is_file(), err


# -- Schedule.timestep(nan), make_sigmas of something that is no schedule ----------------------------------------------

def test_schedule_timestep_refuses_nan():
    """timestep(nan) (and timesteps([1.0, nan])) was a bare IndexError: NaN fails every comparison."""
    s = flowdiff.Schedule.linear()
    assert s.timestep(0.0) == 0.0 and s.timestep(float("inf")) == 999.0
    with pytest.raises(ValueError, match=r"sigma must be >= 0, got nan"):
        s.timestep(float("nan"))
    with pytest.raises(ValueError, match=r"sigma must be >= 0, got nan"):
        s.timesteps([1.0, float("nan")])


def test_make_sigmas_names_a_schedule_of_the_wrong_type():
    with pytest.raises(TypeError, match=r"schedule must be a flowdiff.Schedule.*got str"):  # was: AttributeError
        flowdiff.make_sigmas("linear", "trailing", 3)
    assert len(flowdiff.make_sigmas(flowdiff.Schedule.linear(), "trailing", 3)) == 4


# -- Latent.to(dtype) -----------------------------------------------------------------------------------------------

def test_latent_to_moves_between_devices_only():
    """Latent.to(torch.float16) was accepted (Tensor.to takes a dtype too): x and a reversible latent's state were
    cast, so the exact decode was no longer exact, and the decode still returned the recorded dtype; to('foo') was
    torch's RuntimeError listing device types."""
    g = Gaussian(torch.zeros(4, dtype=torch.float64), 0.5)
    x = g.sample(2, generator=torch.Generator().manual_seed(0)).float()
    enc = flowdiff.encode(g.flow(), x, steps=3, solver="reversible_heun")
    assert torch.equal(flowdiff.decode(g.flow(), enc.latent.to("cpu")).x, x)
    with pytest.raises(TypeError, match=r"Latent.to\(device\).*torch.float16"):
        enc.latent.to(torch.float16)
    with pytest.raises(ValueError, match=r"Latent.to: 'foo' is not a torch device"):
        enc.latent.to("foo")


def test_decode_with_the_default_model_names_the_encoding_model(capsys, tmp_path):
    """Latents of an RGB model decoded without --model said only that 'digits' makes (1, 8, 8)."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D",) * 2,
                                 up_block_types=("UpBlock2D",) * 2, norm_num_groups=4)
    diffusers.DDPMPipeline(unet, diffusers.DDIMScheduler(clip_sample=False)).save_pretrained(tmp_path / "rgbnet")
    write_image(tmp_path / "c.png", np.zeros((8, 8, 3), np.uint8), ImageFormat("RGB", 8))
    code, _, err = run(capsys, ["encode", "c.png", "--model", "rgbnet", "--steps", "2", "--out", "l.safetensors"],
                       tmp_path)
    assert code == 0, err
    code, _, err = run(capsys, ["decode", "l.safetensors", "--out", "dec"], tmp_path)
    line = one_line(err)
    assert code == 1 and "'rgbnet'" in line and "(1, 8, 8)" in line, line


# -- flowdiff.tools.testing: a tolerance no error can meet -------------------------------------------------------------

@pytest.mark.parametrize("atol", [-1.0, float("nan"), "1e-6"])
def test_assert_round_trip_refuses_a_tolerance_that_is_no_bound(atol):
    """atol=-1 or NaN made every round trip 'fail' ('round trip error 0 > atol nan'), an exact one included."""
    from flowdiff.tools import testing as ft
    g = Gaussian(torch.zeros(4, dtype=torch.float64), 0.5)
    x = g.sample(2, generator=torch.Generator().manual_seed(0))
    ft.assert_round_trip(g.flow(), x, solver="reversible_heun", steps=3, atol=1e-10)
    with pytest.raises(ValueError, match=r"atol must be a finite number >= 0"):
        ft.assert_round_trip(g.flow(), x, solver="reversible_heun", steps=3, atol=atol)


def test_cli_likelihood_data_says_it_reads_no_subfolders(capsys, tmp_path):
    """`roundtrip --data` walks subfolders; `likelihood --data DIR` with images only in DIR/0/ said 'no image files
    in it', which a user who just ran roundtrip on the same folder could not square."""
    (tmp_path / "digits" / "0").mkdir(parents=True)
    write_digits(tmp_path / "digits" / "0", 2)
    code, _, err = run(capsys, ["likelihood", "--data", "digits", *MIX8, "--steps", "2", "--solver", "rk4"], tmp_path)
    line = one_line(err)
    assert code == 1 and "not its subfolders, which hold 2" in line, line


def test_likelihood_example_gives_no_error_bar_for_one_image(tmp_path):
    """examples/likelihood.py --batch 1 wrote '± std. error 0.000': mean_bits_per_dim() has none for one image."""
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, str(root / "examples" / "likelihood.py"), "--batch", "1", "--steps", "2",
                           "--probes", "1", "--out", str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split("|")[3].strip() for line in (tmp_path / "likelihood.md").read_text().splitlines()
            if line.startswith("| ") and "bits/dim" not in line]
    assert rows and all(cell == "—" for cell in rows), rows


# -- Save(denoised=True): the x̂₀ of the saved state ---------------------------------------------------------------

@pytest.mark.parametrize("solver", ["euler", "heun", "dpmpp_2m", "lms", "dpmpp_3m", "rk4"])
@pytest.mark.parametrize("entry", ["generate", "encode"])
def test_saved_denoised_is_the_models_at_the_saved_state(solver, entry):
    """The README's claim, checked on a Gaussian: a saved state's x̂₀ is the model's at that state (or None). The
    predictor–corrector methods (unipc, abm) carry the predicted state's instead, off by up to 0.13 here: the
    README said otherwise and now says so (StepState's docstring already did)."""
    g = Gaussian(torch.linspace(-0.5, 0.5, 4, dtype=torch.float64), 0.5)
    start = (torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) if entry == "generate"
             else g.sample(2, generator=torch.Generator().manual_seed(0)))
    r = getattr(flowdiff, entry)(g.flow(), start, steps=5, solver=solver, save=flowdiff.Save(steps=True, denoised=True))
    checked = 0
    for st in r.saved:
        if st.denoised is not None:
            exact = st.xbar - st.sigma * g.eps(st.xbar, st.sigma)
            assert torch.allclose(st.denoised, exact, rtol=0, atol=1e-12), (st.step, st.sigma)
            checked += 1
    assert checked >= 1


# -- `flowdiff sample`: a grid too large to write ---------------------------------------------------------------------

def test_sample_refuses_a_grid_larger_than_an_image_flowdiff_reads_before_the_work(capsys, tmp_path, monkeypatch):
    """--num 100000 --scale 64 asked for a grid of 33 gigapixels, found out only after all the samples were made;
    the default scale (up to 64 pixels a side) made a 22832×22832 grid for --num 100000, which flowdiff's own
    reader refuses (8192×8192). The pixel limit (FLOWDIFF_MAX_PIXELS) is lowered here to keep the test small."""
    monkeypatch.setenv("FLOWDIFF_MAX_PIXELS", str(100 * 100))
    code, _, err = run(capsys, ["sample", *MIX8, "--num", "16", "--steps", "1", "--scale", "8", "--out", "a.png"],
                       tmp_path)
    line = one_line(err)
    assert code == 2 and "--scale 8" in line and "--num 16" in line and "10000" in line.replace(",", ""), line
    assert not (tmp_path / "a.png").exists()
    code, _, err = run(capsys, ["sample", *MIX8, "--num", "16", "--steps", "1", "--out", "b.png"], tmp_path)
    assert code == 0, err  # the default scale shrinks to fit
    from PIL import Image
    width, height = Image.open(tmp_path / "b.png").size
    assert width * height <= 100 * 100 and width >= 4 * 8


# -- a --data run refused on its arguments left a run.json that blocked the corrected command --------------------------

def test_data_run_with_a_bad_grid_leaves_no_run_behind(capsys, tmp_path):
    """`roundtrip --data D --out R --steps 2 --grid tuned` failed ('needs --nfe') after writing R/run.json; the
    corrected `--nfe 10 --solver unipc --grid tuned` was then refused: 'R holds a run with other arguments'."""
    (tmp_path / "d").mkdir()
    write_digits(tmp_path / "d", 2)
    code, _, err = run(capsys, ["roundtrip", "--data", "d", "--out", "r", "--steps", "2", "--grid", "tuned"], tmp_path)
    assert code == 1 and "--grid tuned needs --nfe" in one_line(err), err
    assert not (tmp_path / "r" / "run.json").exists()
    code, _, err = run(capsys, ["roundtrip", "--data", "d", "--out", "r", "--nfe", "10", "--solver", "unipc", "--grid",
                                "tuned"], tmp_path)
    assert code == 0, err
    assert (tmp_path / "r" / "results.csv").is_file()


@pytest.mark.parametrize("bad", [["--solver", "ipndm", "--steps", "2"], ["--steps", "2000"]])
def test_data_run_refused_in_its_first_batch_leaves_no_run_behind(capsys, tmp_path, bad):
    """Arguments only the solve refuses (a solver that cannot encode, more steps than the schedule has) failed in the
    first batch, after run.json was written: the corrected command was refused as 'a run with other arguments'."""
    (tmp_path / "d").mkdir()
    write_digits(tmp_path / "d", 2)
    code, _, err = run(capsys, ["roundtrip", "--data", "d", "--out", "r", *bad], tmp_path)
    assert code == 1, err
    assert not (tmp_path / "r" / "run.json").exists()
    code, _, err = run(capsys, ["roundtrip", "--data", "d", "--out", "r", "--steps", "2"], tmp_path)
    assert code == 0, err
