"""flowdiff.learn_encoder: encode shifts (and grid) fitted so that the plain decode undoes the encode."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch

import flowdiff
import solvers
from flowdiff.models.analytic import Mixture


@functools.cache
def _mixture() -> Mixture:
    """A closed-form kernel density whose ε turns sharply between its centres (the round trip is hard)."""
    centres = torch.rand(12, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    return Mixture(centres, 0.3)


def _images(n: int, seed: int) -> torch.Tensor:
    """Images that are not the centres: another draw of the same kind of points."""
    return (torch.rand(n, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1) * 0.9


@functools.cache
def _learned(solver: str = "euler", nfe: int = 6) -> flowdiff.LearnedEncoder:
    flow = _mixture().flow()
    return flowdiff.learn_encoder(flow, _images(48, 1), solver=solver, nfe=nfe,
                                  sigmas=flowdiff.make_sigmas(flow.schedule, "logsnr", nfe), iterations=15)


def _roundtrip(flow, images, solver, sigmas) -> tuple[float, flowdiff.Result, flowdiff.Result]:
    enc = flowdiff.encode(flow, images, solver=solver, grid=sigmas)
    dec = flowdiff.decode(flow, enc.latent)
    return float((dec.x - images).pow(2).mean()), enc, dec


def test_learned_encode_beats_the_plain_encode_on_other_images_with_n_plus_n_evaluations():
    flow, learned = _mixture().flow(), _learned()
    assert learned.kept and learned.validation_error < learned.base_validation_error
    assert learned.latent_error <= learned.base_latent_error
    other = _images(32, 2)  # neither fitted nor used to decide
    start = flowdiff.make_sigmas(flow.schedule, "logsnr", 6)
    plain, penc, pdec = _roundtrip(flow, other, "euler", start)
    mse, enc, dec = _roundtrip(flow, other, learned.as_solver(), learned.sigmas)
    assert mse < 0.5 * plain, (mse, plain)
    assert enc.stats.nfe == dec.stats.nfe == penc.stats.nfe == pdec.stats.nfe == 6
    # the fit's cost: the reference encode and every candidate round trip (6 + 6 each)
    assert learned.fitting_nfe == learned.reference_nfe + 12 * learned.solves and learned.solves > 10


def test_its_latent_records_the_base_solver_and_decodes_with_plain_decode():
    flow, learned = _mixture().flow(), _learned()
    x = _images(4, 3)
    enc = flowdiff.encode(flow, x, solver=learned.as_solver(), grid=learned.sigmas)
    assert isinstance(learned.as_solver(), solvers.Shifted)
    assert enc.latent.solver == "euler" and enc.latent.solver_options == {} and not enc.latent.exact
    assert np.array_equal(enc.latent.sigmas, learned.sigmas[::-1])
    dec = flowdiff.decode(flow, enc.latent)
    plain = flowdiff.generate(flow, enc.latent.x, solver="euler", grid=learned.sigmas)
    assert torch.equal(dec.x, plain.x)


def test_zero_shifts_are_the_plain_encode_bit_for_bit():
    flow, learned = _mixture().flow(), _learned()
    zero = dataclasses.replace(learned, shifts=(0.0,) * len(learned.shifts))
    x = _images(4, 4)
    a = flowdiff.encode(flow, x, solver=zero.as_solver(), grid=zero.sigmas)
    b = flowdiff.encode(flow, x, solver="euler", grid=zero.sigmas)
    assert isinstance(zero.as_solver(), solvers.Shifted)
    assert torch.equal(a.latent.x, b.latent.x) and a.stats.nfe == b.stats.nfe


def test_kept_only_when_the_held_out_half_prefers_it():
    flow = _mixture().flow()
    start = flowdiff.make_sigmas(flow.schedule, "logsnr", 6)
    # no iterations: the "fit" is its start, which does not beat itself, so the plain encode is returned
    same = flowdiff.learn_encoder(flow, _images(8, 1), nfe=6, sigmas=start, iterations=0)
    assert not same.kept and same.shifts == (0.0,) * 6 and np.array_equal(same.sigmas, start)
    assert same.validation_error == same.base_validation_error
    assert same.as_solver().name == "euler" and not isinstance(same.as_solver(), solvers.Shifted)


def test_save_load_bit_for_bit_and_another_flow_refused(tmp_path):
    flow, learned = _mixture().flow(), _learned()
    path = learned.save(tmp_path / "enc.json")
    back = flowdiff.LearnedEncoder.load(path, flow)
    assert np.array_equal(back.sigmas, learned.sigmas) and back.shifts == learned.shifts
    assert dataclasses.replace(back, source="") == dataclasses.replace(learned, sigmas=back.sigmas)
    x = _images(3, 5)
    a = flowdiff.encode(flow, x, solver=learned.as_solver(), grid=learned.sigmas).latent.x
    b = flowdiff.encode(flow, x, solver=back.as_solver(), grid=back.sigmas).latent.x
    assert torch.equal(a, b)
    other = Mixture(_mixture().centers[:6], 0.3).flow()
    with pytest.raises(ValueError, match="fingerprint"):
        flowdiff.LearnedEncoder.load(path, other)
    bad = tmp_path / "bad.json"
    bad.write_text(path.read_text().replace('"shifts": [', '"shifts": ["0x1p+0", '))
    with pytest.raises(ValueError, match="bad.json: malformed learned encoder"):
        flowdiff.LearnedEncoder.load(bad, flow)


def test_multistep_base_keeps_its_options_budget_and_unshiftable_first_step():
    flow = _mixture().flow()
    sigmas = flowdiff.make_sigmas(flow.schedule, "logsnr", 6)
    learned = flowdiff.learn_encoder(flow, _images(8, 1), solver="dpmpp_2m", nfe=6, sigmas=sigmas,
                                     solver_options={"lower_order_final": False}, fit_grid=False, iterations=3)
    assert learned.shifts[0] == 0.0  # the data variables' step out of σ = 0 has its own method
    shifted = dataclasses.replace(learned, kept=True, shifts=(0.0,) + (0.2,) * 5)
    x = _images(3, 6)
    mse, enc, dec = _roundtrip(flow, x, shifted.as_solver(), sigmas)
    assert enc.latent.solver == "dpmpp_2m" and enc.latent.solver_options == {"lower_order_final": False}
    assert enc.stats.nfe == dec.stats.nfe == 6
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
        (dict(nfe=4, latent_weight=0.0), ValueError, "latent_weight must be a positive finite number, got 0.0"),
        (dict(nfe=4, bound=-1), ValueError, "bound must be a positive finite number, got -1"),
        (dict(nfe=4, iterations=-1), ValueError, "iterations must be an int in 0..1000, got -1"),
        (dict(nfe=4, fit_grid="yes"), TypeError, "fit_grid must be True or False, got 'yes'"),
        (dict(nfe=4, reference_tol=0.1), ValueError, "reference_tol must be a number in"),
        (dict(nfe=4, sigmas=sig[::-1]), ValueError, "sigmas must be a generation grid"),
        (dict(nfe=2, sigmas=sig, iterations=0), ValueError, "over nfe=2 each way"),
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
