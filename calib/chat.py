"""Chat-formatted calibration windows: conversations rendered through the tokenizer's chat template.

Calibration on plain text alone teaches a chat model's factors nothing of its chat format (role markers,
end-of-turn tokens, an answer starting right after the assistant marker); compressed, such a model may
answer a question with an immediate end-of-turn. Mixing windows of templated conversations into the
calibration set gives the factors those activations too.

A conversations file is JSONL, one `{"messages": [{"role": ..., "content": ...}, ...]}` a line. Each
conversation is rendered with `tokenizer.apply_chat_template` (as text, then tokenized without adding
special tokens: the template writes its own), the renderings are concatenated, and windows are drawn from
them as from plain text. `mixed_calibration_set` replaces a fraction of the text windows by chat windows.
The default (fraction None) follows the tokenizer: `DEFAULT_CHAT_FRACTION` of the windows when it has a chat
template, none otherwise; the default conversations are the package's `configs/chat/austen_chat.jsonl`.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch

from rankwise.calib.data import CalibrationSet, calibration_set, jsonl_rows, resolve_bos, tokenize
from rankwise.errors import RankwiseError

DEFAULT_CONVERSATIONS = Path(__file__).resolve().parents[1] / "configs" / "chat" / "austen_chat.jsonl"
DEFAULT_CHAT_FRACTION = 0.25


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def load_conversations(path: str | Path) -> list[list[dict]]:
    """Every line's `messages` (a list of {role, content}); one line naming the file and line when bad."""
    conversations = []
    for lineno, row in jsonl_rows(path, "conversations file"):
        messages = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise RankwiseError(f"{path}:{lineno}: expected {{\"messages\": [{{\"role\": ..., "
                                f"\"content\": ...}}, ...]}}")
        conversations.append(messages)
    if not conversations:
        raise RankwiseError(f"conversations file {str(path)!r} holds no conversation")
    return conversations


def chat_tokens(tokenizer, conversations: list[list[dict]]) -> torch.Tensor:
    """The conversations rendered with the tokenizer's chat template, concatenated, as one 1-D token tensor."""
    if not has_chat_template(tokenizer):
        raise RankwiseError("chat calibration needs a tokenizer with a chat template (this one has none)")
    text = "".join(tokenizer.apply_chat_template(messages, tokenize=False) for messages in conversations)
    return tokenize(tokenizer, text)


def resolve_chat_fraction(tokenizer, fraction: float | None) -> float:
    """The share of chat windows: as given, else DEFAULT_CHAT_FRACTION with a chat template and 0 without."""
    if fraction is None:
        return DEFAULT_CHAT_FRACTION if has_chat_template(tokenizer) else 0.0
    if not 0 <= fraction < 1:
        raise RankwiseError(f"--chat-fraction must be at least 0 and below 1, got {fraction:g}")
    return fraction


def mixed_calibration_set(tokenizer, source: str, nsamples: int, seqlen: int, seed: int = 0,
                          bos: bool | None = None, chat: str | None = None,
                          chat_fraction: float | None = None, text: str | None = None) -> CalibrationSet:
    """`calibration_set`'s windows with round(fraction * nsamples) of them drawn from chat-templated
    conversations (`chat`: a conversations file, None: the default one) instead, in a seeded order.
    Deterministic for a seed."""
    fraction = resolve_chat_fraction(tokenizer, chat_fraction)
    n_chat = min(round(fraction * nsamples), nsamples - 1)
    if n_chat <= 0:
        return calibration_set(tokenizer, source, nsamples, seqlen, seed, text=text, bos=bos)
    plain = calibration_set(tokenizer, source, nsamples - n_chat, seqlen, seed, text=text, bos=bos)
    path = str(chat or DEFAULT_CONVERSATIONS)
    ids = chat_tokens(tokenizer, load_conversations(path))
    bos_id = resolve_bos(tokenizer, bos)
    body = seqlen - 1 if bos_id is not None else seqlen
    if len(ids) <= body:
        raise RankwiseError(f"conversations file {path!r} renders to {len(ids)} tokens, not more than "
                            f"--seqlen {seqlen}: use more conversations or a shorter seqlen")
    rng = random.Random(seed + 1)
    windows = torch.stack([ids[s:s + body] for s in (rng.randint(0, len(ids) - body - 1) for _ in range(n_chat))])
    if bos_id is not None:
        windows = torch.cat([torch.full((n_chat, 1), bos_id, dtype=windows.dtype), windows], dim=1)
    mixed = torch.cat([plain.input_ids, windows.to(plain.input_ids.dtype)])
    order = torch.randperm(nsamples, generator=torch.Generator().manual_seed(seed))
    return CalibrationSet(mixed[order], source, nsamples, seqlen, seed, plain.bos, chat=path, chat_windows=n_chat)
