"""solvers.newton_krylov: the batched Jacobian-free Newton–Krylov root finder (no diffusion involved)."""

import pytest
import torch

import solvers


def test_solves_ill_conditioned_linear_systems_per_sample():
    """F(y) = A_i y − b_i with condition numbers up to 1e4: GMRES with enough vectors solves each exactly."""
    gen = torch.Generator().manual_seed(0)
    n = 12
    q, _ = torch.linalg.qr(torch.randn(3, n, n, dtype=torch.float64, generator=gen))
    s = torch.stack([torch.logspace(0, -k, n, dtype=torch.float64) for k in (0, 2, 4)])
    A = q @ torch.diag_embed(s) @ q.transpose(1, 2)
    y_true = torch.randn(3, n, dtype=torch.float64, generator=gen)
    b = (A @ y_true[:, :, None])[:, :, 0]
    calls = []

    def F(y):
        calls.append(1)
        return (A @ y[:, :, None])[:, :, 0] - b

    res = solvers.newton_krylov(F, [torch.zeros_like(y_true)], scale=torch.ones(1), tol=1e-9, krylov_dim=n)
    assert res.converged.all() and (res.residual <= 1e-9).all()
    assert (res.y - y_true).abs().max().item() < 1e-9 / 1e-4 * 10  # residual tol amplified by at most the condition
    assert res.evaluations == len(calls)


def test_newton_converges_fast_on_a_smooth_nonlinear_problem():
    """y³ + y = c elementwise (one root, Jacobian 3y² + 1 ≥ 1): a handful of Newton iterations to 1e-14."""
    c = torch.linspace(-5, 5, 20, dtype=torch.float64).reshape(4, 5)
    res = solvers.newton_krylov(lambda y: y**3 + y - c, [torch.zeros_like(c)], scale=torch.ones(1), tol=1e-14)
    assert res.converged.all() and res.iterations <= 12
    assert (res.y**3 + res.y - c).abs().max().item() <= 1e-14


def test_restarts_from_the_next_guess_and_reports_samples_without_a_root():
    """F(y) = y² + c: sample 0 (c = −4) has roots ±2; sample 1 (c = +1) has none. From y = 0 the Jacobian is zero,
    the line search fails, and the second guess is used; sample 1 stays unconverged with its best residual."""
    c = torch.tensor([[-4.0], [1.0]], dtype=torch.float64)
    res = solvers.newton_krylov(lambda y: y**2 + c, [torch.zeros_like(c), torch.ones_like(c)],
                                scale=torch.ones(1), tol=1e-12, max_iter=40)
    assert res.converged.tolist() == [True, False]
    assert res.y[0].item() == pytest.approx(2.0, abs=1e-12)
    assert res.residual[1].item() == pytest.approx(1.0, abs=1e-6)  # min of y² + 1
    assert res.restarts >= 1


def test_needs_a_guess():
    with pytest.raises(ValueError, match="initial guess"):
        solvers.newton_krylov(lambda y: y, [], scale=torch.ones(1), tol=1e-6)


def test_a_non_finite_sample_is_restarted_without_disturbing_the_others():
    """Sample 0 starts at NaN (F is NaN there): it counts as unconverged, is restarted from the next guess and
    converges; sample 1 solves as usual."""
    first = torch.tensor([[float("nan")], [3.0]], dtype=torch.float64)
    res = solvers.newton_krylov(lambda y: y**2 - 4.0, [first, torch.ones_like(first)], scale=torch.ones(1),
                                tol=1e-12)
    assert res.converged.tolist() == [True, True] and res.restarts == 1
    assert res.y.flatten().tolist() == pytest.approx([2.0, 2.0], abs=1e-12)


def test_anderson_solves_a_batched_contraction_faster_than_plain_iteration():
    """x = cos(x) per element (a contraction near its root 0.739…): Anderson mixing reaches the root to
    rounding in far fewer evaluations than plain iteration, per sample, and reports its residual."""
    x0 = torch.linspace(-1.0, 1.0, 12, dtype=torch.float64).reshape(3, 4)
    scale = torch.ones_like(x0)
    mixed = solvers.anderson(torch.cos, x0, scale=scale, tol=1e-13, max_iter=100, depth=3)
    plain = solvers.anderson(torch.cos, x0, scale=scale, tol=1e-13, max_iter=100, depth=0)
    root = 0.7390851332151607
    assert float((mixed.y - root).abs().max()) < 1e-12 and bool((mixed.residual <= 1e-13).all())
    assert mixed.iterations < plain.iterations // 3, (mixed.iterations, plain.iterations)
    with pytest.raises(FloatingPointError, match="not finite"):
        solvers.anderson(lambda x: x * float("nan"), x0, scale=scale, tol=1e-10, max_iter=5)
