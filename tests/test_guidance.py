"""Classifier-free guidance: ε_u + w(ε_c − ε_u) is a flow; w = 1 is the conditional model, w = 0 the unconditional."""

import pytest
import torch

import flowdiff
from flowdiff.models.analytic import Mixture
from flowdiff.models.guidance import GuidedModel, classifier_free_guidance
from flowdiff.models.nets import DigitsNet


class ClassMixture:
    """A closed-form class-conditional model: class c is a kernel density over its own points,
    the unconditional model the density over all points (ε in σ, exact at σ = 0)."""

    def __init__(self, n_classes=3, per_class=4, dim=6, bandwidth=0.3):
        g = torch.Generator().manual_seed(0)
        centers = torch.randn(n_classes, per_class, dim, dtype=torch.float64, generator=g) + \
            3 * torch.randn(n_classes, 1, dim, dtype=torch.float64, generator=g)
        self.all = Mixture(centers.reshape(-1, dim), bandwidth)
        self.by_class = [Mixture(c, bandwidth) for c in centers]
        self.schedule = self.all.schedule

    def __call__(self, xbar, sigma, class_labels=None):
        if class_labels is None:
            return self.all.eps(xbar, sigma)
        out = torch.empty_like(xbar)
        for c, mix in enumerate(self.by_class):
            rows = class_labels == c
            if rows.any():
                out[rows] = mix.eps(xbar[rows], sigma)
        return out

    def flow(self):
        return flowdiff.ProbabilityFlow.from_sigma_field(self, self.schedule)


def _random_digits_net(prediction_type="epsilon"):
    torch.manual_seed(0)
    net = DigitsNet((8, 16), groups=4).double()
    with torch.no_grad():
        for p in net.parameters():  # the output layer starts at zero: give every layer a signal
            p.normal_(0, 0.2)
    return flowdiff.ProbabilityFlow(net, flowdiff.Schedule.linear(), prediction_type=prediction_type)


LABELS = torch.tensor([0, 2, 1, 0])
SIGMAS = [0.0, 0.05, 1.0, 30.0]


def test_w1_is_the_conditional_model_and_w0_the_unconditional_sigma_native():
    model = ClassMixture()
    flow = model.flow()
    x = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2
    kwargs = {"class_labels": LABELS}
    for sigma in SIGMAS:
        eps_c, eps_u = flow.eps(x, sigma, **kwargs), flow.eps(x, sigma)
        assert torch.equal(classifier_free_guidance(flow, 1.0).eps(x, sigma, **kwargs), eps_c)
        torch.testing.assert_close(classifier_free_guidance(flow, 0.0).eps(x, sigma, **kwargs), eps_u,
                                   rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(classifier_free_guidance(flow, 3.5).eps(x, sigma, **kwargs),
                                   eps_u + 3.5 * (eps_c - eps_u), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_guidance_on_a_timestep_network_combines_eps(prediction_type):
    """For v and x₀ prediction the output → ε map is affine at fixed (x̄, σ): combining outputs combines ε."""
    flow = _random_digits_net(prediction_type)
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    kwargs = {"class_labels": LABELS}
    for sigma in (0.3, 5.0):
        eps_c, eps_u = flow.eps(x, sigma, **kwargs), flow.eps(x, sigma)
        assert not torch.allclose(eps_c, eps_u)  # the labels matter, so the test can fail
        guided = classifier_free_guidance(flow, 2.5)
        assert guided.prediction_type == prediction_type
        torch.testing.assert_close(guided.eps(x, sigma, **kwargs), eps_u + 2.5 * (eps_c - eps_u),
                                   rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(classifier_free_guidance(flow, 1.0).eps(x, sigma, **kwargs), eps_c,
                                   rtol=1e-12, atol=1e-12)


def test_guided_generation_at_w1_is_conditional_generation(device):
    flow = _random_digits_net()
    flow.model.to(device)
    noise = torch.randn(4, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).to(device)
    kwargs = {"class_labels": LABELS.to(device)}
    cond = flowdiff.generate(flow, noise, solver="heun", steps=5, model_kwargs=kwargs)
    guided = flowdiff.generate(classifier_free_guidance(flow, 1.0), noise, solver="heun", steps=5,
                               model_kwargs=kwargs)
    torch.testing.assert_close(guided.x, cond.x, rtol=1e-12, atol=1e-12)
    assert guided.stats.nfe == cond.stats.nfe and guided.x.device == noise.device


def _round_trip(w, **solve):
    model = ClassMixture(bandwidth=0.5)
    guided = classifier_free_guidance(model.flow(), w)
    kwargs = {"class_labels": LABELS}
    x0 = torch.stack([model.by_class[c].sample(1, torch.Generator().manual_seed(i))[0]
                      for i, c in enumerate(LABELS.tolist())])
    enc = flowdiff.encode(guided, x0, model_kwargs=kwargs, **solve)
    dec = flowdiff.generate(guided, enc.x, model_kwargs=kwargs, **solve)
    return (dec.x - x0).abs().max().item()


def test_guided_flow_round_trips_like_any_ode():
    """Guidance keeps an ODE: encoding then decoding at w = 3 returns the image up to solver error,
    which shrinks as the grid is refined (fourth order: 10 → 40 steps cuts it by far more than 10)."""
    coarse = _round_trip(3.0, solver="rk4", steps=10, grid="logsnr")
    fine = _round_trip(3.0, solver="rk4", steps=40, grid="logsnr")
    assert fine < 5e-3 and fine < coarse / 10


@pytest.mark.slow
def test_guided_flow_round_trips_tightly_with_an_adaptive_solver():
    assert _round_trip(3.0, solver="dopri5", rtol=1e-7, atol=1e-7) < 1e-5


def test_null_class_kwargs():
    flow = _random_digits_net()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    null = {"class_labels": torch.tensor([10, 10])}
    explicit = classifier_free_guidance(flow, 2.0, unconditional_kwargs=null, batch=False)
    implicit = classifier_free_guidance(flow, 2.0)
    kwargs = {"class_labels": torch.tensor([3, 7])}
    torch.testing.assert_close(explicit.eps(x, 1.0, **kwargs), implicit.eps(x, 1.0, **kwargs), rtol=0, atol=0)
    # the same two branches as one call on the doubled batch: equal to rounding, and one call, not two
    calls = []
    flow.model.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    batched = classifier_free_guidance(flow, 2.0, unconditional_kwargs=null)
    torch.testing.assert_close(batched.eps(x, 1.0, **kwargs), implicit.eps(x, 1.0, **kwargs), rtol=1e-12, atol=1e-12)
    assert calls == [4, 2, 2]


def test_bad_input():
    flow = ClassMixture().flow()
    with pytest.raises(TypeError, match="flow must be"):
        classifier_free_guidance(lambda x, t: x, 2.0)
    for bad in (float("nan"), "2", True, None):
        with pytest.raises(TypeError, match="scale must be a finite number"):
            classifier_free_guidance(flow, bad)
    with pytest.raises(TypeError, match="unconditional_kwargs"):
        classifier_free_guidance(flow, 2.0, unconditional_kwargs=[1])
    assert "scale=2.0" in repr(GuidedModel(flow.model, 2.0))
