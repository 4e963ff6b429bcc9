"""Signed distance of a triangle mesh, for starting a DMTet surface from any mesh.

Distances come from libigl (``igl.signed_distance`` unsigned, imported on use), the
sign from its fast generalized winding number (``igl.fast_winding_number``, Barill et
al. 2018), so meshes that are not watertight (holes, seams, several shells, flipped
orientation) still get an inside/outside. Convention of
:mod:`mpod_core.geometry.tets`: positive outside.

Public API::

    mesh_signed_distance(vertices, faces, points, chunk=2**18, max_distance=None) -> (P,)
    mesh_sdf_on_grid(vertices, faces, grid) -> (V,) in [-1, 1], cell units
    check_initial_mesh(vertices, faces) -> one-line report (raises ValueError on unusable meshes)
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .tets import TetGrid

__all__ = ["mesh_signed_distance", "mesh_sdf_on_grid", "check_initial_mesh"]

#: Points per libigl call by default; each costs ~64 bytes a point inside libigl.
DEFAULT_CHUNK = 2 ** 18


def _igl():
    try:
        import igl  # noqa: PLC0415 (optional dependency, imported on use)
    except ImportError as err:
        raise ImportError("the signed distance of a mesh needs libigl: pip install libigl "
                          "(listed in the pack's requirements.txt)") from err
    return igl


def _check_mesh_tensors(vertices: torch.Tensor, faces: torch.Tensor) -> None:
    if not isinstance(vertices, torch.Tensor) or vertices.dim() != 2 or vertices.shape[1] != 3 \
            or not vertices.is_floating_point():
        got = tuple(vertices.shape) if isinstance(vertices, torch.Tensor) else type(vertices).__name__
        raise ValueError(f"vertices: expected a float tensor of shape (V, 3), got {got}")
    if not isinstance(faces, torch.Tensor) or faces.dim() != 2 or faces.shape[1] != 3 \
            or faces.is_floating_point() or faces.dtype == torch.bool:
        got = tuple(faces.shape) if isinstance(faces, torch.Tensor) else type(faces).__name__
        raise ValueError(f"faces: expected an integer tensor of shape (F, 3), got {got}")


def mesh_signed_distance(vertices: torch.Tensor, faces: torch.Tensor, points: torch.Tensor,
                         chunk: int = DEFAULT_CHUNK, max_distance: Optional[float] = None) -> torch.Tensor:
    """Signed distance from points to a triangle mesh, positive outside.

    The magnitude is the exact distance to the nearest triangle; the sign is inside where the
    fast generalized winding number ``|w| > 0.5``, which needs neither a watertight mesh nor a
    consistent orientation (a closed mesh wound inwards still has ``|w| = 1`` inside).

    Args:
        vertices: (V, 3) float mesh vertices (any device; computed in float64 on the CPU).
        faces: (F, 3) integer vertex indices.
        points: (P, 3) float query points.
        chunk: points per libigl call (bounds libigl's memory, ~64 bytes a point; each call
            rebuilds its search trees, so very small chunks are slow).
        max_distance: if given, distances are cut to ``[-max_distance, max_distance]`` and
            libigl stops searching beyond that (3x faster on a grid); the sign of the cut
            points still comes from the winding number.

    Returns:
        (P,) float32 on ``points``' device.

    Raises:
        ImportError: libigl is not installed.
        ValueError: wrong shapes, ``chunk < 1`` or ``max_distance <= 0``.
    """
    _check_mesh_tensors(vertices, faces)
    if not isinstance(points, torch.Tensor) or points.dim() != 2 or points.shape[1] != 3 \
            or not points.is_floating_point():
        got = tuple(points.shape) if isinstance(points, torch.Tensor) else type(points).__name__
        raise ValueError(f"points: expected a float tensor of shape (P, 3), got {got}")
    if int(chunk) < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if max_distance is not None and not max_distance > 0:
        raise ValueError(f"max_distance must be > 0, got {max_distance}")
    igl = _igl()
    v = np.ascontiguousarray(vertices.detach().cpu().double().numpy())
    f = np.ascontiguousarray(faces.detach().cpu().long().numpy())
    p = points.detach().cpu().double().numpy()
    bound = {} if max_distance is None else {"lower_bound": 0.0, "upper_bound": float(max_distance)}
    out = np.empty(p.shape[0], dtype=np.float64)
    for start in range(0, p.shape[0], int(chunk)):  # loop over chunks, never over points
        part = np.ascontiguousarray(p[start:start + int(chunk)])
        # Unsigned distance and the winding number apart: igl.signed_distance's own
        # FAST_WINDING_NUMBER mode returns (1 - 2|w|) * distance, not sign * distance
        # (2/3 of it at the centre of a box missing a face, 0.3% off on a closed sphere).
        d = igl.signed_distance(part, v, f, sign_type=igl.SIGNED_DISTANCE_TYPE_UNSIGNED, **bound)[0]
        if max_distance is not None:
            d = np.nan_to_num(d, nan=float(max_distance))  # NaN: beyond the search bound
        inside = np.abs(igl.fast_winding_number(v, f, part)) > 0.5
        out[start:start + part.shape[0]] = np.where(inside, -d, d)
    return torch.from_numpy(out).to(device=points.device, dtype=torch.float32)


def mesh_sdf_on_grid(vertices: torch.Tensor, faces: torch.Tensor, grid: TetGrid) -> torch.Tensor:
    """The DMTet start from a mesh: ``clamp(d / cell, -1, 1)`` at the grid's vertices.

    ``d`` is :func:`mesh_signed_distance` (positive outside) and ``cell`` the grid's largest
    cell edge (largest box side / cells). Cell units put the values in [-1, 1] like
    :func:`~mpod_core.geometry.sdf_from_density`'s, so the refine's learning rate moves the
    surface by the same fraction of a cell whichever route started it, and the clamp keeps
    only what marching reads: the zero crossing lies on an edge whose ends are within a
    cell or two of the surface. (Ends further than one cell are cut to ±1, which moves a
    crossing on a long, diagonal edge by under 0.1 cell.)

    Args:
        vertices: (V, 3) float mesh vertices, in the grid's coordinates.
        faces: (F, 3) integer vertex indices.
        grid: the tetrahedral grid.

    Returns:
        (grid V,) float32 in [-1, 1] on the grid's device, negative inside.

    Raises:
        ValueError: no grid vertex is inside the mesh (an open sheet, or a mesh thinner than a cell).
    """
    cell = float(grid.cell_size.max())
    d = mesh_signed_distance(vertices, faces, grid.vertices, max_distance=cell)
    sdf = (d / cell).clamp_(-1.0, 1.0)
    if not bool((sdf < 0).any()):
        raise ValueError(f"no vertex of the {grid.resolution}-cell grid is inside the mesh (the signed distance "
                         f"is positive at all {sdf.numel()} of them): the mesh is an open sheet with no inside, or "
                         f"thinner than a cell ({cell:.4g}); use more grid_cells or a closed mesh")
    return sdf


def check_initial_mesh(vertices: torch.Tensor, faces: torch.Tensor) -> str:
    """Check a mesh before it becomes a DMTet start; a one-line report on its closedness.

    Vertices at exactly the same position are merged first (UV and colour seams split
    them), then each edge's faces are counted: the mesh is watertight when every edge
    has exactly 2. An open mesh is not refused: the winding number still gives
    inside/outside (:func:`mesh_signed_distance`).

    Args:
        vertices: (V, 3) float; faces: (F, 3) integer indices into ``vertices``.

    Returns:
        ``"watertight"``, or ``"not watertight: N boundary edges; inside/outside taken from the
        generalized winding number"`` (with ``", M edges shared by more than 2 faces"`` after
        the count when there are such).

    Raises:
        ValueError: wrong shapes, no vertices or faces, NaN/inf vertices, indices out of range,
        or all vertices at one point.
    """
    _check_mesh_tensors(vertices, faces)
    n_v, n_f = vertices.shape[0], faces.shape[0]
    if n_v == 0 or n_f == 0:
        raise ValueError(f"the initial mesh is empty ({n_v} vertices, {n_f} faces)")
    if not bool(torch.isfinite(vertices).all()):
        raise ValueError("the initial mesh's vertex positions contain NaN or infinity")
    if int(faces.min()) < 0 or int(faces.max()) >= n_v:
        raise ValueError(f"the initial mesh's face indices are outside [0, {n_v - 1}]")
    extent = vertices.max(0).values - vertices.min(0).values
    if not float(extent.max()) > 0:
        raise ValueError("the initial mesh has zero extent (all its vertices at one point)")
    _, merged = torch.unique(vertices.detach(), dim=0, return_inverse=True)
    tri = merged[faces.long()]
    edges = torch.cat([tri[:, [0, 1]], tri[:, [1, 2]], tri[:, [2, 0]]]).sort(dim=1).values
    edges = edges[edges[:, 0] != edges[:, 1]]  # edges of faces collapsed by the merge
    _, counts = torch.unique(edges, dim=0, return_counts=True)
    boundary, shared = int((counts == 1).sum()), int((counts > 2).sum())
    if boundary == 0 and shared == 0:
        return "watertight"
    more = f", {shared} edges shared by more than 2 faces" if shared else ""
    return f"not watertight: {boundary} boundary edges{more}; inside/outside taken from the generalized winding number"
