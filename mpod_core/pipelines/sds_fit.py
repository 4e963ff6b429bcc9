"""SDS Image Fit: optimise an image by score distillation alone.

The smallest real use of a denoiser: start from an image, follow the SDS
gradient toward what the diffusion model (a prompt, or a Zero123 view of a
reference image) considers likely. It is where guidance settings are tried out
before they drive a 3D optimisation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch

from ..configdoc import limits
from ..progress import ProgressFn
from ..guidance.protocol import Denoiser, ViewCondition
from ..guidance.sds import MAX_GUIDANCE_PIXELS, NonFiniteGuard, SDSConfig, sds_image_loss
from ..loss_history import LossHistory, LossMap



@dataclass
class SDSFitConfig:
    """Settings of :func:`sds_fit`."""

    steps: int = field(default=100, metadata=limits(1, 100000))
    """Optimisation steps, one SDS evaluation each (no paper default: the node is for trying guidance
    settings; 100 shows their effect)."""
    learning_rate: float = field(default=0.01, metadata=limits(1e-5, 1.0, 0.001))
    """Adam learning rate on the pixel values in [0, 1] (the pack's choice for pixel-space fitting, not
    a paper's: 0.01 moves a pixel by up to ~1 over 100 steps)."""
    sds: SDSConfig = field(default_factory=SDSConfig)
    """Score distillation settings (guidance scale, timestep range, weighting, ...)."""
    seed: int = 0
    """Seed of the timesteps and noise drawn at each step."""
    preview_every: int = 5
    """Send a preview image to ``progress`` every this many steps (and at the last)."""

    def validate(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.preview_every < 1:
            raise ValueError(f"preview_every must be >= 1, got {self.preview_every}")
        self.sds.validate()


@dataclass
class SDSFitResult:
    """What :func:`sds_fit` produced."""

    image: torch.Tensor
    """(B, 3, H, W) the optimised image in [0, 1]."""
    loss_map: LossMap
    """``{"loss": [SDS loss at each step]}`` (ComfyUI's LOSS_MAP, :mod:`mpod_core.loss_history`)."""
    grad_norms: List[float]
    """Norm of the gradient that reached the image at each step."""


def check_image_size(batch: int, height: int, width: int, name: str = "image") -> None:
    """Raise ValueError naming :data:`~mpod_core.guidance.sds.MAX_GUIDANCE_PIXELS` when
    ``batch x height x width`` exceeds it (the VAE encoder's backward memory)."""
    pixels = int(batch) * int(height) * int(width)
    if pixels > MAX_GUIDANCE_PIXELS:
        raise ValueError(f"{name}: batch x height x width = {batch} x {height} x {width} = {pixels} exceeds "
                         f"{MAX_GUIDANCE_PIXELS} (one 512x512 image, or 4 of 256x256), the most the VAE "
                         f"encoder's backward is allowed to hold in memory; scale the image down or split the batch")


def check_image(image: torch.Tensor, name: str = "image") -> None:
    """Raise ValueError unless ``image`` is a finite (B, 3, H, W) tensor of at most
    :data:`~mpod_core.guidance.sds.MAX_GUIDANCE_PIXELS` pixels in all."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[1] != 3:
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"{name}: expected (B, 3, H, W) RGB, got {got}")
    check_image_size(image.shape[0], image.shape[2], image.shape[3], name)
    if not torch.isfinite(image).all():
        raise ValueError(f"{name}: contains NaN or infinite values")


def sds_fit(image: torch.Tensor, denoiser: Denoiser, config: SDSFitConfig,
            views: Optional[ViewCondition] = None, progress: Optional[ProgressFn] = None) -> SDSFitResult:
    """Optimise ``image`` by SDS with Adam, keeping pixels in [0, 1].

    Args:
        image: (B, 3, H, W) start image in [0, 1].
        denoiser: the guidance model (its ``encode`` must be differentiable).
        config: :class:`SDSFitConfig`.
        views: the camera of each sample (view-conditioned models such as Zero123).
        progress: called after every step; it may raise to stop (interrupt).

    Returns:
        :class:`SDSFitResult`.

    Raises:
        NonFiniteGuidanceError: the guidance returned NaN/inf (see :class:`NonFiniteGuard`).
    """
    config.validate()
    check_image(image)
    generator = torch.Generator(device=image.device).manual_seed(int(config.seed))
    pixels = image.detach().clone().clamp(0, 1).requires_grad_(True)
    optimiser = torch.optim.Adam([pixels], lr=config.learning_rate)
    history, grad_norms = LossHistory(), []
    guard = NonFiniteGuard()
    for step in range(config.steps):
        optimiser.zero_grad(set_to_none=True)
        out = sds_image_loss(pixels, denoiser, config.sds, step, views, generator, guard=guard)
        out.loss.backward()
        grad_norms.append(float(pixels.grad.norm()))
        history.record(float(out.loss.detach()))
        optimiser.step()
        with torch.no_grad():
            pixels.clamp_(0, 1)
        if progress is not None:
            last = step + 1 == config.steps
            preview = pixels[0].detach().permute(1, 2, 0) if last or (step + 1) % config.preview_every == 0 else None
            progress(step + 1, config.steps, preview)
    return SDSFitResult(image=pixels.detach(), loss_map=history.as_loss_map(), grad_norms=grad_norms)
