import copy

import torch

from rankwise.compress.lowrank import LoraLinear, LowRankLinear, load_rankwise_model
from rankwise.compress.pipeline import compress_model
from helpers_methods import calib_ids, config, model

RANK = 4


def _inputs_of(m, ids, kinds) -> dict:
    xs, handles = {}, []
    for name, mod in m.named_modules():
        if isinstance(mod, kinds):
            handles.append(mod.register_forward_pre_hook(lambda mod, a, name=name: xs.setdefault(name, a[0])))
    with torch.no_grad():
        m(input_ids=ids)
    for h in handles:
        h.remove()
    return xs


def _compressed(ratio=0.5, **kw):
    dense = model("llama")
    m = copy.deepcopy(dense)
    ids = calib_ids()
    meta = compress_model(m, ids, config(ratio=ratio, compensate="eora", eora_rank=RANK, **kw))
    return dense, m, ids, meta


def test_compensation_lowers_every_layer_output_error_and_counts_exactly():
    dense, m, ids, meta = _compressed()
    xs = _inputs_of(m, ids, LowRankLinear)
    assert len(xs) == len(meta.modules) == 14  # 7 Linears in each of the 2 blocks
    lora_total = 0
    for name, x in xs.items():
        layer = m.get_submodule(name)
        W = dense.get_submodule(name).weight
        with torch.no_grad():
            target = x @ W.T
            base = layer.B(layer.A(x)) - (layer.B.bias if layer.B.bias is not None else 0)
            with_path = base + layer.lora_B(layer.lora_A(x))
        assert (with_path - target).norm() < (base - target).norm(), name
        m_out, n_in = W.shape
        assert layer.lora_A.weight.numel() + layer.lora_B.weight.numel() == RANK * (m_out + n_in)
        lora_total += RANK * (m_out + n_in)
    assert meta.compensation_params == lora_total
    before = meta.targeted_params_before
    assert abs(meta.ratio_achieved - (1 - meta.targeted_params_after / before)) < 1e-12
    without = 1 - (meta.targeted_params_after - lora_total) / before
    assert abs(meta.ratio_achieved_without_compensation - without) < 1e-12
    assert 0.5 <= meta.ratio_achieved <= 0.51  # the EoRA path is paid for inside --ratio (ranks round down)


def test_checkpoint_and_peft_adapter_reproduce_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    from rankwise.compress.checkpoint import save_checkpoint
    from rankwise.compress.peft_export import export_eora_adapter, load_eora_adapter, strip_compensation
    from tiny import tiny_tokenizer
    _, m, ids, meta = _compressed()
    meta.source_model = "tiny"
    save_checkpoint(m, tiny_tokenizer(), tmp_path / "ck", meta)
    probe = ids[:2, :24]
    with torch.no_grad():
        ref = m(input_ids=probe).logits
        ours = load_rankwise_model(str(tmp_path / "ck"))(input_ids=probe).logits
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ck", trust_remote_code=True)(input_ids=probe).logits
    assert torch.equal(ours, hf) and torch.allclose(ours, ref, atol=1e-5)

    export_eora_adapter(load_rankwise_model(str(tmp_path / "ck")), tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    base = load_rankwise_model(str(tmp_path / "ck"))
    strip_compensation(base)
    with torch.no_grad():
        without = base(input_ids=probe).logits
    peft_model = load_eora_adapter(base, tmp_path / "adapter")
    with torch.no_grad():
        got = peft_model(input_ids=probe).logits
    assert not torch.allclose(without, ref, atol=1e-3)  # the adapter is what restores the logits
    assert torch.allclose(got, ref, atol=1e-5)


def test_compensate_command_on_a_pruned_model(tmp_path, tiny_dirs, austen_file, cli):
    from rankwise.compress.arch import named_target_linears
    from tiny import tiny_tokenizer
    orig_dir = tiny_dirs["llama"]
    pruned = model("llama")
    with torch.no_grad():  # 50% magnitude pruning of every decoder Linear: "compressed elsewhere"
        for lin in named_target_linears(pruned).values():
            w = lin.weight
            w.mul_(w.abs() >= w.abs().flatten().median())
    pruned.save_pretrained(tmp_path / "pruned")
    tiny_tokenizer().save_pretrained(tmp_path / "pruned")
    r = cli("compensate", orig_dir, tmp_path / "pruned", "-o", tmp_path / "comp", "--eora-rank", 4,
            "--calib", f"text:{austen_file}", "--nsamples", 4, "--seqlen", 48, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "% of the targeted)" in r.output and "ratio" not in r.output  # a pruned model removed no parameter
    comp = load_rankwise_model(str(tmp_path / "comp"))
    layers = [m for m in comp.modules() if isinstance(m, LoraLinear)]
    assert len(layers) == len(named_target_linears(pruned)) and all(m.lora_rank == 4 for m in layers)
    dense = model("llama")
    ids = calib_ids(nsamples=2)
    with torch.no_grad():
        ref = dense(input_ids=ids).logits
        err_pruned = (pruned(input_ids=ids).logits - ref).norm()
        err_comp = (comp(input_ids=ids).logits - ref).norm()
    assert err_comp < err_pruned
    from rankwise.compress.metadata import read_result
    meta = read_result(tmp_path / "comp")  # the compensation recipe ran through the pipeline, with its records
    assert [(r.stage, r.record) for r in meta.recipe] == [
        ("given-factors", {"low_rank": 0, "dense": 14}), ("given-ranks", {"ratio": None, "factorized": 14, "dense": 0}),
        ("eora", {"paths": 14, "params": meta.compensation_params})]
    r = cli("compensate", orig_dir, tmp_path / "comp", "-o", tmp_path / "again", "--eora-rank", 4,
            "--calib", f"text:{austen_file}", "--nsamples", 2, "--seqlen", 48, "--device", "cpu")
    assert r.exit_code == 2 and "already has a compensation path" in r.output
    assert not (tmp_path / "again").exists()


def test_cli_compress_with_eora_then_export_peft(tmp_path, tiny_dirs, austen_file, cli):
    """The user's path: `compress model --compensate eora`, then `compress export-peft`, then PEFT loads it."""
    import json

    from rankwise.compress.peft_export import load_eora_adapter, strip_compensation
    ck, adapter = tmp_path / "ck", tmp_path / "adapter"
    res = cli("model", tiny_dirs["llama"], "-o", ck, "--ratio", "0.3", "--compensate", "eora", "--eora-rank", "4",
              "--calib", f"text:{austen_file}", "--nsamples", "4", "--seqlen", "32", "--device", "cpu")
    assert res.exit_code == 0, res.output
    mods = json.loads((ck / "config.json").read_text())["rankwise"]["modules"]
    assert all(m["lora_rank"] == 4 for m in mods.values())
    res = cli("export-peft", ck, "-o", adapter)
    assert res.exit_code == 0, res.output
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert set(cfg["rank_pattern"]) == set(mods) and set(cfg["rank_pattern"].values()) == {4}
    probe = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    base = load_rankwise_model(str(ck))
    with torch.no_grad():
        ref = base(input_ids=probe).logits
    strip_compensation(base)
    with torch.no_grad():
        got = load_eora_adapter(base, adapter)(input_ids=probe).logits
    assert torch.allclose(got, ref, atol=1e-5)
    res = cli("export-peft", tiny_dirs["llama"], "-o", tmp_path / "a2")  # a dense model has nothing to export
    assert res.exit_code == 2 and not (tmp_path / "a2").exists()


def test_truncated_solver_matches_the_full_decomposition():
    """EoRA's rank-r path from randomized subspace iteration: the same data-weighted residual error as the
    full decomposition (to 1e-4 relative), on a residual with a slowly decaying spectrum."""
    from types import SimpleNamespace

    from rankwise.compress.stages.correct_eora import eora_factors
    g = torch.Generator().manual_seed(0)
    m, n, r = 96, 80, 8
    X = torch.randn(400, n, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2.0, n, dtype=torch.float64)
    R = torch.randn(m, n, generator=g, dtype=torch.float64) / (1 + torch.arange(n, dtype=torch.float64)) ** 0.5
    errors = {}
    for truncated in (True, False):
        stats = SimpleNamespace(covariance=X.T @ X / X.shape[0], cache={})
        B, A = eora_factors(R, stats, r, truncated=truncated)
        assert B.shape == (m, r) and A.shape == (r, n)
        errors[truncated] = ((R - B @ A) @ X.T).norm().item()
    assert errors[True] <= errors[False] * (1 + 1e-4)
    assert errors[False] < (R @ X.T).norm().item()


def test_adapter_readme_snippet_reproduces_the_full_checkpoint(tmp_path, tiny_dirs, austen_file, cli, monkeypatch,
                                                               recwarn):
    """The load snippet in the exported adapter's README, run as written (transformers + peft only), gives the
    full checkpoint's logits; the base alone does not."""
    import json
    import re

    import transformers
    monkeypatch.chdir(tmp_path)  # the snippet names the folders as given on the command line
    res = cli("model", tiny_dirs["llama"], "-o", "ck", "--ratio", "0.3", "--compensate", "eora", "--eora-rank", "4",
              "--calib", f"text:{austen_file}", "--nsamples", "4", "--seqlen", "32", "--device", "cpu")
    assert res.exit_code == 0, res.output
    res = cli("export-peft", "ck", "-o", "adapter")
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tmp_path / "adapter" / "base")
    [snippet] = re.findall(r"```python\n(.*?)```", (tmp_path / "adapter" / "README.md").read_text(), re.S)
    assert len([ln for ln in snippet.splitlines() if ln and not ln.startswith(("from ", "import "))]) == 2
    scope = {}
    exec(snippet, scope)  # noqa: S102 - the documented snippet, as a user would paste it
    probe = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = load_rankwise_model("ck")(input_ids=probe).logits
        assert torch.allclose(scope["model"](input_ids=probe).logits, full, atol=1e-5)
        base = transformers.AutoModelForCausalLM.from_pretrained("adapter/base", trust_remote_code=True)
        assert not torch.allclose(base(input_ids=probe).logits, full, atol=1e-3)
    assert not [w for w in recwarn if "Unsupported layer type" in str(w.message)]
