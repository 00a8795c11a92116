"""The reviewers' open finds (Q3): each reproduced, each fixed."""

import re

import pytest
import torch

import flowdiff as fd
import solvers
from flowdiff.models.analytic import Gaussian
from flowdiff.tools.testing import assert_fixed_point_converged

# -- 1. fixed-point inversion in one step from σ = 0 to σ_max -------------------------------------------------------


@pytest.fixture(scope="module")
def unit_gaussian():
    """N(0, I) data: one Euler step from σ_max maps x̄ to x̄/(1 + σ²), so an image x has the preimage (1 + σ²)·x,
    about 2·10⁴ times larger than the image, whose rounding alone exceeds 32 epsilons relative to 1 + |x|."""
    model = Gaussian(torch.zeros(1, 4, 4, dtype=torch.float64), 1.0)
    images = 0.1 * model.sample(3, generator=torch.Generator().manual_seed(0))
    return model.flow(), images


@pytest.mark.parametrize("method", ["hybrid", "newton"])
def test_one_step_to_sigma_max_converges_at_the_states_rounding(unit_gaussian, method):
    flow, images = unit_gaussian
    enc = fd.encode(flow, images, solver=fd.Inversion("fixed_point", {"method": method}), steps=1)
    assert enc.sigmas[-1] == flow.schedule.sigma_max and enc.sigmas[0] == 0.0
    assert_fixed_point_converged(enc)
    assert enc.stats.extra["unconverged"] == []
    smax = flow.schedule.sigma_max
    xbar = enc.x * (1 + smax**2) ** 0.5
    # the exact preimage (to rounding times its condition number 1 + σ² ≈ 2.5·10⁴), and the plain one-step decode
    # brings the images back to float64 rounding at the state's scale
    cond = 1 + smax**2
    torch.testing.assert_close(xbar, cond * images, rtol=64 * cond * torch.finfo(torch.float64).eps, atol=0)
    back = fd.decode(flow, enc.latent).x
    assert (back - images).abs().max().item() <= 64 * torch.finfo(torch.float64).eps * xbar.abs().max().item()


def test_one_step_explicit_tol_below_rounding_says_so(unit_gaussian):
    """An explicit tol is held as asked; missing it only by rounding is said, with the step, σ and a tol to give."""
    flow, images = unit_gaussian
    tol = 1e-15
    with pytest.raises(solvers.SolveError) as info:
        fd.encode(flow, images, solver=fd.Inversion("fixed_point", {"method": "newton", "tol": tol}), steps=1)
    message = str(info.value)
    assert "step 0 (σ 0 -> 157.407)" in message
    assert "rounding" in message and "no preimage" not in message
    limit = float(re.search(r"give inversion option tol >= ([0-9.e+-]+)", message).group(1))
    assert limit > tol
    enc = fd.encode(flow, images, solver=fd.Inversion("fixed_point", {"method": "newton", "tol": limit}), steps=1)
    assert_fixed_point_converged(enc)


def test_one_step_real_miss_says_it_is_not_rounding():
    """The shipped digits model: the denoiser at σ_max reaches no digit, the residual stays at ~0.2. The message
    says the miss is far from rounding and names the step, σ and what to change."""
    flow = fd.pretrained("digits")
    images = fd.digits_data("test").images[:1]
    with pytest.raises(solvers.SolveError) as info:
        fd.encode(flow, images, solver=fd.Inversion("fixed_point", {"method": "newton", "max_iter": 3}), steps=1)
    message = str(info.value)
    assert "step 0 (σ 0 -> 157.407)" in message and "max_iter=3" in message
    assert "so the miss is not rounding" in message and "more steps" in message


# -- 2. a wrong image shape is refused up front, naming the argument -------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 1, 16, 16), (2, 3, 8, 8), (2, 64)])
def test_digits_model_refuses_a_wrong_shape_before_any_solve(shape):
    flow = fd.pretrained("digits")
    calls = []
    flow.model.register_forward_pre_hook(lambda module, args: calls.append(1))
    x = torch.rand(shape) * 2 - 1
    expected = re.escape(f"has shape {shape}; the model (DigitsNet) takes (batch, 1, 8, 8)")
    with pytest.raises(ValueError, match="^noise " + expected):
        fd.generate(flow, x, steps=2)
    with pytest.raises(ValueError, match="^images " + expected):
        fd.encode(flow, x, steps=2)
    with pytest.raises(ValueError, match="^images " + expected):
        fd.encode(flow, x, steps=2, solver=fd.Inversion("fixed_point"))
    assert calls == []  # refused before the model ran
    assert fd.generate(flow, torch.randn(2, 1, 8, 8), steps=2).x.shape == (2, 1, 8, 8)  # the shape it takes
    assert len(calls) == 2


def test_diffusers_unet_refuses_other_channels_but_takes_other_sizes():
    diffusers = pytest.importorskip("diffusers")
    from flowdiff.models.diffusers_io import DiffusersModel
    from flowdiff.models.pipelines import DiffusersFlow

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    flow = DiffusersFlow(DiffusersModel(unet), fd.Schedule.linear())
    with pytest.raises(ValueError, match=re.escape("noise has shape (2, 3, 8, 8); the model (DiffusersModel) takes "
                                                   "(batch, 1, any, any)")):
        fd.generate(flow, torch.randn(2, 3, 8, 8), steps=2)
    # sample_size is no limit for a UNet: another size still runs
    assert fd.generate(flow, torch.randn(2, 1, 16, 16), steps=2).x.shape == (2, 1, 16, 16)
