"""MPOD123 stage 1: a NeRF fitted to one image under Zero123 score distillation,
run as the reference implementations run it.

Each iteration renders either the reference view (probability
``reference_probability``, 25% in the paper) and fits it to the input image
(RGB and mask losses), or ``batch_size`` random novel views and applies SDS
through the guidance :class:`~mpod_core.guidance.protocol.Denoiser` (Zero123 in
the node; any denoiser here, e.g. an oracle in the tests). Renders are
composited on a solid background (white: what Zero123 was trained on) and
resized to ``guidance_resolution`` before the denoiser encodes them.

What the references add to that loop, each a setting below with its source:

* timesteps annealed over fractions of the run (:mod:`mpod_core.guidance.schedules`);
* Adam with the hash grid at 10x the base learning rate (Magic123 /
  stable-dreamfusion), its moments kept with the field for resuming;
* regularisers (:mod:`mpod_core.fields.regularizers`): orientation, 2D normal
  smoothness, sparsity (novel views), opacity entropy;
* shading augmentation (:mod:`mpod_core.fields.shading`): normal-map renders
  for the first 20% of the run, then random lambertian / textureless shading;
* a coarse-to-fine hash grid (the finest levels off for the first 60%);
* bounded memory at any resolution (:mod:`mpod_core.fields.backprop`).

Losses (threestudio's zero123 system, whose weights these defaults take)::

    reference step:  lambda_rgb * MSE(rgb, image over background) + lambda_mask * MSE(opacity, mask)
                   + regularisers
    novel step:      lambda_sds * SDS(render) + lambda_sparsity * mean(opacity) + regularisers
    regularisers:    lambda_orient * orientation + lambda_normal_smooth * normal smoothness (2D)
                   + lambda_opaque * binary entropy of the opacity

Run fractions (anneal, shading phase, coarse-to-fine) are fractions of the
iteration count the field will have at the end of the call (``steps_done`` at
the start + ``iterations``), so a resumed run continues every schedule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch.nn import functional as F

from ..progress import ProgressFn
from ..cameras import orbit_cameras
from ..configdoc import limits
from ..fields import NeRFFieldConfig, RadianceField
from ..fields import regularizers as reg
from ..fields.backprop import DEFAULT_GRAD_SAMPLE_BUDGET, render_and_backprop
from ..fields.shading import Shading
from ..guidance.protocol import Denoiser, ViewCondition
from ..guidance.schedules import TIMESTEP_PRESET_NAMES, TimestepSchedule, timestep_schedule
from ..guidance.sds import MAX_GUIDANCE_PIXELS, NonFiniteGuard, SDSConfig, sds_image_loss
from ..loss_history import LossHistory, LossMap
from ..optim_state import current_moments, restore_moments
from ..volume.rendering import DEFAULT_MAX_SAMPLES_PER_RAY


#: Largest render and guidance sizes accepted (memory is bounded by the two-pass
#: backward whatever the render size; the guidance's encoder holds its graph for
#: the whole batch: ``batch_size * guidance_resolution^2`` is capped too, at
#: :data:`~mpod_core.guidance.sds.MAX_GUIDANCE_PIXELS`, imported above).
MAX_RESOLUTION = 2048
MAX_SAMPLES_PER_RAY = DEFAULT_MAX_SAMPLES_PER_RAY


def zero123_sds_config() -> SDSConfig:
    """SDS settings used with Stable Zero123: guidance 3 (threestudio configs/stable-zero123.yaml
    ``guidance_scale``); the timestep range comes from ``Stage1Config.timestep_preset``."""
    return SDSConfig(guidance_scale=3.0)


@dataclass
class Stage1Config:
    """Settings of :func:`fit_stage1`; each default names its source."""

    iterations: int = field(default=5000, metadata=limits(1, 100000))
    """Iterations to run (on top of those a resumed field already has). MPOD123 sec. 4.2: 5000."""
    resolution: int = field(default=128, metadata=limits(16, MAX_RESOLUTION, 8))
    """Render resolution (square) of every view. MPOD123 sec. 4.2: 128."""
    guidance_resolution: Optional[int] = field(default=256, metadata=limits(64, 512, 8))
    """Renders are resized to this before the denoiser encodes them (None: as rendered).
    Zero123 was trained at 256 (threestudio's zero123 guidance resizes to 256)."""
    learning_rate: float = field(default=1e-3, metadata=limits(1e-5, 1.0, 1e-4))
    """Adam base rate, used by the MLP. MPOD123 sec. 4.2 and Magic123/stable-dreamfusion ``--lr``: 1e-3."""
    encoding_lr_scale: float = 10.0
    """The hash-grid encoding learns at ``learning_rate`` x this (Magic123 / stable-dreamfusion
    ``get_params``: encoder at 10x the base rate)."""
    batch_size: int = field(default=1, metadata=limits(1, 4))
    """Novel views per SDS iteration (views per step; threestudio stable-zero123.yaml uses 12 -> 4
    on a GPU)."""
    reference_probability: float = field(default=0.25, metadata=limits(0.0, 1.0, 0.05))
    """Probability that an iteration fits the reference view instead of novel views (Magic123 /
    stable-dreamfusion: every 4th step)."""
    elevation_range: Tuple[float, float] = (-45.0, 45.0)
    """Novel-view elevations (degrees), drawn uniformly (Magic123: +-45)."""
    azimuth_range: Tuple[float, float] = (-180.0, 180.0)
    """Novel-view azimuths (degrees), drawn uniformly."""
    reference_elevation: float = field(default=0.0, metadata=limits(-89.0, 89.0, 1.0))
    """Elevation of the reference view, degrees (MPOD123 assumes a frontal image: 0; a photo taken
    from above has a positive one). Zero123's relative cameras and the reference view follow it."""
    reference_azimuth: float = 0.0
    """Azimuth of the reference view (0)."""
    distance: float = field(default=2.5, metadata=limits(0.1, 100.0, 0.05))
    """Camera distance of every view (MPOD123 / Magic123: 2.5)."""
    fov: float = field(default=40.0, metadata=limits(1.0, 179.0, 0.5))
    """Vertical field of view of every view, degrees (MPOD123 / Magic123: 40)."""
    sds: SDSConfig = field(default_factory=zero123_sds_config)
    """Score distillation settings (guidance scale, weighting); the timestep range comes from
    the schedule below."""
    timestep_preset: str = field(default="stable-zero123", metadata=limits(options=TIMESTEP_PRESET_NAMES))
    """Timestep schedule (:data:`~mpod_core.guidance.schedules.TIMESTEP_PRESETS`, or "custom")."""
    custom_timesteps: TimestepSchedule = field(default_factory=lambda: TimestepSchedule(0.02, 0.98))
    """The schedule used when ``timestep_preset == "custom"``."""
    lambda_sds: float = 0.1
    """SDS weight (threestudio stable-zero123.yaml ``lambda_sds``)."""
    lambda_rgb: float = 500.0
    """Reference RGB weight (threestudio stable-zero123.yaml ``lambda_rgb``: 500 -> 1000)."""
    lambda_mask: float = 50.0
    """Reference mask weight (threestudio stable-zero123.yaml ``lambda_mask``)."""
    lambda_orient: float = field(default=1.0, metadata=limits(0.0, 1000.0, 0.01))
    """Orientation (DreamFusion) weight (threestudio stable-zero123.yaml ``lambda_orient``)."""
    lambda_normal_smooth: float = field(default=5.0, metadata=limits(0.0, 1000.0, 0.01))
    """2D normal-smoothness weight (threestudio stable-zero123.yaml ``lambda_normal_smooth``,
    a 7 -> 5 -> 10 schedule there, held at 5 here)."""
    lambda_sparsity: float = field(default=0.5, metadata=limits(0.0, 1000.0, 0.01))
    """Mean-opacity weight on novel views (threestudio stable-zero123.yaml ``lambda_sparsity``)."""
    lambda_opaque: float = field(default=0.5, metadata=limits(0.0, 1000.0, 0.01))
    """Opacity binary-entropy weight (threestudio stable-zero123.yaml ``lambda_opaque``)."""
    shading_augmentation: bool = True
    """Magic123 / stable-dreamfusion shading: normal maps for the first ``normal_shading_fraction``
    of the run, then random lambertian or textureless shading; False: albedo only (threestudio)."""
    normal_shading_fraction: float = 0.2
    """Share of the run rendered as normal maps (Magic123 ``--latent_iter_ratio 0.2``)."""
    min_ambient: float = 0.1
    """Ambient share drawn uniformly in [min_ambient, 1] (stable-dreamfusion ``--min_ambient_ratio``)."""
    textureless_probability: float = 0.2
    """Probability of textureless shading after the normal phase (stable-dreamfusion
    ``--textureless_ratio``)."""
    coarse_levels: int = field(default=8, metadata=limits(0, 16))
    """Hash-grid levels in use during the coarse phase; 0 = all levels from the start
    (Magic123: 8 of 16)."""
    coarse_fraction: float = 0.6
    """Share of the run with only ``coarse_levels`` levels (Magic123: 3000 of 5000 iterations)."""
    background: float = 1.0
    """Grey level of the background composited behind renders and the reference image."""
    grid_update_every: int = 16
    """Occupancy-grid update interval (iterations; nerfacc / threestudio: 16)."""
    grad_sample_budget: int = DEFAULT_GRAD_SAMPLE_BUDGET
    """Samples held in one autograd graph at most (bounds memory at any resolution)."""
    seed: int = 0
    """Seed of view sampling, ray jitter, shading, timesteps and noise."""
    preview_every: int = 10
    """Send a preview to ``progress`` every this many iterations (and at the last)."""

    LAMBDAS = ("lambda_sds", "lambda_rgb", "lambda_mask", "lambda_orient", "lambda_normal_smooth",
               "lambda_sparsity", "lambda_opaque")

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting (and the limit, for sizes)."""
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")
        if not 8 <= self.resolution <= MAX_RESOLUTION:
            raise ValueError(f"resolution must be in [8, {MAX_RESOLUTION}], got {self.resolution}")
        g = self.guidance_resolution
        if g is not None and (g < 8 or g % 8):
            raise ValueError(f"guidance_resolution must be a multiple of 8 (>= 8), got {g}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        pixels = self.batch_size * (g if g is not None else self.resolution) ** 2
        if pixels > MAX_GUIDANCE_PIXELS:
            raise ValueError(f"batch_size x guidance_resolution^2 = {pixels} exceeds {MAX_GUIDANCE_PIXELS} "
                             f"(4 views at 256^2): the VAE encoder's backward holds the whole batch in memory; "
                             f"lower batch_size or guidance_resolution")
        for name in ("learning_rate", "encoding_lr_scale"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be > 0, got {v}")
        if not 0.0 <= self.reference_probability <= 1.0:
            raise ValueError(f"reference_probability must be in [0, 1], got {self.reference_probability}")
        for name in ("elevation_range", "azimuth_range"):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise ValueError(f"{name}: min must not exceed max, got ({lo}, {hi})")
        lo, hi = self.elevation_range
        if lo < -89.0 or hi > 89.0:
            raise ValueError(f"elevation_range must lie within [-89, 89] degrees, got ({lo}, {hi})")
        if not -89.0 <= self.reference_elevation <= 89.0:
            raise ValueError(f"reference_elevation must be in [-89, 89] degrees, got {self.reference_elevation}")
        if not self.distance > 0 or not 0 < self.fov < 180:
            raise ValueError(f"distance must be > 0 and fov in (0, 180), got {self.distance}, {self.fov}")
        for name in self.LAMBDAS:
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v}")
        for name in ("normal_shading_fraction", "min_ambient", "textureless_probability", "coarse_fraction",
                     "background"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if self.coarse_levels < 0:
            raise ValueError(f"coarse_levels must be >= 0 (0 = all levels), got {self.coarse_levels}")
        if self.grid_update_every < 1 or self.preview_every < 1 or self.grad_sample_budget < 1:
            raise ValueError("grid_update_every, preview_every and grad_sample_budget must be >= 1")
        if self.timestep_preset not in TIMESTEP_PRESET_NAMES:
            raise ValueError(f"timestep_preset must be one of {', '.join(TIMESTEP_PRESET_NAMES)}; "
                             f"got {self.timestep_preset!r}")
        self.schedule().validate()
        self.sds.validate()

    def schedule(self) -> TimestepSchedule:
        """The timestep schedule in force (the preset's, or ``custom_timesteps``)."""
        return timestep_schedule(self.timestep_preset, self.custom_timesteps)

    def sds_for_run(self, run_length: int) -> SDSConfig:
        """``sds`` with the schedule's timesteps for a run ending at ``run_length`` iterations."""
        return self.schedule().sds_config(self.sds, run_length)


@dataclass
class Stage1Result:
    """What :func:`fit_stage1` returns."""

    field: RadianceField
    """The fitted field (its ``meta['steps_done']`` counts all iterations so far, its
    ``optimizer_state`` holds Adam's moments)."""
    history: Dict[str, List[Tuple[int, float]]]
    """Per loss term, (iteration, value) pairs at the iterations that evaluated it (iterations
    count from the field's start, so a resumed run continues the numbers)."""
    loss_map: LossMap
    """ComfyUI's LOSS_MAP of this call (:mod:`mpod_core.loss_history`): ``"loss"`` the total at
    each iteration, and each term unweighted ("rgb", "mask", "sds", "orient", "normal_smooth",
    "sparsity", "opaque"), 0 where it was not part of the loss; the total is the sum of the
    terms times their ``lambda_*``."""


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


def _uniform(generator: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)


def stage1_optimizer(field: RadianceField, config: Stage1Config) -> torch.optim.Adam:
    """Adam over the field with two parameter groups, restoring saved moments.

    Groups: ``encoding`` (the hash grid) at ``learning_rate * encoding_lr_scale`` and
    ``mlp`` (everything else) at ``learning_rate``; betas (0.9, 0.99), eps 1e-15
    (stable-dreamfusion / Instant-NGP). Moments in ``field.optimizer_state`` whose
    shapes match are loaded, so a resumed run continues with them.
    """
    named = list(field.field.named_parameters())
    enc = [p for n, p in named if n.startswith("encoding.")]
    rest = [p for n, p in named if not n.startswith("encoding.")]
    groups = [{"params": enc, "lr": config.learning_rate * config.encoding_lr_scale, "name": "encoding"},
              {"params": rest, "lr": config.learning_rate, "name": "mlp"}]
    try:  # the fused kernel steps the 12.6M parameters ~4x faster on a CPU (bench/README.md); same maths
        optimiser = torch.optim.Adam(groups, betas=(0.9, 0.99), eps=1e-15, fused=True)
    except (RuntimeError, TypeError, ValueError):  # a device or dtype the fused kernel does not support
        optimiser = torch.optim.Adam(groups, betas=(0.9, 0.99), eps=1e-15)
    restore_moments(optimiser, dict(named), field.optimizer_state)
    return optimiser


def optimizer_moments(field: RadianceField, optimiser: torch.optim.Optimizer) -> Dict[str, Dict[str, torch.Tensor]]:
    """Adam's state per parameter name of ``field.field`` (detached CPU copies)."""
    return current_moments(optimiser, dict(field.field.named_parameters()))


def draw_shading(config: Stage1Config, run_fraction: float, camera_center: torch.Tensor,
                 generator: torch.Generator) -> Shading:
    """The shading of one novel view (stable-dreamfusion / Magic123's augmentation).

    Normal maps while ``run_fraction < normal_shading_fraction``; then textureless
    with probability ``textureless_probability``, else lambertian, with ambient
    uniform in ``[min_ambient, 1]`` and the light at the camera plus unit Gaussian
    noise (stable-dreamfusion's ``light_d = normalize(rays_o + randn(3))``).
    Without ``shading_augmentation``: albedo.
    """
    if not config.shading_augmentation:
        return Shading()
    if run_fraction < config.normal_shading_fraction:
        return Shading("normal")
    u = torch.rand(2, generator=generator, dtype=torch.float64)
    light = F.normalize(camera_center.detach().double().cpu() + torch.randn(3, generator=generator,
                                                                          dtype=torch.float64), dim=0)
    ambient = config.min_ambient + (1.0 - config.min_ambient) * float(u[0])
    mode = "textureless" if float(u[1]) < config.textureless_probability else "lambertian"
    return Shading(mode, light.float(), ambient)


def regularization(out: Dict[str, torch.Tensor], config: Stage1Config, novel: bool
                   ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The weighted regularisers of one step and their unweighted values.

    Orientation, 2D normal smoothness and opacity entropy on every step (threestudio's
    zero123 system); sparsity on novel views only.
    """
    terms: Dict[str, torch.Tensor] = {}
    opacity = out["opacity"]
    if config.lambda_orient > 0:
        terms["orient"] = reg.orientation_loss(out["orientation"], opacity)
    if config.lambda_normal_smooth > 0:
        terms["normal_smooth"] = reg.normal_smoothness_2d(reg.normal_map(out["normal"], opacity))
    if novel and config.lambda_sparsity > 0:
        terms["sparsity"] = reg.sparsity_loss(opacity)
    if config.lambda_opaque > 0:
        terms["opaque"] = reg.opacity_entropy(opacity)
    total = opacity.new_zeros(())
    for name, value in terms.items():
        total = total + getattr(config, f"lambda_{name}") * value
    return total, terms


def fit_stage1(image: torch.Tensor, mask: torch.Tensor, denoiser: Denoiser, config: Stage1Config, *,
               field: Optional[RadianceField] = None, field_config: Optional[NeRFFieldConfig] = None,
               backend: str = "auto", device=None, progress: Optional[ProgressFn] = None) -> Stage1Result:
    """Optimise a radiance field to the reference image under score distillation.

    Args:
        image: (H, W, 3) reference image in [0, 1], square.
        mask: (H, W) foreground mask in [0, 1].
        denoiser: guidance (view-conditioned; receives each novel view's camera
            as a :class:`ViewCondition`); a guidance returning NaN/inf stops the run
            (:class:`~mpod_core.guidance.sds.NonFiniteGuard`).
        config: :class:`Stage1Config`.
        field: a field to continue optimising (resume: its iteration count, occupancy
            grid and Adam moments continue); None: a fresh one.
        field_config: settings of a fresh field (ignored when ``field`` is given).
        backend: hash-grid backend of a fresh field.
        device: where to optimise (default: the field's device, else CPU).
        progress: called after every iteration; may raise to stop (interrupt).
            The field (with its Adam moments) is left consistent whenever it raises.

    Returns:
        :class:`Stage1Result`.
    """
    config.validate()
    if field is None:
        field = RadianceField(field_config, backend=backend)
    if device is not None:
        field = field.to(device)
    dev = field.device
    ref_rgb, ref_mask = prepare_reference(image.to(dev, torch.float32), mask.to(dev, torch.float32),
                                          config.resolution, config.background)
    start = int(field.meta.get("steps_done", 0))
    total = start + config.iterations
    sds_config = config.sds_for_run(total)
    field.meta.update(reference_view={"elevation": config.reference_elevation,
                                      "azimuth": config.reference_azimuth,
                                      "distance": config.distance, "fov": config.fov})
    views_gen = torch.Generator().manual_seed(int(config.seed) + start)
    noise_gen = torch.Generator(device=dev).manual_seed(int(config.seed) + start + 1)
    rays_gen = torch.Generator().manual_seed(int(config.seed) + start + 2)
    optimiser = stage1_optimizer(field, config)
    res = config.resolution
    ref_cam = orbit_cameras(config.reference_elevation, config.reference_azimuth, config.distance, config.fov)
    with_normals = config.lambda_orient > 0 or config.lambda_normal_smooth > 0
    history: Dict[str, List[Tuple[int, float]]] = {}
    loss_history = LossHistory()
    guard = NonFiniteGuard()
    coarse_until = config.coarse_fraction * total if config.coarse_levels > 0 else 0.0
    samples_per_ray_seen: Dict[str, float] = {}

    def check_finite(loss: torch.Tensor) -> None:
        if not torch.isfinite(loss):
            raise FloatingPointError(f"stage 1: the loss became {float(loss)} at iteration {step}; lower the "
                                     "learning rate or the loss weights")

    def reference_loss(out):
        loss_rgb = F.mse_loss(out["color"][0], ref_rgb)
        loss_mask = F.mse_loss(out["opacity"][0], ref_mask)
        regs, terms = regularization(out, config, novel=False)
        return (config.lambda_rgb * loss_rgb + config.lambda_mask * loss_mask + regs,
                {"rgb": loss_rgb, "mask": loss_mask, **terms})

    def novel_loss(out):
        images = out["color"].permute(0, 3, 1, 2)
        g = config.guidance_resolution
        if g is not None and g != res:
            images = F.interpolate(images, size=(g, g), mode="bilinear", align_corners=False)
        sds = sds_image_loss(images, denoiser, sds_config, step, views, noise_gen, guard=guard)
        regs, terms = regularization(out, config, novel=True)
        return config.lambda_sds * sds.loss + regs, {"sds": sds.loss, **terms}

    try:
        for i in range(config.iterations):
            step = start + i
            field.field.active_levels = config.coarse_levels if step < coarse_until else None
            if step % config.grid_update_every == 0:
                field.update_grid(step)
            optimiser.zero_grad(set_to_none=True)
            if float(torch.rand(1, generator=views_gen)) < config.reference_probability:
                kind, cams, shadings, loss_fn = "reference", ref_cam, None, reference_loss
            else:
                b = config.batch_size
                elev = _uniform(views_gen, b, *config.elevation_range)
                azim = _uniform(views_gen, b, *config.azimuth_range)
                cams = orbit_cameras(elev, azim, config.distance, config.fov)
                views = ViewCondition(elevation=elev, azimuth=azim,
                                      distance=torch.full((b,), float(config.distance), dtype=torch.float64))
                shadings = [draw_shading(config, step / total, cams.centers[k], views_gen) for k in range(b)]
                kind, loss_fn = "novel", novel_loss
            # samples per ray of the last render of this kind: a one-pass backward when they fit the budget
            per_ray = samples_per_ray_seen.get(kind)
            loss, terms, out = render_and_backprop(
                field, cams, res, res, lambda o: _with_float_terms(loss_fn(o)), shadings=shadings,
                background=config.background, with_normals=with_normals, generator=rays_gen,
                grad_sample_budget=config.grad_sample_budget, check_finite=check_finite,
                expected_samples=None if per_ray is None else int(per_ray * len(cams) * res * res))
            samples_per_ray_seen[kind] = float(out["samples"].float().mean())
            for name, value in terms.items():
                history.setdefault(name, []).append((step, value))
            loss_history.record(float(loss), terms)
            optimiser.step()
            field.meta["steps_done"] = step + 1
            if progress is not None:
                last = i + 1 == config.iterations
                preview = None
                if last or (i + 1) % config.preview_every == 0:
                    preview = out["color"][0].clamp(0, 1)
                progress(i + 1, config.iterations, preview)
    finally:
        field.field.active_levels = None
        field.optimizer_state = optimizer_moments(field, optimiser)
    return Stage1Result(field=field, history=history, loss_map=loss_history.as_loss_map())


def _with_float_terms(result):
    loss, terms = result
    return loss, {k: float(v.detach()) for k, v in terms.items()}


def turntable_cameras(frames: int, elevation: float = 0.0, distance: float = 2.5, fov: float = 40.0,
                      start_azimuth: float = 0.0):
    """``frames`` cameras evenly spaced in azimuth (one full turn, counter-clockwise)."""
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    azim = [start_azimuth + 360.0 * k / frames for k in range(frames)]
    return orbit_cameras(elevation, azim, distance, fov)
