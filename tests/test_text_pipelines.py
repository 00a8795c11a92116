"""SD3 and Flux pipelines with their own text encoders, from local folders, equal to diffusers' pipelines.

Tiny random StableDiffusion3Pipeline (two CLIPTextModelWithProjection + T5EncoderModel) and FluxPipeline
(CLIPTextModel + T5EncoderModel, guidance-distilled, packed latents), their tokenizers' vocabularies written
by flowdiff.models.tiny_pipelines, saved and loaded back (no network). Prompts become model_kwargs through the
pipeline's own encode_prompt; flowdiff's Euler on the pipeline's grid must equal the pipeline's
output_type="latent" result, with a prompt, a negative prompt and guidance, to float rounding.
"""

import numpy as np
import pytest
import torch

import flowdiff
from flowdiff import from_diffusers, sample_like
from flowdiff.models import tiny_pipelines

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

TOL = {"rtol": 2e-5, "atol": 2e-5}
SEQ = 12  # T5's padded length in these tests (the pipelines' defaults, 256 and 512, are checked for embeddings)


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return tiny_pipelines.stable_diffusion_3(tmp_path_factory.mktemp("sd3pipe"))


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    return tiny_pipelines.flux(tmp_path_factory.mktemp("fluxpipe"))


def _noise(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_sd3_embeddings_are_the_pipelines(sd3):
    pipe, path = sd3
    flow = from_diffusers(path)
    assert isinstance(flow.prompt_encoder, flowdiff.models.pipelines.PipelinePromptEncoder)
    assert flow.prompt_encoder.max_sequence_length == 256 and flow.default_guidance == 7.0
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(["a cat", "dog"], None, None, do_classifier_free_guidance=False)
    ours = flow.encode_prompt(["a cat", "dog"])
    assert set(ours) == {"encoder_hidden_states", "pooled_projections"}
    assert ours["encoder_hidden_states"].shape == (2, 8 + 256, 24)  # CLIP's 8 tokens (zero-padded), then T5's
    torch.testing.assert_close(ours["encoder_hidden_states"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(ours["pooled_projections"], pooled, rtol=0, atol=0)
    with pytest.raises(TypeError, match="prompts"):
        flow.encode_prompt("a cat")


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_sd3_euler_is_the_pipelines_loop(sd3, guidance):
    pipe, path = sd3
    flow = from_diffusers(path)
    flow.prompt_encoder.max_sequence_length = SEQ
    prompts, negative = ["a cat", "dog"], ["bad", ""]
    noise = _noise(2, 4, 8, 8, seed=1)
    with torch.no_grad():
        ref = pipe(prompts, negative_prompt=negative if guidance > 1 else None, num_inference_steps=4,
                   guidance_scale=guidance, output_type="latent", latents=noise.clone(), height=16, width=16,
                   max_sequence_length=SEQ).images
    guided = flow if guidance == 1 else flowdiff.classifier_free_guidance(
        flow, guidance, unconditional_kwargs=flow.encode_prompt(negative))
    ours = sample_like(guided, noise, steps=4, model_kwargs=flow.encode_prompt(prompts))
    assert ours.stats.nfe == 4
    torch.testing.assert_close(ours.x, ref, **TOL)
    assert (ours.x - noise).abs().max() > 0.1
    with torch.no_grad():  # SD3's VAE has a shift_factor: x = D(z/scaling + shift)
        cfg = pipe.vae.config
        ref_images = pipe.vae.decode(ref / cfg.scaling_factor + cfg.shift_factor).sample
    torch.testing.assert_close(flow.autoencoder.decode(ours.x), ref_images, **TOL)
    other = sample_like(guided, noise, steps=4, model_kwargs=flow.encode_prompt(["dog", "a cat"]))
    assert (other.x - ours.x).abs().max() > 1e-3  # the prompt reaches the transformer


def test_flux_embeddings_are_the_pipelines(flux):
    pipe, path = flux
    flow = from_diffusers(path)
    enc = flow.prompt_encoder
    assert enc.max_sequence_length == 512 and enc.guidance_embeds and flow.default_guidance == 1.0
    with torch.no_grad():
        embeds, pooled, text_ids = pipe.encode_prompt(["a cat", "dog"], None)
    ours = flow.encode_prompt(["a cat", "dog"])
    torch.testing.assert_close(ours["encoder_hidden_states"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(ours["pooled_projections"], pooled, rtol=0, atol=0)
    assert torch.equal(ours["guidance"], torch.tensor([3.5]))
    assert torch.equal(text_ids, torch.zeros(512, 3))  # what the model wrapper supplies as txt_ids


@pytest.mark.parametrize("true_cfg", [1.0, 4.0])
def test_flux_euler_is_the_pipelines_loop(flux, true_cfg):
    pipe, path = flux
    flow = from_diffusers(path)
    flow.prompt_encoder.max_sequence_length = SEQ
    flow.prompt_encoder.embedded_guidance = 2.5
    assert flow.sample_shape == (16, 16) and isinstance(flow.autoencoder, flowdiff.models.pipelines.PackedAutoencoder)
    prompts, negative = ["a cat", "dog"], ["bad", ""]
    noise = _noise(2, 16, 16, seed=2)  # packed: 16 tokens (4×4 patches of 2×2) of 4·4 channels
    with torch.no_grad():
        ref = pipe(prompts, negative_prompt=negative if true_cfg > 1 else None, true_cfg_scale=true_cfg,
                   guidance_scale=2.5, num_inference_steps=3, output_type="latent", latents=noise.clone(),
                   height=16, width=16, max_sequence_length=SEQ).images
    guided = flow if true_cfg == 1 else flowdiff.classifier_free_guidance(
        flow, true_cfg, unconditional_kwargs=flow.encode_prompt(negative))
    ours = sample_like(guided, noise, steps=3, model_kwargs=flow.encode_prompt(prompts))  # mu as FluxPipeline's
    assert ours.stats.nfe == 3 and ours.sigmas[0] == np.inf
    torch.testing.assert_close(ours.x, ref, **TOL)
    with torch.no_grad():
        cfg = pipe.vae.config
        unpacked = diffusers.FluxPipeline._unpack_latents(ref, 16, 16, 2)
        ref_images = pipe.vae.decode(unpacked / cfg.scaling_factor + cfg.shift_factor).sample
    torch.testing.assert_close(flow.autoencoder.decode(ours.x), ref_images, **TOL)


def test_flux_images_round_trip_through_packed_latents_exactly(flux):
    _, path = flux
    flow = from_diffusers(path)
    flow.prompt_encoder.max_sequence_length = SEQ
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    latents = flow.autoencoder.encode(images)
    assert latents.shape == (2, 16, 16)
    assert flow.autoencoder.image_shape(latents.shape[1:]) == (3, 16, 16)
    own = flow.autoencoder.decode(latents)  # unpack ∘ pack is the identity: D(E(x)), the VAE's own
    with torch.no_grad():
        vae = flow.autoencoder.vae
        z = (vae.encode(images).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
        torch.testing.assert_close(own, vae.decode(z / vae.config.scaling_factor + vae.config.shift_factor).sample,
                                   **TOL)  # (the unpacked latents' memory layout changes the convolutions' rounding)
    unpacked = diffusers.FluxPipeline._unpack_latents(latents, 16, 16, 2)
    assert unpacked.shape == (2, 4, 8, 8)
    torch.testing.assert_close(unpacked, z, rtol=0, atol=0)  # the packed latents are the VAE's, rearranged
    cond = flow.encode_prompt(["a cat", "dog"])
    guided = flowdiff.classifier_free_guidance(flow, 3.0, unconditional_kwargs=flow.encode_prompt(["", ""]))
    grid = sample_like(flow, latents, steps=6, model_kwargs=cond).sigmas[1:]  # the pipeline's grid, finite part
    enc = flowdiff.encode(guided, latents, solver="reversible_heun", grid=grid, model_kwargs=cond)
    assert torch.equal(flowdiff.decode(guided, enc.latent, model_kwargs=cond).x, latents)
    with pytest.raises(ValueError, match="multiples of 4"):
        flow.autoencoder.encode(torch.zeros(1, 3, 10, 10))


def test_missing_and_corrupt_text_components_are_named(sd3):
    import json
    import shutil

    _, path = sd3
    broken = path.parent / "broken_sd3"
    shutil.copytree(path, broken)
    weights = broken / "text_encoder_3" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"text_encoder_3.*model\.safetensors"):
        from_diffusers(broken)
    shutil.rmtree(broken / "tokenizer_3")
    with pytest.raises(FileNotFoundError, match="tokenizer_3"):
        from_diffusers(broken)
    index = json.loads((broken / "model_index.json").read_text())
    index["text_encoder_3"] = index["tokenizer_3"] = [None, None]  # SD3 saved without T5: loads, without prompts
    (broken / "model_index.json").write_text(json.dumps(index))
    flow = from_diffusers(broken)
    assert flow.prompt_encoder is None and flow.autoencoder is not None
    with pytest.raises(ValueError, match="no prompt encoder"):
        flow.encode_prompt(["a cat"])
    shutil.rmtree(broken)
