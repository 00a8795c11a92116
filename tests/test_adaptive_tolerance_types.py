"""``Adaptive``'s tolerances: a value that is no number is a TypeError naming the argument (it was a ValueError, as a
negative tolerance is); a NumPy scalar is its value, kept as a Python float."""

import numpy as np
import pytest

import flowdiff


@pytest.mark.parametrize("name", ["rtol", "atol"])
@pytest.mark.parametrize("value", ["1e-3", [1e-3], True])
def test_a_tolerance_that_is_no_number_is_a_type_error(name, value):
    with pytest.raises(TypeError, match=rf"{name} must be a finite number >= 0, got {type(value).__name__}"):
        flowdiff.Adaptive(**{name: value})


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf"), np.float64(-1)])
def test_a_tolerance_out_of_range_stays_a_value_error(value):
    with pytest.raises(ValueError, match="rtol must be a finite number >= 0"):
        flowdiff.Adaptive(rtol=value)


def test_a_numpy_tolerance_is_its_value_as_a_float():
    spec = flowdiff.Adaptive(rtol=np.float32(0.25), atol=np.int64(1))
    assert type(spec.rtol) is float and spec.rtol == 0.25
    assert type(spec.atol) is float and spec.atol == 1.0
