"""Tiny models and a tokenizer built in code (no hub, no download): the test suite's fixtures."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
import transformers

AUSTEN = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "austen.txt"


def austen_text(chars: int = 200_000) -> str:
    with open(AUSTEN, encoding="utf-8") as f:
        return f.read(chars)


@lru_cache(maxsize=1)
def tiny_tokenizer():
    """A 300-token byte-level BPE trained on Austen in a fraction of a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([austen_text(50_000)], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


FAMILIES = {
    "llama": lambda v: transformers.LlamaConfig(
        vocab_size=v, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True),
    "mistral": lambda v: transformers.MistralConfig(
        vocab_size=v, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=256, sliding_window=None),
    "qwen2": lambda v: transformers.Qwen2Config(
        vocab_size=v, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256),
}


def tiny_model(family: str = "llama", layers: int = 2, seed: int = 0, **overrides):
    tok = tiny_tokenizer()
    cfg = FAMILIES[family](len(tok))
    cfg.num_hidden_layers = layers
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def save_tiny(path: Path, family: str = "llama", **kw) -> Path:
    model = tiny_model(family, **kw)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
