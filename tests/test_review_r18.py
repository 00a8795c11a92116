"""Reviewer R18's finds in G3's fixed-point tolerances, L3's trajectory kind and the lead's last commits."""

import warnings

import pytest
import torch

import flowdiff as fd

# -- 1. a step's reported tolerance is the one its missed samples were held to -------------------------------------


def test_a_sample_that_missed_is_not_hidden_by_another_samples_raised_floor(monkeypatch):
    """Each sample has its own limit (the default tol, or its rounding floor where that is larger). stats.extra
    reported per step the worst missed residual beside the largest limit of *any* sample, so with on_failure='keep'
    a sample that missed its own (the default) was hidden by another's raised floor: the step read residual < tol
    and assert_fixed_point_converged passed an encode whose stats listed the sample as unconverged. The per-sample
    floors are set apart here (one tiny, one huge) to reach that case in a few evaluations."""
    from flowdiff.api import fixed_point
    from flowdiff.models.analytic import Gaussian
    from flowdiff.tools.testing import assert_fixed_point_converged

    floors = torch.tensor([1e-12, 1e3], dtype=torch.float64)
    monkeypatch.setattr(fixed_point.FixedPointInverse, "_floor", lambda self, x, scale: floors)
    model = Gaussian(torch.zeros(1, 4, 4, dtype=torch.float64), 1.0)
    x = (0.1 * model.sample(2, generator=torch.Generator().manual_seed(0))).float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the unconverged-samples warning, expected
        enc = fd.encode(model.flow(), x, solver=fd.Inversion("fixed_point", {"max_iter": 1, "on_failure": "keep"}),
                        steps=3)
    extra = enc.stats.extra
    assert extra["unconverged"] == [0]  # sample 0 missed the default tol; sample 1 met its (huge) floor
    assert extra["tolerances"] == [extra["tol"]] * 3  # sample 0's limit, not sample 1's 1e3
    assert all(r > t for r, t in zip(extra["residuals"], extra["tolerances"]))
    with pytest.raises(AssertionError, match="missed its tolerance at step"):
        assert_fixed_point_converged(enc)


# -- 2. the torch.func refusal: reverse mode only; jvp runs every adjoint ----------------------------------------------


def test_torch_func_refusal_is_reverse_mode_only_and_jvp_runs_every_adjoint():
    """The refusal said jvp and vmap too, and the CHANGELOG that adjoint='autograd' runs under vmap. Under jvp nothing
    requires a gradient: adjoint='checkpoint' is the plain solve forward mode differentiates, its tangent equal to
    autograd's; jacrev (reverse mode) is refused naming adjoint= and the reverse-mode transforms."""
    import torch.func as tf

    from flowdiff.models.analytic import Gaussian

    flow = Gaussian(torch.zeros(1, 2, 2, dtype=torch.float64), 0.5).flow()
    noise = torch.randn(2, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    tangent = torch.randn(noise.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def run(adjoint):
        return lambda n: fd.generate(flow, n, solver="heun", steps=4, adjoint=adjoint).x

    tangents = {adj: tf.jvp(run(adj), (noise,), (tangent,))[1] for adj in ("autograd", "checkpoint")}
    torch.testing.assert_close(tangents["checkpoint"], tangents["autograd"], rtol=0, atol=0)
    assert not torch.equal(tangents["autograd"], torch.zeros_like(tangent))
    with pytest.raises(ValueError, match=r"^adjoint='checkpoint' cannot run under a torch\.func transform of "
                                         r"reverse mode \(grad, vjp, jacrev, hessian\)"):
        tf.jacrev(lambda n: run("checkpoint")(n).sum(0).flatten())(noise)


# -- 3. the rounding a fixed-point failure blames is the precision that sets the floor ---------------------------------


def test_a_half_precision_encodes_failure_names_the_rounding_that_sets_its_floor():
    """bfloat16 images are encoded with the state in float32 and the model evaluated in bfloat16, so the residual's
    floor is bfloat16's epsilon at the state's scale. The failure said "torch.float32 rounding at this step's scale
    allows about 0.12", a figure about 6·10⁴ times what float32 rounding allows there. It names bfloat16 now, and the
    figure is bfloat16's epsilon times the state's scale."""
    import re

    import solvers
    from flowdiff.models.analytic import Mixture

    gen = torch.Generator().manual_seed(0)
    model = Mixture(torch.rand(8, 1, 4, 4, dtype=torch.float64, generator=gen) * 2 - 1, 0.3)
    images = model.sample(3, generator=gen).clamp(-1, 1).to(torch.bfloat16)
    with pytest.raises(solvers.SolveError) as info:
        fd.encode(model.flow(), images, solver=fd.Inversion("fixed_point"), steps=2)
    message = str(info.value)
    found = re.search(r"(\S+) rounding at this step's scale allows about ([0-9.e+-]+)", message)
    assert found is not None, message
    assert found.group(1) == "torch.bfloat16" and "torch.float32 rounding" not in message
    assert float(found.group(2)) > 32 * torch.finfo(torch.float32).eps * 1e3  # not a float32 figure
