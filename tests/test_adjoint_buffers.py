"""Models that change their own buffers during a forward evaluation (a call counter, an exponential moving average)
under ``adjoint="checkpoint"``: each recomputed step is given the buffers that step saw in the forward pass, so the
gradient equals autograd's (R14 measured relative errors of 0.37–0.50 before); ``"reversible"``, whose inverse steps
cannot see them, refuses a model whose output reads them, by name. A model whose buffers do not change keeps its bits
and its saved bytes."""

import copy

import pytest
import torch
from test_adjoint import _saved_bytes

import flowdiff


class _Counter(torch.nn.Module):
    """Eval mode; the output is scaled by 1 + 0.1·calls, a buffer the model increments in place at each call."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 4, dtype=torch.float64)
        self.register_buffer("calls", torch.zeros((), dtype=torch.float64))

    def forward(self, x, t):
        self.calls += 1
        return self.lin(x) * (1 + 0.1 * self.calls)


class _Ema(torch.nn.Module):
    """An exponential moving average of the inputs' mean, assigned anew at each call, inside the nonlinearity (so the
    field's Jacobian depends on it)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 4, dtype=torch.float64)
        self.register_buffer("average", torch.zeros(4, dtype=torch.float64))

    def forward(self, x, t):
        self.average = 0.5 * self.average + 0.5 * x.detach().mean(0)
        return torch.tanh(self.lin(x) + 4.0 * self.average)


class _LazyCache(torch.nn.Module):
    """Registers its buffer at its first call, then scales its output by it and doubles it at each call."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 4, dtype=torch.float64)

    def forward(self, x, t):
        if "scale" not in self._buffers:
            self.register_buffer("scale", torch.full((), 0.5, dtype=torch.float64))
        self.scale *= 1.5
        return torch.tanh(self.lin(x) * self.scale.clone())  # a copy: the next call changes the buffer in place


class _Constant(torch.nn.Module):
    """Reads a buffer it never changes (``as_buffer``), or the same values as a plain attribute."""

    def __init__(self, as_buffer: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 4, dtype=torch.float64)
        shift = torch.linspace(-1.0, 1.0, 4, dtype=torch.float64)
        if as_buffer:
            self.register_buffer("shift", shift)
        else:
            self.shift = shift

    def forward(self, x, t):
        return torch.tanh(self.lin(x) + self.shift) * (1.0 + t.to(x.dtype)[:, None] / 1000.0)


def _solve(net, direction, solver, adjoint, start):
    x = start.clone().requires_grad_()
    flow = flowdiff.ProbabilityFlow(net, flowdiff.Schedule.linear())
    run = flowdiff.generate if direction == "generate" else flowdiff.encode
    res = run(flow, x, solver=solver, steps=4, adjoint=adjoint)
    return torch.autograd.grad(res.x.pow(2).sum(), [x, *net.parameters()])


_START = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 0.5


@pytest.mark.parametrize("model", [_Counter, _Ema])
@pytest.mark.parametrize("solver", ["euler", "heun", "dpmpp_2m"])
@pytest.mark.parametrize("direction", ["generate", "encode"])
def test_checkpoint_replays_each_steps_buffers(model, solver, direction):
    _check_replayed(model().eval(), solver, direction)


def test_checkpoint_replays_a_buffer_registered_during_the_solve():
    """Steps before the buffer existed are recomputed without it, and the module ends with it, as autograd's."""
    _check_replayed(_LazyCache().eval(), "heun", "generate")


def _check_replayed(base, solver, direction):
    out = {}
    for mode in ("autograd", "checkpoint"):
        net = copy.deepcopy(base)
        grads = _solve(net, direction, solver, mode, _START)
        out[mode] = grads, {k: b.clone() for k, b in net.named_buffers()}
    for name, value in base.named_buffers():
        assert not torch.equal(out["autograd"][1][name], value), name  # the buffers did move
    for g, r in zip(out["checkpoint"][0], out["autograd"][0], strict=True):
        assert float((g - r).norm()) <= 1e-10 * float(r.norm())
    assert out["checkpoint"][1].keys() == out["autograd"][1].keys() != set()
    for name, value in out["autograd"][1].items():
        assert torch.equal(out["checkpoint"][1][name], value), name


@pytest.mark.parametrize("model", [_Counter, _Ema])
def test_reversible_refuses_a_model_that_reads_the_buffers_it_changes(model):
    """Its inverse steps evaluate the model where the forward pass did not; the check's own evaluations leave the
    buffers as the forward pass left them (as autograd's forward does)."""
    reference = model().eval()
    _solve(reference, "generate", "reversible_heun", "autograd", _START)
    net = model().eval()
    with pytest.raises(ValueError, match=rf"adjoint='reversible'.*{model.__name__}\.(calls|average).*'checkpoint'"):
        _solve(net, "generate", "reversible_heun", "reversible", _START)
    for (name, value), (_, expected) in zip(net.named_buffers(), reference.named_buffers(), strict=True):
        assert torch.equal(value, expected), name


class _Tally(_Counter):
    """Counts its calls in a buffer its output does not read."""

    def forward(self, x, t):
        self.calls += 1
        return torch.tanh(self.lin(x))


def test_reversible_refuses_a_model_that_changes_buffers_it_does_not_read():
    """Whether the output reads them cannot be probed at one point (a model may read them at some σ only:
    tests/test_review_r15.py), so a changed buffer is refused even where, as here, it is only written."""
    net = _Tally().eval()
    with pytest.raises(ValueError, match=r"adjoint='reversible'.*_Tally\.calls.*'checkpoint'"):
        _solve(net, "generate", "reversible_heun", "reversible", _START)


@pytest.mark.parametrize("solver", ["euler", "dpmpp_2m"])
def test_a_model_whose_buffers_do_not_change_keeps_its_bits_and_saved_bytes(solver):
    """A buffer read but never changed gives the bits and the saved bytes of the same values as a plain attribute,
    which the solve does not watch; and the backward pass keeps no copies of it."""
    grads, sizes = {}, {}
    for as_buffer in (True, False):
        net = _Constant(as_buffer)
        grads[as_buffer] = _solve(net, "generate", solver, "checkpoint", _START)
        sizes[as_buffer] = _saved_bytes(lambda net=net: _solve(net, "generate", solver, "checkpoint", _START))
    for a, b in zip(grads[True], grads[False], strict=True):
        assert torch.equal(a, b)
    assert sizes[True] == sizes[False]
    flow = flowdiff.ProbabilityFlow(_Constant(True), flowdiff.Schedule.linear())
    res = flowdiff.generate(flow, _START.clone().requires_grad_(), solver=solver, steps=4, adjoint="checkpoint")
    assert res.x.grad_fn.plan.buffers is None
