"""A refusal says the options the user gave: a one-step DDIM/PNDM loop of zero length blamed ``steps_offset=0``
where the user had given another offset that the spacing does not read (R19's find)."""

import diffusers
import pytest

from flowdiff.engine.scheduler_grids import scheduler_sigmas


@pytest.mark.parametrize("cls", ["DDIMScheduler", "PNDMScheduler"])
def test_zero_length_one_step_names_the_spacing_and_the_offset_it_ignores(cls):
    extra = {"clip_sample": False} if cls == "DDIMScheduler" else {"skip_prk_steps": True}
    sched = getattr(diffusers, cls)(timestep_spacing="linspace", steps_offset=1, set_alpha_to_one=False, **extra)
    said = r"\(timestep_spacing='linspace'; 'linspace' spacing does not add steps_offset\)"
    with pytest.raises(ValueError, match=r"steps=1 with set_alpha_to_one=False, whose one timestep is 0 " + said):
        scheduler_sigmas(sched, 1)


def test_zero_length_one_step_under_leading_says_its_offset():
    sched = diffusers.DDIMScheduler(steps_offset=0, set_alpha_to_one=False, clip_sample=False)
    with pytest.raises(ValueError, match=r"\(timestep_spacing='leading', steps_offset=0\)"):
        scheduler_sigmas(sched, 1)
