"""The eighth new-user sweep: likelihoods, bits/dim and their error bars (``flowdiff.log_likelihood`` and
``flowdiff likelihood``), on closed-form models whose log-density is known.

Each test failed before its fix (its docstring says what a user saw). Findings outside this sweep's files are
listed in the sweep's report, not fixed here.
"""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import flowdiff
from flowdiff.cli import main, save_images
from flowdiff.models.analytic import Gaussian


@pytest.fixture(scope="module")
def gaussian():
    """A 2×2 Gaussian with a full covariance (Rademacher probes are then not exact) and 8-bit-lattice points."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    model = Gaussian(torch.linspace(-0.3, 0.3, 4, dtype=torch.float64).reshape(1, 2, 2),
                     0.05 * torch.eye(4, dtype=torch.float64) + 0.05 * a @ a.T)
    x = model.sample(4, generator=gen).clamp(-1, 1)
    return model, ((x + 1) * 127.5).round() / 127.5 - 1


def _run(model, images, **kwargs):
    return flowdiff.log_likelihood(model.flow(), images, solver="rk4", steps=4, **kwargs)


@pytest.mark.parametrize("estimator", [flowdiff.Trace("hutchinson", probes=3),
                                       flowdiff.Trace("hutch++", probes=2, sketch=2)])
@pytest.mark.parametrize("dequantize", [None, 256])
def test_the_first_images_of_a_batch_give_the_same_numbers_alone(gaussian, estimator, dequantize):
    """A user who measured 4 images, then the first 2 of them with the same seed, got another log p for image 1
    (0.19 nats apart, Hutchinson, 3 probes): the probes were drawn as one (probes, batch, D) block after the whole
    batch's dequantization noise, so an image's probes depended on the batch size. They are drawn image after image
    now: on a fixed grid the first images' figures do not depend on the images after them."""
    model, x = gaussian
    kwargs = dict(estimator=estimator, generator=7, dequantize=dequantize)
    full, head = _run(model, x, **kwargs), _run(model, x[:2], **kwargs)
    torch.testing.assert_close(head.log_prob, full.log_prob[:2], rtol=0, atol=1e-12)
    torch.testing.assert_close(head.bits_per_dim, full.bits_per_dim[:2], rtol=0, atol=1e-12)
    if head.per_probe is not None:
        torch.testing.assert_close(head.per_probe, full.per_probe[:2], rtol=0, atol=1e-12)


def test_on_lattice_pixels_beyond_one_are_said_to_be_out_of_range(gaussian):
    """Pixels exactly on the lattice's extension (1 + 2Δ) were refused as 'not on the 256-level lattice … largest
    distance 5.57e-17': a distance of nothing. The message now says that the images leave [-1, 1], and where."""
    model, x = gaussian
    for value in (1 + 2 * 2 / 255, -1 - 3 * 2 / 255):
        y = x.clone()
        y[0, 0, 0, 0] = value
        with pytest.raises(ValueError, match=r"dequantize=256: the images span \[.*\], outside the lattice's range"):
            _run(model, y, dequantize=256, generator=0)


def test_levels_finer_than_the_data_are_warned_about_and_cost_about_log2_of_the_ratio(gaussian):
    """8-bit data measured with dequantize=511 gave ~1 bit/dim more than with 256, silently (the 256-level lattice
    is every second point of the 511-level one, so nothing was off the lattice). Now a warning names the data's
    own lattice and what to pass; the figure itself is the asked-for lattice's, about log2(2) = 1 bit/dim above."""
    model, x = gaussian  # no check solve: the warnings asserted here are the lattice's alone
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        on_theirs = _run(model, x, dequantize=256, generator=0, solve_check=False)
    with pytest.warns(UserWarning, match=r"dequantize=511: every pixel .* coarser 256-level lattice .* "
                                         r"give dequantize=256") as caught:
        finer = _run(model, x, dequantize=511, generator=0, solve_check=False)
    assert caught[0].filename == __file__  # the warning points at the caller's line
    gap = float((finer.bits_per_dim - on_theirs.bits_per_dim).mean())
    assert gap == pytest.approx(1.0, abs=0.05)
    # binary images read as 8-bit: one level in 255 of them
    binary = torch.where(x > 0, 1.0, -1.0).double()
    with pytest.warns(UserWarning, match="coarser 2-level lattice"):
        _run(model, binary, dequantize=256, generator=0, solve_check=False)
    with warnings.catch_warnings():  # one distinct value says nothing of the lattice
        warnings.simplefilter("error")
        _run(model, torch.zeros_like(x) - 1, dequantize=256, generator=0, solve_check=False)


RUN = ["--model", "analytic-mixture", "--divergence", "hutchinson", "--probes", "2", "--solver", "rk4",
       "--steps", "3", "--no-progress"]


def test_cli_warns_that_a_16_bit_file_of_8_bit_pixels_is_measured_on_65536_levels(tmp_path, capsys):
    """The same digit saved as an 8-bit and as a 16-bit PNG (its values × 257) gave ~7 and ~15 bits/dim, with
    nothing said: the default levels come from the file's depth. The command now warns, in its flags' words."""
    (path,) = save_images(flowdiff.digits_data("test").images[:1], tmp_path, ["d8.png"])
    wide = tmp_path / "d16.png"
    Image.fromarray(np.asarray(Image.open(path)).astype(np.uint16) * 257).save(wide)
    assert main(["likelihood", str(wide), *RUN]) == 0
    err = capsys.readouterr().err
    assert "warning: the files' 65536 levels: every pixel of the images lies on the coarser 256-level lattice" in err
    assert "give --dequantize 256" in err and "dequantize=" not in err
    assert main(["likelihood", str(wide), *RUN, "--dequantize", "256"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_cli_dequantize_below_two_levels_names_the_flag(tmp_path, capsys):
    """``--dequantize 1`` passed the parser (a positive int) and failed in the library as 'dequantize must be None
    or …', a keyword the command line does not have. It is refused at the flag now."""
    (path,) = save_images(flowdiff.digits_data("test").images[:1], tmp_path, ["d8.png"])
    assert main(["likelihood", str(path), *RUN, "--dequantize", "1"]) == 2
    err = capsys.readouterr().err
    assert "argument --dequantize: expected an integer >= 2" in err and "got 1" in err


def _sketch_seeds(dim: int):
    """Seeds whose one image draws two Hutch++ sketch vectors (Rademacher) that are equal or opposite, and one that
    does not: the first draws of an image are its sketch's (no dequantization)."""
    collinear, plain = None, None
    for seed in range(5000):
        sketch = torch.randint(0, 2, (2, dim), generator=torch.Generator().manual_seed(seed)) * 2 - 1
        if int((sketch[0] * sketch[1]).sum().abs()) == dim:
            collinear = seed if collinear is None else collinear
        else:
            plain = seed if plain is None else plain
    return collinear, plain


def test_hutch_plus_plus_with_a_rank_deficient_sketch_takes_the_usual_steps():
    """400 points of an 8-dimensional Gaussian took 46 982 field evaluations with Hutch++ (sketch 2) instead of
    ~150: two points had drawn ±equal Rademacher sketch vectors (chance 1/128 each in D = 8), QR then filled Q's
    second column with rounding noise that changed at every evaluation, and the adaptive solve of the whole batch
    crawled. Q now spans only the sketch's directions above the rounding."""
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(8, 8, generator=gen, dtype=torch.float64) / 8**0.5
    cov = 0.05 * torch.eye(8, dtype=torch.float64) + 0.3 * a @ a.T
    model = Gaussian(torch.zeros(8, dtype=torch.float64), cov)
    x = model.sample(1, generator=gen)
    prior = {"data_mean": 0.0, "data_var": cov.diagonal()}
    collinear, plain = _sketch_seeds(8)
    runs = {}
    for seed in (collinear, plain):
        runs[seed] = flowdiff.log_likelihood(model.flow(), x, estimator=flowdiff.Trace("hutch++", probes=4, sketch=2),
                                             generator=seed, adaptive=flowdiff.Adaptive(max_nfe=2000), **prior)
    assert runs[collinear].stats.nfe <= 2 * runs[plain].stats.nfe
    exact = model.log_prob(x, 0.0)
    for r in runs.values():
        assert float((r.log_prob - exact).abs().max()) <= 4 * float(r.error.max()) + 1e-3


@pytest.mark.parametrize("dtype, levels", [(torch.float16, 4096), (torch.float16, 65536), (torch.bfloat16, 1024)])
def test_half_precision_images_too_coarse_for_the_levels_are_refused(gaussian, dtype, levels):
    """float16 images with dequantize=65536 (or bfloat16 with 1024) were accepted whatever their values — even
    continuous samples, never quantized — and snapped to some lattice point: the snapping slack (the dtype's
    rounding near 1) reached half a cell, so every value was 'on the lattice'. Refused now, naming the dtype."""
    model, _ = gaussian
    continuous = model.sample(2, generator=torch.Generator().manual_seed(1)).clamp(-1, 1).to(dtype)
    with pytest.raises(ValueError, match=rf"dequantize={levels}: {str(dtype)[6:]} images cannot hold the "
                                         rf"{levels}-level lattice .* float32 or float64"):
        _run(model, continuous, dequantize=levels, generator=0)
    # the finest lattice each still holds is taken, and snaps what is on it
    coarse = 2048 if dtype == torch.float16 else 256
    on_lattice = ((continuous.double() + 1) * (coarse - 1) / 2).round() * 2 / (coarse - 1) - 1
    _run(model, on_lattice.to(dtype), dequantize=coarse, generator=0)


def test_the_check_solve_is_looser_even_where_the_step_cap_sets_every_step():
    """At Adaptive(rtol=1e-3, atol=1e-3) on a 16-dimensional Gaussian, the solve and its check solve (10× the
    tolerances) both took the largest step allowed everywhere, the same steps: ``solve_error`` was exactly 0 while
    log p was 0.006 nats off. The check solve's step cap is twice the solve's now, so its bar covers the error."""
    var = torch.linspace(0.02, 0.6, 16, dtype=torch.float64)
    model = Gaussian(torch.zeros(16, dtype=torch.float64), var)
    x = model.sample(4, generator=torch.Generator().manual_seed(0))
    r = flowdiff.log_likelihood(model.flow(), x, adaptive=flowdiff.Adaptive(rtol=1e-3, atol=1e-3),
                                data_mean=0.0, data_var=var)
    err = (r.log_prob - model.log_prob(x, 0.0)).abs()
    assert bool((r.solve_error > 0).all())
    assert bool((err <= r.error).all()), (err, r.error)
