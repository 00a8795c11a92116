"""The trajectory kind of learned solver (``learn="trajectory"``): weights along the previous steps' directions,
PAS's trajectory basis (``solvers.Scaled(trajectory=...)``). Zero weights are the base bit for bit, bounded weights
keep the solve consistent, the held-out half decides, files round-trip, the cost is counted exactly."""

import json
import math

import numpy as np
import pytest
import torch
from _closed_form import mixture, noise

import flowdiff
import solvers
from flowdiff.tools import learned as learned_module
from flowdiff.tools.learned import LearnedSolver, _learn_both, learn_solver


def _field(t, y):
    """A smooth nonlinear field in 4 dimensions whose direction turns along the solve."""
    return torch.stack([-2.0 * y[:, 1] + 0.1 * t, 1.5 * y[:, 0] - 0.3 * y[:, 2], 0.7 * y[:, 2] - y[:, 0],
                        torch.sin(y[:, 3]) + 0.5 * y[:, 1]], dim=1)


Y0 = torch.tensor([[1.0, -0.5, 0.25, 0.4], [0.3, 0.8, -1.1, -0.2]], dtype=torch.float64)


def _anchor(t, y):
    return 0.5 * y


def _euler_by_hand(ts, scales, weights):
    """Euler on ``_field`` about ``_anchor``: each step along a + (1 + s)·d + Σ_j c_j·|d|·r_j, r_j the unit vector of
    the direction j steps back less its projections on d, y_T and the nearer previous directions (per sample)."""
    rows = []
    for z, y in zip(Y0, Y0):
        past = []
        for (t0, t1), s, cs in zip(zip(ts[:-1], ts[1:]), scales, weights):
            a = _anchor(t0, y.unsqueeze(0))[0]
            d = _field(t0, y.unsqueeze(0))[0] - a
            basis = []
            for v in (d, z):
                for q in basis:
                    v = v - (v @ q) * q
                basis.append(v / v.norm())
            term = torch.zeros_like(d)
            for c, p in zip(cs, past):
                r = p / p.norm()
                for q in basis:
                    r = r - (r @ q) * q
                term = term + c * d.norm() * r
                basis.append(r / r.norm())
            y = y + (t1 - t0) * (a + (1 + s) * d + term)
            past = [d, *past]
        rows.append(y)
    return torch.stack(rows)


def test_a_trajectory_step_is_the_hand_computed_gram_schmidt_step_and_zero_weights_are_the_base_bit_for_bit():
    ts = [0.2, 0.3, 0.5, 0.9, 1.2]
    steps = list(zip(ts[:-1], ts[1:]))
    scales, weights = [0.1, -0.2, 0.0, 0.05], [(0.0, 0.0), (0.7, 0.0), (-0.4, 0.9), (0.3, -0.6)]
    method = solvers.Scaled(solvers.get("euler"), dict(zip(steps, scales)), anchor=_anchor,
                            trajectory=dict(zip(steps, weights)))
    assert method.uses_initial_state and method.depth == 2
    got = solvers.solve(_field, Y0, ts, method)
    torch.testing.assert_close(got.y, _euler_by_hand(ts, scales, weights), rtol=1e-12, atol=1e-12)
    assert got.stats.nfe == 4
    # solves in a row each start their own record of directions: the same solve twice is the same
    assert torch.equal(solvers.solve(_field, Y0, ts, method).y, got.y)
    for name in ("euler", "heun", "unipc", "ipndm", "dpmpp_3m"):
        plain = solvers.get(name)
        zero = solvers.Scaled(plain, {s: 0.0 for s in steps}, anchor=_anchor, trajectory={s: (0.0, 0.0) for s in steps})
        assert not zero.uses_initial_state
        assert torch.equal(solvers.solve(_field, Y0, ts, zero).y, solvers.solve(_field, Y0, ts, plain).y)
        # weights on one step only: every other step is the scaled method's bit for bit (the first three here)
        one = solvers.Scaled(plain, dict(zip(steps, scales)), anchor=_anchor,
                             trajectory={**{s: (0.0,) for s in steps}, steps[-1]: (0.5,)})
        alone = solvers.Scaled(plain, dict(zip(steps, scales)), anchor=_anchor)
        assert torch.equal(solvers.solve(_field, Y0, ts[:-1], one).y, solvers.solve(_field, Y0, ts[:-1], alone).y)
        assert not torch.equal(solvers.solve(_field, Y0, ts, one).y, solvers.solve(_field, Y0, ts, alone).y)


@pytest.mark.parametrize("name", ["euler", "heun", "unipc"])
def test_trajectory_weights_at_the_bound_keep_the_solve_consistent_where_an_x_T_direction_does_not(name):
    """|r_j| is the sine of the angle the direction turned by: O(h), so bounded weights change the field by O(h) and
    the solve converges at first order (Euler's own order kept); the x_T direction changes it by O(1) and does not."""
    span = (0.2, 1.0)

    def solved(n, **terms):
        ts = np.linspace(*span, n + 1).tolist()
        steps = list(zip(ts[:-1], ts[1:]))
        kind = {k: {s: v for s in steps} for k, v in terms.items()}
        method = solvers.Scaled(solvers.get(name), {s: 0.0 for s in steps}, anchor=_anchor, **kind)
        return solvers.solve(_field, Y0, ts, method).y

    exact = solvers.solve(_field, Y0, np.linspace(*span, 4097).tolist(), solvers.get("heun")).y
    ns = (32, 64, 128, 256)
    bound = learned_module.TRAJECTORY_BOUND
    errors = [float((solved(n, trajectory=(bound, -bound)) - exact).abs().max()) for n in ns]
    slopes = np.diff(np.log(errors)) / np.diff(np.log(1.0 / np.array(ns)))
    assert errors[-1] < 1e-2 and np.all(slopes > 0.9), (errors, slopes)
    if name == "euler":
        assert np.all(np.abs(slopes - 1.0) < 0.15)
    directed = [float((solved(n, directions=0.5) - exact).abs().max()) for n in ns]
    assert directed[-1] > 0.5 * directed[0]  # the O(1) term: no convergence


def test_a_trajectory_solver_refuses_what_it_cannot_take():
    euler = solvers.get("euler")
    with pytest.raises(TypeError, match="trajectory must be None or a dict of step"):
        solvers.Scaled(euler, {(0.0, 1.0): 0.0}, trajectory=[0.1])
    with pytest.raises(ValueError, match=r"the trajectory weights of the step \(0.0, 1.0\) must be a tuple of finite "
                                         r"numbers .* got \(0.1, nan\)"):
        solvers.Scaled(euler, {(0.0, 1.0): 0.0}, trajectory={(0.0, 1.0): (0.1, math.nan)})
    with pytest.raises(ValueError, match=r"must be a tuple of finite numbers .* got 0.5"):
        solvers.Scaled(euler, {(0.0, 1.0): 0.0}, trajectory={(0.0, 1.0): 0.5})
    with pytest.raises(ValueError, match=r"trajectory has weights for steps without a scale \[\(1.0, 2.0\)\]"):
        solvers.Scaled(euler, {(0.0, 1.0): 0.0}, trajectory={(1.0, 2.0): (0.1,)})
    fresh = solvers.Scaled(euler, {(0.0, 1.0): 0.0}, trajectory={(0.0, 1.0): (0.1,)})
    with pytest.raises(ValueError, match="has trajectory weights for the step 0.0 -> 1.0 but no initial state"):
        fresh.step(_field, 0.0, 1.0, Y0, None)


def test_learned_trajectory_weights_are_fitted_within_their_bound_and_kept_only_where_the_held_out_half_agrees():
    """Alone (``learn="trajectory"``) on the closed-form mixture: fitted on the even half, kept because the odd half
    prefers it, refitted on all; one weight per previous direction a step has (none at the first step, one at the
    second); a step the formulation gives its own method (UniPC's last, into σ = 0) takes none."""
    flow = mixture()
    cal = noise(1, n=32)
    half, refit = _learn_both(flow, cal, solver="unipc", nfe=5, learn="trajectory")
    assert half.kept and refit is not None and refit.learn == ("trajectory",)
    depth = learned_module.TRAJECTORY_DEPTH
    assert len(refit.trajectory) == len(refit.sigmas) - 1 and all(len(c) == depth for c in refit.trajectory)
    assert set(refit.trajectory[0]) == {0.0} and all(c == 0.0 for c in refit.trajectory[1][1:])
    assert set(refit.trajectory[-1]) == {0.0} and any(c for cs in refit.trajectory for c in cs)
    assert all(abs(c) <= learned_module.TRAJECTORY_BOUND for cs in refit.trajectory for c in cs)
    assert half.validation_error < half.base_validation_error
    ref = flowdiff.reference_solution(flow, cal, sigma_end=0.0, rtol=1e-7, atol=1e-7).x
    held = flowdiff.generate(flow, cal[1::2], solver=half.as_solver(), grid=half.sigmas).x
    assert float((held - ref[1::2]).pow(2).mean().sqrt()) == pytest.approx(half.validation_error, rel=1e-9)
    # on noise the fit never saw it beats the base method, at the base's NFE
    other = noise(7, n=32)
    ref = flowdiff.reference_solution(flow, other, sigma_end=0.0, rtol=1e-9, atol=1e-9).x
    out = flowdiff.generate(flow, other, solver=refit.as_solver(), grid=refit.sigmas)
    base = flowdiff.generate(flow, other, solver=refit.base(), grid=refit.sigmas)
    assert (out.x - ref).pow(2).mean() < (base.x - ref).pow(2).mean()
    assert out.stats.nfe == base.stats.nfe <= 5
    # forced to the bound everywhere, the held-out noise rejects it and the base method is left
    bound = learned_module.TRAJECTORY_BOUND
    bad = LearnedSolver(**{**refit.__dict__, "trajectory": tuple((bound,) * depth for _ in refit.trajectory)})
    judged = bad.validated(flow, noise(2, n=8))
    assert not judged.kept and {c for cs in judged.trajectory for c in cs} == {0.0}
    assert judged.as_solver().name == "unipc"


def test_with_the_default_the_held_out_half_chooses_among_the_variants_and_the_refit_keeps_its_choice():
    """Fitted after the scales and directions (then all three together); the held-out half keeps the trajectory
    weights only if they lower its error below the default's choice, and the refit fits none where it did not."""
    flow = mixture()
    cal = noise(1, n=16)
    kinds = ("shifts", "grid", "start", "scales", "directions")
    default_half, default = _learn_both(flow, cal, solver="unipc", nfe=5, learn=kinds, iterations=3)
    half, refit = _learn_both(flow, cal, solver="unipc", nfe=5, learn=(*kinds, "trajectory"), iterations=3)
    assert half.validation_error <= default_half.validation_error
    took = any(c for cs in half.trajectory for c in cs)
    assert took == (half.validation_error < default_half.validation_error)
    # the variants it judged, each [fitted half, held-out half]: the same fits as the default's up to the directions,
    # the trajectory fitted on top no worse on the fitted half, and the held-out half took the best of them
    variants = half.options["variants"]
    assert list(variants) == ["others", "scales", "directions", "trajectory"]
    assert {k: variants[k] for k in ("others", "scales", "directions")} == default_half.options["variants"]
    assert variants["trajectory"][0] <= variants["directions"][0]
    assert half.validation_error == min(held for _, held in variants.values())
    assert took == (variants["trajectory"][1] < min(held for k, (_, held) in variants.items() if k != "trajectory"))
    assert refit.options["variants"] == variants
    if not took:
        assert {c for cs in refit.trajectory for c in cs} == {0.0}
        assert refit.scales == default.scales and refit.directions == default.directions
    else:
        assert any(c for cs in refit.trajectory for c in cs) and refit.options["fitted_on"] == "all"


def test_fitting_nfe_counts_every_trajectory_candidate_exactly():
    from test_learned import _counted, _teacher

    flow = mixture()
    cal = noise(1, n=16)
    counted, calls = _counted(flow)
    _teacher(counted, cal)
    learned = learn_solver(counted, cal, solver="unipc", nfe=5, learn=("shifts", "trajectory"), iterations=2)
    assert learned.kept
    assert learned.fitting_nfe - learned.reference_nfe == len(calls)
    without, _ = _learn_both(flow, cal, solver="unipc", nfe=5, learn="shifts", iterations=2)
    assert learned.solves > without.solves


def test_trajectory_weights_save_load_bit_for_bit_and_format_4_files_still_load(tmp_path):
    flow = mixture()
    cal = noise(1, n=8)
    learned = learn_solver(flow, cal, solver="ipndm", nfe=5, iterations=2, learn=("scales", "trajectory"))
    forced = LearnedSolver(**{**learned.__dict__, "kept": True,
                              "trajectory": tuple((0.1 * i, -0.05 * i) for i in range(len(learned.trajectory)))})
    path = forced.save(tmp_path / "trajectory.learned.json")
    assert json.loads(path.read_text())["format"] == "flowdiff.LearnedSolver/5"
    back = LearnedSolver.load(path, flow)
    assert back.trajectory == forced.trajectory and back.scales == forced.scales and back.learn == forced.learn
    x = flowdiff.generate(flow, cal, solver=forced.as_solver(), grid=forced.sigmas).x
    assert torch.equal(x, flowdiff.generate(flow, cal, solver=back.as_solver(), grid=back.sigmas).x)
    scales_only = LearnedSolver(**{**forced.__dict__, "trajectory": (), "learn": ("scales",)})
    assert not torch.equal(x, flowdiff.generate(flow, cal, solver=scales_only.as_solver(), grid=forced.sigmas).x)
    # a format-4 file (written before the trajectory kind) loads as it was; one that holds trajectory is refused
    data = json.loads(scales_only.save(tmp_path / "scales.json").read_text())
    del data["trajectory"]
    data["format"] = "flowdiff.LearnedSolver/4"
    (tmp_path / "old.json").write_text(json.dumps(data))
    old = LearnedSolver.load(tmp_path / "old.json", flow)
    assert old.trajectory == () and old.scales == forced.scales
    (tmp_path / "bad4.json").write_text(json.dumps({**data, "trajectory": []}))
    with pytest.raises(ValueError, match="malformed learned solver .*LearnedSolver/4.* holds no trajectory"):
        LearnedSolver.load(tmp_path / "bad4.json", flow)
    # a hand-edited weight past the bound is named with the file
    data = json.loads(path.read_text())
    bound = learned_module.TRAJECTORY_BOUND
    data["trajectory"][1][0] = float(2 * bound).hex()
    (tmp_path / "edited.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"edited.json.*trajectory\[1\]\[0\] = {2 * bound} is outside "
                                         rf"\[-{bound}, {bound}\]"):
        LearnedSolver.load(tmp_path / "edited.json", flow)


def test_the_noise_gradient_follows_the_previous_directions_and_the_checkpoint_adjoint_is_refused():
    """Each step reads the directions of the steps before it: autograd's gradient of the noise follows that path
    (checked against a central difference); the checkpoint adjoint, which recomputes each step apart from its solve,
    would miss it and is refused, as for the x_T direction."""
    flow = mixture()
    learned = learn_solver(flow, noise(1, n=8), solver="unipc", nfe=4, learn=("scales", "trajectory"), iterations=1)
    weights = tuple((0.0,) if i == 0 else (0.8,) for i in range(len(learned.sigmas) - 1))
    forced = LearnedSolver(**{**learned.__dict__, "kept": True, "trajectory": weights})
    x = noise(2, n=3)
    direction = noise(5, n=3)

    def loss(z):
        return flowdiff.generate(flow, z, solver=forced.as_solver(), grid=forced.sigmas).x.pow(2).sum()

    z = x.clone().requires_grad_(True)
    loss(z).backward()
    h = 1e-6
    with torch.no_grad():
        numeric = (loss(x + h * direction) - loss(x - h * direction)) / (2 * h)
    assert float((z.grad * direction).sum()) == pytest.approx(float(numeric), rel=1e-5)
    with pytest.raises(ValueError, match="adjoint='checkpoint'.*initial state"):
        flowdiff.generate(flow, x.clone().requires_grad_(True), solver=forced.as_solver(), grid=forced.sigmas,
                          adjoint="checkpoint")
