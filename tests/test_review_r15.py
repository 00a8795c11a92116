"""R15's review of the buffer replay (U2) and the calibration rows: regressions for what it found."""

import copy

import pytest
import torch
import torch.nn.modules.module as torch_module
from test_adjoint_buffers import _START, _Counter, _Ema, _solve

import flowdiff
from flowdiff.tools.learned import tune_roundtrip


class _Gated(_Ema):
    """The moving average, updated at every call but read only at high t (an expert switched on the time): at the
    solve's end (low t) its output does not depend on the buffer."""

    def forward(self, x, t):
        self.average = 0.5 * self.average + 0.5 * x.detach().mean(0)
        gate = (t.to(x.dtype) > 300)[:, None].to(x.dtype)
        return torch.tanh(self.lin(x) + 4.0 * gate * self.average)


def test_reversible_refuses_or_matches_autograd_for_a_model_reading_its_buffers_at_some_times_only():
    """main probed the read at the solve's end only, passed this model, and returned a gradient 61% off."""
    base = _Gated().eval()
    reference = _solve(copy.deepcopy(base), "generate", "reversible_heun", "autograd", _START)
    try:
        got = _solve(copy.deepcopy(base), "generate", "reversible_heun", "reversible", _START)
    except ValueError as err:
        assert "_Gated.average" in str(err) and "'checkpoint'" in str(err)
    else:
        for g, r in zip(got, reference, strict=True):
            assert float((g - r).norm()) <= 1e-10 * float(r.norm())
    checkpoint = _solve(copy.deepcopy(base), "generate", "reversible_heun", "checkpoint", _START)
    for g, r in zip(checkpoint, reference, strict=True):
        assert float((g - r).norm()) <= 1e-10 * float(r.norm())


def test_no_watch_hook_on_an_undifferentiated_solve(monkeypatch):
    """A plain generate (the default adjoint; nothing requires a gradient; grad mode off) installs no global module
    hook: the watch's cost is only the differentiated solve's."""
    installed = []
    register = torch_module.register_module_forward_pre_hook
    monkeypatch.setattr(torch_module, "register_module_forward_pre_hook",
                        lambda hook: installed.append(hook) or register(hook))
    flow = flowdiff.ProbabilityFlow(_Counter().eval(), flowdiff.Schedule.linear())
    flowdiff.generate(flow, _START.clone(), solver="euler", steps=4)
    with torch.no_grad():
        flowdiff.generate(flow, _START.clone().requires_grad_(), solver="euler", steps=4, adjoint="checkpoint")
    frozen = flowdiff.ProbabilityFlow(_Counter().eval().requires_grad_(False), flowdiff.Schedule.linear())
    flowdiff.generate(frozen, _START.clone(), solver="euler", steps=4, adjoint="checkpoint")
    assert installed == []
    flowdiff.generate(flow, _START.clone().requires_grad_(), solver="euler", steps=4, adjoint="checkpoint")
    assert len(installed) == 1  # the spy sees the differentiated solve's watch


class _Fails(_Counter):
    def forward(self, x, t):
        self.calls += 1
        if self.calls > 2:
            raise RuntimeError("the model failed")
        return self.lin(x)


@pytest.mark.parametrize("adjoint", ["checkpoint", "reversible"])
def test_a_model_failing_mid_solve_leaves_no_global_hook(adjoint):
    before = dict(torch_module._global_forward_pre_hooks)
    flow = flowdiff.ProbabilityFlow(_Fails().eval(), flowdiff.Schedule.linear())
    with pytest.raises(RuntimeError, match="the model failed"):
        flowdiff.generate(flow, _START.clone().requires_grad_(), solver="reversible_heun", steps=4, adjoint=adjoint)
    assert dict(torch_module._global_forward_pre_hooks) == before


def _table_flow():
    """ε = table[label]·x_t: a lookup table whose number of rows equals the calibration batch by accident."""
    from test_calibration_rows import _conditional

    def model(x, t, labels, table):
        return x * table[labels].to(x.dtype).reshape(-1, *[1] * (x.ndim - 1))

    return flowdiff.ProbabilityFlow(model, _conditional().schedule)


_FITS = {
    "tune": lambda flow, noise, images, kw: flowdiff.tune(flow, noise, solver="unipc", nfe=4, max_evals=4,
                                                          model_kwargs=kw),
    "learn_solver": lambda flow, noise, images, kw: flowdiff.learn_solver(
        flow, noise, solver="unipc", nfe=4, learn="shifts", iterations=1, model_kwargs=kw),
    "tune_roundtrip": lambda flow, noise, images, kw: tune_roundtrip(flow, images, solver="euler", nfe=4, max_evals=3,
                                                                      model_kwargs=kw),
    "learn_encoder": lambda flow, noise, images, kw: flowdiff.learn_encoder(flow, images, nfe=4, iterations=1,
                                                                            model_kwargs=kw),
}


@pytest.mark.parametrize("fit", sorted(_FITS))
@pytest.mark.parametrize("labels", [[5, 4, 3, 2, 1, 0], [0, 1, 2, 0, 1, 2]], ids=["crash", "silent"])
def test_calibration_names_a_table_cut_as_if_it_were_per_sample(fit, labels):
    """main cut the table to each half's rows: an unnamed IndexError, or (labels < 3) the wrong table, silently."""
    from test_calibration_rows import BATCH, _images, _noise
    kw = {"labels": torch.tensor(labels), "table": torch.linspace(0.2, 0.4, BATCH)}
    flow = _table_flow()
    flowdiff.generate(flow, _noise(), solver="unipc", steps=4, model_kwargs=kw)  # the plain solve takes it
    with pytest.raises(ValueError, match=r"model_kwargs .*table: \(6,\).*leading size 6"):
        _FITS[fit](flow, _noise(), _images(), kw)


class _Paced(_Counter):
    """The counter, calling ``pace()`` after each increment (to order two threads' calls)."""

    pace = None

    def forward(self, x, t):
        self.calls += 1
        if self.pace is not None:
            self.pace()
        return self.lin(x) * (1 + 0.1 * self.calls)


def test_a_solve_in_a_thread_started_meanwhile_keeps_its_own_buffers():
    """Thread A differentiates a counter model with adjoint='checkpoint'; thread B, started after A's solve began,
    solves its own copy. main watched B's module from A (B was not running when A began) and put back B's buffers
    with A's steps: B's call made during A's backward saw A's step 0 value of B's counter, and B's result was wrong."""
    import threading

    base = _Paced().eval()
    reference_net = copy.deepcopy(base)
    reference = flowdiff.generate(flowdiff.ProbabilityFlow(reference_net, flowdiff.Schedule.linear()), _START.clone(),
                                  solver="heun", steps=4)
    nfe = reference.stats.nfe
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    a_began, b_called, b_go, b_stepped = (threading.Event() for _ in range(4))
    timeout = 30

    made = {"a": 0, "b": 0}  # the calls each thread made (the buffer goes back and forth in a backward pass)

    def pace_a():
        made["a"] += 1
        if made["a"] == 1:  # A's solve (and its watch) has begun: start B, and wait for its first call
            a_began.set()
            assert b_called.wait(timeout)
        if made["a"] == 2 * nfe:  # the last recomputation of A's backward pass: let B make its next call
            b_go.set()
            assert b_stepped.wait(timeout)

    def pace_b():
        made["b"] += 1
        if made["b"] == 1:
            b_called.set()
            assert b_go.wait(timeout)
        if made["b"] == 2:
            b_stepped.set()

    a.pace, b.pace = pace_a, pace_b
    out = {}

    def run_a():
        x = _START.clone().requires_grad_()
        res = flowdiff.generate(flowdiff.ProbabilityFlow(a, flowdiff.Schedule.linear()), x, solver="heun", steps=4,
                                adjoint="checkpoint")
        out["a"] = torch.autograd.grad(res.x.pow(2).sum(), [x])

    def run_b():
        with torch.no_grad():
            out["b"] = flowdiff.generate(flowdiff.ProbabilityFlow(b, flowdiff.Schedule.linear()), _START.clone(),
                                         solver="heun", steps=4).x

    thread_a = threading.Thread(target=run_a)
    thread_a.start()
    assert a_began.wait(timeout)
    thread_b = threading.Thread(target=run_b)
    thread_b.start()
    thread_a.join(timeout)
    thread_b.join(timeout)
    assert made["a"] == 2 * nfe and made["b"] == nfe  # the order the test meant
    assert torch.equal(out["b"], reference.x)
    assert float(b.calls) == float(reference_net.calls) == nfe
