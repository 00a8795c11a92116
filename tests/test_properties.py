"""Property tests of exact encoding, written with the public strategies of :mod:`flowdiff.tools.testing`.

The hypothesis profile is ``ci`` by default (few, derandomised examples) and ``long`` with
``--slow`` (see conftest.py).
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flowdiff as fd
import solvers
from flowdiff.engine.latent import Latent
from flowdiff.tools import testing as ft

REVERSIBLE_OPTIONS = {"reversible": [{}, {"base": "heun"}, {"base": "midpoint", "coupling": 0.99}]}
ANY_SCHEDULE = ft.schedules(kinds=("linear", "scaled_linear", "cosine"))
FLOAT32_ROUNDING = 16 * torch.finfo(torch.float32).eps  # float32 images, float64 reversible state (measured ≤ 4)

common = settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@common
@given(ft.round_trip_cases(solvers=["reversible_heun", "reversible"], solver_options=REVERSIBLE_OPTIONS,
                           dtype=st.just(torch.float64), schedule=ANY_SCHEDULE))
def test_reversible_round_trip_float64(case):
    ft.assert_round_trip(case.flow, case.images, atol=1e-10,
                         solver=solvers.get(case.solver, **case.solver_options),
                         steps=case.steps, grid=case.grid)


@common
@given(ft.round_trip_cases(solvers=["reversible_heun", "reversible"], solver_options=REVERSIBLE_OPTIONS,
                           dtype=st.just(torch.float32), schedule=ANY_SCHEDULE))
def test_reversible_round_trip_float32(case):
    rt = ft.assert_round_trip(case.flow, case.images, atol=FLOAT32_ROUNDING,
                              solver=solvers.get(case.solver, **case.solver_options),
                              steps=case.steps, grid=case.grid)
    assert rt.decoded.x.dtype == torch.float32 and rt.encoded.latent.dtype == torch.float32


@common
@given(ft.round_trip_cases(solvers=["reversible_heun", "reversible"], solver_options=REVERSIBLE_OPTIONS,
                           steps=ft.step_counts(1, 8)),
       st.integers(0, 2**31 - 1))
def test_latent_file_round_trip_is_bit_exact(tmp_path_factory, case, seed):
    enc = fd.encode(case.flow, case.images, solver=solvers.get(case.solver, **case.solver_options), steps=case.steps,
                    grid=case.grid)
    path = tmp_path_factory.mktemp("latents") / f"{seed}.safetensors"
    enc.latent.save(path)
    back = Latent.load(path)
    assert torch.equal(back.x, enc.latent.x) and torch.equal(back.solver_state.z, enc.latent.solver_state.z)
    assert torch.equal(fd.decode(case.flow, back).x, fd.decode(case.flow, enc.latent).x)


@common
@given(ft.round_trip_cases(solvers=["euler", "heun", "ralston"], steps=ft.step_counts(10, 25),
                           dtype=st.just(torch.float64), grids=st.sampled_from(["trailing", "karras", "logsnr"])),
       st.sampled_from([None, 1e-11]))
def test_fixed_point_inversion_reaches_its_tolerance(case, tol):
    """On closed-form models (any schedule, grid and step count drawn) the Newton–Krylov inversion reaches tol at
    every step, and the plain decode returns the images."""
    enc = fd.encode(case.flow, case.images, solver=fd.Inversion("fixed_point", {"tol": tol}, solver=case.solver),
                    steps=case.steps, grid=case.grid)
    ft.assert_fixed_point_converged(enc, tol)
    plain = fd.decode(case.flow, enc.x, solver=case.solver, steps=case.steps, grid=case.grid)
    assert (plain.x - case.images).abs().max().item() <= 1e-9


#: explicit RK methods: the round trip encode→decode with the same method leaves error O(h^q), q = p for odd p
#: and p + 1 for even p (the leading local errors of the step and of the step with −h cancel when p is even)
ORDERS = {"euler": ([40, 80, 160, 320], 1), "midpoint": ([20, 40, 80, 160], 3), "heun": ([20, 40, 80, 160], 3),
          "ralston": ([20, 40, 80, 160], 3), "heun3": ([20, 40, 80, 160], 3), "rk4": ([20, 40, 80, 160], 5)}


@pytest.mark.parametrize("solver", sorted(ORDERS))
@settings(max_examples=2, deadline=None, derandomize=True)
@given(data=st.data())
def test_plain_round_trip_error_shrinks_at_the_solvers_order(solver, data):
    shape = data.draw(ft.batch_shapes(max_batch=2, max_side=3))
    model = data.draw(ft.closed_form_models(shape[1:], kinds=("gaussian",)))
    images = model.sample(shape[0], generator=torch.Generator().manual_seed(0))
    steps, expected = ORDERS[solver]
    slope, errors = ft.round_trip_order(model.flow(), images, steps, solver=solver)
    assert solvers.get(solver).order in (expected, expected - 1)
    assert abs(slope - expected) < 0.35, (solver, errors, slope)
