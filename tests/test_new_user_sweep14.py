"""New-user sweep 14: tuned grids, learned solvers and learned encoders as a user meets them — their files, their
fingerprints, and what a fit that the held-out half rejects says. Each test failed before its fix; its docstring says
what the user saw."""

import importlib
import os
import pathlib
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest
import torch

import flowdiff
import solvers
from flowdiff import LearnedSolver, TunedGrid
from flowdiff.engine.fingerprint import _digest
from flowdiff.models.analytic import Gaussian
from flowdiff.tools.learned import shift_intervals

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIRST = Gaussian(torch.zeros(8, dtype=torch.float64), torch.full((8,), 0.5, dtype=torch.float64))
SECOND = Gaussian(torch.ones(8, dtype=torch.float64), torch.full((8,), 0.2, dtype=torch.float64))


def _eps_of(model):
    """A plain function calling ``model`` (the same code for every model: only its closure differs)."""
    def eps(x_t, t):
        return model(x_t, t)
    return eps


def _noise(n=4, seed=0):
    return torch.randn(n, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _by_hand(flow, sigmas, **fields):
    """A learned solver built as learn_solver writes one: unipc at NFE 4, its shifts half-way to their bounds."""
    base = solvers.get("unipc")
    shifts = tuple(0.5 * (hi if hi > 0 else lo) for lo, hi in shift_intervals(base, sigmas, flow.schedule, 0.5))
    return LearnedSolver("unipc", {}, 4, sigmas.copy(), (), flowdiff.flow_fingerprint(flow), True, shifts=shifts,
                         learn=("shifts", "grid"), base_sigmas=sigmas.copy(), options={"shift_bound": 0.5},
                         **fields)


def test_two_plain_function_models_have_two_fingerprints_and_a_fit_of_one_is_refused_for_the_other(tmp_path):
    """``ProbabilityFlow(eps_a, schedule)`` and ``ProbabilityFlow(eps_b, schedule)``, two plain functions calling two
    Gaussians, had one fingerprint (the schedule and prediction type alone): a solver learned on the first loaded for
    the second without a word (its RMS error there 0.39), as did a tuned grid, and a latent of one decoded under the
    other. A plain function is now read by its code, closure and the globals it names."""
    schedule = FIRST.schedule
    first, second = (flowdiff.ProbabilityFlow(_eps_of(g), schedule) for g in (FIRST, SECOND))
    assert flowdiff.flow_fingerprint(first) != flowdiff.flow_fingerprint(second)
    # the same function of the same model, made again (or of an equal copy of it), is the same flow
    copy = Gaussian(torch.zeros(8, dtype=torch.float64), torch.full((8,), 0.5, dtype=torch.float64))
    again = flowdiff.ProbabilityFlow(_eps_of(copy), schedule)
    assert flowdiff.flow_fingerprint(again) == flowdiff.flow_fingerprint(first)

    sigmas = flowdiff.make_sigmas(schedule, "logsnr", 4)
    path = _by_hand(first, sigmas).save(tmp_path / "first.learned.json")
    assert LearnedSolver.load(path, again).shifts == _by_hand(first, sigmas).shifts
    with pytest.raises(ValueError, match=r"this learned solver was fitted on the flow .*another model"):
        LearnedSolver.load(path, second)
    grid = TunedGrid(sigmas, "unipc", {}, 4, flowdiff.flow_fingerprint(first)).save(tmp_path / "first.json")
    with pytest.raises(ValueError, match=r"this grid was tuned on the flow .*another model"):
        TunedGrid.load(grid, second)
    latent = flowdiff.encode(first, FIRST.sample(2, generator=torch.Generator().manual_seed(1)), solver="euler",
                             steps=3).latent
    with pytest.raises(ValueError, match="fingerprint"):
        flowdiff.decode(second, latent)


def test_a_plain_function_has_its_fingerprint_in_every_run(tmp_path, monkeypatch):
    """A file made for a plain function must load in the next run: its digest reads no address, no line number and
    no string hash (a set literal's order changes with ``PYTHONHASHSEED``)."""
    (tmp_path / "plain_model.py").write_text(textwrap.dedent("""
        import torch
        import flowdiff
        from flowdiff.models.analytic import Gaussian

        GAUSS = Gaussian(torch.linspace(-1, 1, 8, dtype=torch.float64), 0.3)
        SCALE = 1.25
        NET = torch.nn.Linear(8, 8).double()
        torch.nn.init.constant_(NET.weight, 0.01)
        torch.nn.init.constant_(NET.bias, 0.0)

        def eps(x_t, t, kind="plain"):
            if kind in {"plain", "scaled", "other"}:
                return SCALE * GAUSS(x_t, t) + 0.0 * NET(x_t)
            return GAUSS(x_t, t)

        def key():
            return flowdiff.flow_fingerprint(flowdiff.ProbabilityFlow(eps, GAUSS.schedule))
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    here = importlib.import_module("plain_model").key()
    seed = "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2"  # another string hash than this run's
    env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    out = subprocess.run([sys.executable, "-c", "import plain_model; print(plain_model.key())"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == here and len(here) == 32
    sys.modules.pop("plain_model")


def test_a_plain_function_s_fingerprint_follows_its_closure_globals_and_code():
    """What a plain function computes with is read: a number in its closure, a network or tensor among the globals
    its body names, its code (two lambdas of one line differ); a list the function appends to is not (its type is),
    nor a counter it assigns: a fingerprint taken before a solve matches after it."""
    schedule = FIRST.schedule

    def key(model):
        return flowdiff.flow_fingerprint(flowdiff.ProbabilityFlow(model, schedule))

    def scaled(k):
        return lambda x_t, t: k * FIRST(x_t, t)

    assert key(scaled(1.0)) == key(scaled(1.0)) != key(scaled(2.0))
    net = torch.nn.Linear(8, 8).double()
    other = torch.nn.Linear(8, 8).double()
    assert key(lambda x_t, t: net(x_t)) != key(lambda x_t, t: other(x_t))
    assert key(lambda x_t, t: FIRST(x_t, t)) != key(lambda x_t, t: -FIRST(x_t, t))
    before = key(lambda x_t, t: net(x_t))
    with torch.no_grad():
        net.weight.add_(1.0)  # trained further: another model
    assert key(lambda x_t, t: net(x_t)) != before
    calls = []

    def counted(x_t, t):
        calls.append(t)
        return FIRST(x_t, t)

    total = 0

    def tallied(x_t, t):
        nonlocal total
        total += 1
        return FIRST(x_t, t)

    first, second = key(counted), key(tallied)
    for model in (counted, tallied):
        flowdiff.generate(flowdiff.ProbabilityFlow(model, schedule), _noise(2), steps=2)
    assert calls and total and (key(counted), key(tallied)) == (first, second)


def test_a_file_saved_before_plain_functions_were_read_is_refused_saying_why(tmp_path):
    """A file saved for a plain function before this change records the schedule's digest alone, which every plain
    function of that schedule had: it cannot say which function it was made for, and the refusal says so."""
    flow = flowdiff.ProbabilityFlow(_eps_of(FIRST), FIRST.schedule)
    sigmas = flowdiff.make_sigmas(flow.schedule, "logsnr", 4)
    old = replace(_by_hand(flow, sigmas), fingerprint=_digest(flow, None, repeated=True, functions=False))
    path = old.save(tmp_path / "old.learned.json")
    with pytest.raises(ValueError, match="recorded before flowdiff read a plain function's code and closure"):
        LearnedSolver.load(path, flow)
