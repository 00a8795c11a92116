"""diffusers' schedulers over their configuration space: reproduced to float rounding, or refused by name.

For each scheduler class flowdiff routes (``sample_like``; ``encode_like`` for ``DDIMInverseScheduler``),
hypothesis draws a config from the options that class accepts (each option left at its default or set to
one of the values diffusers accepts, all combined: :data:`flowdiff.tools.scheduler_suite.CONFIG_SPACE`), a
step count (few, odd, ``num_train_timesteps`` and one less), a dtype and, for flow matching, ``mu`` and a
pipeline's own ``sigmas``. :func:`~flowdiff.tools.scheduler_suite.check_drawn` asserts the rule: flowdiff's
route equals diffusers' own loop on the same network and noise (float64 to 1e-10 where diffusers keeps the
dtype, float32 rounding elsewhere) with diffusers' number of model evaluations less its zero-length steps, or
flowdiff raises ValueError naming the option; never another result, never another exception; where diffusers'
own loop fails, flowdiff refuses. The fixed cases these draws found are in the suite's table
(``tests/test_scheduler_equivalence.py``). ``--slow`` draws the long profile's count (300 a class).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowdiff.tools.scheduler_suite import (
    CONFIG_SPACE,
    OUTCOMES,
    check_drawn,
    check_round_trip,
    draw_case,
    drawn_case,
)

#: examples per class: the default run takes about 40 s on one core
EXAMPLES = 80
FAST = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])
#: the project's long profile (tests/conftest.py, --slow): its examples per class, about 2 minutes a class
LONG = settings(settings.get_profile("long"), database=None, suppress_health_check=[HealthCheck.too_slow])


def _check(data: st.DataObject, cls: str) -> None:
    case, dtype = draw_case(cls, lambda values: data.draw(st.sampled_from(values)))
    outcome = check_drawn(case, dtype)
    assert outcome in OUTCOMES
    if cls == "DDIMInverseScheduler" and outcome == "equal":
        errors = check_round_trip(case, dtype)  # equal decodes (asserted): the same reconstruction error
        if errors is not None and dtype == torch.float64:  # (float32: the decode amplifies each side's rounding)
            assert math.isclose(*errors, rel_tol=1e-8, abs_tol=1e-12)


@pytest.mark.parametrize("cls", list(CONFIG_SPACE))
@FAST
@given(data=st.data())
def test_drawn_config_is_reproduced_or_refused_by_name(cls: str, data: st.DataObject) -> None:
    _check(data, cls)


@pytest.mark.slow
@pytest.mark.parametrize("cls", list(CONFIG_SPACE))
@LONG
@given(data=st.data())
def test_drawn_config_is_reproduced_or_refused_by_name_long(cls: str, data: st.DataObject) -> None:
    _check(data, cls)


def test_the_space_is_every_routed_class_with_every_option() -> None:
    """Each class sample_like or encode_like routes is drawn, over every parameter of its ``__init__``, each
    with at least two values (one where diffusers accepts only one), among them the class's default."""
    import inspect

    import diffusers

    from flowdiff.models.pipelines import PLANNED_SCHEDULERS

    assert set(CONFIG_SPACE) == {*PLANNED_SCHEDULERS, "DDIMInverseScheduler"}
    for cls, space in CONFIG_SPACE.items():
        params = inspect.signature(getattr(diffusers, cls).__init__).parameters
        assert set(space) == set(params) - {"self", "kwargs"}, cls
        for key, values in space.items():
            default = params[key].default
            assert len(values) >= 2 or key == "time_shift_type", (cls, key)
            assert default in values or (key == "trained_betas" and None in values), (cls, key, default)


def test_the_rule_catches_a_wrong_result(monkeypatch) -> None:
    """check_drawn fails a route whose result differs: the same DPM-Solver config run with the other
    final-step order (``lower_order_final`` flipped under 15 steps) is caught."""
    import solvers
    from flowdiff.tools import scheduler_suite

    case = drawn_case("DPMSolverMultistepScheduler", {"final_sigmas_type": "sigma_min"}, 8)
    assert check_drawn(case, torch.float32) == "equal"
    original = scheduler_suite.run_case
    monkeypatch.setattr(scheduler_suite, "run_case",
                        lambda case, dtype, **kwargs: original(case, dtype, solver=solvers.get("dpmpp_2m"), **kwargs))
    with pytest.raises(AssertionError, match="relative difference"):
        check_drawn(case, torch.float32)


@pytest.mark.parametrize("error", [ValueError("cannot do this"), IndexError("index 10 is out of bounds")])
def test_the_rule_catches_a_refusal_that_names_nothing_and_a_crash(monkeypatch, error) -> None:
    from flowdiff.tools import scheduler_suite

    def fail(case, dtype, **kwargs):
        raise error

    monkeypatch.setattr(scheduler_suite, "run_case", fail)
    with pytest.raises(AssertionError, match="names no option" if isinstance(error, ValueError) else "IndexError"):
        check_drawn(drawn_case("EulerDiscreteScheduler", {}, 4), torch.float32)
