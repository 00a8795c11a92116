"""sample_quality on images of the wrong scale: [0, 1] is refused, the shipped model's low-NFE samples are not.

Images in [0, 1] (a common mistake: the model's range is [−1, 1]) were clipped and scored as faint digits
without a word. The rule: a set of digits in [−1, 1] has some value below −0.5 (a digit's background is
−1); benchmarks/bench_quality_range.py measured it on 1,188 low-NFE runs of the shipped model.
"""

import pytest
import torch

import flowdiff
from flowdiff.tools.quality import QUALITY_BACKGROUND_MARGIN


@pytest.fixture(scope="module")
def digits():
    return flowdiff.digits_data("test").images[:16]


@pytest.mark.parametrize("overshoot", [0.0, 0.1])
def test_images_in_zero_one_are_refused_naming_the_range_and_the_fix(digits, overshoot):
    unit = (digits + 1) / 2 * (1 + 2 * overshoot) - overshoot  # [0, 1], or [-0.1, 1.1] as a sample overshoots
    low, high = float(unit.min()), float(unit.max())
    with pytest.raises(ValueError, match=rf"images span \[{low:.4g}, {high:.4g}\] with no value below -0.5.*"
                                         r"background is -1.*\[0, 1\].*images \* 2 - 1"):
        flowdiff.sample_quality(unit)
    rescaled = flowdiff.sample_quality(unit * 2 - 1)  # the fix the message names
    assert rescaled["n"] == 16


def test_the_rule_is_the_darkest_value_of_the_set(digits):
    # one real digit among blanks keeps the set: the rule is about the scale, not each image's content
    mixed = torch.cat([digits[:1], torch.full((3, 1, 8, 8), 0.2)])
    assert flowdiff.sample_quality(mixed)["n"] == 4
    pale = digits.clamp(min=QUALITY_BACKGROUND_MARGIN)
    with pytest.raises(ValueError, match="no value below -0.5"):
        flowdiff.sample_quality(pale)
    just_below = digits.clamp(min=QUALITY_BACKGROUND_MARGIN - 1e-3)
    assert flowdiff.sample_quality(just_below)["n"] == 16


@pytest.mark.parametrize("solver", ["euler", "midpoint", "heun", "dpmpp_2m", "abm", "unipc"])
@pytest.mark.parametrize("grid", ["trailing", "karras", "logsnr"])
def test_low_nfe_samples_of_the_shipped_model_are_scored(solver, grid):
    flow = flowdiff.pretrained("digits")
    noise = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    for nfe in (2, 3, 5, 10):
        x = flowdiff.generate(flow, noise, solver=solver, grid=grid, nfe=nfe).x
        assert flowdiff.sample_quality(x)["n"] == 8, (solver, grid, nfe)


@pytest.mark.parametrize("shape", [(4, 8, 8), (4, 1, 8, 8, 1), (4, 2, 32), (4, 8, 8, 1)])
def test_sample_quality_takes_only_its_two_shapes(shape):
    """(N, 8, 8), (N, 1, 8, 8, 1) and other shapes of 64 values per image were scored as if flattened (S5); the
    docstring accepts (N, 1, 8, 8) and (N, 64) only."""
    with pytest.raises(ValueError, match=r"images must have shape \(N, 1, 8, 8\) or \(N, 64\)"):
        flowdiff.sample_quality(torch.zeros(shape) - 1)


def test_sample_quality_refuses_integer_images():
    """An integer tensor (8-bit pixels, or −1/0/1 masks) was cast and scored; it names its dtype and the rescale."""
    with pytest.raises(TypeError, match=r"images must be floating point .* got torch\.uint8 .*v / 127\.5 - 1"):
        flowdiff.sample_quality(torch.zeros(4, 64, dtype=torch.uint8))
