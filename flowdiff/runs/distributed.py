"""Work split over the processes PyTorch's own launcher starts: ``torchrun --nproc_per_node N ...``.

flowdiff has no scheduler of its own. Under ``torchrun`` every process runs the same command with
``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` in its environment; :func:`process_group` joins them with
``torch.distributed`` (gloo for the host-side exchanges — barriers and small Python objects — and nccl
beside it when the work runs on CUDA), and only when ``WORLD_SIZE`` > 1: a plain run never touches
``torch.distributed``. What each rank does is fixed by its rank alone (rank r takes items r, r + N,
r + 2N, … of one deterministic list), so a split changes who computes an item, never what it computes.

:func:`compare` is :func:`flowdiff.compare` with its runs (solver × grid × NFE) split this way and the
table gathered on every rank: the same rows, in the same order, with the same numbers as one process
(only the measured wall times differ). The images kept for the report's sample grid stay on the rank that made
them until the whole table is known; then rank 0 receives those the grid shows, and only those.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch
from torch import Tensor

from solvers import available

from ..api.roundtrip import encoders
from ..engine.fingerprint import flow_fingerprint
from ..engine.flow import ProbabilityFlow
from ..engine.grids import GRIDS
from ..tools.compare import (
    DEFAULT_GRIDS,
    DEFAULT_NFE,
    TUNED_GRIDS,
    Comparison,
    Reference,
    _check_budgets,
    _check_keep,
    _check_names,
    _check_noise,
    _learned_label,
    _refuse_peers_from_infinity,
    _split_solvers,
    default_grids,
    default_solvers,
    reference_solution,
    run_peers,
)
from ..tools.compare import compare as _compare_one
from ..tools.learned import LearnedSolver
from ..tools.peers import check_peers
from ..tools.reference import check_tolerance, checked_reference
from ..tools.report import shown_images

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place among the launched ones: ``rank`` of ``world_size`` (0 of 1 without ``torchrun``)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that merges, writes the shared files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's items of ``items``: those at positions ≡ rank (mod world_size)."""
        return list(items[self.rank::self.world_size])

    def barrier(self) -> None:
        """Wait until every rank is here (nothing to wait for in one process)."""
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def all_gather(self, obj: T) -> list[T]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def gather(self, obj: T) -> list[T] | None:
        """Every rank's ``obj`` (picklable), in rank order, on rank 0; None on the others."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj: T | None) -> T:
        """Rank 0's ``obj`` (picklable) on every rank."""
        if not self.distributed:
            return obj  # type: ignore[return-value]
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def main_first(self, fn: Callable[[], T]) -> T:
        """``fn()`` on rank 0, then on the other ranks: for work that rank 0 leaves on disk for the others
        (a reference solve kept in a file is solved once and read by the rest). Where rank 0's ``fn`` raises, it
        raises there, and the others a ``RuntimeError`` that says so (not a closed connection). The others' ``fn``
        ends in one exchange too (:meth:`raise_failures`): a rank that cannot read what rank 0 left (a file its
        machine does not see) says why, and every other rank ``rank R of N failed: <why>``, where rank 0 had gone on
        to its next exchange and met gloo's closed connection there."""
        if not self.distributed:
            return fn()
        if self.is_main:
            out = self._main_only(fn)
            self.raise_failures(None)
            return out  # type: ignore[return-value]
        self._main_only(fn)
        out, failure = None, None
        try:
            out = fn()
        except Exception as err:  # said to the other ranks, rank 0 included
            failure = err
        self.raise_failures(failure)
        return out  # type: ignore[return-value]

    def from_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` run on rank 0 alone, its (picklable) result on every rank: for what one process decides or
        writes for all (a manifest, the batches already done). Where rank 0's ``fn`` raises, it raises there and
        the others raise a ``RuntimeError`` saying ``rank 0 of N failed: <why>`` (not gloo's closed connection)."""
        if not self.distributed:
            return fn()
        return self.broadcast(self._main_only(fn))

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        """A block that every rank leaves alike, ending in one exchange: where it raises on some ranks, each of those
        raises its own error and every other rank a ``RuntimeError`` saying ``rank R of N failed: <why>`` (the first
        rank that failed). For what each rank does on its own before an exchange — its setup: loading the model (one
        GPU out of memory), reading a file one machine cannot read — which left the others waiting in their next
        exchange for a rank that had gone, to end with gloo's "Connection closed by peer". The block must hold no
        exchange of its own: a rank that failed before it would not be there. With one process, a plain block."""
        failure = None
        try:
            yield
        except Exception as err:  # said to the other ranks; an interrupt (KeyboardInterrupt) ends the job anyway
            failure = err
        self.raise_failures(failure)

    def raise_failures(self, failure: Exception | None) -> None:
        """Every rank's ``failure`` (or None) exchanged: the failing rank raises its own, the others a ``RuntimeError``
        naming the first rank that failed and why. Every rank must call it (it is an exchange)."""
        if not self.distributed:
            if failure is not None:
                raise failure
            return
        said = self.all_gather(None if failure is None else " ".join(str(failure).split()) or type(failure).__name__)
        failed = [(rank, text) for rank, text in enumerate(said) if text]
        if failure is not None:
            raise failure
        if failed:
            rank, text = failed[0]
            raise RuntimeError(f"rank {rank} of {self.world_size} failed: {text}")

    def _main_only(self, fn: Callable[[], T]) -> T | None:
        """``fn()`` on rank 0 and ``None`` on the others, once rank 0 is done; its failure is raised on every rank."""
        out, failure = None, None
        if self.is_main:
            try:
                out = fn()
            except Exception as err:
                failure = err
        said = self.broadcast(None if failure is None else " ".join(str(failure).split()) or type(failure).__name__)
        if failure is not None:
            raise failure
        if said is not None:
            raise RuntimeError(f"rank 0 of {self.world_size} failed: {said}")
        return out


def world_size() -> int:
    """How many processes torchrun started for this run (``WORLD_SIZE``; 1 without torchrun)."""
    return _env_int("WORLD_SIZE", 1)


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r} is not an integer (torchrun sets it)") from None
    if value < 0:
        raise ValueError(f"environment variable {name}={text!r} must be ≥ 0")
    return value


def process_group(device: torch.device | str = "cpu") -> Ranks:
    """Join the processes ``torchrun`` started (once per process) and return this one's :class:`Ranks`.

    Without ``WORLD_SIZE`` > 1 in the environment nothing is initialised: ``Ranks(0, 1)``, whatever else the
    environment holds (``WORLD_SIZE=1`` is how a process started from inside a torchrun job, which inherits ``RANK``
    and the rest, runs as one process: nothing in the environment tells it from a rank). Under
    ``torchrun`` the default group is ``gloo`` (every exchange here is of host objects), with ``nccl``
    for CUDA tensors beside it when ``device`` is CUDA; each rank then works on ``cuda:LOCAL_RANK``
    (see :func:`rank_device`).
    """
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return Ranks()
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if rank >= world:
        raise ValueError(f"environment variable RANK={rank} is not below WORLD_SIZE={world}")
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if not dist.is_initialized():
        cuda = torch.device(device).type == "cuda"
        if cuda:
            _check_gpus(torch.device(device), local)
        if cuda and torch.cuda.is_available() and local < torch.cuda.device_count():
            torch.cuda.set_device(local)  # nccl's device for this rank: one GPU per process (else --device says)
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if cuda else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), local)


def _check_gpus(device: torch.device, local: int) -> None:
    """Refuse, on every rank alike and before the group is joined, a CUDA device that this machine cannot give each
    of its processes: no CUDA at all (nccl's own "Distributed package doesn't have NCCL built in" said nothing of the
    device), or more processes here (torchrun's ``LOCAL_WORLD_SIZE``) than GPUs for ``cuda`` without an index.

    ``cuda`` without an index is ``cuda:LOCAL_RANK``, which needs ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE``: torchrun
    sets both; a launcher that sets only ``WORLD_SIZE`` and ``RANK`` (srun, mpirun) does not, and the count of
    processes per machine taken as ``LOCAL_RANK + 1`` in their place passed rank 0 and refused rank 1 of one job,
    leaving rank 0 waiting to join. Their absence is refused instead, alike on every rank that lacks them."""
    if not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: CUDA is not available in this torch build or on this machine, so "
                         "the processes cannot work on it (nccl); give device 'cpu' to run them on the CPU (gloo)")
    if device.index is not None:
        return
    missing = [name for name in ("LOCAL_RANK", "LOCAL_WORLD_SIZE") if os.environ.get(name, "") == ""]
    if missing:
        raise ValueError(f"device 'cuda' with WORLD_SIZE={world_size()} takes one GPU per process, cuda:LOCAL_RANK, "
                         f"and {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set in this "
                         "process's environment (torchrun sets them; srun or mpirun set WORLD_SIZE and RANK alone): "
                         "set LOCAL_RANK to the process's index on its machine and LOCAL_WORLD_SIZE to the number of "
                         "processes on its machine, or give each process its GPU as device 'cuda:INDEX'")
    count = torch.cuda.device_count()
    here = _env_int("LOCAL_WORLD_SIZE", 1)
    if here > count:
        raise ValueError(f"device 'cuda' under torchrun takes one GPU per process, and {here} processes run on this "
                         f"machine (LOCAL_WORLD_SIZE={here}) for its {count} CUDA device(s): start at most {count} "
                         "per machine (--nproc_per_node)")


def rank_device(device: torch.device | str, ranks: Ranks) -> torch.device:
    """The device this rank works on: ``cuda`` (without an index) becomes ``cuda:LOCAL_RANK`` under ``torchrun``,
    so that the processes of one machine take one GPU each; any other device is used as given."""
    device = torch.device(device)
    if ranks.distributed and device.type == "cuda" and device.index is None:
        return torch.device("cuda", ranks.local_rank)
    return device


def close(ranks: Ranks) -> None:
    """Leave the process group (after the last exchange), so that the launcher sees a clean exit."""
    if ranks.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def compare(flow: ProbabilityFlow, noise: Tensor | None = None, *, ranks: Ranks | None = None,
            solvers: Iterable[str] | str | None = None, grids: Iterable[str] | str | None = None,
            nfe: Iterable[int] | int = DEFAULT_NFE, model_kwargs: Mapping[str, Any] | None = None,
            reference: Reference | None = None, progress: bool | Callable[[str], None] = False,
            task: str = "generate", images: Tensor | None = None, peers: Iterable[str] | str | None = None,
            keep_images: int = 0, **options: Any) -> Comparison:
    """:func:`flowdiff.compare` with its runs split over the ranks and the table gathered on every rank.

    The runs are the product solvers × grids × budgets in :func:`flowdiff.compare`'s order, then one run per
    :class:`~flowdiff.LearnedSolver` in ``solvers`` (at its own budget, on its own grid); rank r
    runs those at positions ≡ r (mod N), each on the whole batch, against one reference: ``reference``
    if given, else solved on rank 0 and sent to the others. Each run is the computation a single
    process makes, so the gathered rows equal a one-process table value for value (wall times aside).
    ``peers`` run once, on rank 0, after the ranks' runs (their rows are sent to every rank).
    ``ranks`` defaults to :func:`process_group`; with one process this is :func:`flowdiff.compare`. Every rank must
    pass the same ``noise``, ``images`` and flow (with ``model_kwargs``): one that differs from rank 0's is a
    ``ValueError`` on every rank, naming which and where, before any run.
    Other keywords (``rtol``, ``calibration_noise``, …) pass through.

    ``keep_images=k``: each rank keeps the first ``k`` images of its own runs, and rank 0 receives only those
    the report's sample grid draws (:func:`flowdiff.tools.report.shown_images`, ``SAMPLE_ROWS`` rows) —
    the same tensors a single process keeps for those rows — so that what travels is a few rows of
    images, not every run's. Rank 0's ``images`` hold those; the other ranks' are empty.
    """
    ranks = process_group() if ranks is None else ranks
    kwargs = dict(model_kwargs=model_kwargs, task=task, images=images, **options)
    if not ranks.distributed:
        return _compare_one(flow, noise, solvers=solvers, grids=grids, nfe=nfe, reference=reference,
                            progress=progress, peers=peers, keep_images=keep_images, **kwargs)
    # first of all, the ranks' inputs compared: every run must see rank 0's, and the checks below read them, so a check
    # that failed on one rank's inputs alone would leave the others waiting in this exchange (gloo's closed connection)
    _same_inputs(ranks, flow, noise, images, model_kwargs)
    # flowdiff.compare's checks, on every rank after that exchange: its table's budgets (sorted, each once), grids and
    # solvers (each once), so that the jobs are its runs in its order; a refusal is raised by every rank alike
    budgets = _check_budgets(nfe)
    default = encoders() if task == "roundtrip" else default_solvers()
    names, learned = _named_and_learned(default if solvers is None else solvers, task, flow, model_kwargs, budgets)
    if grids is None:  # the defaults of flowdiff.compare for this task (with stored tuned grids where they cover it)
        grids = DEFAULT_GRIDS if task == "roundtrip" else default_grids(flow, names, budgets, model_kwargs)
    grids = _check_names(grids, "grids", GRIDS if task == "roundtrip" else (*GRIDS, *TUNED_GRIDS))
    keep_images = _check_keep(keep_images)
    if task != "roundtrip":
        if not isinstance(noise, Tensor) or not noise.is_floating_point():
            raise TypeError(f"noise must be a floating-point torch.Tensor, got "
                            f"{noise.dtype if isinstance(noise, Tensor) else type(noise).__name__}")
        _check_noise(noise)
        for name in ("rtol", "atol"):
            if name in options:
                check_tolerance(name, options[name])
    if peers is not None:  # checked on every rank before the reference and any run: rank 0 alone runs them
        if task == "roundtrip":
            raise ValueError("peers= does not apply to task='roundtrip': the peers' samplers do not encode; "
                             "drop peers=")
        # as flowdiff.compare, before any run: a zero-terminal-SNR flow's σ_max = ∞ gives the peers' grids no first σ
        _refuse_peers_from_infinity(flow, check_peers(peers))
    if not (isinstance(progress, bool) or callable(progress)):
        raise TypeError(f"progress must be a bool or a callable, got {type(progress).__name__}")
    jobs: list[tuple[Any, ...]] = [(s, g, b) for s in names for g in grids for b in budgets]
    jobs += [(fitted,) for fitted in learned]  # one job each, after the named runs as in flowdiff.compare's table
    if task != "roundtrip" and reference is None:
        ref_options = {k: options[k] for k in ("reference_solver", "rtol", "atol") if k in options}
        if "reference_solver" in ref_options:
            ref_options["solver"] = ref_options.pop("reference_solver")
        solved = ranks._main_only(lambda: reference_solution(flow, noise, model_kwargs=model_kwargs, **ref_options))
        reference = ranks.broadcast(solved)
    if isinstance(progress, bool):  # True: each rank names its runs on stderr as it starts them
        progress = _say_on_stderr(ranks.rank) if progress else None
    kwargs["keep_images"] = keep_images  # checked by each run (the round trip refuses it as compare() does)
    mine, own, failure = [], {}, None
    # the reference is checked once, on every rank before any job (its check computes the flow's fingerprints); the
    # jobs' own checks of it return at once. A refusal is raised on every rank, as a job's failure is
    once = (contextlib.nullcontext() if task == "roundtrip" or reference is None
            else checked_reference(reference, flow, noise, model_kwargs))
    try:
        with once:
            for index in ranks.share(range(len(jobs))):
                if len(jobs[index]) == 1:  # a learned solver: one run on its grid, other budgets skipped
                    (fitted,) = jobs[index]
                    if progress is not None:
                        progress(f"{_learned_label(fitted)}/NFE {fitted.nfe}")
                    part = _compare_one(flow, noise, solvers=[fitted], grids=grids, nfe=budgets,
                                        reference=reference, **kwargs)
                else:
                    solver, grid, budget = jobs[index]
                    if progress is not None:
                        progress(f"{solver}/{grid}/NFE {budget}")
                    part = _compare_one(flow, noise, solvers=[solver], grids=[grid], nfe=[budget], reference=reference,
                                        **kwargs)
                own.update(part.images)  # kept here; only the keys travel now, the images the report draws later
                mine.append((index, replace(part, images={}), list(part.images)))
    except Exception as err:  # said to the other ranks, which would otherwise meet a closed connection
        failure = err
    ranks.raise_failures(failure)
    parts = sorted((item for gathered in ranks.all_gather(mine) for item in gathered), key=lambda item: item[0])
    if [index for index, _, _ in parts] != list(range(len(jobs))):
        raise RuntimeError(f"the ranks returned runs {[i for i, _, _ in parts]} of {len(jobs)}; expected each once")
    result = Comparison([], reference=parts[0][1].reference if parts else reference, task=task)
    kept = []
    for _, part, keys in parts:
        result.runs += part.runs
        result.skipped += part.skipped
        result.provided.update(part.provided)
        kept += keys
    if peers is not None:
        _peers_on_main(result, ranks, flow, noise, peers, model_kwargs, keep_images, progress)
        kept += list(result.images)  # rank 0's: the peers' images (empty on the others)
        kept = ranks.broadcast(kept)
    if keep_images:
        shown = shown_images(result, kept)
        mine_shown = {key: own[key] for key in shown if key in own}
        gathered = ranks.gather(mine_shown)
        if ranks.is_main:
            received = {**result.images, **{key: x for part in gathered for key, x in part.items()}}
            missing = [key for key in shown if key not in received]
            if missing:
                raise RuntimeError(f"the ranks sent no images for {missing}, which the report shows")
            result.images = {key: received[key] for key in shown}
        else:
            result.images = {}
    return result


def _say_on_stderr(rank: int) -> Callable[[str], None]:
    """Progress lines ``[rank R] ...`` on stderr, each in one write: the ranks share the stream, and a line written
    as text and newline apart ran on into another rank's under an unbuffered stderr."""
    def say(text: str) -> None:
        sys.stderr.write(f"[rank {rank}] {text}\n")
        sys.stderr.flush()

    return say


def _tensor_digest(x: Any) -> str | None:
    """SHA-256 of a tensor's dtype, shape and bytes (``None`` for ``None``; the type's name for anything else)."""
    if x is None:
        return None
    if not isinstance(x, Tensor):
        return type(x).__name__
    data = x.detach().cpu().contiguous().reshape(-1)
    h = hashlib.sha256(f"{x.dtype} {tuple(x.shape)}".encode())
    h.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()


def _or_failure(digest: Callable[[], str | None]) -> str | None:
    """``digest()``, or what it raised (a flow that cannot be fingerprinted, a plain σ field; a tensor whose bytes
    cannot be read): reached on every rank whatever its inputs, as the exchange that follows must be."""
    try:
        return digest()
    except Exception as err:
        return f"not read: {type(err).__name__}"  # not its words, which may name an address


def _same_inputs(ranks: Ranks, flow: ProbabilityFlow, noise: Tensor | None, images: Tensor | None,
                 model_kwargs: Mapping[str, Any] | None) -> None:
    """Refuse, on every rank alike, ``noise``, ``images`` or a flow (network, weights, schedule, ``model_kwargs``) that
    is not rank 0's. Each rank runs its share of the table on what it was given: a round trip's ``images`` drawn with
    another seed on rank 1 gave rank 1's rows for other images, in one table, without a word (a generation's noise
    was caught only by the reference's check, as "solved from other noise than the noise given")."""
    said = ranks.all_gather(tuple(_or_failure(digest) for digest in (
        lambda: _tensor_digest(noise), lambda: _tensor_digest(images), lambda: flow_fingerprint(flow, model_kwargs))))
    what = ("noise", "images", "the flow (network, weights, schedule, model_kwargs)")
    for rank, theirs in enumerate(said):
        for name, first, other in zip(what, said[0], theirs):
            if other != first:
                raise ValueError(f"{name} on rank {rank} of {ranks.world_size} is not rank 0's: each rank runs its "
                                 "share of the table on what it is given, so every rank must pass the same (draw "
                                 "noise and images from one seed on every rank, load the same model)")


def _peers_on_main(result: Comparison, ranks: Ranks, flow: ProbabilityFlow, noise: Tensor | None,
                   peers: Iterable[str] | str, model_kwargs: Mapping[str, Any] | None, keep_images: int,
                   progress: Callable[[str], None] | None) -> None:
    """The peers' rows, run once on rank 0 after the ranks' runs (as :func:`flowdiff.compare` runs them after its
    own), and sent to the other ranks so that every rank holds one table; their images stay on rank 0."""
    # a peer's failure (its model's error) is raised on rank 0 and said on the others, not left to a closed connection
    def rows() -> tuple[list[Any], list[Any], dict[str, str]]:
        run_peers(result, flow, noise, peers, result.budgets, model_kwargs=model_kwargs, keep_images=keep_images,
                  on_run=progress)
        return result.runs, result.skipped, result.unavailable

    added = ranks.from_main(rows)
    result.runs, result.skipped, result.unavailable = list(added[0]), list(added[1]), dict(added[2])


def _named_and_learned(solvers: Iterable[str | LearnedSolver] | str | LearnedSolver, task: str,
                       flow: ProbabilityFlow, model_kwargs: Mapping[str, Any] | None,
                       budgets: list[int]) -> tuple[list[str], list[LearnedSolver]]:
    """``solvers=`` as named solvers (a job per grid × budget) and learned ones (a job each, at its own budget and
    grid), each learned solver checked on every rank before any run as :func:`flowdiff.compare` checks it (fitted on
    this flow, at one of the budgets). A round trip's are names, which its runs check; a learned solver there is
    refused before any run."""
    if task == "roundtrip":
        listed = [solvers] if isinstance(solvers, (str, LearnedSolver)) else list(solvers)
        learned = [entry for entry in listed if isinstance(entry, LearnedSolver)]
        if learned:  # refused here, on every rank, with flowdiff.compare's words (it does not encode)
            _check_names(learned, "solvers", ())
        return _check_names(listed, "solvers", [*available(), "ddim_inverse"]), []  # type: ignore[arg-type]
    return _split_solvers(solvers, flow, model_kwargs, budgets)
