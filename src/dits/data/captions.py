"""Captions for text-conditioned training: which texts belong to which training image.

Sources:

* an image folder with a ``metadata.jsonl`` beside the images (the Hugging Face imagefolder
  convention that diffusers' text-to-image examples read): one JSON object per line with
  ``file_name`` (relative to the folder) and ``text`` (a string, or a list of strings);
* ``--captions FILE.jsonl`` in the same format, for a folder or a latent cache;
* ``--captions digits``: the built-in digits' captions, made from each image's label and
  stroke weight (:func:`digits_captions`, templates in :data:`DIGITS_TEMPLATES`).

An image may have several captions (several lines for the same file, or a list): training
draws one per step. An image with no caption, or an empty one, gets the null caption (the
unconditional row guidance needs), as do all images in the fraction dropped each step.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dits.errors import UserError

METADATA = "metadata.jsonl"
BUILTIN_CAPTIONS = ("digits",)
DIGITS_SOURCE = "the built-in digits captions"
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Every digit gets the first two; the heaviest third of its class by ink also the third, the
# lightest third the fourth. {word}: zero ... nine; {numeral}: 0 ... 9.
DIGITS_TEMPLATES = ("a handwritten {word}", "the digit {numeral}",
                    "a bold handwritten {word}", "a thin handwritten {word}")


@dataclass
class CaptionSet:
    """``texts``: the distinct non-empty captions (first-appearance order); ``per_example``: the
    caption ids of each training example ([] = the null caption); ``source``: where they came from."""
    texts: list
    per_example: list
    source: str

    def __post_init__(self):
        k = max([len(c) for c in self.per_example] + [1])
        self._table = torch.full((len(self.per_example), k), -1, dtype=torch.long)
        for i, ids in enumerate(self.per_example):
            self._table[i, :len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        self._count = torch.tensor([len(c) for c in self.per_example], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.per_example)

    def choose(self, index: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """One caption id per example ``index`` from uniforms ``u`` in [0, 1); -1 = the null caption."""
        index = index.long().cpu()
        count = self._count[index]
        col = torch.clamp((u.cpu() * count).long(), max=self._table.shape[1] - 1).clamp(min=0)
        cid = self._table[index, col]
        return torch.where(count > 0, cid, torch.full_like(cid, -1))

    def most_common(self, k: int) -> list[str]:
        """The ``k`` captions given to the most examples (ties: first appearance): preview prompts."""
        counts = np.bincount([c for ids in self.per_example for c in ids], minlength=len(self.texts))
        order = sorted(range(len(self.texts)), key=lambda i: (-counts[i], i))
        return [self.texts[i] for i in order[:k]]


def _build(captions_of: list, source: str) -> CaptionSet:
    texts, index, per = [], {}, []
    for caps in captions_of:
        ids = []
        for c in caps:
            c = str(c).strip()
            if not c:
                continue
            if c not in index:
                index[c] = len(texts)
                texts.append(c)
            ids.append(index[c])
        per.append(ids)
    return CaptionSet(texts, per, source)


# ----------------------------------------------------------------------------- files
def read_caption_file(path: str | os.PathLike) -> dict:
    """{file_name: [captions]} from a JSON-lines caption file; one line naming what is wrong."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"caption file {path} does not exist; pass a .jsonl file with file_name and text per line")
    out: dict = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read caption file {path} ({e})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            raise UserError(f"{path} line {n} is not JSON; each line is an object with file_name and text") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("file_name"), str) or not rec["file_name"].strip():
            raise UserError(f"{path} line {n} has no file_name; each line is {{\"file_name\": ..., \"text\": ...}}")
        text = rec.get("text")
        if text is None:
            caps = []
        elif isinstance(text, str):
            caps = [text]
        elif isinstance(text, list) and all(isinstance(t, str) for t in text):
            caps = list(text)
        else:
            raise UserError(f"{path} line {n}: text must be a string or a list of strings")
        out.setdefault(_norm(rec["file_name"]), []).extend(caps)
    return out


def _norm(name: str) -> str:
    """One spelling of a relative image path: forward slashes, no ./ segments."""
    import posixpath
    return posixpath.normpath(name.strip().replace("\\", "/"))


def match_captions(names: list, captions: dict, where: str, source: str) -> CaptionSet:
    """A CaptionSet over the examples named ``names`` (paths relative to the data folder, in
    training order); a caption naming an image that is not among them is an error."""
    known = {_norm(str(n)): i for i, n in enumerate(names)}
    missing = [f for f in captions if f not in known]
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise UserError(f"{source} names {len(missing)} image(s) that are not in {where}: {shown}")
    per = [[] for _ in names]
    for f, caps in captions.items():
        per[known[f]] = caps
    cs = _build(per, source)
    if not cs.texts:
        raise UserError(f"{source} has no non-empty caption for the images in {where}")
    return cs


def folder_caption_file(root: str | os.PathLike, captions: str | None) -> Path:
    """The caption file of an image folder: ``captions`` if given, else FOLDER/metadata.jsonl."""
    if captions:
        return Path(captions).expanduser()
    path = Path(root).expanduser() / METADATA
    if not path.is_file():
        raise UserError(f"text conditioning needs captions: {root} has no {METADATA}; add one "
                        "(file_name and text per line) or pass --captions FILE.jsonl")
    return path


# ----------------------------------------------------------------------------- digits
def ink(x: torch.Tensor) -> torch.Tensor:
    """Ink per image: the sum of pixel values mapped to [0, 1] (x in [-1, 1], N x C x H x W)."""
    return ((x.float() + 1) / 2).flatten(1).sum(1)


def stroke_thirds(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per image: +1 for the heaviest third of its class by ink, -1 for the lightest third, 0 else."""
    w = ink(x)
    out = torch.zeros(len(y), dtype=torch.long)
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        order = idx[torch.argsort(w[idx], stable=True)]
        third = len(order) // 3
        out[order[:third]] = -1
        out[order[len(order) - third:]] = 1
    return out


def digit_captions(label: int, weight: int) -> list[str]:
    """The captions of one digit (``weight``: +1 bold, -1 thin, 0 neither)."""
    word, numeral = NUMBER_WORDS[int(label)], str(int(label))
    caps = [DIGITS_TEMPLATES[0].format(word=word), DIGITS_TEMPLATES[1].format(numeral=numeral)]
    if weight > 0:
        caps.append(DIGITS_TEMPLATES[2].format(word=word))
    elif weight < 0:
        caps.append(DIGITS_TEMPLATES[3].format(word=word))
    return caps


def digits_captions(x: torch.Tensor, y: torch.Tensor) -> CaptionSet:
    """Captions of the built-in digits' training images from their labels and stroke weight."""
    weight = stroke_thirds(x, y)
    return _build([digit_captions(int(c), int(w)) for c, w in zip(y, weight)], DIGITS_SOURCE)
