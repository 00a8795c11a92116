"""Review R29 of sweep 15's folder runs over many processes, the CLI's refusal of non-splitting commands under
torchrun, and ``learn_solver(folds=2)``'s guard: each test failed before the fix beside it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

GENERATE = """
import os, torch
from flowdiff.models.analytic import Gaussian
from flowdiff.runs import distributed

torch.set_num_threads(1)
flow = Gaussian(torch.zeros(1, 4, 4), torch.linspace(0.05, 1.0, 16)).flow()
noise = torch.randn(3, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
rank = int(os.environ["RANK"])
if rank == 1:
    noise = eval(os.environ["RANK1_NOISE"])  # what a user's rank 1 passed
ranks = distributed.process_group()
try:
    result = distributed.compare(flow, noise, ranks=ranks, solvers=["euler"], grids=["trailing"], nfe=[4])
    print("rows", len(result.runs))
finally:
    distributed.close(ranks)
"""


def _two_ranks(tmp_path: Path, script: str, **env: str) -> subprocess.CompletedProcess:
    path = tmp_path / "ranks.py"
    path.write_text(script)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(path)], capture_output=True, text=True, env=env, timeout=120)


def test_noise_only_rank_1_gets_wrong_is_refused_on_every_rank_not_left_to_a_closed_connection(tmp_path):
    """``distributed.compare`` checked each rank's noise (its type, its values) before the exchange that compares the
    ranks' inputs: a rank 1 passing ``None`` (the noise drawn on rank 0 alone) or noise with a NaN raised there alone,
    and rank 0, already waiting in the exchange, met gloo's closed connection instead of a word on what differs.
    Every rank now says that rank 1's noise is not rank 0's."""
    for given in ("None", "noise.clone().fill_(float('nan'))"):
        done = _two_ranks(tmp_path, GENERATE, RANK1_NOISE=given)
        assert done.returncode != 0 and "rows" not in done.stdout, done.stdout
        refusals = [line for line in done.stderr.splitlines()
                    if "ValueError: noise on rank 1 of 2 is not rank 0's" in line]
        assert len(refusals) == 2, (given, done.stderr[-3000:])


def test_bench_learned_refuses_a_calibration_seed_no_part_of_the_run_draws(tmp_path):
    """``bench_learned.py --cal-seed 2 --parts roundtrips`` ran and wrote its report without a word: the round trips
    calibrate on fixed training digits, and only the frontier draws calibration noise, so the flag changed nothing."""
    out = tmp_path / "learned.md"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_learned.py"), "--models", "mixture",
                           "--parts", "roundtrips", "--cal-seed", "2", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and "--cal-seed 2" in done.stderr and "frontier" in done.stderr, done.stderr[-2000:]
    assert not out.exists()


PEERS_ZERO_SNR = """
import math, os, sys, torch
import flowdiff
from flowdiff import Schedule
from flowdiff.runs import distributed

torch.set_num_threads(1)
schedule = Schedule.from_config("scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True)

def v(x, t):  # the exact v prediction of N(0, 1) data: -x (finite at sigma = inf)
    return -x

flow = flowdiff.ProbabilityFlow(v, schedule, prediction_type="v_prediction")
noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(3))
ranks = distributed.process_group()
runs = []
try:
    distributed.compare(flow, noise, ranks=ranks, solvers=["euler"], grids=["trailing"], nfe=[4], peers="diffusers",
                        progress=runs.append)
finally:
    print(f"rank {ranks.rank} ran {len(runs)} runs", file=sys.stderr, flush=True)
    distributed.close(ranks)
"""


def test_peers_on_a_zero_terminal_snr_flow_are_refused_on_every_rank_before_any_run(tmp_path):
    """``distributed.compare(..., peers="diffusers")`` on a zero-terminal-SNR flow (σ_max = ∞, where the peers'
    grids have no first σ) ran every rank's runs, then refused on rank 0 alone, inside its peers' part, while the other
    ranks waited in the broadcast of the peers' rows and ended with gloo's closed connection. ``flowdiff.compare``
    refuses it before any run; so does every rank now."""
    pytest.importorskip("diffusers")
    done = _two_ranks(tmp_path, PEERS_ZERO_SNR)
    assert done.returncode != 0
    refusals = [line for line in done.stderr.splitlines()
                if "ValueError: peers=['diffusers']" in line and "zero-terminal-SNR" in line]
    assert len(refusals) == 2, done.stderr[-3000:]
    assert "rank 0 ran 0 runs" in done.stderr and "rank 1 ran 0 runs" in done.stderr, done.stderr[-3000:]
