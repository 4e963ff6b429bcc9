"""Geometry on grids: the tetrahedral grid and differentiable marching tetrahedra
(DMTet) used by the DMTet and DSD refine stages.

Public API::

    TetGrid.cube(resolution, bbox, device, dtype)      # Kuhn split, 6 tets a cell
    deform(grid, delta) -> (V, 3)
    marching_tets(vertices, grid, sdf) -> (mesh_vertices (M, 3), faces (F, 3))
    sdf_from_density(grid, density_fn, threshold) -> (V,)
    tighten_bbox(grid, sdf, margin=0.1) -> (6,) bbox
"""
from .tets import TET_EDGE_PAIRS, TetGrid, deform, marching_tets, sdf_from_density, tighten_bbox

__all__ = ["TET_EDGE_PAIRS", "TetGrid", "deform", "marching_tets", "sdf_from_density", "tighten_bbox"]
