"""Sizes and types at the boundary: astronomical step counts, budgets, image counts and seeds are refused before
anything is allocated; the exact NFE of any step count is counted in constant time; a model's wrong output is
refused on every call, and a model that modifies its timestep argument changes nothing of later calls."""

import time

import numpy as np
import pytest
import torch

import flowdiff
import solvers
from flowdiff.cli import main
from flowdiff.engine.grids import MAX_STEPS
from flowdiff.models.analytic import Gaussian


def _gauss():
    return Gaussian(torch.tensor([0.5, -1.0, 0.25], dtype=torch.float64), torch.tensor([0.3, 1.2, 0.8],
                                                                                         dtype=torch.float64))


def _noise(n=2, dim=3):
    return torch.randn(n, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


# -- step counts and budgets -----------------------------------------------------------------------------

@pytest.mark.parametrize("grid", ["karras", "logsnr", "trailing"])
def test_astronomical_steps_are_refused_by_name(grid):
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"steps must be at most 1,000,000 .* got 1,000,000,000,000"):
        flowdiff.generate(_gauss().flow(), _noise(), steps=10**12, grid=grid)
    assert time.perf_counter() - start < 5  # refused, not attempted


@pytest.mark.parametrize("solver", ["euler", "dopri5", "unipc"])
def test_astronomical_nfe_is_refused_by_name(solver):
    start = time.perf_counter()
    with pytest.raises(ValueError, match=rf"nfe=1,000,000,000,000 buys [\d,]+ steps of solver '{solver}'"):
        flowdiff.generate(_gauss().flow(), _noise(), nfe=10**12, grid="karras", solver=solver)
    assert time.perf_counter() - start < 30


def test_the_largest_step_count_is_accepted():
    sigmas = flowdiff.make_sigmas(_gauss().flow().schedule, "karras", MAX_STEPS)
    assert len(sigmas) == MAX_STEPS + 1 and sigmas[-1] == 0.0


def _counted_nfe(name, steps, eval_end):
    calls = []

    def f(t, y):
        calls.append(t)
        return -y

    grid = np.linspace(2.0, 1.0, steps + 1)
    solvers.solve(f, torch.ones(2, dtype=torch.float64), grid, name, eval_end=eval_end)
    return len(calls)


@pytest.mark.parametrize("name", solvers.available())
def test_nfe_for_long_grids_equals_the_evaluations_counted(name):
    # past the dry-run range the count is extended; it must still equal a real solve's evaluations
    top = solvers._driver.DRY_RUN_STEPS + 4
    for steps in (top + 1, top + 7, 2 * top + 3):
        for eval_end in (True, False):
            assert solvers.nfe_for_steps(name, steps, eval_end=eval_end) == _counted_nfe(name, steps, eval_end)


@pytest.mark.parametrize("name", ["euler", "dopri5", "unipc", "reversible_heun", "rk4"])
@pytest.mark.parametrize("budget", [10**6 + 3, 10**12])
def test_steps_for_a_huge_budget_is_maximal_and_fast(name, budget):
    start = time.perf_counter()
    steps = solvers.steps_for_nfe(name, budget)
    assert solvers.nfe_for_steps(name, steps) <= budget < solvers.nfe_for_steps(name, steps + 1)
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-5, ValueError), (2.0, TypeError), (True, TypeError)])
def test_nfe_for_steps_refuses_bad_counts(bad, error):
    with pytest.raises(error, match="steps"):
        solvers.nfe_for_steps("euler", bad)
    with pytest.raises(error, match="nfe"):
        solvers.steps_for_nfe("euler", bad)


# -- the model's outputs ---------------------------------------------------------------------------------

class _Model:
    """eps = 0.1·x, or ``wrong(x)`` on the calls listed in ``bad_calls``."""

    def __init__(self, wrong, bad_calls):
        self.wrong, self.bad_calls, self.calls = wrong, set(bad_calls), 0

    def __call__(self, x, t):
        self.calls += 1
        return self.wrong(x) if self.calls in self.bad_calls else 0.1 * x


@pytest.mark.parametrize("wrong, error, match", [
    (lambda x: (x,), TypeError, "model must return a torch.Tensor, got tuple"),
    (lambda x: x[:1], ValueError, "model returned shape"),
    (lambda x: x.to(torch.complex128), TypeError, "complex"),
])
def test_a_wrong_model_output_fails_the_same_way_on_every_call(wrong, error, match):
    schedule = flowdiff.Schedule.from_betas(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    model = _Model(wrong, bad_calls=range(1, 100))
    flow = flowdiff.ProbabilityFlow(model, schedule)
    noise = _noise(2, 4)
    for _ in range(3):  # the same σ grid each time: the second and third solves hit the flow's cached σ
        with pytest.raises((error, solvers.SolveError), match=match):
            flowdiff.generate(flow, noise, steps=4)
    # and a model that goes wrong only later, at a σ a good solve has already visited
    model.bad_calls = set()
    good = flowdiff.generate(flow, noise, steps=4)
    model.bad_calls = {model.calls + 3}
    with pytest.raises((error, solvers.SolveError), match=match) as info:
        flowdiff.generate(flow, noise, steps=4)
    assert not isinstance(info.value, AttributeError) and good.stats.nfe == 4


@pytest.mark.parametrize("mode", ["grad", "inference"])  # inference tensors keep no version counter
def test_a_model_modifying_its_timestep_in_place_changes_no_later_call(mode):
    context = torch.inference_mode() if mode == "inference" else torch.enable_grad()
    with context:
        _modifying_model_changes_nothing()


def _modifying_model_changes_nothing():
    schedule = flowdiff.Schedule.from_betas(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    seen = []

    def vandal(x, t):
        seen.append(t.clone())
        out = 0.1 * x * (1 + t[:, None] / 1000)
        t.add_(500.0)  # a model that scribbles on its argument
        return out

    def clean(x, t):
        seen.append(t.clone())
        return 0.1 * x * (1 + t[:, None] / 1000)

    noise = _noise(2, 4)
    flow = flowdiff.ProbabilityFlow(vandal, schedule)
    first = flowdiff.generate(flow, noise, steps=5, solver="heun").x
    first_ts = list(seen)
    seen.clear()
    second = flowdiff.generate(flow, noise, steps=5, solver="heun").x
    assert all(torch.equal(a, b) for a, b in zip(first_ts, seen)) and len(seen) == len(first_ts)
    assert torch.equal(first, second)
    seen.clear()
    reference = flowdiff.generate(flowdiff.ProbabilityFlow(clean, schedule), noise, steps=5, solver="heun").x
    assert torch.equal(first, reference) and all(torch.equal(a, b) for a, b in zip(first_ts, seen))


# -- the command line ------------------------------------------------------------------------------------

def _run(capsys, argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
@pytest.mark.parametrize("command", [["likelihood", "--model", "analytic-mixture", "x.png"],
                                     ["sample", "--model", "analytic-mixture"]])
def test_every_command_checks_its_device_the_same_way(capsys, tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    code, out, err = _run(capsys, [*command, "--device", "cuda"])
    assert code == 1
    assert "--device 'cuda': CUDA is not available" in err and "AssertionError" not in err + out
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, name", [
    (["sample", "--model", "analytic-mixture", "--num", str(10**12)], "--num"),
    (["sample", "--model", "analytic-mixture", "--steps", str(10**12), "--grid", "karras"], "steps"),
    (["sample", "--model", "analytic-mixture", "--nfe", str(10**12), "--grid", "karras"], "nfe"),
    (["sample", "--model", "analytic-mixture", "--seed", str(2**64)], "--seed"),
    (["likelihood", "--model", "analytic-mixture", "--seed", str(2**64), "x.png"], "--seed"),
    (["likelihood", "--model", "analytic-mixture", "--seed", "-1", "x.png"], "--seed"),
    (["likelihood", "--model", "analytic-mixture", "--device", "toaster", "x.png"], "--device"),
])
def test_astronomical_or_bad_sizes_on_the_command_line_are_one_line(capsys, tmp_path, monkeypatch, argv, name):
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    code, out, err = _run(capsys, argv)
    assert code in (1, 2) and name in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "samples.png").exists()
    assert time.perf_counter() - start < 30


@pytest.mark.parametrize("seed, error", [(2**64, ValueError), (2**70, ValueError), (-1, ValueError)])
def test_a_seed_outside_torchs_range_is_refused_by_name(seed, error):
    with pytest.raises(error, match=r"generator must be .*seed in \[0, 2\*\*64 - 1\]"):
        flowdiff.generate(_gauss().flow(), _noise(), steps=4, solver=flowdiff.Stochastic(0.5, generator=seed))
    # the largest is fine
    flowdiff.generate(_gauss().flow(), _noise(), steps=4, solver=flowdiff.Stochastic(0.5, generator=2**64 - 1))


def test_likelihood_refuses_astronomical_steps():
    from flowdiff.tools.likelihood import log_likelihood

    gauss = _gauss()
    with pytest.raises(ValueError, match=r"steps must be at most 1,000,000"):
        log_likelihood(gauss.flow(), gauss.sample(2, torch.Generator().manual_seed(0)), solver="rk4", steps=10**12)
