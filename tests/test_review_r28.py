"""Review R28 of the model fingerprint (flowdiff/engine/fingerprint.py): each test failed before its fix; its
docstring says what a user saw."""

import dataclasses
import enum

import numpy as np
import torch

import flowdiff
from flowdiff.models.analytic import Gaussian

GAUSS = Gaussian(torch.zeros(8, dtype=torch.float64), torch.full((8,), 0.5, dtype=torch.float64))


def _fingerprint(model):
    return flowdiff.flow_fingerprint(flowdiff.ProbabilityFlow(model, GAUSS.schedule))


class _Settable:
    """A model object whose weight is set after construction, by a setter or by ``to`` (common in research code)."""

    def __init__(self):
        self.weight = torch.tensor(1.0, dtype=torch.float64)

    def set_weight(self, weight):
        self.weight = weight

    def to(self, dtype):
        self.weight = self.weight.to(dtype)
        return self

    def __call__(self, x_t, t):
        return self.weight * GAUSS(x_t, t)

    def eps(self, x_t, t):
        return self(x_t, t)


def test_a_tensor_a_model_object_sets_outside_its_constructor_is_part_of_its_fingerprint():
    """Two model objects of one class whose weights were set by a method (``set_weight``, or reassigned in ``to``)
    had one fingerprint, as objects or through a bound method: R27 left out every attribute a method other than the
    constructor assigns on ``self`` (meant for call counters and caches), so a grid tuned, a solver fitted or a latent
    encoded with one loaded for the other without a word. What a call assigns (the method given as the model and the
    methods it calls) is still left out."""
    first, second = _Settable(), _Settable()
    second.set_weight(torch.tensor(2.0, dtype=torch.float64))
    assert _fingerprint(first) != _fingerprint(second)
    assert _fingerprint(first.eps) != _fingerprint(second.eps)
    assert _fingerprint(lambda x_t, t: first(x_t, t)) != _fingerprint(lambda x_t, t: second(x_t, t))
    third = _Settable().to(torch.float32)
    assert _fingerprint(first) != _fingerprint(third)
    # the same object before and after a solve: still one fingerprint
    flow = flowdiff.ProbabilityFlow(second.eps, GAUSS.schedule)
    latent = flowdiff.encode(flow, GAUSS.sample(2, generator=torch.Generator().manual_seed(0)), solver="euler",
                             steps=3).latent
    flowdiff.decode(flow, latent)
    assert flowdiff.flow_fingerprint(flow) == latent.fingerprint


class _Caching:
    """A model object whose call fills a cache through a helper method (the state a call assigns)."""

    def __init__(self, scale):
        self.scale = torch.tensor(scale, dtype=torch.float64)
        self.last = None

    def _remember(self, x_t):
        self.last = x_t
        self.count = getattr(self, "count", 0) + 1

    def __call__(self, x_t, t):
        self._remember(x_t)
        return self.scale * GAUSS(x_t, t)


def test_what_a_call_assigns_through_a_helper_method_stays_out():
    """The narrower rule still leaves out what a call assigns through a method it calls (a cache, a counter)."""
    model = _Caching(1.0)
    flow = flowdiff.ProbabilityFlow(model, GAUSS.schedule)
    before = flowdiff.flow_fingerprint(flow)
    latent = flowdiff.encode(flow, GAUSS.sample(2, generator=torch.Generator().manual_seed(0)), solver="euler",
                             steps=3).latent
    flowdiff.decode(flow, latent)
    assert flowdiff.flow_fingerprint(flow) == before == latent.fingerprint
    assert _fingerprint(_Caching(2.0)) != before


class _Guided:
    """A user's guidance wrapper: a plain object holding the network and a weight."""

    def __init__(self, network, weight):
        self.network = network
        self.weight = weight

    def __call__(self, x_t, t):
        return (1 + self.weight) * self.network(x_t)

    def eps(self, x_t, t):
        return self(x_t, t)


def test_a_model_object_holding_a_network_or_another_model_object_is_read_through_it():
    """A plain object given as the model (or its bound method) that holds a network, another model object or a numpy
    array had the fingerprint of its numbers and tensors alone: ``_Guided(unet_a, 7.5)`` and ``_Guided(unet_b, 7.5)``
    had one, so a latent encoded with one decoded under the other unchecked; the same wrapper read from a plain
    function's closure was told apart. What the object holds is read as a closure's objects are."""
    torch.manual_seed(0)
    first, second = torch.nn.Linear(8, 8).double(), torch.nn.Linear(8, 8).double()
    assert _fingerprint(_Guided(first, 7.5)) != _fingerprint(_Guided(second, 7.5))
    assert _fingerprint(_Guided(first, 7.5).eps) != _fingerprint(_Guided(second, 7.5).eps)
    other = Gaussian(torch.ones(8, dtype=torch.float64), torch.full((8,), 0.5, dtype=torch.float64))
    assert _fingerprint(_Guided(GAUSS, 0.0)) != _fingerprint(_Guided(other, 0.0))
    assert _fingerprint(_Guided(np.zeros(3), 0.0)) != _fingerprint(_Guided(np.ones(3), 0.0))
    # one wrapper: one fingerprint before and after a solve
    flow = flowdiff.ProbabilityFlow(_Guided(first, 0.5), GAUSS.schedule)
    latent = flowdiff.encode(flow, GAUSS.sample(2, generator=torch.Generator().manual_seed(0)), solver="euler",
                             steps=3).latent
    flowdiff.decode(flow, latent)
    assert flowdiff.flow_fingerprint(flow) == latent.fingerprint


def test_a_plain_function_closing_over_a_conjugate_view_encodes_and_is_told_apart():
    """A plain-function model closing over a complex tensor's conjugate (``torch.fft.fft(kernel).conj()``, a lazy
    view) stopped every encode in its fingerprint with torch's "view is not supported for conjugate view tensors"
    (sweep 14 reads the closure). Its values are read as the conjugate they stand for."""
    def model_of(kernel):
        return lambda x_t, t: GAUSS(x_t, t) + 0.0 * kernel.real.sum()

    kernel = torch.fft.fft(torch.arange(8, dtype=torch.float64))
    flow = flowdiff.ProbabilityFlow(model_of(kernel.conj()), GAUSS.schedule)
    latent = flowdiff.encode(flow, GAUSS.sample(2, generator=torch.Generator().manual_seed(0)), solver="euler",
                             steps=3).latent
    assert latent.fingerprint == _fingerprint(model_of(kernel.conj().resolve_conj()))
    assert latent.fingerprint != _fingerprint(model_of(kernel))


class _Target(enum.Enum):
    """What a user's network predicts, as an enum its plain-function wrapper closes over."""

    EPS = "eps"
    V = "v"


def test_two_plain_functions_closing_over_two_members_of_an_enum_are_told_apart():
    """``make_eps(Target.EPS)`` and ``make_eps(Target.V)`` had one fingerprint: an enum member was read as an object
    by its public attributes, and it has none (its name and value are private), so a grid tuned for one loaded for
    the other. A member is read by its class and name."""
    def make_eps(target):
        return lambda x_t, t: GAUSS(x_t, t) if target is _Target.EPS else -GAUSS(x_t, t)

    assert _fingerprint(make_eps(_Target.EPS)) != _fingerprint(make_eps(_Target.V))
    assert _fingerprint(make_eps(_Target.EPS)) == _fingerprint(make_eps(_Target("eps")))


@dataclasses.dataclass(frozen=True, slots=True)
class _Config:
    """A user's configuration, a slotted dataclass: its fields have no ``__dict__``."""

    guidance: float
    target: str


def test_two_plain_functions_closing_over_two_slotted_configurations_are_told_apart():
    """``make_eps(Config(7.5, "eps"))`` and ``make_eps(Config(1.0, "eps"))`` had one fingerprint: an object was read
    by its ``__dict__``, and a slotted dataclass has none, so it counted as its type alone."""
    def make_eps(config):
        return lambda x_t, t: config.guidance * GAUSS(x_t, t)

    assert _fingerprint(make_eps(_Config(7.5, "eps"))) != _fingerprint(make_eps(_Config(1.0, "eps")))
    assert _fingerprint(make_eps(_Config(7.5, "eps"))) == _fingerprint(make_eps(_Config(7.5, "eps")))
