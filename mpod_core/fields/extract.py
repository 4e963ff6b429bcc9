"""Mesh extraction from a density field: sample a lattice, run marching cubes.

:func:`sample_density_grid` evaluates ``density_fn`` on the ``res**3`` lattice
of *vertex* positions spanning the box, corners included (``lo + i / (res - 1)
* (hi - lo)``), so lattice index ``i`` and world position map onto each other
exactly and the surface reaches the box faces. :func:`extract_mesh` runs
scikit-image's marching cubes on that grid at ``density == threshold``, maps
the vertices back to the world frame of the box (no axis swap: grid axes 0, 1,
2 are world x, y, z) and orients the faces so normals point out of the dense
region, towards lower density.

The surface is left open where the dense region touches the box: the grid is
not padded, so a field that fills a box face gives a mesh with a hole there.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import numpy as np
import torch
import trimesh

from ..progress import ProgressFn

DensityFn = Callable[[torch.Tensor], torch.Tensor]
ColorFn = Callable[[torch.Tensor], torch.Tensor]


MIN_RESOLUTION = 2  # marching cubes needs at least one cell per axis
MAX_RESOLUTION = 1024  # 1024**3 float32 is already 4 GiB of grid
#: Largest number of lattice cells the iso-surface may cross before marching cubes
#: runs (:func:`count_surface_cells`). The grid itself is bounded by the resolution
#: (4 bytes a lattice point, ~4.6 B with the sampling: 512^3 peaked at 0.6 GiB), but
#: the mesh grows with the surface, which the field decides: skimage's marching cubes
#: plus trimesh's merging peak at ~268 bytes a face, measured, i.e. ~540 B a crossed
#: cell on a smooth surface (a 512^3 ball, 197k cells, 394k faces) and up to ~1960 B
#: on a noisy one (7.3 faces a cell: 128^3 of high-frequency density, 2.05M cells,
#: 15M faces, 3.8 GiB). At the worst rate 2**20 cells are ~2 GiB; a smooth surface of
#: that many cells (5x a ball filling a 512^3 lattice) needs ~0.55 GiB.
MAX_SURFACE_CELLS = 2 ** 20
#: Lattice planes per slab when counting crossed cells (bounded temporaries).
_COUNT_SLAB = 16


def _check_aabb(aabb) -> Tuple[torch.Tensor, torch.Tensor]:
    """(6,) ``(xmin, ymin, zmin, xmax, ymax, zmax)`` (or (2, 3)) -> ``lo``, ``hi`` (3,) float64 CPU."""
    try:
        box = torch.as_tensor(np.asarray(aabb, dtype=np.float64)).reshape(-1)
    except (TypeError, ValueError) as err:
        raise ValueError(f"aabb: expected 6 numbers (xmin, ymin, zmin, xmax, ymax, zmax), got {aabb!r}") from err
    if box.numel() != 6 or not torch.isfinite(box).all() or not (box[3:] > box[:3]).all():
        raise ValueError(f"aabb: expected finite (xmin, ymin, zmin, xmax, ymax, zmax) with max > min, "
                         f"got {box.tolist()}")
    return box[:3], box[3:]


def _check_resolution(resolution) -> int:
    # bool is an int subclass; True would silently mean resolution 1.
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)):
        raise ValueError(f"resolution: expected an int, got {resolution!r}")
    if not MIN_RESOLUTION <= int(resolution) <= MAX_RESOLUTION:
        raise ValueError(f"resolution must be in [{MIN_RESOLUTION}, {MAX_RESOLUTION}], got {resolution}")
    return int(resolution)


def lattice_axes(lo: torch.Tensor, hi: torch.Tensor, resolution: int) -> torch.Tensor:
    """Per-axis lattice coordinates ``lo + i / (res - 1) * (hi - lo)``, i = 0 .. res - 1.

    Args:
        lo, hi: (3,) box corners.
        resolution: lattice vertices per axis (>= 2).

    Returns:
        (3, res) float32; row k holds the world coordinates along axis k.
    """
    # float64 so that the last vertex lands on hi to the last bit before the cast.
    t = torch.arange(resolution, dtype=torch.float64) / (resolution - 1)
    lo64, hi64 = lo.to(torch.float64), hi.to(torch.float64)
    return (lo64[:, None] + t[None, :] * (hi64 - lo64)[:, None]).to(torch.float32)


def lattice_points(flat: torch.Tensor, axes: torch.Tensor) -> torch.Tensor:
    """World positions of lattice vertices given their flat indices.

    Args:
        flat: (N,) long flat indices, C order over (x, y, z).
        axes: (3, res) per-axis coordinates from :func:`lattice_axes`, on ``flat``'s device.

    Returns:
        (N, 3) float32 points ``(axes[0, i], axes[1, j], axes[2, k])``.
    """
    # Gathering from the three axis vectors costs a third of the arithmetic of
    # scaling every (i, j, k) triple, which dominates sampling a cheap field.
    r = axes.shape[1]
    return torch.stack([axes[0][flat // (r * r)], axes[1][(flat // r) % r], axes[2][flat % r]], -1)


def _eval_chunk(fn: Callable[[torch.Tensor], torch.Tensor], points: torch.Tensor, width: int,
                name: str) -> torch.Tensor:
    """``fn(points)`` reshaped to (N,) (width 1) or (N, width), float32 CPU; checks the count."""
    out = torch.as_tensor(fn(points))
    n = points.shape[0]
    if out.numel() != n * width:
        want = f"({n},)" if width == 1 else f"({n}, {width})"
        raise ValueError(f"{name} must return {want} for {n} points, got {tuple(out.shape)}")
    out = out.detach().to("cpu", torch.float32)
    return out.reshape(n) if width == 1 else out.reshape(n, width)


def sample_density_grid(density_fn: DensityFn, aabb, resolution: int, *, chunk: int = 1 << 18,
                        device=None, progress: Optional[ProgressFn] = None) -> torch.Tensor:
    """Density on the lattice of vertex positions spanning ``aabb``.

    Args:
        density_fn: ``points (N, 3) float32 -> density (N,)`` (or (N, 1)).
        aabb: (6,) ``(xmin, ymin, zmin, xmax, ymax, zmax)``.
        resolution: lattice vertices per axis, in [2, 1024].
        chunk: points per ``density_fn`` call (bounds peak memory of the field).
        device: where the points are built and passed to ``density_fn`` (None: CPU).
        progress: optional ``(done_points, total_points, None)`` callback after each chunk;
            whatever it raises (e.g. an interrupt) propagates.

    Returns:
        (res, res, res) float32 CPU tensor; ``grid[i, j, k]`` is the density at
        ``lo + (i, j, k) / (res - 1) * (hi - lo)``.
    """
    lo, hi = _check_aabb(aabb)
    res = _check_resolution(resolution)
    if int(chunk) < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    total = res ** 3
    axes = lattice_axes(lo, hi, res).to(dev)
    grid = torch.empty(total, dtype=torch.float32)
    with torch.no_grad():
        for start in range(0, total, int(chunk)):  # loop over chunks, never over points
            stop = min(start + int(chunk), total)
            pts = lattice_points(torch.arange(start, stop, device=dev), axes)
            grid[start:stop] = _eval_chunk(density_fn, pts, 1, "density_fn")
            if progress is not None:
                progress(stop, total, None)
    return grid.reshape(res, res, res)


def _check_crossing(grid: torch.Tensor, threshold: float) -> None:
    """Raise ValueError unless ``grid`` is finite and has values on both sides of ``threshold``.

    No temporary of the grid's size: a NaN or inf shows in the min or max, and only
    then are the bad values counted, a slab at a time.
    """
    lo, hi = float(grid.min()), float(grid.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        bad = sum(int((~torch.isfinite(grid[i:i + _COUNT_SLAB])).sum()) for i in range(0, grid.shape[0], _COUNT_SLAB))
        raise ValueError(f"density_fn returned {bad} non-finite values (NaN/inf) out of {grid.numel()} "
                         f"lattice points; cannot extract a surface")
    if not hi > threshold:
        raise ValueError(f"field is empty at threshold {threshold:g} (max density {hi:g}); "
                         f"lower the threshold or check the field/aabb")
    if not lo < threshold:
        raise ValueError(f"field is full at threshold {threshold:g} (min density {lo:g}): every lattice point "
                         f"is dense, so there is no surface inside the aabb; raise the threshold or enlarge the aabb")


def count_surface_cells(grid: torch.Tensor, threshold: float) -> int:
    """Lattice cells whose 8 corners lie on both sides of ``threshold`` (where marching cubes
    puts faces), counted a slab of planes at a time so the temporaries stay small."""
    n, total = grid.shape[0], 0
    for start in range(0, n - 1, _COUNT_SLAB):
        dense = grid[start:min(start + _COUNT_SLAB, n - 1) + 1] > threshold
        some = dense[:-1] | dense[1:]
        every = dense[:-1] & dense[1:]
        some = some[:, :-1] | some[:, 1:]
        every = every[:, :-1] & every[:, 1:]
        some = some[:, :, :-1] | some[:, :, 1:]
        every = every[:, :, :-1] & every[:, :, 1:]
        total += int((some & ~every).sum(dtype=torch.int64))
    return total


def _check_surface_size(grid: torch.Tensor, threshold: float, max_cells: int) -> None:
    """Refuse a surface whose mesh would not fit :data:`MAX_SURFACE_CELLS` (see there)."""
    cells = count_surface_cells(grid, threshold)
    if cells > max_cells:
        raise ValueError(f"the surface at threshold {threshold:g} crosses {cells} of the {grid.shape[0]}^3 lattice's "
                         f"cells, more than the {max_cells} whose mesh fits in memory (up to ~2 KB a cell); "
                         f"lower the resolution, or raise the threshold if the field is noisy")


def _marching_cubes(grid: np.ndarray, threshold: float, lo: torch.Tensor, hi: torch.Tensor) -> trimesh.Trimesh:
    """Iso-surface of ``grid`` at ``threshold`` in world coordinates, normals towards lower density.

    Args:
        grid: (res, res, res) float32 lattice values.
        threshold: iso level, strictly inside the value range.
        lo, hi: (3,) box corners the lattice spans.

    Returns:
        Trimesh (V, 3) float64 vertices, (F, 3) faces; duplicate vertices merged,
        degenerate faces removed.
    """
    from skimage.measure import marching_cubes  # heavy import, only paid when a mesh is extracted

    # Density grows *into* the object, so the gradient ascends inwards; with
    # 'ascent' skimage winds faces so their normals point down the gradient (out).
    verts, faces, _, _ = marching_cubes(grid, level=threshold, gradient_direction="ascent")
    res = grid.shape[0]
    lo64, hi64 = lo.numpy(), hi.numpy()
    world = lo64 + verts.astype(np.float64) / (res - 1) * (hi64 - lo64)
    mesh = trimesh.Trimesh(world, faces.astype(np.int64), process=False)
    # Where the field equals the threshold exactly at a lattice point, skimage
    # emits several copies of that vertex and zero-area faces between them.
    mesh.merge_vertices()
    mesh.update_faces(mesh.nondegenerate_faces())
    mesh.remove_unreferenced_vertices()
    return mesh


def _vertex_colors(color_fn: ColorFn, vertices: np.ndarray, chunk: int, dev: torch.device) -> np.ndarray:
    """``color_fn`` at ``vertices`` (V, 3) -> (V, 4) uint8 RGBA (alpha 255); RGB clamped to [0, 1]."""
    pts = torch.as_tensor(vertices, dtype=torch.float32)
    rgb = torch.empty(pts.shape[0], 3, dtype=torch.float32)
    with torch.no_grad():
        for start in range(0, pts.shape[0], chunk):
            part = pts[start:start + chunk].to(dev)
            rgb[start:start + chunk] = _eval_chunk(color_fn, part, 3, "color_fn")
    if not torch.isfinite(rgb).all():
        raise ValueError(f"color_fn returned {int((~torch.isfinite(rgb)).sum())} non-finite values")
    rgba = torch.full((pts.shape[0], 4), 255, dtype=torch.uint8)
    rgba[:, :3] = (rgb.clamp(0, 1) * 255).round().to(torch.uint8)
    return rgba.numpy()


def extract_mesh(density_fn: DensityFn, aabb, *, resolution: int = 128, threshold: float = 10.0,
                 color_fn: Optional[ColorFn] = None, chunk: int = 1 << 18, device=None,
                 progress: Optional[ProgressFn] = None,
                 max_surface_cells: int = MAX_SURFACE_CELLS) -> trimesh.Trimesh:
    """Marching-cubes mesh of the iso-surface ``density == threshold``.

    Args:
        density_fn: ``points (N, 3) float32 -> density (N,)``; called in chunks without grad.
        aabb: (6,) ``(xmin, ymin, zmin, xmax, ymax, zmax)`` world box to mesh.
        resolution: lattice vertices per axis, in [2, 1024] (the voxel size is
            ``(hi - lo) / (resolution - 1)``).
        threshold: finite iso level; the mesh encloses ``density > threshold``.
        color_fn: optional ``points (N, 3) -> RGB (N, 3)`` in [0, 1], evaluated at
            the mesh vertices -> uint8 RGBA vertex colours.
        chunk: points per ``density_fn`` / ``color_fn`` call.
        device: device of the points handed to the callbacks (None: CPU).
        progress: optional ``(done, total)`` callback after each density chunk
            (``total = resolution**3``); its exceptions propagate.
        max_surface_cells: refuse surfaces crossing more lattice cells than this
            (see :data:`MAX_SURFACE_CELLS`), before marching cubes allocates the mesh.

    Returns:
        ``trimesh.Trimesh`` (built with ``process=False``) with (V, 3) vertices in
        the world frame of ``aabb`` and (F, 3) faces whose normals point towards
        lower density.

    Raises:
        ValueError: malformed ``aabb``, ``resolution`` outside [2, 1024],
            non-finite ``threshold``, non-finite densities, or no crossing of
            ``threshold`` inside the box (field empty or full), or a surface
            crossing more than ``max_surface_cells`` cells.
    """
    lo, hi = _check_aabb(aabb)
    res = _check_resolution(resolution)
    try:
        level = float(threshold)
    except (TypeError, ValueError) as err:
        raise ValueError(f"threshold must be a finite number, got {threshold!r}") from err
    if not math.isfinite(level):
        raise ValueError(f"threshold must be finite, got {threshold!r}")
    grid = sample_density_grid(density_fn, aabb, res, chunk=chunk, device=device, progress=progress)
    _check_crossing(grid, level)
    _check_surface_size(grid, level, int(max_surface_cells))
    mesh = _marching_cubes(grid.numpy(), level, lo, hi)
    if color_fn is not None:
        dev = torch.device(device) if device is not None else torch.device("cpu")
        mesh.visual.vertex_colors = _vertex_colors(color_fn, mesh.vertices, int(chunk), dev)
    return mesh
