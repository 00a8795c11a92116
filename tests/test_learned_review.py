"""Review of the learned output scales and x_T directions (solvers.Scaled): the recorded initial state belongs to
one solve (never another's: carried states, threads, the checkpoint adjoint), the direction term in low precision,
and the fit's held-out decisions."""

import threading

import pytest
import torch
from _closed_form import mixture, noise

import flowdiff
import solvers
from flowdiff.tools.learned import LearnedSolver, learn_solver
from solvers._base import _perpendicular


def _field(t, y):
    return -y * (1.0 + t) + 0.3 * torch.roll(y, 1, dims=-1)


_TS = [0.0, 0.3, 0.6, 1.0]
_STEPS = list(zip(_TS[:-1], _TS[1:]))


def _directed(name="euler"):
    return solvers.Scaled(solvers.get(name), {s: 0.1 for s in _STEPS}, directions={s: 0.4 for s in _STEPS})


def _solve(y0, solver, **kwargs):
    return solvers.integrate(_field, y0, solver, solvers.FixedGrid(_TS), **kwargs).y


def _starts(n=2):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, 8, dtype=torch.float64, generator=g) for _ in range(2)]


def test_one_directed_solver_solves_in_a_row_as_fresh_ones_do():
    y1, y2 = _starts()
    shared = _directed("ipndm")
    assert torch.equal(_solve(y1, shared), _solve(y1, _directed("ipndm")))
    assert torch.equal(_solve(y2, shared), _solve(y2, _directed("ipndm")))


def test_a_solve_that_skips_init_is_refused_not_given_the_previous_solves_start():
    """A solve continued from a carried state skips init: the start recorded by an earlier solve (here of other
    noise) is not this solve's, so the directed step refuses it (it silently used the other solve's y0)."""
    y1, y2 = _starts()
    directed = _directed("ipndm")
    head = solvers.integrate(_field, y2, directed, solvers.FixedGrid(_TS[:3]))
    assert head.state is not None  # a multistep state: the continued loop does not call init
    _solve(y1, directed)
    with pytest.raises(ValueError, match="no initial state recorded for this solve"):
        solvers.integrate(_field, head.y, directed, solvers.FixedGrid(_TS[2:]), state=head.state)


def test_two_threads_sharing_one_directed_solver_each_use_their_own_start():
    y1, y2 = _starts()
    shared, first_started, later_started, out = _directed(), threading.Event(), threading.Event(), {}

    def slow(t, y):  # the first solve's steps wait until the second solve has recorded its start
        first_started.set()
        later_started.wait(10)
        return _field(t, y)

    def first():
        out["first"] = solvers.integrate(slow, y1, shared, solvers.FixedGrid(_TS)).y

    def second():
        out["second"] = _solve(y2, shared)
        later_started.set()

    a = threading.Thread(target=first)
    a.start()
    first_started.wait(10)
    second()
    a.join()
    assert torch.equal(out["first"], _solve(y1, _directed()))
    assert torch.equal(out["second"], _solve(y2, _directed()))


def test_a_shifted_directed_solver_still_finds_its_solves_start():
    y1, _ = _starts()
    shifted = solvers.Shifted(_directed(), {s: 0.0 for s in _STEPS})
    assert torch.equal(_solve(y1, shifted), _solve(y1, _directed()))
    assert shifted.uses_initial_state and _directed().uses_initial_state
    assert not solvers.Scaled(solvers.get("euler"), {s: 0.1 for s in _STEPS}).uses_initial_state
    assert not solvers.get("euler").uses_initial_state


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_direction_term_in_half_precision_is_finite_and_close_to_float64(dtype):
    """|d|² over a latent of 16384 values of size 3 is 147456, past float16's 65504: the norms overflowed to inf and
    the term to NaN."""
    g = torch.Generator().manual_seed(2)
    z = torch.randn(2, 4, 64, 64, generator=g)
    d = 3.0 + 0.1 * torch.randn(2, 4, 64, 64, generator=g)
    exact = _perpendicular(z.double(), d.double())
    low = _perpendicular(z.to(dtype), d.to(dtype))
    assert low.dtype == dtype and bool(low.isfinite().all())
    assert float((low.double() - exact).norm() / exact.norm()) < 2e-2


def test_the_direction_term_of_a_huge_start_is_that_of_the_start_scaled_down():
    """Only the direction of the start matters: x_T of size 1e25 overflowed |x_T|² in float32."""
    g = torch.Generator().manual_seed(3)
    z, d = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    huge = _perpendicular(z * 1e25, d)
    assert bool(huge.isfinite().all())
    torch.testing.assert_close(huge, _perpendicular(z, d))


def _forced(flow):
    learned = learn_solver(flow, noise(1, n=8), solver="unipc", nfe=4, learn=("scales", "directions"), iterations=1)
    return LearnedSolver(**{**learned.__dict__, "kept": True, "scales": tuple(0.1 for _ in learned.scales),
                            "directions": tuple(0.3 for _ in learned.directions)})


def test_the_checkpoint_adjoint_refuses_a_directed_solver_whose_start_it_cannot_differentiate():
    """The checkpoint adjoint recomputes each step apart from its solve: x_T entered every step as a constant, and
    the noise's gradient missed its path through x_T (0.5–0.9 % off autograd's in the entries checked)."""
    flow = mixture()
    learned = _forced(flow)
    x = noise(2, n=3).requires_grad_(True)
    flowdiff.generate(flow, x, solver=learned.as_solver(), grid=learned.sigmas).x.pow(2).sum().backward()
    assert x.grad is not None and bool(x.grad.isfinite().all())
    with pytest.raises(ValueError, match="adjoint='checkpoint'.*initial state"):
        flowdiff.generate(flow, noise(2, n=3).requires_grad_(True), solver=learned.as_solver(), grid=learned.sigmas,
                          adjoint="checkpoint")
    plain = LearnedSolver(**{**learned.__dict__, "directions": tuple(0.0 for _ in learned.directions)})
    y = noise(2, n=3).requires_grad_(True)
    flowdiff.generate(flow, y, solver=plain.as_solver(), grid=plain.sigmas, adjoint="checkpoint").x.sum().backward()
    assert y.grad is not None


@pytest.mark.parametrize("kind", ["directions", "scales"])
def test_a_file_whose_per_step_list_does_not_match_its_grid_or_learn_is_refused(tmp_path, kind):
    """A format-4 file with a directions (or scales) list one short loaded and silently dropped the last step's
    weight (zip); one for a kind not in ``learn`` loaded and was ignored."""
    import json

    flow = mixture()
    learned = _forced(flow)
    data = json.loads(learned.save(tmp_path / "good.json").read_text())
    LearnedSolver.load(tmp_path / "good.json", flow)
    (tmp_path / "short.json").write_text(json.dumps({**data, kind: data[kind][:-1]}))
    with pytest.raises(ValueError, match=f"{kind} must hold one value per step of sigmas .*{len(learned.sigmas) - 1}"):
        LearnedSolver.load(tmp_path / "short.json", flow)
    other = [n for n in data["learn"] if n != kind]
    (tmp_path / "unlearned.json").write_text(json.dumps({**data, "learn": other}))
    with pytest.raises(ValueError, match=f"{kind} must be empty unless learn names {kind!r}"):
        LearnedSolver.load(tmp_path / "unlearned.json", flow)


def test_the_recorded_start_does_not_outlive_its_solve():
    """The solver object held the last solve's y0 (and, under autograd, its graph) until the next solve."""
    import gc
    import weakref

    directed = _directed()
    y1, _ = _starts()
    gone = weakref.ref(y1)
    _solve(y1, directed)
    del y1
    gc.collect()
    assert gone() is None


def test_a_learned_directed_solver_treats_each_sample_alone():
    """Weights shared across samples, û per sample: a batch gives each row what a batch of one gives it."""
    flow = mixture()
    learned = _forced(flow)
    xs = noise(3, n=4)
    together = flowdiff.generate(flow, xs, solver=learned.as_solver(), grid=learned.sigmas).x
    alone = torch.cat([flowdiff.generate(flow, xs[i:i + 1], solver=learned.as_solver(), grid=learned.sigmas).x
                       for i in range(len(xs))])
    torch.testing.assert_close(together, alone, rtol=1e-12, atol=1e-12)


def test_the_direction_term_has_the_gradient_finite_differences_give():
    """Under autograd (gradients through the sampler), in the start and in d: scaling the start for its norms must
    not cut its gradient."""
    g = torch.Generator().manual_seed(4)
    z = (3.0 * torch.randn(3, 5, dtype=torch.float64, generator=g)).requires_grad_(True)
    d = torch.randn(3, 5, dtype=torch.float64, generator=g).requires_grad_(True)
    assert torch.autograd.gradcheck(_perpendicular, (z, d))


def test_a_learned_solver_built_with_a_short_directions_list_is_refused_when_used():
    flow = mixture()
    learned = _forced(flow)
    short = LearnedSolver(**{**learned.__dict__, "directions": learned.directions[:-1]})
    with pytest.raises(ValueError, match="directions must hold one value per step of sigmas"):
        short.as_solver()


@pytest.mark.parametrize("kind", ["scales", "directions"])
@pytest.mark.parametrize("excess", [0.25, -0.25, float("nan"), float("inf")])
def test_a_file_whose_scale_or_direction_exceeds_its_bound_is_refused_naming_it(tmp_path, kind, excess):
    """A hand-edited file with a scale of 0.75 (or a NaN direction) loaded silently and solved with it: the fit never
    leaves ±SCALE_BOUND / ±DIRECTION_BOUND, so such a value is no learned solver. At the bound itself it loads."""
    import json
    import math
    import re

    from flowdiff.tools.learned import DIRECTION_BOUND, SCALE_BOUND

    flow = mixture()
    learned = _forced(flow)
    bound = SCALE_BOUND if kind == "scales" else DIRECTION_BOUND
    bad = math.copysign(bound, excess) + excess if math.isfinite(excess) else excess
    data = json.loads(learned.save(tmp_path / "good.json").read_text())
    edge = [float(-bound).hex()] + data[kind][1:]
    (tmp_path / "edge.json").write_text(json.dumps({**data, kind: edge}))
    assert LearnedSolver.load(tmp_path / "edge.json", flow).as_solver() is not None
    (tmp_path / "edited.json").write_text(json.dumps({**data, kind: [data[kind][0], bad.hex(), *data[kind][2:]]}))
    expected = re.escape(f"{tmp_path / 'edited.json'}") + f".*{kind}\\[1\\] = {re.escape(repr(bad))} .*{bound}"
    with pytest.raises(ValueError, match=expected):
        LearnedSolver.load(tmp_path / "edited.json", flow)
    # built in memory, or a loaded solver edited afterwards: refused where it would be used
    values = list(getattr(learned, kind))
    values[1] = bad
    edited = LearnedSolver(**{**learned.__dict__, kind: tuple(values)})
    with pytest.raises(ValueError, match=f"{kind}\\[1\\] = {re.escape(repr(bad))} .*{bound}"):
        edited.as_solver()
    with pytest.raises(ValueError, match=f"{kind}\\[1\\] = {re.escape(repr(bad))}"):
        edited.validated(flow, noise(5, n=2))
    loaded = LearnedSolver(**{**LearnedSolver.load(tmp_path / "good.json", flow).__dict__, kind: tuple(values)})
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "good.json")) + f": {kind}\\[1\\]"):
        loaded.as_solver()


@pytest.mark.parametrize("kind", ["shifts", "coefficients"])
def test_a_learned_solver_with_a_non_finite_shift_or_coefficient_is_refused(kind):
    flow = mixture()
    learned = _forced(flow)
    steps = len(learned.sigmas) - 1
    values = (0.0, float("nan"), *([0.0] * (steps - 2))) if kind == "shifts" else \
        ((), (0.0, float("-inf")), *([()] * (steps - 2)))
    edited = LearnedSolver(**{**learned.__dict__, kind: values, "learn": (kind, "scales", "directions")})
    where = "shifts\\[1\\] = nan" if kind == "shifts" else "coefficients\\[1\\]\\[1\\] = -inf"
    with pytest.raises(ValueError, match=f"{where} is not finite"):
        edited.as_solver()
