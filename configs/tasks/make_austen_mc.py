"""Build austen_mc.jsonl: a small multiple-choice "which sentence comes next?" task from Jane Austen's novels.

Each item gives one sentence of the novel as context and four candidate continuations: the sentence that
really follows it in the same paragraph, and three sentences of similar length drawn from far away in the
book. A language model that has learnt anything about English narrative should prefer the true continuation;
a broken (over-compressed) one drifts to chance (25%). Deterministic for a seed; public-domain text only.

    python configs/tasks/make_austen_mc.py [--source PATH] [--items 200] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from rankwise.calib.sentences import sentences

HERE = Path(__file__).resolve().parent
DEFAULT_SOURCE = HERE.parents[2] / "shared" / "data" / "austen.txt"


def paragraphs(text: str) -> list[str]:
    """Prose paragraphs (chapter headings, short lines and dialogue fragments dropped)."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        para = " ".join(block.split())
        if len(para) > 200 and not para.isupper():
            out.append(para)
    return out


def words(s: str) -> int:
    return len(s.split())


def build(text: str, items: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    # (paragraph index, sentence) for every sentence of a usable length
    pool = [(i, s) for i, p in enumerate(paragraphs(text)) for s in sentences(p) if 8 <= words(s) <= 40]
    pairs = []  # (paragraph index, context, true continuation)
    for i, p in enumerate(paragraphs(text)):
        ss = sentences(p)
        for a, b in zip(ss, ss[1:]):
            if 8 <= words(a) <= 40 and 8 <= words(b) <= 40:
                pairs.append((i, a, b))
    rng.shuffle(pairs)
    rows = []
    for para, context, truth in pairs[:items]:
        # distractors: similar length (so length alone does not give the answer), far from this paragraph
        near_len = [s for j, s in pool if abs(j - para) > 20 and abs(words(s) - words(truth)) <= 3 and s != truth]
        choices = rng.sample(near_len, 3) + [truth]
        rng.shuffle(choices)
        rows.append({"id": len(rows), "context": context, "choices": choices, "label": choices.index(truth)})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE / "austen_mc.jsonl")
    args = ap.parse_args()
    rows = build(args.source.read_text(encoding="utf-8"), args.items, args.seed)
    with open(args.out, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} items to {args.out}")


if __name__ == "__main__":
    main()
