"""A solve's ``state=``: each solver takes back the carried state it made, and refuses another solver's by name.

Only :mod:`solvers` is used (no diffusion). A carried state is what a solve returns as ``Solution.state`` to
continue it (``solve(..., state=sol.state)``) or to undo it (``unsolve``); ``None`` is a fresh start.
"""

import math
import re

import pytest
import torch

import solvers
from solvers import Derivative, History, ReversibleState, solve, unsolve

TS = [2.0, 1.8, 1.55, 1.4, 1.2, 1.1, 0.95, 0.8, 0.7]  # positive, decreasing, irregular: log-time methods apply
MID = 4


def field(t: float, y: torch.Tensor) -> torch.Tensor:
    return math.cos(t) * torch.tanh(y) - 0.5 * y + math.sin(3 * t)


def y0() -> torch.Tensor:
    return torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def halves(solver: solvers.Solver) -> tuple[solvers.Solution, solvers.Solution]:
    first = solve(field, y0(), TS[: MID + 1], solver)
    return first, solve(field, first.y, TS[MID:], solver, state=first.state)


#: every registered solver, and options that make another configuration of one
CONFIGS = [(name, {}) for name in solvers.available()] + [
    ("lms", {"order": 2}), ("ipndm", {"order": 3}), ("deis", {"order": 2}), ("unipc", {"order": 3}),
    ("abm", {"order": 2}), ("dpmpp_2m", {"order": 1}), ("reversible_heun", {"quantum": 2.0**-40}),
    ("reversible", {"base": "heun"}), ("reversible", {"coupling": 0.5}), ("reversible", {"base": "rk4",
                                                                                       "coupling": 0.9})]
IDS = [name + "".join(f"-{k}={v}" for k, v in opts.items()) for name, opts in CONFIGS]


@pytest.mark.parametrize(("name", "opts"), CONFIGS, ids=IDS)
def test_a_solve_continued_from_its_own_state_is_the_uninterrupted_solve(name, opts):
    whole = solve(field, y0(), TS, solvers.get(name, **opts))
    first, second = halves(solvers.get(name, **opts))  # a second instance of the same configuration
    assert torch.equal(second.y, whole.y)
    assert first.stats.nfe + second.stats.nfe >= whole.stats.nfe
    if first.state is not None and getattr(first.state, "t", None) == TS[MID]:  # it held f at the join: reused
        assert first.stats.nfe + second.stats.nfe == whole.stats.nfe


def _maker(name: str, opts: dict) -> solvers.Solver:
    return solvers.get(name, **opts)


def _others(name: str, opts: dict) -> list[tuple[str, dict]]:
    """The configurations whose end state is not ``(name, opts)``'s (every other one that carries a state)."""
    own = _maker(name, opts).state_maker
    out = []
    for other, other_opts in CONFIGS:
        s = _maker(other, other_opts)
        if s.state_maker != own and solve(field, y0(), TS[: MID + 1], s).state is not None:
            out.append((other, other_opts))
    return out


@pytest.mark.parametrize(("name", "opts"), CONFIGS, ids=IDS)
def test_another_solvers_state_is_refused_by_name(name, opts):
    solver = _maker(name, opts)
    y = y0()
    for other, other_opts in _others(name, opts):
        state = solve(field, y, TS[: MID + 1], _maker(other, other_opts)).state
        same_type = type(state) is solver.state_type
        error = ValueError if same_type else TypeError
        with pytest.raises(error) as info:
            solve(field, y, TS[MID:], solver, state=state)
        message = str(info.value)
        assert message.startswith("state"), message
        assert solver.name in message, message
        if same_type:  # the record names the configuration that made it
            assert re.search(re.escape(state.made_by), message), message
        else:
            assert type(state).__name__ in message and solver.state_type.__name__ in message, message


def test_each_solver_declares_what_it_carries():
    kinds = {name: solvers.get(name).state_type for name in solvers.available()}
    assert kinds["dopri5"] is Derivative and kinds["euler"] is Derivative
    assert kinds["lms"] is History and kinds["ipndm"] is History and kinds["unipc"] is History
    assert kinds["reversible"] is ReversibleState and kinds["reversible_heun"] is ReversibleState
    for name in solvers.available():
        state = solve(field, y0(), TS[: MID + 1], name).state
        assert state is None or type(state) is kinds[name]
        assert state is None or state.made_by == solvers.get(name).state_maker


def test_a_none_state_is_a_fresh_start():
    for name in ("rk4", "lms", "reversible"):
        assert torch.equal(solve(field, y0(), TS, name, state=None).y, solve(field, y0(), TS, name).y)


# -- defect 1: a wrong state given to a Runge–Kutta or multistep solver was ignored or used --------------------------

def test_a_multistep_history_given_to_a_runge_kutta_solve_is_refused():
    """Was: rk4 took lms's History as its own f(t0, y0) (a History is a Derivative) without a word."""
    y = y0()
    history = solve(field, y, TS[:3], "abm").state  # abm's newest derivative is at the join
    assert history.t == TS[2]
    with pytest.raises(TypeError, match=r"^state .*'rk4'.*Derivative.*History"):
        solve(field, y, TS[2:], "rk4", state=history)


def test_a_reversible_state_given_to_a_multistep_solve_is_refused():
    """Was: lms ignored a ReversibleState (it is no Derivative) and started afresh."""
    y = y0()
    state = solve(field, y, TS[:3], "reversible").state
    with pytest.raises(TypeError, match=r"^state .*'lms'.*History.*ReversibleState"):
        solve(field, y, TS[2:], "lms", state=state)


def test_a_history_of_another_order_is_refused():
    """Was: lms of order 2 cut lms(order=4)'s History to its own length and went on."""
    y = y0()
    state = solve(field, y, TS[: MID + 1], "lms").state
    with pytest.raises(ValueError, match=re.escape("lms(order=4")):
        solve(field, y, TS[MID:], solvers.get("lms", order=2), state=state)


def test_another_fsal_pairs_derivative_is_refused():
    """Was: dopri5 took bosh3's last stage as its first without a word."""
    y = y0()
    state = solve(field, y, TS[:3], "bosh3").state
    with pytest.raises(ValueError, match=r"^state was made by 'bosh3'.*'dopri5'"):
        solve(field, y, TS[2:], "dopri5", state=state)


def test_a_history_from_the_other_direction_is_refused():
    """Was: a History whose derivatives lie ahead of the start (a solve the other way) was extrapolated from."""
    y = y0()
    back = solve(field, y, TS[MID:][::-1], "lms").state  # 0.7 -> 1.2: its nodes lie below 1.2
    ahead = r"^state holds derivatives at t=\[1\.1, 0\.95, 0\.8, 0\.7\], ahead of the solve's start t=1\.2"
    with pytest.raises(ValueError, match=ahead):
        solve(field, y, [1.2, 1.1, 0.95], "lms", state=back)
    solve(field, y, [1.2, 1.4, 1.55], "lms", state=back)  # the same way on: taken


@pytest.mark.parametrize("name", ["dopri5", "lms", "reversible_heun"])
def test_a_state_of_another_shape_or_dtype_is_refused(name):
    """Was: a derivative of shape (1, 3) broadcast into a (2, 3) state, and a float32 one promoted nothing away."""
    y = y0()
    state = solve(field, y, TS[:3], name).state
    with pytest.raises(ValueError, match=r"^state.*shape \(2, 3\).*\(1, 3\)|^state.*\(1, 3\).*\(2, 3\)"):
        solve(field, y[:1], TS[2:], name, state=state)
    with pytest.raises(TypeError, match=r"^state.*float64.*float32|^state.*float32.*float64"):
        solve(field, y.float(), TS[2:], name, state=state)


def test_a_first_same_as_last_state_at_another_time_is_refused():
    """Was: dopri5 dropped a state at another time and evaluated afresh (a state from another point of the solve)."""
    y = y0()
    state = solve(field, y, TS[:3], "dopri5").state
    with pytest.raises(ValueError, match=r"^state .*t=1\.55.*starts at t=1\.4"):
        solve(field, y, TS[3:], "dopri5", state=state)


# -- defect 2: Reversible states say which coupling and base method made them ---------------------------------------

def test_a_reversible_state_records_its_coupling_and_base():
    state = solve(field, y0(), TS, solvers.get("reversible", base="heun", coupling=0.5)).state
    assert state.made_by == "reversible(base='heun', coupling=0.5)"
    assert solve(field, y0(), TS, "reversible_heun").state.made_by == "reversible_heun"


@pytest.mark.parametrize("other", [{"coupling": 0.5}, {"base": "heun"}, {"base": "midpoint", "coupling": 0.5}])
def test_a_reversible_state_of_another_configuration_is_refused(other):
    """Was: a state of reversible(base='euler', coupling=0.999) continued and undid reversible(**other) without a
    word (a wrong end state, and a wrong start back)."""
    y = y0()
    sol = solve(field, y, TS, "reversible")
    solver = solvers.get("reversible", **other)
    for run in (lambda: solve(field, sol.y, [0.7, 0.6], solver, state=sol.state),
                lambda: unsolve(field, sol.y, TS, solver, state=sol.state)):
        with pytest.raises(ValueError, match=re.escape("state was made by \"reversible(base='euler', "
                                                       "coupling=0.999)\"")):
            run()
    assert (unsolve(field, sol.y, TS, "reversible", state=sol.state).y - y).abs().max() < 1e-12


def test_a_quantised_reversible_heun_state_is_refused_unquantised():
    y = y0()
    sol = solve(field, y, TS, solvers.get("reversible_heun", quantum=2.0**-40))
    made = f"state was made by 'reversible_heun(quantum={2.0**-40!r})', not by solver 'reversible_heun'"
    with pytest.raises(ValueError, match=re.escape(made)):
        unsolve(field, sol.y, TS, "reversible_heun", state=sol.state)


def test_a_state_rebuilt_without_its_record_is_checked_by_its_values():
    """A state saved as its tensors and time and rebuilt (a Latent file) records no maker: it is taken where its
    type, time and shape fit."""
    y = y0()
    sol = solve(field, y, TS, "reversible")
    bare = ReversibleState(sol.state.t, sol.state.z)
    assert (unsolve(field, sol.y, TS, "reversible", state=bare).y - y).abs().max() < 1e-12


def test_a_one_step_solve_whose_only_step_is_euler_takes_the_solvers_own_state():
    """With ``eval_end=False`` the only step of a one-step grid is Euler in heun's place: heun's state is still
    heun's to take (the solver checks it, not the stand-in), and another's is refused."""
    y = y0()
    first = solve(field, y, TS[:3], "heun")
    solve(field, first.y, TS[2:4], "heun", state=first.state, eval_end=False)
    with pytest.raises(ValueError, match="^state was made by 'rk4', not by solver 'heun'"):
        solve(field, first.y, TS[2:4], "heun", state=solve(field, y, TS[:3], "rk4").state, eval_end=False)


def test_wrapped_and_corrected_methods_take_their_base_methods_states():
    """Shifted and Scaled step with their base method, whose states they carry; CorrectedAdams records its own."""
    steps = list(zip(TS, TS[1:]))
    y = y0()
    for wrap in (lambda s: solvers.Shifted(s, dict.fromkeys(steps, 0.1)),
                 lambda s: solvers.Scaled(s, dict.fromkeys(steps, 0.1))):
        whole = solve(field, y, TS, wrap(solvers.get("lms")))
        first, second = halves(wrap(solvers.get("lms")))
        assert torch.equal(second.y, whole.y) and first.state.made_by == "lms(order=4)"
        with pytest.raises(ValueError, match=r"^state was made by 'ipndm\(order=4\)', not by solver 'lms'"):
            solve(field, first.y, TS[MID:], wrap(solvers.get("lms")), state=halves(solvers.get("ipndm"))[0].state)
    coefficients = {step: (0.5,) if i >= 2 else () for i, step in enumerate(steps)}  # (the first have no term)
    corrected = solvers.CorrectedAdams(solvers.get("lms", order=2), coefficients)
    whole = solve(field, y, TS, corrected)
    first, second = halves(corrected)
    assert torch.equal(second.y, whole.y)
    assert first.state.made_by == corrected.state_maker == "lms+corrected(base='lms(order=2)', terms=1)"
    with pytest.raises(ValueError, match=r"^state was made by 'lms\(order=2\)', not by solver 'lms\+corrected'"):
        solve(field, first.y, TS[MID:], corrected, state=halves(solvers.get("lms", order=2))[0].state)


def test_a_state_left_by_a_lower_order_last_step_continues_its_solver():
    """dpmpp_2m(lower_order_final=True) takes its last step with its first-order form: the state it leaves is still
    the solver's to continue."""
    solver = solvers.get("dpmpp_2m", lower_order_final=True)
    first = solve(field, y0(), TS[: MID + 1], solver)
    assert first.state.made_by == solver.state_maker
    assert solve(field, first.y, TS[MID:], solver, state=first.state).stats.nfe == len(TS) - 1 - MID
