"""The sixth new-user sweep: gradients through the sampler, compare and its report, the property-testing helpers,
folder runs and the command line, and the reconstruction metrics.

Each test failed before its fix (its docstring says what a user saw). Findings outside this sweep's files are
listed in the sweep's report, not fixed here.
"""

import warnings

import numpy as np
import pytest
import torch
from _cli_runs import one_line, run_in, write_digits
from _ranks import AllWorkRank0
from hypothesis import find, given, settings

import flowdiff as fd
from flowdiff.engine.grids import GRIDS
from flowdiff.models.analytic import Gaussian
from flowdiff.runs import distributed
from flowdiff.runs.distributed import Ranks
from flowdiff.runs.imageio import read_image, to_data
from flowdiff.tools import metrics, report
from flowdiff.tools import testing as ft


@pytest.fixture(scope="module")
def gaussian():
    model = Gaussian(torch.linspace(-0.3, 0.3, 4, dtype=torch.float64).reshape(1, 2, 2),
                     torch.full((4,), 0.3, dtype=torch.float64))
    return model, model.sample(3, generator=torch.Generator().manual_seed(0))


# -- the property-testing helpers ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, says", [
    ({"solvers": ["reversible"], "solver_options": {"reversibel": [{"base": "heun"}]}}, "'reversibel'"),
    ({"solvers": ["reversible_heun"], "solver_options": {"reversible": [{"base": "heun"}]}}, "'reversible'"),
    ({"solvers": ["eulr"]}, "'eulr'"),
    ({"solvers": ["ipndm"]}, "'ipndm'"),          # a solver that does not encode
    ({"solvers": []}, "at least one"),
])
def test_round_trip_cases_refuse_solvers_and_options_it_would_never_run(kwargs, says):
    """`round_trip_cases(solvers=["reversible"], solver_options={"reversibel": [...]})` drew every case with no
    options (the misspelt key was never looked up), so the property ran on the default base only; an unknown solver
    was drawn and failed in each example's encode, not where it was written."""
    with pytest.raises(ValueError, match=says):
        ft.round_trip_cases(**kwargs)


def test_round_trip_cases_refuse_an_option_the_solver_does_not_take():
    with pytest.raises(TypeError, match="bsae"):
        ft.round_trip_cases(solvers=["reversible"], solver_options={"reversible": [{"bsae": "heun"}]})
    with pytest.raises(TypeError, match="list of option dicts"):
        ft.round_trip_cases(solvers=["reversible"], solver_options={"reversible": {"base": "heun"}})


def test_round_trip_cases_still_draw_the_options_given():
    seen = set()

    @settings(max_examples=15, deadline=None, database=None)
    @given(ft.round_trip_cases(solvers="reversible", solver_options={"reversible": [{"base": "euler"},
                                                                                     {"base": "heun"}]},
                               steps=ft.step_counts(1, 2), shapes=ft.batch_shapes(max_batch=1, max_side=1)))
    def collect(case):
        assert case.solver == "reversible"
        seen.add(case.solver_options["base"])

    collect()
    assert seen == {"euler", "heun"}


@pytest.mark.parametrize("make, says", [
    (lambda: ft.grid_names(exclude=["karas"]), "karas"),       # excluded nothing, silently
    (lambda: ft.grid_names(exclude=list(GRIDS)), "leaves no grid"),
    (lambda: ft.schedules(kinds="linear"), None),              # was the letters of 'linear', all refused
    (lambda: ft.closed_form_models((4,), kinds=["gausian"]), "gausian"),
    (lambda: ft.closed_form_models((4,), min_bandwidth=0.8), "min_bandwidth"),
    (lambda: ft.round_trip_cases(kinds=["mixtures"]), "mixtures"),
    (lambda: ft.step_counts(0, 5), "min_value"),
    (lambda: ft.dtypes(include=(torch.int64,)), "include"),   # drawn, then refused by every encode
    (lambda: ft.dtypes(include="float32"), "include"),        # torch's "Expected one of cpu, cuda, ... device type"
    (lambda: ft.dtypes(include=()), "include"),               # hypothesis' "Cannot sample from a length-zero sequence"
])
def test_strategies_check_their_arguments_when_built(make, says):
    """`grid_names(exclude=["karas"])` drew karras too; `closed_form_models(kinds="gaussian")` drew the letters
    'g', 'a', … and failed in the first example with "unknown closed-form model kind 'g'" (as a misspelt kind and a
    min_bandwidth above 0.5 did, inside hypothesis); `step_counts(0, 5)` drew 0 steps, which every encode refuses."""
    if says is None:
        assert type(find(make(), lambda schedule: True)).__name__ == "Schedule"
        return
    with pytest.raises(ValueError, match=says):
        make()


def test_closed_form_models_take_one_kind_as_a_string():
    seen = set()

    @settings(max_examples=5, deadline=None, database=None)
    @given(ft.closed_form_models((2,), kinds="gaussian"), ft.grid_names(exclude="quadratic"),
           ft.dtypes(include=torch.bfloat16))
    def collect(model, grid, dtype):
        seen.add(type(model).__name__)
        assert grid != "quadratic" and dtype == torch.bfloat16

    collect()
    assert seen == {"Gaussian"}


@pytest.mark.parametrize("step_list", [[4, 4], [0, 4], [2.5, 4]])
def test_round_trip_order_refuses_step_counts_it_cannot_fit(gaussian, step_list):
    """[4, 4] gave numpy's RankWarning and an 'order' of −0.004; [0, 4] a divide warning and "sigmas must be 1-D
    with at least 2 values"; 2.5 steps "sigmas must be finite and >= 0" — none naming step_list."""
    model, x = gaussian
    with pytest.raises(ValueError, match="step_list"):
        ft.round_trip_order(model.flow(), x, step_list, solver="euler")


@pytest.mark.parametrize("extra", [{"grid": "karras"}, {"steps": 4}])
def test_round_trip_order_refuses_a_grid_or_steps_of_its_own(gaussian, extra):
    """grid="karras" was Python's "got multiple values for keyword argument 'grid'"; steps=4 was refused by the
    encode as "steps=4 beside grid=explicit σ", a grid the caller never gave."""
    model, x = gaussian
    with pytest.raises(TypeError, match="sigmas_for"):
        ft.round_trip_order(model.flow(), x, [2, 4], solver="euler", **extra)


def test_round_trip_order_of_an_exact_round_trip_is_refused_not_nan(gaussian):
    """Reversible Heun decodes float32 images bit for bit: every error is 0, and the fitted order was nan (with a
    'divide by zero encountered in log' warning) for the caller to compare with something."""
    model, x = gaussian
    with pytest.raises(ValueError, match="exact round trip"):
        ft.round_trip_order(model.flow(), x.float(), [2, 4], solver="reversible_heun")


def test_round_trip_order_still_fits_euler(gaussian):
    model, x = gaussian
    order, errors = ft.round_trip_order(model.flow(), x, [4, 8, 16], solver="euler")
    assert errors[0] > errors[1] > errors[2] > 0 and 0.5 < order < 1.5


# -- the reconstruction metrics -----------------------------------------------------------------------------------

def test_reconstruction_of_tensors_that_need_grad_raises_no_torch_warning():
    """`metrics.reconstruction(x, y)` with `y` from a differentiated decode printed torch's "UserWarning:
    Converting a tensor with requires_grad=True to a scalar may lead to unexpected behavior" on every call."""
    x = torch.linspace(-1, 1, 32).reshape(2, 1, 4, 4)
    y = (0.9 * x).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = metrics.reconstruction(x, y)
    assert got == metrics.reconstruction(x, y.detach())
    assert metrics.mse(x, y).requires_grad  # the tensor metrics stay differentiable


# -- the command line: image files ---------------------------------------------------------------------------------

def _float_tiff(path, value):
    from PIL import Image

    pixels = np.full((8, 8), 0.5, dtype=np.float32)
    pixels[2, 3] = value
    Image.fromarray(pixels, mode="F").save(path)


@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("command", ["roundtrip", "encode", "likelihood", "data"])
def test_a_float_tiff_with_nan_pixels_is_refused_naming_the_file(capsys, tmp_path, value, command):
    """A 32-bit float TIFF holding NaN (or inf) stopped every command with "images contains NaN or inf": in a
    folder of a thousand files, no word of which one."""
    (tmp_path / "d").mkdir()
    write_digits(tmp_path / "d", 1)
    _float_tiff(tmp_path / "d" / "bad.tif", value)
    argv = {"roundtrip": ["roundtrip", "d/bad.tif", "--steps", "2"],
            "encode": ["encode", "d/bad.tif", "--steps", "2", "--out", "l.safetensors"],
            "likelihood": ["likelihood", "d/bad.tif", "--steps", "2", "--no-progress"],
            "data": ["roundtrip", "--data", "d", "--out", "r", "--steps", "2"]}[command]
    code, _, err = run_in(capsys, argv, tmp_path)
    line = one_line(err)
    assert code == 1 and "bad.tif" in line and "NaN or infinite" in line, line


# -- compare: budgets as NumPy gives them, and the split over processes ------------------------------------------

def _gaussian_problem():
    flow = Gaussian(torch.zeros(1, 2, 2), torch.linspace(0.05, 1.0, 4)).flow()
    noise = torch.randn(2, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return flow, noise, fd.reference_solution(flow, noise, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("nfe", [np.arange(3, 7, 3), np.int64(3)])
def test_compare_takes_numpy_budgets(nfe):
    """`compare(..., nfe=np.arange(5, 30, 5))` was refused as "nfe budgets must be positive ints, got np.int64(5)"
    and `nfe=np.int64(10)` was "TypeError: 'numpy.int64' object is not iterable", while `generate(nfe=np.int64(10))`
    runs; `keep_images=np.int64(2)` was refused too."""
    flow, noise, ref = _gaussian_problem()
    got = fd.compare(flow, noise, solvers="euler", grids="logsnr", nfe=nfe, reference=ref, keep_images=np.int64(1))
    want = fd.compare(flow, noise, solvers="euler", grids="logsnr", nfe=[int(b) for b in np.atleast_1d(nfe)],
                      reference=ref, keep_images=1)
    assert [(r.budget, r.nfe, r.rms_error) for r in got.runs] == [(r.budget, r.nfe, r.rms_error) for r in want.runs]
    assert all(type(r.budget) is int for r in got.runs) and list(got.images) == list(want.images)


@pytest.mark.parametrize("nfe", ["10", 2.0])
def test_compare_names_a_budget_that_is_no_int(nfe):
    flow, noise, ref = _gaussian_problem()
    with pytest.raises((TypeError, ValueError), match="nfe"):
        fd.compare(flow, noise, solvers="euler", grids="logsnr", nfe=nfe, reference=ref)


def test_distributed_compare_has_the_one_process_table_for_repeated_and_unsorted_lists():
    """`distributed.compare(..., grids=["logsnr", "logsnr"], nfe=[6, 3, 6])` ran every repeat: 12 rows where
    `flowdiff.compare` has 4 (it keeps each grid and budget once, budgets sorted), in another order — the "same rows,
    in the same order" its docstring promises were not."""
    flow, noise, ref = _gaussian_problem()
    kwargs = dict(solvers=["euler", "heun", "euler"], grids=["logsnr", "logsnr"], nfe=[6, 3, 6], reference=ref)
    one = fd.compare(flow, noise, **kwargs)
    split = distributed.compare(flow, noise, ranks=AllWorkRank0(0, 2), **kwargs)
    assert [(r.solver, r.grid, r.budget, r.rms_error) for r in split.runs] == \
        [(r.solver, r.grid, r.budget, r.rms_error) for r in one.runs]
    assert len(one.runs) == 4


@pytest.mark.parametrize("bad, says", [({"rtol": -1.0}, "rtol"), ({"keep_images": -1}, "keep_images"),
                                       ({"nfe": [0]}, "nfe")])
def test_distributed_compare_refuses_on_every_rank_before_any_exchange(bad, says):
    """`rtol=-1` (or keep_images=-1) was refused by rank 0 alone, inside its reference solve (or its runs), while
    the other ranks waited in the broadcast: under torchrun they ended with gloo's "Connection closed by peer"."""
    flow, noise, _ = _gaussian_problem()

    class Rank1(Ranks):
        def broadcast(self, obj):
            raise AssertionError("rank 1 reached an exchange before refusing the arguments")

        gather = broadcast

        def all_gather(self, obj):  # the inputs' digests, which every rank exchanges first whatever its inputs (R29)
            if isinstance(obj, tuple) and len(obj) == 3:
                return [obj, obj]
            return self.broadcast(obj)

    kwargs = {"solvers": "euler", "grids": "logsnr", "nfe": [3], **bad}
    with pytest.raises(ValueError, match=says):
        distributed.compare(flow, noise, ranks=Rank1(1, 2), **kwargs)


# -- the report -----------------------------------------------------------------------------------------------

def test_report_of_grey_and_alpha_states_draws_the_sample_grid(tmp_path):
    """States of 2 channels (a grey + alpha model) stopped `write_report` inside matplotlib: "TypeError: Invalid
    shape (3, 7, 2) for image data", after the CSV and the plots were written."""
    flow = Gaussian(torch.zeros(2, 3, 3), torch.linspace(0.05, 1.0, 18)).flow()
    noise = torch.randn(2, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    result = fd.compare(flow, noise, solvers="euler", grids="logsnr", nfe=3, keep_images=2,
                        reference=fd.reference_solution(flow, noise, rtol=1e-6, atol=1e-6))
    paths = report.write_report(result, tmp_path, facts={})
    assert paths["samples"].is_file() and "![samples](samples.png)" in paths["report"].read_text()


def test_report_of_states_of_many_channels_has_no_sample_grid(tmp_path):
    """Eight channels were drawn as an RGB picture of the first three, without a word."""
    flow = Gaussian(torch.zeros(8, 2, 2), torch.linspace(0.05, 1.0, 32)).flow()
    noise = torch.randn(1, 8, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    result = fd.compare(flow, noise, solvers="euler", grids="logsnr", nfe=3, keep_images=1,
                        reference=fd.reference_solution(flow, noise, rtol=1e-6, atol=1e-6))
    paths = report.write_report(result, tmp_path, facts={})
    assert "samples" not in paths and "are not images" in paths["report"].read_text()
    with pytest.raises(ValueError, match="C = 1 to 4"):
        report.sample_grid(result, tmp_path / "s.png")


def test_report_where_every_run_was_skipped_says_so(tmp_path):
    """`quadratic` at 990 steps (repeated timesteps) skipped every run: the report's "best per budget" was a table with
    a header of one empty column, and matplotlib warned twice "No artists with labels found to put in legend"."""
    flow, noise, ref = _gaussian_problem()
    result = fd.compare(flow, noise, solvers="euler", grids="quadratic", nfe=990, reference=ref)
    assert not result.runs and result.skipped
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paths = report.write_report(result, tmp_path, facts={})
    text = paths["report"].read_text()
    assert "No run: every solver × grid × budget was skipped" in text and "repeats timesteps" in text


# -- a folder run over two processes, one of which fails -----------------------------------------------------------

def test_a_rank_that_fails_is_named_by_the_others_and_their_batches_are_kept(tmp_path):
    """`torchrun --nproc_per_node 2 -m flowdiff roundtrip --data D ...` with a bad file in rank 1's batch: rank 1 said
    why and exited, removing the output folders its plan had made as empty; rank 0, still writing its own batch into
    them, ended with "cannot write the image 'out/images/a.png': the folder 'out/images' does not exist" (or gloo's
    "Connection closed by peer"), and nothing it had done was recorded. Rank 0 now finishes its batches, records
    them and names rank 1's failure ("rank 1 of 2 failed: ...")."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    data = tmp_path / "d"
    data.mkdir()
    a, c = write_digits(data, 2)
    a.rename(data / "a.png")
    c.rename(data / "c.png")
    _float_tiff(data / "b.tif", np.nan)  # batch 1 of 3 (sorted: a, b, c): rank 1's
    root = Path(fd.__file__).resolve().parent.parent  # the flowdiff under test, in the launched processes too
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "flowdiff",
            "roundtrip", "--data", str(data), "--out", str(tmp_path / "out"), "--steps", "2", "--batch-size", "1"]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    said = [line for line in done.stderr.splitlines() if line.startswith("flowdiff roundtrip: error:")]
    # every rank that got to say something (torchrun may stop rank 0 once rank 1 has exited) names the cause
    assert done.returncode != 0 and said, done.stderr[-3000:]
    assert all("b.tif" in line and "NaN or infinite" in line for line in said), said
    records = sorted(p.name for p in (tmp_path / "out" / ".flowdiff-run").glob("batch-*.json"))
    assert records == ["batch-000000.json", "batch-000002.json"]  # rank 0's two batches, finished and kept
    assert sorted(p.name for p in (tmp_path / "out" / "images").iterdir()) == ["a.png", "c.png"]


def test_compare_with_k_diffusion_in_bfloat16_runs_its_samplers():
    """`flowdiff compare --dtype bfloat16 --peers k-diffusion` (or `compare(..., noise.bfloat16(), peers=...)`) stopped
    after every other run with "TypeError: Got unsupported ScalarType BFloat16": the peer's σ grid was made in the
    noise's dtype, and k-diffusion's sample_lms reads it through NumPy."""
    flow, noise, ref = _gaussian_problem()
    kwargs = dict(solvers="euler", grids="karras", nfe=[4], peers="k-diffusion", reference=ref, keep_images=2)
    half = fd.compare(flow, noise.bfloat16(), **kwargs)
    full = fd.compare(flow, noise.float(), **kwargs)
    rows = {r.solver: r for r in half.runs if r.source == "k-diffusion"}
    assert sorted(rows) == ["dpmpp_2m", "euler", "heun", "lms"] and not half.unavailable
    assert all(np.isfinite(r.rms_error) for r in rows.values())
    for name in ("euler", "lms"):  # the same samplers (whose state k-diffusion promotes to the σ grid's float32)
        key = ("k-diffusion", name, "karras", 4)
        assert (half.images[key].double() - full.images[key].double()).abs().max() < 0.05, name


def test_compare_roundtrip_of_images_on_another_scale_warns_once_at_the_callers_line():
    """`compare(flow, task="roundtrip", images=x * 127.5 + 127.5, ...)` warned "images span [0, 255], far outside the
    model's data range" once per encode — every solver × grid × budget — from inside flowdiff."""
    flow, _, _ = _gaussian_problem()
    images = torch.linspace(-1, 1, 8, dtype=torch.float64).reshape(2, 1, 2, 2) * 127.5 + 127.5
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fd.compare(flow, task="roundtrip", images=images, solvers=["euler", "heun"],
                            grids=["logsnr", "karras"], nfe=[4, 6])
    assert len(result.runs) == 8
    said = [w for w in caught if "far outside" in str(w.message)]
    assert len(said) == 1 and said[0].filename == __file__, [(str(w.message), w.filename) for w in caught]


def test_compare_roundtrip_names_the_dtype_of_integer_images():
    flow, _, _ = _gaussian_problem()
    with pytest.raises(TypeError, match="torch.int64"):
        fd.compare(flow, task="roundtrip", images=torch.zeros(2, 1, 2, 2, dtype=torch.int64), solvers="euler",
                   grids="logsnr", nfe=4)


class _Rank1Told(Ranks):
    """Rank 1 of 2, to which rank 0 broadcasts ``said`` (what it failed with) first, then its objects."""

    def __init__(self, said):
        super().__init__(1, 2)
        object.__setattr__(self, "said", [said])

    def broadcast(self, obj):
        return self.said.pop(0) if self.said else obj

    def all_gather(self, obj):  # rank 0 was given the same inputs (S15's check exchanges them first)
        return [obj, obj]


def test_main_first_tells_the_other_ranks_that_rank_0_failed():
    """`flowdiff compare` under torchrun solves the reference on rank 0 first (`Ranks.main_first`): where that
    failed, the other ranks waited at a barrier and ended with gloo's "Connection closed by peer"."""
    calls = []
    with pytest.raises(RuntimeError, match="rank 0 of 2 failed: the reference solve ran out of memory"):
        _Rank1Told("the reference solve ran out of memory").main_first(lambda: calls.append(1))
    assert not calls  # rank 1 does not read a file rank 0 never wrote
    assert _Rank1Told(None).main_first(lambda: "read") == "read"

    class Rank0(Ranks):
        def broadcast(self, obj):
            return obj

    with pytest.raises(ValueError, match="boom"):  # rank 0 raises its own error
        Rank0(0, 2).main_first(lambda: (_ for _ in ()).throw(ValueError("boom")))


def test_distributed_compare_tells_the_other_ranks_that_the_reference_failed():
    flow, noise, _ = _gaussian_problem()
    with pytest.raises(RuntimeError, match="rank 0 of 2 failed: dopri5 gave up"):
        distributed.compare(flow, noise, ranks=_Rank1Told("dopri5 gave up"), solvers="euler", grids="logsnr", nfe=3)


def test_distributed_compare_tells_a_rank_without_runs_why_the_others_stopped():
    """`distributed.compare(..., task="roundtrip", keep_images=2)` over 2 ranks with one run: rank 0 refused it in
    its run ("keep_images= does not apply to task='roundtrip'") and exited; rank 1, with no run, waited in the
    gather and ended with gloo's "Connection closed by peer"."""
    flow, _, _ = _gaussian_problem()
    images = torch.zeros(2, 1, 2, 2, dtype=torch.float64)

    class Rank1(Ranks):
        def all_gather(self, obj):  # rank 0's refusal, as the exchange carries it (its inputs are rank 1's)
            if isinstance(obj, tuple):  # the inputs' digests, exchanged first (S15)
                return [obj, obj]
            return ["keep_images= does not apply to task='roundtrip'", obj]

    with pytest.raises(RuntimeError, match="rank 0 of 2 failed: keep_images= does not apply"):
        distributed.compare(flow, task="roundtrip", images=images, ranks=Rank1(1, 2), solvers="euler",
                            grids="logsnr", nfe=4, keep_images=2)


def test_assert_fixed_point_converged_names_a_result_of_the_wrong_type(gaussian):
    """`assert_fixed_point_converged(enc.latent)` (the latent, not the result) was "AttributeError: 'Latent' object
    has no attribute 'stats'"."""
    model, x = gaussian
    enc = fd.encode(model.flow(), x, solver=fd.Inversion("fixed_point"), steps=3)
    with pytest.raises(TypeError, match="got Latent"):
        ft.assert_fixed_point_converged(enc.latent)
    ft.assert_fixed_point_converged(enc)


# -- the command line: the encode-only solver ------------------------------------------------------------------

def test_the_command_line_encodes_with_ddim_inverse_as_the_api_does(capsys, tmp_path):
    """`flowdiff compare --task roundtrip` prints a `ddim_inverse` row by default, and `encode(..., solver=
    "ddim_inverse")` is the README's DDIMInverseScheduler; but `flowdiff encode|roundtrip --solver ddim_inverse` and
    `compare --task roundtrip --solver euler,ddim_inverse` were refused: "unknown solver 'ddim_inverse'"."""
    (tmp_path / "d").mkdir()
    paths = write_digits(tmp_path / "d", 2)
    code, out, err = run_in(capsys, ["encode", *paths, "--solver", "ddim_inverse", "--steps", "4", "--out",
                                     "l.safetensors"], tmp_path)
    assert code == 0 and "with ddim_inverse" in out, err
    latent = fd.Latent.load(tmp_path / "l.safetensors")
    images = torch.stack([to_data(*read_image(p)) for p in paths]).float()
    want = fd.encode(fd.pretrained("digits"), images, solver="ddim_inverse", steps=4)
    assert torch.equal(latent.x, want.latent.x)  # the API's encode, bit for bit
    code, out, err = run_in(capsys, ["decode", "l.safetensors", "--out", "dec"], tmp_path)
    assert code == 0 and "with euler" in out, err
    code, out, err = run_in(capsys, ["compare", "--task", "roundtrip", "--solver", "euler,ddim_inverse", "--grid",
                                     "logsnr", "--nfe", "4", "--batch", "2", "--out", "c", "--no-progress"], tmp_path)
    assert code == 0 and "| ddim_inverse |" in out, err


@pytest.mark.parametrize("argv, says", [
    (["compare", "--solver", "euler,ddim_inverse", "--nfe", "4", "--batch", "1"], "--task roundtrip"),
    (["roundtrip", "IMG", "--solver", "ddim_inverse", "--fixed-point", "--steps", "4"], "--solver euler --fixed-point"),
])
def test_the_encode_only_solver_is_refused_by_flag_where_it_cannot_run(capsys, tmp_path, argv, says):
    (tmp_path / "d").mkdir()
    (path,) = write_digits(tmp_path / "d", 1)
    code, _, err = run_in(capsys, [path if a == "IMG" else a for a in argv], tmp_path)
    line = one_line(err)
    assert code == 2 and says in line, line


# -- folder runs: what defines the numbers ---------------------------------------------------------------------

def test_a_folder_run_records_its_cpu_thread_count(capsys, tmp_path, monkeypatch):
    """Measured: `roundtrip --data D --steps 10` of 40 digits with `--threads 1` and with `--threads 2` gave
    results.csv files that differ in 8 rows (relative 3e-6: CPU kernels block a batch by thread count), but the
    manifest did not record the count: a run stopped with one count and resumed with another mixed the two, and the
    table was no longer the one-run table "bit for bit". (Under torchrun each process has OMP_NUM_THREADS=1; a
    one-process run of a --model DIR takes torch's own count.) The resume is now refused, naming --threads."""
    (tmp_path / "d").mkdir()
    write_digits(tmp_path / "d", 4)
    argv = ["roundtrip", "--data", "d", "--out", "o", "--steps", "2", "--batch-size", "2"]
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("FLOWDIFF_STOP_AFTER", "3")  # batch 0 recorded, batch 1 cut off
        code, _, _ = run_in(capsys, [*argv, "--threads", "1"], tmp_path)
        assert code == 3
        monkeypatch.delenv("FLOWDIFF_STOP_AFTER")
        code, _, err = run_in(capsys, [*argv, "--threads", "2"], tmp_path)
        line = one_line(err)
        assert code == 2 and "--threads: 1 in the folder's run, 2 now" in line, line
        code, out, err = run_in(capsys, [*argv, "--threads", "1"], tmp_path)
        assert code == 0 and "resuming: 1 of 2 batches done" in out, err
    finally:
        torch.set_num_threads(before)
