"""REPARO layout alignment (sec. 3.2): place several meshes so that their render
from the reference camera matches the reference image.

Per-object translation and scale (rotation is left out, as the paper's
ablation chose) are optimised with Adam (lr 0.02, StepLR gamma 0.999 per
iteration, 500 iterations: the official configs) under eq. 9::

    L = lambda * L_a + (1 - lambda) * L_s

``L_a`` is the optimal-transport appearance loss (:mod:`.ot_loss`) or, with
``loss="l2"``, plain pixel-wise L2 on the colour (the baseline the paper
improves on); ``L_s`` is an optional semantic loss given by the caller
(DINOv2 features in the node).

With ``loss="ot"``, the pixel-wise L2 joins the OT term for the second half of
the run (``pixel_weight`` from ``pixel_start``): the OT pull brings objects
onto targets they do not overlap but carries almost no scale information
(see :mod:`.ot_loss`), and L2, blind from far away, fits the silhouettes
exactly once they overlap. Scales are therefore held during the first, OT-only
phase (:func:`hold_scale`) and optimised from the second. ``bench/bench_layout.py`` and
``tests/unit/test_layout_align.py`` measure the three against each other.

Starting placement: :func:`initial_placement` puts each object's box centre
on the ray through its mask's box centre, at the distance of the orbit
target, and scales it so its larger side spans the mask box's larger side.
With a depth map, :func:`~.depth.depth_placement` gives each object the depth
the map says instead (sized for it), and ``optimise_depth="auto"`` lets the
objects move along the view axis too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from ..progress import ProgressFn
from ..cameras import Cameras
from ..loss_history import LossHistory, LossMap
from ..configdoc import limits
from .depth import check_depth_map, placement_at_depths
from .ot_loss import OTAppearanceLoss, OTLossConfig, reference_points
from .scene import LayoutScene, SceneObject, SceneRender, render_scene

#: ``semantic_loss(render (1, H, W, 3) in [0, 1]) -> scalar``, differentiable.
SemanticFn = Callable[[torch.Tensor], torch.Tensor]

LOSSES = ("ot", "l2")
DEPTH_AXIS = ("auto", "on", "off")


@dataclass
class LayoutConfig:
    """Settings of :func:`align_layout` (defaults: REPARO's official configs)."""

    iterations: int = field(default=500, metadata=limits(1, 10000))
    """Optimisation steps (REPARO's official configs: 500)."""
    learning_rate: float = field(default=0.02, metadata=limits(1e-4, 1.0, 0.001))
    """Adam learning rate (REPARO's official configs: 0.02), decayed by ``lr_decay`` per step."""
    lr_decay: float = 0.999
    """Learning-rate factor after every iteration (StepLR, step 1; REPARO's official configs)."""
    optimise_translation: bool = True
    """Move the objects (in the image plane; see ``optimise_depth``). REPARO sec. 3.2 optimises translation."""
    optimise_depth: str = field(default="off", metadata=limits(options=DEPTH_AXIS))
    """Also move objects along the camera's view axis (REPARO sec. 3.2 optimises x, y and z). off (the
    default): objects keep the depths they start at, which with a depth map are the depths it gives
    (:func:`~.depth.depth_placement`); auto: on when a depth map is given; on: always. Off by default
    because measured on a 4-object synthetic scene (bench/bench_layout.py --only depth), view-axis
    moves under the depth term drifted one object to 0.27x its size and broke 2 of 3 occlusions
    (final depth error 17% vs the start's 4.7%), where off kept the start's depths and every order."""
    optimise_scale: bool = True
    """Rescale the objects (REPARO sec. 3.2 optimises scale)."""
    uniform_scale: bool = True
    """One scale factor per object (its three axes kept equal). Off lets x, y and z scale apart, as
    the paper's code does; from one view the depth axis is then only seen through the depth term."""
    loss: str = field(default="ot", metadata=limits(options=LOSSES))
    """ot: optimal transport (REPARO eq. 4), reaches objects that start off their target; l2: plain
    pixel-wise colour difference, the baseline the paper improves on."""
    ot: OTLossConfig = field(default_factory=OTLossConfig)
    pixel_weight: float = field(default=1.0, metadata=limits(0.0, 100.0, 0.1))
    """Weight of the pixel-wise colour L2 added to the OT loss (``loss="ot"``) from ``pixel_start``
    on: it supplies the silhouette gradient that shrinks oversized objects, which the OT pull lacks
    (measured in bench/bench_layout.py; not in the paper). 0 = OT only."""
    pixel_start: float = 0.5
    """Fraction of the iterations after which the pixel term joins. Before, it would shrink objects
    that do not yet overlap their target (L2 sees them only as colour where background should be)."""
    lambda_appearance: float = field(default=0.5, metadata=limits(0.0, 1.0, 0.05))
    """lambda of REPARO eq. 9 between the appearance and the semantic loss, used when a semantic loss
    is given (without one, L_a alone)."""
    semantic_every: int = field(default=1, metadata=limits(1, 1000))
    """Evaluate the semantic loss on every n-th iteration only (the others use ``lambda * L_a``):
    a DINOv2 forward and backward costs seconds per step on a CPU (one DINOv2-large step at 224 px
    ~9 s on 2 cores)."""
    background: float = 1.0
    """Grey level behind the objects in renders, and of the reference outside the masks."""
    seed: int = 0
    """Seed of the random pixel subsets the matching and the loss use."""
    preview_every: int = 10

    def validate(self) -> None:
        if not isinstance(self.iterations, int) or self.iterations < 1:
            raise ValueError(f"iterations must be an int >= 1, got {self.iterations!r}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)) or not 0 < self.lr_decay <= 1:
            raise ValueError(f"need learning_rate > 0 and lr_decay in (0, 1], got {self.learning_rate}, "
                             f"{self.lr_decay}")
        if not (self.optimise_translation or self.optimise_scale):
            raise ValueError("nothing to optimise: turn on translation and/or scale")
        if self.optimise_depth not in DEPTH_AXIS:
            raise ValueError(f"optimise_depth must be one of {DEPTH_AXIS}, got {self.optimise_depth!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if not 0.0 <= self.lambda_appearance <= 1.0:
            raise ValueError(f"lambda_appearance must be in [0, 1], got {self.lambda_appearance}")
        if not 0.0 <= self.background <= 1.0:
            raise ValueError(f"background must be in [0, 1], got {self.background}")
        if not (self.pixel_weight >= 0 and math.isfinite(self.pixel_weight)) or not 0 <= self.pixel_start <= 1:
            raise ValueError(f"need pixel_weight >= 0 and pixel_start in [0, 1], got {self.pixel_weight}, "
                             f"{self.pixel_start}")
        if not isinstance(self.semantic_every, int) or self.semantic_every < 1:
            raise ValueError(f"semantic_every must be an int >= 1, got {self.semantic_every!r}")
        if self.preview_every < 1:
            raise ValueError("preview_every must be >= 1")
        self.ot.validate()


@dataclass
class LayoutResult:
    """What :func:`align_layout` found.

    Attributes:
        translations: (K, 3) world position of each object's bounding-box centre.
        scales: (K, 3) scale factors about that centre.
        loss_map: ComfyUI's LOSS_MAP (:mod:`mpod_core.loss_history`): ``"loss"`` the total at
            each iteration, ``"ot"`` (``loss="ot"``), ``"pixel"`` (the pixel-wise L2) and
            ``"semantic"`` (when given), unweighted, 0 where not part of the loss. The total is
            ``w * (ot + pixel_weight * pixel) + (1 - lambda) * semantic`` for ``loss="ot"``
            (``w * pixel + ...`` for ``"l2"``), ``w`` = ``lambda_appearance`` with a semantic loss, else 1.
        render: (H, W, 3) render of the final layout.
        covered: (H, W) bool, its silhouette.
    """

    translations: torch.Tensor
    scales: torch.Tensor
    loss_map: LossMap
    render: torch.Tensor
    covered: torch.Tensor


def _validate_reference(image: torch.Tensor, mask: torch.Tensor, depth: Optional[torch.Tensor]) -> None:
    if image.ndim != 3 or image.shape[-1] < 3:
        raise ValueError(f"image: expected (H, W, 3), got {tuple(image.shape)}")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask {tuple(mask.shape)} does not match the image size {tuple(image.shape[:2])}")
    if depth is not None and depth.shape != image.shape[:2]:
        raise ValueError(f"depth {tuple(depth.shape)} does not match the image size {tuple(image.shape[:2])}")
    for name, t in (("image", image), ("mask", mask), ("depth", depth)):
        if t is not None and not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN or infinite values")
    if depth is not None and (mask > 0.5).any():
        check_depth_map(depth, mask)


def align_layout(objects: Sequence[SceneObject], translations: torch.Tensor, scales: torch.Tensor,
                 camera: Cameras, image: torch.Tensor, mask: torch.Tensor, config: LayoutConfig, *,
                 depth: Optional[torch.Tensor] = None, semantic_loss: Optional[SemanticFn] = None,
                 progress: Optional[ProgressFn] = None, backend: str = "auto") -> LayoutResult:
    """Optimise the placement of ``objects`` so their render matches the reference.

    Args:
        objects: the K meshes, each in its own frame.
        translations: (K, 3) starting world positions of the objects' box centres.
        scales: (K, 3) or (K,) starting scales.
        camera: the reference camera (one); renders have the image's size.
        image: (H, W, 3) reference image in [0, 1].
        mask: (H, W) union of the objects' masks in the reference.
        config: :class:`LayoutConfig`.
        depth: optional (H, W) relative depth of the reference, near = large; turns the depth term on.
        semantic_loss: optional ``L_s`` (see :data:`SemanticFn`).
        progress: called after every iteration.
        backend: rasterizer backend.

    Returns:
        :class:`LayoutResult`.
    """
    config.validate()
    _validate_reference(image, mask, depth)
    h, w = image.shape[:2]
    device = objects[0].vertices.device if objects else image.device
    scene = LayoutScene(objects, translations, scales).to(device)
    image, mask = image[..., :3].to(device).float(), mask.to(device).float()
    fg = mask > 0.5
    if not bool(fg.any()):
        raise ValueError("the reference mask is empty: there is nothing to align the objects to")
    bg = (config.background,) * 3
    reference = torch.where(fg[..., None], image, torch.full_like(image, config.background))
    params = []
    if config.optimise_translation:
        params.append(scene.translation)
        if not moves_along_view_axis(config, depth is not None):
            # The view axis in world coordinates: no step along it.
            axis = camera.w2c[0, 2, :3].to(device, torch.float32)
            scene.translation.register_hook(lambda g: g - (g @ axis)[:, None] * axis[None, :])
    else:
        scene.translation.requires_grad_(False)
    if config.optimise_scale:
        params.append(scene.log_scale)
        if config.uniform_scale:
            with torch.no_grad():  # start from the mean log-scale, then keep the axes equal
                scene.log_scale.copy_(scene.log_scale.mean(1, keepdim=True).expand(-1, 3))
            scene.log_scale.register_hook(lambda g: g.mean(1, keepdim=True).expand(-1, 3))
    else:
        scene.log_scale.requires_grad_(False)
    keep_scale = None
    if config.optimise_translation and config.optimise_scale and moves_along_view_axis(config, depth is not None):
        # (with scales fixed nothing drifts: moving away would shrink the objects on screen)
        keep_scale = SceneScaleLock(scene, camera)
    optimiser = torch.optim.Adam(params, lr=config.learning_rate)
    schedule = torch.optim.lr_scheduler.StepLR(optimiser, step_size=1, gamma=config.lr_decay)
    generator = torch.Generator().manual_seed(int(config.seed))
    ot_loss = None
    if config.loss == "ot":
        ref_points = reference_points(image, mask, None if depth is None else depth.to(device),
                                      background=config.background)
        ot_loss = OTAppearanceLoss(ref_points, fg, config.ot, use_depth=depth is not None, generator=generator)
    history = LossHistory()
    for step in range(config.iterations):
        optimiser.zero_grad(set_to_none=True)
        render = render_scene(scene, camera, w, h, background=bg, backend=backend)
        appearance, terms = appearance_terms(render, reference, step, config, ot_loss)
        loss = appearance
        if semantic_loss is not None and step % config.semantic_every == 0:
            semantic = semantic_loss(render.color[None])
            loss = config.lambda_appearance * appearance + (1 - config.lambda_appearance) * semantic
            terms["semantic"] = semantic
        elif semantic_loss is not None:
            loss = config.lambda_appearance * appearance
        if not torch.isfinite(loss):
            raise FloatingPointError(f"layout alignment: the loss became {float(loss)} at iteration {step}")
        loss.backward()
        if hold_scale(step, config) and scene.log_scale.grad is not None:
            scene.log_scale.grad.zero_()  # zero from the start, so Adam's moments stay zero too
        optimiser.step()
        if keep_scale is not None:
            keep_scale(scene)
        schedule.step()
        history.record(float(loss.detach()), {k: float(v.detach()) for k, v in terms.items()})
        if progress is not None:
            last = step + 1 == config.iterations
            preview = None
            if last or step == 0 or (step + 1) % config.preview_every == 0:
                preview = overlay(render.color.detach(), reference)
            progress(step + 1, config.iterations, preview)
    with torch.no_grad():
        final = render_scene(scene, camera, w, h, background=bg, backend=backend)
    return LayoutResult(translations=scene.translation.detach().clone(), scales=scene.scales.detach().clone(),
                        loss_map=history.as_loss_map(), render=final.color, covered=final.covered)


class SceneScaleLock:
    """Keeps the objects' mean view depth at its starting value when they move in depth.

    One image cannot tell a scene from the same scene scaled about the camera (every pixel is the
    same), and the depth term compares depths only up to scale and shift, so with view-axis moves the
    whole layout can drift away and grow (measured: 2.2x in 300 iterations on a 5-object scene). After
    every step the layout is scaled about the camera centre back to the starting mean depth (the
    convention of :func:`~.depth.depth_placement`): positions relative to the camera and scales by
    the same factor, which changes no pixel of the render.
    """

    def __init__(self, scene: LayoutScene, camera: Cameras):
        w2c = camera.w2c[0].to(scene.translation)
        self.centre = torch.linalg.inv(w2c)[:3, 3]
        self.forward = -w2c[2, :3]                          # OpenGL: the camera looks down -z
        self.target = float(self._mean_depth(scene).detach())

    def _mean_depth(self, scene: LayoutScene) -> torch.Tensor:
        return ((scene.translation - self.centre) @ self.forward).mean()

    @torch.no_grad()
    def __call__(self, scene: LayoutScene) -> None:
        factor = self.target / float(self._mean_depth(scene).clamp_min(1e-6))
        scene.translation.copy_(self.centre + (scene.translation - self.centre) * factor)
        scene.log_scale.add_(math.log(factor))


def moves_along_view_axis(config: LayoutConfig, has_depth: bool) -> bool:
    """Whether translations may move along the reference camera's view axis (see ``optimise_depth``)."""
    return config.optimise_depth == "on" or (config.optimise_depth == "auto" and has_depth)


def hold_scale(step: int, config: LayoutConfig) -> bool:
    """Whether scales stay fixed at iteration ``step``: in the OT-only first phase of ``loss="ot"``
    (with a pixel term to come). The OT pull carries no scale information (:mod:`.ot_loss`), so
    scales would only drift there; measured on 4 objects, one drifted to 2.4x its size in that
    phase and hid another object, which the pixel term then shrank away."""
    return config.loss == "ot" and config.pixel_weight > 0 and step < config.pixel_start * config.iterations


def appearance_loss(render: SceneRender, reference: torch.Tensor, step: int, config: LayoutConfig,
                    ot_loss: Optional[OTAppearanceLoss]) -> torch.Tensor:
    """``L_a`` at iteration ``step`` (see :func:`appearance_terms`)."""
    return appearance_terms(render, reference, step, config, ot_loss)[0]


def appearance_terms(render: SceneRender, reference: torch.Tensor, step: int, config: LayoutConfig,
                     ot_loss: Optional[OTAppearanceLoss]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """``L_a`` at iteration ``step``: pixel-wise L2 for ``loss="l2"``; for ``loss="ot"`` the OT loss,
    plus ``pixel_weight`` times the pixel-wise L2 from ``pixel_start`` on (see the module docstring).

    Args:
        render: the current render.
        reference: (H, W, 3) the reference with the background outside its mask.
        step: iteration index (0-based).
        config: the run's settings.
        ot_loss: the run's :class:`~.ot_loss.OTAppearanceLoss` (None for ``loss="l2"``).

    Returns:
        ``L_a`` and its unweighted terms: ``{"pixel": L2}`` for ``"l2"``; ``{"ot": OT}``, plus
        ``"pixel"`` once the pixel term has joined, for ``"ot"``.
    """
    pixel = ((render.color - reference) ** 2).mean()
    if ot_loss is None:
        return pixel, {"pixel": pixel}
    value = ot_loss(render, step)
    terms = {"ot": value}
    if config.pixel_weight and step >= config.pixel_start * config.iterations:
        value = value + config.pixel_weight * pixel
        terms["pixel"] = pixel
    return value, terms


def initial_placement(boxes: torch.Tensor, extents: torch.Tensor, camera: Cameras, width: int,
                      height: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Starting translations and uniform scales from the objects' image boxes, without depth.

    Each object's box centre is put on the camera ray through its image box's
    centre, at the camera's distance to the world origin (the orbit target),
    and scaled so the larger of its x/y extents spans the larger side of the
    image box at that distance (:func:`~.depth.placement_at_depths`; with a depth
    map, :func:`~.depth.depth_placement` gives each object its own depth).

    Args:
        boxes: (K, 4) pixel boxes ``x0, y0, x1, y1`` (exclusive ends).
        extents: (K, 3) bounding-box sizes of the meshes in their own frames.
        camera: the reference camera (one).
        width, height: the image size.

    Returns:
        translations (K, 3) and scales (K, 3).
    """
    distance = float(torch.linalg.inv(camera.w2c[0].float())[:3, 3].norm())
    return placement_at_depths(boxes, extents, torch.full((boxes.shape[0],), distance), camera, width, height)


def overlay(render: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(H, W, 3) half-and-half blend of render and reference, for previews."""
    return (0.5 * render + 0.5 * reference).clamp(0, 1)


def silhouette_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """IoU of two boolean masks (1.0 when both are empty)."""
    union = (a | b).sum()
    return float((a & b).sum()) / float(union) if union > 0 else 1.0
