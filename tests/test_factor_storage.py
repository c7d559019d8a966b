"""Factors stored in int8 / int4 (`--factor-dtype`): the checkpoint loads in plain transformers, keeps the
quantized factors, and computes exactly what its dequantized weights compute; int8 costs little against float
factors; an int4 group that cannot divide the ranks is refused in one line."""
import copy
import json

import pytest
import torch
import transformers
from torch import nn

from tiny import austen_text, tiny_tokenizer

# The loaded model's classes are the checkpoint's modeling_rankwise.py's (a copy of compress/lowrank.py): named.
QUANTIZED = ("Int8Linear", "Int4Linear")


def compress(cli, tiny_dirs, austen_file, out, *extra):
    res = cli("model", tiny_dirs["llama"], "-o", out, "--ratio", "0.3", "--calib", f"text:{austen_file}",
              "--nsamples", "8", "--seqlen", "32", "--device", "cpu", *extra)
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def checkpoints(tiny_dirs, austen_file, tmp_path_factory):
    from typer.testing import CliRunner

    from rankwise.cli.main import app
    root = tmp_path_factory.mktemp("storage")

    def cli(*args):
        return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    extra = {"auto": (), "int8": (), "int4": ("--int4-group", "16")}  # a group the tiny model's ranks can hold
    return {dt: compress(cli, tiny_dirs, austen_file, root / dt, "--factor-dtype", dt, *extra[dt])
            for dt in ("auto", "int8", "int4")}


def text_ids(n: int = 96) -> torch.Tensor:
    return tiny_tokenizer()(austen_text(20_000)[10_000:], return_tensors="pt").input_ids[:, :n]


def dequantized_copy(model: nn.Module) -> nn.Module:
    """The model with every quantized factor replaced by a float nn.Linear holding its dequantized weight."""
    ref = copy.deepcopy(model)
    for name, mod in list(ref.named_modules()):
        if type(mod).__name__ in QUANTIZED:
            parent, _, child = name.rpartition(".")
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(mod.dequantized())
                if mod.bias is not None:
                    lin.bias.copy_(mod.bias)
            setattr(ref.get_submodule(parent), child, lin)
    return ref


@pytest.mark.parametrize("factor_dtype, stored", [("int8", torch.int8), ("int4", torch.uint8)])
def test_quantized_checkpoint_loads_in_transformers_and_matches_dequantized_weights(checkpoints, factor_dtype,
                                                                                    stored):
    ck = checkpoints[factor_dtype]
    modules = json.loads((ck / "config.json").read_text())["rankwise"]["modules"]
    assert modules and all(m["factor_dtype"] == factor_dtype for m in modules.values())
    model = transformers.AutoModelForCausalLM.from_pretrained(ck, trust_remote_code=True).eval()
    layers = [m for m in model.modules() if getattr(m, "factor_dtype", None) == factor_dtype]
    assert len(layers) == len(modules)
    assert all(m.A.weight.dtype == stored and m.B.weight.dtype == stored for m in layers)  # kept quantized
    ids = text_ids()
    with torch.no_grad():
        logits = model(ids).logits
        ref = dequantized_copy(model)(ids).logits
    assert not any(type(m).__name__ in QUANTIZED for m in dequantized_copy(model).modules())
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)


def test_int8_factors_cost_little_against_float_factors(checkpoints):
    ids = text_ids(128)

    def loss(ck):
        model = transformers.AutoModelForCausalLM.from_pretrained(ck, trust_remote_code=True).eval()
        with torch.no_grad():
            return float(model(ids, labels=ids).loss)
    float_loss, int8_loss = loss(checkpoints["auto"]), loss(checkpoints["int8"])
    print(f"loss: float factors {float_loss:.5f}, int8 factors {int8_loss:.5f}")
    assert abs(int8_loss - float_loss) < 0.01 * float_loss, (float_loss, int8_loss)


def test_int8_checkpoint_is_smaller_on_disk(checkpoints):
    def size(ck):
        return sum(p.stat().st_size for p in ck.glob("*.safetensors"))
    assert size(checkpoints["int8"]) < size(checkpoints["auto"])
    assert size(checkpoints["int4"]) < size(checkpoints["int8"])


def one_error_line(res) -> str:
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert res.exit_code == 2 and len(errors) == 1 and "Traceback" not in res.output, res.output
    return errors[0]


def test_int4_group_that_cannot_divide_an_input_size_is_refused(cli, tiny_dirs, austen_file, tmp_path):
    res = cli("model", tiny_dirs["llama"], "-o", tmp_path / "out", "--ratio", "0.3", "--calib",
              f"text:{austen_file}", "--nsamples", "4", "--seqlen", "32", "--device", "cpu",
              "--factor-dtype", "int4", "--int4-group", "48")
    assert "int4 group 48 does not divide the input size 64" in one_error_line(res)
    assert not (tmp_path / "out").exists()


def test_int4_group_that_cannot_divide_a_rank_is_refused(cli, tiny_dirs, austen_file, tmp_path):
    recipe = tmp_path / "recipe.yaml"  # a recipe's own rank multiple is kept as given
    recipe.write_text("- {stage: svd-llm}\n- {stage: uniform, options: {rank_multiple: 1}}\n")
    res = cli("model", tiny_dirs["llama"], "-o", tmp_path / "out", "--ratio", "0.3", "--recipe", recipe,
              "--calib", f"text:{austen_file}", "--nsamples", "4", "--seqlen", "32", "--device", "cpu",
              "--factor-dtype", "int4", "--int4-group", "16")
    line = one_error_line(res)
    assert "int4 group 16 does not divide the rank" in line and "--rank-multiple" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("ranks", ["uniform", "welore", "loss-aware"])
@pytest.mark.parametrize("factor_dtype", ["int8", "auto"])
def test_byte_budget_is_met_within_one_point_by_every_allocator(cli, tiny_dirs, austen_file, tmp_path, ranks,
                                                                factor_dtype):
    out, js = tmp_path / "out", tmp_path / "run.json"
    res = cli("model", tiny_dirs["llama"], "-o", out, "--size-ratio", "0.5", "--ranks", ranks, "--factor-dtype",
              factor_dtype, "--calib", f"text:{austen_file}", "--nsamples", "8", "--seqlen", "32", "--device",
              "cpu", "--json", js)
    assert res.exit_code == 0, res.output
    meta = json.loads(js.read_text())
    assert meta["size_ratio_requested"] == 0.5 and "ratio_requested" not in meta
    achieved = meta["size_ratio_achieved"]
    assert 0.49 <= achieved <= 0.5, achieved
    assert meta["targeted_bytes_before"] == 2 * meta["targeted_params_before"]
    assert meta["targeted_bytes_after"] == checkpoint_bytes(out)
    assert "targeted Linear bytes" in res.output
    shown = cli("inspect", out)
    expected = (f"targeted Linears {meta['targeted_bytes_after']:,} bytes of {meta['targeted_bytes_before']:,} at 16 "
                f"bits per weight (size ratio {achieved:.4f}, asked 0.5)")
    assert shown.exit_code == 0 and expected in shown.output, shown.output


def checkpoint_bytes(ck) -> int:
    """Bytes of the targeted Linears' tensors in a checkpoint: integer tensors and float32 scales as stored,
    float weights and biases at 16 bits (the budget's convention, whatever dtype the file has)."""
    from safetensors import safe_open
    total = 0
    with safe_open(ck / "model.safetensors", "pt") as f:
        for key in (k for k in f.keys() if ".self_attn." in k or ".mlp." in k):
            t = f.get_tensor(key)
            total += t.numel() * (t.element_size() if key.endswith("weight_scale") or not t.is_floating_point()
                                  else 2)
    return total


def test_byte_budget_refusals(cli, tiny_dirs, austen_file, tmp_path):
    common = ("--calib", f"text:{austen_file}", "--nsamples", "4", "--seqlen", "32", "--device", "cpu")
    impossible = cli("model", tiny_dirs["llama"], "-o", tmp_path / "a", "--size-ratio", "0.01", "--factor-dtype",
                     "int8", *common)
    assert "size ratio 0.01 cannot be reached" in one_error_line(impossible)
    both = cli("model", tiny_dirs["llama"], "-o", tmp_path / "b", "--size-ratio", "0.5", "--ratio", "0.3", *common)
    neither = cli("model", tiny_dirs["llama"], "-o", tmp_path / "c", *common)
    for res in (both, neither):
        assert "--ratio" in one_error_line(res) and "--size-ratio" in one_error_line(res)
    assert not any((tmp_path / d).exists() for d in "abc")


def test_evaluate_compensate_and_export_peft_accept_an_int8_checkpoint(checkpoints, cli, tiny_dirs, austen_file,
                                                                      tmp_path):
    ck = checkpoints["int8"]
    res = cli("evaluate", ck, "--ppl", f"text:{austen_file}", "--seqlen", "64", "--max-windows", "3", "--json",
              tmp_path / "r.json", "--device", "cpu")
    assert res.exit_code == 0, res.output
    ppl = json.loads((tmp_path / "r.json").read_text())["ppl"][f"text:{austen_file}"]
    assert 1.0 < ppl["ppl"] < 1000.0
    comp = tmp_path / "comp"
    res = cli("compensate", tiny_dirs["llama"], ck, "-o", comp, "--eora-rank", "4", "--calib",
              f"text:{austen_file}", "--nsamples", "4", "--seqlen", "48", "--device", "cpu")
    assert res.exit_code == 0, res.output
    modules = json.loads((comp / "config.json").read_text())["rankwise"]["modules"]
    low_rank = [m for m in modules.values() if m["rank"] is not None]
    assert low_rank and all(m["factor_dtype"] == "int8" and m["lora_rank"] == 4 for m in low_rank)
    model = transformers.AutoModelForCausalLM.from_pretrained(comp, trust_remote_code=True).eval()
    ids = text_ids(64)
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    res = cli("export-peft", comp, "-o", tmp_path / "adapter")
    assert res.exit_code == 0, res.output
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert set(config["rank_pattern"].values()) == {4}


def test_store_factors_writes_what_compress_model_writes_with_that_factor_dtype(checkpoints, cli, tmp_path):
    """A float checkpoint's factors stored as int8 afterwards: the same tensors and the same byte accounting as
    the checkpoint compressed with --factor-dtype int8 at the same ratio; the input is left as it was."""
    from safetensors.torch import load_file
    source = sorted(p.stat().st_mtime_ns for p in checkpoints["auto"].iterdir())
    res = cli("store-factors", checkpoints["auto"], "-o", tmp_path / "int8", "--factor-dtype", "int8")
    assert res.exit_code == 0, res.output
    assert "factors stored as int8" in res.output
    mine, theirs = (load_file(ck / "model.safetensors") for ck in (tmp_path / "int8", checkpoints["int8"]))
    assert mine.keys() == theirs.keys()
    for key in theirs:
        assert mine[key].dtype == theirs[key].dtype and torch.equal(mine[key], theirs[key]), key
    record, expected = (json.loads((ck / "config.json").read_text())["rankwise"]
                        for ck in (tmp_path / "int8", checkpoints["int8"]))
    for key in ("modules", "targeted_bytes_before", "targeted_bytes_after"):
        assert record[key] == expected[key], key
    assert record["size_ratio_achieved"] == pytest.approx(expected["size_ratio_achieved"], rel=1e-9)
    assert sorted(p.stat().st_mtime_ns for p in checkpoints["auto"].iterdir()) == source


def test_store_factors_refusals(checkpoints, cli, tmp_path):
    cases = [(checkpoints["int8"], ["--factor-dtype", "int4"], "stores its factors as int8"),
             (checkpoints["auto"], ["--factor-dtype", "int3"], "--factor-dtype 'int3'"),
             (checkpoints["auto"], ["--factor-dtype", "int4", "--int4-group", "6"], "int4 group 6 does not divide")]
    for source, options, needle in cases:
        res = cli("store-factors", source, "-o", tmp_path / "out", *options)
        assert res.exit_code == 2 and needle in res.output and "Traceback" not in res.output, res.output
        assert not (tmp_path / "out").exists()
