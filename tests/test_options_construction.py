"""Options that need no noise to be judged are refused where they are made, naming the field (new-user sweep 5)."""

import math

import numpy as np
import pytest
import torch

import flowdiff


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"eta": 1.5}, ValueError, r"eta must lie in \[0, 1\].*got 1\.5"),
    ({"eta": math.nan}, ValueError, r"eta must lie in \[0, 1\]"),
    ({"eta": "ddpm"}, ValueError, r"unknown eta 'ddpm'; accepted: a number in \[0, 1\] or 'sigma_hat'"),
    ({"eta": True}, TypeError, r"eta must be a number"),
    ({"eta": 0.5, "generator": 1.5}, TypeError, r"Stochastic\.generator must be a torch\.Generator or an int seed, "
                                                 r"got float"),
    ({"eta": 0.5, "generator": True}, TypeError, r"Stochastic\.generator .* got bool"),
    ({"eta": 0.5, "generator": -1}, ValueError, r"Stochastic\.generator"),
    ({"eta": 0.5, "generator": 0, "step_noise": torch.zeros(2, 1)}, ValueError, r"not both"),
])
def test_stochastic_refuses_bad_fields_when_made(kwargs, error, match):
    with pytest.raises(error, match=match):
        flowdiff.Stochastic(**kwargs)


def test_stochastic_keeps_what_it_accepts():
    assert flowdiff.Stochastic(np.float32(0.25)).eta == 0.25 and flowdiff.Stochastic("sigma_hat").eta == "sigma_hat"
    assert flowdiff.Stochastic(0.5, generator=np.int64(3)).generator == 3
    g = torch.Generator().manual_seed(0)
    assert flowdiff.Stochastic(1, generator=g).generator is g


@pytest.mark.parametrize(("sigmas", "match"), [
    ("steps", r"Save\.sigmas must be a list of σ values, got the string 'steps': to keep every step, give "
              r"Save\(steps=True\)"),
    ("1.0", r"Save\.sigmas must be a list of σ values, got the string '1\.0'$"),
    ([1.0, "a"], r"Save\.sigmas must be a list of σ values \(numbers\), got \[1\.0, 'a'\]"),
])
def test_save_names_its_field_for_a_string(sigmas, match):
    with pytest.raises(TypeError, match=match):
        flowdiff.Save(sigmas)
