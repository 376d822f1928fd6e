"""The Diffusion Transformer (Peebles & Xie, 2022)."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dits.errors import UserError
from dits.models.blocks import BLOCKS, FinalLayer
from dits.models.configs import DiTConfig
from dits.models.conditioning import check_class_labels
from dits.models.embeddings import LabelEmbedder, PatchEmbed, TimestepEmbedder, rope_2d, sincos_2d


class DiT(nn.Module):
    """Noised latent (N, C, I, I), timestep t, label y -> (N, C_out, I, I).

    With the default adaLN-Zero blocks the state dict is exactly the reference's
    (``pos_embed``, ``x_embedder``, ``t_embedder``, ``y_embedder``, ``blocks.i.*``,
    ``final_layer``), so an official checkpoint loads with ``strict=True``.
    Keyword arguments are those of the reference constructor, plus ``block``.

    With ``text_encoder`` set (docs/text.md) the condition is a caption instead of a label:
    ``forward(x, t, text=..., text_mask=...)`` with token ids (learned encoder) or a frozen
    encoder's features, through :class:`dits.models.conditioning.TextEmbedder`
    (``text_embedder.*``; no ``y_embedder``).

    Block options (``mlp``, ``norm``, ``pos``; docs/convergence.md) change the blocks' modules; with
    ``pos="rope"`` there is no ``pos_embed`` (positions enter self-attention as rotations of q and k).
    With ``decoder_depth`` K > 0 (masked training, MaskDiT) the ``blocks`` are an encoder and K more
    ``decoder_blocks`` follow them over the full sequence, with a learned ``mask_token`` at dropped
    positions: ``forward(..., mask_keep=idx)`` runs the encoder on the tokens ``idx`` (N, T_keep) only.
    Without ``mask_keep`` (sampling, unmasked steps) every token goes through encoder and decoder.
    """

    def __init__(self, config: DiTConfig | None = None, **kwargs):
        super().__init__()
        if config is None:
            config = DiTConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either a DiTConfig or keyword arguments, not both")
        self.config = cfg = config
        self.in_channels = cfg.in_channels
        self.out_channels = cfg.out_channels
        self.learn_sigma = cfg.learn_sigma
        self.patch_size = cfg.patch_size
        self.input_size = cfg.input_size
        self.num_heads = cfg.num_heads
        self.num_classes = cfg.num_classes
        self.block_type = cfg.block
        d = cfg.hidden_size

        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, d)
        self.t_embedder = TimestepEmbedder(d)
        if cfg.num_classes > 0:
            self.y_embedder = LabelEmbedder(cfg.num_classes, d, cfg.class_dropout_prob)
        self.text_embedder = self._text_embedder(cfg) if cfg.text else None
        # Fixed, not trained; a Parameter (requires_grad=False) as in the reference so that
        # it is part of the state dict and of the parameter count.
        # --pos rope: no additive table at all (the rotations carry the positions).
        if cfg.pos == "sincos":
            self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, d), requires_grad=False)
        else:
            self.register_parameter("pos_embed", None)
        block = BLOCKS[cfg.block]
        extra = {"text_cross_attn": True} if self._pixart_cross_attn else {}
        if cfg.mlp != "gelu" or cfg.norm != "layernorm":
            extra.update(mlp=cfg.mlp, norm=cfg.norm)
        self.blocks = nn.ModuleList([block(d, cfg.num_heads, cfg.mlp_ratio, **extra) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(d, cfg.patch_size, cfg.out_channels, norm=cfg.norm)
        if cfg.decoder_depth:  # masked training's decoder (MaskDiT): same design and width as the encoder
            self.decoder_blocks = nn.ModuleList([block(d, cfg.num_heads, cfg.mlp_ratio, **extra)
                                                 for _ in range(cfg.decoder_depth)])
            self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        else:
            self.decoder_blocks = None
        # Activation checkpointing per block (training only): keep each block's input, recompute
        # its inside during backward. ~1/3 more compute for activation memory ~1/depth.
        self.grad_checkpoint = False
        self.initialize_weights()

    @property
    def _pixart_cross_attn(self) -> bool:
        """adaLN(-Zero) blocks of a text model get PixArt-alpha's cross-attention unless text_adaln is pooled."""
        cfg = self.config
        return cfg.text and cfg.block in ("adaln-zero", "adaln") and cfg.text_adaln != "pooled"

    @property
    def _pooled_text(self) -> bool:
        """Whether c = t_emb + pooled caption (every design but PixArt's adaLN on t only)."""
        cfg = self.config
        return not (cfg.block in ("adaln-zero", "adaln") and cfg.text_adaln == "cross-attn")

    @property
    def condition(self):
        """The conditioning module (``dits.models.conditioning``): labels, text, or None."""
        if self.text_embedder is not None:
            return self.text_embedder
        return getattr(self, "y_embedder", None)

    @staticmethod
    def _text_embedder(cfg: DiTConfig):
        from dits.models.conditioning import TextEmbedder

        encoder = None
        if cfg.text_encoder == "learned":
            from dits.text.learned import LearnedTextEncoder
            from dits.text.vocab import Vocabulary

            heads = cfg.num_heads if cfg.text_dim % cfg.num_heads == 0 else 1
            encoder = LearnedTextEncoder(len(Vocabulary(cfg.text_vocab)), cfg.text_dim, cfg.text_depth, heads,
                                         cfg.text_tokens)
        return TextEmbedder(cfg.hidden_size, cfg.text_dim, cfg.class_dropout_prob, encoder)

    # ------------------------------------------------------------------ init
    def initialize_weights(self) -> None:
        def basic_init(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.apply(basic_init)

        grid = int(self.config.num_tokens ** 0.5)
        if self.pos_embed is not None:
            pos = sincos_2d(self.config.hidden_size, grid)
            self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))

        # The patch conv is initialised like a Linear on its flattened kernel.
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)

        if self.num_classes > 0:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # Zero the modulation: adaLN-Zero gates start at 0 (every block is the identity);
        # adaLN scales/shifts start at 0 (plain LayerNorm).
        for blk in self.all_blocks:
            if hasattr(blk, "adaLN_modulation"):
                nn.init.zeros_(blk.adaLN_modulation[-1].weight)
                nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        # Zero output layer: the untrained model predicts exactly 0 (mean of eps, and the
        # variance midway between beta_t and beta~_t).
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        if self.text_embedder is not None:
            nn.init.normal_(self.text_embedder.null_token, std=0.02)  # like the class table's rows
            if self.text_embedder.encoder is not None:
                self.text_embedder.encoder.reset_parameters()
            if self._pixart_cross_attn:  # PixArt: the added cross-attention starts as a zero residual
                for blk in self.all_blocks:
                    nn.init.zeros_(blk.cross_attn.proj.weight)
                    nn.init.zeros_(blk.cross_attn.proj.bias)
        if self.decoder_blocks is not None:
            nn.init.normal_(self.mask_token, std=0.02)  # MAE's mask-token init

    @property
    def all_blocks(self) -> list:
        """The transformer blocks in order: ``blocks``, then the masked-training decoder's (if any)."""
        return list(self.blocks) + list(self.decoder_blocks or [])

    # ------------------------------------------------------------------ shapes
    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) -> (N, C, I, I); inverse of the patch layout of the final Linear."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, I, I) -> (N, T, p*p*C): the token layout ``unpatchify`` inverts."""
        n, c, i, _ = x.shape
        p, h = self.patch_size, i // self.patch_size
        x = x.reshape(n, c, h, p, h, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(n, h * h, p * p * c)

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, y, text=None, text_mask=None) -> None:
        i, c = self.input_size, self.in_channels
        if x.ndim != 4 or x.shape[1] != c or x.shape[2] != i or x.shape[3] != i:
            raise UserError(f"expected input of shape (N, {c}, {i}, {i}), got {tuple(x.shape)}")
        if t.ndim != 1 or t.shape[0] != x.shape[0]:
            raise UserError(f"expected timesteps of shape ({x.shape[0]},), got {tuple(t.shape)}")
        if self.config.text:
            self._check_text(x.shape[0], y, text, text_mask)
            return
        if text is not None:
            raise UserError("this model is not text-conditional: pass class labels y (or nothing), not text")
        if self.num_classes > 0:
            check_class_labels(y, x.shape[0], self.num_classes, self.config.class_dropout_prob)

    def _check_text(self, n: int, y, text, text_mask) -> None:
        cfg = self.config
        if y is not None:
            raise UserError("this model is text-conditional: pass a caption (text / prompts), not class labels")
        if text is None:
            raise UserError("this model is text-conditional: pass text (token ids or encoder features)")
        learned = cfg.text_encoder == "learned"
        want = f"({n}, L) token ids" if learned else f"({n}, L, {cfg.text_dim}) encoder features"
        ok = (text.ndim == 2 and not text.dtype.is_floating_point) if learned else (
            text.ndim == 3 and text.dtype.is_floating_point and text.shape[-1] == cfg.text_dim)
        if not ok or text.shape[0] != n or text.shape[1] < 1:
            raise UserError(f"expected text of shape {want}, got {text.dtype} {tuple(text.shape)}")
        if text_mask is not None and tuple(text_mask.shape) != tuple(text.shape[:2]):
            raise UserError(f"expected a text mask of shape {tuple(text.shape[:2])}, got {tuple(text_mask.shape)}")
        if text.shape[1] > cfg.text_tokens and (learned or cfg.block == "in-context"):
            why = "the learned encoder has positions" if learned else "this in-context model was trained with"
            raise UserError(f"{text.shape[1]} text tokens, but {why} at most {cfg.text_tokens}; "
                            f"use --max-text-tokens {cfg.text_tokens} or less")

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                force_drop_ids: torch.Tensor | None = None, text: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None, mask_keep: torch.Tensor | None = None) -> torch.Tensor:
        """``t`` on the original 0..T-1 scale (int or float); ``force_drop_ids`` (bool, N) is an
        explicit dropout mask (labels, or captions to the null caption) used instead of the random
        one (see ``LabelEmbedder``). Text models take ``text``: token ids (N, L) for the learned
        encoder, else a frozen encoder's features (N, L, text_dim), with ``text_mask`` (N, L, True =
        real token; an all-False row is the null caption). ``mask_keep`` (N, T_keep) long, models with a
        decoder only: the encoder sees those tokens only (masked training); the output is full size."""
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        self._check_inputs(x, t, y, text, text_mask)
        tokens = self.x_embedder(x) + self.pos_embed if self.pos_embed is not None else self.x_embedder(x)
        rope = self._rope(tokens.device)
        if mask_keep is not None:
            tokens, rope = self._keep(tokens, rope, mask_keep)
        t_emb = self.t_embedder(t)
        if self.text_embedder is not None:
            return self._forward_text(tokens, t_emb, text, text_mask, force_drop_ids, rope, mask_keep)
        cond = [t_emb]
        if self.num_classes > 0:
            cond.append(self.y_embedder(y, self.training, force_drop_ids))
        c = sum(cond)
        cond_tokens = torch.stack(cond, dim=1)  # (N, 1 or 2, D)

        n_extra = 0
        if self.block_type == "in-context":
            tokens = torch.cat([cond_tokens.to(tokens.dtype), tokens], dim=1)
            n_extra = cond_tokens.shape[1]
        tokens = self._run_blocks(self.blocks, tokens, c, cond_tokens, None, rope)
        tokens = tokens[:, n_extra:]
        if self.decoder_blocks is not None:
            tokens = self._decode(tokens, c, cond_tokens, None, mask_keep)
        return self.unpatchify(self.final_layer(tokens, c))

    # ------------------------------------------------------------------ positions, masking, blocks
    def _rope(self, device) -> tuple | None:
        """--pos rope: the (cos, sin) tables of the full token grid, (1, T, 2, head/4) each; else None."""
        if self.config.pos != "rope":
            return None
        grid = int(round(self.config.num_tokens ** 0.5))
        return rope_2d(self.config.hidden_size // self.num_heads, grid, device=device)

    def _keep(self, tokens: torch.Tensor, rope, keep: torch.Tensor):
        """The kept tokens (N, T_keep, D), in ``keep``'s order, and their rope rows."""
        if self.decoder_blocks is None:
            raise UserError("mask_keep is for models with a masked-training decoder (decoder_depth > 0)")
        n, t = tokens.shape[:2]
        keep = keep.to(device=tokens.device, dtype=torch.long)
        if keep.ndim != 2 or keep.shape[0] != n or not 0 < keep.shape[1] <= t:
            raise UserError(f"expected mask_keep of shape ({n}, K) with 1 <= K <= {t}, got {tuple(keep.shape)}")
        tokens = tokens.gather(1, keep[..., None].expand(-1, -1, tokens.shape[-1]))
        if rope is not None:
            idx = keep[..., None, None].expand(-1, -1, *rope[0].shape[2:])
            rope = tuple(r.expand(n, *r.shape[1:]).gather(1, idx) for r in rope)
        return tokens, rope

    def _decode(self, tokens, c, context, mask, keep):
        """MaskDiT's decoder: the encoder's tokens back at their positions, the learned mask token at the
        dropped ones, the fixed positions added again (sin-cos; RoPE rotates in attention), then the
        decoder blocks over the full sequence."""
        if keep is not None:
            n, d = tokens.shape[0], tokens.shape[-1]
            full = self.mask_token.to(tokens.dtype).expand(n, self.config.num_tokens, d)
            tokens = full.scatter(1, keep.to(tokens.device, torch.long)[..., None].expand(-1, -1, d), tokens)
        if self.pos_embed is not None:
            tokens = tokens + self.pos_embed
        return self._run_blocks(self.decoder_blocks, tokens, c, context, mask, self._rope(tokens.device))

    def _run_blocks(self, blocks, tokens, c, context, mask, rope):
        recompute = self.grad_checkpoint and self.training and torch.is_grad_enabled()
        for block in blocks:
            if recompute:
                tokens = checkpoint(block, tokens, c, context, mask, rope, use_reentrant=False)
            else:
                tokens = block(tokens, c, context, mask, rope)
        return tokens

    def _forward_text(self, tokens, t_emb, text, text_mask, force_drop_ids, rope=None, mask_keep=None):
        """Where the caption enters each design (docs/text.md): c = t_emb + pooled caption (adaLN
        designs: unless text_adaln is cross-attn); cross-attn blocks attend to [t_emb, caption];
        in-context appends [t_emb, caption] to the image tokens with the caption's padding masked;
        adaLN(-Zero) blocks attend to the caption (PixArt) unless text_adaln is pooled."""
        emb = self.text_embedder(text, text_mask, self.training, force_drop_ids)
        c = t_emb + emb.vector if self._pooled_text else t_emb
        n, n_extra = tokens.shape[0], 0
        ones = torch.ones(n, 1, dtype=torch.bool, device=tokens.device)
        context, mask = emb.tokens, emb.mask
        if self.block_type == "cross-attn":
            context = torch.cat([t_emb[:, None], emb.tokens], dim=1)
            mask = torch.cat([ones, emb.mask], dim=1)
        elif self.block_type == "in-context":
            extra = torch.cat([t_emb[:, None], emb.tokens], dim=1)
            n_extra = extra.shape[1]
            mask = torch.cat([ones, emb.mask, ones.expand(n, tokens.shape[1])], dim=1)
            tokens = torch.cat([extra.to(tokens.dtype), tokens], dim=1)
            context = None
        tokens = self._run_blocks(self.blocks, tokens, c, context, mask, rope)
        tokens = tokens[:, n_extra:]
        if self.decoder_blocks is not None:
            tokens = self._decode(tokens, c, context, mask, mask_keep)
        return self.unpatchify(self.final_layer(tokens, c))

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                         guided_channels: int | None = None) -> torch.Tensor:
        """Classifier-free guidance in one forward pass.

        The batch holds the conditional half then the unconditional half (null labels), as
        in the reference; the first half of ``x`` is used for both. All ε channels are
        guided unless ``guided_channels`` says how many (3 reproduces the reference's FID).
        """
        from dits.diffusion.guidance import combine_guided

        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y)
        return combine_guided(out, cfg_scale, self.in_channels, guided_channels)
