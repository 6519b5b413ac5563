"""Gaussian diffusion for DiT: a drop-in for the official DiT ``diffusion`` package."""

from . import gaussian_diffusion as gd  # noqa: F401  (the official package exposes `gd`)
from .gaussian_diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    get_named_beta_schedule,
)
from .respace import SpacedDiffusion, space_timesteps

__all__ = [
    "create_diffusion",
    "GaussianDiffusion",
    "SpacedDiffusion",
    "space_timesteps",
    "get_named_beta_schedule",
    "ModelMeanType",
    "ModelVarType",
    "LossType",
]


def create_diffusion(
    timestep_respacing,
    noise_schedule="linear",
    use_kl=False,
    sigma_small=False,
    predict_xstart=False,
    learn_sigma=True,
    rescale_learned_sigmas=False,
    diffusion_steps=1000,
):
    """Build the DiT diffusion: a :class:`SpacedDiffusion` over ``diffusion_steps`` steps.

    :param timestep_respacing: "" or None for all steps, else a :func:`space_timesteps`
        spec such as "250" or "ddim50".
    :param noise_schedule: "linear" or "squaredcos_cap_v2".
    :param use_kl: train on the (rescaled) variational bound (``LossType.RESCALED_KL``).
    :param sigma_small: with ``learn_sigma=False``, use FIXED_SMALL instead of FIXED_LARGE.
    :param predict_xstart: the model predicts x_0 instead of eps.
    :param learn_sigma: the model outputs 2C channels, the second half a LEARNED_RANGE value.
    :param rescale_learned_sigmas: ``LossType.RESCALED_MSE`` (when not ``use_kl``).
    """
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    if use_kl:
        loss_type = LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = LossType.RESCALED_MSE
    else:
        loss_type = LossType.MSE
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    if learn_sigma:
        var_type = ModelVarType.LEARNED_RANGE
    else:
        var_type = ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        use_timesteps=space_timesteps(diffusion_steps, timestep_respacing),
        betas=betas,
        model_mean_type=ModelMeanType.START_X if predict_xstart else ModelMeanType.EPSILON,
        model_var_type=var_type,
        loss_type=loss_type,
    )
