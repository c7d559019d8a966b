"""Block refinement: the compressed block's factors trained to reproduce the dense block's outputs."""
import copy
import json

import pytest
import torch

from rankwise.compress.lowrank import LowRankLinear
from rankwise.compress.pipeline import compress_model
from rankwise.compress.stages.refine_block import (Refinement, RefineSettings, block_mse, factor_parameters,
                                                   refine_block)
from rankwise.compress.training import holdout_split
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
    assert sum(isinstance(x, LowRankLinear) for x in m.modules()) == len(meta.modules) == 14
    blocks = meta.stage_run("block-refine").typed_record(Refinement).blocks
    assert sorted(blocks) == ["model.layers.0", "model.layers.1"]
    assert all(b.kept and b.mse_after < b.mse_before for b in blocks.values())
    assert meta.stage_seconds["block-refine"] > 0


def test_a_half_precision_model_refines_in_float32_and_writes_valid_json():
    """fp16 factors trained as they are go NaN at every step (Adam's eps underflows); trained in float32 and
    cast back, refinement lowers the error and every number of the record is finite JSON."""
    m = model("llama").half()
    meta = compress_model(m, calib_ids(), config(ratio=0.5, refine=True, refine_steps=8, refine_lr=3e-3,
                                                 dtype="fp16"))
    record = meta.stage_run("block-refine").typed_record(Refinement)
    assert record.train_dtype == "float32"
    assert len(record.blocks) == 2
    assert all(b.kept and b.mse_after is not None and b.mse_after < b.mse_before for b in record.blocks.values())
    assert all(p.dtype == torch.float16 for p in m.parameters())
    json.dumps(meta.to_json(), allow_nan=False)  # raises on NaN / Inf


def test_a_stage_reverted_on_every_block_warns_once():
    m = model("llama")
    with pytest.warns(RankwiseWarning) as caught:
        compress_model(m, calib_ids(), config(ratio=0.5, refine=True, refine_steps=3, refine_lr=10.0))
    lines = [str(w.message) for w in caught if issubclass(w.category, RankwiseWarning)]
    assert len(lines) == 1 and "reverted on every block (2)" in lines[0], lines


def small_block_set(layer: int = 1, windows: int = 16, batch: int = 2):
    """A compressed block, its inputs / dense targets / keyword arguments over `windows` calibration windows."""
    dense, comp = compressed_pair()
    ids = calib_ids(windows, 48, seed=3)
    x, _, kw = block_io(comp, ids, layer, batch)
    _, y, _ = block_io(dense, ids, layer, batch)
    return comp.model.layers[layer], x, y, kw


def held_out_error(block, x, y, kw, settings: RefineSettings) -> float:
    _, held = holdout_split(len(x), settings.holdout, settings.seed)
    return block_mse(block, [x[i] for i in held], [y[i] for i in held], [kw[i] for i in held], "cpu")


@pytest.mark.parametrize("lr", [3e-3, 3e-2, 10.0])
def test_held_out_refinement_never_ends_above_the_closed_form_on_the_held_out_batches(lr):
    block, x, y, kw = small_block_set()
    settings = RefineSettings(steps=60, lr=lr, holdout=0.25, patience=3, eval_every=4, warmup=0.1, clip=1.0)
    closed_form = held_out_error(block, x, y, kw, settings)
    result = refine_block(block, x, y, kw, "cpu", settings)
    final = held_out_error(block, x, y, kw, settings)
    assert result.heldout_before == pytest.approx(closed_form, rel=1e-6)
    assert final <= closed_form
    assert result.heldout_windows == 4 and result.train_windows == 12
    if result.kept:
        assert final < closed_form and final == pytest.approx(result.heldout_after, rel=1e-6)
    else:
        assert final == closed_form  # reverted to the closed form's weights
    if lr == 10.0:
        assert not result.kept


def test_early_stopping_stops_before_the_cap_when_the_held_out_error_stops_falling():
    block, x, y, kw = small_block_set(windows=8)
    cap = 400
    stopped = refine_block(copy.deepcopy(block), x, y, kw, "cpu",
                           RefineSettings(steps=cap, lr=3e-2, holdout=0.25, patience=3, eval_every=3))
    assert stopped.steps < cap, stopped
    full = refine_block(copy.deepcopy(block), x, y, kw, "cpu",
                        RefineSettings(steps=60, lr=3e-2, holdout=0.25, eval_every=3))
    assert full.steps == 60
    epochs = refine_block(copy.deepcopy(block), x, y, kw, "cpu", RefineSettings(steps=cap, epochs=5, holdout=0.25))
    assert epochs.steps == 5 * 3  # 4 batches, one held out: 3 training batches per epoch


def test_held_out_refinement_is_deterministic_for_a_seed():
    block, x, y, kw = small_block_set(windows=12)
    settings = RefineSettings(steps=30, lr=3e-3, holdout=0.34, patience=2, eval_every=2, warmup=0.2, clip=0.5,
                              weight_decay=0.01, norms=True)
    runs = []
    for seed in (0, 0, 5):
        b = copy.deepcopy(block)
        runs.append((refine_block(b, x, y, kw, "cpu", RefineSettings(**{**settings.__dict__, "seed": seed})), b))
    (r0, b0), (r1, b1), (r2, b2) = runs
    assert (r0.steps, r0.heldout_after, r0.mse_after, r0.kept) == (r1.steps, r1.heldout_after, r1.mse_after, r1.kept)
    assert all(torch.equal(p, q) for p, q in zip(b0.parameters(), b1.parameters()))
    assert holdout_split(6, 0.34, 0) != holdout_split(6, 0.34, 5)
    assert any(not torch.equal(p, q) for p, q in zip(b0.parameters(), b2.parameters()))


def test_norms_train_only_when_asked():
    block, x, y, kw = small_block_set(windows=8)
    norms = [n for n, _ in block.named_parameters() if "norm" in n]
    for train_norms in (False, True):
        b = copy.deepcopy(block)
        result = refine_block(b, x, y, kw, "cpu", RefineSettings(steps=10, lr=3e-3, norms=train_norms))
        assert result.kept
        moved = [n for n in norms if not torch.equal(dict(b.named_parameters())[n], dict(block.named_parameters())[n])]
        assert bool(moved) == train_norms, moved


def test_pipeline_records_the_held_out_split_and_the_steps():
    m = model("llama")
    options = {"steps": 50, "lr": 1e-3, "holdout": 0.34, "patience": 2, "eval_every": 2}
    meta = compress_model(m, calib_ids(12), config(recipe=[{"stage": "svd-llm"},
                                                           {"stage": "block-refine", "options": options}]))
    run = meta.stage_run("block-refine")
    record = run.typed_record(Refinement)
    assert (record.train_windows, record.heldout_windows) == (8, 4)  # 6 batches of 2 windows, two held out
    assert any(b.kept for b in record.blocks.values())
    assert run.options["holdout"] == 0.34 and run.options["seed"] == 0
    for b in record.blocks.values():
        assert 1 <= b.steps <= 50 and b.heldout_before is not None
        assert b.heldout_after <= b.heldout_before or not b.kept
    json.dumps(meta.to_json(), allow_nan=False)


def test_patience_without_a_hold_out_is_refused_in_one_line(tiny_dirs, tmp_path, cli):
    r = cli("model", tiny_dirs["llama"], "-o", tmp_path / "c", "--ratio", "0.3", "--stage", "block-refine:patience=2")
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert "patience needs held-out batches" in r.output and not (tmp_path / "c").exists()


def test_inspect_shows_each_blocks_refinement_in_forward_order(tiny_dirs, tmp_path, austen_file, cli):
    from rankwise.compress.describe import record_tables
    from rankwise.compress.metadata import read_result
    out = tmp_path / "c"
    r = cli("model", tiny_dirs["llama"], "-o", out, "--ratio", "0.3", "--calib", f"text:{austen_file}",
            "--nsamples", "6", "--seqlen", "32", "--batch-size", "2", "--device", "cpu",
            "--stage", "block-refine:steps=4,holdout=0.34")
    assert r.exit_code == 0, r.output
    meta = read_result(str(out))
    blocks = meta.stage_run("block-refine").typed_record(Refinement).blocks
    [table] = [t for t in record_tables(meta) if t.title.startswith("block-refine: blocks")]
    assert table.title == "block-refine: blocks (model.layers.N)"
    assert table.columns[0] == "blocks" and table.columns.index("mse_before") + 1 == table.columns.index("mse_after")
    assert table.columns.index("heldout_before") + 1 == table.columns.index("heldout_after")
    assert [row[0] for row in table.rows] == [str(i) for i in range(len(blocks))]
    for row in table.rows:
        cells, record = dict(zip(table.columns, row)), blocks[f"model.layers.{row[0]}"]
        assert float(cells["heldout_before"]) == pytest.approx(record.heldout_before, rel=1e-3)
        assert int(cells["steps"]) == record.steps and cells["kept"] == str(record.kept)
    shown = cli("inspect", out).output
    assert "block-refine: blocks (model.layers.N)" in shown and "heldout" in shown, shown
    for row in table.rows:
        assert any(line.startswith(f"│ {row[0]} ") and line.rstrip().endswith(f"{row[-1]} │")
                   for line in shown.splitlines()), shown
