"""Sampling runs: :func:`ditfast.sample` (in memory) and :func:`run` (sharded to a folder, single- or
multi-process), the layer between the command line (:mod:`ditfast.sample_cli`) and the engine
(:mod:`ditfast.engine`).

Reproducibility: sample i gets its own noise stream, a generator seeded by (seed, i) that draws its
initial noise and then, for stochastic samplers, all its per-step noise; random labels come from a
second stream (seed, i, 1). So images depend on neither the batch size nor the number of ranks.

Output of :func:`run` (``cfg.out``): ``samples.npz`` (ADM format: ``arr_0`` uint8 NHWC images,
``arr_1`` labels), ``grid.png``, ``images/000000.png`` ...; a model without VAE whose output is not
1 or 3 channels writes float32 latents (N, C, H, W) as ``arr_0`` instead, and no PNGs. Work is split
into shards of ``shard_size`` consecutive indices, written atomically to ``DIR/shards/`` when
finished; a restarted run skips finished shards; the first rank merges them in index order.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import json
import math
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from .checkpoint import load_model
from .data import pixels_to_uint8
from .engine import MODES as ENGINE_MODES, PRECISIONS, SamplingEngine, check_cfg_model
from .files import atomic_write, remove_orphans
from .flops import describe, fmt_sig, gflops
from .imageio import make_grid, save_png
from .interop.diffusers import is_diffusers_folder
from .checkpoint import MODEL_TYPES, MODELS
from .diffit import CFG_SCHEDULES, DiffiT, cfg_schedule_for
from .diffit_unet import DiffiTUNet, DiffiTUNet_models
from .edm import EDM_SAMPLERS, EDMEngine, EDMPlan, make_edm_plan
from .models import BACKENDS, DiT, DiT_models
from .samplers import SAMPLERS, MAX_STEPS, Plan, make_plan, min_steps
from .errors import check_bool, check_float, check_int, resolve_device
from .seeding import SEED_MAX, generator
from .diffusion.gaussian_diffusion import check_eta

__all__ = ["SampleConfig", "SamplingEngine", "Generated", "sample", "run", "index_noise", "index_labels"]

MODES = ("auto", *ENGINE_MODES)
OUTPUT = "samples.npz"
MANIFEST = "sample_config.json"


# ------------------------------------------------------------------------------------------
# Per-index randomness
# ------------------------------------------------------------------------------------------


def index_noise(seed: int, indices, shape: tuple[int, ...], steps: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Initial noise (n, *shape) and, when ``steps`` > 0, per-step noise (steps, n, *shape) for the
    given global sample indices: sample i draws ``randn(shape)`` then ``randn((steps, *shape))``
    from its own generator seeded by (seed, i). float32 on the CPU."""
    z, noise = [], []
    for i in indices:
        g = generator(seed, int(i))
        z.append(torch.randn(shape, generator=g))
        if steps:
            noise.append(torch.randn((steps, *shape), generator=g))
    return torch.stack(z), (torch.stack(noise, dim=1) if steps else None)


def index_labels(seed: int, indices, num_classes: int, labels=None) -> torch.Tensor:
    """(n,) int64 labels: ``labels[i % len(labels)]`` when labels are given, else a uniform draw
    from sample i's label generator (seed, i, 1)."""
    if labels:
        return torch.tensor([labels[int(i) % len(labels)] for i in indices], dtype=torch.int64)
    if num_classes == 0:  # an unconditional model: the labels are placeholders
        return torch.zeros(len(indices), dtype=torch.int64)
    return torch.cat([torch.randint(num_classes, (1,), generator=generator(seed, int(i), 1)) for i in indices])



# ------------------------------------------------------------------------------------------
# Configuration, checks, building
# ------------------------------------------------------------------------------------------


@dataclass
class SampleConfig:
    model: str | None = None  # registry name; default DiT-XL/2, or inferred from --ckpt
    ckpt: str | None = None  # checkpoint path (official, training or .safetensors); none: random weights
    input_size: int | None = None  # latent side of a random-weight model (default 32) or override
    num_classes: int | None = None  # default 1000 for random weights
    in_channels: int | None = None  # default 4 for random weights
    vae: str | None = None  # local diffusers AutoencoderKL folder; none: latents (or pixels) out
    labels: tuple[int, ...] | None = None  # sample i gets labels[i % len]; none: random labels
    num_samples: int | None = None  # default: len(labels), else 16
    sampler: str = "ddpm"
    steps: int = 250
    eta: float = 0.0
    cfg_scale: float = 4.0
    guide_all_channels: bool = False
    cfg_schedule: str = "auto"  # DiffiT's guidance: auto (power-cosine at latent side <= 32, else constant) | power-cosine | constant
    clip_denoised: bool = False
    s_churn: float = 0.0  # EDM sampler (edm-heun): stochasticity; 0 is the deterministic Heun sampler
    s_min: float = 0.0  # EDM: churn only where s_min <= sigma <= s_max
    s_max: float = float("inf")
    s_noise: float = 1.0  # EDM: scale of the churn noise
    seed: int = 0
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | tf32 | bf16 | fp16 | fp64 (reference)
    batch_size: int = 32
    mode: str = "auto"  # auto (graph on CUDA, eager on CPU) | eager | graph | compile
    backend: str = "auto"  # ops other than attention: auto | eager | fused (triton: its old name)
    out: str = "samples"
    shard_size: int = 256
    max_shards: int | None = None  # stop after this many shards per rank (a time-limited job; rerun to go on)
    png: bool = True  # per-image PNGs and the grid
    progress: bool = True
    device: str | None = None

    # fields that decide the samples: a restarted run must agree on them
    MANIFEST_KEYS = ("model", "ckpt", "input_size", "num_classes", "in_channels", "vae", "labels", "num_samples", "sampler",
                     "steps", "eta", "cfg_scale", "guide_all_channels", "cfg_schedule", "clip_denoised", "seed", "precision",
                     "shard_size", "png", "s_churn", "s_min", "s_max", "s_noise")  # fmt: skip


def _resolve(cfg: SampleConfig, device: torch.device) -> SampleConfig:
    """Fill the defaults that depend on other fields or on the device."""
    n = cfg.num_samples if cfg.num_samples is not None else (len(cfg.labels) if cfg.labels else 16)
    return dataclasses.replace(
        cfg,
        num_samples=n,
        labels=tuple(int(v) for v in cfg.labels) if cfg.labels else None,
        precision=cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32"),
        mode=cfg.mode if cfg.mode != "auto" else ("graph" if device.type == "cuda" else "eager"),
    )


def check_config(cfg: SampleConfig) -> None:
    """Raise ValueError for anything wrong that can be seen before loading or sampling anything."""
    if cfg.ckpt is not None and not (os.path.isfile(cfg.ckpt) or is_diffusers_folder(cfg.ckpt)):
        raise ValueError(f"checkpoint not found (neither a file nor a diffusers DiT folder): {cfg.ckpt}")
    if cfg.model is not None and cfg.model not in MODELS:
        raise ValueError(f"unknown model {cfg.model!r}; expected one of {sorted(MODELS)}")
    if cfg.cfg_schedule not in CFG_SCHEDULES:
        raise ValueError(f"cfg schedule must be one of {CFG_SCHEDULES}, got {cfg.cfg_schedule!r}")
    if cfg.cfg_schedule == "power-cosine" and cfg.model in DiT_models:
        raise ValueError(f"cfg schedule 'power-cosine' is DiffiT's; {cfg.model} guides with a constant scale")
    if cfg.vae is not None:
        if not os.path.isdir(cfg.vae) or not os.path.isfile(os.path.join(cfg.vae, "config.json")):
            raise ValueError(f"VAE folder not found or has no config.json: {cfg.vae} (expected a diffusers AutoencoderKL folder)")
        if importlib.util.find_spec("diffusers") is None:
            raise ValueError("decoding with a VAE needs diffusers: pip install diffusers")
    if cfg.sampler not in (*SAMPLERS, *EDM_SAMPLERS):
        raise ValueError(f"sampler must be one of {(*SAMPLERS, *EDM_SAMPLERS)}, got {cfg.sampler!r}")
    check_int("steps", cfg.steps)
    lo = 1 if cfg.sampler in EDM_SAMPLERS else min_steps(cfg.sampler)
    if not lo <= cfg.steps <= MAX_STEPS:
        raise ValueError(f"steps must lie in [{lo}, {MAX_STEPS}] for {cfg.sampler}, got {cfg.steps}")
    if cfg.sampler not in EDM_SAMPLERS and (cfg.s_churn, cfg.s_min, cfg.s_max, cfg.s_noise) != (0.0, 0.0, float("inf"), 1.0):
        raise ValueError(f"s_churn, s_min, s_max and s_noise are the EDM sampler's (edm-heun), got them with sampler {cfg.sampler}")
    if cfg.sampler in EDM_SAMPLERS:
        make_edm_plan(cfg.steps, s_churn=cfg.s_churn, s_min=cfg.s_min, s_max=cfg.s_max, s_noise=cfg.s_noise)  # their checks
    check_float("cfg_scale", cfg.cfg_scale)
    if not cfg.cfg_scale >= 1:
        raise ValueError(f"cfg scale must be >= 1 (1 = no guidance), got {cfg.cfg_scale}")
    check_eta(cfg.eta)  # in [0, 1]: past 1 the DDIM update is the root of a negative number (NaN samples)
    if cfg.eta and cfg.sampler != "ddim":
        raise ValueError(f"eta is only used by ddim, got eta={cfg.eta} with sampler {cfg.sampler}")
    # the generators take 63-bit seeds: a larger one would be folded onto another seed's samples
    check_int("seed", cfg.seed, min=0, max=SEED_MAX)
    for name in ("guide_all_channels", "clip_denoised", "png", "progress"):
        check_bool(name, getattr(cfg, name))
    for name in ("batch_size", "num_samples", "shard_size", "max_shards", "input_size", "num_classes", "in_channels"):
        value = getattr(cfg, name)
        if value is not None and check_int(name, value) < 1:
            raise ValueError(f"{name.replace('_', ' ')} must be positive, got {value}")
    if cfg.labels is not None and len(cfg.labels) == 0:
        raise ValueError("labels must name at least one class (or leave them out for random labels)")
    for i, label in enumerate(cfg.labels or ()):
        check_int(f"labels[{i}]", label)  # 1.7 is no class: refused, not truncated to 1
    if cfg.labels and min(cfg.labels) < 0:
        raise ValueError(f"labels must be >= 0, got {min(cfg.labels)}")
    if cfg.precision not in ("auto", *PRECISIONS):
        raise ValueError(f"precision must be one of auto, {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    if cfg.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {cfg.mode!r}")
    if cfg.backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {cfg.backend!r}")
    device = resolve_device(cfg.device) if cfg.device is not None else None  # DeviceError: malformed or absent
    if device is not None and device.type != "cuda" and cfg.mode == "graph":
        raise ValueError("mode 'graph' captures a CUDA graph: it needs a CUDA device")
    if cfg.mode == "graph" and cfg.device is None and not torch.cuda.is_available():
        raise ValueError("mode 'graph' captures a CUDA graph: it needs a CUDA device, and none is available")


def build_model(cfg: SampleConfig, device: torch.device) -> DiT:
    """The DiT of ``cfg`` on ``device`` in the compute dtype, eval mode: loaded from ``cfg.ckpt`` or,
    without one, the registry model with random weights seeded by ``cfg.seed`` (the same on every rank)."""
    dtype = PRECISIONS[cfg.precision]
    sizes = {k: getattr(cfg, k) for k in ("input_size", "num_classes", "in_channels") if getattr(cfg, k) is not None}
    if cfg.ckpt:
        model = load_model(cfg.ckpt, model=cfg.model, **sizes)
    else:
        torch.manual_seed(cfg.seed)
        with torch.device(device):
            defaults = {} if cfg.model in DiffiTUNet_models else {"input_size": 32, "num_classes": 1000, "in_channels": 4}
            model = MODELS[cfg.model or "DiT-XL/2"](**{**defaults, **sizes})
    model.backend = cfg.backend
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _check_labels(cfg: SampleConfig, model: DiT) -> None:
    if cfg.labels and max(cfg.labels) >= model.num_classes:
        raise ValueError(f"labels must lie in [0, {model.num_classes - 1}] for this model, got {max(cfg.labels)}")


def _load_vae(vae, device: torch.device, precision: str):
    """A VAE folder (bf16 when sampling in bf16, else fp32) or an already loaded AutoencoderKL."""
    if vae is None or not isinstance(vae, (str, os.PathLike)):
        return vae
    from .vae import load_vae

    return load_vae(os.fspath(vae), device, torch.bfloat16 if precision == "bf16" else torch.float32)


def _pixels_out(model: DiT, vae) -> bool:
    """Whether the samples are images: decoded by a VAE, or a pixel-space model (1 or 3 channels)."""
    return vae is not None or model.in_channels in (1, 3)


def _make_plan(cfg: SampleConfig, model) -> Plan | EDMPlan:
    """The sampler plan of ``cfg``: EDM's (:mod:`ditfast.edm`) for an image-space DiffiT, which is
    sampled with "edm-heun" only, else :func:`ditfast.samplers.make_plan`."""
    if isinstance(model, DiffiTUNet) != (cfg.sampler in EDM_SAMPLERS):
        raise ValueError(f"sampler {cfg.sampler!r} cannot sample a {type(model).__name__}: the image-space DiffiT "
                         f"(DiffiTUNet) is an EDM denoiser, sampled with {EDM_SAMPLERS[0]!r}; DiT and DiffiT with {SAMPLERS}")  # fmt: skip
    if isinstance(model, DiffiTUNet):
        if cfg.vae is not None:
            raise ValueError("the image-space DiffiT denoises pixels: sample it without a VAE")
        return make_edm_plan(cfg.steps, s_churn=cfg.s_churn, s_min=cfg.s_min, s_max=cfg.s_max, s_noise=cfg.s_noise,
                             clip_denoised=cfg.clip_denoised)  # fmt: skip
    return make_plan(cfg.sampler, cfg.steps, learned_sigma=model.learn_sigma, eta=cfg.eta, clip_denoised=cfg.clip_denoised)


def _make_engine(cfg: SampleConfig, model, plan):
    """The engine that runs ``plan`` (an :class:`EDMEngine` for an EDM plan)."""
    if isinstance(plan, EDMPlan):
        return EDMEngine(model, plan, batch_size=cfg.batch_size, cfg_scale=cfg.cfg_scale, precision=cfg.precision, mode=cfg.mode)
    return SamplingEngine(model, plan, batch_size=cfg.batch_size, cfg_scale=cfg.cfg_scale, guide_all_channels=cfg.guide_all_channels,
                          precision=cfg.precision, mode=cfg.mode, cfg_schedule=cfg.cfg_schedule)  # fmt: skip


def _evaluations(plan) -> int:
    """Model evaluations per image (EDM Heun: 2N - 1 for N steps)."""
    return plan.model_evaluations if isinstance(plan, EDMPlan) else plan.steps


def plan_line(model: DiT, plan: Plan, cfg: SampleConfig, todo: int, world: int, weights: str, vae) -> str:
    """The one-line summary printed before sampling, with the model cost per image."""
    per_forward = gflops(model)
    evals = _evaluations(plan)
    rows = 2 if cfg.cfg_scale > 1 else 1
    schedule = f" ({cfg_schedule_for(model.input_size, cfg.cfg_schedule)})" if isinstance(model, DiffiT) else ""
    guided = "the denoised image" if isinstance(model, DiffiTUNet) else f"{'all eps' if cfg.guide_all_channels else '3'} channels"
    cfg_text = f"cfg {cfg.cfg_scale:g}{schedule} on {guided}" if rows == 2 else "no cfg"
    churn = f" S_churn {cfg.s_churn:g} in [{cfg.s_min:g}, {cfg.s_max:g}], S_noise {cfg.s_noise:g}" if cfg.s_churn else ""
    sampler = f"{plan.sampler}{f' eta {cfg.eta:g}' if cfg.eta else ''}{churn}, {plan.steps} steps"
    batch = "on the CFG-doubled batch" if rows == 2 else "on the batch"
    return (f"plan: {cfg.num_samples} samples ({todo} to make, {world} rank(s)) | {describe(model)}, {weights}, "
            f"{'VAE ' + str(cfg.vae) if vae is not None else 'no VAE'} | {sampler}, {cfg_text} | {evals} model forwards "
            f"per image {batch}: {fmt_sig(per_forward)} x {evals} x {rows} = {fmt_sig(per_forward * evals * rows)} Gflops/image "
            f"| {cfg.precision}, {cfg.mode} mode, batch {cfg.batch_size} | out {cfg.out}")  # fmt: skip


# ------------------------------------------------------------------------------------------
# Sampling indices
# ------------------------------------------------------------------------------------------


class _Job:
    """Everything a run needs to turn global sample indices into outputs."""

    def __init__(self, cfg: SampleConfig, model: DiT, vae, engine: SamplingEngine):
        self.cfg, self.model, self.vae, self.engine = cfg, model, vae, engine
        self.pixels = _pixels_out(model, vae)

    def _inputs(self, idx: list[int]):
        plan = self.engine.plan
        labels = index_labels(self.cfg.seed, idx, self.model.num_classes, self.cfg.labels)
        z, noise = index_noise(self.cfg.seed, idx, tuple(self.engine.x.shape[1:]), plan.steps if plan.stochastic else 0)
        if self.engine.device.type == "cuda":
            z, noise = z.pin_memory(), (noise.pin_memory() if noise is not None else None)
        return labels, z, noise

    def batches(self, indices: list[int], bar=None):
        """Yield (indices, labels, latents (n, C, H, W) float32 (fp64: float64) CPU, images uint8 NHWC CPU or None)."""
        B = self.cfg.batch_size
        chunks = [indices[s : s + B] for s in range(0, len(indices), B)]
        self.engine.prepare()  # capture before the prefetch thread starts
        with ThreadPoolExecutor(max_workers=1) as pool:  # draws the next batch's noise while this one samples
            pending = pool.submit(self._inputs, chunks[0]) if chunks else None
            for j, idx in enumerate(chunks):
                labels, z, noise = pending.result()
                if j + 1 < len(chunks):
                    pending = pool.submit(self._inputs, chunks[j + 1])
                yield (idx, labels, *self._finish(self.engine.run(z, labels, noise)))
                if bar is not None:
                    bar.update(len(idx))

    def _finish(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Final x on the device -> (latents CPU in the state dtype, images uint8 NHWC CPU or None)."""
        images = None
        if self.vae is not None:
            from .vae import decode

            images = pixels_to_uint8(decode(self.vae, latents)).cpu()
        elif self.pixels:
            images = pixels_to_uint8(latents).cpu()
        return latents.cpu(), images


def _device(cfg: SampleConfig, local_rank: int = 0) -> torch.device:
    if cfg.device is not None:
        return resolve_device(cfg.device)  # "cuda" -> "cuda:<current>"; DeviceError where CUDA is absent
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def _progress(cfg: SampleConfig, total: int, enabled: bool):
    if not (cfg.progress and enabled and total):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"sample ({cfg.sampler}, {cfg.steps} steps)", unit="img", dynamic_ncols=True)


@dataclass
class Generated:
    """What :func:`sample` returns."""

    latents: torch.Tensor  # (N, C, H, W) float32 (float64 with precision "fp64"): the sampler's final x (model space)
    labels: torch.Tensor  # (N,) int64
    images: torch.Tensor | None  # (N, H', W', 3 or 1) uint8 (ADM convention) when the output is pixels


def sample(model: DiT | DiffiT | str = "DiT-XL/2", *, labels=None, num_samples: int | None = None, sampler: str = "ddpm",
             steps: int = 250, eta: float = 0.0, cfg_scale: float = 4.0, guide_all_channels: bool = False,
             cfg_schedule: str = "auto", clip_denoised: bool = False, seed: int = 0, precision: str = "auto", batch_size: int = 32,
             mode: str = "auto", vae=None, device=None, progress: bool = False, s_churn: float = 0.0, s_min: float = 0.0,
             s_max: float = float("inf"), s_noise: float = 1.0, **model_config) -> Generated:  # fmt: skip
    """Sample ``num_samples`` images (indices 0..N-1) in memory; the engine of ``ditfast sample``.

    ``model``: a :class:`DiT` or :class:`DiffiT` (used on its device), a registry name (random weights, for speed work;
    ``model_config`` such as ``input_size``/``num_classes``/``in_channels`` sizes it) or a
    checkpoint path (``model_config`` overrides go to :func:`ditfast.load_model`). ``vae``: a local
    AutoencoderKL folder, a loaded AutoencoderKL, or None. Sample i depends only on (seed, i) and
    the settings, not on ``batch_size``. An image-space DiffiT (:class:`ditfast.diffit_unet.DiffiTUNet`,
    names "DiffiT-CIFAR", "DiffiT-Digits16" ...) is sampled with ``sampler="edm-heun"`` (EDM's Heun
    sampler, ``steps`` = N, 2N - 1 evaluations; ``s_churn``/``s_min``/``s_max``/``s_noise`` its
    stochastic variant). Other arguments as for ``ditfast sample --help``.
    """
    unknown = set(model_config) - {"input_size", "num_classes", "in_channels"}
    if unknown:
        raise ValueError(f"unknown model_config keys {sorted(unknown)}; expected input_size, num_classes, in_channels")
    if not isinstance(model, (*MODEL_TYPES, str, os.PathLike)):
        raise TypeError(f"model must be a DiT, a DiffiT, a registry name or a checkpoint path, got {type(model).__name__}")
    model = os.fspath(model) if isinstance(model, os.PathLike) else model
    if labels is not None and (isinstance(labels, (str, bytes)) or not hasattr(labels, "__iter__")):
        raise TypeError(f"labels must be a sequence of integer class labels, got {labels!r}")
    given = model if isinstance(model, MODEL_TYPES) else None
    if given is not None and model_config:
        raise ValueError(f"model_config ({sorted(model_config)}) applies to a model built from a name or checkpoint, not a given DiT")
    name = None if given is not None or model not in MODELS else model
    ckpt = model if given is None and name is None else None
    if ckpt is not None and not (os.path.isfile(ckpt) or is_diffusers_folder(ckpt)):
        raise ValueError(f"model must be a DiT, a DiffiT, a registry name ({', '.join(MODELS)}), a checkpoint file or a diffusers folder; "
                         f"{model!r} is neither")  # fmt: skip
    if given is not None:
        own = next(given.parameters()).device
        if device is None:
            device = own
        elif resolve_device(device) != own:  # DeviceError first where the device is absent or malformed
            raise ValueError(f"device={str(device)!r} but the given model is on {own}: move the model "
                             f"(model.to({str(resolve_device(device))!r})) or leave device out")  # fmt: skip
    cfg = SampleConfig(model=name, ckpt=ckpt, vae=vae if isinstance(vae, (str, os.PathLike)) or vae is None else None,
                       labels=tuple(labels) if labels is not None else None, num_samples=num_samples, sampler=sampler,
                       steps=steps, eta=eta, cfg_scale=cfg_scale, guide_all_channels=guide_all_channels,
                       cfg_schedule=cfg_schedule, clip_denoised=clip_denoised, seed=seed, precision=precision, batch_size=batch_size, mode=mode,
                       progress=progress, s_churn=s_churn, s_min=s_min, s_max=s_max, s_noise=s_noise, device=str(device) if device is not None else None, **model_config)  # fmt: skip
    check_config(cfg)
    dev = _device(cfg)
    cfg = _resolve(cfg, dev)
    net = given if given is not None else build_model(cfg, dev)
    _check_labels(cfg, net)
    plan = _make_plan(cfg, net)
    engine = _make_engine(cfg, net, plan)
    job = _Job(cfg, net, _load_vae(vae, dev, cfg.precision), engine)
    bar = _progress(cfg, cfg.num_samples, True)
    parts = list(job.batches(list(range(cfg.num_samples)), bar))
    if bar is not None:
        bar.close()
    images = torch.cat([p[3] for p in parts]) if job.pixels else None
    return Generated(torch.cat([p[2] for p in parts]), torch.cat([p[1] for p in parts]), images)


# ------------------------------------------------------------------------------------------
# Runs with shards (single- and multi-process)
# ------------------------------------------------------------------------------------------


def _save_npz(path: str, **arrays) -> None:
    """np.savez to a temporary file in the same folder, then rename (atomic)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(path, write)


def shard_ranges(num_samples: int, shard_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + shard_size, num_samples)) for s in range(0, num_samples, shard_size)]


def shard_name(start: int, end: int) -> str:
    return f"shard_{start:08d}_{end:08d}.npz"


def _manifest(cfg: SampleConfig) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items() if k in SampleConfig.MANIFEST_KEYS}


def _check_manifest(cfg: SampleConfig) -> None:
    """Refuse an output folder whose manifest records other sample-deciding settings."""
    path, mine = os.path.join(cfg.out, MANIFEST), _manifest(cfg)
    if not os.path.isfile(path):
        return
    with open(path) as f:
        theirs = json.load(f)
    # a key a manifest lacks was added after it was written: it was made with that field's default
    defaults = {f.name: f.default for f in dataclasses.fields(SampleConfig) if f.default is not dataclasses.MISSING}
    defaults = {k: (list(v) if isinstance(v, tuple) else v) for k, v in defaults.items()}
    conflicts = [f"{k}: {theirs.get(k, defaults.get(k))!r} there vs {mine[k]!r} now" for k in mine
                 if theirs.get(k, defaults.get(k)) != mine[k]]  # fmt: skip
    if conflicts:
        raise ValueError(f"{cfg.out} holds samples made with other settings ({'; '.join(conflicts)}); "
                         "use another --out or the same settings")  # fmt: skip


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def _prepare_out(cfg: SampleConfig) -> None:
    """(first rank, before any rank writes) Create the folders, write the manifest, and remove the
    temporary files a killed run left behind (its own names only: a user's files are kept)."""
    shards = os.path.join(cfg.out, "shards")
    os.makedirs(shards, exist_ok=True)
    path = os.path.join(cfg.out, MANIFEST)
    if not os.path.isfile(path):
        atomic_write(path, lambda tmp: _write_json(tmp, _manifest(cfg)))
    # what this module writes in each folder (older versions named their temporary files NAME.tmpPID)
    own = {shards: r"shard_\d{8}_\d{8}\.npz", os.path.join(cfg.out, "images"): r"\d{6}\.png",
           cfg.out: rf"{re.escape(OUTPUT)}|{re.escape(MANIFEST)}|grid\.png"}  # fmt: skip
    for folder, names in own.items():
        remove_orphans(folder, legacy=names)


def _write_shard(cfg: SampleConfig, start: int, end: int, outputs: list, pixels: bool) -> None:
    labels = torch.cat([o[1] for o in outputs]).numpy()
    data = torch.cat([o[3] if pixels else o[2].float() for o in outputs]).numpy()  # latents: float32, as documented
    if pixels and cfg.png:
        for offset, image in enumerate(data):
            save_png(os.path.join(cfg.out, "images", f"{start + offset:06d}.png"), torch.from_numpy(image))
    _save_npz(os.path.join(cfg.out, "shards", shard_name(start, end)), arr_0=data, arr_1=labels)


def merge_shards(cfg: SampleConfig, pixels: bool) -> str:
    """Concatenate every shard in index order into ``samples.npz``; checks that the shards cover
    0..N-1 exactly once. Writes ``grid.png`` of the first 64 images when the output is pixels."""
    arrays, labels = [], []
    for start, end in shard_ranges(cfg.num_samples, cfg.shard_size):
        with np.load(os.path.join(cfg.out, "shards", shard_name(start, end))) as shard:
            if len(shard["arr_0"]) != end - start or len(shard["arr_1"]) != end - start:
                raise ValueError(f"shard {shard_name(start, end)} holds {len(shard['arr_0'])} samples, expected {end - start}")
            arrays.append(shard["arr_0"])
            labels.append(shard["arr_1"])
    path = os.path.join(cfg.out, OUTPUT)
    data = np.concatenate(arrays)
    if pixels and cfg.png:
        first = torch.from_numpy(data[:64])
        nrow = math.ceil(math.sqrt(len(first)))
        save_png(os.path.join(cfg.out, "grid.png"), make_grid(first, nrow=nrow, pad=2, scale=max(1, 64 // first.shape[1])))
    # samples.npz marks the run complete, so it is written last: a run killed before it merges again
    _save_npz(path, arr_0=data, arr_1=np.concatenate(labels))
    return path


def run(cfg: SampleConfig) -> dict:
    """Make (or finish) the samples of ``cfg`` in ``cfg.out``; returns {"complete", "made", "path",
    "images_per_s"}. Under torchrun (WORLD_SIZE > 1) every rank runs this; shards are dealt to the
    ranks round-robin, and the first rank merges."""
    check_config(cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = _device(cfg, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    own_group = world > 1 and not dist.is_initialized()
    if own_group:
        # ranks wait for each other only at the start and the end; the last shard of one rank may
        # finish long after another's, so the collective timeout is generous
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=6))
    rank = dist.get_rank() if world > 1 else 0
    try:
        return _run(_resolve(cfg, device), device, rank, world)
    finally:
        if own_group:
            dist.destroy_process_group()


def _barrier(world: int) -> None:
    if world > 1:
        nccl = dist.get_backend() == "nccl"
        dist.barrier(device_ids=[torch.cuda.current_device()] if nccl else None)


def _run(cfg: SampleConfig, device: torch.device, rank: int, world: int) -> dict:
    model = build_model(cfg, device)
    _check_labels(cfg, model)
    if cfg.cfg_scale > 1 and not isinstance(model, DiffiTUNet):  # (EDMEngine checks its model itself)
        check_cfg_model(model, cfg.guide_all_channels)
    plan = _make_plan(cfg, model)
    final = os.path.join(cfg.out, OUTPUT)
    _check_manifest(cfg)  # on every rank, so that all of them stop with the error
    if rank == 0:
        _prepare_out(cfg)
    _barrier(world)  # every rank now sees the same finished shards: nobody writes before this
    shards = shard_ranges(cfg.num_samples, cfg.shard_size)
    if os.path.isfile(final):
        if rank == 0:
            print(f"{final} is complete ({cfg.num_samples} samples): nothing to do")
        return {"complete": True, "made": 0, "path": final, "images_per_s": float("nan")}
    todo = [s for s in shards if not os.path.isfile(os.path.join(cfg.out, "shards", shard_name(*s)))]
    mine = todo[rank::world][: cfg.max_shards]
    vae = _load_vae(cfg.vae, device, cfg.precision)
    if rank == 0:
        weights = f"weights {cfg.ckpt}" if cfg.ckpt else f"random weights (seed {cfg.seed})"
        print(plan_line(model, plan, cfg, sum(e - s for s, e in todo), world, weights, vae), flush=True)
        if len(todo) < len(shards):
            print(f"skipping {len(shards) - len(todo)} finished shard(s) of {len(shards)}")
    made, t0 = 0, time.perf_counter()
    if mine:
        engine = _make_engine(cfg, model, plan)
        job = _Job(cfg, model, vae, engine)
        bar = _progress(cfg, sum(e - s for s, e in mine), rank == 0)
        for start, end in mine:
            outputs = list(job.batches(list(range(start, end)), bar))
            _write_shard(cfg, start, end, outputs, job.pixels)
            made += end - start
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t0
    rate = made / elapsed if made else float("nan")
    if made:
        tflops = rate * gflops(model) * _evaluations(plan) * (2 if cfg.cfg_scale > 1 else 1) * 2 / 1e3
        print(f"rank {rank}: made {made} samples in {elapsed:.1f} s: {fmt_sig(rate)} images/s, {fmt_sig(tflops)} TFLOP/s (model)")
    _barrier(world)
    complete = all(os.path.isfile(os.path.join(cfg.out, "shards", shard_name(*s))) for s in shards)
    path = None
    if complete and rank == 0:
        path = merge_shards(cfg, _pixels_out(model, vae))
        print(f"wrote {path}: {cfg.num_samples} samples")
    elif rank == 0:
        left = sum(not os.path.isfile(os.path.join(cfg.out, "shards", shard_name(*s))) for s in shards)
        print(f"stopped with {left} of {len(shards)} shard(s) left: run the same command again to finish")
    _barrier(world)
    return {"complete": complete, "made": made, "path": path or (final if complete else None), "images_per_s": rate}
