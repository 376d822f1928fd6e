"""The word vocabulary of the learned text encoder: built from the training captions, stored
in the checkpoint as a plain list of words (``DiTConfig.text_vocab``), so a checkpoint stays
code-free and loads with ``torch.load(weights_only=True)``.

Tokenising is deliberately simple and total: lower-case, then every run of letters, digits
and apostrophes is one word (``"A bold, handwritten 7!"`` -> ``a bold handwritten 7``). Id 0
is padding, id 1 the unknown word; the training captions' words follow in sorted order, so
the same captions always give the same ids.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

import torch

PAD, UNK = 0, 1
SPECIALS = ("<pad>", "<unk>")
_WORD = re.compile(r"[a-z0-9']+")


def words(text: str) -> list[str]:
    """The words of ``text`` (lower-cased; punctuation and spacing are separators)."""
    return [w for w in _WORD.findall(str(text or "").lower()) if w.strip("'")]


class Vocabulary:
    """Words <-> ids. ``Vocabulary(words)`` takes the stored list (without the two specials)."""

    def __init__(self, vocab: Iterable[str]):
        self.words = [str(w) for w in vocab]
        if len(set(self.words)) != len(self.words) or any(w in SPECIALS or not w for w in self.words):
            raise ValueError("a vocabulary is a list of distinct, non-empty words (without <pad>/<unk>)")
        self.index = {w: i + len(SPECIALS) for i, w in enumerate(self.words)}

    @classmethod
    def build(cls, captions: Iterable[str]) -> "Vocabulary":
        """Every word of the training captions, sorted."""
        return cls(sorted({w for c in captions for w in words(c)}))

    def __len__(self) -> int:
        """The embedding table's row count: the words plus padding and unknown."""
        return len(self.words) + len(SPECIALS)

    def to_list(self) -> list[str]:
        return list(self.words)

    def longest(self, captions: Iterable[str]) -> int:
        """Tokens of the longest caption (at least 1)."""
        return max([len(words(c)) for c in captions] + [1])

    def encode(self, texts: Iterable[str], max_tokens: int) -> tuple[torch.Tensor, dict]:
        """(ids LongTensor (N, max_tokens), report) for ``texts``; an empty text is all padding (the
        null caption). ``report``: ``unknown`` (sorted words mapped to <unk>), ``truncated`` (how many
        texts had more than ``max_tokens`` words; their tail is cut)."""
        texts = list(texts)
        ids = torch.full((len(texts), max_tokens), PAD, dtype=torch.long)
        unknown, truncated = set(), 0
        for row, text in enumerate(texts):
            ws = words(text)
            if len(ws) > max_tokens:
                truncated += 1
                ws = ws[:max_tokens]
            for col, w in enumerate(ws):
                i = self.index.get(w)
                if i is None:
                    unknown.add(w)
                    i = UNK
                ids[row, col] = i
        return ids, {"unknown": sorted(unknown), "truncated": truncated}
