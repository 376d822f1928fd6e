"""The DiT model family.

>>> from dits.models import create_model
>>> model = create_model("DiT-XL/2")                         # the paper's flagship
>>> tiny = create_model("DiT", depth=4, hidden_size=128, num_heads=4, patch_size=2,
...                     input_size=8, in_channels=1, num_classes=10)
"""
from __future__ import annotations


from dits.models.blocks import BLOCK_TYPES
from dits.models.configs import MODEL_NAMES, SIZES, DiTConfig, canonical_name, config_for
from dits.models.dit import DiT


def create_model(name: str = "DiT-XL/2", **overrides) -> DiT:
    """Build a DiT by name (``DiT-S/2`` ... ``DiT-XL/8``, or ``DiT`` for a custom size).

    Overrides are any ``DiTConfig`` field: ``input_size``, ``in_channels``, ``num_classes``
    (0 = unconditional), ``learn_sigma``, ``class_dropout_prob``, ``block``, and for custom
    sizes ``depth``, ``hidden_size``, ``num_heads``, ``patch_size``, ``mlp_ratio``.
    """
    return DiT(config_for(name, **overrides))


def _constructor(name):
    def build(**kwargs):
        return create_model(name, **kwargs)
    build.__name__ = canonical_name(name).replace("-", "_").replace("/", "_")
    return build


# name -> constructor(**kwargs), as the reference's ``DiT_models``
DiT_models = {name: _constructor(name) for name in MODEL_NAMES}

__all__ = ["DiT", "DiTConfig", "create_model", "DiT_models", "MODEL_NAMES", "SIZES", "BLOCK_TYPES", "config_for"]
