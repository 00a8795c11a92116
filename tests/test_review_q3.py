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
    if method == "hybrid":  # Anderson's iterate meets the tolerance at the state's scale: no Newton after it
        assert enc.stats.nfe == 1 + enc.stats.extra["iterations"] and enc.stats.extra["restarts"] == 0
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


# -- 3. the calibration halves' check and a model that draws random numbers ------------------------------------------

HALVES = (slice(0, None, 2), slice(1, None, 2))


class _Stochastic(torch.nn.Module):
    """ε = scale·x_t through dropout (training mode) or times 1 + fresh noise (a stochastic layer), counting its calls;
    ``table`` (optional) is a lookup table indexed by ``labels``, of as many rows as the batch by accident."""

    def __init__(self, kind):
        super().__init__()
        self.kind, self.calls = kind, 0
        self.dropout = torch.nn.Dropout(0.3)

    def forward(self, x, t, scale=None, labels=None, table=None):
        self.calls += 1
        factor = scale if table is None else table[labels]
        out = x * factor.to(x.dtype).reshape(-1, *[1] * (x.ndim - 1))
        return self.dropout(out) if self.kind == "dropout" else out * (1 + 1e-3 * torch.randn_like(out))


def _calibration():
    from test_calibration_rows import VARIED, _conditional, _noise

    return _conditional().schedule, _noise(), VARIED


@pytest.mark.parametrize("kind", ["dropout", "noise"])
def test_rows_check_takes_a_model_that_draws_random_numbers(kind):
    from flowdiff.tools.tuning import check_rows_split

    schedule, noise, varied = _calibration()
    model = _Stochastic(kind).train()
    flow = fd.ProbabilityFlow(model, schedule)
    torch.manual_seed(0)
    spent = check_rows_split(flow, noise, varied, HALVES)
    assert spent == model.calls == 4  # the batch, each half, and the batch once more for the model's own spread
    # a deterministic model is checked with the batch and the halves only
    deterministic = fd.ProbabilityFlow(lambda x, t, scale: x * scale.reshape(-1, 1), schedule)
    assert check_rows_split(deterministic, noise, varied, HALVES) == 3


def test_rows_check_still_names_a_cut_table_of_a_model_that_draws_random_numbers():
    from flowdiff.tools.tuning import check_rows_split

    schedule, noise, _ = _calibration()
    model = _Stochastic("noise")
    flow = fd.ProbabilityFlow(model, schedule)
    kw = {"labels": torch.tensor([0, 1, 2, 0, 1, 2]), "table": torch.linspace(0.2, 0.4, 6)}
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"model_kwargs .*table: \(6,\).* more than 4 times the model's own spread"):
        check_rows_split(flow, noise, kw, HALVES)


# -- 4. adjoint="checkpoint" and modules a model runs in threads it starts -------------------------------------------


class _Counting(torch.nn.Module):
    """Eval mode: its output is scaled by 1 + 0.1·calls, a buffer incremented in place at each call (the output reads a
    buffer it changes)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.float64))

    def forward(self, x):
        self.calls += 1
        return x * (1 + 0.1 * self.calls)


class _OwnThreads(torch.nn.Module):
    """A field that runs its ordinary submodules (a BatchNorm in training mode, a call counter) in a thread it starts
    at each call: no nn.DataParallel replica, nothing marked."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 4, bias=False, dtype=torch.float64)
        self.norm = torch.nn.BatchNorm1d(4, dtype=torch.float64)
        self.count = _Counting().eval()

    def forward(self, x, t):
        import threading

        out, grad_mode = [], torch.is_grad_enabled()

        def run() -> None:
            with torch.set_grad_enabled(grad_mode):
                out.append(self.count(self.norm(self.lin(x))))

        worker = threading.Thread(target=run)
        worker.start()
        worker.join()
        return out[0] * (1.0 + t.to(x.dtype)[:, None] / 1000.0)


def test_checkpoint_puts_back_the_buffers_of_modules_a_model_runs_in_its_own_threads():
    """The model's own submodules are its, in whatever thread they run: the BatchNorm statistics end as autograd's (the
    recomputation updated them again) and each recomputed step reads the counter the forward step read (the gradient
    is autograd's)."""
    start = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    buffers, grads = {}, {}
    for mode in ("autograd", "checkpoint"):
        net = _OwnThreads()
        x = start.clone().requires_grad_()
        res = fd.generate(fd.ProbabilityFlow(net, fd.Schedule.linear()), x, solver="heun", steps=3, adjoint=mode)
        (grads[mode],) = torch.autograd.grad(res.x.pow(2).sum(), [x])
        buffers[mode] = {k: b.clone() for k, b in net.named_buffers()}
    assert int(buffers["autograd"]["norm.num_batches_tracked"]) > 0
    for name, value in buffers["autograd"].items():
        assert torch.equal(buffers["checkpoint"][name], value), name
    torch.testing.assert_close(grads["checkpoint"], grads["autograd"], rtol=1e-10, atol=0)


# -- 5. a learned encoder fitted with per-sample labels says why it refuses others -----------------------------------


def test_learned_encoder_fitted_per_sample_says_it_holds_those_rows():
    from test_calibration_rows import BATCH, VARIED, _conditional, _images

    flow, images = _conditional(), _images()
    learned = fd.learn_encoder(flow, images, nfe=4, iterations=1, model_kwargs=VARIED)
    learned.encode(flow, images, model_kwargs=VARIED)  # the rows it was fitted with
    others = {"scale": torch.linspace(0.25, 0.45, BATCH)}
    for images_given, kw in ((images, others), (images[:2], {"scale": VARIED["scale"][:2]})):
        with pytest.raises(ValueError, match=r"this learned encoder was fitted on the flow .*holds those rows, in that "
                                             r"order, and takes no others \(the model_kwargs given hold rows: scale: "
                                             rf"\({images_given.shape[0]},\)\).*learn_encoder\(flow, images, "
                                             r"model_kwargs=\.\.\.\).*label given once"):
            learned.encode(flow, images_given, model_kwargs=kw)
    # what the message offers: one fitted with the conditioning given once takes any number of images with it
    once = fd.learn_encoder(flow, images, nfe=4, iterations=1, model_kwargs={"scale": torch.tensor(0.3)})
    once.encode(flow, images[:2], model_kwargs={"scale": torch.full((2,), 0.3)})
    once.encode(flow, images[:5], model_kwargs={"scale": torch.tensor(0.3)})
    # fitted unconditionally: the message says so
    plain_flow = Gaussian(torch.linspace(-0.3, 0.3, 4), 0.5).flow()
    plain = fd.learn_encoder(plain_flow, images, nfe=4, iterations=1)
    with pytest.raises(ValueError, match=r"fitted on this flow without model_kwargs \(unconditionally\): encode "
                                         "without them"):
        plain.encode(plain_flow, images, model_kwargs={"class_labels": torch.arange(BATCH)})
