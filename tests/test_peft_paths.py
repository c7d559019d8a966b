"""Every documented PEFT loading path of an exported EoRA adapter gives the full checkpoint's logits."""
import json

import pytest
import torch

from rankwise.compress.lowrank import load_rankwise_model

PROBE = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def exported(tiny_dirs, austen_file, tmp_path_factory):
    """A tiny EoRA checkpoint, its logits, and its exported adapter folder."""
    from typer.testing import CliRunner

    from rankwise.cli.main import app
    root = tmp_path_factory.mktemp("peft")
    ck, adapter = root / "ck", root / "adapter"
    runner = CliRunner()
    res = runner.invoke(app, ["model", str(tiny_dirs["llama"]), "-o", str(ck), "--ratio", "0.3", "--compensate",
                              "eora", "--eora-rank", "4", "--calib", f"text:{austen_file}", "--nsamples", "4",
                              "--seqlen", "32", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["export-peft", str(ck), "-o", str(adapter)])
    assert res.exit_code == 0, res.output
    with torch.no_grad():
        full = load_rankwise_model(str(ck))(input_ids=PROBE).logits
    return adapter, full


def logits(model):
    with torch.no_grad():
        return model(input_ids=PROBE).logits


def test_load_adapter_on_the_base(exported):
    import transformers
    adapter, full = exported
    model = transformers.AutoModelForCausalLM.from_pretrained(adapter / "base", trust_remote_code=True)
    assert not torch.allclose(logits(model), full, atol=1e-3)  # the base alone lacks the EoRA paths
    model.load_adapter(str(adapter))
    torch.testing.assert_close(logits(model), full, atol=1e-5, rtol=1e-5)


def test_auto_peft_model(exported):
    from peft import AutoPeftModelForCausalLM
    adapter, full = exported
    model = AutoPeftModelForCausalLM.from_pretrained(str(adapter), trust_remote_code=True)
    torch.testing.assert_close(logits(model), full, atol=1e-5, rtol=1e-5)


def test_peft_model_from_pretrained(exported):
    import transformers
    from peft import PeftModel
    adapter, full = exported
    base = transformers.AutoModelForCausalLM.from_pretrained(adapter / "base", trust_remote_code=True)
    model = PeftModel.from_pretrained(base, str(adapter))
    torch.testing.assert_close(logits(model), full, atol=1e-5, rtol=1e-5)


def test_adapter_config_names_a_causal_lm_task(exported):
    adapter, _ = exported
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM" and not cfg.get("auto_mapping")
