"""Gaussian diffusion for DiT: a drop-in for the official DiT ``diffusion`` package."""

from . import gaussian_diffusion as gd  # noqa: F401  (the official package exposes `gd`)
from .gaussian_diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    get_named_beta_schedule,
)
from ..errors import check_bool, check_choice, check_int
from .respace import SpacedDiffusion, _parse_counts, space_timesteps

SCHEDULES = ("linear", "squaredcos_cap_v2")  # the names get_named_beta_schedule knows

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
    :param diffusion_steps: T >= 1, the length of the base process.

    Every argument is checked before anything is built (a TypeError or ValueError naming it); an
    int ``timestep_respacing`` (250) is taken as the string count ("250").
    """
    diffusion_steps = check_int("diffusion_steps", diffusion_steps, min=1)
    check_choice("noise_schedule", noise_schedule, SCHEDULES)
    for name, flag in (("use_kl", use_kl), ("sigma_small", sigma_small), ("predict_xstart", predict_xstart),
                       ("learn_sigma", learn_sigma), ("rescale_learned_sigmas", rescale_learned_sigmas)):
        check_bool(name, flag)
    if timestep_respacing is not None and timestep_respacing != "":
        _parse_counts(timestep_respacing)  # the spec's form; space_timesteps checks it against T
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
