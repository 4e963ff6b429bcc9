"""REPARO's layout stage from image-space inputs: K meshes, the reference image and one mask
per object in, one placement per object out.

The world frame is the pack's (:mod:`mpod_core.cameras`): the reference camera is the orbit
camera at elevation 0, azimuth 0 (on +z looking at the origin), so image x is world x and image
up is world y. Each object's placement maps its mesh's own frame to the world::

    v_world = (v - c) * s + t        c: centre of the mesh's bounding box

and :func:`placement_matrix` writes it as a 4x4 matrix for the output meshes and scene.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import trimesh

from ..cameras import REFERENCE_VIEW, Cameras, orbit_cameras
from ..configdoc import limits
from ..layout.align import LayoutConfig, LayoutResult, SemanticFn, align_layout, initial_placement, overlay
from ..layout.crop import mask_box
from ..layout.depth import DepthPlacement, check_depth_map, depth_placement
from ..layout.scene import DEFAULT_GREY, SceneObject, scene_object
from ..mesh import MeshTensors, compose_scene, object_names
from ..progress import ProgressFn


@dataclass
class ReferenceView:
    """The reference camera and working size of :func:`place_objects` (the node's widgets)."""

    resolution: int = field(default=256, metadata=limits(32, 1024, 8))
    """Longer side of the renders; the reference image is resized to it (REPARO's official configs: 256)."""
    fov: float = field(default=REFERENCE_VIEW["fov"], metadata=limits(5.0, 120.0, 0.5))
    """Vertical field of view of the reference camera, degrees (the pack's reference view: 40, Zero123's)."""
    distance: float = field(default=REFERENCE_VIEW["distance"], metadata=limits(0.1, 100.0, 0.1))
    """Distance of the reference camera from the world origin; sets the world units (the pack's
    reference view: 2.5, the image-to-3D models' orbit radius)."""


@dataclass
class Placement:
    """Where :func:`place_objects` put each object.

    Attributes:
        matrices: (K, 4, 4) mesh frame -> world transforms.
        translations: (K, 3) world positions of the objects' box centres.
        scales: (K, 3) scale factors about those centres.
        initial_matrices: (K, 4, 4) the starting placements (from the mask boxes).
        overlay: (H, W, 3) final render blended half and half with the reference, at the working size.
        render: (H, W, 3) final render at the working size.
        camera: the reference camera used.
        result: the optimiser's :class:`~mpod_core.layout.align.LayoutResult`.
        depth_start: with a depth map, the depth-aware starting placement (its chosen depth spread
            and the occluding pairs it read from the map); None without one.
    """

    matrices: torch.Tensor
    translations: torch.Tensor
    scales: torch.Tensor
    initial_matrices: torch.Tensor
    overlay: torch.Tensor
    render: torch.Tensor
    camera: Cameras
    result: LayoutResult
    depth_start: Optional[DepthPlacement] = None


def object_from_tensors(mesh: MeshTensors, name: str) -> SceneObject:
    """A :class:`SceneObject` with vertex colours: the mesh's own, or its texture sampled at each
    vertex's UV (bilinear; the layout only needs each object's colours, not texture detail), or grey."""
    colors = mesh.vertex_colors
    if colors is None and mesh.texture is not None and mesh.uv is not None:
        tex = mesh.texture.permute(2, 0, 1)[None].float()                       # (1, 3, Ht, Wt)
        # glTF/trimesh uv: v = 0 at the image bottom; grid_sample: y = -1 at the top row.
        grid = torch.stack([mesh.uv[:, 0] * 2 - 1, 1 - mesh.uv[:, 1] * 2], -1).float()[None, None]
        colors = F.grid_sample(tex, grid, mode="bilinear", padding_mode="border", align_corners=False)[0, :, 0].T
    if colors is None:
        colors = torch.full_like(mesh.vertices.float(), DEFAULT_GREY)
    return scene_object(mesh.vertices, mesh.faces, colors, name)


def placement_matrix(centre: torch.Tensor, scale: torch.Tensor, translation: torch.Tensor) -> torch.Tensor:
    """(4, 4) matrix of ``v -> (v - centre) * scale + translation`` (all (3,))."""
    m = torch.eye(4, dtype=torch.float64)
    m[:3, :3] = torch.diag(scale.double())
    m[:3, 3] = translation.double() - centre.double() * scale.double()
    return m


def working_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """(h, w) with the longer side ``resolution`` and the aspect ratio kept."""
    f = resolution / max(height, width)
    return max(8, round(height * f)), max(8, round(width * f))


def _resize(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(H, W, C) -> (h, w, C), area filter when shrinking, bilinear when enlarging."""
    x = t.permute(2, 0, 1)[None].float()
    if size[0] <= t.shape[0] and size[1] <= t.shape[1]:
        y = F.interpolate(x, size=size, mode="area")
    else:
        y = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return y[0].permute(1, 2, 0)


def place_objects(meshes: Sequence[MeshTensors], image: torch.Tensor, masks: torch.Tensor,
                  config: LayoutConfig, *, depth: Optional[torch.Tensor] = None, resolution: int = 256,
                  distance: float = 2.5, fov: float = 40.0, semantic_loss: Optional[SemanticFn] = None,
                  progress: Optional[ProgressFn] = None, backend: str = "auto",
                  names: Optional[List[str]] = None) -> Placement:
    """Place K meshes so that their render matches the reference image (REPARO sec. 3.2).

    Args:
        meshes: K meshes, each in its own frame (any size: the start scales come from the masks).
        image: (H, W, 3) reference RGB in [0, 1].
        masks: (K, H, W) one mask per object, in the meshes' order (1 = object).
        config: optimiser settings (:class:`~mpod_core.layout.align.LayoutConfig`).
        depth: optional (H, W) relative depth of the reference, near = large (depth estimators' output).
        resolution: longer side of the renders; the reference is resized to it.
        distance, fov: the reference camera (orbit distance in world units, vertical fov in degrees).
        semantic_loss, progress, backend: passed to :func:`~mpod_core.layout.align.align_layout`.
        names: per-object names for error messages (default object_00, object_01, ...).

    Raises:
        ValueError: no objects, mask and mesh counts that differ, a mask of another size than the
            image, an empty mask, a mesh without faces, bad settings (each named).
    """
    k = len(meshes)
    if k == 0:
        raise ValueError("no objects: connect at least one mesh and one mask")
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim != 3:
        raise ValueError(f"masks: expected a (K, H, W) batch, got {tuple(masks.shape)}")
    if masks.shape[0] != k:
        raise ValueError(f"got {masks.shape[0]} masks and {k} meshes: give one mask per mesh, in the same order")
    if image.ndim != 3 or image.shape[-1] < 3:
        raise ValueError(f"image: expected (H, W, 3), got {tuple(image.shape)}")
    h, w = image.shape[:2]
    if masks.shape[1:] != (h, w):
        raise ValueError(f"the masks are {masks.shape[2]}x{masks.shape[1]} but the image is {w}x{h}")
    if depth is not None and depth.shape != (h, w):
        # Depth estimators often work at their own resolution: same aspect ratio is fine.
        if depth.ndim != 2 or abs(depth.shape[1] / depth.shape[0] - w / h) > 0.02 * (w / h):
            raise ValueError(f"the depth map is {depth.shape[-1]}x{depth.shape[0]} but the image is {w}x{h}: "
                             "it must show the same view (same aspect ratio)")
        depth = _resize(depth.float()[..., None], (h, w))[..., 0]
    if resolution < 16:
        raise ValueError(f"resolution must be >= 16, got {resolution}")
    names = names or object_names(None, k)
    objects = [object_from_tensors(m, names[i]) for i, m in enumerate(meshes)]
    size = working_size(h, w, resolution)
    ref = _resize(image[..., :3].float(), size).clamp(0, 1)
    small_masks = _resize(masks.permute(1, 2, 0).float(), size).permute(2, 0, 1)
    small_depth = None if depth is None else _resize(depth.float()[..., None], size)[..., 0]
    boxes = []
    for i in range(k):  # at full size: a thin mask may fall below 0.5 once area-resized
        try:
            boxes.append(mask_box(masks[i]))
        except ValueError:
            raise ValueError(f"{names[i]}: its mask is empty") from None
    boxes = torch.tensor(boxes, dtype=torch.float32) * torch.tensor([size[1] / w, size[0] / h] * 2)
    camera = orbit_cameras(0.0, 0.0, float(distance), float(fov))
    lo = torch.stack([o.vertices.amin(0) for o in objects])
    hi = torch.stack([o.vertices.amax(0) for o in objects])
    centres, extents = 0.5 * (lo + hi), (hi - lo).clamp_min(1e-6)
    union = small_masks.amax(0)
    depth_start = None
    if small_depth is not None:
        try:
            normalised = check_depth_map(small_depth, union)
        except ValueError as exc:
            raise ValueError(f"depth: {exc}") from None
        depth_start = depth_placement(objects, boxes, small_masks, normalised, camera, size[1], size[0],
                                      distance=float(distance), backend=backend)
        t0, s0 = depth_start.translations, depth_start.scales
    else:
        t0, s0 = initial_placement(boxes, extents, camera, size[1], size[0])
    result = align_layout(objects, t0, s0, camera, ref, union, config, depth=small_depth,
                          semantic_loss=semantic_loss, progress=progress, backend=backend)
    matrices = torch.stack([placement_matrix(centres[i], result.scales[i], result.translations[i]) for i in range(k)])
    initial = torch.stack([placement_matrix(centres[i], s0[i], t0[i]) for i in range(k)])
    fg = (union > 0.5)[..., None]
    reference = torch.where(fg, ref, torch.full_like(ref, config.background))
    return Placement(matrices=matrices, translations=result.translations, scales=result.scales,
                     initial_matrices=initial, overlay=overlay(result.render, reference), render=result.render,
                     camera=camera, result=result, depth_start=depth_start)


def semantic_reference(image: torch.Tensor, masks: torch.Tensor, background: float = 1.0) -> torch.Tensor:
    """The reference as the semantic loss compares it with renders of the objects alone: the union of
    the object masks kept, everything else set to ``background``.

    Args:
        image: (H, W, 3) in [0, 1]; masks: (K, H, W) or (H, W), 1 = object.

    Returns:
        (H, W, 3).
    """
    union = (masks.float().reshape(-1, *masks.shape[-2:]).amax(0) > 0.5)[..., None].to(image)
    return image * union + background * (1 - union)


def placed_outputs(meshes: Sequence[trimesh.Trimesh], placement: Placement, names: Sequence[str]):
    """The meshes moved to their places, one scene of them all, and the layout as JSON-ready dicts.

    Args:
        meshes: the K meshes :func:`place_objects` placed (their own frames; not modified).
        placement: its result.
        names: K object names (the scene's node names).

    Returns:
        (K moved copies, a ``trimesh.Scene`` with one named node per object, K dicts with the
        object's ``name``, world ``translation`` (3,), ``scale`` (3,) and 4x4 ``matrix``).
    """
    matrices = placement.matrices.detach().cpu().numpy().astype(np.float64)
    placed = [mesh.copy().apply_transform(matrix) for mesh, matrix in zip(meshes, matrices)]
    scene = compose_scene(meshes, names, transforms=list(matrices))
    layout = [{"name": n, "translation": t.tolist(), "scale": s.tolist(), "matrix": m.tolist()}
              for n, t, s, m in zip(names, placement.translations.detach().cpu().double(),
                                    placement.scales.detach().cpu().double(), matrices)]
    return placed, scene, layout
