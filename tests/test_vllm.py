"""A Rankwise checkpoint served offline by vLLM's Transformers backend gives transformers' greedy tokens.

vLLM builds the checkpoint's `RankwiseModel` from its config (auto_map, trust_remote_code), swaps the low-rank
layers' Linears for its own and loads the factors by name; factors stored in int8 or int4 are no Linears: vLLM
keeps Rankwise's layers for them, which load their integer tensors in the stored dtype. The serving tests run
where vLLM is importable (`pip install 'rankwise[serve]'`, or `vllm` on a GPU machine) and are skipped
elsewhere: vLLM is too large for the default install. One vLLM start takes about a minute on a CPU. What vLLM relies on, the model classes
building the low-rank structure from the config alone, is tested everywhere.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from tiny import austen_text, save_tiny, tiny_tokenizer

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed: pip install 'rankwise[serve]'")

NEW_TOKENS = 8

# vLLM starts worker processes that import the script: without the guard each would start vLLM again. The
# dtypes of the served factors come from the worker through LLM.apply_model, which pickles a function by
# reference: it lives in a module beside the script.
PROBE = '''
def factor_dtypes(model):
    return {name: str(p.dtype).removeprefix("torch.") for name, p in model.named_parameters()
            if name.endswith((".A.weight", ".B.weight"))}
'''
SERVE = '''
import json
import sys

if __name__ == "__main__":
    from probe import factor_dtypes
    from vllm import LLM, SamplingParams
    # gpu_memory_utilization: on a CPU, the share of host memory reserved for the KV cache
    llm = LLM(model=sys.argv[1], model_impl="transformers", trust_remote_code=True, dtype="float32",
              enforce_eager=True, max_model_len=128, gpu_memory_utilization=0.15, skip_tokenizer_init=True)
    prompts = json.loads(sys.argv[2])
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts],
                           SamplingParams(max_tokens=int(sys.argv[3]), temperature=0, ignore_eos=True),
                           use_tqdm=False)
    print("TOKENS " + json.dumps([list(out.outputs[0].token_ids) for out in outputs]))
    print("DTYPES " + json.dumps(llm.apply_model(factor_dtypes)[0]))
'''
# How each factor dtype is held in memory, in transformers and in vLLM alike (the model is float32).
HELD_AS = {"auto": "float32", "int8": "int8", "int4": "uint8", "mixed": "float32"}
# Block 0's gate, up, q, k and v kept dense, block 1's low-rank: vLLM decides its fusions (gate + up, q + k + v)
# once per module class and child names, so a fusion found in block 0 must not be applied to block 1.
MIXED_DENSE = "layers.0.mlp.gate_proj,layers.0.mlp.up_proj,layers.0.self_attn.q_proj,layers.0.self_attn.k_proj," \
              "layers.0.self_attn.v_proj"


@pytest.fixture(scope="module")
def models(austen_file, tmp_path_factory):
    """A tiny Llama whose head size (64) vLLM's CPU attention supports, with its own output head (tied to the
    embeddings, a random model only repeats its last token), and its EoRA-compensated compression (every
    low-rank layer carries the A, B and lora pairs vLLM must load), also with its factors stored in int8 and in
    int4 (ranks a multiple of the int4 group); and one that keeps some Linears of a block dense."""
    from typer.testing import CliRunner

    from rankwise.cli.main import app
    root = tmp_path_factory.mktemp("vllm")
    dense = save_tiny(root / "dense", "llama", hidden_size=128, intermediate_size=256, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=64, tie_word_embeddings=False)
    checkpoints = {}
    eora = ["--compensate", "eora", "--eora-rank", "4"]
    for name, extra in (("auto", eora), ("int8", [*eora, "--factor-dtype", "int8"]),
                        ("int4", [*eora, "--factor-dtype", "int4", "--int4-group", "16", "--rank-multiple", "16"]),
                        ("mixed", ["--keep-dense", MIXED_DENSE])):
        checkpoints[name] = root / f"ck-{name}"
        res = CliRunner().invoke(app, ["model", str(dense), "-o", str(checkpoints[name]), "--ratio", "0.3",
                                       "--calib", f"text:{austen_file}", "--nsamples", "4", "--seqlen", "32",
                                       "--device", "cpu", *extra])
        assert res.exit_code == 0, res.output
    return dense, checkpoints


def prompts() -> list[list[int]]:
    ids = tiny_tokenizer()(austen_text(2000))["input_ids"]
    return [ids[:5], ids[100:117], ids[300:331]]


def transformers_greedy(path, trust_remote_code: bool) -> list[list[int]]:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code)
    model.generation_config.eos_token_id = None  # as vLLM's ignore_eos: always NEW_TOKENS tokens
    out = []
    with torch.no_grad():
        for ids in prompts():
            new = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(ids):]
            out.append(new.tolist())
    return out


def test_auto_model_classes_build_the_low_rank_structure_from_the_config(models):
    """On meta, as vLLM builds it: every factorized Linear is a low-rank layer of the stored ranks; the base
    model's are no nn.Linear (vLLM would replace them by dense ones), the causal LM's are (PEFT targets them)."""
    ck = models[1]["auto"]
    config = transformers.AutoConfig.from_pretrained(ck)
    modules = config.rankwise["modules"]
    with torch.device("meta"):
        base = transformers.AutoModel.from_config(config, trust_remote_code=True)
        causal = transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    assert type(base).__name__ == "RankwiseModel" and type(causal).__name__ == "RankwiseForCausalLM"
    for name, spec in modules.items():
        for model, qualified, linear in ((base, name.removeprefix("model."), False), (causal, name, True)):
            layer = model.get_submodule(qualified)
            assert isinstance(layer, torch.nn.Linear) == linear, qualified
            assert tuple(layer.A.weight.shape) == (spec["rank"], spec["in"])
            assert tuple(layer.B.weight.shape) == (spec["out"], spec["rank"])
            assert tuple(layer.lora_A.weight.shape) == (spec["lora_rank"], spec["in"])


def test_base_model_modules_with_low_rank_children_have_a_class_per_pattern(models):
    """vLLM decides its fusions once per module class and child names: in the base model a module with
    low-rank children has a class of its own for each set of them, so block 0's dense gate + up (fusable) and
    block 1's low-rank ones never share a decision; the causal LM keeps the transformers classes."""
    config = transformers.AutoConfig.from_pretrained(models[1]["mixed"])
    assert sorted(config.rankwise["kept_dense"]) == sorted(f"model.{name}" for name in MIXED_DENSE.split(","))
    with torch.device("meta"):
        base = transformers.AutoModel.from_config(config, trust_remote_code=True)
        causal = transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    mlps = [type(base.layers[i].mlp) for i in (0, 1)]
    assert mlps[0] is not mlps[1] and all(issubclass(t, type(causal.model.layers[0].mlp)) for t in mlps)
    assert type(base.layers[0].mlp.gate_proj) is torch.nn.Linear  # kept dense: vLLM may fuse it with up
    assert type(causal.model.layers[1].mlp) is type(causal.model.layers[0].mlp)


@pytest.mark.parametrize("factor_dtype", ["auto", "int8", "mixed"])
def test_auto_model_from_pretrained_gives_the_causal_lm_hidden_states(models, factor_dtype):
    ck = models[1][factor_dtype]
    ids = torch.tensor([prompts()[1]])
    base = transformers.AutoModel.from_pretrained(ck, trust_remote_code=True)
    causal = transformers.AutoModelForCausalLM.from_pretrained(ck, trust_remote_code=True)
    with torch.no_grad():
        torch.testing.assert_close(base(ids).last_hidden_state, causal.model(ids).last_hidden_state,
                                   rtol=0, atol=0)


def test_a_quantized_factor_loaded_as_vllm_loads_it_keeps_its_stored_dtype(models):
    """vLLM materialises every parameter it does not replace in the model's dtype, integer ones too, then hands
    a module that has load_weights its tensors: the int8 factors come back int8 and compute as stored."""
    from safetensors.torch import load_file
    ck = models[1]["int8"]
    config = transformers.AutoConfig.from_pretrained(ck)
    name = next(iter(config.rankwise["modules"]))
    stored = {k.removeprefix(f"{name}.A."): v for k, v in load_file(ck / "model.safetensors").items()
              if k.startswith(f"{name}.A.")}
    with torch.device("meta"):
        base = transformers.AutoModel.from_config(config, trust_remote_code=True)
    factor = base.get_submodule(name.removeprefix("model.")).A
    for key, param in list(factor.named_parameters()):
        setattr(factor, key, torch.nn.Parameter(torch.zeros(param.shape)))  # float32 on the CPU, as vLLM does
    assert factor.load_weights(iter(stored.items())) == {"weight", "weight_scale"}
    assert factor.weight.dtype == torch.int8 and torch.equal(factor.weight, stored["weight"])
    x = torch.randn(3, factor.in_features)
    torch.testing.assert_close(factor(x), x @ (stored["weight"].float() * stored["weight_scale"][:, None]).T)


@needs_vllm
@pytest.mark.parametrize("factor_dtype", ["auto", "int8", "int4", "mixed"])
def test_vllm_serves_the_greedy_tokens_of_transformers(models, factor_dtype, tmp_path):
    """The same greedy tokens, with the factors held in vLLM as the checkpoint stores them (int8 as int8)."""
    dense, checkpoints = models
    ck = checkpoints[factor_dtype]
    expected = transformers_greedy(ck, trust_remote_code=True)
    assert expected != transformers_greedy(dense, trust_remote_code=False)  # the compressed model's own tokens
    (tmp_path / "probe.py").write_text(PROBE)
    script = tmp_path / "serve.py"
    script.write_text(SERVE)
    res = subprocess.run([sys.executable, str(script), str(ck), json.dumps(prompts()), str(NEW_TOKENS)],
                         capture_output=True, text=True, timeout=900,
                         env={**os.environ, "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"})  # apply_model's pickle
    assert res.returncode == 0, res.stderr[-4000:]
    lines = dict(line.split(" ", 1) for line in res.stdout.splitlines() if line.startswith(("TOKENS ", "DTYPES ")))
    assert json.loads(lines["TOKENS"]) == expected
    modules = transformers.AutoConfig.from_pretrained(ck).rankwise["modules"]
    assert json.loads(lines["DTYPES"]) == {f"{name}.{factor}.weight": HELD_AS[factor_dtype]
                                           for name in modules for factor in "AB"}


@needs_vllm
def test_serve_bench_measures_each_model_in_its_own_process(models, tmp_path):
    """bench/serve_vllm.py: one row per model, each from its own vLLM processes, every figure measured, the
    table alone on stdout."""
    dense, checkpoints = models
    out = tmp_path / "serve.json"
    bench = Path(__file__).resolve().parents[1] / "bench" / "serve_vllm.py"
    res = subprocess.run([sys.executable, str(bench), str(dense), str(checkpoints["int8"]), "--prompt-len", "8",
                          "--prompts", "2", "--batch-sizes", "1,2", "--new-tokens", "16", "--reps", "1",
                          "--kv-cache-gib", "0.25", "--check-tokens", "4", "--json", str(out)],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stdout.splitlines()[0].startswith("| model | factors | load s | memory MiB |")
    rows = json.loads(out.read_text())["rows"]
    assert [r["factors"] for r in rows] == ["dense", "int8"]
    for r in rows:
        assert r["tokens_identical"] == r["tokens_prompts"] == 4
        assert r["load_s"] > 0 and r["prefill_tok_s"] > 0
        assert set(r["decode_tok_s"]) == {"1", "2"} and all(v > 0 for v in r["decode_tok_s"].values())
        assert r["memory"]["processes"] >= 3  # the calling process, vLLM's engine core and its worker
        assert r["memory"]["pss_mib"] > r["memory"]["largest_rss_mib"] / 3
