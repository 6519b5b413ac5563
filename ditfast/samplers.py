"""Sampler plans for DiT's eps-prediction, linear-beta diffusion: which timesteps the model sees and
the per-step scalars of each update, plus the update itself on whole batches.

A :class:`Plan` is data only: ``timesteps`` (S,) int64, the original 0..999 step the model is
called with at sampling step k, and ``coefs`` (S, K) float32, the K scalars that step's update
needs. :func:`update` is the arithmetic of one step, written with those scalars as 0-dim tensors
so that it runs unchanged in an eager loop, under ``torch.compile`` and inside a captured CUDA
graph whose scalars are refreshed in place before each replay.

Samplers:

- ``"ddpm"``: ancestral sampling on the respaced schedule (``create_diffusion(str(S))``) with the
  learned variance (or the fixed one for ``learn_sigma=False`` models). The scalars are the
  diffusion object's own float64 tables cast to float32 and the operations are done in the same
  order, so a step is numerically the diffusion's ``p_sample`` for the same noise.
- ``"ddim"``: DDIM (Song et al.) with ``eta`` on the same respaced schedule; numerically the
  diffusion's ``ddim_sample``.
- ``"dpm-solver++"``: DPM-Solver++(2M) (Lu et al. 2022, multistep, data prediction) on the
  noise-prediction channels only (the variance channels are ignored). Time grid: uniform in the
  original timesteps, ``t_k = floor(999 * (S - k) / S)`` for k = 0..S-1 (integers: the model was
  trained on integer steps); the solver steps in lambda = log(alpha / sigma) between them, and the
  final step goes from ``t_{S-1}`` to clean data (sigma = 0) at first order, i.e. it returns the
  data prediction there. The first step is first order too (no history yet).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .diffusion import create_diffusion
from .diffusion.gaussian_diffusion import check_eta, ddim_eps_coef

__all__ = ["SAMPLERS", "COLUMNS", "Plan", "make_plan", "min_steps", "dpm_solver_timesteps", "update"]

SAMPLERS = ("ddpm", "ddim", "dpm-solver++")
MAX_STEPS = 1000  # the models are trained on a 1000-step schedule

# Names of the per-step scalars (columns of Plan.coefs) of each sampler.
COLUMNS = {
    # x0 = c0 * x - c1 * eps; mean = c2 * x0 + c3 * x; log_var = frac * c5 + (1 - frac) * c4
    # (learned) or c4 (fixed); x' = mean + c6 * exp(log_var / 2) * noise
    "ddpm": ("sqrt_recip_acp", "sqrt_recipm1_acp", "posterior_coef1", "posterior_coef2", "min_log_var",
             "max_log_var", "noise_mask"),
    # x0 as above; eps' = (c0 * x - x0) / c1; x' = x0 * c2 + c3 * eps' + c4 * noise
    "ddim": ("sqrt_recip_acp", "sqrt_recipm1_acp", "sqrt_acp_prev", "eps_coef", "noise_scale"),
    # x0 as above; x' = c2 * x + c3 * x0 + c4 * x0_prev
    "dpm-solver++": ("sqrt_recip_acp", "sqrt_recipm1_acp", "x_coef", "x0_coef", "x0_prev_coef"),
}  # fmt: skip


@dataclass(frozen=True)
class Plan:
    """What a sampler does at each of its S steps (k = 0 is the noisiest)."""

    sampler: str
    timesteps: torch.Tensor  # (S,) int64: the original timestep the model sees at step k
    coefs: torch.Tensor  # (S, K) float32: per-step scalars, named by COLUMNS[sampler]
    stochastic: bool  # whether step k adds fresh noise (then one (C, H, W) draw per sample and step)
    learned_sigma: bool  # the model outputs 2C channels, the second half a variance interpolation
    clip_denoised: bool  # clamp the x0 prediction to [-1, 1]

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @property
    def multistep(self) -> bool:
        """Whether a step needs the previous step's x0 prediction."""
        return self.sampler == "dpm-solver++"


def min_steps(sampler: str) -> int:
    """The ancestral and DDIM samplers need a respaced diffusion of at least 2 steps."""
    return 1 if sampler == "dpm-solver++" else 2


def make_plan(sampler: str, steps: int, *, learned_sigma: bool = True, eta: float = 0.0,
              clip_denoised: bool = False) -> Plan:  # fmt: skip
    """The :class:`Plan` of ``sampler`` with ``steps`` model evaluations (see the module doc)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if not isinstance(steps, int) or not min_steps(sampler) <= steps <= MAX_STEPS:
        raise ValueError(f"{sampler} needs {min_steps(sampler)} <= steps <= {MAX_STEPS}, got {steps!r}")
    eta = check_eta(eta)  # in [0, 1]: past 1 the DDIM update is the root of a negative number
    if eta and sampler != "ddim":
        raise ValueError(f"eta is only used by ddim, got eta={eta} with sampler {sampler}")
    if sampler == "dpm-solver++":
        return _dpm_solver_plan(steps, learned_sigma, clip_denoised)
    d = create_diffusion(str(steps), learn_sigma=learned_sigma)
    idx = np.arange(steps - 1, -1, -1)  # respaced indices, noisiest first
    timesteps = torch.tensor(d.timestep_map, dtype=torch.int64)[torch.from_numpy(idx.copy())]

    def col(table) -> torch.Tensor:  # float64 table -> float32 at the steps, as the diffusion's _extract
        return torch.from_numpy(np.ascontiguousarray(table[idx])).float()

    nonzero = torch.from_numpy(idx != 0).float()
    if sampler == "ddpm":
        if learned_sigma:
            min_log, max_log = col(d.posterior_log_variance_clipped), col(d._log_betas)
        else:  # create_diffusion(learn_sigma=False): FIXED_LARGE
            min_log = max_log = col(d._fixed_large_log_variance)
        coefs = [col(d.sqrt_recip_alphas_cumprod), col(d.sqrt_recipm1_alphas_cumprod), col(d.posterior_mean_coef1),
                 col(d.posterior_mean_coef2), min_log, max_log, nonzero]  # fmt: skip
        stochastic = True
    else:
        # the diffusion's ddim_sample computes these in float32 from float32 alpha_bars; so do we
        alpha_bar, alpha_bar_prev = col(d.alphas_cumprod), col(d.alphas_cumprod_prev)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        coefs = [col(d.sqrt_recip_alphas_cumprod), col(d.sqrt_recipm1_alphas_cumprod), torch.sqrt(alpha_bar_prev),
                 ddim_eps_coef(alpha_bar_prev, sigma), nonzero * sigma]  # fmt: skip
        stochastic = eta > 0
    return Plan(sampler, timesteps, torch.stack(coefs, dim=1), stochastic, learned_sigma, clip_denoised)


def dpm_solver_timesteps(steps: int) -> np.ndarray:
    """(steps,) int64 original timesteps, uniform in t: ``floor(999 * (steps - k) / steps)``."""
    top = MAX_STEPS - 1
    return np.array([top * (steps - k) // steps for k in range(steps)], dtype=np.int64)


def _dpm_solver_plan(steps: int, learned_sigma: bool, clip_denoised: bool) -> Plan:
    t = dpm_solver_timesteps(steps)
    alphas_cumprod = create_diffusion("").alphas_cumprod  # float64, the 1000-step linear schedule
    acp = alphas_cumprod[t]
    alpha, sigma = np.sqrt(acp), np.sqrt(1.0 - acp)
    lam = np.log(alpha) - np.log(sigma)
    rows = []
    for k in range(steps):
        if k == steps - 1:  # to sigma = 0 (lambda = inf), first order: x' = x0
            rows.append((0.0, 1.0, 0.0))
            continue
        h = lam[k + 1] - lam[k]
        phi = -alpha[k + 1] * math.expm1(-h)  # -alpha_t (e^{-h} - 1)
        x_coef = sigma[k + 1] / sigma[k]
        if k == 0:  # first order (DPM-Solver++1 = DDIM)
            rows.append((x_coef, phi, 0.0))
        else:  # 2M: D = (1 + 1/(2r)) x0_k - 1/(2r) x0_{k-1}, r = h_{k-1} / h_k
            half_inv_r = 0.5 * h / (lam[k] - lam[k - 1])
            rows.append((x_coef, phi * (1 + half_inv_r), -phi * half_inv_r))
    table = np.concatenate([np.stack([np.sqrt(1.0 / acp), np.sqrt(1.0 / acp - 1)], axis=1), np.array(rows)], axis=1)
    return Plan("dpm-solver++", torch.from_numpy(t), torch.from_numpy(table).float(), False, learned_sigma, clip_denoised)


def update(plan: Plan, x: torch.Tensor, model_out: torch.Tensor, c: torch.Tensor, noise: torch.Tensor | None = None,
           x0_prev: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """One sampler step: x (B, C, H, W) float32 (or float64) at step k -> (x at step k+1, the x0 prediction).

    ``model_out`` (B, C_out, H, W): the (guided) model output at step k, eps in channels [:C] and,
    with a learned sigma, the variance interpolation v in [C:2C], taken in x's dtype. ``c`` (K,):
    the step's row of ``plan.coefs`` in x's dtype. ``noise`` (B, C, H, W): the step's standard
    normal draw (stochastic plans). ``x0_prev`` (B, C, H, W): the previous step's x0 prediction (DPM-Solver++; zeros at
    step 0, where its coefficient is 0). Pure: reads its arguments, allocates the results.
    """
    C = x.shape[1]
    eps = model_out[:, :C].to(x.dtype)
    x0 = c[0] * x - c[1] * eps
    if plan.clip_denoised:
        x0 = x0.clamp(-1, 1)
    if plan.sampler == "ddpm":
        mean = c[2] * x0 + c[3] * x
        if plan.learned_sigma:
            frac = (model_out[:, C:].to(x.dtype) + 1) / 2
            log_var = frac * c[5] + (1 - frac) * c[4]
        else:
            log_var = c[4]
        return mean + c[6] * torch.exp(0.5 * log_var) * noise, x0
    if plan.sampler == "ddim":
        eps = (c[0] * x - x0) / c[1]
        out = x0 * c[2] + c[3] * eps
        return (out + c[4] * noise if plan.stochastic else out), x0
    return c[2] * x + c[3] * x0 + c[4] * x0_prev, x0
