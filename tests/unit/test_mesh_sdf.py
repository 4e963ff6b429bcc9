"""A mesh as the DMTet start (mpod_core.geometry.mesh_sdf, mpod_core.pipelines.dsd_init): libigl's signed
distance against closed forms (sphere, box), open and inverted meshes, refused meshes, the marching-tets
surface of a sphere's grid SDF, and the texture field fitted to a two-colour mesh against an unfitted control."""
import sys

import numpy as np
import pytest
import torch
import trimesh

from mpod_core.encoding import HashGridConfig
from mpod_core.fields import NeRFFieldConfig
from mpod_core.geometry import TetGrid
from mpod_core.geometry.mesh_sdf import check_initial_mesh, mesh_sdf_on_grid, mesh_signed_distance
from mpod_core.mesh import mesh_to_tensors
from mpod_core.pipelines import dsd_init
from mpod_core.pipelines.dsd_init import init_state_from_mesh, mesh_reference_view, sample_surface

TINY = NeRFFieldConfig(hash_grid=HashGridConfig(n_levels=4, log2_hashmap_size=12))
RED, BLUE = (0.9, 0.15, 0.1), (0.1, 0.2, 0.9)


def _tensors(mesh):
    return torch.tensor(mesh.vertices, dtype=torch.float64), torch.tensor(mesh.faces, dtype=torch.int64)


def _box_without_top():
    box = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    keep = box.face_normals[:, 2] < 0.5  # drop the two triangles of the +z side
    return trimesh.Trimesh(box.vertices, box.faces[keep], process=False)


def test_sphere_distance_is_norm_minus_radius_inside_and_outside():
    sphere = trimesh.creation.icosphere(subdivisions=5, radius=0.7)  # chord sag ~1e-4
    v, f = _tensors(sphere)
    g = torch.Generator().manual_seed(0)
    direction = torch.nn.functional.normalize(torch.randn(3000, 3, generator=g, dtype=torch.float64), dim=1)
    r = 0.05 + 1.5 * torch.rand(3000, 1, generator=g, dtype=torch.float64)
    p = direction * r
    d = mesh_signed_distance(v, f, p, chunk=1000)   # several chunks
    assert d.dtype == torch.float32 and d.shape == (3000,)
    torch.testing.assert_close(d.double(), r[:, 0] - 0.7, atol=1e-3, rtol=0)
    # positive outside regardless of winding; the cut keeps values inside it exact
    torch.testing.assert_close(mesh_signed_distance(v, f.flip(1), p), d, atol=1e-6, rtol=0)
    cut = mesh_signed_distance(v, f, p, max_distance=0.1)
    torch.testing.assert_close(cut, d.clamp(-0.1, 0.1), atol=1e-6, rtol=0)


def test_box_signs_and_distances_at_known_points():
    v, f = _tensors(trimesh.creation.box(extents=(2.0, 1.0, 1.0)))
    p = torch.tensor([[0.0, 0, 0], [0.9, 0.4, 0.4], [1.5, 0, 0], [0, 0, 0.75], [1.3, 0.9, 0.5], [-0.8, 0, 0]],
                     dtype=torch.float64)
    expected = torch.tensor([-0.5, -0.1, 0.5, 0.25, 0.5, -0.2])
    torch.testing.assert_close(mesh_signed_distance(v, f, p), expected, atol=1e-6, rtol=0)
    assert check_initial_mesh(v, f) == "watertight"


def test_an_open_box_is_used_with_the_winding_numbers_sign():
    v, f = _tensors(_box_without_top())
    report = check_initial_mesh(v, f)
    assert report == ("not watertight: 4 boundary edges; inside/outside taken from the generalized winding "
                      "number")
    p = torch.tensor([[0.0, 0, 0], [0.2, -0.2, 0.2], [0, 0, 0.8], [0.9, 0, 0]], dtype=torch.float64)
    d = mesh_signed_distance(v, f, p)
    assert (d[:2] < 0).all() and (d[2:] > 0).all(), d
    grid = TetGrid.cube(8, (-0.7, -0.7, -0.7, 0.7, 0.7, 0.7))
    sdf = mesh_sdf_on_grid(v, f, grid)
    inside = (grid.vertices.abs() < 0.45).all(1)
    assert (sdf[inside] < 0).all() and (sdf[(grid.vertices.abs() > 0.55).any(1)] > 0).all()


def test_seams_are_merged_before_counting_boundary_edges():
    box = trimesh.creation.box()
    unmerged = trimesh.Trimesh(box.vertices[box.faces].reshape(-1, 3), np.arange(36).reshape(12, 3), process=False)
    assert check_initial_mesh(*_tensors(unmerged)) == "watertight"


@pytest.mark.parametrize("vertices, faces, message", [
    (torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.int64), "empty"),
    (torch.zeros(3, 3), torch.zeros(0, 3, dtype=torch.int64), "empty"),
    (torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, float("nan"), 0]]), torch.tensor([[0, 1, 2]]), "NaN"),
    (torch.ones(3, 3), torch.tensor([[0, 1, 2]]), "zero extent"),
    (torch.eye(3), torch.tensor([[0, 1, 3]]), "outside"),
    (torch.eye(3), torch.tensor([[0.0, 1, 2]]), "integer tensor of shape"),
])
def test_unusable_meshes_are_refused(vertices, faces, message):
    with pytest.raises(ValueError, match=message):
        check_initial_mesh(vertices, faces)


def test_a_single_triangle_has_no_inside_and_is_refused():
    v = torch.tensor([[-0.5, -0.5, 0.0], [0.5, -0.5, 0.0], [0.0, 0.5, 0.0]], dtype=torch.float64)
    f = torch.tensor([[0, 1, 2]])
    assert check_initial_mesh(v, f).startswith("not watertight: 3 boundary edges")
    with pytest.raises(ValueError, match="no vertex of the 8-cell grid is inside the mesh.*more grid_cells"):
        mesh_sdf_on_grid(v, f, TetGrid.cube(8, (-1, -1, -1, 1, 1, 1)))
    with pytest.raises(ValueError, match="open sheet"):
        init_state_from_mesh(trimesh.Trimesh(v.numpy(), f.numpy(), process=False), 8, texture_steps=0,
                             backend="torch", field_config=TINY)
    with pytest.raises(ValueError, match="empty"):
        init_state_from_mesh(trimesh.Trimesh(), 8, texture_steps=0, backend="torch", field_config=TINY)


def test_missing_libigl_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "igl", None)
    with pytest.raises(ImportError, match="pip install libigl"):
        mesh_signed_distance(torch.eye(3), torch.tensor([[0, 1, 2]]), torch.zeros(1, 3))


def test_marching_the_grid_sdf_of_a_sphere_gives_the_sphere_where_it_was():
    center, radius, cells = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64), 0.4, 20
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=radius)
    sphere.apply_translation(center.numpy())
    state, report = init_state_from_mesh(sphere, cells, texture_steps=0, backend="torch", field_config=TINY)
    assert report.startswith(f"initial mesh: {len(sphere.vertices)} vertices, {len(sphere.faces)} faces, watertight;")
    # the mesh's own coordinates: bounds + 10% of the extent (0.08) per side
    torch.testing.assert_close(torch.tensor(state.grid.bbox, dtype=torch.float64),
                               torch.cat([center - radius - 0.08, center + radius + 0.08]), atol=1e-3, rtol=0)
    assert state.sdf.min() >= -1 and state.sdf.max() <= 1 and state.sdf.dtype == torch.float32
    with torch.no_grad():
        vertices, faces = state.surface()
    cell = float(state.grid.cell_size.max())
    r = (vertices.double() - center).norm(dim=1)
    assert faces.shape[0] > 500 and float((r - radius).abs().max()) < 0.5 * cell
    # the front camera holds the sphere about the origin through the farthest vertex
    view = state.reference_view
    assert view == mesh_reference_view(torch.tensor(sphere.vertices)) and view["fov"] == 40.0
    far = float(np.linalg.norm(sphere.vertices, axis=1).max())
    assert far / view["distance"] < np.sin(np.radians(20.0)) * 0.85


def _two_colour_box():
    box = trimesh.creation.box(extents=(1.0, 0.6, 0.6)).subdivide().subdivide().subdivide()
    box.apply_translation((0.2, 0.0, 0.0))
    left = box.vertices[:, 0] < 0.2
    colors = np.where(left[:, None], RED, BLUE)
    box.visual = trimesh.visual.ColorVisuals(box, vertex_colors=(colors * 255).round().astype(np.uint8))
    return box


def test_the_texture_field_fits_a_two_colour_mesh_and_a_cancel_propagates(monkeypatch):
    monkeypatch.setattr(dsd_init, "TEXTURE_BATCH", 1024)  # an eighth of the batch: 30 steps still fit
    box = _two_colour_box()
    calls = []
    state, report = init_state_from_mesh(box, 8, texture_steps=30, seed=3, backend="torch", field_config=TINY,
                                         progress=lambda i, n, preview: calls.append((i, n, preview)))
    assert calls == [(i, 30, None) for i in range(1, 31)]
    points, _ = sample_surface(mesh_to_tensors(box, dtype=torch.float64), 4000, torch.Generator().manual_seed(9))
    points = points.float()
    sides = {"left": (points[:, 0] < 0.05, RED), "right": (points[:, 0] > 0.35, BLUE)}

    def errors(s):
        with torch.no_grad():
            albedo = s.albedo(points)
        return {k: float((albedo[m] - torch.tensor(c)).abs().mean()) for k, (m, c) in sides.items()}

    fitted = errors(state)
    assert max(fitted.values()) < 0.1, fitted             # constant grey would be ~0.37 off, mid-colour ~0.3
    held_out = float(report.split("mean abs colour error ")[1].split()[0])
    assert held_out < 0.1, report
    unfitted, _ = init_state_from_mesh(box, 8, texture_steps=0, seed=3, backend="torch", field_config=TINY)
    assert min(errors(unfitted).values()) > 0.2           # the control: no fit, no colours

    def cancel(i, n, preview):
        if i == 5:
            raise InterruptedError("cancelled")
    with pytest.raises(InterruptedError, match="cancelled"):
        init_state_from_mesh(box, 8, texture_steps=60, backend="torch", field_config=TINY, progress=cancel)


def test_surface_samples_lie_on_the_mesh_with_its_texture_or_grey():
    box = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    tex = np.zeros((2, 2, 3), np.uint8)
    tex[:, 0] = (255, 0, 0)
    tex[:, 1] = (0, 0, 255)
    from PIL import Image
    uv = np.where(box.vertices[:, :1] < 0, 0.25, 0.75) * np.ones((1, 2))   # left vertices on red, right on blue
    textured = box.copy()
    textured.visual = trimesh.visual.TextureVisuals(uv=uv, image=Image.fromarray(tex))
    pts, colors = sample_surface(mesh_to_tensors(textured, dtype=torch.float64), 2000, torch.Generator().manual_seed(0))
    assert float((pts.abs().max(1).values - 0.5).abs().max()) < 1e-9         # on the cube's surface
    left = pts[:, 0] < -0.49999
    assert torch.allclose(colors[left], torch.tensor([1.0, 0.0, 0.0]), atol=1e-6)
    _, grey = sample_surface(mesh_to_tensors(box), 10, torch.Generator().manual_seed(0))
    assert torch.allclose(grey, torch.full((10, 3), 0.8))
