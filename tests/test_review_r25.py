"""Review R25 of the merges of G7, R24 and S11: each test failed before its fix."""

from __future__ import annotations

import torch

import flowdiff
from flowdiff.models.analytic import Gaussian


def _gaussian_stochastic(noise: torch.Tensor) -> torch.Tensor:
    """A Stochastic solve of Gaussian data, whose exact ε is linear in x̄: its Jacobian in the noise does not
    depend on the step noise drawn. (The checks read the states on the host, which a mapped state refuses.)"""
    model = Gaussian(torch.tensor([0.5, -1.0], dtype=torch.float64), torch.tensor([0.3, 2.0], dtype=torch.float64))
    return flowdiff.generate(model.flow(), noise, steps=4, grid="trailing",
                             solver=flowdiff.Stochastic(eta=1.0), checks=flowdiff.Checks(finite=False, growth=None)).x


def test_stochastic_under_jacfwd_with_randomness_different_runs():
    """The refusal under jacfwd's default randomness='error' advises randomness='same' or 'different'; 'different'
    stopped inside torch (the step added the mapped noise in place into the unmapped state: "output with shape
    [1, 2] doesn't match the broadcast shape [2, 1, 2]"). On a linear ε both give the same Jacobian."""
    noise = torch.randn(1, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    same = torch.func.jacfwd(_gaussian_stochastic, randomness="same")(noise)
    different = torch.func.jacfwd(_gaussian_stochastic, randomness="different")(noise)
    torch.testing.assert_close(different, same, rtol=1e-12, atol=1e-12)
