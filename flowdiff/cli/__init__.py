"""The ``flowdiff`` command: compare solvers, sample, encode, decode and round-trip images.

    flowdiff compare                      # solvers × grids × NFE on the embedded digits model
    flowdiff sample --solver heun --nfe 19 --out samples.png
    flowdiff sample --learned unipc-nfe6.learned.json     # a learned solver saved from Python, on its own grid
    flowdiff encode a.png b.png --out latents.safetensors
    flowdiff decode latents.safetensors --out decoded/
    flowdiff roundtrip a.png b.png --solver euler --steps 50
    flowdiff roundtrip --data DIR --out OUT --steps 20    # a folder; resumable; under torchrun, split over ranks

Everything runs offline: the default model is the small trained digits model shipped with
the package (``--model digits``); ``--model analytic-mixture`` is a closed-form Gaussian
mixture over 8×8 digit images (exact ε, no network); ``--model DIR`` loads a local diffusers
model directory.

Outputs are planned before any work (:mod:`._outputs`): names that collide, an output that is an
input, or one that exists (without ``--overwrite``) stop the command before the model runs; each
file is written atomically. Image files keep their depth (:mod:`flowdiff.runs.imageio`); latents
files record their model and refuse another at decode (``--ignore-fingerprint``). Errors end the
command with a one-line message naming the option or file and a non-zero status (2: arguments
that cannot work, 1: a failure at run time); set ``FLOWDIFF_DEBUG=1`` to see the traceback.

The package: ``_parser`` (options), ``_models`` (``--model``), ``_images`` (image files),
``_outputs`` (the output plan), ``_commands`` (one function per command), ``_dataset`` (``--data DIR`` runs),
``_learned`` (``--learned FILE``: a learned solver saved from Python), ``_errors``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import solvers as _solvers

from ..runs.distributed import world_size
from ._errors import CommandError, UsageError, one_line, say
from ._images import read_images, save_grid, save_images
from ._models import LoadedModel, in_dtype, load_model
from ._outputs import forget_planned_folders, remove_planned_folders
from ._parser import build_parser

__all__ = ["CommandError", "UsageError", "LoadedModel", "build_parser", "in_dtype", "load_model", "main", "read_images",
           "save_grid", "save_images"]


def _one_line_warning(command: str):
    """A ``warnings.showwarning`` that prints ``flowdiff COMMAND: warning: …`` on one line of stderr."""
    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        say(f"flowdiff {command}: warning: {one_line(message)}")

    return show


def _check_split(args) -> None:
    """Under torchrun, only the commands that deal their work out over the processes run: any other would do the whole
    job on every process (the same file written N times, the same lines printed N times).

    A process started from inside a torchrun job (``subprocess.run(["flowdiff", "sample", ...])`` in a rank's script)
    inherits the rank's whole environment — ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT`` — and
    cannot be told from one of torchrun's processes by it (nor by its parent process: ``torchrun --no-python`` runs a
    rank's flowdiff under a shell). ``WORLD_SIZE=1`` in its environment says it is one process, as outside torchrun:
    the refusal says so."""
    world = world_size()
    splits = args.command == "compare" or (args.command in ("encode", "roundtrip") and args.data is not None)
    if world > 1 and not splits:
        raise UsageError(f"flowdiff {args.command} does not split its work over torchrun's processes (WORLD_SIZE="
                         f"{world}): every process would do all of it; run it as one process, or use a command that "
                         "splits: compare, or encode/roundtrip with --data DIR. A command started from inside a "
                         "torchrun job inherits its WORLD_SIZE: start it with WORLD_SIZE=1 in its environment to run "
                         "it as one process")


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
    forget_planned_folders()
    code = 1
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning(args.command)
            _check_split(args)
            code = int(args.func(args) or 0)
            return code
    except KeyboardInterrupt:
        say(f"flowdiff {args.command}: interrupted")
        return 130
    except (CommandError, _solvers.SolveError, ValueError, TypeError, OSError, RuntimeError, ImportError) as err:
        if os.environ.get("FLOWDIFF_DEBUG"):
            raise
        say(f"flowdiff {args.command}: error: {one_line(err)}")
        return getattr(err, "exit_code", 1)
    except Exception as err:  # a bug, still reported in one line; FLOWDIFF_DEBUG=1 shows where
        if os.environ.get("FLOWDIFF_DEBUG"):
            raise
        say(f"flowdiff {args.command}: internal error: {type(err).__name__}: {one_line(err)} "
            "(set FLOWDIFF_DEBUG=1 for the traceback)")
        return 1
    finally:
        if code != 0:  # the output plan made folders before the work that failed: those left empty go
            remove_planned_folders()
