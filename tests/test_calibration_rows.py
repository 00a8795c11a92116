"""Per-sample conditioning goes with its rows of the calibration batch: ``tune``, ``learn_solver``, ``tune_roundtrip``
and ``learn_encoder`` fit on the even rows and judge on the odd rows, and each half's solves get that half's rows of
a per-sample ``model_kwargs`` tensor (they got the whole batch's and stopped with a size mismatch; new-user sweep 5)."""

import pytest
import torch

import flowdiff as fd
from flowdiff.models.analytic import Gaussian
from flowdiff.tools.learned import tune_roundtrip

BATCH = 6


def _conditional():
    base = Gaussian(torch.linspace(-0.3, 0.3, 4), 0.5).flow()

    def model(x, t, scale):  # ε = scale·x_t, scale per sample or one for all
        return x * scale.to(x.dtype).reshape(-1, *[1] * (x.ndim - 1))

    return fd.ProbabilityFlow(model, base.schedule)


def _noise():
    return torch.randn(BATCH, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def _images():
    return torch.rand(BATCH, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 1.8 - 0.9


ONCE, EACH = {"scale": torch.tensor(0.3)}, {"scale": torch.full((BATCH,), 0.3)}
VARIED = {"scale": torch.linspace(0.2, 0.4, BATCH)}


@pytest.mark.parametrize("fit", [
    lambda flow, kw: fd.tune(flow, _noise(), solver="unipc", nfe=4, max_evals=4, model_kwargs=kw).sigmas,
    lambda flow, kw: fd.learn_solver(flow, _noise(), solver="unipc", nfe=4, learn="shifts", iterations=1,
                                     model_kwargs=kw).shifts,
    lambda flow, kw: tune_roundtrip(flow, _images(), solver="euler", nfe=4, max_evals=3, model_kwargs=kw).sigmas,
    lambda flow, kw: fd.learn_encoder(flow, _images(), nfe=4, iterations=1, model_kwargs=kw).shifts,
], ids=["tune", "learn_solver", "tune_roundtrip", "learn_encoder"])
def test_one_conditioning_said_per_sample_or_once_gives_the_same_fit(fit):
    flow = _conditional()
    once, each = fit(flow, ONCE), fit(flow, EACH)
    assert list(map(float, once)) == list(map(float, each))
    fit(flow, VARIED)  # conditioning that differs per sample runs too (each half with its own rows)


def test_learn_solvers_held_out_half_is_judged_with_its_own_rows():
    """The base method's held-out error is the odd rows' solve with the odd rows' scales, against their reference."""
    flow, noise = _conditional(), _noise()
    learned = fd.learn_solver(flow, noise, solver="unipc", nfe=4, learn="shifts", iterations=1, model_kwargs=VARIED)
    odd = {"scale": VARIED["scale"][1::2]}
    ref = fd.reference_solution(flow, noise, rtol=1e-7, atol=1e-7, model_kwargs=VARIED).x[1::2]
    base = fd.generate(flow, noise[1::2], solver="unipc", grid=learned.base_grid(), model_kwargs=odd).x
    assert learned.base_validation_error == float((base - ref).pow(2).mean().sqrt())


def test_the_halves_check_is_counted_in_the_cost():
    """With per-sample conditioning the tools check each half's rows against the whole batch (R15: a table of as many
    rows as the batch would be cut); those model evaluations count in fitting_nfe / tuning_nfe like every other."""
    from flowdiff.tools.reference import clear_reference_cache

    calls = []

    def model(x, t, scale):
        calls.append(x.shape[0])
        return x * scale.to(x.dtype).reshape(-1, *[1] * (x.ndim - 1))

    flow = fd.ProbabilityFlow(model, _conditional().schedule)
    clear_reference_cache()
    learned = fd.learn_solver(flow, _noise(), solver="unipc", nfe=4, learn="shifts", iterations=1, model_kwargs=VARIED)
    assert learned.fitting_nfe == len(calls)
    clear_reference_cache()
    del calls[:]
    tuned = fd.tune(flow, _noise(), solver="unipc", nfe=4, max_evals=4, model_kwargs=VARIED)
    assert tuned.tuning_nfe == len(calls)
