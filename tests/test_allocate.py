"""Uniform rank allocation on a GQA model: per-shape ranks, exact accounting, ratio hit."""
import pytest

from rankwise.compress.numerics import MatrixShape, summarize, total_params
from rankwise.compress.stages.allocate_uniform import uniform_ranks
from rankwise.compress.pipeline import target_shapes
from tiny import tiny_model


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 0.8])
def test_uniform_hits_ratio_within_one_rank_per_matrix_on_gqa(ratio):
    model = tiny_model("llama", layers=2)  # 4 heads, 2 KV heads: k/v are half the size of q/o
    shapes = target_shapes(model)
    ranks = uniform_ranks(shapes, ratio)
    s = summarize(shapes, ranks)
    one_rank_each = sum(sh.out + sh.inp for sh in shapes.values()) / s["params_before"]
    assert s["ratio_achieved"] >= ratio - 1e-12
    assert s["ratio_achieved"] - ratio <= one_rank_each
    q, k, v, o = (ranks[f"model.layers.0.self_attn.{p}_proj"] for p in "qkvo")
    assert k == v and q == o and k != q, "GQA k/v must get their own rank, not q's"
    for name, sh in shapes.items():  # each matrix gives up (about) the same fraction of itself
        assert abs(1 - sh.params(ranks[name]) / sh.dense_params - ratio) <= (sh.out + sh.inp) / sh.dense_params


def test_matrix_that_cannot_save_stays_dense_and_others_compensate():
    shapes = {"wide": MatrixShape(256, 256), "thin": MatrixShape(256, 1)}  # rank 1 stores 257 > 256
    ranks = uniform_ranks(shapes, 0.3)
    # thin stays dense (256 parameters); wide takes the whole cut: the largest rank with the total within 70%
    assert ranks == {"thin": None, "wide": 89}
    kept = total_params(shapes, ranks)
    dense = sum(s.dense_params for s in shapes.values())
    assert kept == 256 + 89 * 512 <= 0.7 * dense < 256 + 90 * 512


def test_rank_multiple_rounds_and_still_hits_ratio():
    model = tiny_model("llama", layers=2)
    shapes = target_shapes(model)
    ranks = uniform_ranks(shapes, 0.3, multiple=8)
    assert all(r % 8 == 0 for r in ranks.values() if r is not None)
    s = summarize(shapes, ranks)
    assert s["ratio_achieved"] >= 0.3
    assert s["ratio_achieved"] - 0.3 <= 8 * sum(sh.out + sh.inp for sh in shapes.values()) / s["params_before"]


def test_bias_is_counted_on_both_sides():
    s = MatrixShape(10, 20, bias=True)
    assert s.dense_params == 210
    assert s.params(3) == 3 * 30 + 10
