"""Sampling a trained DiT: labels, batches, decoding, and the files people look at.

``generate`` is what ``dits sample`` and the trainer's previews call. Images leave it as
uint8 N x H x W x C (ADM's layout), converted as the reference does:
``clamp(127.5 * x + 128, 0, 255)``.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from dits.fileio import atomic_write, write_npz_atomic
from dits.errors import UserError


def balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    """0, 1, ..., K-1, 0, 1, ...: n labels spread evenly over the classes."""
    return torch.arange(n) % num_classes


def grid_labels(num_classes: int, per_class: int) -> torch.Tensor:
    """Labels for a grid with one row per class: 0 x per_class, 1 x per_class, ..."""
    return torch.arange(num_classes).repeat_interleave(per_class)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] float (N, C, H, W) -> uint8 (N, H, W, C)."""
    return torch.clamp(127.5 * x.float() + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", torch.uint8).numpy()


@torch.no_grad()
def generate(model, n: int, *, labels: torch.Tensor | None = None, sampler: str = "ddpm", steps: int = 250,
             cfg_scale: float = 1.0, guided_channels: int | None = None, seed: int = 0, batch_size: int = 256,
             vae=None, clip_denoised: bool | None = None, diffusion_steps: int = 1000,
             noise_schedule: str = "linear", device=None, progress: bool = False, objective: str = "diffusion",
             guidance_interval: tuple[float, float] | str | None = None, prompts=None,
             max_text_tokens: int | None = None, plan: str = "auto", compile: str = "auto",
             plan_samples: int | None = None, say=None) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``n`` samples; returns (uint8 images N x H x W x C, int64 labels N).

    Sample i uses seed ``seed + i``, so it does not depend on the batch size. Without
    ``labels`` a conditional model samples balanced classes. ``vae`` (see ``dits.vae``)
    decodes latents; pixel models clip x0 to [-1, 1] at each step, latent models do not (as
    DiT). ``objective`` ("diffusion" or "flow", see :mod:`dits.objectives`) picks the sampler
    family; ``guidance_interval=(lo, hi)`` guides only at noise levels in [lo, hi] (flow time
    t; for diffusion the t with the same signal-to-noise ratio).

    Text models take ``prompts`` (a list of strings) instead: the returned labels (and ``labels``,
    if given) are prompt indices, balanced over the prompts by default, and guidance runs each
    prompt against the null caption. ``max_text_tokens`` overrides the model's caption length
    (docs/text.md).

    Speed: ``plan`` / ``compile`` as ``dits train``'s ``--plan`` / ``--compile`` (dits.plan). With
    "auto", a run of at least dits.plan.MIN_PROBE_STEPS model calls times the candidate plans on
    one call of its own shape (or takes them from the plan cache) and runs the fastest for its
    length, compile included; shorter runs stay eager with dits.speed's kernels (:func:`sampling_plan`).
    ``plan_samples`` decides as for a run of that many samples (the bench's); ``say`` gets the plan's line
    when one was measured, cached or forced. Every plan computes the same function up to float
    rounding; a compiled plan runs a last, smaller batch padded to the batch size (the extra rows
    are dropped) so that one graph serves the whole run.
    """
    from dits.objectives import check_sampler, sample as objective_sample
    from dits.diffusion.guidance import parse_interval
    from dits.speed import setup_device

    check_sampler(objective, sampler)
    guidance_interval = parse_interval(guidance_interval)

    model.eval()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    setup_device(device)
    text_model = bool(getattr(getattr(model, "config", None), "text", False))
    if prompts is not None or text_model:
        from dits.text.prompts import PromptConditioned

        if not text_model:
            kind = "class-conditional: pass class labels" if model.num_classes else "unconditional"
            raise UserError(f"this model is not text-conditional ({kind}); it takes no prompts")
        if prompts is None or isinstance(prompts, str) or len(prompts) == 0:
            raise UserError("this model is text-conditional: pass prompts (dits sample --prompt TEXT or --prompts "
                            "FILE), not class labels")
        model = PromptConditioned(model, prompts, max_text_tokens, device).eval()  # prompt i = label i
    k = model.num_classes
    if labels is None:
        labels = balanced_labels(n, k) if k > 0 else None
    elif k == 0:
        raise UserError("this model is unconditional: do not pass class labels")
    else:
        labels = torch.as_tensor(labels).long().reshape(-1)
        if labels.numel() != n:
            raise UserError(f"{labels.numel()} labels for {n} samples")
        if labels.min() < 0 or labels.max() >= k:
            what = "prompt indices" if text_model else "class labels"
            raise UserError(f"{what} must be in 0..{k - 1}, got {int(labels.min())}..{int(labels.max())}")
    if k == 0 and cfg_scale != 1:
        raise UserError("classifier-free guidance needs a class-conditional model; use --cfg-scale 1")
    pixel = vae is None or getattr(vae, "downsample", 1) == 1
    if clip_denoised is None:
        clip_denoised = pixel
    shape = (model.in_channels, model.input_size, model.input_size)
    choice = sampling_plan(model, plan_samples or n, batch_size=batch_size, sampler=sampler, steps=steps,
                           guided=labels is not None and cfg_scale != 1, objective=objective,
                           noise_schedule=noise_schedule, diffusion_steps=diffusion_steps, device=device,
                           plan=plan, compile=compile, text=text_model or prompts is not None)
    if say is not None and not choice.by_rules:
        say(choice.line)
    net = _Planned(model, choice.plan.wrap(model, model))
    out = []
    starts = range(0, n, batch_size)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n, desc="sampling", unit="img", dynamic_ncols=True)
    try:
        for start in starts:
            m = min(batch_size, n - start)
            rows = batch_size if choice.plan.compile and n > batch_size else m  # one shape for the graph
            y = labels[start:start + m].to(device) if labels is not None else None
            if y is not None and rows > m:
                y = torch.cat([y, y[:1].expand(rows - m)])
            with choice.plan.scope():
                x = objective_sample(net, (rows, *shape), objective=objective, y=y, sampler=sampler, steps=steps,
                                     cfg_scale=cfg_scale, guided_channels=guided_channels,
                                     guidance_interval=guidance_interval, learn_sigma=model.learn_sigma,
                                     noise_schedule=noise_schedule, diffusion_steps=diffusion_steps,
                                     clip_denoised=clip_denoised, seed=seed + start, device=device)[:m]
            if vae is not None:
                x = vae.decode(x)
            out.append(to_uint8(x))
            if bar is not None:
                bar.update(m)
    finally:  # an error is printed on its own line, not onto the bar's
        if bar is not None:
            bar.close()
        if choice.plan.mode == "compile-blocks":
            from dits.speed import compiled_blocks, uncompile_blocks
            uncompile_blocks(compiled_blocks(model))  # the caller's model leaves as it came (not compiled)
    lab = labels.numpy().astype(np.int64) if labels is not None else np.zeros(n, dtype=np.int64)
    return np.concatenate(out), lab


class _Planned:
    """``model`` as the samplers see it: its attributes, its calls through ``net`` (the plan's
    compiled graph, or the model itself)."""

    def __init__(self, model, net):
        self._model, self._net = model, net

    def __call__(self, *args, **kwargs):
        return self._net(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


def sampling_plan(model, n: int, *, batch_size: int = 256, sampler: str | None = None, steps: int | None = None,
                  guided: bool = True, objective: str = "diffusion", noise_schedule: str = "linear",
                  diffusion_steps: int = 1000, device=None, plan: str = "auto", compile: str = "auto",
                  text: bool = False):
    """The dits.plan.Choice :func:`generate` runs ``n`` samples with: the run's model calls are its
    batches x the sampler's evaluations per sample, each timed on one call of the first batch's
    shape (doubled when ``guided``: the shape most calls have)."""
    from dits.objectives import DEFAULT_SAMPLER, default_steps, evaluation_levels
    from dits.plan import choose_for_sampling
    from dits.speed import COMPILE_MODES

    if compile not in COMPILE_MODES:
        raise UserError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {compile!r}")
    if text and compile == "auto":
        compile = "off"  # a prompt-conditioned wrapper: not measured, not compiled unless asked
    device = torch.device(device) if device is not None else next(model.parameters()).device
    sampler = sampler or DEFAULT_SAMPLER[objective]
    steps = default_steps(sampler) if steps is None else steps
    calls = math.ceil(n / batch_size) * len(evaluation_levels(objective, sampler, steps, noise_schedule, diffusion_steps))
    rows = min(batch_size, n) * (2 if guided else 1)
    shape = (rows, model.in_channels, model.input_size, model.input_size)
    return choose_for_sampling(model, shape, calls, device, plan, compile,
                               measurable=not text, why_not="text models are not measured")


def grid_gap(cell: int) -> int:
    """White gap between grid cells: 1/16 of a cell side, at least 1 px (4 px between 64 px cells), so
    that strokes of vertical neighbours do not read as one."""
    return max(1, cell // 16)


def make_grid(images: np.ndarray, ncol: int, scale: int = 1, pad: int | None = None) -> np.ndarray:
    """uint8 N x H x W x C -> one uint8 picture, ``ncol`` per row, nearest-upscaled by ``scale``,
    cells ``pad`` px apart (default :func:`grid_gap` of the upscaled cell) inside a ``pad`` border."""
    n, h, w, c = images.shape
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
        h, w = h * scale, w * scale
    pad = grid_gap(h) if pad is None else pad
    nrow = math.ceil(n / ncol)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = img
    return grid


def save_grid(images: np.ndarray, path: str | Path, ncol: int, min_cell: int = 64, row_labels=None) -> Path:
    """Save a grid PNG; small images are upscaled so each cell is at least ``min_cell`` px.
    ``row_labels`` (one string per row: the class names or the prompts) are written to the left of
    the rows (:func:`class_row_labels` names the rows of a per-class grid)."""
    from PIL import Image

    scale = max(1, math.ceil(min_cell / images.shape[1]))
    cell = images.shape[1] * scale
    grid = make_grid(images, ncol, scale)
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if row_labels:
        img = label_rows(img, list(row_labels), cell, grid_gap(cell))
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def class_row_labels(classes, data: str | None = None) -> list[str]:
    """Row labels of a per-class grid: the built-in data set's class names (the glyphs' letters),
    else the class indices."""
    from dits.data.builtin import get, is_builtin

    names = get(data).class_names if data and is_builtin(data) else ()
    return [str(names[int(c)]) if int(c) < len(names) else str(int(c)) for c in classes]


def label_rows(img, labels: list, cell: int, pad: int = 1):
    """The grid ``img`` with a white margin on the left holding ``labels[r]`` beside row r."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    draw = ImageDraw.Draw(img)
    width = max(int(draw.textlength(str(t), font=font)) for t in labels) + 8
    out = Image.new(img.mode, (img.width + width, img.height), 255 if img.mode == "L" else (255, 255, 255))
    out.paste(img, (width, 0))
    draw = ImageDraw.Draw(out)
    ink = 0 if img.mode == "L" else (0, 0, 0)
    for r, text in enumerate(labels):
        y = pad + r * (cell + pad) + cell // 2
        draw.text((4, y), str(text), fill=ink, font=font, anchor="lm")
    return out


def save_npz(path: str | Path, images: np.ndarray, labels: np.ndarray, prompts=None) -> Path:
    """ADM's sample layout: ``arr_0`` uint8 N x H x W x C, ``arr_1`` int64 labels; for a text model
    ``arr_1`` holds prompt indices and ``prompts`` the prompts (a plain string array)."""
    if prompts is None:
        return write_npz_atomic(path, images, labels.astype(np.int64))
    return write_npz_atomic(path, images, labels.astype(np.int64), prompts=np.array([str(p) for p in prompts]))


def save_folder(path: str | Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """One PNG per sample, named ``{index:06d}_{label}.png``."""
    from PIL import Image

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for i, (img, lab) in enumerate(zip(images, labels)):
        im = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        atomic_write(path / f"{i:06d}_{int(lab)}.png", lambda tmp, im=im: im.save(tmp, format="PNG"))
    return path
