"""compare on a zero-terminal-SNR schedule (σ_max = ∞): the reference and the rows start as generate does.

A v-prediction model of Gaussian data (exact, smooth, so the tight reference is cheap) on diffusers' rescaled
scaled-linear schedule: the reference is the boundary step out of σ = ∞ to the largest finite σ, then the adaptive
solve, which the closed form and a fine fixed grid from σ = ∞ both reproduce; each row's NFE is the model calls
counted during it. An epsilon model is refused before any evaluation, in the command line as a usage error.
"""

import math

import numpy as np
import pytest
import torch
from _tiny_unet import tiny_unet

import flowdiff
from flowdiff import Schedule
from flowdiff.tools.compare import run_peers
from flowdiff.tools.reference import clear_reference_cache

diffusers = pytest.importorskip("diffusers")

ZERO_SNR = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "clip_sample": False,
            "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
MEAN, VAR = 0.3, 0.25  # the data: N(MEAN, VAR) per pixel


class GaussianV:
    """The exact prediction of N(MEAN, VAR) data at timestep t, σ = ∞ included (α = 0, s = 1): v = α·ε̂ − s·x̂₀
    (``v_prediction``) or ε̂ (``epsilon``), with x̂₀ = E[x₀ | x] and ε̂ = (x − α·x̂₀)/s. Counts its calls."""

    def __init__(self, schedule, prediction_type="v_prediction"):
        self.schedule, self.prediction_type, self.calls = schedule, prediction_type, 0

    def __call__(self, x, t):
        self.calls += 1
        sigma = float(self.schedule.sigma_at(float(t.reshape(-1)[0])))
        alpha, s = (0.0, 1.0) if sigma == math.inf else (1 / math.sqrt(1 + sigma**2), sigma / math.sqrt(1 + sigma**2))
        x0 = MEAN + alpha * VAR * (x - alpha * MEAN) / (alpha**2 * VAR + s**2)
        eps = (x - alpha * x0) / s
        return alpha * eps - s * x0 if self.prediction_type == "v_prediction" else eps


def _schedule():
    return Schedule.from_config("scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True)


def _flow(prediction_type="v_prediction"):
    schedule = _schedule()
    model = GaussianV(schedule, prediction_type)
    return flowdiff.ProbabilityFlow(model, schedule, prediction_type=prediction_type), model


def _noise(dtype=torch.float64):
    return torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(3), dtype=dtype)


def test_the_reference_starts_with_generates_boundary_step():
    flow, _ = _flow()
    assert flow.schedule.sigma_max == math.inf
    noise = _noise()
    s1 = float(flow.schedule.sigmas[-2])  # the largest finite σ: where the boundary step out of σ = ∞ lands
    assert math.isfinite(s1)
    ref = flowdiff.reference_solution(flow, noise, cache=False)
    assert ref.sigma_start == math.inf and ref.x.isfinite().all()
    # out of σ = ∞: x̄₁ = x̂₀ + σ₁·noise = MEAN + σ₁·noise; the ODE of Gaussian data in closed form to σ_min, where
    # the Euler step into 0 lands on the denoised image MEAN + VAR/(VAR + σ²)·(x̄ − MEAN)
    s_min = flow.schedule.sigma_min
    at_min = math.sqrt((VAR + s_min**2) / (VAR + s1**2)) * s1 * noise
    torch.testing.assert_close(ref.x, MEAN + VAR / (VAR + s_min**2) * at_min, rtol=0, atol=1e-8)
    # to σ = 0: the adaptive generate from the boundary step's state
    ref = flowdiff.reference_solution(flow, noise, sigma_end=0.0, cache=False)
    tight = flowdiff.generate(flow, flow.step_from_noise(noise, s1), solver="dopri8",
                              adaptive=flowdiff.Adaptive(rtol=1e-9, atol=1e-9, sigma_start=s1))
    torch.testing.assert_close(ref.x, tight.x, rtol=0, atol=1e-8)
    assert ref.nfe == 1 + tight.stats.nfe  # the boundary step's one evaluation is counted


def test_compares_reference_is_the_limit_of_generate_from_infinity():
    flow, _ = _flow()
    noise = _noise()
    clear_reference_cache()
    result = flowdiff.compare(flow, noise, solvers=["euler"], grids=["trailing"], nfe=[4])
    ref = flowdiff.reference_solution(flow, noise, cache=False)
    assert torch.equal(result.reference.x, ref.x) and result.reference.sigma_start == math.inf
    s1 = float(flow.schedule.sigmas[-2])
    errors = []
    for steps in (32, 64):  # a fixed grid from σ = ∞ through σ₁ to σ_min, then the Euler step into 0, as the reference
        grid = np.concatenate([[math.inf], flowdiff.make_sigmas(flow.schedule, "logsnr", steps, sigma_max=s1)])
        out = flowdiff.generate(flow, noise, solver="rk4", grid=grid)
        assert out.stats.nfe == 1 + 4 * (steps - 1) + 1
        errors.append(float((out.x - ref.x).abs().max()))
    assert errors[1] < errors[0] / 8 and errors[1] < 1e-5  # rk4 converges on it (order 4: ÷16 per halving)


def test_every_row_starts_at_infinity_and_its_nfe_is_the_calls_counted():
    flow, model = _flow()
    noise = _noise(torch.float32)
    marks = []
    result = flowdiff.compare(flow, noise, solvers=["euler", "heun", "dpmpp_2m"], nfe=[3, 6],
                              progress=lambda label: marks.append((label, model.calls)))
    assert result.reference.sigma_start == math.inf
    counted = {label: after - before for (label, before), (_, after) in zip(marks, [*marks[1:], ("", model.calls)])}
    assert {r.grid for r in result.runs} == {"trailing"}  # the default grids that have a first σ here
    assert len(result.runs) == 6 and not result.skipped
    previous = {}
    for row in result.runs:
        assert row.sigma_start == math.inf and row.nfe <= row.budget
        assert row.nfe == counted[f"{row.solver}/{row.grid}/NFE {row.budget}"]
        assert math.isfinite(row.rms_error) and row.rms_error > 0
        if row.solver in previous:
            assert row.rms_error < previous[row.solver]  # budget 6 after 3: closer to the reference
        previous[row.solver] = row.rms_error
    named = flowdiff.compare(flow, noise, solvers=["euler"], grids=["trailing", "karras"], nfe=[4])
    assert [s.grid for s in named.skipped] == ["karras"] and "finite sigma_max" in named.skipped[0].reason


def test_an_epsilon_model_is_refused_before_any_evaluation():
    flow, model = _flow("epsilon")
    for call in (lambda: flowdiff.compare(flow, _noise(), solvers=["euler"], grids=["trailing"], nfe=[4]),
                 lambda: flowdiff.reference_solution(flow, _noise(), cache=False)):
        with pytest.raises(ValueError, match=r"prediction_type 'epsilon'.*σ_max = ∞.*accepted from σ = ∞: a model with "
                                             r"prediction_type 'v_prediction' or 'sample'"):
            call()
    assert model.calls == 0
    start = float(flowdiff.make_sigmas(flow.schedule, "trailing", 10)[1])  # from a finite σ it is solved
    assert flowdiff.reference_solution(flow, _noise(), sigma_start=start, rtol=1e-6, atol=1e-6).x.isfinite().all()


def test_peers_are_refused_there_before_any_evaluation():
    flow, model = _flow()
    noise = _noise(torch.float32)
    with pytest.raises(ValueError, match=r"peers=\['diffusers'\].*zero-terminal-SNR.*σ_max = ∞.*leave peers= out"):
        flowdiff.compare(flow, noise, solvers=["euler"], nfe=[4], peers="diffusers")
    result = flowdiff.compare(flow, noise, solvers=["euler"], nfe=[4])
    calls = model.calls
    with pytest.raises(ValueError, match=r"peers=\['k-diffusion'\].*σ_max = ∞"):
        run_peers(result, flow, noise, "k-diffusion", [4])
    assert model.calls == calls and len(result.runs) == 1


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("zsnr_compare")
    unet = tiny_unet(diffusers)
    for prediction_type in ("v_prediction", "epsilon"):
        unet.save_pretrained(root / prediction_type / "unet")
        diffusers.DDIMScheduler(**ZERO_SNR, prediction_type=prediction_type).save_pretrained(
            root / prediction_type / "scheduler")
    return root


def test_the_cli_compares_a_v_model_and_refuses_an_epsilon_one_as_a_usage_error(unet_dir, tmp_path, capsys):
    from flowdiff import cli

    flags = ["--batch", "1", "--nfe", "4", "--solver", "euler", "--rtol", "1e-3", "--no-progress"]
    assert cli.main(["compare", "--model", str(unet_dir / "v_prediction" / "unet"), *flags,
                     "--out", str(tmp_path / "v")]) == 0
    out = capsys.readouterr().out
    assert "from σ=∞ (the boundary step out of pure noise to σ=" in out and "best at NFE 4: euler / trailing" in out
    assert cli.main(["compare", "--model", str(unet_dir / "epsilon" / "unet"), *flags,
                     "--out", str(tmp_path / "eps")]) == 2
    err = capsys.readouterr().err
    assert "prediction_type 'epsilon'" in err and "σ_max = ∞" in err and "'v_prediction' or 'sample'" in err
    assert "--grid leading" in err and "grid[1:]" not in err and "sigma_start=" not in err
    assert not (tmp_path / "eps" / "reference.safetensors").exists()
    assert cli.main(["compare", "--model", str(unet_dir / "v_prediction" / "unet"), *flags, "--peers", "diffusers",
                     "--out", str(tmp_path / "peers")]) == 2
    err = capsys.readouterr().err
    assert "--peers diffusers" in err and "σ_max = ∞" in err and "leave --peers out" in err
