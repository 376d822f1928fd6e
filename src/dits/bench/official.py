"""The official DiT code (facebookresearch/DiT) as a contender: imported from a checkout outside
the repo that the user names (``--official PATH``), never part of dits. Its training step is the
loop body of its train.py, its sampler the loop of its sample.py."""
from __future__ import annotations

import contextlib
import copy
import importlib
import sys
from pathlib import Path
from typing import Callable

import torch

from dits.errors import UserError


def check_layout(path: str) -> None:
    root = Path(path)
    if not (root / "models.py").is_file() or not (root / "diffusion").is_dir():
        raise UserError(f"--official {path}: expected a facebookresearch/DiT checkout (models.py, diffusion/)")


@contextlib.contextmanager
def official_imports(path: str, extra_paths: list[str]):
    """Import the official ``models`` and ``diffusion`` from ``path`` (plus ``extra_paths``
    for timm and the like), then take them off sys.path / sys.modules again."""
    check_layout(path)
    added = [str(Path(path)), *extra_paths]
    sys.path[:0] = added
    before = set(sys.modules)
    try:
        try:
            models = importlib.import_module("models")
            diffusion = importlib.import_module("diffusion")
        except ImportError as e:
            raise UserError(f"cannot import the official code from {path}: {e} (its models.py needs timm; add its "
                            "location with --official-path or DITS_BENCH_PATH)") from None
        yield models, diffusion
    finally:
        for p in added:
            sys.path.remove(p)
        for name in set(sys.modules) - before:
            if name in ("models", "diffusion") or name.startswith(("models.", "diffusion.")):
                del sys.modules[name]


def official_model(models, s, like: torch.nn.Module, fused_attn: bool):
    cfg = like.config
    m = models.DiT(input_size=s.input_size, patch_size=cfg.patch_size, in_channels=s.in_channels,
                   hidden_size=cfg.hidden_size, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
                   class_dropout_prob=cfg.class_dropout_prob, num_classes=s.num_classes, learn_sigma=cfg.learn_sigma)
    m.load_state_dict(like.state_dict())  # the same weights (the layouts are identical)
    for blk in m.blocks:
        blk.attn.fused_attn = fused_attn  # timm's two attention paths: SDPA or explicit matmuls
    return m.to(s.device)


def official_train_step(s, path: str, extra_paths: list[str], like, fused: bool) -> Callable[[], None]:
    """The loop body of the official train.py (AdamW lr 1e-4 wd 0, loss.item(), its update_ema),
    under the same autocast, with timm's SDPA (``fused``) or explicit-matmul attention."""
    from dits.bench.speed import _autocast, _batch

    device = torch.device(s.device)
    with official_imports(path, extra_paths) as (models, diffusion_mod):
        diffusion = diffusion_mod.create_diffusion(timestep_respacing="")
        model = official_model(models, s, like, fused)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    gen = torch.Generator().manual_seed(s.seed)
    model.train()

    def step():
        x, y, t = _batch(s, device, gen)
        with _autocast(s.precision, device):
            loss_dict = diffusion.training_losses(model, x, t, dict(y=y))
        loss = loss_dict["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        _official_update_ema(ema, model)
        loss.item()
    return step


@torch.no_grad()
def _official_update_ema(ema, model, decay=0.9999):
    # What train.py's update_ema does (one mul_ and add_ per named parameter), restated.
    ema_params = dict(ema.named_parameters())
    for name, p in model.named_parameters():
        ema_params[name].mul_(decay).add_(p.data, alpha=1 - decay)


def official_sampler(s, path: str, extra_paths: list[str], like, fused: bool) -> Callable[[], None]:
    """sample.py's loop: x_T, CFG batch with null labels, forward_with_cfg, p_sample_loop."""
    device = torch.device(s.device)
    if s.sampler != "ddpm":
        raise UserError("the official comparison times DDPM (p_sample_loop); use --sampler ddpm")
    with official_imports(path, extra_paths) as (models, diffusion_mod):
        diffusion = diffusion_mod.create_diffusion(str(s.sample_steps))
        model = official_model(models, s, like, fused).eval()
    gen = torch.Generator().manual_seed(s.seed)

    @torch.no_grad()
    def run():
        z = torch.randn(s.batch, s.in_channels, s.input_size, s.input_size, generator=gen).to(device)
        y = torch.randint(0, s.num_classes, (s.batch,), generator=gen).to(device)
        z = torch.cat([z, z], 0)
        y = torch.cat([y, torch.full_like(y, s.num_classes)], 0)
        diffusion.p_sample_loop(model.forward_with_cfg, z.shape, z, clip_denoised=False,
                                model_kwargs=dict(y=y, cfg_scale=s.cfg_scale), progress=False, device=device)
    return run
