"""Review H2: follow-ups of review R12 — flow-matching Heun configs with keys Heun does not have, the Heun
``mu=``/``sigmas=`` refusal in one place, reversible solvers with ``Save(denoised=True)``, and training-mode
BatchNorm under ``adjoint="checkpoint"``. Each test failed on main before its fix."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from flowdiff import Checks, scheduler_plan, scheduler_sigmas
from flowdiff.engine.scheduler_grids import schedule_from_config
from flowdiff.tools.scheduler_suite import Case, run_case

diffusers = pytest.importorskip("diffusers")

NO_GUARD = Checks(growth=None)  # the suite's random network is no denoiser: the property is the loop, not the image
#: keys of FlowMatchEulerDiscreteScheduler that FlowMatchHeunDiscreteScheduler does not have (diffusers' from_config
#: ignores them, with a warning, and shifts by ``shift``)
EULER_ONLY = [("use_dynamic_shifting", True), ("base_shift", 0.3), ("max_shift", 2.0), ("time_shift_type", "linear"),
              ("shift_terminal", 0.1), ("use_karras_sigmas", True), ("use_exponential_sigmas", True),
              ("use_beta_sigmas", True), ("invert_sigmas", True), ("stochastic_sampling", True)]


def _from_config(cls: str, config: dict) -> object:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diffusers' "were passed ... will be ignored"
        return getattr(diffusers, cls).from_config(config)


def test_the_keys_are_not_flowmatch_heuns():
    import inspect

    own = set(inspect.signature(diffusers.FlowMatchHeunDiscreteScheduler.__init__).parameters)
    euler = set(inspect.signature(diffusers.FlowMatchEulerDiscreteScheduler.__init__).parameters)
    assert {k for k, _ in EULER_ONLY} <= euler - own  # the premise of the tests below, in the installed diffusers


@pytest.mark.parametrize(("key", "value"), EULER_ONLY)
def test_flowmatch_heun_reads_its_own_keys_as_diffusers_does(key, value):
    """A Heun config with ``use_dynamic_shifting: true`` said "needs mu=", then refused ``mu=``; its schedule
    was read with shift 1 where diffusers' Heun shifts by 3. Now: diffusers' loop, to float rounding, same NFE."""
    config = {"shift": 3.0, key: value}
    sched = _from_config("FlowMatchHeunDiscreteScheduler", config)
    schedule, prediction_type = schedule_from_config({"_class_name": "FlowMatchHeunDiscreteScheduler", **config})
    assert prediction_type == "velocity" and schedule.shift == sched.config.shift
    sched.set_timesteps(4)
    t = np.append(sched.sigmas.double().numpy()[0::2], 0.0)  # its inner levels are listed twice, 0 once
    with np.errstate(divide="ignore"):
        expected = np.where(t < 1, t / (1 - t), np.inf)
    assert np.array_equal(scheduler_sigmas(sched, 4), expected)  # the scheduler object keeps the key in its config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got, ref, nfe, calls = run_case(Case("h2", "FlowMatchHeunDiscreteScheduler", config, steps=4), torch.float32,
                                        checks=NO_GUARD)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert nfe == calls


def test_flowmatch_lcm_ignores_stochastic_sampling_as_diffusers_does():
    """``stochastic_sampling`` is FlowMatchEuler's, not LCM's: diffusers' LCM ignores it; flowdiff refused it."""
    sched = _from_config("FlowMatchLCMScheduler", {"shift": 3.0, "stochastic_sampling": True})
    sched.set_timesteps(5)
    with np.errstate(divide="ignore"):
        t = sched.sigmas.double().numpy()
        expected = np.where(t < 1, t / (1 - t), np.inf)
    assert np.array_equal(scheduler_sigmas(sched, 5), expected)


@pytest.mark.parametrize("route", [scheduler_plan, scheduler_sigmas])
@pytest.mark.parametrize("given", [{"mu": 0.5}, {"sigmas": (1.0, 0.5)}])
def test_heun_mu_and_sigmas_refused_once_naming_the_value(route, given):
    """One refusal (scheduler_sigmas'), reached by both routes, naming the argument, its value and the shift."""
    heun = diffusers.FlowMatchHeunDiscreteScheduler(shift=2.0)
    key, value = next(iter(given.items()))
    with pytest.raises(ValueError) as e:
        route(heun, 2, **given)
    message = str(e.value)
    assert "FlowMatchHeunDiscreteScheduler.set_timesteps" in message
    assert f"{key}={value!r}" in message and "shift=2.0" in message and "set_timesteps" in message


def test_every_module_level_name_of_formulations_is_used():
    """``VARIABLES`` in formulations.py named five variables nothing read (prefer_variables accepts three): a
    second list of the same thing, bound to drift. Every name the module binds at its top level is read somewhere."""
    import ast
    from pathlib import Path

    import flowdiff.engine.formulations as formulations

    root = Path(formulations.__file__).parents[2]
    tree = ast.parse(Path(formulations.__file__).read_text())
    bound = {target.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
             for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
             if isinstance(target, ast.Name)}
    sources = [p.read_text() for folder in ("flowdiff", "solvers", "tests") for p in (root / folder).rglob("*.py")
               if p.name != "test_review_h2.py"]
    used = set()
    for text in sources:
        for n in ast.walk(ast.parse(text)):
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load):
                used.add(n.id)
            elif isinstance(n, ast.Attribute):
                used.add(n.attr)
            elif isinstance(n, ast.ImportFrom):
                used |= {a.name for a in n.names}
    assert bound and not bound - used, f"bound in formulations.py and never read: {sorted(bound - used)}"


@pytest.mark.parametrize("solver", ["reversible_heun", "reversible"])
@pytest.mark.parametrize("route", ["generate", "encode", "decode"])
def test_reversible_solver_with_save_denoised_is_refused_before_the_solve(solver, route):
    """Reversible solvers evaluate at their second variable, never at a saved state: Save(denoised=True) returned
    None for every x̂₀, silently. Now refused by name, before any model evaluation; Save(denoised=False) works."""
    import _closed_form

    import flowdiff

    flow, calls = _closed_form.counting(_closed_form.mixture())
    x = 0.3 * _closed_form.noise(0)  # images in the data range
    latent = flowdiff.encode(flow, x, solver=solver, steps=3).latent if route == "decode" else None
    calls.clear()
    run = {"generate": lambda save: flowdiff.generate(flow, 10 * x, solver=solver, steps=3, save=save),
           "encode": lambda save: flowdiff.encode(flow, x, solver=solver, steps=3, save=save),
           "decode": lambda save: flowdiff.decode(flow, latent, save=save)}[route]
    with pytest.raises(ValueError, match=rf"Save\(denoised=True\) with the reversible solver '{solver}'.*accepted"):
        run(flowdiff.Save(steps=True, denoised=True))
    assert calls == []
    saved = run(flowdiff.Save(steps=True)).saved
    assert len(saved) == 3 and all(r.denoised is None for r in saved)


def test_save_denoised_with_a_solver_that_is_not_reversible_keeps_x0():
    """The refusal is the reversible solvers' alone: Heun keeps x̂₀ at every saved state but the end, equal to the
    flow's own denoised image there."""
    import _closed_form

    import flowdiff

    flow = _closed_form.mixture()
    result = flowdiff.generate(flow, 10 * _closed_form.noise(0), solver="heun", steps=3,
                               save=flowdiff.Save(steps=True, denoised=True))
    *inner, end = result.saved
    assert end.denoised is None and len(inner) == 2
    for record in inner:
        torch.testing.assert_close(record.denoised, flow.denoised(record.xbar, record.sigma))


class _BatchNormNet(torch.nn.Module):
    """A field with BatchNorm left in training mode: each evaluation updates its running mean, variance and count."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = torch.nn.Linear(4, 8, bias=False, dtype=torch.float64)  # a bias before BatchNorm has no gradient
        self.norm = torch.nn.BatchNorm1d(8, dtype=torch.float64)
        self.out = torch.nn.Linear(8, 4, dtype=torch.float64)

    def forward(self, x, t):
        return self.out(torch.tanh(self.norm(self.inp(x)) * (1.0 + t.to(x.dtype)[:, None] / 1000.0)))


@pytest.mark.parametrize(("solver", "adjoint"), [("euler", "checkpoint"), ("dpmpp_2m", "checkpoint"),
                                                 ("reversible_heun", "checkpoint"), ("reversible_heun", "reversible")])
def test_batchnorm_buffers_end_as_autograds(solver, adjoint):
    """R12: under adjoint='checkpoint' the recomputation ran the model again and updated BatchNorm's running
    statistics a second time (and 'reversible''s inverse steps a third). Gradients equal autograd's, and after the
    backward pass the buffers too, bit for bit."""
    import copy

    import flowdiff

    start = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    base = _BatchNormNet()
    out = {}
    for mode in ("autograd", adjoint):
        net = copy.deepcopy(base)
        x = start.clone().requires_grad_()
        res = flowdiff.generate(flowdiff.ProbabilityFlow(net, flowdiff.Schedule.linear()), x, solver=solver,
                                steps=5, adjoint=mode)
        grads = torch.autograd.grad(res.x.pow(2).sum(), [x, *net.parameters()])
        out[mode] = grads, {k: b.clone() for k, b in net.named_buffers()}
    assert int(out["autograd"][1]["norm.num_batches_tracked"]) > 0  # the buffers did move
    for g, r in zip(out[adjoint][0], out["autograd"][0], strict=True):
        assert float((g - r).norm()) <= 1e-10 * float(r.norm())  # rounding (reversible: of the rebuilt states)
    for name, value in out["autograd"][1].items():
        assert torch.equal(out[adjoint][1][name], value), name
