"""The open finds of reviews R22 and R23, each reproduced and fixed here.

1. A guided DiT with ``class_labels=torch.tensor(3)`` (0-d, accepted as one label for all) and null label
   ``torch.tensor(1000)`` ran its two branches as two calls, while the ``(1,)`` spelling of the same request paired
   them into one: the results differed in their last digits. A 0-d label of a model with a label table pairs now.
"""

from __future__ import annotations

import pytest
import torch

import flowdiff as fd
from flowdiff.models import tiny_pipelines


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    return tiny_pipelines.dit(tmp_path_factory.mktemp("finds7_dit"))[1]


@pytest.mark.parametrize("batch", [True, False])
def test_every_spelling_of_one_guided_dit_label_gives_the_same_result_bit_for_bit(dit, batch):
    flow = fd.from_diffusers(dit)
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    results = []
    for label, null in [(torch.tensor(3), torch.tensor(1000)), (torch.tensor([3]), torch.tensor([1000])),
                        (torch.tensor([3] * 3), torch.tensor([1000] * 3)), (torch.tensor(3), torch.tensor([1000])),
                        (torch.tensor([3] * 3), torch.tensor(1000))]:
        guided = fd.classifier_free_guidance(flow, 4.0, unconditional_kwargs={"class_labels": null}, batch=batch)
        results.append(fd.generate(guided, noise, steps=3, model_kwargs={"class_labels": label}).x)
    assert all(torch.equal(r, results[0]) for r in results[1:])
    assert not torch.equal(results[0], fd.generate(flow, noise, steps=3,
                                                   model_kwargs={"class_labels": torch.tensor(3)}).x)


def test_a_guided_dit_pairs_a_0d_label_into_one_call(dit):
    flow = fd.from_diffusers(dit)
    calls = []
    hook = flow.model.net.register_forward_pre_hook(lambda m, args, kwargs: calls.append(args[0].shape[0]),
                                                    with_kwargs=True)
    try:
        guided = fd.classifier_free_guidance(flow, 4.0, unconditional_kwargs={"class_labels": torch.tensor(1000)})
        fd.generate(guided, torch.randn(2, 4, 8, 8), steps=2, model_kwargs={"class_labels": torch.tensor(3)})
    finally:
        hook.remove()
    assert calls == [4, 4]
