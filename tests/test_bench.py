"""bench/speed.py and bench/infer.py run on CPU and report every stage; --rank-multiple keeps exact accounting."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import infer  # noqa: E402
import speed  # noqa: E402
from _shapes import SHAPES  # noqa: E402

from rankwise.errors import RankwiseError  # noqa: E402
from rankwise.compress.numerics import MatrixShape, summarize  # noqa: E402
from rankwise.compress.stages.allocate_uniform import uniform_ranks  # noqa: E402
from rankwise.compress.config import CompressConfig  # noqa: E402
from rankwise.compress.lowrank import LowRankLinear  # noqa: E402
from rankwise.compress.pipeline import compress_model, target_shapes  # noqa: E402
from tiny import tiny_model  # noqa: E402


def _run_json(module, argv, capsys) -> dict:
    result = module.main([*argv, "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(result))  # what is printed is what main returns
    return printed


@pytest.mark.parametrize("lazy", [False, True])
def test_speed_json_reports_every_stage_and_block(capsys, lazy):
    methods = ["svd", "svd-llm", "svd-llm+refit+eora", "fwsvd", "svd-llm+welore", "no-such-method"]
    argv = ["--shape", "tiny", "--layers", "3", "--nsamples", "4", "--seqlen", "16", "--batch-size", "2",
            "--device", "cpu", "--methods", ",".join(methods), "--eora-rank", "2"] + (["--lazy"] if lazy else [])
    out = _run_json(speed, argv, capsys)
    runs = {r["method"]: r for r in out["runs"]}
    assert set(runs) == set(methods)
    assert "skipped" in runs["no-such-method"]
    if lazy:  # a streamed model cannot run FWSVD's whole-model backward: reported, the others still run
        assert "Fisher" in runs.pop("fwsvd")["skipped"]
        methods.remove("fwsvd")
    assert runs["svd-llm+refit+eora"]["pipeline_stage_seconds"]["factorize"] > 0
    # a stage is timed (> 0) exactly where the method runs it: whole-model passes only where the method has
    # one, the calibration forward (capture, statistics, propagate) only where it reads activations
    forwards = {"capture", "statistics", "propagate"}
    ran = {"svd": set(), "svd-llm": forwards, "svd-llm+refit+eora": forwards, "fwsvd": {"fisher"},
           "svd-llm+welore": forwards | {"spectra"}}
    for name in ran:
        if name not in runs:
            continue
        run = runs[name]
        assert set(run["stages"]) == set(speed.STAGES)
        timed = {s for s in speed.STAGES if run["stages"][s]["seconds"] > 0}
        assert timed == ran[name] | {"factorize", "save"}, (name, timed)
        assert [b["block"] for b in run["blocks"]] == [0, 1, 2]
        assert all(b["host_peak_gib"] > 0 for b in run["blocks"])
        # the bench reads the pipeline's own timer (the result rounds to 1 ms; a stage that did not run is absent)
        for stage in ("statistics", "propagate"):
            assert abs(run["stages"][stage]["seconds"] - run["pipeline_stage_seconds"].get(stage, 0.0)) <= 1e-3
        # the stages are the run but for setup and allocation (the tiny model's setup is a good part of it)
        stage_sum = sum(run["stages"][s]["seconds"] for s in speed.STAGES)
        assert 0.5 * run["total_seconds"] <= stage_sum <= run["total_seconds"] + 1e-6, (name, stage_sum)
        assert 0.4 <= run["ratio_achieved"] < 0.5


def test_speed_baseline_row_times_one_dense_pass_with_its_grams(capsys):
    argv = ["--shape", "tiny", "--layers", "2", "--nsamples", "4", "--seqlen", "16", "--batch-size", "2",
            "--device", "cpu", "--methods", "baseline,svd-llm", "--no-save"]
    runs = {r["method"]: r for r in _run_json(speed, argv, capsys)["runs"]}
    base, svd_llm = runs["baseline"], runs["svd-llm"]
    assert [b["block"] for b in base["blocks"]] == [0, 1]
    assert base["stages"]["capture"]["seconds"] > 0 and base["stages"]["statistics"]["seconds"] > 0
    assert set(base["pipeline_stage_seconds"]) == {"capture", "groups", "statistics"}  # nothing factorized
    assert base["forward_work_seconds"] == pytest.approx(base["total_seconds"])
    assert 0 < svd_llm["forward_work_seconds"] < svd_llm["total_seconds"]


def test_speed_runs_a_local_model_with_text_calibration(tiny_dirs, austen_file, capsys):
    out = _run_json(speed, ["--model", str(tiny_dirs["llama"]), "--calib", f"text:{austen_file}",
                            "--nsamples", "2", "--seqlen", "16", "--device", "cpu", "--methods", "asvd",
                            "--no-save"], capsys)
    (run,) = out["runs"]
    assert len(run["blocks"]) == 2 and run["stages"]["save"]["seconds"] is None


def test_speed_streams_a_local_model_with_stream_weights(tiny_dirs, capsys):
    argv = ["--model", str(tiny_dirs["llama"]), "--nsamples", "2", "--seqlen", "16", "--device", "cpu",
            "--methods", "svd-llm", "--no-save"]
    streamed = _run_json(speed, [*argv, "--stream-weights"], capsys)["runs"][0]
    loaded = _run_json(speed, argv, capsys)["runs"][0]
    assert [b["block"] for b in streamed["blocks"]] == [0, 1]
    assert streamed["ratio_achieved"] == loaded["ratio_achieved"]


def test_lazy_shape_blocks_equal_eager_ones_and_the_next_is_prefetched():
    from _shapes import random_model
    eager, _ = random_model("tiny", 3, seed=5)
    lazy, source = random_model("tiny", 3, seed=5, lazy=True)
    try:
        source.ensure(0)
        assert not source.is_meta(0) and source.is_meta(2) and 1 in source.pending  # block 1 being made
        source.ensure(1)
        source.ensure(2)
    finally:
        source.close()
    for (name, a), (_, b) in zip(eager.named_parameters(), lazy.named_parameters()):
        assert torch.equal(a, b), name
    source.release(0)
    assert source.is_meta(0)


def test_infer_json_reports_prefill_and_decode(capsys):
    out = _run_json(infer, ["--shape", "tiny", "--layers", "2", "--batch-sizes", "1,3", "--prompt-len", "8",
                            "--new-tokens", "2", "--reps", "1", "--nsamples", "2", "--seqlen", "16",
                            "--device", "cpu", "--layer-table", "--keep-dense", "k_proj"], capsys)
    assert [r["batch"] for r in out["rows"]] == [1, 3]
    for r in out["rows"]:
        for key in ("dense_prefill_tok_s", "compressed_prefill_tok_s", "dense_decode_tok_s",
                    "compressed_decode_tok_s"):
            assert r[key] > 0
        assert r["decode_speedup"] == pytest.approx(r["compressed_decode_tok_s"] / r["dense_decode_tok_s"])
    assert out["params"]["compressed"] < out["params"]["dense"]
    assert out["params"]["factorized_layers"] == 7 * 2 - out["params"]["kept_dense"]
    assert out["params"]["kept_dense"] == 2  # both k_proj
    timed = {n for r in out["layers"] for n in r["layers"]}
    assert timed == {"self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                     "mlp.down_proj"}
    assert set(out["slower_factorized_at_batch1"]) <= timed
    assert all(r["b1_dense_us"] > 0 and r["prefill_factorized_us"] > 0 for r in out["layers"])


def _tiny_compressed(scale: float = 1.0, layers: int = 2):
    """A tiny llama with its Linears factorized (svd 0.3); `scale` enlarges the weights so that greedy
    decoding does not repeat one token."""
    model = tiny_model("llama", layers=layers)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(scale)
    calib = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    compress_model(model, calib, CompressConfig(model="tiny", method="svd", ratio=0.3, nsamples=2, seqlen=16,
                                                device="cpu"))
    return model


def test_infer_static_cache_reports_every_field(capsys):
    out = _run_json(infer, ["--shape", "tiny", "--layers", "2", "--batch-sizes", "1,3", "--prompt-len", "8",
                            "--new-tokens", "3", "--reps", "1", "--nsamples", "2", "--seqlen", "16",
                            "--device", "cpu", "--compile", "static"], capsys)
    assert out["settings"]["compile"] == "static"
    assert [r["batch"] for r in out["rows"]] == [1, 3]
    for r in out["rows"]:
        for key in ("dense_prefill_tok_s", "compressed_prefill_tok_s", "prefill_speedup", "dense_decode_tok_s",
                    "compressed_decode_tok_s", "decode_speedup"):
            assert r[key] > 0
        assert r["dense_compile_s"] is None and r["compressed_compile_s"] is None  # nothing compiled
    assert out["graphs_compiled"] == 0 and out["graphs_compiled_while_timing"] == 0


def test_infer_static_cache_decodes_the_same_tokens():
    """The static cache, reset and reused, gives the greedy tokens of the default dynamic cache."""
    model = _tiny_compressed(scale=20)
    ids = torch.randint(0, model.config.vocab_size, (3, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dynamic = infer.Caller(model, ids, 5, "none").generate()
        static = infer.Caller(model, ids, 5, "static")
        first, again = static.generate(), static.generate()
    assert dynamic.shape == (3, 6) and len(set(dynamic.flatten().tolist())) > 3  # not one repeated token
    assert torch.equal(first, dynamic) and torch.equal(again, dynamic)


def test_infer_compile_traces_one_graph_per_shape():
    """--compile compile captures each model's whole forward (fullgraph, LowRankLinear included) once for the
    prefill shape and once for the decode step, all during warm-up: no recompile while the timed runs alternate
    between the models. The real inductor backend takes about a minute to compile even these models on a 2-core
    CPU, so the test traces with dynamo's eager backend (same graph capture and guards, no code generation)."""
    def eager_backend(model):
        return torch.compile(model.forward, backend="eager", fullgraph=True, dynamic=False)
    models = {"dense": tiny_model("llama", layers=1), "compressed": _tiny_compressed(layers=1)}
    ids = torch.randint(0, 300, (2, 8), generator=torch.Generator().manual_seed(1))
    args = infer.parse_args(["--shape", "tiny", "--new-tokens", "4", "--reps", "2", "--compile", "compile"])
    out = infer.measure_batch(models, ids, args, torch.device("cpu"), compiler=eager_backend)
    for name in models:
        assert out[name]["graphs_compiled"] == 2  # a recompile per decode step (position as a Python int) adds more
        assert out[name]["compile_s"] > 0 and out[name]["prefill_tok_s"] > 0 and out[name]["decode_tok_s"] > 0
    assert out["graphs_compiled_while_timing"] == 0


def test_infer_compile_failure_is_one_error():
    """What inductor raises on a CPU without a working C++ compiler (seen with CXX=/nonexistent/g++) becomes
    one RankwiseError line, not a traceback."""
    from torch._inductor.exc import InductorError, InvalidCxxCompiler

    def broken(model):
        def forward(**kwargs):
            raise InductorError(InvalidCxxCompiler(), None)
        return forward

    with pytest.raises(RankwiseError, match=r"torch.compile failed on cpu \(InvalidCxxCompiler: No working C\+\+ "
                                            r"compiler found in .*\); --compile static"):
        infer.main(["--shape", "tiny", "--layers", "1", "--batch-sizes", "1", "--prompt-len", "4",
                    "--new-tokens", "2", "--reps", "1", "--nsamples", "2", "--seqlen", "8", "--device", "cpu",
                    "--compile", "compile", "--json"], compiler=broken)


def test_infer_int8_factors_and_memory_of_each_model_in_its_own_process(capsys):
    """--factor-dtype int8 stores the factors of the model made here in int8; --memory measures the dense and
    the compressed model each in a fresh process: a high-water mark is never below the resident set it was
    reset at."""
    out = _run_json(infer, ["--shape", "tiny", "--layers", "1", "--batch-sizes", "1,2", "--prompt-len", "4",
                            "--new-tokens", "2", "--reps", "1", "--nsamples", "2", "--seqlen", "8", "--device", "cpu",
                            "--factor-dtype", "int8", "--memory"], capsys)
    assert out["params"]["factor_dtypes"] == ["int8"] and out["params"]["factorized_layers"] == 7
    assert "int8 factors" in out["settings"]["compressed"]
    assert set(out["memory"]) == {"dense", "compressed"}
    for row in out["memory"].values():
        assert row["rss_after_load_mib"] > 50  # the interpreter and torch at least
        assert row["load_peak_mib"] >= row["rss_after_load_mib"] - 1.03  # peaks are kept in GiB to 3 decimals
        assert row["run_peak_mib"] >= 0.95 * row["rss_after_load_mib"]
        assert row["gpu_after_load_mib"] is None


def test_infer_restores_a_checkpoints_float_factors_and_refuses_quantized_ones(tmp_path, tiny_dirs, austen_file,
                                                                                 capsys):
    from typer.testing import CliRunner

    from rankwise.cli.main import app
    for name, dtype in (("float", "auto"), ("int8", "int8")):
        res = CliRunner().invoke(app, ["model", str(tiny_dirs["llama"]), "-o", str(tmp_path / name), "--ratio", "0.3",
                                       "--calib", f"text:{austen_file}", "--nsamples", "2", "--seqlen", "16",
                                       "--device", "cpu", "--factor-dtype", dtype])
        assert res.exit_code == 0, res.output
    argv = ["--model", str(tiny_dirs["llama"]), "--batch-sizes", "1", "--prompt-len", "4", "--new-tokens", "2",
            "--reps", "1", "--device", "cpu", "--factor-dtype", "int8", "--checkpoint"]
    out = _run_json(infer, [*argv, str(tmp_path / "float")], capsys)
    assert out["params"]["factor_dtypes"] == ["int8"] and out["params"]["factorized_layers"] == 14
    assert out["settings"]["compressed"].endswith("(factors re-stored, int8 factors)")
    with pytest.raises(RankwiseError, match="already stores quantized factors"):
        infer.main([*argv, str(tmp_path / "int8")])


def _one_step_slack(shapes: dict[str, MatrixShape], ranks: dict, multiple: int) -> float:
    """Ratio a bump of every factorized matrix by one rank step would cost (the allocator's tolerance)."""
    dense = sum(s.dense_params for s in shapes.values())
    return sum(multiple * (s.out + s.inp) for n, s in shapes.items() if ranks[n] is not None) / dense


def test_rank_multiple_8_end_to_end_exact_accounting():
    model = tiny_model("llama", layers=2)
    shapes = target_shapes(model)
    calib = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    cfg = CompressConfig(model="tiny", method="svd-llm", ratio=0.4, rank_multiple=8, nsamples=4, seqlen=16,
                         device="cpu")
    before = sum(p.numel() for p in model.parameters())
    meta = compress_model(model, calib, cfg)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert layers and all(m.rank % 8 == 0 for m in layers.values())
    assert {n: m.rank for n, m in meta.modules.items()} == {n: m.rank for n, m in layers.items()}
    # exact accounting: what the allocator promised is what the model lost
    assert before - sum(p.numel() for p in model.parameters()) == \
        meta.targeted_params_before - meta.targeted_params_after
    ranks = {n: (meta.modules[n].rank if n in meta.modules else None) for n in shapes}
    slack = _one_step_slack(shapes, ranks, 8)
    assert 0.4 <= meta.ratio_achieved < 0.4 + slack


@pytest.mark.parametrize("shape", ["135m", "7b"])
def test_rank_multiple_64_on_real_shapes(shape, multiple=64):
    """GPU-friendly rounding on real shapes (test_allocate covers multiple 8 on a tiny model)."""
    hidden, inter, heads, kv, layers, _ = SHAPES[shape]
    kv_dim = hidden // heads * kv
    one = {"q": (hidden, hidden), "k": (kv_dim, hidden), "v": (kv_dim, hidden), "o": (hidden, hidden),
           "gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}
    shapes = {f"{i}.{n}": MatrixShape(*s) for i in range(layers) for n, s in one.items()}
    for ratio in (0.2, 0.4, 0.6):
        ranks = uniform_ranks(shapes, ratio, multiple)
        assert all(r % multiple == 0 for r in ranks.values() if r is not None)
        achieved = summarize(shapes, ranks)["ratio_achieved"]
        assert ratio <= achieved < ratio + _one_step_slack(shapes, ranks, multiple)



def test_keep_dense_option_exact_accounting():
    hidden, inter, heads, kv, layers, _ = SHAPES["1b"]
    kv_dim = hidden // heads * kv
    one = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv_dim, hidden),
           "self_attn.v_proj": (kv_dim, hidden), "mlp.down_proj": (hidden, inter)}
    shapes = {f"layers.{i}.{n}": MatrixShape(*s) for i in range(layers) for n, s in one.items()}
    ranks = uniform_ranks(shapes, 0.4, 64, keep_dense=["k_proj", "self_attn.v_proj"])
    dense_names = {n for n in shapes if n.endswith(("k_proj", "v_proj"))}
    summary = summarize(shapes, ranks)
    assert set(summary["kept_dense"]) == dense_names
    assert all(r is not None and r % 64 == 0 for n, r in ranks.items() if n not in dense_names)
    assert 0.4 <= summary["ratio_achieved"] < 0.4 + _one_step_slack(shapes, ranks, 64)
    # the others give up more than without the option
    plain = uniform_ranks(shapes, 0.4, 64)
    assert ranks["layers.0.mlp.down_proj"] < plain["layers.0.mlp.down_proj"]
    with pytest.raises(RankwiseError, match="no_such_proj"):
        uniform_ranks(shapes, 0.4, 64, keep_dense=["no_such_proj"])


def test_keep_dense_end_to_end():
    model = tiny_model("llama", layers=2)
    calib = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    cfg = CompressConfig(model="tiny", method="svd", ratio=0.3, keep_dense=["k_proj"], nsamples=4, seqlen=16,
                         device="cpu")
    before = sum(p.numel() for p in model.parameters())
    shapes = target_shapes(model)
    meta = compress_model(model, calib, cfg)
    assert all(type(layer.self_attn.k_proj) is torch.nn.Linear for layer in model.model.layers)
    assert all(isinstance(layer.self_attn.q_proj, LowRankLinear) for layer in model.model.layers)
    assert [n for n in meta.kept_dense if n.endswith("k_proj")] == ["model.layers.0.self_attn.k_proj",
                                                                       "model.layers.1.self_attn.k_proj"]
    assert before - sum(p.numel() for p in model.parameters()) == \
        meta.targeted_params_before - meta.targeted_params_after
    ranks = {n: (meta.modules[n].rank if n in meta.modules else None) for n in shapes}
    assert 0.3 <= meta.ratio_achieved < 0.3 + _one_step_slack(shapes, ranks, 1)
