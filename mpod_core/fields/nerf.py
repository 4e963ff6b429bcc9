"""The stage-1 NeRF field of MPOD123: hash-grid encoding, one small MLP for
density and albedo, Magic3D's density "blob" initialisation.

``sigma(x) = softplus(mlp(enc(x))_0 + blob(x))`` with the blob bias
``blob(x) = blob_scale * (1 - |x| / blob_std)`` (world units, threestudio's
``blob_magic3d``), so a fresh field is a soft ball of radius ``blob_std`` around
the origin: optimisation starts from matter the guidance can shape instead of
from empty space (where SDS has no gradient to follow). Albedo is
``sigmoid(mlp(enc(x))_{1:4})``; the field is view-independent (no
view-direction input), as the image-to-3D references use it.

Normals are ``-grad sigma / |grad sigma|``, by autograd ("analytic", threestudio's
stable-zero123 setting; losses on them double-backward through the hash grid)
or by central finite differences (six extra density evaluations, stable-dreamfusion's).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from ..encoding import HashGridConfig, HashGridEncoding

#: The ways :meth:`NeRFField.normals` can compute normals.
NORMAL_TYPES = ("analytic", "finite_difference")
#: Points per autograd graph when analytic normals are computed without recording.
NORMAL_CHUNK = 1 << 16


@dataclass
class NeRFFieldConfig:
    """Hyper-parameters of :class:`NeRFField` (defaults: REFERENCE.md, stage 1)."""

    radius: float = 1.0
    """The field lives in the cube ``[-radius, radius]^3`` (world units); density is 0 outside."""

    hash_grid: HashGridConfig = field(default_factory=HashGridConfig)
    """The multiresolution hash grid (16 levels x 2 features, 2^19 entries, base 16)."""

    mlp_width: int = 64
    """Hidden width of the density/albedo MLP."""

    mlp_hidden_layers: int = 1
    """Hidden layers of the MLP (>= 1)."""

    blob_scale: float = 10.0
    """Pre-activation density bias at the centre (Magic3D's blob)."""

    blob_std: float = 0.5
    """Radius (world units) where the blob bias crosses 0."""

    normal_type: str = "analytic"
    """How normals are computed: "analytic" (the density's gradient by autograd; threestudio
    configs/stable-zero123.yaml ``normal_type: analytic``, kept smooth by the coarse-to-fine grid;
    2-3x cheaper on a CPU) or "finite_difference" (central differences, six extra density
    evaluations; stable-dreamfusion / Magic123)."""

    normal_eps: float = 0.01
    """Finite-difference step for normals, world units."""

    def validate(self) -> None:
        if not self.radius > 0:
            raise ValueError(f"radius must be > 0, got {self.radius}")
        if self.mlp_width < 1 or self.mlp_hidden_layers < 1:
            raise ValueError(f"mlp_width and mlp_hidden_layers must be >= 1, got "
                             f"{self.mlp_width}, {self.mlp_hidden_layers}")
        if self.normal_type not in NORMAL_TYPES:
            raise ValueError(f"normal_type must be one of {', '.join(NORMAL_TYPES)}, got {self.normal_type!r}")
        if not self.blob_std > 0 or not self.normal_eps > 0:
            raise ValueError(f"blob_std and normal_eps must be > 0, got {self.blob_std}, {self.normal_eps}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "NeRFFieldConfig":
        d = dict(d)
        grid = HashGridConfig(**d.pop("hash_grid", {}))
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown field settings: {sorted(unknown)}")
        return cls(hash_grid=grid, **d)


class NeRFField(nn.Module):
    """Density + albedo field in ``[-radius, radius]^3``.

    Args:
        config: :class:`NeRFFieldConfig`.
        backend: hash-grid backend, ``"auto" | "torch" | "tcnn"``.
    """

    def __init__(self, config: NeRFFieldConfig | None = None, backend: str = "auto") -> None:
        super().__init__()
        self.config = config if config is not None else NeRFFieldConfig()
        self.config.validate()
        self.encoding = HashGridEncoding(self.config.hash_grid, backend=backend)
        layers, width = [], self.encoding.out_dim
        for _ in range(self.config.mlp_hidden_layers):
            layers += [nn.Linear(width, self.config.mlp_width), nn.ReLU(inplace=True)]
            width = self.config.mlp_width
        layers.append(nn.Linear(width, 4))
        self.mlp = nn.Sequential(*layers)
        #: Levels of the hash grid in use (coarse-to-fine); None = all. Finer levels'
        #: features are zeroed, so they neither contribute nor receive gradients.
        self.active_levels: Optional[int] = None

    @property
    def aabb(self) -> Tuple[float, ...]:
        """``(xmin, ymin, zmin, xmax, ymax, zmax)`` of the field's cube."""
        r = float(self.config.radius)
        return (-r, -r, -r, r, r, r)

    def _blob(self, points: torch.Tensor) -> torch.Tensor:
        return self.config.blob_scale * (1.0 - points.norm(dim=-1) / self.config.blob_std)

    def _raw(self, points: torch.Tensor) -> torch.Tensor:
        """(N, 3) world points -> (N, 4) raw MLP outputs (density pre-activation without the blob, albedo logits)."""
        if points.ndim != 2 or points.shape[1] != 3:
            raise ValueError(f"points: expected (N, 3), got {tuple(points.shape)}")
        r = self.config.radius
        unit = ((points + r) / (2 * r)).clamp(0.0, 1.0)
        feats = self.encoding(unit)
        levels = self.config.hash_grid.n_levels
        if self.active_levels is not None and self.active_levels < levels:
            keep = max(int(self.active_levels), 0) * self.config.hash_grid.n_features_per_level
            mask = torch.zeros(feats.shape[1], dtype=feats.dtype, device=feats.device)
            mask[:keep] = 1.0
            feats = feats * mask  # level-major features: the first `keep` channels are the coarse levels
        return self.mlp(feats.to(self.mlp[0].weight.dtype))

    def _sigma(self, points: torch.Tensor, raw_density: torch.Tensor) -> torch.Tensor:
        sigma = F.softplus(raw_density + self._blob(points))
        inside = (points.abs() <= self.config.radius).all(dim=-1)
        return torch.where(inside, sigma, torch.zeros_like(sigma))

    def forward(self, points: torch.Tensor, dirs: torch.Tensor | None = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Density and albedo at world points.

        Args:
            points: (N, 3) world points.
            dirs: (N, 3) view directions (ignored: the field is view-independent;
                accepted so the field is a ``render_rays`` field function).

        Returns:
            sigma (N,) >= 0 and albedo (N, 3) in (0, 1).
        """
        raw = self._raw(points)
        return self._sigma(points, raw[:, 0]), torch.sigmoid(raw[:, 1:])

    def density(self, points: torch.Tensor) -> torch.Tensor:
        """(N, 3) world points -> (N,) density."""
        return self._sigma(points, self._raw(points)[:, 0])

    def albedo(self, points: torch.Tensor) -> torch.Tensor:
        """(N, 3) world points -> (N, 3) albedo in (0, 1)."""
        return torch.sigmoid(self._raw(points)[:, 1:])

    def normals(self, points: torch.Tensor) -> torch.Tensor:
        """Unit normals ``-grad sigma / |grad sigma|`` (``config.normal_type``).

        Analytic normals differentiate the density by autograd (inside
        ``enable_grad`` even when called under ``no_grad``), with ``create_graph``
        when gradients are being recorded, so losses on normals reach the
        parameters (double backward through the hash grid).

        Args:
            points: (N, 3) world points.

        Returns:
            (N, 3) unit vectors pointing out of the matter (towards lower
            density); differentiable w.r.t. the field's parameters.
        """
        if points.shape[0] == 0:
            return points.new_zeros(0, 3)
        if self.config.normal_type == "analytic":
            record = torch.is_grad_enabled()
            # Not recording: the graph of each chunk is freed before the next (bounded memory).
            step = points.shape[0] if record else NORMAL_CHUNK
            parts = []
            for lo in range(0, points.shape[0], max(step, 1)):
                with torch.enable_grad():
                    x = points[lo:lo + step].detach().requires_grad_(True)
                    sigma = self.density(x)
                    grad, = torch.autograd.grad(sigma.sum(), x, create_graph=record)
                parts.append(grad if record else grad.detach())
            grad = torch.cat(parts) if len(parts) != 1 else parts[0]
            return -F.normalize(grad, dim=-1, eps=1e-12)
        eps = self.config.normal_eps
        offsets = torch.eye(3, dtype=points.dtype, device=points.device) * eps
        probes = torch.cat([points[:, None, :] + offsets, points[:, None, :] - offsets], 1)  # (N, 6, 3)
        sig = self.density(probes.reshape(-1, 3)).reshape(-1, 2, 3)
        grad = (sig[:, 0] - sig[:, 1]) / (2 * eps)
        return -F.normalize(grad, dim=-1, eps=1e-12)
