"""ThemeStation's refinement stage (paper §3.3): a DMTet surface refined by dual score distillation.

The initial model (a stage-1 radiance field, :func:`~.dmtet_refine.init_refine_state`, or any mesh,
:func:`~.dsd_init.init_state_from_mesh`) becomes the pack's DMTet state: a signed distance on a
deformable tetrahedral grid plus a texture field. Each iteration, at one random camera
(theme-station-optimization.yaml ``data``: elevation [-5, 30]°, azimuth all round, distance [1.4, 1.8]
and fov [70, 80]° — distances in units of the grid box's half-side, the official scene's radius 1):

1. renders the marching-tets surface twice: the colour (texture field) on white and the normal map
   ``(n + 1) / 2`` of the smooth vertex normals (world frame, y up: Render Exemplars' convention) on
   black, both at ``resolution`` (official: 512²), as the official system;
2. resizes them to the guidance size, encodes each once, and applies :func:`~mpod_core.guidance.dsd.dsd_loss`
   with the three ThemeStation terms (concept·colour at high t, reference·colour and reference·normal at
   low t), VSD baselines from each prior's :class:`~mpod_core.guidance.vsd.VSDScore` when ``score="vsd"``;
3. adds the official regularisers: normal consistency 400 (on the mesh's faces), sparsity 10
   (``mean sqrt(alpha² + 0.01)``) and the opacity entropy 1000 from step 2501 (``lambda_opaque
   [2500, 0, 1000, 2501]``) on the colour render's coverage;
4. steps Adam on the SDF, deformation and texture field, then one LoRA step of each VSD score on the
   detached latents of the renders its prior reads.

Deviations, each stated where it is set: the geometry is the pack's explicit DMTet grid (official: a
hash-grid SDF network extracted by marching tets at 192), so the learning rate is DMTet Refine's 1e-3
rather than the network's 1e-4; the colour background is white, not the official learned environment
map; the contextual loss against img2img-augmented views and the TV loss are left out.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..cameras import Cameras, orbit_cameras
from ..configdoc import limits
from ..exemplars import smooth_vertex_normals
from ..fields.regularizers import opacity_entropy
from ..guidance.dsd import DSDConfig, DSDTerm, dsd_loss
from ..guidance.protocol import ViewCondition
from ..guidance.sds import NonFiniteGuard
from ..guidance.vsd import VSDScore
from ..loss_history import LossHistory
from ..optim_state import current_moments
from ..progress import ProgressFn
from ..render import render_mesh
from .dmtet_refine import RefineResult, RefineState, _optimizer, check_surface_settings, normal_consistency

__all__ = ["DSDRefineConfig", "fit_dsd", "sample_dsd_camera", "render_dsd_views", "sparsity_loss_sqrt"]

#: Largest render side (the official 512² plus headroom; a 1024² render's graph is ~1 GiB here).
MAX_DSD_RESOLUTION = 1024


@dataclass
class DSDRefineConfig:
    """Settings of :func:`fit_dsd`; each default names its source."""

    iterations: int = field(default=5000, metadata=limits(1, 100000))
    """Iterations to run (on top of a resumed state's). theme-station-optimization.yaml trainer.max_steps: 5000."""
    resolution: int = field(default=512, metadata=limits(16, MAX_DSD_RESOLUTION, 8))
    """Render side in pixels (theme-station-optimization.yaml data.width/height: 512)."""
    guidance_resolution: Optional[int] = field(default=512, metadata=limits(64, 512, 8))
    """Renders are resized to this for the priors (SD 2.1-base / 1.5's own 512; None: as rendered)."""
    grid_cells: int = field(default=96, metadata=limits(4, 128))
    """Cells per side of the tetrahedral grid (official isosurface_resolution 192 ~ 96 cells here: DMTet Refine's
    64 cells ~ threestudio's "128_tets")."""
    learning_rate: float = field(default=1e-3, metadata=limits(1e-5, 1.0, 1e-4))
    """Adam learning rate of SDF, deformation and texture (DMTet Refine's, MPOD123 §4.2: the explicit grid; the
    official 1e-4 is for a hash-grid SDF network)."""
    density_threshold: float = field(default=10.0, metadata=limits(0.0, 1000.0, 0.5))
    """τ of ``sdf = clamp(τ − σ)`` for a radiance-field initial model (Field to Mesh's default)."""
    elevation_range: Tuple[float, float] = (-5.0, 30.0)
    """Camera elevations, degrees (theme-station-optimization.yaml data.elevation_range)."""
    azimuth_range: Tuple[float, float] = (-180.0, 180.0)
    """Camera azimuths, degrees (threestudio's random-camera default)."""
    distance_range: Tuple[float, float] = (1.4, 1.8)
    """Camera distances in units of the grid box's half-side (data.camera_distance_range [1.4, 1.8] in the
    official radius-1 scene)."""
    fov_range: Tuple[float, float] = (70.0, 80.0)
    """Vertical field of view, degrees (data.fovy_range)."""
    dsd: DSDConfig = field(default_factory=DSDConfig)
    """Timestep ranges, weights, guidance and the score (VSD or SDS) of the two priors."""
    lambda_normal_consistency: float = field(default=400.0, metadata=limits(0.0, 10000.0, 1.0))
    """Normal consistency weight (loss.lambda_normal_consistency: 400)."""
    lambda_sparsity: float = field(default=10.0, metadata=limits(0.0, 10000.0, 0.1))
    """Sparsity weight, ``mean sqrt(alpha² + 0.01)`` (loss.lambda_sparsity: 10)."""
    lambda_opaque: float = field(default=1000.0, metadata=limits(0.0, 10000.0, 1.0))
    """Opacity entropy weight from ``opaque_start`` on (loss.lambda_opaque [2500, 0.0, 1000, 2501])."""
    opaque_start: int = field(default=2501, metadata=limits(0, 100000))
    """First step of the opacity term (loss.lambda_opaque: step 2501)."""
    background: float = field(default=1.0, metadata=limits(0.0, 1.0, 0.05))
    """Grey level behind the colour render (white, the reference prior's renders; official: a learned
    environment map). The normal map is always on black, as the official system."""
    seed: int = 0
    """Seed of cameras, timesteps and noise."""
    preview_every: int = 10
    """Send a preview to ``progress`` every this many iterations (and at the last)."""

    LAMBDAS = ("lambda_normal_consistency", "lambda_sparsity", "lambda_opaque")

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting."""
        check_surface_settings(self, MAX_DSD_RESOLUTION,
                               ("elevation_range", "azimuth_range", "distance_range", "fov_range"))
        if self.guidance_resolution is None and self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8 when renders go to the priors as rendered, "
                             f"got {self.resolution}")
        if self.distance_range[0] <= 0:
            raise ValueError(f"distance_range must be > 0, got {self.distance_range}")
        if not (0 < self.fov_range[0] and self.fov_range[1] < 180):
            raise ValueError(f"fov_range must lie in (0, 180) degrees, got {self.fov_range}")
        self.dsd.validate()


def _uniform(generator: torch.Generator, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(1, generator=generator, dtype=torch.float64)


def box_radius(state: RefineState) -> float:
    """Half the largest side of the state's grid box: the scene radius cameras are measured in."""
    b = state.grid.bbox
    return 0.5 * max(b[3] - b[0], b[4] - b[1], b[5] - b[2])


def box_centre(state: RefineState) -> torch.Tensor:
    """(3,) centre of the grid box (cameras look at it)."""
    b = state.grid.bbox
    return torch.tensor([(b[0] + b[3]) / 2, (b[1] + b[4]) / 2, (b[2] + b[5]) / 2])


def sample_dsd_camera(config: DSDRefineConfig, radius: float, generator: torch.Generator):
    """One random camera (module docstring): ``(elevation, azimuth, distance, fov)`` (1,) float64 tensors."""
    elev = _uniform(generator, *config.elevation_range)
    azim = _uniform(generator, *config.azimuth_range)
    dist = _uniform(generator, *config.distance_range) * radius
    fov = _uniform(generator, *config.fov_range)
    return elev, azim, dist, fov


def sparsity_loss_sqrt(alpha: torch.Tensor) -> torch.Tensor:
    """threestudio's ``mean sqrt(opacity² + 0.01)`` (a smooth L1 of the coverage)."""
    return (alpha.square() + 0.01).sqrt().mean()


def render_dsd_views(state: RefineState, vertices: torch.Tensor, faces: torch.Tensor, cameras, resolution: int,
                     background: float, backend: str = "auto"):
    """The colour render (texture field, on grey ``background``) and the normal map (on black) of the surface.

    Returns:
        ``(color (N, H, W, 3), normal (N, H, W, 3), alpha (N, H, W))``, differentiable w.r.t. the vertices and
        (colour) the texture field.
    """
    out = render_mesh(vertices, faces, cameras, resolution, resolution, color_fn=state.albedo,
                      background=(background,) * 3, backend=backend)
    normals = smooth_vertex_normals(vertices, faces)
    nrm = render_mesh(vertices, faces, cameras, resolution, resolution, vertex_colors=(normals + 1.0) * 0.5,
                      background=(0.0, 0.0, 0.0), backend=backend)
    return out.color, nrm.color, out.alpha


def _to_guidance(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, H, W, 3) -> (N, 3, size, size) for the encoder."""
    x = images.permute(0, 3, 1, 2)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < x.shape[-1])
    return x


def fit_dsd(state: RefineState, encode: Callable[[torch.Tensor], torch.Tensor], terms: Sequence[DSDTerm],
            config: DSDRefineConfig, *, scores: Optional[Dict[str, VSDScore]] = None, backend: str = "auto",
            progress: Optional[ProgressFn] = None) -> RefineResult:
    """Refine the DMTet surface and its texture under dual score distillation (module docstring).

    Args:
        state: from :func:`~.dmtet_refine.init_refine_state`, :func:`~.dsd_init.init_state_from_mesh` or a
            resumed state; optimised in place (``steps_done`` and Adam's moments updated).
        encode: ``(B, 3, H, W) in [0, 1] -> latents``, differentiable (the priors' shared VAE encoder).
        terms: the DSD terms (:func:`~mpod_core.guidance.dsd.themestation_terms`), VSD baselines set.
        config: :class:`DSDRefineConfig` (its ``dsd`` part is what built ``terms``).
        scores: the VSD score of each prior by prior name, trained after every step on the renders its
            terms read (None or empty with ``score="sds"``).
        backend: rasterizer backend.
        progress: ``progress(i, iterations, preview)`` after every iteration (preview: colour and normal side
            by side); may raise to stop, leaving the state consistent.

    Returns:
        :class:`~.dmtet_refine.RefineResult` whose loss map holds ``loss``, each term (``concept_color``, ...,
        unweighted), ``vsd_<prior>`` (the LoRA's diffusion loss) and the regularisers.
    """
    config.validate()
    scores = dict(scores or {})
    if config.dsd.score == "vsd":
        missing = sorted({t.prior for t in terms} - set(scores))
        if missing:
            raise ValueError(f"score 'vsd' needs a VSD score model for each prior; missing: {', '.join(missing)}")
    kinds_of: Dict[str, list] = {}
    for term in terms:
        kinds_of.setdefault(term.prior, [])
        if term.kind not in kinds_of[term.prior]:
            kinds_of[term.prior].append(term.kind)
    dev = state.sdf.device
    res = config.resolution
    g = config.guidance_resolution or res
    radius = box_radius(state)
    centre = box_centre(state).to(dev)
    start = state.steps_done
    views_gen = torch.Generator().manual_seed(int(config.seed) + start)
    noise_gen = torch.Generator(device=dev).manual_seed(int(config.seed) + start + 1)
    # The optimiser of DMTet Refine (Adam, betas (0.9, 0.99), eps 1e-15 as the official AdamW, no decay:
    # weight decay would pull the explicit SDF values towards the zero level set).
    optimiser = _optimizer(state, config)
    guards = {t.name: NonFiniteGuard() for t in terms}
    history = LossHistory()
    try:
        for i in range(config.iterations):
            step = start + i
            optimiser.zero_grad(set_to_none=True)
            vertices, faces = state.surface()
            if faces.shape[0] == 0:
                raise ValueError(f"DSD refine: the surface vanished at iteration {step} (the SDF has no sign change "
                                 "left); lower the learning rate or the sparsity weight")
            elev, azim, dist, fov = sample_dsd_camera(config, radius, views_gen)
            cams = _orbiting(orbit_cameras(elev, azim, dist, fov), centre)
            color, normal, alpha = render_dsd_views(state, vertices, faces, cams, res, config.background, backend)
            with torch.no_grad():
                if not (torch.isfinite(color).all() and torch.isfinite(normal).all()):
                    raise FloatingPointError(f"DSD refine: the renders became NaN at iteration {step}; lower the "
                                             "learning rate")
            latents = {"color": encode(_to_guidance(color, g)), "normal": encode(_to_guidance(normal, g))}
            views = ViewCondition(elevation=elev, azimuth=azim, distance=dist)
            out = dsd_loss(latents, terms, step, views, noise_gen, guards)
            regs = {"normal_consistency": normal_consistency(vertices, faces),
                    "sparsity": sparsity_loss_sqrt(alpha)}
            lambdas = {"normal_consistency": config.lambda_normal_consistency, "sparsity": config.lambda_sparsity}
            if step >= config.opaque_start:
                regs["opaque"] = opacity_entropy(alpha)
                lambdas["opaque"] = config.lambda_opaque
            loss = out.loss + sum(lambdas[k] * v for k, v in regs.items())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"DSD refine: the loss became {float(loss)} at iteration {step}; lower the "
                                         "learning rate or the loss weights")
            loss.backward()
            optimiser.step()
            record = {name: float(o.loss.detach()) for name, o in out.terms.items()}
            record.update({k: float(v.detach()) for k, v in regs.items()})
            if config.dsd.score == "vsd":
                for prior, score in scores.items():
                    record[f"vsd_{prior}"] = score.train_step(
                        {k: latents[k].detach() for k in kinds_of.get(prior, [])}, noise_gen)
            history.record(float(loss.detach()), record)
            state.steps_done = step + 1
            if progress is not None:
                last = i + 1 == config.iterations
                show = last or (i + 1) % config.preview_every == 0
                preview = torch.cat([color[0], normal[0]], dim=1).detach().clamp(0, 1) if show else None
                progress(i + 1, config.iterations, preview)
    finally:
        state.optimizer_state = current_moments(optimiser, state.parameters())
    with torch.no_grad():
        vertices, faces = state.surface()
    return RefineResult(state=state, vertices=vertices.detach(), faces=faces, loss_map=history.as_loss_map())


def _orbiting(cameras: Cameras, centre: torch.Tensor) -> Cameras:
    """The cameras moved so they orbit ``centre`` instead of the origin (a mesh keeps its own placement)."""
    c2w = cameras.c2w.clone()
    c2w[:, :3, 3] = c2w[:, :3, 3] + centre.to(c2w)
    return dataclasses.replace(cameras, c2w=c2w)
