"""``benchmarks/adaptive_calibration.py``: the choice with a margin over every development/held-out split of the
seeds. Checked on made-up rows (NFE and RMSE drawn at random) against a brute force written here."""

import itertools
import random
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def script():
    sys.path.insert(0, str(BENCH))  # the script imports its sibling helpers by name
    try:
        import adaptive_calibration

        yield adaptive_calibration
    finally:
        sys.path.remove(str(BENCH))
        for name in ("adaptive_calibration", "adaptive_heldout", "adaptive_startup_order", "bench_adaptive",
                     "_kdiffusion"):
            sys.modules.pop(name, None)


def _rows(seed: int, seeds=(1, 2, 3, 4, 5, 6), settings=12) -> dict[int, list[dict]]:
    rng = random.Random(seed)
    rows = {s: [] for s in seeds}
    for lib, method in (("flowdiff", "unipc(order=3)"), ("flowdiff", "unipc(order=3) equal sweep"),
                        ("k-diffusion", "dpm_adaptive")):
        for j in range(settings):
            setting = f"tol={10 ** -rng.uniform(2, 5):.3g}#{j}"
            for s in seeds:
                rows[s].append(dict(lib=lib, method=method, setting=setting, nfe=rng.randint(20, 90),
                                    rmse=10 ** -rng.uniform(2.5, 4.5), rejected=0))
    return rows


@pytest.mark.parametrize("margin", [1.0, 1.5, 3.0])
@pytest.mark.parametrize("draw", range(4))
def test_choice_is_the_cheapest_setting_within_the_margin_on_every_development_seed(script, draw, margin):
    rows = _rows(draw)
    target = 1e-3
    for side in script.SIDES:
        table = script.table_of(rows, side)
        assert sum(len(by) for by in table.values()) == sum(script.side_of(r) == side for rs in rows.values()
                                                            for r in rs)
        for dev in itertools.combinations(sorted(rows), 3):
            pick = script.choose(table, list(dev), target / margin)
            ok = {k: by for k, by in table.items() if all(by[s]["rmse"] <= target / margin for s in dev)}
            if not ok:
                assert pick is None
                continue
            worst = {k: max(by[s]["nfe"] for s in dev) for k, by in ok.items()}
            assert pick in ok and worst[pick] == min(worst.values())
            tied = [k for k in ok if worst[k] == worst[pick]]
            assert sum(table[pick][s]["nfe"] for s in dev) == min(sum(table[k][s]["nfe"] for s in dev) for k in tied)


def test_margin_one_is_the_heldout_scripts_rule(script):
    import adaptive_heldout

    rows = _rows(7)
    for side in script.SIDES:
        table = script.table_of(rows, side)
        for dev in itertools.combinations(sorted(rows), 3):
            picked = script.choose(table, list(dev), 1e-3)
            theirs = adaptive_heldout.choose({s: rows[s] for s in dev}, side, 1e-3)
            if picked is None or theirs is None:
                assert picked == theirs
            else:  # ties may be broken differently: the same worst and total NFE
                cost = [(max(table[k][s]["nfe"] for s in dev), sum(table[k][s]["nfe"] for s in dev))
                        for k in (picked, theirs)]
                assert cost[0] == cost[1]


def test_transfer_pools_each_splits_choice_on_its_held_out_seeds(script):
    rows = _rows(3)
    seeds = sorted(rows)
    table = script.table_of(rows, "k-diffusion")
    for margin in (1.0, 2.0):
        got = script.transfer(table, seeds, 1e-3, margin)
        expected, unmet = [], 0
        for dev in itertools.combinations(seeds, 3):
            pick = script.choose(table, list(dev), 1e-3 / margin)
            if pick is None:
                unmet += 1
            else:
                expected += [(table[pick][s]["nfe"], table[pick][s]["rmse"]) for s in seeds if s not in dev]
        assert got["splits"] == 20 and got["unmet"] == unmet and got["pairs"] == expected
        assert len(got["pairs"]) == 3 * (20 - unmet)
