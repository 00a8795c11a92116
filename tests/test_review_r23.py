"""Review R23 of Q5's and D6's merges: the findings reproduced, each fixed and tested here.

1. A user's ``torch.func.vmap`` right around a ``torch.func.jvp`` over an ensemble (weights stacked by
   ``torch.func.stack_module_state``, closed over by the model) with the default checks stopped inside torch
   (RuntimeError, ".item()" on a mapped tensor at the end-of-solve check): ``_checks.vmap_may_map_states`` lets
   every vmap right around a jvp pass (jacfwd's maps the tangents alone), and nothing looked again. It is refused
   by name now at the first evaluation, whose output is mapped; jacfwd and hessian of one model still run with the
   checks on, and the ensemble's jvps run with the checks off, equal to the loop over the members. An adaptive solve
   there (its step control reads each step's error on the host) is refused by name the same way, checks or not.
"""

from __future__ import annotations

import pytest
import torch
from _ensemble import TinyNet

import flowdiff as fd

OFF = fd.Checks(finite=False, growth=None)


_Net = TinyNet


def _ensemble():
    nets = [_Net(k) for k in range(3)]
    params, buffers = torch.func.stack_module_state(nets)
    noise = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    tangent = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    return nets, params, buffers, _Net(99), noise, tangent


def _members_jvp(shell, noise, tangent, checks):
    def one(p, b):
        flow = fd.ProbabilityFlow(lambda x, t: torch.func.functional_call(shell, (p, b), (x, t)), fd.Schedule.linear())
        return torch.func.jvp(lambda x: fd.generate(flow, x, solver="heun", steps=3, checks=checks).x,
                              (noise,), (tangent,))
    return one


def test_vmap_around_a_users_jvp_over_an_ensemble_is_refused_by_name_and_runs_with_the_checks_off():
    nets, params, buffers, shell, noise, tangent = _ensemble()
    with pytest.raises(ValueError, match=r"generate under torch\.func\.vmap around a jvp, with the model's output "
                                         r"mapped over.*give checks=flowdiff\.Checks\(finite=False, growth=None\)"):
        torch.func.vmap(_members_jvp(shell, noise, tangent, None))(params, buffers)
    assert shell.calls == 1  # at the first evaluation, not at the end-of-solve check
    primals, tangents = torch.func.vmap(_members_jvp(shell, noise, tangent, OFF))(params, buffers)
    for i, net in enumerate(nets):
        want = torch.func.jvp(lambda x, net=net: fd.generate(fd.ProbabilityFlow(net, fd.Schedule.linear()), x,
                                                             solver="heun", steps=3).x, (noise,), (tangent,))
        torch.testing.assert_close(primals[i], want[0], rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(tangents[i], want[1], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("transform", [torch.func.jacfwd, torch.func.hessian])
def test_jacfwd_and_hessian_of_one_model_still_run_with_the_checks_on(transform):
    """Their vmaps sit right around a jvp and map the tangents alone: the model's output is not mapped."""
    net = _Net(0)
    flow = fd.ProbabilityFlow(net, fd.Schedule.linear())
    noise = torch.randn(1, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def f(n):
        return fd.generate(flow, n, solver="heun", steps=2).x.square().sum()

    want = (torch.autograd.functional.hessian if transform is torch.func.hessian
            else torch.autograd.functional.jacobian)(f, noise)
    torch.testing.assert_close(transform(f)(noise), want, rtol=1e-10, atol=1e-12)


def test_an_adaptive_solve_under_vmap_around_a_jvp_over_an_ensemble_is_refused_by_name():
    """Its step control reads each step's error on the host whatever the checks: it stopped inside torch."""
    _, params, buffers, shell, noise, tangent = _ensemble()

    def one(p, b):
        flow = fd.ProbabilityFlow(lambda x, t: torch.func.functional_call(shell, (p, b), (x, t)), fd.Schedule.linear())
        return torch.func.jvp(lambda x: fd.generate(flow, x, solver="bosh3", adaptive=fd.Adaptive(), checks=OFF).x,
                              (noise,), (tangent,))

    with pytest.raises(ValueError, match=r"generate\(adaptive=\.\.\.\) under torch\.func\.vmap around a jvp.*"
                                         r"step control reads each step's error on the host"):
        torch.func.vmap(one)(params, buffers)
    assert shell.calls == 1


def test_jacfwd_of_an_adaptive_solve_of_one_model_still_runs():
    net = _Net(0)
    flow = fd.ProbabilityFlow(net, fd.Schedule.linear())
    noise = torch.randn(1, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def f(n):
        return fd.generate(flow, n, solver="bosh3", adaptive=fd.Adaptive()).x

    torch.testing.assert_close(torch.func.jacfwd(f)(noise), torch.autograd.functional.jacobian(f, noise),
                               rtol=1e-8, atol=1e-10)


def test_encode_under_vmap_around_a_users_jvp_over_an_ensemble_is_refused_with_the_checks_off_too():
    """encode is refused under every vmap whose states are mapped (README); around a jvp only the model's mapped
    output shows it, and with the checks off the encode ran (lead, after R23)."""
    _, params, buffers, shell, noise, tangent = _ensemble()
    images = noise.clamp(-1, 1)

    def one(p, b):
        flow = fd.ProbabilityFlow(lambda x, t: torch.func.functional_call(shell, (p, b), (x, t)), fd.Schedule.linear())
        return torch.func.jvp(lambda x: fd.encode(flow, x, solver="heun", steps=3, checks=OFF).x, (images,), (tangent,))

    with pytest.raises(ValueError, match=r"encode does not run under torch\.func\.vmap around a jvp"):
        torch.func.vmap(one)(params, buffers)
    assert shell.calls == 1


def test_a_v_prediction_model_in_the_data_variables_is_checked_under_vmap_around_a_jvp_and_keeps_its_own_d():
    """The check wraps the model's field; a data-variable solver (unipc) reads D off a v-prediction's own output
    (``with_denoised``), which the wrapper must check alike and keep: read back from x̄ − σ·ε it loses ε's rounding
    times σ in float32, and the jvp's primal was no longer the plain solve's."""
    _, params, buffers, shell, noise, tangent = _ensemble()

    def one(p, b):
        flow = fd.ProbabilityFlow(lambda x, t: torch.func.functional_call(shell, (p, b), (x, t)), fd.Schedule.linear(),
                                  prediction_type="v_prediction")
        return torch.func.jvp(lambda x: fd.generate(flow, x, solver="unipc", steps=4).x, (noise,), (tangent,))

    with pytest.raises(ValueError, match=r"generate under torch\.func\.vmap around a jvp"):
        torch.func.vmap(one)(params, buffers)

    net = _Net(0).float()
    flow = fd.ProbabilityFlow(net, fd.Schedule.cosine(), prediction_type="v_prediction")
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
    plain = fd.generate(flow, x, solver="unipc", steps=4).x
    tangents = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(2))
    primals, _ = torch.func.vmap(lambda t: torch.func.jvp(lambda n: fd.generate(flow, n, solver="unipc", steps=4).x,
                                                          (x,), (t,)))(tangents)
    for primal in primals:
        assert torch.equal(primal, plain)
