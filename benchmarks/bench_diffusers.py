"""flowdiff on diffusers' latent pipelines, DiT and flow-matching transformers, side by side with diffusers.

    python benchmarks/bench_diffusers.py [--steps 10] [--out benchmarks/results/diffusers.md]

Tiny random models (flowdiff.models.tiny_pipelines), saved and loaded back. For each: the largest
difference between flowdiff's Euler on the scheduler's grid (flowdiff.sample_like) and the
pipeline's own loop (SD, DiT, SD3 and Flux pipelines with their own text encoders, a zero-terminal-SNR
DDIM schedule), relative to the largest latent/image value; the reversible (reversible_heun)
round trip in latent space with float32, float16 and bfloat16 networks; and the wall time of a
guided Stable Diffusion generation with both guidance branches in one batched call versus two.
One intra-op thread; a few seconds per row on 2 cores (Flux's 512-token T5 prompts: ~20 s a row).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import flowdiff
from flowdiff.models import tiny_pipelines
from flowdiff.models.pipelines import flux_grid_arguments


def _rel(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    diff = float((a.double() - b.double()).abs().max())
    return diff, diff / float(b.double().abs().max())


def equivalence(root: Path, steps: int) -> list[tuple[str, float, float]]:
    import diffusers

    rows = []
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for name, config in (("default", {}), ("steps_offset=1, set_alpha_to_one=False",
                                           {"steps_offset": 1, "set_alpha_to_one": False})):
        pipe, path = tiny_pipelines.stable_diffusion(root / name.split(",")[0], **config)
        flow = flowdiff.from_diffusers(path)
        for w in (1.0, 7.5):
            with torch.no_grad():
                ref = pipe(["a cat", "dog"], num_inference_steps=steps, guidance_scale=w, output_type="latent",
                           latents=noise.clone(), height=16, width=16,
                           negative_prompt=["bad", ""] if w > 1 else None).images
            guided = flow if w == 1 else flowdiff.classifier_free_guidance(
                flow, w, unconditional_kwargs=flow.encode_prompt(["bad", ""]))
            ours = flowdiff.sample_like(guided, noise, steps=steps, model_kwargs=flow.encode_prompt(["a cat", "dog"]))
            rows.append((f"Stable Diffusion ({name}), w = {w:g}: latents", *_rel(ours.x, ref)))
            with torch.no_grad():
                ref_img = pipe.vae.decode(ref / pipe.vae.config.scaling_factor).sample
            rows.append((f"Stable Diffusion ({name}), w = {w:g}: decoded images",
                         *_rel(flow.autoencoder.decode(ours.x), ref_img)))
    pipe, path = tiny_pipelines.dit(root / "dit")
    flow = flowdiff.from_diffusers(path)
    with torch.no_grad():
        ref = pipe(class_labels=[3, 7], guidance_scale=4.0, generator=torch.Generator().manual_seed(0),
                   num_inference_steps=steps, output_type="pt").images
    null = {"class_labels": torch.tensor([1000] * 2)}
    guided = flowdiff.classifier_free_guidance(flow, 4.0, unconditional_kwargs=null)
    dit_noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = flowdiff.sample_like(guided, dit_noise, steps=steps, model_kwargs={"class_labels": torch.tensor([3, 7])})
    rows.append(("DiT (DiTPipeline, DDIM), w = 4: images", *_rel((flow.autoencoder.decode(ours.x) / 2 + 0.5)
                                                             .clamp(0, 1), ref)))
    net, path, kwargs = tiny_pipelines.sd3_transformer(root / "sd3")
    flow = flowdiff.from_diffusers(path)
    ref = tiny_pipelines.flow_match_loop(net, diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), noise, steps,
                                         **kwargs)
    ours = flowdiff.sample_like(flow, noise, steps=steps, model_kwargs=kwargs)
    rows.append(("SD3 transformer (FlowMatchEuler, shift 3): latents", *_rel(ours.x, ref)))
    return rows + text_pipelines(root, steps) + zero_snr(root, steps)


def text_pipelines(root: Path, steps: int) -> list[tuple[str, float, float]]:
    """SD3 and Flux pipelines with their own text encoders (default max_sequence_length), prompt + negative prompt."""
    import diffusers

    rows = []
    prompts, negative = ["a cat", "dog"], ["bad", ""]
    pipe, path = tiny_pipelines.stable_diffusion_3(root / "sd3pipe")
    flow = flowdiff.from_diffusers(path)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for w in (1.0, 7.0):
        with torch.no_grad():
            ref = pipe(prompts, negative_prompt=negative if w > 1 else None, num_inference_steps=steps,
                       guidance_scale=w, output_type="latent", latents=noise.clone(), height=16, width=16).images
        guided = flow if w == 1 else flowdiff.classifier_free_guidance(
            flow, w, unconditional_kwargs=flow.encode_prompt(negative))
        ours = flowdiff.sample_like(guided, noise, steps=steps, model_kwargs=flow.encode_prompt(prompts))
        rows.append((f"SD3 pipeline (2 CLIP + T5 prompts), w = {w:g}: latents", *_rel(ours.x, ref)))
        cfg = pipe.vae.config
        with torch.no_grad():
            ref_img = pipe.vae.decode(ref / cfg.scaling_factor + cfg.shift_factor).sample
        rows.append((f"SD3 pipeline (2 CLIP + T5 prompts), w = {w:g}: decoded images",
                     *_rel(flow.autoencoder.decode(ours.x), ref_img)))
    pipe, path = tiny_pipelines.flux(root / "fluxpipe")
    flow = flowdiff.from_diffusers(path)
    packed = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(0))
    for w in (1.0, 4.0):
        with torch.no_grad():
            ref = pipe(prompts, negative_prompt=negative if w > 1 else None, true_cfg_scale=w, guidance_scale=3.5,
                       num_inference_steps=steps, output_type="latent", latents=packed.clone(), height=16,
                       width=16).images
        guided = flow if w == 1 else flowdiff.classifier_free_guidance(
            flow, w, unconditional_kwargs=flow.encode_prompt(negative))
        ours = flowdiff.sample_like(guided, packed, steps=steps, model_kwargs=flow.encode_prompt(prompts))
        name = f"Flux pipeline (CLIP + T5 prompts, embedded guidance 3.5), true_cfg = {w:g}"
        rows.append((f"{name}: packed latents", *_rel(ours.x, ref)))
        cfg = pipe.vae.config
        with torch.no_grad():
            unpacked = diffusers.FluxPipeline._unpack_latents(ref, 16, 16, 2)
            ref_img = pipe.vae.decode(unpacked / cfg.scaling_factor + cfg.shift_factor).sample
        rows.append((f"{name}: decoded images", *_rel(flow.autoencoder.decode(ours.x), ref_img)))
    return rows


def zero_snr(root: Path, steps: int) -> list[tuple[str, float, float]]:
    """A v-prediction UNet2DModel on a zero-terminal-SNR DDIM schedule (trailing), against diffusers' float32 loop."""
    import diffusers

    config = {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing",
              "clip_sample": False, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D",) * 2,
                                 up_block_types=("UpBlock2D",) * 2, norm_num_groups=4).eval()
    unet.save_pretrained(root / "zsnr" / "unet")
    scheduler = diffusers.DDIMScheduler(**config)
    scheduler.save_pretrained(root / "zsnr" / "scheduler")
    flow = flowdiff.from_diffusers(root / "zsnr" / "unet")
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    scheduler.set_timesteps(steps)
    x = noise
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
    ours = flowdiff.generate(flow, noise, steps=steps, grid="trailing")  # from σ = ∞: the boundary step first
    return [("zero-terminal-SNR DDIM (v-prediction, trailing, σ_max = ∞): samples", *_rel(ours.x, x))]


def round_trips(root: Path, steps: int) -> list[tuple[str, str, float, float, bool]]:
    rows = []
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    _, sd_path = tiny_pipelines.stable_diffusion(root / "rt_sd")
    _, dit_path = tiny_pipelines.dit(root / "rt_dit")
    _, sd3_path, sd3_kwargs = tiny_pipelines.sd3_transformer(root / "rt_sd3")
    _, flux_path = tiny_pipelines.flux(root / "rt_flux")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        for model, path in (("Stable Diffusion, w = 7.5", sd_path), ("DiT", dit_path), ("SD3 transformer", sd3_path),
                            ("Flux pipeline", flux_path)):
            flow = flowdiff.from_diffusers(path, dtype=dtype)
            if model.startswith("Stable"):
                kw = flow.encode_prompt(["a cat", "dog"])
                flow = flowdiff.classifier_free_guidance(flow, 7.5, unconditional_kwargs=flow.encode_prompt(["", ""]))
                grid = {"steps": steps}
            elif model == "DiT":
                kw, grid = {"class_labels": torch.tensor([1, 2])}, {"steps": steps}
            elif model == "Flux pipeline":
                kw = flow.encode_prompt(["a cat", "dog"])
                mu, base = flux_grid_arguments(flow.scheduler_config, 16, steps)  # FluxPipeline's, 16 tokens
                grid = {"grid": flow.scheduler_sigmas(steps, mu=mu, sigmas=base)[1:]}
            else:
                kw, grid = sd3_kwargs, {"grid": flow.scheduler_sigmas(steps)[1:]}
            z = flow.autoencoder.encode(images) if flow.autoencoder is not None else images[:, :1].repeat(1, 4, 1, 1)[
                :, :, ::2, ::2].contiguous()
            enc = flowdiff.encode(flow, z, solver="reversible_heun", model_kwargs=kw, **grid)
            back = flowdiff.decode(flow, enc.latent, model_kwargs=kw).x
            image_err = float("nan")
            if flow.autoencoder is not None:
                image_err = float((flow.autoencoder.decode(back) - flow.autoencoder.decode(z)).abs().max())
            rows.append((model, name, float((back - z).abs().max()), image_err, bool(torch.equal(back, z))))
    return rows


def cfg_timing(root: Path, steps: int, repeats: int = 3) -> list[tuple[str, float]]:
    _, path = tiny_pipelines.stable_diffusion(root / "timing")
    flow = flowdiff.from_diffusers(path)
    cond, uncond = flow.encode_prompt(["a cat"] * 4), flow.encode_prompt([""] * 4)
    noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    flows = {"one batched call (2B)": flowdiff.classifier_free_guidance(flow, 7.5, unconditional_kwargs=uncond),
             "two calls (B each)": flowdiff.classifier_free_guidance(flow, 7.5, unconditional_kwargs=uncond,
                                                                     batch=False)}
    best = {k: float("inf") for k in flows}
    for _ in range(repeats):  # interleaved, best of `repeats`
        for k, f in flows.items():
            t0 = time.perf_counter()
            flowdiff.sample_like(f, noise, steps=steps, model_kwargs=cond)
            best[k] = min(best[k], time.perf_counter() - t0)
    return list(best.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "diffusers.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp())
    lines = [f"# flowdiff on diffusers pipelines (`python benchmarks/bench_diffusers.py --steps {args.steps}`)", "",
             f"Tiny random models from `flowdiff.models.tiny_pipelines`, float32 unless said, {args.steps} steps, "
             f"torch {torch.__version__}, one thread.", "",
             "## Euler on the scheduler's grid vs the pipeline's own loop", "",
             "| model | max abs difference | relative to max abs |", "|---|---:|---:|"]
    for name, diff, rel in equivalence(root, args.steps):
        lines.append(f"| {name} | {diff:.2e} | {rel:.2e} |")
    lines += ["", "## Reversible (reversible_heun) round trips in latent space", "",
              "| model | network dtype | max abs latent error | max abs error vs the VAE's own reconstruction | "
              "bit-exact |", "|---|---|---:|---:|---|"]
    for model, dtype, err, image_err, exact in round_trips(root, args.steps):
        lines.append(f"| {model} | {dtype} | {err:.1e} | {'–' if image_err != image_err else f'{image_err:.1e}'} | "
                     f"{'yes' if exact else 'no'} |")
    lines += ["", "## Guidance: both branches in one call vs two (Stable Diffusion, batch 4, w = 7.5)", "",
              "| guided evaluation | wall time (s, best of 3) |", "|---|---:|"]
    for name, seconds in cfg_timing(root, args.steps):
        lines.append(f"| {name} | {seconds:.3f} |")
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
