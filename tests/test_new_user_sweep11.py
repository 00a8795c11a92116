"""New-user sweep 11: comparing flowdiff with its peers (k-diffusion, diffusers) through flowdiff's wrappers.

Each test checks a peer run through :mod:`flowdiff.tools.peers` / :func:`flowdiff.compare` against the peer's own
code called by hand (same σ grid, model calls counted), or a message a user meets there.
"""

from __future__ import annotations

import pytest
import torch

import flowdiff
from flowdiff.engine.schedules import Schedule
from flowdiff.tools import peers as P

diffusers = pytest.importorskip("diffusers")

SCALED_LINEAR = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                 "num_train_timesteps": 1000}


def _gaussian_model(schedule: Schedule, calls: list, prediction_type: str):
    """A timestep model predicting v or x₀ for data N(0, 0.5·I), defined at every (fractional) timestep."""

    def model(x_t: torch.Tensor, t: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        calls.append((float(t.reshape(-1)[0]), scale))
        sigma = torch.as_tensor(schedule.sigma_at(t.detach().double().cpu().numpy()), dtype=x_t.dtype)
        ac = (1.0 / (1.0 + sigma * sigma)).reshape(-1, *[1] * (x_t.ndim - 1))
        eps = scale * x_t * (1 - ac).sqrt() / (0.5 * ac + 1 - ac)
        x0 = (x_t - (1 - ac).sqrt() * eps) / ac.sqrt()
        return x0 if prediction_type == "sample" else ac.sqrt() * eps - (1 - ac).sqrt() * x0

    return model


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
@pytest.mark.parametrize("sampler", P.DIFFUSERS_DEFAULT, ids=lambda s: s.name)
def test_a_v_or_x0_model_through_the_diffusers_peers_equals_a_diffusers_users_own_loop(sampler, prediction_type):
    # a diffusers user with a v-prediction model sets prediction_type="v_prediction" and lets the scheduler convert
    # v at its own σ; the harness converted v to ε at the σ of the (rounded) timestep: DPM++ 2M Karras, whose
    # integer timesteps sit off its Karras σ, moved 7.6e-4 away from the user's loop (x₀: 3.2e-4)
    schedule = Schedule.scaled_linear()
    calls: list = []
    model = _gaussian_model(schedule, calls, prediction_type)
    flow = flowdiff.ProbabilityFlow(model, schedule, prediction_type=prediction_type)
    noise = torch.randn(2, 1, 3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = P.run(sampler, flow, noise, 7, {"scale": 0.9})
    assert out.nfe == len(calls) == 7 and {s for _, s in calls} == {0.9}
    calls.clear()
    scheduler = getattr(diffusers, sampler.target).from_config({**SCALED_LINEAR, "prediction_type": prediction_type,
                                                               **sampler.options})
    scheduler.set_timesteps(7)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(model(scheduler.scale_model_input(x, t), t.reshape(1), scale=0.9), t, x).prev_sample
    assert len(calls) == 7
    # left (≤ 7e-7 measured): diffusers' scaled_linear betas in float32 against the flow's float64 table; on main
    # DPM++ 2M Karras was 8.1e-4 (v) and 9.9e-6 (x₀) off, Euler 2.7e-6 (v)
    torch.testing.assert_close(out.x, x, rtol=0, atol=2e-6)


def _gaussian_flow(schedule: Schedule | None = None) -> flowdiff.ProbabilityFlow:
    from flowdiff.models.analytic import Gaussian

    return Gaussian(torch.zeros(4, dtype=torch.float64), 0.5, schedule or Schedule.linear()).flow()


def _empty_comparison(flow, noise) -> flowdiff.Comparison:
    ref = flowdiff.reference_solution(flow, noise, rtol=1e-5, atol=1e-5)
    return flowdiff.Comparison([], reference=ref)


def test_run_peers_takes_its_budgets_as_compare_takes_nfe():
    # run_peers(..., budgets=5) was "'int' object is not iterable", budgets=[0] ran nothing and said nothing
    # (every sampler "skipped"), budgets=[5, 5] gave every row twice
    flow = _gaussian_flow()
    noise = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    one = flowdiff.tools.compare.run_peers(_empty_comparison(flow, noise), flow, noise, "k-diffusion", 5)
    twice = flowdiff.tools.compare.run_peers(_empty_comparison(flow, noise), flow, noise, "k-diffusion", [5, 5])
    assert [(r.solver, r.budget, r.nfe) for r in one.runs] == [(r.solver, r.budget, r.nfe) for r in twice.runs]
    assert len(one.runs) == len(P.KDIFFUSION_DEFAULT)
    for r, s in zip(one.runs, twice.runs):
        assert torch.equal(torch.tensor(r.rms_error), torch.tensor(s.rms_error))
    with pytest.raises(ValueError, match=r"budgets.*positive ints, got 0"):
        flowdiff.tools.compare.run_peers(_empty_comparison(flow, noise), flow, noise, "k-diffusion", [0])
    with pytest.raises(TypeError, match=r"budgets must be an int or a list of ints"):
        flowdiff.tools.compare.run_peers(_empty_comparison(flow, noise), flow, noise, "k-diffusion", "10")


@pytest.mark.parametrize("peer", P.PEERS)
def test_an_error_inside_a_peers_run_says_which_peer_sampler_and_budget(peer):
    # the model's own error came out bare: with nine peer rows a user could not tell which sampler met it
    flow = _gaussian_flow()
    noise = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    result = _empty_comparison(flow, noise)

    def failing(x_t, t):
        raise RuntimeError("the model failed")

    with pytest.raises(RuntimeError, match="the model failed") as info:
        flowdiff.tools.compare.run_peers(result, flowdiff.ProbabilityFlow(failing, flow.schedule), noise, peer, 4)
    first = P.default_samplers([peer])[0]
    assert info.value.__notes__ == [f"while running the peer {peer}: {first.name} / {first.grid} at NFE 4 "
                                    "(flowdiff.tools.peers.run)"]


@pytest.mark.parametrize("steps", [6, 8])
def test_the_ddim_peer_is_flowdiffs_euler_on_trailing_only_where_the_budget_divides_T(steps):
    # the default comparison's DDIM row "checks the harness" against euler / trailing: true at 8 | 1000 steps; at 6,
    # diffusers' step goes to t − 1000 // 6 = t − 166 while its rounded trailing timesteps are 166 or 167 apart
    flow = flowdiff.pretrained("digits")
    noise = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ddim = P.run(P.DIFFUSERS_DEFAULT[0], flow, noise, steps)
    euler = flowdiff.generate(flow, noise, solver="euler", grid=flowdiff.Grid("trailing", nfe=steps))
    assert ddim.nfe == euler.stats.nfe == steps
    gap = float((ddim.x - euler.x).abs().max())
    scheduler = P.diffusers_scheduler(P.DIFFUSERS_DEFAULT[0], flow)
    scheduler.set_timesteps(steps)
    listed = scheduler.timesteps.tolist()
    stepped_to = [t - 1000 // steps for t in listed[:-1]]
    if stepped_to == listed[1:]:
        assert gap < 1e-5  # the digits network computes in float32
    else:
        assert steps == 6 and gap > 1e-3


def test_the_reports_best_per_budget_table_shows_the_nfe_spent_where_it_is_not_the_budget():
    # compare.md's first table gave k-diffusion's Heun at budget 10 without saying it spent 9 (its tables below did)
    from flowdiff.tools.report import best_table

    flow = _gaussian_flow()
    noise = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    result = flowdiff.compare(flow, noise, solvers=["heun"], grids=["karras"], nfe=[10], rtol=1e-5, atol=1e-5,
                              peers=["k-diffusion"])
    heun = [r for r in result.runs if r.solver == "heun"]
    assert {r.nfe for r in heun} == {9}  # counted: 5 steps, the last one Euler's
    table = best_table(result)
    cells = [cell.strip() for line in table.splitlines()[2:] for cell in line.split("|")[2:-1]]
    assert len(cells) == 2  # flowdiff's and k-diffusion's best at NFE 10
    for cell in cells:
        run = next(r for r in result.runs if cell.startswith(f"{r.solver} / {r.grid}: {r.rms_error:.2e}"))
        assert cell.endswith(f" ({run.nfe})") == (run.nfe != 10)
    assert "heun / karras" in table and "(9)" in table


@pytest.mark.parametrize(("target", "options", "match"), [
    ("sample_euler_ancestral", {}, r"sample_euler_ancestral with eta=1\.0 adds fresh noise at every step"),
    ("sample_euler", {"s_churn": 5.0}, r"sample_euler with s_churn=5\.0 adds fresh noise"),
    ("sample_dpmpp_2m_sde", {}, r"eta=1\.0 adds fresh noise"),
    ("sample_dpm_fast", {}, r"no sampler 'sample_dpm_fast' on a σ grid; accepted targets: .*sample_euler"),
    ("sample_eulr", {}, r"no sampler 'sample_eulr' on a σ grid; accepted targets: .*sample_euler"),
    ("sample_lms", {"eta": 0.0}, r"sample_lms option\(s\) eta are not its options.*it takes: order"),
    ("sample_euler", {"sigmas": [1.0, 0.0]}, r"option\(s\) sigmas are not its options"),
])
def test_a_kdiffusion_sampler_that_is_not_the_odes_peer_is_refused_by_name(target, options, match):
    # PeerSampler("k-diffusion", ..., "sample_euler_ancestral") ran, adding noise every step, and was measured against
    # the ODE's reference; s_churn likewise; an unknown target was an AttributeError of a private module name, an
    # option k-diffusion's function lacks a TypeError, sample_dpm_fast (no σ grid) a TypeError inside k-diffusion
    flow = _gaussian_flow()
    noise = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=match):
        P.run(P.PeerSampler("k-diffusion", "mine", "karras", target, options), flow, noise, 6)


def test_a_peer_never_spends_more_than_its_budget_through_run(monkeypatch):
    # peers.run(PeerSampler(..., "sample_dpm_2"), budget=6) spent 11 evaluations and returned them as a result (only
    # run_peers checked, and only its default samplers reach it); DPM2 spends as Heun does, so it is sized as Heun is
    flow = _gaussian_flow()
    noise = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    K = P.load_kdiffusion()
    calls = []
    denoiser = flowdiff.to_denoiser(flow)

    def counted(x, sigma, **kw):
        calls.append(1)
        return denoiser(x, sigma, **kw)

    dpm2 = P.run(P.PeerSampler("k-diffusion", "dpm_2", "karras", "sample_dpm_2"), flow, noise, 6)
    sigmas = P.kdiffusion_sigmas(flow, 3)
    by_hand = K.sample_dpm_2(counted, noise * (1 + float(sigmas[0]) ** 2) ** 0.5, sigmas, disable=True)
    assert dpm2.nfe == len(calls) == 5 and dpm2.steps == 3
    torch.testing.assert_close(dpm2.x, by_hand, rtol=0, atol=0)
    monkeypatch.setattr(P, "_TWO_A_STEP", ())  # DPM2 sized at one evaluation a step: the run overspends
    with pytest.raises(ValueError, match=r"sample_dpm_2 spent 11 model evaluations of a budget of 6"):
        P.run(P.PeerSampler("k-diffusion", "dpm_2", "karras", "sample_dpm_2"), flow, noise, 6)


def test_an_unknown_diffusers_scheduler_is_named():
    flow = _gaussian_flow()
    noise = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"has no scheduler 'DDIMSchedular'; a diffusers peer's target is a scheduler"):
        P.run(P.PeerSampler("diffusers", "mine", "trailing", "DDIMSchedular"), flow, noise, 6)
