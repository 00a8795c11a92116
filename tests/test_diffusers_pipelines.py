"""Latent pipelines, flow-matching transformers and DiT from local diffusers folders, equal to diffusers' own loops.

Every model is tiny and random, built here, saved with save_pretrained and loaded back from disk
(no network). flowdiff's Euler on the scheduler's grid must equal the pipeline's loop to float
rounding; reversible encodings in latent space must decode back bit for bit.
"""


import numpy as np
import pytest
import torch

import flowdiff
from flowdiff import from_diffusers, sample_like, scheduler_sigmas
from flowdiff.models import tiny_pipelines

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

SCHEDULER_CONFIGS = {
    "default": {},
    "offset_no_alpha_one": {"steps_offset": 1, "set_alpha_to_one": False},
}
TOL = {"rtol": 2e-5, "atol": 2e-5}


def build_sd(root, **scheduler_config):
    return tiny_pipelines.stable_diffusion(root, **scheduler_config)


@pytest.fixture(scope="module", params=list(SCHEDULER_CONFIGS))
def sd(request, tmp_path_factory):
    return build_sd(tmp_path_factory.mktemp(request.param), **SCHEDULER_CONFIGS[request.param])


def _noise(shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("guidance", [1.0, 7.5])
def test_stable_diffusion_euler_is_the_pipelines_ddim_loop(sd, guidance):
    pipe, path = sd
    flow = from_diffusers(path)
    assert flow.autoencoder is not None and flow.sample_shape == (4, 8, 8)
    prompts, negative = ["a cat", "dog"], ["bad", ""]
    noise = _noise((2, 4, 8, 8))
    with torch.no_grad():
        ref = pipe(prompts, num_inference_steps=5, guidance_scale=guidance, output_type="latent", latents=noise.clone(),
                   height=16, width=16, negative_prompt=negative if guidance > 1 else None).images
    cond = flow.encode_prompt(prompts)
    guided = flow if guidance == 1 else flowdiff.classifier_free_guidance(
        flow, guidance, unconditional_kwargs=flow.encode_prompt(negative))
    ours = sample_like(guided, noise, steps=5, model_kwargs=cond)
    assert ours.stats.nfe == 5
    grid = flow.scheduler_sigmas(5)
    assert (grid[-1] == 0) == pipe.scheduler.config.set_alpha_to_one
    torch.testing.assert_close(ours.x, ref, **TOL)
    with torch.no_grad():
        ref_images = pipe.vae.decode(ref / pipe.vae.config.scaling_factor).sample
    torch.testing.assert_close(flow.autoencoder.decode(ours.x), ref_images, **TOL)
    # the prompt reaches the UNet: another prompt gives other latents
    other = sample_like(guided, noise, steps=5, model_kwargs=flow.encode_prompt(["dog", "a cat"]))
    assert (other.x - ours.x).abs().max() > 1e-3


def test_prompt_embeddings_are_the_pipelines(sd):
    pipe, path = sd
    flow = from_diffusers(path)
    with torch.no_grad():
        ref, ref_neg = pipe.encode_prompt(["a cat"], "cpu", 1, True, negative_prompt=["dog"])
    torch.testing.assert_close(flow.encode_prompt(["a cat"])["encoder_hidden_states"], ref, rtol=0, atol=0)
    torch.testing.assert_close(flow.encode_prompt(["dog"])["encoder_hidden_states"], ref_neg, rtol=0, atol=0)
    with pytest.raises(TypeError, match="prompts"):
        flow.encode_prompt("a cat")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_latent_round_trip_is_exact_and_returns_the_autoencoders_reconstruction(sd, dtype):
    _, path = sd
    flow = from_diffusers(path, dtype=dtype)
    assert next(flow.model.parameters()).dtype == dtype
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    latents = flow.autoencoder.encode(images)
    assert latents.dtype == torch.float32 and latents.shape == (2, 4, 8, 8)
    guided = flowdiff.classifier_free_guidance(flow, 7.5, unconditional_kwargs=flow.encode_prompt(["", ""]))
    cond = flow.encode_prompt(["a cat", "dog"])
    enc = flowdiff.encode(guided, latents, solver="reversible_heun", steps=6, model_kwargs=cond)
    assert (enc.x - latents).abs().max() > 0.1  # it went somewhere
    back = flowdiff.decode(guided, enc.latent, model_kwargs=cond)
    assert torch.equal(back.x, latents)
    assert torch.equal(flow.autoencoder.decode(back.x), flow.autoencoder.decode(latents))


def test_float16_model_follows_the_float32_one(sd):
    _, path = sd
    f32, f16 = from_diffusers(path), from_diffusers(path, dtype=torch.float16)
    noise = _noise((2, 4, 8, 8), seed=5)
    cond32, cond16 = f32.encode_prompt(["a cat", "dog"]), f16.encode_prompt(["a cat", "dog"])
    assert cond16["encoder_hidden_states"].dtype == torch.float16
    a = sample_like(f32, noise, steps=5, model_kwargs=cond32).x
    b = sample_like(f16, noise, steps=5, model_kwargs=cond16).x
    assert b.dtype == torch.float32
    assert (a - b).abs().max() < 2e-2 * a.abs().max()


# -- flow matching -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return tiny_pipelines.sd3_transformer(tmp_path_factory.mktemp("sd3"))


def test_flow_matching_euler_is_the_schedulers_loop(sd3):
    net, path, kwargs = sd3
    flow = from_diffusers(path)
    assert flow.prediction_type == "velocity" and flow.schedule.kind == "flow_matching"
    assert flow.schedule.shift == 3.0
    noise = _noise((2, 4, 8, 8), seed=2)
    ref = tiny_pipelines.flow_match_loop(net, diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), noise, 6, **kwargs)
    ours = sample_like(flow, noise, steps=6, model_kwargs=kwargs)
    assert ours.stats.nfe == 6 and np.isinf(ours.sigmas[0]) and ours.sigmas[-1] == 0
    torch.testing.assert_close(ours.x, ref, **TOL)
    # any other solver runs the same ODE: Heun on the same grid lands near Euler's answer, not on it
    heun = sample_like(flow, noise, steps=6, solver="heun", model_kwargs=kwargs)
    assert 0 < (heun.x - ref).abs().max() < ref.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_flow_matching_round_trip_is_exact(sd3, dtype):
    _, path, kwargs = sd3
    flow = from_diffusers(path, dtype=dtype)
    latents = _noise((2, 4, 8, 8), seed=4)
    grid = flow.scheduler_sigmas(8)[1:]  # a round trip needs a finite σ_max: drop the t = 1 level
    kw = {k: v.to(dtype) for k, v in kwargs.items()}
    enc = flowdiff.encode(flow, latents, solver="reversible_heun", grid=grid, model_kwargs=kw)
    back = flowdiff.decode(flow, enc.latent, model_kwargs=kw)
    assert torch.equal(back.x, latents)


# -- DiT ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    return tiny_pipelines.dit(tmp_path_factory.mktemp("dit"))


def test_dit_euler_is_the_pipelines_ddim_loop(dit):
    pipe, path = dit
    flow = from_diffusers(path)
    assert flow.autoencoder is not None and flow.prompt_encoder is None
    labels = [3, 7]
    with torch.no_grad():
        ref = pipe(class_labels=labels, guidance_scale=4.0, generator=torch.Generator().manual_seed(0),
                   num_inference_steps=5, output_type="pt").images
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    null = {"class_labels": torch.tensor([1000] * 2)}  # DiT's null class
    guided = flowdiff.classifier_free_guidance(flow, 4.0, unconditional_kwargs=null)
    ours = sample_like(guided, noise, steps=5, model_kwargs={"class_labels": torch.tensor(labels)})
    images = (flow.autoencoder.decode(ours.x) / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(images, ref, **TOL)
    assert ref.std() > 1e-3  # not clamped flat


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dit_round_trip_is_exact(dit, dtype):
    _, path = dit
    flow = from_diffusers(path, dtype=dtype)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(8)) * 2 - 1
    latents = flow.autoencoder.encode(images)
    kw = {"class_labels": torch.tensor([1, 2])}
    enc = flowdiff.encode(flow, latents, solver="reversible_heun", steps=5, model_kwargs=kw)
    back = flowdiff.decode(flow, enc.latent, model_kwargs=kw)
    assert torch.equal(back.x, latents)
    assert torch.equal(flow.autoencoder.decode(back.x), flow.autoencoder.decode(latents))


# -- scheduler grids ---------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [
    {}, {"steps_offset": 1}, {"set_alpha_to_one": False}, {"steps_offset": 1, "set_alpha_to_one": False},
    {"timestep_spacing": "trailing"},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1},
])
@pytest.mark.parametrize("steps", [1, 4, 10])
def test_ddim_grid_is_the_schedulers(config, steps):
    scheduler = diffusers.DDIMScheduler(clip_sample=False, **config)
    scheduler.set_timesteps(steps)
    schedule = flowdiff.models.diffusers_io.schedule_from_config(scheduler.config)[0]
    if not scheduler.config.set_alpha_to_one and scheduler.timesteps[-1] == 0:  # a last step σ_min → σ_min
        if steps == 1:
            with pytest.raises(ValueError, match="steps=1 with set_alpha_to_one=False"):
                scheduler_sigmas(scheduler, steps)
            return
        assert np.array_equal(scheduler_sigmas(scheduler, steps), schedule.sigmas[scheduler.timesteps.numpy()])
        return
    grid = scheduler_sigmas(scheduler, steps)
    assert np.array_equal(grid[:-1], schedule.sigmas[scheduler.timesteps.numpy()])
    acp_end = float(scheduler.final_alpha_cumprod)  # float32: 1 − ᾱ₀ ≈ 1e-4 keeps ~3 digits there
    assert grid[-1] == pytest.approx(np.sqrt((1 - acp_end) / acp_end), rel=1e-3, abs=0)
    assert np.array_equal(grid, scheduler_sigmas(dict(scheduler.config), steps))


@pytest.mark.parametrize("config", [{}, {"shift": 3.0}, {"shift": 3.0, "num_train_timesteps": 500},
                                    {"use_dynamic_shifting": True, "mu": 0.7},
                                    {"use_dynamic_shifting": True, "time_shift_type": "linear", "mu": 1.3}])
@pytest.mark.parametrize("steps", [1, 3, 28])
def test_flow_matching_grid_is_the_schedulers(config, steps):
    config = dict(config)
    mu = config.pop("mu", None)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**config)
    scheduler.set_timesteps(steps, mu=mu)
    t = scheduler.sigmas.double().numpy()
    grid = scheduler_sigmas(scheduler.config, steps, mu=mu)
    with np.errstate(divide="ignore"):
        assert np.array_equal(grid, np.where(t < 1, t / (1 - t), np.inf))
    assert grid[0] == np.inf and grid[-1] == 0


def test_grids_refuse_what_is_no_single_grid():
    with pytest.raises(ValueError, match="lands on 333 while the next step starts at 332"):
        scheduler_sigmas(diffusers.DDIMScheduler(timestep_spacing="trailing", clip_sample=False), 3)
    with pytest.raises(ValueError, match="lands on 30 while the next step starts at 27"):
        scheduler_sigmas(diffusers.DDIMScheduler(timestep_spacing="linspace", num_train_timesteps=41,
                                                 clip_sample=False), 4)
    with pytest.raises(ValueError, match="clip_sample=True"):
        scheduler_sigmas(diffusers.DDIMScheduler(), 5)
    with pytest.raises(ValueError, match="knows the grids of"):
        scheduler_sigmas(diffusers.PNDMScheduler(), 5)
    with pytest.raises(ValueError, match="needs mu"):
        scheduler_sigmas(diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), 5)
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        scheduler_sigmas({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_karras_sigmas": True}, 5)
    with pytest.raises(ValueError, match="steps_offset"):
        scheduler_sigmas(diffusers.DDIMScheduler(steps_offset=1, clip_sample=False), 1000)


# -- files ---------------------------------------------------------------------------------------------

def test_missing_and_corrupt_files_are_named(sd):
    import shutil

    _, path = sd
    broken = path.parent / "broken"
    shutil.copytree(path, broken)
    weights = broken / "text_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"text_encoder.*model\.safetensors"):
        from_diffusers(broken)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="no weights in .*text_encoder"):
        from_diffusers(broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(FileNotFoundError, match="vae"):
        from_diffusers(broken)
    shutil.rmtree(broken)
    shutil.copytree(path, broken)
    (broken / "tokenizer" / "tokenizer.json").write_text("{not json")
    for f in (broken / "tokenizer").iterdir():
        if f.name != "tokenizer.json":
            f.unlink()
    with pytest.raises(ValueError, match=r"tokenizer.*tokenizer\.json"):
        from_diffusers(broken)
    shutil.rmtree(broken)


def test_readme_section_runs():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("### Stable Diffusion, DiT and flow-matching transformers", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("```", 1)[0] for b in section.split("```python\n")[1:]]
    assert blocks, "the README section has no python example"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


# -- Flux: packed latents, timestep / 1000, resolution-dependent shift ------------------------------------

def test_flux_euler_is_the_pipelines_loop(tmp_path):
    torch.manual_seed(3)
    net = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                           attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                           pooled_projection_dim=8, axes_dims_rope=(2, 2, 4)).eval()
    net.save_pretrained(tmp_path / "transformer")
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0)
    scheduler.save_pretrained(tmp_path / "scheduler")
    g = torch.Generator().manual_seed(0)
    kwargs = {"encoder_hidden_states": torch.randn(2, 3, 16, generator=g),
              "pooled_projections": torch.randn(2, 8, generator=g),
              "img_ids": torch.rand(16, 3, generator=g), "txt_ids": torch.zeros(3, 3)}
    noise = torch.randn(2, 16, 16, generator=g)  # 16 packed tokens of 16 channels
    steps, mu = 4, 0.8
    base = np.linspace(1.0, 1 / steps, steps)  # what FluxPipeline passes to set_timesteps
    scheduler.set_timesteps(sigmas=base, mu=mu)
    x = noise
    with torch.no_grad():
        for t in scheduler.timesteps:  # FluxPipeline's loop: the transformer takes timestep / 1000
            v = net(hidden_states=x, timestep=t.expand(2) / 1000, return_dict=False, **kwargs)[0]
            x = scheduler.step(v, t, x).prev_sample
    flow = from_diffusers(tmp_path / "transformer")
    assert flow.sample_shape is None and flow.schedule.shift == 1.0  # the shift is the grid's (mu)
    ours = sample_like(flow, noise, steps=steps, mu=mu, sigmas=base, model_kwargs=kwargs)
    torch.testing.assert_close(ours.x, x, **TOL)
    t = scheduler.sigmas.double().numpy()
    with np.errstate(divide="ignore"):
        assert np.array_equal(ours.sigmas, np.where(t < 1, t / (1 - t), np.inf))  # the same grid, to the bit
    enc = flowdiff.encode(flow, noise, solver="reversible_heun", grid=ours.sigmas[1:], model_kwargs=kwargs)
    assert torch.equal(flowdiff.decode(flow, enc.latent, model_kwargs=kwargs).x, noise)


def test_sample_like_refuses_bad_input(sd3):
    _, path, kwargs = sd3
    flow = from_diffusers(path)
    noise = _noise((2, 4, 8, 8))
    with pytest.raises(TypeError, match="steps="):
        sample_like(flow, noise, model_kwargs=kwargs)
    with pytest.raises(TypeError, match="noise"):
        sample_like(flow, noise.long(), steps=2, model_kwargs=kwargs)
    plain = flowdiff.ProbabilityFlow(flow.model, flow.schedule, prediction_type="velocity")
    with pytest.raises(ValueError, match="scheduler="):
        sample_like(plain, noise, steps=2, model_kwargs=kwargs)
    with pytest.raises(ValueError, match="mu="):
        sample_like(flow, noise, steps=2, mu=0.5, model_kwargs=kwargs)
    # one step from pure noise straight to σ = 0 is x̂₀ itself: one evaluation
    one = sample_like(flow, noise, steps=1, model_kwargs=kwargs)
    assert one.stats.nfe == 1 and list(one.sigmas) == [np.inf, 0.0]
    with torch.no_grad():
        v = flow.model(noise, torch.full((2,), 1000.0), **kwargs)
    torch.testing.assert_close(one.x, noise - v, rtol=1e-6, atol=1e-6)
