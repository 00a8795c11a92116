"""Gradients through the states a `flowdiff.Save` keeps under adjoint='checkpoint'/'reversible'.

The saved states are outputs of the solve's autograd node; the backward sweep adds each one's gradient to the
adjoint when it comes back to that step boundary. A loss on them (besides the end) is differentiated as autograd
differentiates it, with the same backward evaluations and no more memory held for backward.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from test_adjoint import STEPS, Net, _flow, _relative, _saved_bytes

import flowdiff
import solvers
from flowdiff.engine.adjoint import NFE_BACKWARD
from flowdiff.engine.formulations import encode_refusal
from flowdiff.models.analytic import Gaussian

#: Euler (DDIM), Runge–Kutta, two multistep methods, the reversible ones by their inverse and by checkpoints
CASES = [("euler", "checkpoint"), ("heun", "checkpoint"), ("dpmpp_2m", "checkpoint"), ("unipc", "checkpoint"),
         ("reversible_heun", "reversible"), ("reversible", "reversible"), ("reversible_heun", "checkpoint")]


def _start(direction: str) -> torch.Tensor:
    x = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return x.clamp(-1, 1) if direction == "encode" else x


def _solve(direction: str, solver: str, adjoint: str, net: Net, x: torch.Tensor, c: torch.Tensor, **kw):
    fn = flowdiff.generate if direction == "generate" else flowdiff.encode
    return fn(_flow(net), x, solver=solver, steps=STEPS, model_kwargs={"c": c}, adjoint=adjoint, **kw)


def _save_all(solver: str) -> flowdiff.Save:
    """Every step, with x̂₀ where the solver evaluates at the saved state (a reversible one never does: refused)."""
    return flowdiff.Save(steps=True, denoised=not solvers.get(solver).reversible)


def _save_some(direction: str, solver: str, net: Net) -> flowdiff.Save:
    """Save at the first, third and last σ the solve steps to (the last is the end itself)."""
    c = torch.zeros(2, 4, dtype=torch.float64)
    with torch.no_grad():
        sig = _solve(direction, solver, "autograd", net, _start(direction), c).sigmas
    return flowdiff.Save(sigmas=[sig[1], sig[3], sig[-1]])


def _loss(res: flowdiff.Result) -> torch.Tensor:
    """The end and each saved state, weighted differently, through x, x̄ and the denoised image where kept."""
    w = torch.linspace(-1.0, 2.0, res.x[0].numel(), dtype=res.x.dtype).reshape(res.x[0].shape)
    loss = (res.x * w).sum() + res.x.pow(2).sum()
    for j, s in enumerate(res.saved):
        loss = loss + (j + 1.5) * (s.x * w).sin().sum() + 0.1 * s.xbar.pow(2).sum()
        if s.denoised is not None:
            loss = loss + 0.3 * (s.denoised * w).cos().sum()
    return loss


@pytest.mark.parametrize("direction", ["generate", "encode"])
@pytest.mark.parametrize("solver, mode", CASES)
@pytest.mark.parametrize("which", ["sigmas", "steps", "denoised"])
def test_a_loss_on_saved_states_has_autograds_gradient(solver, mode, direction, which):
    """The end, saved x and x̄, and the saved denoised images x̂₀ (read off the carried state, or off the next
    step's evaluation at the saved state: Euler, Heun)."""
    net = Net()
    save = {"sigmas": lambda: _save_some(direction, solver, net), "steps": lambda: flowdiff.Save(steps=True),
            "denoised": lambda: _save_all(solver)}[which]()
    c = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    grads, results = {}, {}
    for adjoint in ("autograd", mode):
        x = _start(direction).requires_grad_()
        res = _solve(direction, solver, adjoint, net, x, c, save=save)
        grads[adjoint] = torch.autograd.grad(_loss(res), [x, c, *net.parameters()])
        results[adjoint] = res
    assert len(results[mode].saved) == (3 if which == "sigmas" else STEPS)
    for mine, ref in zip(results[mode].saved, results["autograd"].saved):
        assert mine.step == ref.step and torch.equal(mine.x, ref.x) and torch.equal(mine.xbar, ref.xbar)
        assert (mine.denoised is None) == (ref.denoised is None)
        assert mine.denoised is None or (torch.equal(mine.denoised, ref.denoised) and mine.denoised.requires_grad)
    for name, g, r in zip(["input", "c", *(n for n, _ in net.named_parameters())], grads[mode], grads["autograd"]):
        assert _relative(g, r) <= 1e-10, (name, _relative(g, r))


@pytest.mark.parametrize("direction", ["generate", "encode"])
@pytest.mark.parametrize("solver", solvers.available())
def test_every_solver_differentiates_its_saved_states_and_denoised_images(solver, direction):
    """Every registered solver on a fixed grid under 'checkpoint' (and 'reversible' where it is), with x, x̄ and
    x̂₀ of every step in the loss: autograd's gradient w.r.t. the start and the parameters, the saved values
    bit for bit. (It found deis generating: recomputed with log-time weights where the loop stepped in t.)"""
    if direction == "encode" and encode_refusal(solver) is not None:
        pytest.skip(f"{solver} is refused for encoding")
    net = Net()
    c = torch.zeros(2, 4, dtype=torch.float64)
    save = _save_all(solver)
    modes = ("checkpoint", "reversible") if solvers.get(solver).reversible else ("checkpoint",)
    grads, results = {}, {}
    for adjoint in ("autograd", *modes):
        x = _start(direction).requires_grad_()
        res = results[adjoint] = _solve(direction, solver, adjoint, net, x, c, save=save)
        grads[adjoint] = torch.autograd.grad(_loss(res), [x, *net.parameters()])
    for mode in modes:
        for mine, ref in zip(results[mode].saved, results["autograd"].saved, strict=True):
            assert torch.equal(mine.x, ref.x) and (mine.denoised is None) == (ref.denoised is None)
            assert mine.denoised is None or torch.equal(mine.denoised, ref.denoised)
        assert all(_relative(g, r) <= 1e-10 for g, r in zip(grads[mode], grads["autograd"])), mode


@pytest.mark.parametrize("solver, mode", CASES)
def test_saving_costs_no_backward_evaluation_and_an_end_loss_is_bit_identical(solver, mode):
    """The saved states' gradients ride on the sweep the end's takes: the backward evaluations are those without
    Save, and a loss on the end alone gives the same bits with or without saved states beside it."""
    net = Net()
    c = torch.zeros(2, 4, dtype=torch.float64, requires_grad=True)
    save = _save_all(solver)
    out = {}
    for kw in ({}, {"save": save}):
        x = _start("generate").requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # Save's states carry gradients: nothing to warn about
            res = _solve("generate", solver, mode, net, x, c, **kw)
        assert all(s.x.requires_grad and s.xbar.requires_grad for s in res.saved or ())
        assert all(s.denoised.requires_grad for s in res.saved or () if s.denoised is not None)
        net.calls = 0
        grads = torch.autograd.grad(res.x.pow(2).sum(), [x, c, *net.parameters()])
        assert res.stats.extra[NFE_BACKWARD] == net.calls
        out[bool(kw)] = (grads, net.calls)
    assert out[True][1] == out[False][1]
    assert all(torch.equal(a, b) for a, b in zip(out[True][0], out[False][0]))


@pytest.mark.parametrize("solver, mode", [("euler", "checkpoint"), ("reversible_heun", "reversible")])
def test_saved_states_add_nothing_to_what_is_held_for_backward(solver, mode):
    """Memory: what autograd keeps for backward is the same with every step saved as without (the saved states
    themselves are the caller's, held by Save as before)."""
    net = Net(dim=16, hidden=64)
    x = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    kept = []

    def solve(**kw):
        kept.append(flowdiff.generate(_flow(net), x, solver=solver, steps=8, adjoint=mode, **kw))

    assert _saved_bytes(lambda: solve(save=_save_all(solver))) == _saved_bytes(solve)
    assert all(s.x.requires_grad for s in kept[0].saved)


@pytest.mark.parametrize("solver, mode", [("reversible_heun", "reversible"), ("euler", "checkpoint")])
def test_gradcheck_of_saved_states_on_the_closed_form_gaussian(solver, mode):
    """The saved states' backward against finite differences of the forward (reversible Heun by its inverse;
    Euler with the denoised images read off its evaluations)."""
    sigmas = [3.0, 1.5, 0.7, 0.2, 0.0]

    def solve(noise, mean):
        flow = Gaussian(mean, torch.tensor([0.5, 2.0], dtype=torch.float64)).flow()
        res = flowdiff.generate(flow, noise, solver=solver, grid=sigmas, adjoint=mode,
                                save=flowdiff.Save(sigmas=[1.5, 0.2], denoised=solver == "euler"))
        return res.x, res.saved[0].x, res.saved[1].xbar, *(s.denoised for s in res.saved if s.denoised is not None)

    noise = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    mean = torch.tensor([0.3, -1.0], dtype=torch.float64, requires_grad=True)
    outputs = solve(noise, mean)
    assert len(outputs) == (5 if solver == "euler" else 3)
    assert all(out.requires_grad for out in outputs)  # else gradcheck would pass them over
    assert torch.autograd.gradcheck(solve, (noise, mean))


@pytest.mark.parametrize("solver, mode", [("euler", "checkpoint"), ("reversible_heun", "reversible")])
def test_decode_with_saved_states(solver, mode):
    """decode of an encode's latent: a loss on the saved states differentiated w.r.t. the condition and the
    parameters as autograd does (for reversible Heun the decode runs the solver's inverse steps)."""
    net = Net()
    x = _start("encode")
    grads = {}
    for adjoint in ("autograd", mode):
        c = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)
        latent = flowdiff.encode(_flow(net), x, solver=solver, steps=STEPS, model_kwargs={"c": c}).latent
        res = flowdiff.decode(_flow(net), latent, model_kwargs={"c": c}, adjoint=adjoint, save=_save_all(solver))
        grads[adjoint] = torch.autograd.grad(_loss(res), [c, *net.parameters()])
    assert all(_relative(g, r) <= 1e-10 for g, r in zip(grads[mode], grads["autograd"]))


def test_a_callback_beside_save_warns_for_its_own_states_only():
    """The callback's records (the same values) carry no gradient and the solve says so; Save's carry theirs."""
    net = Net()
    x = _start("generate").requires_grad_()
    seen = []
    with pytest.warns(UserWarning, match="callback= carry no gradient") as w:
        res = flowdiff.generate(_flow(net), x, solver="heun", steps=STEPS, adjoint="checkpoint",
                                callback=seen.append, save=flowdiff.Save(steps=True, denoised=True))
    assert len(w) == 1 and len(seen) == STEPS and not any(s.x.requires_grad for s in seen)
    assert all(torch.equal(a.x, b.x) and a.x.requires_grad for a, b in zip(res.saved, seen, strict=True))
