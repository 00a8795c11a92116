"""Three finds the last close left open. Each test failed on the code before the fix it names.

1. ``DPMSolverMultistepScheduler(solver_order=1)`` was planned as Euler in σ, whose first step out of σ ≈ 2e4 (cosine
   v-prediction) cancels in float32 (x̄ ≈ σ·ε): it is planned as DPM-Solver++(1) in the data variables now, where
   the field's denoised value is read off the prediction.
2. A learned encoder's heun latent decoded with ``Grid(final_euler=False)`` took its last step, fitted as Euler, as a
   heun step: one evaluation more than the decode its shifts were fitted for. Refused, naming final_euler.
3. An ensemble (weights stacked by ``torch.func.stack_module_state``) under ``torch.func.vmap(torch.func.grad(...))``
   with the default checks stopped inside torch (".item()" on a mapped state); refused up front now, as plain vmap
   and ``grad(vmap(...))`` are, and runs with the checks off, equal to the loop over the members.
"""

import dataclasses

import pytest
import torch

import flowdiff as fd
from flowdiff.models.analytic import Mixture

OFF = fd.Checks(finite=False, growth=None)


# -- 2. a learned encoder's heun latent with final_euler=False ---------------------------------------------------------

class _Counted:
    """A closed-form mixture's field that records the σ of every evaluation (its centres, an attribute, are what the
    flow's fingerprint reads)."""

    def __init__(self) -> None:
        self.centers = torch.rand(6, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
        mixture = Mixture(self.centers, 0.3).flow()
        self.schedule, self.field, self.seen = mixture.schedule, mixture.field(None, None), []

    def eps(self, xbar, sigma):
        self.seen.append(float(sigma))
        return self.field(sigma, xbar)


def _counted_mixture():
    counted = _Counted()
    return fd.ProbabilityFlow.from_sigma_field(counted.eps, counted.schedule), counted.seen


def test_a_learned_heun_latent_refuses_final_euler_false_before_any_evaluation():
    flow, seen = _counted_mixture()
    images = (torch.rand(4, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1) * 0.9
    sigmas = fd.make_sigmas(flow.schedule, "logsnr", 3)
    fitted = fd.learn_encoder(flow, images, solver="heun", nfe=6, sigmas=sigmas, iterations=0)
    # what the latents of a kept fit record: the decode's shifts (fitted ones are not zero)
    learned = dataclasses.replace(fitted, kept=True, decode_shifts=(0.1, -0.2, 0.3))
    latent = learned.encode(flow, images).latent
    assert latent.decode_shifts == (0.1, -0.2, 0.3)
    seen.clear()
    with pytest.raises(ValueError, match=r"^grid=Grid\(\.\.\., final_euler=False\) beside this latent's "
                                         r"decode_shifts \(a LearnedEncoder's, solver 'heun'\): they were fitted for "
                                         r"the decode whose last step, into σ = 0, is Euler"):
        fd.decode(flow, latent, grid=fd.Grid(final_euler=False))
    assert seen == []
    # the decode the shifts were fitted for: 3 heun steps, the last Euler into σ = 0, within the budget of nfe=6
    res = fd.decode(flow, latent)
    assert res.stats.nfe == len(seen) == 5 <= learned.nfe
    assert 0.0 not in seen
    # the plain decode (no shifts) takes final_euler=False, at its own cost: one evaluation at σ = 0 more
    seen.clear()
    plain = dataclasses.replace(latent, decode_shifts=None)
    res = fd.decode(flow, plain, grid=fd.Grid(final_euler=False))
    assert res.stats.nfe == len(seen) == 6 and seen[-1] == 0.0


# -- 3. an ensemble under vmap(grad) ----------------------------------------------------------------------------------

class _Net(torch.nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4).double()
        torch.nn.init.normal_(self.lin.weight, std=0.4, generator=torch.Generator().manual_seed(seed))
        self.calls = 0

    def forward(self, x, t):
        self.calls += 1
        return torch.tanh(self.lin(x)) * (1 + t.reshape(-1, 1) / 1000)


def _ensemble():
    nets = [_Net(k) for k in range(3)]
    params, buffers = torch.func.stack_module_state(nets)
    noise = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    return nets, params, buffers, _Net(99), noise


def _loss(shell, noise, checks):
    def loss(p, b):
        flow = fd.ProbabilityFlow(lambda x, t: torch.func.functional_call(shell, (p, b), (x, t)), fd.Schedule.linear())
        return fd.generate(flow, noise, solver="heun", steps=3, checks=checks).x.square().sum()
    return loss


def _member_grads(nets, noise):
    """Each member's gradient by plain autograd, one member at a time: what the mapped calls must equal."""
    out = []
    for net in nets:
        params = dict(net.named_parameters())
        flow = fd.ProbabilityFlow(net, fd.Schedule.linear())
        loss = fd.generate(flow, noise, solver="heun", steps=3).x.square().sum()
        out.append(dict(zip(params, torch.autograd.grad(loss, list(params.values())))))
    return {name: torch.stack([g[name] for g in out]) for name in out[0]}


REFUSAL = (r"^generate under torch\.func\.vmap \(called inside it with noise and model_kwargs unmapped: what the model "
           r"closes over may be mapped\) with checks=Checks\(finite=True, growth='auto'\).*give "
           r"checks=flowdiff\.Checks\(finite=False, growth=None\) to run under vmap$")


def test_vmap_of_grad_over_an_ensemble_is_refused_up_front_and_runs_with_the_checks_off():
    nets, params, buffers, shell, noise = _ensemble()
    with pytest.raises(ValueError, match=REFUSAL):
        torch.func.vmap(torch.func.grad(_loss(shell, noise, None)))(params, buffers)
    assert shell.calls == 0  # before any evaluation, not inside torch at the first check
    grads = torch.func.vmap(torch.func.grad(_loss(shell, noise, OFF)))(params, buffers)
    expected = _member_grads(nets, noise)
    assert set(grads) == set(expected)
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-12, atol=1e-14)


def test_grad_of_an_ensembles_vmap_is_refused_up_front_and_runs_with_the_checks_off():
    nets, params, buffers, shell, noise = _ensemble()

    def total(checks):
        return lambda p, b: torch.func.vmap(_loss(shell, noise, checks))(p, b).sum()

    with pytest.raises(ValueError, match=REFUSAL):
        torch.func.grad(total(None))(params, buffers)
    assert shell.calls == 0
    grads = torch.func.grad(total(OFF))(params, buffers)
    expected = _member_grads(nets, noise)
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("transform", [torch.func.jacrev, torch.func.jacfwd, torch.func.hessian])
def test_derivatives_of_one_model_keep_the_default_checks(transform):
    """jacrev's forward pass runs under grad alone, jacfwd's and hessian's vmap maps tangents: none is refused, and
    each equals torch.autograd.functional's on the same solve."""
    net = _Net(0)
    flow = fd.ProbabilityFlow(net, fd.Schedule.linear())
    noise = torch.randn(1, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def f(n):
        return fd.generate(flow, n, solver="heun", steps=2).x.square().sum()

    got = transform(f)(noise)
    if transform is torch.func.hessian:
        want = torch.autograd.functional.hessian(f, noise)
    else:
        want = torch.autograd.functional.jacobian(f, noise)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
