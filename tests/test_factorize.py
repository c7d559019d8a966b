"""The math of the three foundation methods, on synthetic layers and correlated data."""
import pytest
import torch

from calib.capture import LinearStats
from compress.lowrank import LowRankLinear
from compress.methods import get_method


def correlated_inputs(n: int, tokens: int = 2000, seed: int = 0) -> torch.Tensor:
    """Tokens x n inputs with a strongly non-isotropic covariance (as LLM activations are)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64)
    scales = torch.logspace(1, -2, n, dtype=torch.float64)
    return torch.randn(tokens, n, generator=g, dtype=torch.float64) @ (mix * scales[:, None])


def stats_of(x: torch.Tensor) -> LinearStats:
    s = LinearStats(x.shape[1], want_xtx=True, want_abs=True, device="cpu")
    s.update(x)
    return s


@pytest.mark.parametrize("method", ["svd", "asvd", "svd-llm"])
def test_full_rank_reproduces_the_layer(method):
    torch.manual_seed(0)
    m, n = 24, 16
    W = torch.randn(m, n, dtype=torch.float64)
    bias = torch.randn(m, dtype=torch.float64)
    x = correlated_inputs(n, 400)
    dec = get_method(method).decompose(W, stats_of(x))
    B, A = dec.factors(min(m, n))
    layer = LowRankLinear.from_factors(B, A, bias)
    ref = x @ W.T + bias
    assert torch.allclose(layer(x), ref, atol=1e-8 * ref.abs().max())


def test_svd_llm_truncation_error_equals_dropped_singular_values():
    """SVD-LLM's theorem: ||(W - W_k) X^T||_F^2 = sum of the dropped whitened singular values squared."""
    torch.manual_seed(1)
    m, n, k = 20, 32, 7
    W = torch.randn(m, n, dtype=torch.float64)
    x = correlated_inputs(n, 1000)
    stats = stats_of(x)
    dec = get_method("svd-llm").decompose(W, stats)
    B, A = dec.factors(k)
    # covariance is X^T X / tokens, so the output error is measured per token in the same normalisation
    err = ((x @ (W - B @ A).T) ** 2).sum() / stats.count
    dropped = (dec.S[k:] ** 2).sum()
    assert torch.isclose(err, dropped, rtol=1e-8)


@pytest.mark.parametrize("k", [4, 8])
def test_svd_llm_beats_svd_on_data_weighted_error(k):
    torch.manual_seed(2)
    m, n = 32, 32
    W = torch.randn(m, n, dtype=torch.float64)
    x = correlated_inputs(n, 2000)
    errors = {}
    for method in ("svd", "asvd", "svd-llm"):
        B, A = get_method(method).decompose(W, stats_of(x)).factors(k)
        errors[method] = torch.linalg.norm(x @ (W - B @ A).T).item()
    assert errors["svd-llm"] < errors["asvd"] < errors["svd"]


def test_svd_llm_survives_a_singular_covariance():
    """Dead input channels make X^T X singular: the positive-definite fallback must still factorize."""
    torch.manual_seed(3)
    W = torch.randn(8, 12, dtype=torch.float64)
    x = correlated_inputs(12, 500)
    x[:, 3] = 0.0
    x[:, 7] = 0.0
    dec = get_method("svd-llm").decompose(W, stats_of(x))
    B, A = dec.factors(8)
    assert torch.isfinite(B).all() and torch.isfinite(A).all()
    live = [j for j in range(12) if j not in (3, 7)]
    assert torch.allclose((x @ (B @ A).T), x @ W.T, atol=1e-5)
    assert torch.isfinite(A[:, live]).all()
