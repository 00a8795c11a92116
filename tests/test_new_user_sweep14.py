"""New-user sweep 14: tuned grids, learned solvers and learned encoders as a user meets them — their files, their
fingerprints, and what a fit that the held-out half rejects says. Each test failed before its fix; its docstring says
what the user saw."""

import errno
import importlib
import json
import os
import pathlib
import subprocess
import sys
import textwrap
import warnings
from dataclasses import replace

import pytest
import torch

import flowdiff
import solvers
from flowdiff import LearnedEncoder, LearnedSolver, TunedGrid
from flowdiff.engine.fingerprint import _digest
from flowdiff.models.analytic import Gaussian, Mixture
from flowdiff.tools.learned import NOT_KEPT, _layout, shift_intervals
from flowdiff.tools.roundtrip_fit import NOT_KEPT as ENCODER_NOT_KEPT

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
    its body names, its code (two lambdas of one line differ), a flow in its closure (its model's tensors, not the
    caches its first evaluation fills); a list the function appends to is not (its type is), nor a counter it
    assigns: a fingerprint taken before a solve matches after it."""
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

    def through(flow):  # a closure over a flow, calling its model
        return lambda x_t, t: flow.model(x_t, t)

    fresh = Gaussian(torch.zeros(8, dtype=torch.float64), 0.5)  # not evaluated yet: no caches in it or its flow
    inner = flowdiff.ProbabilityFlow(fresh, fresh.schedule)
    unused = key(through(inner))
    flowdiff.generate(inner, _noise(2), steps=2)  # fills the flow's and the Gaussian's caches
    flowdiff.generate(flowdiff.ProbabilityFlow(through(inner), schedule), _noise(2), steps=2)
    assert key(through(inner)) == unused != key(through(flowdiff.ProbabilityFlow(SECOND, schedule)))
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


def _edit(path, out, change):
    data = json.loads(path.read_text())
    change(data)
    out.write_text(json.dumps(data))
    return out


def _swap(key, i, j):
    def change(data):
        data[key][i], data[key][j] = data[key][j], data[key][i]
    return change


def _put(key, value, i=None):
    def change(data):
        if i is None:
            data[key] = value
        else:
            data[key][i] = value
    return change


LEARNED_EDITS = {
    "sigmas not decreasing": (_swap("sigmas", 1, 2), r"sigmas must be a strictly decreasing list"),
    "a NaN σ": (_put("sigmas", float("nan").hex(), 1), r"sigmas must be a strictly decreasing list .*nan"),
    "a negative σ": (_put("sigmas", (-1.0).hex(), 3), r"sigmas must be a strictly decreasing list .*-1\.0"),
    "base_sigmas not decreasing": (_swap("base_sigmas", 1, 2), r"base_sigmas must be a strictly decreasing list"),
    "nfe below the grid's cost": (_put("nfe", 2), r"nfe = 2 is below the 4 evaluations solver 'unipc' spends"),
    "nfe as text": (_put("nfe", "4"), r"nfe must be an int >= 1 .*got '4'"),
    "kept as text": (_put("kept", "yes"), r"kept must be true or false, got 'yes'"),
    "a shift past its bound": (_put("shifts", (3.0).hex(), 0), r"shifts\[0\] = 3\.0 is outside \[0\.0, 0\.49"),
}


@pytest.mark.parametrize("edit", sorted(LEARNED_EDITS))
def test_a_hand_edited_learned_solver_file_is_refused_at_load_naming_the_file_and_field(tmp_path, edit):
    """``LearnedSolver.load`` checked the shifts, scales and directions of a hand-edited file, not its grids, budget or
    the shifts' intervals: a σ grid not decreasing, with NaN or a negative σ loaded and failed at the first
    ``generate`` without naming the file; an ``nfe`` edited to 2 loaded and spent 4 (``compare`` labels the row with
    it); a shift of 3 (bound 0.5) loaded and ran; ``kept: "yes"`` loaded as true."""
    flow = Mixture(torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), 0.4).flow()
    path = _by_hand(flow, flowdiff.make_sigmas(flow.schedule, "logsnr", 4)).save(tmp_path / "fit.json")
    assert LearnedSolver.load(path, flow).kept  # as written, it loads
    change, message = LEARNED_EDITS[edit]
    edited = _edit(path, tmp_path / "edited.json", change)
    with pytest.raises(ValueError, match=message) as err:
        LearnedSolver.load(edited, flow)
    assert str(edited) in str(err.value)


def _more(data):
    data["coefficients"] = [cs + [(0.5).hex()] for cs in data["coefficients"]]


COEFFICIENT_EDITS = {
    "a step's tuple dropped": (lambda data: data["coefficients"].pop(), r"coefficients must hold one tuple per step "
                                                                          r"of sigmas \(5\), got 4"),
    "a term more than a step takes": (_more, r"coefficients\[0\] holds 1 values, but step 0 of sigmas takes at most 0"),
    "a coefficient past its bound": (_put("coefficients", [(1e9).hex()], 3),
                                     r"coefficients\[3\]\[0\] = 1000000000\.0 is outside \[-4\.0, 4\.0\]"),
}


@pytest.mark.parametrize("edit", sorted(COEFFICIENT_EDITS))
def test_a_hand_edited_coefficient_file_is_refused_at_load(tmp_path, edit):
    """The coefficients of a file were checked for finiteness alone: a coefficient of 1e9 (bound 4) loaded and the
    solve diverged at step 2; a tuple with a term more than its step takes loaded and failed inside the solve; a
    dropped step's tuple loaded."""
    flow = FIRST.flow()
    sigmas = flowdiff.make_sigmas(flow.schedule, "logsnr", 5)
    base = solvers.get("unipc")
    counts = _layout(base, sigmas, 2, ("coefficients",), flow.schedule, 0.5)[0]
    learned = LearnedSolver("unipc", {}, 5, sigmas, tuple((0.1,) * n for n in counts), flowdiff.flow_fingerprint(flow),
                            True, learn=("coefficients",), options={"bound": 4.0, "terms": 2})
    path = learned.save(tmp_path / "fit.json")
    assert LearnedSolver.load(path, flow).coefficients == learned.coefficients and sum(counts) >= 2
    change, message = COEFFICIENT_EDITS[edit]
    edited = _edit(path, tmp_path / "edited.json", change)
    with pytest.raises(ValueError, match=message) as err:
        LearnedSolver.load(edited, flow)
    assert str(edited) in str(err.value)


def _encoder(flow, sigmas, **fields):
    """A kept learned encoder built by hand: Euler, its encode and decode shifts a quarter of the way to a bound."""
    base = solvers.get("euler")
    enc, dec = (tuple(0.25 * (hi if hi > 0 else lo) for lo, hi in shift_intervals(base, sigmas, flow.schedule, 1.5, d))
                for d in ("encode", "decode"))
    return LearnedEncoder("euler", {}, 4, sigmas.copy(), enc, dec, flowdiff.flow_fingerprint(flow), True,
                          options={"bound": 1.5}, **fields)


ENCODER_EDITS = {
    "sigmas not decreasing": (_swap("sigmas", 1, 2),
                              r"malformed learned encoder \(sigmas must be a strictly decreasing"),
    "a NaN shift": (_put("shifts", float("nan").hex(), 1), r"shifts\[1\] = nan is not finite"),
    "a shift past its bound": (_put("shifts", (3.0).hex(), 1), r"shifts\[1\] = 3\.0 is outside"),
    "a decode shift past its bound": (_put("decode_shifts", (3.0).hex(), 1), r"decode_shifts\[1\] = 3\.0 is outside"),
    "kept as text": (_put("kept", "no"), r"kept must be true or false, got 'no'"),
}


@pytest.mark.parametrize("edit", sorted(ENCODER_EDITS))
def test_a_hand_edited_learned_encoder_file_is_refused_at_load_naming_the_file_and_field(tmp_path, edit):
    """``LearnedEncoder.load`` checked the shifts' count alone: a NaN encode shift or one of 3 (bound 1.5) loaded and
    encoded (4 evaluations, finite), a grid not decreasing loaded and failed at the encode without naming the
    file."""
    flow = Mixture(torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), 0.4).flow()
    path = _encoder(flow, flowdiff.make_sigmas(flow.schedule, "logsnr", 4)).save(tmp_path / "enc.json")
    assert LearnedEncoder.load(path, flow).kept
    change, message = ENCODER_EDITS[edit]
    edited = _edit(path, tmp_path / "edited.json", change)
    with pytest.raises(ValueError, match=message) as err:
        LearnedEncoder.load(edited, flow)
    assert str(edited) in str(err.value)


@pytest.mark.parametrize("change, message", [
    (_put("solver", "nope"), r"unknown solver 'nope'"),
    (_put("solver_options", {"order": 9, "colour": 1}), r"unknown option"),
])
def test_a_tuned_grid_file_for_an_unknown_solver_is_refused_at_load(tmp_path, change, message):
    """A tuned-grid file whose solver was edited to ``"nope"`` (or given an option it does not take) loaded as it
    was, and failed only where the grid was used; ``load_grids`` (and so ``stored_grid``) read it the same way."""
    flow = FIRST.flow()
    grid = TunedGrid(flowdiff.make_sigmas(flow.schedule, "logsnr", 4), "unipc", {}, 4, flowdiff.flow_fingerprint(flow))
    edited = _edit(grid.save(tmp_path / "grid.json"), tmp_path / "edited.json", change)
    with pytest.raises(ValueError, match=rf"{edited}: malformed tuned grid \(.*{message}"):
        TunedGrid.load(edited, flow)
    many = flowdiff.save_grids([grid], tmp_path / "set.tuned.json")
    data = json.loads(many.read_text())
    change(data["grids"][0])
    many.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"grid 0 is malformed \(.*{message}"):
        flowdiff.load_grids(many)


def test_learn_solver_says_when_the_held_out_half_keeps_the_base_method():
    """A fit that the held-out half rejects returns the base method (``kept=False``) and said nothing: the user saw a
    LearnedSolver whose ``as_solver()`` was plain ``unipc``. It warns, naming the base method and the held-out error;
    a kept fit does not."""
    flow = SECOND.flow()
    with pytest.warns(UserWarning, match=rf"{NOT_KEPT}: no fit beat it on the held-out half .* so the result is "
                                         r"'unipc' itself on the starting grid \(logsnr\) with kept=False"):
        rejected = flowdiff.learn_solver(flow, _noise(4), solver="unipc", nfe=4, learn="shifts", iterations=0)
    assert not rejected.kept and rejected.as_solver().name == "unipc"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kept = flowdiff.learn_solver(flow, _noise(8), solver="euler", nfe=3, learn="shifts", iterations=3)
    assert kept.kept and not [w for w in caught if NOT_KEPT in str(w.message)]


def test_learn_encoder_says_when_the_held_out_half_keeps_the_plain_encode():
    """``learn_encoder``'s rejected fit returned the plain encode (``kept=False``) without a word."""
    flow = SECOND.flow()
    images = SECOND.sample(4, generator=torch.Generator().manual_seed(3))
    sigmas = flowdiff.make_sigmas(flow.schedule, "logsnr", 3)
    with pytest.warns(UserWarning, match=rf"{ENCODER_NOT_KEPT}: on the held-out half .* the plain 'euler' encode"):
        learned = flowdiff.learn_encoder(flow, images, solver="euler", nfe=3, sigmas=sigmas, iterations=0)
    assert not learned.kept


@pytest.mark.parametrize("save", ["learned", "tuned", "grids", "encoder"])
def test_a_save_that_fails_half_way_leaves_the_earlier_file(tmp_path, monkeypatch, save):
    """Saving a second fit to the path of the first on a disk that fills half way left the first file cut short
    (written in place): the earlier fit was lost and the new one not written. The write is atomic now (as
    ``Latent.save``'s): the earlier file stays whole and loads, and the error names the file."""
    flow = FIRST.flow()
    sigmas = flowdiff.make_sigmas(flow.schedule, "logsnr", 4)
    grid = TunedGrid(sigmas, "unipc", {}, 4, flowdiff.flow_fingerprint(flow))
    writers = {"learned": (lambda p: _by_hand(flow, sigmas).save(p), lambda p: LearnedSolver.load(p, flow)),
               "tuned": (grid.save, lambda p: TunedGrid.load(p, flow)),
               "grids": (lambda p: flowdiff.save_grids([grid], p), flowdiff.load_grids),
               "encoder": (lambda p: _encoder(flow, sigmas).save(p), lambda p: LearnedEncoder.load(p, flow))}
    write, read = writers[save]
    path = tmp_path / "fit.json"
    write(path)
    before = path.read_bytes()

    def full_disk(self, data, *args, **kwargs):
        with open(self, "wb" if isinstance(data, bytes) else "w") as fh:
            fh.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_text", full_disk)
    monkeypatch.setattr(pathlib.Path, "write_bytes", full_disk)
    with pytest.raises(OSError, match="No space left on device") as err:
        write(path)
    monkeypatch.undo()
    assert str(path) in str(err.value)
    assert path.read_bytes() == before and read(path)
    assert [p.name for p in tmp_path.iterdir()] == ["fit.json"]  # no temporary file left behind


@pytest.mark.parametrize("learn", [(), []])
def test_learn_with_nothing_named_says_it_needs_one_kind(learn):
    """``learn_solver(..., learn=())`` said "learn must be one of (...) or a tuple of them, got ()": the user had given
    a tuple of them, with none in it."""
    with pytest.raises(TypeError, match=r"a non-empty tuple or list of them \(at least one kind to fit\), got"):
        flowdiff.learn_solver(FIRST.flow(), _noise(4), solver="unipc", nfe=4, learn=learn)


@pytest.mark.parametrize("sigmas, error, message", [
    ("karras", TypeError, r"sigmas must be an array of σ \(a generation grid\), got str 'karras'; for a named grid "
                          r"give flowdiff.make_sigmas"),
    ([[157.0, 1.0, 0.1, 0.0]], ValueError, r"sigmas must be a strictly decreasing list .*got \[\[157\.0"),
    ([157.0, float("nan"), 0.1, 0.0], ValueError, r"sigmas must be a strictly decreasing list .*the grid the fit "
                                                  r"starts from\), got \[157\.0, nan"),
])
def test_a_starting_grid_that_is_no_grid_is_refused_naming_sigmas(sigmas, error, message):
    """``learn_solver(..., sigmas=...)``: a grid's name said "could not convert string to float: 'karras'", a 2-d
    list "only 0-dimensional arrays can be converted to Python scalars" (neither naming ``sigmas``), and a NaN σ
    that the grid "has no σ_1 > 0 below it"."""
    with pytest.raises(error, match=message):
        flowdiff.learn_solver(FIRST.flow(), _noise(4), solver="euler", nfe=4, sigmas=sigmas)


def test_stored_grid_in_a_folder_that_is_not_there_says_so(tmp_path):
    """``stored_grid(flow, "unipc", 4, directory="my_grids")`` with the folder misspelt (or a file named) returned
    ``None``, as for a folder without a grid for this flow: ``compare`` then tunes again, minutes on a real model."""
    flow = FIRST.flow()
    grid = TunedGrid(flowdiff.make_sigmas(flow.schedule, "logsnr", 4), "unipc", {}, 4, flowdiff.flow_fingerprint(flow))
    flowdiff.save_grids([grid], tmp_path / "mine.tuned.json")
    assert flowdiff.stored_grid(flow, "unipc", 4, directory=tmp_path).sigmas.tolist() == grid.sigmas.tolist()
    with pytest.raises(FileNotFoundError, match=r"directory '.*my_grids' is not a folder \(it does not exist\)"):
        flowdiff.stored_grid(flow, "unipc", 4, directory=tmp_path / "my_grids")
    with pytest.raises(NotADirectoryError, match=r"mine\.tuned\.json' is not a folder; stored_grid looks there"):
        flowdiff.stored_grid(flow, "unipc", 4, directory=tmp_path / "mine.tuned.json")
