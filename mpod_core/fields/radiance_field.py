"""A radiance field as it travels between nodes: the NeRF field, its occupancy
grid, its marching settings and where it came from (camera convention, the
reference view it was fitted to, iterations done).

Rendering is chunked over rays (memory bounded at any resolution) and returns
images in ComfyUI's channels-last layout.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from ..cameras import Cameras, get_rays
from ..volume import DEFAULT_CHUNK, OccupancyGrid, opacity_from_density, render_rays
from ..volume.rendering import DEFAULT_MAX_SAMPLES_PER_RAY
from .nerf import NeRFField, NeRFFieldConfig
from .shading import Shading, shade

#: The camera convention every field is fitted in (documented in :mod:`mpod_core.cameras`).
CAMERA_CONVENTION = "mpod3d-orbit-v1"

#: Defaults of the marching and the occupancy grid (REFERENCE.md, stage 1).
DEFAULT_SAMPLES_PER_RAY = 256
DEFAULT_GRID_RESOLUTION = 32
#: Sample pruning before the field is evaluated with autograd (nerfacc's ``alpha_thre`` and
#: ``early_stop_eps`` as Instant-NGP-style trainers pass them).
DEFAULT_ALPHA_THRESHOLD = 0.01
DEFAULT_EARLY_STOP_EPS = 1e-4
#: Largest ``views x resolution^2`` the Opacity Mask node accepts. :meth:`RadianceField.opacity`
#: marches its rays in chunks, so one view's working set is its rays and per-pixel results,
#: ~94 bytes a pixel measured (a 2048^2 view of a small field peaks at 375 MiB); but the
#: node's outputs cannot be chunked away: it keeps 28 bytes a pixel (mask and opacity per
#: view, their stacks and the grey RGB image), and the view list is free text. 2**26 pixels
#: (16 views of 2048^2, 1024 of 256^2) end near 1.75 GiB of outputs plus one view.
MAX_OPACITY_PIXELS = 2 ** 26


class RadianceField(nn.Module):
    """NeRF field + occupancy grid + metadata.

    Args:
        config: the field's hyper-parameters.
        samples_per_ray: marching step ``sqrt(3) * 2 * radius / samples_per_ray``
            (samples along the cube's diagonal).
        grid_resolution: occupancy-grid cells per axis. The grid tracks
            ``density * step_size`` (the optical depth of one marching step,
            as nerfacc's), so its threshold 0.01 means "about 1% opaque per step".
        backend: hash-grid backend (``"auto" | "torch" | "tcnn"``).
        alpha_threshold: :meth:`render` and :meth:`opacity` drop samples whose
            alpha ``1 - exp(-sigma * step)`` is below this (0 keeps all).
        early_stop_eps: ... and samples whose transmittance is below this
            (0 keeps all). See :func:`mpod_core.volume.sample_along_rays` for
            the error bound; both are plain attributes, saved with the field.
        meta: JSON-serialisable facts about the field (reference view, steps
            done, training settings); kept and saved as is.
    """

    def __init__(self, config: Optional[NeRFFieldConfig] = None, *,
                 samples_per_ray: int = DEFAULT_SAMPLES_PER_RAY,
                 grid_resolution: int = DEFAULT_GRID_RESOLUTION, backend: str = "auto",
                 meta: Optional[dict] = None, alpha_threshold: float = DEFAULT_ALPHA_THRESHOLD,
                 early_stop_eps: float = DEFAULT_EARLY_STOP_EPS) -> None:
        super().__init__()
        if not 8 <= int(samples_per_ray) <= DEFAULT_MAX_SAMPLES_PER_RAY:
            raise ValueError(f"samples_per_ray must be in [8, {DEFAULT_MAX_SAMPLES_PER_RAY}] (the ray marcher's "
                             f"cap), got {samples_per_ray}")
        if not (0.0 <= alpha_threshold < 1.0 and 0.0 <= early_stop_eps < 1.0):
            raise ValueError(f"alpha_threshold and early_stop_eps must be in [0, 1), got "
                             f"{alpha_threshold}, {early_stop_eps}")
        self.alpha_threshold = float(alpha_threshold)
        self.early_stop_eps = float(early_stop_eps)
        self.field = NeRFField(config, backend=backend)
        self.grid = OccupancyGrid(self.field.aabb, resolution=int(grid_resolution))
        self.samples_per_ray = int(samples_per_ray)
        self.meta: dict = dict(meta or {})
        self.meta.setdefault("camera_convention", CAMERA_CONVENTION)
        self.meta.setdefault("steps_done", 0)
        #: Adam moments of the last optimisation, per parameter name of ``self.field``:
        #: ``{name: {"exp_avg", "exp_avg_sq", "step"}}`` (saved with the field, so a
        #: resume continues with its moments); empty for a fresh field.
        self.optimizer_state: Dict[str, Dict[str, torch.Tensor]] = {}

    def copy(self, *, backend: str = "auto", device=None) -> "RadianceField":
        """An independent, trainable copy on hash-grid ``backend`` and ``device`` (default: this
        field's device); see :func:`mpod_core.fields.io.copy_radiance_field`."""
        from .io import copy_radiance_field  # noqa: PLC0415 (io imports this module)

        return copy_radiance_field(self, backend=backend, device=device)

    @property
    def config(self) -> NeRFFieldConfig:
        return self.field.config

    @property
    def aabb(self):
        return self.field.aabb

    @property
    def step_size(self) -> float:
        return math.sqrt(3.0) * 2.0 * self.config.radius / self.samples_per_ray

    @property
    def device(self) -> torch.device:
        return next(self.field.parameters()).device

    def _rays(self, cameras: Cameras, width: int, height: int):
        cams = cameras.to(device=self.device, dtype=torch.float32)
        origins, dirs = get_rays(cams, width, height)
        return origins.reshape(-1, 3), dirs.reshape(-1, 3)

    def _pruning(self) -> dict:
        return {"density_fn": self.field.density, "alpha_threshold": self.alpha_threshold,
                "early_stop_eps": self.early_stop_eps}

    def render(self, cameras: Cameras, width: int, height: int, *, background=None,
               with_normals: bool = False, generator: Optional[torch.Generator] = None,
               use_grid: bool = True, chunk: int = DEFAULT_CHUNK, shading: Optional[Shading] = None,
               jitter_seed: Optional[int] = None) -> Dict[str, torch.Tensor]:
        """Volume-render N views.

        Args:
            cameras: N cameras (any device; moved to the field's).
            width, height: image size.
            background: None (black, premultiplied colour), a float, (3,) or
                (N*H*W, 3) background composited behind the matter.
            with_normals: also return the opacity-weighted normals ``normal`` and
                the per-pixel ``orientation`` term (see :meth:`render_rays`).
            generator: jitter samples inside their intervals (training).
            use_grid: skip empty space with the occupancy grid.
            chunk: rays per batch.
            shading: how colour is shaded (:class:`~mpod_core.fields.shading.Shading`;
                None: the albedo).
            jitter_seed: jitter with this seed instead of drawing one from ``generator``.

        Samples are pruned with :attr:`alpha_threshold` and :attr:`early_stop_eps`.

        Returns:
            ``color`` (N, H, W, 3), ``opacity`` (N, H, W), ``depth`` (N, H, W)
            (ray distance, 0 where empty) and, with ``with_normals``, ``normal``
            (N, H, W, 3) (premultiplied by opacity) and ``orientation`` (N, H, W).
            Differentiable w.r.t. the field's parameters unless called under ``no_grad``.
        """
        origins, dirs = self.rays(cameras, width, height)
        out = self.render_rays(origins, dirs, background=background, with_normals=with_normals,
                               generator=generator, use_grid=use_grid, chunk=chunk, shading=shading,
                               jitter_seed=jitter_seed)
        n = len(cameras)
        return {k: v.reshape(n, height, width, *v.shape[1:]) for k, v in out.items()}

    def rays(self, cameras: Cameras, width: int, height: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Flat rays of N views on the field's device: origins and unit directions, (N*H*W, 3) each."""
        return self._rays(cameras, width, height)

    def render_rays(self, origins: torch.Tensor, dirs: torch.Tensor, *, background=None,
                    with_normals: bool = False, generator: Optional[torch.Generator] = None,
                    use_grid: bool = True, chunk: int = DEFAULT_CHUNK, shading: Optional[Shading] = None,
                    jitter_seed: Optional[int] = None, ray_offset: int = 0,
                    count_samples: bool = False) -> Dict[str, torch.Tensor]:
        """Volume-render flat rays (see :func:`mpod_core.volume.render_rays`).

        With ``with_normals`` each sample's unit normal ``n_i`` (finite differences
        of the density) gives the outputs ``normal = sum_i w_i n_i`` and
        ``orientation = sum_i stop_grad(w_i) max(0, n_i . d)^2`` (DreamFusion's
        orientation term per pixel, ``d`` the unit ray direction).

        Args:
            origins, dirs: (R, 3) rays on the field's device.
            ray_offset: global index of ray 0 for the jitter (see ``render_rays``).
            count_samples: also return ``samples`` (R,), the samples per ray.
            Others: as :meth:`render`.

        Returns:
            Flat outputs: ``color`` (R, 3), ``opacity`` (R,), ``depth`` (R,), with
            normals ``normal`` (R, 3) and ``orientation`` (R,), and ``samples`` (R,).
        """
        shading = shading if shading is not None else Shading()
        need_normals = with_normals or shading.needs_normals
        field = self.field

        def field_fn(positions: torch.Tensor, ray_dirs: torch.Tensor):
            sigma, albedo = field(positions)
            if not need_normals:
                return sigma, albedo
            normals = field.normals(positions)
            color = shade(albedo, normals, shading)
            if not with_normals:
                return sigma, color
            facing_away = (normals * F.normalize(ray_dirs, dim=-1)).sum(-1).clamp_min(0.0)
            return sigma, color, {"normal": normals, "orientation": facing_away.square()}

        return render_rays(field_fn, origins, dirs, self.aabb, self.step_size, self.grid if use_grid else None,
                           background=background, generator=generator, chunk=chunk,
                           detached_weight_extras=("orientation",), count_samples=count_samples,
                           jitter_seed=jitter_seed, ray_offset=ray_offset, **self._pruning())

    def opacity(self, cameras: Cameras, width: int, height: int, *, use_grid: bool = True,
                chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
        """Accumulated opacity from density only (MPOD123 eq. 3-5): (N, H, W) in [0, 1]."""
        origins, dirs = self._rays(cameras, width, height)
        opa = opacity_from_density(self.field.density, origins, dirs, self.aabb, self.step_size,
                                   self.grid if use_grid else None, chunk=chunk,
                                   alpha_threshold=self.alpha_threshold, early_stop_eps=self.early_stop_eps)
        return opa.reshape(len(cameras), height, width)

    @torch.no_grad()
    def opacity_mask(self, cameras: Cameras, width: int, height: int, threshold: float = 0.5, *,
                     chunk: int = DEFAULT_CHUNK):
        """MPOD123's outline masks: ``opacity > threshold`` (eq. 3-5, threshold 0.5 in the paper).

        Returns:
            mask (N, H, W) float in {0, 1} and the raw opacity (N, H, W).
        """
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {threshold}")
        opacity = self.opacity(cameras, width, height, chunk=chunk)
        return (opacity > threshold).to(opacity.dtype), opacity

    @torch.no_grad()
    def update_grid(self, step: int, generator: Optional[torch.Generator] = None) -> None:
        """One occupancy-grid update from the current ``density * step_size`` (see :class:`OccupancyGrid`)."""
        self.grid.update(step, self.field.density, generator=generator, step_size=self.step_size)
