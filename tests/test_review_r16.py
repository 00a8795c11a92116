"""Reviewer R16's finds in this session's merges (b7f45da..): each reproduced here, each fixed."""

import re

import pytest
import torch

import flowdiff as fd

# -- 1. a wrong shape is refused naming the argument the caller gave, with the shape the caller gave ----------------


@pytest.fixture(scope="module")
def digits():
    return fd.pretrained("digits")


def _count_calls(flow):
    calls = []
    handle = flow.model.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls, handle


def test_decode_of_a_plain_tensor_names_latent_not_noise(digits):
    """``decode(flow, tensor)`` hands the tensor to ``generate``, whose checks named it ``noise``: the caller passed
    ``latent``."""
    calls, handle = _count_calls(digits)
    try:
        with pytest.raises(ValueError, match=re.escape("latent has shape (2, 1, 16, 16); the model (DigitsNet) takes "
                                                       "(batch, 1, 8, 8)")):
            fd.decode(digits, torch.randn(2, 1, 16, 16), steps=2)
        with pytest.raises(TypeError, match=r"^latent must be a flowdiff.Latent .* or a torch.Tensor, got list"):
            fd.decode(digits, [0.0], steps=2)
        assert calls == []
        assert fd.decode(digits, torch.randn(2, 1, 8, 8), steps=2).x.shape == (2, 1, 8, 8)  # the shape it takes
        assert len(calls) == 2
    finally:
        handle.remove()


@pytest.mark.parametrize("entry", ["tune", "learn_solver", "tune_roundtrip", "learn_encoder"])
def test_calibration_entry_points_refuse_the_whole_batchs_shape_before_any_evaluation(digits, entry):
    """The calibration tools solve halves of the batch: the refusal named a half's shape, (2, 1, 16, 16) for a batch of
    4 (tune_roundtrip, learn_encoder), or was a SolveError at step 0 naming ``x_t`` (tune, learn_solver)."""
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    name = "noise" if entry in ("tune", "learn_solver") else "images"
    calls, handle = _count_calls(digits)
    try:
        with pytest.raises(ValueError, match="^" + re.escape(f"{name} has shape (4, 1, 16, 16); the model (DigitsNet) "
                                                             "takes (batch, 1, 8, 8)")):
            getattr(fd, entry)(digits, x, solver="euler", nfe=2)
    finally:
        handle.remove()
    assert calls == []


def test_classifier_free_guidance_takes_the_shape_its_model_takes(digits):
    """The guided flow's model is a wrapper that declared no ``input_shape``: a wrong shape was a SolveError at step 0
    naming ``x_t`` (README: the digits model's noise or images of another shape are a ValueError naming the
    argument)."""
    guided = fd.classifier_free_guidance(digits, 2.0)
    labels = {"class_labels": torch.tensor([1, 2])}
    calls, handle = _count_calls(digits)
    try:
        with pytest.raises(ValueError, match="^" + re.escape("noise has shape (2, 1, 16, 16); the model (GuidedModel) "
                                                             "takes (batch, 1, 8, 8)")):
            fd.generate(guided, torch.randn(2, 1, 16, 16), steps=2, model_kwargs=labels)
        assert calls == []
        assert fd.generate(guided, torch.randn(2, 1, 8, 8), steps=2, model_kwargs=labels).x.shape == (2, 1, 8, 8)
    finally:
        handle.remove()
    # a guided model that declares nothing still takes any shape
    plain = fd.classifier_free_guidance(fd.ProbabilityFlow(lambda x, t, c=0.0: (0.1 + c) * x, fd.Schedule.linear()),
                                        2.0)
    assert fd.generate(plain, torch.randn(2, 3, 5), steps=2, model_kwargs={"c": 0.2}).x.shape == (2, 3, 5)
