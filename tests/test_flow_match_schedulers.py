"""FlowMatchHeunDiscreteScheduler and FlowMatchLCMScheduler configs, read against diffusers' own schedulers.

Both define the same rectified flow as FlowMatchEulerDiscreteScheduler (``num_train_timesteps``,
``shift``), so ``from_diffusers`` reads a model beside them, and their σ levels are
``scheduler_sigmas``'. Heun's loop is Heun's rule in rectified flow's own variables (t, x), which
``sample_like`` runs as ``flowmatch_heun``; LCM's loop re-noises at every step and is refused.
"""

import json

import _closed_form
import numpy as np
import pytest
import torch

import flowdiff
from flowdiff import from_diffusers, sample_like, scheduler_plan, scheduler_sigmas
from flowdiff.engine.scheduler_grids import schedule_from_config
from flowdiff.models import tiny_pipelines

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

TOL = {"rtol": 2e-5, "atol": 2e-5}


def _sigmas(t):
    with np.errstate(divide="ignore"):
        return np.where(t < 1, t / (1 - t), np.inf)


@pytest.mark.parametrize("config", [{}, {"shift": 3.0}, {"shift": 3.0, "num_train_timesteps": 500}])
@pytest.mark.parametrize("steps", [1, 3, 28])
def test_heun_grid_and_timesteps_are_the_schedulers(config, steps):
    scheduler = diffusers.FlowMatchHeunDiscreteScheduler(**config)
    scheduler.set_timesteps(steps)
    # diffusers lists every inner level twice (Heun's two evaluations there): [t0, t1, t1, …, t_{n-1}, t_{n-1}, 0]
    t = scheduler.sigmas.double().numpy()[0::2]
    grid = scheduler_sigmas(scheduler, steps)
    assert np.array_equal(grid, _sigmas(np.append(t, 0.0)))
    plan = scheduler_plan(scheduler, steps)
    assert plan.solver == "flowmatch_heun" and plan.state == "model"
    assert list(plan.timesteps.values()) == scheduler.timesteps[0::2].double().tolist()
    assert np.array_equal(plan.sigmas, grid)


@pytest.mark.parametrize("config", [{}, {"shift": 3.0}, {"use_dynamic_shifting": True, "mu": 0.7},
                                    {"use_dynamic_shifting": True, "time_shift_type": "linear", "mu": 1.3}])
@pytest.mark.parametrize("steps", [1, 4])
def test_lcm_grid_is_the_schedulers(config, steps):
    config = dict(config)
    mu = config.pop("mu", None)
    scheduler = diffusers.FlowMatchLCMScheduler(**config)
    scheduler.set_timesteps(steps, mu=mu)
    assert np.array_equal(scheduler_sigmas(scheduler, steps, mu=mu), _sigmas(scheduler.sigmas.double().numpy()))


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3")
    net, path, kwargs = tiny_pipelines.sd3_transformer(root, shift=3.0)
    heun_dir = root / "heun"
    diffusers.FlowMatchHeunDiscreteScheduler(shift=3.0).save_pretrained(heun_dir)
    return net, path, kwargs, heun_dir


def _diffusers_loop(net, scheduler, noise, steps, kwargs):
    """diffusers' loop, and how many times it called the network."""
    calls = []
    handle = net.register_forward_hook(lambda *_: calls.append(1))
    try:
        x = tiny_pipelines.flow_match_loop(net, scheduler, noise, steps, **kwargs)
    finally:
        handle.remove()
    return x, len(calls)


@pytest.mark.parametrize("steps", [1, 2, 6])
def test_flow_match_heun_is_the_schedulers_loop(sd3, steps):
    net, path, kwargs, heun_dir = sd3
    flow = from_diffusers(path, scheduler=heun_dir)  # was refused: "the config defines no betas"
    assert flow.prediction_type == "velocity" and flow.schedule.shift == 3.0
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(steps))
    ref, calls = _diffusers_loop(net, diffusers.FlowMatchHeunDiscreteScheduler(shift=3.0), noise, steps, kwargs)
    ours = sample_like(flow, noise, steps=steps, model_kwargs=kwargs)  # the flow's own scheduler config: Heun's
    assert ours.solver == "flowmatch_heun" and ours.stats.nfe == calls == 2 * steps - 1
    torch.testing.assert_close(ours.x, ref, **TOL)
    if steps > 1:  # Heun in σ is another method: its corrector averages ε, not the velocity
        in_sigma = sample_like(flow, noise, steps=steps, solver="heun", model_kwargs=kwargs)
        assert (in_sigma.x - ref).abs().max() > 1e3 * TOL["atol"]


def test_lcm_reads_the_model_and_refuses_the_loop(sd3, tmp_path):
    net, path, kwargs, _ = sd3
    lcm_dir = tmp_path / "lcm"
    diffusers.FlowMatchLCMScheduler(shift=3.0).save_pretrained(lcm_dir)
    flow = from_diffusers(path, scheduler=lcm_dir)
    euler = from_diffusers(path)
    assert flow.prediction_type == "velocity" and np.array_equal(flow.schedule.sigmas, euler.schedule.sigmas)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="FlowMatchLCMScheduler is not reproduced: .*fresh noise"):
        sample_like(flow, noise, steps=4, model_kwargs=kwargs)
    # its σ levels are those of the Euler scheduler of the same shift beside the model
    assert np.array_equal(scheduler_sigmas(lcm_dir, 4), scheduler_sigmas(path.parent / "scheduler", 4))


def test_flow_matching_fields_that_change_the_grid_are_refused_by_name():
    lcm = {"_class_name": "FlowMatchLCMScheduler"}
    for key, value in [("use_karras_sigmas", True), ("invert_sigmas", True), ("shift_terminal", 0.1)]:
        with pytest.raises(ValueError, match=f"{key}"):
            scheduler_sigmas({**lcm, key: value}, 4)
    with pytest.raises(ValueError, match="needs mu"):
        scheduler_sigmas({**lcm, "use_dynamic_shifting": True}, 4)
    heun = diffusers.FlowMatchHeunDiscreteScheduler(shift=2.0)
    with pytest.raises(ValueError, match="mu= and sigmas= are not arguments of FlowMatchHeunDiscreteScheduler"):
        scheduler_plan(heun, 4, mu=0.5)
    with pytest.raises(ValueError, match="mu= and sigmas= are not arguments of FlowMatchHeunDiscreteScheduler"):
        scheduler_sigmas(heun, 4, sigmas=np.linspace(1, 0.25, 4))


def test_a_config_without_class_name_fitting_only_flow_matching_classes():
    # {"shift": 3} fits Euler, Heun and LCM: the schedule is theirs (one definition), the loop is refused unnamed
    schedule, prediction_type = schedule_from_config({"shift": 3.0})
    assert prediction_type == "velocity" and schedule.shift == 3.0
    assert np.array_equal(scheduler_sigmas({"shift": 3.0}, 5),
                          scheduler_sigmas({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}, 5))
    with pytest.raises(ValueError, match="do not identify one scheduler .*FlowMatchHeunDiscreteScheduler"):
        scheduler_plan({"shift": 3.0}, 5)
    # a live Heun config (its keys are exactly Heun's parameters) is Heun's
    assert scheduler_plan(dict(diffusers.FlowMatchHeunDiscreteScheduler().config), 3).solver == "flowmatch_heun"


def test_flowmatch_heun_converges_at_second_order():
    flow = _closed_form.mixture()
    noise = _closed_form.noise(1)
    ref = flowdiff.reference_solution(flow, noise, sigma_end=0.0, rtol=1e-10, atol=1e-10).x
    steps, errors = [8, 16, 32, 64], []
    for n in steps:
        t = np.linspace(flow.schedule.sigma_max / (1 + flow.schedule.sigma_max), 0.0, n + 1)
        grid = t / (1 - t)
        res = flowdiff.generate(flow, noise, solver="flowmatch_heun", grid=grid)
        assert res.stats.nfe == 2 * n - 1  # the last step, into σ = 0, is Euler's
        errors.append(float((res.x - ref).pow(2).mean().sqrt()))
    slope = np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert -2.3 < slope < -1.7, (errors, slope)


def test_flowmatch_heun_is_a_fixed_grid_method():
    flow = _closed_form.mixture()
    with pytest.raises(ValueError, match="'flowmatch_heun' has no error estimate"):
        flowdiff.generate(flow, _closed_form.noise(0), solver="flowmatch_heun", adaptive=flowdiff.Adaptive())
    with pytest.raises(ValueError, match="generation method only"):
        flowdiff.encode(flow, _closed_form.noise(0).tanh(), solver="flowmatch_heun", steps=4)


def test_heun_config_file_loads_and_names_its_class(sd3):
    _, _, _, heun_dir = sd3
    saved = json.loads((heun_dir / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "FlowMatchHeunDiscreteScheduler"
    assert scheduler_plan(heun_dir, 3).scheduler == "FlowMatchHeunDiscreteScheduler"


def test_flowmatch_heun_saved_denoised_is_the_models_at_the_saved_state():
    """FlowMatching.denoised reads x̂₀ = x − t·v off the carried velocity: it must be the model's own x̂₀ there."""
    from flowdiff.models.analytic import Gaussian

    g = Gaussian(torch.linspace(-0.5, 0.5, 4, dtype=torch.float64), 0.5)
    noise = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    r = flowdiff.generate(g.flow(), noise, steps=5, solver="flowmatch_heun",
                          save=flowdiff.Save(steps=True, denoised=True))
    checked = [st for st in r.saved if st.denoised is not None]
    for st in checked:
        exact = st.xbar - st.sigma * g.eps(st.xbar, st.sigma)
        assert torch.allclose(st.denoised, exact, rtol=0, atol=1e-12), (st.step, st.sigma)
    assert len(checked) >= 4
