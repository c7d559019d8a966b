"""Sentences of English prose, for the scripts that build the local Austen task and chat calibration files
(configs/tasks/make_austen_mc.py, configs/chat/make_austen_chat.py): a regular-expression splitter that knows
the titles ("Mr. Knightley" is one sentence, not two)."""
from __future__ import annotations

import re

ABBREVIATIONS = ("Mr.", "Mrs.", "Dr.", "St.", "Col.", "Capt.")
SENTENCE_END = re.compile(r"(?<=[.!?])[\"']?\s+(?=[\"']?[A-Z])")


def sentences(paragraph: str) -> list[str]:
    """The paragraph's sentences, in order: split after ., ! or ? (and a closing quote) before a capital."""
    out: list[str] = []
    for piece in (s.strip() for s in SENTENCE_END.split(paragraph) if s.strip()):
        if out and out[-1].endswith(ABBREVIATIONS):
            out[-1] += " " + piece
        else:
            out.append(piece)
    return out
