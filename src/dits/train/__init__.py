"""Training DiT: ``loop.py`` is the loop, read top to bottom; the modules beside it hold its
parts: ``distributed`` (processes, FSDP), ``sources`` (batches and step-seeded randomness),
``outputs`` (logs, previews, plots)."""
from dits.train.distributed import Dist, setup_distributed
from dits.train.loop import build_model, ema_decay_at, lr_at, train, update_ema
from dits.train.sources import DatasetSource, StepRandomness, TensorSource, build_data

__all__ = ["train", "build_model", "lr_at", "ema_decay_at", "update_ema", "Dist", "setup_distributed",
           "StepRandomness", "TensorSource", "DatasetSource", "build_data"]
