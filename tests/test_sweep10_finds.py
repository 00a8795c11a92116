"""Four finds of the tenth new-user sweep (S10), each checked as a user meets it."""

import inspect
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import flowdiff
import flowdiff.api.adaptive
import solvers
from flowdiff.cli import main
from flowdiff.engine.schedules import rescale_zero_terminal_snr

# -- one spelling: the adaptive callback's record is StepState, and only that ---------------------------------


def test_every_public_class_and_function_has_one_public_name():
    """The adaptive callback's record was exported a second time under an older name (the same class object as
    ``StepState``, by flowdiff and by its adaptive module). Every class and function that flowdiff or that module
    exports is exported under its own name, and under no other."""
    for module in (flowdiff, flowdiff.api.adaptive):
        values = [(name, getattr(module, name)) for name in module.__all__]
        named = [(name, value) for name, value in values if inspect.isclass(value) or inspect.isfunction(value)]
        assert [name for name, value in named if value.__name__ != name] == []
        assert len({id(value) for _, value in named}) == len(named)


# -- zero terminal SNR with an epsilon model: refused before the solve --------------------------------------------

def _zero_snr_flow(prediction_type, calls):
    schedule = flowdiff.Schedule(rescale_zero_terminal_snr(flowdiff.Schedule.linear().alphas_cumprod))

    def model(x, t):
        calls.append(t)
        return 0.1 * x

    return flowdiff.ProbabilityFlow(model, schedule, prediction_type=prediction_type)


@pytest.mark.parametrize("solver", ["euler", "heun", "dpmpp_2m", "unipc"])
def test_an_epsilon_model_from_infinity_is_refused_before_the_solve(solver):
    """It was a ``SolveError`` of step 0 from inside the loop; now a plain ``ValueError`` before the solve starts:
    no model evaluation, no callback, and the message names the prediction type, σ_max = ∞ and what is accepted."""
    calls, seen = [], []
    flow = _zero_snr_flow("epsilon", calls)
    assert flow.schedule.sigma_max == math.inf
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError) as err:
        flowdiff.generate(flow, noise, solver=solver, grid="trailing", steps=5, callback=seen.append)
    assert not isinstance(err.value, solvers.SolveError)
    assert calls == [] and seen == []
    message = str(err.value)
    for part in ("prediction_type 'epsilon'", "σ_max = ∞", "'v_prediction' or 'sample'", "grid[1:]"):
        assert part in message


def test_the_advice_of_the_refusal_runs():
    """The same grid without its first point generates with the epsilon model, and the same grid from σ = ∞ with a
    v-prediction model still takes its step out of infinity (one evaluation there, counted)."""
    calls = []
    flow = _zero_snr_flow("epsilon", calls)
    grid = flowdiff.make_sigmas(flow.schedule, "trailing", 5)
    noise = torch.randn(2, 3, generator=torch.Generator().manual_seed(1))
    res = flowdiff.generate(flow, noise, solver="euler", grid=grid[1:])
    assert res.x.isfinite().all() and res.stats.nfe == len(calls) == len(grid) - 2
    calls.clear()
    v_flow = _zero_snr_flow("v_prediction", calls)
    res = flowdiff.generate(v_flow, noise, solver="euler", grid=grid)
    assert res.x.isfinite().all() and res.stats.nfe == len(calls) == len(grid) - 1


def test_step_from_noise_gives_the_same_refusal():
    """The step itself refuses with the same message as the solve (one check, two callers)."""
    flow = _zero_snr_flow("epsilon", [])
    noise = torch.randn(2, 3)
    with pytest.raises(ValueError) as direct:
        flow.step_from_noise(noise, 2.0)
    with pytest.raises(ValueError) as solve:
        flowdiff.generate(flow, noise, grid="trailing", steps=3)
    assert str(direct.value) == str(solve.value)


# -- the command line: arguments that cannot work together end with status 2 -------------------------------------

def _digit_folder(folder):
    from PIL import Image

    (folder / "0").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / "0" / f"d{i}.png")
    return str(folder)


USAGE_ERRORS = [
    (["--guidance", "3"], ["--guidance 3.0", "needs --class-label N"]),
    (["--class-label", "10"], ["--class-label 10", "has 10 classes; accepted: 0 … 9"]),
    (["--class-label", "2", "--prompt", "a cat"], ["--class-label 2 and --prompt 'a cat'"]),
    (["--class-label", "2", "--guidance", "nan"], ["--guidance must be a finite number, got nan"]),
    (["--model", "analytic-mixture", "--class-label", "1"], ["--class-label 1", "takes no class labels"]),
    (["--model", "analytic-mixture", "--guidance", "2"], ["--guidance 2.0", "need --prompt"]),
    (["--prompt", "a cat"], ["--prompt 'a cat'", "no text encoder"]),
]


@pytest.mark.parametrize("extra, named", USAGE_ERRORS, ids=[" ".join(extra) for extra, _ in USAGE_ERRORS])
def test_arguments_that_cannot_work_are_usage_errors(extra, named, tmp_path, capsys):
    """The README gives usage errors status 2; these ended with status 1, as failures at run time do."""
    out = tmp_path / "x.png"
    assert main(["sample", "--num", "2", "--steps", "2", "--device", "cpu", "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flowdiff sample: error: ") and all(part in err for part in named), err
    assert not out.exists()


def test_a_class_label_with_data_is_a_usage_error(tmp_path, capsys):
    data = _digit_folder(tmp_path / "in")
    out = tmp_path / "latents"
    assert main(["encode", "--data", data, "--class-label", "1", "--steps", "2", "--device", "cpu",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--data: model 'digits' takes one class label per image" in err and "--class-label 1" in err
    assert not out.exists()
    # without the label the same run works: the refusal is of the pair, not of --data
    assert main(["encode", "--data", data, "--steps", "2", "--device", "cpu", "--out", str(out)]) == 0, \
        capsys.readouterr().err


# -- the README's round-trip table says which encodes are refused --------------------------------------------------

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def _round_trip_table():
    header = "| solver | trailing | leading | karras | logsnr |"
    lines = README[README.index(header):].splitlines()
    grids = [cell.strip() for cell in lines[0].strip().strip("|").split("|")][1:]
    rows = {}
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        rows[cells[0].split()[0]] = dict(zip(grids, cells[1:]))
    return rows


def test_the_round_trip_table_marks_exactly_the_refused_encodes():
    """The table showed ``ipndm`` after-values on trailing, leading and karras, but its encodes are refused on every
    grid: a cell says "refused" exactly where ``flowdiff.encode`` refuses that solver on that grid."""
    flow = flowdiff.pretrained("digits")
    images = flowdiff.digits_data("test").images[:1].double()
    table = _round_trip_table()
    assert "ipndm" in table and len(table) >= 7
    for solver, cells in table.items():
        for grid, cell in cells.items():
            try:
                flowdiff.encode(flow, images, solver=solver, steps=2, grid=grid)
                refused = False
            except ValueError as err:
                assert f"solver '{solver}' cannot encode" in str(err)
                refused = True
            assert cell.endswith("refused") == refused, (solver, grid, cell)


# -- the refusals at σ = ∞ advise spellings that run ----------------------------------------------------------------

def test_each_refusal_at_infinity_advises_a_call_that_runs():
    """The refusals of adaptive and stochastic solves from σ = ∞ advised ``sigmas=[σ_start, 0]`` (a keyword removed
    from generate) and the encode's ``sigmas=grid[1:]``; each advice now names a spelling, and that spelling runs."""
    calls = []
    flow = _zero_snr_flow("v_prediction", calls)
    grid = flowdiff.make_sigmas(flow.schedule, "trailing", 5)
    noise = torch.randn(2, 3, generator=torch.Generator().manual_seed(2))
    adaptive = flowdiff.Adaptive(rtol=1e-3, atol=1e-3)
    refusals = [
        (lambda: flowdiff.generate(flow, noise, solver="dopri5", adaptive=adaptive),
         "adaptive=flowdiff.Adaptive(sigma_start=σ)",
         lambda: flowdiff.generate(flow, noise, solver="dopri5",
                                   adaptive=flowdiff.Adaptive(rtol=1e-3, atol=1e-3, sigma_start=float(grid[1])))),
        (lambda: flowdiff.generate(flow, noise, solver=flowdiff.Stochastic(1.0, generator=0), grid=grid),
         "grid=grid[1:] for flowdiff.Stochastic",
         lambda: flowdiff.generate(flow, noise, solver=flowdiff.Stochastic(1.0, generator=0), grid=grid[1:])),
        (lambda: flowdiff.encode(flow, noise, grid=grid),
         "grid=grid[1:]",
         lambda: flowdiff.encode(flow, noise, grid=grid[1:])),
    ]
    for refused, advice, advised in refusals:
        with pytest.raises(ValueError) as err:
            refused()
        assert advice in str(err.value) and "sigmas=" not in str(err.value)
        assert advised().x.isfinite().all()
