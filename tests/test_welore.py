import torch

from rankwise.compress.numerics import MatrixShape
from rankwise.compress.stages.allocate_welore import welore_ranks
from rankwise.compress.pipeline import compress_model, target_shapes
from helpers_methods import calib_ids, config, model


def test_heavy_tailed_spectrum_loses_more_rank_than_flat():
    shapes = {"heavy": MatrixShape(64, 64), "flat": MatrixShape(64, 64), "mid": MatrixShape(64, 64)}
    i = torch.arange(64, dtype=torch.float64)
    spectra = {"heavy": 1.0 / (i + 1) ** 2, "flat": 1.0 - 0.5 * i / 63, "mid": torch.exp(-i / 16)}
    ranks = welore_ranks(shapes, spectra, ratio=0.5)
    assert ranks["flat"] is None  # a flat spectrum cannot give up half its parameters: kept dense
    assert 1 <= ranks["heavy"] < ranks["mid"] < 64


def test_dense_kept_are_exactly_the_matrices_that_would_not_save():
    shapes = {f"m{j}": MatrixShape(48, 32) for j in range(4)}
    i = torch.arange(32, dtype=torch.float64)
    spectra = {f"m{j}": torch.exp(-i / (2 + j)) for j in range(3)}
    spectra["m3"] = torch.cat([torch.ones(31), torch.zeros(1)]).double()  # every s_hat = 1 but the last
    ranks = welore_ranks(shapes, spectra, ratio=0.3)
    assert {n for n, r in ranks.items() if r is None} == {"m3"}  # its rank 31 > break-even 19.2
    assert all(shapes[n].saves(r) for n, r in ranks.items() if r is not None)


def test_achieved_ratio_within_half_a_point_on_gqa_model():
    m = model("llama")  # 4 heads, 2 KV heads: q/k/v of different shapes
    target = 0.35
    meta = compress_model(m, calib_ids(), config(ranks="welore", ratio=target))
    assert abs(meta.ratio_achieved - target) <= 0.005
    shapes_after = target_shapes(m)  # dense-kept Linears are still plain Linears, and are listed
    assert set(shapes_after) == set(meta.kept_dense)
    ranks = [spec.rank for spec in meta.modules.values()]
    assert len(set(ranks)) > 1  # non-uniform
