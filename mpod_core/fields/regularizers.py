"""Regularisers of a rendered radiance field (the image-to-3D references'
answers to haze, floaters and lumpy surfaces).

All act on the per-pixel outputs of :meth:`RadianceField.render
<mpod_core.fields.radiance_field.RadianceField.render>` (so they also work on
renders held outside the autograd graph, see :mod:`mpod_core.fields.backprop`):

* :func:`orientation_loss` (DreamFusion): normals that face away from the camera
  on visible matter, ``sum_pixels sum_i stop_grad(w_i) max(0, n_i . d)^2 /
  #(pixels with opacity > 0)``, as threestudio's ``loss_orient``. The per-pixel
  sum ``sum_i stop_grad(w_i) max(0, n_i . d)^2`` is the render's
  ``orientation`` output.
* :func:`normal_smoothness_2d`: squared differences of neighbouring pixels of the
  normal map ``(normalize(sum_i w_i n_i) + 1) / 2 * opacity`` (threestudio's
  ``loss_normal_smooth`` on ``comp_normal``).
* :func:`sparsity_loss`: mean opacity (fewer, smaller hazy regions).
* :func:`opacity_entropy`: mean binary entropy of the opacity clamped to
  [1e-3, 1 - 1e-3] (threestudio's ``loss_opaque``): pixels are pushed to be
  either empty or opaque.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F


def _check_opacity(opacity: torch.Tensor) -> None:
    if opacity.dim() != 3:
        raise ValueError(f"opacity: expected (N, H, W), got {tuple(opacity.shape)}")


def orientation_loss(orientation: torch.Tensor, opacity: torch.Tensor) -> torch.Tensor:
    """DreamFusion's orientation loss from the render's per-pixel sums.

    Args:
        orientation: (N, H, W) ``sum_i stop_grad(w_i) max(0, n_i . d)^2`` per pixel.
        opacity: (N, H, W) accumulated opacity.

    Returns:
        Scalar: the sum over pixels divided by the number of pixels with opacity > 0
        (0 when nothing is visible).
    """
    _check_opacity(opacity)
    if orientation.shape != opacity.shape:
        raise ValueError(f"orientation {tuple(orientation.shape)} must match opacity {tuple(opacity.shape)}")
    visible = (opacity.detach() > 0).sum().clamp_min(1)
    return orientation.sum() / visible


def normal_map(normal_sum: torch.Tensor, opacity: torch.Tensor) -> torch.Tensor:
    """Normal image ``(normalize(sum_i w_i n_i) + 1) / 2 * opacity`` (threestudio's ``comp_normal``).

    Args:
        normal_sum: (N, H, W, 3) opacity-weighted sum of unit normals (the render's ``normal``).
        opacity: (N, H, W).

    Returns:
        (N, H, W, 3) in [0, 1]; 0 where nothing is visible.
    """
    _check_opacity(opacity)
    if normal_sum.shape != opacity.shape + (3,):
        raise ValueError(f"normal_sum: expected {tuple(opacity.shape) + (3,)}, got {tuple(normal_sum.shape)}")
    return (F.normalize(normal_sum, dim=-1, eps=1e-6) + 1.0) * 0.5 * opacity[..., None]


def normal_smoothness_2d(normals: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of vertically and of horizontally neighbouring pixels.

    Args:
        normals: (N, H, W, C) normal image (e.g. :func:`normal_map`), H, W >= 2.

    Returns:
        Scalar ``mean((n[:, 1:] - n[:, :-1])^2) + mean((n[:, :, 1:] - n[:, :, :-1])^2)``.
    """
    if normals.dim() != 4 or normals.shape[1] < 2 or normals.shape[2] < 2:
        raise ValueError(f"normals: expected (N, H, W, C) with H, W >= 2, got {tuple(normals.shape)}")
    dy = (normals[:, 1:] - normals[:, :-1]).square().mean()
    dx = (normals[:, :, 1:] - normals[:, :, :-1]).square().mean()
    return dy + dx


def sparsity_loss(opacity: torch.Tensor) -> torch.Tensor:
    """Mean opacity over all pixels of (N, H, W)."""
    _check_opacity(opacity)
    return opacity.mean()


def opacity_entropy(opacity: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Mean binary entropy (nats) of the opacity clamped to ``[eps, 1 - eps]``.

    0 only in the limit of a binary mask (exactly ``-(eps log eps + (1-eps) log(1-eps))``
    for opacities at 0 or 1, about 7.9e-3 for eps = 1e-3); ``log 2`` at 0.5.
    """
    _check_opacity(opacity)
    p = opacity.clamp(eps, 1.0 - eps)
    return -(p * p.log() + (1.0 - p) * (1.0 - p).log()).mean()
