"""``flowdiff likelihood``: log-density and bits/dim of image files through the probability-flow ODE.

    flowdiff likelihood a.png b.png                       # the digits model, 8-bit data's bits/dim
    flowdiff likelihood --data images/ --model DIR --divergence hutch++ --dequantization truncated_normal

Prints one row per image (nats, bits/dim and its error bar: the probes' standard error and the
solve's error from a check solve) and the mean bits/dim with its standard error over the
images. The images are read as the model's data, in [−1, 1] (8-bit files: k/127.5 − 1). Image
files hold integers, so by default they are dequantized (uniform noise on the 256-level lattice,
``--dequantize LEVELS`` for others) and bits/dim is the discrete data's, as the literature reports
it, with the offset log₂ 127.5 = 6.994 bits; ``--dequantization truncated_normal`` takes i-DODE's
noise instead, ``--dequantization none`` the continuous density's bits/dim (see
:mod:`flowdiff.tools.likelihood`). The command's model loading and image reading are the main CLI's
(``flowdiff.cli``), handed in by :func:`add_parser` so that this module does not import it back.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import solvers as _solvers

from ..engine.options import Adaptive
from ..runs.datasets import escaped_name, printable
from ..tools.likelihood import (
    DEFAULT_ATOL,
    DEFAULT_RTOL,
    DEQUANTIZATIONS,
    DIVERGENCES,
    PROBE_NOISES,
    ErrorBarWarning,
    Trace,
    draws_random,
    log_likelihood,
)
from ._argtypes import available_device, device_name, int_at_least, seed
from ._argtypes import positive_int as _positive_int
from ._argtypes import positive_number as _tolerance
from ._errors import one_line
from ._outputs import relative_names

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
DTYPES = {"float64": torch.float64, "float32": torch.float32}


def _levels(text: str) -> int:
    """``--dequantize``: quantization levels, 2 or more (one level has no spacing)."""
    return int_at_least(text, 2, "an integer >= 2 (the quantization levels over [-1, 1]; 256 for 8-bit files)")


def add_parser(subparsers: Any, *, load_model: Callable[..., Any],
               read_images: Callable[..., tuple[torch.Tensor, list[Any]]]) -> argparse.ArgumentParser:
    """Add the ``likelihood`` command to the main parser's ``subparsers``.

    ``load_model(spec, dtype=, device=)`` (→ an object with ``name``, ``flow``, ``shape``,
    ``model_kwargs``) and ``read_images(paths, shape)`` (→ a float64 batch in [−1, 1] and each file's
    :class:`~flowdiff.runs.imageio.ImageFormat`, whose depth sets the default ``--dequantize``) are the
    main CLI's helpers.
    """
    p = subparsers.add_parser(
        "likelihood", help="log-likelihood and bits/dim of image files through the probability-flow ODE",
        description="Integrate the probability-flow ODE with its divergence from each image (σ = 0) to σ_max and "
                    "print the log-density (nats), bits/dim, and for stochastic divergences the standard error from "
                    "the probes; then the mean bits/dim over the images with its standard error.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("images", nargs="*", default=[], metavar="IMAGE", help="image files (read in [-1, 1])")
    src.add_argument("--data", metavar="DIR", help=f"a directory: every {'/'.join(IMAGE_SUFFIXES)} file in it")
    group = p.add_argument_group("model and device")
    group.add_argument("--model", default="digits", metavar="NAME|DIR",
                       help="'digits' (default: the shipped 8×8 digits model), 'analytic-mixture' (closed form), or "
                            "a local diffusers model directory")
    group.add_argument("--device", default="cpu", type=device_name, help="torch device (default: cpu)")
    group.add_argument("--dtype", default="float32", choices=list(DTYPES),
                       help="precision of the state and the network (default: float32)")
    group.add_argument("--seed", type=seed, default=None,
                       help="seed of the probes and the dequantization, 0 … 2**64 - 1 (default: 0); refused where "
                            "nothing is drawn (the exact divergence with --dequantization none)")
    group.add_argument("--threads", type=_positive_int, default=None,
                       help="CPU threads for torch (default: 1 for the built-in models, torch's choice otherwise)")
    group.add_argument("--no-progress", action="store_true",
                       help="no progress bar (default: on a terminal, a bar on stderr of the σ each solve has reached)")
    group = p.add_argument_group("estimator")
    group.add_argument("--divergence", default="auto", choices=list(DIVERGENCES),
                       help="auto (default: exact up to 256 dimensions, hutch++ beyond), exact (D vector-Jacobian "
                            "products per evaluation), hutchinson, or hutch++")
    group.add_argument("--probes", type=_positive_int, default=None,
                       help="probes of a stochastic divergence (default: 16); >= 2 gives a standard error")
    group.add_argument("--sketch", type=_positive_int, default=None, help="Hutch++'s sketch size (default: 32)")
    group.add_argument("--probes-from", default=None, choices=list(PROBE_NOISES),
                       help="the probes' distribution (default: rademacher)")
    group.add_argument("--dequantization", default="uniform", choices=[*DEQUANTIZATIONS, "none"],
                       help="noise that dequantizes the integer pixel values, for the discrete data's bits/dim "
                            "(default: uniform; truncated_normal as in i-DODE); none: the continuous density's")
    group.add_argument("--dequantize", type=_levels, default=None, metavar="LEVELS",
                       help="quantization levels over [-1, 1] of the images (default: the files' own, 2^bits: 256 "
                            "for 8-bit files, 65536 for 16-bit); bits/dim gets the offset -log2(2/(LEVELS-1))")
    group = p.add_argument_group("solver")
    group.add_argument("--solver", default="dopri5", help="a σ-variable solver: adaptive pairs (default: dopri5; "
                                                          "bosh3, dopri8, ...) or with --steps any of rk4, heun, ...")
    group.add_argument("--rtol", type=_tolerance, default=None, help=f"adaptive rtol (default: {DEFAULT_RTOL:g})")
    group.add_argument("--atol", type=_tolerance, default=None, help=f"adaptive atol (default: {DEFAULT_ATOL:g})")
    group.add_argument("--steps", type=_positive_int, default=None, help="fixed grid of N steps in log(σ + c) instead")
    p.set_defaults(func=run, likelihood_helpers=(load_model, read_images))
    return p


#: log_likelihood's keywords as the flags that set them: an error names what the user typed
_FLAGS = ((re.compile(r"\bdequantize=None\b"), "--dequantization none"),
          (re.compile(r"\bdequantization='?(\w+)'?"), r"--dequantization \1"),
          (re.compile(r"\b(dequantize|steps)=(\w+)"), r"--\1 \2"),
          (re.compile(r"\bTrace\.probes_from\b"), "--probes-from"),
          (re.compile(r"\bTrace\.(sketch|probes)\b"), r"--\1"),
          (re.compile(r"\bprobes_from=None\b"), "no --probes-from"),
          (re.compile(r"\b(sketch|probes)=None\b"), r"no --\1"),
          (re.compile(r"\bprobes_from='(\w+)'"), r"--probes-from \1"),
          (re.compile(r"\b(sketch|probes)=(\d+)"), r"--\1 \2"),
          (re.compile(r"\bmethod='([\w+]+)'"), r"--divergence \1"),
          (re.compile(r"\bsolver '([\w+]+)'"), r"--solver \1"))


def _progress(args: argparse.Namespace) -> bool:
    """The bar is drawn on a terminal: in a log or a pipe its carriage-return updates pile up into one long line (as
    the folder runs, which draw theirs on a terminal only)."""
    return not args.no_progress and sys.stderr.isatty()


def _as_flags(message: str) -> str:
    for pattern, flag in _FLAGS:
        message = pattern.sub(flag, message)
    return message


def _image_paths(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The image files to read, and the hidden ones of ``--data`` left out (macOS's ``._x.png`` resource forks are
    no images whatever their suffix; folder runs skip them by the same rule, :func:`flowdiff.runs.datasets.scan`)."""
    if args.data is None:
        return list(args.images), []
    directory = Path(args.data)
    if not directory.is_dir():
        raise ValueError(f"--data {args.data!r}: no such directory")
    found = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    hidden = [p.name for p in found if p.name.startswith(".")]
    paths = [str(p) for p in found if not p.name.startswith(".")]
    if not paths:
        below = sum(1 for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        raise ValueError(f"--data {args.data!r}: no image files ({', '.join(IMAGE_SUFFIXES)}) in it"
                         + (f"; likelihood --data reads the folder's own files, not its subfolders, which hold {below} "
                            "(give those folders, or the files)" if below else "")
                         + (f"; hidden files are not read: {', '.join(hidden)}" if hidden else ""))
    return paths, hidden


def _file_levels(paths: list[str], formats: list[Any]) -> int:
    """The quantization levels the files' own depth gives (2⁸ for 8-bit files, 2¹⁶ for 16-bit): the default of
    ``--dequantize``. Files of several depths, or of floats, hold no one lattice: refused, naming them."""
    for path, fmt in zip(paths, formats):
        if fmt.kind != "uint":
            raise ValueError(f"image {path!r} holds {fmt.bits}-bit floats, no integer levels to dequantize: give "
                             "--dequantization none (the continuous density), or --dequantize LEVELS if its values "
                             "are quantized")
    depths = sorted({fmt.bits for fmt in formats})
    if len(depths) > 1:
        first = {bits: path for path, fmt in zip(paths, formats) for bits in [fmt.bits]}
        said = ", ".join(f"{bits}-bit {first[bits]!r}" for bits in depths)
        raise ValueError(f"the images are of several depths ({said}), so their discrete data lie on different "
                         "lattices: give --dequantize LEVELS, or files of one depth")
    return 2 ** depths[0]


def _say_again(caught: list[warnings.WarningMessage], args: argparse.Namespace, levels: int | None, *,
               with_bars: bool) -> None:
    """Warn again with each of the library's ``caught`` warnings in the flags' words; an :class:`ErrorBarWarning`
    only ``with_bars`` (where the solve failed: there is no table to print it under)."""
    for warning in caught:
        if issubclass(warning.category, ErrorBarWarning) and not with_bars:
            continue
        said = _as_flags(str(warning.message))
        if args.dequantize is None:  # the levels came from the files' depth, not from a flag the user typed
            said = said.replace(f"--dequantize {levels}:", f"the files' {levels} levels:", 1)
        warnings.warn(said, warning.category, stacklevel=1)


def run(args: argparse.Namespace) -> int:
    """Run ``flowdiff likelihood``; errors are ``ValueError``/``TypeError`` for the main CLI to print."""
    load_model, read_images = args.likelihood_helpers
    paths, hidden = _image_paths(args)
    if args.solver not in _solvers.available():
        raise ValueError(f"--solver {args.solver!r}: unknown; accepted: {', '.join(_solvers.available())}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif args.model in ("digits", "analytic-mixture"):
        torch.set_num_threads(1)
    device = available_device(args.device)
    dtype = DTYPES[args.dtype]
    loaded = load_model(args.model, dtype=dtype, device=device)
    images, formats = read_images(paths, loaded.shape)
    images = images.to(device=device, dtype=dtype)
    options: dict[str, Any] = {}
    if args.dequantization == "none" and args.dequantize is not None:
        raise ValueError(f"--dequantize {args.dequantize} sets the levels that --dequantization noise fills; "
                         "--dequantization none adds no noise: give --dequantization uniform or truncated_normal, or "
                         "leave out --dequantize")
    levels = args.dequantize
    if levels is None and args.dequantization != "none":
        levels = _file_levels(paths, formats)
    if args.dequantization != "none":
        options.update(dequantize=levels, dequantization=args.dequantization)
    try:  # the library says where --probes/--sketch apply ("auto" takes them beyond 256 dimensions, as Hutch++)
        estimator = Trace(args.divergence, probes=args.probes, sketch=args.sketch, probes_from=args.probes_from)
    except ValueError as err:
        raise ValueError(_as_flags(one_line(err))) from None
    dim = images[0].numel()
    drawn = draws_random(estimator, dim, options.get("dequantize"))
    if args.seed is not None and not drawn:
        raise ValueError(f"--seed {args.seed} would change nothing: the command draws only the probes of a stochastic "
                         f"divergence and the dequantization noise, and here the divergence is exact (--divergence "
                         f"{args.divergence}, {dim} dimensions) with --dequantization none; drop --seed")
    if args.steps is not None:
        if args.rtol is not None or args.atol is not None:
            raise ValueError(f"--rtol/--atol set an adaptive solve; --steps {args.steps} a fixed grid: give one of "
                             "them")
        options["steps"] = args.steps
    elif args.rtol is not None or args.atol is not None:
        options["adaptive"] = Adaptive(rtol=args.rtol, atol=args.atol)  # one left out: the likelihood's default
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:  # said again below in the flags' words
            warnings.simplefilter("always")
            result = log_likelihood(loaded.flow, images, solver=args.solver, estimator=estimator,
                                    generator=(torch.Generator().manual_seed(0 if args.seed is None else args.seed)
                                               if drawn else None),
                                    model_kwargs=loaded.model_kwargs or None, progress=_progress(args), **options)
    except ValueError as err:  # what the library warned of before it failed is said too, before the error
        _say_again(caught, args, levels, with_bars=True)
        raise ValueError(_as_flags(one_line(err))) from None
    notes = [_as_flags(str(w.message)) for w in caught if issubclass(w.category, ErrorBarWarning)]
    _say_again(caught, args, levels, with_bars=False)  # the error bars' notes are printed under the table
    wall = time.perf_counter() - start
    if result.dequantization is None:
        how = "continuous density: bits/dim = -log p/(D ln 2), no dequantization"
    else:
        how = (f"discrete data: {result.dequantization} dequantization to {levels} levels, bits/dim = "
               f"-(log p - log q)/(D ln 2) + offset {result.offset_bits:.4f} bits")
    print(f"log-likelihood of {len(paths)} image(s) under {loaded.name}: {result.divergence} divergence, "
          f"{args.solver}, {result.dim} dimensions; {how}")
    se = result.bits_per_dim_error
    # a/x.png and b/x.png stay apart; a name is one printed line, escaped as folder runs print it
    names = [printable(escaped_name(n.as_posix())) for n in relative_names(paths)]
    width = max(5, *(len(n) for n in names))
    parts = [what for what, e in (("probes", result.std_error), ("solve", result.solve_error)) if e is not None]
    print(f"{'image':<{width}}  {'log p (nats)':>14}  {'bits/dim':>10}"
          + (f"  ± error ({' and '.join(parts)})" if se is not None else ""))
    for i, name in enumerate(names):
        row = f"{name:<{width}}  {float(result.log_prob[i]):>14.4f}  {float(result.bits_per_dim[i]):>10.5f}"
        print(row + (f"  ± {float(se[i]):.5f}" if se is not None else ""))
    mean, err = result.mean_bits_per_dim()
    spread = f" ± {err:.5f} (standard error over {len(paths)} images)" if err is not None else ""
    print(f"mean bits/dim: {mean:.5f}{spread}")
    check = result.stats.extra.get("check")
    quarter = result.stats.extra.get("check_quarter")
    checked = f"; the check solve {check.nfe} and {check.extra['vjps']}" if check else ""
    if quarter is not None:
        checked += f", the second check solve (a quarter of the steps) {quarter.nfe} and {quarter.extra['vjps']}"
    print(f"NFE {result.stats.nfe} (field evaluations) and {result.stats.extra['vjps']} vector-Jacobian products in "
          f"{result.stats.accepted} steps{checked}; {wall:.1f} s")
    if result.per_probe is not None and result.per_probe.shape[1] == 1:
        print("note: 1 probe gives no standard error, so the error bar is the solve's alone and leaves out the "
              "probe's variance, which can be far larger; 2 or more give a standard error")
    for note in notes:  # the fixed grid's bar: unchecked (--steps 2) or inf outside the asymptotic regime
        print(f"note: {note}")
    if hidden:
        shown = ", ".join(printable(escaped_name(n)) for n in hidden)
        print(f"skipped {len(hidden)} hidden file(s) in --data: {shown}")
    return 0


__all__ = ["add_parser", "run"]
