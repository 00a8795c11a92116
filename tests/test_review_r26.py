"""Review R26 of the session's later changes (sweep 11 on the peers, Z7's compare on zero-terminal-SNR models, S12,
R23–R25): each test failed before its fix."""

from __future__ import annotations

import math
import re

import pytest
import torch

import flowdiff
from flowdiff import Schedule

MEAN, VAR = 0.3, 0.25  # Gaussian data N(MEAN, VAR) per pixel


class _GaussianEps:
    """The exact ε of N(MEAN, VAR) data at timestep t (an epsilon model: no x̂₀ at σ = ∞). Counts its calls."""

    def __init__(self, schedule: Schedule) -> None:
        self.schedule, self.calls = schedule, 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        sigma = float(self.schedule.sigma_at(float(t.reshape(-1)[0])))
        alpha, s = 1 / math.sqrt(1 + sigma**2), sigma / math.sqrt(1 + sigma**2)
        x0 = MEAN + alpha * VAR * (x - alpha * MEAN) / (alpha**2 * VAR + s**2)
        return (x - alpha * x0) / s


def _zero_snr_epsilon_flow() -> tuple[flowdiff.ProbabilityFlow, _GaussianEps]:
    schedule = Schedule.from_config("scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True)
    model = _GaussianEps(schedule)
    return flowdiff.ProbabilityFlow(model, schedule), model


def test_compare_takes_a_given_reference_from_a_finite_sigma_for_an_epsilon_zero_snr_model():
    """Z7 refused every compare of an epsilon model on a zero-terminal-SNR schedule "before any evaluation", also
    with reference= given: the reference its own refusal advises (reference_solution(sigma_start=σ)) was refused
    with "the reference solution starts at σ_max = ∞", which it does not, and the leading grid, whose first σ is
    finite, could not be compared (it ran before Z7). A row from σ = ∞ is skipped with why instead of stopping the
    table."""
    flow, model = _zero_snr_epsilon_flow()
    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    start = float(flowdiff.make_sigmas(flow.schedule, "leading", 4)[0])
    ref = flowdiff.reference_solution(flow, noise, sigma_start=start, rtol=1e-7, atol=1e-7, cache=False)
    result = flowdiff.compare(flow, noise, solvers=["euler"], grids=["leading", "trailing"], nfe=[4], reference=ref)
    assert [(r.grid, r.nfe, r.sigma_start) for r in result.runs] == [("leading", 4, start)]
    alone = flowdiff.generate(flow, noise, solver="euler", grid=flowdiff.Grid("leading", nfe=4))
    assert result.runs[0].rms_error == float((alone.x - ref.x).pow(2).mean().sqrt())
    assert [(s.grid, s.budget) for s in result.skipped] == [("trailing", 4)]
    assert "prediction_type 'epsilon'" in result.skipped[0].reason and "σ = ∞" in result.skipped[0].reason
    calls = model.calls
    with pytest.raises(ValueError, match=r"reference solution starts at the schedule's σ_max = ∞.*compare\(flow, "
                                         r"noise, reference=that, grids=\['leading'\]\)"):
        flowdiff.compare(flow, noise, solvers=["euler"], grids=["leading"], nfe=[4])  # no reference: refused
    assert model.calls == calls  # before any evaluation


class _TanhV(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) * 0.3)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.w) * (1 + t[:, None] / 1000.0)


@pytest.mark.parametrize("direction", ["generate", "encode"])
def test_an_adaptive_data_solve_under_jacfwd_reads_the_models_own_denoised_image(direction):
    """R23's mapped-output check of adaptive solves (under a vmap right around a jvp: jacfwd) wrapped the field and
    dropped its own D = x̂₀ read off a v-prediction (3408973 kept it for fixed grids alone): unipc's data variables
    then read x̄ − σ·ε, and jacfwd's primal in float32 was 6e-7 off the plain solve. It is the plain solve's now, bit
    for bit."""
    flow = flowdiff.ProbabilityFlow(_TanhV(), Schedule.from_config("scaled_linear"), prediction_type="v_prediction")
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(1)) * (1.0 if direction == "generate" else 0.5)

    def solve(y: torch.Tensor) -> torch.Tensor:
        return getattr(flowdiff, direction)(flow, y, solver="unipc", adaptive=flowdiff.Adaptive(rtol=1e-3, atol=1e-3)).x

    plain = solve(x)
    _, primal = torch.func.jacfwd(lambda y: (solve(y), solve(y)), has_aux=True)(x)
    assert torch.equal(primal, plain)


def test_a_reference_from_infinity_refuses_a_sigma_end_at_or_above_where_its_solve_starts():
    """On a zero-terminal-SNR schedule Z7's reference takes the boundary step out of σ = ∞ to the largest finite σ₁
    and solves from there; sigma_end was checked against σ_start = ∞ alone, so a sigma_end above σ₁ was accepted and
    the "solve to σ_end" ran up, away from the data (30 evaluations), and came back as the reference to σ_end."""
    schedule = Schedule.from_config("scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True)

    def v_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -x  # any v; refused before it is called
    flow = flowdiff.ProbabilityFlow(v_model, schedule, prediction_type="v_prediction")
    s1 = float(schedule.sigmas[-2])
    noise = torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for sigma_end in (2 * s1, s1):
        with pytest.raises(ValueError, match=rf"sigma_end must lie in \[0, {s1:.6g}\).*σ = ∞.*got {sigma_end!r}"):
            flowdiff.reference_solution(flow, noise, sigma_end=sigma_end, cache=False)


def _kdiffusion_peer_at_eta_0(target):
    """A Gaussian flow, its noise, k-diffusion's ``target`` run through the peers' harness at eta=0 (budget 6), and a
    counting denoiser of the flow to call k-diffusion's function by hand: (flow, noise, run, calls, counted)."""
    from flowdiff.models.analytic import Gaussian
    from flowdiff.tools import peers as P

    flow = Gaussian(torch.zeros(4, dtype=torch.float64), 0.5, Schedule.linear()).flow()
    noise = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = P.run(P.PeerSampler("k-diffusion", target, "karras", target, {"eta": 0.0}), flow, noise, 6)
    calls = []
    denoiser = flowdiff.to_denoiser(flow)

    def counted(x, sigma, **kw):
        calls.append(1)
        return denoiser(x, sigma, **kw)

    return flow, noise, out, calls, counted


@pytest.mark.parametrize("target", ["sample_dpm_2_ancestral", "sample_dpmpp_2s_ancestral"])
def test_a_two_evaluation_kdiffusion_sampler_at_eta_0_is_sized_as_heun_is(target):
    """S11's check lets k-diffusion's DPM2 ancestral and DPM++ 2S ancestral through at eta=0 as the ODE's peers (no
    fresh noise), but sized them at one evaluation a step: at budget 6 they ran 6 steps, spent 11 evaluations, and
    only then were refused for overspending. Like Heun and DPM2 they spend two a step and one on the last."""
    from flowdiff.tools import peers as P

    flow, noise, out, calls, counted = _kdiffusion_peer_at_eta_0(target)

    sigmas = P.kdiffusion_sigmas(flow, 3)
    by_hand = getattr(P.load_kdiffusion(), target)(counted, noise * (1 + float(sigmas[0]) ** 2) ** 0.5, sigmas,
                                                    disable=True, eta=0.0)
    assert out.nfe == len(calls) == 5 and out.steps == 3
    torch.testing.assert_close(out.x, by_hand, rtol=0, atol=0)


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the reads of a tensor's value to the host (``aten._local_scalar_dense``: ``float(t)``, ``.item()``),
    each a device sync on a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


def _user_loop_reads(make_scheduler, model, noise: torch.Tensor, flow_matching: bool) -> int:
    """The host reads of a diffusers user's set-up and own loop: the model fed the scheduler's timestep tensor as it
    is."""
    with _HostReads() as mode:
        scheduler = make_scheduler()
        x = noise * getattr(scheduler, "init_noise_sigma", 1.0)
        for t in scheduler.timesteps:
            x_in = x if flow_matching else scheduler.scale_model_input(x, t)
            x = scheduler.step(model(x_in, t.reshape(1).expand(noise.shape[0])), t, x).prev_sample
    return mode.reads


@pytest.mark.parametrize("kind", ["v_prediction", "flow_matching"])
def test_the_diffusers_peers_read_no_timestep_to_the_host_inside_their_loop(kind):
    """S11's direct call of a timestep model read the scheduler's timestep to the host twice a step (float(t) for the
    model's time and again for checked_output's message, built on every call), and R25's checked_output added the
    second read to the flow-matching peer: on a GPU each is a sync inside the peer's timed loop, which a diffusers
    user's own loop does not pay (DPM++ 2M, 10 steps: 22 host reads against the user's 1). The harness reads the
    timesteps once, before the loop."""
    from flowdiff.tools import peers as P

    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    if kind == "flow_matching":
        schedule = Schedule.flow_matching(shift=3.0)

        def model(x, t):
            return 0.1 * x * (1 + t.reshape(-1, 1, 1, 1) / 1000) - 0.3
        flow = flowdiff.ProbabilityFlow(model, schedule, prediction_type="velocity")
        samplers = [s for s in P.default_samplers(["diffusers"], flow) if s.left_out is None]
    else:
        def model(x, t):
            return 0.1 * x * (1 + t.reshape(-1, 1, 1, 1) / 1000)
        flow = flowdiff.ProbabilityFlow(model, Schedule.scaled_linear(), prediction_type="v_prediction")
        samplers = list(P.DIFFUSERS_DEFAULT)
    for sampler in samplers:
        def make(sampler=sampler):
            if kind == "flow_matching":
                return P.flow_matching_scheduler(sampler, flow, noise, P._steps(sampler, 10))
            scheduler = P.diffusers_scheduler(sampler, flow)
            scheduler.set_timesteps(10)
            return scheduler

        users = _user_loop_reads(make, model, noise, kind == "flow_matching")
        with _HostReads() as mode:
            out = P.run(sampler, flow, noise, 10)
        # one more: the start σ the row reports, read after the loop
        assert out.nfe <= 10 and mode.reads <= users + 1, (sampler.name, sampler.grid, mode.reads, users)


def test_a_roundtrip_comparison_on_a_zero_snr_model_skips_the_grids_that_end_at_infinity():
    """Z7 made compare's generation table skip what cannot run on a zero-terminal-SNR schedule; compare(task=
    "roundtrip") there stopped at its first default row (trailing, whose encode ends at σ = ∞) with encode's Python
    advice (grid=grid[1:]), so no grid could be compared beside it. It is skipped with why, as karras is."""
    schedule = Schedule.from_config("scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True)

    def v_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -0.5 * x
    flow = flowdiff.ProbabilityFlow(v_model, schedule, prediction_type="v_prediction")
    images = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    result = flowdiff.compare(flow, task="roundtrip", images=images, solvers=["euler"], grids=["trailing", "leading"],
                              nfe=[8])
    assert [(r.grid, r.budget) for r in result.runs] == [("leading", 8)]
    assert [(s.grid, s.budget) for s in result.skipped] == [("trailing", 8)]
    assert "σ = ∞" in result.skipped[0].reason and "grid[1:]" not in result.skipped[0].reason


@pytest.mark.parametrize(("target", "nfe"), [("sample_dpmpp_2m_sde", 6), ("sample_dpmpp_3m_sde", 6),
                                             ("sample_dpmpp_sde", 5)])
def test_a_kdiffusion_sde_sampler_at_eta_0_runs_as_the_odes_peer(target, nfe):
    """S11's check accepts k-diffusion's SDE samplers at eta=0 as the ODE's peers (no fresh noise), but they build a
    torchsde Brownian tree for their noise sampler whatever eta, and flowdiff loads k-diffusion with torchsde stood
    in for: each stopped with "module 'torchsde' has no attribute 'BrownianTree'". The harness gives the noise
    sampler (one of the arguments it owns): at eta=0 its draws are multiplied by 0, so the run equals k-diffusion's
    own function with any noise sampler, here fresh normal draws."""
    from flowdiff.tools import peers as P

    flow, noise, out, calls, counted = _kdiffusion_peer_at_eta_0(target)

    sigmas = P.kdiffusion_sigmas(flow, out.steps)
    x = noise * (1 + float(sigmas[0]) ** 2) ** 0.5
    by_hand = getattr(P.load_kdiffusion(), target)(counted, x, sigmas, disable=True, eta=0.0,
                                                    noise_sampler=lambda s, t: torch.randn_like(x))
    assert out.nfe == len(calls) == nfe
    torch.testing.assert_close(out.x, by_hand, rtol=0, atol=0)


@pytest.mark.parametrize("peer", ["diffusers", "k-diffusion"])
def test_peers_run_refuses_a_zero_snr_schedule_as_compare_does(peer):
    """Z7 refused peers on a zero-terminal-SNR schedule in compare and run_peers alone; flowdiff.tools.peers.run, the
    public call both go through, still ran them: diffusers' Euler returned NaN images as a result, k-diffusion's
    samplers stopped in the model on a NaN σ. It is refused there too, before any evaluation."""
    from flowdiff.tools import peers as P

    schedule = Schedule.from_config("scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True)
    calls = []

    def v_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return -0.5 * x
    flow = flowdiff.ProbabilityFlow(v_model, schedule, prediction_type="v_prediction")
    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    for sampler in P.default_samplers([peer], flow):
        with pytest.raises(ValueError, match=rf"{re.escape(sampler.name)}.*zero-terminal-SNR schedule \(σ_max = ∞\)"):
            P.run(sampler, flow, noise, 6)
    assert not calls


@pytest.mark.parametrize("peer", ["diffusers", "k-diffusion"])
def test_peers_run_checks_its_budget_as_run_peers_does(peer):
    """S11 checked run_peers' budgets; peers.run, public, took any budget: 0 made a k-diffusion "run" of 0
    evaluations whose image was the scaled noise, a diffusers one a ZeroDivisionError, -3 and 2.5 errors from inside
    torch or diffusers, True a run of one step. Each is refused naming budget; a NumPy integer is an int."""
    import numpy as np

    from flowdiff.models.analytic import Gaussian
    from flowdiff.tools import peers as P

    flow = Gaussian(torch.zeros(4, dtype=torch.float64), 0.5, Schedule.linear()).flow()
    noise = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sampler = P.default_samplers([peer])[0]
    for budget, error in ((0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError), ("4", TypeError)):
        with pytest.raises(error, match=rf"budget must be a positive int \(model evaluations\), got {budget!r}"):
            P.run(sampler, flow, noise, budget)
    assert torch.equal(P.run(sampler, flow, noise, np.int64(4)).x, P.run(sampler, flow, noise, 4).x)


# -- fingerprints (R26's findings in flowdiff/engine/fingerprint.py) ------------------------------------------------

class _TwoModels:
    """One object, two models: its methods give different ε (and a counter, not part of either)."""

    def __init__(self) -> None:
        self.scale = torch.tensor(0.5)

    def eps_a(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scale * x

    def eps_b(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -self.scale * x


def test_two_methods_of_one_object_are_two_fingerprints():
    """S12 read a bound method's object, not which method: ``ProbabilityFlow(obj.eps_a)`` and ``(obj.eps_b)`` had one
    fingerprint, so a reference or latent made with one was accepted for the other. The same method twice keeps one."""
    obj, schedule = _TwoModels(), flowdiff.VESchedule()
    a = flowdiff.flow_fingerprint(flowdiff.ProbabilityFlow(obj.eps_a, schedule))
    assert a != flowdiff.flow_fingerprint(flowdiff.ProbabilityFlow(obj.eps_b, schedule))
    assert a == flowdiff.flow_fingerprint(flowdiff.ProbabilityFlow(obj.eps_a, schedule))
    # and still the object's tensors: the same method of an object holding other values is another model
    other = _TwoModels()
    other.scale = torch.tensor(0.25)
    assert a != flowdiff.flow_fingerprint(flowdiff.ProbabilityFlow(other.eps_a, schedule))


@pytest.mark.parametrize("pair", [
    (dict(time="sigma"), dict(time="log_sigma")),
])
def test_ve_schedules_feeding_other_times_are_other_flows(pair):
    """Only ᾱ was digested, so VE's time="sigma" and time="log_sigma" (the network fed σ or ¼·ln σ over one table of
    levels) had one fingerprint: a file made for one flow was accepted for the other."""
    obj = _TwoModels()
    one, two = (flowdiff.ProbabilityFlow(obj.eps_a, flowdiff.VESchedule(**kw)) for kw in pair)
    assert one.schedule.alphas_cumprod.tobytes() == two.schedule.alphas_cumprod.tobytes()
    assert flowdiff.flow_fingerprint(one) != flowdiff.flow_fingerprint(two)


def test_a_plain_schedule_digest_is_unchanged():
    """The schedule's extra fields are digested only for schedules other than the plain table: the shipped model's
    stored grids (`flowdiff/weights/digits.tuned.json`) still find it."""
    flow = flowdiff.pretrained("digits")
    assert flowdiff.stored_grid(flow, "unipc", 10) is not None
