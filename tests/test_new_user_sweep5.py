"""The fifth new-user sweep: the Python API's less-travelled entry points (fixed-point inversion, likelihood,
guidance, learned encoders).

Each test failed before its fix (its docstring says what a user saw). Findings outside this sweep's files are
listed in the sweep's report, not fixed here.
"""

import dataclasses

import numpy as np
import pytest
import torch

import flowdiff as fd
from flowdiff.models.analytic import Gaussian, Mixture


@pytest.fixture(scope="module")
def gaussian():
    flow = Gaussian(torch.linspace(-0.3, 0.3, 4), 0.5).flow()
    images = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.5
    return flow, images


# -- fixed-point inversion: an option its method never reads ----------------------------------------------------

@pytest.mark.parametrize("method, option, value", [("newton", "anderson", 5), ("anderson", "krylov_dim", 5)])
def test_fixed_point_refuses_an_option_its_method_does_not_use(gaussian, method, option, value):
    """`Inversion("fixed_point", {"method": "newton", "anderson": 5})` ran Newton–Krylov and dropped the
    Anderson depth without a word (likewise `krylov_dim` with method="anderson"): a user tuning it saw no effect."""
    flow, images = gaussian
    spec = fd.Inversion("fixed_point", {"method": method, option: value})
    with pytest.raises(ValueError, match=f"{option}={value} does not apply to method='{method}'"):
        fd.encode(flow, images, solver=spec, steps=3)


def test_fixed_point_hybrid_takes_both_options(gaussian):
    flow, images = gaussian
    enc = fd.encode(flow, images, solver=fd.Inversion("fixed_point", {"anderson": 2, "krylov_dim": 8}), steps=3)
    back = fd.decode(flow, enc.latent)
    assert enc.stats.extra["method"] == "hybrid" and enc.stats.extra["unconverged"] == []
    torch.testing.assert_close(back.x, images, rtol=0, atol=1e-12)


def test_fixed_point_takes_numpy_integers_as_counts(gaussian):
    """`{"max_iter": np.int64(50)}` (a count read from an array or a sweep) was refused with "max_iter must be an
    int >= 1, got np.int64(50)", which it is; `tol` took a NumPy float and `generate` takes NumPy `steps`."""
    flow, images = gaussian
    opts = {"method": "anderson", "max_iter": 50, "anderson": 2}
    plain = fd.encode(flow, images, solver=fd.Inversion("fixed_point", opts), steps=3)
    numpy = fd.encode(flow, images, solver=fd.Inversion("fixed_point", {k: np.int64(v) if k != "method" else v
                                                                       for k, v in opts.items()}), steps=3)
    assert torch.equal(plain.x, numpy.x) and plain.stats.nfe == numpy.stats.nfe


# -- log_likelihood: NumPy counts and model_dtype ------------------------------------------------------------------

def test_log_likelihood_takes_numpy_steps_and_levels(gaussian):
    """`log_likelihood(flow, x, steps=np.int64(4))` said "steps must be an int >= 1, got np.int64(4)" (and
    `dequantize=np.int64(256)` the same), while `generate(flow, noise, steps=np.int64(4))` runs."""
    flow, _ = gaussian
    levels = 256
    x = (torch.randint(0, levels, (2, 4), generator=torch.Generator().manual_seed(3)).double() / (levels - 1)) * 2 - 1

    def run(steps, dequantize):
        return fd.log_likelihood(flow, x, steps=steps, dequantize=dequantize,
                                 generator=torch.Generator().manual_seed(1))

    plain, numpy = run(4, levels), run(np.int64(4), np.int64(levels))
    assert torch.equal(plain.log_prob, numpy.log_prob) and torch.equal(plain.bits_per_dim, numpy.bits_per_dim)
    assert plain.stats.nfe == numpy.stats.nfe and plain.offset_bits == numpy.offset_bits


@pytest.mark.parametrize("model_dtype", ["float32", torch.int64, 32])
def test_log_likelihood_refuses_a_model_dtype_that_is_no_float_dtype(gaussian, model_dtype):
    """`model_dtype="float32"` stopped inside the solve with torch's "RuntimeError: Invalid device string:
    'float32'", which names neither the argument nor what it takes."""
    flow, images = gaussian
    with pytest.raises(TypeError, match=r"model_dtype must be a floating-point torch\.dtype .* got"):
        fd.log_likelihood(flow, images, steps=2, model_dtype=model_dtype)


def test_log_likelihood_model_dtype_still_casts_the_model_input(gaussian):
    flow, images = gaussian
    seen = []

    def model(x, t):  # ε = 0.1·x_t, any dtype: the likelihood of a linear field
        seen.append(x.dtype)
        return 0.1 * x

    logged = fd.ProbabilityFlow(model, flow.schedule)
    fd.log_likelihood(logged, images, steps=2, model_dtype=torch.float32, solve_check=False)
    assert seen and set(seen) == {torch.float32}



@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_log_likelihood_dequantizes_half_precision_8bit_images(gaussian, dtype):
    """8-bit images held in float16 (`images.half()`) were refused by `dequantize=256`: "the images are not on the
    256-level lattice of [-1, 1] (... largest distance 0.000243)", which is float16's own rounding of the lattice
    points; and a dequantized batch was cast back to float16/bfloat16, which rounds the noise (bfloat16 resolves half
    a cell at 256 levels). Snapped to the lattice and held in float32, the result is the float32 images'."""
    flow, _ = gaussian
    x = (torch.randint(0, 256, (3, 4), generator=torch.Generator().manual_seed(4)).double() / 255) * 2 - 1

    def run(images):
        return fd.log_likelihood(flow, images, steps=4, dequantize=256, generator=torch.Generator().manual_seed(5),
                                 solve_check=False)

    half, single = run(x.to(dtype)), run(x.float())
    assert torch.equal(half.log_prob, single.log_prob) and torch.equal(half.bits_per_dim, single.bits_per_dim)
    assert half.latent.dtype == dtype and single.latent.dtype == torch.float32
    off = x.to(dtype).float() + 0.3 * 2 / 255  # a third of a cell off the lattice: still refused
    with pytest.raises(ValueError, match="not on the 256-level lattice"):
        run(off.to(dtype))


def test_log_likelihood_takes_an_int_seed_as_stochastic_does(gaussian):
    """`log_likelihood(..., generator=0)` was "TypeError: generator must be a torch.Generator or None, got int",
    while `flowdiff.Stochastic(eta, generator=0)` takes a seed; the seed means a CPU generator seeded with it."""
    flow, images = gaussian
    trace = fd.Trace("hutchinson", probes=4)
    seeded = fd.log_likelihood(flow, images, steps=2, estimator=trace, generator=7, solve_check=False)
    given = fd.log_likelihood(flow, images, steps=2, estimator=trace, generator=torch.Generator().manual_seed(7),
                              solve_check=False)
    assert torch.equal(seeded.per_probe, given.per_probe) and torch.equal(seeded.log_prob, given.log_prob)
    for bad, err in [(-1, ValueError), (True, TypeError), ("7", TypeError)]:
        with pytest.raises(err, match="generator"):
            fd.log_likelihood(flow, images, steps=2, estimator=trace, generator=bad, solve_check=False)



@pytest.mark.parametrize("trace", [fd.Trace("exact", chunk=2), fd.Trace("hutchinson", probes=2, chunk=2)])
def test_log_likelihood_in_pieces_gives_each_piece_its_model_kwargs(gaussian, trace):
    """A class-conditional batch larger than `Trace(chunk=)` stopped at the first evaluation: "class_labels must be
    integers of shape (2,) ..., got torch.int64 (4,)": the batch ran in pieces of `chunk` samples, each with the
    whole batch's labels. Per-sample keywords are split with the pieces now; shared ones are passed whole."""
    flow, _ = gaussian
    seen = []

    def model(x, t, scale, offset):  # ε = scale·x_t + offset, per-sample scale, one offset for all
        seen.append(x.shape[0])
        return x * scale.to(x.dtype)[:, None] + offset

    conditional = fd.ProbabilityFlow(model, flow.schedule)
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 0.5
    kwargs = {"model_kwargs": {"scale": torch.tensor([0.1, 0.2, 0.3, 0.4]), "offset": 0.01}, "steps": 2,
              "solve_check": False, **({} if trace.method == "exact" else {"generator": 1})}  # exact: nothing drawn
    whole = fd.log_likelihood(conditional, x, estimator=dataclasses.replace(trace, chunk=4096), **kwargs)
    pieces = fd.log_likelihood(conditional, x, estimator=trace, **kwargs)
    assert set(seen) == {4, 2}
    torch.testing.assert_close(pieces.log_prob, whole.log_prob, rtol=1e-13, atol=0)
    one = fd.log_likelihood(conditional, x[2:3], estimator=trace, model_kwargs={"scale": torch.tensor([0.3]),
                                                                                 "offset": 0.01}, steps=2,
                            solve_check=False)
    if trace.method == "exact":  # the exact trace draws nothing: a sample's figure is its own
        torch.testing.assert_close(one.log_prob, whole.log_prob[2:3], rtol=1e-13, atol=0)


# -- guidance: a flag that is no bool ----------------------------------------------------------------------------

@pytest.mark.parametrize("batch", ["no", None, 0])
def test_guidance_batch_must_be_a_bool(batch):
    """`classifier_free_guidance(flow, 2.0, batch="no")` batched both branches (a non-empty string is true) and
    `batch=None` did not: the flag was read by truthiness, so the request was silently turned around."""
    flow = Mixture(torch.zeros(2, 4, dtype=torch.float64), 0.3).flow()
    with pytest.raises(TypeError, match=f"batch must be True .* or False .*got {batch!r}"):
        fd.classifier_free_guidance(flow, 2.0, batch=batch)


# -- learn_encoder: NumPy counts -----------------------------------------------------------------------------------

def test_learn_encoder_takes_numpy_nfe_and_iterations():
    """`learn_encoder(..., nfe=np.int64(4))` was refused ("nfe must be an int >= 1 ..., got np.int64(4)"), while
    `generate`, `encode` and `tune_roundtrip` take NumPy budgets."""
    model = Mixture(torch.rand(6, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1, 0.3)
    flow = model.flow()
    calibration = torch.rand(6, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 1.8 - 0.9
    start = fd.make_sigmas(flow.schedule, "logsnr", 4)
    plain = fd.learn_encoder(flow, calibration, nfe=4, sigmas=start, iterations=2)
    numpy = fd.learn_encoder(flow, calibration, nfe=np.int64(4), sigmas=start, iterations=np.int64(2))
    assert plain.shifts == numpy.shifts and plain.decode_shifts == numpy.decode_shifts
    assert plain.nfe == numpy.nfe == 4 and type(numpy.nfe) is int


# -- pretrained: a retrained copy's config that is no JSON object --------------------------------------------------

@pytest.mark.parametrize("text", ["[]", "3", '"digits"'])
def test_pretrained_config_that_is_no_object_names_the_file(tmp_path, text):
    """A `digits.json` holding valid JSON that is no object (`[]`) stopped `pretrained("digits", directory=...)` with
    "AttributeError: 'list' object has no attribute 'get'", naming neither the file nor what it should hold."""
    from flowdiff.models.pretrained import load_config, pretrained

    (tmp_path / "digits.json").write_text(text)
    with pytest.raises(ValueError, match=r"model config .*digits\.json must hold a JSON object"):
        pretrained("digits", directory=tmp_path)
    with pytest.raises(ValueError, match=r"digits\.json must hold a JSON object"):
        load_config("digits", tmp_path)


def test_numpy_float32_tolerances_are_numbers():
    """`tol=np.float32(1e-9)` (a figure read from a float32 array) was refused as "tol must be a finite number > 0,
    got np.float32(1e-09)" by fixed-point inversion, as were learn_encoder's `bound`, `reference_tol` and
    `latent_weight`: a NumPy float64 passed (it subclasses float), a float32 did not."""
    model = Mixture(torch.rand(6, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1, 0.3)
    flow = model.flow()
    x = torch.rand(6, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 1.8 - 0.9
    spec = {"method": "anderson", "tol": 1e-9}
    plain = fd.encode(flow, x[:2], solver=fd.Inversion("fixed_point", spec), steps=3)
    f32 = fd.encode(flow, x[:2], solver=fd.Inversion("fixed_point", {**spec, "tol": np.float32(1e-9)}), steps=3)
    assert f32.stats.extra["tol"] == float(np.float32(1e-9)) and f32.stats.extra["unconverged"] == []
    torch.testing.assert_close(f32.x, plain.x, rtol=0, atol=1e-8)
    start = fd.make_sigmas(flow.schedule, "logsnr", 4)
    kw = {"nfe": 4, "sigmas": start, "iterations": 2}
    a = fd.learn_encoder(flow, x, bound=1.5, reference_tol=2.0**-24, latent_weight=(0.5, 2.0), **kw)
    b = fd.learn_encoder(flow, x, bound=np.float32(1.5), reference_tol=np.float32(2.0**-24),
                         latent_weight=(np.float32(0.5), np.float32(2.0)), **kw)
    assert a.weight_trials == b.weight_trials and type(b.options["reference_tol"]) is float


def test_fixed_point_unconverged_warning_points_at_the_callers_encode(gaussian):
    """The RuntimeWarning of `on_failure="keep"` was attributed one frame above the `encode(...)` call: to the line
    that called the user's function, and to "sys:1" when `encode` ran at a script's top level, so the printed
    location and the `warnings` filters keyed on it missed the user's own line."""
    import inspect
    import warnings

    flow, images = gaussian
    spec = fd.Inversion("fixed_point", {"on_failure": "keep", "method": "anderson", "max_iter": 1})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = inspect.currentframe().f_lineno + 1
        enc = fd.encode(flow, images, solver=spec, steps=3)
    (warning,) = [w for w in caught if "fixed-point inversion" in str(w.message)]
    assert enc.stats.extra["unconverged"] == [0, 1, 2]
    assert (warning.filename, warning.lineno) == (__file__, line)


def test_log_likelihood_range_warning_points_at_the_callers_line(gaussian):
    """`log_likelihood` of images in [0, 255] warned "images span ..., far outside the model's data range" from
    `flowdiff/tools/likelihood.py` itself (one frame short), where `encode`, `learn_encoder` and `tune_roundtrip`
    point at the user's call; Python's default filter then showed it once per process whatever the caller."""
    import inspect
    import warnings

    flow, images = gaussian
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = inspect.currentframe().f_lineno + 1
        fd.log_likelihood(flow, images * 200, steps=2, solve_check=False)
    (warning,) = [w for w in caught if "far outside the model's data range" in str(w.message)]
    assert (warning.filename, warning.lineno) == (__file__, line)



def test_learn_encoder_splits_per_sample_model_kwargs_with_its_halves():
    """`learn_encoder(flow, images, model_kwargs={"class_labels": labels}, sigmas=...)` stopped with "RuntimeError: The
    size of tensor a (3) must match the size of tensor b (6)": the fitted and held-out halves (even and odd rows)
    were encoded with the whole batch's labels. One conditioning said per sample or once gives the same fit."""
    base = Gaussian(torch.linspace(-0.3, 0.3, 4), 0.5).flow()

    def model(x, t, scale):  # ε = scale·x_t, scale per sample or one for all
        return x * scale.to(x.dtype).reshape(-1, *[1] * (x.ndim - 1))

    flow = fd.ProbabilityFlow(model, base.schedule)
    x = torch.rand(6, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 1.8 - 0.9
    start = fd.make_sigmas(flow.schedule, "logsnr", 4)
    kw = {"nfe": 4, "sigmas": start, "iterations": 2}
    once = fd.learn_encoder(flow, x, model_kwargs={"scale": torch.tensor(0.3)}, **kw)
    each = fd.learn_encoder(flow, x, model_kwargs={"scale": torch.full((6,), 0.3)}, **kw)
    assert each.shifts == once.shifts and each.decode_shifts == once.decode_shifts
    assert (each.calibration_error, each.validation_error) == (once.calibration_error, once.validation_error)


def test_fixed_point_of_images_that_need_grad_raises_no_torch_warning(gaussian):
    """Encoding images with `requires_grad=True` by fixed-point inversion printed torch's "UserWarning: Converting a
    tensor with requires_grad=True to a scalar may lead to unexpected behavior" from flowdiff/api/fixed_point.py,
    once per step under `simplefilter("always")`: the residuals (diagnostics) were read as floats undetached."""
    import warnings

    flow, images = gaussian
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        enc = fd.encode(flow, images.clone().requires_grad_(), solver=fd.Inversion("fixed_point"), steps=3)
    assert [str(w.message) for w in caught] == []
    assert enc.x.requires_grad and enc.stats.extra["unconverged"] == []
    assert all(isinstance(r, float) for r in enc.stats.extra["residuals"] + enc.stats.extra["sample_residuals"])


def test_log_likelihood_refuses_images_that_need_grad(gaussian):
    """`log_likelihood(flow, images.requires_grad_())` returned a `log_prob` with no gradient (the solve runs without
    autograd), so `log_prob.sum().backward()` failed far from the cause, and with `dequantize=` it also printed torch's
    requires_grad-to-scalar warning; it is refused in words now."""
    flow, images = gaussian
    with pytest.raises(ValueError, match=r"images require grad, but log_likelihood is not differentiable.*detach"):
        fd.log_likelihood(flow, images.clone().requires_grad_(), steps=2)
    plain = fd.log_likelihood(flow, images, steps=2)
    assert not plain.log_prob.requires_grad


def test_learn_encoder_takes_images_that_need_grad():
    """`learn_encoder` of images with `requires_grad=True` stopped inside its least-squares fit: "RuntimeError: Can't
    call numpy() on Tensor that requires grad". Its result is numbers (σ and shifts), so the images are detached."""
    model = Mixture(torch.rand(6, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1, 0.3)
    flow = model.flow()
    x = torch.rand(6, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 1.8 - 0.9
    kw = {"nfe": 4, "sigmas": fd.make_sigmas(flow.schedule, "logsnr", 4), "iterations": 2}
    plain = fd.learn_encoder(flow, x, **kw)
    grad = fd.learn_encoder(flow, x.clone().requires_grad_(), **kw)
    assert grad.shifts == plain.shifts and grad.calibration_error == plain.calibration_error
