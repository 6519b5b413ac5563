"""Training DiT: ``ditfast train ...`` or ``torchrun --nproc_per_node=N -m ditfast.train ...``; a DiffiT
(any size, depth, width, patch) with ``--model DiffiT-S/2`` etc.; the image-space DiffiT
(``--model DiffiT-Digits16``, ``DiffiT-CIFAR`` ..., :mod:`ditfast.diffit_unet`) on pixels with EDM's
loss (log-normal sigma, its weighting; :mod:`ditfast.edm`) instead of the Gaussian diffusion's.

The official recipe (AdamW lr 1e-4, no weight decay, EMA, class dropout 0.1, random horizontal flip
where the data allows, eps-MSE + VB loss of the Gaussian diffusion) with what makes it fast: bf16
autocast over fp32 master weights, ditfast's fused kernels with their backward (``--backend``),
optional gradient checkpointing, and pre-extracted latents.

Reproducibility: every random draw of a step (diffusion timesteps, noise, label dropout, flips)
comes from a generator seeded by (seed, step) for the whole global batch, and the data order from
one seeded permutation per epoch; each rank takes its contiguous slice. So a run resumed from a
checkpoint continues exactly as an uninterrupted one, and N ranks train the same model as one
process with the same global batch. Checkpoints ``{model, ema, opt, args, step, rng}`` are written
atomically (temporary file, then rename) every ``ckpt_every`` steps, every ``ckpt_minutes`` minutes
and at the end.

The run folder (``out``): ``checkpoints/NNNNNNN.pt``, ``log.jsonl`` (one line per logging window)
and ``train_config.json`` (the configuration of the latest start). A fresh start into a folder that
holds checkpoints is refused unless ``overwrite`` (which deletes them and the log); a resume is
refused when the checkpoint was trained with another model or data (``RESUME_KEYS``) or, unless
``allow_recipe_change``, another optimisation recipe (``RECIPE_KEYS``). ``steps`` may grow on a
resume (the learning rate is constant, so it only says where the run stops). On a resume
``log.jsonl`` is cut back to the checkpoint's step, so redone windows are not logged twice.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .checkpoint import check_state_dict
from .cli import ArgumentParser, command, float_in, folder_arg, int_at_least
from .data import Samples, digits_samples, image_folder_samples, latent_shard_samples
from .diffusion import create_diffusion
from .errors import check_float, check_int
from .files import atomic_write, check_output_file, check_output_folder, remove_orphans
from .flops import DiTShape, describe, fmt_sig, gflops
from .diffit import DiffiT
from .diffit_unet import UNET_CONFIGS, DiffiTUNet, DiffiTUNet_models
from .edm import EDMPrecond, edm_loss, sample_sigma
from .models import BACKENDS, BLOCKS, DiT, SIZES
from .seeding import generator

__all__ = ["TrainConfig", "train", "build_model", "open_data", "main"]


@dataclass
class TrainConfig:
    data: str = "digits"  # "digits" (bundled), an image folder, or a latent shard folder
    vae: str | None = None  # local diffusers AutoencoderKL folder: encode images online
    image_size: int = 16  # pixels (digits are upsampled from 8x8)
    model: str = "DiT-S/2"  # registry name, DiT-... or DiffiT-... (the architecture); the fields below override its sizes
    hidden_size: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    patch_size: int | None = None
    mlp_ratio: float = 4.0
    block: str = "adaLN-Zero"  # the DiT paper's block design: adaLN-Zero | adaLN | cross-attention | in-context
    learn_sigma: bool = True
    class_dropout_prob: float = 0.1
    steps: int = 1000
    global_batch: int = 256
    lr: float = 1e-4
    weight_decay: float = 0.0
    ema_decay: float = 0.9999
    seed: int = 0
    precision: str = "auto"  # auto | fp32 | tf32 | bf16 (auto: bf16 on CUDA, fp32 on CPU)
    backend: str = "auto"  # ops other than attention: auto | eager | fused (triton: its old name)
    grad_checkpointing: bool = False
    flip: bool = True  # random horizontal flip, where the data allows it
    out: str = "runs/dit"
    ckpt_every: int = 500  # also at the end; 0: only at the end (and every ckpt_minutes)
    ckpt_minutes: float = 10.0  # also when this many minutes passed since the last checkpoint; 0: off
    keep_last: int = 3  # keep only the newest N checkpoints of this run (0: keep all)
    log_every: int = 50
    resume: str | None = None  # a checkpoint path, or "auto" for the newest in out/checkpoints
    export: str | None = None  # write the final EMA weights (+ config) to this .safetensors file
    progress: bool = True
    overwrite: bool = False  # start afresh in a folder with checkpoints (deletes them); replace an existing export
    allow_recipe_change: bool = False  # resume with another lr, weight decay, EMA decay or flip

    # fields that must agree between a checkpoint and the run resuming it
    RESUME_KEYS = ("data", "vae", "image_size", "model", "hidden_size", "depth", "num_heads", "patch_size",
                   "mlp_ratio", "block", "learn_sigma", "class_dropout_prob", "global_batch", "seed")  # fmt: skip
    # the optimisation recipe: a resume with other values is refused unless allow_recipe_change
    RECIPE_KEYS = ("lr", "weight_decay", "ema_decay", "flip")
    # the range of each numeric field: (lo, hi, lo_open, hi_open); None: unbounded
    LIMITS = {
        "image_size": (1, None, False, True), "hidden_size": (1, None, False, True), "depth": (1, None, False, True),
        "num_heads": (1, None, False, True), "patch_size": (1, None, False, True), "mlp_ratio": (0, None, True, True),
        "class_dropout_prob": (0, 1, False, False), "steps": (1, None, False, True), "global_batch": (1, None, False, True),
        "lr": (0, None, True, True), "weight_decay": (0, None, False, True), "ema_decay": (0, 1, False, True),
        "ckpt_every": (0, None, False, True), "ckpt_minutes": (0, None, False, True), "log_every": (1, None, False, True),
        "keep_last": (0, None, False, True),
    }  # fmt: skip


# ------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------


def open_data(cfg: TrainConfig) -> Samples:
    """The training samples named by ``cfg.data`` (validated now, before training)."""
    if cfg.data == "digits":
        return digits_samples(cfg.image_size)
    if os.path.isfile(os.path.join(cfg.data, "meta.json")):
        return latent_shard_samples(cfg.data)
    return image_folder_samples(cfg.data, cfg.image_size)


def _is_diffit(cfg: TrainConfig) -> bool:
    """Whether the run trains a DiffiT (``--model DiffiT-S/2`` ...) rather than a DiT."""
    return cfg.model.startswith("DiffiT-") and not _is_edm(cfg)


def _is_edm(cfg: TrainConfig) -> bool:
    """Whether the run trains an image-space DiffiT (``--model DiffiT-Digits16`` ...) with the EDM loss."""
    return cfg.model in DiffiTUNet_models


def _unet_config(cfg: TrainConfig, data: Samples) -> dict:
    """DiffiTUNet constructor arguments: the registry layout (``hidden_size``/``num_heads``/
    ``mlp_ratio`` override its channels, heads and MLP width) at the data's size, channels and classes."""
    if cfg.vae or data.latent:
        raise ValueError(f"{cfg.model} is an image-space DiffiT: it trains on pixels (digits or an image folder), "
                         "not VAE latents: leave out --vae and latent shards")  # fmt: skip
    unused = [f"--{k.replace('_', '-')}" for k in ("depth", "patch_size") if getattr(cfg, k) is not None]
    unused += ["--block"] if cfg.block != "adaLN-Zero" else []
    if unused:
        raise ValueError(f"{' and '.join(unused)} do not apply to the image-space DiffiT {cfg.model}: leave them out")
    channels, height, _ = data.shape
    config = {**UNET_CONFIGS[cfg.model], "input_size": height, "in_channels": channels, "num_classes": data.num_classes,
              "class_dropout_prob": cfg.class_dropout_prob, "mlp_ratio": cfg.mlp_ratio}  # fmt: skip
    config["depths"] = list(config["depths"])
    if cfg.hidden_size is not None:
        config["channels"] = cfg.hidden_size
    if cfg.num_heads is not None:
        config["num_heads"] = cfg.num_heads
    return config


def model_config(cfg: TrainConfig, data: Samples) -> dict:
    """DiT (or DiffiT, or DiffiTUNet) constructor arguments for this run."""
    if _is_edm(cfg):
        return _unet_config(cfg, data)
    size = cfg.model.removeprefix("DiffiT-" if _is_diffit(cfg) else "DiT-").split("/")
    if len(size) != 2 or size[0] not in SIZES or not size[1].isdigit():
        raise ValueError(f"unknown model {cfg.model!r}; expected a registry name such as 'DiT-S/2' or 'DiffiT-S/2'")
    if _is_diffit(cfg) and cfg.block != "adaLN-Zero":
        raise ValueError(f"block {cfg.block!r} is a DiT block design; a DiffiT ({cfg.model}) has its TMSA blocks: leave --block out")
    depth, hidden, heads = SIZES[size[0]]
    channels, height, _ = data.shape
    latent_side = height // 8 if cfg.vae else height
    return dict(
        input_size=latent_side,
        # "is not None", not "or": an explicit 0 must reach the checks, not fall back to the registry size
        patch_size=cfg.patch_size if cfg.patch_size is not None else int(size[1]),
        in_channels=4 if cfg.vae else channels,
        hidden_size=cfg.hidden_size if cfg.hidden_size is not None else hidden,
        depth=cfg.depth if cfg.depth is not None else depth,
        num_heads=cfg.num_heads if cfg.num_heads is not None else heads,
        mlp_ratio=cfg.mlp_ratio,
        **({} if _is_diffit(cfg) else {"block": cfg.block}),
        class_dropout_prob=cfg.class_dropout_prob,
        num_classes=data.num_classes,
        learn_sigma=cfg.learn_sigma,
    )


def build_model(cfg: TrainConfig, data: Samples, device: torch.device) -> DiT | DiffiT:
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and on resume
    cls = DiffiTUNet if _is_edm(cfg) else DiffiT if _is_diffit(cfg) else DiT
    model = cls(**model_config(cfg, data), backend=cfg.backend).to(device)
    model.grad_checkpointing = cfg.grad_checkpointing
    return model


def _precision(cfg: TrainConfig, device: torch.device) -> str:
    if cfg.precision not in ("auto", "fp32", "tf32", "bf16"):
        raise ValueError(f"precision must be auto, fp32, tf32 or bf16, got {cfg.precision!r}")
    if cfg.precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return cfg.precision


def _check_labels(y: torch.Tensor, data: Samples, idx: torch.Tensor) -> None:
    """Raise ValueError unless the batch's labels (a CPU tensor, so no device sync) lie in
    [0, num_classes)."""
    bad = (y < 0) | (y >= data.num_classes)
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{data.name}: sample {int(idx[i])} has label {int(y[i])}, expected one in [0, {data.num_classes - 1}]")


class _Order:
    """The sample order: one seeded permutation per epoch, concatenated."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._epoch, self._perm = n, seed, -1, None

    def take(self, start: int, count: int) -> torch.Tensor:
        out = []
        for pos in range(start, start + count):
            epoch = pos // self.n
            if epoch != self._epoch:
                self._epoch, self._perm = epoch, torch.randperm(self.n, generator=generator(self.seed, -1, epoch))
            out.append(self._perm[pos % self.n])
        return torch.stack(out)


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * model, over the trainable parameters."""
    ema_params = dict(ema.named_parameters())
    for name, p in model.named_parameters():
        if p.requires_grad:
            ema_params[name].lerp_(p.detach(), 1 - decay)


def _atomic_save(obj, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def export_safetensors(model: DiT, config: dict, path: str) -> None:
    """EMA weights as safetensors with the DiT config in the metadata (atomic)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"ditfast_config": json.dumps(config)}))


# ------------------------------------------------------------------------------------------
# The run folder
# ------------------------------------------------------------------------------------------

CKPT_NAME = r"\d{7}\.pt"  # checkpoints/NNNNNNN.pt: the only checkpoint names training writes, reads or deletes
RUN_CONFIG = "train_config.json"
LOG = "log.jsonl"


def _checkpoints(out: str) -> list[str]:
    """This run folder's checkpoints (ditfast's own names only), oldest first."""
    folder = os.path.join(out, "checkpoints")
    names = sorted(n for n in os.listdir(folder) if re.fullmatch(CKPT_NAME, n)) if os.path.isdir(folder) else []
    return [os.path.join(folder, n) for n in names]


def _latest_checkpoint(out: str) -> str | None:
    names = _checkpoints(out)
    return names[-1] if names else None


def check_config(cfg: TrainConfig) -> None:
    """Raise TypeError/ValueError (naming the field) or a file error for anything wrong that can
    be seen before any work: ranges, choices, the output folder and the export file."""
    for f in dataclasses.fields(TrainConfig):
        value = getattr(cfg, f.name)
        if f.name in TrainConfig.LIMITS and value is not None:
            lo, hi, lo_open, hi_open = TrainConfig.LIMITS[f.name]
            if _kind(f) is int:
                check_int(f.name, value, min=lo)
            else:
                check_float(f.name, value, lo, hi, lo_inclusive=not lo_open, hi_inclusive=not hi_open)
    if cfg.block not in BLOCKS:
        raise ValueError(f"block must be one of {list(BLOCKS)}, got {cfg.block!r}")
    if cfg.backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {cfg.backend!r}")
    check_output_folder(cfg.out, "out")
    if cfg.export:
        # the export's folder must exist, unless it is the run folder, which the run creates
        in_run = os.path.abspath(os.path.dirname(cfg.export) or ".") == os.path.abspath(cfg.out)
        check_output_file(cfg.export, cfg.overwrite, "export", folder_made=in_run)


def _check_data(cfg: TrainConfig, data: Samples) -> None:
    """Options that the data source would silently ignore or misuse are refused."""
    meta = os.path.join(cfg.data, "meta.json")
    if cfg.vae and (cfg.data == "digits" or os.path.isfile(meta)):
        what = "the bundled digits are 1-channel pixels" if cfg.data == "digits" else f"{cfg.data} holds extracted shards already"
        raise ValueError(f"vae encodes an image folder online, but {what}; leave out --vae")
    if os.path.isfile(meta):
        with open(meta) as f:
            extracted = json.load(f).get("image_size")
        if extracted is not None and extracted != cfg.image_size:
            raise ValueError(f"image_size: the shards in {cfg.data} were extracted at {extracted} px, not {cfg.image_size}; "
                             f"pass --image-size {extracted}")  # fmt: skip


def _cut_log(path: str, step: int) -> None:
    """Keep the lines of ``log.jsonl`` up to ``step``: the windows after it are about to be redone."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            if int(json.loads(line)["step"]) <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):
            pass  # a line cut short by a kill
    if keep == lines:
        return

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.writelines(keep)

    atomic_write(path, write)


def _prepare_run_folder(cfg: TrainConfig, start: int, resumed_from: str | None) -> None:
    """(first rank) Remove the temporary files of killed runs, cut the log back to ``start`` and
    record this start's configuration in ``train_config.json``."""
    os.makedirs(os.path.join(cfg.out, "checkpoints"), exist_ok=True)
    remove_orphans(os.path.join(cfg.out, "checkpoints"), legacy=CKPT_NAME)
    remove_orphans(cfg.out, legacy=rf"{re.escape(LOG)}|{re.escape(RUN_CONFIG)}")
    _cut_log(os.path.join(cfg.out, LOG), start)
    record = {"args": dataclasses.asdict(cfg), "start_step": start, "resumed_from": resumed_from}

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)

    atomic_write(os.path.join(cfg.out, RUN_CONFIG), write)


# ------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------


def train(cfg: TrainConfig) -> dict:
    """Run training; returns {"step", "loss" (mean of the last logging window), "model", "ema"}."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    check_config(cfg)
    if cfg.global_batch % world:
        raise ValueError(f"global batch {cfg.global_batch} must be divisible by the number of ranks {world}")
    resume = _latest_checkpoint(cfg.out) if cfg.resume == "auto" else cfg.resume
    if not resume and _checkpoints(cfg.out):
        if not cfg.overwrite:
            raise FileExistsError(f"{cfg.out} holds the checkpoints of a run (newest {os.path.basename(_latest_checkpoint(cfg.out))}); "
                                  "continue it with --resume auto, or pass --overwrite to start afresh (deletes them and its log)")  # fmt: skip
        if rank == 0:
            for path in _checkpoints(cfg.out):
                os.remove(path)
            if os.path.isfile(os.path.join(cfg.out, LOG)):
                os.remove(os.path.join(cfg.out, LOG))
    local_batch = cfg.global_batch // world
    precision = _precision(cfg, device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision in ("tf32", "bf16")

    data = open_data(cfg)
    _check_data(cfg, data)
    vae = None
    if cfg.vae:
        from .vae import encode, load_vae

        vae = load_vae(cfg.vae, device)
    model = build_model(cfg, data, device)
    # The labels are checked on the CPU, before each batch is copied over (_check_labels): the
    # model's own check would read min/max back from the device, a host sync on every step.
    model.check_label_range = False
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    diffusion = create_diffusion(timestep_respacing="")
    start = 0

    if resume:
        if not os.path.isfile(resume):
            raise ValueError(f"resume checkpoint not found: {resume}")
        ckpt = torch.load(resume, map_location="cpu", weights_only=True)
        # a field an older checkpoint lacks was at its default then (e.g. block: adaLN-Zero)
        theirs = {**dataclasses.asdict(TrainConfig()), **ckpt.get("args", {})}
        conflicts = [f"{k}: checkpoint {theirs.get(k)!r} vs now {getattr(cfg, k)!r}" for k in TrainConfig.RESUME_KEYS if theirs.get(k) != getattr(cfg, k)]
        if conflicts:
            raise ValueError(f"cannot resume from {resume}: it was trained with another config ({'; '.join(conflicts)})")
        changed = [f"{k}: checkpoint {theirs.get(k)!r} vs now {getattr(cfg, k)!r}" for k in TrainConfig.RECIPE_KEYS if theirs.get(k) != getattr(cfg, k)]
        if changed and not cfg.allow_recipe_change:
            raise ValueError(f"cannot resume from {resume} with another recipe ({'; '.join(changed)}); "
                             "pass --allow-recipe-change to continue with the new values")  # fmt: skip
        if int(ckpt["step"]) >= cfg.steps:
            raise ValueError(f"{resume} is at step {int(ckpt['step'])} and steps is {cfg.steps}: nothing to train (raise --steps to go on)")
        if changed and rank == 0:
            print(f"resuming with a changed recipe: {'; '.join(changed)}")
        check_state_dict(model, ckpt["model"])
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        start = int(ckpt["step"])
        torch.set_rng_state(ckpt["rng"]["torch"])
    elif cfg.resume == "auto" and rank == 0:
        print(f"no checkpoint in {cfg.out}/checkpoints: starting from scratch")
    if start == 0:
        update_ema(ema, model, decay=0.0)

    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) if distributed else model
    precond = EDMPrecond(net) if _is_edm(cfg) else None  # the image-space DiffiT trains as EDM's D(x; sigma)
    order = _Order(data.size, cfg.seed)
    flops_per_image = 3 * 2 * gflops(model) * 1e9  # fwd+bwd = 3x forward; 2 flops per multiply-accumulate
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    flip_on = cfg.flip and data.flip_ok
    lo, hi = rank * local_batch, (rank + 1) * local_batch
    if rank == 0:
        print(
            f"training {describe(model)} ({sum(p.numel() for p in model.parameters() if p.requires_grad):,} params, "
            f"{fmt_sig(gflops(model))} Gflops/img) on {data.name} ({data.size} samples, {data.num_classes} classes), "
            f"{world} rank(s), global batch {cfg.global_batch}, {precision}, adaLN backend {model.backend}, "
            f"steps {start}->{cfg.steps}"
        )
    bar = None
    if cfg.progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    window_loss, window_steps, window_t0, last_loss = 0.0, 0, time.perf_counter(), float("nan")
    log_path = os.path.join(cfg.out, LOG)
    if rank == 0:
        _prepare_run_folder(cfg, start, resume)
    last_save = time.monotonic()

    model.train()
    for step in range(start, cfg.steps):
        g = generator(cfg.seed, step)
        idx = order.take(step * cfg.global_batch, cfg.global_batch)[lo:hi]
        flips = torch.rand(cfg.global_batch, generator=g)[lo:hi] < 0.5
        x, y = data.get(idx, flips if flip_on else None)
        _check_labels(y, data, idx)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if vae is not None:
            x = encode(vae, x, generator=None)
        if precond is not None:  # EDM: ln sigma ~ N(P_mean, P_std^2)
            sigma = sample_sigma(torch.randn(cfg.global_batch, generator=g))[lo:hi].to(device)
        else:
            t = torch.randint(0, diffusion.num_timesteps, (cfg.global_batch,), generator=g)[lo:hi].to(device)
        noise = torch.randn((cfg.global_batch, *x.shape[1:]), generator=g)[lo:hi].to(device)
        drop = (torch.rand(cfg.global_batch, generator=g)[lo:hi] < cfg.class_dropout_prob).long().to(device)

        with autocast:
            if precond is not None:  # the EDM loss of the preconditioned denoiser
                loss = edm_loss(precond, x, sigma, noise, y if model.num_classes else None, drop if model.num_classes else None).mean()
            else:
                terms = diffusion.training_losses(net, x, t, model_kwargs=dict(y=y, force_drop_ids=drop), noise=noise)
                loss = terms["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        update_ema(ema, model, cfg.ema_decay)

        window_loss += loss.detach()
        window_steps += 1
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            mean_loss = window_loss / window_steps
            if distributed:
                dist.all_reduce(mean_loss)
                mean_loss /= world
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - window_t0
            last_loss = float(mean_loss)
            stats = dict(
                step=done, loss=last_loss, steps_per_s=window_steps / elapsed,
                images_per_s=window_steps * cfg.global_batch / elapsed,
                tflops=window_steps * cfg.global_batch * flops_per_image / elapsed / 1e12,
            )  # fmt: skip
            if rank == 0:
                with open(log_path, "a") as f:
                    f.write(json.dumps(stats) + "\n")
                if bar is not None:
                    bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{stats['images_per_s']:.0f}", tflops=fmt_sig(stats["tflops"]))
                else:
                    print(json.dumps(stats))
            window_loss, window_steps, window_t0 = 0.0, 0, time.perf_counter()
        if bar is not None:
            bar.update(1)
        due = (cfg.ckpt_every and done % cfg.ckpt_every == 0) or (cfg.ckpt_minutes and time.monotonic() - last_save >= 60 * cfg.ckpt_minutes)
        if rank == 0 and (due or done == cfg.steps):
            ckpt = {
                "model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                "args": {k: v for k, v in dataclasses.asdict(cfg).items()}, "step": done,
                "rng": {"torch": torch.get_rng_state()},
            }  # fmt: skip
            _atomic_save(ckpt, os.path.join(cfg.out, "checkpoints", f"{done:07d}.pt"))
            last_save = time.monotonic()
            if cfg.keep_last:  # only this run's own names (CKPT_NAME), oldest first
                for path in _checkpoints(cfg.out)[: -cfg.keep_last]:
                    os.remove(path)
    if bar is not None:
        bar.close()
    if rank == 0 and cfg.export:
        export_safetensors(ema, model_config(cfg, data), cfg.export)
        print(f"EMA weights written to {cfg.export}")
    if distributed:
        dist.barrier()
    return {"step": cfg.steps, "loss": last_loss, "model": model, "ema": ema}


# ------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------


def _kind(f: dataclasses.Field) -> type:
    return {"int": int, "float": float}.get(f.type.split(" ")[0], str)


HELP = {
    "data": "'digits' (bundled), an image folder (one subfolder per class) or a latent shard folder",
    "image_size": "pixels (latent shards: the size they were extracted at)",
    "ckpt_every": "save a checkpoint every N steps (and at the end; 0: only at the end and by --ckpt-minutes)",
    "ckpt_minutes": "also save when this many minutes passed since the last checkpoint (0: off)",
    "keep_last": "keep only the newest N checkpoints, deleting older ones of this run after each save (0: keep all)",
    "resume": "a checkpoint path, or 'auto' for the newest in OUT/checkpoints",
    "overwrite": "start afresh in an --out that holds checkpoints (deletes them and log.jsonl); replace an existing --export",
    "allow_recipe_change": "resume with another lr, weight decay, EMA decay or flip than the checkpoint's",
    "precision": "auto: bf16 on CUDA, fp32 on CPU",
}


def _range_type(f: dataclasses.Field):
    if f.name not in TrainConfig.LIMITS:
        return _kind(f)
    lo, hi, lo_open, hi_open = TrainConfig.LIMITS[f.name]
    return int_at_least(lo) if _kind(f) is int else float_in(lo, hi, lo_open, hi_open)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        default = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        text = f"{HELP[f.name]}; " if f.name in HELP else ""
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=HELP.get(f.name))
        else:
            kind = folder_arg if f.name == "out" else _range_type(f)
            choices = {"block": list(BLOCKS), "backend": list(BACKENDS), "precision": ["auto", "fp32", "tf32", "bf16"]}.get(f.name)
            parser.add_argument(flag, type=kind, default=default, choices=choices, help=f"{text}default: {default}")


_SMALL = dict(hidden_size=128, depth=6, num_heads=2, patch_size=4, global_batch=32, steps=200)  # a first run on a CPU


def _cost(cfg: TrainConfig) -> tuple[float, float]:
    """(forward Gflops per image, Tflops of the whole run) of ``cfg`` on the bundled digits, by the
    DiT-paper count (1 multiply-accumulate = 1 flop; a training step = 3 forwards)."""
    depth, hidden, _ = SIZES[cfg.model.removeprefix("DiT-").split("/")[0]]
    shape = DiTShape(cfg.depth or depth, cfg.hidden_size or hidden, cfg.patch_size or int(cfg.model.split("/")[1]),
                     cfg.image_size, in_channels=1, out_channels=2 if cfg.learn_sigma else 1, mlp_ratio=cfg.mlp_ratio)  # fmt: skip
    per_image = shape.macs() / 1e9
    return per_image, 3 * per_image * cfg.global_batch * cfg.steps / 1e3


def _defaults_cost() -> str:
    """What the defaults cost (the help text), against a small first run."""
    d, small = TrainConfig(), TrainConfig(**_SMALL)
    (g, total), (g_small, total_small) = _cost(d), _cost(small)
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in _SMALL.items())
    return (f"Cost of the defaults ({d.model}, the bundled {d.image_size}x{d.image_size} digits, global batch "
            f"{d.global_batch}, {d.steps} steps): {fmt_sig(g)} Gflops per image forward, {fmt_sig(total)} Tflops for the "
            f"run (DiT-paper count: 1 multiply-accumulate = 1 flop, a step = 3 forwards). A first run on a CPU: "
            f"{flags} costs {fmt_sig(g_small)} Gflops per image, {fmt_sig(total_small)} Tflops. A checkpoint is saved "
            f"every {d.ckpt_every} steps, every {d.ckpt_minutes:g} minutes and at the end.")  # fmt: skip


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})


@command("ditfast train")
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="ditfast train", description=f"{__doc__.split(chr(10) * 2)[0]} {_defaults_cost()}")
    add_arguments(parser)
    result = train(config_from_args(parser.parse_args(argv)))
    return 0 if math.isfinite(result["loss"]) else 1


if __name__ == "__main__":
    sys.exit(main())
