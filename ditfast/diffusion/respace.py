"""Timestep respacing: run a diffusion on a subset of its original timesteps.

Drop-in for the official DiT ``diffusion.respace`` module (no timestep rescaling: the model
always sees the original timestep values, 0 .. T-1).
"""

import numbers

import numpy as np
import torch

from ..errors import check_int
from .gaussian_diffusion import GaussianDiffusion, as_betas

__all__ = ["space_timesteps", "SpacedDiffusion"]


def space_timesteps(num_timesteps, section_counts):
    """Choose which of the ``num_timesteps`` original steps to keep; returns a set of ints.

    :param section_counts: "ddimN" -- the integer stride ``s`` (smallest in 1 .. T-1) with
        ``len(range(0, T, s)) == N``, keeping ``range(0, T, s)``; or a comma-separated string /
        list of counts: T is split into that many near-equal consecutive sections (the first
        ``T % n`` get one extra step) and ``count`` steps are taken from each with a fractional
        stride ``(size - 1) / (count - 1)`` (accumulated in floating point and rounded), so a
        section's first and last steps are always kept. E.g. "250" over 1000 keeps 250 steps
        from 0 to 999 inclusive.
    :raises ValueError: when no stride gives exactly N steps, or a count exceeds its section;
        TypeError/ValueError naming ``section_counts`` for a spec that is none of the above.
    """
    num_timesteps = check_int("num_timesteps", num_timesteps, min=1)
    section_counts = _parse_counts(section_counts)
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(
                f"cannot take exactly {desired} steps out of {num_timesteps} with an integer stride"
            )
        section_counts = [int(c) for c in section_counts.split(",")]

    n_sections = len(section_counts)
    if n_sections == 0:
        raise ValueError("section_counts must name at least one section")
    size_per, extra = divmod(num_timesteps, n_sections)
    steps = set()
    start = 0
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if count < 0:
            raise ValueError(f"section counts must be non-negative, got {count}")
        if count > size:
            raise ValueError(
                f"cannot take {count} steps from section {i} of {size} steps "
                f"({num_timesteps} steps split into {n_sections} sections)"
            )
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        # Accumulate the fractional index exactly like the reference implementation: for
        # some counts, k * stride rounds differently from repeated addition.
        idx = 0.0
        for _ in range(count):
            steps.add(start + round(idx))
            idx += stride
        start += size
    return steps


_SPEC = 'a count such as "250", comma-separated counts such as "10,15,20", "ddimN", or a list of ints'


def _parse_counts(spec):
    """``spec`` checked: a "ddimN" string (returned as is), or the section counts as a list of ints
    (from a comma-separated string, a list/tuple of ints, or one int)."""
    if isinstance(spec, str):
        text = spec.strip()
        if text.startswith("ddim"):
            if not text[len("ddim"):].isdigit() or int(text[len("ddim"):]) < 1:
                raise ValueError(f"timestep_respacing {spec!r}: ddim needs a positive step count, e.g. \"ddim50\"")
            return text
        parts = [p.strip() for p in text.split(",")]
        if not all(p.isdigit() for p in parts):
            raise ValueError(f"timestep_respacing must be {_SPEC}; got {spec!r}")
        return [int(p) for p in parts]
    if isinstance(spec, bool):
        raise TypeError(f"timestep_respacing must be {_SPEC}; got {spec!r} (bool)")
    if isinstance(spec, numbers.Integral):
        return [check_int("timestep_respacing", spec, min=1)]
    if isinstance(spec, (list, tuple)):
        return [check_int(f"timestep_respacing[{i}]", c, min=0) for i, c in enumerate(spec)]
    raise TypeError(f"timestep_respacing must be {_SPEC}; got {type(spec).__name__}")


class SpacedDiffusion(GaussianDiffusion):
    """A :class:`GaussianDiffusion` restricted to ``use_timesteps`` of a base process.

    :param use_timesteps: collection of original timesteps to keep (0 .. T-1).
    :param kwargs: the base process's ``GaussianDiffusion`` keyword arguments (``betas`` of
        length T, ...).

    The kept steps, sorted, are ``timestep_map``; step k gets
    ``beta_k = 1 - alphas_cumprod[map[k]] / alphas_cumprod[map[k-1]]`` (1 for k = 0), so the
    kept marginals q(x_t | x_0) are unchanged. Models (and ``cond_fn``) passed to
    ``p_mean_variance``, ``training_losses``, ``condition_mean`` and ``condition_score`` are
    called with the original timestep values ``timestep_map[t]``.
    """

    def __init__(self, use_timesteps, **kwargs):
        base_betas = as_betas(kwargs["betas"])
        self.use_timesteps = set(use_timesteps)
        self.original_num_steps = len(base_betas)
        if not self.use_timesteps:
            raise ValueError("use_timesteps must keep at least one timestep")
        outside = [s for s in self.use_timesteps if not 0 <= s < self.original_num_steps]
        if outside:
            raise ValueError(
                f"use_timesteps must lie in [0, {self.original_num_steps - 1}], got {sorted(outside)}"
            )
        self.timestep_map = sorted(self.use_timesteps)

        base_alphas_cumprod = np.cumprod(1.0 - base_betas, axis=0)
        kept = base_alphas_cumprod[self.timestep_map]
        kwargs["betas"] = 1 - kept / np.append(1.0, kept[:-1])
        super().__init__(**kwargs)
        self._map_tensors = {}  # (device, dtype) -> timestep_map as a tensor, shared by wrappers

    def p_mean_variance(self, model, *args, **kwargs):
        return super().p_mean_variance(self._wrap_model(model), *args, **kwargs)

    def training_losses(self, model, *args, **kwargs):
        return super().training_losses(self._wrap_model(model), *args, **kwargs)

    def condition_mean(self, cond_fn, *args, **kwargs):
        return super().condition_mean(self._wrap_model(cond_fn), *args, **kwargs)

    def condition_score(self, cond_fn, *args, **kwargs):
        return super().condition_score(self._wrap_model(cond_fn), *args, **kwargs)

    def _wrap_model(self, model):
        """Return ``model`` taking respaced indices; an already wrapped model is returned as is."""
        if isinstance(model, _WrappedModel):
            return model
        return _WrappedModel(model, self.timestep_map, self.original_num_steps, self._map_tensors)


class _WrappedModel:
    """Calls ``model(x, timestep_map[ts], **kwargs)``: respaced index -> original timestep."""

    def __init__(self, model, timestep_map, original_num_steps, map_tensors=None):
        self.model = model
        self.timestep_map = timestep_map
        self.original_num_steps = original_num_steps
        # (device, dtype) -> timestep_map as a tensor; SpacedDiffusion shares one cache.
        self._map_tensors = {} if map_tensors is None else map_tensors

    def __call__(self, x, ts, **kwargs):
        key = (ts.device, ts.dtype)
        map_tensor = self._map_tensors.get(key)
        if map_tensor is None:
            map_tensor = torch.tensor(self.timestep_map, device=ts.device, dtype=ts.dtype)
            self._map_tensors[key] = map_tensor
        return self.model(x, map_tensor[ts], **kwargs)
