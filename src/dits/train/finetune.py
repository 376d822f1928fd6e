"""Fine-tuning (``--init``): a new run that starts from someone's weights.

The architecture comes from the weights; the data decides the input size and the classes.
What can be adapted is: the label table (another class count: the class rows start fresh,
the learned null row is kept as the null row, the last) and the fixed sin-cos position
embedding (another image size with the same patch and channels: recomputed). Anything else
that does not fit is one line.
"""
from __future__ import annotations

import dataclasses

from dits.checkpoint import Weights
from dits.config import TrainConfig
from dits.errors import UserError
from dits.models import DiT
from dits.models.configs import PATCH_SIZES, SIZES

ARCH_KEYS = ("model", "depth", "hidden_size", "num_heads", "patch_size", "block", "learn_sigma",
             "mlp", "norm", "pos", "mask_decoder_depth")


def adopt_architecture(cfg: TrainConfig, w: Weights, typed) -> TrainConfig:
    """``cfg`` with the model shape of the ``--init`` weights; a typed flag that disagrees is an error."""
    c = w.config
    if getattr(c, "backbone", "dit") != "dit":
        raise UserError(f"--init {cfg.init} holds {c.describe()} weights; --init fine-tunes DiT weights only")
    if c.mlp_ratio != 4.0:
        raise UserError(f"--init {cfg.init}: MLP ratio {c.mlp_ratio} is not supported for training (4 is)")
    name = next((f"DiT-{s}/{c.patch_size}" for s, dims in SIZES.items()
                 if dims == (c.depth, c.hidden_size, c.num_heads) and c.patch_size in PATCH_SIZES), None)
    arch = dict(model=name or "DiT", depth=None if name else c.depth, hidden_size=None if name else c.hidden_size,
                num_heads=None if name else c.num_heads, patch_size=None if name else c.patch_size,
                block=c.block, learn_sigma=c.learn_sigma, mlp=c.mlp, norm=c.norm, pos=c.pos)
    if c.decoder_depth:  # a masked-training model: its decoder is part of the network (fresh runs without one keep theirs)
        arch["mask_decoder_depth"] = c.decoder_depth
    mine = cfg.to_dict()
    for key in ARCH_KEYS:
        if key not in arch:
            continue
        if key in typed and mine[key] is not None and mine[key] != arch[key] and not _same_size(key, mine, c):
            raise UserError(f"--init {cfg.init} is a {name or 'custom DiT'} (depth {c.depth}, width {c.hidden_size}, "
                            f"patch {c.patch_size}, {c.block}); drop --{key.replace('_', '-')} "
                            "or start from other weights")
    dropout = cfg.class_dropout_prob if "class_dropout_prob" in typed else c.class_dropout_prob
    return dataclasses.replace(cfg, **arch, class_dropout_prob=dropout)


def _same_size(key, mine, c) -> bool:
    """A typed --model DiT-XL/2 equals weights of that size even when stored as numbers."""
    from dits.models.configs import canonical_name, config_for
    if key != "model" or canonical_name(mine["model"]) == "DiT":
        return False
    n = config_for(canonical_name(mine["model"]))
    return (n.depth, n.hidden_size, n.num_heads, n.patch_size) == (c.depth, c.hidden_size, c.num_heads, c.patch_size)


def load_init(model: DiT, w: Weights) -> list[str]:
    """Copy the ``--init`` weights into a freshly initialised ``model``; returns what was adapted."""
    src, dst = w.config, model.config
    if src.in_channels != dst.in_channels:
        raise UserError(f"--init weights take {src.in_channels} input channels, but this data gives "
                        f"{dst.in_channels} (pixels 3, SD-VAE latents 4); use matching --data/--vae/--latents")
    sd = dict(w.state_dict)
    notes = []
    if src.input_size != dst.input_size:
        sd.pop("pos_embed", None)  # the model computed its own table for the new size
        notes.append(f"position embedding recomputed for {dst.input_size}x{dst.input_size} inputs "
                     f"(was {src.input_size}x{src.input_size})")
    table = "y_embedder.embedding_table.weight"
    old = sd.pop(table, None)
    if dst.num_classes > 0:
        new = model.y_embedder.embedding_table.weight
        if old is not None and old.shape == new.shape:
            sd[table] = old
        else:
            fresh = new.detach().clone()
            kept = old is not None and src.class_dropout_prob > 0 and dst.class_dropout_prob > 0
            if kept:
                fresh[-1] = old[-1]  # the unconditional embedding guidance needs stays the null row
            sd[table] = fresh
            notes.append(f"label table re-initialised for {dst.num_classes} classes (was {src.num_classes}"
                         f"{'; null row kept' if kept else ''})")
    elif old is not None:
        notes.append(f"label table dropped: this data is unconditional (the weights had {src.num_classes} classes)")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k != "pos_embed"]
    decoder = [k for k in missing if k.startswith("decoder_blocks.") or k == "mask_token"]
    if decoder and not src.decoder_depth:  # DiT weights, masked training: the decoder starts fresh
        missing = [k for k in missing if k not in decoder]
        notes.append(f"masked-training decoder ({dst.decoder_depth} blocks) initialised fresh")
    if missing or unexpected:
        raise UserError(f"--init weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return notes
