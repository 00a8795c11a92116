"""The sweeps of ``benchmarks/bench_adaptive.py``: flowdiff's sweep is built as the peer's is, and each column stops
at its first run that meets the tightest target."""

import itertools
import math
import sys
from pathlib import Path

import pytest
import torch

import flowdiff
import solvers
from flowdiff.models.analytic import Gaussian

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))  # the script imports its sibling helpers (_kdiffusion) by name
    try:
        import bench_adaptive

        yield bench_adaptive
    finally:
        sys.path.remove(str(BENCH))
        for name in ("bench_adaptive", "_kdiffusion", "adaptive_sweep_columns", "adaptive_heldout"):
            sys.modules.pop(name, None)


def test_equal_sweep_has_the_peers_size_and_every_combination(bench):
    sigma_min = 0.0064
    columns = bench.equal_sweep(sigma_min)
    knobs = [options for column in columns for _, options in column]
    # k-diffusion's quick sweep: rtol × atol × end σ, each run read with and without the final denoise
    peer = len(bench.QUICK_KD_RTOLS) * len(bench.QUICK_KD_ATOLS) * 2 * 2
    assert len(knobs) == peer
    expected = set()
    for rtol, ratio, end, first in itertools.product(bench.EQUAL_RTOLS, bench.EQUAL_ATOL_PER_RTOL,
                                                     bench.EQUAL_END_PER_SIGMA_MIN, bench.EQUAL_FIRST_STEPS):
        expected.add((rtol, rtol * ratio, sigma_min * end, first))
    assert {(o["rtol"], o["atol"], o["sigma_end"], o.get("first_step")) for o in knobs} == expected
    for column in columns:  # one column per (atol/rtol, σ_end, first step), rtol loose to tight
        rtols = [options["rtol"] for _, options in column]
        assert rtols == sorted(bench.EQUAL_RTOLS, reverse=True)
        assert len({(o["atol"] / o["rtol"], o["sigma_end"], o.get("first_step")) for _, o in column}) == 1
        for setting, options in column:
            flowdiff.Adaptive(**options)  # every setting is a valid, documented Adaptive
            assert f"rtol={options['rtol']:g}" in setting
    # the one-knob line rtol = atol, default σ_end and first step, is one of the columns' subsets
    one = [o for o in knobs if o["atol"] == o["rtol"] and math.isclose(o["sigma_end"], sigma_min / 10)
           and "first_step" not in o]
    assert sorted(o["rtol"] for o in one) == sorted(bench.EQUAL_RTOLS)
    assert {o["rtol"] for o in one} <= set(bench.QUICK_TOLS)


def test_one_knob_sweep_is_rtol_equal_atol_loose_to_tight(bench):
    (column,) = bench.one_knob_sweep([1e-3, 1e-2, 1e-4])
    assert [o for _, o in column] == [dict(rtol=t, atol=t) for t in (1e-2, 1e-3, 1e-4)]


def test_each_column_stops_at_its_first_run_that_meets_the_tightest_target(bench):
    g = torch.Generator().manual_seed(0)
    gauss = Gaussian(torch.randn(8, dtype=torch.float64, generator=g) * 0.5,
                     torch.rand(8, dtype=torch.float64, generator=g) * 0.3 + 0.05)
    flow = gauss.flow()
    noise = torch.randn(2, 8, dtype=torch.float64, generator=g)
    s_max = flow.schedule.sigma_max
    ref = gauss.solution(noise * math.sqrt(1 + s_max**2), s_max, 0.0)
    columns = [[(f"tol={t:g}", dict(rtol=t, atol=t)) for t in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)],
               [(f"rtol={t:g}", dict(rtol=t, atol=t / 10)) for t in (1e-1, 1e-3, 1e-5)]]
    target = 1e-3
    rows = bench.run_flowdiff(flow, noise, ref, [("unipc", {"order": 3})], columns, targets=(1e-2, target))
    by_column = [[r for r in rows if r["setting"] in {s for s, _ in column}] for column in columns]
    assert len(rows) == sum(len(c) for c in by_column)
    for column, ran in zip(columns, by_column):
        assert [r["setting"] for r in ran] == [s for s, _ in column][:len(ran)]  # in order, from the loosest
        assert all(r["rmse"] > target for r in ran[:-1])
        assert ran[-1]["rmse"] <= target or len(ran) == len(column)
        for r, (_, options) in zip(ran, column):  # each row is the solve its setting asks for
            again = flowdiff.generate(flow, noise, solver=solvers.get("unipc", order=3),
                                      adaptive=flowdiff.Adaptive(**options))
            assert r["nfe"] == again.stats.nfe
            assert math.isclose(r["rmse"], float((again.x - ref).pow(2).mean().sqrt()), rel_tol=1e-12)
    assert any(len(ran) < len(column) for column, ran in zip(columns, by_column))  # the stop was exercised


def test_sweep_columns_reads_the_fewest_nfe_per_column_and_target(bench, tmp_path):
    import adaptive_sweep_columns

    def row(rtol, column, nfe, error):
        return f"| flowdiff | unipc(order=3) equal sweep | rtol={rtol:g}, {column} | {nfe} | 0 | {error:.2e} | 0.1 |"

    a, b = "atol=1·rtol, σ_end=0.1·σ_min, first step HNW", "atol=10·rtol, σ_end=1·σ_min, first step 0.02 in ρ"
    report = tmp_path / "report.md"
    report.write_text("\n".join([
        "## Adaptive solves: fewest evaluations to RMSE ≤ 0.001 and 0.0001", "",
        "### closed-form kernel density over 200 grey 16×16 photo patches (bandwidth 0.1), seed 2", "",
        row(1e-2, a, 20, 2e-3), row(5e-3, a, 25, 9e-4), row(1e-3, a, 40, 5e-5),
        row(1e-2, b, 18, 8e-4), row(5e-3, b, 30, 7e-4),
        "| flowdiff | unipc(order=3) | tol=0.01 | 5 | 0 | 1.00e-09 | 0.1 |",  # the one-knob sweep: not a column
        "### shipped trained model pretrained('digits'), seed 3", "", row(1e-2, a, 300, 2e-4)]))
    keys, best = adaptive_sweep_columns.columns([str(report)])
    assert keys == [("patches", 2, 1e-3), ("patches", 2, 1e-4), ("digits (trained)", 3, 1e-3),
                    ("digits (trained)", 3, 1e-4)]
    assert best == {a: {("patches", 2, 1e-3): 25, ("patches", 2, 1e-4): 40, ("digits (trained)", 3, 1e-3): 300},
                    b: {("patches", 2, 1e-3): 18}}
    (tmp_path / "other.md").write_text("# something else\n")
    with pytest.raises(ValueError, match="other.md"):
        adaptive_sweep_columns.columns([str(tmp_path / "other.md")])


def test_heldout_choice_meets_the_target_on_every_development_seed_with_the_fewest_on_the_worst(bench):
    import adaptive_heldout

    def row(lib, method, setting, nfe, error):
        return dict(lib=lib, method=method, setting=setting, nfe=nfe, rmse=error)

    eq = "unipc(order=3) equal sweep"
    runs = {1: [row("flowdiff", eq, "a", 20, 9e-4), row("flowdiff", eq, "b", 30, 5e-4),
                row("flowdiff", eq, "c", 25, 8e-4), row("flowdiff", "unipc(order=3)", "tol=0.01", 10, 1e-4),
                row("k-diffusion", "dpm_adaptive", "x", 5, 0.0)],
            2: [row("flowdiff", eq, "a", 22, 2e-3), row("flowdiff", eq, "b", 31, 6e-4),
                row("flowdiff", eq, "c", 33, 9e-4)]}
    # "a" misses on seed 2; "c" is cheaper than "b" on seed 1 but dearer on the worst seed (33 > 31); the one-knob and
    # k-diffusion rows belong to other sides, and a setting missing on a seed (k-diffusion's "x") cannot be chosen
    assert adaptive_heldout.choose(runs, "flowdiff equal sweep", 1e-3) == (eq, "b")
    assert adaptive_heldout.choose(runs, "flowdiff equal sweep", 1e-4) is None
    assert adaptive_heldout.choose(runs, "k-diffusion", 1e-3) is None
