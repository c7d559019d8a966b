import torch

from rankwise.compress.allocate import MatrixShape, loss_aware_ranks, total_params, uniform_ranks
from rankwise.compress.pipeline import compress_model
from helpers_methods import calib_ids, config, model


def test_budget_goes_where_truncation_loses_least():
    # same shapes, same energy; "fast" decays quickly (its tail costs little), "slow" barely decays
    shapes = {"fast": MatrixShape(64, 64), "slow": MatrixShape(64, 64)}
    i = torch.arange(64, dtype=torch.float64)
    spectra = {"fast": torch.exp(-i / 4), "slow": torch.exp(-i / 64)}
    ranks = loss_aware_ranks(shapes, spectra, ratio=0.5)
    assert ranks["fast"] < ranks["slow"]
    dense = sum(s.dense_params for s in shapes.values())
    assert total_params(shapes, ranks) <= 0.5 * dense


def test_predicted_loss_below_uniform_at_the_same_budget():
    torch.manual_seed(0)
    shapes = {f"m{j}": MatrixShape(96, 64) for j in range(6)}
    spectra = {n: torch.rand(64, dtype=torch.float64) ** (1 + j) for j, n in enumerate(shapes)}

    def loss(ranks):  # relative output error dropped by each matrix (what loss-aware minimises)
        out = 0.0
        for n, s in spectra.items():
            sq = s.sort(descending=True).values ** 2
            out += float(sq[ranks[n] or 64:].sum() / sq.sum())
        return out
    la, uni = loss_aware_ranks(shapes, spectra, 0.4), uniform_ranks(shapes, 0.4)
    assert total_params(shapes, la) <= total_params(shapes, uni) + max(s.out + s.inp for s in shapes.values())
    assert loss(la) < loss(uni)


def test_loss_aware_hits_budget_with_non_uniform_ranks():
    for target in (0.2, 0.4):
        m = model("llama")
        meta = compress_model(m, calib_ids(), config(ranks="loss-aware", ratio=target))
        assert abs(meta.ratio_achieved - target) <= 0.005
        assert meta.ratio_achieved >= target
        ranks = {}
        for name, spec in meta.modules.items():  # same shape, different ranks: not uniform
            ranks.setdefault((spec.in_features, spec.out_features), set()).add(spec.rank)
        assert any(len(r) > 1 for r in ranks.values())
