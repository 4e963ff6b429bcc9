"""Shading of a radiance field's samples (stable-dreamfusion / Magic123's
shading augmentation).

``mode`` per render:

* ``albedo``: the field's albedo;
* ``normal``: the normal as a colour, ``(n + 1) / 2`` (Magic123 renders this for
  the first 20% of its run, so the guidance shapes geometry before texture);
* ``lambertian``: ``albedo * (ambient + (1 - ambient) * max(0, n . l))``;
* ``textureless``: the same with a white albedo (shape only).

``l`` is a unit light direction (pointing from the surface towards the light),
``ambient`` in [0, 1] (1 gives the albedo back).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Tuple, get_args

import torch

ShadingMode = Literal["albedo", "normal", "lambertian", "textureless"]
SHADING_MODES: Tuple[str, ...] = get_args(ShadingMode)


@dataclass
class Shading:
    """How one view is shaded."""

    mode: ShadingMode = "albedo"
    light_dir: Optional[torch.Tensor] = None
    """(3,) unit vector towards the light (lambertian, textureless)."""
    ambient: float = 1.0
    """Ambient share in [0, 1]."""

    def __post_init__(self) -> None:
        if self.mode not in SHADING_MODES:
            raise ValueError(f"shading mode must be one of {', '.join(SHADING_MODES)}, got {self.mode!r}")
        if self.mode in ("lambertian", "textureless"):
            if self.light_dir is None or tuple(self.light_dir.shape) != (3,):
                raise ValueError(f"{self.mode} shading needs a (3,) light direction")
        if not 0.0 <= float(self.ambient) <= 1.0:
            raise ValueError(f"ambient must be in [0, 1], got {self.ambient}")

    @property
    def needs_normals(self) -> bool:
        return self.mode != "albedo"


def shade(albedo: torch.Tensor, normals: Optional[torch.Tensor], shading: Shading) -> torch.Tensor:
    """Colour of samples under ``shading``.

    Args:
        albedo: (S, 3) in [0, 1].
        normals: (S, 3) unit normals (None only for ``albedo``).
        shading: the view's :class:`Shading`.

    Returns:
        (S, 3) colours in [0, 1].
    """
    if shading.mode == "albedo":
        return albedo
    if normals is None or normals.shape != albedo.shape:
        raise ValueError(f"{shading.mode} shading needs (S, 3) normals like the albedo {tuple(albedo.shape)}")
    if shading.mode == "normal":
        return (normals + 1.0) * 0.5
    light = shading.light_dir.to(normals)
    a = float(shading.ambient)
    lambert = a + (1.0 - a) * (normals @ light).clamp_min(0.0)
    if shading.mode == "textureless":
        return lambert[:, None].expand(-1, 3)
    return albedo * lambert[:, None]
