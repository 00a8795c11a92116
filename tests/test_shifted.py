"""solvers.Shifted: evaluations decoupled from the step's times (LD3-style), on closed-form ODEs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import solvers


def _field(calls: list[float] | None = None):
    def f(t: float, y: torch.Tensor) -> torch.Tensor:
        if calls is not None:
            calls.append(t)
        return -y * math.cos(t) + t
    return f


def _grid(n: int) -> list[float]:
    return list(np.linspace(0.0, 1.0, n + 1))


def _steps(ts: list[float], delta) -> dict:
    return {(a, b): (delta(i) if callable(delta) else delta) for i, (a, b) in enumerate(zip(ts[:-1], ts[1:]))}


@pytest.mark.parametrize("name", ["euler", "heun", "rk4", "dopri5", "lms", "abm", "unipc", "dpmpp_3m", "ipndm"])
def test_zero_shifts_are_the_base_method_bit_for_bit(name):
    ts = _grid(7)
    y0 = torch.linspace(-1, 1, 5, dtype=torch.float64)
    base = solvers.get(name)
    a = solvers.solve(_field(), y0, ts, base)
    b = solvers.solve(_field(), y0, ts, solvers.Shifted(base, _steps(ts, 0.0)))
    assert torch.equal(a.y, b.y) and a.stats.nfe == b.stats.nfe


#: the step each evaluation of a solve is made in, by the evaluation's index: Euler one per step, Heun two
#: (t0 and t1 of its step), unipc (predict–evaluate–correct) f(t0) once, then one evaluation at each step's end
_STEP_OF = {"euler": lambda k: k, "heun": lambda k: k // 2, "unipc": lambda k: max(0, k - 1)}


@pytest.mark.parametrize("name", sorted(_STEP_OF))
def test_every_evaluation_is_moved_by_its_steps_shift(name):
    ts = _grid(5)
    y0 = torch.ones(3, dtype=torch.float64)
    plain, moved = [], []
    solvers.solve(_field(plain), y0, ts, solvers.get(name))
    deltas = [0.1 * (i + 1) for i in range(len(ts) - 1)]
    solvers.solve(_field(moved), y0, ts, solvers.Shifted(solvers.get(name), _steps(ts, lambda i: deltas[i])))
    assert len(plain) == len(moved)
    for k, (p, m) in enumerate(zip(plain, moved)):
        i = _STEP_OF[name](k)
        assert m == pytest.approx(p + deltas[i] * (ts[i + 1] - ts[i]), abs=1e-15), (k, i)


def test_shifted_heun_is_first_order_and_zero_shift_second():
    y0 = torch.tensor([0.7], dtype=torch.float64)
    exact = solvers.solve(_field(), y0, _grid(4096), solvers.get("rk4")).y

    def err(n: int, delta: float) -> float:
        ts = _grid(n)
        return float((solvers.solve(_field(), y0, ts, solvers.Shifted(solvers.get("heun"), _steps(ts, delta))).y
                      - exact).abs().max())

    ns = [16, 32, 64, 128]
    for delta, order in ((0.0, 2), (0.3, 1)):
        e = [err(n, delta) for n in ns]
        slope = -np.polyfit(np.log(ns), np.log(e), 1)[0]
        assert abs(slope - order) < 0.15, (delta, slope)


def test_a_step_without_a_shift_and_bad_shifts_are_refused():
    ts = _grid(4)
    shifted = solvers.Shifted(solvers.get("euler"), _steps(ts[:3], 0.1))
    with pytest.raises(ValueError, match="no shift for the step"):
        solvers.solve(_field(), torch.ones(2, dtype=torch.float64), ts, shifted)
    with pytest.raises(ValueError, match="finite number"):
        solvers.Shifted(solvers.get("euler"), {(0.0, 1.0): math.nan})
    with pytest.raises(TypeError, match="keyed by steps"):
        solvers.Shifted(solvers.get("euler"), {0.0: 0.1})
    with pytest.raises(ValueError, match="reversible"):
        solvers.Shifted(solvers.get("reversible_heun"), {})
    with pytest.raises(TypeError, match="not itself Shifted"):
        solvers.Shifted(shifted, {})


def test_lower_order_forms_keep_their_shifts():
    ts = _grid(4)
    shifted = solvers.Shifted(solvers.get("unipc"), _steps(ts, 0.2))
    low = shifted.limited(1)
    assert isinstance(low, solvers.Shifted) and low.shifts == shifted.shifts
    assert not hasattr(solvers.Shifted(solvers.get("heun"), _steps(ts, 0.2)), "limited")
    final = solvers.Shifted(solvers.get("dpmpp_2m", lower_order_final=True), _steps(ts, 0.2)).final_method
    assert isinstance(final, solvers.Shifted)


# -- through the engine: a shifted solver runs in its base method's variables --------------------------------------

@pytest.mark.parametrize("name", ["unipc", "dpmpp_2m", "dpmpp_3m", "heun", "lms"])
def test_zero_shifts_through_generate_encode_and_decode_are_the_base_bit_for_bit(name):
    """Whatever the wrapper is called, the engine picks the base method's variables (data variables for the
    exponential integrators), so the shifts are keyed by the base's own times and δ = 0 changes nothing."""
    from _closed_form import mixture, noise

    import flowdiff
    from flowdiff.engine.formulations import formulation_for, variables_of

    flow = mixture()
    base = solvers.get(name)
    sig = flowdiff.make_sigmas(flow.schedule, "logsnr", 6)
    shifted = solvers.Shifted(base, _steps(formulation_for(base, "generate").times(list(sig)), 0.0))
    assert shifted.name == f"{name}+shifted" and variables_of(shifted) == variables_of(base)
    x = noise(2, n=3)
    a = flowdiff.generate(flow, x, solver=base, grid=sig)
    b = flowdiff.generate(flow, x, solver=shifted, grid=sig)
    assert torch.equal(a.x, b.x) and a.stats.nfe == b.stats.nfe
    enc_times = formulation_for(base, "encode").times(list(sig[::-1]))
    a = flowdiff.encode(flow, x, solver=base, grid=sig)
    b = flowdiff.encode(flow, x, solver=solvers.Shifted(base, _steps(enc_times, 0.0)), grid=sig)
    assert torch.equal(a.x, b.x) and b.latent.solver == name
    assert torch.equal(flowdiff.decode(flow, a.latent).x, flowdiff.decode(flow, b.latent).x)


def test_a_shifted_encoder_that_cannot_encode_is_refused_by_its_base_name():
    from _closed_form import mixture, noise

    import flowdiff

    flow = mixture()
    with pytest.raises(ValueError, match="cannot encode: its equal-step Adams"):
        flowdiff.encode(flow, noise(2, n=2), solver=solvers.Shifted(solvers.get("ipndm"), {}), steps=4)


def test_latent_decode_shifts_take_a_float_array_and_refuse_other_types_by_name():
    import dataclasses

    import numpy as np
    from _closed_form import mixture, noise

    import flowdiff

    flow = mixture()
    latent = flowdiff.encode(flow, noise(2, n=2), solver="euler", steps=5).latent
    shifts = np.linspace(-0.1, 0.1, 5)
    a = dataclasses.replace(latent, decode_shifts=shifts)
    b = dataclasses.replace(latent, decode_shifts=tuple(shifts.tolist()))
    assert a.decode_shifts == b.decode_shifts
    assert torch.equal(flowdiff.decode(flow, a).x, flowdiff.decode(flow, b).x)
    with pytest.raises(TypeError, match="Latent.decode_shifts must be a tuple, list or 1-D float array .* got str"):
        dataclasses.replace(latent, decode_shifts="abc")
