"""Review R27 of the session's merged changes (sweeps 13 and 14, review R26, the lead's): each test failed before its
fix; its docstring says what a user saw."""

import torch

import flowdiff
from flowdiff.models.analytic import Gaussian

GAUSS = Gaussian(torch.zeros(8, dtype=torch.float64), torch.full((8,), 0.5, dtype=torch.float64))


def _images(n=2, seed=0):
    return GAUSS.sample(n, generator=torch.Generator().manual_seed(seed))


def test_encode_under_torch_func_grad_of_a_tensor_a_plain_function_closes_over():
    """``torch.func.grad`` of an encode with respect to a scale that a plain-function model closes over stopped with
    "Cannot access data pointer of Tensor that doesn't have storage": the latent's fingerprint (sweep 14 reads a plain
    function's closure) read the transform's wrapped tensor. It ran before sweep 14, and runs under plain autograd;
    the fingerprint reads the value under the transform (the primal), as it reads a network's weights there."""
    x = _images()

    def loss(scale):
        flow = flowdiff.ProbabilityFlow(lambda x_t, t: scale * GAUSS(x_t, t), GAUSS.schedule)
        return flowdiff.encode(flow, x, solver="euler", steps=3).x.sum()

    scale = torch.tensor(1.5, dtype=torch.float64)
    by_func = torch.func.grad(loss)(scale)
    leaf = scale.clone().requires_grad_()
    (by_autograd,) = torch.autograd.grad(loss(leaf), leaf)
    torch.testing.assert_close(by_func, by_autograd)
    # the latent recorded under the transform is the one recorded outside it
    seen = {}

    def record(scale):
        flow = flowdiff.ProbabilityFlow(lambda x_t, t: scale * GAUSS(x_t, t), GAUSS.schedule)
        res = flowdiff.encode(flow, x, solver="euler", steps=3)
        seen["under"] = res.latent.fingerprint
        return res.x.sum()

    torch.func.grad(record)(scale)
    outside = flowdiff.ProbabilityFlow(lambda x_t, t: scale * GAUSS(x_t, t), GAUSS.schedule)
    assert seen["under"] == flowdiff.flow_fingerprint(outside)


class _Calls:
    """A user's call counter: a public int attribute the model function increments."""

    def __init__(self):
        self.calls = 0


class _Remembering:
    """A wrapper that keeps its last input in a public attribute, filled by its first call."""

    def __init__(self, model):
        self.model = model
        self.last = None

    def __call__(self, x_t, t):
        self.last = x_t
        return self.model(x_t, t)


def test_a_plain_function_s_fingerprint_does_not_change_as_its_objects_count_or_remember_calls():
    """A plain function that counts its calls on an object (``stats.calls += 1``) or calls a wrapper that remembers its
    last input (``self.last = x``) had a fingerprint that changed with every solve (sweep 14 reads the public attributes
    of the objects it reads): a latent decoded once was refused at its second decode as "encoded with another model",
    and a grid tuned before a generate was refused after it. The attributes those calls assign are left out; the
    model's own still count."""
    stats = _Calls()
    wrapper = _Remembering(GAUSS)

    def counted(x_t, t):
        stats.calls += 1
        return GAUSS(x_t, t)

    def remembered(x_t, t):
        return wrapper(x_t, t)

    for eps in (counted, remembered):
        flow = flowdiff.ProbabilityFlow(eps, GAUSS.schedule)
        before = flowdiff.flow_fingerprint(flow)
        latent = flowdiff.encode(flow, _images(), solver="euler", steps=3).latent
        flowdiff.decode(flow, latent)
        flowdiff.decode(flow, latent)  # refused here before
        assert flowdiff.flow_fingerprint(flow) == before == latent.fingerprint
    # what the wrapper wraps is still read: another model behind it is another flow
    other = Gaussian(torch.ones(8, dtype=torch.float64), torch.full((8,), 0.2, dtype=torch.float64))
    wrapper_b = _Remembering(other)
    assert (flowdiff.flow_fingerprint(flowdiff.ProbabilityFlow(lambda x_t, t: wrapper_b(x_t, t), GAUSS.schedule))
            != flowdiff.flow_fingerprint(flowdiff.ProbabilityFlow(lambda x_t, t: wrapper(x_t, t), GAUSS.schedule)))


class _Output:
    """What a diffusers network returns: the prediction as an attribute."""

    def __init__(self, prediction):
        self.sample = prediction


def _network(x_t, t):
    return _Output(GAUSS(x_t, t))


def test_an_attribute_a_plain_function_reads_is_not_taken_for_the_global_of_that_name():
    """``def eps(x, t): return unet(x, t).sample`` in a notebook that also holds ``sample = flowdiff.generate(...)``:
    the function's fingerprint read that result as if the function used it (the names a function's bytecode lists
    mix the globals it loads with the attributes it reads), so it changed with each new ``sample`` and a grid tuned
    before was refused after. Only the globals the function loads are read."""

    def eps(x_t, t):
        return _network(x_t, t).sample

    flow = flowdiff.ProbabilityFlow(eps, GAUSS.schedule)
    before = flowdiff.flow_fingerprint(flow)
    eps.__globals__["sample"] = flowdiff.generate(flow, _images(), steps=3)  # the notebook's global
    try:
        assert flowdiff.flow_fingerprint(flow) == before
    finally:
        del eps.__globals__["sample"]
    # a global it does load is still read
    global _network
    plain, _network = _network, lambda x_t, t: _Output(-GAUSS(x_t, t))
    try:
        assert flowdiff.flow_fingerprint(flow) != before
    finally:
        _network = plain


class _CountingModel:
    """A model object whose method, given as the model, counts its calls on ``self``."""

    def __init__(self, scale):
        self.scale = torch.tensor(scale, dtype=torch.float64)
        self.calls = 0

    def eps(self, x_t, t):
        self.calls += 1
        return self.scale * GAUSS(x_t, t)


def test_a_bound_method_model_that_counts_its_calls_keeps_its_fingerprint():
    """``ProbabilityFlow(model.eps, schedule)`` where ``eps`` counts its calls on ``self``: the object's int attributes
    are digested, so its fingerprint changed with every solve and a latent's second decode was refused as "encoded
    with another model" (the same rule as a plain function's objects: what the object's methods assign on ``self`` is
    its state). Its tensors still count."""
    model = _CountingModel(1.0)
    flow = flowdiff.ProbabilityFlow(model.eps, GAUSS.schedule)
    latent = flowdiff.encode(flow, _images(), solver="euler", steps=3).latent
    flowdiff.decode(flow, latent)
    flowdiff.decode(flow, latent)  # refused here before
    assert flowdiff.flow_fingerprint(flow) == latent.fingerprint
    other = flowdiff.ProbabilityFlow(_CountingModel(2.0).eps, GAUSS.schedule)
    assert flowdiff.flow_fingerprint(other) != latent.fingerprint


def test_a_plain_function_closing_over_a_sparse_tensor_encodes_and_is_told_apart():
    """A plain-function model closing over a sparse matrix (a graph's adjacency) stopped every encode with torch's
    "unsupported memory format option Contiguous" from its fingerprint (sweep 14 reads the closure); it encoded
    before. A sparse tensor is read by its indices and values, without making it dense."""
    def model_of(adjacency):
        return lambda x_t, t: GAUSS(x_t, t) + 0.0 * (x_t @ adjacency)

    first = torch.eye(8, dtype=torch.float64).to_sparse()
    second = (2 * torch.eye(8, dtype=torch.float64)).to_sparse_csr()
    flow = flowdiff.ProbabilityFlow(model_of(first), GAUSS.schedule)
    latent = flowdiff.encode(flow, _images(), solver="euler", steps=3).latent
    assert latent.fingerprint == flowdiff.flow_fingerprint(flowdiff.ProbabilityFlow(model_of(first.to_dense()
                                                                                             .to_sparse()),
                                                                                    GAUSS.schedule))
    assert latent.fingerprint != flowdiff.flow_fingerprint(flowdiff.ProbabilityFlow(model_of(second), GAUSS.schedule))
