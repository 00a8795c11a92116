"""The option objects and the plug-in table: the everyday keywords and the objects are one and the same solve."""

from __future__ import annotations

import pytest
import torch

import flowdiff
import solvers
from flowdiff.engine.plugins import plugins
from flowdiff.models.analytic import Gaussian


def _setup():
    g = torch.Generator().manual_seed(3)
    gauss = Gaussian(torch.randn(6, dtype=torch.float64, generator=g) * 0.3, 0.4)
    noise = torch.randn(4, 6, dtype=torch.float64, generator=g)
    return gauss.flow(), noise, gauss


def test_the_everyday_budget_beside_a_grid_equals_the_budget_inside_it():
    flow, noise, gauss = _setup()
    flat = flowdiff.generate(flow, noise, solver="dpmpp_2m", nfe=7,
                             grid=flowdiff.Grid("logsnr", options={"power": 0.7}))
    obj = flowdiff.generate(flow, noise, solver="dpmpp_2m", grid=flowdiff.Grid("logsnr", nfe=7, options={"power": 0.7}))
    assert torch.equal(flat.x, obj.x) and flat.stats.nfe == obj.stats.nfe == 7
    c = flowdiff.generate(flow, noise, steps=6, solver=flowdiff.Stochastic(0.5, generator=11))
    d = flowdiff.generate(flow, noise, grid=flowdiff.Grid(steps=6), solver=flowdiff.Stochastic(0.5, 11))
    assert torch.equal(c.x, d.x)
    images = gauss.sample(2, generator=torch.Generator().manual_seed(0))
    e = flowdiff.encode(flow, images, steps=4, solver=flowdiff.Inversion("fixed_point", {"method": "anderson"}))
    f = flowdiff.encode(flow, images, grid=flowdiff.Grid(steps=4),
                        solver=flowdiff.Inversion("fixed_point", {"method": "anderson"}))
    assert torch.equal(e.x, f.x)


@pytest.mark.parametrize("make,pattern", [
    (lambda: flowdiff.Grid("spiral", steps=3), "unknown grid 'spiral'"),
    (lambda: flowdiff.Grid(steps=3, nfe=4), "steps or nfe, not both"),
    (lambda: flowdiff.Grid(steps=0), "steps must be >= 1"),
    (lambda: flowdiff.Grid(steps=2.5), "steps must be an int"),
    (lambda: flowdiff.Grid(nfe=4, sigmas=[1.0, 0.0]), "nfe= picks the step count"),
    (lambda: flowdiff.Grid(steps=3, options=[("rho", 7)]), "Grid.options must be a mapping"),
    (lambda: flowdiff.Grid(steps=3, final_euler="yes"), "final_euler must be True or False"),
    (lambda: flowdiff.Adaptive(rtol=-1.0), "rtol must be a finite number >= 0"),
    (lambda: flowdiff.Adaptive(rtol=0.0, atol=0.0), "cannot both be 0"),
    (lambda: flowdiff.Adaptive(max_nfe=0), "max_nfe must be >= 1"),
    (lambda: flowdiff.Adaptive(controller="pi"), "StepController"),
    (lambda: flowdiff.Adaptive(sigma_c=float("nan")), "sigma_c must lie in"),
    (lambda: flowdiff.Inversion(options=3), "Inversion.options must be a mapping"),
])
def test_option_objects_validate_once(make, pattern):
    with pytest.raises((TypeError, ValueError), match=pattern):
        make()


def test_two_things_said_where_one_is_meant_are_refused():
    flow, noise, gauss = _setup()
    with pytest.raises(ValueError, match=r"steps=4 beside grid=Grid\(...\), which fixes its own steps"):
        flowdiff.generate(flow, noise, grid=flowdiff.Grid(steps=3), steps=4)
    with pytest.raises(ValueError, match=r"nfe=4 beside grid=explicit σ"):
        flowdiff.generate(flow, noise, grid=[2.0, 1.0, 0.0], nfe=4)
    with pytest.raises(ValueError, match="steps=3 beside adaptive="):
        flowdiff.generate(flow, noise, solver="dopri5", steps=3, adaptive=flowdiff.Adaptive(rtol=1e-3))
    with pytest.raises(ValueError, match="grid='karras' and adaptive="):
        flowdiff.generate(flow, noise, solver="dopri5", grid="karras", adaptive=flowdiff.Adaptive(rtol=1e-3))
    with pytest.raises(ValueError, match="is an encoding method; use it with flowdiff.encode"):
        flowdiff.generate(flow, noise, steps=3, solver=flowdiff.Inversion())
    with pytest.raises(ValueError, match="a latent decodes with the solver that encoded it"):
        flowdiff.decode(flow, noise, steps=3, solver=flowdiff.Stochastic(0.5))


def test_the_plugin_table_decides_directions():
    flow, noise, _ = _setup()
    assert set(plugins(direction="encode")) >= {"ddim_inverse", "fixed_point"}
    assert "eta" in plugins(kind="procedure", direction="generate")
    with pytest.raises(ValueError, match="'ddim_inverse' is an encoding method only"):
        flowdiff.generate(flow, noise, solver="ddim_inverse", steps=3)
    with pytest.raises(ValueError, match="unknown encode procedure 'newton'; accepted: 'fixed_point'"):
        flowdiff.encode(flow, noise, steps=3, solver=flowdiff.Inversion("newton"))
    enc = flowdiff.encode(flow, noise, solver="ddim_inverse", steps=3)
    assert enc.latent.solver == "ddim_inverse"
    assert flowdiff.decode(flow, enc.latent).solver == "euler"  # the table says how its latents decode


def test_one_callback_record_for_every_kind_of_solve():
    flow, noise, gauss = _setup()
    seen: dict[str, list] = {}
    for label, run in {
        "fixed": lambda cb: flowdiff.generate(flow, noise, solver="heun", steps=4, callback=cb),
        "data": lambda cb: flowdiff.generate(flow, noise, solver="dpmpp_2m", steps=4, callback=cb),
        "adaptive": lambda cb: flowdiff.generate(flow, noise, solver="dopri5",
                                                 adaptive=flowdiff.Adaptive(rtol=1e-3, atol=1e-3),
                                                 callback=cb),
        "reversible": lambda cb: flowdiff.encode(flow, noise, solver="reversible_heun", steps=4, callback=cb),
        "eta": lambda cb: flowdiff.generate(flow, noise, steps=4, solver=flowdiff.Stochastic(1.0, generator=0),
                                            callback=cb),
    }.items():
        seen[label] = []
        run(seen[label].append)
        assert all(isinstance(s, flowdiff.StepState) for s in seen[label]), label
        assert [s.step for s in seen[label]] == list(range(len(seen[label]))), label
        for s in seen[label]:  # x is the VP-scaled x̄ at the σ reached
            assert torch.allclose(s.x * (1 + s.sigma**2) ** 0.5, s.xbar, rtol=1e-12, atol=1e-12), label
    assert seen["fixed"][-1].sigma == 0.0 and seen["data"][-1].sigma == 0.0
    assert seen["data"][-1].denoised is not None  # at σ = 0 the denoised image is the image


def test_failures_are_reported_in_sigma_whatever_the_variables():
    flow, noise, gauss = _setup()

    def nan_below_one(xbar, sigma):
        return gauss.eps(xbar, sigma) * (float("nan") if 0 < sigma < 1.0 else 1.0)

    bad = flowdiff.ProbabilityFlow.from_sigma_field(nan_below_one, flow.schedule)
    for solver in ("euler", "dpmpp_2m"):  # σ and data variables (ρ = 1/σ) alike
        with pytest.raises(solvers.SolveError, match=r"step \d+ \(σ [0-9.]+ -> [0-9.]+\) produced non-finite"):
            flowdiff.generate(bad, noise, solver=solver, steps=10, grid="karras")
