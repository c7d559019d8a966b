"""Block refinement: the compressed block's factors trained to reproduce the dense block's outputs."""
import copy
import json

import pytest
import torch

from rankwise.compress.lowrank import LowRankLinear
from rankwise.compress.pipeline import compress_model
from rankwise.compress.stages.refine_block import (Refinement, RefineSettings, block_mse, factor_parameters,
                                                   refine_block)
from helpers_methods import calib_ids, config, model
from rankwise.errors import RankwiseWarning

SKIP = ("past_key_values", "past_key_value", "use_cache", "output_attentions")


def block_io(m, ids, layer: int, batch: int = 2):
    """Per batch of `batch` sequences: (input hidden states, output, keyword arguments) of block `layer`."""
    box = {}

    def pre(mod, args, kwargs):
        box["in"], box["kw"] = args[0], {k: v for k, v in kwargs.items() if k not in SKIP}

    def post(mod, args, kwargs, out):
        box["out"] = out[0] if isinstance(out, tuple) else out
    block = m.model.layers[layer]
    handles = [block.register_forward_pre_hook(pre, with_kwargs=True),
               block.register_forward_hook(post, with_kwargs=True)]
    ins, outs, kws = [], [], []
    with torch.no_grad():
        for s in range(0, ids.shape[0], batch):
            m(input_ids=ids[s:s + batch], use_cache=False)
            ins.append(box["in"]), outs.append(box["out"]), kws.append(box["kw"])
    for h in handles:
        h.remove()
    return ins, outs, kws


def compressed_pair():
    dense = model("llama")
    comp = copy.deepcopy(dense)
    compress_model(comp, calib_ids(), config(ratio=0.5))
    return dense, comp


def test_refinement_lowers_held_out_block_error_and_is_deterministic():
    dense, comp = compressed_pair()
    train, held = calib_ids(32, 48, seed=0), calib_ids(8, 48, seed=1)
    layer = 1  # its compressed-stream inputs carry block 0's error too
    x_tr, _, kw_tr = block_io(comp, train, layer, batch=4)
    _, y_tr, _ = block_io(dense, train, layer, batch=4)
    x_ho, _, kw_ho = block_io(comp, held, layer)
    _, y_ho, _ = block_io(dense, held, layer)
    block = comp.model.layers[layer]
    assert factor_parameters(block)
    before = block_mse(block, x_ho, y_ho, kw_ho, "cpu")
    refined = []
    for _ in range(2):
        b = copy.deepcopy(block)
        result = refine_block(b, x_tr, y_tr, kw_tr, "cpu", RefineSettings(steps=40, lr=3e-3, seed=0))
        assert result.kept and result.mse_after < result.mse_before
        refined.append(b)
    after = block_mse(refined[0], x_ho, y_ho, kw_ho, "cpu")
    assert after < 0.9 * before, (before, after)
    for p, q in zip(refined[0].parameters(), refined[1].parameters()):
        assert torch.equal(p, q)  # same seed, same factors
    other = copy.deepcopy(block)
    refine_block(other, x_tr, y_tr, kw_tr, "cpu", RefineSettings(steps=40, lr=3e-3, seed=1))
    assert any(not torch.equal(p, q) for p, q in zip(refined[0].parameters(), other.parameters()))


def test_refinement_that_would_hurt_is_not_kept():
    dense, comp = compressed_pair()
    ids = calib_ids(4, 48)
    x, _, kw = block_io(comp, ids, 0)
    _, y, _ = block_io(dense, ids, 0)
    block = comp.model.layers[0]
    original = copy.deepcopy(block)
    result = refine_block(block, x, y, kw, "cpu", RefineSettings(steps=3, lr=10.0))  # a wild step size
    assert not result.kept and result.mse_after > result.mse_before
    for p, q in zip(block.parameters(), original.parameters()):
        assert torch.equal(p, q)


def test_pipeline_refinement_records_each_block_and_lowers_its_error():
    m = model("llama")
    meta = compress_model(m, calib_ids(), config(ratio=0.5, refine=True, refine_steps=20, refine_lr=3e-3))
    assert any(isinstance(x, LowRankLinear) for x in m.modules())
    blocks = meta.stage_run("block-refine").typed_record(Refinement).blocks
    assert len(blocks) == 2
    assert all(b.mse_after < b.mse_before for b in blocks.values() if b.kept)
    assert any(b.kept for b in blocks.values())
    assert meta.stage_seconds["block-refine"] > 0


def test_a_half_precision_model_refines_in_float32_and_writes_valid_json():
    """fp16 factors trained as they are go NaN at every step (Adam's eps underflows); trained in float32 and
    cast back, refinement lowers the error and every number of the record is finite JSON."""
    m = model("llama").half()
    meta = compress_model(m, calib_ids(), config(ratio=0.5, refine=True, refine_steps=8, refine_lr=3e-3,
                                                 dtype="fp16"))
    record = meta.stage_run("block-refine").typed_record(Refinement)
    assert record.train_dtype == "float32"
    assert any(b.kept for b in record.blocks.values())
    assert all(b.mse_after is not None and b.mse_after < b.mse_before for b in record.blocks.values() if b.kept)
    assert all(p.dtype == torch.float16 for p in m.parameters())
    json.dumps(meta.to_json(), allow_nan=False)  # raises on NaN / Inf


def test_a_stage_reverted_on_every_block_warns_once():
    m = model("llama")
    with pytest.warns(RankwiseWarning) as caught:
        compress_model(m, calib_ids(), config(ratio=0.5, refine=True, refine_steps=3, refine_lr=10.0))
    lines = [str(w.message) for w in caught if issubclass(w.category, RankwiseWarning)]
    assert len(lines) == 1 and "reverted on every block (2)" in lines[0], lines
