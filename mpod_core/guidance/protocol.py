"""The denoiser protocol: what score distillation needs from a diffusion model.

Two adapters implement it: one over ComfyUI's MODEL/VAE/CLIP_VISION values
(``nodes/comfy_bridge/diffusion.py``) and one over diffusers models
(:mod:`mpod_core.guidance.diffusers_adapter`); :class:`OracleDenoiser` in
:mod:`mpod_core.guidance.oracle` has a known optimum for tests.

Conventions (DDPM, epsilon parameterisation, discrete timesteps):
``x_t = sqrt(abar_t) * x_0 + sqrt(1 - abar_t) * eps`` for integer
``t in [0, T)``, ``abar = alphas_cumprod``. A model's fixed conditioning
(prompt embeddings, the reference image of Zero123, ...) is bound when the
adapter is built; what changes from step to step (the camera of each sample,
relative to the reference view) travels in :class:`ViewCondition`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Protocol, runtime_checkable

import torch


@dataclass
class ViewCondition:
    """The camera of each sample in a batch, in the pack's orbit convention
    (:mod:`mpod_core.cameras`: degrees; azimuth counter-clockwise from above).

    Attributes:
        elevation: (B,) degrees above the horizon.
        azimuth: (B,) degrees.
        distance: (B,) distance from the origin.
        extras: per-view inputs of the model's patches, ``{key: (B, ...) tensor}``, one entry per
            sample in the same order (e.g. the MRCA outline mask of each camera under
            :data:`mpod_core.guidance.mrca.MASK_OPTION_KEY`). The ComfyUI adapter puts them in the
            ``transformer_options`` of that noise prediction only, where attention patches read
            them; adapters without patches ignore them.
    """

    elevation: torch.Tensor
    azimuth: torch.Tensor
    distance: torch.Tensor
    extras: Dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        for key, value in self.extras.items():
            if not isinstance(value, torch.Tensor) or value.shape[:1] != self.elevation.shape[:1]:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"views.extras[{key!r}]: expected one entry per view "
                                 f"({self.elevation.shape[0]}), got {shape}")

    def __len__(self) -> int:
        return self.elevation.shape[0]


@runtime_checkable
class Denoiser(Protocol):
    """A latent (or pixel) diffusion model as score distillation sees it."""

    #: (T,) float32 cumulative products of (1 - beta), on the model's device.
    alphas_cumprod: torch.Tensor

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [0, 1] -> (B, C, h, w) latents (already scaled
        by the VAE's scaling factor). Differentiable w.r.t. ``images``."""
        ...

    def predict_noise(self, latents_t: torch.Tensor, t: torch.Tensor, guidance_scale: float,
                      views: Optional[ViewCondition] = None) -> torch.Tensor:
        """Noise prediction with classifier-free guidance.

        Args:
            latents_t: (B, C, h, w) noisy latents.
            t: (B,) int64 timesteps in [0, T).
            guidance_scale: s in ``eps_u + s * (eps_c - eps_u)`` (ComfyUI/diffusers
                convention; s = 1 is the conditional prediction alone).
            views: the camera of each sample, for view-conditioned models (text
                models ignore the camera), and its per-view ``extras`` for the
                model's patches (e.g. the MRCA mask).

        Returns:
            (B, C, h, w) predicted noise. Called under ``torch.no_grad()`` by SDS;
            implementations need not support autograd here.
        """
        ...


#: The VSD hook of :func:`mpod_core.guidance.sds.sds_loss`: a second noise
#: predictor ``baseline(latents_t, t, views) -> (B, C, h, w)`` whose prediction
#: replaces the sampled noise in ``grad = w(t) * (eps_pred - baseline)``
#: (ProlificDreamer's VSD uses a LoRA copy of the model trained on the current
#: renders; ThemeStation's DSD uses it too). Same arguments and conventions as
#: :meth:`Denoiser.predict_noise` minus the guidance scale; called under
#: ``torch.no_grad()``.
NoiseBaseline = Callable[[torch.Tensor, torch.Tensor, Optional[ViewCondition]], torch.Tensor]
