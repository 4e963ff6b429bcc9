"""MPOD123 stage 1: a NeRF fitted to one image under Zero123 score distillation.

Each iteration renders either the reference view (probability
``reference_probability``, 25% in the paper) and fits it to the input image
(RGB and mask losses), or ``batch_size`` random novel views and applies SDS
through the guidance :class:`~mpod_core.guidance.protocol.Denoiser` (Zero123 in
the node; any denoiser here, e.g. an oracle in the tests). Novel views are
drawn uniformly in elevation x azimuth at the reference view's distance and
fov. Renders are composited on a solid background (white: what Zero123 was
trained on) and resized to ``guidance_resolution`` before the denoiser encodes
them (Zero123 works at 256^2, the field renders at 128^2, as threestudio
does). The occupancy grid is updated every ``grid_update_every`` iterations.

Losses (threestudio's zero123 system, which Magic123 and MPOD123 build on)::

    reference step:  lambda_rgb  * MSE(render_rgb, image over background)
                   + lambda_mask * MSE(render_opacity, mask)
    novel step:      lambda_sds  * SDS(render_rgb)
                   + lambda_sparsity * mean(opacity)
                   + lambda_opaque   * mean(binary entropy of opacity)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.nn import functional as F

from ..cameras import orbit_cameras
from ..fields import NeRFFieldConfig, RadianceField
from ..guidance.protocol import Denoiser, ViewCondition
from ..guidance.sds import SDSConfig, sds_image_loss

#: ``progress(step, total, preview)``: preview is an (H, W, 3) image in [0, 1] or None.
ProgressFn = Callable[[int, int, Optional[torch.Tensor]], None]


def zero123_sds_config() -> SDSConfig:
    """SDS settings used with Zero123: guidance 3, t in [0.4, 0.85] annealed to
    [0.2, 0.5] over the first 200 iterations (REFERENCE.md)."""
    return SDSConfig(guidance_scale=3.0, min_step=0.4, max_step=0.85, anneal_min_step=0.2,
                     anneal_max_step=0.5, anneal_steps=200)


@dataclass
class Stage1Config:
    """Settings of :func:`fit_stage1` (defaults: the MPOD123 paper, section 4.2)."""

    iterations: int = 5000
    """Iterations to run (on top of those a resumed field already has)."""
    resolution: int = 128
    """Render resolution (square) for every view."""
    guidance_resolution: Optional[int] = 256
    """Renders are resized to this before the denoiser encodes them (None: as rendered)."""
    learning_rate: float = 1e-3
    """Adam learning rate (all parameters)."""
    batch_size: int = 1
    """Novel views per SDS iteration."""
    reference_probability: float = 0.25
    """Probability that an iteration fits the reference view instead of a novel view."""
    elevation_range: Tuple[float, float] = (-45.0, 45.0)
    """Novel-view elevations (degrees), drawn uniformly."""
    azimuth_range: Tuple[float, float] = (-180.0, 180.0)
    """Novel-view azimuths (degrees), drawn uniformly."""
    reference_elevation: float = 0.0
    """Elevation of the reference view (the paper assumes a frontal image: 0)."""
    reference_azimuth: float = 0.0
    """Azimuth of the reference view (0)."""
    distance: float = 2.5
    """Camera distance of every view."""
    fov: float = 40.0
    """Vertical field of view of every view, degrees."""
    sds: SDSConfig = field(default_factory=zero123_sds_config)
    """Score distillation settings."""
    lambda_sds: float = 0.1
    lambda_rgb: float = 500.0
    lambda_mask: float = 50.0
    lambda_sparsity: float = 0.0
    lambda_opaque: float = 0.0
    background: float = 1.0
    """Grey level of the background composited behind renders and the reference image."""
    grid_update_every: int = 16
    """Occupancy-grid update interval (iterations)."""
    seed: int = 0
    """Seed of view sampling, ray jitter, timesteps and noise."""
    preview_every: int = 10
    """Send a preview to ``progress`` every this many iterations (and at the last)."""

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting."""
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")
        if not 8 <= self.resolution <= 2048:
            raise ValueError(f"resolution must be in [8, 2048], got {self.resolution}")
        g = self.guidance_resolution
        if g is not None and (g < 8 or g % 8):
            raise ValueError(f"guidance_resolution must be a multiple of 8 (>= 8), got {g}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.reference_probability <= 1.0:
            raise ValueError(f"reference_probability must be in [0, 1], got {self.reference_probability}")
        for name in ("elevation_range", "azimuth_range"):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise ValueError(f"{name}: min must not exceed max, got ({lo}, {hi})")
        lo, hi = self.elevation_range
        if lo < -89.0 or hi > 89.0:
            raise ValueError(f"elevation_range must lie within [-89, 89] degrees, got ({lo}, {hi})")
        if not self.distance > 0 or not 0 < self.fov < 180:
            raise ValueError(f"distance must be > 0 and fov in (0, 180), got {self.distance}, {self.fov}")
        for name in ("lambda_sds", "lambda_rgb", "lambda_mask", "lambda_sparsity", "lambda_opaque"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v}")
        if not 0.0 <= self.background <= 1.0:
            raise ValueError(f"background must be in [0, 1], got {self.background}")
        if self.grid_update_every < 1 or self.preview_every < 1:
            raise ValueError("grid_update_every and preview_every must be >= 1")
        self.sds.validate()


@dataclass
class Stage1Result:
    """What :func:`fit_stage1` returns."""

    field: RadianceField
    """The fitted field (its ``meta['steps_done']`` counts all iterations so far)."""
    history: Dict[str, List[Tuple[int, float]]]
    """Per loss term, (iteration, value) pairs."""


def prepare_reference(image: torch.Tensor, mask: torch.Tensor, resolution: int,
                      background: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Validate and resize the reference image and mask for the reference-view losses.

    Args:
        image: (H, W, 3) RGB in [0, 1] (ComfyUI layout), square.
        mask: (H, W) foreground in [0, 1].
        resolution: render resolution.
        background: grey level behind the object.

    Returns:
        rgb (res, res, 3) composited over ``background`` and mask (res, res).
    """
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"reference image: expected (H, W, 3) RGB, got {tuple(image.shape)}")
    h, w = image.shape[:2]
    if h != w:
        raise ValueError(f"reference image must be square (the reference camera's view), got {w}x{h}; "
                         "crop or pad it to a square first (e.g. with ImageCrop, or Crop Objects)")
    if mask.shape != (h, w):
        raise ValueError(f"mask size {tuple(mask.shape[::-1])} does not match the image size {w}x{h}")
    if not (torch.isfinite(image).all() and torch.isfinite(mask).all()):
        raise ValueError("reference image or mask contains NaN or infinite values")
    mask = mask.clamp(0, 1).to(image.dtype)
    if float(mask.sum()) < max(1.0, 1e-3 * h * w):
        raise ValueError("the mask has no foreground (it is empty or all zero): stage 1 needs the object's "
                         "silhouette; use a background-removal node, or check that the mask is not inverted")
    border = torch.cat([mask[0], mask[-1], mask[:, 0], mask[:, -1]])
    if float((border > 0.5).float().mean()) > 0.5:
        raise ValueError("the mask marks most of the image border as foreground, so it is probably inverted "
                         "(Load Image's MASK is 1 where the picture is transparent): turn on invert_mask")
    rgb = image.clamp(0, 1) * mask[..., None] + background * (1.0 - mask[..., None])
    both = torch.cat([rgb, mask[..., None]], -1).permute(2, 0, 1)[None]
    if (h, w) != (resolution, resolution):
        both = F.interpolate(both, size=(resolution, resolution), mode="bilinear", align_corners=False,
                             antialias=resolution < h)
    both = both[0].permute(1, 2, 0)
    return both[..., :3].contiguous(), both[..., 3].contiguous()


def _binary_entropy(p: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    p = p.clamp(eps, 1 - eps)
    return -(p * p.log() + (1 - p) * (1 - p).log())


def _uniform(generator: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)


def fit_stage1(image: torch.Tensor, mask: torch.Tensor, denoiser: Denoiser, config: Stage1Config, *,
               field: Optional[RadianceField] = None, field_config: Optional[NeRFFieldConfig] = None,
               backend: str = "auto", device=None, progress: Optional[ProgressFn] = None) -> Stage1Result:
    """Optimise a radiance field to the reference image under score distillation.

    Args:
        image: (H, W, 3) reference image in [0, 1], square.
        mask: (H, W) foreground mask in [0, 1].
        denoiser: guidance (view-conditioned; receives each novel view's camera
            as a :class:`ViewCondition`).
        config: :class:`Stage1Config`.
        field: a field to continue optimising (resume); None: a fresh one.
        field_config: settings of a fresh field (ignored when ``field`` is given).
        backend: hash-grid backend of a fresh field.
        device: where to optimise (default: the field's device, else CPU).
        progress: called after every iteration; may raise to stop (interrupt).
            The field is left in a consistent state whenever it raises.

    Returns:
        :class:`Stage1Result`.
    """
    config.validate()
    if field is None:
        field = RadianceField(field_config, backend=backend)
        if device is not None:
            field = field.to(device)
    elif device is not None:
        field = field.to(device)
    dev = field.device
    ref_rgb, ref_mask = prepare_reference(image.to(dev, torch.float32), mask.to(dev, torch.float32),
                                          config.resolution, config.background)
    start = int(field.meta.get("steps_done", 0))
    field.meta.update(reference_view={"elevation": config.reference_elevation,
                                      "azimuth": config.reference_azimuth,
                                      "distance": config.distance, "fov": config.fov})
    views_gen = torch.Generator().manual_seed(int(config.seed) + start)
    noise_gen = torch.Generator(device=dev).manual_seed(int(config.seed) + start + 1)
    optimiser = torch.optim.Adam(field.field.parameters(), lr=config.learning_rate, betas=(0.9, 0.99),
                                 eps=1e-15)
    res = config.resolution
    ref_cam = orbit_cameras(config.reference_elevation, config.reference_azimuth, config.distance, config.fov)
    history: Dict[str, List[Tuple[int, float]]] = {}

    def log(name: str, step: int, value: torch.Tensor) -> None:
        history.setdefault(name, []).append((step, float(value.detach())))

    for i in range(config.iterations):
        step = start + i
        if step % config.grid_update_every == 0:
            field.update_grid(step)
        optimiser.zero_grad(set_to_none=True)
        reference_step = float(torch.rand(1, generator=views_gen)) < config.reference_probability
        if reference_step:
            out = field.render(ref_cam, res, res, background=config.background, generator=noise_gen)
            loss_rgb = F.mse_loss(out["color"][0], ref_rgb)
            loss_mask = F.mse_loss(out["opacity"][0], ref_mask)
            loss = config.lambda_rgb * loss_rgb + config.lambda_mask * loss_mask
            log("rgb", step, loss_rgb)
            log("mask", step, loss_mask)
        else:
            b = config.batch_size
            elev = _uniform(views_gen, b, *config.elevation_range)
            azim = _uniform(views_gen, b, *config.azimuth_range)
            cams = orbit_cameras(elev, azim, config.distance, config.fov)
            out = field.render(cams, res, res, background=config.background, generator=noise_gen)
            images = out["color"].permute(0, 3, 1, 2)
            g = config.guidance_resolution
            if g is not None and g != res:
                images = F.interpolate(images, size=(g, g), mode="bilinear", align_corners=False)
            dist = torch.full((b,), float(config.distance), dtype=torch.float64)
            views = ViewCondition(elevation=elev, azimuth=azim, distance=dist)
            sds = sds_image_loss(images, denoiser, config.sds, step, views, noise_gen)
            opacity = out["opacity"]
            loss = (config.lambda_sds * sds.loss + config.lambda_sparsity * opacity.mean()
                    + config.lambda_opaque * _binary_entropy(opacity).mean())
            log("sds", step, sds.loss)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"stage 1: the loss became {float(loss)} at iteration {step}; lower the "
                                     "learning rate or the loss weights")
        loss.backward()
        optimiser.step()
        field.meta["steps_done"] = step + 1
        if progress is not None:
            last = i + 1 == config.iterations
            preview = None
            if last or (i + 1) % config.preview_every == 0:
                preview = out["color"][0].detach().clamp(0, 1)
            progress(i + 1, config.iterations, preview)
    return Stage1Result(field=field, history=history)


def turntable_cameras(frames: int, elevation: float = 0.0, distance: float = 2.5, fov: float = 40.0,
                      start_azimuth: float = 0.0):
    """``frames`` cameras evenly spaced in azimuth (one full turn, counter-clockwise)."""
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    azim = [start_azimuth + 360.0 * k / frames for k in range(frames)]
    return orbit_cameras(elevation, azim, distance, fov)
