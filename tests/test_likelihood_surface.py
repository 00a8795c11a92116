"""The keyword surface of log_likelihood (issue 22, item 1): the request generate speaks, one way to say each thing.

The solve is ``adaptive=flowdiff.Adaptive(...)`` or ``steps=N``, the checks ``checks=flowdiff.Checks(finite=)``,
the trace estimator ``estimator=flowdiff.Trace(...)``. A removed keyword fails with a TypeError naming its
replacement; each new spelling is compared, bit for bit, with the other spelling that says the same thing
(the defaults written out), since no old path is left to compare with.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

import flowdiff
import solvers
from flowdiff import Adaptive, Checks, Trace
from flowdiff.models.analytic import Gaussian
from flowdiff.tools.likelihood import DEFAULT_ATOL, DEFAULT_RTOL, REMOVED


def _keywords(fn) -> list[str]:
    return [p.name for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]


def _setup():
    g = Gaussian(torch.tensor([0.3, -0.2, 0.1, 0.0]), torch.tensor([0.5, 1.0, 0.05, 0.2]))
    return g.flow(), g.sample(3, torch.Generator().manual_seed(2))


def _same(a, b) -> None:
    for name in ("log_prob", "prior", "delta", "bits_per_dim", "latent", "solve_error"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.stats.nfe == b.stats.nfe and a.stats.extra["vjps"] == b.stats.extra["vjps"]


def test_keyword_count_and_no_removed_or_double_meaning_name():
    kws = _keywords(flowdiff.log_likelihood)
    assert len(kws) == 14, kws  # progress= (a bar on stderr, as reference_solution's) is the 14th
    assert not set(kws) & set(REMOVED)
    # the names shared with generate are the same request objects, with the same meaning
    shared = set(kws) & set(_keywords(flowdiff.generate))
    assert shared == {"solver", "steps", "adaptive", "model_kwargs", "checks"}
    # generate's ``noise`` is its input tensor and Checks.growth its divergence guard: neither name is used here
    assert "noise" not in kws and "divergence" not in kws
    assert [f.name for f in dataclasses.fields(Trace)] == ["method", "probes", "sketch", "probes_from", "chunk"]


@pytest.mark.parametrize("removed", sorted(REMOVED))
def test_each_removed_keyword_is_a_type_error_naming_its_replacement(removed):
    flow, x = _setup()
    with pytest.raises(TypeError, match=rf"log_likelihood\(\) got an unexpected keyword argument '{removed}'") as err:
        flowdiff.log_likelihood(flow, x, **{removed: None})
    assert REMOVED[removed] in str(err.value)


def test_an_unknown_keyword_is_a_type_error():
    flow, x = _setup()
    with pytest.raises(TypeError, match="unexpected keyword argument 'tolerance'$"):
        flowdiff.log_likelihood(flow, x, tolerance=1e-3)


def test_the_defaults_written_out_are_bit_identical():
    flow, x = _setup()
    default = flowdiff.log_likelihood(flow, x)
    spelt = flowdiff.log_likelihood(
        flow, x, adaptive=Adaptive(rtol=DEFAULT_RTOL, atol=DEFAULT_ATOL, sigma_c=float(flow.schedule.sigma_min)),
        estimator=Trace(method="auto", chunk=4096), checks=Checks(finite=True))
    _same(default, spelt)
    assert default.divergence == spelt.divergence == "exact"


def test_trace_fields_reach_the_estimator():
    flow, x = _setup()
    hutch = dict(estimator=Trace("hutchinson", probes=3, probes_from="gaussian"), solver="rk4", steps=4)
    a = flowdiff.log_likelihood(flow, x, generator=torch.Generator().manual_seed(0), **hutch)
    assert a.divergence == "hutchinson" and a.per_probe.shape == (3, 3)
    assert a.stats.extra["vjps"] == 3 * a.stats.nfe
    # Gaussian probes: the columns are the quadratic forms of N(0, I) vectors drawn from the generator
    rademacher = flowdiff.log_likelihood(flow, x, estimator=Trace("hutchinson", probes=3), solver="rk4", steps=4,
                                         generator=torch.Generator().manual_seed(0))
    assert not torch.equal(a.per_probe, rademacher.per_probe)
    # chunk bounds memory only: one row at a time gives the same numbers
    small = flowdiff.log_likelihood(flow, x, generator=torch.Generator().manual_seed(0),
                                    **{**hutch, "estimator": dataclasses.replace(hutch["estimator"], chunk=1)})
    torch.testing.assert_close(small.log_prob, a.log_prob, atol=1e-12, rtol=0)
    assert small.stats.extra["model_calls"] == 3 * a.stats.extra["model_calls"]   # 3 samples, one at a time


def test_adaptive_fields_reach_the_solve():
    flow, x = _setup()
    with pytest.raises(solvers.SolveError, match="max_nfe"):
        flowdiff.log_likelihood(flow, x, adaptive=Adaptive(rtol=1e-8, atol=1e-8, max_nfe=12))
    loose = flowdiff.log_likelihood(flow, x, adaptive=Adaptive(rtol=1e-3, atol=1e-3), solve_check=False)
    tight = flowdiff.log_likelihood(flow, x, solve_check=False)
    assert loose.stats.nfe < tight.stats.nfe
    other_c = flowdiff.log_likelihood(flow, x, adaptive=Adaptive(rtol=DEFAULT_RTOL, atol=DEFAULT_ATOL, sigma_c=0.5),
                                      solve_check=False)
    assert not torch.equal(other_c.log_prob, tight.log_prob)   # another time variable, another path of steps
    torch.testing.assert_close(other_c.log_prob, tight.log_prob, atol=1e-3, rtol=0)


def test_checks_finite_reaches_the_solve():
    g = Gaussian(torch.tensor([0.3, -0.2, 0.1, 0.0]), torch.tensor([0.5, 1.0, 0.05, 0.2]))
    x = g.sample(2, torch.Generator().manual_seed(0))

    def nan_after(xbar, sigma):
        return g.eps(xbar, sigma) * (float("nan") if sigma > 1.0 else 1.0)

    flow = flowdiff.ProbabilityFlow.from_sigma_field(nan_after, g.schedule)
    with pytest.raises(solvers.SolveError, match="non-finite|NaN|nan"):
        flowdiff.log_likelihood(flow, x, solver="rk4", steps=8, solve_check=False)
    r = flowdiff.log_likelihood(flow, x, solver="rk4", steps=8, solve_check=False, checks=Checks(finite=False))
    assert bool(torch.isnan(r.log_prob).all())


@pytest.mark.parametrize("options,match", [
    ({"method": "trace"}, "Trace.method 'trace' is unknown; accepted: auto, exact, hutchinson, hutch\\+\\+"),
    ({"probes_from": "uniform"}, "Trace.probes_from 'uniform' is unknown; accepted: rademacher, gaussian"),
    ({"method": "hutchinson", "probes": 0}, "Trace.probes must be an int >= 1, got 0"),
    ({"method": "hutchinson", "probes": 2.0}, "Trace.probes must be an int >= 1, got 2.0"),
    ({"method": "hutch++", "sketch": 0}, "Trace.sketch must be an int >= 1, got 0"),
    ({"chunk": 0}, "Trace.chunk must be an int >= 1, got 0"),
    ({"method": "exact", "probes": 4}, "Trace.probes and Trace.sketch apply to the stochastic methods"),
    ({"method": "hutchinson", "sketch": 2}, "Trace.sketch applies to method='hutch\\+\\+' only, got sketch=2"),
])
def test_bad_trace_options_name_themselves(options, match):
    with pytest.raises(ValueError, match=match):
        Trace(**options)


def test_trace_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Trace().probes = 3
