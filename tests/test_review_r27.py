"""Review R27 of the session's merged changes (sweeps 13 and 14, review R26, the lead's): each test failed before its
fix; its docstring says what a user saw."""

import torch

import flowdiff
from flowdiff.models.analytic import Gaussian

GAUSS = Gaussian(torch.zeros(8, dtype=torch.float64), torch.full((8,), 0.5, dtype=torch.float64))


def _images(n=2, seed=0):
    return GAUSS.sample(n, generator=torch.Generator().manual_seed(seed))


def test_encode_under_torch_func_grad_of_a_tensor_a_plain_function_closes_over():
    """``torch.func.grad`` of an encode with respect to a scale that a plain-function model closes over stopped with
    "Cannot access data pointer of Tensor that doesn't have storage": the latent's fingerprint (sweep 14 reads a plain
    function's closure) read the transform's wrapped tensor. It ran before sweep 14, and runs under plain autograd;
    the fingerprint reads the value under the transform (the primal), as it reads a network's weights there."""
    x = _images()

    def loss(scale):
        flow = flowdiff.ProbabilityFlow(lambda x_t, t: scale * GAUSS(x_t, t), GAUSS.schedule)
        return flowdiff.encode(flow, x, solver="euler", steps=3).x.sum()

    scale = torch.tensor(1.5, dtype=torch.float64)
    by_func = torch.func.grad(loss)(scale)
    leaf = scale.clone().requires_grad_()
    (by_autograd,) = torch.autograd.grad(loss(leaf), leaf)
    torch.testing.assert_close(by_func, by_autograd)
    # the latent recorded under the transform is the one recorded outside it
    seen = {}

    def record(scale):
        flow = flowdiff.ProbabilityFlow(lambda x_t, t: scale * GAUSS(x_t, t), GAUSS.schedule)
        res = flowdiff.encode(flow, x, solver="euler", steps=3)
        seen["under"] = res.latent.fingerprint
        return res.x.sum()

    torch.func.grad(record)(scale)
    outside = flowdiff.ProbabilityFlow(lambda x_t, t: scale * GAUSS(x_t, t), GAUSS.schedule)
    assert seen["under"] == flowdiff.flow_fingerprint(outside)
