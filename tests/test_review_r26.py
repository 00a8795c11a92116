"""Review R26 of the session's later changes (sweep 11 on the peers, Z7's compare on zero-terminal-SNR models, S12,
R23–R25): each test failed before its fix."""

from __future__ import annotations

import math

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
    with pytest.raises(ValueError, match=r"reference solution starts at the schedule's σ_max = ∞"):
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


@pytest.mark.parametrize("target", ["sample_dpm_2_ancestral", "sample_dpmpp_2s_ancestral"])
def test_a_two_evaluation_kdiffusion_sampler_at_eta_0_is_sized_as_heun_is(target):
    """S11's check lets k-diffusion's DPM2 ancestral and DPM++ 2S ancestral through at eta=0 as the ODE's peers (no
    fresh noise), but sized them at one evaluation a step: at budget 6 they ran 6 steps, spent 11 evaluations, and
    only then were refused for overspending. Like Heun and DPM2 they spend two a step and one on the last."""
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

    sigmas = P.kdiffusion_sigmas(flow, 3)
    by_hand = getattr(P.load_kdiffusion(), target)(counted, noise * (1 + float(sigmas[0]) ** 2) ** 0.5, sigmas,
                                                    disable=True, eta=0.0)
    assert out.nfe == len(calls) == 5 and out.steps == 3
    torch.testing.assert_close(out.x, by_hand, rtol=0, atol=0)
