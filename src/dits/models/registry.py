"""The backbone registry: which denoiser families dits can train, sample and load.

The trainer, the samplers and the checkpoints talk to "a denoiser": ``forward(x, t, y)`` plus a
``config`` whose ``to_dict`` round-trips through checkpoints. A family is one :class:`Backbone`
entry here; everything that has to know which family a model or a run belongs to asks this
module instead of branching on names:

* checkpoints: :func:`config_from_dict` reads a saved ``model_config`` (a dict naming its
  ``backbone``; a dict without one is a DiT, as every checkpoint written before the U-Net and
  every official file), :func:`build` makes the model for a config;
* the trainer: :func:`build_for_training` (``--backbone``), :func:`resolve_train_values` and
  :func:`check_train_config` (each family's own flags, and a flag of another family refused);
* the flop counter (:mod:`dits.flop_counter`): :func:`build` on the meta device.

``dit`` is :class:`dits.models.DiT`; ``unet`` is :class:`dits.models.unet.UNet` (diffusers'
``UNet2DModel``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from dits.errors import UserError

# TrainConfig fields that only describe a DiT, and those that only describe a U-Net.
DIT_KEYS = ("model", "depth", "hidden_size", "num_heads", "patch_size", "block",
            "text_encoder", "captions", "max_text_tokens", "text_adaln",
            "mlp", "norm", "pos", "mask_ratio", "mask_decoder_depth", "mask_loss_weight", "unmask_steps")
UNET_KEYS = ("unet_channels", "unet_layers")
UNET_MODEL_NAME = "U-Net"             # TrainConfig.model of a U-Net run (what the start line prints)


@dataclass(frozen=True)
class Backbone:
    name: str
    label: str                         # "DiT", "U-Net"
    config_from_dict: Callable         # saved model_config dict -> config
    model_class: Callable              # config -> nn.Module
    own_keys: tuple                    # TrainConfig fields of this family only
    from_train_config: Callable | None = None  # (cfg, in_channels, input_size, num_classes, learn_sigma) -> config;
                                       # None: the trainer's own DiT path (dits.train.loop.build_model)


def _dit_config(d: dict):
    from dits.models.configs import DiTConfig
    return DiTConfig.from_dict({k: v for k, v in d.items() if k != "backbone"})


def _dit_class():
    from dits.models.dit import DiT
    return DiT


def _unet_config(d: dict):
    from dits.models.unet import UNetConfig
    return UNetConfig.from_dict(d)


def _unet_class():
    from dits.models.unet import UNet
    return UNet


def _unet_from_train(cfg, in_channels: int, input_size: int, num_classes: int, learn_sigma: bool):
    from dits.models.unet import DEFAULT_CHANNELS, DEFAULT_LAYERS, UNetConfig
    return UNetConfig(input_size=input_size, in_channels=in_channels,
                      channels=cfg.unet_channels if cfg.unet_channels is not None else DEFAULT_CHANNELS,
                      layers=cfg.unet_layers if cfg.unet_layers is not None else DEFAULT_LAYERS,
                      num_classes=num_classes, learn_sigma=learn_sigma, class_dropout_prob=cfg.class_dropout_prob)


BACKBONES = {
    "dit": Backbone("dit", "DiT", _dit_config, lambda cfg: _dit_class()(cfg), DIT_KEYS),
    "unet": Backbone("unet", "U-Net", _unet_config, lambda cfg: _unet_class()(cfg), UNET_KEYS, _unet_from_train),
}
DEFAULT_BACKBONE = "dit"


def get_backbone(name: str | None) -> Backbone:
    name = DEFAULT_BACKBONE if name is None else str(name).strip().lower()
    if name not in BACKBONES:
        raise UserError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}")
    return BACKBONES[name]


def backbone_of(obj) -> str:
    """The family of a saved ``model_config`` dict, a config, or a model ('dit' when unnamed)."""
    if isinstance(obj, dict):
        return get_backbone(obj.get("backbone")).name
    cfg = getattr(obj, "config", obj)
    return get_backbone(getattr(cfg, "backbone", None)).name


def config_from_dict(d: dict):
    """A saved ``model_config`` -> the family's config object."""
    if not isinstance(d, dict):
        raise UserError(f"a checkpoint's model_config must be a mapping, got {type(d).__name__}")
    return get_backbone(d.get("backbone")).config_from_dict(d)


def build(config):
    """The model for a config of any family (build it under ``torch.device('meta')`` to count it)."""
    return get_backbone(getattr(config, "backbone", None)).model_class(config)


def describe(config) -> str:
    """A few words naming an architecture, for error lines."""
    if hasattr(config, "describe"):
        return config.describe()
    return f"DiT {config.depth}x{config.hidden_size}/{config.patch_size}"


# ------------------------------------------------------------------ training
def build_for_training(cfg, in_channels: int, input_size: int, num_classes: int, learn_sigma: bool):
    """The model a run of ``cfg.backbone`` trains, or None for the DiT (the trainer builds it)."""
    family = get_backbone(getattr(cfg, "backbone", None))
    if family.from_train_config is None:
        return None
    return family.model_class(family.from_train_config(cfg, in_channels, input_size, num_classes, learn_sigma))


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _foreign(family: Backbone, keys: list[str]) -> UserError:
    """One line: these flags belong to another family than the run's."""
    it, s = ("it", "s") if len(keys) == 1 else ("them", "")
    flags = ", ".join(_flag(k) for k in keys)
    if family.name == "unet":
        return UserError(f"{flags} describe{s} a DiT, but --backbone unet trains a U-Net (sized by --unet-channels "
                         f"and --unet-layers); drop {it}")
    return UserError(f"{flags} size{s} a U-Net; add --backbone unet (or drop {it})")


def _other_keys(family: Backbone) -> list[str]:
    return [k for b in BACKBONES.values() if b is not family for k in b.own_keys if k not in family.own_keys]


def resolve_train_values(values: dict, typed: dict) -> dict:
    """A preset's values plus the typed flags, for the chosen backbone: a typed flag of another
    family is refused (one line), a preset's keys of another family are dropped (the glyphs
    preset names a DiT size; ``--backbone unet --data glyphs`` trains a U-Net on it)."""
    family = get_backbone(values.get("backbone"))
    others = _other_keys(family)
    given = [k for k in others if k in typed]
    if given:
        raise _foreign(family, given)
    out = {k: v for k, v in values.items() if k not in others}
    if family.name == "unet":
        out["model"] = UNET_MODEL_NAME
    return out


def check_train_config(cfg) -> None:
    """Value checks of ``TrainConfig.validate``: the backbone exists, and no field of another
    family is set (for a U-Net run: no DiT size, block or text encoder; for a DiT: no U-Net size)."""
    from dits.config import TrainConfig

    family = get_backbone(getattr(cfg, "backbone", None))
    cfg.backbone = family.name
    defaults = TrainConfig()
    if family.name == "unet":
        if cfg.model == defaults.model:
            cfg.model = UNET_MODEL_NAME
        set_ = [k for k in DIT_KEYS if getattr(cfg, k) != (UNET_MODEL_NAME if k == "model" else getattr(defaults, k))]
        if set_:
            raise _foreign(family, set_)
        if cfg.init:
            raise UserError("--init fine-tunes DiT weights; a U-Net run starts from scratch (drop --init)")
        if cfg.fsdp:
            raise UserError("--fsdp shards a DiT block by block; a U-Net run under torchrun uses DDP (drop --fsdp)")
        from dits.models.unet import parse_channels
        if cfg.unet_channels is not None:
            cfg.unet_channels = ",".join(map(str, parse_channels(cfg.unet_channels)))
        if cfg.unet_layers is not None and int(cfg.unet_layers) < 1:
            raise UserError(f"--unet-layers must be >= 1, got {cfg.unet_layers}")
        if not cfg.latents and not cfg.vae:  # pixel space: the size is known before any data is read
            _unet_from_train(cfg, 1, int(cfg.image_size), 0, False)
        return
    if cfg.model == UNET_MODEL_NAME:
        raise UserError("--model U-Net: a U-Net is chosen with --backbone unet (sized by --unet-channels, --unet-layers)")
    set_ = [k for k in UNET_KEYS if getattr(cfg, k) is not None]
    if set_:
        raise _foreign(family, set_)
