"""Diffusion guidance for 3D optimisation: the denoiser protocol, score
distillation (SDS, with the VSD hook), a Gaussian oracle denoiser for tests and
a diffusers adapter (diffusers is never imported by the pack itself).

Public API::

    Denoiser, ViewCondition, NoiseBaseline                (protocol)
    SDSConfig, SDSOutput, Weighting, WEIGHTINGS
    sds_loss(latents, denoiser, config, step=0, views=None, generator=None, baseline=None,
             *, t=None, noise=None, guard=None) -> SDSOutput
    sds_image_loss(images, denoiser, config, ...)  -> SDSOutput
    NonFiniteGuard, NonFiniteGuidanceError            (stops a loop whose guidance returns NaN)
    timestep_bounds(config, step, num_train_timesteps) -> (lo, hi)
    sds_weight(alphas_cumprod_t, weighting) -> w(t)
    OracleDenoiser, scaled_linear_alphas_cumprod, gaussian_optimal_eps
    DiffusersDenoiser
"""
from .diffusers_adapter import DiffusersDenoiser
from .oracle import OracleDenoiser, gaussian_optimal_eps, scaled_linear_alphas_cumprod
from .protocol import Denoiser, NoiseBaseline, ViewCondition
from .sds import (WEIGHTINGS, NonFiniteGuard, NonFiniteGuidanceError, SDSConfig, SDSOutput, Weighting,
                  sds_image_loss, sds_loss, sds_weight, timestep_bounds)

__all__ = ["WEIGHTINGS", "Denoiser", "DiffusersDenoiser", "NoiseBaseline", "NonFiniteGuard",
           "NonFiniteGuidanceError", "OracleDenoiser",
           "SDSConfig", "SDSOutput", "ViewCondition", "Weighting", "gaussian_optimal_eps",
           "scaled_linear_alphas_cumprod", "sds_image_loss", "sds_loss", "sds_weight",
           "timestep_bounds"]
