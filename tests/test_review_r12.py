"""Review R12 of two merged branches: flow-matching Heun (C2) and gradients through saved states (E2).

Each test failed on the main it was written against and names what went wrong.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from test_adjoint import Net, _flow

import flowdiff

NOISE = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("solver, adjoint", [("euler", "checkpoint"), ("heun", "checkpoint"),
                                             ("dpmpp_2m", "checkpoint"), ("reversible_heun", "reversible")])
@pytest.mark.parametrize("denoised", [False, True])
@pytest.mark.parametrize("backward", [False, True])
def test_saved_states_of_a_differentiated_solve_are_freed(solver, adjoint, denoised, backward):
    """The saved states are outputs of the solve's autograd node, and the node held the caller's Saver (through
    save_at and the tapped field) and the forward's solution (the end's state): a reference loop through autograd's
    graph that gc never collects. Every generate with Save under checkpoint/reversible leaked its states."""
    x = NOISE.clone().requires_grad_()
    res = flowdiff.generate(_flow(Net()), x, solver=solver, steps=5, adjoint=adjoint,  # no x̂₀ in reversible solves
                            save=flowdiff.Save(steps=True, denoised=denoised and adjoint != "reversible"))
    held = [res.x, *(s.x for s in res.saved), *(s.denoised for s in res.saved if s.denoised is not None)]
    refs = [weakref.ref(t) for t in held]
    if backward:
        (res.x.sum() + sum(s.x.pow(2).sum() for s in res.saved)).backward()
    del res, held
    gc.collect()
    assert [r() is None for r in refs] == [True] * len(refs)


@pytest.mark.parametrize("solver, adjoint", [("dpmpp_2m", "checkpoint"), ("reversible_heun", "reversible")])
def test_an_encode_and_its_decode_with_saved_states_are_freed(solver, adjoint):
    """The same loop through the encode's node (its latent's carried state among the node's outputs) and the
    decode's."""
    images = NOISE.clamp(-1, 1).requires_grad_()
    save = flowdiff.Save(steps=True, denoised=adjoint != "reversible")  # a reversible solver has no x̂₀ to save
    enc = flowdiff.encode(_flow(Net()), images, solver=solver, steps=5, adjoint=adjoint, save=save)
    dec = flowdiff.decode(_flow(Net()), enc.latent, adjoint=adjoint, save=save)
    refs = [weakref.ref(t) for t in (enc.x, dec.x, *(s.x for s in enc.saved + dec.saved))]
    (dec.x.sum() + sum(s.xbar.sum() for s in enc.saved)).backward()
    del enc, dec
    gc.collect()
    assert [r() is None for r in refs] == [True] * len(refs)


@pytest.mark.parametrize("loss_on", ["end", "saved"])
@pytest.mark.parametrize("adjoint", ["checkpoint", "reversible"])
def test_a_second_derivative_through_the_node_is_refused(adjoint, loss_on):
    """once_differentiable's error node hangs off detached copies of the incoming gradients: a second derivative
    by torch.autograd.grad(g, x) said 'appears to not have been used in the graph', and with allow_unused=True
    returned None (zero) where autograd's is not."""
    solver = "reversible_heun" if adjoint == "reversible" else "euler"
    x = NOISE.clone().requires_grad_()
    res = flowdiff.generate(_flow(Net()), x, solver=solver, steps=5, adjoint=adjoint, save=flowdiff.Save(steps=True))
    loss = res.x.pow(2).sum() if loss_on == "end" else sum(s.x.pow(2).sum() for s in res.saved)
    with pytest.raises(ValueError, match=f"adjoint='{adjoint}'.*create_graph=True.*adjoint='autograd'"):
        g, = torch.autograd.grad(loss, x, create_graph=True)
        torch.autograd.grad(g.sum(), x, allow_unused=True)
    # without create_graph the same backward pass runs, and autograd's second derivative is not zero
    ref = flowdiff.generate(_flow(Net()), x, solver=solver, steps=5, save=flowdiff.Save(steps=True))
    loss = ref.x.pow(2).sum() if loss_on == "end" else sum(s.x.pow(2).sum() for s in ref.saved)
    g, = torch.autograd.grad(loss, x, create_graph=True)
    assert torch.autograd.grad(g.sum(), x)[0].abs().max() > 0


@pytest.mark.parametrize("adjoint", ["checkpoint", "reversible"])
@pytest.mark.parametrize("loss_on", ["end", "first saved", "first denoised"])
def test_a_tensor_the_solve_cannot_see_is_refused_whatever_the_loss_is_on(adjoint, loss_on):
    """The check for tensors requiring grad that the node cannot see ran on the last step only, whose adjoint is
    empty when the loss is on earlier saved states: the model's weights (held by a closure) got no gradient, silently
    (autograd gives them one)."""
    net = Net()
    weight = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    flow = flowdiff.ProbabilityFlow(lambda x, t: net(x, t) * weight, flowdiff.Schedule.linear())
    solver = "reversible_heun" if adjoint == "reversible" else "heun"

    def loss(res: flowdiff.Result) -> torch.Tensor:
        first = res.saved[0]
        return {"end": res.x.pow(2).sum(), "first saved": first.x.pow(2).sum(),
                "first denoised": (first.denoised if first.denoised is not None else first.x).pow(2).sum()}[loss_on]

    save = flowdiff.Save(steps=True, denoised=adjoint != "reversible")  # a reversible solver has no x̂₀ to save
    res = flowdiff.generate(flow, NOISE, solver=solver, steps=5, save=save)
    assert torch.autograd.grad(loss(res), weight)[0] != 0  # autograd's
    res = flowdiff.generate(flow, NOISE.clone().requires_grad_(), solver=solver, steps=5, adjoint=adjoint, save=save)
    with pytest.raises(ValueError, match="tensor.* requiring grad that the solve cannot see"):
        loss(res).backward()


class _Dropout(Net):
    """Net with dropout, left in training mode: every evaluation draws a new mask from torch's generator."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = torch.nn.Dropout(0.3)

    def forward(self, x, t, c=None):
        return self.drop(super().forward(x, t, c))


def _dropout_gradients(net: _Dropout, direction: str, solver: str, adjoint: str, save):
    torch.manual_seed(5)
    x = NOISE.clamp(-1, 1) if direction == "encode" else NOISE
    x = x.clone().requires_grad_()
    fn = flowdiff.generate if direction == "generate" else flowdiff.encode
    res = fn(_flow(net), x, solver=solver, steps=5, adjoint=adjoint, save=save)
    loss = res.x.pow(2).sum() + sum(s.x.sin().sum() for s in res.saved or ())
    grads = torch.autograd.grad(loss, [x, *net.parameters()])
    return grads, torch.rand(3)  # what the caller's generator gives next


@pytest.mark.parametrize("direction", ["generate", "encode"])
@pytest.mark.parametrize("solver", ["euler", "heun", "dpmpp_2m", "reversible_heun"])
@pytest.mark.parametrize("save", [None, flowdiff.Save(steps=True)])
def test_checkpoint_redraws_a_dropout_models_masks(solver, direction, save):
    """The recomputation drew new dropout masks: a gradient about 50% off autograd's, without a word. Each step now
    runs on the generator state its forward step started from, and the caller's generator is left as autograd
    leaves it."""
    net = _Dropout()
    ref, ref_next = _dropout_gradients(net, direction, solver, "autograd", save)
    got, got_next = _dropout_gradients(net, direction, solver, "checkpoint", save)
    assert all(float((g - r).abs().max()) <= 1e-12 * float(r.abs().max()) for g, r in zip(got, ref))
    assert torch.equal(got_next, ref_next)


def test_reversible_refuses_a_model_that_draws_random_numbers():
    with pytest.raises(ValueError, match="adjoint='reversible': the model drew random numbers.*eval mode"):
        _dropout_gradients(_Dropout(), "generate", "reversible_heun", "reversible", None)
    net = _Dropout().eval()  # in eval mode nothing is drawn: the inverse steps rebuild the states
    got, _ = _dropout_gradients(net, "generate", "reversible_heun", "reversible", None)
    ref, _ = _dropout_gradients(net, "generate", "reversible_heun", "autograd", None)
    assert all(float((g - r).abs().max()) <= 1e-10 * float(r.abs().max()) for g, r in zip(got, ref))


def test_a_callback_that_draws_random_numbers_is_not_the_models_draw():
    """Only the steps' own evaluations count: a callback drawing from the generator leaves 'reversible' usable."""
    net = Net()
    x = NOISE.clone().requires_grad_()
    with pytest.warns(UserWarning, match="callback= carry no gradient"):
        res = flowdiff.generate(_flow(net), x, solver="reversible_heun", steps=5, adjoint="reversible",
                                callback=lambda state: torch.rand(1))
    got = torch.autograd.grad(res.x.pow(2).sum(), x)[0]
    ref = torch.autograd.grad(flowdiff.generate(_flow(net), x, solver="reversible_heun", steps=5).x.pow(2).sum(), x)[0]
    assert float((got - ref).abs().max()) <= 1e-10 * float(ref.abs().max())


class _HiddenAtHighNoise(torch.nn.Module):
    """Net, times a weight the solve cannot see (a global, not an attribute) at high noise only."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.net, self._weight = Net(), [weight]

    def forward(self, x, t):
        out = self.net(x, t)
        return out * self._weight[0] if float(t.flatten()[0]) > 500 else out


@pytest.mark.parametrize("solver, adjoint", [("euler", "checkpoint"), ("reversible_heun", "reversible")])
def test_a_tensor_the_solve_cannot_see_at_some_steps_only_is_refused(solver, adjoint):
    """The check ran on one step (the last a loss reaches); a tensor the model uses at other σ only lost its gradient
    silently (autograd's is not zero)."""
    weight = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    flow = flowdiff.ProbabilityFlow(_HiddenAtHighNoise(weight), flowdiff.Schedule.linear())
    x = NOISE.clone().requires_grad_()
    assert torch.autograd.grad(flowdiff.generate(flow, x, solver=solver, steps=5).x.sum(), weight)[0] != 0
    res = flowdiff.generate(flow, x, solver=solver, steps=5, adjoint=adjoint)
    with pytest.raises(ValueError, match=r"1 tensor\(s\) requiring grad that the solve cannot see"):
        res.x.sum().backward()
