"""Count host–device synchronisations of a solve: how many times the host waits for the GPU.

A step loop that reads a device tensor on the host (``.item()``, ``float(t)``, ``bool(t)``, a
``.cpu()`` copy, ``nonzero``) or copies a pageable host tensor to the device stalls the host
until the GPU has drained its queue, so the next kernels are not queued ahead and the GPU idles
between steps: the known cost of scheduler loops that read their timesteps on the host. flowdiff
keeps σ and time on the host in float64 and checks the state once at the end, so a fixed-grid
solve should synchronise a constant number of times, whatever its step count.

The count uses PyTorch's own instrument, ``torch.cuda.set_sync_debug_mode("warn")``, which
turns each synchronising CUDA call into a warning: :func:`count_host_syncs` runs a function under
it and counts those warnings. :func:`syncs_per_step` separates the per-step part from the
constant by running a solve at two step counts: with ``s(n)`` syncs for ``n`` steps,
per step = (s(n₂) − s(n₁)) / (n₂ − n₁) and constant = s(n₁) − n₁·per step. On a CPU (or any
non-CUDA device) there is no host–device queue to wait for and the counts are ``None``
(printed ``n/a``).

It counts only what PyTorch instruments (its synchronising CUDA calls and blocking copies), not
a sync inside a custom kernel or another library's own CUDA calls.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

__all__ = ["SyncCount", "SyncsPerStep", "count_host_syncs", "syncs_per_step"]

T = TypeVar("T")

#: what PyTorch's sync debug mode says for each synchronising call ("called a synchronizing CUDA operation")
_SYNC_WARNING = "synchronizing cuda operation"


def _device(device: str | torch.device) -> torch.device:
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a str or torch.device, got {type(device).__name__}")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device {device!r} is not a device torch knows (e.g. 'cpu', 'cuda', 'cuda:1')") from err


@dataclass(frozen=True)
class SyncCount:
    """``syncs`` host–device synchronisations seen on ``device`` (``None`` where not counted: not CUDA)."""

    device: str
    syncs: int | None

    def __str__(self) -> str:
        return "n/a" if self.syncs is None else str(self.syncs)


@dataclass(frozen=True)
class SyncsPerStep:
    """A solve's host syncs split as ``constant + per_step × steps`` (from two step counts).

    ``counts`` maps each step count run to its total; all are ``None`` off CUDA."""

    device: str
    per_step: float | None
    constant: float | None
    counts: dict[int, int | None]

    def __str__(self) -> str:
        if self.per_step is None:
            return "n/a"
        return f"{self.per_step:g}/step + {self.constant:g}"


def count_host_syncs(fn: Callable[[], T], device: str | torch.device) -> tuple[T, SyncCount]:
    """Run ``fn()`` and count the host–device synchronisations it makes on CUDA ``device``.

    Returns ``(fn's result, SyncCount)``. On a non-CUDA device ``fn`` runs as is and the count
    is ``None``. The device's queue is drained before the count starts, so work queued earlier
    is not charged to ``fn``; the sync debug mode in force before is restored afterwards. Other
    warnings that ``fn`` raises are passed on."""
    dev = _device(device)
    if dev.type != "cuda":
        return fn(), SyncCount(str(dev), None)
    if not torch.cuda.is_available():
        raise ValueError(f"device {str(dev)!r} was asked for, but CUDA is not available "
                         f"(torch {torch.__version__}, torch.cuda.is_available() is False)")
    torch.cuda.synchronize(dev)
    before = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = fn()
        finally:
            torch.cuda.set_sync_debug_mode(before)
    syncs = 0
    for w in caught:
        if _SYNC_WARNING in str(w.message).lower():
            syncs += 1
        else:  # not ours to swallow
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    return out, SyncCount(str(dev), syncs)


def syncs_per_step(solve: Callable[[int], Any], device: str | torch.device,
                   steps: tuple[int, int] = (5, 15), *, warmup: bool = True) -> SyncsPerStep:
    """The host syncs of ``solve(n)`` (a solve of ``n`` steps) per step and constant, on ``device``.

    ``solve`` is run once at ``steps[0]`` untimed and uncounted when ``warmup`` (the first CUDA
    call of a model initialises libraries and caches, which syncs once), then at both step
    counts. A loop free of per-step syncs gives ``per_step == 0``."""
    if (not isinstance(steps, tuple) or len(steps) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in steps)
            or steps[0] == steps[1]):
        raise ValueError(f"steps must be two different positive int step counts, e.g. (5, 15), got {steps!r}")
    dev = _device(device)
    if warmup:
        solve(steps[0])
    counts = {n: count_host_syncs(lambda n=n: solve(n), dev)[1].syncs for n in steps}
    (n1, s1), (n2, s2) = counts.items()
    if s1 is None or s2 is None:
        return SyncsPerStep(str(dev), None, None, counts)
    per_step = (s2 - s1) / (n2 - n1)
    return SyncsPerStep(str(dev), per_step, s1 - n1 * per_step, counts)
