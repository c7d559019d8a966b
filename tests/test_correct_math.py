"""refit and EoRA (compress/stages/correct_refit.py, correct_eora.py; numerics.target_weight) against their closed forms on small random matrices, float64."""
import torch

from rankwise.calib.stats import InputStats
from rankwise.compress.numerics import target_weight
from rankwise.compress.stages.correct_eora import eora_factors
from rankwise.compress.stages.correct_refit import refit_b

M, N, K, T = 7, 12, 4, 400


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _pair_stats(seed=0) -> tuple[InputStats, torch.Tensor, torch.Tensor]:
    """Statistics of correlated inputs x_c and x_d = x_c + noise (the dense stream differs a little)."""
    g = _gen(seed)
    mix = torch.randn(N, N, generator=g, dtype=torch.float64) * torch.logspace(0, -2, N, dtype=torch.float64)
    xc = torch.randn(T, N, generator=g, dtype=torch.float64) @ mix
    xd = xc + 0.1 * torch.randn(T, N, generator=g, dtype=torch.float64)
    stats = InputStats(N, "cpu", cross=True)
    stats.update(xc, xd)
    return stats, xc, xd


def _rand(*shape, seed):
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64)


def test_refit_is_the_ridge_least_squares_solution():
    stats, xc, xd = _pair_stats()
    W, A, B0 = _rand(M, N, seed=1), _rand(K, N, seed=2), _rand(M, K, seed=3)
    C, G = xc.T @ xc / T, xd.T @ xc / T
    for damp in (1e-9, 0.5):
        lam = damp * (A @ C @ A.T).diagonal().mean()
        want = (W @ G @ A.T + lam * B0) @ torch.linalg.inv(A @ C @ A.T + lam * torch.eye(K, dtype=torch.float64))
        torch.testing.assert_close(refit_b(W, A, stats, damp, B0=B0), want, rtol=1e-9, atol=1e-9)
    # undamped, it minimises the sample loss sum ||B A x_c - W x_d||^2: the gradient vanishes
    B = refit_b(W, A, stats, 1e-12)
    grad = (B @ A @ xc.T - W @ xd.T) @ (A @ xc.T).T
    assert grad.abs().max() < 1e-6 * (W @ xd.T @ (A @ xc.T).T).abs().max()


def test_target_weight_is_w_g_c_inverse_shrunk_toward_w():
    stats, xc, xd = _pair_stats()
    W = _rand(M, N, seed=4)
    C, G = xc.T @ xc / T, xd.T @ xc / T
    torch.testing.assert_close(target_weight(W, stats, 1e-12), W @ G @ torch.linalg.inv(C), rtol=1e-6, atol=1e-6)
    lam = 0.3 * C.diagonal().mean()
    want = W + W @ (G - C) @ torch.linalg.inv(C + lam * torch.eye(N, dtype=torch.float64))
    torch.testing.assert_close(target_weight(W, stats, 0.3), want, rtol=1e-9, atol=1e-9)


def test_eora_is_the_best_rank_r_correction_in_the_data_norm():
    stats, xc, _ = _pair_stats()
    R = _rand(M, N, seed=5)
    C = xc.T @ xc / T
    lam, Q = torch.linalg.eigh(C)
    root = Q @ torch.diag(lam.sqrt()) @ Q.T                       # C^1/2
    U, S, Vh = torch.linalg.svd(R @ root, full_matrices=False)
    for r in (1, 3):
        Bp, Ap = eora_factors(R, stats, r)
        assert Bp.shape == (M, r) and Ap.shape == (r, N)
        best = (U[:, :r] * S[:r]) @ Vh[:r] @ torch.linalg.inv(root)  # Eckart-Young in the whitened space
        torch.testing.assert_close(Bp @ Ap, best, rtol=1e-6, atol=1e-6)
        err = ((R - Bp @ Ap) @ root).norm()                           # = sqrt(E||(R - B'A') x||^2)
        torch.testing.assert_close(err, S[r:].pow(2).sum().sqrt(), rtol=1e-8, atol=1e-8)
