"""from_diffusers: a saved UNet2DModel / pipeline loads offline and generates exactly what diffusers' DDIM loop does."""

import json

import pytest
import torch

import flowdiff
from flowdiff.models.diffusers_io import DiffusersUNet, from_diffusers

diffusers = pytest.importorskip("diffusers")



def _tiny_unet(seed: int = 0, num_class_embeds: int | None = None) -> "diffusers.UNet2DModel":
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
                                 num_class_embeds=num_class_embeds)


def _save(tmp_path, prediction_type="epsilon", **sched):
    unet = _tiny_unet()
    unet.save_pretrained(tmp_path / "unet")
    scheduler = diffusers.DDIMScheduler(clip_sample=False, prediction_type=prediction_type, **sched)
    scheduler.save_pretrained(tmp_path / "scheduler")
    return unet, scheduler


def _ddim_loop(unet, scheduler, noise, steps, alphas_cumprod=None, **unet_kwargs):
    """diffusers' own deterministic DDIM loop; given float64 ᾱ, entirely in float64."""
    if alphas_cumprod is not None:
        scheduler.alphas_cumprod = torch.tensor(alphas_cumprod, dtype=torch.float64)
    scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    scheduler.set_timesteps(steps)
    x = noise
    for t in scheduler.timesteps:
        eps = unet(x, t, **unet_kwargs).sample
        x = scheduler.step(eps, t, x, eta=0.0).prev_sample
    return x


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_generate_euler_matches_diffusers_ddim(tmp_path, prediction_type):
    unet, scheduler = _save(tmp_path, prediction_type)
    flow = from_diffusers(tmp_path / "unet", dtype=torch.float64)  # finds ../scheduler/scheduler_config.json
    assert flow.prediction_type == prediction_type
    assert flow.model.sample_shape == (1, 8, 8)
    noise = torch.randn(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ours = flowdiff.generate(flow, noise, solver="euler", steps=10, grid="leading")
    assert ours.stats.nfe == 10
    ref = _ddim_loop(unet.double().eval(), scheduler, noise, 10, flow.schedule.alphas_cumprod)
    torch.testing.assert_close(ours.x, ref, rtol=1e-10, atol=1e-10)


def test_pipeline_directory_and_class_labels_pass_through(tmp_path):
    unet = _tiny_unet(num_class_embeds=3)
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(clip_sample=False)).save_pretrained(
        tmp_path / "pipe")
    flow = from_diffusers(tmp_path / "pipe")
    assert isinstance(flow.model, DiffusersUNet)
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 2])
    ours = flowdiff.generate(flow, noise, solver="euler", steps=5, grid="leading",
                             model_kwargs={"class_labels": labels})
    ddim = diffusers.DDIMScheduler.from_config(diffusers.DDPMScheduler(clip_sample=False).config)
    with torch.no_grad():
        ref = _ddim_loop(unet.eval(), ddim, noise, 5, class_labels=labels)
    torch.testing.assert_close(ours.x, ref.float(), rtol=1e-4, atol=1e-4)
    other = flowdiff.generate(flow, noise, solver="euler", steps=5, grid="leading",
                              model_kwargs={"class_labels": labels.flip(0)})
    assert not torch.allclose(ours.x, other.x)  # the labels reached the network


def test_schedule_matches_diffusers_alphas_cumprod():
    for beta_schedule in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        scheduler = diffusers.DDPMScheduler(beta_schedule=beta_schedule)
        schedule, _ = flowdiff.models.diffusers_io.schedule_from_config(scheduler.config)
        torch.testing.assert_close(torch.tensor(schedule.alphas_cumprod, dtype=torch.float32),
                                   scheduler.alphas_cumprod, rtol=1e-5, atol=1e-7)


def test_scheduler_argument_forms(tmp_path):
    unet, scheduler = _save(tmp_path, "v_prediction")
    (tmp_path / "scheduler" / "scheduler_config.json").rename(tmp_path / "elsewhere.json")
    with pytest.raises(FileNotFoundError, match="scheduler="):
        from_diffusers(tmp_path / "unet")
    for form in (tmp_path / "elsewhere.json", scheduler, dict(scheduler.config)):
        assert from_diffusers(tmp_path / "unet", scheduler=form).prediction_type == "v_prediction"
    with pytest.raises(TypeError, match="scheduler must be"):
        from_diffusers(tmp_path / "unet", scheduler=3)


def test_bad_directories_and_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        from_diffusers(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a diffusers model or pipeline"):
        from_diffusers(tmp_path / "empty")
    with pytest.raises(TypeError, match="path"):
        from_diffusers(3)
    _save(tmp_path)
    weights = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="could not load .*diffusion_pytorch_model.safetensors"):
        from_diffusers(tmp_path / "unet")
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        from_diffusers(tmp_path / "unet")


def test_unsupported_model_class(tmp_path):
    _save(tmp_path)
    config_path = tmp_path / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["_class_name"] = "UNet3DConditionModel"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="UNet3DConditionModel.*supported: UNet2DModel"):
        from_diffusers(tmp_path / "unet")


@pytest.mark.parametrize("change, match", [
    ({"beta_schedule": "exp"}, "beta_schedule 'exp'"),
    ({"prediction_type": "flow_prediction"}, "prediction_type 'flow_prediction'"),
    ({"beta_end": 2.0}, "betas"),
])
def test_unsupported_scheduler_configs(tmp_path, change, match):
    _save(tmp_path)
    path = tmp_path / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    config.update(change)
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match) as info:
        from_diffusers(tmp_path / "unet")
    assert "scheduler_config.json" in str(info.value)
