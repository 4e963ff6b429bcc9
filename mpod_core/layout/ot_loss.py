"""REPARO's optimal-transport appearance loss (sec. 3.2.1, eq. 3-5).

Every pixel of an image is a point ``(R, G, B, depth, X, Y)``: colour in
[0, 1], depth normalised to [0, 1] with near = 1, and the screen position in
[0, 1] image units. The rendered pixel cloud is matched to the reference
pixel cloud by entropic optimal transport, and every rendered object pixel is
pulled towards the point the transport plan sends it to. Because the match
can be far away on screen, an object that does not overlap its reference at
all still gets a gradient towards it, which pixel-wise L2 cannot give.

Design (each choice was measured against the alternatives, see the tests and
``bench/bench_layout.py``):

* **Whole images, both sides.** Both clouds contain *all* pixels, background
  included, as in the paper (N = M). Matching only the foregrounds leaves the
  masses unbalanced as soon as objects occlude each other or leave the view,
  and occluded objects then get gradients pointing the wrong way.
* **Stratified matching.** Solving on all 65,536 pixels of a 256² image costs
  ~30 s per Sinkhorn iteration on a CPU, and a random subsample of both clouds
  makes the match too noisy to converge (small objects keep a handful of
  points). The matching therefore runs on a regular grid of about
  ``match_resolution``² pixels per image, where *every* foreground grid pixel
  is kept and the background grid pixels are subsampled to
  ``background_points`` points whose weights are the inverse sampling rate, so
  both clouds keep the true foreground/background mass ratio. The reference
  grid and its background sample are fixed, so each new matching warm-starts
  from the previous potential.
* **Targets by the soft c-transform.** The plan's barycentric projection of a
  point only needs the reference potential ``g``
  (:func:`~.sinkhorn.barycentric_targets`), so each iteration gives targets
  to the render's *current* foreground pixels at full resolution (a random
  subset of ``loss_points`` of them), including pixels that appeared since the
  last matching.
* **Only colour-matched pixels pull.** A rendered pixel whose target has
  another colour is surplus mass (sent to the background or to another
  object); its XY target is meaningless and, measured, biased away from the
  object's true place, so it is left out of the pull (``colour_agreement``).
  On 4- and 6-object scenes this took the recovered objects from 25 to 27 of
  30 and every translation error below 0.5% of the scene.
* **Depth as the estimator sees it.** The reference depth is a monocular estimator's relative
  inverse depth (near = large, known only up to scale and shift); the render's view depth is
  converted to disparity (:func:`render_disparity`) and both are min-max normalised over their
  foreground, so the two agree at the true layout. Running the estimator on every render (REPARO's
  official code) would cost a ViT forward and backward per iteration (``bench/bench_depth.py``) and
  route the depth gradient through the rendered colours, which this loss detaches on purpose.
* **Squared cost and DROT's squared pull.** The matching cost is
  ``0.5 (alpha |dRGB|^2 + beta |dD|^2 + gamma |dXY|^2)`` (geomloss' ``p = 2``,
  what the reference code's ``SamplesLoss("sinkhorn")`` uses; eq. 4's
  unsquared norms are available as ``cost="norm"``) and the loss is
  ``mean_i (beta |D_i - D*_i|^2 + gamma |XY_i - XY*_i|^2)`` against detached
  targets, DROT's ``MSE(points, (points - grad).detach())``. With the
  unsquared norm as the loss, Adam oscillates around the optimum.

Gradients reach the placement only through the rendered points' depth and XY
(:func:`~.scene.render_scene` interpolates them from the placed vertices);
colour is what makes the match pick the right object.

What it cannot do alone: fix scales. An undersized object's pixels are
matched to the nearest part of its target and an oversized object's surplus
to the background right under it; the colour cost of the mismatched mass is
the same wherever the object sits, so the XY pull carries almost no scale
information (measured on a two-object scene: the log-scale gradient of an
object at 0.5-0.7x is 1-3% of its translation gradient, with either sign).
:func:`~.align.align_layout` therefore adds a pixel-wise colour term in the
second half of the run, once the OT pull has brought every object onto its
target (see there).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..configdoc import limits
from .scene import SceneRender, pixel_grid
from .sinkhorn import SinkhornResult, barycentric_targets, grouped_norm_cost, sinkhorn, squared_euclidean_cost

#: Feature columns of a pixel point.
RGB, DEPTH, XY = slice(0, 3), slice(3, 4), slice(4, 6)
FEATURES = 6
COSTS = ("squared", "norm")


@dataclass
class OTLossConfig:
    """Settings of :class:`OTAppearanceLoss` (defaults: REPARO / DROT where they say, measured otherwise)."""

    alpha: float = field(default=1.0, metadata=limits(0.0, 100.0, 0.1))
    """Weight of the colour term (RGB in [0, 1]) in the transport cost: REPARO eq. 4's alpha (1)."""
    beta: float = field(default=1.0, metadata=limits(0.0, 100.0, 0.1))
    """Weight of the depth term (normalised depth in [0, 1]): eq. 4's beta (1); used only with a
    reference depth map."""
    gamma: float = field(default=1.0, metadata=limits(0.0, 100.0, 0.1))
    """Weight of the screen-position term (XY in [0, 1] image units): eq. 4's gamma (1)."""
    eps: float = 1e-3
    """Entropic regularisation, in cost units (the squared cost of a 3% move in XY at gamma 1 is 5e-4)."""
    cost: str = "squared"
    """``squared``: 0.5 sum_k w_k |d_k|^2 (geomloss p=2); ``norm``: sum_k w_k |d_k| (eq. 4 as printed)."""
    match_resolution: int = 64
    """The matching uses a regular grid of about this many pixels per image side."""
    background_points: int = 512
    """Background grid pixels kept per cloud in the matching (weighted by the inverse sampling rate)."""
    loss_points: int = 4096
    """Rendered foreground pixels the loss is evaluated on per iteration (random subset; 0 = all)."""
    match_interval: int = field(default=5, metadata=limits(1, 100))
    """Iterations between two optimal-transport matchings (REPARO's code re-matches about every 5)."""
    sinkhorn_iterations: int = 20
    """Sinkhorn iterations per warm-started matching (the first matching anneals eps first)."""
    colour_agreement: float = 0.1
    """Only pixels whose target's colour is within this squared RGB distance of their own are pulled
    (0 = all pixels). See :meth:`OTAppearanceLoss.__call__`."""

    def validate(self) -> None:
        for name in ("alpha", "beta", "gamma"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v}")
        if self.alpha + self.gamma <= 0:
            raise ValueError("alpha and gamma are both 0: the match would ignore colour and position")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps must be finite and > 0, got {self.eps}")
        if self.cost not in COSTS:
            raise ValueError(f"cost must be one of {COSTS}, got {self.cost!r}")
        if self.match_resolution < 8:
            raise ValueError(f"match_resolution must be >= 8, got {self.match_resolution}")
        if self.background_points < 1 or self.loss_points < 0:
            raise ValueError("background_points must be >= 1 and loss_points >= 0")
        if not (math.isfinite(self.colour_agreement) and self.colour_agreement >= 0):
            raise ValueError(f"colour_agreement must be >= 0, got {self.colour_agreement}")
        if self.match_interval < 1 or self.sinkhorn_iterations < 1:
            raise ValueError("match_interval and sinkhorn_iterations must be >= 1")


def normalise_depth(depth: torch.Tensor, *, near_is_large: bool = False, min_range: float = 0.05) -> torch.Tensor:
    """Depths mapped to [0, 1] with near = 1, by their own (detached) range; differentiable.

    The range is floored at ``min_range`` times the median magnitude: a single
    flat face seen head-on has almost no depth range, and stretching its
    rounding noise to [0, 1] would make the depth term meaningless.

    Args:
        depth: (P,) view distances (far = large), or with ``near_is_large`` a
            disparity-like map (near = large, what monocular depth estimators output).

    Returns:
        (P,) normalised depths.
    """
    if depth.numel() == 0:
        return depth
    d = depth.detach()
    lo, hi = d.min(), d.max()
    span = torch.maximum(hi - lo, min_range * d.abs().median()).clamp_min(1e-12)
    return (depth - lo) / span if near_is_large else (hi - depth) / span


def render_disparity(depth: torch.Tensor) -> torch.Tensor:
    """(P,) view depths -> disparity ``1 / depth``, the convention of relative monocular depth
    estimators (Depth Anything, DPT/MiDaS: affine-invariant inverse depth, near = large).

    Min-max normalised on both sides (:func:`normalise_depth`), a reference map that is affine in
    disparity and the render's disparity agree exactly at the true layout, whatever the estimator's
    unknown scale and shift; linear depth would not (measured in ``bench/bench_layout.py --only depth``).
    Differentiable; depths are floored at 1e-6.
    """
    return 1.0 / depth.clamp_min(1e-6)


def reference_points(image: torch.Tensor, mask: torch.Tensor, depth: Optional[torch.Tensor] = None,
                     background: float = 1.0) -> torch.Tensor:
    """The reference pixel cloud.

    Args:
        image: (H, W, 3) RGB in [0, 1].
        mask: (H, W) union of the objects' masks (> 0.5 = object).
        depth: optional (H, W) relative depth, near = large (a depth estimator's output).
        background: grey level given to pixels outside the mask (the renders' background).

    Returns:
        (H, W, 6) points; background pixels have the background colour and depth 0 (far).
    """
    h, w = image.shape[:2]
    fg = mask > 0.5
    rgb = torch.where(fg[..., None], image[..., :3].float(), torch.full_like(image[..., :3].float(), background))
    d = torch.zeros(h, w, dtype=rgb.dtype, device=rgb.device)
    if depth is not None and fg.any():
        d[fg] = normalise_depth(depth.to(rgb)[fg], near_is_large=True)
    return torch.cat([rgb, d[..., None], pixel_grid(w, h, device=rgb.device)], -1)


def render_points(render: SceneRender) -> torch.Tensor:
    """The rendered pixel cloud, (H, W, 6), differentiable in depth and XY on covered pixels (colour detached).

    Background pixels carry the render's background colour, depth 0 and their pixel centre.
    """
    fg = render.covered
    h, w = fg.shape
    d = torch.zeros_like(render.depth)
    if fg.any():
        d = d.index_put((fg,), normalise_depth(render_disparity(render.depth[fg]), near_is_large=True))
    xy = torch.where(fg[..., None], render.xy, pixel_grid(w, h, device=d.device).to(render.xy))
    # Colour is detached: it decides the match, while the placement moves through depth and XY. Its
    # antialiasing gradient would pull blended edge pixels towards the blurred colour of their
    # targets, a large direction-less force (at the true layout it outweighed the XY pull 400:1);
    # the pixel-wise term of :mod:`.align` gives the silhouette gradient instead, with exact targets.
    return torch.cat([render.color.detach(), d[..., None], xy], -1)


class _StratifiedCloud:
    """Grid subsample of one pixel cloud for the matching: all foreground grid
    pixels, ``k`` random background grid pixels weighted by the inverse sampling rate."""

    def __init__(self, points: torch.Tensor, foreground: torch.Tensor, stride: int, offset: tuple,
                 k: int, generator: torch.Generator):
        grid_pts = points[offset[0]::stride, offset[1]::stride].reshape(-1, FEATURES)
        grid_fg = foreground[offset[0]::stride, offset[1]::stride].reshape(-1)
        fg_idx = grid_fg.nonzero()[:, 0]
        bg_idx = (~grid_fg).nonzero()[:, 0]
        keep = torch.randperm(bg_idx.numel(), generator=generator)[:k].to(bg_idx.device)
        bg_keep = bg_idx[keep]
        self.points = torch.cat([grid_pts[fg_idx], grid_pts[bg_keep]]).detach()
        weight_bg = bg_idx.numel() / max(bg_keep.numel(), 1)
        self.weights = torch.cat([torch.ones(fg_idx.numel()), torch.full((bg_keep.numel(),), weight_bg)]
                                 ).to(self.points)
        self.foreground_points = int(fg_idx.numel())


class OTAppearanceLoss:
    """Eq. 3-5 of REPARO against a fixed reference image (see the module docstring).

    Args:
        reference: (H, W, 6) reference points (:func:`reference_points`).
        reference_mask: (H, W) bool, the reference foreground.
        config: :class:`OTLossConfig`.
        use_depth: whether the depth term is on (False forces beta = 0).
        generator: CPU random source of the subsets (seeded by the caller).
    """

    def __init__(self, reference: torch.Tensor, reference_mask: torch.Tensor, config: OTLossConfig, *,
                 use_depth: bool, generator: Optional[torch.Generator] = None):
        config.validate()
        if reference.ndim != 3 or reference.shape[-1] != FEATURES:
            raise ValueError(f"reference: expected (H, W, {FEATURES}) points, got {tuple(reference.shape)}")
        if reference_mask.shape != reference.shape[:2]:
            raise ValueError("reference_mask must have the reference's (H, W)")
        if not bool(reference_mask.any()):
            raise ValueError("the reference mask is empty: there is nothing to align the objects to")
        self.config = config
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        h, w = reference.shape[:2]
        self.stride = max(1, round(max(h, w) / config.match_resolution))
        beta = config.beta if use_depth else 0.0
        self.weights = (config.alpha, beta, config.gamma)
        scale = torch.tensor([config.alpha] * 3 + [beta] + [config.gamma] * 2, dtype=reference.dtype,
                             device=reference.device)
        if config.cost == "squared":
            # 0.5 sum_k w_k |d_k|^2 = 0.5 |sqrt(w) * d|^2: one matmul per block.
            root = scale.sqrt()
            self.cost = lambda u, v: squared_euclidean_cost(u * root.to(u), v * root.to(v))
        else:
            self.cost = grouped_norm_cost([(RGB, config.alpha), (DEPTH, beta), (XY, config.gamma)])
        centre = (self.stride // 2, self.stride // 2)
        self.reference = _StratifiedCloud(reference.detach(), reference_mask, self.stride, centre,
                                          config.background_points, self.generator)
        self.matching: Optional[SinkhornResult] = None
        self.matchings = 0
        self.sinkhorn_iterations = 0

    def match(self, points: torch.Tensor, foreground: torch.Tensor) -> None:
        """Solve the matching of the render's grid cloud to the reference's.

        Args:
            points: (H, W, 6) rendered points (:func:`render_points`).
            foreground: (H, W) bool, covered pixels.
        """
        s = self.stride
        offset = tuple(int(v) for v in torch.randint(0, s, (2,), generator=self.generator))
        cloud = _StratifiedCloud(points.detach(), foreground, s, offset, self.config.background_points,
                                 self.generator)
        ref = self.reference
        warm = self.matching.g if self.matching is not None else None
        iters = self.config.sinkhorn_iterations
        self.matching = sinkhorn(cloud.points, ref.points, cloud.weights, ref.weights, cost=self.cost,
                                 eps=self.config.eps, max_iter=iters, tol=0.0, init_g=warm)
        self.matchings += 1
        self.sinkhorn_iterations += self.matching.iterations

    def targets(self, points: torch.Tensor) -> torch.Tensor:
        """(P, 6) transport targets of ``points`` (P, 6) under the last matching (no gradient)."""
        if self.matching is None:
            raise RuntimeError("targets() before the first match()")
        ref = self.reference
        return barycentric_targets(points.detach(), ref.points, self.matching, b=ref.weights, cost=self.cost)

    def pull(self, points: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(P,) ``beta |D - D*|^2 + gamma |XY - XY*|^2`` per point, differentiable in ``points``
        (colour has no gradient here, see :func:`render_points`)."""
        d = points - targets
        total = d.new_zeros(d.shape[0])
        for group, w in zip((DEPTH, XY), self.weights[1:]):
            if w:
                total = total + w * d[:, group].pow(2).sum(-1)
        return total

    def __call__(self, render: SceneRender, step: int) -> torch.Tensor:
        """The loss of one render at iteration ``step`` (matching first when it is due)."""
        points = render_points(render)
        fg = render.covered
        if not bool(fg.any()):
            raise ValueError("no object is visible in the render: the layout left the camera's view")
        if self.matching is None or step % self.config.match_interval == 0:
            self.match(points, fg)
        moving = points[fg]
        k = self.config.loss_points
        if k and moving.shape[0] > k:
            idx = torch.randperm(moving.shape[0], generator=self.generator)[:k].to(moving.device)
            moving = moving[idx]
        targets = self.targets(moving)
        pull = self.pull(moving, targets)
        if self.config.colour_agreement <= 0:
            return pull.mean()
        # Surplus mass: a pixel sent to another colour (the background under an oversized or
        # displaced object, or another object) has an XY target that says nothing about where its
        # object belongs, and, since the background near a target object is sparse, one biased away
        # from it; measured, that bias stalled an object right beside its target. Those pixels are
        # left out of the pull.
        agree = ((moving[:, RGB].detach() - targets[:, RGB]).pow(2).sum(-1) < self.config.colour_agreement)
        agree = agree.to(pull)
        return (pull * agree).sum() / agree.sum().clamp_min(1.0)
