"""``benchmarks/adaptive_startup_order.py``: the run under ``startup_order_by_default`` is the solve with
``StepController(startup_order=True)`` given explicitly, and the shipped controller is put back afterwards."""

import sys
from pathlib import Path

import pytest
import torch

import flowdiff
import flowdiff.api.adaptive as adaptive
import solvers
from flowdiff.models.analytic import Mixture
from solvers import StepController

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def script():
    sys.path.insert(0, str(BENCH))  # the script imports its sibling helpers by name
    try:
        import adaptive_startup_order

        yield adaptive_startup_order
    finally:
        sys.path.remove(str(BENCH))
        for name in ("adaptive_startup_order", "bench_adaptive", "_kdiffusion", "adaptive_heldout"):
            sys.modules.pop(name, None)


def _flow_and_noise():
    g = torch.Generator().manual_seed(0)
    flow = Mixture(torch.randn(20, 16, dtype=torch.float64, generator=g).tanh(), bandwidth=0.1).flow()
    return flow, torch.randn(8, 16, dtype=torch.float64, generator=g)


def test_startup_order_by_default_is_the_explicit_controller_and_is_undone(script):
    flow, noise = _flow_and_noise()
    shipped = adaptive.MULTISTEP_CONTROLLER
    tol = 1e-3
    explicit = flowdiff.generate(flow, noise, solver="unipc", adaptive=flowdiff.Adaptive(
        rtol=tol, atol=tol, controller=StepController(factor_max=2.5, startup_order=True)))
    plain = flowdiff.generate(flow, noise, solver="unipc", adaptive=flowdiff.Adaptive(rtol=tol, atol=tol))
    assert explicit.stats.rejected != plain.stats.rejected or not torch.equal(explicit.x, plain.x)  # it acts here
    with script.startup_order_by_default():
        patched = flowdiff.generate(flow, noise, solver="unipc", adaptive=flowdiff.Adaptive(rtol=tol, atol=tol))
    assert torch.equal(patched.x, explicit.x) and patched.stats.nfe == explicit.stats.nfe
    assert adaptive.MULTISTEP_CONTROLLER is shipped
    again = flowdiff.generate(flow, noise, solver="unipc", adaptive=flowdiff.Adaptive(rtol=tol, atol=tol))
    assert torch.equal(again.x, plain.x)


def test_sweep_reports_the_fewest_evaluations_that_meet_each_target_and_stops(script):
    flow, noise = _flow_and_noise()
    ref = flowdiff.reference_solution(flow, noise, sigma_end=0.0, rtol=1e-9, atol=1e-9).x
    tols = [1e-2, 1e-3, 1e-4, 1e-5]
    best, rejected, runs = script.sweep(flow, noise, ref, script.CONTROLLERS["shipped"], tols, (1e-3, 1e-4))
    assert 1 <= len(runs) <= len(tols) and [r[0] for r in runs] == tols[: len(runs)]
    assert rejected == sum(r[2] for r in runs)
    for tol, nfe, rej, e in runs:  # each run is the solve it names
        r = flowdiff.generate(flow, noise, solver=solvers.get("unipc", order=3),
                              adaptive=flowdiff.Adaptive(rtol=tol, atol=tol))
        assert (r.stats.nfe, r.stats.rejected) == (nfe, rej)
        assert e == pytest.approx(float((r.x - ref).pow(2).mean().sqrt()), rel=1e-12)
    for target in (1e-3, 1e-4):
        met = [nfe for _, nfe, _, e in runs if e <= target]
        assert best[target] == (min(met) if met else None)
    assert not any(e <= 1e-4 for *_, e in runs[:-1])  # every run before the last missed the tightest target
