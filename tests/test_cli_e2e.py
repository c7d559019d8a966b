"""`compress model` end to end through the CLI on tiny Llama / Mistral / Qwen2 checkpoints saved to disk."""
import json

import pytest
import torch
import transformers

from rankwise.compress.config import CompressConfig
from rankwise.compress.job import compress_in_memory
from rankwise.compress.lowrank import load_rankwise_model


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_compress_reload_both_ways_gives_in_memory_logits(family, tiny_dirs, austen_file, tmp_path, cli):
    src = tiny_dirs[family]
    out = tmp_path / "out"
    args = dict(method="svd-llm", ratio=0.3, calib=f"text:{austen_file}", nsamples=4, seqlen=32, device="cpu")
    res = cli("model", src, "-o", out, *sum(([f"--{k}", v] for k, v in args.items()), []))
    assert res.exit_code == 0, res.output
    assert "targeted Linear params" in res.output

    for name in ("config.json", "model.safetensors", "modeling_rankwise.py", "tokenizer.json", "README.md"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "config.json").read_text())["rankwise"]
    assert meta["ratio_requested"] == 0.3
    assert 0.3 <= meta["ratio_achieved"] < 0.4
    assert meta["model_params_after"] < meta["model_params_before"]
    assert meta["calibration"] == {"source": f"text:{austen_file}", "nsamples": 4, "seqlen": 32, "seed": 0,
                                   "bos": False, "chat_windows": 0}  # no BOS, no chat template
    assert {"torch", "transformers"} <= set(meta["versions"])

    model, _, mem_meta = compress_in_memory(CompressConfig(model=str(src), **args), torch.device("cpu"))
    assert mem_meta.to_json()["modules"] == meta["modules"]
    ours = load_rankwise_model(str(out))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    # every factorized Linear is the checkpoint's own copy of the layer
    assert sum(type(m).__name__ == "LowRankLinear" for m in theirs.modules()) == len(meta["modules"])
    x = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x).logits
        assert torch.equal(ours(x).logits, ref)
        assert torch.equal(theirs(x).logits, ref)
        dense = transformers.AutoModelForCausalLM.from_pretrained(src)(x).logits
    assert not torch.allclose(dense, ref), "compression must change the model"


def test_gqa_ranks_in_checkpoint(tiny_dirs, austen_file, tmp_path, cli):
    out = tmp_path / "o"
    res = cli("model", tiny_dirs["mistral"], "-o", out, "--method", "asvd", "--ratio", "0.4",
              "--calib", f"text:{austen_file}", "--nsamples", "4", "--seqlen", "32")
    assert res.exit_code == 0, res.output
    mods = json.loads((out / "config.json").read_text())["rankwise"]["modules"]
    q = mods["model.layers.0.self_attn.q_proj"]
    k = mods["model.layers.0.self_attn.k_proj"]
    assert (k["out"], k["in"]) == (16, 64) and k["rank"] < q["rank"]


def test_evaluate_matches_manual_protocol(tiny_dirs, austen_file, tmp_path, cli):
    """The evaluator's number is exp(mean NLL) over floor(N/seqlen) windows, each scored on its own."""
    jpath = tmp_path / "r.json"
    res = cli("evaluate", tiny_dirs["llama"], "--ppl", f"text:{austen_file}", "--seqlen", "64",
              "--max-windows", "5", "--json", jpath, "--device", "cpu")
    assert res.exit_code == 0, res.output
    r = json.loads(jpath.read_text())["ppl"][f"text:{austen_file}"]
    tok = transformers.AutoTokenizer.from_pretrained(tiny_dirs["llama"])
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).eval()
    ids = tok(austen_file.read_text(), add_special_tokens=False, return_tensors="pt").input_ids[0]
    nll = n = 0.0
    with torch.no_grad():
        for i in range(5):
            x = ids[i * 64:(i + 1) * 64][None]
            nll += model(x, labels=x).loss.item() * 63
            n += 63
    assert r["windows"] == 5 and r["nonfinite_windows"] == 0 and r["tokens_scored"] == 5 * 63
    assert r["ppl"] == pytest.approx(torch.tensor(nll / n).exp().item(), rel=1e-5)
