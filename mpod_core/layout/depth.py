"""Objects at their depths: REPARO's layout starting from a monocular depth map.

A relative depth estimator (Depth Anything, DPT/MiDaS) gives inverse depth up to an unknown scale
and shift: ``d = A / z + B``. Min-max normalised over the objects (``d_hat`` in [0, 1], near = 1),
the map fixes the *order* and *relative spacing* of the objects' disparities, but not how far apart
they are in depth: one image cannot tell a shallow scene from a deep one, except through the
objects' own depth relief (a sphere near the camera spans more disparity than the same sphere far
away). Writing ``1 / z = a (d_hat + beta)``:

* ``beta`` (far disparity relative to the disparity spread) sets the depth spread: the farthest
  visible point is ``(1 + beta) / beta`` times as far as the nearest;
* ``a`` (the scene's absolute scale) is not observable from one image at all; it is fixed by the
  pack's convention that the objects' mean centre depth is the reference camera's orbit distance
  (today's flat start puts every object there).

:func:`depth_placement` puts each object on the ray through its mask box's centre at the depth its
mask's median ``d_hat`` gives, sized for that depth (perspective), for a grid of ``beta``; it renders
each candidate's disparity and keeps the one an affine map explains best (the map is known only up
to scale and shift), which is where the objects' relief matches.
The per-object alignment (OT Layout Align with the depth term and view-axis moves) refines it. :func:`occluding_pairs` reads from the map which of two touching
masks is in front (the nearer side of their shared boundary), and the placement moves the farther
object back when the medians would put it in front.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..cameras import Cameras, world_to_clip
from ..render import ops
from .ot_loss import render_disparity
from .scene import LayoutScene, SceneObject

#: ``beta`` candidates of the search: depth spreads (far / near) from about 21 down to 1.01.
BETAS = torch.logspace(math.log10(0.05), 2.0, 40)
#: Pixels of a mask's border compared with the neighbouring mask's (the occlusion cue).
BOUNDARY_PX = 2


def check_depth_map(depth: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The reference depth map, min-max normalised over ``mask`` (near = 1), 0 elsewhere.

    Args:
        depth: (H, W) relative depth, near = large (a depth estimator's output).
        mask: (H, W) union of the object masks (> 0.5 = object).

    Raises:
        ValueError: the map is constant over the objects (nothing to read depth from: a wrong input,
            e.g. a blank image or a mask, rather than a depth map).
    """
    fg = mask > 0.5
    values = depth[fg].float()
    if values.numel() == 0:
        raise ValueError("the reference mask is empty: there is nothing to align the objects to")
    lo, hi = float(values.min()), float(values.max())
    if not hi - lo > 1e-6 * max(abs(hi), abs(lo), 1e-6):
        raise ValueError(f"the depth map is constant ({lo:.4g}) over the objects: it carries no depth. Connect "
                         "a depth estimator's output (near = bright), or disconnect it for the flat layout")
    out = torch.zeros_like(depth, dtype=torch.float32)
    out[fg] = (values - lo) / (hi - lo)
    return out


def _dilated(masks: torch.Tensor, px: int) -> torch.Tensor:
    """(K, H, W) bool masks dilated by ``px`` pixels (a (2 px + 1)² max-pool)."""
    return F.max_pool2d(masks.float()[:, None], 2 * px + 1, stride=1, padding=px)[:, 0] > 0.5


def occluding_pairs(masks: torch.Tensor, depth: torch.Tensor, px: int = BOUNDARY_PX) -> Dict[Tuple[int, int], int]:
    """Which of two touching object masks is in front, read from the depth map.

    Where the masks of objects i and j meet, the pixels of the one in front lie on its own surface
    and those of the other on a surface behind it: the side with the larger (nearer) median depth
    value along the shared border is in front.

    Args:
        masks: (K, H, W) visible masks (> 0.5 = object).
        depth: (H, W) normalised depth, near = large (:func:`check_depth_map`).
        px: width of the border band compared, in pixels.

    Returns:
        ``{(i, j): front}`` for every pair i < j whose masks touch (within ``px``), ``front`` i or j.
    """
    fg = masks > 0.5
    grown = _dilated(fg, px)
    pairs = {}
    k = fg.shape[0]
    for i in range(k):          # K is the number of objects (a handful), not pixels
        for j in range(i + 1, k):
            band_i = fg[i] & grown[j] & ~fg[j]
            band_j = fg[j] & grown[i] & ~fg[i]
            if int(band_i.sum()) < 2 or int(band_j.sum()) < 2:
                continue
            pairs[(i, j)] = i if float(depth[band_i].median()) > float(depth[band_j].median()) else j
    return pairs


def _ray_points(boxes: torch.Tensor, depths: torch.Tensor, camera: Cameras, width: int, height: int) -> torch.Tensor:
    """(K, 3) world points on the rays through the boxes' centres at view depths ``depths`` (K,)."""
    c2w = torch.linalg.inv(camera.w2c[0].float())
    focal = float(camera.focal(height)[0])
    cx = 0.5 * (boxes[:, 0] + boxes[:, 2])
    cy = 0.5 * (boxes[:, 1] + boxes[:, 3])
    # Camera frame (OpenGL): x right, y up, looking down -z.
    x_cam = (cx - 0.5 * width) / focal * depths
    y_cam = -(cy - 0.5 * height) / focal * depths
    p_cam = torch.stack([x_cam, y_cam, -depths, torch.ones_like(x_cam)], -1)
    return (p_cam @ c2w.T)[:, :3]


@torch.no_grad()
def view_depths(layout: LayoutScene, camera: Cameras, width: int, height: int, *,
                backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Object index (H, W) long (-1 where uncovered) and view depth (H, W) (0 there) of a layout: a
    rasterization and one interpolation, without :func:`~.scene.render_scene`'s colours and
    antialiasing (the search renders dozens of candidates)."""
    cam = camera.to(device=layout.vertices.device, dtype=layout.vertices.dtype)
    clip = world_to_clip(layout.placed_vertices(), cam, width, height)
    rast = ops.rasterize(clip, layout.faces, (height, width), backend=backend)
    tid = rast[0, ..., 3].long() - 1
    covered = tid >= 0
    w = ops.interpolate(clip[0, :, 3:4], rast, layout.faces, backend=backend)[0, ..., 0]
    object_id = torch.where(covered, layout.object_of_face[tid.clamp(min=0)], torch.full_like(tid, -1))
    return object_id, torch.where(covered, w, torch.zeros_like(w))


def placement_at_depths(boxes: torch.Tensor, extents: torch.Tensor, depths: torch.Tensor, camera: Cameras,
                        width: int, height: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Translations and uniform scales of objects on their boxes' rays at view depths ``depths``.

    Each object's box centre is put on the camera ray through its image box's centre at view depth
    ``depths[k]``, and scaled so the larger of its x/y extents spans the larger side of the image box
    at that depth (perspective: twice as far, twice as large).

    Args:
        boxes: (K, 4) pixel boxes ``x0, y0, x1, y1`` (exclusive ends).
        extents: (K, 3) bounding-box sizes of the meshes in their own frames.
        depths: (K,) view depths of the box centres.
        camera: the reference camera (one).
        width, height: the image size.

    Returns:
        translations (K, 3) and scales (K, 3).
    """
    if boxes.ndim != 2 or boxes.shape[1] != 4 or extents.shape != (boxes.shape[0], 3):
        raise ValueError(f"expected (K, 4) boxes and (K, 3) extents, got {tuple(boxes.shape)}, "
                         f"{tuple(extents.shape)}")
    boxes, depths = boxes.float(), depths.float()
    focal = float(camera.focal(height)[0])
    side = torch.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) / focal * depths
    span = torch.maximum(extents[:, 0], extents[:, 1]).clamp_min(1e-6)
    scales = (side / span)[:, None].expand(-1, 3).clone()
    return _ray_points(boxes, depths, camera, width, height), scales


@dataclass
class DepthPlacement:
    """What :func:`depth_placement` chose.

    Attributes:
        translations: (K, 3) starting world positions of the objects' box centres.
        scales: (K, 3) starting scales.
        depths: (K,) view depths of the box centres.
        beta: the chosen far-disparity offset (depth spread ``(1 + beta) / beta``).
        errors: (len(BETAS),) each candidate's :func:`affine_misfit` to the map.
        pairs: :func:`occluding_pairs` of the masks.
    """

    translations: torch.Tensor
    scales: torch.Tensor
    depths: torch.Tensor
    beta: float
    errors: torch.Tensor
    pairs: Dict[Tuple[int, int], int]


def affine_misfit(disparity: torch.Tensor, reference: torch.Tensor) -> float:
    """Share of the reference's variance left after the best affine fit ``reference ~ a * disparity + b``
    (1 - R²; inf with fewer than 4 points): how well a candidate's disparities explain a map known only
    up to scale and shift, without depending on which pixels set a min-max normalisation.

    Args:
        disparity: (P,) candidate inverse depths; reference: (P,) the map's values at the same pixels.
    """
    if disparity.numel() < 4:
        return float("inf")
    x = disparity.double() - disparity.double().mean()
    y = reference.double() - reference.double().mean()
    var_y = float(y.pow(2).mean())
    if var_y <= 0:
        return float("inf")
    slope = float((x * y).mean()) / max(float(x.pow(2).mean()), 1e-30)
    return float((y - slope * x).pow(2).mean()) / var_y


def _surface_offsets(objects: Sequence[SceneObject], translations: torch.Tensor, scales: torch.Tensor,
                     camera: Cameras, width: int, height: int, backend: str) -> torch.Tensor:
    """(K,) view depth from each object's median visible point to its box centre, per unit of scale.

    Measured by rendering each object alone (K renders), because the visible surface's depth depends on
    the shape: a box seen face-on shows its front face (half its depth in front of the centre), a
    sphere a cap whose median lies 0.71 of its radius in front.
    """
    out = []
    for k, obj in enumerate(objects):
        object_id, view_depth = view_depths(LayoutScene([obj], translations[k:k + 1], scales[k:k + 1]), camera,
                                            width, height, backend=backend)
        covered = object_id >= 0
        centre = float((camera.w2c[0, :3, :3].float() @ translations[k] + camera.w2c[0, :3, 3].float())[2].neg())
        seen = view_depth[covered]
        out.append((centre - float(seen.median())) / float(scales[k, 0]) if seen.numel() else 0.0)
    return torch.tensor(out, dtype=torch.float32)


def _order_depths(depths: torch.Tensor, pairs: Dict[Tuple[int, int], int], margin: float) -> torch.Tensor:
    """Move the back object of every occluding pair behind the front one when the depths disagree
    (a few passes: fixing one pair can break another in a chain)."""
    depths = depths.clone()
    for _ in range(len(pairs) + 1):
        changed = False
        for (i, j), front in pairs.items():
            back = j if front == i else i
            if depths[back] < depths[front] + margin:
                depths[back] = depths[front] + margin
                changed = True
        if not changed:
            break
    return depths


def depth_placement(objects: Sequence[SceneObject], boxes: torch.Tensor, masks: torch.Tensor,
                    depth: torch.Tensor, camera: Cameras, width: int, height: int, *, distance: float,
                    search_size: int = 96, backend: str = "auto") -> DepthPlacement:
    """Starting placement from a depth map (see the module docstring).

    Args:
        objects: the K meshes.
        boxes: (K, 4) pixel boxes of their masks at ``width`` x ``height``.
        masks: (K, H, W) their visible masks (any size with the image's aspect; > 0.5 = object).
        depth: (H, W) normalised depth, near = 1 (:func:`check_depth_map`), the masks' size.
        camera: the reference camera.
        width, height: the working image size the boxes refer to.
        distance: the objects' mean centre depth (the orbit distance: the absolute scale a single image
            cannot give).
        search_size: longer side of the candidate renders.
        backend: rasterizer backend.

    Returns:
        :class:`DepthPlacement`.
    """
    k = len(objects)
    if masks.shape[0] != k or boxes.shape != (k, 4):
        raise ValueError(f"expected {k} masks and (K, 4) boxes, got {tuple(masks.shape)}, {tuple(boxes.shape)}")
    if depth.shape != masks.shape[1:]:
        raise ValueError(f"depth {tuple(depth.shape)} and masks {tuple(masks.shape[1:])} differ in size")
    fg = masks > 0.5
    medians = []
    for i in range(k):
        # A thin or speckled mask can fall below 0.5 everywhere once area-resized to the working size:
        # then every pixel it touches counts.
        own = fg[i] if bool(fg[i].any()) else masks[i] > 0
        values = depth[own]
        if values.numel() == 0:
            raise ValueError(f"object {i}: its mask is empty")
        medians.append(float(values.median()))
    m = torch.tensor(medians)
    lo = torch.stack([o.vertices.amin(0) for o in objects])
    hi = torch.stack([o.vertices.amax(0) for o in objects])
    extents = (hi - lo).clamp_min(1e-6)
    flat_t, flat_s = placement_at_depths(boxes, extents, torch.full((k,), float(distance)), camera, width, height)
    # Candidate renders at a small size (the map's own aspect).
    f = search_size / max(width, height)
    sw, sh = max(8, round(width * f)), max(8, round(height * f))
    sboxes = boxes * torch.tensor([sw / width, sh / height] * 2)
    rho = _surface_offsets(objects, flat_t, flat_s, camera, sw, sh, backend)
    sigma = flat_s[:, 0] / float(distance)                           # scale per unit of depth
    ref = F.interpolate(depth[None, None].float(), size=(sh, sw), mode="area")[0, 0]
    # Each pixel's object in the reference (-1: background or mixed); candidates are compared only where
    # they show the same object, so their silhouettes' misfit (the start's boxes are approximate) does
    # not drown the depth signal.
    share = F.interpolate(fg.float()[None], size=(sh, sw), mode="area")[0]
    ref_id = torch.where(share.amax(0) > 0.99, share.argmax(0), torch.full((sh, sw), -1, dtype=torch.long))
    pairs = occluding_pairs(masks, depth)
    errors, candidates = [], []
    for beta in BETAS.tolist():   # a 1-D search: 40 small renders
        surface = 1.0 / (m + beta)                                    # up to the scale a
        centre = surface / (1.0 - rho * sigma).clamp_min(0.2)          # z = z_surf + rho * sigma * z
        centre = centre * float(distance) / centre.mean()
        centre = _order_depths(centre, pairs, 1e-3 * float(distance))
        t, s = placement_at_depths(sboxes, extents, centre, camera, sw, sh)
        object_id, view_depth = view_depths(LayoutScene(objects, t, s), camera, sw, sh, backend=backend)
        covered = object_id >= 0
        both = covered & (object_id == ref_id)
        errors.append(affine_misfit(render_disparity(view_depth[both]), ref[both]))
        candidates.append(centre)
    errors_t = torch.tensor(errors)
    best = int(errors_t.argmin())
    depths = candidates[best]
    t, s = placement_at_depths(boxes, extents, depths, camera, width, height)
    return DepthPlacement(translations=t, scales=s, depths=depths, beta=float(BETAS[best]), errors=errors_t,
                          pairs=pairs)


def front_object(layout: LayoutScene, camera: Cameras, width: int, height: int, *,
                 backend: str = "auto") -> Dict[Tuple[int, int], int]:
    """Which object is in front where two objects' silhouettes overlap, from renders of each alone.

    Args:
        layout: the placed scene.
        camera, width, height: the view.

    Returns:
        ``{(i, j): front}`` for every pair i < j whose silhouettes share at least 4 pixels; ``front`` is
        the object nearer on the majority of the shared pixels.
    """
    depths: List[Optional[torch.Tensor]] = []
    k = layout.num_objects
    objects = _objects_of(layout)
    for i in range(k):
        object_id, view_depth = view_depths(LayoutScene([objects[i]], layout.translation[i:i + 1].detach(),
                                                        layout.scales[i:i + 1].detach()), camera, width, height,
                                            backend=backend)
        depths.append(torch.where(object_id >= 0, view_depth, torch.full_like(view_depth, float("inf"))))
    order = {}
    for i in range(k):
        for j in range(i + 1, k):
            shared = torch.isfinite(depths[i]) & torch.isfinite(depths[j])
            if int(shared.sum()) >= 4:
                nearer_i = (depths[i][shared] < depths[j][shared]).float().mean()
                order[(i, j)] = i if float(nearer_i) > 0.5 else j
    return order


def _objects_of(layout: LayoutScene) -> List[SceneObject]:
    """The layout's objects back as :class:`SceneObject` s (their own frames)."""
    out = []
    for k in range(layout.num_objects):
        vmask = layout.object_of_vertex == k
        first = int(vmask.nonzero()[0])
        faces = layout.faces[layout.object_of_face == k] - first
        out.append(SceneObject(layout.vertices[vmask], faces, layout.colors[vmask]))
    return out
