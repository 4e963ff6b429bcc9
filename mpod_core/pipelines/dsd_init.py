"""ThemeStation's DSD Refine started from any mesh instead of a stage-1 radiance field.

The mesh keeps its own coordinates (the refined mesh comes back where it was). Its
signed distance (:func:`~mpod_core.geometry.mesh_sdf.mesh_sdf_on_grid`, libigl's fast
winding number for the sign, so open meshes work) on a grid over its bounds + 10% of
its largest extent per side is the DMTet start; a fresh :class:`RadianceField` over
that box, its albedo fitted to the mesh's colours at surface points, is the texture
field. The result is the :class:`~mpod_core.pipelines.dmtet_refine.RefineState` that
:func:`~mpod_core.pipelines.dmtet_refine.init_refine_state` builds from a stage-1 field.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..fields import NeRFFieldConfig, RadianceField
from ..geometry import TetGrid
from ..geometry.mesh_sdf import check_initial_mesh, mesh_sdf_on_grid
from ..mesh import UNCOLORED_RGBA, MeshLike, MeshTensors, check_mesh, mesh_to_tensors
from ..progress import ProgressFn
from ..render import texture_sample
from .dmtet_refine import RefineState

__all__ = ["init_state_from_mesh", "sample_surface", "mesh_reference_view"]

#: Box margin per side, as a fraction of the mesh's largest extent (the stage-1 route's 10%).
BOX_MARGIN = 0.1
#: Surface points per Adam step of the texture fit, and held out for its report.
TEXTURE_BATCH = 8192
HELD_OUT_POINTS = 4096
#: Adam learning rate of the texture fit (stage 1's).
TEXTURE_LEARNING_RATE = 1e-2
#: Reference camera: the papers' front view and fov (:data:`mpod_core.cameras.REFERENCE_VIEW`)...
REFERENCE_FOV = 40.0
#: ... at the distance where the mesh's bounding sphere about the origin spans this share of the fov.
FRAME_FILL = 0.8


def sample_surface(mesh: MeshTensors, count: int, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """Uniform points on a mesh's surface and its colour there.

    Faces are drawn by area (inverse CDF), points inside them with the square-root
    barycentric map (uniform on a triangle). Colour: vertex colours interpolated
    barycentrically, else the UV texture sampled at interpolated UVs (bilinear, wrap,
    as the renderer does), else :data:`~mpod_core.mesh.UNCOLORED_RGBA`'s grey.

    Args:
        mesh: vertices (V, 3), faces (F, 3) and its appearance (:func:`~mpod_core.mesh.mesh_to_tensors`).
        count: points to draw.
        generator: a CPU generator (the draws are moved to the mesh's device).

    Returns:
        points (count, 3) in the vertices' dtype and colours (count, 3) float32 in [0, 1].

    Raises:
        ValueError: every face has zero area.
    """
    v, f = mesh.vertices, mesh.faces
    dev = v.device
    a, b, c = v[f[:, 0]].double(), v[f[:, 1]].double(), v[f[:, 2]].double()
    area = torch.linalg.cross(b - a, c - a, dim=1).norm(dim=1)
    total = float(area.sum())
    if not total > 0:
        raise ValueError("the mesh's faces all have zero area: no surface to sample")
    cdf = torch.cumsum(area, 0) / total
    u = torch.rand(count, 3, generator=generator, dtype=torch.float64).to(dev)
    face = torch.searchsorted(cdf, u[:, 0].contiguous()).clamp_(max=f.shape[0] - 1)
    s = u[:, 1].sqrt()
    bary = torch.stack([1.0 - s, s * (1.0 - u[:, 2]), s * u[:, 2]], 1)  # (count, 3)
    corners = f[face]  # (count, 3)
    points = (bary[:, :, None] * v[corners].double()).sum(1).to(v.dtype)
    if mesh.vertex_colors is not None:
        colors = (bary[:, :, None] * mesh.vertex_colors[corners].double()).sum(1)
    elif mesh.uv is not None and mesh.texture is not None:
        uv = (bary[:, :, None] * mesh.uv[corners].double()).sum(1)
        colors = texture_sample(mesh.texture.double(), uv[None, None], backend="torch")[0, 0]
    else:
        colors = torch.tensor(UNCOLORED_RGBA[:3], dtype=torch.float64, device=dev).expand(count, 3)
    return points, colors.float().clamp(0.0, 1.0)


def mesh_reference_view(vertices: torch.Tensor) -> dict:
    """The front view (elevation 0, azimuth 0, fov 40°) framing a mesh at any orbit angle.

    Orbit cameras look at the origin (:mod:`mpod_core.cameras`) and the mesh is not moved,
    so the sphere about the origin through its farthest vertex, radius ``R``, is what every
    view must hold: at ``distance = R / (FRAME_FILL sin(fov / 2))`` its outline spans about
    80% of the image height (the papers' distance 2.5 frames a sphere of radius 0.68).
    """
    radius = float(vertices.detach().double().norm(dim=1).max())
    distance = radius / (FRAME_FILL * math.sin(math.radians(REFERENCE_FOV) / 2))
    return {"elevation": 0.0, "azimuth": 0.0, "distance": distance, "fov": REFERENCE_FOV}


def _texture_field(box: Tuple[float, ...], field_config: Optional[NeRFFieldConfig], backend: str, seed: int,
                   device: torch.device) -> RadianceField:
    """A fresh field whose cube ``[-r, r]^3`` (centred on the origin, as every field's) holds ``box``."""
    radius = max(abs(x) for x in box)
    config = dataclasses.replace(field_config or NeRFFieldConfig(), radius=radius)
    with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the caller's RNG
        torch.manual_seed(int(seed))
        field = RadianceField(config, backend=backend, meta={"source": "mesh"})
    return field.to(device)


def _adam(params) -> torch.optim.Adam:
    # Stage 1's settings; the fused kernel steps the 12.6M hash-grid parameters ~5x faster on a CPU.
    try:
        return torch.optim.Adam(params, lr=TEXTURE_LEARNING_RATE, betas=(0.9, 0.99), eps=1e-15, fused=True)
    except (RuntimeError, TypeError, ValueError):  # a device or dtype the fused kernel does not support
        return torch.optim.Adam(params, lr=TEXTURE_LEARNING_RATE, betas=(0.9, 0.99), eps=1e-15)


def init_state_from_mesh(mesh: MeshLike, grid_cells: int, *, backend: str = "auto", device=None,
                         texture_steps: int = 300, seed: int = 0, progress: Optional[ProgressFn] = None,
                         field_config: Optional[NeRFFieldConfig] = None) -> Tuple[RefineState, str]:
    """The DMTet refine start from a mesh (see the module docstring).

    Geometry: a ``grid_cells``-cell :class:`TetGrid` over the mesh's bounds padded by 10% of
    its largest extent on every side (per-axis, not a cube: thin objects keep fine cells
    across), the SDF :func:`mesh_sdf_on_grid` there, zero deformation. Texture: a fresh
    field (seeded by ``seed``) whose albedo is fitted by Adam (lr 1e-2) to the mesh's
    colours (:func:`sample_surface`) by mean squared error, ``texture_steps`` batches of
    8192 surface points; its mean absolute colour error on 4096 held-out surface points is
    reported. Reference view: :func:`mesh_reference_view`.

    Args:
        mesh: a ``trimesh.Trimesh`` or ``trimesh.Scene`` (flattened), coloured, textured or
            plain (light grey 0.8); need not be watertight.
        grid_cells: cells per side of the grid (>= 2).
        backend: hash-grid backend of the texture field (``"auto" | "torch" | "tcnn"``).
        device: where the state lives (None: CPU).
        texture_steps: Adam steps of the texture fit (>= 0).
        seed: seeds the field's initialisation and the surface samples.
        progress: ``progress(i, texture_steps, None)`` after each step; may raise to cancel.
        field_config: settings of the texture field (default: stage 1's ``NeRFFieldConfig()``);
            its radius is replaced by the box's.

    Returns:
        The :class:`RefineState` (``steps_done`` 0, no optimiser moments) and a one-line report:
        ``"initial mesh: V vertices, F faces, <check_initial_mesh's report>; texture fit: mean
        abs colour error E on 4096 held-out surface points after S steps"``.

    Raises:
        ValueError: an unusable mesh (empty, NaN, zero extent: :func:`check_initial_mesh`,
            :func:`~mpod_core.mesh.check_mesh`), a mesh with no inside on the grid, bad arguments.
    """
    if isinstance(grid_cells, bool) or not isinstance(grid_cells, int) or grid_cells < 2:
        raise ValueError(f"grid_cells must be an int >= 2, got {grid_cells!r}")
    if isinstance(texture_steps, bool) or not isinstance(texture_steps, int) or texture_steps < 0:
        raise ValueError(f"texture_steps must be an int >= 0, got {texture_steps!r}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    tensors = mesh_to_tensors(check_mesh(mesh, "mesh"), device=dev, dtype=torch.float64)
    v, f = tensors.vertices, tensors.faces
    closed = check_initial_mesh(v, f)

    lo, hi = v.min(0).values, v.max(0).values
    pad = BOX_MARGIN * float((hi - lo).max())
    box = tuple(float(x) for x in torch.cat([lo - pad, hi + pad]))
    grid = TetGrid.cube(grid_cells, box, device=dev)
    sdf = mesh_sdf_on_grid(v, f, grid)

    texture = _texture_field(box, field_config, backend, seed, dev)
    view = mesh_reference_view(v)
    texture.meta["reference_view"] = dict(view)
    train_gen = torch.Generator().manual_seed(int(seed))
    held_points, held_colors = sample_surface(tensors, HELD_OUT_POINTS, torch.Generator().manual_seed(int(seed) + 1))
    albedo = texture.field.albedo
    optimiser = _adam(list(texture.field.parameters())) if texture_steps else None
    for i in range(texture_steps):
        points, colors = sample_surface(tensors, TEXTURE_BATCH, train_gen)
        optimiser.zero_grad(set_to_none=True)
        loss = F.mse_loss(albedo(points.float()), colors)
        loss.backward()
        optimiser.step()
        if progress is not None:
            progress(i + 1, texture_steps, None)
    with torch.no_grad():
        error = float((albedo(held_points.float()) - held_colors).abs().mean())

    state = RefineState(grid=grid, sdf=torch.nn.Parameter(sdf.float().clone()),
                        delta=torch.nn.Parameter(torch.zeros_like(grid.vertices, dtype=torch.float32)),
                        texture=texture, reference_view=view)
    report = (f"initial mesh: {v.shape[0]} vertices, {f.shape[0]} faces, {closed}; texture fit: mean abs colour "
              f"error {error:.3f} on {HELD_OUT_POINTS} held-out surface points after {texture_steps} steps")
    return state, report
