"""flowdiff.tools.testing's round-trip checks decode under the encode's conditioning."""

import pytest
import torch

import flowdiff
from flowdiff.tools import testing as ft


def _conditional_flow() -> flowdiff.ProbabilityFlow:
    """A smooth ε-model whose output depends on the class label: conditioning changes the ODE."""

    def model(x_t, t, class_labels=None):
        eps = torch.tanh(x_t) * (0.5 + t.reshape(-1, 1) / 1000)
        return eps if class_labels is None else eps + 0.1 * class_labels.to(eps.dtype).reshape(-1, 1)

    return flowdiff.ProbabilityFlow(model, flowdiff.Schedule.linear())


def test_round_trip_error_decodes_with_the_encode_model_kwargs():
    flow = _conditional_flow()
    images = torch.linspace(-0.5, 0.5, 8, dtype=torch.float64).reshape(2, 4)
    kwargs = {"class_labels": torch.tensor([3, 7])}
    rt = ft.assert_round_trip(flow, images, atol=1e-10, solver="reversible_heun", steps=8,
                              model_kwargs=kwargs)
    # the same latent decoded without the labels is refused (its fingerprint records them) and, forced, does not
    # come back: the conditioning mattered
    with pytest.raises(ValueError, match="fingerprint"):
        flowdiff.decode(flow, rt.encoded.latent)
    plain = flowdiff.decode(flow, rt.encoded.latent, checks=flowdiff.Checks(model=False))
    assert (plain.x - images).abs().max() > 1e-3
