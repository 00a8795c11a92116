"""The commands: compare, sample, encode, decode and roundtrip, each given the parsed arguments."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..compare import compare
from ..fingerprint import flow_fingerprint
from ._errors import CommandError, one_line
from ._images import read_images, save_grid, save_images
from ._models import BUILTIN_MODELS, LoadedModel, in_dtype, load_model

DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: Tolerance of ``flowdiff compare``'s reference solve (see benchmarks/results/compare.md for its cost and error).
REFERENCE_RTOL = 1e-5


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CommandError(f"--device {name!r} is not a torch device (e.g. cpu, cuda, cuda:0)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {name!r}: CUDA is not available in this torch build or on this machine")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise CommandError(f"--device {name!r}: MPS is not available on this machine")
    return device


def _setup(args: argparse.Namespace, *, convert: bool = True) -> tuple[LoadedModel, torch.dtype, torch.device]:
    """The model on the device (its network in ``--dtype`` unless ``convert=False``), the dtype and the device."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif args.model in BUILTIN_MODELS:
        torch.set_num_threads(1)
    device = _device(args.device)
    dtype = DTYPES[args.dtype]
    loaded = load_model(args.model, dtype=dtype if convert else None, device=device)
    return loaded, dtype, device


def _noise(args: argparse.Namespace, n: int, shape: tuple[int, int, int], dtype: torch.dtype,
           device: torch.device) -> Tensor:
    gen = torch.Generator().manual_seed(args.seed)
    return torch.randn(n, *shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def _budget(args: argparse.Namespace) -> dict[str, int]:
    if args.nfe is not None:
        return {"nfe": args.nfe}
    if args.steps is not None:
        return {"steps": args.steps}
    return {"nfe": args.default_nfe} if args.default_nfe is not None else {"steps": args.default_steps}


def fingerprint(loaded: LoadedModel) -> str:
    """The key of the reference kept on disk: :func:`flowdiff.fingerprint.flow_fingerprint` of the model."""
    try:
        return flow_fingerprint(loaded.flow)
    except TypeError as err:
        raise CommandError(f"cannot fingerprint this model for the reference cache: {err}") from None


def cmd_compare(args: argparse.Namespace) -> int:
    from ..compare import Reference, reference_solution

    if not (0 < args.rtol < 1):
        raise CommandError(f"--rtol must be in (0, 1), got {args.rtol}")
    # the reference is solved from the network as saved (copied to float64), the runs in --dtype
    loaded, dtype, device = _setup(args, convert=False)
    run_flow = in_dtype(loaded.flow, dtype)
    noise = _noise(args, args.batch, loaded.shape, dtype, device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # The reference depends on the model, the noise (seed, batch, shape) and the tolerance, not on --dtype:
    # it is always solved in float64 from the same float64 draw, so it is kept on disk under that key.
    key = f"{fingerprint(loaded)}|seed={args.seed}|batch={args.batch}|shape={loaded.shape}|dopri8|{args.rtol!r}"
    ref_path = out / "reference.safetensors"
    ref, kept = None, False
    if ref_path.is_file() and not args.fresh_reference:
        try:
            ref = Reference.load(ref_path, key)
        except Exception:  # an unreadable or foreign file is replaced
            ref = None
        kept = ref is not None
    if ref is None:
        if not args.no_progress:
            print(f"solving the float64 reference (dopri8, rtol=atol={args.rtol:g}); it is kept in {ref_path} "
                  "for later runs", file=sys.stderr)
        ref = reference_solution(loaded.flow, _noise(args, args.batch, loaded.shape, torch.float64, device),
                                 rtol=args.rtol, atol=args.rtol, model_kwargs=loaded.model_kwargs or None,
                                 progress=not args.no_progress)
        ref.save(ref_path, key)
    result = compare(run_flow, noise, solvers=args.solver, grids=args.grid, nfe=args.nfe,
                     model_kwargs=loaded.model_kwargs or None, reference=ref, progress=not args.no_progress)
    ref = result.reference
    title = (f"{loaded.name}: RMS error vs NFE ({args.batch} samples, {args.dtype}, seed {args.seed})")
    header = (f"model {loaded.name}, {args.batch} samples of shape {loaded.shape}, {args.dtype}, seed {args.seed}; "
              f"reference: {ref.solver} rtol=atol={ref.rtol:g} from σ={ref.sigma_start:.4g} to {ref.sigma_end:.4g} "
              f"then the Euler step to 0, {ref.nfe} NFE, "
              f"estimated error {ref.error:.1e}" + (f" (kept in {ref_path})" if kept else ""))
    table = result.to_markdown(args.layout)
    (out / "compare.md").write_text(f"{header}\n\n{result.to_markdown('wide')}\n{result.to_markdown('long')}")
    (out / "compare.csv").write_text(result.to_csv())
    plot = result.plot(out / "compare.png", title=title)
    print(header)
    print()
    print(table)
    for budget in result.budgets:
        if any(r.budget == budget for r in result.runs):
            best = result.best(budget)
            print(f"best at NFE {budget}: {best.solver} on {best.grid} (RMS error {best.rms_error:.2e}, "
                  f"NFE used {best.nfe})")
    for skip in result.skipped:
        print(f"skipped {skip.solver} on {skip.grid} at NFE {skip.budget}: {skip.reason}")
    print(f"wrote {out / 'compare.md'}, {out / 'compare.csv'}, {plot}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from ..sampling import generate

    loaded, dtype, device = _setup(args)
    noise = _noise(args, args.num, loaded.shape, dtype, device)
    result = generate(loaded.flow, noise, solver=args.solver, grid=args.grid,
                      model_kwargs=loaded.model_kwargs or None, **_budget(args))
    scale = args.scale or max(1, 64 // max(loaded.shape[1:]))
    path = save_grid(result.x, args.out, scale=scale)
    print(f"{args.num} samples with {result.solver} on the {args.grid} grid: {result.stats.nfe} NFE, "
          f"{len(result.sigmas) - 1} steps, {result.stats.wall_time:.2f} s; wrote {path}")
    return 0


def _latent_io() -> Any:
    from ..latent import Latent

    if not (hasattr(Latent, "save") and hasattr(Latent, "load")):
        raise CommandError("this install's flowdiff.Latent cannot be saved to a file yet (no Latent.save/load)")
    return Latent


def _encode(args: argparse.Namespace, loaded: LoadedModel, dtype: torch.dtype, device: torch.device) -> tuple:
    from ..sampling import encode

    images = read_images(args.images, loaded.shape).to(device=device, dtype=dtype)
    if not args.fixed_point:
        return images, encode(loaded.flow, images, solver=args.solver, grid=args.grid,
                              model_kwargs=loaded.model_kwargs or None, **_budget(args))
    with warnings.catch_warnings():  # the images that missed the tolerance are reported below, by name
        warnings.filterwarnings("ignore", message="fixed-point inversion", category=RuntimeWarning)
        result = encode(loaded.flow, images, solver=args.solver, grid=args.grid, inversion="fixed_point",
                        inversion_options={"on_failure": "keep"}, model_kwargs=loaded.model_kwargs or None,
                        **_budget(args))
    missed = result.stats.extra["unconverged"]
    if missed:
        print(f"fixed-point inversion: {len(missed)} of {len(args.images)} image(s) have no exact preimage under "
              f"this decode (best iterate kept): {', '.join(args.images[i] for i in missed)}")
    return images, result


def cmd_encode(args: argparse.Namespace) -> int:
    Latent = _latent_io()  # noqa: N806  (a class)
    loaded, dtype, device = _setup(args)
    _, result = _encode(args, loaded, dtype, device)
    assert isinstance(result.latent, Latent)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    result.latent.save(path)
    print(f"encoded {len(args.images)} image(s) with {result.solver} on the {args.grid} grid: "
          f"{result.stats.nfe} NFE, {result.latent.steps} steps; wrote {path}")
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    from ..sampling import decode

    Latent = _latent_io()  # noqa: N806
    path = Path(args.latents)
    if not path.is_file():
        raise CommandError(f"latents {args.latents!r}: no such file")
    loaded, dtype, device = _setup(args)
    try:
        latent = Latent.load(path, device=device)
    except (ValueError, KeyError, OSError) as err:
        raise CommandError(f"latents {args.latents!r}: not a flowdiff latents file ({one_line(err)})") from None
    except Exception as err:  # safetensors' own error type for a file that is not safetensors
        if type(err).__module__.split(".")[0] != "safetensors":
            raise
        raise CommandError(f"latents {args.latents!r}: not a safetensors file ({one_line(err)})") from None
    if latent.solver_state is None:  # a reversible latent keeps its exact (float64) state as it is
        latent.x = latent.x.to(dtype=dtype)
    latent.dtype = dtype  # the network's dtype: what the decode feeds it and returns
    result = decode(loaded.flow, latent, model_kwargs=loaded.model_kwargs or None)
    names = [f"{path.stem}_{i:03d}.png" for i in range(result.x.shape[0])]
    written = save_images(result.x, args.out, names, scale=args.scale)
    print(f"decoded {len(written)} image(s) with {result.solver}: {result.stats.nfe} NFE; wrote {args.out}/")
    return 0


def cmd_roundtrip(args: argparse.Namespace) -> int:
    from ..sampling import decode

    loaded, dtype, device = _setup(args)
    images, enc = _encode(args, loaded, dtype, device)
    dec = decode(loaded.flow, enc.latent, model_kwargs=loaded.model_kwargs or None)
    if args.latents is not None:
        Path(args.latents).parent.mkdir(parents=True, exist_ok=True)
        _latent_io()
        enc.latent.save(args.latents)
    if args.out is not None:
        save_images(dec.x, args.out, [Path(p).stem + "_roundtrip.png" for p in args.images])
    from ..metrics import reconstruction

    figures = reconstruction(images, dec.x, encode_stats=enc.stats, decode_stats=dec.stats)
    print(f"round trip of {len(args.images)} image(s) with {enc.solver} on the {args.grid} grid, "
          f"{enc.latent.steps} steps: encode {figures.nfe_encode} NFE, decode {figures.nfe_decode} NFE; "
          "errors on the [0, 1] pixel scale:")
    print(f"  mse: {figures.mse:.3e}")
    print(f"  max_abs_error: {figures.max_abs:.3e}")
    print(f"  psnr_db: {figures.psnr:.2f}")
    return 0

