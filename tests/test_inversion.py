"""Exact encoding through flowdiff: reversible latents, fixed-point inversion, Latent files, metrics."""

import math

import numpy as np
import pytest
import torch

import flowdiff as fd
import solvers
from flowdiff.engine.latent import Latent
from flowdiff.models.analytic import Gaussian, Mixture
from flowdiff.tools import metrics
from flowdiff.tools.testing import assert_fixed_point_converged, assert_round_trip

REVERSIBLE = [("reversible_heun", {}), ("reversible", {}), ("reversible", {"base": "heun"})]
IDS = [f"{n}{o}" for n, o in REVERSIBLE]


@pytest.fixture(scope="module")
def mixture():
    gen = torch.Generator().manual_seed(0)
    centers = torch.rand(8, 1, 4, 4, dtype=torch.float64, generator=gen) * 2 - 1
    model = Mixture(centers, 0.3)
    return model, model.flow(), model.sample(3, generator=gen).clamp(-1, 1)


class CountingEps:
    """A σ-native ε that counts its calls (to check stats.nfe)."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, xbar, sigma):
        self.calls += 1
        return self.model.eps(xbar, sigma)


@pytest.mark.parametrize(("solver", "opts"), REVERSIBLE, ids=IDS)
@pytest.mark.parametrize("grid", ["trailing", "karras"])
@pytest.mark.parametrize("steps", [1, 10, 25])
def test_reversible_round_trip_float64(mixture, solver, opts, grid, steps, device):
    _, flow, x = mixture
    x = x.to(device)
    rt = assert_round_trip(flow, x, atol=1e-10, solver=solvers.get(solver, **opts), steps=steps,
                           grid=grid)
    assert rt.encoded.latent.solver_state is not None and rt.encoded.latent.exact
    assert rt.decoded.x.device == x.device and rt.encoded.latent.solver_state.z.device == x.device


@pytest.mark.parametrize(("solver", "opts"), REVERSIBLE, ids=IDS)
def test_reversible_round_trip_float32(mixture, solver, opts, device):
    _, flow, x = mixture
    x = x.to(device, torch.float32)
    rt = assert_round_trip(flow, x, atol=4 * torch.finfo(torch.float32).eps,
                           solver=solvers.get(solver, **opts), steps=20)
    latent = rt.encoded.latent
    # the model runs in float32; the reversible state is kept in float64, so the images come back to the last bit
    assert rt.decoded.x.dtype == torch.float32 and rt.encoded.x.dtype == torch.float32
    assert latent.dtype == torch.float32 and latent.x.dtype == torch.float64
    assert latent.solver_state.z.dtype == torch.float64
    assert torch.equal(rt.encoded.x, latent.x.float())
    if solver == "reversible_heun":  # on its 2^-40 grid: bit-exact
        assert latent.solver_options == {"quantum": 2.0**-40} and torch.equal(rt.decoded.x, x)


@pytest.mark.parametrize(("solver", "opts"), REVERSIBLE[:2], ids=IDS[:2])
def test_reversible_round_trip_float32_trained_network(solver, opts, device):
    """The shipped network in float32: its large Lipschitz constant amplified float32 state rounding to 3e-5;
    with the float64 state the round trip is within a few float32 ulps (the network's float32 input can round
    the other way when the float64 state recovered by the inverse differs from the encode's in its last bits)."""
    flow = fd.pretrained("digits", device=device)
    x = fd.digits_data("test").images[:4].to(device)
    fed = []
    model = flow.model
    flow.model = lambda inp, t, **kw: (fed.append(inp.dtype), model(inp, t, **kw))[1]
    rt = assert_round_trip(flow, x, atol=16 * torch.finfo(torch.float32).eps,
                           solver=solvers.get(solver, **opts), steps=10)
    assert set(fed) == {torch.float32}  # the network is fed float32 throughout
    if solver == "reversible_heun":  # quantised state: the decode feeds the network bit-identical inputs
        assert torch.equal(rt.decoded.x, x)


@pytest.mark.parametrize(("solver", "opts"), REVERSIBLE, ids=IDS)
def test_reversible_nfe_is_counted_and_at_most_twice_ddim(mixture, solver, opts):
    model, _, x = mixture
    eps = CountingEps(model)
    flow = fd.ProbabilityFlow.from_sigma_field(eps, model.schedule)
    steps = 10
    enc = fd.encode(flow, x, solver=solvers.get(solver, **opts), steps=steps)
    assert enc.stats.nfe == eps.calls
    before = eps.calls
    dec = fd.decode(flow, enc.latent)
    assert dec.stats.nfe == eps.calls - before
    per_step = 1 if solver == "reversible_heun" else 2 * solvers.nfe_for_steps(opts.get("base", "euler"), 1)
    assert dec.stats.nfe == per_step * steps
    if solver == "reversible_heun" or opts.get("base", "euler") == "euler":
        assert enc.stats.nfe <= 2 * steps and dec.stats.nfe <= 2 * steps  # DDIM spends `steps` each way


def test_reversible_latent_main_tensor_is_ddim_xT(mixture):
    """x_T of a reversible encode is the DDIM-scale latent: close to an accurate encode's x_T."""
    model, flow, x = mixture
    enc = fd.encode(flow, x, solver="reversible_heun", steps=60, grid="karras")
    ref = fd.encode(flow, x, solver="rk4", steps=60, grid="karras")
    assert enc.latent.x is enc.x
    assert (enc.x - ref.x).abs().max().item() < 1e-2  # (Euler at 60 steps: 0.1 off)
    assert enc.latent.solver_state.t == enc.sigmas[-1]


def test_generate_with_reversible_solvers_from_noise():
    model = Gaussian(torch.zeros(1, 2, 2), torch.tensor([0.1, 0.2, 0.3, 0.4]))
    flow = model.flow()
    z = torch.randn(2, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    sig = fd.make_sigmas(flow.schedule, "karras", 40)
    exact = model.solution(z * math.sqrt(1 + sig[0] ** 2), sig[0], 0.0)
    errs = []
    for steps in (20, 40):
        sig = fd.make_sigmas(flow.schedule, "karras", steps)
        errs.append((fd.generate(flow, z, solver="reversible_heun", grid=sig).x - exact).abs().max().item())
    assert errs[1] < errs[0] < 0.05


def test_latent_save_load_is_bit_exact(mixture, tmp_path):
    _, flow, x = mixture
    for solver, opts in REVERSIBLE[:2]:
        enc = fd.encode(flow, x, solver=solvers.get(solver, **opts), steps=7, grid="karras")
        path = tmp_path / f"{solver}.safetensors"
        enc.latent.save(path)
        back = Latent.load(path)
        assert torch.equal(back.x, enc.latent.x) and np.array_equal(back.sigmas, enc.latent.sigmas)
        assert back.solver == enc.latent.solver and back.solver_options == enc.latent.solver_options
        assert back.solver_state.t == enc.latent.solver_state.t
        assert torch.equal(back.solver_state.z, enc.latent.solver_state.z)
        assert torch.equal(fd.decode(flow, back).x, fd.decode(flow, enc.latent).x)
    # a float32 encode: the float64 state and the images' dtype both survive the file
    enc = fd.encode(flow, x.float(), solver="reversible_heun", steps=7)
    enc.latent.save(tmp_path / "f32.safetensors")
    back = Latent.load(tmp_path / "f32.safetensors")
    assert back.dtype == torch.float32 and back.x.dtype == torch.float64 and torch.equal(back.x, enc.latent.x)
    dec = fd.decode(flow, back)
    assert dec.x.dtype == torch.float32 and torch.equal(dec.x, fd.decode(flow, enc.latent).x)


def test_latent_load_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a flowdiff latent"):
        Latent.load(tmp_path / "other.safetensors")


def test_decode_refuses_mismatched_settings(mixture):
    _, flow, x = mixture
    latent = fd.encode(flow, x, solver="reversible_heun", steps=5).latent
    with pytest.raises(ValueError, match="encoded with solver 'reversible_heun'"):
        fd.decode(flow, latent, solver="euler")
    with pytest.raises(ValueError, match="encoded with 5 steps"):
        fd.decode(flow, latent, steps=6)
    with pytest.raises(ValueError, match="grid='karras' builds the σ grid"):
        fd.decode(flow, latent, grid="karras")
    with pytest.raises(ValueError, match="grid= .* differs from the grid this latent was encoded on"):
        fd.decode(flow, latent, grid=fd.make_sigmas(flow.schedule, "karras", 5))
    # the encode's own arguments are accepted, and retrace it bit for bit
    exact = fd.decode(flow, latent).x
    for agreeing in (dict(grid="trailing"), dict(grid="trailing", steps=5), dict(grid=latent.sigmas),
                     dict(solver="reversible_heun", steps=5)):
        assert torch.equal(fd.decode(flow, latent, **agreeing).x, exact), agreeing
    wrapped = fd.encode(flow, x, solver=solvers.get("reversible", coupling=0.99), steps=5).latent
    with pytest.raises(ValueError, match=r"encoded with solver options \{'coupling': 0.99\}"):
        fd.decode(flow, wrapped, solver=solvers.get("reversible", coupling=0.999))
    with pytest.raises(ValueError, match="encoded with 5 steps"):
        latent.check_decode(steps=4)
    with pytest.raises(ValueError, match="encoded on the grid"):
        latent.check_decode(sigmas=np.linspace(0, 1, 6))


def test_latent_validation(mixture):
    _, flow, x = mixture
    latent = fd.encode(flow, x, solver="reversible_heun", steps=3).latent
    with pytest.raises(ValueError, match="strictly increasing"):
        Latent(latent.x, latent.sigmas[::-1], "reversible_heun")
    with pytest.raises(TypeError, match="Latent.x"):
        Latent(np.zeros(3), latent.sigmas, "euler")
    bad_state = latent.solver_state._replace(z=latent.solver_state.z[:1])
    with pytest.raises(ValueError, match="shape"):
        Latent(latent.x, latent.sigmas, "reversible_heun", {}, bad_state)
    with pytest.raises(ValueError, match="σ_max"):
        Latent(latent.x, latent.sigmas, "reversible_heun", {}, latent.solver_state._replace(t=1.0))
    with pytest.raises(TypeError, match="ReversibleState"):
        Latent(latent.x, latent.sigmas, "reversible_heun", {}, (1.0, latent.x))
    with pytest.raises(TypeError, match="Latent.dtype must be a floating-point torch.dtype"):
        Latent(latent.x, latent.sigmas, "reversible_heun", {}, latent.solver_state, dtype=torch.int64)


# -- fixed-point inversion --------------------------------------------------------------------

@pytest.mark.parametrize("solver", ["euler", "heun", "midpoint"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fixed_point_plain_decode_reproduces_images(mixture, solver, dtype, device):
    _, flow, x = mixture
    x = x.to(device, dtype)
    enc = fd.encode(flow, x, solver=fd.Inversion("fixed_point", solver=solver), steps=10)
    assert_fixed_point_converged(enc)
    assert enc.latent.solver_state is None and enc.latent.inversion == "fixed_point"
    plain = fd.decode(flow, enc.x, solver=solver, steps=10)  # a plain tensor, the standard decode
    via_latent = fd.decode(flow, enc.latent)
    assert torch.equal(plain.x, via_latent.x)
    tol = 1e-12 if dtype == torch.float64 else 64 * torch.finfo(torch.float32).eps
    assert (plain.x - x).abs().max().item() <= tol
    # an ordinary encode with the same solver is much further off: the inversion is what makes it exact
    naive = fd.decode(flow, fd.encode(flow, x, solver=solver, steps=10).latent)
    assert (naive.x - x).abs().max().item() > 1e3 * tol


def test_fixed_point_latent_refuses_another_final_step(mixture):
    _, flow, x = mixture
    enc = fd.encode(flow, x, solver=fd.Inversion("fixed_point", solver="heun"), steps=5)
    assert enc.latent.final_euler is True
    with pytest.raises(ValueError, match="final_euler=True"):
        fd.decode(flow, enc.latent, grid=fd.Grid(final_euler=False))
    other = fd.encode(flow, x, solver=fd.Inversion("fixed_point", {"final_euler": False}, solver="heun"), steps=5)
    back = fd.decode(flow, other.x, solver="heun", steps=5, grid=fd.Grid(final_euler=False))
    assert (back.x - x).abs().max().item() <= 1e-12


def test_fixed_point_each_step_reaches_its_tolerance(mixture):
    """Recompute every decode step from the encode's trajectory: each lands on its target within tol."""
    _, flow, x = mixture
    traj = [x]
    tol = 1e-10
    enc = fd.encode(flow, x, solver=fd.Inversion("fixed_point", {"tol": tol}, solver="heun"), steps=6, grid="karras",
                    callback=lambda s: traj.append(s.xbar))
    sig = enc.sigmas
    f = flow.field()
    for n in range(len(sig) - 1):
        method = "euler" if n == 0 else "heun"  # the decode's last step into σ = 0 is Euler (final_euler)
        landed = solvers.get(method).step(f, sig[n + 1], sig[n], traj[n + 1], None).y
        residual = ((landed - traj[n]).abs() / (1 + traj[n].abs())).max().item()
        assert residual <= tol
        assert residual == pytest.approx(enc.stats.extra["residuals"][n], rel=1e-3, abs=1e-15)  # as reported


def test_fixed_point_stats(mixture):
    model, _, x = mixture
    for method in ("hybrid", "newton", "anderson"):
        eps = CountingEps(model)
        flow = fd.ProbabilityFlow.from_sigma_field(eps, model.schedule)
        enc = fd.encode(flow, x, solver=fd.Inversion("fixed_point", {"method": method}), steps=20)
        extra = enc.stats.extra
        assert extra["method"] == method and extra["unconverged"] == []
        assert enc.stats.nfe == eps.calls == sum(extra["evaluations_per_step"])
        assert len(extra["iterations_per_step"]) == 20 and extra["iterations"] == sum(extra["iterations_per_step"])
    assert enc.stats.nfe == 1 + extra["iterations"]  # Anderson on Euler: one evaluation an iteration, one to start
    plain = fd.encode(flow, x, solver=fd.Inversion("fixed_point", {"method": "anderson", "anderson": 0}), steps=20)
    assert plain.stats.extra["iterations"] >= extra["iterations"]


class ClampedDenoiser:
    """A σ-native ε whose denoiser x̄ − σ·ε is x̄ clamped to [−1, 1], counting its calls: its Euler steps from σ into
    σ = 0 reach only [−1, 1]."""

    def __init__(self):
        self.calls = 0

    def eps(self, xbar, sigma):
        return (xbar - xbar.clamp(-1, 1)) / sigma if sigma > 0 else torch.zeros_like(xbar)

    def __call__(self, xbar, sigma):
        self.calls += 1
        return self.eps(xbar, sigma)


def test_fixed_point_nonconvergence_names_step_and_residual(mixture):
    """One Euler step from σ_max of a model whose denoiser is clamped to [−1, 1]: an image outside it has no
    preimage, and the inversion must say so. The mixture's own denoiser is not bounded (it reaches 2.5 from
    x̄ ≈ 6·10⁵, a root at float64 rounding of that scale, which Newton finds): Anderson, which cannot get that far
    in 30 iterations, runs on it (on the clamped model its mixing of equal residuals is singular)."""
    model, mixture_flow, x = mixture
    clamped, mixed = ClampedDenoiser(), CountingEps(model)
    outside = torch.full_like(x, 2.5)
    for method, eps in (("hybrid", clamped), ("newton", clamped), ("anderson", mixed)):
        flow = fd.ProbabilityFlow.from_sigma_field(eps, model.schedule)
        before = eps.calls
        pattern = r"did not converge at step 0 .*residual .* sample\(s\) \[0, 1, 2\]"
        with pytest.raises(solvers.SolveError, match=pattern) as info:
            fd.encode(flow, outside, solver=fd.Inversion("fixed_point", {"max_iter": 30, "method": method}), steps=1)
        assert info.value.step == 0 and info.value.stats.nfe == eps.calls - before
    assert info.value.stats.nfe == 31  # Anderson: 30 iterations of one evaluation, one for the first guess
    with pytest.raises(solvers.SolveError, match="max_iter=1"):
        fd.encode(mixture_flow, x, solver=fd.Inversion("fixed_point", {"max_iter": 1}), steps=20)


def test_fixed_point_keep_lists_the_unconverged_samples(mixture):
    """A model whose denoiser is tanh(x̄): one Euler step into σ = 0 reaches only (−1, 1), so the image at 2.5 has
    no preimage while the others have atanh(x)."""
    _, flow, x = mixture
    saturating = fd.ProbabilityFlow.from_sigma_field(
        lambda xbar, sigma: (xbar - torch.tanh(xbar)) / sigma if sigma > 0 else torch.zeros_like(xbar),
        flow.schedule)
    images = x.clamp(-0.9, 0.9)
    images[1] = 2.5
    with pytest.raises(solvers.SolveError, match=r"sample\(s\) \[1\]"):
        fd.encode(saturating, images, grid=[1.0, 0.0], solver=fd.Inversion("fixed_point"))
    # the kept iterate of sample 1 has no preimage to converge to and grows past the encode's divergence guard
    # (now applied to fixed-point encodes too), so the guard is turned off to look at it
    with pytest.warns(RuntimeWarning, match="1 of 3 sample"):
        enc = fd.encode(saturating, images, grid=[1.0, 0.0], solver=fd.Inversion("fixed_point", {"on_failure": "keep"}),
                        checks=fd.Checks(growth=None))
    assert enc.stats.extra["unconverged"] == [1]
    ok = [0, 2]
    assert (enc.x[ok] * math.sqrt(2.0) - torch.atanh(images[ok])).abs().max().item() <= 1e-12  # x̄ = x_T·√(1+σ²)
    back = fd.decode(saturating, enc.latent)
    assert (back.x[ok] - images[ok]).abs().max().item() <= 1e-14
    assert (back.x[1] - images[1]).abs().min().item() > 1.4  # tanh < 1


def test_fixed_point_never_returns_a_nan_sample(mixture):
    """Even with check_finite=False, a sample whose model output is NaN is reported, by index, not returned."""
    model, _, x = mixture

    def eps(xbar, sigma):
        out = model.eps(xbar, sigma)
        out[1] = float("nan")
        return out

    flow = fd.ProbabilityFlow.from_sigma_field(eps, model.schedule)
    for method in ("hybrid", "newton", "anderson"):
        with pytest.raises(solvers.SolveError, match=r"sample\(s\) \[1\]"):
            fd.encode(flow, x, steps=10, solver=fd.Inversion("fixed_point", {"method": method}),
                      checks=fd.Checks(finite=False))
        with pytest.raises(solvers.SolveError, match="not finite"):
            fd.encode(flow, x, steps=10, solver=fd.Inversion("fixed_point", {"method": method}))


def test_fixed_point_newton_inverts_ddim_on_the_trained_network():
    """The last DDIM step of the shipped network (the denoiser at σ₁ = 0.34) has a nearly singular Jacobian and the
    fixed-point map has spectral radius > 1: Anderson mixing fails, Newton–Krylov (alone, or after Anderson in the
    default hybrid) finds the preimage, and plain DDIM decoding then returns held-out digits to float64 rounding."""
    flow = fd.pretrained("digits")
    flow.model.double()
    x = fd.digits_data("test").images[:2].double()  # two held-out digits whose DDIM preimage Newton finds
    with pytest.raises(solvers.SolveError, match="did not converge at step 0"):
        fd.encode(flow, x, solver=fd.Inversion("fixed_point", {"method": "anderson", "max_iter": 50}), steps=10)
    for method in ("hybrid", "newton"):
        enc = fd.encode(flow, x, solver=fd.Inversion("fixed_point", {"method": method}), steps=10)
        assert_fixed_point_converged(enc)
        ddim = fd.decode(flow, enc.x, solver="euler", steps=10)  # the standard DDIM decode of a plain tensor
        assert (ddim.x - x).abs().max().item() <= 1e-12


def test_fixed_point_on_held_out_digits_converges_or_reports_each_samples_residual():
    """The shipped model in float32 on 16 held-out digits, 10 DDIM steps. The step into σ = 0 (the denoiser at
    σ₁ = 0.34) does not reach every image: for some digits the residual has only singular local minima (the
    Jacobian's smallest singular value falls to ~1e-9 there). With on_failure="keep" every sample either meets tol
    and decodes back, or is listed with its least residual, which is what its plain decode step leaves."""
    flow = fd.pretrained("digits")
    x = fd.digits_data("test").images[:16].float()
    traj = [x]
    with pytest.warns(RuntimeWarning, match=r"kept at their least-residual iterate: sample \(residual\)") as record:
        enc = fd.encode(flow, x, solver=fd.Inversion("fixed_point", {"on_failure": "keep"}), steps=10,
                        callback=lambda s: traj.append(s.xbar))
    extra = enc.stats.extra
    tol, residuals, unconverged = extra["tol"], extra["sample_residuals"], extra["unconverged"]
    assert len(residuals) == 16 and all(math.isfinite(r) for r in residuals)
    assert unconverged == [i for i, r in enumerate(residuals) if not r <= tol]
    assert len(unconverged) < 8, residuals   # most held-out digits have a preimage
    for i in unconverged:
        assert f"{i} ({residuals[i]:.3g})" in str(record[0].message)
    # each sample's reported residual is the largest of its steps' residuals, recomputed from the trajectory
    sig, f = enc.sigmas, flow.field()
    per_step = []
    for n in range(len(sig) - 1):
        method = "euler"   # the final step into σ = 0 is Euler too
        landed = solvers.get(method).step(f, sig[n + 1], sig[n], traj[n + 1], None).y
        per_step.append(((landed - traj[n]).abs() / (1 + traj[n].abs())).flatten(1).amax(1).double())
    recomputed = torch.stack(per_step).amax(0)
    torch.testing.assert_close(recomputed, torch.tensor(residuals, dtype=torch.float64), rtol=1e-2, atol=2 * tol)
    # converged samples come back through the plain DDIM decode; the others do not
    back = fd.decode(flow, enc.latent).x
    err = (back - x).flatten(1).abs().amax(1)
    ok = [i for i in range(16) if i not in unconverged]
    assert float(err[ok].max()) <= 1e-4
    assert all(float(err[i]) > 1e-4 for i in unconverged)


def test_fixed_point_bad_options(mixture):
    _, flow, x = mixture
    for opts, err, pat in [({"tol": 0.0}, ValueError, "tol"), ({"anderson": -1}, ValueError, "anderson"),
                           ({"max_iter": 0}, ValueError, "max_iter"), ({"final_euler": 1}, TypeError, "final_euler"),
                           ({"method": "broyden"}, ValueError, "method must be one of 'hybrid', 'newton', 'anderson'"),
                           ({"krylov_dim": 0}, ValueError, "krylov_dim"),
                           ({"on_failure": "ignore"}, ValueError, "on_failure must be one of 'raise', 'keep'"),
                           ({"bogus": 1}, TypeError, "bogus")]:
        with pytest.raises(err, match=pat):
            fd.encode(flow, x, steps=3, solver=fd.Inversion("fixed_point", opts))
    with pytest.raises(ValueError, match="reversible"):
        fd.encode(flow, x, solver=fd.Inversion("fixed_point", solver="reversible_heun"), steps=3)
    with pytest.raises(ValueError, match="ddim_inverse"):
        fd.encode(flow, x, solver=fd.Inversion("fixed_point", solver="ddim_inverse"), steps=3)


# -- metrics --------------------------------------------------------------------------------

def test_metrics_on_constructed_errors():
    x = torch.rand(4, 3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    delta = torch.tensor([1e-1, 1e-3, 1e-6, 0.0], dtype=torch.float64)
    y = x + 2 * delta[:, None, None, None]  # a [0, 1]-scale error of delta per pixel
    per = metrics.mse(x, y, reduction="none")
    assert torch.allclose(per, delta**2, rtol=1e-6, atol=1e-30)
    assert torch.allclose(metrics.max_abs_error(x, y, reduction="none"), delta, rtol=1e-6)
    p = metrics.psnr(x, y, reduction="none")
    assert torch.allclose(p[:3], -20 * torch.log10(delta[:3]), rtol=1e-6) and math.isinf(p[3].item())
    r = metrics.reconstruction(x[:3], y[:3])
    assert r.mse == pytest.approx(float((delta[:3] ** 2).mean()), rel=1e-6)
    assert r.max_abs == pytest.approx(0.1, rel=1e-6)
    assert metrics.mse(x * 0.5 + 0.5, y * 0.5 + 0.5, data_range=(0, 1)).item() == pytest.approx(per.mean().item())


def test_metrics_bad_input():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="same shape"):
        metrics.mse(x, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="data_range"):
        metrics.psnr(x, x, data_range=(1, 1))
    with pytest.raises(ValueError, match="reduction"):
        metrics.mse(x, x, reduction="sum")
    with pytest.raises(TypeError, match="floating-point"):
        metrics.mse(x.long(), x.long())
