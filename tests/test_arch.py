"""Generic discovery of blocks/Linears and the capture/propagate machinery across model families."""
import pytest
import torch
import transformers

from rankwise.calib.capture import capture_block_inputs, propagate
from rankwise.compress.arch import find_decoder_blocks, find_linears
from rankwise.compress.checkpoint import save_checkpoint
from rankwise.compress.config import CompressConfig
from rankwise.compress.lowrank import load_rankwise_model
from rankwise.compress.pipeline import compress_model

V = 300
FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2),
    "gemma2": lambda: transformers.Gemma2Config(vocab_size=V, hidden_size=64, intermediate_size=96,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                head_dim=16, sliding_window=16),  # local + global masks differ
    "gemma3": lambda: transformers.Gemma3TextConfig(vocab_size=V, hidden_size=64, intermediate_size=96,
                                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                    head_dim=16, sliding_window=16),
    "opt": lambda: transformers.OPTConfig(vocab_size=V, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                          num_attention_heads=4, word_embed_proj_dim=64),
    "phi3": lambda: transformers.Phi3Config(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, pad_token_id=0),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, bos_token_id=0,
                                            eos_token_id=0),  # Conv1D layers
}


def build(family):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(FAMILIES[family]()).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_and_propagate_reproduce_hidden_states(family):
    """Block inputs captured once, then pushed block by block, equal the model's own hidden states."""
    model = build(family)
    ids = torch.randint(0, V, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True).hidden_states
    _, blocks = find_decoder_blocks(model)
    inputs = capture_block_inputs(model, blocks, ids, batch_size=2, device=torch.device("cpu"),
                                  storage=torch.device("cpu"))
    assert len(inputs.hidden) == 2  # batches of 2 + 1
    for i, block in enumerate(blocks):
        got = torch.cat(inputs.hidden)
        assert torch.allclose(got, ref[i], atol=1e-5), f"block {i} input differs"
        propagate(block, inputs, i, torch.device("cpu"))
    assert all(len(find_linears(b)) >= 4 for b in blocks)


@pytest.mark.parametrize("family", FAMILIES)
def test_compress_and_reload_every_family(family, tmp_path):
    model = build(family)
    cfg = CompressConfig(model="in-memory", method="svd-llm", ratio=0.3, nsamples=4, seqlen=32, device="cpu")
    calib = torch.randint(0, V, (4, 32), generator=torch.Generator().manual_seed(2))
    meta = compress_model(model, calib, cfg)
    meta.source_model, meta.host_peak_gib = "in-memory", 0.0
    assert 0.3 <= meta.ratio_achieved < 0.36
    assert not find_linears(find_decoder_blocks(model)[1][0]), "every block Linear is factorized"
    save_checkpoint(model, None, tmp_path / "ckpt", meta)
    back = load_rankwise_model(str(tmp_path / "ckpt"))
    x = torch.randint(0, V, (2, 20))
    with torch.no_grad():
        assert torch.allclose(back(x).logits, model(x).logits, atol=1e-5)
