"""Datasets: the built-in sets (digits, the glyphs testbed), image folders (ADM centre crop),
and latent caches. ``builtin(name, split)`` is the one way to ask for a built-in set."""
from dits.data.builtin import builtin, names

__all__ = ["builtin", "names"]
