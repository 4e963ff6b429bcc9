"""MPOD123 stage 2, the geometry side: a DMTet surface refined under score distillation.

The stage-1 radiance field becomes a signed distance on a tetrahedral grid
(:mod:`mpod_core.geometry`), ``sdf = clamp(τ − σ, −1, 1)`` (positive outside),
re-sampled on the box of its occupied region + 10%; its albedo network, copied,
is the texture field. Each iteration renders the marching-tets surface
(:func:`~mpod_core.render.render_mesh` with the texture field as ``color_fn``)
and either fits the reference view (RGB + mask, probability
``reference_probability``) or distils the guidance at a random view, where the
stage-1 field's outline mask of that same camera is

* sent to the guidance in :attr:`ViewCondition.extras` under
  :data:`~mpod_core.guidance.mrca.MASK_OPTION_KEY` (the MRCA Attention Patch
  confines the learned token to it), and
* the target of the novel-view mask loss ``L_nvm = ‖M_v − opacity(v)‖²``
  (MPOD123 §3.3),

with normal-consistency and Laplacian-smoothness regularisers on the mesh
(threestudio ``magic123-refine-sd.yaml``). Optimised: the SDF values, a
per-vertex deformation ``(box/cells)·tanh(δ)`` and the texture field, by Adam.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ..cameras import orbit_cameras
from ..configdoc import limits
from ..fields import RadianceField
from ..geometry import TetGrid, deform, marching_tets, sdf_from_density, tighten_bbox
from ..guidance import SDSConfig, ViewCondition
from ..guidance.mrca import MASK_OPTION_KEY
from ..guidance.protocol import Denoiser
from ..guidance.schedules import (REFINE_TIMESTEP_PRESET_NAMES, REFINE_TIMESTEP_PRESETS, TimestepSchedule,
                                  timestep_schedule)
from ..guidance.sds import NonFiniteGuard, sds_image_loss
from ..loss_history import LossHistory, LossMap
from ..optim_state import current_moments, restore_moments
from ..progress import ProgressFn
from ..render import render_mesh
from .mpod123 import prepare_reference

__all__ = ["RefineConfig", "RefineState", "RefineResult", "refine_sds_config", "init_refine_state",
           "normal_consistency", "laplacian_smoothness", "fit_refine"]

#: Largest render side: a 1024² render (the paper's) keeps its autograd graph at ~1 GiB here.
MAX_REFINE_RESOLUTION = 1024


def refine_sds_config() -> SDSConfig:
    """SD guidance of the refine stage: guidance 100, t ∈ [0.02, 0.5] (Magic123's refine settings; the
    range is the "custom" one, used when ``RefineConfig.timestep_preset == "custom"``)."""
    return SDSConfig(guidance_scale=100.0, min_step=0.02, max_step=0.5)


def check_surface_settings(config, max_resolution: int, ranges) -> None:
    """The checks DMTet Refine and DSD Refine share: ``iterations``, ``resolution`` (<= ``max_resolution``),
    ``guidance_resolution``, ``grid_cells``, ``learning_rate``, every name in ``config.LAMBDAS`` (finite, >= 0)
    and each ``(min, max)`` pair named in ``ranges``.

    Raises:
        ValueError: naming the first bad setting.
    """
    if config.iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {config.iterations}")
    if not 8 <= config.resolution <= max_resolution:
        raise ValueError(f"resolution must be in [8, {max_resolution}], got {config.resolution}")
    g = config.guidance_resolution
    if g is not None and (g < 8 or g % 8):
        raise ValueError(f"guidance_resolution must be a multiple of 8 (>= 8), got {g}")
    if config.grid_cells < 2:
        raise ValueError(f"grid_cells must be >= 2, got {config.grid_cells}")
    if not (math.isfinite(config.learning_rate) and config.learning_rate > 0):
        raise ValueError(f"learning_rate must be > 0, got {config.learning_rate}")
    for name in config.LAMBDAS:
        v = getattr(config, name)
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {v}")
    for name in ranges:
        lo, hi = getattr(config, name)
        if not lo <= hi:
            raise ValueError(f"{name}: min must not exceed max, got ({lo}, {hi})")


@dataclass
class RefineConfig:
    """Settings of :func:`fit_refine`; each default names its source."""

    iterations: int = field(default=5000, metadata=limits(1, 100000))
    """Iterations to run (on top of those a resumed state has). MPOD123 §4.2: 5000."""
    resolution: int = field(default=1024, metadata=limits(16, MAX_REFINE_RESOLUTION, 8))
    """Render side in pixels. MPOD123 §4.2: 1024 (8x stage 1's 128)."""
    guidance_resolution: Optional[int] = field(default=512, metadata=limits(64, 512, 8))
    """Renders are resized to this for the guidance (SD 1.5's own 512; None: as rendered)."""
    grid_cells: int = field(default=64, metadata=limits(4, 128))
    """Cells per side of the tetrahedral grid (64 cells ~ threestudio's "128_tets", REFERENCE.md)."""
    learning_rate: float = field(default=1e-3, metadata=limits(1e-5, 1.0, 1e-4))
    """Adam learning rate of the SDF, the deformation and the texture field. MPOD123 §4.2: 1e-3."""
    density_threshold: float = field(default=10.0, metadata=limits(0.0, 1000.0, 0.5))
    """τ of ``sdf = clamp(τ − σ)``: the stage-1 density taken as the surface (Field to Mesh's default)."""
    reference_probability: float = field(default=0.25, metadata=limits(0.0, 1.0, 0.05))
    """Share of iterations that fit the reference view (as stage 1: Magic123 every 4th step)."""
    elevation_range: Tuple[float, float] = (-45.0, 45.0)
    """Novel-view elevations, degrees (threestudio magic123-refine-sd.yaml: [-45, 45])."""
    azimuth_range: Tuple[float, float] = (-180.0, 180.0)
    """Novel-view azimuths, degrees (magic123-refine-sd.yaml)."""
    sds: SDSConfig = field(default_factory=refine_sds_config)
    """Score distillation settings (guidance 100; its t range is used with the "custom" preset)."""
    timestep_preset: str = field(default="magic123-refine", metadata=limits(options=REFINE_TIMESTEP_PRESET_NAMES))
    """SD timesteps (:data:`~mpod_core.guidance.schedules.REFINE_TIMESTEP_PRESETS`): magic123-refine
    [0.02, 0.5] (Magic123's official refine), threestudio-magic123-refine [0.2, 0.6], or "custom"
    (``sds.min_step`` / ``sds.max_step``)."""
    lambda_sds: float = field(default=1e-3, metadata=limits(0.0, 1000.0, 1e-4))
    """SDS weight (magic123-refine-sd.yaml ``lambda_sd``: 0.001)."""
    lambda_rgb: float = field(default=10.0, metadata=limits(0.0, 10000.0, 0.1))
    """Reference RGB weight (magic123-refine-sd.yaml ``lambda_rgb``)."""
    lambda_mask: float = field(default=1.0, metadata=limits(0.0, 10000.0, 0.1))
    """Reference mask weight (magic123-refine-sd.yaml ``lambda_mask``)."""
    lambda_nvm: float = field(default=1.0, metadata=limits(0.0, 10000.0, 0.1))
    """Novel-view mask weight, L_nvm (MPOD123 §3.3 gives no value; the reference mask's weight, the
    same kind of loss)."""
    lambda_normal_consistency: float = field(default=100.0, metadata=limits(0.0, 10000.0, 1.0))
    """Normal consistency weight (magic123-refine-sd.yaml)."""
    lambda_laplacian: float = field(default=100.0, metadata=limits(0.0, 10000.0, 1.0))
    """Laplacian smoothness weight (magic123-refine-sd.yaml ``lambda_laplacian_smoothness``)."""
    mrca_masks: bool = True
    """Send each novel view's stage-1 outline mask to the guidance (MRCA, MPOD123 §3.3)."""
    background: float = field(default=1.0, metadata=limits(0.0, 1.0, 0.05))
    """Grey level behind renders and the reference (white, as textual inversion's default)."""
    seed: int = 0
    """Seed of view sampling, timesteps and noise."""
    preview_every: int = 10
    """Send a preview to ``progress`` every this many iterations (and at the last)."""

    LAMBDAS = ("lambda_sds", "lambda_rgb", "lambda_mask", "lambda_nvm", "lambda_normal_consistency",
               "lambda_laplacian")

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting."""
        check_surface_settings(self, MAX_REFINE_RESOLUTION, ("elevation_range", "azimuth_range"))
        if not 0.0 <= self.reference_probability <= 1.0:
            raise ValueError(f"reference_probability must be in [0, 1], got {self.reference_probability}")
        self.sds_in_force().validate()

    def sds_in_force(self) -> SDSConfig:
        """``sds`` with the timestep range of ``timestep_preset``."""
        custom = TimestepSchedule(self.sds.min_step, self.sds.max_step)
        return timestep_schedule(self.timestep_preset, custom, REFINE_TIMESTEP_PRESETS).sds_config(self.sds, 1)


@dataclass
class RefineState:
    """What the refine stage optimises; everything a resumed run needs."""

    grid: TetGrid
    """The tetrahedral grid on the tightened box."""
    sdf: torch.nn.Parameter
    """(V,) signed distance at the grid vertices, positive outside."""
    delta: torch.nn.Parameter
    """(V, 3) pre-tanh deformation of the grid vertices."""
    texture: RadianceField
    """The texture field (its ``albedo`` colours the surface), a copy of the stage-1 field."""
    reference_view: Dict[str, float]
    """Elevation, azimuth, distance, fov of the reference camera."""
    steps_done: int = 0
    """Iterations run so far (a resumed run continues the count)."""
    optimizer_state: Dict[str, Dict[str, torch.Tensor]] = field(default_factory=dict)
    """Adam's moments per parameter name (``sdf``, ``delta``, ``texture.<name>``)."""

    def parameters(self) -> Dict[str, torch.nn.Parameter]:
        """Every optimised tensor by name."""
        return {"sdf": self.sdf, "delta": self.delta,
                **{f"texture.{n}": p for n, p in self.texture.field.named_parameters()}}

    def surface(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The current marching-tets surface: vertices (M, 3) (differentiable) and faces (F, 3)."""
        return marching_tets(deform(self.grid, self.delta), self.grid, self.sdf)

    def albedo(self, points: torch.Tensor) -> torch.Tensor:
        """(P, 3) points -> (P, 3) colours of the texture field."""
        return self.texture.field.albedo(points)


def init_refine_state(stage1: RadianceField, config: RefineConfig,
                      reference_view: Optional[Dict[str, float]] = None, backend: str = "auto") -> RefineState:
    """The DMTet start from a stage-1 field (REFERENCE.md "MPOD123 stage 2").

    ``sdf = clamp(τ − σ, −1, 1)`` on a grid over the field's box, the box tightened to the
    occupied region + 10%, and the SDF sampled again on that grid; the texture field is a copy
    of the stage-1 field (its albedo network trained from there on) on hash-grid ``backend``.

    Raises:
        ValueError: when no grid vertex is occupied (τ above every density: lower it).
    """
    config.validate()
    dev = stage1.device
    grid = TetGrid.cube(config.grid_cells, tuple(float(x) for x in stage1.aabb), device=dev)
    with torch.no_grad():
        sdf = sdf_from_density(grid, stage1.field.density, config.density_threshold)
        if not bool((sdf < 0).any()):
            raise ValueError(f"the stage-1 field's density never exceeds the threshold {config.density_threshold} on "
                             f"a {config.grid_cells}-cell grid: lower density_threshold (Field to Mesh shows where "
                             "the surface is)")
        grid = TetGrid.cube(config.grid_cells, tuple(float(x) for x in tighten_bbox(grid, sdf)), device=dev)
        sdf = sdf_from_density(grid, stage1.field.density, config.density_threshold)
    view = dict(reference_view or stage1.meta.get("reference_view") or
                {"elevation": 0.0, "azimuth": 0.0, "distance": 2.5, "fov": 40.0})
    return RefineState(grid=grid, sdf=torch.nn.Parameter(sdf.float().clone()),
                       delta=torch.nn.Parameter(torch.zeros_like(grid.vertices, dtype=torch.float32)),
                       texture=stage1.copy(backend=backend, device=dev), reference_view=view)


def _face_adjacency(faces: torch.Tensor, n_vertices: int) -> torch.Tensor:
    """(A, 2) pairs of faces sharing an edge (each interior edge once), by sorting edge keys."""
    e = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    e = torch.sort(e, dim=1).values
    key = e[:, 0] * n_vertices + e[:, 1]
    order = torch.argsort(key)
    k = key[order]
    same = k[1:] == k[:-1]
    face_of = torch.arange(faces.shape[0], device=faces.device).repeat(3)[order]
    return torch.stack([face_of[:-1][same], face_of[1:][same]], dim=1)


def normal_consistency(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Mean ``1 − cos`` between the normals of faces sharing an edge (0 on a plane)."""
    n = torch.cross(vertices[faces[:, 1]] - vertices[faces[:, 0]], vertices[faces[:, 2]] - vertices[faces[:, 0]],
                    dim=1)
    n = F.normalize(n, dim=1, eps=1e-12)
    pairs = _face_adjacency(faces, vertices.shape[0])
    if pairs.shape[0] == 0:
        return vertices.new_zeros(())
    return (1.0 - (n[pairs[:, 0]] * n[pairs[:, 1]]).sum(1)).mean()


def laplacian_smoothness(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Mean squared uniform Laplacian ``‖v − mean(neighbours)‖²`` over the vertices used by faces."""
    e = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    e = torch.cat([e, e.flip(1)])  # each directed half-edge; shared edges count twice, like their weight
    total = torch.zeros_like(vertices).index_add_(0, e[:, 0], vertices[e[:, 1]])
    count = torch.zeros(vertices.shape[0], device=vertices.device, dtype=vertices.dtype).index_add_(
        0, e[:, 0], torch.ones(e.shape[0], device=vertices.device, dtype=vertices.dtype))
    used = count > 0
    lap = vertices[used] - total[used] / count[used, None]
    return lap.square().sum(1).mean()


@dataclass
class RefineResult:
    """What :func:`fit_refine` returns."""

    state: RefineState
    """The refined state (``steps_done`` and ``optimizer_state`` updated)."""
    vertices: torch.Tensor
    """(M, 3) the final surface's vertices (detached)."""
    faces: torch.Tensor
    """(F, 3) its faces, wound outward."""
    loss_map: LossMap
    """ComfyUI's LOSS_MAP: ``"loss"`` per iteration and each term unweighted ("rgb", "mask", "sds",
    "nvm", "normal_consistency", "laplacian"), 0 where not part of that iteration's loss."""


def _uniform(generator: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)


def _optimizer(state: RefineState, config: RefineConfig) -> torch.optim.Adam:
    named = state.parameters()
    optimiser = torch.optim.Adam([{"params": [p], "name": n} for n, p in named.items()], lr=config.learning_rate,
                                 betas=(0.9, 0.99), eps=1e-15)
    restore_moments(optimiser, named, state.optimizer_state)
    return optimiser


def fit_refine(state: RefineState, stage1: RadianceField, image: torch.Tensor, mask: torch.Tensor,
               denoiser: Denoiser, config: RefineConfig, *, backend: str = "auto",
               progress: Optional[ProgressFn] = None,
               outline_fn: Optional[Callable] = None) -> RefineResult:
    """Refine the DMTet surface and its texture (see the module docstring).

    Args:
        state: from :func:`init_refine_state` (or a resumed one); optimised in place.
        stage1: the stage-1 field whose opacity masks are each novel view's outline (MPOD123 eq. 3–5).
        image: (H, W, 3) reference image in [0, 1], square; mask: (H, W) its foreground.
        denoiser: the guidance (the MRCA-patched SD model in the node); each novel view's outline mask
            travels in ``views.extras[MASK_OPTION_KEY]`` as a (1, g, g) tensor at the guidance size.
        config: :class:`RefineConfig`.
        backend: rasterizer backend.
        progress: ``progress(i, iterations, preview)`` after every iteration; may raise to stop (the
            state and its Adam moments stay consistent).
        outline_fn: ``outline_fn(cameras, size) -> (N, size, size)`` masks in [0, 1]; default the stage-1
            field's 0.5-thresholded opacity.

    Returns:
        :class:`RefineResult`.
    """
    config.validate()
    dev = state.sdf.device
    res = config.resolution
    ref_rgb, ref_mask = prepare_reference(image.to(dev, torch.float32), mask.to(dev, torch.float32), res,
                                          config.background)
    view = state.reference_view
    ref_cam = orbit_cameras(view["elevation"], view["azimuth"], view["distance"], view["fov"])
    g = config.guidance_resolution or res
    if outline_fn is None:
        def outline_fn(cams, size):
            return stage1.opacity_mask(cams, size, size, 0.5)[0]
    start = state.steps_done
    views_gen = torch.Generator().manual_seed(int(config.seed) + start)
    noise_gen = torch.Generator(device=dev).manual_seed(int(config.seed) + start + 1)
    sds = config.sds_in_force()
    optimiser = _optimizer(state, config)
    guard = NonFiniteGuard()
    history = LossHistory()
    bg = (config.background,) * 3
    try:
        for i in range(config.iterations):
            step = start + i
            optimiser.zero_grad(set_to_none=True)
            vertices, faces = state.surface()
            if faces.shape[0] == 0:
                raise ValueError(f"DMTet refine: the surface vanished at iteration {step} (the SDF has no sign "
                                 "change left); lower the learning rate or the SDS weight")
            reference = float(torch.rand(1, generator=views_gen)) < config.reference_probability
            if reference:
                cams = ref_cam
            else:
                elev = _uniform(views_gen, 1, *config.elevation_range)
                azim = _uniform(views_gen, 1, *config.azimuth_range)
                cams = orbit_cameras(elev, azim, view["distance"], view["fov"])
            out = render_mesh(vertices, faces, cams, res, res, color_fn=state.albedo, background=bg,
                              backend=backend)
            terms: Dict[str, torch.Tensor] = {}
            if reference:
                terms["rgb"] = F.mse_loss(out.color[0], ref_rgb)
                terms["mask"] = F.mse_loss(out.alpha[0], ref_mask)
            else:
                with torch.no_grad():
                    outline = outline_fn(cams, g).float()                      # (1, g, g)
                target = outline if g == res else F.interpolate(outline[:, None], size=(res, res), mode="bilinear",
                                                                align_corners=False)[:, 0]
                terms["nvm"] = F.mse_loss(out.alpha, target)
                extras = {MASK_OPTION_KEY: outline} if config.mrca_masks else {}
                views = ViewCondition(elevation=elev, azimuth=azim,
                                      distance=torch.full((1,), float(view["distance"]), dtype=torch.float64),
                                      extras=extras)
                images = out.color.permute(0, 3, 1, 2)
                if g != res:
                    images = F.interpolate(images, size=(g, g), mode="bilinear", align_corners=False,
                                           antialias=g < res)
                terms["sds"] = sds_image_loss(images, denoiser, sds, step, views, noise_gen, guard=guard).loss
            terms["normal_consistency"] = normal_consistency(vertices, faces)
            terms["laplacian"] = laplacian_smoothness(vertices, faces)
            loss = sum(getattr(config, f"lambda_{name}") * value for name, value in terms.items())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"DMTet refine: the loss became {float(loss)} at iteration {step}; lower "
                                         "the learning rate or the loss weights")
            loss.backward()
            optimiser.step()
            history.record(float(loss.detach()), {k: float(v.detach()) for k, v in terms.items()})
            state.steps_done = step + 1
            if progress is not None:
                last = i + 1 == config.iterations
                show = last or (i + 1) % config.preview_every == 0
                progress(i + 1, config.iterations, out.color[0].detach().clamp(0, 1) if show else None)
    finally:
        state.optimizer_state = current_moments(optimiser, state.parameters())
    with torch.no_grad():
        vertices, faces = state.surface()
    return RefineResult(state=state, vertices=vertices.detach(), faces=faces, loss_map=history.as_loss_map())
