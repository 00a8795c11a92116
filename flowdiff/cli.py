"""The ``flowdiff`` command: compare solvers, sample, encode, decode and round-trip images.

    flowdiff compare                      # solvers × grids × NFE on the embedded digits model
    flowdiff sample --solver heun --nfe 19 --out samples.png
    flowdiff encode a.png b.png --out latents.safetensors
    flowdiff decode latents.safetensors --out decoded/
    flowdiff roundtrip a.png b.png --solver euler --steps 50

Everything runs offline: the default model is the small trained digits model shipped with
the package (``--model digits``); ``--model analytic-mixture`` is a closed-form Gaussian
mixture over 8×8 digit images (exact ε, no network); ``--model DIR`` loads a local diffusers
model directory. Errors end the command with a one-line message and a non-zero status
(1: the command failed, 2: bad arguments); set ``FLOWDIFF_DEBUG=1`` to see the traceback.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import Tensor

import solvers as _solvers

from .compare import DEFAULT_GRIDS, DEFAULT_NFE, compare, default_solvers
from .fingerprint import flow_fingerprint
from .flow import ProbabilityFlow
from .grids import GRIDS

DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BUILTIN_MODELS = ("digits", "analytic-mixture")
#: Kernel bandwidth of ``--model analytic-mixture`` in the image scale [−1, 1] (pixel steps are 1/8).
MIXTURE_BANDWIDTH = 0.1
#: Tolerance of ``flowdiff compare``'s reference solve (see benchmarks/results/compare.md for its cost and error).
REFERENCE_RTOL = 1e-5


class CommandError(Exception):
    """A failure to report as one line (exit status 1)."""


# -- models -----------------------------------------------------------------------------------

@dataclass
class LoadedModel:
    """A flow and the image shape (C, H, W) its samples have, in the model's data range [−1, 1]."""

    name: str
    flow: ProbabilityFlow
    shape: tuple[int, int, int]
    model_kwargs: dict[str, Any]


def _mixture_digits(dtype: torch.dtype, device: torch.device) -> LoadedModel:
    """A Gaussian mixture of bandwidth :data:`MIXTURE_BANDWIDTH` on each training digit of the shipped model."""
    from .analytic import Mixture
    from .pretrained import digits_data

    try:
        images = digits_data("train").images
    except ImportError:
        raise CommandError("--model analytic-mixture needs scikit-learn, which bundles its digit images "
                           "(pip install scikit-learn)") from None
    model = Mixture(images.to(device), bandwidth=MIXTURE_BANDWIDTH, schedule=_digits_schedule())
    return LoadedModel("analytic-mixture", model.flow(), (1, 8, 8), {})


def _digits_schedule() -> Any:
    """The shipped digits model's schedule (so that both built-in models share σ_max and the grids)."""
    from .pretrained import load_config
    from .schedules import Schedule

    try:
        return Schedule.from_config(**load_config("digits")["schedule"])
    except (OSError, ValueError, KeyError):
        return Schedule.linear()


def _pretrained_digits(dtype: torch.dtype, device: torch.device) -> LoadedModel:
    from .pretrained import pretrained

    flow = pretrained("digits", device=device)
    return LoadedModel("digits", _to(flow, dtype, device), (1, 8, 8), {})


def _diffusers_dir(path: Path, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    from .diffusers_io import from_diffusers

    flow = from_diffusers(path, device=device)
    return LoadedModel(path.name, _to(flow, dtype, device), tuple(flow.model.sample_shape), {})


def _to(flow: ProbabilityFlow, dtype: torch.dtype | None, device: torch.device) -> ProbabilityFlow:
    """Move a flow's torch network to the device and (unless ``dtype`` is None) to the state's precision.

    float16/bfloat16 networks run in that precision while generate keeps a float32 state.
    """
    model = flow.model
    if isinstance(model, torch.nn.Module):
        model.to(device=device, dtype=dtype)
        model.eval()
    return flow


def in_dtype(flow: ProbabilityFlow, dtype: torch.dtype) -> ProbabilityFlow:
    """The flow with a copy of its torch network in ``dtype`` (the flow itself if already so, or not a network)."""
    model = flow.model
    if flow.sigma_field is not None or not isinstance(model, torch.nn.Module):
        return flow
    if all(p.dtype == dtype for p in model.parameters() if p.is_floating_point()):
        return flow
    return ProbabilityFlow(copy.deepcopy(model).to(dtype), flow.schedule, prediction_type=flow.prediction_type)


def load_model(spec: str, *, dtype: torch.dtype | None = torch.float32,
               device: str | torch.device = "cpu") -> LoadedModel:
    """The model named by ``--model``: ``digits``, ``analytic-mixture`` or a diffusers model directory.

    A network is put in ``dtype`` (``None``: left in the precision its weights were saved in).
    """
    device = torch.device(device)
    if spec == "digits":
        return _pretrained_digits(dtype, device)
    if spec == "analytic-mixture":
        return _mixture_digits(dtype, device)
    path = Path(spec)
    if not path.exists():
        raise CommandError(f"--model {spec!r}: no such directory; give {' or '.join(BUILTIN_MODELS)}, "
                           "or a local diffusers model directory")
    if not path.is_dir():
        raise CommandError(f"--model {spec!r} is a file; a diffusers model is a directory (with model_index.json "
                           "or config.json)")
    return _diffusers_dir(path, dtype, device)


# -- images -----------------------------------------------------------------------------------

def read_images(paths: Sequence[str], shape: tuple[int, int, int]) -> Tensor:
    """Image files → a float64 batch (N, C, H, W) in [−1, 1], resized to the model's H × W."""
    from PIL import Image, UnidentifiedImageError

    channels, height, width = shape
    if channels not in (1, 3):
        raise CommandError(f"this model takes {channels}-channel images; image files carry 1 (L) or 3 (RGB)")
    batch = []
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise CommandError(f"image {name!r}: no such file")
        try:
            with Image.open(path) as img:
                img = img.convert("L" if channels == 1 else "RGB")
                if img.size != (width, height):
                    img = img.resize((width, height), Image.Resampling.BILINEAR)
                data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
        except UnidentifiedImageError:
            raise CommandError(f"image {name!r}: not an image file PIL can read") from None
        batch.append(data.reshape(height, width, channels).permute(2, 0, 1).to(torch.float64))
    return torch.stack(batch) / 127.5 - 1.0


def _to_uint8(images: Tensor) -> Tensor:
    """(N, C, H, W) in [−1, 1] → uint8 (N, H, W, C), clipped."""
    x = ((images.detach().to("cpu", torch.float64).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1)


def save_grid(images: Tensor, path: str | Path, *, scale: int = 1) -> Path:
    """Write a batch (N, C, H, W) in [−1, 1] as one PNG grid of ⌈√N⌉ columns, each pixel ``scale``×``scale``."""
    from PIL import Image

    x = _to_uint8(images)
    n, h, w, c = x.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    pad = 1
    grid = torch.zeros(rows * (h + pad) + pad, cols * (w + pad) + pad, c, dtype=torch.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = x[i]
    img = Image.fromarray(grid.squeeze(-1).numpy() if c == 1 else grid.numpy())
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def save_images(images: Tensor, directory: str | Path, names: Sequence[str], *, scale: int = 1) -> list[Path]:
    """Write each image of the batch as its own PNG in ``directory``."""
    from PIL import Image

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for img_data, name in zip(_to_uint8(images), names):
        arr = img_data.squeeze(-1).numpy() if img_data.shape[-1] == 1 else img_data.numpy()
        img = Image.fromarray(arr)
        if scale > 1:
            img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
        path = directory / name
        img.save(path)
        out.append(path)
    return out


# -- argument parsing -------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``flowdiff sample: error: ... (see flowdiff sample --help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def _one_line(err: object) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _int_list(text: str) -> list[int]:
    return [_positive_int(part) for part in text.split(",") if part.strip()] or _empty(text)


def _name_list(accepted: Callable[[], Sequence[str]], what: str) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [part.strip() for part in text.split(",") if part.strip()]
        if not names:
            _empty(text)
        known = accepted()
        for name in names:
            if name not in known:
                raise argparse.ArgumentTypeError(f"unknown {what} {name!r}; accepted: {', '.join(known)}")
        return names

    return parse


def _one_name(accepted: Callable[[], Sequence[str]], what: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        known = accepted()
        if text not in known:
            raise argparse.ArgumentTypeError(f"unknown {what} {text!r}; accepted: {', '.join(known)}")
        return text

    return parse


def _empty(text: str) -> NoReturn:
    raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")


def _common(parser: argparse.ArgumentParser, *, dtype: str) -> None:
    group = parser.add_argument_group("model and device")
    group.add_argument("--model", default="digits", metavar="NAME|DIR",
                       help="'digits' (default: the small trained 8×8 digits model shipped with flowdiff), "
                            "'analytic-mixture' (a closed-form Gaussian mixture over 8×8 digits, exact ε), "
                            "or a local diffusers model directory")
    group.add_argument("--device", default="cpu", help="torch device to run on, e.g. cpu, cuda, cuda:1 "
                                                       "(default: cpu)")
    group.add_argument("--dtype", default=dtype, choices=list(DTYPES),
                       help=f"precision of the state and the network (default: {dtype}); float16/bfloat16 run "
                            "the network in that precision with a float32 state")
    group.add_argument("--seed", type=int, default=0, help="seed of the noise (default: 0)")
    group.add_argument("--threads", type=_positive_int, default=None,
                       help="CPU threads for torch (default: 1 for the small built-in models, for which one "
                            "thread is fastest; torch's choice for --model DIR)")


def _fixed_point_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fixed-point", action="store_true",
                        help="encode by fixed-point inversion (Newton-Krylov) of the solver's decode steps, so that "
                             "the plain decode with --solver reproduces the images (not for reversible solvers)")


def _solve_options(parser: argparse.ArgumentParser, *, solver: str, nfe: int | None, steps: int | None) -> None:
    group = parser.add_argument_group("solver")
    group.add_argument("--solver", default=solver, type=_one_name(_solvers.available, "solver"),
                       help=f"registered solver name (default: {solver}); 'flowdiff compare --help' lists them")
    budget = group.add_mutually_exclusive_group()
    default = f"--nfe {nfe}" if nfe is not None else f"--steps {steps}"
    budget.add_argument("--nfe", type=_positive_int, default=None,
                        help=f"budget of model evaluations; the largest step count within it is used (default: "
                             f"{default})")
    budget.add_argument("--steps", type=_positive_int, default=None, help="number of solver steps")
    group.add_argument("--grid", default="trailing", type=_one_name(lambda: GRIDS, "grid"),
                       help=f"σ grid: {', '.join(GRIDS)} (default: trailing)")
    parser.set_defaults(default_nfe=nfe, default_steps=steps)


def build_parser() -> argparse.ArgumentParser:
    """The ``flowdiff`` argument parser (its ``--help`` documents every option)."""
    parser = _Parser(prog="flowdiff", description="Compare ODE solvers on diffusion models, sample, encode, decode.",
                     epilog="Run 'flowdiff COMMAND --help' for a command's options.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("compare", help="compare solvers × grids at fixed NFE against a float64 reference (main job)",
                       description="Generate from one batch of noise with every solver × grid × NFE budget (in "
                                   "--dtype), measure the RMS error of the images against a tight float64 adaptive "
                                   "reference solve from the same noise, print the table and write it as "
                                   "markdown, CSV and a log-log error-vs-NFE plot.")
    _common(p, dtype="float32")
    p.add_argument("--solver", type=_name_list(_solvers.available, "solver"), default=None, metavar="LIST",
                   help="comma-separated solver names (default: "
                        f"{','.join(default_solvers())}); available: {', '.join(_solvers.available())}")
    p.add_argument("--nfe", type=_int_list, default=list(DEFAULT_NFE), metavar="LIST",
                   help=f"comma-separated NFE budgets (default: {','.join(map(str, DEFAULT_NFE))})")
    p.add_argument("--grid", type=_name_list(lambda: GRIDS, "grid"), default=list(DEFAULT_GRIDS), metavar="LIST",
                   help=f"comma-separated grids (default: {','.join(DEFAULT_GRIDS)}); available: {', '.join(GRIDS)}")
    p.add_argument("--batch", type=_positive_int, default=16, help="noise samples per run (default: 16)")
    p.add_argument("--rtol", type=float, default=REFERENCE_RTOL,
                   help="relative and absolute tolerance of the float64 reference solve (default: "
                        f"{REFERENCE_RTOL:g}); the reference is kept in DIR/reference.safetensors and reused "
                        "while the model, seed, batch and tolerance are unchanged")
    p.add_argument("--fresh-reference", action="store_true", help="solve the reference again even if kept")
    p.add_argument("--out", default="flowdiff-compare", metavar="DIR",
                   help="directory for compare.md, compare.csv and compare.png (default: ./flowdiff-compare)")
    p.add_argument("--layout", choices=("wide", "long"), default="wide",
                   help="printed table: a column per NFE budget (wide, default) or a row per run (long)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--task", choices=("generate", "roundtrip"), default="generate",
                   help="roundtrip: compare encoders by decode(encode(x)) on --batch held-out digits")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("sample", help="generate images and write them as one PNG grid",
                       description="Generate images from seeded noise and write them as one PNG grid.")
    _common(p, dtype="float32")
    _solve_options(p, solver="euler", nfe=20, steps=None)
    p.add_argument("--num", type=_positive_int, default=16, help="number of images (default: 16)")
    p.add_argument("--out", default="samples.png", metavar="PNG", help="output PNG (default: samples.png)")
    p.add_argument("--scale", type=_positive_int, default=None,
                   help="pixel magnification of the PNG (default: up to 64 pixels per image side)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("encode", help="encode image files to latents (safetensors)",
                       description="Encode image files to DDIM-scale latents x_T by solving the probability-flow "
                                   "ODE from σ = 0 up to σ_max; the latents file keeps the grid and solver so that "
                                   "'flowdiff decode' retraces them.")
    _common(p, dtype="float32")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (resized to the model's size)")
    _solve_options(p, solver="euler", nfe=None, steps=50)
    _fixed_point_option(p)
    p.add_argument("--out", default="latents.safetensors", metavar="FILE",
                   help="output latents file (default: latents.safetensors)")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("decode", help="decode latents (safetensors) to PNG images",
                       description="Decode a latents file written by 'flowdiff encode' back to images, with the "
                                   "grid and solver it was encoded with.")
    _common(p, dtype="float32")
    p.add_argument("latents", metavar="FILE", help="latents file from 'flowdiff encode'")
    p.add_argument("--out", default="decoded", metavar="DIR", help="output directory of PNGs (default: decoded)")
    p.add_argument("--scale", type=_positive_int, default=1, help="pixel magnification of the PNGs (default: 1)")
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser("roundtrip", help="encode then decode image files and print reconstruction metrics",
                       description="Encode image files, decode the latents with the same grid and solver, and "
                                   "print how far the reconstruction is from the input.")
    _common(p, dtype="float32")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (resized to the model's size)")
    _solve_options(p, solver="euler", nfe=None, steps=50)
    _fixed_point_option(p)
    p.add_argument("--latents", default=None, metavar="FILE", help="also write the latents to this file")
    p.add_argument("--out", default=None, metavar="DIR", help="also write the reconstructions as PNGs here")
    p.set_defaults(func=cmd_roundtrip)
    return parser


# -- commands ---------------------------------------------------------------------------------

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
    from .compare import Reference, reference_solution

    if not (0 < args.rtol < 1):
        raise CommandError(f"--rtol must be in (0, 1), got {args.rtol}")
    # the reference is solved from the network as saved (copied to float64), the runs in --dtype
    loaded, dtype, device = _setup(args, convert=False)
    run_flow = in_dtype(loaded.flow, dtype)
    noise = _noise(args, args.batch, loaded.shape, dtype, device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.task == "roundtrip":  # held-out digits (the shipped models' data) encoded and decoded back
        from .pretrained import digits_data

        images = digits_data("test").images[: args.batch].to(device, dtype).reshape(-1, *loaded.shape)
        result = compare(run_flow, task="roundtrip", images=images, solvers=args.solver, grids=args.grid,
                         nfe=args.nfe, model_kwargs=loaded.model_kwargs or None)
        (out / "compare.md").write_text(result.to_markdown("wide") + "\n" + result.to_markdown("long"))
        (out / "compare.csv").write_text(result.to_csv())
        print(result.to_markdown(args.layout), f"wrote {out / 'compare.md'}, {out / 'compare.csv'}, "
              f"{result.plot(out / 'compare.png', title='round trip: RMS error vs encode + decode NFE')}", sep="\n")
        return 0
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
    from .sampling import generate

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
    from .latent import Latent

    if not (hasattr(Latent, "save") and hasattr(Latent, "load")):
        raise CommandError("this install's flowdiff.Latent cannot be saved to a file yet (no Latent.save/load)")
    return Latent


def _encode(args: argparse.Namespace, loaded: LoadedModel, dtype: torch.dtype, device: torch.device) -> tuple:
    from .sampling import encode

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
    from .sampling import decode

    Latent = _latent_io()  # noqa: N806
    path = Path(args.latents)
    if not path.is_file():
        raise CommandError(f"latents {args.latents!r}: no such file")
    loaded, dtype, device = _setup(args)
    try:
        latent = Latent.load(path, device=device)
    except (ValueError, KeyError, OSError) as err:
        raise CommandError(f"latents {args.latents!r}: not a flowdiff latents file ({_one_line(err)})") from None
    except Exception as err:  # safetensors' own error type for a file that is not safetensors
        if type(err).__module__.split(".")[0] != "safetensors":
            raise
        raise CommandError(f"latents {args.latents!r}: not a safetensors file ({_one_line(err)})") from None
    if latent.solver_state is None:  # a reversible latent keeps its exact (float64) state as it is
        latent.x = latent.x.to(dtype=dtype)
    latent.dtype = dtype  # the network's dtype: what the decode feeds it and returns
    result = decode(loaded.flow, latent, model_kwargs=loaded.model_kwargs or None)
    names = [f"{path.stem}_{i:03d}.png" for i in range(result.x.shape[0])]
    written = save_images(result.x, args.out, names, scale=args.scale)
    print(f"decoded {len(written)} image(s) with {result.solver}: {result.stats.nfe} NFE; wrote {args.out}/")
    return 0


def cmd_roundtrip(args: argparse.Namespace) -> int:
    from .sampling import decode

    loaded, dtype, device = _setup(args)
    images, enc = _encode(args, loaded, dtype, device)
    dec = decode(loaded.flow, enc.latent, model_kwargs=loaded.model_kwargs or None)
    if args.latents is not None:
        Path(args.latents).parent.mkdir(parents=True, exist_ok=True)
        _latent_io()
        enc.latent.save(args.latents)
    if args.out is not None:
        save_images(dec.x, args.out, [Path(p).stem + "_roundtrip.png" for p in args.images])
    from .metrics import reconstruction

    figures = reconstruction(images, dec.x, encode_stats=enc.stats, decode_stats=dec.stats)
    print(f"round trip of {len(args.images)} image(s) with {enc.solver} on the {args.grid} grid, "
          f"{enc.latent.steps} steps: encode {figures.nfe_encode} NFE, decode {figures.nfe_decode} NFE; "
          "errors on the [0, 1] pixel scale:")
    print(f"  mse: {figures.mse:.3e}")
    print(f"  max_abs_error: {figures.max_abs:.3e}")
    print(f"  psnr_db: {figures.psnr:.2f}")
    return 0


# -- entry point ------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``flowdiff`` command with ``argv`` (default: the process's); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2), already printed in one line
        return exit_.code if isinstance(exit_.code, int) else 0
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"flowdiff {args.command}: interrupted", file=sys.stderr)
        return 130
    except (CommandError, _solvers.SolveError, ValueError, TypeError, OSError, RuntimeError, ImportError) as err:
        if os.environ.get("FLOWDIFF_DEBUG"):
            raise
        print(f"flowdiff {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except Exception as err:  # a bug, still reported in one line; FLOWDIFF_DEBUG=1 shows where
        if os.environ.get("FLOWDIFF_DEBUG"):
            raise
        print(f"flowdiff {args.command}: internal error: {type(err).__name__}: {_one_line(err)} "
              "(set FLOWDIFF_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
