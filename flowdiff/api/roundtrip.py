"""Encoders compared: round trips decode(encode(x)) against the images themselves.

An encoder is judged by what comes back: every (solver, grid, NFE budget) encodes the same
images with ``encode(..., grid=Grid(grid, nfe=N))``, decodes the latent it returns (which
retraces the encode's grid with its solver), and the error is

    error = RMS over the batch and pixels of  decode(encode(x)) − x

in the image's scale, with the encode's and the decode's NFE kept apart (an encode-only
method such as ``ddim_inverse`` decodes with another solver). Reversible solvers come back
at rounding level. :func:`flowdiff.compare` with ``task="roundtrip"`` calls
:func:`roundtrip_runs` and tabulates, writes and plots the rows like a generation comparison.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

import solvers as _solvers

from ..engine.flow import ProbabilityFlow
from ..engine.formulations import encode_refusal
from ..engine.grids import make_sigmas
from ..engine.options import Grid
from ..engine.plugins import solver_plugin
from .sampling import decode, encode


@dataclass(frozen=True)
class RoundTripRun:
    """One round trip: ``solver`` on ``grid`` at encode budget ``budget``; NFE of each half."""

    solver: str
    grid: str
    budget: int
    encode_nfe: int
    decode_nfe: int
    steps: int
    rms_error: float
    max_error: float
    wall_time: float
    sigma_end: float


def encoders() -> list[str]:
    """The registered solvers that encode (those refused for encoding left out) and the encode plug-ins."""
    return [n for n in _solvers.available() if encode_refusal(n) is None and n != "reversible"] + ["ddim_inverse"]


def cannot_encode(flow: ProbabilityFlow, solver: str, grid: str, budget: int) -> str | None:
    """Why ``solver`` cannot encode on ``grid`` within ``budget`` evaluations, or None."""
    refusal = encode_refusal(solver)
    if refusal is not None:
        return refusal
    base = "euler" if solver_plugin(solver) is not None else solver
    one_step = _solvers.nfe_for_steps(base, 1)
    if budget < one_step:  # as Grid's refusal says it (flowdiff.engine.options.Grid._check_one_step)
        return (f"{solver} encodes from NFE {one_step}: an encode's first step, out of σ = 0, is a whole step "
                f"({one_step} evaluations)")
    try:
        sigmas = make_sigmas(flow.schedule, grid, _solvers.steps_for_nfe(base, budget))
    except ValueError as err:
        return str(err)
    if sigmas[0] == math.inf:  # zero terminal SNR: the generation grid starts, so the encode ends, at σ = ∞
        return (f"the {grid} grid's encode ends at σ = ∞ (the schedule's σ_max, zero terminal SNR), where the state is "
                "infinite and no decode retraces the last step; a grid whose first σ is finite (leading) encodes here")
    return None


def roundtrip_runs(flow: ProbabilityFlow, images: Tensor, jobs: Sequence[tuple[str, str, int]], *,
                   model_kwargs: Mapping[str, Any] | None = None,
                   on_job: Callable[[str, str, int], None] | None = None
                   ) -> tuple[list[RoundTripRun], list[tuple[str, str, int, str]]]:
    """Encode and decode ``images`` for each (solver, grid, budget) of ``jobs``; the runs and
    the skipped jobs with their reasons."""
    runs: list[RoundTripRun] = []
    skipped: list[tuple[str, str, int, str]] = []
    ref = images.detach().to(torch.float64)
    for solver, grid, budget in jobs:
        if on_job is not None:
            on_job(solver, grid, budget)
        reason = cannot_encode(flow, solver, grid, budget)
        if reason is not None:
            skipped.append((solver, grid, budget, reason))
            continue
        start = time.perf_counter()
        with torch.no_grad():
            enc = encode(flow, images, solver=solver, grid=Grid(grid, nfe=budget), model_kwargs=model_kwargs)
            dec = decode(flow, enc.latent, model_kwargs=model_kwargs)
        wall = time.perf_counter() - start
        diff = dec.x.detach().to(torch.float64) - ref.to(dec.x.device)
        runs.append(RoundTripRun(solver, grid, budget, enc.stats.nfe, dec.stats.nfe, enc.stats.steps,
                                 float(diff.pow(2).mean().sqrt()), float(diff.abs().max()), wall,
                                 float(enc.sigmas[-1])))
    return runs, skipped
