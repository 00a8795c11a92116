"""The keyword surface of generate/encode/decode (issue 22, item 3): at most ten keywords, one way to say each thing.

A removed keyword fails with a TypeError that names its replacement; each new spelling is checked against the
other spelling that still says the same thing (there is no old path left to compare with).
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

import flowdiff
import solvers
from flowdiff.api.sampling import REMOVED
from flowdiff.models.analytic import Gaussian

ENTRY_POINTS = {"generate": flowdiff.generate, "encode": flowdiff.encode, "decode": flowdiff.decode}


def _keywords(fn) -> list[str]:
    return [p.name for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]


def _setup():
    g = torch.Generator().manual_seed(5)
    gauss = Gaussian(torch.randn(6, dtype=torch.float64, generator=g) * 0.3, 0.4)
    noise = torch.randn(3, 6, dtype=torch.float64, generator=g)
    images = gauss.sample(3, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    return gauss.flow(), noise, images


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_at_most_ten_keywords_and_no_removed_one(name):
    kws = _keywords(ENTRY_POINTS[name])
    assert len(kws) <= 10, kws
    assert not set(kws) & set(REMOVED)
    positional = [p.name for p in inspect.signature(ENTRY_POINTS[name]).parameters.values()
                  if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert positional == ["flow", "noise" if name == "generate" else "images" if name == "encode" else "latent"]


def test_a_name_means_one_thing_in_all_three():
    """The keywords the three share have the same default where the meaning is the same."""
    gen, enc, dec = (inspect.signature(f).parameters for f in ENTRY_POINTS.values())
    for k in set(gen) & set(enc):
        assert gen[k].default == enc[k].default or k in ("noise", "images"), k
    assert set(_keywords(flowdiff.decode)) <= set(_keywords(flowdiff.generate))


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("removed", sorted(REMOVED))
def test_each_removed_keyword_is_a_type_error_naming_its_replacement(name, removed):
    flow, noise, _ = _setup()
    with pytest.raises(TypeError, match=rf"{name}\(\) got an unexpected keyword argument '{removed}'") as err:
        ENTRY_POINTS[name](flow, noise, steps=3, **{removed: None})
    assert REMOVED[removed] in str(err.value)


def test_a_misspelt_keyword_is_still_a_type_error():
    flow, noise, _ = _setup()
    with pytest.raises(TypeError, match="generate\\(\\) got an unexpected keyword argument 'stpes'$"):
        flowdiff.generate(flow, noise, stpes=3)


@pytest.mark.parametrize("as_given", [list, np.asarray, lambda s: torch.tensor(s, dtype=torch.float64)])
def test_explicit_sigmas_as_grid_equal_a_grid_holding_them(as_given):
    flow, noise, images = _setup()
    sig = [4.0, 2.0, 0.9, 0.3, 0.0]
    a = flowdiff.generate(flow, noise, solver="heun", grid=as_given(sig))
    b = flowdiff.generate(flow, noise, solver="heun", grid=flowdiff.Grid(sigmas=sig))
    assert torch.equal(a.x, b.x) and a.stats.nfe == b.stats.nfe and np.array_equal(a.sigmas, sig)
    e = flowdiff.encode(flow, images, solver="heun", grid=as_given(sig))
    f = flowdiff.encode(flow, images, solver="heun", grid=flowdiff.Grid(sigmas=sig))
    assert torch.equal(e.x, f.x) and np.array_equal(e.sigmas, sig[::-1])
    # a latent's decode accepts its own grid, in either order
    for given in (sig, sig[::-1]):
        assert torch.equal(flowdiff.decode(flow, e.latent, grid=as_given(given)).x, flowdiff.decode(flow, e.latent).x)


def test_solver_options_travel_with_the_solver():
    flow, noise, images = _setup()
    default = flowdiff.generate(flow, noise, solver="unipc", steps=6)
    assert torch.equal(flowdiff.generate(flow, noise, solver=solvers.get("unipc"), steps=6).x, default.x)
    third = flowdiff.generate(flow, noise, solver=solvers.get("unipc", order=3), steps=6)
    assert not torch.equal(third.x, default.x)  # the option reached the solve
    # the latent records the options, and its decode rebuilds the same solver from them
    enc = flowdiff.encode(flow, images, solver=solvers.get("unipc", order=3), steps=6)
    assert enc.latent.solver == "unipc" and enc.latent.solver_options == {"order": 3}
    back = flowdiff.decode(flow, enc.latent)
    assert torch.equal(back.x, flowdiff.generate(flow, enc.x, solver=solvers.get("unipc", order=3),
                                                 grid=enc.sigmas[::-1].copy()).x)
    assert torch.equal(flowdiff.decode(flow, enc.latent, solver=solvers.get("unipc", order=3)).x, back.x)
    with pytest.raises(ValueError, match=r"encoded with solver options \{'order': 3\}.*\{'order': 2\}"):
        flowdiff.decode(flow, enc.latent, solver=solvers.get("unipc", order=2))


def test_checks_object():
    flow, noise, images = _setup()
    plain = flowdiff.generate(flow, noise, steps=4)
    for checks in (flowdiff.Checks(finite=False), flowdiff.Checks(growth=None), flowdiff.Checks(growth=2e3)):
        assert torch.equal(flowdiff.generate(flow, noise, steps=4, checks=checks).x, plain.x)
    with pytest.raises(solvers.SolveError, match="diverged"):
        flowdiff.generate(flow, noise, steps=4, checks=flowdiff.Checks(growth=1e-3))
    # the default bound is the direction's: 50 for an encode, which Checks() says as "auto"
    enc = flowdiff.encode(flow, images, steps=4, checks=flowdiff.Checks(growth="auto"))
    assert torch.equal(enc.x, flowdiff.encode(flow, images, steps=4, checks=flowdiff.Checks(growth=50.0)).x)
    for bad in (0.0, -1.0, float("inf"), "off", True):
        with pytest.raises(ValueError, match="Checks.growth must be"):
            flowdiff.Checks(growth=bad)
    with pytest.raises(TypeError, match="checks must be a flowdiff.Checks, got dict"):
        flowdiff.generate(flow, noise, steps=4, checks={"finite": False})
    # model= is decode's: refused where it would be ignored, honoured on a latent
    with pytest.raises(ValueError, match=r"Checks\(model=False\) given to encode"):
        flowdiff.encode(flow, images, steps=4, checks=flowdiff.Checks(model=False))
    other = Gaussian(torch.zeros(6, dtype=torch.float64), 0.7).flow()
    with pytest.raises(ValueError, match="model"):
        flowdiff.decode(other, enc.latent)
    assert flowdiff.decode(other, enc.latent, checks=flowdiff.Checks(model=False)).x.shape == images.shape


def test_method_specs_in_solver():
    flow, noise, images = _setup()
    # η = 0 is DDIM: bit for bit the Euler solve
    assert torch.equal(flowdiff.generate(flow, noise, steps=5, solver=flowdiff.Stochastic(0.0)).x,
                       flowdiff.generate(flow, noise, steps=5).x)
    # the fixed-point inversion of a Heun decode: that decode gives the images back
    enc = flowdiff.encode(flow, images, steps=5, solver=flowdiff.Inversion("fixed_point", {"tol": 1e-12},
                                                                           solver="heun"))
    assert enc.latent.solver == "heun"
    back = flowdiff.decode(flow, enc.x, solver="heun", steps=5)
    assert torch.allclose(back.x, images, atol=1e-9)
    with pytest.raises(TypeError, match="Inversion.solver must be"):
        flowdiff.Inversion("fixed_point", solver=3)
    with pytest.raises(TypeError, match="solver must be a registered name, a solvers.Solver"):
        flowdiff.generate(flow, noise, steps=3, solver=3)
