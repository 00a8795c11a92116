"""Every bad input a clear error, nothing lost: one test per class of the hostile-user survey (issue 13).

Classes: silent loss (a wrong result with no error), crashes (an internal exception), unclear errors, silently
accepted options. Each case asserts that the message names the argument or the file.
"""

import json
import math
import warnings

import numpy as np
import pytest
import torch

import flowdiff
import solvers
from flowdiff import Latent
from flowdiff.models.analytic import Gaussian

SHAPE = (1, 4, 4)


@pytest.fixture(scope="module")
def flows():
    torch.manual_seed(0)
    a = Gaussian(torch.zeros(*SHAPE, dtype=torch.float64), 0.25).flow()
    b = Gaussian(torch.full(SHAPE, 0.1, dtype=torch.float64), 0.25).flow()
    return a, b


@pytest.fixture(scope="module")
def images():
    return torch.rand(3, *SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1


@pytest.fixture(scope="module")
def latent_file(tmp_path_factory, flows, images):
    enc = flowdiff.encode(flows[0], images, solver="reversible_heun", steps=6)
    path = tmp_path_factory.mktemp("lat") / "l.safetensors"
    enc.latent.save(path)
    return path, enc


# -- silent loss: what used to return a wrong result with no error -------------------------------------------

def _decode_other_model(flows, images):
    enc = flowdiff.encode(flows[0], images, steps=5)
    flowdiff.decode(flows[1], enc.latent)


class _Conditional(torch.nn.Module):
    """ε = 0.1·x + 0.01·label: a tiny class-conditional model."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.1, dtype=torch.float64))

    def forward(self, x, t, label):
        return self.w * x + 0.01 * label.to(x.dtype).view(-1, 1, 1, 1)


def _decode_other_conditioning(flows, images):
    flow = flowdiff.ProbabilityFlow(_Conditional(), flowdiff.Schedule.linear())
    enc = flowdiff.encode(flow, images, steps=4, model_kwargs={"label": torch.tensor([1, 2, 3])})
    flowdiff.decode(flow, enc.latent, model_kwargs={"label": torch.tensor([1, 2, 3])})  # the same: fine
    flowdiff.decode(flow, enc.latent, model_kwargs={"label": torch.tensor([1, 2, 4])})


def _decode_loaded_with_other_model(flows, images, tmp_path):
    enc = flowdiff.encode(flows[0], images, steps=5)
    enc.latent.save(tmp_path / "l.safetensors")
    flowdiff.decode(flows[1], Latent.load(tmp_path / "l.safetensors"))


def _coarse_quantum(flows, images):
    flowdiff.encode(flows[0], images, solver=solvers.get("reversible_heun", quantum=0.5), steps=4)


def _coarse_quantum_solve(flows, images):
    solvers.solve(lambda t, y: -y, images.float(), [0.0, 0.5, 1.0], solvers.get("reversible_heun", quantum=2**-8))


@pytest.mark.parametrize(("case", "names"), [
    (_decode_other_model, "fingerprint"),
    (_decode_other_conditioning, "model_kwargs"),
    (_decode_loaded_with_other_model, "fingerprint"),
    (_coarse_quantum, "quantum"),
    (_coarse_quantum_solve, "quantum"),
], ids=lambda v: getattr(v, "__name__", v))
def test_silent_loss_is_now_an_error(flows, images, tmp_path, case, names):
    with pytest.raises(ValueError) as info:
        case(flows, images, tmp_path) if "tmp_path" in case.__code__.co_varnames else case(flows, images)
    assert names in str(info.value)


def test_the_override_decodes_with_another_model_and_the_fingerprint_survives_files(flows, images, latent_file):
    path, enc = latent_file
    loaded = Latent.load(path)
    assert loaded.fingerprint == enc.latent.fingerprint == flowdiff.flow_fingerprint(flows[0])
    assert loaded.dtype == torch.float64
    back = flowdiff.decode(flows[0], loaded)
    assert torch.equal(back.x, flowdiff.decode(flows[0], enc.latent).x)
    other = flowdiff.decode(flows[1], loaded, checks=flowdiff.Checks(model=False))  # for those who mean it
    assert not torch.equal(other.x, back.x)


# -- crashes: internal exceptions that are now errors naming the file or argument --------------------------------

def _write_variants(path, tmp_path):
    """Damaged copies of a good latent file, by what is wrong with them."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    data = path.read_bytes()
    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata())
    tensors = load_file(str(path))
    out = {}

    def save(name, t, m):
        p = tmp_path / name
        save_file(t, str(p), metadata=m)
        out[name] = p

    for name, payload in {"empty.safetensors": b"", "truncated.safetensors": data[: len(data) // 2],
                          "text.safetensors": b"just some text, not a latent", "header.safetensors": data[:8]}.items():
        (tmp_path / name).write_bytes(payload)
        out[name] = tmp_path / name
    save("no_sigmas.safetensors", {k: v for k, v in tensors.items() if k != "sigmas"}, meta)
    save("no_x.safetensors", {k: v for k, v in tensors.items() if k != "x"}, meta)
    save("bad_json.safetensors", tensors, {**meta, "solver": "{not json"})
    save("no_solver.safetensors", tensors, {k: v for k, v in meta.items() if k != "solver"})
    save("bad_options.safetensors", tensors, {**meta, "solver_options": json.dumps("[1, 2]")})
    save("bad_dtype.safetensors", tensors, {**meta, "dtype": json.dumps("float99")})
    save("bad_state_t.safetensors", tensors, {**meta, "state_t": json.dumps("zz")})
    save("other_format.safetensors", tensors, {**meta, "format": json.dumps("something/else")})
    save("no_metadata.safetensors", tensors, None)
    save("int_x.safetensors", {**tensors, "x": torch.zeros(3, *SHAPE, dtype=torch.int32)}, meta)
    save("bad_sigmas.safetensors", {**tensors, "sigmas": torch.ones(3, dtype=torch.float64)}, meta)
    return out


def test_damaged_latent_files_are_errors_that_name_the_file(latent_file, tmp_path):
    path, _ = latent_file
    for name, bad in _write_variants(path, tmp_path).items():
        with pytest.raises((ValueError, TypeError)) as info:
            Latent.load(bad)
        assert name in str(info.value), (name, str(info.value))
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        Latent.load(tmp_path / "missing.safetensors")


def _cuda_load(latent_file):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    Latent.load(latent_file[0], device="cuda")


@pytest.mark.parametrize(("case", "names"), [
    (lambda lf: Latent.load(lf[0], device="toaster"), "toaster"),
    (_cuda_load, "cuda"),
    (lambda lf: Latent.load(42), "path"),
    (lambda lf: lf[1].latent.save(lf[0].parent / "no" / "such" / "l.safetensors"), "no/such"),
    (lambda lf: flowdiff.compare(lf[1].latent and Gaussian(torch.zeros(*SHAPE), 0.25).flow(),
                                 torch.full((2, *SHAPE), math.nan), solvers=["euler"], grids=["trailing"], nfe=[4]),
     "noise"),
    (lambda lf: flowdiff.compare(Gaussian(torch.zeros(*SHAPE), 0.25).flow(), torch.zeros(0, *SHAPE),
                                 solvers=["euler"], grids=["trailing"], nfe=[4]), "noise"),
    (lambda lf: solvers.solve(lambda t, y: -y, torch.ones(3, dtype=torch.int64), [0.0, 1.0]), "y0"),
    (lambda lf: solvers.solve(lambda t, y: -y, torch.ones(3, dtype=torch.complex64), [0.0, 1.0]), "y0"),
    (lambda lf: solvers.solve_adaptive(lambda t, y: -y, torch.ones(3, dtype=torch.int32), 0.0, 1.0), "y0"),
    (lambda lf: solvers.unsolve(lambda t, y: -y, torch.ones(3, dtype=torch.int64), [0.0, 1.0], "reversible_heun",
                                state=lf[1].latent.solver_state), "y_end"),
    (lambda lf: flowdiff.generate(Gaussian(torch.zeros(*SHAPE), 0.25).flow(), torch.randn(2, *SHAPE), steps=3,
                                  model_kwargs=[("label", 1)]), "model_kwargs"),
], ids=["bad-device", "cuda", "path-type", "save-missing-folder", "compare-nan", "compare-empty", "solve-int",
        "solve-complex", "adaptive-int", "unsolve-int", "model-kwargs-list"])
def test_former_crashes_are_errors_that_name_the_argument(latent_file, case, names):
    with pytest.raises((ValueError, TypeError, OSError)) as info:
        case(latent_file)
    assert names in str(info.value)


def test_latent_save_is_atomic_and_keeps_an_earlier_file(latent_file, tmp_path):
    path, enc = latent_file
    target = tmp_path / "keep.safetensors"
    enc.latent.save(target)
    before = target.read_bytes()
    bad = Latent(enc.latent.x, enc.latent.sigmas, "euler", {"opt": object()})
    with pytest.raises(TypeError, match="solver_options"):
        bad.save(target)
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["keep.safetensors"]


# -- unclear errors: now named ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "names"), [
    (dict(grid=("karras", {"foo": 1})), "'foo'"),
    (dict(grid=("karras", {"rho": "7"})), "rho"),
    (dict(grid=("logsnr", {"power": "0.5"})), "power"),
    (dict(grid=("karras", {"sigma_min": "0.1"})), "sigma_min"),
    (dict(grid=("karras", {"sigma_max": float("nan")})), "sigma_max"),
    (dict(grid=("logsnr", {"sigma_max": 1e9})), "sigma_max"),
    (dict(grid=("karras", {"sigma_min": 5.0, "sigma_max": 1.0})), "sigma_min"),
    (dict(grid=("karras", {"rho": True})), "rho"),
    (dict(grid=("wiggly", {"rho": 3})), "wiggly"),
    (dict(grid=(None, {"rho": 3})), "sigmas"),
    (dict(grid=("trailing", {}), final_euler="False"), "final_euler"),
    (dict(solver=("lms", {"order": 9})), "order"),
    (dict(solver=("abm", {"order": 0})), "order"),
    (dict(solver=("reversible", {"coupling": "0.5"})), "coupling"),
])
def test_unclear_errors_now_name_the_argument(kwargs, names):
    """``grid=(name, options)`` is built as ``Grid(name, options=...)`` (``None``: explicit σ), ``solver=(name,
    options)`` as ``solvers.get(name, **options)``, inside the check: either may refuse, naming the argument."""
    flow = Gaussian(torch.zeros(*SHAPE), 0.25).flow()
    with pytest.raises((ValueError, TypeError)) as info:
        call = {"steps": 4}
        if "grid" in kwargs:
            name, options = kwargs["grid"]
            extra = {"final_euler": kwargs["final_euler"]} if "final_euler" in kwargs else {}
            call = {"grid": flowdiff.Grid(sigmas=[2.0, 1.0, 0.0], options=options) if name is None
                    else flowdiff.Grid(name, steps=4, options=options, **extra)}
        if "solver" in kwargs:
            call["solver"] = solvers.get(kwargs["solver"][0], **kwargs["solver"][1])
        flowdiff.generate(flow, torch.randn(2, *SHAPE), **call)
    assert names in str(info.value)


@pytest.mark.parametrize(("call", "names"), [
    (lambda f, x: flowdiff.decode(f, x, checks=flowdiff.Checks(model="no")), "Checks.model"),
    (lambda f, x: flowdiff.encode(f, x, steps=3, checks=flowdiff.Checks(finite=1)), "Checks.finite"),
    (lambda f, x: flowdiff.generate(f, x, steps=3, checks=flowdiff.Checks(finite="no")), "Checks.finite"),
    (lambda f, x: solvers.solve(lambda t, y: -y, x, [0.0, 1.0], check_finite="False"), "check_finite"),
    (lambda f, x: solvers.solve(lambda t, y: -y, x, [0.0, 1.0], eval_end=0), "eval_end"),
    (lambda f, x: solvers.solve_adaptive(lambda t, y: -y, x, 1.0, 2.0, log_steps="yes"), "log_steps"),
])
def test_flags_given_as_anything_but_a_bool_are_refused(call, names):
    flow = Gaussian(torch.zeros(*SHAPE), 0.25).flow()
    with pytest.raises(TypeError) as info:
        call(flow, torch.randn(2, *SHAPE))
    assert names in str(info.value)


# -- silently accepted: options the grid does not take, invalid values, images on the wrong scale ----------------

@pytest.mark.parametrize(("grid", "options", "names"), [
    ("karras", {"power": 2.0}, "power"),
    ("karras", {"rho": -5}, "rho"),
    ("karras", {"rho": 0}, "rho"),
    ("logsnr", {"rho": 7}, "rho"),
    ("logsnr", {"power": 0}, "power"),
    ("logsnr", {"power": 50}, "power"),
    ("trailing", {"rho": 7}, "rho"),
    ("leading", {"power": 1.0}, "power"),
    ("karras", {"sigma_min": 1e-9}, "sigma_min"),
])
def test_options_the_grid_does_not_take_or_invalid_values_are_refused(grid, options, names):
    schedule = flowdiff.Schedule.linear()
    with pytest.raises((ValueError, TypeError)) as info:
        flowdiff.make_sigmas(schedule, grid, 8, **options)
    assert names in str(info.value)
    # and through the public entry point
    with pytest.raises((ValueError, TypeError)) as info:
        flowdiff.generate(Gaussian(torch.zeros(*SHAPE), 0.25).flow(), torch.randn(2, *SHAPE), steps=8,
                          grid=flowdiff.Grid(grid, options=options))
    assert names in str(info.value)


def test_valid_grid_options_still_work():
    schedule = flowdiff.Schedule.linear()
    a = flowdiff.make_sigmas(schedule, "karras", 8, rho=3, sigma_min=0.1, sigma_max=10.0)
    assert a[0] == 10.0 and a[-2] == 0.1 and a[-1] == 0.0
    assert np.array_equal(flowdiff.make_sigmas(schedule, "logsnr", 8, power=1.0), flowdiff.make_sigmas(schedule,
                                                                                                         "logsnr", 8))


@pytest.mark.parametrize("scale", [255.0, -255.0, 10.0])
def test_images_far_outside_the_data_range_warn_naming_them(scale):
    """Decided: a warning, not an error (latent-space models have no hard range); [0, 255] for [−1, 1] is caught."""
    flow = Gaussian(torch.zeros(*SHAPE), 0.25).flow()
    images = torch.rand(2, *SHAPE) * scale
    with pytest.warns(UserWarning, match=r"images span .* far outside the model's data range \[-1, 1\]"):
        flowdiff.encode(flow, images, steps=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flowdiff.encode(flow, torch.rand(2, *SHAPE) * 2.2 - 1.1, steps=3)  # a resampling overshoot passes


@pytest.mark.parametrize(("solver", "kwargs", "names"), [
    ("dopri5", dict(order=0), "order"),
    ("dopri5", dict(order=2.0), "order"),
    ("dopri5", dict(order=True), "order"),
    ("dopri5", dict(order=5, error_order=0), "error_order"),
    ("dopri5", dict(order=5, error_order=-1), "error_order"),
    ("dopri5", dict(order=5, error_order="4"), "error_order"),
    ("dopri5", dict(order=1), "error_order"),  # its default error order, order − 1, would be 0
    ("rk4", dict(order=4, error_order=3), "error_order"),  # no embedded method to have an order
])
def test_orders_out_of_range_are_refused(solver, kwargs, names):
    tableau = solvers.get(solver).tableau
    with pytest.raises((ValueError, TypeError)) as info:
        solvers.ExplicitRK("custom", tableau, **kwargs)
    assert names in str(info.value)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_reconstruction_metrics_refuse_non_finite_images(images, bad):
    broken = images.clone()
    broken[0, 0, 0, 0] = bad
    for original, rec, names in ((images, broken, "reconstruction"), (broken, images, "original")):
        with pytest.raises(ValueError, match=names):
            flowdiff.reconstruction(original, rec)


def test_pixels_that_do_not_match_their_format_are_refused():
    from flowdiff.runs.imageio import ImageFormat, to_data

    with pytest.raises(ValueError, match="uint16"):
        to_data(np.zeros((4, 4, 1), dtype=np.float32), ImageFormat("L", 16))
    with pytest.raises(ValueError, match="RGB"):
        to_data(np.zeros((4, 4, 1), dtype=np.uint8), ImageFormat("RGB", 8))


@pytest.mark.parametrize("kwargs,name", [({"s": -1}, "s"), ({"s": float("nan")}, "s"), ({"s": "0.008"}, "s"),
                                         ({"max_beta": 1.5}, "max_beta"), ({"max_beta": 0.0}, "max_beta")])
def test_cosine_schedule_names_its_bad_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"Schedule.cosine: {name} must be"):
        flowdiff.Schedule.cosine(**kwargs)
