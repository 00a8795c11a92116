"""New-user sweep 9: flowdiff's guidance against diffusers' pipelines where their spellings meet.

    python benchmarks/sweep9_guidance.py [--steps 4]

Tiny random pipelines (flowdiff.models.tiny_pipelines), saved and loaded back, one intra-op thread. For each
case: the largest difference between flowdiff's ``sample_like`` latents and the pipeline's own
(``output_type="latent"``, the same noise), and the largest latent value for scale:

* StableDiffusionPipeline at ``guidance_scale`` 0, 0.5, 1 (diffusers: no guidance) and 7.5, against flowdiff's
  unguided flow (w = 1) and against ``classifier_free_guidance`` with the same w;
* StableDiffusionXLPipeline without ``negative_prompt`` (its ``force_zeros_for_empty_prompt``), against guidance
  on the empty prompt's embeddings (what the command line used) and on ``flow.encode_negative_prompt()``.

A few seconds on 2 cores.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import flowdiff
from flowdiff.models import tiny_pipelines


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def stable_diffusion_rows(root: Path, steps: int) -> list[tuple[str, str, float, float]]:
    pipe, folder = tiny_pipelines.stable_diffusion(root / "sd")
    flow = flowdiff.from_diffusers(folder)
    prompts, negative = ["a cat", "dog"], ["blurry", "blurry"]
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond, uncond = flow.encode_prompt(prompts), flow.encode_prompt(negative)
    unguided = flowdiff.sample_like(flow, noise, steps=steps, model_kwargs=cond).x
    rows = []
    for scale in (0.0, 0.5, 1.0, 7.5):
        with torch.no_grad():
            ref = pipe(prompts, negative_prompt=negative, guidance_scale=scale, num_inference_steps=steps,
                       output_type="latent", latents=noise.clone(), height=16, width=16).images
        guided = flow if scale == 1 else flowdiff.classifier_free_guidance(flow, scale, unconditional_kwargs=uncond)
        same_w = flowdiff.sample_like(guided, noise, steps=steps, model_kwargs=cond).x
        top = float(ref.abs().max())
        rows.append((f"SD guidance_scale={scale:g}", "flowdiff unguided (w = 1)", _diff(unguided, ref), top))
        rows.append((f"SD guidance_scale={scale:g}", f"flowdiff w = {scale:g}", _diff(same_w, ref), top))
    return rows


def sdxl_rows(root: Path, steps: int) -> list[tuple[str, str, float, float]]:
    pipe, folder = tiny_pipelines.stable_diffusion_xl(root / "sdxl")
    flow = flowdiff.from_diffusers(folder)
    prompts = ["a cat", "dog"]
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = pipe(prompts, guidance_scale=5.0, num_inference_steps=steps, output_type="latent",
                   latents=noise.clone(), height=16, width=16).images
    cond, top, rows = flow.encode_prompt(prompts), float(ref.abs().max()), []
    for label, uncond in (("empty prompt's embeddings", flow.encode_prompt(["", ""])),
                          ("flow.encode_negative_prompt()", flow.encode_negative_prompt())):
        guided = flowdiff.classifier_free_guidance(flow, 5.0, unconditional_kwargs=uncond)
        rows.append(("SDXL w=5, no negative_prompt", label,
                     _diff(flowdiff.sample_like(guided, noise, steps=steps, model_kwargs=cond).x, ref), top))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        rows = stable_diffusion_rows(Path(tmp), args.steps) + sdxl_rows(Path(tmp), args.steps)
    print(f"steps={args.steps}; float32; max |flowdiff − diffusers| over the latents, and max |latent|\n")
    print("| pipeline call | flowdiff | max abs difference | max abs latent |\n|---|---|---|---|")
    for case, ours, diff, top in rows:
        print(f"| {case} | {ours} | {diff:.2e} | {top:.3g} |")


if __name__ == "__main__":
    main()
