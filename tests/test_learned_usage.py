"""Learned solvers where users meet them: a grid they were not fitted on is refused before the solve (in σ, naming
grid= and the grid they need), and flowdiff.compare puts them in the same table as the named solvers.

Each test failed before its fix: a learned solver on another budget or grid failed inside step 0 with "has no shift
for the step 2.0 -> 1.0" in the solver's own time; compare refused it ("solvers must be names (str), got
LearnedSolver") and an explicit σ grid ("grids must be names (str), got float64")."""

import pytest
import torch
from _closed_form import mixture, noise

import flowdiff
import solvers
from flowdiff.engine.fingerprint import flow_fingerprint
from flowdiff.engine.grids import make_sigmas
from flowdiff.tools.learned import LearnedSolver

STEPS = 6


class _Counted:
    """A mixture's σ-field that records every evaluation's σ, fingerprinted by the mixture's own tensors (a learned
    solver belongs to a fingerprinted flow)."""

    def __init__(self, flow):
        mixture_model = flow.sigma_field.__self__
        self.centers, self.bandwidth = mixture_model.centers, mixture_model.bandwidth
        self.inner, self.calls = flow.sigma_field, []

    def field(self, xbar, sigma, **kwargs):
        self.calls.append(sigma)
        return self.inner(xbar, sigma, **kwargs)


def counting(flow):
    """``flow`` with its model evaluations recorded: ``(counted_flow, calls)``."""
    counter = _Counted(flow)
    return flowdiff.ProbabilityFlow.from_sigma_field(counter.field, flow.schedule), counter.calls


def _learned(flow, kind, nfe=STEPS, solver=None, grid="logsnr"):
    """A LearnedSolver as learn_solver returns one (kept, fitted on ``flow``), with small values of ``kind`` on every
    step of a ``grid`` of STEPS steps: the refusals and the table do not depend on the values a fit finds."""
    sigmas = make_sigmas(flow.schedule, grid, STEPS)
    values = {"shifts": {"shifts": tuple(0.05 * (-1) ** i for i in range(STEPS))},
              "scales": {"scales": tuple(0.02 * (i + 1) for i in range(STEPS))},
              "coefficients": {"coefficients": tuple(() for _ in range(STEPS))}}[kind]
    base = solver or ("dpmpp_2m" if kind == "coefficients" else "unipc")
    return LearnedSolver(solver=base, solver_options={}, nfe=nfe, sigmas=sigmas, fingerprint=flow_fingerprint(flow),
                         kept=True, learn=(kind,), **{"coefficients": (), **values})


def _shown(sigmas):
    return "[" + ", ".join(f"{float(s):.6g}" for s in sigmas) + "]"


# -- another budget or grid, refused before the solve ------------------------------------------------------------

@pytest.mark.parametrize("kind", ["shifts", "scales", "coefficients"])
def test_a_learned_solver_on_another_budget_is_refused_before_any_model_evaluation(kind):
    flow, calls = counting(mixture())
    learned = _learned(flow, kind)
    with pytest.raises(ValueError) as err:
        flowdiff.generate(flow, noise(1, n=2), solver=learned.as_solver(), nfe=8)
    message = str(err.value)
    assert not isinstance(err.value, solvers.SolveError) and calls == [], message
    assert message.startswith("grid='trailing', nfe=8 asks for a grid of its own"), message
    assert f"has {kind} only for the steps of the σ grid {_shown(learned.sigmas)}" in message
    assert "Accepted: that grid as grid= (a LearnedSolver's grid=learned.sigmas), without steps=/nfe=" in message


@pytest.mark.parametrize("kind", ["shifts", "scales", "coefficients"])
def test_a_learned_solver_on_another_grid_is_refused_in_sigma_naming_both_grids(kind):
    flow, calls = counting(mixture())
    learned = _learned(flow, kind)
    karras = make_sigmas(flow.schedule, "karras", STEPS)
    one = {"shifts": "shift", "scales": "scale", "coefficients": "coefficients"}[kind]
    with pytest.raises(ValueError) as err:
        flowdiff.generate(flow, noise(1, n=2), solver=learned.as_solver(), grid="karras", steps=STEPS)
    message = str(err.value)
    assert not isinstance(err.value, solvers.SolveError) and calls == [], message
    assert message.startswith(f"grid='karras', steps={STEPS} gives the σ grid {_shown(karras)}: solver "
                              f"'{learned.as_solver().name}' has no {one} for the step σ {float(karras[0]):.6g} -> "
                              f"{float(karras[1]):.6g} (step 0)"), message
    assert f"belong to the σ grid {_shown(learned.sigmas)} (in that order), and to no other step" in message
    assert "grid=learned.sigmas" in message
    # the grid it was fitted on runs, at its budget
    out = flowdiff.generate(flow, noise(1, n=2), solver=learned.as_solver(), grid=learned.sigmas)
    assert out.stats.nfe == len(calls) <= learned.nfe


def test_a_learned_solver_refused_by_encode_says_to_encode_with_its_base():
    flow, calls = counting(mixture())
    learned = _learned(flow, "shifts")
    with pytest.raises(ValueError) as err:
        flowdiff.encode(flow, noise(1, n=2).clamp(-1, 1), solver=learned.as_solver(), grid=learned.sigmas)
    message = str(err.value)
    assert calls == [] and message.startswith("grid=<explicit σ> gives the σ grid [0, "), message
    assert f"belong to the σ grid {_shown(learned.sigmas)} (in that order)" in message
    assert "encode with its base method (LearnedSolver.base())" in message


def test_the_solver_layer_refuses_a_foreign_grid_before_the_first_evaluation():
    """solvers knows no σ: the check is a method of the solver (fitted_steps, lacks), run by the loop before the first
    step; the error carries the step and the fitted grid for a caller to word in its own variables."""
    calls = []

    def f(t, y):
        calls.append(t)
        return -y

    fitted = [2.0, 1.5, 1.0]
    shifted = solvers.Shifted(solvers.get("heun"), {(2.0, 1.5): 0.1, (1.5, 1.0): 0.0})
    scaled = solvers.Scaled(solvers.get("heun"), {(2.0, 1.5): 0.1, (1.5, 1.0): 0.0})
    for method, one in ((shifted, "shift"), (scaled, "scale"), (solvers.Shifted(scaled, {(2.0, 1.5): 0.1}), "shift")):
        with pytest.raises(solvers.GridMismatch) as err:
            solvers.solve(f, torch.ones(2, dtype=torch.float64), [2.0, 1.25, 1.0], method)
        assert calls == [] and (err.value.step, err.value.t0, err.value.t1) == (0, 2.0, 1.25)
        assert err.value.what[0] == one and err.value.grid == [2.0, 1.25, 1.0]
        assert f"has no {one} for the step 2.0 -> 1.25" in str(err.value)
    assert err.value.fitted == [2.0, 1.5] and err.value.chained  # the outer Shifted fits one step only
    assert shifted.fitted_steps() == {(2.0, 1.5), (1.5, 1.0)} and solvers.get("heun").fitted_steps() is None
    assert solvers.solve(f, torch.ones(2, dtype=torch.float64), fitted, shifted).stats.nfe == len(calls) > 0


# -- compare -----------------------------------------------------------------------------------------------------

def test_compare_puts_a_learned_solver_in_the_table_with_the_error_of_its_own_generate():
    flow, calls = counting(mixture())
    x = noise(2, n=3)
    ref = flowdiff.reference_solution(flow, x)
    learned = _learned(flow, "shifts")
    del calls[:]
    result = flowdiff.compare(flow, x, solvers=["euler", learned], grids="logsnr", nfe=[4, STEPS], reference=ref)
    counted = len(calls)
    direct = flowdiff.generate(flow, x, solver=learned.as_solver(), grid=learned.sigmas)
    (row,) = [r for r in result.runs if r.solver == "learned(unipc)"]
    assert (row.grid, row.budget, row.steps) == ("fitted", STEPS, STEPS)
    assert row.rms_error == float((direct.x - ref.x).pow(2).mean().sqrt())
    assert row.max_error == float((direct.x - ref.x).abs().max())
    assert row.nfe == direct.stats.nfe == len(calls) - counted
    euler = [r.nfe for r in result.runs if r.solver == "euler"]
    assert counted == sum(euler) + row.nfe  # every model call of compare is one of a row's
    assert [(s.solver, s.grid, s.budget) for s in result.skipped] == [("learned(unipc)", "fitted", 4)]
    assert "| learned(unipc) | fitted | — |" in result.to_markdown()
    alone = flowdiff.compare(flow, x, solvers=learned, nfe=STEPS, reference=ref)  # a learned solver on its own
    assert [(r.solver, r.grid, r.nfe, r.rms_error) for r in alone.runs] == [(row.solver, row.grid, row.nfe,
                                                                               row.rms_error)]
    # the learned values act: the base method on the same grid is another row's number
    base = flowdiff.generate(flow, x, solver=learned.base(), grid=learned.sigmas).x
    assert not torch.equal(base, direct.x)


def test_a_learned_solver_the_held_out_half_rejected_is_labelled_so_in_compare():
    """A not-kept fit is the base method on its starting grid: its row says so (it read ``learned(unipc)``, the same
    label as a kept fit, with the base's error), and a kept and a rejected fit of one base are two rows."""
    from dataclasses import replace

    flow = mixture()
    x = noise(2, n=2)
    ref = flowdiff.reference_solution(flow, x)
    kept = _learned(flow, "shifts")
    rejected = replace(kept, kept=False, shifts=(0.0,) * STEPS)
    result = flowdiff.compare(flow, x, solvers=[kept, rejected], grids="logsnr", nfe=STEPS, reference=ref)
    rows = {r.solver: r for r in result.runs}
    assert set(rows) == {"learned(unipc)", "learned(unipc, not kept)"}
    base = flowdiff.generate(flow, x, solver="unipc", grid=kept.sigmas).x
    assert rows["learned(unipc, not kept)"].rms_error == float((base - ref.x).pow(2).mean().sqrt())


def test_compare_refuses_a_learned_solver_of_another_flow_or_budget_by_name():
    flow = mixture()
    x = noise(2, n=2)
    learned = _learned(flow, "shifts")
    other = _learned(mixture(seed=4), "shifts")
    with pytest.raises(ValueError, match=r"solvers\[1\] \(learned\(unipc\), fitted at nfe=6\): this learned solver "
                                         r"was fitted on the flow with fingerprint"):
        flowdiff.compare(flow, x, solvers=["euler", other], grids="logsnr", nfe=STEPS)
    with pytest.raises(ValueError, match=r"solvers\[0\] \(learned\(unipc\)\) was fitted at nfe=6 and runs only there, "
                                         r"on its own grid \(learned.sigmas\); the budgets compared are nfe=\[4, 8\]: "
                                         r"add 6 to nfe="):
        flowdiff.compare(flow, x, solvers=[learned, "euler"], grids="logsnr", nfe=[4, 8])
    with pytest.raises(ValueError, match=r"solvers\[0\] and solvers\[1\] are both learned\(unipc\) at nfe=6"):
        flowdiff.compare(flow, x, solvers=[learned, _learned(flow, "scales")], grids="logsnr", nfe=STEPS)
    with pytest.raises(TypeError, match=r"must be encoder names \(str\), got a LearnedSolver \(unipc\)"):
        flowdiff.compare(flow, task="roundtrip", images=x.clamp(-1, 1), solvers=learned, grids="logsnr", nfe=4)


@pytest.mark.parametrize("grids", [lambda s: s, lambda s: [s], lambda s: list(map(float, s)),
                                   lambda s: torch.as_tensor(s)])
def test_compare_refuses_an_explicit_sigma_grid_saying_how_to_measure_it(grids):
    flow = mixture()
    sigmas = make_sigmas(flow.schedule, "logsnr", 4)
    with pytest.raises(TypeError) as err:
        flowdiff.compare(flow, noise(2, n=2), solvers="euler", grids=grids(sigmas), nfe=4)
    message = str(err.value)
    assert message.startswith("grids must be grid names (trailing, ") and "got an explicit σ grid (a " in message
    assert f"of {len(sigmas)} values)" in message and "tuned" in message
    assert "flowdiff.generate(flow, noise, solver=..., grid=sigmas) against the comparison's reference" in message

