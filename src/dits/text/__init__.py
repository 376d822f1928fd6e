"""Text conditioning (docs/text.md): captions in, the DiT's text inputs out.

* :mod:`dits.text.vocab` and :mod:`dits.text.learned`: the ``learned`` encoder, a small
  transformer over a word vocabulary built from the training captions, trained with the DiT;
* :mod:`dits.text.pretrained`: a frozen CLIP text model or T5 encoder through ``transformers``
  (``pip install dits[text]``), from a Hub id or a local directory;
* :mod:`dits.text.training`: the trainer's side (captions per example, one drawn per step);
* :mod:`dits.text.cache`: caption embeddings stored in a latent cache;
* :mod:`dits.text.prompts`: prompts at sampling time (``generate(..., prompts=...)``);
* :mod:`dits.text.digits`: the digits-text check of the ``digits-text`` preset.

The model side is :class:`dits.models.conditioning.TextEmbedder`; the blocks receive a token
sequence and a key-padding mask and never know which encoder made them.
"""
from dits.text.prompts import PromptConditioned, encode_prompts, read_prompts
from dits.text.vocab import Vocabulary, words

__all__ = ["PromptConditioned", "Vocabulary", "encode_prompts", "read_prompts", "words"]
