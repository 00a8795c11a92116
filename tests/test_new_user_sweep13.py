"""New-user sweep 13: ``solvers/`` used as a standalone ODE library, by someone who uses torchdiffeq's ``odeint`` today.

Each test names what such a user saw before the fix. The problems are ODEs with closed-form solutions (a harmonic
oscillator, linear systems), not diffusion; torchdiffeq is the reference where it has the same method.
"""

from __future__ import annotations

import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import solvers
from solvers import ButcherTableau, SolveError

ROOT = Path(__file__).resolve().parents[1]
OSCILLATOR = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)


def oscillator(t: float, y: torch.Tensor) -> torch.Tensor:
    return y @ OSCILLATOR.T


def exact_oscillator(y0: torch.Tensor, t0: float, t1: float) -> torch.Tensor:
    return y0 @ torch.linalg.matrix_exp(OSCILLATOR * (t1 - t0)).T


# -- a custom tableau, and the registry ------------------------------------------------------------------------

# SSPRK3 (Shu & Osher): third order, three stages
SSPRK3 = ButcherTableau(c=(0.0, 1.0, 0.5), a=((1.0,), (0.25, 0.25)), b=(1 / 6, 1 / 6, 2 / 3))


def _slope(method: solvers.Solver, ns=(16, 32)) -> float:
    y0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    errs = [float((solvers.solve(oscillator, y0, torch.linspace(0, 1, n + 1, dtype=torch.float64), method).y
                   - exact_oscillator(y0, 0.0, 1.0)).abs().max()) for n in ns]
    return math.log(errs[0] / errs[1]) / math.log(ns[1] / ns[0])


def test_a_tableau_that_lacks_the_order_it_claims_is_refused():
    """Was: ``ExplicitRK("mine", tableau, 3)`` with a mistyped weight (row sums and Σb = 1 still right) was accepted
    and converged at order 1, silently; the tableau's own check looked only at row sums and Σb."""
    assert _slope(solvers.ExplicitRK("ssprk3", SSPRK3, 3)) == pytest.approx(3, abs=0.15)
    wrong = ButcherTableau(c=(0.0, 1.0, 0.5), a=((1.0,), (0.25, 0.25)), b=(0.5, 0.25, 0.25))
    with pytest.raises(ValueError, match=r"ExplicitRK 'mine'.*do not have order 3.*tree \[τ\] \(order 2\).*1/2"):
        solvers.ExplicitRK("mine", wrong, 3)
    assert _slope(solvers.ExplicitRK("mine", wrong, 1)) == pytest.approx(1, abs=0.15)  # what it really is
    # an embedded pair whose error weights do not give the embedded method its order
    pair = solvers.get("bosh3").tableau
    bad = ButcherTableau(c=pair.c, a=pair.a, b=pair.b, b_error=(0.1, -0.1, 0.0, 0.0))
    with pytest.raises(ValueError, match="embedded weights b - b_error do not have order 2"):
        solvers.ExplicitRK("mine", bad, 3, error_order=2)


@pytest.mark.parametrize("name", [n for n in solvers.available() if isinstance(solvers.get(n), solvers.ExplicitRK)])
def test_every_registered_tableau_has_exactly_its_order(name):
    """The check passes every registered method, and each claims the most it has (not one order less)."""
    method = solvers.get(name)
    method.tableau.check_order(method.order)
    with pytest.raises(ValueError, match=f"do not have order {method.order + 1}"):
        method.tableau.check_order(method.order + 1)
    if method.adaptive:
        method.tableau.check_order(method.error_order, embedded=True)
        with pytest.raises(ValueError):
            method.tableau.check_order(method.error_order + 1, embedded=True)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(c=(0.0, "1"), a=((1.0,),), b=(0.5, 0.5)), TypeError, "entry 1 of c must be a real number, got '1'"),
    (dict(c=(0.0, 1.0), a=((torch.tensor(1.0),),), b=(0.5, 0.5)), TypeError, "entry 0 of row 1 of a"),
    (dict(c=(0.0, 1.0), a=((1.0,),), b=(math.nan, 0.5)), ValueError, "entry 0 of b must be finite"),
    (dict(c=(0.0, 1.0), a=((1.0,),), b="ab"), TypeError, "b must be a tuple of numbers, got str"),
])
def test_tableau_entries_are_numbers(kwargs, error, match):
    """Was: a string entry failed with Python's bare "must be real number, not str"; a tensor entry was stored."""
    with pytest.raises(error, match=match):
        ButcherTableau(**kwargs)


def test_a_tableau_given_as_lists_is_stored_as_tuples_and_hashable():
    tableau = ButcherTableau(c=[0.0, 1.0], a=[[1.0]], b=[0.5, 0.5])
    assert tableau == solvers.get("heun").tableau and hash(tableau) == hash(solvers.get("heun").tableau)


def test_register_refuses_what_cannot_build_a_solver(monkeypatch):
    """Was: ``register("x", 3)`` was accepted and ``get("x")`` failed with "'int' object is not callable"; a factory
    returning something else broke ``get`` ("cannot create weak reference") and ``available(adaptive=True)`` for
    every user ("'int' object has no attribute 'adaptive'")."""
    monkeypatch.setattr(solvers._registry, "_REGISTRY", dict(solvers._registry._REGISTRY))  # registered here only
    with pytest.raises(TypeError, match="factory must be a callable"):
        solvers.register("sweep13_refused", 3)
    with pytest.raises(TypeError, match="factory must be a callable"):
        solvers.register("sweep13_refused", solvers.get("rk4"))  # an instance, not a factory
    solvers.register("sweep13_misnamed", lambda: solvers.ExplicitRK("sweep13_other", SSPRK3, 3))
    with pytest.raises(TypeError, match="registered as 'sweep13_misnamed' built a solver named 'sweep13_other'"):
        solvers.get("sweep13_misnamed")
    with pytest.raises(TypeError, match="registered as 'sweep13_misnamed'"):
        solvers.available(adaptive=True)
    del solvers._registry._REGISTRY["sweep13_misnamed"]
    solvers.register("sweep13_ssprk3", lambda: solvers.ExplicitRK("sweep13_ssprk3", SSPRK3, 3), "SSPRK3")
    assert solvers.get("sweep13_ssprk3").order == 3 and solvers.describe()["sweep13_ssprk3"] == "SSPRK3"
    assert "sweep13_ssprk3" in solvers.available(adaptive=False)


def test_a_fixed_runge_kutta_method_has_no_options():
    """Was: ``get("euler", order=2)`` said "it accepts: error_order", an option no fixed method can take
    (``get("heun", error_order=1)`` then failed: no embedded method)."""
    with pytest.raises(TypeError, match="it accepts: no options"):
        solvers.get("euler", order=2)
    with pytest.raises(TypeError, match="unknown option"):
        solvers.get("heun", error_order=1)


def test_available_flags_are_bools():
    """Was: ``available(adaptive="yes")`` returned [] (no solver's flag equals a string)."""
    with pytest.raises(TypeError, match="adaptive must be True, False or None, got 'yes'"):
        solvers.available(adaptive="yes")


# -- time grids and times ---------------------------------------------------------------------------------------

Y0 = torch.tensor([1.0, 0.0], dtype=torch.float64)


@pytest.mark.parametrize(("ts", "error", "match"), [
    ("01", TypeError, "ts must be a list or tuple of times, or a 1-D tensor or array, got str"),
    ({0.0, 1.0}, TypeError, "got set"),
    ([False, True], TypeError, r"ts must hold real numbers, got False \(bool\) at index 0"),
    ([0.0, 1j], TypeError, r"got 1j \(complex\) at index 1"),
    (torch.tensor(1.0), ValueError, r"1-D sequence of times, got a Tensor of shape \(\)"),
    (torch.zeros(2, 2), ValueError, r"shape \(2, 2\)"),
    (torch.tensor([0.0, 1.0], requires_grad=True), ValueError, r"requires grad.*no gradient.*ts.detach\(\)"),
    ([torch.tensor(0.0), torch.tensor(1.0, requires_grad=True)], TypeError, "at index 1 .*requires grad"),
    (np.array([0, 1j]), TypeError, "real times, got dtype complex128"),
])
def test_a_grid_that_is_not_a_sequence_of_real_times_is_refused(ts, error, match):
    """Was: ``ts="01"`` solved from 0 to 1 (each character a time), a set solved in its iteration order,
    ``[False, True]`` from 0 to 1, and a grid that requires grad was solved with the gradient silently dropped;
    a 0-dim tensor was "not a sequence of real numbers, got Tensor" though a 1-D tensor is one."""
    with pytest.raises(error, match=match):
        solvers.solve(oscillator, Y0, ts, "rk4")


@pytest.mark.parametrize("ts", [[0, 1, 2], torch.arange(3), np.arange(3), (0.0, 1.0, 2.0), range(3),
                                [torch.tensor(0.0), 1, np.float32(2.0)]])
def test_integer_tensor_and_array_grids_are_times(ts):
    """What torchdiffeq users pass: integer lists, integer tensors, arrays, 0-dim tensors: one result."""
    assert torch.equal(solvers.solve(oscillator, Y0, ts, "rk4").y, solvers.solve(oscillator, Y0, [0.0, 1.0, 2.0],
                                                                                   "rk4").y)


@pytest.mark.parametrize(("t0", "t1", "error", "match"), [
    (0.0, "1", TypeError, "t1 must be a real number, got str '1'"),
    (torch.tensor(0.0, requires_grad=True), 1.0, ValueError, r"t0 requires grad.*t0.detach\(\)"),
])
def test_adaptive_end_times_are_numbers(t0, t1, error, match):
    """Was: ``solve_adaptive(f, y0, 0.0, "1")`` solved to t = 1 (the string converted); a t0 that requires grad was
    taken as a float, its gradient dropped."""
    with pytest.raises(error, match=match):
        solvers.solve_adaptive(oscillator, Y0, t0, t1)
    assert torch.equal(solvers.solve_adaptive(oscillator, Y0, torch.tensor(0.0), np.float64(1.0)).y,
                       solvers.solve_adaptive(oscillator, Y0, 0.0, 1.0).y)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(rtol=torch.tensor(1e-6)), TypeError, r"rtol must be a Python number, got a tensor.*norm="),
    (dict(atol=torch.tensor([1e-8, 1e-6])), TypeError, "atol must be a Python number, got a tensor"),
    (dict(rtol="1e-3"), TypeError, "rtol must be a finite number >= 0, got str"),
    (dict(rtol=-1.0), ValueError, "rtol must be a finite number >= 0, got -1.0"),
    (dict(first_step=math.inf), ValueError, "first_step must be a finite number > 0, got inf"),
    (dict(norm="rms"), TypeError, r"norm must be callable as norm\(error, y0, y1, t1\)"),
    (dict(controller=solvers.StepController), TypeError, "controller must be a solvers.StepController"),
])
def test_adaptive_options_are_checked_before_the_solve(kwargs, error, match):
    """Was: a tensor tolerance was "rtol must be a finite number >= 0, got tensor(1.0000e-06)" (it is one; torchdiffeq
    takes it), a string tolerance a ValueError, and ``norm="rms"`` failed inside step 0 ("'str' object is not
    callable")."""
    with pytest.raises(error, match=match):
        solvers.solve_adaptive(oscillator, Y0, 0.0, 1.0, **kwargs)


def test_a_per_component_tolerance_is_a_norm():
    """What the tensor-tolerance error points to: a norm of one's own gives per-component tolerances, as
    torchdiffeq's tensor atol does; with equal components it is the default norm's solve."""
    atol = torch.tensor([1e-8, 1e-8], dtype=torch.float64)

    def norm(error, y0, y1, t1):
        return (error / (atol + 1e-6 * torch.maximum(y0.abs(), y1.abs()))).pow(2).mean().sqrt()

    own = solvers.solve_adaptive(oscillator, Y0, 0.0, 1.0, rtol=1e-6, atol=1e-8, norm=norm)
    default = solvers.solve_adaptive(oscillator, Y0, 0.0, 1.0, rtol=1e-6, atol=1e-8)
    assert own.stats.nfe == default.stats.nfe and torch.allclose(own.y, default.y, rtol=0, atol=1e-15)


@pytest.mark.parametrize(("field", "error", "match"), [
    ("icoeff", TypeError, "StepController.icoeff must be a real number, got str '1'"),
    ("pcoeff", ValueError, "finite pcoeff"),
])
def test_step_controller_coefficients_are_numbers(field, error, match):
    """Was: ``StepController(icoeff="1")`` was built, and failed inside the first step's size update."""
    with pytest.raises(error, match=match):
        solvers.StepController(**{field: "1" if field == "icoeff" else math.nan})


# -- the loop's hooks and where failures are reported -----------------------------------------------------------

def test_a_stepping_that_is_not_one_is_refused():
    """Was: ``integrate(f, y0, "rk4", [0.0, 1.0])`` failed with "'list' object has no attribute 'interval'"."""
    with pytest.raises(TypeError, match=r"stepping must be a solvers.Stepping \(FixedGrid\(ts\).*got list"):
        solvers.integrate(oscillator, Y0, "rk4", [0.0, 1.0])


@pytest.mark.parametrize(("methods", "error", "match"), [
    ({5: solvers.get("rk4")}, ValueError, r"FixedGrid.methods: 5 is not a step of this grid \(its 2 steps are 0..1\)"),
    ({0: "rk4"}, TypeError, r"FixedGrid.methods\[0\] must be a solvers.Solver"),
    ([solvers.get("rk4")], TypeError, "FixedGrid.methods must be a dict"),
])
def test_fixed_grid_methods_name_steps_of_the_grid(methods, error, match):
    """Was: a method for step 5 of a 2-step grid was silently ignored; a name instead of a solver failed with
    "'str' object has no attribute 'lacks'"."""
    with pytest.raises(error, match=match):
        solvers.integrate(oscillator, Y0, "euler", solvers.FixedGrid([0.0, 0.5, 1.0], methods=methods))


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(callback=3), r"callback must be callable as callback\(info: solvers.StepInfo\)"),
    (dict(time_name=3), "time_name must be a str"),
])
def test_hooks_are_checked_before_the_first_step(kwargs, match):
    """Was: ``callback=3`` ran the first step and then failed as "step 1 (t 0 -> 1): 'int' object is not
    callable"; ``time_name=3`` was accepted (and broke only an error message)."""
    calls = []

    def f(t, y):
        calls.append(t)
        return oscillator(t, y)

    with pytest.raises(TypeError, match=match):
        solvers.solve(f, Y0, [0.0, 1.0], "rk4", **kwargs)
    assert calls == []


def test_a_failing_callback_is_located_at_the_step_it_followed():
    """Was: a callback raising ValueError after step 0 was reported as "step 1 (t 0 -> 0.5)": the index of the next
    step with the times of the last."""
    def callback(info):
        if info.step == 1:
            raise ValueError("stop here")

    with pytest.raises(SolveError, match=r"^the callback after step 1 \(t 0.5 -> 1\): stop here") as info:
        solvers.solve(oscillator, Y0, [0.0, 0.5, 1.0, 1.5], "rk4", callback=callback)
    assert (info.value.step, info.value.t0, info.value.t1) == (1, 0.5, 1.0)


def test_a_field_failing_in_the_solvers_start_is_located():
    """Was: reversible Heun evaluates f(t0, y0) before the first step, outside the loop's error handling: a field of
    the wrong shape was a bare ValueError, and a field raising there carried no note of where."""
    with pytest.raises(SolveError, match=r"the solver's start at t 0.25 \(before step 0\): the vector field "
                                         r"returned shape \(1,\)") as info:
        solvers.solve(lambda t, y: y[:1], Y0, [0.25, 1.0], "reversible_heun")
    assert info.value.stats.nfe == 1

    def broken(t, y):
        raise RuntimeError("model failed")

    with pytest.raises(RuntimeError, match="model failed") as info:
        solvers.solve(broken, Y0, [0.25, 1.0], "reversible_heun")
    assert info.value.__notes__ == ["while solving the solver's start at t 0.25 (before step 0)"]
    with pytest.raises(RuntimeError, match="model failed") as info:  # dopri5's first evaluation: its size estimate
        solvers.solve_adaptive(broken, Y0, 0.25, 1.0)
    assert info.value.__notes__ == ["while solving step 0 (choosing it at t 0.25)"]


@pytest.mark.parametrize("solver", ["rk4", "dopri5"])
def test_a_field_failing_mid_solve_names_the_step_and_its_times(solver):
    """The brief's case: a field that raises at t > 0.55 is reported at the step that spans it."""
    def late(t, y):
        if t > 0.55:
            raise KeyError("late")
        return oscillator(t, y)

    with pytest.raises(KeyError) as info:
        solvers.solve(late, Y0, torch.linspace(0, 1, 11), solver)
    assert info.value.__notes__ == ["while solving step 5 (t 0.5 -> 0.6)"]


def test_an_adaptive_solve_from_a_state_that_requires_grad_does_not_warn():
    """Was: the step-size estimate took ``float`` of a norm that required grad: "UserWarning: Converting a tensor
    with requires_grad=True to a scalar" on every solve from a differentiable y0; gradients are those of the
    solution (d y(1)/d y0 = exp(A))."""
    y0 = Y0.clone().requires_grad_(True)
    always = torch.is_warn_always_enabled()
    torch.set_warn_always(True)  # torch warns once per process otherwise: an earlier test could have used it up
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            sol = solvers.solve_adaptive(oscillator, y0, 0.0, 1.0, rtol=1e-9, atol=1e-12)
    finally:
        torch.set_warn_always(always)
    (grad,) = torch.autograd.grad(sol.y[0], y0)
    assert torch.allclose(grad, torch.linalg.matrix_exp(OSCILLATOR)[0], rtol=0, atol=1e-7)


def test_vmap_over_a_solve_says_which_check_to_turn_off():
    """Was: ``torch.func.vmap`` over ``solve`` failed with torch's "data-dependent control flow" (the end state's
    finite check), over ``solve_adaptive`` with "calling .item()". With the check off, vmap equals the batch solve."""
    ys = torch.randn(3, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="under torch.func.vmap .* pass check_finite=False"):
        torch.func.vmap(lambda y: solvers.solve(oscillator, y, [0.0, 0.5, 1.0], "rk4").y)(ys)
    mapped = torch.func.vmap(lambda y: solvers.solve(oscillator, y, [0.0, 0.5, 1.0], "rk4", check_finite=False).y)(ys)
    assert torch.allclose(mapped, solvers.solve(oscillator, ys, [0.0, 0.5, 1.0], "rk4").y, rtol=0, atol=1e-15)
    with pytest.raises(SolveError, match="error-controlled solve reads each step's error on the host"):
        torch.func.vmap(lambda y: solvers.solve_adaptive(oscillator, y, 0.0, 1.0).y)(ys)


def test_a_reversible_state_undone_by_another_solver_is_refused():
    """Was: ``unsolve(f, y, ts, "reversible", state=<reversible_heun's state>)`` ran and returned a wrong y0."""
    ts = [0.0, 0.5, 1.0]
    sol = solvers.solve(oscillator, Y0, ts, "reversible_heun")
    with pytest.raises(ValueError, match="state was made by 'reversible_heun', not by solver 'reversible'"):
        solvers.unsolve(oscillator, sol.y, ts, "reversible", state=sol.state)
    bare = solvers.ReversibleState(sol.state.t, sol.state.z, sol.state.k)  # rebuilt without its record (S17)
    with pytest.raises(ValueError, match="state holds a derivative .*, which solver 'reversible' does not carry"):
        solvers.unsolve(oscillator, sol.y, ts, "reversible", state=bare)
    back = solvers.unsolve(oscillator, sol.y, ts, "reversible_heun", state=sol.state)
    assert torch.allclose(back.y, Y0, rtol=0, atol=1e-15)


# -- solvers/ without flowdiff ----------------------------------------------------------------------------------

#: the test files of solvers/ alone (they import no flowdiff)
SOLVERS_TESTS = ("tests/test_solvers.py", "tests/test_reversible.py", "tests/test_solver_promises.py",
                 "tests/test_newton.py", "tests/test_new_user_sweep13.py", "tests/test_carried_states.py")
_WITHOUT_FLOWDIFF = "import sys; sys.modules['flowdiff'] = None  # `import flowdiff` now fails, as if deleted\n"


def _run_without_flowdiff(code: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _WITHOUT_FLOWDIFF + code], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
                                                           "PATH": "/usr/bin:/bin"})


def test_solvers_import_solve_and_collect_their_tests_without_flowdiff():
    """STYLE's promise: delete flowdiff/ and solvers/ still imports, solves, and its tests load. No test checked it."""
    code = """
import torch, solvers
y0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
f = lambda t, y: torch.stack([y[1], -y[0]])
a = solvers.solve(f, y0, [0.0, 0.5, 1.0], "rk4")
b = solvers.solve_adaptive(f, y0, 0.0, 1.0)
c = solvers.solve(f, y0, [0.0, 0.5, 1.0], "reversible_heun")
assert torch.allclose(solvers.unsolve(f, c.y, [0.0, 0.5, 1.0], "reversible_heun", state=c.state).y, y0)
assert not any(m == "flowdiff" or m.startswith("flowdiff.") for m in sys.modules if sys.modules[m] is not None)
import pytest
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "--collect-only", *TESTS]))
""".replace("TESTS", repr(SOLVERS_TESTS))
    done = _run_without_flowdiff(code, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]  # 2: a test file failed to import


@pytest.mark.slow
def test_the_solvers_tests_pass_without_flowdiff():
    """The same, running them (about 15 s on one core)."""
    code = ("import pytest; sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-k', 'not without_flowdiff', "
            f"*{SOLVERS_TESTS!r}]))")
    done = _run_without_flowdiff(code, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


# -- against torchdiffeq ----------------------------------------------------------------------------------------

def _counting(times: list):
    def f(t, y):
        times.append(float(t))
        return oscillator(t, y)
    return f


@pytest.mark.parametrize(("name", "same_times"), [("dopri5", True), ("bosh3", False)])
def test_adaptive_pairs_cost_what_torchdiffeqs_do(name, same_times):
    """A torchdiffeq user's first check: the same pair at the same tolerances makes as many evaluations, counted
    exactly (NFE = calls of f); dopri5's are at the same times (to rounding) but for its last step, which
    torchdiffeq takes past t1 and interpolates back. (bosh3's steps part where this controller shrinks an accepted
    step, which torchdiffeq's never does: see solvers._methods.)"""
    torchdiffeq = pytest.importorskip("torchdiffeq")
    ours, theirs = [], []
    sol = solvers.solve_adaptive(_counting(ours), Y0, 0.0, 1.0, name, rtol=1e-6, atol=1e-8)
    torchdiffeq.odeint(_counting(theirs), Y0, torch.tensor([0.0, 1.0], dtype=torch.float64), method=name,
                       rtol=1e-6, atol=1e-8)
    assert sol.stats.nfe == len(ours) == len(theirs)
    if same_times:
        last = solvers.get(name).tableau.stages - 1  # the evaluations of the last step (FSAL: one fewer)
        assert np.allclose(ours[:-last], theirs[:-last], rtol=1e-9, atol=0)
        assert not np.allclose(ours[-last:], theirs[-last:], rtol=1e-9, atol=0)
    assert float((sol.y - exact_oscillator(Y0, 0.0, 1.0)).abs().max()) < 1e-6


@pytest.mark.parametrize(("name", "per_step"), [("adaptive_heun", 2), ("fehlberg2", 3)])
def test_pairs_that_are_not_fsal_evaluate_every_stage(name, per_step):
    """``adaptive_heun`` and ``fehlberg2`` cost twice and 1.5 times torchdiffeq's NFE on the same problem: their last
    stage is not at the step's result, which torchdiffeq reuses anyway. Here each step costs its stages (plus the
    first step's size estimate, 2 evaluations), as ``describe()`` says."""
    times = []
    sol = solvers.solve_adaptive(_counting(times), Y0, 0.0, 1.0, name, rtol=1e-5, atol=1e-7)
    assert sol.stats.nfe == len(times) == 2 + per_step * sol.stats.steps - 1  # f(t0, y0) is shared by the estimate
    assert f"{per_step} evaluations a step" in solvers.describe()[name]


def test_max_nfe_on_a_fixed_grid_does_not_advise_tolerances():
    """Was: a fixed grid over its ``max_nfe`` was told to "loosen rtol/atol", which it has none of."""
    with pytest.raises(SolveError, match="raise max_nfe or take fewer steps$") as info:
        solvers.integrate(oscillator, Y0, "rk4", solvers.FixedGrid([0.0, 0.25, 0.5, 0.75, 1.0]), max_nfe=15)
    assert info.value.stats.nfe == 12 and info.value.step == 3


# -- the root finders -------------------------------------------------------------------------------------------

ROOTS = torch.tensor([[2.0], [3.0]], dtype=torch.float64)


def _square(y):
    return y**2 - ROOTS


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(guesses=torch.ones(2, 1, dtype=torch.float64)), TypeError, r"guesses must be a list.*one guess is \[y0\]"),
    (dict(guesses=[torch.ones(2, 1, dtype=torch.long)]), TypeError, "guesses.0. must be a real floating-point"),
    (dict(F=lambda y: y[:1]), ValueError, r"F returned shape \(1, 1\) for an argument of shape \(2, 1\)"),
    (dict(tol=-1.0), ValueError, "tol must be a finite number >= 0, got -1.0"),
    (dict(scale=torch.zeros(1, dtype=torch.float64)), ValueError, "scale must be positive"),
    (dict(max_iter=0), ValueError, "max_iter must be >= 1, got 0"),
])
def test_newton_krylov_checks_its_arguments(kwargs, error, match):
    """Was: a tensor for ``guesses`` failed with "Boolean value of Tensor ... is ambiguous"; an F returning a smaller
    shape broadcast and "converged" to zeros; tol=-1 and a zero scale ran to the end without converging; an integer
    guess failed inside torch.finfo."""
    args = dict(F=_square, guesses=[torch.ones(2, 1, dtype=torch.float64)], scale=torch.ones(1, dtype=torch.float64),
                tol=1e-12)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        solvers.newton_krylov(args.pop("F"), args.pop("guesses"), **args)
    root = solvers.newton_krylov(_square, [torch.ones(2, 1, dtype=torch.float64)], scale=1.0, tol=1e-12)
    assert bool(root.converged.all()) and torch.allclose(root.y, ROOTS.sqrt(), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(x0=torch.tensor(1.0, dtype=torch.float64)), ValueError, "x0 must have a first dimension of samples"),
    (dict(max_iter=0), ValueError, "max_iter must be >= 1, got 0"),
    (dict(depth=-1), ValueError, "depth must be >= 0, got -1"),
    (dict(depth=2.5), TypeError, "depth must be an int, got float 2.5"),
    (dict(g=lambda x: torch.cos(x[:1])), ValueError, r"g returned shape \(1, 1\)"),
])
def test_anderson_checks_its_arguments(kwargs, error, match):
    """Was: ``max_iter=0`` returned a result whose residual was None; depth=-1 ran as plain iteration and 2.5 as
    depth 3; a 0-dim x0 failed with "tuple index out of range"; a g of the wrong shape broadcast."""
    args = dict(g=torch.cos, x0=torch.ones(2, 1, dtype=torch.float64), scale=torch.ones(1, dtype=torch.float64),
                tol=1e-12, max_iter=100)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        solvers.anderson(args.pop("g"), args.pop("x0"), **args)
    fixed = solvers.anderson(torch.cos, torch.ones(2, 1, dtype=torch.float64), scale=1.0, tol=1e-12, max_iter=100)
    assert torch.allclose(torch.cos(fixed.y), fixed.y, rtol=0, atol=1e-11)


# -- a solver of one's own --------------------------------------------------------------------------------------

class _ExplicitMidpoint(solvers.Solver):
    """The explicit midpoint rule written as a user would, from the Solver interface alone."""

    name = "sweep13_midpoint"
    order = 2

    def step(self, f, t0, t1, y0, state):
        h = t1 - t0
        return solvers.StepResult(y0 + h * f(t0 + h / 2, y0 + h / 2 * f(t0, y0)), None)


def test_a_solver_of_ones_own_runs_in_the_loop_and_is_counted():
    """The Solver interface alone is enough: same values as the registered midpoint, NFE counted by the loop."""
    ts = torch.linspace(0, 1, 11, dtype=torch.float64)
    own, registered = solvers.solve(oscillator, Y0, ts, _ExplicitMidpoint()), solvers.solve(oscillator, Y0, ts,
                                                                                            "midpoint")
    assert torch.allclose(own.y, registered.y, rtol=0, atol=1e-15) and own.stats.nfe == 20
    assert solvers.nfe_for_steps(_ExplicitMidpoint(), 10) == 20


class _ReturnsTensor(_ExplicitMidpoint):
    def step(self, f, t0, t1, y0, state):
        return super().step(f, t0, t1, y0, state).y


class _ReturnsOtherShape(_ExplicitMidpoint):
    def step(self, f, t0, t1, y0, state):
        return solvers.StepResult(y0[:1], None)


@pytest.mark.parametrize(("solver", "match"), [
    (_ReturnsTensor(), r"step 0 \(t 0 -> 0.5\): solver 'sweep13_midpoint': step\(\) returned Tensor; it must return "
                       r"a solvers.StepResult"),
    (_ReturnsOtherShape(), r"step\(\) returned a state of shape \(1,\) from one of shape \(2,\)"),
])
def test_a_step_that_returns_the_wrong_thing_is_named(solver, match):
    """Was: a step returning the new state alone failed with "'Tensor' object has no attribute 'y'"; one returning
    another shape was carried on (a (2,) state came back (1,), no error)."""
    with pytest.raises(SolveError, match=match):
        solvers.solve(oscillator, Y0, [0.0, 0.5, 1.0], solver)
