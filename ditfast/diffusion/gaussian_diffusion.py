"""Gaussian diffusion (DDPM / improved-DDPM / ADM) as used by DiT.

A re-implementation of the official DiT ``diffusion.gaussian_diffusion`` module with the
same public API, the same float64 schedules, the same float32 arithmetic and the same order
of random draws, so a given ``torch.manual_seed`` yields the same samples.

Shape conventions: ``x`` is ``(N, C, ...)`` (usually ``(N, C, H, W)``); ``t`` is an integer
tensor ``(N,)`` of timestep indices into *this* diffusion's schedule (``0 <= t < T``).
Per-timestep coefficients are looked up in float64, cast to float32 and materialised at the
shape of ``x``.
"""

import enum
import math

import numpy as np
import torch

from ..errors import check_float

__all__ = [
    "check_eta",
    "ModelMeanType",
    "ModelVarType",
    "LossType",
    "GaussianDiffusion",
    "get_beta_schedule",
    "get_named_beta_schedule",
    "betas_for_alpha_bar",
    "as_betas",
    "mean_flat",
    "normal_kl",
    "approx_standard_normal_cdf",
    "discretized_gaussian_log_likelihood",
]

_LOG2 = math.log(2.0)


class ModelMeanType(enum.Enum):
    """What the network's (first ``C`` output channels) predicts."""

    PREVIOUS_X = enum.auto()  # x_{t-1} (not supported, as in DiT)
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the noise eps


class ModelVarType(enum.Enum):
    """How the reverse-process variance is chosen.

    ``LEARNED_RANGE``: the network outputs ``v`` in [-1, 1] interpolating (in log space)
    between the posterior variance and beta_t. As in the official DiT code, ``LEARNED`` is
    handled exactly like ``LEARNED_RANGE``.
    """

    LEARNED = enum.auto()
    FIXED_SMALL = enum.auto()
    FIXED_LARGE = enum.auto()
    LEARNED_RANGE = enum.auto()


class LossType(enum.Enum):
    """Training objective."""

    MSE = enum.auto()  # MSE on the mean target (+ VB term when the variance is learned)
    RESCALED_MSE = enum.auto()  # as MSE, VB term scaled by num_timesteps / 1000
    KL = enum.auto()  # variational bound
    RESCALED_KL = enum.auto()  # variational bound times num_timesteps

    def is_vb(self):
        return self in (LossType.KL, LossType.RESCALED_KL)


_LEARNED_VAR_TYPES = (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)


# --------------------------------------------------------------------------- schedules


def get_beta_schedule(beta_schedule, *, beta_start, beta_end, num_diffusion_timesteps):
    """Legacy beta schedules by name; returns a float64 array of shape ``(T,)``.

    Names: "linear", "quad", "const", "jsd" (1/T, 1/(T-1), ..., 1), "warmup10", "warmup50".
    """
    T = num_diffusion_timesteps
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, T, dtype=np.float64)
    if beta_schedule == "quad":
        return np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2
    if beta_schedule == "const":
        return beta_end * np.ones(T, dtype=np.float64)
    if beta_schedule == "jsd":
        return 1.0 / np.linspace(T, 1, T, dtype=np.float64)
    if beta_schedule in ("warmup10", "warmup50"):
        betas = beta_end * np.ones(T, dtype=np.float64)
        warmup = int(T * (0.1 if beta_schedule == "warmup10" else 0.5))
        betas[:warmup] = np.linspace(beta_start, beta_end, warmup, dtype=np.float64)
        return betas
    raise NotImplementedError(f"unknown beta schedule: {beta_schedule}")


def betas_for_alpha_bar(num_diffusion_timesteps, alpha_bar, max_beta=0.999):
    """Discretise a continuous alpha_bar(s), s in [0, 1], into ``T`` betas (float64, ``(T,)``).

    ``beta_i = min(1 - alpha_bar((i+1)/T) / alpha_bar(i/T), max_beta)``.
    """
    T = num_diffusion_timesteps
    return np.array(
        [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
    )


def get_named_beta_schedule(schedule_name, num_diffusion_timesteps):
    """Betas (float64, shape ``(T,)``) for "linear" or "squaredcos_cap_v2".

    "linear" is Ho et al.'s schedule rescaled to ``T`` steps:
    ``linspace(s * 1e-4, s * 0.02, T)`` with ``s = 1000 / T``.
    "squaredcos_cap_v2" is the improved-DDPM cosine schedule capped at beta = 0.999.
    """
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return get_beta_schedule(
            "linear",
            beta_start=scale * 0.0001,
            beta_end=scale * 0.02,
            num_diffusion_timesteps=num_diffusion_timesteps,
        )
    if schedule_name == "squaredcos_cap_v2":
        return betas_for_alpha_bar(
            num_diffusion_timesteps,
            lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2,
        )
    raise NotImplementedError(f"unknown beta schedule: {schedule_name}")


# --------------------------------------------------------------------------- helpers


def mean_flat(tensor):
    """Mean over every dimension but the first: ``(N, ...) -> (N,)``."""
    return tensor.mean(dim=list(range(1, tensor.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats.

    Arguments broadcast; at least one must be a tensor (scalars are allowed for the rest).
    """
    ref = next((a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, torch.Tensor)), None)
    if ref is None:
        raise ValueError("normal_kl: at least one argument must be a torch.Tensor")
    logvar1, logvar2 = (
        v if isinstance(v, torch.Tensor) else torch.tensor(v).to(ref) for v in (logvar1, logvar2)
    )
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + ((mean1 - mean2) ** 2) * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x):
    """Standard normal CDF via the tanh approximation (same shape as ``x``)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    """Log-likelihood (nats) of data ``x`` in [-1, 1] quantised to 256 levels (bins 2/255 wide)
    under N(means, exp(log_scales)^2). All three tensors share one shape; returns that shape.

    The lowest bin (x < -0.999) integrates from -inf, the highest (x > 0.999) to +inf, and
    every probability is clamped at 1e-12 before the log.
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(
            "discretized_gaussian_log_likelihood expects x, means and log_scales of one shape, "
            f"got {tuple(x.shape)}, {tuple(means.shape)}, {tuple(log_scales.shape)}"
        )
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta),
    )


def as_betas(betas):
    """``betas`` as a float64 array ``(T,)``, checked to be non-empty and in (0, 1]."""
    betas = np.array(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size == 0:
        raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
    if not ((betas > 0).all() and (betas <= 1).all()):
        raise ValueError("every beta must lie in (0, 1]")
    return betas


def check_eta(eta) -> float:
    """``eta`` as a float in [0, 1], else a TypeError/ValueError naming it.

    DDIM's noise scale (Song et al., eq. 16) is ``sigma = eta * sqrt((1 - a_prev) / (1 - a)) *
    sqrt(1 - a / a_prev)``, and the step keeps ``sqrt(1 - a_prev - sigma**2)`` of the predicted eps.
    For a decreasing alpha_bar that root is real exactly when eta <= 1 (at eta = 1, sigma**2 is
    (1 - a_prev) (a_prev - a) / ((1 - a) a_prev) <= 1 - a_prev); past 1 it is the root of a
    negative number: NaN samples. eta = 0 is deterministic DDIM, eta = 1 the DDPM posterior noise.
    """
    try:
        return check_float("eta", eta, 0.0, 1.0)
    except ValueError as e:
        raise ValueError(f"{e}: DDIM's update takes sqrt(1 - alpha_bar_prev - sigma**2), which is real only "
                         "for eta <= 1 (larger eta gives NaN samples)") from None


def ddim_eps_coef(alpha_bar_prev, sigma):
    """``sqrt(1 - alpha_bar_prev - sigma**2)``, the weight of eps in a DDIM step. Its argument is
    >= 0 for eta <= 1 (see :func:`check_eta`) but can round to a tiny negative number at eta = 1
    (e.g. 2 steps in float32); it is clamped at 0, the exact value there, instead of giving NaN."""
    return torch.sqrt((1 - alpha_bar_prev - sigma**2).clamp(min=0))


def _check_range(t, size):
    """Raise ValueError unless every timestep in ``t`` lies in [0, size). Only checked for CPU
    tensors: on an accelerator the check would force a device synchronisation."""
    if t.device.type == "cpu" and t.numel():
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= size:
            raise ValueError(f"timesteps must lie in [0, {size - 1}], got min {lo}, max {hi}")


def _default_device(model, noise):
    """Device for sampling when none is given: the model's parameters (also for a bound method
    of a module, e.g. ``model.forward_with_cfg``), else the given noise's device."""
    owner = getattr(model, "__self__", model)
    if hasattr(owner, "parameters"):
        param = next(iter(owner.parameters()), None)
        if param is not None:
            return param.device
    if noise is not None:
        return noise.device
    raise ValueError(
        "cannot infer the sampling device from the model (no parameters); pass device=..."
    )


# --------------------------------------------------------------------------- diffusion


class GaussianDiffusion:
    """Training and sampling utilities for a Gaussian diffusion process.

    :param betas: 1-D sequence of ``T`` betas in (0, 1], for t = 0 .. T-1.
    :param model_mean_type: a :class:`ModelMeanType` (EPSILON or START_X).
    :param model_var_type: a :class:`ModelVarType`.
    :param loss_type: a :class:`LossType`.

    All schedule arrays (``betas``, ``alphas_cumprod``, ``alphas_cumprod_prev``,
    ``alphas_cumprod_next``, ``sqrt_alphas_cumprod``, ``sqrt_one_minus_alphas_cumprod``,
    ``log_one_minus_alphas_cumprod``, ``sqrt_recip_alphas_cumprod``,
    ``sqrt_recipm1_alphas_cumprod``, ``posterior_variance``,
    ``posterior_log_variance_clipped``, ``posterior_mean_coef1``, ``posterior_mean_coef2``)
    are float64 numpy arrays of shape ``(T,)``.
    """

    def __init__(self, *, betas, model_mean_type, model_var_type, loss_type):
        if model_mean_type == ModelMeanType.PREVIOUS_X:
            raise NotImplementedError("ModelMeanType.PREVIOUS_X is not supported (as in DiT)")
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type

        betas = as_betas(betas)
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])

        alphas = 1.0 - betas
        acp = np.cumprod(alphas, axis=0)
        self.alphas_cumprod = acp
        self.alphas_cumprod_prev = np.append(1.0, acp[:-1])
        self.alphas_cumprod_next = np.append(acp[1:], 0.0)

        # q(x_t | x_0)
        self.sqrt_alphas_cumprod = np.sqrt(acp)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - acp)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - acp)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / acp)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / acp - 1)

        # q(x_{t-1} | x_t, x_0). The posterior variance is 0 at t = 0, so its log is
        # "clipped" by repeating the t = 1 value there (needs T >= 2; empty otherwise).
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - acp)
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - acp)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - acp)
        if self.num_timesteps > 1:
            pv1 = self.posterior_variance[1]
            self.posterior_log_variance_clipped = np.log(np.append(pv1, self.posterior_variance[1:]))
            # FIXED_LARGE uses beta_t, except at t = 0 where the posterior variance at t = 1
            # gives a better decoder likelihood.
            self._fixed_large_variance = np.append(pv1, betas[1:])
        else:
            self.posterior_log_variance_clipped = np.array([])
            self._fixed_large_variance = np.array([])
        self._fixed_large_log_variance = np.log(self._fixed_large_variance)
        self._log_betas = np.log(betas)
        self._one_minus_alphas_cumprod = 1.0 - acp

        self._device_tables = {}  # (id(table), device) -> (table, float64 tensor)

    # ----------------------------------------------------------------- lookups

    def _extract(self, table, t, shape):
        """``table[t]`` as float32, materialised as a dense tensor of ``shape``.

        ``table``: float64 numpy array ``(T,)``; ``t``: integer tensor ``(N,)``.
        The float64 table is uploaded once per device and cached. The result is deliberately
        a dense (contiguous) tensor rather than a stride-0 broadcast view: the operands' strides
        decide the memory layout of every result downstream, and ``randn_like(x)`` preserves
        that layout, so a broadcast view would put the same random numbers at different
        positions than the reference implementation does.
        """
        _check_range(t, len(table))
        key = (id(table), t.device)
        cached = self._device_tables.get(key)
        if cached is None or cached[0] is not table:
            cached = (table, torch.from_numpy(table).to(t.device))
            self._device_tables[key] = cached
        res = cached[1][t].float()
        res = res.reshape(res.shape + (1,) * (len(shape) - res.ndim))
        return torch.zeros(shape, device=t.device).add_(res)

    def _check_batch_t(self, x, t):
        """``t`` must be ``(N,)`` for ``x`` of ``(N, ...)`` and index this schedule."""
        if t.shape != (x.shape[0],):
            raise ValueError(
                f"t must have shape ({x.shape[0]},) (one timestep per sample), got {tuple(t.shape)}"
            )
        _check_range(t, self.num_timesteps)

    # ----------------------------------------------------------------- forward process

    def q_mean_variance(self, x_start, t):
        """Moments of q(x_t | x_0): ``(mean, variance, log_variance)``, each of ``x_start``'s shape."""
        shape = x_start.shape
        mean = self._extract(self.sqrt_alphas_cumprod, t, shape) * x_start
        variance = self._extract(self._one_minus_alphas_cumprod, t, shape)
        log_variance = self._extract(self.log_one_minus_alphas_cumprod, t, shape)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None):
        """Sample x_t ~ q(x_t | x_0) (shape of ``x_start``); ``noise`` defaults to randn_like."""
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(
                f"noise shape {tuple(noise.shape)} must equal x_start shape {tuple(x_start.shape)}"
            )
        shape = x_start.shape
        return (
            self._extract(self.sqrt_alphas_cumprod, t, shape) * x_start
            + self._extract(self.sqrt_one_minus_alphas_cumprod, t, shape) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Moments of q(x_{t-1} | x_t, x_0): ``(mean, variance, log_variance_clipped)``,
        each of ``x_t``'s shape."""
        if x_start.shape != x_t.shape:
            raise ValueError(
                f"x_start {tuple(x_start.shape)} and x_t {tuple(x_t.shape)} must have one shape"
            )
        shape = x_t.shape
        mean = (
            self._extract(self.posterior_mean_coef1, t, shape) * x_start
            + self._extract(self.posterior_mean_coef2, t, shape) * x_t
        )
        variance = self._extract(self.posterior_variance, t, shape)
        log_variance = self._extract(self.posterior_log_variance_clipped, t, shape)
        return mean, variance, log_variance

    # ----------------------------------------------------------------- reverse process

    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        """Run ``model(x, t, **model_kwargs)`` and form p(x_{t-1} | x_t).

        :param x: ``(N, C, ...)`` samples at step ``t``; ``t``: ``(N,)``.
        :param clip_denoised: clamp the x_0 prediction to [-1, 1].
        :param denoised_fn: applied to the x_0 prediction before clipping.
        :return: dict with "mean", "variance", "log_variance", "pred_xstart" (each ``x``'s
            shape) and "extra" (second item of a tuple-valued model output, else None).
            For learned variances the model must return ``(N, 2C, ...)``.
        """
        if model_kwargs is None:
            model_kwargs = {}
        B, C = x.shape[:2]
        self._check_batch_t(x, t)
        if self.num_timesteps < 2:
            raise ValueError("the reverse process needs a diffusion with at least 2 timesteps")

        model_output = model(x, t, **model_kwargs)
        extra = None
        if isinstance(model_output, tuple):
            model_output, extra = model_output

        if self.model_var_type in _LEARNED_VAR_TYPES:
            expected = (B, 2 * C, *x.shape[2:])
            if model_output.shape != expected:
                raise ValueError(
                    f"with a learned variance the model output must have shape {expected} "
                    f"(mean channels then variance channels), got {tuple(model_output.shape)}"
                )
            model_output, var_values = torch.split(model_output, C, dim=1)
            min_log = self._extract(self.posterior_log_variance_clipped, t, x.shape)
            max_log = self._extract(self._log_betas, t, x.shape)
            frac = (var_values + 1) / 2  # v in [-1, 1] -> [min_log, max_log]
            model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = torch.exp(model_log_variance)
        else:
            if model_output.shape != x.shape:
                raise ValueError(
                    f"with a fixed variance the model output must have shape {tuple(x.shape)}, "
                    f"got {tuple(model_output.shape)}"
                )
            if self.model_var_type == ModelVarType.FIXED_LARGE:
                var_table, log_var_table = self._fixed_large_variance, self._fixed_large_log_variance
            else:
                var_table, log_var_table = self.posterior_variance, self.posterior_log_variance_clipped
            model_variance = self._extract(var_table, t, x.shape)
            model_log_variance = self._extract(log_var_table, t, x.shape)

        if self.model_mean_type == ModelMeanType.START_X:
            pred_xstart = model_output
        else:
            pred_xstart = self._predict_xstart_from_eps(x_t=x, t=t, eps=model_output)
        if denoised_fn is not None:
            pred_xstart = denoised_fn(pred_xstart)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        model_mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)

        return {
            "mean": model_mean,
            "variance": model_variance,
            "log_variance": model_log_variance,
            "pred_xstart": pred_xstart,
            "extra": extra,
        }

    def _predict_xstart_from_eps(self, x_t, t, eps):
        if x_t.shape != eps.shape:
            raise ValueError(f"eps shape {tuple(eps.shape)} must equal x_t shape {tuple(x_t.shape)}")
        return (
            self._extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps
        )

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return (
            self._extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart
        ) / self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape)

    def condition_mean(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Shift the mean by variance * grad log p(y | x) (Sohl-Dickstein et al.).

        ``cond_fn(x, t, **model_kwargs)`` returns the gradient, shape of ``x``.
        Returns the new mean (float32, shape of ``x``).
        """
        gradient = cond_fn(x, t, **(model_kwargs or {}))
        return p_mean_var["mean"].float() + p_mean_var["variance"] * gradient.float()

    def condition_score(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Condition the score instead (Song et al.): eps -= sqrt(1 - alpha_bar) * cond_fn(...).

        Returns a copy of ``p_mean_var`` with "pred_xstart" and "mean" recomputed.
        """
        alpha_bar = self._extract(self.alphas_cumprod, t, x.shape)
        eps = self._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - (1 - alpha_bar).sqrt() * cond_fn(x, t, **(model_kwargs or {}))
        out = p_mean_var.copy()
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(x_start=out["pred_xstart"], x_t=x, t=t)
        return out

    def p_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None,
                 model_kwargs=None):
        """One ancestral step x_t -> x_{t-1}.

        Calls the model, then draws exactly one ``randn_like(x)`` (even where ``t == 0``, where
        it is multiplied by zero). Returns dict "sample" and "pred_xstart", shape of ``x``.
        """
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            model_kwargs=model_kwargs,
        )
        noise = torch.randn_like(x)
        nonzero_mask = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs=model_kwargs)
        sample = out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                      cond_fn=None, model_kwargs=None, device=None, progress=False):
        """Ancestral sampling from pure noise; returns the final ``shape`` tensor.

        :param shape: ``(N, C, H, W)`` as a tuple or list.
        :param noise: starting x_T of that shape; when None one ``randn(*shape)`` is drawn.
        :param device: defaults to the model's parameter device.
        :param progress: show a tqdm progress bar.
        """
        final = None
        for final in self.p_sample_loop_progressive(
            model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            cond_fn=cond_fn, model_kwargs=model_kwargs, device=device, progress=progress,
        ):
            pass
        return final["sample"]

    def p_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True,
                                  denoised_fn=None, cond_fn=None, model_kwargs=None, device=None,
                                  progress=False):
        """Like :meth:`p_sample_loop` but yields each step's :meth:`p_sample` dict."""
        yield from self._reverse_loop(
            self.p_sample, model, shape, noise, device, progress,
            clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
            model_kwargs=model_kwargs,
        )

    def _reverse_loop(self, step, model, shape, noise, device, progress, **step_kwargs):
        """Shared sampler loop: x_T = ``noise`` or one ``randn(*shape, device=device)``, then
        ``out = step(model, x, t, **step_kwargs)`` for i = T-1 .. 0 with ``t = [i] * N``,
        under ``torch.no_grad``; yields every ``out``."""
        if not isinstance(shape, (tuple, list)):
            raise ValueError(f"shape must be a tuple or list, got {type(shape).__name__}")
        if device is None:
            device = _default_device(model, noise)
        if noise is not None:
            if tuple(noise.shape) != tuple(shape):
                raise ValueError(
                    f"noise shape {tuple(noise.shape)} does not match shape {tuple(shape)}"
                )
            img = noise
        else:
            img = torch.randn(*shape, device=device)
        indices = range(self.num_timesteps - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm  # lazy: tqdm is only needed for progress bars

            indices = tqdm(indices)
        for i in indices:
            t = torch.full((shape[0],), i, dtype=torch.long, device=device)
            with torch.no_grad():
                out = step(model, img, t, **step_kwargs)
                yield out
                img = out["sample"]

    def _ddim_prediction(self, model, x, t, clip_denoised, denoised_fn, cond_fn, model_kwargs):
        """The model's prediction at (x, t) (score-guided by ``cond_fn`` if given) and eps re-derived
        from its (possibly clipped) x_0 prediction: what a DDIM step, either way, starts from."""
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            model_kwargs=model_kwargs,
        )
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        return out, self._predict_eps_from_xstart(x, t, out["pred_xstart"])

    def ddim_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None,
                    model_kwargs=None, eta=0.0):
        """One DDIM step x_t -> x_{t-1} (eq. 12 of Song et al.), ``eta`` scaling the noise.

        Calls the model (then ``cond_fn`` via :meth:`condition_score`), then draws exactly one
        ``randn_like(x)``. Returns dict "sample" and "pred_xstart", shape of ``x``. ``eta`` must lie
        in [0, 1] (:func:`check_eta`).
        """
        eta = check_eta(eta)
        out, eps = self._ddim_prediction(model, x, t, clip_denoised, denoised_fn, cond_fn, model_kwargs)
        alpha_bar = self._extract(self.alphas_cumprod, t, x.shape)
        alpha_bar_prev = self._extract(self.alphas_cumprod_prev, t, x.shape)
        sigma = (
            eta
            * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
            * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        )
        noise = torch.randn_like(x)
        mean_pred = (
            out["pred_xstart"] * torch.sqrt(alpha_bar_prev)
            + ddim_eps_coef(alpha_bar_prev, sigma) * eps
        )
        nonzero_mask = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        sample = mean_pred + nonzero_mask * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None,
                            model_kwargs=None, eta=0.0):
        """One deterministic DDIM inversion step x_t -> x_{t+1} (``eta`` must be 0).

        Returns dict "sample" and "pred_xstart", shape of ``x``. Draws no randoms.
        """
        if eta != 0.0:
            raise ValueError("ddim_reverse_sample is deterministic: eta must be 0.0")
        out, eps = self._ddim_prediction(model, x, t, clip_denoised, denoised_fn, cond_fn, model_kwargs)
        alpha_bar_next = self._extract(self.alphas_cumprod_next, t, x.shape)
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_next) + torch.sqrt(1 - alpha_bar_next) * eps
        return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                         cond_fn=None, model_kwargs=None, device=None, progress=False, eta=0.0):
        """DDIM sampling; same arguments as :meth:`p_sample_loop` plus ``eta``.
        Returns the final ``shape`` tensor."""
        final = None
        for final in self.ddim_sample_loop_progressive(
            model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            cond_fn=cond_fn, model_kwargs=model_kwargs, device=device, progress=progress, eta=eta,
        ):
            pass
        return final["sample"]

    def ddim_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True,
                                     denoised_fn=None, cond_fn=None, model_kwargs=None,
                                     device=None, progress=False, eta=0.0):
        """Like :meth:`ddim_sample_loop` but yields each step's :meth:`ddim_sample` dict (``eta`` is
        checked now, not at the first step)."""
        check_eta(eta)
        return self._reverse_loop(
            self.ddim_sample, model, shape, noise, device, progress,
            clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
            model_kwargs=model_kwargs, eta=eta,
        )

    # ----------------------------------------------------------------- likelihood / losses

    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
        """One variational-bound term in bits per dim.

        :return: dict "output" ``(N,)`` -- the decoder NLL where ``t == 0``, else
            KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) -- and "pred_xstart" (shape of x).
        """
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)
        out = self.p_mean_variance(
            model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs
        )
        kl = normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / _LOG2
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / _LOG2
        return {"output": torch.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Per-sample training losses at timesteps ``t``.

        :param x_start: ``(N, C, ...)`` clean data; ``t``: ``(N,)``; ``noise``: the eps used
            for x_t (one ``randn_like(x_start)`` when None).
        :return: dict of ``(N,)`` tensors: "loss"; with an MSE loss also "mse", and "vb" when
            the variance is learned. The vb term sees the mean output detached, so it only
            trains the variance channels.
        """
        if model_kwargs is None:
            model_kwargs = {}
        self._check_batch_t(x_start, t)
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)

        terms = {}
        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(
                model=model, x_start=x_start, x_t=x_t, t=t, clip_denoised=False,
                model_kwargs=model_kwargs,
            )["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] *= self.num_timesteps
        elif self.loss_type in (LossType.MSE, LossType.RESCALED_MSE):
            model_output = model(x_t, t, **model_kwargs)
            if self.model_var_type in _LEARNED_VAR_TYPES:
                B, C = x_t.shape[:2]
                expected = (B, 2 * C, *x_t.shape[2:])
                if model_output.shape != expected:
                    raise ValueError(
                        f"with a learned variance the model output must have shape {expected}, "
                        f"got {tuple(model_output.shape)}"
                    )
                model_output, var_values = torch.split(model_output, C, dim=1)
                frozen_out = torch.cat([model_output.detach(), var_values], dim=1)
                terms["vb"] = self._vb_terms_bpd(
                    model=lambda *args, r=frozen_out: r,
                    x_start=x_start, x_t=x_t, t=t, clip_denoised=False,
                )["output"]
                if self.loss_type == LossType.RESCALED_MSE:
                    # Keeps the VB term from swamping the MSE term (improved DDPM).
                    terms["vb"] *= self.num_timesteps / 1000.0
            target = x_start if self.model_mean_type == ModelMeanType.START_X else noise
            if model_output.shape != target.shape:
                raise ValueError(
                    f"model output {tuple(model_output.shape)} does not match the target "
                    f"shape {tuple(target.shape)}"
                )
            terms["mse"] = mean_flat((target - model_output) ** 2)
            terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        else:
            raise NotImplementedError(self.loss_type)
        return terms

    def _prior_bpd(self, x_start):
        """KL(q(x_T | x_0) || N(0, I)) in bits per dim, shape ``(N,)``."""
        t = torch.full(
            (x_start.shape[0],), self.num_timesteps - 1, dtype=torch.long, device=x_start.device
        )
        qt_mean, _, qt_log_variance = self.q_mean_variance(x_start, t)
        kl_prior = normal_kl(mean1=qt_mean, logvar1=qt_log_variance, mean2=0.0, logvar2=0.0)
        return mean_flat(kl_prior) / _LOG2

    def calc_bpd_loop(self, model, x_start, clip_denoised=True, model_kwargs=None):
        """Full variational bound of ``x_start`` ``(N, C, ...)`` in bits per dim.

        For t = T-1 .. 0 draws one ``randn_like(x_start)``, diffuses and evaluates the model.
        :return: dict "total_bpd" ``(N,)``, "prior_bpd" ``(N,)``, and per-timestep ``(N, T)``
            "vb", "xstart_mse", "mse" (columns in the order t = T-1 .. 0).
        """
        vb, xstart_mse, mse = [], [], []
        for i in range(self.num_timesteps - 1, -1, -1):
            t = torch.full((x_start.shape[0],), i, dtype=torch.long, device=x_start.device)
            noise = torch.randn_like(x_start)
            x_t = self.q_sample(x_start=x_start, t=t, noise=noise)
            with torch.no_grad():
                out = self._vb_terms_bpd(
                    model, x_start=x_start, x_t=x_t, t=t, clip_denoised=clip_denoised,
                    model_kwargs=model_kwargs,
                )
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self._predict_eps_from_xstart(x_t, t, out["pred_xstart"])
            mse.append(mean_flat((eps - noise) ** 2))

        vb = torch.stack(vb, dim=1)
        prior_bpd = self._prior_bpd(x_start)
        return {
            "total_bpd": vb.sum(dim=1) + prior_bpd,
            "prior_bpd": prior_bpd,
            "vb": vb,
            "xstart_mse": torch.stack(xstart_mse, dim=1),
            "mse": torch.stack(mse, dim=1),
        }
