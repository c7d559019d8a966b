"""The generation check of `compress evaluate --generation-check`: does the model still answer as the dense
model does?

Perplexity on plain text can stay close to the dense model's while a compressed chat model has lost its chat
behaviour (answering a question with an immediate end-of-turn token). The check asks both models a small
fixed set of prompts (`configs/chat/generation_prompts.jsonl`, one `{"prompt": ...}` a line; the chat
template applied when the tokenizer has one), decodes greedily up to `max_new_tokens` tokens (stopping at
the end-of-sequence tokens of the model's generation config), and scores the model's answers against the
reference model's (by default the checkpoint's dense source model): `exact_match` is the share of prompts
whose answer tokens are identical, `first_token_agreement` the share whose first answer token is (an
immediate end-of-turn counts as a token).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict

from rankwise.compress.loading import load_model
from rankwise.errors import RankwiseError

DEFAULT_PROMPTS = Path(__file__).resolve().parents[1] / "configs" / "chat" / "generation_prompts.jsonl"


class GenerationAnswer(BaseModel):
    """One prompt: both models' answers (decoded text) and whether they agree."""
    model_config = ConfigDict(extra="forbid")
    prompt: str
    answer: str
    reference: str
    exact: bool
    first_token: bool


class GenerationCheck(BaseModel):
    """The generation check's record in the evaluation JSON (`generation`)."""
    model_config = ConfigDict(extra="forbid")
    prompts: str
    reference_model: str
    chat_template: bool
    max_new_tokens: int
    exact_match: float
    first_token_agreement: float
    answers: list[GenerationAnswer]


def load_prompts(path: str | Path = DEFAULT_PROMPTS) -> list[str]:
    prompts = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                        raise RankwiseError(f"{path}:{lineno}: expected {{\"prompt\": TEXT}}")
                    prompts.append(row["prompt"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RankwiseError(f"cannot read prompts file {str(path)!r}: {e}") from None
    if not prompts:
        raise RankwiseError(f"prompts file {str(path)!r} holds no prompt")
    return prompts


def prompt_ids(tokenizer, prompt: str) -> tuple[torch.Tensor, bool]:
    """The prompt as the model sees it in use: a user turn through the chat template (with the assistant's
    generation prompt) when the tokenizer has one, else the plain text as the tokenizer encodes it."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids, True
    return tokenizer(prompt, return_tensors="pt").input_ids, False


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """Each prompt's greedy answer tokens (up to and including an end-of-sequence token)."""
    device = next(model.parameters()).device
    eos = model.generation_config.eos_token_id
    stops = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(stops), 0)
    answers = []
    for prompt in prompts:
        ids = prompt_ids(tokenizer, prompt)[0].to(device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad, temperature=None, top_p=None, top_k=None)
        tokens = out[0, ids.shape[1]:].tolist()
        end = next((i + 1 for i, t in enumerate(tokens) if t in stops), len(tokens))
        answers.append(tokens[:end])
    return answers


def score_answers(tokenizer, prompts: list[str], answers: list[list[int]], references: list[list[int]],
                  path: str, reference_model: str, chat: bool, max_new_tokens: int) -> GenerationCheck:
    rows = [GenerationAnswer(prompt=p, answer=tokenizer.decode(a), reference=tokenizer.decode(r), exact=a == r,
                             first_token=a[:1] == r[:1]) for p, a, r in zip(prompts, answers, references)]
    n = max(len(rows), 1)
    return GenerationCheck(prompts=path, reference_model=reference_model, chat_template=chat,
                           max_new_tokens=max_new_tokens, exact_match=sum(r.exact for r in rows) / n,
                           first_token_agreement=sum(r.first_token for r in rows) / n, answers=rows)


def check_generation(model, tokenizer, reference: str, max_new_tokens: int = 32, prompts: str | Path | None = None,
                     dtype: str = "auto", trust_remote_code: bool = False) -> GenerationCheck:
    """The model's greedy answers against the reference model's (loaded here, on the model's device, with the
    evaluated model's tokenizer so both answer the same token ids)."""
    if max_new_tokens < 1:
        raise RankwiseError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    path = str(prompts or DEFAULT_PROMPTS)
    texts = load_prompts(path)
    answers = greedy_answers(model, tokenizer, texts, max_new_tokens)
    device = str(next(model.parameters()).device)
    ref_model, _, _ = load_model(reference, dtype, device, trust_remote_code)
    references = greedy_answers(ref_model, tokenizer, texts, max_new_tokens)
    del ref_model
    chat = prompt_ids(tokenizer, texts[0])[1]
    return score_answers(tokenizer, texts, answers, references, path, reference, chat, max_new_tokens)
