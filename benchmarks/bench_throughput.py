"""Images per second at fixed NFE: flowdiff's solves against diffusers' own scheduler loops, with host syncs.

    python benchmarks/bench_throughput.py [--device cpu|cuda] [--models digits,cifar10_unet] [--batch N]
        [--nfe 10,50] [--repeats R] [--out benchmarks/results/throughput_cpu.md] [--json PATH]

Two models, each run by four loops side by side in one process, interleaved, best of R:

  diffusers DDIM  — ``DDIMScheduler.step`` over its timesteps (trailing spacing), timesteps on the device
                    as diffusers' pipelines put them (``set_timesteps(n, device=...)``);
  flowdiff euler  — ``flowdiff.generate(flow, noise, solver="euler", steps=n, grid="trailing")``: the same
                    map (deterministic DDIM is Euler on dx̄/dσ = ε, Song et al., ICLR 2021);
  diffusers DPM++ — ``DPMSolverMultistepScheduler`` (dpmsolver++, order 2, σ = 0 at the end), the multistep
                    peer;
  flowdiff dpmpp_2m — ``flowdiff.generate(..., solver="dpmpp_2m", grid=<that scheduler's σ grid>)``.

Models: the shipped ``digits`` network (1×8×8, 283k parameters), and a random ``UNet2DModel`` of CIFAR-10
size (3×32×32; the block layout of google/ddpm-cifar10-32: channels 128/256/256/256, two layers per block,
attention at 16×16, 35.7M parameters), built from a seed, saved with ``save_pretrained`` and loaded back with
``flowdiff.from_diffusers`` — nothing is downloaded. The diffusers loops call the same network objects.

Per loop and NFE: seconds per batch, images per second, the largest difference to the diffusers loop's images
(relative to their largest value: both sides compute the same map when the NFE divides T = 1000; otherwise
diffusers' trailing DDIM steps to t − T//n while its next step starts at another timestep, which is no single σ
grid, and the column shows that gap), and the host–device syncs the loop makes
(``flowdiff.tools.syncs``: per step + constant, from runs of two step counts; ``n/a`` off CUDA). On CUDA the
timings are bracketed by ``torch.cuda.synchronize()``. The defaults are small on a CPU (one intra-op thread,
batch 16 for digits and 1 for the UNet) and GPU-sized on CUDA (batch 128 for both).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import flowdiff
from flowdiff.tools.syncs import syncs_per_step

T = 1000
#: the CIFAR-10 DDPM UNet's layout (Ho et al. 2020; diffusers' google/ddpm-cifar10-32 config), random weights
CIFAR10_UNET = dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                    block_out_channels=(128, 256, 256, 256),
                    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                    norm_num_groups=32, dropout=0.0)
SCHEDULE = dict(num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
MODELS = ("digits", "cifar10_unet")
LOOPS = ("diffusers DDIM", "flowdiff euler", "diffusers DPM++ 2M", "flowdiff dpmpp_2m")


@dataclass
class Row:
    model: str
    loop: str
    nfe: int
    batch: int
    seconds: float | None
    images_per_s: float | None
    rel_diff: float | None
    syncs: str
    error: str | None = None


def load_model(name: str, device: torch.device, root: Path) -> tuple[flowdiff.ProbabilityFlow, Callable, tuple]:
    """(flowdiff flow, the raw network called as ``net(x, t)`` by the diffusers loops, one sample's shape)."""
    if name == "digits":
        flow = flowdiff.pretrained("digits", device=device)
        net = flow.model
        return flow, lambda x, t: net(x, t), (1, 8, 8)
    if name == "cifar10_unet":
        import diffusers

        torch.manual_seed(0)
        unet = diffusers.UNet2DModel(**CIFAR10_UNET)
        path = root / "cifar10_unet"
        unet.save_pretrained(path)
        diffusers.DDPMScheduler(**SCHEDULE).save_pretrained(path)
        flow = flowdiff.from_diffusers(path, device=device)
        net = flow.model.net.eval()
        return flow, lambda x, t: net(x, t, return_dict=False)[0], (3, 32, 32)
    raise ValueError(f"unknown model {name!r}; accepted: {', '.join(MODELS)}")


def diffusers_loop(scheduler, net: Callable, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """A diffusers pipeline's denoising loop, as the pipelines write it (init_noise_sigma is 1 for both)."""
    scheduler.set_timesteps(steps, device=noise.device)
    x = noise
    for t in scheduler.timesteps:
        x = scheduler.step(net(x, t), t, x).prev_sample
    return x


def make_loops(flow: flowdiff.ProbabilityFlow, net: Callable) -> dict[str, Callable[[torch.Tensor, int], torch.Tensor]]:
    import diffusers

    ddim = diffusers.DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=True,
                                   timestep_spacing="trailing")
    dpm = diffusers.DPMSolverMultistepScheduler(**SCHEDULE, algorithm_type="dpmsolver++", solver_order=2,
                                                final_sigmas_type="zero", timestep_spacing="trailing")

    def dpm_sigmas(steps: int) -> list[float]:
        dpm.set_timesteps(steps)
        return dpm.sigmas.double().tolist()

    return {
        "diffusers DDIM": lambda noise, n: diffusers_loop(ddim, net, noise, n),
        "flowdiff euler": lambda noise, n: flowdiff.generate(flow, noise, solver="euler", steps=n,
                                                             grid="trailing").x,
        "diffusers DPM++ 2M": lambda noise, n: diffusers_loop(dpm, net, noise, n),
        "flowdiff dpmpp_2m": lambda noise, n: flowdiff.generate(flow, noise, solver="dpmpp_2m", grid=dpm_sigmas(n)).x,
    }


def _timed(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, torch.Tensor]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def bench_model(name: str, device: torch.device, batch: int, nfes: list[int], repeats: int, root: Path,
                sync_steps: tuple[int, int]) -> list[Row]:
    flow, net, shape = load_model(name, device, root)
    loops = make_loops(flow, net)
    noise = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0)).to(device)
    rows: list[Row] = []
    with torch.no_grad():
        for nfe in nfes:
            best: dict[str, float] = {}
            outs: dict[str, torch.Tensor] = {}
            errors: dict[str, str] = {}
            for loop, fn in loops.items():  # warm-up (cuDNN/cuBLAS set-up, flowdiff's timestep tables)
                try:
                    outs[loop] = fn(noise, nfe)
                except Exception as err:  # noqa: BLE001  (a failing loop is reported in its row, the rest run)
                    errors[loop] = f"{type(err).__name__}: {err}"
            for _ in range(repeats):  # interleaved: each repeat runs every loop once
                for loop, fn in loops.items():
                    if loop not in errors:
                        seconds, outs[loop] = _timed(lambda fn=fn, nfe=nfe: fn(noise, nfe), device)
                        best[loop] = min(best.get(loop, float("inf")), seconds)
            for loop in loops:
                if loop in errors:
                    rows.append(Row(name, loop, nfe, batch, None, None, None, "-", errors[loop]))
                    continue
                peer = "diffusers DDIM" if "DDIM" in loop or "euler" in loop else "diffusers DPM++ 2M"
                rel = None
                if peer in outs and peer != loop:
                    ref = outs[peer].double()
                    rel = float((outs[loop].double() - ref).abs().max() / ref.abs().max())
                rows.append(Row(name, loop, nfe, batch, best[loop], batch / best[loop], rel, "", None))
        small = noise[: min(batch, 8)]
        syncs = {}
        for loop, fn in loops.items():
            if any(r.loop == loop and r.error for r in rows):
                syncs[loop] = "-"
                continue
            if device.type != "cuda":  # nothing to count: skip the extra solves
                syncs[loop] = "n/a"
                continue
            syncs[loop] = str(syncs_per_step(lambda n, fn=fn: fn(small, n), device, steps=sync_steps))
    for r in rows:
        if not r.error:
            r.syncs = syncs[r.loop]
    return rows


def table(rows: list[Row]) -> str:
    lines = ["| model | loop | NFE | batch | s / batch | images / s | rel. diff to diffusers | host syncs |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r.error:
            lines.append(f"| {r.model} | {r.loop} | {r.nfe} | {r.batch} | failed: {r.error} | | | |")
            continue
        rel = "-" if r.rel_diff is None else f"{r.rel_diff:.1e}"
        lines.append(f"| {r.model} | {r.loop} | {r.nfe} | {r.batch} | {r.seconds:.4g} | {r.images_per_s:.4g} | "
                     f"{rel} | {r.syncs} |")
    return "\n".join(lines)


def _ints(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name} must be comma-separated positive ints, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{name} must be comma-separated positive ints, got {text!r}")
    return values


def _models(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [n for n in names if n not in MODELS]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"--models: unknown {bad or text!r}; accepted: {', '.join(MODELS)}")
    return names


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"--device {text!r} is not a torch device (cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"--device {text}: CUDA is not available (torch {torch.__version__})")
    return device


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", type=_device, default=torch.device("cpu"))
    parser.add_argument("--models", type=_models, default=list(MODELS))
    parser.add_argument("--batch", type=lambda s: _ints(s, "--batch"), default=None,
                        help="one batch size, or one per model (default: 16,1 on a CPU, 128,128 on CUDA)")
    parser.add_argument("--nfe", type=lambda s: _ints(s, "--nfe"), default=None,
                        help="NFE per loop (default 10,50; 10 for the UNet on a CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats, best taken (CPU 2, CUDA 5)")
    parser.add_argument("--sync-steps", type=lambda s: _ints(s, "--sync-steps"), default=[4, 8],
                        help="the two step counts that separate per-step syncs from the constant")
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (default 1)")
    parser.add_argument("--out", type=Path, default=None, help="write the table as markdown here")
    parser.add_argument("--json", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    device: torch.device = args.device
    cuda = device.type == "cuda"
    torch.set_num_threads(args.threads)
    if len(args.sync_steps) != 2:
        parser.error(f"--sync-steps takes two step counts, got {args.sync_steps}")
    default_batch = {"digits": 128 if cuda else 16, "cifar10_unet": 128 if cuda else 1}
    if args.batch is not None and len(args.batch) not in (1, len(args.models)):
        parser.error(f"--batch takes one size or one per model ({len(args.models)}), got {args.batch}")
    batches = {m: (default_batch[m] if args.batch is None else args.batch[i if len(args.batch) > 1 else 0])
               for i, m in enumerate(args.models)}
    repeats = args.repeats if args.repeats is not None else (5 if cuda else 2)
    if repeats < 1:
        parser.error(f"--repeats must be >= 1, got {repeats}")

    header = (f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if cuda else
                                    f" ({platform.machine()}, {args.threads} thread(s))")
              + f", torch {torch.__version__}, python {platform.python_version()}, best of {repeats}")
    print(header, flush=True)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            nfes = args.nfe or ([10] if model == "cifar10_unet" and not cuda else [10, 50])
            start = time.perf_counter()
            rows += bench_model(model, device, batches[model], nfes, repeats, Path(tmp), tuple(args.sync_steps))
            print(f"{model}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    text = f"{header}\n\n{table(rows)}\n"
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        command = " ".join(["python benchmarks/bench_throughput.py", *(sys.argv[1:] if argv is None else argv)])
        args.out.write_text(f"# Throughput at fixed NFE (`bench_throughput.py`)\n\n`{command}`\n\n{text}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"header": header, "rows": [asdict(r) for r in rows]}, indent=1))
    failed = [r for r in rows if r.error]
    if failed:
        print(f"{len(failed)} loop(s) failed: " + "; ".join(f"{r.model}/{r.loop}/{r.nfe}: {r.error}" for r in failed),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
