"""Reviewer R16's open finds (G3): each reproduced, each fixed."""

import re

import pytest
import torch

import flowdiff as fd

# -- 3. a wrong shape is refused naming the argument, before any evaluation -----------------------------------------


@pytest.fixture(scope="module")
def digits():
    return fd.pretrained("digits")


@pytest.mark.parametrize("entry", ["reference_solution", "compare", "log_likelihood"])
def test_tools_refuse_a_wrong_shape_naming_the_argument_before_any_evaluation(digits, entry):
    """These three gave a SolveError at step 0 naming ``x_t`` for a shape the digits model does not take."""
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64) * 2 - 1
    name = "images" if entry == "log_likelihood" else "noise"
    call = {"reference_solution": lambda: fd.reference_solution(digits, x, cache=False),
            "compare": lambda: fd.compare(digits, noise=x, solvers=["euler"], grids=["uniform"], nfe=[2]),
            "log_likelihood": lambda: fd.log_likelihood(digits, x)}[entry]
    calls = []
    handle = digits.model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        with pytest.raises(ValueError, match="^" + re.escape(f"{name} has shape (2, 1, 16, 16); the model (DigitsNet) "
                                                             "takes (batch, 1, 8, 8)")):
            call()
    finally:
        handle.remove()
    assert calls == []
