"""The run-time variants ``above=W`` and ``batch_rms`` of ``benchmarks/adaptive_lone_sample_variants.py`` and the step
record of ``benchmarks/adaptive_ideal_steps.py``: each variant is the shipped solve where it should be (W = 1; a batch
of one sample), acts elsewhere, and is undone; the record's rejections and accepted steps are the solve's."""

import math
import sys
from pathlib import Path

import pytest
import torch

import flowdiff
import flowdiff.api.adaptive as adaptive
import solvers
from flowdiff.models.analytic import Mixture

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def scripts():
    sys.path.insert(0, str(BENCH))  # the scripts import their sibling helpers by name
    try:
        import adaptive_ideal_steps
        import adaptive_lone_sample_variants

        yield adaptive_lone_sample_variants, adaptive_ideal_steps
    finally:
        sys.path.remove(str(BENCH))
        for name in ("adaptive_lone_sample_variants", "adaptive_ideal_steps", "adaptive_lone_sample", "bench_adaptive",
                     "_kdiffusion"):
            sys.modules.pop(name, None)


def _flow_and_noise(n: int = 8):
    g = torch.Generator().manual_seed(0)
    flow = Mixture(torch.randn(20, 16, dtype=torch.float64, generator=g).tanh(), bandwidth=0.1).flow()
    return flow, torch.randn(n, 16, dtype=torch.float64, generator=g)


def _solve(flow, noise, tol=1e-3):
    with torch.no_grad():
        return flowdiff.generate(flow, noise, solver=solvers.get("unipc", order=3),
                                 adaptive=flowdiff.Adaptive(rtol=tol, atol=tol))


def _same(a, b) -> bool:
    return torch.equal(a.x, b.x) and (a.stats.nfe, a.stats.rejected) == (b.stats.nfe, b.stats.rejected)


def test_above_weight_one_is_the_shipped_solve_and_other_weights_act(scripts):
    variants, _ = scripts
    flow, noise = _flow_and_noise()
    shipped, share = _solve(flow, noise), adaptive.corrector_share
    with variants.patched("above=1"):
        assert _same(_solve(flow, noise), shipped)
    for w in (0.3, 3.0):
        with variants.patched(f"above={w}"):
            assert not _same(_solve(flow, noise), shipped)
    assert adaptive.corrector_share is share and _same(_solve(flow, noise), shipped)


def test_batch_rms_is_the_worst_sample_norm_for_one_sample_and_looser_for_a_batch(scripts):
    variants, _ = scripts
    flow, noise = _flow_and_noise()
    norm = adaptive.image_norm
    one, batch = _solve(flow, noise[:1]), _solve(flow, noise)
    with variants.patched("batch_rms"):
        assert _same(_solve(flow, noise[:1]), one)
        looser = _solve(flow, noise)
    assert looser.stats.nfe < batch.stats.nfe  # the batch's mean square is below its worst sample's
    assert adaptive.image_norm is norm and _same(_solve(flow, noise), batch)


@pytest.mark.parametrize("tol", [1e-2, 1e-3, 1e-4])
def test_the_step_record_holds_the_solves_rejections_and_accepted_states(scripts, tol):
    from adaptive_lone_sample import record_solve

    _, ideal = scripts
    flow, noise = _flow_and_noise()
    r, tried, recorded = record_solve(flow, noise, tol)
    steps = ideal.judged(tried, flow.schedule.sigma_max)
    assert sum(not ok for *_, ok in steps) == r.stats.rejected
    reached = [s1 for _, s1, _, ok in steps if ok]
    inside = [float(s) for s, *_ in recorded if 0 < float(s) < flow.schedule.sigma_max]
    assert len(reached) >= len(inside) and all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(reached, inside))
    for (s0, s1, r_est, ok), nxt in zip(steps, steps[1:]):  # a step starts where the last accepted one ended
        assert s1 < s0 and (r_est <= 1.0) == ok
        assert math.isclose(nxt[0], s1 if ok else s0, rel_tol=1e-9)
    assert _same(r, _solve(flow, noise, tol))  # recording changes nothing


def test_retry_fit_acts_only_on_a_step_rejected_twice_at_one_start(scripts):
    from adaptive_lone_sample import record_solve

    variants, ideal = scripts
    flow, noise = _flow_and_noise()
    judge = variants.integrate._ErrorRun.judge
    seen = {"twice": 0, "never": 0}
    for tol in (3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5):
        shipped, tried, _ = record_solve(flow, noise, tol)
        steps = ideal.judged(tried, flow.schedule.sigma_max)
        twice = any(not a[3] and not b[3] and a[0] == b[0] for a, b in zip(steps, steps[1:]))
        with variants.patched("retry_fit"):
            fitted = _solve(flow, noise, tol)
        if twice:
            seen["twice"] += 1
            assert not _same(fitted, shipped)
        else:
            seen["never"] += 1
            assert _same(fitted, shipped)
    assert seen["twice"] and seen["never"]  # both cases met
    assert variants.integrate._ErrorRun.judge is judge
