"""New stages written here, outside the pipeline, run end to end: a factorizer, a corrector, a block corrector."""
import pytest
import torch

from helpers_methods import calib_ids, config, model
from rankwise.compress.lowrank import LowRankLinear
from rankwise.compress.methods import REGISTRY, Decomposition, Method, register
from rankwise.compress.pipeline import compress_model
from rankwise.compress.stages.base import (BLOCK_CORRECTORS, CORRECTORS, BlockCorrector, Corrector, Statistics,
                                           register_block_corrector, register_corrector)
from rankwise.compress.stages.recipe import Recipe


# --- a factorizer: SVD of W diag(sqrt(diag C)), i.e. columns scaled by each input's RMS -------------------
@register("test-rms-svd")
class RmsScaledSVD(Method):
    statistics = Statistics(xtx=True)

    def decompose(self, weight, stats):
        d = stats.covariance.diagonal().to(weight.device).sqrt().clamp_min(1e-12)
        return Decomposition(weight.double() * d[None, :], undo_right=lambda A: A / d[None, :])


# --- a corrector: a rank-r residual path, the plain truncated SVD of W - B A, paid for inside --ratio ------
@register_corrector("test-residual")
class ResidualSVD(Corrector):
    rank = 2

    def reserved_params(self, shapes):
        return sum(self.rank * (s.out + s.inp) for s in shapes.values())

    def after_factorize(self, work):
        residual = work.weight.double() - work.B.double() @ work.A.double()
        work.lora_B, work.lora_A = Decomposition(residual).factors(self.rank)


# --- a block corrector: records how far the compressed block is from the dense one on its two streams -----
@register_block_corrector("test-block-probe")
class BlockProbe(BlockCorrector):
    seen: list = []

    def correct_block(self, work):
        x_c, x_d, kw = work.inputs.hidden[0], work.dense_inputs.hidden[0], work.inputs.kwargs[work.index][0]
        out_c = work.block(x_c.to(work.device), **kw)
        out_d = work.dense_block(x_d.to(work.device), **kw)
        first = (lambda o: o[0] if isinstance(o, tuple) else o)
        self.seen.append((work.index, sorted(work.factorized), (first(out_c) - first(out_d)).norm().item()))


@pytest.fixture(autouse=True, scope="module")
def _unregister():
    yield
    REGISTRY.pop("test-rms-svd"), CORRECTORS.pop("test-residual"), BLOCK_CORRECTORS.pop("test-block-probe")


def _input_covariance(m, ids, name):
    xs = []
    h = m.get_submodule(name).register_forward_pre_hook(lambda mod, a: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for b in range(0, ids.shape[0], 2):  # the pipeline's batches (config batch_size=2)
            m(input_ids=ids[b:b + 2])
    h.remove()
    x = torch.cat(xs).double()
    return x.T @ x / x.shape[0]


def test_a_factorizer_from_outside_runs_end_to_end_with_its_own_math():
    dense, m, ids = model(), model(), calib_ids()
    meta = compress_model(m, ids, config(method="test-rms-svd", ratio=0.3))
    name = "model.layers.0.self_attn.q_proj"  # the first group: its inputs are the dense model's
    d = _input_covariance(dense, ids, name).diagonal().sqrt()
    W = dense.get_submodule(name).weight.detach().double()
    k = meta.modules[name].rank
    U, S, Vh = torch.linalg.svd(W * d[None, :], full_matrices=False)
    layer = m.get_submodule(name)
    got = layer.B.weight.detach().double() @ layer.A.weight.detach().double()
    torch.testing.assert_close(got, ((U[:, :k] * S[:k]) @ Vh[:k]) / d[None, :], atol=1e-4, rtol=1e-4)
    assert 0.3 <= meta.ratio_achieved < 0.35


def test_a_corrector_from_outside_adds_its_path_inside_the_ratio():
    dense, m, ids = model(), model(), calib_ids()
    cfg = config(method="svd", ratio=0.3)
    meta = compress_model(m, ids, cfg, recipe=Recipe.from_entries([{"stage": "svd"}, {"stage": "test-residual"}]))
    assert 0.3 <= meta.ratio_achieved < 0.35 and meta.compensation_params == sum(
        2 * (s.in_features + s.out_features) for s in meta.modules.values())  # rank-2 paths, inside the ratio
    for name, spec in meta.modules.items():
        layer, W = m.get_submodule(name), dense.get_submodule(name).weight.detach()
        assert isinstance(layer, LowRankLinear) and spec.lora_rank == 2
        base = W - layer.B.weight @ layer.A.weight
        assert (base - layer.lora_B.weight @ layer.lora_A.weight).norm() < base.norm(), name


def test_a_block_corrector_sees_the_compressed_block_and_both_streams():
    m, ids = model(), calib_ids()
    cfg = config(method="svd-llm", ratio=0.3)
    BlockProbe.seen.clear()
    meta = compress_model(m, ids, cfg, recipe=Recipe.from_entries([{"stage": "svd-llm"},
                                                                   {"stage": "test-block-probe"}]))
    assert [s[0] for s in BlockProbe.seen] == [0, 1]
    assert all(len(s[1]) == 7 and s[2] > 0 for s in BlockProbe.seen)  # every Linear factorized, outputs differ
    assert 0 < meta.stage_seconds["test-block-probe"] < sum(meta.stage_seconds.values())
