"""Tetrahedral grid and differentiable marching tetrahedra (DMTet), pure torch.

The grid is generated, not loaded: the ``n**3`` cube lattice of a box, each cell
cut into 6 tetrahedra by the Kuhn/Freudenthal split ``[v, v+e_a, v+e_a+e_b,
v+e_a+e_b+e_c]`` over the 6 permutations ``(a, b, c)`` of the axes. Every cell
is cut along its main diagonal ``v -> v+(1,1,1)`` and every face along the
diagonal from its lowest to its highest corner, so neighbouring cells agree on
their shared faces and the tets are conforming. All edges join a vertex ``v`` to
``v + d`` with ``d`` one of the 7 non-zero 0/1 vectors (3 axes, 3 face
diagonals, 1 body diagonal); they are enumerated once, per direction, and each
tet's 6 edges are stored as indices into that list (:attr:`TetGrid.tet_edges`),
so marching needs no ``unique`` or ``sort`` per call.

Conventions (threestudio's): the SDF is positive outside the shape; a vertex
with ``sdf > 0`` is outside, ``sdf <= 0`` inside. Tets are positively oriented
(``det[v1-v0, v2-v0, v3-v0] > 0``) and the triangle table is wound for that, so
faces are wound counter-clockwise seen from outside (normals towards positive
SDF).

Public API::

    TetGrid.cube(resolution, bbox=(-1,-1,-1,1,1,1), device=None, dtype=float32) -> TetGrid
    deform(grid, delta) -> (V, 3)                         # vertices + cell * tanh(delta)
    marching_tets(vertices, grid, sdf) -> (mesh_vertices (M, 3), faces (F, 3))
    sdf_from_density(grid, density_fn, threshold) -> (V,) # clamp(tau - sigma, -1, 1)
    tighten_bbox(grid, sdf, margin=0.1) -> (6,) bbox of the occupied region
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Tuple

import torch

from ..fields.extract import _check_aabb

DensityFn = Callable[[torch.Tensor], torch.Tensor]

MIN_RESOLUTION = 1
#: 512 cells per axis is 805M tets, ~64 GiB of index tables: far past any use here.
MAX_RESOLUTION = 512

#: The 6 axis permutations of the Kuhn split; the odd ones give negatively
#: oriented tets (det of the chain = sign of the permutation) and are flipped.
_PERMUTATIONS = ((0, 1, 2), (1, 2, 0), (2, 0, 1), (0, 2, 1), (2, 1, 0), (1, 0, 2))
_PERMUTATION_IS_ODD = (False, False, False, True, True, True)

#: The 7 edge directions, ``d = (dx, dy, dz)`` in {0, 1}^3 minus 0, listed so
#: that ``_DIRECTIONS[4 dx + 2 dy + dz - 1] == d``.
_DIRECTIONS = ((0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1))

#: Local order of a tet's 6 edges (pairs of its vertex slots); :data:`_TRIANGLES`
#: indexes into it.
TET_EDGE_PAIRS = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))

#: Triangles per case, case = sum over slots i of (sdf_i > 0) << i, as local edge
#: indices (into :data:`TET_EDGE_PAIRS`); -1 pads cases with fewer than 2.
#: One vertex apart from the other three -> 1 triangle on its 3 edges; two and
#: two -> the quad on the 4 mixed edges (a cycle), split into 2 triangles. Each is
#: wound so that on a positively oriented tet its normal points towards the
#: positive (outside) vertices; tests/unit/test_tets.py re-derives this.
_TRIANGLES = (
    ((-1, -1, -1), (-1, -1, -1)),  # 0000: all inside
    ((0, 2, 1), (-1, -1, -1)),     # 0001
    ((0, 3, 4), (-1, -1, -1)),     # 0010
    ((1, 4, 2), (1, 3, 4)),        # 0011
    ((1, 5, 3), (-1, -1, -1)),     # 0100
    ((0, 2, 5), (0, 5, 3)),        # 0101
    ((0, 5, 4), (0, 1, 5)),        # 0110
    ((2, 5, 4), (-1, -1, -1)),     # 0111
    ((2, 4, 5), (-1, -1, -1)),     # 1000
    ((0, 5, 1), (0, 4, 5)),        # 1001
    ((0, 3, 5), (0, 5, 2)),        # 1010
    ((1, 3, 5), (-1, -1, -1)),     # 1011
    ((1, 4, 3), (1, 2, 4)),        # 1100
    ((0, 4, 3), (-1, -1, -1)),     # 1101
    ((0, 1, 2), (-1, -1, -1)),     # 1110
    ((-1, -1, -1), (-1, -1, -1)),  # 1111: all outside
)


@dataclass
class TetGrid:
    """A conforming tetrahedral grid of an axis-aligned box (build it with :meth:`cube`)."""

    vertices: torch.Tensor
    """(V, 3) float lattice points, ``V = (n+1)**3``, flat index ``(i (n+1) + j) (n+1) + k``."""
    tets: torch.Tensor
    """(T, 4) int64 vertex indices, ``T = 6 n**3``, 6 consecutive tets per cell; all det > 0."""
    edges: torch.Tensor
    """(E, 2) int64 undirected edges, each once, stored ``(v, v + d)``, grouped by direction."""
    tet_edges: torch.Tensor
    """(T, 6) int64 indices into ``edges`` of each tet's edges, in :data:`TET_EDGE_PAIRS` order."""
    resolution: int
    """n, cells per axis."""
    bbox: Tuple[float, float, float, float, float, float]
    """``(xmin, ymin, zmin, xmax, ymax, zmax)`` the lattice spans."""

    @property
    def cell_size(self) -> torch.Tensor:
        """(3,) cell side per axis, ``(max - min) / n``, on the vertices' device and dtype."""
        lo, hi = torch.tensor(self.bbox[:3]), torch.tensor(self.bbox[3:])
        return ((hi - lo) / self.resolution).to(self.vertices.device, self.vertices.dtype)

    @classmethod
    def cube(cls, resolution: int, bbox=(-1.0, -1.0, -1.0, 1.0, 1.0, 1.0), device=None,
             dtype: torch.dtype = torch.float32) -> "TetGrid":
        """Kuhn/Freudenthal tetrahedral grid of ``resolution**3`` cells spanning ``bbox``.

        Args:
            resolution: n, cells per axis, in [1, 512]. n = 32 has about as many tets as
                threestudio's "64_tets" file, n = 64 as "128_tets".
            bbox: (6,) ``(xmin, ymin, zmin, xmax, ymax, zmax)``.
            device: where the tensors live (None: CPU).
            dtype: floating dtype of the vertices.

        Returns:
            TetGrid with V = (n+1)**3 vertices, T = 6 n**3 tets and
            E = 3 n (n+1)**2 + 3 n**2 (n+1) + n**3 edges.
        """
        if isinstance(resolution, bool) or not isinstance(resolution, int):
            raise ValueError(f"resolution: expected an int, got {resolution!r}")
        if not MIN_RESOLUTION <= resolution <= MAX_RESOLUTION:
            raise ValueError(f"resolution must be in [{MIN_RESOLUTION}, {MAX_RESOLUTION}], got {resolution}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        lo, hi = _check_aabb(bbox)
        dev = torch.device(device) if device is not None else torch.device("cpu")
        n, m = resolution, resolution + 1
        lattice_stride = torch.tensor([m * m, m, 1], device=dev)

        # Vertices: float64 so the last lattice plane lands on hi exactly before the cast.
        t = torch.arange(m, dtype=torch.float64, device=dev) / n
        axes = lo.to(dev)[:, None] + t[None, :] * (hi - lo).to(dev)[:, None]  # (3, n+1)
        vertices = torch.stack(torch.meshgrid(*axes.to(dtype), indexing="ij"), -1).reshape(-1, 3)

        # Tet template: lattice offsets of the 4 slots of each of the 6 tets of a cell.
        eye = torch.eye(3, dtype=torch.int64, device=dev)
        perm = torch.tensor(_PERMUTATIONS, device=dev)  # (6, 3)
        chain = torch.cumsum(eye[perm], 1)  # (6, 3, 3): e_a, e_a+e_b, e_a+e_b+e_c
        offsets = torch.cat([torch.zeros(6, 1, 3, dtype=torch.int64, device=dev), chain], 1)  # (6, 4, 3)
        odd = torch.tensor(_PERMUTATION_IS_ODD, device=dev)
        offsets[odd] = offsets[odd][:, [0, 1, 3, 2]]  # a swap flips the orientation to det > 0

        origin = _ranks((n, n, n), lattice_stride, dev)  # (n^3,) flat index of each cell's low corner
        tets = (origin[:, None, None] + offsets @ lattice_stride).reshape(-1, 4)

        # Edges, direction by direction: the v with v + d still on the lattice, in C order.
        dirs = torch.tensor(_DIRECTIONS, device=dev)  # (7, 3)
        shapes = m - dirs  # (7, 3) extent of the lattice of edge origins per direction
        counts = shapes.prod(1)
        first = torch.cumsum(counts, 0) - counts  # offset of each direction's block
        edges = []
        for d in range(7):  # 7 directions, each one vectorised block
            a = _ranks(shapes[d].tolist(), lattice_stride, dev)
            edges.append(torch.stack([a, a + dirs[d] @ lattice_stride], 1))
        edges = torch.cat(edges)

        # tet_edges: in the template, each local edge joins two chain points, so its
        # direction is |q - p| in {0,1}^3 and its origin min(p, q). Its index is the
        # direction's block offset + the C-order rank of (cell + origin) in that
        # block, and the rank is linear, so it splits into a per-cell and a template part.
        pairs = torch.tensor(TET_EDGE_PAIRS, device=dev)
        p, q = offsets[:, pairs[:, 0]], offsets[:, pairs[:, 1]]  # (6, 6, 3)
        code = ((q - p).abs() @ torch.tensor([4, 2, 1], device=dev)) - 1  # (6, 6) direction index
        block_stride = torch.stack([shapes[:, 1] * shapes[:, 2], shapes[:, 2], torch.ones_like(shapes[:, 2])], 1)
        stride = block_stride[code]  # (6, 6, 3)
        template = first[code] + (torch.minimum(p, q) * stride).sum(-1)  # (6, 6)
        # rank of cell (i, j, k) + template, broadcast over i, j, k: (n, n, n, 36)
        ar = torch.arange(n, device=dev)[:, None]
        per_axis = [ar * stride[..., a].reshape(1, 36) for a in range(3)]  # (n, 36) each
        tet_edges = ((per_axis[0][:, None, None] + per_axis[1][None, :, None])
                     + (per_axis[2] + template.reshape(1, 36))[None, None]).reshape(-1, 6)

        box = tuple(float(x) for x in torch.cat([lo, hi]))
        return cls(vertices=vertices, tets=tets, edges=edges, tet_edges=tet_edges, resolution=n, bbox=box)


def _ranks(shape, stride: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """Flat indices ``i s0 + j s1 + k s2`` of the C-order box ``shape`` = (ni, nj, nk): (ni nj nk,) int64."""
    ranges = [torch.arange(int(size), device=dev) * int(st) for size, st in zip(shape, stride)]
    return (ranges[0][:, None, None] + ranges[1][None, :, None] + ranges[2][None, None, :]).reshape(-1)


def _check_vertices(vertices: torch.Tensor, grid: TetGrid, name: str) -> None:
    v = grid.vertices.shape[0]
    if not isinstance(vertices, torch.Tensor) or tuple(vertices.shape) != (v, 3) or not vertices.is_floating_point():
        got = tuple(vertices.shape) if isinstance(vertices, torch.Tensor) else type(vertices).__name__
        raise ValueError(f"{name}: expected a float tensor of shape ({v}, 3) (one row per grid vertex), got {got}")


def deform(grid: TetGrid, delta: torch.Tensor) -> torch.Tensor:
    """Deformed grid vertices ``vertices + (range / res) * tanh(delta)``.

    ``range / res`` is the cell size per axis: the box side along that axis over
    the cells per axis (:attr:`TetGrid.cell_size`). A vertex thus stays within one
    cell of its lattice point, and a zero ``delta`` is the undeformed grid.

    Args:
        grid: the tet grid.
        delta: (V, 3) float, unbounded per-vertex offsets (the optimised parameter).

    Returns:
        (V, 3) vertices, differentiable in ``delta``.
    """
    _check_vertices(delta, grid, "delta")
    return grid.vertices.to(delta.dtype) + grid.cell_size.to(delta.dtype) * torch.tanh(delta)


def marching_tets(vertices: torch.Tensor, grid: TetGrid, sdf: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Triangle mesh of the zero level of ``sdf`` on the tets of ``grid``.

    Each sign-changing edge ``(a, b)`` gets one output vertex, the zero of the
    linear interpolation ``p = (p_a s_b - p_b s_a) / (s_b - s_a)``; tets sharing
    the edge share that vertex, so the mesh is watertight and has no duplicates
    (it is open only where the surface leaves the box). Faces come from the
    16-case table :data:`_TRIANGLES` and point towards positive SDF (outwards).
    Vertices with ``sdf == 0`` count as inside; the surface then passes through
    them and the faces around such a vertex have zero area (as in any marching scheme).

    No Python loop over tets, edges or faces; the temporaries are 4 bytes a tet,
    2 bytes and one int64 (the edge -> output vertex map) an edge, and O(crossed tets).

    Args:
        vertices: (V, 3) float positions of the grid's vertices (e.g. :func:`deform`'s output).
        grid: supplies ``tets`` (T, 4), ``edges`` (E, 2) and ``tet_edges`` (T, 6).
        sdf: (V,) float signed distance (or any level function), positive outside.

    Returns:
        mesh_vertices: (M, 3) float, differentiable in ``vertices`` and ``sdf``,
            one per sign-changing edge, in edge order.
        faces: (F, 3) int64 indices into ``mesh_vertices``. Both are empty (M = F = 0)
            when ``sdf`` has one sign everywhere.
    """
    _check_vertices(vertices, grid, "vertices")
    v = grid.vertices.shape[0]
    if not isinstance(sdf, torch.Tensor) or tuple(sdf.shape) != (v,) or not sdf.is_floating_point():
        got = tuple(sdf.shape) if isinstance(sdf, torch.Tensor) else type(sdf).__name__
        raise ValueError(f"sdf: expected a float tensor of shape ({v},), got {got}")
    dev = vertices.device
    outside = (sdf.detach() > 0).to(torch.uint8)

    # Which tets the surface crosses: their 4 sign bytes, read as one int32, are
    # neither all 0 nor all 1 (0x01010101 in either byte order). index_select on the
    # flat table is ~4x faster than fancy indexing; the pass is 4 bytes a tet.
    signs = outside.index_select(0, grid.tets.reshape(-1)).view(-1, 4)  # (T, 4)
    packed = signs.view(torch.int32).squeeze(1)
    crossed = ((packed != 0) & (packed != 0x01010101)).nonzero().squeeze(1)  # (Tc,)
    s = signs[crossed].long()
    case = s[:, 0] | s[:, 1] << 1 | s[:, 2] << 2 | s[:, 3] << 3  # (Tc,) in 1 .. 14

    # One output vertex per sign-changing edge, numbered in edge order.
    ends_sign = outside.index_select(0, grid.edges.reshape(-1)).view(-1, 2)
    changing = (ends_sign[:, 0] != ends_sign[:, 1]).nonzero().squeeze(1)  # (M,)
    edge_vertex = torch.full((grid.edges.shape[0],), -1, dtype=torch.int64, device=dev)
    edge_vertex[changing] = torch.arange(changing.shape[0], device=dev)
    ends = grid.edges[changing]  # (M, 2)
    s_a, s_b = sdf[ends[:, 0]], sdf[ends[:, 1]]
    p_a, p_b = vertices[ends[:, 0]], vertices[ends[:, 1]]
    # = (p_a s_b - p_b s_a) / (s_b - s_a); this form is exactly p_a when s_a == 0.
    # s_a - s_b != 0 since exactly one of them is > 0.
    weight = (s_a / (s_a - s_b)).unsqueeze(1)
    mesh_vertices = p_a + weight * (p_b - p_a)

    table = torch.tensor(_TRIANGLES, dtype=torch.int64, device=dev)[case]  # (Tc, 2, 3)
    tri_tet, tri_slot = (table[:, :, 0] >= 0).nonzero().unbind(1)  # a tet's triangles consecutive
    local = table[tri_tet, tri_slot]  # (F, 3) local edges, all sign-changing
    faces = edge_vertex[grid.tet_edges[crossed[tri_tet]].gather(1, local)]  # (F, 3)
    return mesh_vertices, faces


def sdf_from_density(grid: TetGrid, density_fn: DensityFn, threshold: float, *,
                     chunk: int = 1 << 18) -> torch.Tensor:
    """Initial SDF from a density field: ``clamp(threshold - density, -1, 1)`` at the vertices.

    Positive outside (density below the threshold), as :func:`marching_tets` expects.
    Evaluated without gradient; the result is meant to initialise an optimised SDF.

    Args:
        grid: the tet grid (its undeformed vertices are sampled).
        density_fn: ``points (N, 3) -> density (N,)`` (or (N, 1)), called on chunks of
            at most ``chunk`` points, on the grid's device and dtype.
        threshold: tau, the density at the surface (about 25 for softplus densities).
        chunk: points per ``density_fn`` call (bounds the field's peak memory).

    Returns:
        (V,) tensor in [-1, 1], the grid vertices' dtype and device.
    """
    if int(chunk) < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    pts = grid.vertices
    sdf = torch.empty(pts.shape[0], dtype=pts.dtype, device=pts.device)
    with torch.no_grad():
        for start in range(0, pts.shape[0], int(chunk)):  # loop over chunks, never over points
            part = pts[start:start + int(chunk)]
            sigma = torch.as_tensor(density_fn(part))
            if sigma.numel() != part.shape[0]:
                raise ValueError(f"density_fn must return ({part.shape[0]},) for {part.shape[0]} points, "
                                 f"got {tuple(sigma.shape)}")
            sdf[start:start + part.shape[0]] = float(threshold) - sigma.reshape(-1).to(sdf)
    return sdf.clamp_(-1.0, 1.0)


def tighten_bbox(grid: TetGrid, sdf: torch.Tensor, margin: float = 0.1) -> Tuple[float, ...]:
    """Box around the occupied vertices (``sdf < 0``) for a finer second grid.

    The box of the occupied vertices is first grown by one cell of ``grid`` per side,
    because the surface lies between the outermost occupied vertex and its empty
    neighbour (up to a cell further out), then by ``margin`` times its extent per
    side, and finally clipped to ``grid.bbox`` (outside it the field is unknown).

    Args:
        grid: the grid ``sdf`` was sampled on.
        sdf: (V,) values at ``grid.vertices``, negative inside.
        margin: fraction of the box's extent added on each side (0.1: 10%).

    Returns:
        ``(xmin, ymin, zmin, xmax, ymax, zmax)`` floats, for :meth:`TetGrid.cube`.

    Raises:
        ValueError: no vertex is occupied, or ``sdf`` has the wrong shape.
    """
    v = grid.vertices.shape[0]
    if tuple(sdf.shape) != (v,):
        raise ValueError(f"sdf: expected shape ({v},), got {tuple(sdf.shape)}")
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    occupied = grid.vertices[sdf.detach() < 0].double()
    if occupied.shape[0] == 0:
        raise ValueError("no occupied vertex (sdf < 0 nowhere): nothing to tighten the box around")
    cell = grid.cell_size.double().cpu()
    lo = occupied.min(0).values.cpu() - cell
    hi = occupied.max(0).values.cpu() + cell
    pad = float(margin) * (hi - lo)
    box = torch.tensor(grid.bbox, dtype=torch.float64)
    lo = torch.maximum(lo - pad, box[:3])
    hi = torch.minimum(hi + pad, box[3:])
    return tuple(float(x) for x in torch.cat([lo, hi]))
