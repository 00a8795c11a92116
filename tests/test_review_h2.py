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
