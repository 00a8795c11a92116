"""A tensor a plain function (or a model object) holds is hashed once while it is unchanged: a 10.6 M-value tensor
closed over by a function had been hashed at every encode and decode, 57 ms of a 58 ms encode
(``benchmarks/bench_fingerprint.py``, RESULTS.md "The model fingerprint's cost beside an encode"). The kept digest
must be the one a fresh read gives, and any change to the tensor must be seen."""

from __future__ import annotations

import torch

import flowdiff
from flowdiff.engine import fingerprint as fp


def _flow(weights: torch.Tensor) -> flowdiff.ProbabilityFlow:
    def eps(x, t):
        return 0.1 * x + 0 * weights[:1]

    return flowdiff.ProbabilityFlow(eps, flowdiff.Schedule.linear())


def _fresh(flow: flowdiff.ProbabilityFlow) -> str:
    saved = dict(fp._TENSOR_DIGESTS)
    fp._TENSOR_DIGESTS.clear()
    try:
        return flowdiff.flow_fingerprint(flow)
    finally:
        fp._TENSOR_DIGESTS.update(saved)


def test_a_held_tensor_is_hashed_once_and_its_kept_digest_is_a_fresh_reads(monkeypatch):
    weights = torch.randn(1000, dtype=torch.float64)
    flow = _flow(weights)
    first = flowdiff.flow_fingerprint(flow)
    hashed = []
    real = fp._flat_bytes
    monkeypatch.setattr(fp, "_flat_bytes", lambda value: hashed.append(value.numel()) or real(value))
    assert flowdiff.flow_fingerprint(flow) == first and 1000 not in hashed  # kept: not hashed again
    assert _fresh(flow) == first and 1000 in hashed  # and a fresh read gives the same


def test_a_tensor_changed_in_place_or_replaced_is_read_again():
    weights = torch.randn(1000, dtype=torch.float64)
    flow = _flow(weights)
    before = flowdiff.flow_fingerprint(flow)
    weights[3] += 1.0  # in place: its version counter moves
    changed = flowdiff.flow_fingerprint(flow)
    assert changed != before and changed == _fresh(flow)
    weights.set_(torch.randn(1000, dtype=torch.float64))  # another storage
    assert flowdiff.flow_fingerprint(flow) not in (before, changed)
    assert flowdiff.flow_fingerprint(flow) == _fresh(flow)


def test_an_equal_tensor_elsewhere_digests_alike_and_a_dead_tensor_leaves_no_entry():
    a = torch.arange(10.0)
    b = a.clone()
    assert flowdiff.flow_fingerprint(_flow(a)) == flowdiff.flow_fingerprint(_flow(b))
    ident = id(b)
    assert ident in fp._TENSOR_DIGESTS
    del b
    assert ident not in fp._TENSOR_DIGESTS
