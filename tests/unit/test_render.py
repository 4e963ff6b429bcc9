"""Tests for mpod_core.render: closed-form coverage, barycentrics, depth order,
gradients (gradcheck in float64), parity with trimesh ray casting, antialiased
silhouette gradients, chunking, textures, input checks and the nvdiffrast twin."""
from __future__ import annotations

import importlib
import io
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from mpod_core import lazy_cuda
from mpod_core import cameras as C
from mpod_core.render import (MeshRender, antialias, interpolate, rasterize, render_mesh,
                              texture_sample)

R = importlib.import_module("mpod_core.render.rasterize")  # the torch backend module
OPS = importlib.import_module("mpod_core.render.ops")

F64 = torch.float64


ROOT = Path(__file__).resolve().parents[2]


def _nvdiffrast_imports() -> bool:
    try:
        import nvdiffrast.torch  # noqa: F401
    except Exception:
        return False
    return True


def _has_nvdiffrast() -> bool:
    return torch.cuda.is_available() and _nvdiffrast_imports()


def _clip2d(xy, w=None):
    """Clip coordinates (1, V, 4) for NDC points xy (V, 2) at depth z = 0, optional w."""
    xy = torch.as_tensor(xy, dtype=F64)
    w = torch.ones(len(xy), dtype=F64) if w is None else torch.as_tensor(w, dtype=F64)
    z = torch.zeros(len(xy), dtype=F64)
    return torch.stack([xy[:, 0] * w, xy[:, 1] * w, z, w], -1)[None]


def _pixel_centres_ndc(h, w):
    """(H, W, 2) NDC of pixel centres, row 0 = top."""
    x = (torch.arange(w, dtype=F64) + 0.5) / w * 2 - 1
    y = 1 - (torch.arange(h, dtype=F64) + 0.5) / h * 2
    return torch.stack(torch.meshgrid(x, y, indexing="xy"), -1)


def _inside_triangle(pts, a, b, c):
    """Analytic inside test (either winding, edges included) of points (..., 2)."""
    def cross(o, p, q):
        return (p[0] - o[0]) * (q[..., 1] - o[1]) - (p[1] - o[1]) * (q[..., 0] - o[0])
    d0, d1, d2 = cross(a, b, pts), cross(b, c, pts), cross(c, a, pts)
    return ((d0 >= 0) & (d1 >= 0) & (d2 >= 0)) | ((d0 <= 0) & (d1 <= 0) & (d2 <= 0))


def nvdiffrast_test(fn):
    """nvdiffrast parity tests: marked gpu, skipped without CUDA and nvdiffrast."""
    fn = pytest.mark.skipif(not _has_nvdiffrast(), reason="needs CUDA and nvdiffrast")(fn)
    return pytest.mark.gpu(fn)


# ----------------------------------------------------------------------------- closed form
def test_single_triangle_covers_exactly_the_pixel_centres_inside():
    h, w = 13, 17
    tri_ndc = [(-0.83, -0.61), (0.71, -0.37), (0.07, 0.88)]
    rast = rasterize(_clip2d(tri_ndc), torch.tensor([[0, 1, 2]]), (h, w), backend="torch")
    expected = _inside_triangle(_pixel_centres_ndc(h, w), *[torch.tensor(p, dtype=F64) for p in tri_ndc])
    got = rast[0, ..., 3] > 0
    assert expected.sum() > 40
    assert torch.equal(got, expected), f"{(got != expected).sum()} pixels differ"
    # Same triangle with the other winding (double-sided).
    rast2 = rasterize(_clip2d(tri_ndc), torch.tensor([[0, 2, 1]]), (h, w), backend="torch")
    assert torch.equal(rast2[0, ..., 3] > 0, expected)


def test_quad_in_front_of_reference_camera_matches_analytic_square():
    h = w = 32
    cam = C.reference_camera(dtype=F64)
    s = 0.35  # half-size of the square at z = 0 (distance 2.5 from the camera)
    v = torch.tensor([[-s, -s, 0], [s, -s, 0], [s, s, 0], [-s, s, 0]], dtype=F64)
    f = torch.tensor([[0, 1, 2], [0, 2, 3]])
    rast = rasterize(C.world_to_clip(v, cam, w, h), f, (h, w), backend="torch")
    focal = float(cam.focal(h)[0])
    half_px = focal * s / 2.5
    centre = torch.arange(w, dtype=F64) + 0.5 - w / 2
    inside_1d = centre.abs() < half_px
    assert (centre.abs() - half_px).abs().min() > 0.05  # no centre on an edge
    expected = inside_1d[:, None] & inside_1d[None, :]
    assert torch.equal(rast[0, ..., 3] > 0, expected)
    # The shared diagonal leaves no crack and no pixel is lost.
    assert int((rast[0, ..., 3] > 0).sum()) == int(inside_1d.sum()) ** 2


def test_barycentrics_at_a_known_pixel_are_perspective_correct():
    h, w = 16, 16
    cam = C.reference_camera(dtype=F64)
    # A slanted world triangle, so depth varies across it and perspective matters.
    tri_w = torch.tensor([[-0.8, -0.6, 0.5], [0.9, -0.5, -0.7], [0.1, 0.9, 0.2]], dtype=F64)
    rast = rasterize(C.world_to_clip(tri_w, cam, w, h), torch.tensor([[0, 1, 2]]), (h, w), backend="torch")
    origins, dirs = C.get_rays(cam, w, h)
    a, b, c = tri_w
    n = torch.linalg.cross(b - a, c - a)
    checked = 0
    for (row, col) in [(8, 8), (5, 9), (10, 6), (9, 11)]:
        assert rast[0, row, col, 3] == 1
        o, d = origins[0, row, col], dirs[0, row, col]
        hit = o + d * torch.dot(a - o, n) / torch.dot(d, n)
        # Barycentric coordinates of the 3D hit point (hand-computed by areas).
        area = torch.linalg.cross(b - a, c - a).norm()
        u = torch.linalg.cross(b - hit, c - hit).norm() / area
        v = torch.linalg.cross(c - hit, a - hit).norm() / area
        torch.testing.assert_close(rast[0, row, col, :2], torch.stack([u, v]), rtol=0, atol=1e-10)
        # z channel: NDC depth of the hit point.
        z_ndc = C.world_to_clip(hit[None], cam, w, h)[0, 0]
        torch.testing.assert_close(rast[0, row, col, 2], z_ndc[2] / z_ndc[3], rtol=0, atol=1e-10)
        checked += 1
    assert checked == 4


def test_barycentrics_closed_form_affine_triangle():
    # w = 1 everywhere: screen-space barycentrics, solvable by hand.
    h = w = 8
    rast = rasterize(_clip2d([(-1.0, -1.0), (1.0, -1.0), (-1.0, 1.0)]), torch.tensor([[0, 1, 2]]),
                     (h, w), backend="torch")
    # Pixel (col 1, row 5): centre NDC x = (1.5/8)*2-1 = -0.625, y = 1-(5.5/8)*2 = -0.375.
    # P = u*a0 + v*a1 + (1-u-v)*a2 -> x = -1 + 2v, y = 1 - 2u - 2v... solve:
    x, y = -0.625, -0.375
    v = (x + 1) / 2
    u = 1 - v - (y + 1) / 2
    torch.testing.assert_close(rast[0, 5, 1], torch.tensor([u, v, 0.0, 1.0], dtype=F64))


def test_nearest_quad_wins_regardless_of_order():
    h = w = 24
    cam = C.reference_camera(dtype=F64)
    quad = torch.tensor([[-1, -1, 0], [1, -1, 0], [1, 1, 0], [-1, 1, 0]], dtype=F64)
    near = quad * torch.tensor([0.3, 0.3, 1], dtype=F64) + torch.tensor([0.15, 0, 0.4], dtype=F64)
    far = quad * torch.tensor([0.3, 0.3, 1], dtype=F64) + torch.tensor([-0.15, 0, -0.4], dtype=F64)
    verts = torch.cat([near, far])
    faces_near = torch.tensor([[0, 1, 2], [0, 2, 3]])
    for faces in (torch.cat([faces_near, faces_near + 4]), torch.cat([faces_near + 4, faces_near])):
        out = render_mesh(verts, faces, cam, w, h, antialias=False, backend="torch")
        tid = out.triangle_id[0]
        is_near = (tid >= 0) & (faces[tid.clamp(min=0)].max(-1).values < 4)
        # Centre pixel is covered by both quads; the near one (z = +0.4) must win.
        assert bool(is_near[12, 12])
        # Its depth is camera distance minus 0.4.
        torch.testing.assert_close(out.depth[0, 12, 12], torch.tensor(2.1, dtype=F64))
        # The far quad is visible only left of the near one.
        far_cols = torch.nonzero((tid >= 0) & ~is_near)[:, 1]
        near_cols = torch.nonzero(is_near)[:, 1]
        assert far_cols.max() < near_cols.min()


def test_empty_scenes_give_zeros():
    h = w = 8
    # No triangles.
    rast = rasterize(torch.zeros(2, 3, 4, dtype=F64), torch.zeros(0, 3, dtype=torch.long), (h, w),
                     backend="torch")
    assert rast.shape == (2, h, w, 4) and not rast.any()
    # Triangle outside the frustum, and one behind the camera (w < 0).
    pos = _clip2d([(1.5, 1.5), (2.5, 1.5), (2.0, 2.5)])
    assert not rasterize(pos, torch.tensor([[0, 1, 2]]), (h, w), backend="torch").any()
    behind = _clip2d([(-0.5, -0.5), (0.5, -0.5), (0.0, 0.5)], w=[-1.0, -1.0, -1.0])
    assert not rasterize(behind, torch.tensor([[0, 1, 2]]), (h, w), backend="torch").any()
    # A triangle crossing the camera plane is dropped whole (no near-plane clipping).
    crossing = _clip2d([(-0.5, -0.5), (0.5, -0.5), (0.0, 0.5)], w=[1.0, 1.0, -0.5])
    assert not rasterize(crossing, torch.tensor([[0, 1, 2]]), (h, w), backend="torch").any()
    # Beyond the far plane (z_ndc > 1) is clipped per pixel.
    far = _clip2d([(-0.5, -0.5), (0.5, -0.5), (0.0, 0.5)])
    far[..., 2] = 1.2
    assert not rasterize(far, torch.tensor([[0, 1, 2]]), (h, w), backend="torch").any()


# ----------------------------------------------------------------------------- gradients
def _stable_two_triangles():
    """Two perspective triangles whose coverage is stable under small perturbations."""
    xy = torch.tensor([[-0.77, -0.71], [0.62, -0.83], [0.13, 0.79], [0.91, 0.67]], dtype=F64)
    w = torch.tensor([1.0, 1.6, 1.3, 2.1], dtype=F64)
    z = torch.tensor([0.1, -0.2, 0.3, 0.05], dtype=F64)
    pos = torch.stack([xy[:, 0] * w, xy[:, 1] * w, z * w, w], -1)[None]
    tri = torch.tensor([[0, 1, 2], [1, 3, 2]])
    return pos, tri


def _edge_margin_px(pos, tri, h, w):
    """Smallest distance (pixels) from any pixel centre to any triangle edge line segment."""
    ndc = pos[0, :, :2] / pos[0, :, 3:]
    px = torch.stack([(ndc[:, 0] + 1) * 0.5 * w, (1 - ndc[:, 1]) * 0.5 * h], -1)
    centres = torch.stack(torch.meshgrid(torch.arange(w, dtype=F64) + 0.5, torch.arange(h, dtype=F64) + 0.5,
                                         indexing="xy"), -1).reshape(-1, 2)
    best = float("inf")
    for f in tri:
        for i in range(3):
            a, b = px[f[i]], px[f[(i + 1) % 3]]
            d = b - a
            t = ((centres - a) @ d / (d @ d)).clamp(0, 1)
            best = min(best, float((centres - (a + t[:, None] * d)).norm(dim=1).min()))
    return best


def test_gradcheck_interpolate_wrt_attr():
    pos, tri = _stable_two_triangles()
    rast = rasterize(pos, tri, (8, 8), backend="torch").detach()
    attr = torch.randn(4, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: interpolate(a, rast, tri, backend="torch"), (attr,))
    attr_b = torch.randn(1, 4, 2, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: interpolate(a, rast, tri, backend="torch"), (attr_b,))


def test_gradcheck_rasterize_and_interpolate_wrt_positions():
    pos, tri = _stable_two_triangles()
    assert _edge_margin_px(pos, tri, 8, 8) > 1e-3  # coverage cannot flip under gradcheck's eps
    attr = torch.randn(4, 3, dtype=F64)
    pos = pos.clone().requires_grad_(True)

    def uvz(p):
        return rasterize(p, tri, (8, 8), backend="torch")[..., :3]

    def shaded(p):
        return interpolate(attr, rasterize(p, tri, (8, 8), backend="torch"), tri, backend="torch")

    assert torch.autograd.gradcheck(uvz, (pos,), atol=1e-6)
    assert torch.autograd.gradcheck(shaded, (pos,), atol=1e-6)


@pytest.mark.slow
def test_gradcheck_antialias_wrt_color_and_positions():
    pos, tri = _stable_two_triangles()
    rast = rasterize(pos, tri, (8, 8), backend="torch").detach()
    color = torch.rand(1, 8, 8, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    # The op must actually do something here, or the check is empty.
    assert not torch.equal(antialias(color, rast, pos, tri, backend="torch"), color)
    color.requires_grad_(True)
    pos = pos.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c, p: antialias(c, rast, p, tri, backend="torch"), (color, pos),
                                    atol=1e-6)


def test_gradcheck_texture_sample():
    g = torch.Generator().manual_seed(1)
    tex = torch.rand(3, 4, 2, dtype=F64, generator=g, requires_grad=True)
    # Away from texel centres (where bilinear weights have kinks); includes wrapped values.
    uv = torch.tensor([[0.13, 0.27], [0.61, 0.93], [1.37, -0.21], [-0.52, 0.44]], dtype=F64)
    uv = uv.view(1, 2, 2, 2).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t, u: texture_sample(t, u, backend="torch"), (tex, uv))


# ----------------------------------------------------------------------------- parity with ray casting
def _scene():
    trimesh = pytest.importorskip("trimesh")
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.6)
    box = trimesh.creation.box(extents=(0.5, 0.4, 0.6))
    box.apply_translation((0.55, 0.1, -0.2))
    return trimesh.util.concatenate([sphere, box])


def test_silhouette_and_depth_match_trimesh_ray_casting():
    pytest.importorskip("rtree")
    import trimesh
    mesh = _scene()
    cams = C.orbit_cameras([0.0, 30.0, -30.0, 10.0], [0.0, 90.0, 215.0, 300.0], 2.5, 40.0, dtype=F64)
    h, w = 48, 64
    out = render_mesh(torch.tensor(mesh.vertices), torch.tensor(mesh.faces), cams, w, h,
                      antialias=False, backend="torch")
    origins, dirs = C.get_rays(cams, w, h)
    o = origins.reshape(-1, 3).numpy()
    d = dirs.reshape(-1, 3).numpy()
    caster = trimesh.ray.ray_triangle.RayMeshIntersector(mesh)
    locs, ray_idx, _ = caster.intersects_location(o, d, multiple_hits=False)
    hit = np.zeros(len(o), bool)
    hit[ray_idx] = True
    dist = np.zeros(len(o))
    dist[ray_idx] = np.linalg.norm(locs - o[ray_idx], axis=1)
    forward = -cams.c2w[:, :3, 2].numpy()  # cameras look down their -z
    cos = (d.reshape(len(cams), h * w, 3) * forward[:, None, :]).sum(-1).reshape(-1)
    ray_depth = dist * cos
    sil = out.alpha.reshape(-1).numpy() > 0.5
    agreement = float((sil == hit).mean())
    both = sil & hit
    rel = np.abs(out.depth.reshape(-1).numpy()[both] - ray_depth[both]) / ray_depth[both]
    assert hit.mean() > 0.15 and both.sum() > 0.9 * hit.sum()
    assert agreement >= 0.99, f"silhouette agreement {agreement:.4%} (< 99%)"
    assert rel.max() <= 1e-3, f"depth: max relative error {rel.max():.2e} on {both.sum()} pixels"
    print(f"silhouette agreement {agreement:.4%} over {sil.size} pixels, "
          f"depth max rel err {rel.max():.2e}")


# ----------------------------------------------------------------------------- antialias behaviour
def _square_alpha(tx, aa, h=32, w=32):
    cam = C.reference_camera(dtype=F64)
    sq = torch.tensor([[-0.4, -0.4, 0], [0.4, -0.4, 0], [0.4, 0.4, 0], [-0.4, 0.4, 0]], dtype=F64)
    tri = torch.tensor([[0, 1, 2], [0, 2, 3]])
    v = sq + torch.stack([tx, torch.zeros_like(tx), torch.zeros_like(tx)])
    clip = C.world_to_clip(v, cam, w, h)
    rast = rasterize(clip, tri, (h, w), backend="torch")
    alpha = interpolate(torch.ones(4, 1, dtype=F64), rast, tri, backend="torch")
    if aa:
        alpha = antialias(alpha, rast, clip, tri, backend="torch")
    return alpha[..., 0]


def test_antialias_gives_silhouette_loss_a_gradient_pointing_the_right_way():
    target = _square_alpha(torch.tensor(0.0, dtype=F64), aa=False).detach()
    grads = {}
    for aa in (False, True):
        tx = torch.tensor(0.13, dtype=F64, requires_grad=True)  # shifted right of the target
        loss = ((_square_alpha(tx, aa) - target) ** 2).mean()
        grads[aa] = torch.autograd.grad(loss, tx)[0].item()
    assert grads[False] == 0.0, "hard coverage must have no position gradient"
    assert grads[True] > 0.05, f"gradient descent must move the square left, got dL/dx = {grads[True]}"


def test_antialias_coverage_gradient_matches_edge_length():
    # d(coverage right of the centre)/dx = rows crossed by the right edge * pixels per unit.
    h = w = 32
    tx = torch.tensor(0.13, dtype=F64, requires_grad=True)
    alpha = _square_alpha(tx, aa=True, h=h, w=w)
    (grad,) = torch.autograd.grad(alpha[0, :, w // 2:].sum(), tx)
    rows = int((_square_alpha(torch.tensor(0.13, dtype=F64), aa=False)[0, :, 20] > 0).sum())
    px_per_unit = float(C.reference_camera(dtype=F64).focal(h)[0]) / 2.5
    expected = rows * px_per_unit
    assert abs(grad.item() - expected) < 0.15 * expected, (grad.item(), expected)


def test_render_mesh_alpha_has_gradient_only_with_antialias():
    cam = C.reference_camera(dtype=F64)
    sq = torch.tensor([[-0.4, -0.4, 0], [0.4, -0.4, 0], [0.4, 0.4, 0], [-0.4, 0.4, 0]], dtype=F64)
    tri = torch.tensor([[0, 1, 2], [0, 2, 3]])
    target = render_mesh(sq, tri, cam, 32, 32, antialias=False, backend="torch").alpha.detach()
    shift = torch.zeros(3, dtype=F64, requires_grad=True)
    out = render_mesh(sq + shift + torch.tensor([0.13, 0, 0], dtype=F64), tri, cam, 32, 32, backend="torch")
    (grad,) = torch.autograd.grad(((out.alpha - target) ** 2).mean(), shift)
    assert grad[0] > 0.05 and abs(grad[1]) < 0.2 * grad[0]


def test_antialias_leaves_interior_edges_alone():
    # Flat quad, two triangles with different colours; the shared diagonal is no
    # silhouette, also when its vertices are duplicated (a UV seam).
    h = w = 24
    cam = C.reference_camera(dtype=F64)
    s = 0.5
    v = torch.tensor([[-s, -s, 0], [s, -s, 0], [s, s, 0], [-s, s, 0]], dtype=F64)
    for verts, faces in [(v, torch.tensor([[0, 1, 2], [0, 2, 3]])),
                         (torch.cat([v, v[[0, 2]]]), torch.tensor([[0, 1, 2], [4, 5, 3]]))]:
        clip = C.world_to_clip(verts, cam, w, h)
        rast = rasterize(clip, faces, (h, w), backend="torch")
        tid = rast[..., 3].long()
        color = torch.stack([(tid == 1), (tid == 2), torch.zeros_like(tid, dtype=torch.bool)], -1).to(F64)
        out = antialias(color, rast, clip, faces, backend="torch")
        changed = (out != color).any(-1)[0]
        covered = tid[0] > 0
        # Changed pixels all touch the background.
        pad = torch.nn.functional.pad((~covered).to(F64)[None, None], (1, 1, 1, 1), value=1.0)
        near_bg = torch.nn.functional.max_pool2d(pad, 3, stride=1)[0, 0] > 0
        assert changed.any()
        assert not (changed & ~near_bg).any(), "an interior edge was antialiased"


def test_antialias_on_closed_mesh_touches_only_the_silhouette():
    trimesh = pytest.importorskip("trimesh")
    sphere = trimesh.creation.icosphere(subdivisions=4)
    out_aa = render_mesh(torch.tensor(sphere.vertices, dtype=torch.float32), torch.tensor(sphere.faces),
                         C.orbit_cameras(20.0, 30.0, 3.5), 64, 64, backend="torch")
    out = render_mesh(torch.tensor(sphere.vertices, dtype=torch.float32), torch.tensor(sphere.faces),
                      C.orbit_cameras(20.0, 30.0, 3.5), 64, 64, antialias=False, backend="torch")
    changed = (out_aa.color != out.color).any(-1)[0]
    covered = out.triangle_id[0] >= 0
    pad = torch.nn.functional.pad((~covered).float()[None, None], (1, 1, 1, 1), value=1.0)
    near_bg = torch.nn.functional.max_pool2d(pad, 3, stride=1)[0, 0] > 0
    assert changed.sum() > 20
    assert not (changed & ~near_bg).any()


# ----------------------------------------------------------------------------- chunking
def test_chunking_does_not_change_the_result():
    trimesh = pytest.importorskip("trimesh")
    sphere = trimesh.creation.icosphere(subdivisions=2)
    v = torch.tensor(sphere.vertices, dtype=torch.float32)
    f = torch.tensor(sphere.faces)
    cams = C.orbit_cameras([0.0, 20.0, -40.0], [0.0, 120.0, 250.0], 2.2)
    clip = C.world_to_clip(v, cams, 40, 30)
    full = R.rasterize_torch(clip, f, (30, 40))
    tiny = R.rasterize_torch(clip, f, (30, 40), max_pairs=7)
    assert torch.equal(full, tiny)
    a = render_mesh(v, f, cams, 40, 30, backend="torch")
    b = render_mesh(v, f, cams, 40, 30, backend="torch", chunk_pixels=40 * 30)
    assert torch.equal(a.triangle_id, b.triangle_id)  # coverage is exact
    for name in ("color", "alpha", "depth", "normal", "rast"):
        # float shading may differ in the last bits: batched kernels split work by the batch size
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-4, atol=1e-4, msg=name)


# ----------------------------------------------------------------------------- textures
def _quad_with_uv():
    s = 0.6
    v = torch.tensor([[-s, -s, 0], [s, -s, 0], [s, s, 0], [-s, s, 0]], dtype=F64)
    uv = torch.tensor([[0, 0], [1, 0], [1, 1], [0, 1]], dtype=F64)  # v = 0 at the bottom
    return v, torch.tensor([[0, 1, 2], [0, 2, 3]]), uv


QUADRANT_COLOURS = np.array([[[255, 0, 0], [0, 255, 0]],       # image row 0 (top): red, green
                             [[0, 0, 255], [255, 255, 255]]],  # bottom: blue, white
                            np.uint8)


def _quadrant_centres(h, w, half_size=0.6):
    """Pixel (row, col) nearest the centre of each quadrant of the quad's image footprint
    (reference camera), keyed by the texel (row, col) expected there."""
    quarter = float(C.reference_camera().focal(h)[0]) * half_size / 2.5 / 2
    lo_r, hi_r = int(h / 2 - quarter), int(h / 2 + quarter)
    lo_c, hi_c = int(w / 2 - quarter), int(w / 2 + quarter)
    return {(0, 0): (lo_r, lo_c), (0, 1): (lo_r, hi_c), (1, 0): (hi_r, lo_c), (1, 1): (hi_r, hi_c)}


def test_textured_quad_shows_each_texel_in_its_quadrant():
    v, f, uv = _quad_with_uv()
    tex = torch.tensor(QUADRANT_COLOURS / 255.0)
    out = render_mesh(v, f, C.reference_camera(dtype=F64), 32, 32, uv=uv, texture=tex, backend="torch")
    for (ty, tx), (row, col) in _quadrant_centres(32, 32).items():
        torch.testing.assert_close(out.color[0, row, col], tex[ty, tx], atol=0.05, rtol=0)


def test_trimesh_glb_roundtrip_uv_convention():
    trimesh = pytest.importorskip("trimesh")
    from PIL import Image
    v, f, uv = _quad_with_uv()
    mesh = trimesh.Trimesh(v.numpy(), f.numpy(), process=False,
                           visual=trimesh.visual.TextureVisuals(uv=uv.numpy(),
                                                                image=Image.fromarray(QUADRANT_COLOURS)))
    loaded = trimesh.load(io.BytesIO(mesh.export(file_type="glb")), file_type="glb", force="mesh")
    mat = loaded.visual.material
    image = getattr(mat, "baseColorTexture", None) or getattr(mat, "image", None)
    tex = torch.tensor(np.asarray(image.convert("RGB")) / 255.0)
    out = render_mesh(torch.tensor(loaded.vertices), torch.tensor(loaded.faces), C.reference_camera(dtype=F64),
                      32, 32, uv=torch.tensor(loaded.visual.uv, dtype=F64), texture=tex, backend="torch")
    red = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    row, col = _quadrant_centres(32, 32)[(0, 0)]
    torch.testing.assert_close(out.color[0, row, col], red, atol=0.05, rtol=0)


def test_texture_sample_wraps():
    tex = torch.tensor(QUADRANT_COLOURS / 255.0)
    uv = torch.tensor([[[[0.25, 0.75], [1.25, 0.75], [0.25, -0.25], [-2.75, 3.75]]]], dtype=F64)
    out = texture_sample(tex, uv, backend="torch")
    for i in range(4):
        torch.testing.assert_close(out[0, 0, i], tex[0, 0])
    # Across the seam, bilinear filtering blends the first and last columns.
    seam = texture_sample(tex, torch.tensor([[[[0.0, 0.75]]]], dtype=F64), backend="torch")
    torch.testing.assert_close(seam[0, 0, 0], (tex[0, 0] + tex[0, 1]) / 2)


# ----------------------------------------------------------------------------- render_mesh
def test_render_mesh_outputs():
    trimesh = pytest.importorskip("trimesh")
    box = trimesh.creation.box(extents=(0.8, 0.8, 0.8))
    cams = C.orbit_cameras([0.0, 30.0], [0.0, 45.0], 2.5)
    v = torch.tensor(box.vertices, dtype=torch.float32)
    out = render_mesh(v, torch.tensor(box.faces), cams, 40, 30, background=(1.0, 1.0, 1.0), backend="torch")
    assert isinstance(out, MeshRender)
    assert out.color.shape == (2, 30, 40, 3) and out.alpha.shape == (2, 30, 40)
    assert out.depth.shape == (2, 30, 40) and out.normal.shape == (2, 30, 40, 3)
    assert out.triangle_id.dtype == torch.int64 and out.rast.shape == (2, 30, 40, 4)
    bg = out.triangle_id < 0
    assert torch.all(out.depth[bg] == 0) and torch.all(out.normal[bg] == 0)
    # Background keeps the background colour except where silhouettes blend into it.
    assert (out.color[bg] == 1.0).all(-1).float().mean() > 0.9
    assert torch.all(out.alpha[bg] < 0.5) and torch.all(out.alpha[~bg] > 0.5)
    fg = ~bg
    assert 0.05 < fg.float().mean() < 0.9
    torch.testing.assert_close(out.normal[fg].norm(dim=-1), torch.ones(int(fg.sum())))
    # Front view: the visible face of the box points at the camera (+z), at depth 2.5 - 0.4.
    torch.testing.assert_close(out.normal[0, 15, 20], torch.tensor([0.0, 0.0, 1.0]))
    torch.testing.assert_close(out.depth[0, 15, 20], torch.tensor(2.1), rtol=1e-5, atol=1e-5)
    assert ((out.color >= 0) & (out.color <= 1)).all() and ((out.alpha >= 0) & (out.alpha <= 1)).all()
    # Vertex colours.
    red = torch.tensor([[1.0, 0.0, 0.0]]).expand(len(v), 3)
    out_vc = render_mesh(v, torch.tensor(box.faces), cams, 40, 30, vertex_colors=red, antialias=False,
                         backend="torch")
    torch.testing.assert_close(out_vc.color[fg], red[:1].expand(int(fg.sum()), 3))


def test_render_mesh_validates_inputs():
    v = torch.zeros(4, 3)
    f = torch.tensor([[0, 1, 2]])
    cam = C.reference_camera()
    with pytest.raises(ValueError, match=r"expected \(V, 3\), got \(4, 2\)"):
        render_mesh(torch.zeros(4, 2), f, cam, 8, 8)
    with pytest.raises(ValueError, match="no faces"):
        render_mesh(v, torch.zeros(0, 3, dtype=torch.long), cam, 8, 8)
    with pytest.raises(ValueError, match=r"expected \(F, 3\)"):
        render_mesh(v, torch.tensor([0, 1, 2]), cam, 8, 8)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        render_mesh(v, torch.tensor([[0, 1, 4]]), cam, 8, 8)
    with pytest.raises(ValueError, match=r"vertex_colors: expected \(4, 3\) or \(4, 4\)"):
        render_mesh(v, f, cam, 8, 8, vertex_colors=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="together"):
        render_mesh(v, f, cam, 8, 8, uv=torch.zeros(4, 2))
    with pytest.raises(ValueError, match="backend must be one of"):
        render_mesh(v, f, cam, 8, 8, backend="opengl")
    with pytest.raises(ValueError, match=r"pos_clip: expected \(N, V, 4\)"):
        rasterize(torch.zeros(3, 4), f, (8, 8))
    with pytest.raises(ValueError, match="resolution"):
        rasterize(torch.zeros(1, 3, 4), f, (0, 8))


def test_auto_backend_falls_back_with_one_warning(monkeypatch):
    pos, tri = _stable_two_triangles()
    monkeypatch.setattr(lazy_cuda, "_WARNED", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = rasterize(pos, tri, (8, 8))  # CPU tensors: always the torch backend
        b = rasterize(pos, tri, (8, 8), backend="auto")
    ours = [w for w in caught if "pure-PyTorch rasterizer" in str(w.message)]
    assert len(ours) == 1
    assert torch.equal(a, b)


@pytest.mark.skipif(_nvdiffrast_imports(), reason="nvdiffrast is installed")
def test_explicit_nvdiffrast_without_it_raises_import_error_with_hint():
    pos, tri = _stable_two_triangles()
    with pytest.raises(ImportError, match="pip install"):
        rasterize(pos, tri, (8, 8), backend="nvdiffrast")


@pytest.mark.slow  # seconds: kept out of the developer loop (-m "not slow")
def test_importing_render_imports_neither_nvdiffrast_nor_comfyui():
    code = ("import sys, mpod_core.render, mpod_core.render.mesh_renderer; "
            "bad = [m for m in ('nvdiffrast', 'comfy', 'folder_paths', 'server') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr


# ----------------------------------------------------------------------------- nvdiffrast parity (GPU)
def _gpu_scene():
    pytest.importorskip("trimesh")
    mesh = _scene()
    cams = C.orbit_cameras([0.0, 30.0, -30.0], [0.0, 90.0, 215.0], 2.5, device="cuda")
    v = torch.tensor(mesh.vertices, dtype=torch.float32, device="cuda")
    f = torch.tensor(mesh.faces, device="cuda")
    return v, f, cams


@nvdiffrast_test
def test_nvdiffrast_parity_rasterize_interpolate_values_and_gradients():
    v, f, cams = _gpu_scene()
    h, w = 96, 128
    attr = torch.randn(len(v), 3, device="cuda")
    results = {}
    for backend in ("torch", "nvdiffrast"):
        pos = C.world_to_clip(v, cams, w, h).detach().requires_grad_(True)
        rast = rasterize(pos, f, (h, w), backend=backend)
        img = interpolate(attr, rast, f, backend=backend)
        (img * torch.linspace(0, 1, 3, device="cuda")).sum().backward()
        results[backend] = (rast.detach(), img.detach(), pos.grad)
    (r_t, i_t, g_t), (r_n, i_n, g_n) = results["torch"], results["nvdiffrast"]
    same = r_t[..., 3] == r_n[..., 3]
    assert same.float().mean() > 0.995  # ties on shared edges may differ
    torch.testing.assert_close(r_t[same], r_n[same], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(i_t[same], i_n[same], atol=2e-4, rtol=1e-4)
    if bool(same.all()):
        torch.testing.assert_close(g_t, g_n, atol=1e-3, rtol=1e-3)
    else:
        assert torch.nn.functional.cosine_similarity(g_t.flatten(), g_n.flatten(), dim=0) > 0.99


@nvdiffrast_test
def test_nvdiffrast_parity_antialias_values_and_gradients():
    # A single triangle against the background: both methods blend the same pairs.
    pos = _clip2d([(-0.71, -0.62), (0.68, -0.41), (0.09, 0.83)]).float().cuda()
    tri = torch.tensor([[0, 1, 2]], device="cuda")
    rast = rasterize(pos, tri, (32, 32), backend="torch")
    torch.testing.assert_close(rast, rasterize(pos, tri, (32, 32), backend="nvdiffrast"), atol=1e-4, rtol=1e-4)
    color = torch.rand(1, 32, 32, 3, device="cuda")
    outs = {}
    for backend in ("torch", "nvdiffrast"):
        c = color.clone().requires_grad_(True)
        p = pos.clone().requires_grad_(True)
        out = antialias(c, rast, p, tri, backend=backend)
        (out * torch.linspace(0, 1, 3, device="cuda")).sum().backward()
        outs[backend] = (out.detach(), c.grad, p.grad)
    for a, b in zip(outs["torch"], outs["nvdiffrast"]):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


@nvdiffrast_test
def test_nvdiffrast_parity_texture_values_and_gradients():
    g = torch.Generator(device="cuda").manual_seed(0)
    tex0 = torch.rand(5, 7, 3, device="cuda", generator=g)
    uv0 = torch.rand(2, 6, 6, 2, device="cuda", generator=g) * 3 - 1
    outs = {}
    for backend in ("torch", "nvdiffrast"):
        tex = tex0.clone().requires_grad_(True)
        uv = uv0.clone().requires_grad_(True)
        out = texture_sample(tex, uv, backend=backend)
        (out * torch.linspace(0, 1, 3, device="cuda")).sum().backward()
        outs[backend] = (out.detach(), tex.grad, uv.grad)
    for a, b in zip(outs["torch"], outs["nvdiffrast"]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_render_mesh_reports_progress_per_chunk_and_can_be_stopped():
    import trimesh as _trimesh
    from mpod_core import cameras as _cam
    from mpod_core.render import render_mesh as _render_mesh

    sphere = _trimesh.creation.icosphere(subdivisions=1, radius=0.5)
    verts = torch.as_tensor(sphere.vertices, dtype=torch.float32)
    faces = torch.as_tensor(sphere.faces, dtype=torch.int64)
    cams = _cam.orbit_cameras(0, [0, 60, 120, 180, 240], 2.5, 40)
    calls = []
    _render_mesh(verts, faces, cams, 16, 16, chunk_pixels=2 * 16 * 16,
                 progress=lambda done, total, preview: calls.append((done, total, tuple(preview.shape))))
    assert calls == [(2, 5, (16, 16, 3)), (4, 5, (16, 16, 3)), (5, 5, (16, 16, 3))]

    class Stop(Exception):
        pass

    def stop_after_first(done, total, preview):
        raise Stop

    with pytest.raises(Stop):
        _render_mesh(verts, faces, cams, 16, 16, chunk_pixels=2 * 16 * 16, progress=stop_after_first)


def test_views_split_in_bands_of_rows_give_the_whole_view():
    """A view bigger than the pixel budget is rendered in bands of rows: same coverage, same values and
    the same silhouette gradients as the whole view (antialiasing pairs cross every band border)."""
    trimesh = pytest.importorskip("trimesh")
    sphere = trimesh.creation.icosphere(subdivisions=2)
    v0 = torch.tensor(sphere.vertices, dtype=torch.float32) * 0.9
    f = torch.tensor(sphere.faces)
    colors = torch.rand(v0.shape[0], 3, generator=torch.Generator().manual_seed(0))
    cams = C.orbit_cameras([0.0, 30.0], [0.0, 200.0], 2.2)
    outs, grads = [], []
    for budget in (40 * 30, 40 * 4):  # the whole 40x30 view; bands of 2 rows (+1 overlap each side)
        for vc in (None, colors):  # plain shading (banded rays) and interpolated colours
            v = v0.clone().requires_grad_(True)
            out = render_mesh(v, f, cams, 40, 30, vertex_colors=vc, backend="torch", chunk_pixels=budget)
            (out.alpha.sum() + out.color.square().sum()).backward()
            outs.append(out)
            grads.append(v.grad)
    for i in (0, 1):
        whole, banded = outs[i], outs[i + 2]
        assert torch.equal(whole.triangle_id, banded.triangle_id)
        for name in ("color", "alpha", "depth", "normal", "rast"):
            torch.testing.assert_close(getattr(banded, name), getattr(whole, name), rtol=1e-5, atol=1e-5, msg=name)
        assert grads[i].abs().sum() > 0
        torch.testing.assert_close(grads[i + 2], grads[i], rtol=1e-4, atol=1e-4)


def test_rows_of_the_torch_rasterizer_are_those_of_the_whole_image():
    trimesh = pytest.importorskip("trimesh")
    sphere = trimesh.creation.icosphere(subdivisions=2)
    v = torch.tensor(sphere.vertices, dtype=torch.float32)
    f = torch.tensor(sphere.faces)
    clip = C.world_to_clip(v, C.orbit_cameras([10.0], [30.0], 2.2), 40, 30)
    whole = R.rasterize_torch(clip, f, (30, 40))
    for rows in ((0, 7), (7, 19), (29, 30)):
        assert torch.equal(R.rasterize_torch(clip, f, (30, 40), rows=rows), whole[:, rows[0]:rows[1]])
    with pytest.raises(ValueError, match="rows"):
        R.rasterize_torch(clip, f, (30, 40), rows=(20, 31))


def test_a_view_bigger_than_the_pixel_budget_is_rendered_within_it():
    """A 1024^2 view with a budget of 2**16 pixels (16 bands): the peak is the outputs (56 bytes a pixel,
    56 MiB) plus one band, <= 112 MiB; rendered whole it peaks at ~217 MiB. (At the default budget a
    4096^2 view peaks at 1.46 GiB, 2.4 GiB whole; the 4096^2 runs take ~20 s each here, too long for CI.)"""
    trimesh = pytest.importorskip("trimesh")
    from harness.memory import peak_rss_growth
    sphere = trimesh.creation.icosphere(subdivisions=3)
    v = torch.tensor(sphere.vertices, dtype=torch.float32) * 0.9
    f = torch.tensor(sphere.faces)
    cams = C.orbit_cameras([20.0], [0.0], 2.5)
    out, growth = peak_rss_growth(lambda: render_mesh(v, f, cams, 1024, 1024, backend="torch", chunk_pixels=2 ** 16))
    assert 0.8 < float((out.alpha > 0).float().mean()) < 0.9  # the sphere fills most of the view
    assert growth <= 112 * 2 ** 20, f"peak {growth / 2 ** 20:.0f} MiB"


def test_a_colour_field_renders_like_the_same_linear_colours_given_per_vertex():
    """A colour linear in position is exactly its barycentric interpolation, so ``color_fn`` (evaluated at
    each covered pixel's surface point) must equal ``vertex_colors`` of the same function; gradients reach
    the field's parameters and the vertices, and the field sees covered pixels only."""
    import trimesh
    sphere = trimesh.creation.icosphere(subdivisions=2, radius=0.6)
    v = torch.tensor(sphere.vertices, dtype=torch.float64)
    f = torch.tensor(sphere.faces, dtype=torch.long)
    cams = C.orbit_cameras([10.0, -20.0], [30.0, 200.0], 2.5, 40.0).to(dtype=torch.float64)
    scale = torch.tensor([0.8, 0.5, 0.3], dtype=torch.float64, requires_grad=True)
    seen = []

    def field(p):
        seen.append(p.shape[0])
        return 0.5 + scale * p

    a = render_mesh(v, f, cams, 48, 40, color_fn=field, background=(0.2, 0.3, 0.4), backend="torch")
    b = render_mesh(v, f, cams, 48, 40, vertex_colors=(0.5 + scale * v).detach(), background=(0.2, 0.3, 0.4),
                    backend="torch")
    assert torch.allclose(a.color, b.color, atol=1e-9)
    assert sum(seen) == int((a.triangle_id >= 0).sum()) > 500
    a.color.sum().backward()
    assert scale.grad is not None and torch.all(scale.grad.abs() > 0)
    with pytest.raises(ValueError, match="one colour source"):
        render_mesh(v, f, cams, 8, 8, color_fn=field, vertex_colors=v, backend="torch")
