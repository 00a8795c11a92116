"""adjoint=: checkpoint and reversible gradients equal autograd's; memory; NFE; refusals (flowdiff.engine.adjoint)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import flowdiff
import solvers
from flowdiff.engine.adjoint import NFE_BACKWARD, NO_RECORD_GRADIENT, differentiable_inputs
from flowdiff.models.analytic import Gaussian
from flowdiff.models.guidance import classifier_free_guidance

#: one solver of each family: Runge–Kutta, FSAL Runge–Kutta, multistep in σ, multistep in the data variables,
#: predictor–corrector, and the two reversible ones
FAMILIES = ("euler", "heun", "dopri5", "lms", "dpmpp_2m", "unipc", "reversible_heun", "reversible")
STEPS = 5


class Net(nn.Module):
    """A small field with parameters, a time dependence and an additive condition ``c`` (model_kwargs)."""

    def __init__(self, dim: int = 4, hidden: int = 8, dtype: torch.dtype = torch.float64, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(dim, hidden, dtype=dtype)
        self.out = nn.Linear(hidden, dim, dtype=dtype)
        self.calls = 0

    def forward(self, x, t, c=None):
        self.calls += 1
        dtype = self.inp.weight.dtype
        h = torch.tanh(self.inp(x.flatten(1).to(dtype)) * (1.0 + t.to(dtype)[:, None] / 1000.0))
        out = self.out(h).reshape(x.shape)
        return (out if c is None else out + 0.1 * c.to(dtype)).to(x.dtype)


def _flow(net: nn.Module) -> flowdiff.ProbabilityFlow:
    return flowdiff.ProbabilityFlow(net, flowdiff.Schedule.linear())


def _gradients(direction: str, solver: str, adjoint: str, net: Net, x: torch.Tensor, c: torch.Tensor):
    """d(loss)/d(input, c, parameters) of one solve, and its statistics."""
    flow = _flow(net)
    x = x.clone().requires_grad_()
    kw = {"solver": solver, "steps": STEPS, "model_kwargs": {"c": c}}
    if direction == "generate":
        res = flowdiff.generate(flow, x, adjoint=adjoint, **kw)
    elif direction == "encode":
        res = flowdiff.encode(flow, x, adjoint=adjoint, **kw)
    else:  # decode the latent of an encode (autograd) of x: the round trip's gradient
        latent = flowdiff.encode(flow, x, **kw).latent
        res = flowdiff.decode(flow, latent, model_kwargs={"c": c}, adjoint=adjoint)
    weights = torch.linspace(-1.0, 2.0, x[0].numel(), dtype=res.x.dtype).reshape(x[0].shape)
    loss = (res.x * weights).sum() + res.x.pow(2).sum()
    grads = torch.autograd.grad(loss, [x, c, *net.parameters()])
    return grads, res


def _relative(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    return float((a - b).abs().max()) / max(float(b.abs().max()), floor, 1e-300)


@pytest.mark.parametrize("direction", ["generate", "encode", "decode"])
@pytest.mark.parametrize("solver", FAMILIES)
def test_gradients_equal_autograd(solver, direction):
    net = Net()
    x = torch.rand(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    c = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    reference, ref_res = _gradients(direction, solver, "autograd", net, x, c)
    modes = ("checkpoint", "reversible") if solvers.get(solver).reversible else ("checkpoint",)
    for mode in modes:
        grads, res = _gradients(direction, solver, mode, net, x, c)
        assert torch.equal(res.x, ref_res.x), (mode, "the forward solve is the same")
        # a reversible round trip is the identity: its gradient w.r.t. the model is zero but for rounding, so
        # errors are relative to the largest gradient there
        floor = max(float(r.abs().max()) for r in reference) if direction == "decode" else 0.0
        for name, g, r in zip(["input", "c", *(n for n, _ in net.named_parameters())], grads, reference):
            assert _relative(g, r, floor) <= 1e-10, (mode, name, _relative(g, r, floor))


@pytest.mark.parametrize("solver, evals_per_inverse", [("reversible_heun", 0), ("reversible", 2)])
@pytest.mark.parametrize("direction", ["generate", "encode"])
def test_backward_evaluations_are_counted(solver, evals_per_inverse, direction):
    """checkpoint recomputes each step once; reversible adds one inverse step per step it rebuilds
    (all but the first, and but the last when it is final_euler's Euler step into σ = 0): two of the base
    method's evaluations for the wrapper, none for reversible Heun, whose inverse evaluates f where the
    step before recomputes it (the evaluation is replayed)."""
    net = Net()
    x = torch.rand(2, 4, dtype=torch.float64) * 2 - 1
    c = torch.zeros(2, 4, dtype=torch.float64, requires_grad=True)
    for mode in ("checkpoint", "reversible"):
        _, res = _gradients(direction, solver, "autograd", net, x, c)  # warm
        net.calls = 0
        flow = _flow(net)
        xx = x.clone().requires_grad_()
        fn = flowdiff.generate if direction == "generate" else flowdiff.encode
        res = fn(flow, xx, solver=solver, steps=STEPS, adjoint=mode)
        assert res.stats.extra[NFE_BACKWARD] == 0 and net.calls == res.stats.nfe
        res.x.sum().backward()
        backward = res.stats.extra[NFE_BACKWARD]
        assert backward == net.calls - res.stats.nfe  # counted exactly
        rebuilt = STEPS - 2 if direction == "generate" else STEPS - 1
        expected = res.stats.nfe + (rebuilt * evals_per_inverse if mode == "reversible" else 0)
        assert backward == expected, (mode, backward, expected)


def test_a_solver_that_changes_on_its_interval_is_recomputed_as_it_stepped():
    """A log-time Adams method steps in t on an interval that reaches t = 0 (Adams.on_interval): the loop generated
    with that, and the backward pass recomputed the steps with log-time weights (a gradient 4% off). (It was found
    on deis, which now keeps its log weights step by step; a log-time Adams in σ without that flag still changes.)"""
    net = Net()
    x = torch.rand(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    c = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    changing = solvers.Adams("deis", 3, log_time=True)
    assert changing.on_interval(flowdiff.make_sigmas(_flow(net).schedule, "trailing", STEPS)[0], 0.0) is not changing
    reference, _ = _gradients("generate", changing, "autograd", net, x, c)
    grads, _ = _gradients("generate", changing, "checkpoint", net, x, c)
    assert all(_relative(g, r) <= 1e-10 for g, r in zip(grads, reference))


def test_quantised_reversible_heun_rebuilds_the_forward_bit_for_bit():
    """float32 images encode in float64 on the grid 2⁻⁴⁰: the states rebuilt backwards are the forward's, so
    'reversible' returns exactly 'checkpoint''s bits (and autograd's gradient, the rounding straight through)."""
    net = Net(dtype=torch.float32)
    x = torch.rand(2, 4, generator=torch.Generator().manual_seed(3)) * 2 - 1
    c = torch.randn(2, 4, requires_grad=True)
    assert flowdiff.encode(_flow(net), x, solver="reversible_heun", steps=3).latent.solver_options == {
        "quantum": flowdiff.api.inversion.EXACT_QUANTUM}
    auto, _ = _gradients("encode", "reversible_heun", "autograd", net, x, c)
    checkpoint, _ = _gradients("encode", "reversible_heun", "checkpoint", net, x, c)
    reversible, _ = _gradients("encode", "reversible_heun", "reversible", net, x, c)
    assert all(torch.equal(a, b) for a, b in zip(reversible, checkpoint))
    assert all(_relative(a, b) < 1e-5 for a, b in zip(checkpoint, auto))  # the float32 network's rounding
    assert all(float(g.abs().max()) > 0 for g in auto)  # the rounding did not zero the gradient


@pytest.mark.parametrize("mode", ["checkpoint", "reversible"])
def test_gradcheck_on_the_closed_form_gaussian(mode):
    """The backward pass against finite differences of the forward, w.r.t. the noise and the data's mean."""
    sigmas = [3.0, 1.5, 0.7, 0.2, 0.0]

    def solve(noise, mean):
        flow = Gaussian(mean, torch.tensor([0.5, 2.0], dtype=torch.float64)).flow()
        return flowdiff.generate(flow, noise, solver="reversible_heun", grid=sigmas, adjoint=mode).x

    noise = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    mean = torch.tensor([0.3, -1.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(solve, (noise, mean))


def _saved_bytes(fn) -> int:
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def test_memory_reversible_is_flat_and_checkpoint_keeps_only_boundary_states():
    net = Net(dim=16, hidden=256)
    x = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    state_bytes = x.numel() * x.element_size()

    def saved(mode, solver, steps):
        return _saved_bytes(lambda: flowdiff.generate(_flow(net), x, solver=solver, steps=steps, adjoint=mode))

    assert saved("reversible", "reversible_heun", 4) == saved("reversible", "reversible_heun", 16)
    assert saved("reversible", "reversible", 4) == saved("reversible", "reversible", 16)
    # Euler carries no state: each extra step boundary is one state y
    assert saved("checkpoint", "euler", 16) - saved("checkpoint", "euler", 8) == 8 * state_bytes
    # reversible Heun carries (z, k) besides y: three states a boundary
    assert saved("checkpoint", "reversible_heun", 16) - saved("checkpoint", "reversible_heun", 8) == 24 * state_bytes
    # autograd keeps the network's activations (here 256 wide) of every step
    assert saved("autograd", "euler", 16) - saved("autograd", "euler", 8) > 8 * 8 * state_bytes


def test_guidance_scale_as_a_tensor_and_conditioning_get_gradients():
    class Conditional(Net):
        def forward(self, x, t, label=None):
            return super().forward(x, t, None if label is None else label.expand_as(x))

    net = Conditional()
    guided = classifier_free_guidance(_flow(net), 2.0)
    x = torch.randn(2, 4, dtype=torch.float64)

    def grads(mode):
        scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
        guided.model.scale = scale  # a tensor w: differentiable like any other input
        label = torch.ones(2, 1, dtype=torch.float64, requires_grad=True)
        res = flowdiff.generate(guided, x, solver="heun", steps=4, model_kwargs={"label": label}, adjoint=mode)
        return torch.autograd.grad(res.x.pow(2).sum(), [scale, label, *net.parameters()])

    for a, b in zip(grads("checkpoint"), grads("autograd")):
        assert _relative(a, b) <= 1e-10


def test_tiny_diffusers_unet():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).double()
    flow = flowdiff.ProbabilityFlow(flowdiff.models.diffusers_io.DiffusersUNet(unet), flowdiff.Schedule.linear())
    noise = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    params = [unet.conv_in.weight, unet.conv_out.bias]

    def grads(mode, solver):
        n = noise.clone().requires_grad_()
        res = flowdiff.generate(flow, n, solver=solver, steps=3, adjoint=mode)
        return torch.autograd.grad(res.x.pow(2).mean(), [n, *params])

    for solver, mode in (("dpmpp_2m", "checkpoint"), ("reversible_heun", "reversible")):
        for a, b in zip(grads(mode, solver), grads("autograd", solver)):
            assert _relative(a, b) <= 1e-10, (solver, mode)


def test_shipped_model():
    flow = flowdiff.pretrained("digits")
    noise = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))

    def grad(mode):
        n = noise.clone().requires_grad_()
        res = flowdiff.generate(flow, n, solver="reversible_heun", steps=3, adjoint=mode)
        return torch.autograd.grad(res.x.mean(), n)[0]

    assert _relative(grad("reversible"), grad("autograd")) < 1e-4  # float32 network


def test_without_gradients_it_is_the_plain_solve():
    net = Net()
    x = torch.randn(2, 4, dtype=torch.float64)
    seen = []
    plain = flowdiff.generate(_flow(net), x, solver="heun", steps=4)
    with torch.no_grad():
        res = flowdiff.generate(_flow(net), x, solver="heun", steps=4, adjoint="checkpoint", callback=seen.append)
    assert torch.equal(res.x, plain.x) and NFE_BACKWARD not in res.stats.extra and len(seen) == 4
    x.requires_grad_()
    seen.clear()
    with pytest.warns(UserWarning, match=NO_RECORD_GRADIENT):  # its states carry no gradient, and it says so
        res = flowdiff.generate(_flow(net), x, solver="heun", steps=4, adjoint="checkpoint", callback=seen.append)
    assert torch.equal(res.x, plain.x) and len(seen) == 4  # the callback still sees every step


@pytest.mark.parametrize("solver,mode", [("heun", "checkpoint"), ("reversible_heun", "reversible"),
                                         ("dpmpp_2m", "checkpoint")])
def test_called_back_states_say_they_carry_no_gradient(solver, mode):
    """With adjoint='checkpoint'/'reversible', callback records come back without a gradient (a callback is a side
    effect of the solve's node): the differentiated solve warns, naming the adjoint and pointing to Save, from the
    user's own line; the end's gradient is autograd's, and autograd's records keep theirs. (Save's states are
    differentiated: tests/test_adjoint_saved.py.)"""
    net = Net()
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    seen = []
    with pytest.warns(UserWarning, match=rf"{NO_RECORD_GRADIENT} with adjoint='{mode}'.*Save.*adjoint='autograd'") \
            as w:
        res = flowdiff.generate(_flow(net), x, solver=solver, steps=STEPS, adjoint=mode, callback=seen.append)
    assert [r.filename for r in w] == [__file__]  # pointed at the caller, not inside flowdiff
    assert len(seen) == STEPS and not any(s.x.requires_grad for s in seen)
    plain = flowdiff.generate(_flow(net), x, solver=solver, steps=STEPS, callback=seen.append)  # autograd: no warning
    (g_mode,) = torch.autograd.grad(res.x.sum(), [x])
    (g_plain,) = torch.autograd.grad(plain.x.sum(), [x], retain_graph=True)
    assert torch.allclose(g_mode, g_plain, rtol=1e-10, atol=1e-12)
    assert all(s.x.requires_grad for s in seen[STEPS:-1])
    with torch.no_grad():  # no gradient asked for: nothing to warn about
        flowdiff.generate(_flow(net), x, solver=solver, steps=STEPS, adjoint=mode, callback=seen.append)


def test_autograd_and_undifferentiated_solves_do_not_warn():
    net = Net()
    x = torch.randn(2, 4, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flowdiff.generate(_flow(net), x.requires_grad_(), solver="heun", steps=3, save=flowdiff.Save(steps=True))
        net.requires_grad_(False)  # nothing the solve depends on requires a gradient: no gradient is lost
        flowdiff.generate(_flow(net), x.detach(), solver="heun", steps=3, adjoint="checkpoint",
                          save=flowdiff.Save(steps=True))


def test_differentiable_inputs_finds_parameters_attributes_and_kwargs():
    net = Net()
    net.out.weight.requires_grad_(False)
    extra = torch.ones(2, requires_grad=True)
    found = differentiable_inputs(net, {"c": [extra, torch.zeros(2)], "n": 3})
    assert {id(t) for t in found} == {id(net.inp.weight), id(net.inp.bias), id(net.out.bias), id(extra)}
    g = Gaussian(torch.zeros(2, requires_grad=True), 1.0)
    assert len(differentiable_inputs(g.eps)) == 1  # the mean, through the bound method's object


def test_refusals():
    net = Net()
    flow = _flow(net)
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="reversible_heun") as err:
        flowdiff.generate(flow, x, solver="euler", steps=3, adjoint="reversible")
    assert "'euler'" in str(err.value) and "checkpoint" in str(err.value)
    with pytest.raises(ValueError, match="'adjoint'|adjoint must be one of .*'backsolve'"):
        flowdiff.generate(flow, x, steps=3, adjoint="backsolve")
    with pytest.raises(TypeError, match="adjoint must be"):
        flowdiff.generate(flow, x, steps=3, adjoint=None)
    with pytest.raises(ValueError, match="adaptive solve"):
        flowdiff.generate(flow, x, solver="dopri5", adaptive=flowdiff.Adaptive(rtol=1e-3), adjoint="checkpoint")
    with pytest.raises(ValueError, match="adaptive solve"):
        flowdiff.encode(flow, x.detach().clamp(-1, 1), solver="dopri5", adaptive=flowdiff.Adaptive(rtol=1e-3),
                        adjoint="checkpoint")
    with pytest.raises(ValueError, match="stochastic"):
        flowdiff.generate(flow, x, steps=3, solver=flowdiff.Stochastic(0.5), adjoint="checkpoint")
    with pytest.raises(ValueError, match="fixed_point"):
        flowdiff.encode(flow, x.detach().clamp(-1, 1), steps=3, solver=flowdiff.Inversion("fixed_point"),
                        adjoint="checkpoint")


def test_a_tensor_the_solve_cannot_see_is_refused_not_lost():
    hidden = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    flow = flowdiff.ProbabilityFlow(lambda x, t: x * hidden, flowdiff.Schedule.linear())
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    res = flowdiff.generate(flow, x, steps=3, adjoint="checkpoint")
    with pytest.raises(ValueError, match=r"cannot see \(\(\) float64\)"):
        res.x.sum().backward()


@pytest.mark.parametrize("solver, mode", [("euler", "checkpoint"), ("reversible_heun", "reversible")])
def test_backward_does_no_host_sync_per_step(device, solver, mode):
    from flowdiff.tools.syncs import syncs_per_step

    flow = flowdiff.pretrained("digits", device=device)
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)).to(device)

    def gradient(steps):
        x = noise.clone().requires_grad_()
        flowdiff.generate(flow, x, solver=solver, steps=steps, adjoint=mode).x.sum().backward()
        return x.grad

    counted = syncs_per_step(gradient, device, steps=(4, 12))
    if device.type != "cuda":
        assert counted.per_step is None  # a CPU has no queue to wait for: checked where CUDA is
        return
    assert counted.per_step == 0, counted


@pytest.mark.parametrize("mode", ["checkpoint", "reversible"])
def test_torch_func_transforms_are_refused_by_name_and_autograd_runs_under_them(mode):
    """torch.func.grad over a checkpoint/reversible solve stopped in torch with 'autograd.Function ... must override
    the setup_context staticmethod' (sweep 6): refused naming adjoint=; adjoint='autograd' is torch.func's, and its
    gradient equals torch.autograd's with the refused mode."""
    f64 = torch.float64
    flow = Gaussian(torch.tensor([0.3, -1.0], dtype=f64), torch.tensor([0.5, 2.0], dtype=f64)).flow()
    sigmas = [3.0, 1.5, 0.7, 0.2, 0.0]
    noise = torch.randn(2, 2, dtype=torch.float64)

    def loss(n, adjoint):
        return flowdiff.generate(flow, n, solver="reversible_heun", grid=sigmas, adjoint=adjoint).x.square().sum()

    with pytest.raises(ValueError, match=rf"adjoint='{mode}' cannot run under a torch.func transform.*'autograd'"):
        torch.func.grad(lambda n: loss(n, mode))(noise)
    by_func = torch.func.grad(lambda n: loss(n, "autograd"))(noise)
    leaf = noise.clone().requires_grad_()
    (by_mode,) = torch.autograd.grad(loss(leaf, mode), leaf)
    torch.testing.assert_close(by_func, by_mode, rtol=1e-10, atol=1e-12)
