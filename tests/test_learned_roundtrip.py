"""flowdiff.learn_encoder: encode (and decode) shifts and the grid fitted so that the decode undoes the encode."""

from __future__ import annotations

import dataclasses
import functools
import json
import threading
import warnings

import numpy as np
import pytest
import torch

import flowdiff
import solvers
from flowdiff.models.analytic import Mixture
from flowdiff.tools.learned import shift_intervals


@functools.cache
def _mixture() -> Mixture:
    """A closed-form kernel density whose ε turns sharply between its centres (the round trip is hard)."""
    centres = torch.rand(12, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    return Mixture(centres, 0.3)


def _images(n: int, seed: int) -> torch.Tensor:
    """Images that are not the centres: another draw of the same kind of points."""
    return (torch.rand(n, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1) * 0.9


@functools.cache
def _learned(fit_decode: bool = True) -> flowdiff.LearnedEncoder:
    flow = _mixture().flow()
    return flowdiff.learn_encoder(flow, _images(48, 1), solver="euler", nfe=6, fit_decode=fit_decode,
                                  sigmas=flowdiff.make_sigmas(flow.schedule, "logsnr", 6), iterations=15)


class _Recorder:
    """The mixture's field behind a wrapper that records the σ of every evaluation (its centres are what the
    flow's fingerprint reads); ``dry``: ε = 0 (a fixed grid's evaluation σ do not depend on the field)."""

    def __init__(self, dry: bool = False) -> None:
        self.dry = dry
        self.centers = _mixture().centers
        self.field = _mixture().flow().field(None, None)
        self.seen: list[float] = []

    def eps(self, xbar: torch.Tensor, sigma: float) -> torch.Tensor:
        self.seen.append(float(sigma))
        return torch.zeros_like(xbar) if self.dry else self.field(sigma, xbar)


def _recording(flow: flowdiff.ProbabilityFlow, dry: bool = False) -> tuple[flowdiff.ProbabilityFlow, list[float]]:
    """The mixture's flow counted: the flow and the list of σ it is evaluated at."""
    recorder = _Recorder(dry)
    return flowdiff.ProbabilityFlow.from_sigma_field(recorder.eps, flow.schedule), recorder.seen


def _rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt())


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean())


@pytest.mark.parametrize("fit_decode", [False, True])
def test_learned_encode_beats_the_plain_encode_on_other_images_with_n_plus_n_evaluations(fit_decode):
    flow, learned = _mixture().flow(), _learned(fit_decode)
    assert learned.kept and learned.validation_error < learned.base_validation_error
    assert learned.latent_error <= learned.base_latent_error
    assert any(learned.decode_shifts) == fit_decode
    other = _images(32, 2)  # neither fitted nor used to decide
    start = flowdiff.make_sigmas(flow.schedule, "logsnr", 6)
    penc = flowdiff.encode(flow, other, solver="euler", grid=start)
    pdec = flowdiff.decode(flow, penc.latent)
    enc = learned.encode(flow, other)
    dec = flowdiff.decode(flow, enc.latent)
    assert _mse(dec.x, other) < 0.5 * _mse(pdec.x, other)
    assert enc.stats.nfe == dec.stats.nfe == penc.stats.nfe == pdec.stats.nfe == 6
    # the fit's cost: the reference encode and every candidate round trip (6 + 6 each)
    assert learned.fitting_nfe == learned.reference_nfe + 12 * learned.solves and learned.solves > 10


def test_decode_shifts_win_over_the_encode_alone():
    flow, other = _mixture().flow(), _images(32, 2)
    both, alone = _learned(True), _learned(False)
    assert _mse(flowdiff.decode(flow, both.encode(flow, other).latent).x, other) < \
        _mse(flowdiff.decode(flow, alone.encode(flow, other).latent).x, other)


def test_its_latent_records_the_base_solver_and_its_decode_shifts():
    flow = _mixture().flow()
    x = _images(4, 3)
    for learned in (_learned(False), _learned(True)):
        enc = learned.encode(flow, x)
        assert enc.latent.solver == "euler" and enc.latent.solver_options == {} and not enc.latent.exact
        assert np.array_equal(enc.latent.sigmas, learned.sigmas[::-1])
        dec = flowdiff.decode(flow, enc.latent)
        if any(learned.decode_shifts):
            assert enc.latent.decode_shifts == learned.decode_shifts
            # the decode is Euler with its steps evaluated at the recorded shifts, nothing else
            ts = [float(s) for s in learned.sigmas]
            table = {(a, b): d for a, b, d in zip(ts[:-1], ts[1:], learned.decode_shifts)}
            same = flowdiff.generate(flow, enc.latent.x, solver=solvers.Shifted(solvers.get("euler"), table),
                                     grid=learned.sigmas)
        else:
            assert enc.latent.decode_shifts is None  # the plain decode
            same = flowdiff.generate(flow, enc.latent.x, solver="euler", grid=learned.sigmas)
        assert torch.equal(dec.x, same.x) and dec.stats.nfe == 6


def test_latent_with_decode_shifts_saves_loads_and_refuses_bad_shifts(tmp_path):
    flow, learned = _mixture().flow(), _learned(True)
    x = _images(3, 7)
    enc = learned.encode(flow, x)
    enc.latent.save(tmp_path / "z.safetensors")
    back = flowdiff.Latent.load(tmp_path / "z.safetensors")
    assert back.decode_shifts == enc.latent.decode_shifts
    assert torch.equal(flowdiff.decode(flow, back).x, flowdiff.decode(flow, enc.latent).x)
    with pytest.raises(ValueError, match="decode_shifts must be 6 finite numbers"):
        dataclasses.replace(enc.latent, decode_shifts=(0.1,) * 5)
    with pytest.raises(ValueError, match="decode_shifts must be 6 finite numbers"):
        dataclasses.replace(enc.latent, decode_shifts=(float("nan"),) * 6)


def test_zero_shifts_are_the_plain_encode_and_decode_bit_for_bit():
    flow, learned = _mixture().flow(), _learned(True)
    zero = dataclasses.replace(learned, shifts=(0.0,) * 6, decode_shifts=(0.0,) * 6)
    x = _images(4, 4)
    a = zero.encode(flow, x)
    b = flowdiff.encode(flow, x, solver="euler", grid=zero.sigmas)
    assert isinstance(zero._encode_solver(), solvers.Shifted) and a.latent.decode_shifts is None
    assert torch.equal(a.latent.x, b.latent.x) and a.stats.nfe == b.stats.nfe
    assert torch.equal(flowdiff.decode(flow, a.latent).x, flowdiff.decode(flow, b.latent).x)


def test_kept_only_when_the_held_out_half_prefers_it():
    flow = _mixture().flow()
    start = flowdiff.make_sigmas(flow.schedule, "logsnr", 6)
    # no iterations: the "fit" is its start, which does not beat itself, so the plain encode is returned
    same = flowdiff.learn_encoder(flow, _images(8, 1), nfe=6, sigmas=start, iterations=0)
    assert not same.kept and same.shifts == (0.0,) * 6 and np.array_equal(same.sigmas, start)
    assert same.validation_error == same.base_validation_error
    assert not isinstance(same._encode_solver(), solvers.Shifted) and same.decode_shifts == (0.0,) * 6
    x = _images(3, 5)
    assert torch.equal(same.encode(flow, x).latent.x, flowdiff.encode(flow, x, solver="euler", grid=start).latent.x)


def test_save_load_bit_for_bit_and_another_flow_refused(tmp_path):
    flow, learned = _mixture().flow(), _learned()
    path = learned.save(tmp_path / "enc.json")
    back = flowdiff.LearnedEncoder.load(path, flow)
    assert np.array_equal(back.sigmas, learned.sigmas) and back.shifts == learned.shifts
    assert back.decode_shifts == learned.decode_shifts
    assert dataclasses.replace(back, source="") == dataclasses.replace(learned, sigmas=back.sigmas)
    x = _images(3, 5)
    a, b = learned.encode(flow, x).latent, back.encode(flow, x).latent
    assert torch.equal(a.x, b.x) and a.decode_shifts == b.decode_shifts
    other = Mixture(_mixture().centers[:6], 0.3).flow()
    with pytest.raises(ValueError, match="fingerprint"):
        flowdiff.LearnedEncoder.load(path, other)
    with pytest.raises(ValueError, match="fingerprint"):
        learned.encode(other, x)
    bad = tmp_path / "bad.json"
    bad.write_text(path.read_text().replace('"shifts": [', '"shifts": ["0x1p+0", '))
    with pytest.raises(ValueError, match="bad.json: malformed learned encoder"):
        flowdiff.LearnedEncoder.load(bad, flow)


def test_multistep_base_keeps_its_options_budget_and_unshiftable_steps_at_zero():
    flow = _mixture().flow()
    sigmas = flowdiff.make_sigmas(flow.schedule, "logsnr", 6)
    learned = flowdiff.learn_encoder(flow, _images(8, 1), solver="dpmpp_2m", nfe=6, sigmas=sigmas,
                                     solver_options={"lower_order_final": False}, fit_grid=False, iterations=3)
    # the data variables' steps out of and into σ = 0 have methods of their own: no shift there
    assert learned.shifts[0] == 0.0 and learned.decode_shifts[-1] == 0.0
    shifted = dataclasses.replace(learned, kept=True, shifts=(0.0,) + (0.2,) * 5,
                                  decode_shifts=(0.1,) * 5 + (0.0,))
    x = _images(3, 6)
    enc = shifted.encode(flow, x)
    dec = flowdiff.decode(flow, enc.latent)
    assert enc.latent.solver == "dpmpp_2m" and enc.latent.solver_options == {"lower_order_final": False}
    assert enc.stats.nfe == dec.stats.nfe == 6
    assert not torch.equal(dec.x, flowdiff.decode(flow, dataclasses.replace(enc.latent, decode_shifts=None)).x)
    plain = flowdiff.encode(flow, x, solver=solvers.get("dpmpp_2m", lower_order_final=False), grid=sigmas)
    assert not torch.equal(enc.latent.x, plain.latent.x)  # the shifts reach the solve


def test_bad_arguments_are_named():
    flow = _mixture().flow()
    x = _images(4, 1)
    sig = flowdiff.make_sigmas(flow.schedule, "logsnr", 4)
    cases = [
        (dict(nfe=0), ValueError, "nfe must be an int >= 1"),
        (dict(nfe=4, solver="ipndm"), ValueError, "solver 'ipndm' cannot encode"),
        (dict(nfe=4, solver="reversible_heun"), ValueError, "reversible"),
        (dict(nfe=4, solver=solvers.get("euler")), TypeError, "solver must be a registered solver name"),
        (dict(nfe=4, latent_weight=0.0), ValueError, "latent_weight must be a positive finite number or a tuple"),
        (dict(nfe=4, bound=-1), ValueError, "bound must be a positive finite number, got -1"),
        (dict(nfe=4, iterations=-1), ValueError, "iterations must be an int in 0..1000, got -1"),
        (dict(nfe=4, fit_grid="yes"), TypeError, "fit_grid must be True or False, got 'yes'"),
        (dict(nfe=4, fit_decode=1), TypeError, "fit_decode must be True or False, got 1"),
        (dict(nfe=4, reference_tol=0.1), ValueError, "reference_tol must be a number in"),
        (dict(nfe=4, sigmas=sig[::-1]), ValueError, "sigmas must be a generation grid"),
        (dict(nfe=2, sigmas=sig, iterations=0), ValueError, r"sigmas= has 4 steps, more than nfe=2 buys each way "
         r"with solver 'euler' \(2 steps\)"),
        (dict(nfe=5, solver="heun", sigmas=sig), ValueError, r"sigmas= has 4 steps, more than nfe=5 buys"),
    ]
    for kwargs, err, msg in cases:
        with pytest.raises(err, match=msg):
            flowdiff.learn_encoder(flow, x, **kwargs)
    with pytest.raises(ValueError, match="at least 2 samples"):
        flowdiff.learn_encoder(flow, x[:1], nfe=4)
    with pytest.raises(TypeError, match="images must be a floating-point torch.Tensor"):
        flowdiff.learn_encoder(flow, x.numpy(), nfe=4)
    with pytest.raises(TypeError, match="flow must be a flowdiff.ProbabilityFlow"):
        flowdiff.learn_encoder(_mixture(), x, nfe=4)


@pytest.mark.parametrize("fit_decode", [False, True])
def test_every_evaluation_of_the_fitted_encode_and_decode_lies_in_zero_to_sigma_max(fit_decode):
    flow, learned = _mixture().flow(), _learned(fit_decode)
    counted, seen = _recording(flow)
    mine = dataclasses.replace(learned, fingerprint=flowdiff.flow_fingerprint(counted))
    enc = mine.encode(counted, _images(4, 2))
    assert enc.stats.nfe == len(seen) == 6 and all(0.0 <= s <= flow.schedule.sigma_max for s in seen), seen
    seen.clear()
    dec = flowdiff.decode(counted, enc.latent)
    assert dec.stats.nfe == len(seen) == 6 and all(0.0 <= s <= flow.schedule.sigma_max for s in seen), seen
    # the decode's first step starts at σ_max: its shift can only move the evaluation down
    assert learned.decode_shifts[0] >= 0.0


@pytest.mark.parametrize("solver", ["euler", "heun", "dpmpp_2m"])
def test_shifts_at_the_ends_of_their_intervals_evaluate_within_and_reach_zero_to_sigma_max(solver):
    flow = _mixture().flow()
    counted, seen = _recording(flow, dry=True)  # shifts this large need not be stable on the mixture
    sigmas = flowdiff.make_sigmas(flow.schedule, "logsnr", 4)
    top = flow.schedule.sigma_max
    enc_limits, dec_limits = (shift_intervals(solvers.get(solver), sigmas, flow.schedule, 3.0, d)
                              for d in ("encode", "decode"))
    assert all(lo <= 0.0 <= hi for lo, hi in enc_limits + dec_limits)
    reached = []
    for end in (0, 1):
        encoder = flowdiff.LearnedEncoder(solver, {}, 8, sigmas, tuple(r[end] for r in enc_limits),
                                          tuple(r[end] for r in dec_limits), flowdiff.flow_fingerprint(counted), True)
        seen.clear()
        enc = encoder.encode(counted, torch.zeros(2, 16, dtype=torch.float64))  # ε = 0 keeps it at 0
        flowdiff.decode(counted, enc.latent)
        assert all(0.0 <= s <= top for s in seen), (end, seen)
        reached += seen
    # the intervals are no narrower than [0, σ_max] demands (3.0 steps would reach far outside): both ends are met
    assert min(reached) < 1e-6 * sigmas[-2] and max(reached) > top * (1 - 1e-6)


def test_a_rejected_fit_reports_the_errors_of_the_plain_encode_it_returns():
    flow = _mixture().flow()
    # fitted on the points the mixture is made of and judged on others: the fit overfits its half (the round trip
    # of the centres themselves), and the held-out half refuses it
    images = torch.empty(16, 16, dtype=torch.float64)
    images[0::2], images[1::2] = _mixture().centers[:8], _images(8, 2)
    start = flowdiff.make_sigmas(flow.schedule, "logsnr", 6)
    learned = flowdiff.learn_encoder(flow, images, nfe=6, sigmas=start, iterations=15)
    assert not learned.kept and learned.solves > 1
    assert learned.calibration_error < learned.base_calibration_error  # the candidate's fit, as LearnedSolver's
    held = images[1::2]
    enc = learned.encode(flow, held)
    reference = flowdiff.encode(flow, images, solver="dopri5",
                                adaptive=flowdiff.Adaptive(rtol=1e-7, atol=1e-7, sigma_start=float(start[0])))
    # the held-out errors are those of what learned.encode does: the plain encode on the starting grid
    assert learned.validation_error == pytest.approx(_rms(flowdiff.decode(flow, enc.latent).x, held), rel=1e-12)
    assert learned.latent_error == pytest.approx(_rms(enc.latent.x, reference.x[1::2]), rel=1e-12)
    assert learned.validation_error == learned.base_validation_error
    assert learned.latent_error == learned.base_latent_error


def test_a_grid_over_the_budget_is_refused_before_any_evaluation():
    flow = _mixture().flow()
    counted, seen = _recording(flow)
    sigmas = flowdiff.make_sigmas(flow.schedule, "logsnr", 7)
    with pytest.raises(ValueError, match=r"sigmas= has 7 steps, more than nfe=6 buys each way with solver 'euler' "
                                         r"\(6 steps\)"):
        flowdiff.learn_encoder(counted, _images(8, 1), nfe=6, sigmas=sigmas)
    with pytest.raises(ValueError, match=r"sigmas= has 7 steps, more than nfe=13 buys each way with solver 'heun'"):
        flowdiff.learn_encoder(counted, _images(8, 1), solver="heun", nfe=13, sigmas=sigmas)
    assert seen == []
    # the grid at the budget is accepted: its solves cost what nfe says
    fitted = flowdiff.learn_encoder(counted, _images(8, 1), solver="heun", nfe=14, sigmas=sigmas, iterations=0)
    assert fitted.fitting_nfe == len(seen) and fitted.solves > 0


@functools.cache
def _weighted(latent_weight) -> flowdiff.LearnedEncoder:
    flow = _mixture().flow()
    return flowdiff.learn_encoder(flow, _images(16, 1), nfe=6, sigmas=flowdiff.make_sigmas(flow.schedule, "logsnr", 6),
                                  iterations=15, latent_weight=latent_weight)


@pytest.mark.parametrize("candidates, end", [((1e-3, 1.0), 1), ((1.0, 100.0), 0)])
def test_the_held_out_half_chooses_the_latent_weight_and_can_choose_either_end(candidates, end):
    chosen = _weighted(candidates)
    alone = [_weighted(w) for w in candidates]
    trials = chosen.weight_trials
    assert [t[0] for t in trials] == list(candidates) and chosen.latent_weight == candidates[end]
    assert chosen.kept and chosen.options["latent_weight"] == list(candidates)
    # each trial is its weight's own fit judged on the held-out half, and the result is the chosen weight's fit
    flow, held = _mixture().flow(), _images(16, 1)[1::2]
    for trial, single in zip(trials, alone):
        assert single.weight_trials == (trial,) and single.latent_weight == trial[0]
        if single.kept:  # measured here: the round trip of the odd-indexed calibration images
            back = flowdiff.decode(flow, single.encode(flow, held).latent).x
            assert trial[1] == pytest.approx(_rms(back, held), rel=1e-12)
    same = alone[end]
    assert np.array_equal(chosen.sigmas, same.sigmas) and chosen.shifts == same.shifts
    assert chosen.decode_shifts == same.decode_shifts and chosen.validation_error == same.validation_error
    assert chosen.fitting_nfe == chosen.reference_nfe + 12 * chosen.solves
    other = trials[1 - end]
    if end == 1:  # the small weight's round trip is the lower, but its latent is farther than the plain encode's
        assert other[1] < trials[end][1] and other[2] > chosen.base_latent_error >= trials[end][2]
    else:  # both keep the latent no farther than the plain encode's; the lower held-out round trip wins
        assert trials[end][1] < other[1] and max(other[2], trials[end][2]) <= chosen.base_latent_error


def test_a_chosen_weight_saves_and_loads_with_its_trials(tmp_path):
    flow, learned = _mixture().flow(), _weighted((1.0, 100.0))
    back = flowdiff.LearnedEncoder.load(learned.save(tmp_path / "enc.json"), flow)
    assert back.weight_trials == learned.weight_trials and back.latent_weight == learned.latent_weight
    assert dataclasses.replace(back, source="") == dataclasses.replace(learned, sigmas=back.sigmas)
    bad = tmp_path / "bad.json"
    bad.write_text((tmp_path / "enc.json").read_text().replace('"weight_trials": [\n  [', '"weight_trials": [\n  ['
                                                                '"0x1p+0", '))
    with pytest.raises(ValueError, match="bad.json: malformed learned encoder .*a weight trial holds 3 numbers"):
        flowdiff.LearnedEncoder.load(bad, flow)


def test_bad_latent_weights_are_named():
    flow, x = _mixture().flow(), _images(4, 1)
    cases = [
        (0.0, ValueError, r"latent_weight must be a positive finite number or a tuple of them, got 0.0"),
        ((0.3, -1.0), ValueError, r"latent_weight must be a positive finite number or a tuple of them, got "
                                  r"\(0.3, -1.0\)"),
        ((0.3, True), ValueError, r"got \(0.3, True\)"),
        ((0.3, float("inf")), ValueError, r"got \(0.3, inf\)"),
        ((0.3,), ValueError, r"latent_weight as a tuple holds at least 2 distinct candidate weights \(one weight is a "
                             r"number\), got \(0.3,\)"),
        ((0.3, 0.3), ValueError, r"at least 2 distinct candidate weights .*got \(0.3, 0.3\)"),
        ([0.3, 1.0], TypeError, r"latent_weight takes candidate weights as a tuple, got a list \[0.3, 1.0\]"),
        ("1.0", ValueError, r"latent_weight must be a positive finite number or a tuple of them, got '1.0'"),
    ]
    for weight, err, msg in cases:
        with pytest.raises(err, match=msg):
            flowdiff.learn_encoder(flow, x, nfe=4, latent_weight=weight)


def test_images_out_of_range_are_warned_about_once_per_call():
    flow = _mixture().flow()
    far = _images(8, 1) * 4  # beyond [-1, 1] by more than one width
    sigmas = flowdiff.make_sigmas(flow.schedule, "logsnr", 4)
    calls = [lambda: flowdiff.tune_roundtrip(flow, far, solver="euler", nfe=4, max_evals=4),
             lambda: flowdiff.learn_encoder(flow, far, nfe=4, iterations=1),
             lambda: flowdiff.learn_encoder(flow, far, nfe=4, sigmas=sigmas, iterations=2, latent_weight=(0.3, 1.0))]
    for call in calls:
        with pytest.warns(UserWarning, match="images span .* far outside the model's data range") as caught:
            call()
        caught = [w for w in caught if "data range" in str(w.message)]  # not learn_encoder's own NOT_KEPT
        assert len(caught) == 1 and caught[0].filename == __file__, [str(w.message) for w in caught]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="images span")  # images in range: no warning
        flowdiff.learn_encoder(flow, _images(8, 1), nfe=4, sigmas=sigmas, iterations=1)


class _Pausing:
    """The mixture's field, pausing its first evaluation in the thread ``owner`` until ``go`` is set (``inside``
    says it got there): a fit held in the middle of its silenced encodes."""

    def __init__(self) -> None:
        self.centers = _mixture().centers
        self.field = _mixture().flow().field(None, None)
        self.owner: threading.Thread | None = None
        self.inside, self.go = threading.Event(), threading.Event()

    def eps(self, xbar: torch.Tensor, sigma: float) -> torch.Tensor:
        if threading.current_thread() is self.owner and not self.inside.is_set():
            self.inside.set()
            self.go.wait(60)
        return self.field(sigma, xbar)


def test_the_range_silencer_leaves_other_threads_warnings_and_filters_alone():
    """While one thread's fit encodes the parts of its (checked) images, another thread's encode of far images
    still warns, and a filter that thread adds meanwhile survives the fit's end (a process-wide warnings filter
    did neither)."""
    flow = _mixture().flow()
    pausing = _Pausing()
    paused = flowdiff.ProbabilityFlow.from_sigma_field(pausing.eps, flow.schedule)
    sigmas = flowdiff.make_sigmas(flow.schedule, "logsnr", 2)
    failed = []

    def fit() -> None:
        try:
            flowdiff.learn_encoder(paused, _images(4, 1), nfe=2, sigmas=sigmas, iterations=0)
        except Exception as err:  # noqa: BLE001  (reported by the main thread)
            failed.append(err)

    pausing.owner = threading.Thread(target=fit)
    pausing.owner.start()
    try:
        assert pausing.inside.wait(60), "the fit never reached its first evaluation"
        with warnings.catch_warnings(record=True) as caught:  # the filters as they are now, unchanged
            flowdiff.encode(flow, _images(4, 3) * 4, solver="euler", grid=sigmas)
        warnings.filterwarnings("ignore", message="a filter added while another thread fits")
    finally:
        pausing.go.set()
        pausing.owner.join(60)
    assert not failed and not pausing.owner.is_alive()
    assert [str(w.message) for w in caught if "far outside the model's data range" in str(w.message)], caught
    added = "a filter added while another thread fits"
    assert any(f[1] is not None and f[1].pattern == added for f in warnings.filters)


def test_the_range_silencer_nests_and_ends_with_its_block():
    from flowdiff.engine._checks import check_data_range, data_range_checked

    far = _images(4, 3) * 4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with data_range_checked():
            with data_range_checked():
                check_data_range(far)
            check_data_range(far)  # still inside the outer block
            warnings.warn("a user's own warning inside the block", UserWarning, stacklevel=1)
        check_data_range(far)  # after it
    assert [str(w.message)[:11] for w in caught] == ["a user's ow", "images span"]


def test_a_file_from_before_the_weight_trials_loads_with_its_one_weight(tmp_path):
    flow, learned = _mixture().flow(), _learned()
    record = json.loads(learned.save(tmp_path / "enc.json").read_text())
    del record["latent_weight"], record["weight_trials"]  # what a LearnedEncoder file held before them
    (tmp_path / "old.json").write_text(json.dumps(record))
    back = flowdiff.LearnedEncoder.load(tmp_path / "old.json", flow)
    assert back.latent_weight == learned.latent_weight == record["options"]["latent_weight"]
    assert back.weight_trials == () and learned.weight_trials[0][0] == back.latent_weight
    assert dataclasses.replace(back, source="", weight_trials=learned.weight_trials) == dataclasses.replace(
        learned, sigmas=back.sigmas)


def test_a_file_whose_weight_trials_contradict_it_is_refused_naming_the_file(tmp_path):
    flow, learned = _mixture().flow(), _weighted((1.0, 100.0))
    record = json.loads(learned.save(tmp_path / "enc.json").read_text())
    assert learned.kept and learned.latent_weight == 1.0  # the first candidate chosen: its trial is [0]

    def trial(i: int, **values: str):
        return lambda d: d["weight_trials"].__setitem__(i, [values.get(k, v) for k, v in zip("wvl", d[
            "weight_trials"][i])])

    cases = [
        ("string", lambda d: d["weight_trials"].__setitem__(0, "abc"),
         "a weight trial holds 3 numbers as float hex strings, got 'abc'"),
        ("numbers", lambda d: d["weight_trials"].__setitem__(0, [1.0, 0.1, 0.1]), "as float hex strings"),
        ("negative", trial(1, w=(-100.0).hex()), r"a positive finite weight and two errors >= 0, got \(-100.0"),
        ("nan", trial(1, v="nan"), r"two errors >= 0, got \(100.0, nan"),
        ("stranger", lambda d: d.__setitem__("latent_weight", 0.5),
         r"latent_weight 0.5 is not among the weight trials' weights \[1.0, 100.0\]"),
        ("text", lambda d: d.__setitem__("latent_weight", "1.0"),
         "latent_weight must be a positive finite number, got '1.0'"),
        ("options", lambda d: d["options"].__setitem__("latent_weight", [1.0, 10.0]),
         r"the weight trials' weights \[1.0, 100.0\] are not options\['latent_weight'\] \[1.0, 10.0\]"),
        ("figures", trial(0, v=(learned.validation_error / 2).hex()),
         r"the kept fit's held-out errors .* are not its weight trial's"),
        ("none", lambda d: d.__setitem__("weight_trials", []),
         r"latent_weight 1.0 without weight trials must be options\['latent_weight'\] \(one weight\), got \[1.0, "),
    ]
    for name, change, message in cases:
        data = json.loads(json.dumps(record))
        change(data)
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
        with pytest.raises(ValueError, match=f"{name}.json: malformed learned encoder .*{message}"):
            flowdiff.LearnedEncoder.load(tmp_path / f"{name}.json", flow)


def _overfitting_images() -> torch.Tensor:
    """The mixture's own centres in the fitted half and other points in the held-out one: a fit overfits its half
    (the round trip of the centres themselves), and the held-out half refuses it."""
    images = torch.empty(16, 16, dtype=torch.float64)
    images[0::2], images[1::2] = _mixture().centers[:8], _images(8, 2)
    return images


def test_when_every_weight_is_refused_the_plain_encode_returns_with_every_solve_counted():
    flow, weights = _mixture().flow(), (1.0, 0.1)
    start = flowdiff.make_sigmas(flow.schedule, "logsnr", 6)
    counted, seen = _recording(flow)
    learned = flowdiff.learn_encoder(counted, _overfitting_images(), nfe=6, sigmas=start, iterations=15,
                                     latent_weight=weights)
    alone = [flowdiff.learn_encoder(_recording(flow)[0], _overfitting_images(), nfe=6, sigmas=start, iterations=15,
                                    latent_weight=w) for w in weights]
    assert not learned.kept and not any(a.kept for a in alone)
    # what it encodes with, and the held-out figures, are the plain encode's on the starting grid
    assert np.array_equal(learned.sigmas, start) and not any(learned.shifts) and not any(learned.decode_shifts)
    assert (learned.validation_error, learned.latent_error) == (learned.base_validation_error,
                                                                learned.base_latent_error)
    # each weight's fit is the one it makes alone, judged on the same held-out half
    assert learned.weight_trials == tuple(a.weight_trials[0] for a in alone)
    assert all(a.base_validation_error == learned.base_validation_error for a in alone)
    # the weight reported is the refused fit nearest to being kept, whose fitted-half round trip is reported
    nearest = min(range(len(weights)), key=lambda i: (learned.weight_trials[i][1], i))
    assert learned.latent_weight == weights[nearest]
    assert learned.calibration_error == alone[nearest].calibration_error
    assert learned.base_calibration_error == alone[0].base_calibration_error
    # every weight's solves counted: the shared ones (reference, plain base, the returned pair's two) once
    assert learned.fitting_nfe == len(seen) == learned.reference_nfe + 12 * learned.solves
    assert learned.solves == sum(a.solves for a in alone) - 3 * (len(weights) - 1)


def test_the_choice_is_the_same_bit_for_bit_for_the_same_candidates_in_any_order():
    chosen = _weighted((1.0, 100.0))
    again, swapped = _weighted.__wrapped__((1.0, 100.0)), _weighted((100.0, 1.0))
    for other in (again, swapped):
        assert other.latent_weight == chosen.latent_weight and other.kept == chosen.kept
        assert np.array_equal(other.sigmas, chosen.sigmas) and other.shifts == chosen.shifts
        assert other.decode_shifts == chosen.decode_shifts and other.fitting_nfe == chosen.fitting_nfe
        figures = ("calibration_error", "validation_error", "latent_error", "base_validation_error")
        assert [getattr(other, f) for f in figures] == [getattr(chosen, f) for f in figures]
    assert again.weight_trials == chosen.weight_trials and swapped.weight_trials == chosen.weight_trials[::-1]
    # the figures are those of the encoder returned: its round trip of the fitted (even-indexed) half
    flow, fitted = _mixture().flow(), _images(16, 1)[0::2]
    back = flowdiff.decode(flow, chosen.encode(flow, fitted).latent).x
    assert chosen.kept and chosen.calibration_error == pytest.approx(_rms(back, fitted), rel=1e-12)


def test_weights_whose_fits_tie_go_to_the_earlier_candidate():
    flow = _mixture().flow()
    start = flowdiff.make_sigmas(flow.schedule, "logsnr", 6)
    for weights in ((1.0, 0.1), (0.1, 1.0)):  # no iterations: every weight's fit is its start, the same
        learned = flowdiff.learn_encoder(flow, _images(8, 1), nfe=6, sigmas=start, iterations=0,
                                         latent_weight=weights)
        assert learned.weight_trials[0][1:] == learned.weight_trials[1][1:]
        assert learned.latent_weight == weights[0] and not learned.kept


def test_a_part_far_out_of_range_is_warned_about_when_the_first_part_is_not():
    """The one check covers every image before any part is encoded: far images only in the held-out half (which
    the fit encodes after the fitted half) are still warned about, once."""
    flow = _mixture().flow()
    images = _images(8, 1)
    images[1::2] *= 4
    sigmas = flowdiff.make_sigmas(flow.schedule, "logsnr", 4)
    with pytest.warns(UserWarning, match="images span .* far outside the model's data range") as caught:
        flowdiff.learn_encoder(flow, images, nfe=4, sigmas=sigmas, iterations=1, latent_weight=(0.3, 1.0))
    assert len([w for w in caught if "data range" in str(w.message)]) == 1, [str(w.message) for w in caught]


def test_an_encoder_built_by_hand_without_a_weight_saves_and_loads(tmp_path):
    flow = _mixture().flow()
    sigmas = flowdiff.make_sigmas(flow.schedule, "logsnr", 4)
    built = flowdiff.LearnedEncoder("euler", {}, 4, sigmas, (0.1, 0.0, -0.01, 0.0), (0.0,) * 4,
                                    flowdiff.flow_fingerprint(flow), True)
    back = flowdiff.LearnedEncoder.load(built.save(tmp_path / "built.json"), flow)
    assert np.isnan(back.latent_weight) and back.weight_trials == () and back.shifts == built.shifts
    assert np.array_equal(back.sigmas, built.sigmas)
    x = _images(3, 5)
    assert torch.equal(back.encode(flow, x).latent.x, built.encode(flow, x).latent.x)
    record = json.loads((tmp_path / "built.json").read_text())
    record["latent_weight"] = 0.5  # a weight without options or trials to say where it came from
    (tmp_path / "weighed.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"weighed.json: malformed .*latent_weight 0.5 without weight trials must be "
                                         r"options\['latent_weight'\] \(one weight\), got None"):
        flowdiff.LearnedEncoder.load(tmp_path / "weighed.json", flow)


def test_benchmark_calibration_halves_hold_both_photos():
    """``bench_roundtrip.py``'s photo patches alternate their two photos; learn_encoder fits the even-indexed half and
    decides on the odd one, so the benchmark reorders them: a permutation (of any count) after which, for a count
    that is a multiple of 4 (the benchmark's 64 and 128), each half holds as many patches of one photo as of the
    other."""
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(root))
    try:
        spec = importlib.util.spec_from_file_location("bench_roundtrip", root / "bench_roundtrip.py")
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        from _kdiffusion import patch_positions
    finally:
        sys.path.remove(str(root))
    for n in (2, 7, 64, 128):
        order = bench.both_photos_in_each_half(torch.arange(n))
        assert sorted(order.tolist()) == list(range(n))
        photo = torch.tensor([p for p, _, _ in patch_positions(n, seed=2)])
        assert photo[0::2].tolist() == [0] * len(photo[0::2])  # the benchmark's halves without the reorder
        if n % 4 == 0:
            for half in (photo[order][0::2], photo[order][1::2]):
                assert int((half == 0).sum()) == int((half == 1).sum()) == n // 4, (n, half.tolist())
