"""Synthetic multi-object scenes with a known layout, for REPARO's layout
alignment tests and benchmark: primitives of distinct colours placed in the
reference camera's view, the reference rendered from the true layout, and
perturbed starting layouts (including starts where an object does not overlap
its target at all)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import numpy as np
import torch
import trimesh

from ..mesh import object_name
from ..cameras import Cameras, orbit_cameras
from .scene import LayoutScene, SceneObject, render_scene, scene_object

PALETTE = [(0.9, 0.2, 0.2), (0.2, 0.7, 0.3), (0.2, 0.35, 0.9), (0.95, 0.8, 0.1), (0.7, 0.3, 0.8), (0.1, 0.8, 0.8)]


def _primitive(kind: int) -> trimesh.Trimesh:
    makers = [lambda: trimesh.creation.box(extents=(1.0, 1.0, 1.0)),
              lambda: trimesh.creation.icosphere(subdivisions=2, radius=0.5),
              lambda: trimesh.creation.cylinder(radius=0.5, height=1.0, sections=24),
              lambda: trimesh.creation.cone(radius=0.5, height=1.0, sections=24),
              lambda: trimesh.creation.capsule(height=0.5, radius=0.3, count=[12, 12])]
    return makers[kind % len(makers)]()


@dataclass
class SyntheticScene:
    objects: List[SceneObject]
    translations: torch.Tensor   # (K, 3) true box centres
    scales: torch.Tensor         # (K, 3) true scales
    image: torch.Tensor          # (H, W, 3) reference render on white
    mask: torch.Tensor           # (H, W)
    disparity: torch.Tensor      # (H, W) 1 / depth on the foreground (a depth estimator's "near = bright")
    camera: Cameras
    object_masks: torch.Tensor   # (K, H, W) bool, each object's visible pixels

    @property
    def extent(self) -> float:
        """Size of the scene: the diagonal of the true objects' union box (the unit of translation errors)."""
        boxes = LayoutScene(self.objects, self.translations, self.scales).object_boxes()
        return float((boxes[:, 1].amax(0) - boxes[:, 0].amin(0)).norm().detach())


def make_scene(n_objects: int, seed: int, resolution: int = 128) -> SyntheticScene:
    """``n_objects`` primitives (unit-size meshes scaled 0.3-0.5) at non-overlapping places in view."""
    rng = np.random.default_rng(seed)
    objects, centres, sizes = [], [], []
    for k in range(n_objects):
        mesh = _primitive(int(rng.integers(0, 5)))
        colors = torch.tensor(PALETTE[k % len(PALETTE)], dtype=torch.float32).expand(len(mesh.vertices), 3)
        objects.append(scene_object(torch.tensor(mesh.vertices, dtype=torch.float32),
                                    torch.tensor(mesh.faces), colors.clone(), object_name(k)))
        for _ in range(1000):  # rejection sampling of a free spot
            size = float(rng.uniform(0.3, 0.5))
            c = np.array([rng.uniform(-0.6, 0.6), rng.uniform(-0.35, 0.35), rng.uniform(-0.4, 0.4)])
            if all(np.abs(c - o)[:2].max() > 0.5 * (size + s) + 0.02 for o, s in zip(centres, sizes)):
                break
        centres.append(c)
        sizes.append(size)
    translations = torch.tensor(np.array(centres), dtype=torch.float32)
    scales = torch.tensor(sizes, dtype=torch.float32)[:, None].expand(-1, 3).clone()
    camera = orbit_cameras(0.0, 0.0, 2.5, 40.0)
    scene = LayoutScene(objects, translations, scales)
    with torch.no_grad():
        r = render_scene(scene, camera, resolution, resolution)
    disparity = torch.where(r.covered, 1.0 / r.depth.clamp_min(1e-6), torch.zeros_like(r.depth))
    masks = torch.stack([r.object_id == k for k in range(n_objects)])
    return SyntheticScene(objects, translations, scales, r.color, r.covered.float(), disparity, camera, masks)


def perturb(scene: SyntheticScene, seed: int, shift: float = 0.35, scale_range=(0.7, 1.4),
            no_overlap: bool = False):
    """A starting layout: each object moved in the image plane by ``shift`` (world units, random
    direction) and scaled by a random factor; with ``no_overlap`` the first object is moved
    farther than its own size plus its target's, so its start and target silhouettes are disjoint."""
    rng = np.random.default_rng(seed)
    k = scene.translations.shape[0]
    angles = rng.uniform(0, 2 * np.pi, k)
    offsets = np.stack([np.cos(angles), np.sin(angles), np.zeros(k)], 1) * shift
    factors = rng.uniform(*scale_range, (k, 1)).repeat(3, 1)
    if no_overlap:  # towards (and past) the image centre, just far enough for disjoint boxes
        size = float(scene.scales[0, 0])
        c = scene.translations[0, :2].numpy().astype(np.float64)
        direction = -c / max(np.linalg.norm(c), 1e-6) if np.linalg.norm(c) > 0.05 else np.array([1.0, 0.0])
        reach = 1.1 * 0.5 * size * (factors[0, 0] + 1.0) * np.sqrt(2.0) + 0.05
        offsets[0] = np.array([*(direction * reach), 0.0])
    t0 = scene.translations + torch.tensor(offsets, dtype=torch.float32)
    s0 = scene.scales * torch.tensor(factors, dtype=torch.float32)
    return t0, s0


def affine_disparity(depth: torch.Tensor) -> torch.Tensor:
    """A depth estimator's view of view depths: inverse depth under an arbitrary scale and shift
    (Depth Anything / MiDaS predict affine-invariant inverse depth), near = large."""
    return 1.7 / depth - 0.3


def gamma_disparity(depth: torch.Tensor) -> torch.Tensor:
    """A monotone but not affine estimator: inverse depth to the power 0.7 (for robustness checks)."""
    return depth.pow(-0.7)


def make_depth_scene(n_objects: int, seed: int, resolution: int = 128, depth_range: float = 0.7,
                     transform=affine_disparity, min_visible: float = 0.45, min_overlaps: int = 1) -> SyntheticScene:
    """``n_objects`` primitives at different depths, some hiding parts of others.

    Object centres are drawn in x in [-0.6, 0.6], y in [-0.35, 0.35], z in [-depth_range, depth_range]
    (the reference camera looks down -z from 2.5), their 3D boxes disjoint; the depths are then shifted
    so that the mean centre depth is the camera's orbit distance (the convention that fixes the scale a
    single image cannot). Drawn again until at least ``min_overlaps`` pairs overlap on screen and every
    object keeps ``min_visible`` of its silhouette. ``disparity`` is ``transform(view depth)`` on the
    foreground (0 elsewhere), what a depth estimator would give.
    """
    rng = np.random.default_rng(seed)
    camera = orbit_cameras(0.0, 0.0, 2.5, 40.0)
    objects = []
    for k in range(n_objects):
        mesh = _primitive(int(rng.integers(0, 5)))
        colors = torch.tensor(PALETTE[k % len(PALETTE)], dtype=torch.float32).expand(len(mesh.vertices), 3)
        objects.append(scene_object(torch.tensor(mesh.vertices, dtype=torch.float32),
                                    torch.tensor(mesh.faces), colors.clone(), object_name(k)))
    for _ in range(2000):
        sizes = rng.uniform(0.3, 0.5, n_objects)
        centres = np.stack([rng.uniform(-0.6, 0.6, n_objects), rng.uniform(-0.35, 0.35, n_objects),
                            rng.uniform(-depth_range, depth_range, n_objects)], 1)
        centres[:, 2] -= centres[:, 2].mean()
        gap = np.abs(centres[:, None] - centres[None]) - 0.5 * (sizes[:, None, None] + sizes[None, :, None])
        apart = (gap.max(-1) > 0.02) | np.eye(n_objects, dtype=bool)
        if not apart.all():
            continue
        translations = torch.tensor(centres, dtype=torch.float32)
        scales = torch.tensor(sizes, dtype=torch.float32)[:, None].expand(-1, 3).clone()
        with torch.no_grad():
            r = render_scene(LayoutScene(objects, translations, scales), camera, resolution, resolution)
            alone = [render_scene(LayoutScene([o], translations[i:i + 1], scales[i:i + 1]), camera, resolution,
                                  resolution).covered for i, o in enumerate(objects)]
        visible = [float((r.object_id == i).sum()) / max(float(a.sum()), 1.0) for i, a in enumerate(alone)]
        overlaps = sum(int((alone[i] & alone[j]).sum() >= 4) for i in range(n_objects) for j in range(i + 1, n_objects))
        if min(visible) >= min_visible and overlaps >= min_overlaps:
            break
    else:
        raise RuntimeError(f"no scene of {n_objects} objects found for seed {seed}")
    disparity = torch.where(r.covered, transform(r.depth.clamp_min(1e-6)), torch.zeros_like(r.depth))
    masks = torch.stack([r.object_id == k for k in range(n_objects)])
    return SyntheticScene(objects, translations, scales, r.color, r.covered.float(), disparity, camera, masks)
