"""Text sources and token windows, as the papers sample them.

A source is a name the hub knows (`wikitext2`, `c4`, `ptb`, loaded through `datasets`) or a local file:
`text:PATH` (plain UTF-8) or `jsonl:PATH[:field]` (one JSON object a line, `field` defaults to "text").
Documents are joined with "\n\n" (the perplexity protocol of GPTQ / SVD-LLM for WikiText-2).
"""
from __future__ import annotations

import json
import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rankwise.errors import RankwiseError, RankwiseWarning, first_line

if TYPE_CHECKING:  # torch only where windows are built: checking a source name stays light
    import torch

# name -> (dataset path, config name, {split: data_files or split name}, text field)
HUB_SOURCES = {
    "wikitext2": ("Salesforce/wikitext", "wikitext-2-raw-v1", {"train": "train", "test": "test"}, "text"),
    "ptb": ("ptb-text-only/ptb_text_only", "penn_treebank", {"train": "train", "test": "test"}, "sentence"),
    "c4": ("allenai/c4", None, {"train": "en/c4-train.00000-of-01024.json.gz",
                                "test": "en/c4-validation.00000-of-00008.json.gz"}, "text"),
}
LOCAL_PREFIXES = ("text:", "jsonl:")


def describe_sources() -> str:
    return ", ".join(HUB_SOURCES) + ", text:PATH, jsonl:PATH[:field]"


def validate_source(source: str) -> None:
    """Check a source name or local path without reading it (cheap, for early CLI validation)."""
    if source in HUB_SOURCES:
        return
    if source.startswith("text:"):
        path = source[len("text:"):]
    elif source.startswith("jsonl:"):
        path = _split_jsonl(source)[0]
    else:
        raise RankwiseError(f"unknown text source {source!r}: use one of {describe_sources()}")
    if not os.path.isfile(path):
        raise RankwiseError(f"text source {source!r}: file {path!r} does not exist")


def source_path(source: str) -> str | None:
    """The local file a source reads, or None for a hub data set."""
    if source.startswith("text:"):
        return source[len("text:"):]
    if source.startswith("jsonl:"):
        return _split_jsonl(source)[0]
    return None


def _split_jsonl(source: str) -> tuple[str, str]:
    rest = source[len("jsonl:"):]
    # PATH may contain ':' (rare); the field is whatever follows the last ':' if that is not part of the path
    path, sep, field = rest.rpartition(":")
    if sep and path and not os.path.exists(rest):
        return path, field
    return rest, "text"


def _load_hub_text(name: str, split: str) -> str:
    path, config, splits, field = HUB_SOURCES[name]
    try:
        import datasets
        if path == "allenai/c4":
            ds = datasets.load_dataset(path, data_files={split: splits[split]}, split=split)
        else:
            ds = datasets.load_dataset(path, config, split=splits[split])
    except Exception as e:  # network, offline mode, missing script: one clear line for the user
        raise RankwiseError(
            f"could not load dataset {name!r} ({path}, split {split}) from the hub: {first_line(e, 200)}. "
            f"Offline? Use a local file instead: text:PATH or jsonl:PATH[:field]") from None
    sep = " " if name == "ptb" else "\n\n"
    return sep.join(ds[field])


def jsonl_rows(path: str | Path, what: str):
    """(line number, parsed row) for every non-empty line of a JSONL file; a file that cannot be read or parsed
    is one line naming it (`what`: "jsonl file", "conversations file")."""
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield lineno, json.loads(line)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RankwiseError(f"cannot read {what} {str(path)!r}: {e}") from None


def load_text(source: str, split: str = "train") -> str:
    """The whole text of a source's split (`train` for calibration, `test` for evaluation)."""
    validate_source(source)
    if source in HUB_SOURCES:
        text = _load_hub_text(source, split)
    elif source.startswith("text:"):
        path = source[len("text:"):]
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise RankwiseError(f"cannot read text file {path!r}: {e}") from None
    else:
        path, field = _split_jsonl(source)
        docs = []
        for lineno, row in jsonl_rows(path, "jsonl file"):
            if not isinstance(row, dict):
                raise RankwiseError(f"{path}:{lineno}: a jsonl row must be a JSON object with the field "
                                    f"{field!r}, got {json.dumps(row)[:40]}")
            if field not in row:
                raise RankwiseError(f"{path}:{lineno}: no field {field!r} (fields: {sorted(row)})")
            docs.append(str(row[field]))
        text = "\n\n".join(docs)
    if not text.strip():
        raise RankwiseError(f"text source {source!r} is empty")
    return text


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Tokenize a whole text once (1-D LongTensor), without the length warning for long inputs."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False).input_ids[0]
    return ids


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the tokenizer starts an encoded text with BOS in normal use (Llama 3, Gemma: yes; GPT-2,
    SmolLM2: no). Asked of the tokenizer itself, so its own post-processor decides."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True).input_ids
    return len(ids) > 0 and ids[0] == bos_id


def resolve_bos(tokenizer, bos: bool | None) -> int | None:
    """The BOS id every window starts with, or None: `bos` None follows the tokenizer's own setting."""
    if bos is None:
        bos = tokenizer_adds_bos(tokenizer)
    if not bos:
        return None
    if getattr(tokenizer, "bos_token_id", None) is None:
        raise RankwiseError("--bos given but the tokenizer has no BOS token")
    return tokenizer.bos_token_id


@dataclass
class CalibrationSet:
    input_ids: torch.Tensor  # [nsamples, seqlen]
    source: str
    nsamples: int
    seqlen: int
    seed: int
    bos: bool = False        # every window starts with BOS, then seqlen - 1 text tokens
    chat: str | None = None  # the conversations file chat-templated windows came from (calib/chat.py)
    chat_windows: int = 0    # how many of the windows are chat-templated

    def describe(self) -> dict:
        return {"source": self.source, "nsamples": self.nsamples, "seqlen": self.seqlen, "seed": self.seed,
                "bos": self.bos, "tokens": self.nsamples * self.seqlen, "chat": self.chat,
                "chat_windows": self.chat_windows}


def calibration_set(tokenizer, source: str, nsamples: int, seqlen: int, seed: int = 0,
                    text: str | None = None, bos: bool | None = None) -> CalibrationSet:
    """`nsamples` random windows of `seqlen` tokens from the train split (GPTQ / SVD-LLM sampling).

    Calibration sees the model as it runs: when the tokenizer adds BOS in normal use (or `bos` is True),
    each window is BOS + seqlen - 1 text tokens, so a model that uses BOS as an attention sink is
    calibrated on the activations it has in use. Deterministic for a seed: the start offsets come from
    `random.Random(seed)` only.
    """
    import torch
    if nsamples < 1 or seqlen < 2:
        raise RankwiseError(f"need nsamples >= 1 and seqlen >= 2, got nsamples={nsamples}, seqlen={seqlen}")
    bos_id = resolve_bos(tokenizer, bos)
    body = seqlen - 1 if bos_id is not None else seqlen
    ids = tokenize(tokenizer, text if text is not None else load_text(source, "train"))
    if len(ids) == 0:
        raise RankwiseError(f"calibration text {source!r} yields no tokens")
    if len(ids) <= body:
        raise RankwiseError(f"calibration text {source!r} has {len(ids)} tokens, not more than "
                            f"--seqlen {seqlen}: use a longer text or a shorter seqlen")
    if nsamples * seqlen > len(ids):
        warnings.warn(f"--nsamples {nsamples} x --seqlen {seqlen} = {nsamples * seqlen:,} tokens is more than "
                      f"the {len(ids):,} that {source!r} holds: the windows repeat the text, which costs time "
                      f"and adds little", RankwiseWarning, stacklevel=2)
    rng = random.Random(seed)
    starts = [rng.randint(0, len(ids) - body - 1) for _ in range(nsamples)]
    windows = torch.stack([ids[s:s + body] for s in starts])
    if bos_id is not None:
        windows = torch.cat([torch.full((nsamples, 1), bos_id, dtype=windows.dtype), windows], dim=1)
    return CalibrationSet(windows, source, nsamples, seqlen, seed, bos_id is not None)
