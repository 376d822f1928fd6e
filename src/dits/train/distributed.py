"""Processes and devices: torchrun/DDP setup, FSDP sharding, full (unsharded) state."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dits.errors import UserError
from dits.models import DiT

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            dist.barrier()


def resolve_device(device: str = "auto") -> torch.device:
    """``auto | cpu | cuda | cuda:N`` checked against this machine: one line if it cannot be."""
    import re

    if device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", device):
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {device} asked for, but this PyTorch sees no CUDA GPU; use --device cpu")
        if ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
            raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def setup_distributed(device: str = "auto") -> Dist:
    """Join the torchrun process group when there is one; pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = resolve_device(device).type == "cuda"
    if use_cuda:
        dev = torch.device(f"cuda:{local}" if world > 1 or device in ("auto", "cuda") else device)
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls: the paper's GPUs' default speed path
        torch.backends.cudnn.allow_tf32 = True
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world, dev)


def shard(model: DiT) -> None:
    """FSDP (PyTorch's ``fully_shard``): each block is its own unit, so only one block's
    full weights exist at a time; the embedders and final layer form the root unit."""
    from torch.distributed.fsdp import fully_shard

    for block in [*model.blocks, *(getattr(model, "decoder_blocks", None) or [])]:
        fully_shard(block)
    fully_shard(model)


def full_state(module) -> dict:
    """The full (unsharded) state dict on the CPU; a collective under FSDP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model, opt, state: dict) -> None:
    """Optimizer state saved keyed by parameter names, so DDP and FSDP runs resume each other."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, opt, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))


def full_copy(ema, build, ctx) -> DiT | None:
    """An unsharded copy of the (FSDP) EMA model for sampling on rank 0 (None elsewhere).
    Every process must call it: gathering the shards is a collective."""
    full = full_state(ema)  # CPU-offloaded: only rank 0 receives the tensors
    if not ctx.main:
        return None
    copy_ = build()
    copy_.load_state_dict(full)
    return copy_.to(ctx.device).eval()
