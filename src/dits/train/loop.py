"""Training DiT: one loop, read top to bottom.

    data batch -> (frozen VAE) -> x0 -> t, noise -> objective's loss -> AdamW -> EMA

The objective (``--objective``: DiT's Gaussian diffusion, L_simple + L_vlb, or flow matching's
velocity MSE) lives in :mod:`dits.objectives`; the loop only asks it for t and the loss.

Runs on one CPU, one GPU, or many processes under ``torchrun`` (DDP; gloo on CPU, NCCL on
CUDA). All randomness of a step (which images, flips, t, noise, label dropout) is drawn
from a generator seeded by (seed, step) for the *global* batch, and each process takes its
slice. So a run is a pure function of its config: resuming after a kill continues the same
trajectory, and N processes compute the same step as one process on the global batch.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from dits.checkpoint import checkpoint_path, latest_checkpoint, newest_readable_checkpoint, save_checkpoint
from dits.config import TrainConfig, merge_resume
from dits.errors import UserError
from dits.fileio import write_json_atomic, write_text_atomic
from dits.masking import Masking, decoder_depth
from dits.models import DiT, create_model
from dits.objectives import TrainingLoss, create_objective, resolve_learn_sigma
from dits.speed import adamw, check_precision, setup_device
from dits.train.distributed import full_copy, full_state, load_optimizer_state, setup_distributed, shard
from dits.train.faults import NonFiniteGuard, Preemption, agree, injected_fault
from dits.train.outputs import (LossAccumulator, check_out_dir, clear_run_dir, plot_losses, preview, progress_bar,
                                to_yaml, truncate_log)
from dits.train.retention import prune_checkpoints
from dits.train.sinks import clear_sink_files, open_sinks, require_backends
from dits.train.sources import StepRandomness, build_data
from dits.text.training import build_text


# ---------------------------------------------------------------------------- the loop
def lr_at(cfg: TrainConfig, step: int) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":  # half a cosine from lr after warm-up to 0 at the last step
        frac = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
    return cfg.lr


def ema_decay_at(cfg: TrainConfig, step: int) -> float:
    if cfg.ema_warmup:
        return min(cfg.ema_decay, (1 + step) / (10 + step))
    return cfg.ema_decay


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    ema_p = [p for p in ema.parameters() if p.dtype.is_floating_point]
    src_p = [p.detach() for p in model.parameters() if p.dtype.is_floating_point]
    torch._foreach_lerp_(ema_p, src_p, 1.0 - decay)


def grad_norm(model: torch.nn.Module) -> torch.Tensor:
    """The gradients' total L2 norm (logged every step; FSDP: a DTensor, see :func:`full_norm`)."""
    return torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])


def full_norm(gnorm: torch.Tensor) -> torch.Tensor:
    return gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm  # FSDP: a DTensor


def clip_grads(model: torch.nn.Module, max_norm: float, gnorm: torch.Tensor) -> bool:
    """clip_grad_norm_(model, max_norm) given the norm ``gnorm`` it would compute, bit for bit,
    done only where it changes something: the gradients are multiplied by min(1, max_norm /
    (gnorm + 1e-6)), and a factor of exactly 1.0 changes no bit, so that pass over every gradient
    (~1 % of the digits step) is skipped when the norm is under ``max_norm``. Reading the factor
    costs nothing: the step has synced on the norm already (the non-finite check). Returns whether
    it clipped; ``max_norm`` <= 0 never clips."""
    if max_norm <= 0 or float(full_norm(max_norm / (gnorm + 1e-6))) >= 1.0:
        return False
    torch.nn.utils.clip_grads_with_norm_(model.parameters(), max_norm, gnorm)
    return True


def build_model(cfg: TrainConfig, in_channels: int, input_size: int, num_classes: int, text=None) -> DiT:
    from dits.models.registry import build_for_training  # --backbone: another family builds its own model
    other = build_for_training(cfg, in_channels, input_size, num_classes, resolve_learn_sigma(cfg.objective, cfg.learn_sigma))
    if other is not None:
        return other
    extra = {k: getattr(cfg, k) for k in ("depth", "hidden_size", "num_heads", "patch_size")}
    extra.update(mlp=cfg.mlp, norm=cfg.norm, pos=cfg.pos, decoder_depth=decoder_depth(cfg))  # defaults: the paper's
    if text is not None:  # a text run (dits.text.training): the text encoder's fields of DiTConfig
        extra.update(text.model_fields)
    return create_model(cfg.model, input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                        learn_sigma=resolve_learn_sigma(cfg.objective, cfg.learn_sigma),
                        class_dropout_prob=cfg.class_dropout_prob, block=cfg.block,
                        **extra)


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class StepParts:
    """What one training step touches. ``loss(x, t, model_kwargs, noise)`` is the objective's
    losses of ``model`` as the step computes them (DDP-wrapped, compiled by the plan: see
    :func:`step_loss`); ``decide(loss, gnorm)`` -> (bad, stop) is the step's one host sync."""
    loss: torch.nn.Module
    model: torch.nn.Module
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    cfg: TrainConfig
    device: torch.device
    decide: Callable
    plan: object = None          # a dits.plan.Plan: the kernels the step runs with
    plan_record: dict | None = None


@dataclass
class StepResult:
    losses: dict
    loss: torch.Tensor
    gnorm: torch.Tensor
    bad: bool
    stop: bool


def step_loss(plan, objective, net: torch.nn.Module, model: torch.nn.Module, quiet: bool = False) -> torch.nn.Module:
    """The step's loss as ``plan`` runs it. A whole-model compile takes the objective's loss into
    the model's graph (:class:`dits.objectives.TrainingLoss` compiled), except around DDP, which is
    compiled alone as torch documents it; a per-block compile compiles the blocks in place; eager
    plans wrap nothing. The result has the plan's ``failed`` / ``why`` where it compiled."""
    if plan is None:
        return TrainingLoss(objective, net)
    if plan.compile == "model" and isinstance(net, torch.nn.parallel.DistributedDataParallel):
        return TrainingLoss(objective, plan.wrap(net, model, quiet=quiet))
    return plan.wrap(TrainingLoss(objective, net), model, quiet=quiet)


def train_step(p: StepParts, step: int, x: torch.Tensor, t: torch.Tensor, model_kwargs: dict,
               noise: torch.Tensor) -> StepResult:
    """One optimisation step of the trainer (and of `dits bench train`, which times this function):
    loss under autocast, backward, gradient norm (and clip), then, unless the step is non-finite,
    AdamW and the EMA. A non-finite step under ``on_nonfinite: stop`` returns before anything is
    updated (the caller stops the run); under ``skip`` the update is dropped."""
    cfg = p.cfg
    with p.plan.scope() if p.plan is not None else contextlib.nullcontext():
        for group in p.opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        with _autocast(cfg, p.device):
            losses = p.loss(x, t, model_kwargs, noise)
        loss = losses["loss"].mean()
        p.opt.zero_grad(set_to_none=True)
        p.scaler.scale(loss).backward()
        p.scaler.unscale_(p.opt)
        norm = grad_norm(p.model)
        gnorm = full_norm(norm)
        # one host sync per step: whether to step must be known here, on every process alike
        bad, stop = p.decide(loss, gnorm)
        if bad and cfg.on_nonfinite == "stop":
            return StepResult(losses, loss, gnorm, True, stop)
        if not bad:
            clip_grads(p.model, cfg.grad_clip, norm)
            p.scaler.step(p.opt)
            update_ema(p.ema, p.model, ema_decay_at(cfg, step))
        p.scaler.update()
    return StepResult(losses, loss, gnorm, bad, stop)


def train(cfg: TrainConfig, resume: str | None = None, progress: bool = True, typed=None,
          overwrite: bool = False) -> dict:
    """Train a DiT as ``cfg`` says; returns a summary dict (also written to the run dir).

    ``typed``: the config keys the user gave (the CLI passes the flags typed); on ``resume``
    each of them is applied or refused, see ``dits.config.ON_RESUME``. Without it, keys that
    differ from the built-in defaults count as given. ``overwrite`` lets ``cfg.out`` replace
    an existing run."""
    cfg.validate()
    require_backends(cfg.log)  # --log tensorboard/wandb without its package: one line, nothing done
    typed = set(typed) if typed is not None else {k for k, v in cfg.to_dict().items() if v != getattr(TrainConfig, k)}
    ctx = setup_distributed(cfg.device)
    out = Path(cfg.out)
    start, state, init = 0, None, None
    if resume:
        cfg, state, changes = _resume(cfg, resume, typed)
        out, start = Path(cfg.out), int(state["step"])
        require_backends(cfg.log)  # the run's own --log, when not typed again
    else:
        check_out_dir(out, overwrite)
        if cfg.init:
            from dits.checkpoint import resolve_weights
            from dits.train.finetune import adopt_architecture

            init = resolve_weights(cfg.init)
            cfg = adopt_architecture(cfg, init, typed)
    if cfg.batch_size % ctx.world:
        raise UserError(f"global batch {cfg.batch_size} is not divisible by {ctx.world} processes")
    local_b = cfg.batch_size // ctx.world

    source, vae, channels, size = build_data(cfg, ctx, typed)
    # how to decode samples later (`dits sample`): the VAE given, or the one that made the cache
    vae_spec = cfg.vae or getattr(getattr(source, "dataset", None), "vae_spec", None)
    source, text = build_text(cfg, source, ctx, state)  # text runs: captions per example; else (source, None)
    torch.manual_seed(cfg.seed)  # the same initial weights on every process and every run
    model = build_model(cfg, channels, size, source.num_classes, text).to(ctx.device)
    notes = []
    if state is not None:
        model.load_state_dict(state["model"])
    elif init is not None:
        from dits.train.finetune import load_init
        notes = load_init(model, init)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    if state is not None:
        ema.load_state_dict(state["ema"])
    net = model
    if cfg.fsdp:
        if ctx.world < 2:
            raise UserError("--fsdp shards the model over processes: launch with torchrun --nproc_per_node=N (N >= 2)")
        shard(model)
        shard(ema)  # sharded the same way, so the EMA update is a local operation on each shard
    elif ctx.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None)
    net = _speed_up(cfg, model, net, ctx, start)
    opt = adamw(model.parameters(), cfg.lr, cfg.weight_decay, ctx.device,  # fused kernel where there is one
                betas=(0.9, cfg.adam_beta2))
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=cfg.precision == "fp16")
    if state is not None:
        load_optimizer_state(model, opt, state["opt"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
    masking = Masking.for_run(cfg, model.config)  # --mask-ratio (MaskDiT); None: every step unmasked
    objective = create_objective(cfg.objective, noise_schedule=cfg.noise_schedule, learn_sigma=cfg.learn_sigma,
                                 diffusion_steps=cfg.diffusion_steps, loss_weighting=cfg.loss_weighting,
                                 t_sampling=cfg.t_sampling, masking=masking)
    rand = StepRandomness(cfg.seed, len(source), cfg.batch_size, cfg.flip)
    lo, hi = ctx.rank * local_b, (ctx.rank + 1) * local_b

    if ctx.main:
        if overwrite and not resume:
            clear_run_dir(out)
            clear_sink_files(out)
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "config.yaml", to_yaml(cfg.to_dict()))
        truncate_log(out / "metrics.jsonl", start)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"dits train: {cfg.model} ({n_params / 1e6:.2f}M params) on {cfg.latents or cfg.data}, "
              f"{len(source)} examples, {ctx.world} process(es) on {ctx.device}, batch {cfg.batch_size}, "
              f"steps {start}->{cfg.steps}, run dir {out}", flush=True)
        if text is not None:
            print(f"dits train: text: {text.describe()}", flush=True)
        if resume:
            print(f"dits train: resuming from step {start}" + "".join(
                f"; {k} {a!r} -> {b!r}" for k, (a, b) in changes.items()), flush=True)
        if init is not None:
            print(f"dits train: fine-tuning from {init.info['source']} ({init.info.get('weights')} weights"
                  + "".join(f"; {n}" for n in notes) + "), fresh optimiser, step 0", flush=True)
    sample_every = cfg.sample_every or cfg.ckpt_every
    sinks = open_sinks(cfg.log, out, cfg.to_dict(), start, ctx.main)  # metrics.jsonl, --log backends
    bar = progress_bar(ctx.main and progress, start, cfg.steps)
    acc, t_last, summary = LossAccumulator(), time.time(), {}
    guard = NonFiniteGuard(cfg.on_nonfinite, fp16=cfg.precision == "fp16")
    fault = injected_fault()  # tests only: a kill or preemption signal after a given step
    batches = iter(source.batches(rand, start, cfg.steps, lo, hi))
    model.train()
    with Preemption() as preempt:
        def decide(loss, gnorm):
            return agree(ctx, guard.bad(loss, gnorm), preempt.requested())
        parts = None
        try:
            for step in range(start, cfg.steps):
                # ---- the global batch's randomness, then this process's slice
                g = rand.generator(step)
                t = objective.draw_t(cfg.batch_size, g)
                drop = torch.rand(cfg.batch_size, generator=g) < cfg.class_dropout_prob
                x, y = next(batches)
                torch.manual_seed((cfg.seed + 1) * 1_000_033 + step * ctx.world + ctx.rank)  # e.g. VAE sampling
                x = x.to(ctx.device, non_blocking=True)
                if vae is not None and not cfg.latents:
                    x = vae.encode(x)
                noise = torch.randn((cfg.batch_size, *x.shape[1:]), generator=g)[lo:hi].to(ctx.device)
                kwargs = {}
                if source.num_classes > 0:
                    kwargs = {"y": y.to(ctx.device), "force_drop_ids": drop[lo:hi].to(ctx.device)}
                elif text is not None:  # y holds example indices; the step's captions, null where dropped
                    kwargs = {**text.kwargs(y, step, lo, hi, ctx.device), "force_drop_ids": drop[lo:hi].to(ctx.device)}
                keep = masking.draw(step, cfg.batch_size, g) if masking is not None else None
                if keep is not None:  # a masked step: the tokens each image's encoder sees (dits.masking)
                    kwargs["mask_keep"] = keep[lo:hi].to(ctx.device)
                # ---- loss, backward, step
                t_local = t[lo:hi].to(ctx.device)
                if parts is None:  # the first step: the plan is chosen on this step's own inputs (dits.plan)
                    parts = _plan_parts(cfg, model, net, ema, opt, scaler, objective, ctx, start, state, decide,
                                        (x, t_local, kwargs, noise), bar)
                res = train_step(parts, step, x, t_local, kwargs, noise)
                if res.bad and cfg.on_nonfinite == "stop":
                    raise guard.stop(step, cfg, float(res.loss.detach()), float(res.gnorm.detach()),
                                     latest_checkpoint(out) if ctx.main else None)
                if res.bad:
                    guard.skipped += 1  # drop this update (and the EMA's); log how many
                    acc.skip()
                else:
                    acc.add(res.losses, res.gnorm)
                stop = res.stop
                done = step + 1
                if bar is not None:
                    bar.update(1)
                # ---- bookkeeping (rank 0 writes; every rank joins the collective parts)
                if done % cfg.log_every == 0 or done == cfg.steps:
                    rec = acc.pop(ctx, done, lr_at(cfg, step), time.time() - t_last, skipped=guard.skipped)
                    t_last = time.time()
                    if ctx.main:
                        sinks.log(rec)
                        if bar is not None and rec.get("loss") is not None:
                            bar.set_postfix(loss=f"{rec['loss']:.4f}", refresh=False)
                if done % cfg.ckpt_every == 0 or done == cfg.steps or stop:
                    ckpt = _state(cfg, done, model, ema, opt, scaler, vae_spec, parts.plan_record)  # collective under FSDP
                    if ctx.main:
                        save_checkpoint(checkpoint_path(out, done), ckpt)  # durable before older ones go
                        prune_checkpoints(out, cfg.keep_last, cfg.keep_every)
                        plot_losses(out / "metrics.jsonl", out / "loss.png")
                    del ckpt
                    ctx.barrier()
                if stop:
                    summary = {"step": done, "stopped_by": preempt.name, "exit_code": 128 + (preempt.signum or 15)}
                    if ctx.main:
                        (bar.write if bar is not None else print)(
                            f"dits train: stopped by {preempt.name} after step {done}; checkpoint "
                            f"{checkpoint_path(out, done)} written; continue with: dits train --resume {out}")
                    break
                if done % sample_every == 0 or done == cfg.steps:
                    sampler_model = ema if not cfg.fsdp else full_copy(ema, lambda: build_model(cfg, channels, size, source.num_classes, text), ctx)
                    if ctx.main:
                        summary = preview(cfg, sampler_model, vae, out, done, source.num_classes, ctx.device, bar,
                                          prompts=text.preview_prompts if text is not None else None)
                        sinks.preview(done, summary)
                    ctx.barrier()
                fault(done)
        finally:
            batches.close()  # stops the loader's workers now (they ignore SIGTERM: see sources.py)
            if bar is not None:
                bar.close()
            sinks.close()
    if ctx.main and "stopped_by" not in summary:
        summary = {"steps": cfg.steps, "run_dir": str(out), "data": cfg.data, "skipped_steps": guard.skipped,
                   **summary}
        write_json_atomic(out / "summary.json", summary)
    if ctx.world > 1:
        ctx.barrier()  # leave together: a process that tears down gloo while a peer still talks aborts
        dist.destroy_process_group()
    return summary


def _speed_up(cfg: TrainConfig, model: DiT, net: torch.nn.Module, ctx, start: int) -> torch.nn.Module:
    """The speed choices (dits.speed) that change how the step runs, never what it computes. The
    plan (compile, GEMM and attention kernels) is chosen at the first step, see _plan_parts; a
    --plan or --compile this machine cannot run is refused here, before any work."""
    from dits.plan import check_request

    check_precision(cfg.precision, ctx.device)
    check_request(cfg.plan, cfg.compile, ctx.device, cfg.precision, hasattr(model, "blocks"))
    setup_device(ctx.device)
    model.grad_checkpoint = cfg.grad_checkpoint
    return net


def _plan_parts(cfg, model, net, ema, opt, scaler, objective, ctx, start, state, decide, example, bar) -> StepParts:
    """The run's plan (dits.plan: measured on copies of the model with this first step's inputs,
    or from the cache, or kept from the checkpoint on resume), applied to ``net``."""
    from dits.plan import choose_for_run

    choice = choose_for_run(cfg, model, ctx, cfg.steps - start, example, objective,
                            resumed=(state or {}).get("plan"))
    if ctx.main:
        line = f"dits train: {choice.line}"
        bar.write(line) if bar is not None else print(line, flush=True)
    return StepParts(step_loss(choice.plan, objective, net, model), model, ema, opt, scaler, cfg, ctx.device, decide,
                     choice.plan, choice.record())


def _state(cfg, step, model, ema, opt, scaler, vae_spec, plan=None) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    opt_state = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {"format": "dits", "version": 1, "kind": "train", "step": step, "vae_spec": vae_spec,
            "model_config": model.config.to_dict(), "train_config": cfg.to_dict(),
            "model": full_state(model), "ema": full_state(ema), "opt": opt_state,
            "scaler": scaler.state_dict() if scaler.is_enabled() else None, "plan": plan,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}


def _resume(cfg: TrainConfig, resume: str, typed: set) -> tuple[TrainConfig, dict, dict]:
    """(merged config, checkpoint, {key: (old, new)}) of the run to continue."""
    if "init" in typed:
        raise UserError("--init starts a new run from weights and --resume continues one; pass only one of them")
    if "out" in typed and Path(cfg.out).resolve() != Path(resume).resolve():
        raise UserError(f"--resume continues in {resume}; drop --out {cfg.out} (or start a new run there)")
    found = newest_readable_checkpoint(resume)
    if found is None:
        raise UserError(f"nothing to resume in {resume}: no checkpoint under {Path(resume) / 'checkpoints'}")
    ckpt, state = found
    cfg, changes = merge_resume(state.get("train_config") or {}, cfg, typed - {"out"}, str(ckpt))
    cfg.out = str(resume)
    return cfg, state, changes
