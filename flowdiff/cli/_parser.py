"""The ``flowdiff`` argument parser: every command, its options and their one-line usage errors."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import solvers as _solvers

from ..engine.grids import GRIDS
from ..engine.plugins import article as _a
from ..engine.plugins import plugins, solver_plugin
from ..tools.compare import DEFAULT_GRIDS, DEFAULT_NFE, default_solvers
from ..tools.peers import PEERS
from . import _learned, _likelihood
from ._argtypes import device_name as _device_name
from ._argtypes import image_count
from ._argtypes import positive_int as _positive_int
from ._argtypes import seed as _seed
from ._commands import DTYPES, REFERENCE_RTOL, cmd_compare, cmd_decode, cmd_encode, cmd_roundtrip, cmd_sample
from ._dataset import add_data_options, with_data
from ._errors import one_line
from ._images import load_images
from ._models import LoadedModel, load_model
from ._prompt import add_class_label_option, add_prompt_options


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``flowdiff sample: error: ... (see flowdiff sample --help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        """As argparse's, but an argument the command does not take is that command's error (``flowdiff decode:
        error: unrecognized arguments: --data (see flowdiff decode --help)``), not the main parser's."""
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            commands = next((a.choices for a in self._actions if isinstance(a, argparse._SubParsersAction)), {})
            (commands.get(getattr(parsed, "command", None)) or self).error(f"unrecognized arguments: {' '.join(extra)}")
        return parsed



def _int_list(text: str) -> list[int]:
    parts = [part.strip() for part in text.split(",")]
    if not any(parts):
        _empty(text)
    if not all(parts):
        raise argparse.ArgumentTypeError(f"empty entry in {text!r}; expected comma-separated positive integers, "
                                         "e.g. 5,10,20")
    return [_positive_int(part) for part in parts]


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text}")
    return value


#: The largest pixel magnification (--scale): 64× an 8×8 image is 512×512 pixels.
MAX_SCALE = 64


def _scale(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_SCALE:
        raise argparse.ArgumentTypeError(f"expected a positive integer up to {MAX_SCALE}, got {value}")
    return value


def _overwrite_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="replace output files that exist (without it, a command that would overwrite a file, "
                             "an input included, stops before it starts)")


def _name_list(accepted: Callable[[], Sequence[str]], what: str) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [part.strip() for part in text.split(",")]
        if not any(names):
            _empty(text)
        if not all(names):
            raise argparse.ArgumentTypeError(f"empty entry in {text!r}; expected comma-separated {what} names")
        known = accepted()
        for name in names:
            if name not in known:
                raise argparse.ArgumentTypeError(_unknown(what, name, known))
        return names

    return parse


def _one_name(accepted: Callable[[], Sequence[str]], what: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        known = accepted()
        if text not in known:
            raise argparse.ArgumentTypeError(_unknown(what, text, known))
        return text

    return parse


def _unknown(what: str, name: str, known: Sequence[str]) -> str:
    """Why ``name`` is refused: unknown, or a solver that only generates or only encodes (``flowmatch_heun``,
    ``pndm``, ``ddim_inverse``), known by name to the commands that run that direction but not to this one."""
    plugin = solver_plugin(name) if what == "solver" else None
    if plugin is None:
        return f"unknown {what} {name!r}; accepted: {', '.join(known)}"
    return (f"{name!r} is {_a(plugin.direction)}-only method, which this command does not run; accepted: "
            f"{', '.join(known)}")


def _empty(text: str) -> NoReturn:
    raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")


def _common(parser: argparse.ArgumentParser, *, dtype: str | None, seed: bool = False) -> None:
    """The model and device options; ``seed``: the command draws noise (sample, compare), so ``--seed`` means
    something (encode, decode and roundtrip draw none: a ``--seed`` there would be taken and do nothing)."""
    group = parser.add_argument_group("model and device")
    group.add_argument("--model", default="digits", metavar="NAME|DIR",
                       help="'digits' (default: the small trained 8×8 digits model shipped with flowdiff), "
                            "'analytic-mixture' (a closed-form Gaussian mixture over 8×8 digits, exact ε), "
                            "or a local diffusers model directory")
    group.add_argument("--device", default="auto", type=_device_name,
                       help="torch device to run on, e.g. cpu, cuda, cuda:1 (default: auto, the GPU when torch "
                            "sees one, else cpu)")
    group.add_argument("--dtype", default=dtype, choices=list(DTYPES),
                       help=f"precision of the state and the network (default: {dtype or 'that of the latents'}); "
                            "float16/bfloat16 run the network in that precision with a float32 state")
    if seed:
        group.add_argument("--seed", type=_seed, default=0, help="seed of the noise, 0 … 2**64 - 1 (default: 0)")
    group.add_argument("--threads", type=_positive_int, default=None,
                       help="CPU threads for torch (default: 1 for the small built-in models, for which one "
                            "thread is fastest; torch's choice for --model DIR)")
    add_prompt_options(parser)


def _fixed_point_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fixed-point", action="store_true",
                        help="encode by fixed-point inversion of the solver's decode steps (Anderson mixing, then "
                             "Newton-Krylov for what is left: flowdiff.Inversion('fixed_point')'s default), so "
                             "that the plain decode with --solver reproduces the images (not for reversible solvers)")


def _generate_solvers() -> list[str]:
    """What ``generate(solver=...)`` accepts by name: the registered solvers and the generate-only solver plug-ins
    (``flowmatch_heun``)."""
    return [*_solvers.available(), *plugins("solver", "generate")]


def _encode_solvers() -> list[str]:
    """What ``encode(solver=...)`` accepts by name: the registered solvers and the encode-only solver plug-ins
    (``ddim_inverse``, which ``compare --task roundtrip`` runs by default)."""
    return [*_solvers.available(), *plugins("solver", "encode")]


def _solve_options(parser: argparse.ArgumentParser, *, solver: str, nfe: int | None, steps: int | None,
                   accepted: Callable[[], Sequence[str]] = _solvers.available) -> None:
    group = parser.add_argument_group("solver")
    more = [n for n in accepted() if n not in _solvers.available()]
    group.add_argument("--solver", default=solver, type=_one_name(accepted, "solver"),
                       help=f"registered solver name (default: {solver}); 'flowdiff compare --help' lists them"
                            + (f"; also {', '.join(more)}" if more else ""))
    budget = group.add_mutually_exclusive_group()
    default = f"--nfe {nfe}" if nfe is not None else f"--steps {steps}"
    budget.add_argument("--nfe", type=_positive_int, default=None,
                        help=f"budget of model evaluations; the largest step count within it is used (default: "
                             f"{default})")
    budget.add_argument("--steps", type=_positive_int, default=None, help="number of solver steps")
    group.add_argument("--grid", default="trailing", type=_one_name(lambda: (*GRIDS, "tuned"), "grid"),
                       help=f"σ grid: {', '.join(GRIDS)} (default: trailing), or tuned: the grid flowdiff stores "
                            "tuned for this model, --solver and --nfe (as for digits; refused where none is)")
    parser.set_defaults(default_nfe=nfe, default_steps=steps)


def _encode_inputs(parser: argparse.ArgumentParser) -> None:
    """What ``encode`` and ``roundtrip`` share: the model, the images (or ``--data``), the solve, the inversion."""
    _common(parser, dtype="float32")
    parser.add_argument("images", nargs="*", metavar="IMAGE",
                        help="image files (PNG, TIFF, …) of the model's size and channels (or --data DIR)")
    add_class_label_option(parser)
    _solve_options(parser, solver="euler", nfe=None, steps=50, accepted=_encode_solvers)
    _fixed_point_option(parser)


def _unlabelled_model(spec: str, **options: object) -> LoadedModel:
    """:func:`load_model` for ``flowdiff likelihood``, which takes no class labels: a model that needs one per
    image (a DiT, whose unconditional model is its null class) is refused by name."""
    loaded = load_model(spec, **options)
    if loaded.labels is not None and loaded.labels.null is not None:
        raise ValueError(f"--model {spec!r}: a class-conditional DiT ({loaded.labels.classes} classes) takes a class "
                         "label per image, which 'flowdiff likelihood' does not pass; use "
                         "flowdiff.log_likelihood(flow, images, model_kwargs={'class_labels': labels}) from Python")
    return loaded


def build_parser() -> argparse.ArgumentParser:
    """The ``flowdiff`` argument parser (its ``--help`` documents every option)."""
    parser = _Parser(prog="flowdiff", description="Compare ODE solvers on diffusion models, sample, encode, decode.",
                     epilog="Run 'flowdiff COMMAND --help' for a command's options.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("compare", help="compare solvers × grids at fixed NFE against a float64 reference (main job)",
                       description="Generate from one batch of noise with every solver × grid × NFE budget (in "
                                   "--dtype), and with --peers diffusers' and k-diffusion's samplers, measure the RMS "
                                   "error of the images against a tight float64 adaptive reference solve from the "
                                   "same noise, print the best grid per solver and write a report: compare.md (the "
                                   "run's facts, the best per budget, the command that reproduces it), the frontier "
                                   "and sample figures, every solver × grid, and every run as CSV.")
    _common(p, dtype="float32", seed=True)
    p.add_argument("--solver", type=_name_list(_encode_solvers, "solver"), default=None, metavar="LIST",
                   help="comma-separated solver names (default: "
                        f"{','.join(default_solvers())}); available: {', '.join(_solvers.available())}; with --task "
                        f"roundtrip also {', '.join(plugins('solver', 'encode'))} (its default encoders)")
    p.add_argument("--nfe", type=_int_list, default=list(DEFAULT_NFE), metavar="LIST",
                   help=f"comma-separated NFE budgets (default: {','.join(map(str, DEFAULT_NFE))})")
    p.add_argument("--grid", type=_name_list(lambda: (*GRIDS, "tuned"), "grid"), default=None,
                   metavar="LIST", help=f"comma-separated grids (default: {','.join(DEFAULT_GRIDS)}, plus tuned where "
                   "flowdiff ships tuned grids for the model and every solver and budget, as for digits); available: "
                   f"{', '.join(GRIDS)}, tuned (flowdiff.tune_grid per solver and budget, on calibration noise: the "
                   "shipped grid where there is one, unless --calibration-seed is given)")
    p.add_argument("--calibration-seed", type=_seed, default=None, metavar="N",
                   help="seed of the calibration noise --grid tuned is tuned on (default: flowdiff's own; "
                        "never the evaluation noise)")
    p.add_argument("--batch", type=_positive_int, default=16, help="noise samples per run (default: 16)")
    p.add_argument("--rtol", type=_tolerance, default=REFERENCE_RTOL,
                   help="relative and absolute tolerance of the float64 reference solve (default: "
                        f"{REFERENCE_RTOL:g}); the reference is kept in DIR/reference.safetensors and reused "
                        "while the model, seed, batch and tolerance are unchanged")
    p.add_argument("--fresh-reference", action="store_true", help="solve the reference again even if kept")
    p.add_argument("--peers", type=_name_list(lambda: PEERS, "peer"), default=None, metavar="LIST",
                   help=f"also run these libraries' samplers on the same model, noise, budgets and reference: "
                        f"{', '.join(PEERS)} (comma-separated; a peer that is not installed is reported, not run)")
    p.add_argument("--out", default="flowdiff-compare", metavar="DIR",
                   help="directory for the report compare.md with its figures frontier.png, samples.png and "
                        "compare.png, and compare.csv (default: ./flowdiff-compare)")
    p.add_argument("--layout", choices=("best", "wide", "long"), default="best",
                   help="printed table: a row per solver with its best grid and a column per NFE budget (best, "
                        "default), a row per solver × grid (wide) or a row per run (long)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--task", choices=("generate", "roundtrip"), default="generate",
                   help="generate (default): the solvers' images from --batch noises against the reference; "
                        "roundtrip: compare encoders by decode(encode(x)) on --batch held-out digits (no --peers: "
                        "they do not encode)")
    _learned.add_compare_option(p)
    _overwrite_option(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("sample", help="generate images and write them as one 8-bit image grid (PNG)",
                       description="Generate images from seeded noise and write them as one 8-bit image grid, "
                                   "in the format --out's suffix names (PNG by default).")
    _common(p, dtype="float32", seed=True)
    add_class_label_option(p)
    _solve_options(p, solver="euler", nfe=20, steps=None, accepted=_generate_solvers)
    _learned.add_sample_option(p)
    p.add_argument("--num", type=image_count, default=16, help="number of images (default: 16)")
    p.add_argument("--out", default="samples.png", metavar="FILE",
                   help="output image file; its suffix picks the format (.png, .tif, …; default: samples.png)")
    p.add_argument("--scale", type=_scale, default=None,
                   help="pixel magnification of the grid (default: up to 64 pixels per image side)")
    _overwrite_option(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("encode", help="encode image files to latents (safetensors)",
                       description="Encode image files to DDIM-scale latents x_T by solving the probability-flow "
                                   "ODE from σ = 0 up to σ_max; the latents file keeps the grid and solver so that "
                                   "'flowdiff decode' retraces them.")
    _encode_inputs(p)
    p.add_argument("--out", default=None, metavar="FILE|DIR",
                   help="output latents file (default: latents.safetensors); with --data, the output folder")
    add_data_options(p, "encode")
    _learned.add_refused_option(p, "encode")
    _overwrite_option(p)
    p.set_defaults(func=with_data("encode", cmd_encode))

    p = sub.add_parser("decode", help="decode latents (safetensors) to image files, in their inputs' formats",
                       description="Decode a latents file written by 'flowdiff encode' back to images, with the "
                                   "grid and solver it was encoded with.")
    _common(p, dtype=None)
    add_class_label_option(p)
    p.add_argument("latents", metavar="FILE", help="latents file from 'flowdiff encode'")
    p.add_argument("--out", default="decoded", metavar="DIR",
                   help="output folder (default: decoded); each image keeps the name and format (depth, mode) its "
                        "input had at the encode, else FILE-STEM_000.png, …")
    p.add_argument("--scale", type=_scale, default=1, help="pixel magnification of the images (default: 1)")
    p.add_argument("--ignore-fingerprint", action="store_true",
                   help="decode even if the latents were encoded with another model or conditioning")
    _overwrite_option(p)
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser("roundtrip", help="encode then decode image files and print reconstruction metrics",
                       description="Encode image files, decode the latents with the same grid and solver, and "
                                   "print how far the reconstruction is from the input.")
    _encode_inputs(p)
    p.add_argument("--latents", default=None, metavar="FILE", help="also write the latents to this file")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="also write the reconstructions here, each under its input's relative path and format; "
                        "with --data, the output folder (required)")
    add_data_options(p, "roundtrip")
    _learned.add_refused_option(p, "roundtrip")
    _overwrite_option(p)
    p.set_defaults(func=with_data("roundtrip", cmd_roundtrip))

    _likelihood.add_parser(sub, load_model=_unlabelled_model, read_images=load_images)
    return parser

