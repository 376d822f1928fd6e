"""dits: Diffusion Transformers (Peebles & Xie, 2022) in plain PyTorch."""

__version__ = "0.1.0"
