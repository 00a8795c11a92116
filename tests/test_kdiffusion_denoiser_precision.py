"""``FlowDenoiser`` (a flow as a k-diffusion denoiser) reads D off the model's own prediction, as flowdiff's data
variables do: x̄ − σ·ε cancels at large σ, and on the cosine schedule with v-prediction its float32 D was 2.7e-5 off
float64 where the flow's own D is 1.4e-7 off (R21's find). Flows without that form keep x̄ − σ·ε."""

from __future__ import annotations

import pytest
import torch

from flowdiff.engine.flow import ProbabilityFlow
from flowdiff.engine.scheduler_grids import schedule_from_config
from flowdiff.models.kdiffusion import FlowDenoiser
from flowdiff.tools import scheduler_suite as S


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample", "epsilon"])
def test_the_denoiser_is_the_flows_own_denoised_form(prediction_type: str) -> None:
    config = {"_class_name": "DDIMScheduler", "beta_schedule": "squaredcos_cap_v2", "prediction_type": prediction_type}
    schedule, _ = schedule_from_config(config)
    sigma = float(schedule.sigmas[-2])  # σ ≈ 640
    got = {}
    for dtype in (torch.float64, torch.float32):
        flow = ProbabilityFlow(S.network(dtype), schedule, prediction_type=prediction_type)
        xbar = S._noise(dtype) * sigma
        got[dtype] = FlowDenoiser(flow)(xbar, torch.full((xbar.shape[0],), sigma, dtype=torch.float64))
        assert torch.equal(got[dtype], flow.denoised(xbar, sigma))
        both = FlowDenoiser(flow)(xbar, torch.tensor([sigma, sigma / 2], dtype=torch.float64))  # rows in two σ groups
        assert torch.equal(both[:1], got[dtype][:1]) and torch.equal(both[1:], flow.denoised(xbar[1:], sigma / 2))
    assert S._rel(got[torch.float32], got[torch.float64]) < 1e-6


def test_a_flow_without_the_denoised_form_keeps_x_bar_minus_sigma_eps() -> None:
    base = ProbabilityFlow(S.network(torch.float64), schedule_from_config({"_class_name": "DDIMScheduler"})[0])
    flow = ProbabilityFlow.from_sigma_field(lambda xbar, sigma: base.field()(sigma, xbar), base.schedule)
    xbar, sigma = S._noise(torch.float64) * 3.0, 3.0
    torch.testing.assert_close(FlowDenoiser(flow)(xbar, sigma), xbar - sigma * base.field()(sigma, xbar),
                               rtol=0, atol=1e-14)
