"""Conditioning: one small interface, two kinds behind it (class labels and text).

A condition turns what the user asked for into what the blocks consume::

    embed(cond, train, force_drop_ids) -> Embedded(vector, tokens, mask)

* ``vector`` (N, D) is added to the timestep embedding to give c, the vector the adaLN
  modulations (and the shared final layer) regress from;
* ``tokens`` (N, S, D) is the condition as a sequence, for cross-attention and in-context
  blocks; ``mask`` (N, S) is its key-padding mask (True = a real token), None when every
  token is real.

Both kinds have a **null condition** (``null_like``) that classifier-free guidance runs as
its unconditional half, and drop to it during training with probability ``dropout_prob``
(``force_drop_ids`` replaces the random draw, so the trainer can draw it from its seeded
generator). For class labels (:class:`dits.models.embeddings.LabelEmbedder`) the null is the
extra row ``num_classes`` of the table; for text (:class:`TextEmbedder`) it is one learned
token, and an empty caption (no real token) *is* the null caption.

Where the text tokens come from, a learned encoder over a word vocabulary or a frozen
CLIP/T5 (:mod:`dits.text`), the blocks never know: they get a sequence and a mask.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from dits.errors import UserError


class Embedded(NamedTuple):
    vector: torch.Tensor               # (N, D): added to t_emb
    tokens: torch.Tensor               # (N, S, D)
    mask: torch.Tensor | None = None   # (N, S) bool, True = real token; None = all real


def check_class_labels(y, n: int, num_classes: int, class_dropout_prob: float, what: str = "model") -> None:
    """One line if ``y`` is not ``n`` labels in 0..num_classes-1 (or num_classes, the null label,
    when the model has one) for a class-conditional ``what``."""
    if y is None:
        raise UserError(f"this {what} is class-conditional: pass labels y")
    if y.shape != (n,):
        raise UserError(f"expected labels of shape ({n},), got {tuple(y.shape)}")
    top = num_classes + int(class_dropout_prob > 0)
    # (a data-dependent check: skipped while torch.compile traces, where it would split the graph)
    if (y.numel() and y.device.type != "meta" and not torch.compiler.is_compiling()
            and (int(y.min()) < 0 or int(y.max()) >= top)):
        raise UserError(f"labels must be in 0..{top - 1} (num_classes={num_classes}"
                        f"{', the last is the null label' if top > num_classes else ''}), "
                        f"got {int(y.min())}..{int(y.max())}")


def dropout_mask(n: int, prob: float, train: bool, force_drop_ids: torch.Tensor | None,
                 device) -> torch.Tensor | None:
    """Which rows take the null condition: ``force_drop_ids`` if given, else a Bernoulli(prob)
    draw while training, else None (no row)."""
    if force_drop_ids is not None:
        return force_drop_ids.to(device=device, dtype=torch.bool)
    if train and prob > 0:
        return torch.rand(n, device=device) < prob
    return None


class TextEmbedder(nn.Module):
    """Caption features -> (pooled vector, caption tokens in the model's width, mask).

    ``feature_dim`` is the width of what comes in: a frozen encoder's hidden states (N, L, E),
    or, with ``encoder`` (the learned text transformer, trained with the DiT), token ids
    (N, L) that it encodes first. The features go through PixArt-alpha's caption projection
    (Linear, tanh-GELU, Linear) to width D. The pooled vector is a Linear of the mean of the
    real tokens. Rows that are dropped (``force_drop_ids``, the random caption dropout while
    training) or empty (no real token) become the null caption: one learned token.
    """

    kind = "text"

    def __init__(self, hidden_size: int, feature_dim: int, dropout_prob: float, encoder: nn.Module | None = None):
        super().__init__()
        self.dropout_prob = dropout_prob
        self.encoder = encoder
        self.proj = nn.Sequential(nn.Linear(feature_dim, hidden_size), nn.GELU(approximate="tanh"),
                                  nn.Linear(hidden_size, hidden_size))
        self.null_token = nn.Parameter(torch.zeros(1, hidden_size))
        self.pool = nn.Linear(hidden_size, hidden_size)

    def null_like(self, text: torch.Tensor, mask: torch.Tensor | None = None):
        """The null caption for a batch shaped like ``text``: the same tensor with no real token."""
        m = torch.zeros(text.shape[:2], dtype=torch.bool, device=text.device)
        return text, m

    def embed(self, cond, train: bool, force_drop_ids: torch.Tensor | None = None) -> Embedded:
        text, mask = cond
        return self(text, mask, train, force_drop_ids)

    def forward(self, text: torch.Tensor, mask: torch.Tensor | None, train: bool,
                force_drop_ids: torch.Tensor | None = None) -> Embedded:
        n, length = text.shape[:2]
        if mask is None:
            # token ids: 0 is padding; features: every position is a token
            mask = text != 0 if self.encoder is not None else torch.ones(n, length, dtype=torch.bool,
                                                                          device=text.device)
        mask = mask.to(device=text.device, dtype=torch.bool)
        empty = ~mask.any(dim=1)
        if self.encoder is not None:
            # An empty row keeps its first position for the encoder only, so that no attention row
            # is all-masked (NaN, even in the gradient of a discarded branch); its output is replaced
            # by the null caption below.
            first = torch.arange(length, device=text.device) == 0
            enc_mask = mask | (empty[:, None] & first[None])
            feats = self.encoder(text, enc_mask)
        else:
            feats = text
        tokens = self.proj(feats)
        drop = dropout_mask(n, self.dropout_prob, train, force_drop_ids, text.device)
        drop = empty if drop is None else drop | empty
        null_seq = torch.cat([self.null_token[None], self.null_token.new_zeros(1, length - 1, tokens.shape[-1])], 1)
        tokens = torch.where(drop[:, None, None], null_seq.to(tokens.dtype), tokens)
        null_mask = torch.arange(length, device=text.device) == 0
        mask = torch.where(drop[:, None], null_mask[None], mask)
        w = mask.to(tokens.dtype)[..., None]
        pooled = self.pool((tokens * w).sum(1) / w.sum(1))
        return Embedded(pooled, tokens, mask)
