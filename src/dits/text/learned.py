"""The learned text encoder: a small transformer over the word vocabulary, trained jointly with
the DiT (as GLIDE trained its text transformer), so text conditioning works offline with no
download. It is a submodule of the DiT (``text_embedder.encoder.*`` in the state dict); its
vocabulary is plain data in the model config.

ids (N, L) -> word embedding + learned position -> ``depth`` pre-norm transformer layers
(self-attention with the key-padding mask, tanh-GELU MLP) -> LayerNorm -> (N, L, width).
"""
from __future__ import annotations

import torch
from torch import nn

from dits.models.blocks import Attention, Mlp


class EncoderLayer(nn.Module):
    """x + attn(LN(x), mask); x + MLP(LN(x))."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = Mlp(width, 4.0)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class LearnedTextEncoder(nn.Module):
    def __init__(self, vocab_size: int, width: int, depth: int, heads: int, max_tokens: int):
        super().__init__()
        self.max_tokens = max_tokens
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.pos_embedding = nn.Parameter(torch.zeros(1, max_tokens, width))
        self.layers = nn.ModuleList([EncoderLayer(width, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=1e-6)

    def reset_parameters(self) -> None:
        """Word and position tables normal(0.02), as GPT-style text transformers; the Linears are
        left to the DiT's xavier initialisation."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.pos_embedding, std=0.02)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(ids) + self.pos_embedding[:, : ids.shape[1]]
        for layer in self.layers:
            x = layer(x, mask)
        return self.norm(x)
