"""A fit whose result records the flow's fingerprint refuses a flow that cannot be fingerprinted before any
evaluation (it used to fail after the whole fit, hundreds of evaluations in); ``tune_grid``, whose result is the grid
alone, tunes such a flow."""

import numpy as np
import pytest
import torch

import flowdiff as fd
from flowdiff.models.analytic import Gaussian

GAUSS = Gaussian(torch.zeros(1, 2, 2), torch.linspace(0.1, 1.0, 4))


def _plain_flow():
    """A flow of a plain function (no tensors to digest), counting its evaluations."""
    base = GAUSS.flow()
    calls = []

    def field(xbar, sigma, **kw):
        calls.append(sigma)
        return base.sigma_field(xbar, sigma, **kw)

    return fd.ProbabilityFlow.from_sigma_field(field, base.schedule), calls


def _noise(n=8):
    return torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


FITS = {
    "learn_solver": lambda flow: fd.learn_solver(flow, _noise(), solver="heun", nfe=6, iterations=2),
    "tune_roundtrip": lambda flow: fd.tune_roundtrip(flow, GAUSS.sample(8, generator=torch.Generator().manual_seed(2))
                                                     .to(torch.float64), solver="euler", nfe=4, max_evals=5),
    "tune": lambda flow: fd.tune(flow, _noise(), solver="heun", nfe=6, progress=False),
    "learn_encoder": lambda flow: fd.learn_encoder(flow, GAUSS.sample(8, generator=torch.Generator().manual_seed(2))
                                                   .to(torch.float64), solver="heun", nfe=6, iterations=2),
}


@pytest.mark.parametrize("name", sorted(FITS))
def test_unfingerprintable_flow_refused_before_any_evaluation(name):
    flow, calls = _plain_flow()
    with pytest.raises(TypeError, match=rf"{name} records the fingerprint .*cannot fingerprint a model of type"):
        FITS[name](flow)
    assert calls == []


def test_tune_grid_tunes_a_flow_without_fingerprint_as_tune_does_with_one():
    flow, calls = _plain_flow()
    grid = fd.tune_grid(flow, _noise(), solver="heun", nfe=6, progress=False, max_evals=30)
    assert calls  # it ran
    tuned = fd.tune(GAUSS.flow(), _noise(), solver="heun", nfe=6, progress=False, max_evals=30)
    np.testing.assert_array_equal(grid, tuned.sigmas)
    assert tuned.fingerprint == fd.flow_fingerprint(GAUSS.flow())
