"""``learn_solver(robust=τ)``: a Huber objective per sample, so that a few samples far from the rest (landing in
another mode's basin) pull the fit linearly, not quadratically; the held-out decision and every recorded error stay
the plain RMS."""

import math

import numpy as np
import pytest
import torch
from _closed_form import Counted, mixture, noise

import flowdiff
from flowdiff.tools import learned
from flowdiff.tools.learned import LearnedSolver, _Huber, _learn_both, learn_solver

KINDS = ("scales", "directions")


def _params(fit):
    return np.array([*fit.scales, *fit.directions, *fit.shifts, *np.log(fit.sigmas[fit.sigmas > 0])])


def _same(a, b):
    return (a.kept, a.shifts, a.scales, a.directions, a.calibration_error, a.validation_error, a.fitting_nfe) == (
        b.kept, b.shifts, b.scales, b.directions, b.calibration_error, b.validation_error, b.fitting_nfe
    ) and np.array_equal(a.sigmas, b.sigmas)


def test_a_threshold_no_sample_reaches_is_the_plain_fit_bit_for_bit_and_none_is_the_default():
    flow = mixture()
    cal = noise(1, n=16)
    plain = learn_solver(flow, cal, solver="unipc", nfe=5, iterations=3)
    assert plain.kept and plain.options["robust"] is None
    for robust in (None, 1e6):  # every per-sample error is far below 1e6 medians: Huber's loss is the square
        fit = learn_solver(flow, cal, solver="unipc", nfe=5, iterations=3, robust=robust)
        assert _same(fit, plain), robust
        assert fit.options == {**plain.options, "robust": robust}


def test_the_huber_residual_counts_each_sample_far_out_linearly():
    """Sample s's squared norm after the loss is e_s² up to τm and 2τm·e_s − (τm)² above (e_s its RMS error, m the
    median e_s of the base residual it was made from)."""
    g = torch.Generator().manual_seed(0)
    r0 = torch.randn(9, 5, dtype=torch.float64, generator=g).numpy()
    r0[2] *= 40.0  # one sample far out
    loss = _Huber.of(r0.reshape(-1), 9, 2.0)
    e = np.sqrt(np.mean(r0 ** 2, axis=1))
    tau = 2.0 * np.median(e)
    assert loss.threshold == pytest.approx(tau, rel=1e-15)
    out = loss(r0.reshape(-1)).reshape(9, -1)
    expected = np.where(e <= tau, e * e, 2 * tau * e - tau * tau)
    assert np.allclose(np.mean(out ** 2, axis=1), expected, rtol=1e-12)
    assert np.array_equal(out[e <= tau], r0[e <= tau])  # the samples within it untouched, bit for bit
    assert np.mean(out[2] ** 2) < 0.2 * np.mean(r0[2] ** 2)


def test_a_planted_far_sample_moves_the_plain_fit_but_not_the_robust_one(monkeypatch):
    """One fitted sample's teacher moved far away (as a sample that lands on another mode would be): the plain fit
    chases it (here so far that the held-out half rejects the fit), the robust fits stay where they were without
    it (within a tenth of the plain fit's move)."""
    flow = mixture()
    cal = noise(1, n=16)
    clean = learned._reference

    def far(*args, **kwargs):
        x, nfe = clean(*args, **kwargs)
        x = x.clone()
        x[0] += 3.0  # row 0: in the fitted (even) half
        return x, nfe

    fits = {}
    for planted in (False, True):
        if planted:
            monkeypatch.setattr(learned, "_reference", far)
        for robust in (None, 1.0, 3.0):
            fits[planted, robust] = _learn_both(flow, cal, solver="unipc", nfe=5, learn=KINDS, iterations=4,
                                                robust=robust)[0]
    assert fits[False, None].kept
    assert np.linalg.norm(_params(fits[True, None]) - _params(fits[False, None])) > 0.1
    for robust in (1.0, 3.0):
        assert fits[False, robust].kept and fits[True, robust].kept
        assert np.linalg.norm(_params(fits[True, robust]) - _params(fits[False, robust])) < 0.01, robust


def test_a_robust_fit_records_plain_rms_errors_and_its_cost_exactly(monkeypatch):
    """The calibration and held-out errors stay the RMS (the issue's measure), not the Huber objective; fitting_nfe
    is every model evaluation."""
    flow = mixture()
    cal = noise(1, n=16)
    counted = Counted(flow)
    counted_flow, calls = flowdiff.ProbabilityFlow.from_sigma_field(counted.field, flow.schedule), counted.calls
    flowdiff.reference_solution(counted_flow, cal, sigma_end=0.0, rtol=1e-7, atol=1e-7)  # the teacher, cached
    del calls[:]
    half, refit = _learn_both(counted_flow, cal, solver="unipc", nfe=5, iterations=3, robust=1.0)
    assert half.kept and refit is not None
    assert refit.fitting_nfe - refit.reference_nfe == len(calls)
    ref = flowdiff.reference_solution(flow, cal, sigma_end=0.0, rtol=1e-7, atol=1e-7).x

    def rms(fit, rows):
        x = flowdiff.generate(flow, cal[rows], solver=fit.as_solver(), grid=fit.sigmas).x
        return float((x - ref[rows]).pow(2).mean().sqrt())

    assert refit.calibration_error == pytest.approx(rms(refit, slice(None)), rel=1e-9)
    assert half.calibration_error == pytest.approx(rms(half, slice(0, None, 2)), rel=1e-9)
    assert half.validation_error == pytest.approx(rms(half, slice(1, None, 2)), rel=1e-9)


def test_robust_saves_and_loads(tmp_path):
    flow = mixture()
    cal = noise(1, n=8)
    fit = learn_solver(flow, cal, solver="unipc", nfe=5, iterations=2, robust=2.5)
    back = LearnedSolver.load(fit.save(tmp_path / "robust.learned.json"), flow)
    assert back.options["robust"] == 2.5 and back.options == fit.options
    assert _same(back, fit)


@pytest.mark.parametrize("robust", [0, 0.0, -1.0, math.inf, math.nan, True, "2"])
def test_a_bad_robust_names_the_argument_and_what_is_accepted(robust):
    with pytest.raises(ValueError, match=r"robust must be None \(plain least squares\) or a positive finite number"):
        learn_solver(mixture(), noise(1, n=4), solver="unipc", nfe=5, robust=robust)
