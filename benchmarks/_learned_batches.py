"""The set-up the learned-solver measurement scripts share (`learned_variance.py`, `learned_expressive.py`,
`learned_crossfit.py`): the closed-form models, each model's solvers and candidate budget, its evaluation and
calibration noise with their cached references, and the report written after each step."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from _kdiffusion import mixture_flow, noise_shape, patch_flow
from bench_frontier import evaluation_reference
from bench_learned import calibration_reference, solver_specs

import flowdiff

#: key -> (the flow's constructor, the references' tolerance)
MODELS = {"mixture": (mixture_flow, 1e-8), "patches": (patch_flow, 1e-8)}


class Batches(NamedTuple):
    flow: flowdiff.ProbabilityFlow
    tol: float
    specs: Any  # bench_learned.solver_specs(...)
    evals: int  # candidate solves per tuned grid
    noise: torch.Tensor  # evaluation noise
    calibration: torch.Tensor
    ref: torch.Tensor  # the evaluation noise's reference image


def model_batches(key: str, args: Any, cal_seed: int) -> Batches:
    """``key``'s flow, solvers (``args.solvers``, or ``args.patch_solvers`` for the patches), candidate budget
    (``args.max_evals`` / ``args.patch_max_evals``), ``args.batch`` evaluation samples from ``args.seed`` and
    ``args.calibration`` calibration samples from ``cal_seed``, both references solved (or read from the cache)."""
    make, tol = MODELS[key]
    flow = make()
    specs = solver_specs(args.patch_solvers if key == "patches" else args.solvers)
    evals = args.patch_max_evals if key == "patches" else args.max_evals
    noise = torch.randn(args.batch, *noise_shape(key), dtype=torch.float64,
                        generator=torch.Generator().manual_seed(args.seed))
    calibration = torch.randn(args.calibration, *noise_shape(key), dtype=torch.float64,
                              generator=torch.Generator().manual_seed(cal_seed))
    ref = evaluation_reference(flow, noise, key, tol).x
    calibration_reference(flow, calibration, key, tol)
    return Batches(flow, tol, specs, evals, noise, calibration, ref)


def report_writer(out: str | None, lines: list[str]) -> Callable[[], None]:
    """A function that writes ``lines`` (as they stand when called) to ``out``, if given."""
    def write() -> None:
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text("\n".join(lines) + "\n")
    return write
