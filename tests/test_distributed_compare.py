"""``compare`` split over processes keeps the images its report shows: two ranks (gloo, CPU) give rank 0 the same
images, bit for bit, as one process, for every row of the sample grid, and only those.

The API test runs :func:`flowdiff.runs.distributed.compare` in two spawned processes on an analytic Gaussian flow
(float64); the command-line test runs ``torchrun --nproc_per_node 2 -m flowdiff compare`` on the shipped digits model
beside the one-process run and compares the written sample grids byte for byte.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _ranks import AllWorkRank0

import flowdiff
from flowdiff.cli import main
from flowdiff.models.analytic import Gaussian
from flowdiff.runs import distributed
from flowdiff.tools import report
from flowdiff.tools.compare import compare

ROOT = Path(__file__).resolve().parent.parent
SOLVERS, GRIDS, NFE, KEEP = ["euler", "heun", "dpmpp_2m"], ["trailing", "karras"], [3, 5], 2


def _problem() -> tuple[flowdiff.ProbabilityFlow, torch.Tensor]:
    flow = Gaussian(torch.zeros(1, 4, 4), torch.linspace(0.05, 1.0, 16)).flow()
    noise = torch.randn(3, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return flow, noise


def _rank_main(rank: int, world: int, port: int, reference: flowdiff.Reference, out: str) -> None:
    """One spawned rank: join the group as torchrun's environment would let it, compare, rank 0 saves its images."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    ranks = distributed.process_group()
    try:
        flow, noise = _problem()
        result = distributed.compare(flow, noise, ranks=ranks, solvers=SOLVERS, grids=GRIDS, nfe=NFE,
                                     reference=reference, keep_images=KEEP)
        if ranks.is_main:
            torch.save({"images": result.images, "runs": [(r.source, r.solver, r.grid, r.budget) for r in result.runs]},
                       out)
        else:
            assert not result.images  # the images go to rank 0, which writes the report
    finally:
        distributed.close(ranks)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_give_rank_0_the_images_the_report_shows_bit_for_bit(tmp_path):
    flow, noise = _problem()
    reference = flowdiff.reference_solution(flow, noise, rtol=1e-6, atol=1e-6)
    one = compare(flow, noise, solvers=SOLVERS, grids=GRIDS, nfe=NFE, reference=reference, keep_images=KEEP)
    out = tmp_path / "rank0.pt"
    torch.multiprocessing.spawn(_rank_main, args=(2, _free_port(), reference, str(out)), nprocs=2)
    two = torch.load(out)
    assert two["runs"] == [(r.source, r.solver, r.grid, r.budget) for r in one.runs]
    shown = report.shown_images(one)  # what the one-process report's sample grid draws
    assert len(shown) == report.SAMPLE_ROWS * len(NFE) < len(one.images)  # a selection, not every run
    assert list(two["images"]) == shown
    for key in shown:
        assert two["images"][key].dtype == torch.float64
        assert torch.equal(two["images"][key], one.images[key]), key


HAS_DIGITS = (Path(flowdiff.__file__).parent / "weights" / "digits.safetensors").is_file()
COMPARE = ["compare", "--solver", "euler,heun", "--nfe", "3,5", "--grid", "trailing,karras", "--batch", "2",
           "--dtype", "float64", "--rtol", "1e-3", "--no-progress"]


@pytest.mark.skipif(not HAS_DIGITS, reason="the shipped digits weights are not installed")
def test_torchrun_report_shows_the_one_process_sample_grid_flowdiff_rows_beside_the_peers(tmp_path, capsys):
    """The case that showed only diffusers' rows: flowdiff's runs, split over the ranks, are in the grid again."""
    pytest.importorskip("diffusers")
    argv = [*COMPARE, "--peers", "diffusers"]
    assert main([*argv, "--out", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    (tmp_path / "two").mkdir()  # the reference rank 0 would solve, kept from the one-process run: read, not solved
    shutil.copy(tmp_path / "one" / "reference.safetensors", tmp_path / "two" / "reference.safetensors")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "flowdiff", *argv, "--out", str(tmp_path / "two")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "two" / "samples.png").read_bytes() == (tmp_path / "one" / "samples.png").read_bytes()


def test_peers_run_once_and_the_grid_keeps_the_best_of_each_source():
    pytest.importorskip("diffusers")
    flow, noise = _problem()
    reference = flowdiff.reference_solution(flow, noise, rtol=1e-6, atol=1e-6)
    kwargs = dict(solvers=SOLVERS, grids=GRIDS, nfe=NFE, reference=reference, peers=["diffusers"], keep_images=KEEP)
    one = compare(flow, noise, **kwargs)
    split = distributed.compare(flow, noise, ranks=AllWorkRank0(rank=0, world_size=2), **kwargs)
    assert [(r.source, r.solver, r.grid, r.budget, r.rms_error) for r in split.runs] == \
        [(r.source, r.solver, r.grid, r.budget, r.rms_error) for r in one.runs]  # each peer row once
    shown = report.shown_images(one)
    assert {key[0] for key in shown} == {"flowdiff", "diffusers"}
    assert list(split.images) == shown and all(torch.equal(split.images[k], one.images[k]) for k in shown)


@pytest.mark.parametrize(("given", "error", "match"), [
    ({"peers": "torchdiffeq"}, ValueError, "unknown peer 'torchdiffeq'.*accepted: diffusers, k-diffusion"),
    ({"peers": ["diffusers"], "task": "roundtrip", "images": torch.zeros(1, 1, 4, 4, dtype=torch.float64)},
     ValueError, "^peers= does not apply to task='roundtrip'"),
    ({"keep_images": -1}, ValueError, "keep_images"),
])
def test_bad_peers_and_keep_images_are_refused_on_the_split_path(given, error, match):
    flow, noise = _problem()
    if given.get("task") == "roundtrip":
        noise = None
    with pytest.raises(error, match=match):
        distributed.compare(flow, noise, ranks=AllWorkRank0(rank=0, world_size=2), solvers=["euler"],
                            grids=["trailing"], nfe=[2], **given)


def _learned_on(flow, nfe: int, base: str = "unipc", size: float = 0.03):
    """A LearnedSolver fitted on ``flow`` at ``nfe`` (small shifts on each step of a logsnr grid of ``nfe`` steps): the
    split is judged on the table, which does not depend on the values a fit finds."""
    from flowdiff.engine.fingerprint import flow_fingerprint
    from flowdiff.engine.grids import make_sigmas

    sigmas = make_sigmas(flow.schedule, "logsnr", nfe)
    return flowdiff.LearnedSolver(solver=base, solver_options={}, nfe=nfe, sigmas=sigmas, coefficients=(),
                                  fingerprint=flow_fingerprint(flow), kept=True, learn=("shifts",),
                                  shifts=tuple(size * (-1) ** i for i in range(nfe)))


def _rows(result):
    return [(r.source, r.solver, r.grid, r.budget, r.nfe, r.rms_error, r.max_error) for r in result.runs]


def test_a_learned_solver_is_one_job_at_its_own_budget_and_grid_giving_the_one_process_table():
    flow, noise = _problem()
    reference = flowdiff.reference_solution(flow, noise, rtol=1e-6, atol=1e-6)
    learned = [_learned_on(flow, NFE[1]), _learned_on(flow, NFE[0], base="dpmpp_2m")]
    kwargs = dict(solvers=["euler", *learned, "heun"], nfe=NFE, reference=reference, keep_images=KEEP)
    one = compare(flow, noise, **kwargs)
    started = []
    split = distributed.compare(flow, noise, ranks=AllWorkRank0(rank=0, world_size=2), progress=started.append,
                                **kwargs)
    assert _rows(split) == _rows(one)  # each learned row once, at its own budget, on its own grid
    assert [(s.solver, s.grid, s.budget, s.reason) for s in split.skipped] == \
        [(s.solver, s.grid, s.budget, s.reason) for s in one.skipped]
    assert [label for label in started if label.startswith("learned")] == \
        [f"learned(unipc)/NFE {NFE[1]}", f"learned(dpmpp_2m)/NFE {NFE[0]}"]  # one job each, not one per grid × budget
    shown = report.shown_images(one)
    assert list(split.images) == shown and all(torch.equal(split.images[k], one.images[k]) for k in shown)


def test_a_learned_solver_at_a_budget_not_compared_is_refused_on_every_rank_before_any_run():
    flow, noise = _problem()
    started = []
    with pytest.raises(ValueError, match=r"solvers\[1\] \(learned\(unipc\)\) was fitted at nfe=4 .* add 4 to nfe="):
        distributed.compare(flow, noise, ranks=AllWorkRank0(rank=0, world_size=2), progress=started.append,
                            solvers=["euler", _learned_on(flow, 4)], nfe=NFE)
    assert started == []


class _TwoRanksHere(AllWorkRank0):
    """Rank 0 of 2 that does every run (AllWorkRank0) and has no other rank to wait for: the command's split path
    (its reference kept on disk by rank 0 first, then read) in one process."""

    def barrier(self):
        pass


@pytest.mark.skipif(not HAS_DIGITS, reason="the shipped digits weights are not installed")
def test_compare_command_with_learned_files_writes_the_one_process_table_on_the_split_path(tmp_path, capsys,
                                                                                           monkeypatch):
    import csv
    import io

    from flowdiff.cli import _commands

    digits = flowdiff.pretrained("digits")
    files = [_learned_on(digits, 5).save(tmp_path / "unipc5.json"),
             _learned_on(digits, 3, base="dpmpp_2m", size=0.0).save(tmp_path / "dpm3.json")]
    argv = [*COMPARE, "--dtype", "float32", "--learned", str(files[0]), "--learned", str(files[1])]

    def table(out):
        rows = csv.DictReader(io.StringIO((tmp_path / out / "compare.csv").read_text()))
        return [{k: v for k, v in row.items() if k != "wall_time"} for row in rows]

    assert main([*argv, "--out", str(tmp_path / "one")]) == 0
    monkeypatch.setattr(_commands.distributed, "process_group", lambda device: _TwoRanksHere(rank=0, world_size=2))
    (tmp_path / "two").mkdir()
    shutil.copy(tmp_path / "one" / "reference.safetensors", tmp_path / "two" / "reference.safetensors")
    assert main([*argv, "--out", str(tmp_path / "two")]) == 0, capsys.readouterr().err
    one = table("one")
    assert [row["solver"] for row in one if row["grid"] == "fitted"] == ["learned(unipc)", "learned(dpmpp_2m)"]
    assert table("two") == one


def test_a_learned_solver_in_a_split_round_trip_is_refused_by_name_on_every_rank_before_any_run():
    flow, _ = _problem()
    images = torch.zeros(2, 1, 4, 4, dtype=torch.float64)
    started = []
    with pytest.raises(TypeError, match=r"got a LearnedSolver \(unipc\): a learned solver is fitted for generation"):
        distributed.compare(flow, ranks=AllWorkRank0(rank=0, world_size=2), task="roundtrip", images=images,
                            solvers=["euler", _learned_on(flow, 3)], grids=["trailing"], nfe=[4],
                            progress=started.append)
    assert started == []
