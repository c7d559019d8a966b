"""Shared bits of the method tests: a tiny model, its calibration ids, and a compression config."""
from __future__ import annotations

import torch

from rankwise.calib.data import calibration_set
from rankwise.compress.config import CompressConfig
from tiny import austen_text, tiny_model, tiny_tokenizer


def calib_ids(nsamples: int = 6, seqlen: int = 48, seed: int = 0) -> torch.Tensor:
    return calibration_set(tiny_tokenizer(), "austen", nsamples, seqlen, seed, text=austen_text(40_000)).input_ids


def config(**kw) -> CompressConfig:
    base = dict(model="tiny", method="svd-llm", ratio=0.3, calib="text:austen", nsamples=6, seqlen=48,
                batch_size=2, device="cpu")
    base.update(kw)
    return CompressConfig(**base)


def model(family: str = "llama"):
    return tiny_model(family)
