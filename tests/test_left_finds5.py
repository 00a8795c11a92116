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
import re

import pytest
import torch
from _ensemble import TinyNet

import flowdiff as fd
import solvers
from flowdiff.models.analytic import Mixture
from flowdiff.tools import scheduler_suite as S

OFF = fd.Checks(finite=False, growth=None)


# -- 1. DPMSolverMultistepScheduler(solver_order=1): DPM-Solver++(1) in the data variables ---------------------------

COSINE_V = {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"}


@pytest.mark.parametrize(("options", "steps"), [({"use_exponential_sigmas": True}, 5),
                                                ({"use_karras_sigmas": True}, 3),
                                                ({}, 8),
                                                ({"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}, 5)])
def test_dpm_solver_order_1_on_cosine_v_prediction_keeps_diffusers_float32_precision(options, steps):
    """σ_max ≈ 2e4 on the cosine schedule: Euler in σ formed x̄ − σ·ε at its first step, 4.0e-6 off float64 in float32
    where diffusers' own loop is 1.4e-7 off; the data variables read D off the v prediction. Each side against its own
    float64 result, and flowdiff against diffusers in float32 (diffusers keeps its σ table in float32, so its float64
    loop is no closer to flowdiff's than that). Measured ratios to diffusers' own gap: at most 1.7 and 2.8 (Euler in σ:
    29–560)."""
    case = S.drawn_case("DPMSolverMultistepScheduler", {**COSINE_V, "solver_order": 1, **options}, steps)
    plan = fd.scheduler_plan({"_class_name": case.cls, **case.config}, steps)
    assert (plan.solver, plan.solver_options) == ("dpmpp_2m", {"order": 1})
    checks = fd.Checks(growth=None)
    g32, r32, nfe, calls = S.run_case(case, torch.float32, checks=checks)
    g64, r64, _, _ = S.run_case(case, torch.float64, checks=checks)
    assert nfe == calls
    theirs = S._rel(r32, r64)  # diffusers' own float32 gap, measured here
    assert S._rel(g32, g64) <= 3 * theirs
    assert S._rel(g32, r32) <= 4 * theirs


def test_dpmpp_2m_order_1_is_euler_in_the_data_variables():
    """DPM-Solver++(1) is DDIM: in float64 equal to Euler in σ on the same grid at the same NFE, and its step is
    x̄₁ = (σ₁/σ₀)·x̄₀ + (1 − σ₁/σ₀)·D₀ with D₀ the flow's denoised image (its last step into σ = 0 is D itself)."""
    centres = torch.rand(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    flow = Mixture(centres, 0.3).flow()
    noise = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    sig = fd.make_sigmas(flow.schedule, "karras", 6)
    one = solvers.get("dpmpp_2m", order=1)
    assert (one.order, one.fixed_grid_order) == (1, 1)
    data = fd.generate(flow, noise, solver=one, grid=sig)
    euler = fd.generate(flow, noise, solver="euler", grid=sig)
    assert data.stats.nfe == euler.stats.nfe == len(sig) - 1
    torch.testing.assert_close(data.x, euler.x, rtol=1e-10, atol=1e-12)
    xbar = noise * (1 + float(sig[0]) ** 2) ** 0.5
    for s0, s1 in zip(sig[:-1].tolist(), sig[1:].tolist()):
        xbar = (s1 / s0) * xbar + (1 - s1 / s0) * flow.denoised(xbar, s0)
    torch.testing.assert_close(data.x, xbar, rtol=1e-12, atol=1e-13)
    assert not torch.allclose(fd.generate(flow, noise, solver="dpmpp_2m", grid=sig).x, data.x, rtol=1e-6, atol=0)


@pytest.mark.parametrize("order", [0, 3, True, 2.0, "1"])
def test_dpmpp_2m_order_is_1_or_2(order):
    with pytest.raises(ValueError, match=rf"^solver 'dpmpp_2m': order must be 2 \(DPM-Solver\+\+\(2M\)\) or 1 .*got "
                                         rf"{re.escape(repr(order))}$"):
        solvers.get("dpmpp_2m", order=order)


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

def _Net(seed: int) -> TinyNet:
    return TinyNet(seed, std=0.4)


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
