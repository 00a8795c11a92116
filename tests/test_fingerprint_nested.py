"""A model that holds a torch.nested tensor gets a fingerprint that reads its components (it raised before)."""

from __future__ import annotations

import warnings

import pytest
import torch

import flowdiff
from flowdiff.engine.fingerprint import flow_fingerprint

SCHEDULE = flowdiff.Schedule.linear()


def _nested(parts, layout):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "prototype stage" note for the strided layout
        return torch.nested.nested_tensor(parts, layout=layout)


def _flow(held):
    def model(x, t):
        return x * held.unbind()[0].sum()
    return flowdiff.ProbabilityFlow(model, SCHEDULE)


@pytest.mark.parametrize("layout", [torch.strided, torch.jagged])
def test_a_nested_tensor_is_read_by_its_components_values_and_shapes(layout):
    """The user's model closed over a nested tensor, and every encode stopped in the digest with torch's "Internal
    error: NestedTensorImpl doesn't support sizes"."""
    a, b = torch.arange(2.0), torch.arange(3.0) + 5
    same = flow_fingerprint(_flow(_nested([a, b], layout)))
    assert same == flow_fingerprint(_flow(_nested([a.clone(), b.clone()], layout)))
    assert same != flow_fingerprint(_flow(_nested([a, b + 1], layout)))  # other values
    # the same values split differently: other component shapes
    assert same != flow_fingerprint(_flow(_nested([torch.cat([a, b[:1]]), b[1:]], layout)))


def test_a_nested_model_keyword_is_read_too():
    flow = flowdiff.ProbabilityFlow(lambda x, t, extra: x, SCHEDULE)
    a, b = torch.arange(2.0), torch.arange(3.0)
    digest = flow_fingerprint(flow, model_kwargs={"extra": _nested([a, b], torch.jagged)})
    assert digest == flow_fingerprint(flow, model_kwargs={"extra": _nested([a, b], torch.jagged)})
    assert digest != flow_fingerprint(flow, model_kwargs={"extra": _nested([a, b * 2], torch.jagged)})
