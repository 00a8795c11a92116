"""Zero-terminal-SNR schedules (ᾱ_{T−1} = 0, σ_max = ∞): the boundary step out of σ = ∞ equals diffusers' DDIM.

A tiny random UNet2DModel with a DDIMScheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction",
timestep_spacing="trailing") config, saved and loaded back: flowdiff's Euler on the scheduler's grid must be
diffusers' own loop to float rounding; encoding to σ = ∞ is refused, and encoding to the last finite level
round-trips exactly.
"""

import math

import numpy as np
import pytest
import torch
from _tiny_unet import tiny_unet

import flowdiff
import solvers
from flowdiff import Schedule, from_diffusers, sample_like
from flowdiff.engine.schedules import rescale_zero_terminal_snr

diffusers = pytest.importorskip("diffusers")

ZERO_SNR = {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing",
            "clip_sample": False, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


@pytest.fixture(scope="module")
def zero_snr(tmp_path_factory):
    root = tmp_path_factory.mktemp("zsnr")
    unet = tiny_unet(diffusers)
    unet.save_pretrained(root / "unet")
    diffusers.DDIMScheduler(**ZERO_SNR).save_pretrained(root / "scheduler")
    return unet, root / "unet"


def _ddim_loop(unet, scheduler, noise, steps, alphas_cumprod=None):
    """diffusers' deterministic DDIM loop; given float64 ᾱ (and the float64 UNet), entirely in float64."""
    if alphas_cumprod is not None:
        scheduler.alphas_cumprod = torch.tensor(alphas_cumprod, dtype=torch.float64)
        scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    scheduler.set_timesteps(steps)
    x = noise
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
    return x


def _noise(dtype=torch.float32, seed=1):
    return torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_the_schedule_is_diffusers_rescaled_one():
    scheduler = diffusers.DDIMScheduler(**ZERO_SNR)
    schedule = flowdiff.models.diffusers_io.schedule_from_config(scheduler.config)[0]
    assert schedule.zero_terminal_snr and schedule.alphas_cumprod[-1] == 0 and schedule.sigma_max == math.inf
    np.testing.assert_allclose(schedule.alphas_cumprod, scheduler.alphas_cumprod.double().numpy(), rtol=2e-5,
                               atol=1e-7)
    # Lin et al.'s rescale keeps ᾱ_0 and makes √ᾱ affine in the original √ᾱ
    plain = Schedule.scaled_linear()
    root = np.sqrt(rescale_zero_terminal_snr(plain.alphas_cumprod))
    assert root[0] == pytest.approx(math.sqrt(plain.alphas_cumprod[0]), rel=1e-15)
    slope = np.diff(root) / np.diff(np.sqrt(plain.alphas_cumprod))
    np.testing.assert_allclose(slope, slope[0], rtol=1e-9)


def test_timestep_and_sigma_at_are_inverse_up_to_infinity():
    schedule = Schedule.from_config("scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True)
    T = schedule.num_train_timesteps
    assert schedule.timestep(math.inf) == T - 1 and schedule.sigma_at(T - 1) == math.inf
    for t in (0.5, 500.25, T - 2, T - 1.5, T - 1.001):  # the last interval is linear in α = 1/√(1+σ²)
        assert schedule.timestep(schedule.sigma_at(t)) == pytest.approx(t, abs=1e-9)
    s = [schedule.sigma_at(t) for t in np.linspace(T - 2, T - 1.0001, 50)]
    assert np.all(np.diff(s) > 0) and np.isfinite(s).all()
    a_mid = 1 / math.sqrt(1 + schedule.sigma_at(T - 1.5) ** 2)
    assert a_mid == pytest.approx(0.5 / math.sqrt(1 + schedule.sigmas[T - 2] ** 2), rel=1e-12)
    with pytest.raises(ValueError, match="finite sigma_max"):
        flowdiff.make_sigmas(schedule, "karras", 5)
    assert flowdiff.make_sigmas(schedule, "karras", 5, sigma_max=100.0)[0] == 100.0


@pytest.mark.parametrize("steps", [1, 4, 10])
def test_euler_on_the_trailing_grid_is_diffusers_ddim_loop(zero_snr, steps):
    unet, path = zero_snr
    flow = from_diffusers(path, dtype=torch.float64)
    assert flow.prediction_type == "v_prediction" and flow.schedule.zero_terminal_snr
    grid = flow.scheduler_sigmas(steps)
    assert grid[0] == math.inf and grid[-1] == 0
    noise = _noise(torch.float64)
    ref = _ddim_loop(unet.double(), diffusers.DDIMScheduler(**ZERO_SNR), noise, steps, flow.schedule.alphas_cumprod)
    ours = flowdiff.generate(flow, noise, grid=grid)  # generate takes σ = ∞ as its boundary step
    assert ours.stats.nfe == steps and ours.sigmas[0] == math.inf
    torch.testing.assert_close(ours.x, ref, rtol=1e-10, atol=1e-10)
    named = flowdiff.generate(flow, noise, steps=steps, grid="trailing")  # flowdiff's own trailing grid: the same
    assert np.array_equal(named.sigmas, grid)
    torch.testing.assert_close(named.x, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sample_like(flow, noise, steps=steps).x, ref, rtol=1e-10, atol=1e-10)
    unet.float()


def test_float32_against_diffusers_own_float32_loop(zero_snr):
    unet, path = zero_snr
    flow = from_diffusers(path)
    noise = _noise()
    ref = _ddim_loop(unet, diffusers.DDIMScheduler(**ZERO_SNR), noise, 10)  # diffusers' float32 ᾱ and step
    ours = sample_like(flow, noise, steps=10)
    torch.testing.assert_close(ours.x, ref, rtol=2e-5, atol=2e-5)
    assert ref.abs().max() > 0.1
    # any solver runs the finite rest after the same boundary step
    heun = flowdiff.generate(flow, noise, steps=10, solver="heun")
    assert heun.stats.nfe == 1 + 2 * 8 + 1 and 0 < (heun.x - ref).abs().max() < ref.abs().max()


def test_encoding_to_infinity_is_refused_and_the_last_finite_level_round_trips(zero_snr):
    _, path = zero_snr
    flow = from_diffusers(path)
    images = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with pytest.raises(ValueError, match=r"ends at σ = ∞.*grid=grid\[1:\]"):
        flowdiff.encode(flow, images, steps=5)
    grid = flow.scheduler_sigmas(10)[1:]
    enc = flowdiff.encode(flow, images, solver="reversible_heun", grid=grid)
    assert enc.latent.sigmas[-1] == grid[0] < math.inf
    assert torch.equal(flowdiff.decode(flow, enc.latent).x, images)


def test_an_epsilon_model_cannot_start_at_infinity(tmp_path, zero_snr):
    unet, _ = zero_snr
    unet.save_pretrained(tmp_path / "unet")
    diffusers.DDIMScheduler(**{**ZERO_SNR, "prediction_type": "epsilon"}).save_pretrained(tmp_path / "scheduler")
    flow = from_diffusers(tmp_path / "unet")
    with pytest.raises(ValueError, match="'epsilon' defines no clean estimate at σ = ∞"):
        flowdiff.generate(flow, _noise(), steps=4)
    grid = flow.scheduler_sigmas(4)
    assert flowdiff.generate(flow, _noise(), grid=grid[1:]).x.isfinite().all()  # from the last finite level


def test_solves_with_no_step_out_of_infinity_are_refused_by_name(zero_snr):
    _, path = zero_snr
    flow = from_diffusers(path)
    noise, images = _noise(), _noise().clamp(-1, 1)
    for call, what in ((lambda: flowdiff.generate(flow, noise, solver="dopri5",
                                                  adaptive=flowdiff.Adaptive(rtol=1e-3, atol=1e-3)),
                        "an adaptive solve"),
                       (lambda: flowdiff.encode(flow, images, solver="dopri5",
                                                adaptive=flowdiff.Adaptive(rtol=1e-3, atol=1e-3)),
                        "an adaptive solve"),
                       (lambda: flowdiff.generate(flow, noise, steps=4, solver=flowdiff.Stochastic(1.0, generator=0)),
                        r"the stochastic \(eta\) process")):  # compare starts as generate: test_compare_zero_snr
        with pytest.raises(ValueError, match=f"{what} cannot start or end at σ = ∞"):
            call()
    with pytest.raises(ValueError, match="ends at σ = ∞"):
        flowdiff.encode(flow, images, steps=4, solver=flowdiff.Inversion("fixed_point"))
    # from a finite start they run: an adaptive solve from the scheduler grid's second level
    start = float(flow.scheduler_sigmas(10)[1])
    res = flowdiff.generate(flow, noise, solver="dopri5",
                            adaptive=flowdiff.Adaptive(rtol=1e-3, atol=1e-3, sigma_start=start))
    assert res.x.isfinite().all() and res.sigmas[0] == start


def test_the_cli_samples_from_infinity_and_refuses_to_encode_there(zero_snr, tmp_path, capsys):
    from PIL import Image

    from flowdiff import cli

    _, path = zero_snr
    out = tmp_path / "s.png"
    assert cli.main(["sample", "--model", str(path), "--num", "2", "--steps", "5", "--scale", "1",
                     "--out", str(out)]) == 0
    assert "5 NFE, 5 steps" in capsys.readouterr().out
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8), mode="L").save(tmp_path / "a.png")
    assert cli.main(["encode", str(tmp_path / "a.png"), "--model", str(path), "--steps", "5",
                     "--out", str(tmp_path / "l.safetensors")]) == 2  # a usage error naming the flag that runs
    err = capsys.readouterr().err
    assert "end at σ = ∞" in err and "give --grid leading" in err and "grid[1:]" not in err


def test_float16_noise_keeps_a_float32_state_after_the_boundary_step(zero_snr):
    _, path = zero_snr
    f16 = from_diffusers(path, dtype=torch.float16)
    noise = _noise()
    half = flowdiff.generate(f16, noise.half(), steps=10)
    assert half.x.dtype == torch.float16 and half.stats.nfe == 10
    full = flowdiff.generate(from_diffusers(path), noise, steps=10).x
    assert (half.x.float() - full).abs().max() < 2e-2 * full.abs().max()


@pytest.mark.parametrize("steps", [1, 4])
def test_a_non_finite_step_out_of_infinity_is_named_as_step_0(steps):
    # a v-prediction model that returns NaN at its last timestep (σ = ∞) only
    schedule = Schedule(rescale_zero_terminal_snr(Schedule.linear().alphas_cumprod))

    def model(x, t):
        return torch.where(t.view(-1, 1, 1, 1) >= schedule.num_train_timesteps - 1, torch.nan, 0.0) * x

    flow = flowdiff.ProbabilityFlow(model, schedule, prediction_type="v_prediction")
    with pytest.raises(solvers.SolveError, match=r"step 0 \(σ inf -> .*non-finite") as err:
        flowdiff.generate(flow, _noise(), steps=steps)
    assert err.value.step == 0 and err.value.stats.nfe == steps  # the loop's statistics of the whole first run
    assert flowdiff.generate(flow, _noise(), steps=steps, checks=flowdiff.Checks(finite=False)).x.isnan().all()
