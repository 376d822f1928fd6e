"""The Hub model card (``README.md``) of an exported DiTPipeline.

:func:`model_card` writes the text from what the export knows: the model (its config,
parameters, Gflops), the checkpoint's training config, and, when the weights came from a run
directory, that run's own files (``metrics.jsonl``, ``eval.jsonl``, the newest sample grid).
Nothing is measured again. The card begins with the Hub's YAML front matter
(``library_name: diffusers``, ``pipeline_tag``, ``tags``); the license is left for the owner of
the weights to fill in, since only they know the terms of their training data.

Local paths (the data folder, the checkpoint) appear by their last component only: a card is
meant to be published.
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from dits.models import DiT

# The Hub has no pipeline tag for class-conditional generation; DiT checkpoints use this one,
# and the "class-conditional" tag says what the model takes.
PIPELINE_TAG = "unconditional-image-generation"
GRID_NAME = "samples.png"


def find_run_dir(src: str | Path) -> Path | None:
    """The run directory ``src`` belongs to: itself, or the run of ``RUN/checkpoints/N.pt``."""
    from dits.checkpoint import is_run_dir

    p = Path(src).expanduser()
    for cand in ((p,) if p.is_dir() else (p.parent.parent,) if p.is_file() and p.parent.name == "checkpoints" else ()):
        if is_run_dir(cand):
            return cand
    return None


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a torn last line of a killed run
    return [r for r in out if isinstance(r, dict) and isinstance(r.get("step"), int)]


def run_facts(run_dir: Path | None, step: int | None) -> dict:
    """What the run directory says about the weights at ``step``: training-loop seconds (from
    ``metrics.jsonl``'s steps/s), the last logged loss, the evaluation and the sample grid."""
    if run_dir is None:
        return {}
    upto = step if step is not None else float("inf")
    facts: dict = {"run_dir": run_dir}
    recs = sorted((r for r in _jsonl(run_dir / "metrics.jsonl") if r["step"] <= upto), key=lambda r: r["step"])
    seconds, prev = 0.0, 0
    for r in recs:
        if r.get("steps_per_s"):
            seconds += (r["step"] - prev) / r["steps_per_s"]
        prev = r["step"]
    if recs:
        facts["loop_seconds"] = seconds
        last = [r for r in recs if r.get("loss") is not None]
        if last:
            facts["last_loss"] = (last[-1]["step"], last[-1]["loss"])
    evals = [r for r in _jsonl(run_dir / "eval.jsonl") if r["step"] <= upto]
    if evals:
        facts["eval"] = evals[-1]  # the same step as the weights when the run evaluated there
    grids = sorted(g for g in run_dir.glob("samples_*.png") if g.stem[8:].isdigit() and int(g.stem[8:]) <= upto)
    if grids:
        facts["grid"] = grids[-1]
        facts["grid_step"] = int(grids[-1].stem[8:])
    return facts


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f} %"


def _num(v, fmt=".4g") -> str:
    return "n/a" if v is None else format(v, fmt)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def front_matter(model: DiT, tc: dict, latent: bool) -> dict:
    """The Hub metadata: library, pipeline tag, tags (no license: see the module's docstring)."""
    tags = ["dit", "dits", "diffusion-transformer", "diffusion",
            "class-conditional" if model.num_classes > 0 else "unconditional",
            "latent-diffusion" if latent else "pixel-space"]
    if _builtin(tc):
        tags.append(str(tc["data"]))
    return {"library_name": "diffusers", "pipeline_tag": PIPELINE_TAG, "tags": tags}


def usage(model: DiT, where: str, has_vae: bool, vae_spec: str | None, cfg_scale: float) -> str:
    """The lines of Python that load the pipeline with diffusers and sample it."""
    n = min(model.num_classes, 4) if model.num_classes > 0 else 0
    labels = f"[{', '.join(map(str, range(n)))}]" if n else "[0] * 4"  # unconditional: the single zero row
    # DiTPipeline's null label is 1000: guidance only works for 1000-class models
    guidance = cfg_scale if model.num_classes == 1000 else 1.0
    call = f"images = pipe(class_labels={labels}, guidance_scale={guidance}, num_inference_steps=50).images"
    if has_vae:
        return f'from diffusers import DiTPipeline\npipe = DiTPipeline.from_pretrained("{where}")\n{call}'
    if vae_spec:
        return ("from diffusers import AutoencoderKL, DiTPipeline\n"
                f'pipe = DiTPipeline.from_pretrained("{where}", vae=AutoencoderKL.from_pretrained("{vae_spec}"))\n'
                f"{call}")
    # pixel space: DiTPipeline decodes through a VAE; the identity stands in for one
    return ("from types import SimpleNamespace as NS; from diffusers import DiTPipeline\n"
            f'pipe = DiTPipeline.from_pretrained("{where}", vae=None)  # pixel space: no VAE to decode\n'
            "pipe.vae = NS(config=NS(scaling_factor=1.0), decode=lambda x: NS(sample=x))  # the identity\n"
            f"{call}")


def model_card(model: DiT, info: dict, *, where: str, has_vae: bool, vae_spec: str | None = None,
               scheduler: str = "ddim", class_names: list[str] | None = None, run_dir: Path | None = None,
               name: str | None = None) -> tuple[str, dict[str, Path]]:
    """``(README.md text, {file name in the export: source path})``; the second holds the sample
    grid when the run has one. ``where`` is what ``from_pretrained`` is given in the usage lines
    (the Hub id, or the output directory)."""
    from dits.flops import count_gflops, count_params

    cfg = model.config
    tc = info.get("train_config") if isinstance(info.get("train_config"), dict) else {}
    step = info.get("step")
    facts = run_facts(run_dir, step)
    files = {GRID_NAME: facts["grid"]} if facts.get("grid") else {}
    title = name or (run_dir.name if run_dir is not None else Path(str(info.get("source", "model"))).stem)
    gflops = count_gflops(model)
    params = count_params(model)

    latent = bool(has_vae or vae_spec)
    vae_spec = _public(vae_spec) if vae_spec else None
    lines = ["---", yaml.safe_dump(front_matter(model, tc, latent), sort_keys=False).rstrip(),
             "# license: fill in the license of these weights (e.g. mit, apache-2.0, cc-by-nc-4.0);",
             "# it must allow what your training data's terms allow",
             "---", "",
             f"# {title}", "",
             "A Diffusion Transformer (DiT, Peebles & Xie 2022) trained with dits and exported to a diffusers "
             "`DiTPipeline` by `dits convert --to diffusers`.",
             ""]
    if "grid" in facts:
        lines += [f"![samples]({GRID_NAME})", "",
                  f"*Samples from the {info.get('weights', 'model')} weights at step {facts['grid_step']}"
                  + (", one row per class" if model.num_classes > 0 else "")
                  + (f" ({tc.get('sampler') or 'default'} sampler, {tc.get('sample_steps')} steps, guidance "
                     f"{tc.get('cfg_scale')})" if tc else "") + ".*", ""]

    space = (f"latent space of `{vae_spec}`" if vae_spec else "latent space") if latent else "pixel space"
    lines += ["## Model", "", "| | |", "|---|---|",
              f"| architecture | DiT: depth {cfg.depth}, width {cfg.hidden_size}, {cfg.num_heads} heads, "
              f"patch {cfg.patch_size} ({(cfg.input_size // cfg.patch_size) ** 2} tokens), {cfg.block} blocks |",
              f"| input | {cfg.in_channels} x {cfg.input_size} x {cfg.input_size} ({space}) |",
              f"| classes | {cfg.num_classes or 'none (unconditional)'} |",
              f"| parameters | {params:,} |",
              f"| Gflops (one forward pass, one image) | {gflops:.4g} |",
              f"| objective | {tc.get('objective', 'diffusion')}: {tc.get('diffusion_steps', 1000)} steps, "
              f"{tc.get('noise_schedule', 'linear')} betas, predicts noise"
              + (" and a learned variance" if cfg.learn_sigma else "") + " |",
              f"| weights | {info.get('weights', 'model')}" + (f", step {step:,}" if isinstance(step, int) else "")
              + " |",
              f"| scheduler written | {scheduler} |"]
    if class_names:
        shown = ", ".join(class_names[:10]) + (", ..." if len(class_names) > 10 else "")
        lines.append(f"| class names (`pipe.id2label`) | {shown} |")
    lines.append("")

    lines += ["## Training", ""]
    if tc:
        data = tc.get("latents") or tc.get("data")
        data = Path(str(data)).name if data else "n/a"
        kind = "latent cache" if tc.get("latents") else "data"
        lr = f"{tc.get('lr')}" + (f", {tc.get('warmup_steps')} warm-up steps" if tc.get("warmup_steps") else "") \
            + (f", {tc.get('lr_schedule')} schedule" if tc.get("lr_schedule", "constant") != "constant" else "")
        lines += ["| | |", "|---|---|",
                  f"| {kind} | {data}" + (f" at {tc.get('image_size')} px" if tc.get("image_size") and
                                          not _builtin(tc) else "") + " |",
                  f"| steps | {step if step is not None else tc.get('steps')} (of {tc.get('steps')} planned) |",
                  f"| global batch | {tc.get('batch_size')} |",
                  f"| optimiser | AdamW, lr {lr}, weight decay {tc.get('weight_decay')}"
                  + (f", grad clip {tc.get('grad_clip')}" if tc.get("grad_clip") else "") + " |",
                  f"| EMA decay | {tc.get('ema_decay')}" + (" (with warm-up)" if tc.get("ema_warmup") else "") + " |",
                  f"| precision | {tc.get('precision')} |",
                  f"| label dropout (for guidance) | {tc.get('class_dropout_prob')} |",
                  f"| seed | {tc.get('seed')} |"]
        if tc.get("init"):
            lines.append(f"| fine-tuned from | {Path(str(tc['init'])).name} |")
        if "loop_seconds" in facts:
            lines.append(f"| wall time | {_duration(facts['loop_seconds'])} in the training loop (from "
                         "metrics.jsonl's steps/s; previews and evaluations not counted) |")
        if "last_loss" in facts:
            s, v = facts["last_loss"]
            lines.append(f"| training loss | {v:.4f} (mean over the log interval ending at step {s}) |")
        lines.append("")
    else:
        lines += ["The checkpoint carries no training configuration.", ""]

    lines += ["## Evaluation", ""]
    ev = facts.get("eval")
    if ev:
        at = f"step {ev['step']}" + ("" if ev["step"] == step else f" (the weights are from step {step})")
        lines += [f"The run's own evaluation at {at}, on {ev.get('n', 'n/a')} samples "
                  f"({tc.get('sampler') or 'default'} sampler, {tc.get('sample_steps')} steps, "
                  f"guidance {tc.get('cfg_scale')}), against the built-in {tc.get('data', 'data')} set:", "",
                  "| metric | value |", "|---|---|",
                  f"| class accuracy (MLP classifier) | {_pct(ev.get('accuracy'))} |"]
        if ev.get("svc_accuracy") is not None:
            lines.append(f"| class accuracy (independent SVC) | {_pct(ev['svc_accuracy'])} |")
        lines.append(f"| Fréchet distance to all real images | {_num(ev.get('fd'))} (real-vs-real floor "
                     f"{_num(ev.get('fd_floor'))}) |")
        held, floor = ev.get("fd_heldout"), ev.get("fd_heldout_floor")
        if held is not None and floor:
            lines.append(f"| held-out FD vs real-data level | {held:.4g} vs {floor:.4g} ({held / floor:.2f}x) |")
        if ev.get("heldout_mse") is not None:
            gap = f", gap to training images {100 * ev['loss_gap']:+.1f} %" if ev.get("loss_gap") is not None else ""
            lines.append(f"| held-out denoising loss | {ev['heldout_mse']:.4f}{gap} |")
        lines.append("")
    else:
        lines += ["No evaluation was recorded with these weights (`dits evaluate` computes FID, sFID, IS and "
                  "precision/recall from samples).", ""]

    lines += ["## Use", "", "With diffusers:", "", "```python",
              usage(model, where, has_vae, vae_spec, float(tc.get("cfg_scale", 4.0) or 4.0)), "```", "",
              "Stock diffusers computes DiT's timestep frequencies as 10000^(-k/127) instead of the reference's "
              "10000^(-k/128), so its samples differ slightly from the trained model's. "
              "`dits.interop.diffusers.load_exact_pipeline(PATH)` loads the pipeline with that fixed, and "
              f"`dits sample --ckpt {where} --out grid.png` samples exactly as the training run did"
              + (" (the configuration travels in `dits.json`)." if tc else "."), ""]
    if model.num_classes not in (0, 1000):
        lines += [f"`DiTPipeline` uses label 1000 as the null class, so with this {model.num_classes}-class model "
                  "call it with `guidance_scale=1`; dits' own sampler guides it.", ""]
    return "\n".join(lines).rstrip() + "\n", files


def _public(spec: str) -> str:
    """A Hub id as it is; a local directory by its name only."""
    return Path(spec).name if Path(spec).expanduser().exists() else spec


def _builtin(tc: dict) -> bool:
    from dits.data.builtin import is_builtin
    return bool(tc.get("data")) and is_builtin(tc["data"]) and not tc.get("latents")
