"""What a run leaves for people to look at: the metrics log, progress bar, preview grids
with the digits metric, and loss.png."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dits.config import TrainConfig
from dits.errors import UserError
from dits.fileio import atomic_write, write_text_atomic
from dits.models import DiT
from dits.train.distributed import Dist

class LossAccumulator:
    """Running means of the logged losses since the last log line.

    Sums stay on the device: reading a value back (``float``) would make the GPU wait on
    every step; it happens once per log line instead."""

    def __init__(self):
        self.sums, self.count, self.steps = {}, 0, 0

    def skip(self):
        """A step whose update was dropped: it took time, but its losses are not averaged."""
        self.steps += 1

    def add(self, losses: dict, gnorm):
        for k, v in {**losses, "grad_norm": gnorm}.items():
            v = v.detach().float().mean()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.count += 1
        self.steps += 1

    def pop(self, ctx: Dist, step: int, lr: float, seconds: float, skipped: int = 0) -> dict:
        keys = sorted(self.sums)
        rec = {"step": step}
        if keys:  # (none when every step since the last line was skipped as non-finite)
            vals = torch.stack([self.sums[k] for k in keys]) / max(self.count, 1)
            if ctx.world > 1:  # average over processes so the log describes the global batch
                vals = vals.to(ctx.device)
                dist.all_reduce(vals)
                vals = vals / ctx.world
            got = dict(zip(keys, vals.cpu().tolist()))
            rec.update({k: _finite(v, 6) for k, v in got.items() if k != "grad_norm"})
            rec["grad_norm"] = _finite(got["grad_norm"], 4)  # inf on fp16 overflow steps: null in the log
        rec.update({"lr": lr, "steps_per_s": round(self.steps / max(seconds, 1e-9), 2)})
        if skipped:
            rec["skipped"] = skipped  # non-finite steps dropped so far (--on-nonfinite skip)
        self.__init__()
        return rec


def _finite(v: float, digits: int | None = None):
    """Strict JSON has no NaN/Infinity: a non-finite number is logged as null."""
    if not math.isfinite(v):
        return None
    return round(v, digits) if digits is not None else v


def check_out_dir(out: Path, overwrite: bool) -> None:
    """A new run may not land on an existing one by accident (issue: a forgotten --resume)."""
    from dits.checkpoint import is_run_dir, latest_checkpoint

    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a directory for the run")
    if is_run_dir(out) and not overwrite:
        latest = latest_checkpoint(out)
        at = f"at step {int(latest.stem)}" if latest else "without checkpoints"
        raise UserError(f"--out {out} already holds a run ({at}); continue it with --resume {out}, "
                        "or pick a new --out (--overwrite replaces it)")


def clear_run_dir(out: Path) -> None:
    """--overwrite: remove what a run writes there (and nothing else the directory holds)."""
    import shutil

    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    for pattern in ("config.yaml", "metrics.jsonl", "eval.jsonl", "summary.json", "loss.png", "samples_*.png"):
        for p in out.glob(pattern):
            p.unlink(missing_ok=True)


def progress_bar(enabled: bool, start: int, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True, mininterval=0.5)


def truncate_log(path: Path, step: int) -> None:
    """On resume, drop log lines written after the checkpoint (they will be written again)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    write_text_atomic(path, "".join(k + "\n" for k in keep))


def to_yaml(d: dict) -> str:
    import yaml
    return yaml.safe_dump(d, sort_keys=False)


def preview(cfg: TrainConfig, ema: DiT, vae, out: Path, step: int, num_classes: int, device, bar=None,
            prompts=None) -> dict:
    """Sample a grid (one row per class, or per prompt for text runs) with the EMA weights; on the
    built-in data, score samples (text runs on the digits: the digits-text check)."""
    from dits.sample import class_row_labels, generate, grid_labels, save_grid

    if cfg.latents and vae is None:
        return {}  # trained from a latent cache without --vae: nothing to decode previews with
    if prompts:
        return _preview_text(cfg, ema, vae, out, step, device, bar, list(prompts))
    rows = num_classes if num_classes > 0 else 8
    per = cfg.samples_per_class
    labels = grid_labels(num_classes, per) if num_classes > 0 else None
    from dits.objectives import DEFAULT_SAMPLER

    common = dict(sampler=cfg.sampler or DEFAULT_SAMPLER[cfg.objective], steps=cfg.sample_steps,
                  cfg_scale=cfg.cfg_scale if num_classes else 1.0,
                  vae=vae, device=device,
                  diffusion_steps=cfg.diffusion_steps, noise_schedule=cfg.noise_schedule,
                  objective=cfg.objective, guidance_interval=cfg.guidance_interval if num_classes else None)
    images, _ = generate(ema, rows * per, labels=labels, seed=cfg.seed, **common)
    names = class_row_labels(range(num_classes), cfg.data) if num_classes > 0 else None
    save_grid(images, out / f"samples_{step:07d}.png", ncol=per, row_labels=names)
    result = {"samples": str(out / f"samples_{step:07d}.png")}
    from dits.data.builtin import is_builtin

    if is_builtin(cfg.data) and not cfg.latents and cfg.eval_samples > 0:
        from dits.evaluate.builtin import format_metric, score

        imgs, labs = generate(ema, cfg.eval_samples, seed=cfg.seed + 10_000, batch_size=500, **common)
        m = score(cfg.data, imgs, labs if num_classes else None)
        m.update(heldout_losses(cfg, ema, device))
        m = {k: (_finite(float(v)) if isinstance(v, (np.floating, float)) else v) for k, v in m.items()}
        line = f"step {step}: {format_metric(cfg.data, m)}"
        (bar.write if bar is not None else print)(line)
        with open(out / "eval.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **m}) + "\n")
        result["digits_metric"] = m
    return result


def _preview_text(cfg: TrainConfig, ema: DiT, vae, out: Path, step: int, device, bar, prompts: list) -> dict:
    """A text run's preview: one row per prompt; on the digits captions, the digits-text check."""
    from dits.objectives import DEFAULT_SAMPLER
    from dits.sample import generate, grid_labels, save_grid

    per = cfg.samples_per_class
    common = dict(sampler=cfg.sampler or DEFAULT_SAMPLER[cfg.objective], steps=cfg.sample_steps,
                  cfg_scale=cfg.cfg_scale, vae=vae, device=device, diffusion_steps=cfg.diffusion_steps,
                  noise_schedule=cfg.noise_schedule, objective=cfg.objective, guidance_interval=cfg.guidance_interval)
    images, _ = generate(ema, len(prompts) * per, prompts=prompts, labels=grid_labels(len(prompts), per),
                         seed=cfg.seed, **common)
    path = out / f"samples_{step:07d}.png"
    save_grid(images, path, ncol=per, row_labels=prompts)
    result = {"samples": str(path)}
    if cfg.data == "digits" and not cfg.latents and cfg.eval_samples > 0 and (cfg.captions or "digits") == "digits":
        from dits.text.digits import digits_text_report, format_report

        per_prompt = max(1, cfg.eval_samples // 20)  # 20 prompts: two phrasings x 10 digits
        r = digits_text_report(ema, per_prompt=per_prompt, seed=cfg.seed + 10_000, **common)
        (bar.write if bar is not None else print)(f"step {step}: {format_report(r)}")
        with open(out / "eval.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "digits_text": r}) + "\n")
        result["digits_text"] = r
    return result


def heldout_losses(cfg: TrainConfig, ema, device) -> dict:
    """The denoising loss of the EMA weights on the held-out split and, for the memorisation
    gap, on as many training images, at the same fixed draws (dits.evaluate.heldout_loss)."""
    from dits.data.builtin import builtin
    from dits.evaluate.heldout_loss import denoising_loss
    from dits.objectives import create_objective

    obj = create_objective(cfg.objective, noise_schedule=cfg.noise_schedule, diffusion_steps=cfg.diffusion_steps,
                           learn_sigma=cfg.learn_sigma)
    held = denoising_loss(ema, obj, *builtin(cfg.data, "heldout"), device=device)
    train = denoising_loss(ema, obj, *builtin(cfg.data, "train"), device=device)
    return {"heldout_mse": held["mse"], "heldout_bpd": held["bpd"], "train_mse": train["mse"],
            "train_bpd": train["bpd"], "loss_gap": held["mse"] / train["mse"] - 1.0}


def plot_losses(metrics: Path, png: Path) -> None:
    """loss.png: the training loss (and its L_simple / L_vlb parts) against steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()] if metrics.exists() else []
    recs = [r for r in recs if r.get("loss") is not None]  # lines of skipped (non-finite) steps only have none
    if not recs:
        return
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for key, style in (("loss", "-"), ("mse", "--"), ("vb", ":")):
        pts = [(r["step"], r[key]) for r in recs if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), style, label={"loss": "loss", "mse": "L_simple (mse)", "vb": "L_vlb (bits/dim)"}[key])
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("training loss")
    fig.tight_layout()
    atomic_write(png, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
