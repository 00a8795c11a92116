"""Time grids by dynamic programming over teacher trajectories (GITS-style).

"On the Trajectory Regularity of ODE-based Diffusion Sampling" (Chen et al., ICML 2024, GITS)
observes that the probability-flow trajectories of one model have nearly the same shape for
every noise, so a grid chosen against a few teacher trajectories serves all of them. It picks
the grid by dynamic programming over a fine candidate grid: the cost of a step σ_i → σ_j is the
local error of one step taken from the teacher's own state at σ_i, measured against the
teacher's state at σ_j, and the grid of n steps is the path from σ_max to 0 of least total cost,

    D_m(j) = min_{i < j} D_{m−1}(i) + c(i, j),   D_0(0) = 0,   grid = argmin path to D_n(σ = 0),

an O(n·K²) recursion over K candidates that needs no model evaluation beyond the teacher's
(its trajectory and ε at each candidate). The sum of local errors stands for the global error
(their propagation is ignored, as in GITS).

Here the teacher is :func:`flowdiff.generate` with ``rk4`` on the candidate grid refined by
``substeps`` (uniform in log σ), and the local error of a step is that of a rule of ``order``
on the exact trajectory, in the flow's variables (dx̄/dσ = ε):

* order 1, Euler (DDIM; the first step of every multistep method):
  e = x̄_i + (σ_j − σ_i)·ε_i − x̄_j,
* order 2, the trapezoidal rule (a second-order step's error on the exact trajectory):
  e = x̄_i + (σ_j − σ_i)·(ε_i + ε_j)/2 − x̄_j,

with c(i, j) = the RMS of e over the batch. The step into σ = 0 is Euler for every solver (its
last step, as in EDM), whatever the order. :func:`flowdiff.tune` uses the DP grid as a start of
its direct search (``method="dp+search"``) or returns it as it is (``method="dp"``).
"""

from __future__ import annotations

import hashlib
import math
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..api.sampling import generate
from ..engine.flow import ProbabilityFlow

#: Candidate σ (uniform in log σ between σ_max and the floor, then 0) and rk4 substeps per candidate gap.
DEFAULT_CANDIDATES = 64
DEFAULT_SUBSTEPS = 4

#: Teachers kept per flow (key: noise values, candidates, substeps): the tuning of several solvers and budgets
#: on one calibration batch shares one teacher solve. Unconditioned flows only (conditioning is not hashed).
_CACHE: weakref.WeakKeyDictionary[ProbabilityFlow, dict[tuple, Teacher]] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Teacher:
    """Teacher trajectories at the candidate σ: ``sigmas`` (K + 1 values, decreasing, the last 0),
    ``xbar`` (K + 1, batch, ...) the states there, ``eps`` (K, batch, ...) ε at the positive ones,
    and ``nfe`` what they cost."""

    sigmas: np.ndarray
    xbar: Tensor
    eps: Tensor
    nfe: int


def candidate_sigmas(sigma_max: float, sigma_floor: float, count: int = DEFAULT_CANDIDATES) -> np.ndarray:
    """``count`` σ uniform in log σ from ``sigma_max`` down to ``sigma_floor``, then 0."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 2:
        raise ValueError(f"candidates must be an int >= 2, got {count!r}")
    if not (math.isfinite(sigma_max) and 0 < sigma_floor < sigma_max):
        raise ValueError(f"need 0 < sigma_floor < sigma_max, got sigma_floor={sigma_floor!r}, sigma_max={sigma_max!r}")
    sigmas = np.exp(np.linspace(math.log(sigma_max), math.log(sigma_floor), count))
    sigmas[0], sigmas[-1] = sigma_max, sigma_floor  # exactly: the reference starts at σ_max
    return np.concatenate([sigmas, [0.0]])


def teacher_trajectory(
    flow: ProbabilityFlow,
    noise: Tensor,
    candidates: np.ndarray,
    *,
    substeps: int = DEFAULT_SUBSTEPS,
    model_kwargs: Mapping[str, Any] | None = None,
) -> Teacher:
    """Solve from ``noise`` through every candidate σ with rk4 on ``substeps`` log-σ steps per gap.

    The last gap, from the smallest positive candidate into σ = 0, is the Euler step every
    grid ends with (the model's denoised image), as in :func:`flowdiff.reference_solution`.
    """
    if isinstance(substeps, bool) or not isinstance(substeps, int) or substeps < 1:
        raise ValueError(f"substeps must be an int >= 1, got {substeps!r}")
    key = None
    if model_kwargs is None:
        digest = hashlib.sha256(noise.detach().to("cpu", torch.float64).contiguous().numpy().tobytes()).hexdigest()
        key = (tuple(noise.shape), str(noise.dtype), str(noise.device), digest,
               np.asarray(candidates, dtype=np.float64).tobytes(), substeps)
        hit = _CACHE.get(flow, {}).get(key)
        if hit is not None:
            return hit
    teacher = _solve_teacher(flow, noise, np.asarray(candidates, dtype=np.float64), substeps, model_kwargs)
    if key is not None:
        _CACHE.setdefault(flow, {})[key] = teacher
    return teacher


def _solve_teacher(flow: ProbabilityFlow, noise: Tensor, candidates: np.ndarray, substeps: int,
                   model_kwargs: Mapping[str, Any] | None) -> Teacher:
    positive = np.asarray(candidates[:-1], dtype=np.float64)
    logs = np.log(positive)
    fine = np.concatenate([np.concatenate([[s], np.exp(np.linspace(a, b, substeps + 1)[1:-1])])
                           for s, a, b in zip(positive[:-1], logs[:-1], logs[1:])] + [positive[-1:], [0.0]])
    wanted = {float(s): k for k, s in enumerate(positive)}
    states: list[Tensor | None] = [None] * len(candidates)
    states[0] = noise.detach() * math.sqrt(1.0 + float(positive[0]) ** 2)  # x̄ = x_T·√(1+σ²) at σ_max

    def record(step) -> None:
        k = wanted.get(float(step.sigma))
        if k is not None:
            states[k] = step.xbar.detach().clone()

    with torch.no_grad():
        out = generate(flow, noise, solver="rk4", grid=fine, model_kwargs=model_kwargs, callback=record)
        states[-1] = out.x.detach()
        field = flow.field(model_kwargs)
        eps = torch.stack([field(float(s), states[k]) for k, s in enumerate(positive)])
    missing = [k for k, s in enumerate(states) if s is None]
    if missing:  # never: every candidate σ is a point of the fine grid
        raise RuntimeError(f"the teacher solve did not pass candidate σ {[positive[k] for k in missing]}")
    return Teacher(candidates.copy(), torch.stack(states), eps, out.stats.nfe + len(positive))


def local_error_costs(teacher: Teacher, order: int = 1) -> np.ndarray:
    """c(i, j), the RMS local error of one step σ_i → σ_j (i < j) from the teacher's state; inf elsewhere."""
    if order not in (1, 2):
        raise ValueError(f"order of the DP's local-error rule must be 1 or 2, got {order!r}")
    sig = teacher.sigmas
    n = len(sig)
    x = teacher.xbar.to(torch.float64).reshape(n, -1)
    eps = teacher.eps.to(torch.float64).reshape(n - 1, -1)
    cost = np.full((n, n), np.inf)
    for i in range(n - 1):
        h = torch.as_tensor(sig[i + 1:] - sig[i], dtype=torch.float64).unsqueeze(1)  # (n − i − 1, 1)
        slope = eps[i].expand(n - i - 1, -1)
        if order == 2 and i + 1 < n - 1:  # trapezoid to the positive σ_j; the step into 0 stays Euler
            slope = slope.clone()
            slope[:-1] = 0.5 * (eps[i] + eps[i + 1:])
        err = x[i] + h * slope - x[i + 1:]
        cost[i, i + 1:] = err.pow(2).mean(dim=1).sqrt().numpy()
    return cost


def dp_path(cost: np.ndarray, steps: int) -> np.ndarray:
    """The indices 0 = j_0 < j_1 < … < j_steps = K of least Σ cost[j_{m−1}, j_m] (exactly ``steps`` steps)."""
    n = cost.shape[0]
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= n - 1:
        raise ValueError(f"steps must be an int in [1, {n - 1}] (the candidates allow at most {n - 1}), got {steps!r}")
    best = np.full((steps + 1, n), np.inf)
    back = np.zeros((steps + 1, n), dtype=np.int64)
    best[0, 0] = 0.0
    for m in range(1, steps + 1):
        total = best[m - 1][:, None] + cost  # total[i, j] = D_{m−1}(i) + c(i, j)
        back[m] = np.argmin(total, axis=0)
        best[m] = total[back[m], np.arange(n)]
    path = [n - 1]
    for m in range(steps, 0, -1):
        path.append(int(back[m, path[-1]]))
    path = np.array(path[::-1])
    if path[0] != 0 or not np.all(np.diff(path) > 0):  # never with finite costs above the diagonal
        raise RuntimeError(f"the DP found no path of {steps} steps through the candidates")
    return path


def dp_sigmas(teacher: Teacher, steps: int, order: int = 1) -> np.ndarray:
    """The generation grid (σ_max … 0) of ``steps`` steps that the DP picks on ``teacher``."""
    return teacher.sigmas[dp_path(local_error_costs(teacher, order), steps)].copy()
