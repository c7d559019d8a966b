"""Build austen_chat.jsonl: conversations for calibrating chat models, made from Jane Austen's novels.

Calibration on plain text teaches a compressed model's factors nothing of its chat format (the template's
role markers, end-of-turn tokens, answers that start right after the assistant marker). These conversations
put the novels' own words into that format. Three kinds, in a seeded order:

- dialogue: a paragraph of quoted speech from the novel as the user turn, the quoted paragraph that answers it
  as the assistant turn;
- continuation: "Continue this passage ..." with two sentences of a paragraph, the sentences that follow as
  the answer;
- question: "Which novel by Jane Austen has a character named X?" answered with the novel's title.

Every turn is `{"role": "user" | "assistant", "content": ...}`; a line is `{"messages": [...]}`, the format
`compress model --calib-chat PATH` reads. Deterministic for a seed; public-domain text only.

    python configs/chat/make_austen_chat.py [--source PATH] [--items 240] [--seed 0]
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
NOVELS = ("Emma", "Sense and Sensibility", "Pride and Prejudice", "Mansfield Park", "Northanger Abbey",
          "Persuasion")
CHARACTERS = {"Emma": ["Emma Woodhouse", "Mr. Knightley", "Harriet Smith", "Frank Churchill"],
              "Sense and Sensibility": ["Elinor Dashwood", "Marianne Dashwood", "Colonel Brandon", "Edward Ferrars"],
              "Pride and Prejudice": ["Elizabeth Bennet", "Mr. Darcy", "Jane Bennet", "Mr. Bingley"],
              "Mansfield Park": ["Fanny Price", "Edmund Bertram", "Mary Crawford", "Sir Thomas Bertram"],
              "Northanger Abbey": ["Catherine Morland", "Henry Tilney", "Isabella Thorpe", "General Tilney"],
              "Persuasion": ["Anne Elliot", "Captain Wentworth", "Sir Walter Elliot", "Lady Russell"]}


def paragraphs(text: str) -> list[str]:
    return [" ".join(block.split()) for block in re.split(r"\n\s*\n", text) if block.strip()]


def dialogues(paras: list[str]) -> list[list[dict]]:
    """Consecutive quoted paragraphs of a moderate length: one speaks, the next answers."""
    out = []
    for a, b in zip(paras, paras[1:]):
        if a.startswith('"') and b.startswith('"') and 40 <= len(a) <= 400 and 40 <= len(b) <= 400:
            out.append([{"role": "user", "content": a}, {"role": "assistant", "content": b}])
    return out


def continuations(paras: list[str]) -> list[list[dict]]:
    out = []
    for p in paras:
        parts = sentences(p)
        if len(parts) >= 4 and not p.startswith('"') and len(p) <= 1200:
            out.append([{"role": "user", "content": "Continue this passage from a novel by Jane Austen:\n\n"
                         + " ".join(parts[:2])},
                        {"role": "assistant", "content": " ".join(parts[2:4])}])
    return out


def questions() -> list[list[dict]]:
    return [[{"role": "user", "content": f"Which novel by Jane Austen has a character named {name}?"},
             {"role": "assistant", "content": f"{name} is a character in {novel}."}]
            for novel, names in CHARACTERS.items() for name in names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--items", type=int, default=240)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "austen_chat.jsonl")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    paras = paragraphs(args.source.read_text(encoding="utf-8"))
    talk, cont = dialogues(paras), continuations(paras)
    rng.shuffle(talk), rng.shuffle(cont)
    share = (args.items - len(questions())) // 2
    items = talk[:share] + cont[:args.items - len(questions()) - share] + questions()
    rng.shuffle(items)
    with open(args.out, "w", encoding="utf-8") as f:
        for messages in items:
            f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    print(f"wrote {len(items)} conversations to {args.out}")


if __name__ == "__main__":
    main()
