"""EDM (Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models", 2022):
the preconditioned denoiser, its training loss and its Heun sampler, for the image-space DiffiT.

Preconditioning (Table 1, "ours"): the denoiser is ``D(x; sigma) = c_skip x + c_out F(c_in x, c_noise)``
with

    c_skip  = sigma_data^2 / (sigma^2 + sigma_data^2)
    c_out   = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)
    c_in    = 1 / sqrt(sigma^2 + sigma_data^2)
    c_noise = ln(sigma) / 4                                        sigma_data = 0.5

Training: ``ln sigma ~ N(P_mean, P_std^2)`` (P_mean = -1.2, P_std = 1.2), ``x_noisy = x + sigma n``
with n ~ N(0, I), loss ``lambda(sigma) |D(x_noisy; sigma) - x|^2`` with ``lambda = (sigma^2 +
sigma_data^2) / (sigma sigma_data)^2``. :func:`edm_loss` returns it per sample as the mean over
pixels (EDM sums over pixels; the mean is that divided by C*H*W, a constant factor).

Sampling (Algorithm 2; S_churn = 0 is the deterministic Algorithm 1): the grid of N steps

    sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,  i < N;  sigma_N = 0

(sigma_max 80, sigma_min 0.002, rho 7); x_0 = sigma_0 z; at step i with gamma_i =
min(S_churn / N, sqrt(2) - 1) where S_min <= sigma_i <= S_max, else 0:

    sigma_hat = (1 + gamma_i) sigma_i
    x_hat     = x_i + sqrt(sigma_hat^2 - sigma_i^2) S_noise eps_i          eps_i ~ N(0, I)
    d         = (x_hat - D(x_hat; sigma_hat)) / sigma_hat
    x_{i+1}   = x_hat + (sigma_{i+1} - sigma_hat) d                       Euler
    if sigma_{i+1} != 0:                                                  Heun's correction
        d'      = (x_{i+1} - D(x_{i+1}; sigma_{i+1})) / sigma_{i+1}
        x_{i+1} = x_hat + (sigma_{i+1} - sigma_hat) (d + d') / 2

so N steps take 2N - 1 model evaluations (the last step, to sigma = 0, is first order). "steps" in
ditfast is N. Per-sample randomness follows :mod:`ditfast.seeding` as for the other samplers: sample
i's generator (seed, i) draws z and then, for a stochastic plan, its (N, C, H, W) eps draws
(:func:`ditfast.sampling.index_noise`).

:class:`EDMEngine` runs a plan on batches with the interface of :class:`ditfast.engine.SamplingEngine`,
in the modes "eager", "graph" (two CUDA graphs: the Heun step and the first-order last step) and "compile".
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .engine import PRECISIONS, _matmul_precision, _StepEmbedding, _with_module, capture_graphs, compute_autocast, load_batch

__all__ = [
    "SIGMA_DATA", "P_MEAN", "P_STD", "SIGMA_MIN", "SIGMA_MAX", "RHO", "EDM_SAMPLERS", "MODES",
    "precond_coefs", "EDMPrecond", "sample_sigma", "loss_weight", "edm_loss", "sigma_grid",
    "EDMPlan", "make_edm_plan", "heun_step", "EDMEngine",
]  # fmt: skip

SIGMA_DATA, P_MEAN, P_STD = 0.5, -1.2, 1.2
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0
EDM_SAMPLERS = ("edm-heun",)
MODES = ("eager", "graph", "compile")


# ------------------------------------------------------------------------------------------
# Preconditioning and training
# ------------------------------------------------------------------------------------------


def precond_coefs(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA):
    """(c_skip, c_out, c_in, c_noise) of EDM's preconditioning, elementwise in sigma (> 0)."""
    s2, d2 = sigma * sigma, sigma_data * sigma_data
    c_skip = d2 / (s2 + d2)
    c_out = sigma * sigma_data / (s2 + d2).sqrt()
    c_in = 1 / (s2 + d2).sqrt()
    return c_skip, c_out, c_in, sigma.log() / 4


class EDMPrecond(nn.Module):
    """The denoiser D(x; sigma) around a raw network ``net(x, c_noise, y, force_drop_ids)``
    (:class:`ditfast.diffit_unet.DiffiTUNet`, or a DistributedDataParallel around one). No
    parameters of its own; the coefficients are computed in x's dtype (float32 or float64) and the
    network runs in its own (autocast applies to it)."""

    def __init__(self, net: nn.Module, sigma_data: float = SIGMA_DATA):
        super().__init__()
        self.net, self.sigma_data = net, float(sigma_data)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor | None = None,
                force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        # x: (B, C, H, W), sigma: (B,) > 0 -> D(x; sigma) (B, C, H, W) in x's dtype
        sigma = sigma.to(x.dtype).reshape(-1)
        c_skip, c_out, c_in, c_noise = (c.view(-1, 1, 1, 1) for c in precond_coefs(sigma, self.sigma_data))
        dtype = next(self.net.parameters()).dtype
        # c_noise at least in fp32 (a bf16 network would otherwise be conditioned on a rounded sigma)
        F_x = self.net((c_in * x).to(dtype), c_noise.flatten().to(torch.promote_types(dtype, torch.float32)), y, force_drop_ids)
        return c_skip * x + c_out * F_x.to(x.dtype)


def sample_sigma(normal: torch.Tensor, p_mean: float = P_MEAN, p_std: float = P_STD) -> torch.Tensor:
    """Training noise levels from standard normal draws: ``exp(P_mean + P_std * normal)``."""
    return (p_mean + p_std * normal).exp()


def loss_weight(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """EDM's lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def edm_loss(denoiser: EDMPrecond, x: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor,
             y: torch.Tensor | None = None, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """(B,) EDM loss per sample: ``lambda(sigma) * mean_pixels (D(x + sigma noise; sigma) - x)^2``.
    ``x`` (B, C, H, W) clean images, ``sigma`` (B,), ``noise`` (B, C, H, W) standard normal."""
    if x.shape != noise.shape or sigma.shape != (x.shape[0],):
        raise ValueError(f"edm_loss needs x and noise of one shape and sigma (B,), got x {tuple(x.shape)}, "
                         f"noise {tuple(noise.shape)}, sigma {tuple(sigma.shape)}")  # fmt: skip
    s = sigma.to(x.dtype).view(-1, 1, 1, 1)
    D = denoiser(x + s * noise, sigma, y, force_drop_ids)
    return loss_weight(sigma.to(x.dtype), denoiser.sigma_data) * (D - x).square().mean(dim=(1, 2, 3))


# ------------------------------------------------------------------------------------------
# Sampler plans
# ------------------------------------------------------------------------------------------


def sigma_grid(steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO) -> torch.Tensor:
    """(steps + 1,) float64: EDM's sigma_0 = sigma_max > ... > sigma_{N-1} = sigma_min, then 0
    (one step: sigma_max, then 0)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not 0 < sigma_min < sigma_max or not rho > 0:
        raise ValueError(f"need 0 < sigma_min < sigma_max and rho > 0, got sigma_min={sigma_min}, "
                         f"sigma_max={sigma_max}, rho={rho}")  # fmt: skip
    i = torch.arange(steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sig = (hi + i / max(steps - 1, 1) * (lo - hi)) ** rho
    return torch.cat([sig, torch.zeros(1, dtype=torch.float64)])


@dataclass(frozen=True)
class EDMPlan:
    """What the EDM sampler does at each of its N steps (k = 0 is the noisiest)."""

    sampler: str
    sigmas: torch.Tensor  # (N + 1,) float64, the last 0
    gammas: torch.Tensor  # (N,) float64 churn per step
    s_noise: float
    clip_denoised: bool = False

    @property
    def steps(self) -> int:
        return len(self.gammas)

    @property
    def stochastic(self) -> bool:
        """Whether some step adds fresh noise (then one (C, H, W) draw per sample and step)."""
        return bool((self.gammas > 0).any())

    @property
    def model_evaluations(self) -> int:
        """2N - 1: two per step but the last (first order, to sigma = 0)."""
        return 2 * self.steps - 1


def make_edm_plan(steps: int, *, s_churn: float = 0.0, s_min: float = 0.0, s_max: float = float("inf"),
                  s_noise: float = 1.0, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO,
                  clip_denoised: bool = False) -> EDMPlan:  # fmt: skip
    """The EDM Heun plan with N = ``steps``; ``s_churn`` > 0 makes it stochastic (Algorithm 2)."""
    for name, value in (("s_churn", s_churn), ("s_min", s_min), ("s_noise", s_noise)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if isinstance(s_max, bool) or not isinstance(s_max, (int, float)) or not s_max >= s_min:
        raise ValueError(f"s_max must be a number >= s_min ({s_min}), got {s_max!r}")
    sigmas = sigma_grid(steps, sigma_min, sigma_max, rho)
    cur = sigmas[:-1]
    gamma = min(s_churn / steps, math.sqrt(2) - 1)
    gammas = torch.where((cur >= s_min) & (cur <= s_max), torch.full_like(cur, gamma), torch.zeros_like(cur))
    return EDMPlan("edm-heun", sigmas, gammas, float(s_noise), clip_denoised)


def heun_step(denoise, x: torch.Tensor, sigma: float, sigma_next: float, gamma: float = 0.0,
              noise: torch.Tensor | None = None, s_noise: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """One step of EDM's Algorithm 2 (see the module doc): x at sigma -> (x at sigma_next, the
    denoised estimate at sigma_hat). ``denoise(x, sigma_scalar) -> D``; ``noise`` is the step's eps
    (needed when gamma > 0)."""
    sigma_hat = sigma * (1 + gamma)
    if gamma > 0:
        x = x + math.sqrt(sigma_hat**2 - sigma**2) * s_noise * noise
    d_hat = denoise(x, sigma_hat)
    d = (x - d_hat) / sigma_hat
    x_next = x + (sigma_next - sigma_hat) * d
    if sigma_next != 0:
        d_next = (x_next - denoise(x_next, sigma_next)) / sigma_next
        x_next = x + (sigma_next - sigma_hat) * (0.5 * d + 0.5 * d_next)
    return x_next, d_hat


# ------------------------------------------------------------------------------------------
# The engine
# ------------------------------------------------------------------------------------------


class EDMEngine:
    """Runs an :class:`EDMPlan` on batches of up to ``batch_size`` samples, with the interface the
    run layer uses for :class:`ditfast.engine.SamplingEngine` (``x``, ``device``, ``plan``,
    :meth:`prepare`, :meth:`run`). Every batch is padded to ``batch_size`` rows, so the numerics
    do not depend on how many samples a batch holds. ``cfg_scale`` > 1 guides the denoised
    estimate, ``D_null + w (D_y - D_null)``, on the [cond; null] doubled batch.

    As in ``SamplingEngine``, a step is one function over static buffers: the state ``x``, the step
    counter ``k``, the labels ``y``, the per-step noise (stochastic plans) and, on the device, the
    plan's per-step sigma_hat, sigma_next and churn scale, read by indexing with ``k``. The network's
    timestep embedding of every evaluation's c_noise = ln(sigma) / 4 is computed once, before the
    loop, into a table of 2N - 1 rows (sigma_hat of each step, then sigma_next of each step but the
    last) that the network reads through a row index ``e`` the step sets before each evaluation.
    Two step functions: the Heun step (two evaluations) for steps 0..N-2 and the first-order last
    step to sigma = 0.

    Modes: "eager" (a Python loop over the step functions), "graph" (CUDA only: the two step
    functions captured once as two CUDA graphs, replayed N - 1 times and once) and "compile" (the
    denoiser under ``torch.compile``).
    """

    def __init__(self, model: nn.Module, plan: EDMPlan, *, batch_size: int, cfg_scale: float = 1.0,
                 precision: str = "fp32", mode: str = "eager"):  # fmt: skip
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES} for EDM sampling, got {mode!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not cfg_scale >= 1:
            raise ValueError(f"cfg_scale must be >= 1, got {cfg_scale}")
        device = next(model.parameters()).device
        if mode == "graph" and device.type != "cuda":
            raise ValueError(f"mode 'graph' captures CUDA graphs: it needs a CUDA device, the model is on {device}")
        self.guided = cfg_scale > 1
        if self.guided and (model.y_embedder is None or model.y_embedder.embedding_table.num_embeddings <= model.num_classes):
            raise ValueError("classifier-free guidance (cfg scale > 1) needs a class-conditional model with a null class "
                             "(trained with class_dropout_prob > 0); use cfg scale 1")  # fmt: skip
        self.dtype = PRECISIONS[precision]
        if any(p.dtype != self.dtype for p in model.parameters()):
            model = copy.deepcopy(model).to(self.dtype)
        self.device = device
        self.plan, self.precision, self.mode, self.cfg_scale = plan, precision, mode, float(cfg_scale)
        B, C, S, N = batch_size, model.in_channels, model.input_size, plan.steps
        self.batch_size = B
        state = torch.float64 if self.dtype == torch.float64 else torch.float32  # the sampler's state and arithmetic
        self.x = torch.zeros(B, C, S, S, device=device, dtype=state)
        self.k = torch.zeros(1, dtype=torch.int64, device=device)  # the step
        self.e = torch.zeros(1, dtype=torch.int64, device=device)  # the embedding-table row of the next evaluation
        self.y = None
        if model.y_embedder is not None:
            self.y = torch.zeros(2 * B if self.guided else B, dtype=torch.int64, device=device)
        self.noise = torch.zeros(N, B, C, S, S, device=device, dtype=state) if plan.stochastic else None
        sigma, nxt = plan.sigmas[:-1], plan.sigmas[1:]  # float64 (N,)
        hat = sigma * (1 + plan.gammas)
        churn = (hat.square() - sigma.square()).clamp_min(0).sqrt() * plan.s_noise  # 0 where gamma is 0
        self.sigma_hat, self.sigma_next, self.churn = (v.to(device, state) for v in (hat, nxt, churn))
        # the timestep embedding of every evaluation, once (as EDMPrecond computes c_noise: in the
        # state dtype, then at least fp32)
        evals = torch.cat([self.sigma_hat, self.sigma_next[:-1]])  # (2N - 1,)
        c_noise = precond_coefs(evals)[3].to(torch.promote_types(self.dtype, torch.float32))
        with torch.no_grad(), _matmul_precision(precision), compute_autocast(device, self.dtype):
            table = model.t_embedder(c_noise)  # (2N - 1, D)
        # a view (sharing every parameter) in eval mode: no random label dropout while sampling, and
        # the per-evaluation label check off (run() checks each batch once); the caller's model is unchanged
        self.model = _with_module(model, "t_embedder", _StepEmbedding(table, self.e))
        self.model.training = False
        self.model.check_label_range = False
        self.denoiser = EDMPrecond(self.model)
        self._D = torch.compile(self.denoiser, dynamic=False) if mode == "compile" else self.denoiser
        self._graphs: dict[bool, torch.cuda.CUDAGraph] = {}

    def _denoise(self, x: torch.Tensor, sigma: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        """D(x; sigma) (guided) with sigma (1,) on the device and the embedding table's ``row`` (1,)."""
        self.e.copy_(row)
        with compute_autocast(self.device, self.dtype):
            if not self.guided:
                out = self._D(x, sigma.expand(len(x)), self.y)
            else:
                both = self._D(torch.cat([x, x]), sigma.expand(2 * len(x)), self.y)
                cond, null = both.chunk(2)
                out = null + self.cfg_scale * (cond - null)
        return out.clamp(-1, 1) if self.plan.clip_denoised else out

    def _step(self, last: bool) -> None:
        """Advance the buffers by step ``k`` of the plan (see the module doc): the Heun step, or with
        ``last`` the first-order step to sigma = 0. What a CUDA graph holds."""
        k, x = self.k, self.x
        s_hat, s_next = self.sigma_hat.index_select(0, k), self.sigma_next.index_select(0, k)  # (1,)
        h, n = s_hat.view(1, 1, 1, 1), s_next.view(1, 1, 1, 1)
        if self.noise is not None:
            x = x + self.churn.index_select(0, k).view(1, 1, 1, 1) * self.noise.index_select(0, k)[0]
        d = (x - self._denoise(x, s_hat, k)) / h
        x_next = x + (n - h) * d
        if not last:  # Heun's correction
            d_next = (x_next - self._denoise(x_next, s_next, k + self.plan.steps)) / n
            x_next = x + (n - h) * (0.5 * d + 0.5 * d_next)
        self.x.copy_(x_next)
        self.k.add_(1)

    def _capture(self) -> None:
        """Capture the Heun step and the last step (see :func:`ditfast.engine.capture_graphs`; one
        step: only the last), each warmed up at a step where it runs; the buffers hold zeros meanwhile."""
        last_only = self.plan.steps == 1
        steps = {last: functools.partial(self._step, last) for last in (False, True) if last or not last_only}
        self._graphs = capture_graphs(self.device, steps, lambda last: self.k.fill_(self.plan.steps - 1 if last else 0))

    @torch.no_grad()
    def prepare(self) -> None:
        """Capture the CUDA graphs now (graph mode; otherwise the first :meth:`run` does it)."""
        if self.mode == "graph" and not self._graphs:
            with _matmul_precision(self.precision):
                self._capture()

    @torch.no_grad()
    def step(self, last: bool) -> None:
        """Advance the buffers by one step (a graph replay in graph mode)."""
        if self._graphs:
            self._graphs[last].replay()
        else:
            self._step(last)

    @torch.no_grad()
    def run(self, z: torch.Tensor, labels: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Sample n <= batch_size images from ``z`` (n, C, H, W) standard normal (scaled by
        sigma_max here), ``labels`` (n,) (ignored by an unconditional model) and, for a stochastic
        plan, ``noise`` (N, n, C, H, W). Returns the final (n, C, H, W) on the model's device."""
        n = load_batch(self, z, labels, noise)
        with _matmul_precision(self.precision):
            self.x.mul_(self.plan.sigmas[0].item())  # x_0 = sigma_max z
            for i in range(self.plan.steps):
                self.step(last=i == self.plan.steps - 1)
            return self.x[:n].clone()
