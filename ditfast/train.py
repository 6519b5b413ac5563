"""Training DiT: ``ditfast train ...`` or ``torchrun --nproc_per_node=N -m ditfast.train ...``.

The official recipe (AdamW lr 1e-4, no weight decay, EMA, class dropout 0.1, random horizontal flip
where the data allows, eps-MSE + VB loss of the Gaussian diffusion) with what makes it fast: bf16
autocast over fp32 master weights, ditfast's fused kernels with their backward (``--backend``),
optional gradient checkpointing, and pre-extracted latents.

Reproducibility: every random draw of a step (diffusion timesteps, noise, label dropout, flips)
comes from a generator seeded by (seed, step) for the whole global batch, and the data order from
one seeded permutation per epoch; each rank takes its contiguous slice. So a run resumed from a
checkpoint continues exactly as an uninterrupted one, and N ranks train the same model as one
process with the same global batch. Checkpoints ``{model, ema, opt, args, step, rng}`` are written
atomically (temporary file, then rename).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .checkpoint import check_state_dict
from .data import Samples, digits_samples, image_folder_samples, latent_shard_samples
from .diffusion import create_diffusion
from .flops import describe, gflops
from .models import BACKENDS, BLOCKS, DiT, SIZES
from .seeding import generator

__all__ = ["TrainConfig", "train", "build_model", "open_data", "main"]


@dataclass
class TrainConfig:
    data: str = "digits"  # "digits" (bundled), an image folder, or a latent shard folder
    vae: str | None = None  # local diffusers AutoencoderKL folder: encode images online
    image_size: int = 16  # pixels (digits are upsampled from 8x8)
    model: str = "DiT-S/2"  # registry name; the fields below override its sizes
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
    ckpt_every: int = 0  # 0: only at the end
    log_every: int = 50
    resume: str | None = None  # a checkpoint path, or "auto" for the newest in out/checkpoints
    export: str | None = None  # write the final EMA weights (+ config) to this .safetensors file
    progress: bool = True

    # fields that must agree between a checkpoint and the run resuming it
    RESUME_KEYS = ("data", "vae", "image_size", "model", "hidden_size", "depth", "num_heads", "patch_size",
                   "mlp_ratio", "block", "learn_sigma", "class_dropout_prob", "global_batch", "seed")  # fmt: skip


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


def model_config(cfg: TrainConfig, data: Samples) -> dict:
    """DiT constructor arguments for this run."""
    size = cfg.model.removeprefix("DiT-").split("/")
    if len(size) != 2 or size[0] not in SIZES:
        raise ValueError(f"unknown model {cfg.model!r}; expected a registry name such as 'DiT-S/2'")
    depth, hidden, heads = SIZES[size[0]]
    channels, height, _ = data.shape
    latent_side = height // 8 if cfg.vae else height
    return dict(
        input_size=latent_side,
        patch_size=cfg.patch_size or int(size[1]),
        in_channels=4 if cfg.vae else channels,
        hidden_size=cfg.hidden_size or hidden,
        depth=cfg.depth if cfg.depth is not None else depth,
        num_heads=cfg.num_heads or heads,
        mlp_ratio=cfg.mlp_ratio,
        block=cfg.block,
        class_dropout_prob=cfg.class_dropout_prob,
        num_classes=data.num_classes,
        learn_sigma=cfg.learn_sigma,
    )


def build_model(cfg: TrainConfig, data: Samples, device: torch.device) -> DiT:
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and on resume
    model = DiT(**model_config(cfg, data), backend=cfg.backend).to(device)
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
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def export_safetensors(model: DiT, config: dict, path: str) -> None:
    """EMA weights as safetensors with the DiT config in the metadata (atomic)."""
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata={"ditfast_config": json.dumps(config)})
    os.replace(tmp, path)


def _latest_checkpoint(out: str) -> str | None:
    folder = os.path.join(out, "checkpoints")
    names = sorted(n for n in os.listdir(folder) if n.endswith(".pt")) if os.path.isdir(folder) else []
    return os.path.join(folder, names[-1]) if names else None


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
    if cfg.global_batch % world:
        raise ValueError(f"global batch {cfg.global_batch} must be divisible by the number of ranks {world}")
    if cfg.steps < 1:
        raise ValueError(f"steps must be >= 1, got {cfg.steps}")
    local_batch = cfg.global_batch // world
    precision = _precision(cfg, device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision in ("tf32", "bf16")

    data = open_data(cfg)
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

    resume = _latest_checkpoint(cfg.out) if cfg.resume == "auto" else cfg.resume
    if resume:
        if not os.path.isfile(resume):
            raise ValueError(f"resume checkpoint not found: {resume}")
        ckpt = torch.load(resume, map_location="cpu", weights_only=True)
        # a field an older checkpoint lacks was at its default then (e.g. block: adaLN-Zero)
        theirs = {**dataclasses.asdict(TrainConfig()), **ckpt.get("args", {})}
        conflicts = [f"{k}: checkpoint {theirs.get(k)!r} vs now {getattr(cfg, k)!r}" for k in TrainConfig.RESUME_KEYS if theirs.get(k) != getattr(cfg, k)]
        if conflicts:
            raise ValueError(f"cannot resume from {resume}: it was trained with another config ({'; '.join(conflicts)})")
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
    order = _Order(data.size, cfg.seed)
    flops_per_image = 3 * 2 * gflops(model) * 1e9  # fwd+bwd = 3x forward; 2 flops per multiply-accumulate
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    flip_on = cfg.flip and data.flip_ok
    lo, hi = rank * local_batch, (rank + 1) * local_batch
    if rank == 0:
        print(
            f"training {describe(model)} ({sum(p.numel() for p in model.parameters() if p.requires_grad):,} params, "
            f"{gflops(model):.3f} Gflops/img) on {data.name} ({data.size} samples, {data.num_classes} classes), "
            f"{world} rank(s), global batch {cfg.global_batch}, {precision}, adaLN backend {model.backend}, "
            f"steps {start}->{cfg.steps}"
        )
    bar = None
    if cfg.progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    window_loss, window_steps, window_t0, last_loss = 0.0, 0, time.perf_counter(), float("nan")
    log_path = os.path.join(cfg.out, "log.jsonl")
    if rank == 0:
        os.makedirs(cfg.out, exist_ok=True)

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
        t = torch.randint(0, diffusion.num_timesteps, (cfg.global_batch,), generator=g)[lo:hi].to(device)
        noise = torch.randn((cfg.global_batch, *x.shape[1:]), generator=g)[lo:hi].to(device)
        drop = (torch.rand(cfg.global_batch, generator=g)[lo:hi] < cfg.class_dropout_prob).long().to(device)

        with autocast:
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
                    bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{stats['images_per_s']:.0f}", tflops=f"{stats['tflops']:.2f}")
                else:
                    print(json.dumps(stats))
            window_loss, window_steps, window_t0 = 0.0, 0, time.perf_counter()
        if bar is not None:
            bar.update(1)
        if rank == 0 and ((cfg.ckpt_every and done % cfg.ckpt_every == 0) or done == cfg.steps):
            ckpt = {
                "model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                "args": {k: v for k, v in dataclasses.asdict(cfg).items()}, "step": done,
                "rng": {"torch": torch.get_rng_state()},
            }  # fmt: skip
            _atomic_save(ckpt, os.path.join(cfg.out, "checkpoints", f"{done:07d}.pt"))
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        default = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        else:
            kind = {"int": int, "float": float}.get(f.type.split(" ")[0], str)
            choices = {"block": list(BLOCKS), "backend": list(BACKENDS)}.get(f.name)
            parser.add_argument(flag, type=kind, default=default, choices=choices, help=f"default: {default}")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ditfast train", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    try:
        result = train(config_from_args(parser.parse_args(argv)))
    except ValueError as exc:
        print(f"ditfast train: error: {exc}", file=sys.stderr)
        return 2
    return 0 if math.isfinite(result["loss"]) else 1


if __name__ == "__main__":
    sys.exit(main())
