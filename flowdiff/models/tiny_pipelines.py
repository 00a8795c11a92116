"""Tiny random diffusers pipelines, built and saved offline: for tests, benchmarks and examples.

Each builder makes a seeded random model of a few thousand parameters (8×8 latents, one or two
blocks), saves it with ``save_pretrained`` into ``root`` and returns the live diffusers object and
the folder, so that ``flowdiff.from_diffusers(folder)`` can be checked against diffusers' own loop.
The CLIP tokenizer's vocabulary (single letters, with "cat" merged) and the T5 tokenizer's (a
unigram model over the same letters) are written here as well. They need ``diffusers`` (and
``transformers`` for the text-to-image pipelines); nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def _diffusers() -> Any:
    import diffusers

    return diffusers


def clip_tokenizer(directory: Path) -> tuple[Any, dict[str, int]]:
    """A real ``CLIPTokenizer`` over a vocabulary of letters (and 'cat'), with ``model_max_length`` 8."""
    import transformers

    directory.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for c in "abcdefghijklmnopqrstuvwxyz":
            vocab[c + suffix] = len(vocab)
    merges = ["c a", "ca t</w>"]
    for m in merges:
        vocab[m.replace(" ", "")] = len(vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = transformers.CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"),
                                           model_max_length=8)
    return tokenizer, vocab


def vae() -> Any:
    """An ``AutoencoderKL`` from 16×16 RGB images to 4×8×8 latents."""
    d = _diffusers()
    return d.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                           up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                           norm_num_groups=4, layers_per_block=1, sample_size=16)


def _eval(*modules: torch.nn.Module) -> None:
    for m in modules:  # a new module is in training mode (DiT then drops labels at random)
        m.eval()


def stable_diffusion(root: Path, seed: int = 0, scheduler: str = "DDIMScheduler",
                     **scheduler_config: Any) -> tuple[Any, Path]:
    """A Stable-Diffusion-style pipeline: 2-block ``UNet2DConditionModel``, ``AutoencoderKL``, 2-layer CLIP;
    its ``scheduler`` (a diffusers class name, default DDIM without ``clip_sample``) on SD's betas."""
    import transformers

    d = _diffusers()
    root = Path(root)
    torch.manual_seed(seed)
    tokenizer, vocab = clip_tokenizer(root / "_vocab")
    text_config = transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=8, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"])
    unet = d.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=2)
    extra = {"clip_sample": False} if scheduler == "DDIMScheduler" else {}
    sched = getattr(d, scheduler)(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  **extra, **scheduler_config)
    pipe = d.StableDiffusionPipeline(vae=vae(), text_encoder=transformers.CLIPTextModel(text_config),
                                     tokenizer=tokenizer, unet=unet, scheduler=sched, safety_checker=None,
                                     feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "sd")
    _eval(pipe.unet, pipe.vae, pipe.text_encoder)
    return pipe, root / "sd"


def stable_diffusion_xl(root: Path, seed: int = 6) -> tuple[Any, Path]:
    """An SDXL-style pipeline: a ``UNet2DConditionModel`` with SDXL's ``text_time`` added conditioning, two CLIP
    text encoders (the second with projection: the pooled embedding), ``AutoencoderKL``, Euler."""
    import transformers

    d = _diffusers()
    root = Path(root)
    torch.manual_seed(seed)
    tokenizer, vocab = clip_tokenizer(root / "_vocab")
    text_config = _clip_config(vocab, 16)
    unet = d.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=4, attention_head_dim=2, addition_embed_type="text_time",
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 * 4 + 16)
    scheduler = d.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                         steps_offset=1, timestep_spacing="leading")
    pipe = d.StableDiffusionXLPipeline(
        vae=vae(), text_encoder=transformers.CLIPTextModel(text_config), tokenizer=tokenizer,
        text_encoder_2=transformers.CLIPTextModelWithProjection(_clip_config(vocab, 16, projection_dim=16)),
        tokenizer_2=tokenizer, unet=unet, scheduler=scheduler, add_watermarker=False)
    pipe.save_pretrained(root / "sdxl")
    _eval(pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)
    return pipe, root / "sdxl"


def dit(root: Path, seed: int = 2) -> tuple[Any, Path]:
    """A ``DiTPipeline``: one-layer class-conditional ``DiTTransformer2DModel`` (learned variance), VAE, DDIM."""
    d = _diffusers()
    root = Path(root)
    torch.manual_seed(seed)
    net = d.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                  num_layers=1, sample_size=8, patch_size=2, norm_num_groups=4)
    pipe = d.DiTPipeline(transformer=net, vae=vae(), scheduler=d.DDIMScheduler(clip_sample=False))
    pipe.save_pretrained(root / "dit")
    _eval(pipe.transformer, pipe.vae)
    return pipe, root / "dit"


def sd3_transformer(root: Path, seed: int = 1, shift: float = 3.0) -> tuple[Any, Path, dict[str, torch.Tensor]]:
    """A one-layer ``SD3Transformer2DModel`` with a ``FlowMatchEulerDiscreteScheduler(shift=...)`` beside it,
    and random conditioning (``encoder_hidden_states``, ``pooled_projections``) for a batch of 2."""
    d = _diffusers()
    root = Path(root)
    torch.manual_seed(seed)
    net = d.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                  pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8)
    net.save_pretrained(root / "transformer")
    d.FlowMatchEulerDiscreteScheduler(shift=shift).save_pretrained(root / "scheduler")
    g = torch.Generator().manual_seed(7)
    kwargs = {"encoder_hidden_states": torch.randn(2, 5, 16, generator=g),
              "pooled_projections": torch.randn(2, 8, generator=g)}
    return net.eval(), root / "transformer", kwargs


def flow_match_loop(net: Any, scheduler: Any, noise: torch.Tensor, steps: int, **kwargs: Any) -> torch.Tensor:
    """diffusers' flow-matching loop, as SD3's pipeline runs it (no guidance): x ← scheduler.step(v(x, t))."""
    scheduler.set_timesteps(steps)
    x = noise
    with torch.no_grad():
        for t in scheduler.timesteps:
            v = net(x, timestep=t.expand(x.shape[0]), return_dict=False, **kwargs)[0]
            x = scheduler.step(v, t, x).prev_sample
    return x


def t5_tokenizer(directory: Path) -> Any:
    """A real ``T5Tokenizer`` (fast, from a ``tokenizers`` unigram model written here: letters, "▁cat", ``</s>``)."""
    import tokenizers
    import transformers
    from tokenizers import decoders, models, pre_tokenizers, processors

    directory.mkdir(parents=True, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0), ("▁cat", -0.5)]
    vocab += [("▁" + c, -1.0) for c in letters] + [(c, -2.0) for c in letters]
    tok = tokenizers.Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    tok.save(str(directory / "tokenizer.json"))
    return transformers.T5TokenizerFast(tokenizer_file=str(directory / "tokenizer.json"), eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>", extra_ids=0)


def _clip_config(vocab: dict[str, int], hidden: int, **extra: Any) -> Any:
    import transformers

    return transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=8, bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"], **extra)


def _t5_encoder(tokenizer: Any, d_model: int) -> Any:
    import transformers

    return transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=4, d_ff=2 * d_model, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))


def stable_diffusion_3(root: Path, seed: int = 4, shift: float = 3.0) -> tuple[Any, Path]:
    """A ``StableDiffusion3Pipeline``: one-layer ``SD3Transformer2DModel``, VAE with shift_factor, two
    ``CLIPTextModelWithProjection`` (hidden 8, projection 4) and a ``T5EncoderModel`` (d_model 24, so the
    CLIP embeddings are zero-padded to it as in SD3), each with its tokenizer."""
    import transformers

    d = _diffusers()
    root = Path(root)
    torch.manual_seed(seed)
    tokenizer, vocab = clip_tokenizer(root / "_vocab")
    tokenizer_2, _ = clip_tokenizer(root / "_vocab2")
    clip = [transformers.CLIPTextModelWithProjection(_clip_config(vocab, 8, projection_dim=4)) for _ in range(2)]
    tokenizer_3 = t5_tokenizer(root / "_t5")
    net = d.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=16,
                                  pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8)
    autoencoder = vae()
    autoencoder.register_to_config(shift_factor=0.1, scaling_factor=0.6)
    pipe = d.StableDiffusion3Pipeline(transformer=net, scheduler=d.FlowMatchEulerDiscreteScheduler(shift=shift),
                                      vae=autoencoder, text_encoder=clip[0], tokenizer=tokenizer,
                                      text_encoder_2=clip[1], tokenizer_2=tokenizer_2,
                                      text_encoder_3=_t5_encoder(tokenizer_3, 24), tokenizer_3=tokenizer_3)
    pipe.save_pretrained(root / "sd3")
    _eval(pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3)
    return pipe, root / "sd3"


def flux(root: Path, seed: int = 5, guidance_embeds: bool = True) -> tuple[Any, Path]:
    """A ``FluxPipeline``: a one-double, one-single-block ``FluxTransformer2DModel`` on 2×2-packed latents of a
    4-channel VAE with shift_factor (16×16 images → 8×8 latents → 16 tokens of 16 channels), the pooled CLIP
    text model and a T5 encoder with their tokenizers, dynamic (resolution-dependent) shift; ``guidance_embeds``
    makes it a guidance-distilled model (the embedded guidance of Flux-dev)."""
    import transformers

    d = _diffusers()
    root = Path(root)
    torch.manual_seed(seed)
    tokenizer, vocab = clip_tokenizer(root / "_vocab")
    tokenizer_2 = t5_tokenizer(root / "_t5")
    net = d.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                   pooled_projection_dim=8, axes_dims_rope=(2, 2, 4), guidance_embeds=guidance_embeds)
    autoencoder = vae()
    autoencoder.register_to_config(shift_factor=0.1, scaling_factor=0.6)
    pipe = d.FluxPipeline(transformer=net, scheduler=d.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True,
                                                                                       shift=3.0),
                          vae=autoencoder, text_encoder=transformers.CLIPTextModel(_clip_config(vocab, 8)),
                          tokenizer=tokenizer, text_encoder_2=_t5_encoder(tokenizer_2, 16), tokenizer_2=tokenizer_2)
    pipe.save_pretrained(root / "flux")
    _eval(pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)
    return pipe, root / "flux"
