"""The math of the three foundation methods, on synthetic layers and correlated data."""
import pytest
import torch

from rankwise.calib.stats import InputStats
from rankwise.compress.lowrank import LowRankLinear
from rankwise.compress.methods import get_method


def correlated_inputs(n: int, tokens: int = 2000, seed: int = 0) -> torch.Tensor:
    """Tokens x n inputs with a strongly non-isotropic covariance (as LLM activations are)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64)
    scales = torch.logspace(1, -2, n, dtype=torch.float64)
    return torch.randn(tokens, n, generator=g, dtype=torch.float64) @ (mix * scales[:, None])


def stats_of(x: torch.Tensor) -> InputStats:
    s = InputStats(x.shape[1], "cpu", xtx=True, abs_mean=True)
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
    dropped = (dec.spectrum[k:] ** 2).sum()
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


@pytest.mark.parametrize("shape", [(30, 70), (70, 30), (40, 40)])
def test_gram_decomposition_matches_lapack_svd(shape):
    """The eigh-of-the-Gram SVD gives LAPACK's singular values, balanced factors built on orthonormal
    singular vectors (B^T B = A A^T = diag S_k) and the Eckart-Young truncation error at every rank,
    for wide, tall and square matrices."""
    from rankwise.compress.numerics import Decomposition
    g = torch.Generator().manual_seed(3)
    m, n = shape
    M = torch.randn(m, n, generator=g, dtype=torch.float64) * torch.logspace(0, -3, n, dtype=torch.float64)
    ref = torch.linalg.svdvals(M)
    assert torch.allclose(Decomposition(M).spectrum, ref, rtol=1e-8, atol=1e-12 * ref[0])  # eigvalsh only
    dec = Decomposition(M)
    for k in (1, min(m, n) // 3, min(m, n)):
        B, A = dec.factors(k)
        assert torch.allclose(B.T @ B, torch.diag(ref[:k]), atol=1e-8 * ref[0])
        assert torch.allclose(A @ A.T, torch.diag(ref[:k]), atol=1e-8 * ref[0])
        err = torch.linalg.matrix_norm(M - B @ A)
        assert torch.isclose(err, ref[k:].square().sum().sqrt(), rtol=1e-6, atol=1e-10 * ref[0])
    assert torch.allclose(dec.spectrum, ref, rtol=1e-8, atol=1e-12 * ref[0])


def test_gram_decomposition_of_rank_deficient_and_zero_matrices_stays_finite():
    from rankwise.compress.numerics import Decomposition
    g = torch.Generator().manual_seed(4)
    M = torch.randn(20, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 12, generator=g, dtype=torch.float64)
    B, A = Decomposition(M).factors(12)   # every rank, including the 9 null directions
    assert torch.isfinite(B).all() and torch.isfinite(A).all()
    assert torch.allclose(B @ A, M, atol=1e-10 * M.abs().max())
    B0, A0 = Decomposition(torch.zeros(5, 7)).factors(5)
    assert torch.isfinite(B0).all() and torch.isfinite(A0).all() and (B0 @ A0).abs().max() == 0


def test_one_cholesky_serves_a_group_sharing_its_input():
    """q/k/v share one statistics object: SVD-LLM factors its covariance once and every Linear of the group
    is whitened by that same factor (its cache holds one Cholesky factor, the one of C)."""
    from rankwise.compress.numerics import cholesky_with_fallback
    stats = stats_of(correlated_inputs(16, 200))
    method = get_method("svd-llm")
    for seed in range(3):
        W = torch.randn(8, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        method.decompose(W, stats)
    (factor,) = stats.cache.values()
    assert torch.equal(factor, cholesky_with_fallback(stats.covariance))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the half-precision Gram path is GPU-only")
def test_half_precision_gram_on_gpu_equals_the_float32_gram():
    from rankwise.calib.capture import gram
    x = torch.randn(4096, 256, device="cuda").to(torch.bfloat16)
    ref = x.double().T @ x.double()
    out = gram(x, x)
    assert out.dtype == torch.float32
    assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_plain_svd_runs_no_block_forward_and_ignores_the_calibration_tokens():
    """svd reads no activations: the pipeline's own timer shows no capture, statistics or propagation, and any
    calibration set gives the same factors (the truncated SVD of each weight)."""
    from rankwise.compress.config import CompressConfig
    from rankwise.compress.pipeline import compress_model
    from tiny import tiny_model

    cfg = CompressConfig(model="tiny", method="svd", ratio=0.3, nsamples=2, seqlen=8, device="cpu")
    results = []
    for seed in (0, 1):
        model = tiny_model("llama", seed=0)
        W = model.model.layers[0].mlp.up_proj.weight.detach().double().clone()
        ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(seed))
        meta = compress_model(model, ids, cfg)
        assert set(meta.stage_seconds) == {"factorize"}
        layer = model.model.layers[0].mlp.up_proj
        results.append(layer.B.weight.detach() @ layer.A.weight.detach())
    k = meta.modules["model.layers.0.mlp.up_proj"].rank
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    assert torch.equal(results[0], results[1])
    assert torch.allclose(results[0].double(), (U[:, :k] * S[:k]) @ Vh[:k], atol=1e-5)
