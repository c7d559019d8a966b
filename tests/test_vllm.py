"""A Rankwise checkpoint served offline by vLLM's Transformers backend gives transformers' greedy tokens.

vLLM builds the checkpoint's `RankwiseModel` from its config (auto_map, trust_remote_code), swaps the low-rank
layers' Linears for its own and loads the factors by name. The serving test runs where vLLM is importable
(`pip install 'rankwise[serve]'`, or `vllm` on a GPU machine) and is skipped elsewhere: vLLM is too large for
the default install. One vLLM start takes about a minute on a CPU. What vLLM relies on, the model classes
building the low-rank structure from the config alone, is tested everywhere.
"""
import importlib.util
import json
import subprocess
import sys

import pytest
import torch
import transformers

from tiny import austen_text, save_tiny, tiny_tokenizer

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed: pip install 'rankwise[serve]'")

NEW_TOKENS = 8

# vLLM starts worker processes that import the script: without the guard each would start vLLM again.
SERVE = '''
import json
import sys

if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    # gpu_memory_utilization: on a CPU, the share of host memory reserved for the KV cache
    llm = LLM(model=sys.argv[1], model_impl="transformers", trust_remote_code=True, dtype="float32",
              enforce_eager=True, max_model_len=128, gpu_memory_utilization=0.15, skip_tokenizer_init=True)
    prompts = json.loads(sys.argv[2])
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts],
                           SamplingParams(max_tokens=int(sys.argv[3]), temperature=0, ignore_eos=True),
                           use_tqdm=False)
    print("TOKENS " + json.dumps([list(out.outputs[0].token_ids) for out in outputs]))
'''


@pytest.fixture(scope="module")
def models(austen_file, tmp_path_factory):
    """A tiny Llama whose head size (64) vLLM's CPU attention supports, with its own output head (tied to the
    embeddings, a random model only repeats its last token), and its EoRA-compensated compression (every
    low-rank layer carries the A, B and lora pairs vLLM must load)."""
    from typer.testing import CliRunner

    from rankwise.cli.main import app
    root = tmp_path_factory.mktemp("vllm")
    dense = save_tiny(root / "dense", "llama", hidden_size=128, intermediate_size=256, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=64, tie_word_embeddings=False)
    ck = root / "ck"
    res = CliRunner().invoke(app, ["model", str(dense), "-o", str(ck), "--ratio", "0.3", "--compensate", "eora",
                                   "--eora-rank", "4", "--calib", f"text:{austen_file}", "--nsamples", "4",
                                   "--seqlen", "32", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    return dense, ck


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
    _, ck = models
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


def test_auto_model_from_pretrained_gives_the_causal_lm_hidden_states(models):
    _, ck = models
    ids = torch.tensor([prompts()[1]])
    base = transformers.AutoModel.from_pretrained(ck, trust_remote_code=True)
    causal = transformers.AutoModelForCausalLM.from_pretrained(ck, trust_remote_code=True)
    with torch.no_grad():
        torch.testing.assert_close(base(ids).last_hidden_state, causal.model(ids).last_hidden_state,
                                   rtol=0, atol=0)


@needs_vllm
def test_vllm_serves_the_greedy_tokens_of_transformers(models, tmp_path):
    dense, ck = models
    expected = transformers_greedy(ck, trust_remote_code=True)
    assert expected != transformers_greedy(dense, trust_remote_code=False)  # the compressed model's own tokens
    script = tmp_path / "serve.py"
    script.write_text(SERVE)
    res = subprocess.run([sys.executable, str(script), str(ck), json.dumps(prompts()), str(NEW_TOKENS)],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    served = json.loads(next(line for line in res.stdout.splitlines() if line.startswith("TOKENS "))[7:])
    assert served == expected
