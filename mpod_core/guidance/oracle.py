"""An oracle denoiser: a Gaussian data distribution whose optimal noise
prediction is known in closed form, so SDS can be tested without weights.

Data (in latent space): conditional ``x0 ~ N(mu, sigma^2 I)``, unconditional
``x0 ~ N(mu_u, sigma_u^2 I)`` (default ``N(0, I)``). Then
``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps ~ N(sqrt(abar) m, abar s^2 + 1 - abar)``
and the Bayes-optimal (MMSE) noise prediction is, element-wise::

    E[eps | x_t] = sqrt(1 - abar) * (x_t - sqrt(abar) * m) / (abar * s^2 + 1 - abar)

With guidance scale g: ``eps_u + g * (eps_c - eps_u)``. Averaged over the noise,
the SDS gradient at latents x is ``w sqrt(abar (1 - abar)) (x - mu) / (abar sigma^2
+ 1 - abar)`` for g = 1, so descent moves x straight to ``mu``. (For g > 1 the
fixed point depends on t and lies beyond ``mu``, away from ``mu_u``: the
over-saturation CFG is known for.)

``encode`` maps images in [0, 1] to ``latents = 2 * images - 1`` (the data range
of pixel diffusion models; differentiable, any channel count), so a target image
``img`` in [0, 1] is the latent target ``2 * img - 1``: see :meth:`OracleDenoiser.from_images`.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .protocol import ViewCondition

#: ``target_fn(views, batch) -> (B, C, h, w)`` (or (C, h, w)) latent means per sample.
TargetFn = Callable[[Optional[ViewCondition], int], torch.Tensor]


def scaled_linear_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                                 beta_end: float = 0.012) -> torch.Tensor:
    """Stable Diffusion's schedule: ``betas = linspace(sqrt(b0), sqrt(b1), T)^2``,
    ``abar = cumprod(1 - betas)``. Returns (T,) float32 (computed in float64)."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps,
                           dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, 0).to(torch.float32)


def gaussian_optimal_eps(latents_t: torch.Tensor, abar: torch.Tensor, mean, std) -> torch.Tensor:
    """``E[eps | x_t]`` for data ``x0 ~ N(mean, std^2)`` (element-wise); ``abar`` broadcasts
    against ``latents_t`` (e.g. (B, 1, 1, 1)), ``mean`` and ``std`` too."""
    var_t = abar * std ** 2 + (1.0 - abar)
    return (1.0 - abar).sqrt() * (latents_t - abar.sqrt() * mean) / var_t


class OracleDenoiser:
    """The Gaussian oracle (module docstring) implementing the Denoiser protocol.

    Args:
        target: (C, h, w) or (B, C, h, w) conditional mean ``mu`` in latent space.
        sigma: conditional standard deviation (> 0); small values make SDS
            nearly deterministic (the noise part of the gradient scales with sigma^2).
        alphas_cumprod: (T,) schedule; default :func:`scaled_linear_alphas_cumprod`.
        uncond_mean: ``mu_u`` (a number or a tensor broadcasting to the latents).
        uncond_sigma: ``sigma_u`` (> 0).
        target_fn: per-view means instead of ``target``: ``target_fn(views, B)``
            returns (B, C, h, w) latents (e.g. ``2 * render - 1`` of a known mesh
            seen from each camera). Exactly one of ``target`` and ``target_fn``.
    """

    def __init__(self, target: Optional[torch.Tensor] = None, sigma: float = 0.05,
                 alphas_cumprod: Optional[torch.Tensor] = None, *, uncond_mean=0.0,
                 uncond_sigma: float = 1.0, target_fn: Optional[TargetFn] = None):
        if (target is None) == (target_fn is None):
            raise ValueError("OracleDenoiser needs exactly one of target and target_fn")
        if target is not None and (not isinstance(target, torch.Tensor) or target.ndim not in (3, 4)):
            shape = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
            raise ValueError(f"target: expected (C, h, w) or (B, C, h, w), got {shape}")
        if not sigma > 0 or not uncond_sigma > 0:
            raise ValueError(f"sigma and uncond_sigma must be > 0, got {sigma} and {uncond_sigma}")
        self.target = target
        self.target_fn = target_fn
        self.sigma = float(sigma)
        self.uncond_mean = uncond_mean
        self.uncond_sigma = float(uncond_sigma)
        if alphas_cumprod is None:
            alphas_cumprod = scaled_linear_alphas_cumprod()
        self.alphas_cumprod = alphas_cumprod.to(torch.float32)

    @classmethod
    def from_images(cls, target_images: torch.Tensor, sigma: float = 0.05, **kwargs) -> "OracleDenoiser":
        """An oracle whose conditional mean is ``encode(target_images)``;
        ``target_images``: (C, H, W) or (B, C, H, W) in [0, 1]."""
        return cls(target_images * 2.0 - 1.0, sigma, **kwargs)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (any channel count) -> latents ``2 * images - 1`` (differentiable)."""
        return images * 2.0 - 1.0

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`encode`: ``(latents + 1) / 2``."""
        return (latents + 1.0) * 0.5

    def mean(self, views: Optional[ViewCondition], batch: int) -> torch.Tensor:
        """The conditional mean ``mu`` for each sample: (B, C, h, w) or broadcastable."""
        if self.target_fn is not None:
            return self.target_fn(views, batch)
        return self.target

    def predict_noise(self, latents_t: torch.Tensor, t: torch.Tensor, guidance_scale: float,
                      views: Optional[ViewCondition] = None) -> torch.Tensor:
        """Guided optimal prediction ``eps_u + s * (eps_c - eps_u)`` (see the module docstring).

        Args:
            latents_t: (B, C, h, w).
            t: (B,) int64 in [0, T).
            guidance_scale: s.
            views: passed to ``target_fn``.

        Returns:
            (B, C, h, w), in the dtype of ``latents_t``.
        """
        b = latents_t.shape[0]
        abar = self.alphas_cumprod.to(latents_t.device)[t.to(latents_t.device)]
        abar = abar.to(latents_t.dtype).reshape(b, *([1] * (latents_t.ndim - 1)))
        mu = torch.as_tensor(self.mean(views, b), dtype=latents_t.dtype, device=latents_t.device)
        if mu.ndim == 3:
            mu = mu.unsqueeze(0)
        if mu.shape[1:] != latents_t.shape[1:] or mu.shape[0] not in (1, b):
            rest = ", ".join(map(str, latents_t.shape[1:]))
            raise ValueError(f"oracle target: expected (1 or {b}, {rest}) like the latents, "
                             f"got {tuple(mu.shape)}")
        mu_u = torch.as_tensor(self.uncond_mean, dtype=latents_t.dtype, device=latents_t.device)
        eps_c = gaussian_optimal_eps(latents_t, abar, mu, self.sigma)
        if guidance_scale == 1.0:
            return eps_c
        eps_u = gaussian_optimal_eps(latents_t, abar, mu_u, self.uncond_sigma)
        return eps_u + guidance_scale * (eps_c - eps_u)
