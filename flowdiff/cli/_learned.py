"""``--learned FILE``: a learned solver saved from Python (:meth:`flowdiff.LearnedSolver.save`) on the command line.

A learned solver was fitted for one model, one NFE budget and its own σ grid, for generation. So:

* ``flowdiff sample --learned FILE`` generates with it on its grid at its budget; ``--solver``, ``--grid``,
  ``--nfe`` and ``--steps`` beside it are refused, naming what the file fixes (one way to say each thing: the file).
* ``flowdiff compare --learned FILE [--learned FILE2 …]`` adds its row, ``learned(<base>)`` on the grid ``fitted``,
  beside the named solvers; its budget must be among ``--nfe``.
* ``encode`` and ``roundtrip`` (and ``compare --task roundtrip``) refuse it: it does not encode.

The file is read by :meth:`flowdiff.LearnedSolver.load`, which refuses a file fitted for another model (or another
``--dtype``, ``--prompt``, ``--class-label``: the flow's fingerprint); every refusal names ``--learned`` and the file.
There is no ``learn`` command: a fit is hundreds of solves; fit in Python (:func:`flowdiff.learn_solver`) and save.
"""

from __future__ import annotations

import argparse
import shlex
from typing import Any

from ..engine._files import regular_file
from ..engine.flow import ProbabilityFlow
from ..tools.compare import LEARNED_GRID
from ..tools.learned import LearnedSolver
from ._errors import CommandError, UsageError, one_line

#: The sample options a learned solver's file fixes, by their attribute names.
FIXED = {"solver": "--solver", "grid": "--grid", "nfe": "--nfe", "steps": "--steps"}


def add_sample_option(parser: argparse.ArgumentParser) -> None:
    """``sample``'s ``--learned FILE``. ``--solver`` and ``--grid`` default to None here so that one given beside
    ``--learned`` can be told from its absence; :func:`sample_flags` puts their defaults back without it."""
    parser.add_argument("--learned", action="append", default=None, metavar="FILE",
                        help="generate with a learned solver saved from Python (flowdiff.learn_solver(...).save(FILE))"
                             ", on the grid and at the budget it was fitted for (so no --solver, --grid, --nfe or "
                             "--steps beside it); a file fitted for another model or --dtype is refused")
    parser.set_defaults(solve_defaults={"solver": parser.get_default("solver"), "grid": parser.get_default("grid")},
                        solver=None, grid=None)


def add_compare_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--learned", action="append", default=None, metavar="FILE",
                        help="add a learned solver saved from Python (flowdiff.learn_solver(...).save(FILE)) as the "
                             "row learned(<base>) on its own grid ('fitted') at the budget it was fitted for, which "
                             "--nfe must list; repeat for more than one")


def _refuse_learned(command: str):  # noqa: ANN202 - an argparse type
    def refuse(text: str) -> str:
        raise argparse.ArgumentTypeError(f"{text!r}: a learned solver is fitted for generation only (flowdiff sample, "
                                         f"flowdiff compare); {command} takes --solver NAME, a registered solver")

    return refuse


def add_refused_option(parser: argparse.ArgumentParser, command: str) -> None:
    """``encode``/``roundtrip``: ``--learned`` is refused by name (a learned solver does not encode) rather than
    reported as an argument the command does not know."""
    parser.add_argument("--learned", type=_refuse_learned(command), default=None, help=argparse.SUPPRESS)


def _check_file(path: str) -> None:
    """A missing file, a folder or a FIFO named by ``--learned`` is refused before the model is loaded."""
    try:
        regular_file(path, "--learned")
    except (OSError, ValueError) as err:
        raise CommandError(one_line(err)) from None


def sample_flags(args: argparse.Namespace) -> None:
    """Before any work: with ``--learned``, refuse the solve options it fixes; without, restore their defaults."""
    if args.learned is None:
        for name, value in args.solve_defaults.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
        return
    if len(args.learned) > 1:  # one would be dropped
        raise UsageError(f"--learned given {len(args.learned)} times ({', '.join(map(repr, args.learned))}): sample "
                         "generates with one learned solver; give one (flowdiff compare takes several)")
    args.learned = args.learned[0]
    given = [f"{flag} {getattr(args, name)}" for name, flag in FIXED.items() if getattr(args, name) is not None]
    if given:
        raise UsageError(f"{', '.join(given)} beside --learned {args.learned!r}: the learned solver runs its own "
                         "solver on the grid and at the NFE budget it was fitted for; leave "
                         f"{'it' if len(given) == 1 else 'them'} out (or drop --learned)")
    _check_file(args.learned)


def load(path: str, flow: ProbabilityFlow, model_kwargs: dict[str, Any] | None) -> LearnedSolver:
    """The learned solver in ``path``, read by its own loader and checked to belong to ``flow``; any failure is a
    one-line :class:`CommandError` naming ``--learned`` and the file."""
    _check_file(path)
    try:
        return LearnedSolver.load(path, flow, model_kwargs or None)
    except (OSError, ValueError, TypeError) as err:
        raise CommandError(f"--learned {path!r}: {one_line(err)}") from None


def sample_solve(args: argparse.Namespace, flow: ProbabilityFlow, model_kwargs: dict[str, Any] | None
                 ) -> tuple[dict[str, Any], str]:
    """``generate``'s solver and grid keywords for ``sample``, and how the printed line names them."""
    if args.learned is None:
        return {"solver": args.solver}, f"on the {args.grid} grid"
    learned = load(args.learned, flow, model_kwargs)
    how = ("on its fitted grid" if learned.kept else
           f"on its grid as the base method {learned.solver} (its fit was not kept: the held-out half rejected it)")
    return ({"solver": learned.as_solver(), "grid": learned.sigmas},
            f"from --learned {args.learned} (fitted at NFE {learned.nfe}) {how}")


def compare_solvers(args: argparse.Namespace, flow: ProbabilityFlow, model_kwargs: dict[str, Any] | None
                    ) -> list[Any] | None:
    """``compare``'s ``solvers=``: ``--solver`` (or the defaults) and each ``--learned`` file's solver, which must be
    fitted at one of ``--nfe``. Records in ``args.learned_files`` which file made which row, for the reproduce line."""
    args.learned_files = {}
    if not args.learned:
        return args.solver
    from ..tools.compare import _learned_label, default_solvers

    entries: list[Any] = list(args.solver or default_solvers())
    for path in args.learned:
        learned = load(path, flow, model_kwargs)
        if learned.nfe not in args.nfe:
            raise UsageError(f"--learned {path!r} was fitted at NFE {learned.nfe} and runs only there; --nfe "
                             f"{','.join(map(str, args.nfe))} does not list it: add {learned.nfe} to --nfe")
        row = (_learned_label(learned), learned.nfe)
        if row in args.learned_files:
            raise UsageError(f"--learned {args.learned_files[row]!r} and --learned {path!r} are both "
                             f"{row[0]} at NFE {row[1]}: they would share one row of the table; compare them in two "
                             "runs")
        args.learned_files[row] = path
        entries.append(learned)
    return entries


def compare_flags(args: argparse.Namespace) -> None:
    """Before any work: ``--learned`` beside ``--task roundtrip`` is refused, and each file must be there."""
    if args.task == "roundtrip" and args.learned:
        raise UsageError(f"--learned {args.learned[0]!r} beside --task roundtrip: a learned solver is fitted for "
                         "generation only and does not encode; compare it with --task generate")
    for path in args.learned or ():
        _check_file(path)


def reproduce(args: argparse.Namespace, run: Any) -> str | None:  # noqa: ANN401 - a flowdiff.tools.compare.Run
    """The ``sample`` flags that make a learned row's images (``--learned FILE``), or None for another row."""
    if run.grid != LEARNED_GRID:
        return None
    path = getattr(args, "learned_files", {}).get((run.solver, run.budget))
    return None if path is None else f"--learned {shlex.quote(path)}"


__all__ = ["add_compare_option", "add_refused_option", "add_sample_option", "compare_flags", "compare_solvers",
           "load", "reproduce", "sample_flags", "sample_solve"]
