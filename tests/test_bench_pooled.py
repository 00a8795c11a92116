"""The evaluation statistics of ``benchmarks/_pooled.py`` (bootstrap interval of flowdiff's ratio to the best peer)."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def pooled():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "_pooled.py"
    spec = importlib.util.spec_from_file_location("_bench_pooled", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _errors(seed: int, n: int = 96, peers: int = 5):
    gen = torch.Generator().manual_seed(seed)
    ours = torch.rand(n, generator=gen, dtype=torch.float64)
    others = torch.rand(peers, n, generator=gen, dtype=torch.float64) * torch.linspace(0.97, 1.03, peers)[:, None]
    return ours, others


def test_ratio_equals_a_loop_over_resamples(pooled):
    """The interval is that of a plain loop over the same resamples, with the best peer chosen again in each (the
    peers are close: the best changes between resamples, so a peer fixed once would give another interval)."""
    ours, peers = _errors(0)
    draws, n = 300, ours.shape[0]
    got = pooled.ratio(ours, peers, draws=draws, seed=7)
    gen = torch.Generator().manual_seed(7)
    idx = torch.randint(n, (draws, n), generator=gen)
    loop = torch.stack([ours[i].pow(2).mean().sqrt() / peers[:, i].pow(2).mean(1).sqrt().min() for i in idx])
    low, high = torch.quantile(loop, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    assert got.low == pytest.approx(low, rel=1e-12) and got.high == pytest.approx(high, rel=1e-12)
    peer_rmse = peers.pow(2).mean(1).sqrt()
    assert got.peer_index == int(peer_rmse.argmin())
    assert got.ratio == pytest.approx(float(ours.pow(2).mean().sqrt() / peer_rmse.min()), rel=1e-12)
    assert got.low <= got.ratio <= got.high


def test_exact_multiples_give_degenerate_intervals(pooled):
    ours, _ = _errors(1)
    same = pooled.ratio(ours, ours[None])
    assert (same.ratio, same.low, same.high) == pytest.approx((1.0, 1.0, 1.0), rel=1e-12)
    half = pooled.ratio(ours, torch.stack([3 * ours, 2 * ours]))
    assert half.peer_index == 1 and (half.ratio, half.low, half.high) == pytest.approx((0.5, 0.5, 0.5), rel=1e-12)


def test_capped_and_subset_ratios(pooled):
    ours, peers = _errors(2)
    assert pooled.capped_ratio(ours, peers, cap=10.0) == pytest.approx(pooled.ratio(ours, peers, draws=10).ratio)
    # capping at c: every error above c counts as c, on both sides
    capped = pooled.capped_ratio(ours, peers, cap=0.3)
    expect = ours.clamp(max=0.3).pow(2).mean().sqrt() / peers.clamp(max=0.3).pow(2).mean(1).sqrt().min()
    assert capped == pytest.approx(float(expect), rel=1e-12)
    keep = ours < 0.5
    expect = ours[keep].pow(2).mean().sqrt() / peers[:, keep].pow(2).mean(1).sqrt().min()
    assert pooled.ratio_without(ours, peers, keep) == pytest.approx(float(expect), rel=1e-12)
    assert math.isnan(pooled.ratio_without(ours, peers, torch.zeros_like(keep)))  # nothing left to compare


def test_shapes_are_checked(pooled):
    ours, peers = _errors(3)
    with pytest.raises(ValueError, match="ours must be"):
        pooled.ratio(ours, peers[:, :10])


def test_nearest_centre(pooled):
    centres = torch.eye(4, dtype=torch.float64).reshape(4, 1, 2, 2)
    x = centres[[2, 0, 3]] + 0.1
    assert pooled.nearest(x, centres).tolist() == [2, 0, 3]


def test_weighted_calibration_says_how_many_samples_it_holds():
    """mixture_weighting.weighted keeps each copy in its half (even fitted, odd held out) and pairs the halves, so of
    an odd number of near-boundary samples one is left out: the count it reports is the one it holds."""
    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench))
    try:
        spec = importlib.util.spec_from_file_location("_bench_mixture_weighting", bench / "mixture_weighting.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(bench))
    cal = torch.arange(8, dtype=torch.float64).reshape(8, 1)
    extra = 100 + torch.arange(5, dtype=torch.float64).reshape(5, 1)
    for w in (0, 1, 3):
        noise, used = module.weighted(cal, extra, w)
        assert len(noise) == len(cal) + w * used and used == 4  # 5 found, 4 held
        assert noise[0::2, 0].tolist() == [0, 2, 4, 6] + [100, 102] * w  # the fitted half: even cal, a's copies
        assert noise[1::2, 0].tolist() == [1, 3, 5, 7] + [101, 103] * w
