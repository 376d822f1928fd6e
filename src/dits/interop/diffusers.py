"""Convert adaLN-Zero DiTs to and from diffusers' ``DiTTransformer2DModel``.

>>> from dits.interop.diffusers import to_diffusers, from_diffusers, save_diffusers
>>> transformer = to_diffusers(model)                # exact weight mapping
>>> model_again = from_diffusers(transformer)       # bit-exact round trip
>>> save_diffusers(model, "out/pipe", vae="stabilityai/sd-vae-ft-ema")  # DiTPipeline dir
>>> transformer = load_exact_diffusers("out/pipe")  # runs exactly like the dits model

How the layouts differ (diffusers 0.2x-0.4x):

* diffusers gives **every block its own copy** of the timestep MLP and the label table
  (``transformer_blocks.i.norm1.emb``); the final layer uses block 0's copy. We write the
  same weights into every copy and, going back, require the copies to be equal.
* our fused ``attn.qkv`` (rows: q, then k, then v) is split into ``to_q``/``to_k``/``to_v``.
* the label table always has a null row in diffusers (its class dropout is hard-coded to
  0.1). A dits model without one (``class_dropout_prob=0``, or unconditional) gets a row of
  exact zeros appended; on the way back a last row of exact zeros is taken to mean "no null
  row" and dropped again, so the round trip is exact. An unconditional model becomes
  ``num_embeds_ada_norm=0`` with a single zero row: pass ``class_labels=0`` to it.
* ``pos_embed`` is not stored by diffusers: it recomputes the same 2-D sin-cos table
  (checked equal to ours when converting back).

The one thing no weight mapping can fix: diffusers' DiT hard-codes
``Timesteps(..., downscale_freq_shift=1)``, so its timestep frequencies are
``10000^(-k/127)`` where the reference uses ``10000^(-k/128)``. A converted model run by
stock diffusers is therefore a slightly different function at t > 0 (equal at t = 0, where
every frequency multiplies zero). :func:`make_exact` (used by :func:`load_exact_diffusers`
and :func:`load_exact_pipeline`) sets the shift to 0 in place, and the MLP LayerNorm eps to
1e-6, after which diffusers computes the reference function.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from dits.errors import UserError
from dits.models import DiT, DiTConfig

# Written into every exported config: diffusers' default LayerNorm eps (1e-5) differs from
# the reference's 1e-6; this field of DiTTransformer2DModel sets the MLP norm's eps.
NORM_EPS = 1e-6

# Written by save_diffusers(metadata=...) beside model_index.json: the run's provenance and
# sampling settings, so `dits sample --ckpt PIPELINE_DIR` samples like the run it came from.
METADATA = "dits.json"

# SPEC §3: the training schedule of every DiT.
SCHEDULE = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                prediction_type="epsilon")

FREQ_SHIFT_WARNING = (
    "note: stock diffusers computes DiT timestep frequencies as 10000^(-k/127) instead of the "
    "reference's 10000^(-k/128) (downscale_freq_shift=1), so outputs differ slightly at t > 0; "
    "load with dits.interop.diffusers.load_exact_pipeline / load_exact_diffusers to run it exactly")


def _diffusers():
    try:
        import diffusers
    except ImportError as e:  # pragma: no cover - diffusers is a dependency
        raise UserError("diffusers is not installed: pip install diffusers") from e
    return diffusers


# ----------------------------------------------------------------------------------------
# dits -> diffusers
# ----------------------------------------------------------------------------------------
def diffusers_config(config: DiTConfig) -> dict:
    """The ``DiTTransformer2DModel`` config of a dits model config."""
    if getattr(config, "backbone", "dit") != "dit":
        raise UserError(f"only DiTs convert to diffusers' DiTTransformer2DModel (this is a {config.describe()}, "
                        "already diffusers' UNet2DModel inside); sample it with dits sample")
    if config.text:
        raise UserError("text-conditional models do not convert to diffusers' DiTTransformer2DModel (class labels "
                        "only); sample them with dits sample --prompt")
    if config.block != "adaln-zero":
        raise UserError(f"only adaLN-Zero models convert to diffusers (this one uses {config.block!r} blocks)")
    if config.mlp_ratio != 4.0:
        raise UserError(f"diffusers' DiT has MLP ratio 4; this model has {config.mlp_ratio}")
    from dits.models.configs import OPTION_DEFAULTS
    changed = [f"{k}={getattr(config, k)!r}" for k, v in OPTION_DEFAULTS.items() if getattr(config, k) != v]
    if changed:
        raise UserError(f"diffusers' DiTTransformer2DModel is the paper's block; this model has {', '.join(changed)} "
                        "(sample it with dits sample)")
    return dict(
        num_attention_heads=config.num_heads,
        attention_head_dim=config.hidden_size // config.num_heads,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        num_layers=config.depth,
        sample_size=config.input_size,
        patch_size=config.patch_size,
        activation_fn="gelu-approximate",   # GELU(tanh), as the reference
        num_embeds_ada_norm=config.num_classes,
        attention_bias=True,
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
        norm_eps=NORM_EPS,
    )


def _label_table(model: DiT) -> torch.Tensor:
    """Our label table with exactly one null row at the end (zeros if we have none)."""
    d = model.config.hidden_size
    if model.num_classes == 0:
        return torch.zeros(1, d)
    table = model.y_embedder.embedding_table.weight.detach()
    if table.shape[0] == model.num_classes:  # no null row: class_dropout_prob == 0
        table = torch.cat([table, table.new_zeros(1, d)])
    return table


def to_diffusers_state_dict(model: DiT) -> dict[str, torch.Tensor]:
    """Our state dict in diffusers' names (values shared, not copied)."""
    sd = model.state_dict()
    out = {
        "pos_embed.proj.weight": sd["x_embedder.proj.weight"],
        "pos_embed.proj.bias": sd["x_embedder.proj.bias"],
        "proj_out_1.weight": sd["final_layer.adaLN_modulation.1.weight"],
        "proj_out_1.bias": sd["final_layer.adaLN_modulation.1.bias"],
        "proj_out_2.weight": sd["final_layer.linear.weight"],
        "proj_out_2.bias": sd["final_layer.linear.bias"],
    }
    table = _label_table(model).to(sd["pos_embed"].dtype)
    for i in range(model.config.depth):
        ours, theirs = f"blocks.{i}.", f"transformer_blocks.{i}."
        emb = theirs + "norm1.emb."
        for w in ("weight", "bias"):
            # every block gets its own copy of the conditioning embedders
            out[f"{emb}timestep_embedder.linear_1.{w}"] = sd[f"t_embedder.mlp.0.{w}"]
            out[f"{emb}timestep_embedder.linear_2.{w}"] = sd[f"t_embedder.mlp.2.{w}"]
            # same chunk order: shift/scale/gate of attention, then of the MLP
            out[f"{theirs}norm1.linear.{w}"] = sd[f"{ours}adaLN_modulation.1.{w}"]
            q, k, v = sd[f"{ours}attn.qkv.{w}"].chunk(3, dim=0)
            out[f"{theirs}attn1.to_q.{w}"], out[f"{theirs}attn1.to_k.{w}"], out[f"{theirs}attn1.to_v.{w}"] = q, k, v
            out[f"{theirs}attn1.to_out.0.{w}"] = sd[f"{ours}attn.proj.{w}"]
            out[f"{theirs}ff.net.0.proj.{w}"] = sd[f"{ours}mlp.fc1.{w}"]
            out[f"{theirs}ff.net.2.{w}"] = sd[f"{ours}mlp.fc2.{w}"]
        out[f"{emb}class_embedder.embedding_table.weight"] = table
    return out


def to_diffusers(model: DiT):
    """A ``diffusers.DiTTransformer2DModel`` holding exactly this model's weights.

    Same device and dtype as ``model``; eval mode. Only adaLN-Zero models with MLP ratio 4
    (every configuration of the paper) can be represented.
    """
    diffusers = _diffusers()
    cfg = diffusers_config(model.config)
    ref = model.pos_embed
    transformer = diffusers.DiTTransformer2DModel(**cfg)
    transformer.load_state_dict(to_diffusers_state_dict(model), strict=True)
    _check_pos_embed(transformer, ref.detach())
    # plain nn.Module.to: diffusers' override warns on every dtype cast
    return torch.nn.Module.to(transformer, device=ref.device, dtype=ref.dtype).eval()


def _check_pos_embed(transformer, ours: torch.Tensor) -> None:
    """diffusers recomputes the sin-cos table: it must be ours (to the coarser dtype's precision)."""
    theirs = transformer.pos_embed.pos_embed.detach()
    tol = max(torch.finfo(theirs.dtype).eps, torch.finfo(ours.dtype).eps)  # values lie in [-1, 1]
    if theirs.shape != ours.shape or not torch.allclose(theirs.float().cpu(), ours.float().cpu(), atol=tol, rtol=0):
        raise UserError("diffusers computes a different position embedding than this model's pos_embed; "
                        "was the model's pos_embed modified?")


# ----------------------------------------------------------------------------------------
# diffusers -> dits
# ----------------------------------------------------------------------------------------
def _dits_config(tcfg: dict) -> DiTConfig:
    """Our config of a ``DiTTransformer2DModel`` config (refusing what dits cannot represent)."""
    expect = dict(norm_type="ada_norm_zero", activation_fn="gelu-approximate", attention_bias=True,
                  norm_elementwise_affine=False)
    for key, want in expect.items():
        if tcfg.get(key, want) != want:
            raise UserError(f"cannot convert a DiTTransformer2DModel with {key}={tcfg.get(key)!r} "
                            f"(dits needs {want!r})")
    in_ch = tcfg["in_channels"]
    out_ch = tcfg.get("out_channels") or in_ch
    if out_ch not in (in_ch, 2 * in_ch):
        raise UserError(f"out_channels must be in_channels or twice it, got {out_ch} for {in_ch} inputs")
    heads = tcfg["num_attention_heads"]
    return DiTConfig(
        input_size=tcfg["sample_size"], patch_size=tcfg["patch_size"], in_channels=in_ch,
        hidden_size=heads * tcfg["attention_head_dim"], depth=tcfg["num_layers"], num_heads=heads,
        num_classes=tcfg["num_embeds_ada_norm"], learn_sigma=out_ch == 2 * in_ch,
    )


def from_diffusers(transformer) -> DiT:
    """A dits ``DiT`` with exactly the weights of a diffusers ``DiTTransformer2DModel``.

    ``transformer`` may also be a path (a transformer directory or a pipeline directory with
    a ``transformer/`` folder). Same device and dtype as the transformer.
    """
    if isinstance(transformer, (str, os.PathLike)):
        transformer = _load_transformer(transformer)
    cfg = _dits_config(dict(transformer.config))
    sd = {k: v.detach() for k, v in transformer.state_dict().items()}
    first = sd["transformer_blocks.0.norm1.emb.timestep_embedder.linear_1.weight"]
    device, dtype = first.device, first.dtype

    # The per-block embedder copies must agree: a dits model has one of each.
    shared = [k[len("transformer_blocks.0."):] for k in sd if k.startswith("transformer_blocks.0.norm1.emb.")]
    for i in range(1, cfg.depth):
        for name in shared:
            if not torch.equal(sd[f"transformer_blocks.{i}.{name}"], sd[f"transformer_blocks.0.{name}"]):
                raise UserError(f"block {i} has its own {name.split('.')[2]} weights, different from block 0's; "
                                "dits shares one timestep/label embedder across blocks, so it cannot be converted")

    table = sd["transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"]
    null_is_pad = bool((table[-1] == 0).all())
    if cfg.num_classes == 0 and not null_is_pad:
        raise UserError("this unconditional transformer has a non-zero null label row, which dits cannot represent")
    if null_is_pad and cfg.num_classes > 0:
        table = table[:-1]  # the zero row to_diffusers appended: no null class
        cfg.class_dropout_prob = 0.0
    model = DiT(cfg)
    ours = {
        "x_embedder.proj.weight": sd["pos_embed.proj.weight"],
        "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
        "final_layer.adaLN_modulation.1.weight": sd["proj_out_1.weight"],
        "final_layer.adaLN_modulation.1.bias": sd["proj_out_1.bias"],
        "final_layer.linear.weight": sd["proj_out_2.weight"],
        "final_layer.linear.bias": sd["proj_out_2.bias"],
        "pos_embed": model.pos_embed.detach().to(dtype),
    }
    if cfg.num_classes > 0:
        ours["y_embedder.embedding_table.weight"] = table
    emb = "transformer_blocks.0.norm1.emb.timestep_embedder."
    for w in ("weight", "bias"):
        ours[f"t_embedder.mlp.0.{w}"] = sd[f"{emb}linear_1.{w}"]
        ours[f"t_embedder.mlp.2.{w}"] = sd[f"{emb}linear_2.{w}"]
        for i in range(cfg.depth):
            theirs = f"transformer_blocks.{i}."
            ours[f"blocks.{i}.adaLN_modulation.1.{w}"] = sd[f"{theirs}norm1.linear.{w}"]
            ours[f"blocks.{i}.attn.qkv.{w}"] = torch.cat(
                [sd[f"{theirs}attn1.to_{x}.{w}"] for x in "qkv"], dim=0)
            ours[f"blocks.{i}.attn.proj.{w}"] = sd[f"{theirs}attn1.to_out.0.{w}"]
            ours[f"blocks.{i}.mlp.fc1.{w}"] = sd[f"{theirs}ff.net.0.proj.{w}"]
            ours[f"blocks.{i}.mlp.fc2.{w}"] = sd[f"{theirs}ff.net.2.{w}"]
    _check_pos_embed(transformer, model.pos_embed.detach())
    model.load_state_dict({k: v.cpu() for k, v in ours.items()}, strict=True)
    return model.to(device=device, dtype=dtype).eval()


# ----------------------------------------------------------------------------------------
# loading diffusers models exactly
# ----------------------------------------------------------------------------------------
def make_exact(transformer):
    """Patch a diffusers DiT in place so that it computes the reference function.

    Sets every timestep projection's ``downscale_freq_shift`` to 0 (frequencies
    10000^(-k/128), as the reference) and every LayerNorm eps to 1e-6 (a config without
    ``norm_eps`` gets diffusers' default 1e-5 for the MLP norm). The patch lives on the
    module, not in its config: a transformer saved again and reloaded needs it again.
    """
    diffusers = _diffusers()
    from diffusers.models.embeddings import Timesteps

    n = 0
    for module in transformer.modules():
        if isinstance(module, Timesteps):
            module.downscale_freq_shift = 0
            n += 1
        elif isinstance(module, torch.nn.LayerNorm):
            module.eps = NORM_EPS
    if n == 0:
        raise UserError(f"found no timestep projection to patch in {type(transformer).__name__} "
                        f"(diffusers {diffusers.__version__}); is this a DiT transformer?")
    transformer._dits_exact = True
    return transformer


def _transformer_dir(path: str | os.PathLike) -> tuple[str, str | None]:
    """(directory, subfolder) of a transformer given itself or a pipeline directory."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise UserError(f"{p} is not a directory; pass a diffusers DiT pipeline or transformer directory")
    if (p / "config.json").is_file():
        return str(p), None
    if (p / "transformer" / "config.json").is_file():
        return str(p), "transformer"
    raise UserError(f"{p} has neither config.json nor transformer/config.json; "
                    "pass a diffusers DiT pipeline or transformer directory")


def _load_transformer(path, **kwargs):
    diffusers = _diffusers()
    directory, sub = _transformer_dir(path)
    try:
        from dits.vae import pretrained_kwargs

        kwargs = {**pretrained_kwargs(), **kwargs}
        return diffusers.DiTTransformer2DModel.from_pretrained(directory, subfolder=sub, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load a DiTTransformer2DModel from {directory}: {first}") from e


def load_exact_diffusers(path_or_transformer, **from_pretrained_kwargs):
    """A diffusers ``DiTTransformer2DModel`` patched by :func:`make_exact`.

    Accepts a transformer object, a transformer directory or a pipeline directory; keyword
    arguments (``torch_dtype`` ...) go to ``from_pretrained``.
    """
    t = path_or_transformer
    if isinstance(t, (str, os.PathLike)):
        t = _load_transformer(t, **from_pretrained_kwargs)
    return make_exact(t)


def load_exact_pipeline(path: str | os.PathLike, **from_pretrained_kwargs):
    """``DiTPipeline.from_pretrained(path, ...)`` with its transformer patched by :func:`make_exact`.

    Pass ``vae=AutoencoderKL.from_pretrained(...)`` when the directory has no ``vae/``.
    """
    diffusers = _diffusers()
    from dits.vae import pretrained_kwargs

    pipe = diffusers.DiTPipeline.from_pretrained(str(path), **{**pretrained_kwargs(), **from_pretrained_kwargs})
    make_exact(pipe.transformer)
    return pipe


# ----------------------------------------------------------------------------------------
# writing a DiTPipeline directory
# ----------------------------------------------------------------------------------------
SCHEDULERS = ("ddim", "ddpm", "dpm")


def make_scheduler(name: str = "ddim"):
    """A diffusers scheduler with DiT's training schedule (SPEC §3).

    ``DiTPipeline`` drops the variance channels before calling the scheduler, so the
    learned variance (``variance_type="learned_range"``) cannot be used there: "ddpm" uses
    the fixed small variance, "ddim" (default, deterministic, the scheduler DiTPipeline's
    documentation names) and "dpm" (DPM-Solver++, few steps) need none. Latents are never
    clipped.
    """
    diffusers = _diffusers()
    if name == "ddim":
        return diffusers.DDIMScheduler(**SCHEDULE, clip_sample=False)
    if name == "ddpm":
        return diffusers.DDPMScheduler(**SCHEDULE, clip_sample=False, variance_type="fixed_small")
    if name == "dpm":
        return diffusers.DPMSolverMultistepScheduler(**SCHEDULE)
    raise UserError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")


def _replace_dir(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move a finished temporary directory to ``out`` (never leaves a half-written ``out``)."""
    if out.exists():
        if not overwrite:
            raise UserError(f"{out} already exists; choose another output directory, "
                            "or replace it with --overwrite (overwrite=True)")
        old = out.with_name(out.name + ".old-" + tmp.name[-8:])
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def save_diffusers(model: DiT, out_dir: str | os.PathLike, *, vae=None, scheduler: str = "ddim",
                   class_names: list[str] | None = None, overwrite: bool = False,
                   dtype: torch.dtype | None = None, metadata: dict | None = None, card: str | None = None,
                   files: dict | None = None, publish=None) -> Path:
    """Write a ``DiTPipeline`` directory: ``transformer/``, ``scheduler/``, ``model_index.json``
    and, if ``vae`` is given, ``vae/``.

    ``vae`` is a VAE spec (hub id or directory, as :func:`dits.vae.load_autoencoder`), a
    ``LatentAutoencoder`` or a diffusers ``AutoencoderKL``; without one the directory lists no
    VAE and you pass it at load time::

        pipe = DiTPipeline.from_pretrained(out_dir, vae=AutoencoderKL.from_pretrained(
            "stabilityai/sd-vae-ft-ema"))

    ``class_names`` (index -> name) become the pipeline's ``id2label``. ``dtype`` casts the
    saved weights (default: the model's). The directory is built next to ``out_dir`` and
    moved into place when complete. ``metadata`` (JSON-able) is written to ``dits.json``,
    ``card`` (text) to ``README.md`` (see :mod:`dits.interop.model_card`), and ``files``
    ({name in the export: source path}) are copied in. ``publish(directory)``, if given, is called
    on the complete directory before it is moved into place: when it raises (a failed upload),
    nothing is left at ``out_dir``.
    """
    diffusers = _diffusers()
    out = Path(out_dir).expanduser()
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; choose another output directory, "
                        "or replace it with --overwrite (overwrite=True)")
    transformer = torch.nn.Module.to(to_diffusers(model), device="cpu", dtype=dtype)
    sched = make_scheduler(scheduler)
    autoencoder = None
    if vae is not None:
        autoencoder = vae
        if isinstance(vae, (str, os.PathLike)):
            from dits.vae import load_autoencoder
            autoencoder = load_autoencoder(str(vae))
        autoencoder = getattr(autoencoder, "vae", autoencoder)  # unwrap a LatentAutoencoder
        if not isinstance(autoencoder, diffusers.AutoencoderKL):
            raise UserError("vae must be a diffusers AutoencoderKL (hub id or directory); "
                            "a pixel-space model cannot be saved as a DiTPipeline")
        if autoencoder.config.latent_channels != model.in_channels:
            raise UserError(f"the VAE has {autoencoder.config.latent_channels} latent channels but the model "
                            f"takes {model.in_channels}")
    if model.num_classes != 1000:
        warnings.warn(f"DiTPipeline uses label 1000 as the null class; with this {model.num_classes}-class "
                      "model call it with guidance_scale=1 (no guidance)", stacklevel=2)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    from dits.fileio import current_umask
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private (0700); honour the umask instead
    try:
        transformer.save_pretrained(tmp / "transformer")
        sched.save_pretrained(tmp / "scheduler")
        index = {
            "_class_name": "DiTPipeline",
            "_diffusers_version": diffusers.__version__,
            "transformer": ["diffusers", "DiTTransformer2DModel"],
            "scheduler": ["diffusers", type(sched).__name__],
            "vae": ["diffusers", "AutoencoderKL"] if autoencoder is not None else [None, None],
        }
        if autoencoder is not None:
            autoencoder.save_pretrained(tmp / "vae")
        if class_names:
            index["id2label"] = {str(i): str(name) for i, name in enumerate(class_names)}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        if metadata is not None:
            (tmp / METADATA).write_text(json.dumps(metadata, indent=2) + "\n")
        from dits.fileio import atomic_write, write_text_atomic
        if card is not None:
            write_text_atomic(tmp / "README.md", card)
        for name, src in (files or {}).items():
            atomic_write(tmp / name, lambda t, src=src: shutil.copyfile(src, t))
        if publish is not None:
            publish(tmp)
        _replace_dir(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
