"""compare's diffusers peers on flow-matching flows: the FlowMatch schedulers an SD3/Flux user runs.

The harness check: diffusers' FlowMatchEulerDiscreteScheduler, run by :mod:`flowdiff.tools.peers` through its own
``set_timesteps``/``step`` loop on the flow's velocity, equals flowdiff's ``euler`` on the grid that scheduler
holds (read off the scheduler, or :func:`flowdiff.sample_like`'s ``scheduler_sigmas`` for its own spacing), fed the
same timesteps, to float rounding. The model is a tiny random SD3 transformer saved with ``save_pretrained`` and
loaded back by :func:`flowdiff.from_diffusers` (no network); Flux's packed latents with its pipeline's ``mu``
and ``sigmas`` too. VP flows keep their VP peers; configurations the flow cannot express are left out with why.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import flowdiff
from flowdiff import from_diffusers, sample_like
from flowdiff.models import tiny_pipelines
from flowdiff.models.analytic import Gaussian
from flowdiff.tools import peers, report
from flowdiff.tools.compare import Comparison, run_peers

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

TOL = {"rtol": 2e-5, "atol": 2e-5}
SPACINGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    net, path, kwargs = tiny_pipelines.sd3_transformer(tmp_path_factory.mktemp("sd3"), shift=3.0)
    return path, kwargs


def _noise(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _sampler(flow, name: str, grid: str) -> peers.PeerSampler:
    found = [s for s in peers.default_samplers(["diffusers"], flow) if s.name == name and s.grid.startswith(grid)]
    assert len(found) == 1, [(s.name, s.grid) for s in peers.default_samplers(["diffusers"], flow)]
    return found[0]


def _euler_on_schedulers_grid(flow, scheduler, noise, kwargs):
    """flowdiff's euler on the σ = t/(1−t) grid the diffusers scheduler holds, fed its timesteps, from its sample
    ``noise`` at its first t (x = x̄/(1+σ); generate takes x̄/√(1+σ²))."""
    t = scheduler.sigmas.double().numpy()
    with np.errstate(divide="ignore"):
        grid = np.where(t < 1, t / (1 - t), np.inf)
    fed = dict(zip(grid[:-1].tolist(), scheduler.timesteps.double().tolist()))
    if np.isfinite(grid[0]):
        noise = noise * ((1 + grid[0]) / math.sqrt(1 + grid[0] ** 2))
    return flowdiff.generate(flow.with_timesteps(fed), noise, solver="euler", grid=grid, model_kwargs=kwargs)


@pytest.mark.parametrize("config", [{"shift": 3.0}, {"shift": 1.0, "num_train_timesteps": 500},
                                    {"shift": 2.0, "shift_terminal": 0.1}])
@pytest.mark.parametrize("budget", [1, 4])
def test_flowmatch_euler_peer_is_flowdiffs_euler_on_its_grid(sd3, config, budget):
    path, kwargs = sd3
    flow = from_diffusers(path, scheduler={"_class_name": "FlowMatchEulerDiscreteScheduler", **config})
    noise = _noise(2, 4, 8, 8)
    sampler = _sampler(flow, "FlowMatch Euler", "linspace")
    assert sampler.left_out is None and sampler.options["shift"] == config["shift"]
    if "shift_terminal" in config and budget == 1:
        assert "NaN" in peers.fits(sampler, budget)  # diffusers' own stretch: 0/0
        return
    out = peers.run(sampler, flow, noise, budget, kwargs)
    assert out.nfe == out.steps == budget and out.sigma_start == math.inf
    if "shift_terminal" in config:  # scheduler_sigmas does not know shift_terminal: the grid is read off diffusers
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**config)
        scheduler.set_timesteps(budget)
        ours = _euler_on_schedulers_grid(flow, scheduler, noise, kwargs)
    else:  # the spacing of the flow's own config: sample_like's grid (scheduler_sigmas) and timesteps
        ours = sample_like(flow, noise, steps=budget, model_kwargs=kwargs)
    assert ours.stats.nfe == budget
    torch.testing.assert_close(out.x, ours.x, **TOL)


@pytest.mark.parametrize("spacing", ["karras", "exponential", "beta"])
def test_flowmatch_euler_spacings_are_flowdiffs_euler_on_the_schedulers_grid(sd3, spacing):
    path, kwargs = sd3
    flow = from_diffusers(path)  # the FlowMatchEulerDiscreteScheduler(shift=3) saved beside it
    noise = _noise(2, 4, 8, 8, seed=1)
    sampler = _sampler(flow, "FlowMatch Euler", spacing)
    assert sampler.options[f"use_{spacing}_sigmas"] is True and sampler.grid == f"{spacing}, shift 3"
    out = peers.run(sampler, flow, noise, 5, kwargs)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, **{f"use_{spacing}_sigmas": True})
    scheduler.set_timesteps(5)
    ours = _euler_on_schedulers_grid(flow, scheduler, noise, kwargs)
    assert out.nfe == ours.stats.nfe == 5
    torch.testing.assert_close(out.x, ours.x, **TOL)


def test_dynamic_shift_uses_the_sd3_pipelines_mu(sd3):
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    path, kwargs = sd3
    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True, "base_shift": 0.3,
              "max_shift": 1.4}
    flow = from_diffusers(path, scheduler=config)
    noise = _noise(2, 4, 8, 8, seed=2)
    mu = calculate_shift((8 // 2) * (8 // 2), 256, 4096, 0.3, 1.4)  # SD3's pipeline: latents' patches, patch 2
    sampler = _sampler(flow, "FlowMatch Euler", "linspace")
    assert sampler.grid == "linspace, mu"
    out = peers.run(sampler, flow, noise, 3, kwargs)
    ours = sample_like(flow, noise, steps=3, mu=mu, model_kwargs=kwargs)
    torch.testing.assert_close(out.x, ours.x, **TOL)
    heun = _sampler(flow, "FlowMatch Heun", "linspace")  # Heun has shift alone: left out, not run with another grid
    assert "use_dynamic_shifting" in heun.left_out and peers.fits(heun, 3).startswith("left out: ")
    with pytest.raises(ValueError, match="left out on this flow"):
        peers.run(heun, flow, noise, 3, kwargs)


@pytest.mark.parametrize("budget", [3, 4])
def test_flowmatch_heun_peer_is_sample_like(sd3, budget):
    path, kwargs = sd3
    flow = from_diffusers(path)
    noise = _noise(2, 4, 8, 8, seed=3)
    sampler = _sampler(flow, "FlowMatch Heun", "linspace")
    out = peers.run(sampler, flow, noise, budget, kwargs)
    steps = (budget + 1) // 2  # two evaluations a step, one on the last (into t = 0)
    assert out.steps == steps and out.nfe == 2 * steps - 1 <= budget
    heun = {"_class_name": "FlowMatchHeunDiscreteScheduler", "shift": 3.0}
    ours = sample_like(flow, noise, heun, steps, model_kwargs=kwargs)
    assert ours.stats.nfe == out.nfe
    torch.testing.assert_close(out.x, ours.x, **TOL)


@pytest.mark.parametrize("target", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_multistep_flow_sigma_peers_run_on_the_velocity(sd3, target):
    """DPM++/UniPC on flow σ: their loop on the peers' velocity. First order (DPM-Solver++(1), UniPC's bh2 of order 1
    without corrector: DDIM) is flowdiff's euler on their grid and integer timesteps; the default (2M) spends the
    budget exactly and starts at their own first σ, t < 1, not at t = 1."""
    path, kwargs = sd3
    flow = from_diffusers(path)
    noise = _noise(2, 4, 8, 8, seed=4)
    name = "DPM++ 2M flow" if target.startswith("DPM") else "UniPC flow"
    sampler = _sampler(flow, name, "flow sigmas")
    assert sampler.options["flow_shift"] == 3.0 and sampler.options["prediction_type"] == "flow_prediction"
    out = peers.run(sampler, flow, noise, 6, kwargs)
    own = getattr(diffusers, target)(**sampler.options)
    own.set_timesteps(6)
    first = float(own.sigmas[0])  # rectified flow's t, below 1
    assert out.nfe == out.steps == 6 and out.sigma_start == first / (1 - first) < math.inf
    assert torch.isfinite(out.x).all()
    assert peers.fits(sampler, 300) is None and "repeat" in peers.fits(sampler, 500)  # integer timesteps, T = 1000
    first_order = {"solver_order": 1}
    if target.startswith("UniPC"):
        first_order["disable_corrector"] = [0, 1, 2]
    one = peers.PeerSampler("diffusers", name, "flow sigmas", target, {**sampler.options, **first_order})
    # in float64 (the network in its float32): in float32 Euler's x̄ + (σ' − σ)·ε at σ ≈ 3000 rounds to ~1e-4
    got = peers.run(one, flow, noise.double(), 3, kwargs)
    scheduler = getattr(diffusers, target)(**one.options)
    scheduler.set_timesteps(3)
    ours = _euler_on_schedulers_grid(flow, scheduler, noise.double(), kwargs)
    assert got.nfe == ours.stats.nfe == 3
    torch.testing.assert_close(got.x, ours.x, **TOL)


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    return tiny_pipelines.flux(tmp_path_factory.mktemp("fluxpipe"))


def test_flux_flowmatch_euler_peer_is_the_pipelines_loop(flux):
    """On Flux's packed latents the peer is given FluxPipeline's mu and sigmas (as sample_like, which equals the
    pipeline: tests/test_text_pipelines.py)."""
    _, path = flux
    flow = from_diffusers(path)
    noise = _noise(2, 16, 16, seed=5)
    cond = flow.encode_prompt(["a cat", "dog"])
    sampler = _sampler(flow, "FlowMatch Euler", "linspace")
    assert sampler.grid == "linspace, Flux sigmas, mu"
    out = peers.run(sampler, flow, noise, 3, cond)
    ours = sample_like(flow, noise, steps=3, model_kwargs=cond)
    assert out.nfe == ours.stats.nfe == 3
    torch.testing.assert_close(out.x, ours.x, **TOL)


def test_vp_flows_keep_the_vp_peers():
    flow = Gaussian(torch.zeros(1, 4, 4), 0.5).flow()
    assert peers.default_samplers(["diffusers"], flow) == list(peers.DIFFUSERS_DEFAULT)
    assert peers.default_samplers(["diffusers", "k-diffusion"], flow) == peers.default_samplers(
        ["diffusers", "k-diffusion"])
    assert all(peers.peer_set("diffusers", s.name) == peers.VP_SET for s in peers.DIFFUSERS_DEFAULT)
    assert all(peers.peer_set("diffusers", s.name) == peers.FLOW_MATCHING_SET for s in peers.FLOW_MATCHING_DEFAULT)
    assert peers.peer_set("k-diffusion", "euler") is None


def _velocity_flow(**config) -> flowdiff.ProbabilityFlow:
    """Rectified flow of Gaussian data N(0, 0.25 I) as a velocity model(x, t): v = E[ε − x₀ | x_t]."""
    schedule = flowdiff.FlowMatchingSchedule(1000, 2.0)

    def model(x, t):
        tau = (t / 1000.0).reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        var = 0.25 * (1 - tau) ** 2 + tau ** 2  # x = (1−t)·x₀ + t·ε
        return x * (tau - 0.25 * (1 - tau)) / var

    flow = flowdiff.ProbabilityFlow(model, schedule, prediction_type="velocity")
    if config:
        flow.scheduler_config = {"_class_name": "FlowMatchEulerDiscreteScheduler", **config}
    return flow


def test_configs_the_flow_cannot_express_are_left_out_with_why():
    eps = Gaussian(torch.zeros(1, 4, 4), 0.25)
    native = flowdiff.ProbabilityFlow.from_sigma_field(lambda xbar, sigma: eps.eps(xbar, sigma),
                                                       flowdiff.FlowMatchingSchedule(1000, 2.0))
    left = {(s.name, s.grid): s.left_out for s in peers.default_samplers(["diffusers"], native)}
    assert all("σ-native" in why for (name, _), why in left.items() if name.startswith("FlowMatch"))
    assert all(why is None for (name, _), why in left.items() if not name.startswith("FlowMatch"))
    for key, value, where in (("stochastic_sampling", True, "stochastic_sampling=True"),
                              ("invert_sigmas", True, "invert_sigmas=True"),
                              ("use_dynamic_shifting", True, "sequence length")):
        flow = _velocity_flow(**{key: value})
        why = _sampler(flow, "FlowMatch Euler", "linspace").left_out
        assert why is not None and where in why, why
    dpm = _sampler(_velocity_flow(shift_terminal=0.1), "DPM++ 2M flow", "flow sigmas")
    assert "shift_terminal" in dpm.left_out


def test_run_peers_and_report_say_which_peer_set_ran(tmp_path):
    flow = _velocity_flow(use_dynamic_shifting=False, shift=2.0, stochastic_sampling=True)
    noise = _noise(2, 1, 4, 4, seed=6).double()
    ref = flowdiff.Reference(noise, math.inf, 0.0, "none", 0.0, 0.0, 0, 0.0, 0.0)  # labels only, from t = 1
    result = run_peers(Comparison([], reference=ref), flow, noise, ["diffusers"], [2, 4])
    ran = {(r.solver, r.grid) for r in result.runs}
    assert ("UniPC flow", "flow sigmas, shift 2") in ran and ("DPM++ 2M flow", "flow sigmas, shift 2") in ran
    assert ("FlowMatch Heun", "linspace, shift 2") in ran  # Heun has no stochastic_sampling: it runs the ODE
    skipped = {(s.solver, s.budget): s.reason for s in result.skipped}
    assert all(skipped[("FlowMatch Euler", b)].startswith("left out: the flow's config has stochastic_sampling")
               for b in (2, 4))
    assert {r.source for r in result.runs} == {"diffusers"}
    assert all(r.nfe == (2 * r.steps - 1 if r.solver == "FlowMatch Heun" else r.budget) for r in result.runs)
    assert {report.family(r) for r in result.runs} == {"diffusers, flow matching"}
    assert report.peer_sets(result) == {"diffusers": peers.FLOW_MATCHING_SET}
    paths = report.write_report(result, tmp_path / "report", facts={})
    text = paths["report"].read_text()
    assert f"- **diffusers peers**: {peers.FLOW_MATCHING_SET}" in text
    assert "stochastic_sampling" in text  # the left-out rows, with why

    vp = Gaussian(torch.zeros(1, 4, 4), 0.25).flow()
    vp_noise = _noise(2, 1, 4, 4, seed=7).double()
    vp_ref = flowdiff.Reference(vp_noise, vp.schedule.sigma_max, 0.0, "none", 0.0, 0.0, 0, 0.0, 0.0)
    vp_result = run_peers(Comparison([], reference=vp_ref), vp, vp_noise, ["diffusers"], [3])
    assert {r.solver for r in vp_result.runs} == {s.name for s in peers.DIFFUSERS_DEFAULT}
    assert report.peer_sets(vp_result) == {"diffusers": peers.VP_SET}
    assert {report.family(r) for r in vp_result.runs} == {"diffusers"}


def test_an_option_the_installed_diffusers_lacks_is_left_out(monkeypatch):
    real = peers._parameters

    def without_beta(target):
        params = real(target)
        return params - {"use_beta_sigmas"} if target == "FlowMatchEulerDiscreteScheduler" else params

    monkeypatch.setattr(peers, "_parameters", without_beta)
    flow = _velocity_flow(shift=2.0)
    beta = _sampler(flow, "FlowMatch Euler", "beta")
    assert beta.left_out == ("the installed diffusers' FlowMatchEulerDiscreteScheduler has no use_beta_sigmas "
                             "(this configuration is it)")
    assert _sampler(flow, "FlowMatch Euler", "karras").left_out is None


def _constant_velocity_end(target: str, **options) -> tuple[float, float]:
    """A scheduler's loop on flow σ from x = 0 with the velocity v = 1 everywhere, whose ODE solution moves x by −t₀
    exactly (every consistent method integrates a constant field exactly): where it ends, and −t₀."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DEIS's notes on its options
        scheduler = getattr(diffusers, target)(**options)
        scheduler.set_timesteps(6)
        x = torch.zeros(1, 2, dtype=torch.float64)
        for t in scheduler.timesteps:
            x = scheduler.step(torch.ones(1, 2, dtype=torch.float64), t, x).prev_sample
    return float(x[0, 0]), -float(scheduler.sigmas[0])


def test_the_multistep_peers_solve_the_ode_and_deis_does_not():
    for sampler in peers.flow_matching_samplers(_velocity_flow(shift=3.0)):
        if sampler.options.get("use_flow_sigmas"):
            end, exact = _constant_velocity_end(sampler.target, **sampler.options)
            assert end == pytest.approx(exact, abs=1e-6), sampler
    end, exact = _constant_velocity_end("DEISMultistepScheduler", use_flow_sigmas=True, flow_shift=3.0,
                                        prediction_type="flow_prediction")
    assert abs(end - exact) > 0.1, "DEIS now solves the ODE on flow σ: make it a peer (NOT_FLOW_MATCHING_PEERS)"
    assert "DEISMultistepScheduler" in peers.NOT_FLOW_MATCHING_PEERS
    assert not {s.target for s in peers.FLOW_MATCHING_DEFAULT} & set(peers.NOT_FLOW_MATCHING_PEERS)
