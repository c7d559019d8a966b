import torch

from rankwise.compress.methods import get_method
from rankwise.compress.stages.pass_fisher import fisher_pass


class _Stats:
    def __init__(self, fisher):
        self.fisher = fisher


def test_heavily_weighted_row_is_reconstructed_better_than_plain_svd():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(32, 24, generator=g, dtype=torch.float64)
    fisher = torch.ones(32, dtype=torch.float64)
    fisher[5] = 1e4
    k = 4
    B, A = get_method("fwsvd").decompose(W, _Stats(fisher)).factors(k)
    Bs, As = get_method("svd").decompose(W, None).factors(k)
    err_fw = (W - B @ A)[5].norm()
    err_svd = (W - Bs @ As)[5].norm()
    assert err_fw < 0.5 * err_svd


def test_fisher_pass_gives_row_sums_and_leaves_no_gradients():
    from helpers_methods import calib_ids, model
    m = model("llama")
    flags = [p.requires_grad for p in m.parameters()]
    fisher = fisher_pass(m, calib_ids(nsamples=2, seqlen=32), torch.device("cpu"))
    q = fisher["model.layers.0.self_attn.q_proj"]
    assert q.shape == (m.config.hidden_size,) and torch.isfinite(q).all() and (q > 0).all()
    assert all(p.grad is None for p in m.parameters())
    assert [p.requires_grad for p in m.parameters()] == flags
    assert not m.training
